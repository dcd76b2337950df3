"""Bus benchmarks: dpipes against its baselines, the same sizes in the same run.

Each measurement runs a receiver in a child process (``python -m dpipes.bus.bench ROLE``, which
prints its address on stdout and serves until stdin closes) and a sender here. Results are
``Result`` rows: the dpipes figure, the baseline figure and their ratio (higher is better).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from dpipes.bus.hub import Hub


@dataclasses.dataclass(frozen=True)
class Result:
    """One benchmark line: ``value`` (dpipes) against ``baseline_value`` in ``unit``."""

    name: str
    unit: str
    value: float
    baseline: str
    baseline_value: float
    samples: tuple[float, ...]
    baseline_samples: tuple[float, ...]
    target: float | None = None  # the ratio we aim for, where the issue sets one
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        if not self.baseline_value or not self.value:
            return 0.0
        return self.value / self.baseline_value if self.higher_is_better else self.baseline_value / self.value

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "min": min(self.samples),
            "max": max(self.samples),
            "baseline": self.baseline,
            "baseline_value": self.baseline_value,
            "baseline_min": min(self.baseline_samples),
            "baseline_max": max(self.baseline_samples),
            "ratio": round(self.ratio, 3),
            "target_ratio": self.target,
        }


def result(
    name: str,
    unit: str,
    samples: list[float],
    baseline: str,
    baseline_samples: list[float],
    *,
    target: float | None = None,
    higher_is_better: bool = True,
) -> Result:
    """A ``Result`` from repeated samples: medians, with every sample kept for min/max."""
    return Result(
        name=name,
        unit=unit,
        value=statistics.median(samples),
        baseline=baseline,
        baseline_value=statistics.median(baseline_samples),
        samples=tuple(samples),
        baseline_samples=tuple(baseline_samples),
        target=target,
        higher_is_better=higher_is_better,
    )


@contextlib.contextmanager
def child(role: str, *args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``python -m dpipes.bus.bench ROLE`` and yield it with the address it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dpipes.bus.bench", role, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        addr = proc.stdout.readline().strip()
        if not addr:
            raise RuntimeError(f"benchmark child {role} did not start (exit {proc.wait()})")
        yield proc, addr
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve_until_stdin_closes(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    done: asyncio.Future[None] = loop.create_future()

    def on_stdin() -> None:
        if not os.read(0, 4096) and not done.done():
            loop.remove_reader(0)
            done.set_result(None)

    loop.add_reader(0, on_stdin)
    return done


# -- receivers (child processes) -------------------------------------------------------------


async def _serve_dpipes() -> None:
    async with Hub("bench-sink") as hub:
        sink = hub.endpoint("sink")
        print(hub.tcp_endpoint, flush=True)
        done = _serve_until_stdin_closes(asyncio.get_running_loop())

        async def drain() -> None:
            while True:
                stream = await sink.accept()
                while await stream.read() is not None:
                    pass

        task = asyncio.create_task(drain())
        await done
        task.cancel()


def _serve_raw() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.RCVHWM, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    print(f"tcp://127.0.0.1:{port}", flush=True)
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(0, zmq.POLLIN)
    while True:
        events = dict(poller.poll())
        if 0 in events and not os.read(0, 4096):
            break
        if router in events:
            while True:
                try:
                    ident, data = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if data.bytes == b"end":
                    router.send_multipart([ident, b"done"])
    router.close()
    ctx.term()


# -- senders (this process) -------------------------------------------------------------------


def raw_send(addr: str, payload: bytes, count: int) -> float:
    """Seconds to move ``count`` messages over a raw pyzmq DEALER->ROUTER pair, until acknowledged."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.connect(addr)
    dealer.send(b"warm")
    copy = len(payload) < 65536
    start = time.perf_counter()
    for _ in range(count):
        dealer.send(payload, 0, copy, False)
    dealer.send(b"end")
    dealer.recv()
    elapsed = time.perf_counter() - start
    dealer.close()
    ctx.term()
    return elapsed


async def dpipes_send(hub: Hub, dst: str, payload: bytes, count: int) -> float:
    """Seconds to stream ``count`` messages from an in-process endpoint to ``dst``, until EOF_ACK."""
    src = hub.endpoint(f"src-{time.monotonic_ns()}")
    try:
        stream = src.open_stream(dst)
        start = time.perf_counter()
        send = stream.send_bytes
        for _ in range(count):
            await send(payload)
        await stream.close(timeout=120)
        return time.perf_counter() - start
    finally:
        src.close()


def measure_messages(
    size: int, count: int, repeat: int, progress: Callable[[str], None]
) -> tuple[list[float], list[float]]:
    """Messages/s of dpipes and of raw pyzmq for ``count`` messages of ``size`` bytes."""
    payload = os.urandom(size)
    raw: list[float] = []
    ours: list[float] = []
    with child("raw") as (_proc, raw_addr), child("dpipes") as (_proc2, bus_addr):

        async def run_dpipes() -> float:
            # A fresh hub per repetition: the blocking baseline must not run inside its loop.
            async with Hub("bench-source") as hub:
                await hub.connect_peer(bus_addr)
                await dpipes_send(hub, "bench-sink/sink", payload, max(1, count // 10))  # warm up
                return count / await dpipes_send(hub, "bench-sink/sink", payload, count)

        raw_send(raw_addr, payload, max(1, count // 10))  # warm up
        for _ in range(repeat):
            raw.append(count / raw_send(raw_addr, payload, count))
            ours.append(asyncio.run(run_dpipes()))
            progress(".")
    return ours, raw


def bus_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None
) -> list[Result]:
    """Benchmarks (a) and (b) of the bus; Arrow (c) is in ``dpipes.bus.arrow_bench``."""
    scale = 10 if quick else 1
    results = []
    ours, raw = measure_messages(1 << 20, 2000 // scale, repeat, progress)
    results.append(
        result(
            "bus.throughput_1MiB",
            "MB/s",
            [r * (1 << 20) / 1e6 for r in ours],
            "raw pyzmq DEALER->ROUTER",
            [r * (1 << 20) / 1e6 for r in raw],
            target=0.7,
        )
    )
    ours, raw = measure_messages(64, 300_000 // scale, repeat, progress)
    results.append(result("bus.rate_64B", "msg/s", ours, "raw pyzmq DEALER->ROUTER", raw, target=0.3))
    return results


def main(argv: list[str]) -> None:
    """Child-process roles of the benchmark."""
    role = argv[0]
    if role == "dpipes":
        asyncio.run(_serve_dpipes())
    elif role == "raw":
        _serve_raw()
    else:
        raise SystemExit(f"unknown benchmark role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
