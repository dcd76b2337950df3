"""Bus benchmarks (``dpipes-bench bus``): dpipes against its baselines, the same sizes in the same run.

Each measurement runs a receiver in a child process (``python -m dpipes.tools.bench.bus ROLE``, which
prints its address on stdout and serves until stdin closes) and a sender here. Results are
``Result`` rows: the dpipes figure, the baseline figure and their ratio (higher is better; for
latencies the ratio is baseline / dpipes, so still higher is better).

The round trip (d): one 64-byte REQUEST from an endpoint of a hub here to the sink endpoint of the
child's hub over TCP, answered by a REPLY carrying the same body, awaited before the next; against
a raw pyzmq DEALER sending 64 bytes to a ROUTER that sends them back. The sink answers with a
request handler (``Endpoint.on_request``), as the raw echo answers each message as it reads it.
p50 and p99 of each run's round trips, in microseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import zmq

from dpipes.bus.auth import ClientCurve, HubSecurity
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.hub import Hub
from dpipes.bus.keys import KeyPair, load_or_create_keypair
from dpipes.tools.bench.result import Result, result

ROUND_TRIPS = 5000  # per run: enough for a p99 from 50 samples above it
ROUND_TRIP_TIMEOUT_S = 10.0  # one echo on loopback; longer means the far end is gone


@contextlib.contextmanager
def child(role: str, *args: str, module: str = "dpipes.tools.bench.bus") -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run ``python -m MODULE ROLE`` and yield it with the address it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, role, *args],
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


def serve_until_stdin_closes(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    done: asyncio.Future[None] = loop.create_future()

    def on_stdin() -> None:
        if not os.read(0, 4096) and not done.done():
            loop.remove_reader(0)
            done.set_result(None)

    loop.add_reader(0, on_stdin)
    return done


# -- receivers (child processes) -------------------------------------------------------------


def answer_echo(endpoint: Endpoint) -> None:
    """Reply to every REQUEST that reaches ``endpoint`` with its own body, as it is delivered (a
    request handler, as Zenoh's echo answers in its subscriber's callback): the far end of a round
    trip."""
    endpoint.on_request(lambda request: endpoint.reply(request, request.body))


async def serve_sink(security: HubSecurity | None = None) -> None:
    """A hub ``bench-sink`` (with ``security``: keys) whose endpoint ``sink`` drains every stream and
    echoes every request, until stdin closes; its TCP endpoint printed first."""
    async with Hub("bench-sink", security=security) as hub:
        sink = hub.endpoint("sink")
        print(hub.tcp_endpoint, flush=True)
        done = serve_until_stdin_closes(asyncio.get_running_loop())

        async def drain() -> None:
            while True:
                stream = await sink.accept()
                while await stream.read() is not None:
                    pass

        answer_echo(sink)
        task = asyncio.create_task(drain())
        await done
        task.cancel()


def _serve_router(
    answer: Callable[[zmq.Socket[Any]], None], *, unbounded: bool = False, curve: KeyPair | None = None
) -> None:
    """A raw pyzmq ROUTER on a random loopback port (printed), read until stdin closes.

    ``answer`` is called while messages wait, and reads them itself with ``zmq.NOBLOCK``. With
    ``curve`` the ROUTER is a CurveZMQ server with that key pair (admitting any client key: no ZAP).
    """
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        router.setsockopt(zmq.CURVE_SERVER, 1)
        router.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_z85.encode("ascii"))
        router.setsockopt(zmq.CURVE_PUBLICKEY, curve.public.z85.encode("ascii"))
    if unbounded:
        router.setsockopt(zmq.RCVHWM, 0)  # the sender's rate, not our queue, is what is measured
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
            with contextlib.suppress(zmq.Again):
                answer(router)
    router.close()
    ctx.term()


def _serve_raw(curve: KeyPair | None = None) -> None:
    def sink(router: zmq.Socket[Any]) -> None:
        while True:
            ident, data = router.recv_multipart(zmq.NOBLOCK, copy=False)
            if data.bytes == b"end":
                router.send_multipart([ident, b"done"])

    _serve_router(sink, unbounded=True, curve=curve)


def _serve_raw_echo() -> None:
    def echo(router: zmq.Socket[Any]) -> None:
        while True:
            router.send_multipart(router.recv_multipart(zmq.NOBLOCK))

    _serve_router(echo)


# -- senders (this process) -------------------------------------------------------------------


def raw_send(addr: str, payload: bytes, count: int, *, curve: ClientCurve | None = None) -> float:
    """Seconds to move ``count`` messages over a raw pyzmq DEALER->ROUTER pair, until acknowledged
    (with ``curve``, as a CurveZMQ client of a ROUTER serving with ``curve.server_key``)."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        dealer.setsockopt(zmq.CURVE_SECRETKEY, curve.keypair.secret_z85.encode("ascii"))
        dealer.setsockopt(zmq.CURVE_PUBLICKEY, curve.keypair.public.z85.encode("ascii"))
        dealer.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key.z85.encode("ascii"))
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
        return await dpipes_send_from(src, dst, payload, count)
    finally:
        src.close()


