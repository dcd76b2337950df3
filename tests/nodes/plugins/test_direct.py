"""Plugin stages whose neighbours run on the same node: their data goes through a kernel pipe, not the hub."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pyarrow as pa
import pyarrow.csv
import pyarrow.ipc as pa_ipc
import pytest
import zmq
import zmq.asyncio

from dpipes.bus.tap import TapEvent, decode_event
from dpipes.nodes.plugins.direct import DirectInput, DirectOutput, HeldWrites, ReadAhead
from dpipes.nodes.plugins.errors import EdgeDecodeError
from dpipes.nodes.plugins.spec import FD_BUS, FD_SENT, WorkerSpec
from tests.nodes.daemons import Daemon, daemons, dpipes
from tests.nodes.plugins.test_worker import no_workers_left, run_killing_its_worker, workers_of
from tests.nodes.plugins.test_worker_pool import until
from tests.nodes.plugins.workers import SALES, rows
from tests.procs import resources

WAIT_S = 30.0
DATA_KINDS = {"BYTES", "ARROW", "OBJECTS"}
SUMMARY = [
    {"region": "east", "amount_sum": "300"},
    {"region": "north", "amount_sum": "320"},
    {"region": "south", "amount_sum": "150"},
]


@contextlib.asynccontextmanager
async def tap_of(rt: Path, node: Daemon) -> AsyncIterator[zmq.asyncio.Socket]:
    """A subscriber to ``node``'s tap, subscribed once an event came (a first run shows)."""
    ctx = zmq.asyncio.Context()
    tap = ctx.socket(zmq.SUB)
    tap.connect(f"ipc://{rt}/{node.name}-tap.sock")
    tap.subscribe(b"")
    try:
        yield tap
    finally:
        tap.close(0)
        ctx.term()


async def subscribed(rt: Path, tap: zmq.asyncio.Socket, node: Daemon) -> None:
    """Until the tap shows traffic: runs of ``echo`` on ``node`` until one of them is seen."""

    async def poll() -> None:
        while True:
            await dpipes(rt, "--node", node.host_port, f"echo subscribed@{node.name}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tap.recv(), 1.0)
                return

    await asyncio.wait_for(poll(), WAIT_S)


async def events_until(tap: zmq.asyncio.Socket, marker: bytes) -> list[TapEvent]:
    """Every event up to the ``BYTES`` that carry ``marker`` (sampled by the tap)."""
    seen: list[TapEvent] = []
    while True:
        event = decode_event(await asyncio.wait_for(tap.recv(), WAIT_S))
        if event.kind == "BYTES" and event.sample and marker in event.sample:
            return seen
        seen.append(event)


async def events_before_now(rt: Path, tap: zmq.asyncio.Socket, node: Daemon, marker: str) -> list[TapEvent]:
    """Every event the runs before now sent: those up to an ``echo MARKER`` run on ``node`` now."""
    await dpipes(rt, "--node", node.host_port, f"echo {marker}@{node.name}")
    return await events_until(tap, marker.encode())


def data_of_the_filter_run(events: list[TapEvent]) -> tuple[str, set[str]]:
    """The pipeline whose ``%filter`` said what it kept, and who sent its data across the hub."""
    piped = [e for e in events if e.kind == "PIPES" and e.pipes and any("filter kept" in p for p in e.pipes)]
    assert piped, "the tap saw the filter's own message"
    pipeline_id = piped[0].src.removeprefix("alpha/").partition(".")[0]
    return pipeline_id, {e.src for e in events if e.kind in DATA_KINDS and pipeline_id in e.src + e.dst}


async def test_program_plugin_plugin_program_on_one_node_carry_no_data_through_the_hub(rt: Path) -> None:
    sales = rt.parent / "sales.csv"
    async with daemons(rt, ["alpha"]) as (alpha,), tap_of(rt, alpha) as tap:
        await subscribed(rt, tap, alpha)
        pipeline = (
            f'cat {sales} | %filter@alpha expr="amount > 100" | %summarize@alpha by=region agg=amount:sum | cat@alpha'
        )
        out = await dpipes(rt, "--node", alpha.host_port, "--status", pipeline)
        assert out.code == 0, out.stderr
        assert rows(out.stdout) == SUMMARY
        assert "INFO filter kept 4 of 6 rows" in out.stderr  # the plugin's messages still reach the client
        events = await events_before_now(rt, tap, alpha, "the-run-above-is-over")
    pipeline_id, moved = data_of_the_filter_run(events)
    # Only the last stage's output crosses the hub, to the client: every edge between stages is a pipe.
    assert moved == {f"alpha/{pipeline_id}.3"}


async def test_arrow_from_a_program_through_a_plugin_to_a_program_on_one_node(rt: Path) -> None:
    table = pa.table({"n": pa.array(range(200_000)), "x": pa.array([0.5] * 200_000)})
    data = rt.parent / "table.arrows"
    with pa.OSFile(str(data), "wb") as f, pa_ipc.new_stream(f, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=10_000):
            writer.write_batch(batch)
    async with daemons(rt, ["alpha"]) as (alpha,):
        out = await dpipes(rt, "--node", alpha.host_port, "--arrow", f"cat {data} | %passthrough@alpha | cat@alpha")
        assert out.code == 0, out.stderr
        assert pa_ipc.open_stream(out.stdout).read_all().equals(table)


def test_a_direct_input_reads_whole_batches_however_its_writer_splits_them() -> None:
    table = pa.table({"n": pa.array(range(300_000)), "s": pa.array([f"row {i}" for i in range(300_000)])})
    sink = pa.BufferOutputStream()
    with pa_ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=100_000)  # bodies of MiBs, beside messages of bytes
    data = sink.getvalue().to_pybytes()
    read_end, write_end = os.pipe()

    def write_in_odd_pieces() -> None:
        with os.fdopen(write_end, "wb", buffering=0) as pipe:
            for at in range(0, len(data), 4093):
                pipe.write(data[at : at + 4093])

    writer_thread = threading.Thread(target=write_in_odd_pieces)
    writer_thread.start()
    batches = list(DirectInput(read_end, "arrow", where="a test pipe").batches())
    writer_thread.join()
    assert [b.num_rows for b in batches] == [100_000] * 3
    assert pa.Table.from_batches(batches).equals(table)


