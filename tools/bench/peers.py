"""Peers (``dpipes-bench peers``): dpipes beside what a user would pick instead, Zenoh and dora-rs.

Every shape runs dpipes and the peer in the same run, interleaved (dpipes, peer, dpipes, peer, ...),
each between two processes of this machine over loopback. A row is the median of its samples,
``repeat`` runs of each side, one sample per run or, for the Arrow rows, several per run (each row
below says which); with min and max over the samples for both sides, and arrived/sent for both
sides (messages, arrays or replies the receiver counted, summed over every sample): a peer that
drops data is shown dropping it, and its rate counts only what arrived. Nothing is sent to any
address outside this machine.

Zenoh (``eclipse-zenoh``, its Python API) runs in peer mode with multicast and gossip scouting off;
the receiver (a child process, ``python -m dpipes.tools.bench.peers zenoh-sink``) listens only on
``tcp/127.0.0.1:0`` and this process connects to that one endpoint and listens nowhere. Publishers
use ``CongestionControl.BLOCK``: like dpipes' credit, a full queue makes the sender wait (Zenoh's
default, ``DROP``, drops under load). A run is a warm-up of N/10 puts, then N puts and a 3-byte end
marker; the receiver answers with how many puts it got. One run is one sample, from the first of
the N puts to that answer; dpipes' runs likewise, from the first message to the acknowledgement of
the stream's end (``EOF_ACK``).

* ``peers.zenoh_tcp_1MiB``: 2000 1 MiB puts a run (0.4-3 s) with shared memory off on both sides
  (TCP loopback), beside a dpipes stream of 1 MiB messages from a hub here to a hub in a child
  process (as in ``dpipes-bench bus``). Target: at least 2x.
* ``peers.zenoh_shm_1MiB``: 10,000 1 MiB puts a run (0.5-1.5 s; 2000 took 0.1 s, which one stall
  of the machine could decide), with Zenoh's default configuration, which on one host copies each
  payload over 3 KiB into a shared-memory pool and sends a handle (its ``transport_optimization``);
  dpipes beside it as it runs on one host: a client in this process attached over IPC to the
  child's hub, which hands payloads over in shared memory (``dpipes.bus.shm``) just as Zenoh does.
  The Python API also has an explicit ``zenoh.shm`` provider to write into shared memory directly;
  it is marked unstable and is not used. Target: at least 1x. Zenoh's Python processes leave their
  segments in ``/dev/shm`` when they exit (about 80 MB after a full run: a 16 MiB pool per sending
  session); the next Zenoh session with shared memory on this host removes those of dead
  processes. They are Zenoh's and are not removed here.
* ``peers.zenoh_rate_64B``: 300,000 64-byte puts a run over TCP, in messages/s (target 0.5x); with
  ``..._cpu_sender`` and ``..._cpu_receiver``, the CPU microseconds per message of each process.
  dpipes sends each message with ``await send_bytes`` and reads it with ``await read()``, as
  Zenoh's side puts each and gets a callback per sample. ``peers.zenoh_rate_64B_batch_api``: the
  same messages with dpipes' batch API (``send_many``, ``read_chunks``), beside the same Zenoh runs.
* ``peers.zenoh_roundtrip_64B_p50`` / ``_p99``: 5000 round trips a run, each sample a run's p50 or
  p99. A round trip: a 64-byte put echoed back by the child (both
  publishers ``express``, Zenoh's low-latency setting), awaited before the next; dpipes: a 64-byte
  REQUEST answered by a REPLY, as in ``dpipes-bench bus``. Both echoes answer as the message is
  delivered: Zenoh's in its subscriber's callback, dpipes' in a request handler
  (``Endpoint.on_request``). In microseconds; target: p50 at most
  Zenoh's.

dora-rs: ``dora run`` (a local daemon, no coordinator; multicast scouting off with dora's own
``DORA_ZENOH_MULTICAST=off``) of a dataflow written to a temporary directory with its two Python
nodes. The source sends each ``RecordBatch`` as a ``StructArray`` (``send_output`` takes an Arrow
array), the sink rebuilds and validates it as a ``RecordBatch``, zero-copy, as dpipes' reader does.
The source sends a warm-up array and waits for the sink's acknowledgement; then, ``TIMED_SETS``
(5) times, it sends the set and waits for the sink's acknowledgement of it (the sink drops each
array once counted, and acknowledges a set on its last array). Each set is one sample: bytes of its
arrays that arrived / (its last arrival - its start of sending), both read from ``CLOCK_MONOTONIC``,
so a row has ``repeat`` x 5 samples a side, and one dora start-up (about a second) pays for five.
The sink counts arrivals by the set each array names, since dora may drop arrays from a full input
queue and deliver the rest out of order. Dora sometimes stalls (dora 1.1: a ``send_output`` that
never returns, or a sink never handed the rest of a set: here about one set in 30 of the 100-array
stream) until its own stop two minutes later. Once its source has made no step (a set sent or
acknowledged) for ``DORA_STALL_S``, ``dora run`` is stopped as by Ctrl-C: the set it stalled in
counts as sent, with what arrived (the delivered column shows its loss), but is no sample of the
MB/s row, which has no time to give a set that never ended; the sets it did not get to are not
sent. Leaving it out favours the peer, never dpipes (a dpipes stream that never ended would be
left out the same way).

dpipes beside dora: ``TIMED_SETS`` Arrow streams of the set, one after the other, from one client
here attached over IPC to the hub in a child process (one host, so the batches' buffers travel in
shared memory as dora's do), after the same warm-up. Each stream is a sample taken the same way, to
the last batch's arrival at the sink (not to the end's acknowledgement back at the sender, a hop
dora's figure does not have), and the next starts when the sink's counts for it arrive, as dora's
source waits for its sink's acknowledgement.

* ``peers.dora_one_large_batch_{default,large}_pool``: one 64 MB batch (1M rows x 8 numeric
  columns); dora with its default shared-memory pool, then with a ``shared_memory_pool_size`` large
  enough for its zero-copy path. Target (large pool): at least 1x. dpipes beside the default pool
  runs with its default pool; beside the large pool, its client asks for the same size as a
  reserve (``Client(shm_reserve=...)``: segments made and pre-faulted at attach, before the timed
  part, as dora makes its pool when its node starts).
* ``peers.dora_stream_10k_batches_{default,large}_pool``: 100 batches of 10k rows. Target (large
  pool): at least 1x, with zero loss.

Each throughput row has a ``..._cpu`` row: CPU seconds per GB of both processes together, from
``getrusage`` (this process) and the child's threads' ``/proc/PID/task/TID/schedstat``
(nanoseconds; ``/proc/PID/stat``'s 10 ms ticks where the kernel has no schedstat) across the timed
part; dora's nodes read their own ``getrusage``, and dora's daemon is not counted. One sample per
run: for the Arrow rows, the CPU of all the run's sets over their bytes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import math
import os
import queue
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpipes.bus.client import Client
from dpipes.bus.hub import Hub
from dpipes.tools.bench.bus import (
    ARROW_SETS,
    ARROW_WINDOW_BYTES,
    answer_echo,
    arrow_batches,
    child,
    dpipes_arrow_send_from,
    dpipes_round_trips,
    dpipes_send,
    dpipes_send_from,
    percentile,
    serve_until_stdin_closes,
)
from dpipes.tools.bench.result import Result, SuiteUnavailable, result

log = logging.getLogger(__name__)

PEERS_NEEDED = "pip install eclipse-zenoh dora-rs dora-rs-cli, or pip install -e '.[peers]' in a dpipes checkout"

MESSAGES_1MIB = 2000  # over TCP: 0.4-3 s a run, long beside a scheduler tick or a short stall
MESSAGES_1MIB_SHM = 10_000  # in shared memory 2000 took 0.1 s, which one stall of the machine could decide
MESSAGES_64B = 300_000
ROUND_TRIPS = 5000
ZENOH_CONNECT_TIMEOUT_S = 10.0  # a peer on loopback matches in milliseconds; longer means it is gone
RUN_TIMEOUT_S = 120.0  # one timed run moves at most 2 GB on loopback
ROUND_TRIP_TIMEOUT_S = 10.0  # one echo on loopback; longer means the far end is gone
DORA_RUN_TIMEOUT_S = 300.0  # start-up, 64 MB and teardown, on a loaded machine
# Holds a whole 64 MB set in flight plus the warm-up array, so no send waits for the pool or
# falls back from it. dpipes' client gets the same as its reserve (``Client(shm_reserve=...)``).
DORA_LARGE_POOL = "512MB"
DORA_LARGE_POOL_BYTES = 512_000_000
# Times each dora run, and each dpipes client beside it, sends its Arrow set, each a sample: one set
# takes 5-15 ms, a few scheduler ticks, and a dora run's start-up (~1 s) is paid once for them all.
TIMED_SETS = 5
# Each step of a dora run (a set sent, or acknowledged) takes under a second; a run whose source
# has made no step for this long has stalled in dora (see the module docstring) and is stopped.
DORA_STALL_S = 10.0
DORA_POLL_S = 0.1  # how often a waiting ``dora run`` is checked for its source's progress

DATA_KEY = "dpipes-bench/data"
DONE_KEY = "dpipes-bench/done"
PING_KEY = "dpipes-bench/ping"
PONG_KEY = "dpipes-bench/pong"
END_MARKER = b"end"  # shorter than any payload: the receiver tells them apart by length

CHILD_MODULE = "dpipes.tools.bench.peers"
SINK_BYTES = "bench-sink/bytes"
SINK_CHUNKS = "bench-sink/chunks"
BATCH_API_CHUNKS = 4096  # what one send_many call hands over: a batch's worth
SINK_ARROW = "bench-sink/arrow"
SINK_ECHO = "bench-sink/echo"


# -- what a run measured -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed run: how long, what was sent, what the receiver counted, and the CPU of both sides."""

    seconds: float
    sent: int  # messages or arrays
    arrived: int
    nbytes: int  # payload bytes that arrived
    sender_cpu_s: float
    receiver_cpu_s: float


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (all threads), or of process ``pid``."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    # /proc/PID/stat counts in clock ticks (10 ms), as long as a quick run; each thread's schedstat
    # counts its time on a CPU in nanoseconds. Threads that ended are missing from the sum: the
    # sinks' threads live as long as the sinks.
    if os.path.exists(f"/proc/{pid}/schedstat"):
        total_ns = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total_ns += int(f.read().split()[0])
            except FileNotFoundError:  # the thread ended meanwhile
                continue
        return total_ns / 1e9
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def missing_peers() -> list[str]:
    """The distributions of the ``peers`` extra that this Python cannot use."""
    missing = []
    for dist, module in (("eclipse-zenoh", "zenoh"), ("dora-rs", "dora")):
        try:
            __import__(module)
        except ImportError:
            missing.append(dist)
    if dora_command() is None:
        missing.append("dora-rs-cli")
    return missing


