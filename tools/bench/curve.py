"""CurveZMQ's cost (``dpipes-bench curve``): the bus with keys against the same bus without, in one
run.

Hub A streams to hub B over TCP loopback (B in a child process, as ``dpipes-bench bus`` does), once
with both hubs plain and once with both holding keys and pinning each other; 1 MiB chunks for
throughput, 64 B for the message rate. A third figure is the time a client takes to attach over TCP
(handshake, ZAP, ATTACH/ATTACHED), with keys against without: what CURVE adds to a remote client's
start. A fourth is a whole two-node pipeline, ``true | true@B``, from ``run`` to the last exit
report, run by the real client over the entry node's Unix socket: two real nodes with keys (linked
by CURVE; every negotiate reads the trust files and checks the caller's key) against the same two
without. A fifth is the ceiling: raw pyzmq DEALER->ROUTER, 1 MiB, with CurveZMQ against without, no
dpipes code at all: what libzmq's own CurveZMQ (XSalsa20-Poly1305 through libsodium, in each side's
I/O thread) leaves of the plain throughput on this machine. The issue's targets: at least 0.7x the
plain throughput, 0.8x the plain rate, at most 20 ms more to attach and to run a pipeline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import MappingProxyType

from dpipes.bus.auth import ClientCurve, HubSecurity
from dpipes.bus.client import Client
from dpipes.bus.hub import Hub
from dpipes.bus.keys import KeyPair, load_or_create_keypair
from dpipes.bus.trust import AuthorizedKey, AuthorizedKeys, KnownNodes, TrustStore
from dpipes.tools.bench.bus import child, dpipes_send, raw_send, serve_sink
from dpipes.tools.bench.result import Result, result

SINK, SOURCE = "bench-sink", "bench-source"
ATTACHES_PER_SAMPLE = 20  # client attaches timed per sample: one is a few ms, below the timer's noise
MIB = os.urandom(1 << 20)  # incompressible, as the bus figures' payload
PIPELINES_PER_SAMPLE = 10  # pipelines timed per sample, after one that warms both nodes
LINK_WAIT_S = 10.0  # the entry node's static link to the other: a handshake on loopback


def _keys(where: Path) -> dict[str, KeyPair]:
    return {name: load_or_create_keypair(where / name, "node")[0] for name in (SINK, SOURCE, "client")}


def _security(me: str, keys: dict[str, KeyPair]) -> HubSecurity:
    other = SOURCE if me == SINK else SINK
    known = KnownNodes()
    known.pin(other, keys[other].public.z85)
    clients = AuthorizedKeys((AuthorizedKey(keys["client"].public, "bench client"),))
    return HubSecurity(keys[me], TrustStore(clients, known))


async def _serve_sink(key_dir: str) -> None:
    await serve_sink(_security(SINK, _keys(Path(key_dir))) if key_dir != "-" else None)


@contextlib.contextmanager
def _sink(key_dir: str) -> Iterator[str]:
    """A sink hub in a child process (plain for ``-``, else with the keys in ``key_dir``); its address."""
    with child("sink", key_dir, module="dpipes.tools.bench.curve") as (_proc, addr):
        yield addr


async def _rate(addr: str, keys: dict[str, KeyPair] | None, size: int, count: int) -> float:
    """Messages/s of one stream of ``count`` messages of ``size`` bytes from a fresh source hub."""
    security = _security(SOURCE, keys) if keys is not None else None
    payload = os.urandom(size)
    async with Hub(SOURCE, security=security) as hub:
        await hub.connect_peer(addr, key=keys[SINK].public if keys is not None else None)
        await dpipes_send(hub, f"{SINK}/sink", payload, max(1, count // 10))  # warm up
        return count / await dpipes_send(hub, f"{SINK}/sink", payload, count)


async def _attach_ms(addr: str, keys: dict[str, KeyPair] | None) -> float:
    """Milliseconds for one client to attach over TCP, averaged over ATTACHES_PER_SAMPLE."""
    curve = ClientCurve(keys["client"], keys[SINK].public) if keys is not None else None
    start = time.perf_counter()
    for _ in range(ATTACHES_PER_SAMPLE):
        async with Client(addr, curve=curve):
            pass
    return (time.perf_counter() - start) * 1000 / ATTACHES_PER_SAMPLE


async def _pipeline_ms(key_dir: Path | None, runs: int) -> float:
    """Milliseconds per ``true | true@B`` through two real nodes, with the keys in ``key_dir``
    (shared, as one user's two daemons share theirs) or, for None, without keys."""
    where, insecure = (str(key_dir), False) if key_dir is not None else (None, True)
    quiet = logging.getLogger("dpipes.nodes.node")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the baseline's nodes warn that they have no keys, at each start
    try:
        return await _pipeline_ms_between(where, insecure, runs)
    finally:
        quiet.setLevel(level)


async def _pipeline_ms_between(where: str | None, insecure: bool, runs: int) -> float:
    from dpipes.nodes.config import HostPort, NodeConfig
    from dpipes.nodes.node import Node
    from dpipes.nodes.run import RunOptions, run_pipeline

    async with Node(NodeConfig(name="bench-b", key_dir=where, insecure=insecure), listen="tcp://127.0.0.1:0") as b:
        port = int(b.tcp_endpoint.rpartition(":")[2])
        peers = MappingProxyType({"bench-b": HostPort("127.0.0.1", port)})
        config = NodeConfig(name="bench-a", nodes=peers, key_dir=where, insecure=insecure)
        async with Node(config, listen="tcp://127.0.0.1:0") as a:
            await asyncio.wait_for(a.hub.connect_peer(f"tcp://127.0.0.1:{port}", key=b.hub.public_key), LINK_WAIT_S)
            null = os.open(os.devnull, os.O_WRONLY)
            try:

                async def once() -> None:
                    done = await run_pipeline(
                        a.ipc_endpoint,
                        RunOptions("true | true@bench-b"),
                        stdin_fd=-1,
                        stdout_fd=null,
                        stderr_fd=null,
                        handle_sigint=False,
                    )
                    if done.exit_code != 0:
                        raise RuntimeError(f"the benchmark's pipeline failed: {done}")

                await once()
                start = time.perf_counter()
                for _ in range(runs):
                    await once()
                return (time.perf_counter() - start) * 1000 / runs
            finally:
                os.close(null)


def curve_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None
) -> list[Result]:
    """Throughput, rate and attach time with CURVE against without."""
    scale = 10 if quick else 1
    with tempfile.TemporaryDirectory(prefix="dpipes-bench-keys-") as tmp:
        keys = _keys(Path(tmp))
        figures: dict[str, tuple[list[float], list[float]]] = {
            "1MiB": ([], []),
            "64B": ([], []),
            "attach": ([], []),
            "pipeline": ([], []),
            "libzmq": ([], []),
        }
        shared = Path(tmp) / "one-user"
        shared.mkdir(mode=0o700)
        raw_curve = ClientCurve(keys["client"], keys[SINK].public)
        with (
            _sink("-") as plain_addr,
            _sink(tmp) as curve_addr,
            child("raw") as (_p1, raw_plain),
            child("raw", str(Path(tmp) / SINK)) as (_p2, raw_keyed),
        ):
            for _ in range(repeat):
                raw_count = 2000 // scale
                figures["libzmq"][0].append(raw_count / raw_send(raw_keyed, MIB, raw_count, curve=raw_curve))
                figures["libzmq"][1].append(raw_count / raw_send(raw_plain, MIB, raw_count))
                for label, size, count in (("1MiB", 1 << 20, 2000 // scale), ("64B", 64, 300_000 // scale)):
                    figures[label][0].append(asyncio.run(_rate(curve_addr, keys, size, count)))
                    figures[label][1].append(asyncio.run(_rate(plain_addr, None, size, count)))
                figures["attach"][0].append(asyncio.run(_attach_ms(curve_addr, keys)))
                figures["attach"][1].append(asyncio.run(_attach_ms(plain_addr, None)))
                runs = max(2, PIPELINES_PER_SAMPLE // scale)
                figures["pipeline"][0].append(asyncio.run(_pipeline_ms(shared, runs)))
                figures["pipeline"][1].append(asyncio.run(_pipeline_ms(None, runs)))
                progress(".")
    keyed_mib, plain_mib = ([r * (1 << 20) / 1e6 for r in samples] for samples in figures["1MiB"])
    raw_mib = [[r * (1 << 20) / 1e6 for r in samples] for samples in figures["libzmq"]]
    return [
        _keyed_vs_plain("curve.throughput_1MiB", "MB/s", (keyed_mib, plain_mib), target=0.7),
        _keyed_vs_plain("curve.rate_64B", "msg/s", figures["64B"], target=0.8),
        _keyed_vs_plain(
            "curve.client_attach", "ms", figures["attach"], "the same attach without keys", higher_is_better=False
        ),
        _keyed_vs_plain(
            "curve.pipeline_start", "ms", figures["pipeline"], "the same two nodes without keys", higher_is_better=False
        ),
        _keyed_vs_plain("curve.libzmq_1MiB", "MB/s", (raw_mib[0], raw_mib[1]), "raw pyzmq without keys (the ceiling)"),
    ]


def _keyed_vs_plain(
    name: str,
    unit: str,
    samples: tuple[list[float], list[float]],
    baseline: str = "the same bus without keys",
    *,
    target: float | None = None,
    higher_is_better: bool = True,
) -> Result:
    """A figure with CURVE (``samples[0]``) against the same without keys (``samples[1]``)."""
    keyed, plain = samples
    return result(name, unit, keyed, baseline, plain, target=target, higher_is_better=higher_is_better)


if __name__ == "__main__":
    if sys.argv[1:2] != ["sink"]:
        raise SystemExit(f"unknown benchmark role {sys.argv[1:2]}")
    asyncio.run(_serve_sink(sys.argv[2]))