def ipc_stream(table: pa.Table, batch_rows: int) -> bytes:
    sink = pa.BufferOutputStream()
    with pa_ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch_rows)
    return sink.getvalue().to_pybytes()


def read_ahead_until(ahead: ReadAhead, nbytes: int) -> None:
    """Until ``ahead`` has read ``nbytes`` (polled under a deadline: its thread says nothing)."""
    deadline = time.monotonic() + WAIT_S
    while ahead.read < nbytes:
        assert time.monotonic() < deadline, f"read ahead {ahead.read} of {nbytes} bytes"
        time.sleep(0.001)


@pytest.mark.parametrize("limit", [1, 7, 4093, 100_000, 1 << 20])
def test_a_direct_input_read_ahead_gives_every_batch_wherever_its_read_stopped(limit: int) -> None:
    table = pa.table({"n": pa.array(range(30_000)), "s": pa.array([f"é {i}" for i in range(30_000)])})
    data = ipc_stream(table, 7_000)
    read_end, write_end = os.pipe()
    writer_thread = threading.Thread(target=lambda: os.fdopen(write_end, "wb").write(data))  # closed as it ends
    writer_thread.start()
    ahead = ReadAhead(read_end, limit)
    read_ahead_until(ahead, min(limit, len(data)))  # stopped at its limit, inside a message or not
    batches = list(DirectInput(read_end, "arrow", where="a test pipe", ahead=ahead).batches())
    writer_thread.join()
    assert pa.Table.from_batches(batches).equals(table)


