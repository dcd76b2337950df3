"""CurveZMQ's cost (``dpipes-bench curve``): the bus with keys against the same bus without, in one run.

Hub A streams to hub B over TCP loopback (B in a child process, as ``dpipes-bench bus`` does), once
with both hubs plain and once with both holding keys and pinning each other; 1 MiB chunks for
throughput, 64 B for the message rate. A third figure is the time a client takes to attach over
TCP (handshake, ZAP, ATTACH/ATTACHED), with keys against without: what CURVE adds to a pipeline's
start. The issue's targets: at least 0.7x the plain throughput, 0.8x the plain rate, at most 20 ms
more to attach.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dpipes.bus.auth import ClientCurve, HubSecurity
from dpipes.bus.client import Client
from dpipes.bus.hub import Hub
from dpipes.bus.keys import KeyPair, load_or_create_keypair
from dpipes.bus.trust import AuthorizedKey, AuthorizedKeys, KnownNodes, TrustStore
from dpipes.tools.bench.bus import child, dpipes_send, serve_until_stdin_closes
from dpipes.tools.bench.result import Result, result

SINK, SOURCE = "bench-sink", "bench-source"
ATTACHES_PER_SAMPLE = 20  # client attaches timed per sample: one is a few ms, below the timer's noise


def _keys(where: Path) -> dict[str, KeyPair]:
    return {name: load_or_create_keypair(where / name, "node")[0] for name in (SINK, SOURCE, "client")}


def _security(me: str, keys: dict[str, KeyPair]) -> HubSecurity:
    other = SOURCE if me == SINK else SINK
    known = KnownNodes()
    known.pin(other, keys[other].public.z85)
    clients = AuthorizedKeys((AuthorizedKey(keys["client"].public, "bench client"),))
    return HubSecurity(keys[me], TrustStore(clients, known))


async def _serve_sink(key_dir: str) -> None:
    security = _security(SINK, _keys(Path(key_dir))) if key_dir != "-" else None
    async with Hub(SINK, security=security) as hub:
        sink = hub.endpoint("sink")
        print(hub.tcp_endpoint, flush=True)
        done = serve_until_stdin_closes(asyncio.get_running_loop())

        async def drain() -> None:
            while True:
                stream = await sink.accept()
                while await stream.read() is not None:
                    pass

        task = asyncio.create_task(drain())
        await done
        task.cancel()


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


def curve_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None
) -> list[Result]:
    """Throughput, rate and attach time with CURVE against without."""
    scale = 10 if quick else 1
    with tempfile.TemporaryDirectory(prefix="dpipes-bench-keys-") as tmp:
        keys = _keys(Path(tmp))
        figures: dict[str, tuple[list[float], list[float]]] = {"1MiB": ([], []), "64B": ([], []), "attach": ([], [])}
        with _sink("-") as plain_addr, _sink(tmp) as curve_addr:
            for _ in range(repeat):
                for label, size, count in (("1MiB", 1 << 20, 2000 // scale), ("64B", 64, 300_000 // scale)):
                    figures[label][0].append(asyncio.run(_rate(curve_addr, keys, size, count)))
                    figures[label][1].append(asyncio.run(_rate(plain_addr, None, size, count)))
                figures["attach"][0].append(asyncio.run(_attach_ms(curve_addr, keys)))
                figures["attach"][1].append(asyncio.run(_attach_ms(plain_addr, None)))
                progress(".")
    mib = [[r * (1 << 20) / 1e6 for r in samples] for samples in figures["1MiB"]]
    return [
        result("curve.throughput_1MiB", "MB/s", mib[0], "the same bus without keys", mib[1], target=0.7),
        result("curve.rate_64B", "msg/s", *_pair(figures["64B"]), target=0.8),
        result(
            "curve.client_attach",
            "ms",
            figures["attach"][0],
            "the same attach without keys",
            figures["attach"][1],
            higher_is_better=False,
        ),
    ]


def _pair(samples: tuple[list[float], list[float]]) -> tuple[list[float], str, list[float]]:
    return samples[0], "the same bus without keys", samples[1]


if __name__ == "__main__":
    if sys.argv[1:2] != ["sink"]:
        raise SystemExit(f"unknown benchmark role {sys.argv[1:2]}")
    asyncio.run(_serve_sink(sys.argv[2]))