def dora_command() -> str | None:
    """The ``dora`` CLI beside this Python (a venv's), else on PATH."""
    beside = Path(sys.executable).with_name("dora")
    return str(beside) if os.access(beside, os.X_OK) else shutil.which("dora")


# -- Zenoh -------------------------------------------------------------------------------------


def zenoh_config(*, shm: bool, listen: str | None = None, connect: str | None = None) -> Any:
    """A Zenoh peer config that scouts nothing and uses only the endpoints given."""
    import zenoh

    config = zenoh.Config()
    config.insert_json5("mode", '"peer"')
    config.insert_json5("scouting/multicast/enabled", "false")
    config.insert_json5("scouting/gossip/enabled", "false")
    # The default listens on tcp/[::]:0, every interface: listen only where we say, or nowhere.
    config.insert_json5("listen/endpoints", json.dumps([listen] if listen else []))
    config.insert_json5("connect/endpoints", json.dumps([connect] if connect else []))
    config.insert_json5("transport/shared_memory/enabled", json.dumps(shm))
    return config


def _loopback_listening_ports() -> set[int]:
    """TCP ports this process listens on at 127.0.0.1 (Zenoh does not report the port it bound)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    with open("/proc/self/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes and local.startswith("0100007F:"):  # LISTEN, 127.0.0.1
                ports.add(int(local.split(":")[1], 16))
    return ports


def _serve_zenoh(shm: bool) -> None:
    import zenoh

    session = zenoh.open(zenoh_config(shm=shm, listen="tcp/127.0.0.1:0"))
    block = zenoh.CongestionControl.BLOCK
    done = session.declare_publisher(DONE_KEY, congestion_control=block)
    pong = session.declare_publisher(PONG_KEY, congestion_control=block, express=True)
    count = 0

    def on_data(sample: Any) -> None:
        nonlocal count  # one link: Zenoh calls this from one thread at a time
        if len(sample.payload) == len(END_MARKER):
            done.put(str(count))
            count = 0
        else:
            count += 1

    subscribers = [
        session.declare_subscriber(DATA_KEY, on_data),
        session.declare_subscriber(PING_KEY, lambda sample: pong.put(sample.payload)),
    ]
    (port,) = _loopback_listening_ports()
    print(f"tcp/127.0.0.1:{port}", flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    for sub in subscribers:
        sub.undeclare()
    session.close()


def _await_match(publisher: Any) -> None:
    matched = threading.Event()

    def on_status(status: Any) -> None:
        if status.matching:
            matched.set()

    listener = publisher.declare_matching_listener(on_status)
    try:
        if not publisher.matching_status and not matched.wait(ZENOH_CONNECT_TIMEOUT_S):
            raise RuntimeError(f"no Zenoh subscriber matched within {ZENOH_CONNECT_TIMEOUT_S:g} s")
    finally:
        listener.undeclare()


def zenoh_send(addr: str, *, shm: bool, payload: bytes, count: int, receiver_pid: int) -> Run:
    """A timed run of ``count`` puts of ``payload`` to the Zenoh receiver at ``addr``, after a warm-up."""
    import zenoh

    session = zenoh.open(zenoh_config(shm=shm, connect=addr))
    try:
        counts: queue.SimpleQueue[int] = queue.SimpleQueue()
        answers = session.declare_subscriber(DONE_KEY, lambda sample: counts.put(int(sample.payload.to_string())))
        pub = session.declare_publisher(DATA_KEY, congestion_control=zenoh.CongestionControl.BLOCK)
        _await_match(pub)
        put = pub.put

        def burst(n: int) -> int:
            for _ in range(n):
                put(payload)
            put(END_MARKER)
            try:
                return counts.get(timeout=RUN_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"the Zenoh receiver did not answer within {RUN_TIMEOUT_S:g} s") from None

        burst(max(1, count // 10))  # warm up
        cpu, receiver_cpu = cpu_seconds(), cpu_seconds(receiver_pid)
        start = time.perf_counter()
        arrived = burst(count)
        seconds = time.perf_counter() - start
        answers.undeclare()
        return Run(
            seconds=seconds,
            sent=count,
            arrived=arrived,
            nbytes=arrived * len(payload),
            sender_cpu_s=cpu_seconds() - cpu,
            receiver_cpu_s=cpu_seconds(receiver_pid) - receiver_cpu,
        )
    finally:
        session.close()


def zenoh_round_trips(addr: str, payload: bytes, count: int) -> list[float]:
    """Seconds of each of ``count`` echoes of ``payload`` through the Zenoh receiver at ``addr``."""
    import zenoh

    session = zenoh.open(zenoh_config(shm=False, connect=addr))
    try:
        pongs: queue.SimpleQueue[None] = queue.SimpleQueue()
        echoes = session.declare_subscriber(PONG_KEY, lambda sample: pongs.put(None))
        pub = session.declare_publisher(PING_KEY, congestion_control=zenoh.CongestionControl.BLOCK, express=True)
        _await_match(pub)
        times = []
        for _ in range(count):
            start = time.perf_counter()
            pub.put(payload)
            try:
                pongs.get(timeout=ROUND_TRIP_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"no Zenoh echo within {ROUND_TRIP_TIMEOUT_S:g} s") from None
            times.append(time.perf_counter() - start)
        echoes.undeclare()
        return times
    finally:
        session.close()


# -- dpipes ------------------------------------------------------------------------------------


async def _serve_dpipes_counting() -> None:
    from dpipes.bus.arrow_stream import ArrowStreamReader
    from dpipes.bus.codec import Request
    from dpipes.bus.endpoint import Endpoint

    async with Hub("bench-sink") as hub:
        byte_sink = hub.endpoint("bytes")
        chunk_sink = hub.endpoint("chunks")  # the same, read with the batch API
        arrow_sink = hub.endpoint("arrow", window=ARROW_WINDOW_BYTES)
        echo = hub.endpoint("echo")
        last: dict[str, dict[str, Any]] = {"bytes": {}, "chunks": {}, "arrow": {}}

        async def drain_bytes() -> None:
            while True:
                stream = await byte_sink.accept()
                messages = nbytes = 0
                while (msg := await stream.read()) is not None:
                    messages += 1
                    nbytes += msg.payload_bytes
                last["bytes"] = {"arrived": messages, "nbytes": nbytes}

        async def drain_chunks() -> None:
            while True:
                stream = await chunk_sink.accept()
                messages = nbytes = 0
                while chunks := await stream.read_chunks():
                    messages += len(chunks)
                    nbytes += sum(map(len, chunks))
                last["chunks"] = {"arrived": messages, "nbytes": nbytes}

        async def drain_arrow() -> None:
            while True:
                arrays = nbytes = 0
                reader = ArrowStreamReader(await arrow_sink.accept())
                # Counted and dropped, as dora's and Zenoh's sinks do: no batch outlives its turn
                # (one held here would hold its shared memory too).
                end = None
                while (batch := await reader.read()) is not None:
                    arrays += 1
                    nbytes += batch.nbytes
                    end = time.monotonic()  # the last arrival, as dora's sink takes it
                last["arrow"] = {"arrived": arrays, "nbytes": nbytes, "end": end}

        async def answer_counts(endpoint: Endpoint, kind: str) -> None:
            # The counts of the last stream that ended: its EOF was acknowledged before the sender asks.
            while True:
                msg = await endpoint.recv()
                if isinstance(msg, Request):
                    endpoint.reply(msg, last[kind])

        print(hub.tcp_endpoint, hub.ipc_endpoint, flush=True)  # peers link over TCP, same-host clients attach over IPC
        done = serve_until_stdin_closes(asyncio.get_running_loop())
        tasks = [
            asyncio.create_task(drain_bytes()),
            asyncio.create_task(drain_chunks()),
            asyncio.create_task(drain_arrow()),
            asyncio.create_task(answer_counts(byte_sink, "bytes")),
            asyncio.create_task(answer_counts(chunk_sink, "chunks")),
            asyncio.create_task(answer_counts(arrow_sink, "arrow")),
        ]
        answer_echo(echo)
        await done
        for task in tasks:
            task.cancel()


async def _dpipes_run(hub: Hub, dst: str, send: Callable[[], Any], sent: int, receiver_pid: int) -> Run:
    cpu, receiver_cpu = cpu_seconds(), cpu_seconds(receiver_pid)
    seconds = await send()
    sender_cpu, receiver_cpu = cpu_seconds() - cpu, cpu_seconds(receiver_pid) - receiver_cpu
    probe = hub.endpoint(f"probe-{time.monotonic_ns()}")
    try:
        counts = await probe.request(dst, "counts")
    finally:
        probe.close()
    return Run(seconds, sent, counts["arrived"], counts["nbytes"], sender_cpu, receiver_cpu)


def dpipes_bytes_run(addr: str, payload: bytes, count: int, receiver_pid: int) -> Run:
    """A timed dpipes stream of ``count`` messages of ``payload`` to the counting sink, after a warm-up."""

    async def run() -> Run:
        async with Hub("bench-source") as hub:  # a fresh hub per run, as in the bus suite
            await hub.connect_peer(addr)
            await dpipes_send(hub, SINK_BYTES, payload, max(1, count // 10))  # warm up
            return await _dpipes_run(
                hub, SINK_BYTES, lambda: dpipes_send(hub, SINK_BYTES, payload, count), count, receiver_pid
            )

    return asyncio.run(run())


LEASES_BACK_TIMEOUT_S = 10.0  # the sink drops what it read at once; this is slack for a loaded machine


async def _warmed(client: Client) -> None:
    """Wait until the warm-up's shared memory is back in the client's pool (as dora's source waits
    for its sink's acknowledgement): the timed run reuses its pre-faulted segments."""

    async def poll() -> None:
        while client._pool is not None and client._pool.leased:  # noqa: ASYNC110 (a bench, not the bus)
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), LEASES_BACK_TIMEOUT_S)