@pytest.mark.parametrize("fmt", ["csv", "arrow"])
def test_a_direct_input_read_ahead_of_a_whole_input_or_of_nothing(fmt: str) -> None:
    table = pa.table({"n": pa.array(range(1000)), "s": pa.array([f"r{i}" for i in range(1000)])})
    if fmt == "arrow":
        data = ipc_stream(table, 300)
    else:
        sink = pa.BufferOutputStream()
        pa.csv.write_csv(table, sink)
        data = sink.getvalue().to_pybytes()
    for payload in (data, b""):
        read_end, write_end = os.pipe()
        with os.fdopen(write_end, "wb") as pipe:
            pipe.write(payload)  # and closed: the read ahead meets the end
        ahead = ReadAhead(read_end)
        read_ahead_until(ahead, len(payload))
        batches = list(DirectInput(read_end, fmt, where="a test pipe", ahead=ahead).batches())
        assert pa.Table.from_batches(batches).equals(table) if payload else batches == [], (fmt, len(payload))


def test_a_direct_input_read_ahead_waits_for_no_writer() -> None:
    """The plugin's first read takes over from the read ahead at once, with a writer that has more to say."""
    table = pa.table({"n": pa.array(range(10_000))})
    data = ipc_stream(table, 1_000)
    half = len(data) // 2
    read_end, write_end = os.pipe()
    first_batch = threading.Event()

    def write_half_then_the_rest() -> None:
        with os.fdopen(write_end, "wb", buffering=0) as pipe:
            pipe.write(data[:half])
            first_batch.wait(WAIT_S)  # the rest once the reader has a batch: a read ahead that waited would hang
            pipe.write(data[half:])

    writer_thread = threading.Thread(target=write_half_then_the_rest)
    writer_thread.start()
    ahead = ReadAhead(read_end)
    read_ahead_until(ahead, half)
    got = []
    for batch in DirectInput(read_end, "arrow", where="a test pipe", ahead=ahead).batches():
        got.append(batch)
        first_batch.set()
    writer_thread.join()
    assert pa.Table.from_batches(got).equals(table)


class _Gone(BrokenPipeError):
    pass


def _pass_through(in_r: int, out_w: int, *, held: HeldWrites) -> None:
    """The worker's parts for a direct input and output, as a pass-through plugin uses them."""
    out = DirectOutput(out_w, "batches", where="out", gone=_Gone, held=held)
    for batch in DirectInput(in_r, "batches", where="in", held=held).batches():
        if out.schema is None:
            out.open(batch.schema)
        out.write(batch)
    out.close()


def test_held_writes_go_out_before_the_input_would_wait_and_all_arrive() -> None:
    """A batch written waits in its output only while the input has more to read at once: a writer
    that sends the next batch only once the previous one came out does not stall, and a writer
    that sends everything at once gets everything back, in order."""
    schema = pa.schema([("n", pa.int64())])
    for lockstep in (True, False):
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        worker = threading.Thread(target=_pass_through, args=(in_r, out_w), kwargs={"held": HeldWrites()})
        worker.start()
        got: list[int] = []
        with open(in_w, "wb") as w_in, open(out_r, "rb") as r_out:
            writer = pa_ipc.new_stream(w_in, schema)
            writer.write_batch(pa.record_batch([pa.array([0])], schema=schema))
            w_in.flush()
            reader = pa_ipc.open_stream(r_out)  # the stream's schema and first batch come out before a second goes in
            for i in range(1, 200):
                if lockstep:
                    got += reader.read_next_batch().column(0).to_pylist()
                writer.write_batch(pa.record_batch([pa.array([i])], schema=schema))
                w_in.flush()
            writer.close()
            w_in.close()
            got += [n for batch in reader for n in batch.column(0).to_pylist()]
        worker.join(WAIT_S)
        assert not worker.is_alive()
        assert got == list(range(200))


def test_a_reader_gone_under_a_held_flush_is_told_at_the_next_write_not_in_the_read() -> None:
    schema = pa.schema([("n", pa.int64())])
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    held = HeldWrites()
    out = DirectOutput(out_w, "batches", where="out", gone=_Gone, held=held)
    out.open(schema)
    batches = DirectInput(in_r, "batches", where="in", held=held).batches()
    with open(in_w, "wb") as w_in, pa_ipc.new_stream(w_in, schema) as writer:
        writer.write_batch(pa.record_batch([pa.array([1])], schema=schema))
        w_in.flush()
        out.write(next(batches))
        os.close(out_r)  # the reader goes away with a batch still held
    assert list(batches) == []  # the input's end flushed, failed quietly, and the read ended as it would
    with pytest.raises(_Gone, match="out: its reader went away"):
        out.write(pa.record_batch([pa.array([2])], schema=schema))
    with pytest.raises(_Gone):
        out.close()


