"""Plugin stages on real daemons: the worker process, edges with programs, and every bad input named."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytest

from dpipes.nodes.plugins.spec import POOLED_FLAG
from tests.nodes.daemons import Daemon, daemons, dpipes, start_dpipes
from tests.nodes.plugins.workers import SALES, install_plugins, rows
from tests.procs import children_of

WAIT_S = 30.0


def workers_of(pid: int, *, idle: bool = False) -> list[int]:
    """The plugin workers among a daemon's children that run a stage (``idle``: those started
    ahead of need and waiting for one, named ``dpipes-ready``)."""
    found = []
    for child in children_of(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{child}/comm", "rb") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if b"dpipes.nodes.plugins.worker" not in argv:
            continue
        waiting = POOLED_FLAG.encode() in argv and comm != b"dpipes-worker"
        if waiting == idle:
            found.append(child)
    return found


async def no_workers_left(pid: int) -> None:
    """Wait until none of daemon ``pid``'s plugin workers runs a stage. A run may end a few
    milliseconds before its worker is gone: the node reports a stage from the code its worker
    announces just before it exits (``dpipes.nodes.plugins.worker``), and reaps it after."""

    async def gone() -> None:
        while workers_of(pid):
            await asyncio.sleep(0.01)

    try:
        await asyncio.wait_for(gone(), WAIT_S)
    except TimeoutError:
        left = workers_of(pid)
        raise AssertionError(f"plugin workers {left} still run a stage {WAIT_S:g} s after their run") from None


async def test_program_to_plugin_to_plugin_across_two_daemons(rt: Path) -> None:
    sales = rt.parent / "sales.csv"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        pipeline = f'cat {sales} | %filter@beta expr="amount > 100" | %summarize by=region agg=amount:sum'
        out = await dpipes(rt, "--node", alpha.host_port, "--status", pipeline)
        assert out.code == 0, out.stderr
        assert rows(out.stdout) == [
            {"region": "east", "amount_sum": "300"},
            {"region": "north", "amount_sum": "320"},
            {"region": "south", "amount_sum": "150"},
        ]
        assert "INFO filter kept 4 of 6 rows" in out.stderr  # io.info reached the client as Pipes
        assert "stage 1 %filter@beta: exit 0" in out.stderr


async def test_plugin_between_programs_and_on_stdin(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        out = await dpipes(
            rt, "--node", alpha.host_port, "%filter@beta expr='amount >= 150' | sort -r", input=SALES.encode()
        )
        assert out.code == 0, out.stderr
        assert out.stdout.decode().splitlines() == ['"south",150', '"region","amount"', '"north",200', '"east",300']


async def test_an_input_plugin_first_and_arrow_ipc_to_a_program(rt: Path) -> None:
    reader = (
        "import sys, pyarrow.ipc as i; t = i.open_stream(sys.stdin.buffer).read_all(); "
        "print(t.num_rows, sum(t[\"n\"].to_pylist()))"
    )
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        out = await dpipes(
            rt, "--node", alpha.host_port, "--arrow", f"%generate@beta rows=1000 batch_rows=64 | python3 -c '{reader}'"
        )
        assert out.code == 0, out.stderr
        assert out.stdout.decode().split() == ["1000", str(sum(range(1000)))]


def test_output_frames_keep_what_each_writer_wrote_when_it_wrote_it() -> None:
    # The IPC writer hands over a batch's own buffers (sent zero-copy); the CSV writer refills one
    # buffer of its own for every batch, so each CSV block is copied before the next is written.
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from dpipes.nodes.plugins.edges import open_writer
    from dpipes.nodes.plugins.worker import _Collector

    first, second = (pa.table({"s": [c * 100] * 2000}).to_batches()[0] for c in "ab")
    csv_out = _Collector(share=False)
    writer = open_writer("csv", csv_out, first.schema)
    taken = []
    for batch in (first, second):
        writer.write(batch)
        taken.append(csv_out.take())  # sent later, by the loop: the next write comes first
    first_block = b"".join(bytes(frame) for frame in taken[0])
    assert first_block.splitlines()[1:] == [b'"' + b"a" * 100 + b'"'] * 2000
    ipc_out = _Collector(share=True)
    writer = open_writer("arrow", ipc_out, first.schema)
    frames = []
    for batch in (first, second):
        writer.write(batch)
        frames += ipc_out.take()
    writer.close()
    frames += ipc_out.take()
    assert any(isinstance(frame, pa.Buffer) for frame in frames)  # shared, not copied
    stream = pa.py_buffer(b"".join(bytes(frame) for frame in frames))
    assert ipc.open_stream(stream).read_all().equals(pa.Table.from_batches([first, second]))


async def test_json_mode_plugin_takes_and_gives_objects(rt: Path) -> None:
    lines = b"".join(json.dumps({"k": k, "v": v}).encode() + b"\n" for k, v in [("a", 1), ("b", 5), ("a", 7)])
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        pipeline = "cat | %filter@beta expr='v > 2' | cat"
        out = await dpipes(rt, "--node", alpha.host_port, "--json", pipeline, input=lines)
        assert out.code == 0, out.stderr
        objects = [json.loads(line) for line in out.stdout.splitlines()]
        assert [(o["k"], o["v"]) for o in objects] == [("b", 5), ("a", 7)]


async def test_dpipes_nodes_lists_plugins_and_placement_uses_them(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        listing = await dpipes(rt, "--node", alpha.host_port, "--nodes", "--json")
        entries = {n["name"]: n for n in map(json.loads, listing.stdout.splitlines())}
        assert "%filter" in entries["beta"]["programs"] and "%summarize" in entries["alpha"]["programs"]
        assert entries["beta"]["plugin_versions"]["filter"] == "0.1.0"
        assert entries["alpha"]["plugin_versions"]["stuck"] == "1.0"
        table = await dpipes(rt, "--node", alpha.host_port, "--nodes")
        assert "%filter=0.1.0" in table.stdout.decode()
        sales = rt.parent / "sales.csv"  # unpinned: placed on a node that offers it (here, both do)
        out = await dpipes(rt, "--node", alpha.host_port, "--status", f"cat {sales} | %filter expr='amount > 0'")
        assert out.code == 0 and "stage 1 %filter@alpha: exit 0" in out.stderr, out.stderr


# -- bad input: each named, non-zero, no orphan worker ------------------------------------------


async def test_missing_entry_point_is_refused_before_anything_starts(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        out = await dpipes(rt, "--node", alpha.host_port, "seq 3 | %nosuch@beta")
        assert out.code != 0
        assert "stage 1 (%nosuch@beta)" in out.stderr and "plugin 'nosuch' is not installed on node beta" in out.stderr
        assert out.stdout == b"" and workers_of(beta.proc.pid) == [] and beta.children() == []


async def test_csv_that_does_not_parse_names_stage_node_plugin_and_line(rt: Path) -> None:
    bad = b"a,b\n1,2\n3,4,5\n"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        out = await dpipes(rt, "--node", alpha.host_port, "cat | %filter@beta expr='a > 0' | cat", input=bad)
        assert out.code != 0
        assert "stage 1 (%filter@beta)" in out.stderr and "plugin filter" in out.stderr
        assert "CSV does not parse: line 3 has 3 fields" in out.stderr
        assert out.stdout == b""  # not the rows before the bad line, passed off as the whole
        await no_workers_left(beta.proc.pid)


async def test_an_input_whose_types_change_mid_stream_is_named_not_passed_on(rt: Path) -> None:
    # The first block (1 MiB) fixes the column as integers; a later row is text.
    data = b"n\n" + b"12345\n" * 300_000 + b"twelve\n"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        out = await dpipes(rt, "--node", alpha.host_port, "cat | %passthrough@beta | wc -l", input=data)
        assert out.code != 0
        assert "stage 1 (%passthrough@beta): plugin passthrough: input 'Input'" in out.stderr
        assert "CSV does not parse: after" in out.stderr
        assert out.stdout == b""  # wc never saw an end of input: the run was cancelled, not completed
        await no_workers_left(beta.proc.pid)


@pytest.mark.parametrize(
    ("plugin", "says"),
    [
        ("astray", "no outgoing anchor 'Nowhere'"),
        ("shifty", "outgoing anchor 'Output' changed schema mid-stream"),
        ("raises", "raised ZeroDivisionError: the plugin's own bug"),
    ],
)
async def test_a_broken_plugin_fails_its_stage_by_name(rt: Path, plugin: str, says: str) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        out = await dpipes(rt, "--node", alpha.host_port, f"seq 5 | %{plugin}@beta | cat", input=b"n\n1\n2\n")
        assert out.code != 0
        assert f"stage 1 (%{plugin}@beta): plugin {plugin}" in out.stderr and says in out.stderr
        await no_workers_left(beta.proc.pid)


async def test_a_callback_that_never_returns_is_bounded_by_the_configured_timeout(rt: Path) -> None:
    config = rt.parent / "beta.toml"
    config.write_text("[limits]\nplugin_callback_s = 2\n")
    async with daemons(rt, ["alpha", "beta"], extra={"beta": ["--config", str(config)]}) as (alpha, beta):
        out = await dpipes(rt, "--node", alpha.host_port, "seq 5 | %stuck@beta | cat")
        assert out.code != 0
        assert "stage 1 (%stuck@beta): plugin stuck" in out.stderr and "did not return within 2 s" in out.stderr
        await no_workers_left(beta.proc.pid)


async def run_killing_its_worker(rt: Path, entry: Daemon, node: Daemon, pipeline: str) -> str:
    """Start ``pipeline`` through ``entry``, SIGKILL the first plugin worker ``node`` runs for it;
    the client's stderr, once it ended non-zero."""
    proc = await start_dpipes(rt, "--node", entry.host_port, pipeline)

    async def worker() -> int:
        while not (found := workers_of(node.proc.pid)):
            await asyncio.sleep(0.02)
        return found[0]

    os.kill(await asyncio.wait_for(worker(), WAIT_S), signal.SIGKILL)
    _out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode != 0
    return err.decode()


