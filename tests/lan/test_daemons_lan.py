"""dpipesd on a LAN of network namespaces: mDNS convergence, leaving, static seeds, placement."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.lan.lifetime import stop

PORT = 7070
CONVERGE_TIMEOUT_S = 20.0  # mDNS converges in well under a second; Python start-up on 2 busy cores does not
STOP_TIMEOUT_S = 15.0


def env_for(tmp_path: Path, host: Any) -> dict[str, str]:
    runtime = tmp_path / host.name
    runtime.mkdir(mode=0o700, exist_ok=True)
    return dict(os.environ, DPIPES_RUNTIME_DIR=str(runtime), DPIPES_CONFIG_PATHS="")


@contextlib.asynccontextmanager
async def daemon(
    tmp_path: Path, host: Any, *args: str, name: str = "", log: Path | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``dpipesd --foreground`` inside ``host``, listening on its LAN address; stopped with SIGTERM.

    Named after the host unless ``name`` is given; its stderr goes to ``log`` if given.
    """
    argv = [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", name or host.name]
    argv += ["--listen", f"{host.addr}:{PORT}", "--insecure", *args]
    with open(log or os.devnull, "wb") as stderr:
        proc = await host.run(argv, env=env_for(tmp_path, host), stderr=stderr)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), CONVERGE_TIMEOUT_S)).decode()
        assert re.search(r"ready: tcp://", line), f"dpipesd on {host.name} did not start: {line!r}"
        yield proc
    finally:
        await stop(proc, STOP_TIMEOUT_S)


async def dpipes_on(tmp_path: Path, host: Any, *args: str, input: bytes | None = None) -> tuple[int, bytes, str]:
    """The real dpipes command inside ``host``, entering at that host's node."""
    argv = [sys.executable, "-m", "dpipes.tools.dpipes", "--insecure", "--node", f"{host.addr}:{PORT}", *args]
    proc = await host.run(
        argv, env=env_for(tmp_path, host), stdin=asyncio.subprocess.PIPE if input is not None else None
    )
    out, err = await asyncio.wait_for(proc.communicate(input), 60)
    return proc.returncode or 0, out, err.decode(errors="replace")


async def table(tmp_path: Path, host: Any) -> dict[str, dict[str, Any]]:
    code, out, err = await dpipes_on(tmp_path, host, "--nodes", "--json")
    assert code == 0, err
    return {n["name"]: n for n in map(json.loads, out.splitlines()) if n["up"]}


async def until_known(tmp_path: Path, host: Any, names: set[str], timeout: float = CONVERGE_TIMEOUT_S) -> dict:
    async def poll() -> dict[str, dict[str, Any]]:
        while set(current := await table(tmp_path, host)) != names:
            await asyncio.sleep(0.1)
        return current

    return await asyncio.wait_for(poll(), timeout)


async def test_five_daemons_find_each_other_by_mdns(lan: Any, tmp_path: Path) -> None:
    async with lan(5) as hosts, contextlib.AsyncExitStack() as stack:
        for i, host in enumerate(hosts):
            await stack.enter_async_context(daemon(tmp_path, host, "--allow", f"prog{i}", "--allow", "sort"))
        names = {h.name for h in hosts}
        for host in hosts:
            seen = await until_known(tmp_path, host, names)
            others = [seen[h.name] for h in hosts if h is not host]
            assert all(o["source"] == "mdns" for o in others), others
            assert seen[hosts[1].name]["programs"] == ["prog1", "sort"]
            assert seen[hosts[1].name]["endpoint"] == f"tcp://{hosts[1].addr}:{PORT}"


async def test_a_node_that_stops_or_dies_leaves_the_table(lan: Any, tmp_path: Path) -> None:
    async with lan(3) as hosts, contextlib.AsyncExitStack() as stack:
        procs = [await stack.enter_async_context(daemon(tmp_path, h)) for h in hosts]
        names = {h.name for h in hosts}
        await until_known(tmp_path, hosts[0], names)
        procs[1].send_signal(signal.SIGTERM)  # an orderly stop: BYE on every link, mDNS goodbye
        await asyncio.wait_for(procs[1].wait(), STOP_TIMEOUT_S)
        await until_known(tmp_path, hosts[0], names - {hosts[1].name}, timeout=5.0)
        procs[2].kill()  # no goodbye at all: the heartbeats tell
        await procs[2].wait()
        await until_known(tmp_path, hosts[0], {hosts[0].name}, timeout=10.0)


