"""The test bed itself: hosts can reach each other, and nothing outlives ``lan()``."""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import Any

import pytest

GONE_STATES = ("Z", "X")  # a killed orphan may linger as a zombie until init reaps it


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in GONE_STATES


async def test_hosts_reach_each_other_and_only_each_other(lan: Any) -> None:
    async with lan(2) as hosts:
        assert [h.name for h in hosts] == ["h0", "h1"]
        assert hosts[0].addr.rsplit(".", 1)[0] == hosts[1].addr.rsplit(".", 1)[0]
        # Unicast over the bridge: h1 sends one UDP datagram to a socket bound on h0.
        server = await hosts[0].run(
            [sys.executable, "-c",
             "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
             f"s.bind(('{hosts[0].addr}', 9999)); print('bound', flush=True);"
             "print(s.recvfrom(100)[0].decode(), flush=True)"]
        )  # fmt: skip
        assert server.stdout is not None
        assert await server.stdout.readline() == b"bound\n"
        client = await hosts[1].run(
            [sys.executable, "-c",
             "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
             f"s.sendto(b'hello', ('{hosts[0].addr}', 9999))"]
        )  # fmt: skip
        assert await client.wait() == 0
        assert await server.stdout.readline() == b"hello\n"
        routes = await hosts[1].ip("route", "show")
        assert "224.0.0.0/4 dev eth0" in routes and "default" not in routes


async def test_lan_cleans_up_when_the_body_raises(lan: Any, netns_module: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with lan(2) as hosts:
            prefix = hosts.prefix
            assert len(netns_module.list_netns(prefix)) == 3  # switch + 2 hosts
            # A process that leaves an orphan behind in the namespace.
            proc = await hosts[0].run(["sh", "-c", "sleep 60 & echo $!; exec sleep 61"])
            assert proc.stdout is not None
            orphan = int(await proc.stdout.readline())
            assert alive(orphan)
            raise RuntimeError("boom")
    assert proc.returncode is not None
    assert not alive(orphan)
    assert netns_module.list_netns(prefix) == []
    assert alive(os.getpid())  # sanity: /proc is readable, so alive() meant something