def dpipes_batch_api_run(addr: str, payload: bytes, count: int, receiver_pid: int) -> Run:
    """``count`` messages of ``payload`` sent with ``send_many`` and read with ``read_chunks``."""

    async def send(hub: Hub, n: int) -> float:
        src = hub.endpoint(f"src-{time.monotonic_ns()}")
        try:
            stream = src.open_stream(SINK_CHUNKS)
            start = time.perf_counter()
            for at in range(0, n, BATCH_API_CHUNKS):
                await stream.send_many(itertools.repeat(payload, min(BATCH_API_CHUNKS, n - at)))
            await stream.close(timeout=RUN_TIMEOUT_S)
            return time.perf_counter() - start
        finally:
            src.close()

    async def run() -> Run:
        async with Hub("bench-source") as hub:
            await hub.connect_peer(addr)
            await send(hub, max(1, count // 10))  # warm up
            return await _dpipes_run(hub, SINK_CHUNKS, lambda: send(hub, count), count, receiver_pid)

    return asyncio.run(run())


def dpipes_local_bytes_run(ipc: str, payload: bytes, count: int, receiver_pid: int) -> Run:
    """The same stream from a client attached to the sink's hub over IPC: one host, shared memory."""

    async def run() -> Run:
        async with Client(ipc) as client:  # a fresh client per run
            src = client.endpoint
            await dpipes_send_from(src, SINK_BYTES, payload, max(1, count // 10))  # warm up: the pool's segments
            await _warmed(client)
            cpu, receiver_cpu = cpu_seconds(), cpu_seconds(receiver_pid)
            seconds = await dpipes_send_from(src, SINK_BYTES, payload, count)
            sender_cpu, receiver_cpu = cpu_seconds() - cpu, cpu_seconds(receiver_pid) - receiver_cpu
            counts = await src.request(SINK_BYTES, "counts")
        return Run(seconds, count, counts["arrived"], counts["nbytes"], sender_cpu, receiver_cpu)

    return asyncio.run(run())


def dpipes_local_arrow_run(
    ipc: str, batches: list[Any], receiver_pid: int, shm_reserve: int = 0, sets: int = TIMED_SETS
) -> list[Run]:
    """The same Arrow stream ``sets`` times from one client attached to the sink's hub over IPC, each
    a sample: one host, shared memory (``shm_reserve`` bytes of it made at attach, before the timed
    part)."""

    async def run() -> list[Run]:
        runs = []
        async with Client(ipc, shm_reserve=shm_reserve) as client:
            src = client.endpoint
            await dpipes_arrow_send_from(src, batches[:1], SINK_ARROW)  # warm up
            await _warmed(client)
            for _ in range(sets):
                cpu, receiver_cpu = cpu_seconds(), cpu_seconds(receiver_pid)
                start = time.monotonic()
                await dpipes_arrow_send_from(src, batches, SINK_ARROW)
                sender_cpu, receiver_cpu = cpu_seconds() - cpu, cpu_seconds(receiver_pid) - receiver_cpu
                # The sink's counts are its acknowledgement of the set, as dora's sink acknowledges
                # one: the next set starts on their arrival.
                counts = await src.request(SINK_ARROW, "counts")
                # From the start of sending to the last arrival at the sink (CLOCK_MONOTONIC is one
                # clock for every process of the host), as dora's figure is taken: not to the end's
                # acknowledgement back at the sender, a hop dora's figure does not include.
                seconds = counts["end"] - start if counts["end"] is not None else float("inf")
                runs.append(Run(seconds, len(batches), counts["arrived"], counts["nbytes"], sender_cpu, receiver_cpu))
        return runs

    return asyncio.run(run())


def dpipes_round_trip_run(addr: str, payload: bytes, count: int) -> list[float]:
    """Seconds of each of ``count`` REQUEST/REPLY round trips to the child's echo endpoint."""

    async def run() -> list[float]:
        async with Hub("bench-source") as hub:
            await hub.connect_peer(addr)
            await dpipes_round_trips(hub, SINK_ECHO, payload, max(1, count // 10))  # warm up
            return await dpipes_round_trips(hub, SINK_ECHO, payload, count)

    return asyncio.run(run())


# -- dora-rs -----------------------------------------------------------------------------------

DORA_SOURCE = """\
import json, os, resource, time
from dora import Node
from dpipes.tools.bench.bus import arrow_batches

progress = open("source.jsonl", "w")  # a line per step: how far the source got, should dora stall

def note(**fields):
    progress.write(json.dumps(fields) + "\\n")
    progress.flush()

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def await_ack(node, k):
    # Whether the sink acknowledged set k (-1: the warm-up) before dora stopped the dataflow.
    for event in node:
        if event["type"] == "INPUT" and event["id"] == "ack" and event["value"][0].as_py() >= k:
            return True
        if event["type"] == "STOP":
            return False
    return False

node = Node()
batches = arrow_batches(os.environ["BENCH_SET"], int(os.environ["BENCH_SCALE"]))
arrays = [b.to_struct_array() for b in batches]
note(ready=True)
node.send_output("batch", arrays[0], {"set": -1, "last": True})  # warm up, and wait until the sink has it
if not await_ack(node, -1):
    note(set=0, sent=len(arrays))  # dora stalled before the first set, which counts as stalled
else:
    for k in range(int(os.environ["BENCH_TIMED_SETS"])):
        note(set=k, sent=len(arrays))
        start_cpu, start = cpu(), time.monotonic()
        for i, array in enumerate(arrays):
            node.send_output("batch", array, {"set": k, "last": i == len(arrays) - 1})
        note(set=k, sent=len(arrays), start=start, cpu_s=cpu() - start_cpu)
        # The sink has the whole set: the next one starts, and after the last our buffers may go.
        if not await_ack(node, k):
            break  # dora stopped the dataflow: nothing sent now would arrive
note(done=True)
"""

DORA_SINK = """\
import json, os, resource, time
import pyarrow as pa
from dora import Node

def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime

def save(sets):
    with open("sink.json.new", "w") as f:
        json.dump(sets, f)
    os.replace("sink.json.new", "sink.json")  # whole, should dora kill us later

node = Node()
sets = {}  # what arrived of each set, by the set's number: dora may drop or reorder arrays
mark_cpu = cpu()
for event in node:  # until the source has gone, or dora stops the dataflow
    if event["type"] != "INPUT" or event["id"] != "batch":
        continue
    metadata = event["metadata"]
    batch = pa.RecordBatch.from_struct_array(event["value"])
    batch.validate()
    size = batch.nbytes
    del batch, event  # let go of the arrays before acknowledging, so the source's pool has them back
    k = metadata["set"]
    if k < 0:  # the warm-up
        mark_cpu = cpu()
    else:
        got = sets.setdefault(k, {"arrived": 0, "nbytes": 0, "end": None, "complete": False, "cpu_s": 0.0})
        got["arrived"] += 1
        got["nbytes"] += size
        got["end"] = time.monotonic()  # the set's last arrival so far
        if not metadata["last"]:
            continue
        # A set's CPU runs from the previous acknowledgement (the warm-up's, first) to its last array.
        now_cpu = cpu()
        got["cpu_s"] += now_cpu - mark_cpu
        got["complete"] = True
        mark_cpu = now_cpu
        save(sets)
    node.send_output("ack", pa.array([k]))
save(sets)
"""


def dora_dataflow(name: str, scale: int, pool: str | None, sets: int) -> str:
    """The dataflow YAML: source -> sink, the sink's acknowledgements back to the source."""
    pool_line = f"    shared_memory_pool_size: {pool}\n" if pool else ""
    return (
        "nodes:\n"
        "  - id: source\n"
        "    path: source.py\n"
        "    inputs:\n"
        "      ack: sink/ack\n"
        "    outputs: [batch]\n"
        f"{pool_line}"
        "    env:\n"
        f'      BENCH_SET: "{name}"\n'
        f'      BENCH_SCALE: "{scale}"\n'
        f'      BENCH_TIMED_SETS: "{sets}"\n'
        "  - id: sink\n"
        "    path: sink.py\n"
        "    inputs:\n"
        "      batch: source/batch\n"
        "    outputs: [ack]\n"
    )


def await_dora(proc: subprocess.Popen[bytes], progress: Path, name: str) -> int | None:
    """The exit status of ``dora run``, None if it had to be killed.

    Once the source has started, each of its steps (the warm-up, each set's sending and its
    acknowledgement, then the sink's end) takes well under a second. When its ``progress`` file has
    not grown for ``DORA_STALL_S``, dora has stalled (see the module docstring): ``dora run`` is
    stopped as by Ctrl-C, its nodes get STOP, and the sink writes what arrived.
    """
    deadline = time.monotonic() + DORA_RUN_TIMEOUT_S
    size, changed = -1, time.monotonic()
    while True:
        try:
            return proc.wait(DORA_POLL_S)
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if now > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        if not progress.exists():
            continue  # still starting: the deadline bounds that
        if (new_size := progress.stat().st_size) != size:
            size, changed = new_size, now
        elif now - changed > DORA_STALL_S:
            log.warning("dora run of %s stalled for %g s; stopping it", name, DORA_STALL_S)
            proc.send_signal(signal.SIGINT)
            changed = float("inf")  # once


def dora_run(name: str, scale: int, pool: str | None, sets: int = TIMED_SETS) -> list[Run]:
    """One ``dora run`` between two Python nodes, in a temporary directory: the Arrow set ``name``
    sent ``sets`` times, each acknowledged before the next, each a sample."""
    dora = dora_command()
    assert dora is not None
    with tempfile.TemporaryDirectory(prefix="dpipes-bench-dora-") as tmp:
        work = Path(tmp)
        (work / "dataflow.yml").write_text(dora_dataflow(name, scale, pool, sets))
        (work / "source.py").write_text(DORA_SOURCE)
        (work / "sink.py").write_text(DORA_SINK)
        env = {
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # nodes run our Python
            "DORA_ZENOH_MULTICAST": "off",
        }
        with open(work / "dora.log", "wb") as log_file:
            proc = subprocess.Popen(
                [dora, "run", "dataflow.yml"],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its daemon and nodes in one group we can end together
            )
            status = await_dora(proc, work / "source.jsonl", name)
        source_file, sink_file = work / "source.jsonl", work / "sink.json"
        if status != 0 or not source_file.exists() or not sink_file.exists():
            tail = (work / "dora.log").read_text(errors="replace").splitlines()[-5:]
            raise RuntimeError(f"dora run of {name} ended with status {status}: " + " | ".join(tail))
        steps = [json.loads(line) for line in source_file.read_text().splitlines()]
        sink = json.loads(sink_file.read_text())
    log.debug("dora run of %s (pool %s): source %s, sink %s", name, pool or "default", steps, sink)
    return dora_sets(steps, sink)


def dora_sets(steps: list[dict[str, Any]], sink: dict[str, dict[str, Any]]) -> list[Run]:
    """A sample per set the dora source began, from its progress lines and the sink's counts."""
    source: dict[int, dict[str, Any]] = {}
    for step in steps:
        if "set" in step:
            source.setdefault(step["set"], {}).update(step)
    runs = []
    for k, sent in sorted(source.items()):
        took = sink.get(str(k), {"arrived": 0, "nbytes": 0, "complete": False, "cpu_s": 0.0})
        # A set dora never finished sending or delivering never ended: no time, whatever arrived.
        done = took["complete"] and "start" in sent
        seconds = took["end"] - sent["start"] if done else float("inf")
        runs.append(Run(seconds, sent["sent"], took["arrived"], took["nbytes"], sent.get("cpu_s", 0.0), took["cpu_s"]))
    return runs


# -- rows --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Counts:
    ours: tuple[int, int]
    theirs: tuple[int, int]


def _delivered(runs: list[Run]) -> tuple[int, int]:
    return sum(r.arrived for r in runs), sum(r.sent for r in runs)


def _mb_s(r: Run) -> float:
    return r.nbytes / r.seconds / 1e6


def _ended_mb_s(runs: list[Run]) -> list[float]:
    """MB/s of each sample that ended (a stalled dora set has no time: its loss shows in the
    delivered count instead); 0 if none did."""
    return [_mb_s(r) for r in runs if math.isfinite(r.seconds)] or [0.0]


def _cpu_s_per_gb(runs: list[Run]) -> float:
    return sum(r.sender_cpu_s + r.receiver_cpu_s for r in runs) / max(sum(r.nbytes for r in runs), 1) * 1e9


def throughput_rows(
    name: str, peer: str, ours: list[list[Run]], theirs: list[list[Run]], target: float | None
) -> list[Result]:
    """MB/s of what arrived, and CPU s/GB of both processes, dpipes beside ``peer``.

    Each inner list holds the samples one session took (the sets of a dora run, or of the dpipes
    client beside it; a single burst for Zenoh): MB/s is the median over every sample, CPU per GB
    one figure per session, over all its samples.
    """
    our_samples, their_samples = list(itertools.chain.from_iterable(ours)), list(itertools.chain.from_iterable(theirs))
    counts = _Counts(_delivered(our_samples), _delivered(their_samples))
    return [
        result(
            name,
            "MB/s",
            _ended_mb_s(our_samples),
            peer,
            _ended_mb_s(their_samples),
            target=target,
            delivered=counts.ours,
            baseline_delivered=counts.theirs,
        ),
        result(
            f"{name}_cpu",
            "CPU s/GB, both processes",
            [_cpu_s_per_gb(session) for session in ours],
            peer,
            [_cpu_s_per_gb(session) for session in theirs],
            higher_is_better=False,
            delivered=counts.ours,
            baseline_delivered=counts.theirs,
        ),
    ]


def rate_rows(name: str, peer: str, ours: list[Run], theirs: list[Run], target: float | None) -> list[Result]:
    """Messages/s that arrived, and CPU microseconds per message of each side, dpipes beside ``peer``."""
    counts = _Counts(_delivered(ours), _delivered(theirs))
    rows = [
        result(
            name,
            "msg/s",
            [r.arrived / r.seconds for r in ours],
            peer,
            [r.arrived / r.seconds for r in theirs],
            target=target,
            delivered=counts.ours,
            baseline_delivered=counts.theirs,
        )
    ]
    for side in ("sender", "receiver"):

        def us(r: Run, side: str = side) -> float:
            return getattr(r, f"{side}_cpu_s") / max(r.arrived, 1) * 1e6

        rows.append(
            result(
                f"{name}_cpu_{side}",
                f"CPU us/msg, {side}",
                [us(r) for r in ours],
                peer,
                [us(r) for r in theirs],
                higher_is_better=False,
                delivered=counts.ours,
                baseline_delivered=counts.theirs,
            )
        )
    return rows


def round_trip_rows(name: str, peer: str, ours: list[list[float]], theirs: list[list[float]]) -> list[Result]:
    """p50 and p99 of each run's round trips, in microseconds; every one was answered or the run failed."""
    n, m = sum(map(len, ours)), sum(map(len, theirs))
    counts = _Counts((n, n), (m, m))
    return [
        result(
            f"{name}_p{q}",
            "us",
            [percentile(run, q) * 1e6 for run in ours],
            peer,
            [percentile(run, q) * 1e6 for run in theirs],
            target=1.0 if q == 50 else None,
            higher_is_better=False,
            delivered=counts.ours,
            baseline_delivered=counts.theirs,
        )
        for q in (50, 99)
    ]


# -- the suite ---------------------------------------------------------------------------------


def zenoh_benchmarks(repeat: int, progress: Callable[[str], None], scale: int) -> list[Result]:
    """1 MiB (shared memory off and on), 64 B, and the 64 B round trip, dpipes beside Zenoh."""
    big, small = os.urandom(1 << 20), os.urandom(64)
    results: list[Result] = []
    with (
        child("dpipes-sink", module=CHILD_MODULE) as (sink, bus_addrs),
        child("zenoh-sink", "tcp", module=CHILD_MODULE) as (tcp_sink, tcp_addr),
        child("zenoh-sink", "shm", module=CHILD_MODULE) as (shm_sink, shm_addr),
    ):
        bus_addr, bus_ipc = bus_addrs.split()
        count, shm_count = MESSAGES_1MIB // scale, MESSAGES_1MIB_SHM // scale
        runs: dict[str, list[Run]] = {"ours_tcp": [], "tcp": [], "ours_shm": [], "shm": []}
        for _ in range(repeat):
            runs["ours_tcp"].append(dpipes_bytes_run(bus_addr, big, count, sink.pid))
            runs["tcp"].append(zenoh_send(tcp_addr, shm=False, payload=big, count=count, receiver_pid=tcp_sink.pid))
            runs["ours_shm"].append(dpipes_local_bytes_run(bus_ipc, big, shm_count, sink.pid))
            runs["shm"].append(zenoh_send(shm_addr, shm=True, payload=big, count=shm_count, receiver_pid=shm_sink.pid))
            progress(".")
        bursts = {side: [[run] for run in side_runs] for side, side_runs in runs.items()}
        results += throughput_rows(
            "peers.zenoh_tcp_1MiB", "Zenoh, shared memory off (TCP)", bursts["ours_tcp"], bursts["tcp"], 2.0
        )
        results += throughput_rows(
            "peers.zenoh_shm_1MiB", "Zenoh default (shared memory)", bursts["ours_shm"], bursts["shm"], 1.0
        )

        count = MESSAGES_64B // scale
        ours, theirs = [], []
        for _ in range(repeat):
            ours.append(dpipes_bytes_run(bus_addr, small, count, sink.pid))
            theirs.append(zenoh_send(tcp_addr, shm=False, payload=small, count=count, receiver_pid=tcp_sink.pid))
            progress(".")
        results += rate_rows("peers.zenoh_rate_64B", "Zenoh over TCP", ours, theirs, 0.5)
        batched = [dpipes_batch_api_run(bus_addr, small, count, sink.pid) for _ in range(repeat)]
        results += rate_rows("peers.zenoh_rate_64B_batch_api", "Zenoh over TCP", batched, theirs, None)

        count = ROUND_TRIPS // scale
        zenoh_round_trips(tcp_addr, small, max(1, count // 10))  # warm up
        our_trips, their_trips = [], []
        for _ in range(repeat):
            our_trips.append(dpipes_round_trip_run(bus_addr, small, count))
            their_trips.append(zenoh_round_trips(tcp_addr, small, count))
            progress(".")
        results += round_trip_rows("peers.zenoh_roundtrip_64B", "Zenoh over TCP, express", our_trips, their_trips)
    return results


def dora_benchmarks(repeat: int, progress: Callable[[str], None], scale: int) -> list[Result]:
    """The 64 MB batch and the 10k-row stream, dpipes beside dora-rs with its default and a large pool."""
    results: list[Result] = []
    with child("dpipes-sink", module=CHILD_MODULE) as (sink, bus_addrs):
        bus_ipc = bus_addrs.split()[1]
        for name in ARROW_SETS:
            batches = arrow_batches(name, scale)
            runs: dict[str, list[list[Run]]] = {"ours_default": [], "default": [], "ours_large": [], "large": []}
            for _ in range(repeat):
                runs["ours_default"].append(dpipes_local_arrow_run(bus_ipc, batches, sink.pid))
                runs["default"].append(dora_run(name, scale, None))
                runs["ours_large"].append(dpipes_local_arrow_run(bus_ipc, batches, sink.pid, DORA_LARGE_POOL_BYTES))
                runs["large"].append(dora_run(name, scale, DORA_LARGE_POOL))
                progress(".")
            results += throughput_rows(
                f"peers.dora_{name}_default_pool", "dora-rs, default pool", runs["ours_default"], runs["default"], None
            )
            results += throughput_rows(
                f"peers.dora_{name}_large_pool",
                f"dora-rs, {DORA_LARGE_POOL} pool; dpipes with the same shm_reserve",
                runs["ours_large"],
                runs["large"],
                1.0,
            )
    return results


def peers_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None
) -> list[Result]:
    """dpipes beside Zenoh and dora-rs, each shape interleaved in this run."""
    missing = missing_peers()
    if missing:
        raise SuiteUnavailable(f"needs {', '.join(missing)} (the peers it measures dpipes against): {PEERS_NEEDED}")
    scale = 10 if quick else 1
    return zenoh_benchmarks(repeat, progress, scale) + dora_benchmarks(repeat, progress, scale)


def main(argv: list[str]) -> None:
    """Child-process roles of the benchmark."""
    role = argv[0]
    if role == "zenoh-sink":
        _serve_zenoh(shm=argv[1] == "shm")
    elif role == "dpipes-sink":
        asyncio.run(_serve_dpipes_counting())
    else:
        raise SystemExit(f"unknown benchmark role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