async def test_a_host_without_multicast_joins_through_a_static_seed_and_gossip(lan: Any, tmp_path: Path) -> None:
    async with lan(3) as hosts, contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(daemon(tmp_path, hosts[0]))
        await stack.enter_async_context(daemon(tmp_path, hosts[1]))
        await until_known(tmp_path, hosts[1], {hosts[0].name, hosts[1].name})
        await hosts[2].block_multicast()
        await stack.enter_async_context(daemon(tmp_path, hosts[2], "--peer", f"{hosts[0].addr}:{PORT}"))
        everyone = {h.name for h in hosts}
        seen = await until_known(tmp_path, hosts[1], everyone)  # hosts[1] never heard hosts[2] by mDNS
        assert seen[hosts[2].name]["source"] in ("gossip", "linked")
        await until_known(tmp_path, hosts[2], everyone)


async def test_stages_are_placed_where_their_program_is_offered(lan: Any, tmp_path: Path) -> None:
    async with lan(3) as hosts, contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(daemon(tmp_path, hosts[0]))
        await stack.enter_async_context(daemon(tmp_path, hosts[1], "--allow", "sort"))
        await stack.enter_async_context(daemon(tmp_path, hosts[2], "--allow", "uniq"))
        await until_known(tmp_path, hosts[0], {h.name for h in hosts})
        data = b"".join(f"{n % 17}\n".encode() for n in range(5000))
        code, out, err = await dpipes_on(tmp_path, hosts[0], "--status", "cat | sort | uniq -c", input=data)
        assert code == 0, err
        reference = await asyncio.create_subprocess_exec(
            "sh", "-c", "cat | sort | uniq -c", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        expected, _ = await reference.communicate(data)
        assert out == expected
        assert f"stage 1 sort@{hosts[1].name}" in err and f"stage 2 uniq@{hosts[2].name}" in err


async def test_a_node_joining_late_is_seen_and_sees_everyone(lan: Any, tmp_path: Path) -> None:
    async with lan(3) as hosts, contextlib.AsyncExitStack() as stack:
        for host in hosts[:2]:
            await stack.enter_async_context(daemon(tmp_path, host))
        await until_known(tmp_path, hosts[0], {h.name for h in hosts[:2]})
        await stack.enter_async_context(daemon(tmp_path, hosts[2]))
        everyone = {h.name for h in hosts}
        for host in hosts:
            await until_known(tmp_path, host, everyone)


async def test_a_second_node_with_a_taken_name_is_told_by_name_and_address(lan: Any, tmp_path: Path) -> None:
    """Issue 14: two hosts started with one node name (two ``raspberrypi``s) must not flap; the
    second is told the name is taken, by whom and where, and the first keeps working."""
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    async with lan(3) as hosts, contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(daemon(tmp_path, hosts[2]))
        await stack.enter_async_context(daemon(tmp_path, hosts[0], name="twin", log=first_log))
        await until_known(tmp_path, hosts[2], {"twin", hosts[2].name})
        await stack.enter_async_context(daemon(tmp_path, hosts[1], name="twin", log=second_log))

        async def told() -> None:
            while not re.search(rb"another instance .* at %s|linked with instance" % hosts[0].addr.encode(),
                                second_log.read_bytes()):  # fmt: skip
                await asyncio.sleep(0.1)  # polling the log another process writes, under the timeout

        await asyncio.wait_for(told(), CONVERGE_TIMEOUT_S)
        text = second_log.read_text()
        assert "twin" in text and hosts[0].addr in text, text
        # The first keeps the name: a run pinned to it goes to the first host.
        code, out, err = await dpipes_on(tmp_path, hosts[2], "sh@twin -c 'hostname -I'")
        assert code == 0 and out.split() == [hosts[0].addr.encode()], err
        seen = await table(tmp_path, hosts[2])
        assert seen["twin"]["endpoint"] == f"tcp://{hosts[0].addr}:{PORT}", seen


def test_the_discovery_benchmark_measures_a_full_mesh() -> None:
    from dpipes.tools.bench.discovery import discovery_benchmarks

    converge, after_ready, cpu, to_mesh, others = discovery_benchmarks(repeat=1, quick=True, nodes=3)
    assert converge.name == "discovery.converge_3" and 0 < converge.value < 60
    assert after_ready.value <= converge.value
    assert cpu.name == "discovery.cpu_to_ready_3" and 0 < cpu.value < converge.value * (os.cpu_count() or 1)
    assert to_mesh.name == "discovery.cpu_to_mesh_3" and to_mesh.value >= cpu.value
    assert others.name == "discovery.others_cpu_3" and others.value >= 0
    assert others.baseline_value == to_mesh.value * 3  # the daemons' own, beside the rest of the machine's