def test_a_schema_change_mid_stream_after_a_read_ahead_is_refused_by_name() -> None:
    first = ipc_stream(pa.table({"n": pa.array(range(100))}), 50)
    second = ipc_stream(pa.table({"n": pa.array([f"{i}" for i in range(100)])}), 50)
    read_end, write_end = os.pipe()
    writer_thread = threading.Thread(target=lambda: os.fdopen(write_end, "wb").write(first[:-8] + second))
    writer_thread.start()  # the first stream's end marker dropped: a second schema message follows its batches
    ahead = ReadAhead(read_end)
    read_ahead_until(ahead, 1)
    with pytest.raises(EdgeDecodeError, match=r"a test pipe: not an Arrow IPC stream: after 2 batches"):
        list(DirectInput(read_end, "arrow", where="a test pipe", ahead=ahead).batches())
    writer_thread.join()


def plugin_temp_dirs(plugin: str) -> set[Path]:
    """The plugin stages' ``temp_dir`` directories of ``plugin`` in the temporary directory nodes use."""
    return set(Path(tempfile.gettempdir()).glob(f"dpipes-plugin-{plugin}-*"))


async def test_a_worker_killed_on_a_direct_edge_fails_the_run_by_name_and_leaves_nothing(rt: Path) -> None:
    before = plugin_temp_dirs("stuck")
    async with daemons(rt, ["alpha"]) as (alpha,):
        err = await run_killing_its_worker(rt, alpha, alpha, "seq 5 | %stuck@alpha | cat@alpha")
        assert "stage 1 %stuck@alpha: killed by SIGKILL (plugin stuck worker killed by SIGKILL" in err
        await until(lambda: workers_of(alpha.proc.pid) == [], "no worker left running a stage")
        await until(lambda: plugin_temp_dirs("stuck") <= before, "the killed plugin's temp_dir removed by its node")


async def test_a_worker_started_ahead_takes_its_pipes_from_the_node(rt: Path) -> None:
    sales = rt.parent / "sales.csv"
    async with daemons(rt, ["alpha"]) as (alpha,), tap_of(rt, alpha) as tap:
        first = await dpipes(rt, "--node", alpha.host_port, "%where@alpha | cat@alpha")
        assert first.code == 0, first.stderr
        await until(lambda: len(workers_of(alpha.proc.pid, idle=True)) == 2, "the pool to fill (2 by default)")
        ready = set(workers_of(alpha.proc.pid, idle=True))
        out = await dpipes(rt, "--node", alpha.host_port, "%where@alpha | cat@alpha")
        assert out.code == 0, out.stderr
        (row,) = rows(out.stdout)
        assert int(row["pid"]) in ready  # a pooled worker wrote to its pipe to cat
        await until(lambda: len(workers_of(alpha.proc.pid, idle=True)) == 2, "the pool to refill")
        await subscribed(rt, tap, alpha)
        pipeline = f'cat {sales} | %filter@alpha expr="amount > 100" | %summarize@alpha by=region agg=amount:sum'
        out = await dpipes(rt, "--node", alpha.host_port, pipeline)  # both plugins in pooled workers
        assert out.code == 0, out.stderr
        assert rows(out.stdout) == SUMMARY
        events = await events_before_now(rt, tap, alpha, "the-pooled-run-is-over")
    pipeline_id, moved = data_of_the_filter_run(events)
    assert moved == {f"alpha/{pipeline_id}.2"}  # cat -> filter -> summarize: pipes, none through the hub


async def test_a_local_client_hands_its_stdin_and_stdout_to_plugin_stages(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,), tap_of(rt, alpha) as tap:
        await subscribed(rt, tap, alpha)
        pipeline = '%filter@alpha expr="amount > 100" | %summarize@alpha by=region agg=amount:sum'
        out = await dpipes(rt, pipeline, input=SALES.encode())  # this host's node: stdin and stdout handed over
        assert out.code == 0, out.stderr
        assert rows(out.stdout) == SUMMARY
        events = await events_before_now(rt, tap, alpha, "the-local-run-is-over")
    _pipeline_id, moved = data_of_the_filter_run(events)
    assert moved == set()  # the client's stdin to %filter, %filter to %summarize, %summarize to its stdout


