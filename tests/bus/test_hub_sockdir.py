"""A hub killed with SIGKILL leaves its socket directory; the next hub's start removes it, and
nothing else (``dpipes.bus.hub.sockdir``)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpipes.bus.client import Client
from dpipes.bus.hub import Hub, sockdir

WAIT_S = 10.0
HUB_THEN_WAIT = (
    "import asyncio, sys\n"
    "from dpipes.bus.hub import Hub\n"
    "async def main():\n"
    "    async with Hub('doomed') as hub:\n"
    "        print(hub.ipc_endpoint, flush=True)\n"
    "        await asyncio.Event().wait()\n"
    "asyncio.run(main())\n"
)


@pytest.fixture
def tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short temporary directory (Unix socket paths are short) that hubs take as theirs."""
    with tempfile.TemporaryDirectory(prefix="sockdir-", dir="/tmp") as where:
        monkeypatch.setenv("TMPDIR", where)
        monkeypatch.setattr(tempfile, "tempdir", where)
        yield Path(where)


def _age(path: Path) -> None:
    old = os.stat(path).st_mtime - sockdir.STALE_AFTER_S - 1
    os.utime(path, (old, old))


async def _killed_hub_dir() -> Path:
    """The socket directory of a hub in another process, killed with SIGKILL while it listened."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", HUB_THEN_WAIT, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    endpoint = (await asyncio.wait_for(proc.stdout.readline(), WAIT_S)).decode().strip()
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    left = Path(endpoint.removeprefix("ipc://")).parent
    assert left.name.startswith(sockdir.PREFIX) and left.is_dir(), "SIGKILL left the directory"
    return left


async def test_a_killed_hubs_directory_is_removed_by_the_next_hub(tmp: Path) -> None:
    dead = await _killed_hub_dir()
    _age(dead)
    async with Hub("alpha") as hub, Client(hub.ipc_endpoint) as client:
        assert not dead.exists()
        assert client.endpoint.addr.startswith("alpha/")
    assert os.listdir(tmp) == [], "a closed hub removes its own directory"


async def test_a_live_hubs_a_fresh_and_a_foreign_directory_stay(tmp: Path) -> None:
    async with Hub("alpha") as live:
        own = Path(live.ipc_endpoint.removeprefix("ipc://")).parent
        _age(own)
        fresh = await _killed_hub_dir()  # dead, but too young: a hub may be starting there
        other = tmp / f"{sockdir.PREFIX}notours"
        other.mkdir()
        (other / "bus.sock").write_text("not a socket of a hub")
        (other / "notes").write_text("something else")
        _age(other)
        plain = tmp / f"{sockdir.PREFIX}plain"
        with socket.socket(socket.AF_UNIX) as listening:
            plain.mkdir()
            listening.bind(str(plain / "bus.sock"))
            listening.listen()  # someone alive listens there: not dead
            _age(plain)
            assert sockdir.sweep(tmp) == 0
        async with Client(live.ipc_endpoint) as client:
            assert client.endpoint.addr.startswith("alpha/")
        assert own.exists() and fresh.exists() and other.exists() and plain.exists()
        assert sockdir.sweep(tmp) == 1 and not plain.exists(), "its socket is bound no more"