async def test_a_worker_killed_with_sigkill_fails_the_run_and_leaves_nothing(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        err = await run_killing_its_worker(rt, alpha, beta, "seq 5 | %stuck@beta | cat")
        assert "stage 1 %stuck@beta: killed by SIGKILL (plugin stuck worker killed by SIGKILL" in err
        await no_workers_left(beta.proc.pid)


async def kill_when_stalling(
    alpha: Daemon, beta: Daemon, options: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, bytes, bytes]:
    """Run ``options`` through ``alpha`` in this process; once beta's ``%stalls`` worker has said so
    (its Pipes stream to us and its outputs are open), SIGKILL it. The result, stdout and stderr,
    within ``WAIT_S``: a client that waited for a stream the worker left open would take longer."""
    from dpipes.nodes import run as client

    monkeypatch.setattr(client, "CANCEL_WAIT_S", 10 * WAIT_S)
    said = asyncio.Event()

    def on_pipes(stage: int, message: Any) -> None:
        if (message.get("params") or {}).get("message") == "stalling":
            said.set()

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        running = asyncio.ensure_future(
            client.run_pipeline(
                alpha.tcp,
                options,
                stdin_fd=-1,
                stdout_fd=out.fileno(),
                stderr_fd=err.fileno(),
                on_pipes=on_pipes,
                handle_sigint=False,
            )
        )
        await asyncio.wait_for(said.wait(), WAIT_S)
        [worker] = workers_of(beta.proc.pid)
        os.kill(worker, signal.SIGKILL)
        result = await asyncio.wait_for(running, WAIT_S)
        out.seek(0)
        err.seek(0)
        return result, out.read(), err.read()


async def test_a_worker_killed_mid_output_has_every_stream_it_opened_ended_by_its_node(
    rt: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Killed holding its output and its Pipes stream to the client open: its node cancels both,
    # naming the stage, so the client ends as soon as the reports are in, not after a wait.
    from dpipes.nodes.run import RunOptions

    caplog.set_level(logging.DEBUG, logger="dpipes.nodes.run")
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        options = RunOptions("seq 5 | %stalls@beta | wc -l")
        result, out, _err = await kill_when_stalling(alpha, beta, options, monkeypatch)
        assert out == b""  # wc never saw an end of its input: no count of a part passed off as whole
        assert result.exit_code != 0
        assert "plugin stalls worker killed by SIGKILL" in result.stages[1].describe()
        reason = "cancelled: stage 1 (%stalls@beta) failed: plugin stalls worker killed by SIGKILL"
        assert any(reason in r.getMessage() for r in caplog.records)  # ended with the error, not cleanly
        await no_workers_left(beta.proc.pid)


async def test_a_reader_that_stops_early_ends_a_plugin_as_sigpipe_without_an_error(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        pipeline = "%generate@beta rows=100000000 | head -n 2"
        out = await dpipes(rt, "--node", alpha.host_port, "--status", pipeline)
        assert out.code == 0, out.stderr  # as `yes | head` in a shell
        assert out.stdout.decode().splitlines() == ['"n","square"', "0,0"]
        assert "stage 0 %generate@beta: killed by SIGPIPE (its reader finished early)" in out.stderr
        assert "ERROR" not in out.stderr and "Traceback" not in out.stderr  # no bug of the plugin's to report
        await no_workers_left(beta.proc.pid)


async def test_plugin_progress_reaches_the_client_as_pipes_messages(rt: Path) -> None:
    record = rt.parent / "pipes.jsonl"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        pipeline = "%generate rows=20000 batch_rows=500 | %passthrough@beta expected_rows=20000 | wc -l"
        out = await dpipes(rt, "--node", alpha.host_port, "--pipes-json", str(record), pipeline)
        assert out.code == 0, out.stderr
        assert out.stdout.split() == [b"20001"]
    from dpipes.nodes.progress import progress_of

    lines = [json.loads(line) for line in record.read_text().splitlines()]
    messages = [item["message"] for item in lines if item.get("stage") == 1 and "message" in item]
    fractions = [f for f in map(progress_of, messages) if f is not None]
    assert len(fractions) > 2 and fractions == sorted(fractions) and fractions[-1] == 1.0


# -- the README's walkthrough, as written -------------------------------------------------------


def readme_section() -> str:
    text = (Path(__file__).parents[3] / "README.md").read_text()
    section = text[text.index("\n## Writing a plugin\n") :]
    return section[: section.index("\n## ", 1)]


async def test_the_readme_walkthrough_runs_a_new_plugin_from_another_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import yaml

    from dpipes.nodes.plugins.scaffold import new_plugin

    site = install_plugins(tmp_path / "site", monkeypatch)
    package = new_plugin("upper", tmp_path / "dpipes-plugin-upper")  # `dpipes plugin new upper`
    dist = site / "dpipes_plugin_upper-0.1.0.dist-info"  # what `pip install` leaves for the node to find
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dpipes-plugin-upper\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[dpipes.plugins]\nupper = dpipes_plugin_upper.plugin:Upper\n")
    monkeypatch.setenv("PYTHONPATH", f"{os.environ['PYTHONPATH']}:{package}")
    rt = tmp_path / "run"
    rt.mkdir(mode=0o700)
    section = readme_section()
    assert "printf 'name,n\\nada,1\\nbob,2\\n' | dpipes '%upper@beta tag=seen | sort'" in section
    flow = tmp_path / "split.yaml"
    flow.write_text(section.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert "True" in yaml.safe_load(flow.read_text())["connections"][0]["from"]
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        names = b"name,n\nada,1\nbob,2\n"
        out = await dpipes(rt, "--node", alpha.host_port, "%upper@beta tag=seen | sort", input=names)
        assert out.code == 0, out.stderr
        assert out.stdout.decode().splitlines() == ['"ada",1,"seen"', '"bob",2,"seen"', '"name","n","tag"']
        out = await dpipes(rt, "--node", alpha.host_port, "--workflow", str(flow), input=SALES.encode())
        assert out.code == 0, out.stderr
        assert rows(out.stdout) == [
            {"region": "south", "amount": "150", "tag": "big"},
            {"region": "north", "amount": "200", "tag": "big"},
            {"region": "east", "amount": "300", "tag": "big"},
            {"region": "north", "amount": "120", "tag": "big"},
        ]
        assert "3\n" in out.stderr  # the small side: a header and two rows, counted by wc -l


async def test_megabytes_of_arrow_through_a_plugin_come_out_as_they_went_in(rt: Path) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    rows = 400_000  # ~10 MB: more than a stream's credit window and the worker's read-ahead
    table = pa.table({"n": pa.array(range(rows), pa.int64()), "s": pa.array([f"r{i % 977}" for i in range(rows)])})
    data = rt.parent / "table.arrows"
    with open(data, "wb") as f, ipc.new_stream(f, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=50_000):
            writer.write_batch(batch)
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        out = await dpipes(rt, "--node", alpha.host_port, "--arrow", f"cat {data} | %passthrough@beta | cat")
        assert out.code == 0, out.stderr
        assert ipc.open_stream(pa.BufferReader(out.stdout)).read_all().equals(table)
        # The same from this host's daemon: dpipes' short path keeps --arrow, and hands over its stdout.
        out = await dpipes(rt, "--arrow", f"cat@alpha {data} | %passthrough@beta | cat@alpha")
        assert out.code == 0, out.stderr
        assert ipc.open_stream(pa.BufferReader(out.stdout)).read_all().equals(table)


def test_a_gathered_read_reuses_a_buffer_only_once_nothing_refers_to_it() -> None:
    import pyarrow as pa

    from dpipes.nodes.plugins.worker import _GatherBuffers

    gather = _GatherBuffers(keep_bytes=4 << 20)
    first = gather.take(1_800_000)
    address = pa.py_buffer(first).address
    held = pa.py_buffer(first[1000:])  # what a batch keeps of it: a view of a slice
    del first
    second = gather.take(1_800_000)
    assert pa.py_buffer(second).address != address  # the first is still referred to
    del held, second
    assert pa.py_buffer(gather.take(1_000_000)).address == address  # released: taken again
    beyond = [gather.take(1_800_000) for _ in range(4)]  # past keep_bytes: taken, not kept
    assert gather.kept_bytes <= 4 << 20 and len({pa.py_buffer(b).address for b in beyond}) == 4


def _a_stream_of_batches() -> tuple[Any, Any]:
    """A 300k-row table and its Arrow IPC stream (one buffer) in batches of ~0.5-0.8 MB bodies."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    table = pa.table({"n": pa.array(range(300_000), pa.int64()), "s": [f"row {i % 997}" for i in range(300_000)]})
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=40_000):
            writer.write_batch(batch)
    return table, sink.getvalue()


def test_a_feed_gathers_batches_across_chunks_intact_however_long_they_are_held() -> None:
    # Batch bodies span the chunks they arrive in: each is gathered into a buffer that a later
    # batch may reuse only once nothing refers to it; those held to the end must stay as they were.

    from dpipes.nodes.plugins.edges import read_batches
    from dpipes.nodes.plugins.worker import _Feed

    table, whole = _a_stream_of_batches()
    stream = whole.to_pybytes()
    chunk = 300_007  # odd: bodies start anywhere in a chunk, most span two or more

    class Chunks:
        def __init__(self) -> None:
            self.items: list[bytes | None] = [stream[at : at + chunk] for at in range(0, len(stream), chunk)] + [None]

        def get(self) -> bytes | None:
            return self.items.pop(0)

    held, rows = [], 0
    feed = _Feed(Chunks())  # type: ignore[arg-type]
    assert feed.peek()
    for i, batch in enumerate(read_batches("arrow", feed)):
        assert batch.equals(table.slice(rows, batch.num_rows).to_batches()[0])
        rows += batch.num_rows
        if i % 2:
            held.append((rows - batch.num_rows, batch))  # the others are dropped: their buffers reused
    assert rows == table.num_rows
    for start, batch in held:
        assert batch.equals(table.slice(start, batch.num_rows).to_batches()[0])


def test_a_feed_reads_batches_across_chunks_that_lie_end_to_end_in_place() -> None:
    # A stream's chunks from another node lie end to end in the hub's shared memory: a body that
    # spans them is one view over them, not a copy; where two chunks lie apart it is gathered.
    import pyarrow as pa

    from dpipes.nodes.plugins.edges import read_batches
    from dpipes.nodes.plugins.worker import _Feed

    table, stream = _a_stream_of_batches()  # one buffer: its slices lie end to end
    start, end = stream.address, stream.address + stream.size
    chunk = 300_007

    def in_place(batch: pa.RecordBatch) -> bool:
        return all(start <= b.address < end for column in batch.columns for b in column.buffers() if b is not None)

    class Chunks:
        def __init__(self, items: list[memoryview | bytes | None]) -> None:
            self.items = items

        def get(self) -> memoryview | bytes | None:
            return self.items.pop(0)

    small = _Feed(Chunks([b"abc", b"def", None]))  # type: ignore[arg-type]
    into = bytearray(4)
    assert small.readinto(into) == 4 and into == b"abcd"  # a reader's readinto, across chunks too

    for apart in (None, 3):  # every chunk in place; every third one a copy lying elsewhere
        views = [memoryview(stream)[at : at + chunk] for at in range(0, stream.size, chunk)]
        items = [bytes(v) if apart and i % apart == 2 else v for i, v in enumerate(views)]
        feed = _Feed(Chunks([*items, None]))  # type: ignore[arg-type]
        rows, copied = 0, 0
        for batch in read_batches("arrow", feed):
            assert batch.equals(table.slice(rows, batch.num_rows).to_batches()[0])
            rows += batch.num_rows
            copied += not in_place(batch)
            assert len(feed._chunks) <= 4  # what it reads now lies in these; none behind it stays pinned
        assert rows == table.num_rows
        assert copied == 0 if apart is None else copied > 0


def test_a_plugin_writes_ahead_of_its_sender_by_batches_and_by_bytes() -> None:
    from dpipes.nodes.plugins.worker import SEND_AHEAD_BATCHES, SEND_AHEAD_BYTES, _too_far_ahead

    assert not _too_far_ahead(0, 0, 10 * SEND_AHEAD_BYTES)  # nothing unsent: even a huge batch goes
    assert not _too_far_ahead(SEND_AHEAD_BATCHES - 1, 1000, 100)  # small batches: up to the count
    assert _too_far_ahead(SEND_AHEAD_BATCHES, 1000, 100)
    assert not _too_far_ahead(3, SEND_AHEAD_BYTES // 2, SEND_AHEAD_BYTES // 2)
    assert _too_far_ahead(3, SEND_AHEAD_BYTES // 2, SEND_AHEAD_BYTES // 2 + 1)  # large ones: up to the bytes