async def dpipes_send_from(src: Endpoint, dst: str, payload: bytes, count: int) -> float:
    """Seconds to stream ``count`` messages from endpoint ``src`` to ``dst``, until EOF_ACK."""
    stream = src.open_stream(dst)
    start = time.perf_counter()
    send = stream.send_bytes
    for _ in range(count):
        await send(payload)
    await stream.close(timeout=120)
    return time.perf_counter() - start


TAP_SUBSCRIBE_TIMEOUT_S = 10.0  # a tap child connects over ipc within a reconnect interval; this is slack


def measure_messages(
    size: int, count: int, repeat: int, progress: Callable[[str], None], *, tap: str | None = None
) -> tuple[list[float], list[float]]:
    """Messages/s of dpipes and of raw pyzmq for ``count`` messages of ``size`` bytes.

    With ``tap`` (an ``ipc://`` endpoint), the sending hub binds its tap there and waits, before
    each measurement, until a tap reader subscribes to it (see :func:`measure_tapped`).
    """
    payload = os.urandom(size)
    raw: list[float] = []
    ours: list[float] = []
    with child("raw") as (_proc, raw_addr), child("dpipes") as (_proc2, bus_addr):

        async def run_dpipes() -> float:
            # A fresh hub per repetition: the blocking baseline must not run inside its loop.
            async with Hub("bench-source", tap=tap) as hub:
                await hub.connect_peer(bus_addr)
                if tap is not None:
                    await _until_tapped(hub)
                await dpipes_send(hub, "bench-sink/sink", payload, max(1, count // 10))  # warm up
                return count / await dpipes_send(hub, "bench-sink/sink", payload, count)

        raw_send(raw_addr, payload, max(1, count // 10))  # warm up
        for _ in range(repeat):
            raw.append(count / raw_send(raw_addr, payload, count))
            ours.append(asyncio.run(run_dpipes()))
            progress(".")
    return ours, raw


# -- (d) round trip ----------------------------------------------------------------------------


def raw_round_trips(addr: str, payload: bytes, count: int) -> list[float]:
    """Seconds of each of ``count`` echoes of ``payload`` over a raw pyzmq DEALER->ROUTER pair."""
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, int(ROUND_TRIP_TIMEOUT_S * 1000))
    dealer.connect(addr)
    try:
        dealer.send(payload)
        dealer.recv()  # connected, and the far end answers
        times = []
        for _ in range(count):
            start = time.perf_counter()
            dealer.send(payload)
            dealer.recv()
            times.append(time.perf_counter() - start)
        return times
    finally:
        dealer.close()
        ctx.term()


async def dpipes_round_trips(hub: Hub, dst: str, payload: bytes, count: int) -> list[float]:
    """Seconds of each of ``count`` REQUEST/REPLY round trips carrying ``payload`` to ``dst``."""
    src = hub.endpoint(f"rt-{time.monotonic_ns()}")
    try:
        body = {"p": payload}
        await src.request(dst, "echo", body, timeout=ROUND_TRIP_TIMEOUT_S)  # warm: the route is up
        times = []
        for _ in range(count):
            start = time.perf_counter()
            await src.request(dst, "echo", body, timeout=ROUND_TRIP_TIMEOUT_S)
            times.append(time.perf_counter() - start)
        return times
    finally:
        src.close()


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, by the nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def round_trip_benchmarks(repeat: int, progress: Callable[[str], None], count: int) -> list[Result]:
    """(d): 64-byte round trips, dpipes REQUEST/REPLY against a raw pyzmq echo; p50 and p99 in us."""
    payload = os.urandom(64)
    ours: dict[int, list[float]] = {50: [], 99: []}
    theirs: dict[int, list[float]] = {50: [], 99: []}
    with child("raw-echo") as (_proc, raw_addr), child("dpipes") as (_proc2, bus_addr):

        async def run_dpipes() -> list[float]:
            async with Hub("bench-source") as hub:
                await hub.connect_peer(bus_addr)
                await dpipes_round_trips(hub, "bench-sink/sink", payload, max(1, count // 10))  # warm up
                return await dpipes_round_trips(hub, "bench-sink/sink", payload, count)

        raw_round_trips(raw_addr, payload, max(1, count // 10))  # warm up
        for _ in range(repeat):
            raw = raw_round_trips(raw_addr, payload, count)
            bus = asyncio.run(run_dpipes())
            for q in ours:
                theirs[q].append(percentile(raw, q) * 1e6)
                ours[q].append(percentile(bus, q) * 1e6)
            progress(".")
    return [
        result(
            f"bus.roundtrip_64B_p{q}",
            "us",
            ours[q],
            "raw pyzmq DEALER->ROUTER echo",
            theirs[q],
            higher_is_better=False,
        )
        for q in (50, 99)
    ]


async def _until_tapped(hub: Hub) -> None:
    async def poll() -> None:
        # A hub has no event for a subscription; only the bench waits for one.
        while not hub.tapped:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), TAP_SUBSCRIBE_TIMEOUT_S)


def measure_tapped(
    size: int, count: int, repeat: int, progress: Callable[[str], None]
) -> tuple[list[float], list[float], dict[str, int]]:
    """Messages/s of dpipes without and with a tap reader (``dpipes-tap``'s reading and decoding,
    in its own process) subscribed to the sending hub, and what the reader got and missed."""
    untapped, _raw = measure_messages(size, count, repeat, progress)
    with tempfile.TemporaryDirectory(prefix="dpipes-bench-tap-") as tmp:
        endpoint = f"ipc://{tmp}/tap.sock"
        with child("tap", endpoint) as (reader, _addr):
            tapped, _raw = measure_messages(size, count, repeat, progress, tap=endpoint)
            assert reader.stdin is not None and reader.stdout is not None
            reader.stdin.close()
            counts = json.loads(reader.stdout.readline() or "{}")
    return untapped, tapped, counts


async def _serve_tap(endpoint: str) -> None:
    """A tap reader: read and decode every event at ``endpoint`` until stdin closes; print counts."""
    from dpipes.nodes.tap.source import TapSource, Target
    from dpipes.nodes.tap.view import Decoder

    async with TapSource([Target("bench-source", endpoint)]) as source:
        print(endpoint, flush=True)
        done = serve_until_stdin_closes(asyncio.get_running_loop())
        decoder = Decoder()

        async def read() -> None:
            async for event in source:
                decoder.decode(event)

        task = asyncio.create_task(read())
        await done
        task.cancel()
        print(json.dumps({"received": source.received, "dropped": source.dropped}), flush=True)


# -- (c) Arrow ---------------------------------------------------------------------------------

ARROW_WINDOW_BYTES = 64 * 1024 * 1024  # room for several 16 MiB parts of a large batch in flight
ARROW_SETS = {
    "one_large_batch": (1, 1_000_000),  # one batch of 1M rows x 8 numeric columns (64 MB)
    "stream_10k_batches": (100, 10_000),  # 100 batches of 10k rows x 8 numeric columns (64 MB)
}


def arrow_batches(name: str, scale: int = 1) -> list[Any]:
    """The benchmark's record batches: 4 float64 and 4 int64 columns of random numbers."""
    import pyarrow as pa
    import pyarrow.compute as pc

    count, rows = ARROW_SETS[name]
    rows //= scale
    out = []
    for _ in range(count):
        cols: dict[str, Any] = {f"f{i}": pc.random(rows) for i in range(4)}
        cols |= {f"i{i}": pc.cast(pc.floor(pc.multiply(pc.random(rows), float(1 << 40))), pa.int64()) for i in range(4)}
        out.append(pa.RecordBatch.from_pydict(cols))
    return out


async def _serve_arrow_sink() -> None:
    from dpipes.bus.arrow_stream import ArrowStreamReader

    async with Hub("bench-sink") as hub:
        sink = hub.endpoint("sink", window=ARROW_WINDOW_BYTES)
        print(hub.tcp_endpoint, flush=True)
        done = serve_until_stdin_closes(asyncio.get_running_loop())

        async def drain() -> None:
            while True:
                reader = ArrowStreamReader(await sink.accept())
                async for _batch in reader:
                    pass  # each batch is rebuilt and validated, zero-copy: that is the work

        task = asyncio.create_task(drain())
        await done
        task.cancel()


def _serve_flight(scale: int) -> None:
    import pyarrow as pa
    import pyarrow.flight as flight

    tables = {name: pa.Table.from_batches(arrow_batches(name, scale)) for name in ARROW_SETS}

    class Server(flight.FlightServerBase):
        def do_get(self, context: Any, ticket: Any) -> Any:
            return flight.RecordBatchStream(tables[ticket.ticket.decode()])

    server = Server("grpc://127.0.0.1:0")
    print(f"grpc://127.0.0.1:{server.port}", flush=True)
    sys.stdin.read()
    server.shutdown()


def flight_get(addr: str, name: str) -> tuple[float, int]:
    """Seconds for one do_get of data set ``name`` over loopback, and the bytes it moved."""
    import pyarrow.flight as flight

    client = flight.connect(addr)
    start = time.perf_counter()
    table = client.do_get(flight.Ticket(name.encode())).read_all()
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed, table.nbytes


async def dpipes_arrow_send(hub: Hub, batches: list[Any], dst: str = "bench-sink/sink") -> float:
    """Seconds to stream ``batches`` to the sink process until it acknowledged the end."""

    src = hub.endpoint(f"src-{time.monotonic_ns()}")
    try:
        return await dpipes_arrow_send_from(src, batches, dst)
    finally:
        src.close()


async def dpipes_arrow_send_from(src: Endpoint, batches: list[Any], dst: str) -> float:
    """Seconds to stream ``batches`` from endpoint ``src`` to ``dst`` until it acknowledged the end."""
    from dpipes.bus.arrow_stream import ArrowStreamWriter

    writer = ArrowStreamWriter(src.open_stream(dst), batches[0].schema)
    start = time.perf_counter()
    await writer.write_all(batches)
    await writer.close(timeout=120)
    return time.perf_counter() - start


def arrow_benchmarks(repeat: int, progress: Callable[[str], None], scale: int = 1) -> list[Result]:
    """(c): Arrow batches between two processes, dpipes against pyarrow.flight do_get."""
    results = []
    with child("flight", str(scale)) as (_p, flight_addr), child("arrow-sink") as (_p2, bus_addr):
        for name, target in (("one_large_batch", 1.5), ("stream_10k_batches", 1.0)):
            batches = arrow_batches(name, scale)
            nbytes = sum(b.nbytes for b in batches)
            ours: list[float] = []
            theirs: list[float] = []

            async def run(batches: list[Any] = batches, nbytes: int = nbytes) -> float:
                async with Hub("bench-source") as hub:
                    await hub.connect_peer(bus_addr)
                    await dpipes_arrow_send(hub, batches)  # warm up
                    return nbytes / await dpipes_arrow_send(hub, batches) / 1e6

            flight_get(flight_addr, name)  # warm up
            for _ in range(repeat):
                seconds, moved = flight_get(flight_addr, name)
                theirs.append(moved / seconds / 1e6)
                ours.append(asyncio.run(run()))
                progress(".")
            results.append(result(f"arrow.{name}", "MB/s", ours, "pyarrow.flight do_get", theirs, target=target))
    return results


def tap_benchmarks(repeat: int, progress: Callable[[str], None], scale: int = 1) -> list[Result]:
    """--tap: (a) and (b) with a tap reader attached, against the same without one."""
    results = []
    for name, size, count in (("1MiB", 1 << 20, 2000 // scale), ("64B", 64, 300_000 // scale)):
        untapped, tapped, counts = measure_tapped(size, count, repeat, progress)
        unit, per = ("MB/s", size / 1e6) if size > 64 else ("msg/s", 1.0)
        results.append(
            result(
                f"bus.tapped_{name}", unit, [r * per for r in tapped], "the same, no tap", [r * per for r in untapped]
            )
        )
        received, dropped = counts.get("received", 0), counts.get("dropped", 0)
        seen = float(received)
        results.append(
            result(f"bus.tap_events_{name}", "events", [seen], "events published (received + dropped)",
                   [float(received + dropped)])
        )  # fmt: skip
    return results


def bus_benchmarks(
    *, repeat: int = 5, quick: bool = False, tap: bool = False, progress: Callable[[str], None] = lambda s: None
) -> list[Result]:
    """Benchmarks (a), (b), (c) and (d) of the bus; with ``tap`` instead (a) and (b) with a tap attached."""
    scale = 10 if quick else 1
    if tap:
        return tap_benchmarks(repeat, progress, scale)
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
    results.extend(arrow_benchmarks(repeat, progress, scale))
    results.extend(round_trip_benchmarks(repeat, progress, ROUND_TRIPS // scale))
    return results


def main(argv: list[str]) -> None:
    """Child-process roles of the benchmark."""
    role = argv[0]
    if role == "dpipes":
        asyncio.run(serve_sink())
    elif role == "raw":  # [KEY_DIR]: a CurveZMQ server with the sink's key pair there (dpipes-bench curve)
        _serve_raw(load_or_create_keypair(Path(argv[1]), "node")[0] if len(argv) > 1 else None)
    elif role == "raw-echo":
        _serve_raw_echo()
    elif role == "arrow-sink":
        asyncio.run(_serve_arrow_sink())
    elif role == "flight":
        _serve_flight(int(argv[1]))
    elif role == "tap":
        asyncio.run(_serve_tap(argv[1]))
    else:
        raise SystemExit(f"unknown benchmark role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