async def test_a_reader_that_stops_early_ends_a_plugin_on_a_direct_edge_as_sigpipe(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        out = await dpipes(
            rt, "--node", alpha.host_port, "--status", "%generate@alpha rows=100000000 | head@alpha -n 2"
        )
        assert out.code == 0, out.stderr  # as `yes | head` in a shell: the writer's SIGPIPE is no failure
        assert "Traceback" not in out.stderr  # nor an error of the plugin's to report
        assert out.stdout.decode().splitlines()[0] == '"n","square"'
        assert len(out.stdout.decode().splitlines()) == 2
        await until(lambda: workers_of(alpha.proc.pid) == [], "the worker to end")


async def test_input_that_does_not_parse_on_a_direct_edge_fails_the_run_and_its_reader_sees_no_end(rt: Path) -> None:
    # The first block (1 MiB) fixes the column as integers; a later row is text.
    data = b"n\n" + b"12345\n" * 300_000 + b"twelve\n"
    async with daemons(rt, ["alpha"]) as (alpha,):
        out = await dpipes(rt, "--node", alpha.host_port, "cat@alpha | %passthrough@alpha | wc@alpha -l", input=data)
        assert out.code != 0
        assert "stage 1 (%passthrough@alpha): plugin passthrough: input 'Input'" in out.stderr
        assert "CSV does not parse: after" in out.stderr
        assert out.stdout == b""  # wc was cancelled before it saw an end of input: no count of a partial one
        await no_workers_left(alpha.proc.pid)


def spec_body(**fields: object) -> dict[str, object]:
    body: dict[str, object] = {
        "hub": "ipc://x", "name": "p.1", "pipeline": "p", "stage": 1, "node": "alpha", "plugin": "filter",
        "config": {}, "mode": "bytes", "messages_to": "c", "inputs": [], "outputs": [],
        "callback_timeout_s": None, "window": 1, "cwd": "/", "env": {},
    }  # fmt: skip
    return {**body, **fields}


def test_the_worker_spec_names_direct_edges_and_refuses_what_is_no_descriptor() -> None:
    import json

    assert WorkerSpec.from_json(json.dumps(spec_body()).encode()).input_fd == FD_BUS  # a spec of the bus only
    spec = WorkerSpec.from_json(json.dumps(spec_body(input_fd=FD_SENT, output_fd=7)).encode())
    assert (spec.input_fd, spec.output_fd, spec.direct) == (FD_SENT, 7, True)
    for bad in (-3, "5", 1.5):
        with pytest.raises(ValueError, match="input_fd is not a descriptor"):
            WorkerSpec.from_json(json.dumps(spec_body(input_fd=bad)).encode())


async def test_direct_edges_leave_the_daemon_no_descriptor(rt: Path) -> None:
    sales = rt.parent / "sales.csv"
    runs = [
        f'cat {sales} | %filter@alpha expr="amount > 100" | %summarize@alpha by=region agg=amount:sum | cat@alpha',
        "cat@alpha | %passthrough@alpha | wc@alpha -l",  # fails: the CSV does not parse
        "%generate@alpha rows=100000000 | head@alpha -n 2",  # ends by SIGPIPE
    ]
    bad = b"a,b\n1,2\n3,4,5\n"
    async with daemons(rt, ["alpha"]) as (alpha,):
        for pipeline in runs:  # warm up: the pool fills, lazy imports happen
            await dpipes(rt, "--node", alpha.host_port, pipeline, input=bad)
        await until(lambda: len(workers_of(alpha.proc.pid, idle=True)) == 2, "the pool to fill")
        before = resources(alpha.proc.pid).fds
        for pipeline in runs * 3:
            await dpipes(rt, "--node", alpha.host_port, pipeline, input=bad)
        await until(lambda: len(workers_of(alpha.proc.pid, idle=True)) == 2, "the pool to refill")
        await until(lambda: resources(alpha.proc.pid).fds <= before, f"alpha's descriptors back to {before}")
