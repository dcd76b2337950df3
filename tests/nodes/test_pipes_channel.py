"""Pipes channels against real external processes: unmodified dagster-pipes programs and Node.js."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import stat
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpipes.bus.pipes import PIPES_METADATA_TYPES, decode_bootstrap, load_pipes_schema
from dpipes.nodes import pipes_readers as pipes_module
from dpipes.nodes.pipes import (
    PipesBadLine,
    PipesBootstrapError,
    PipesFifoReader,
    PipesLine,
    PipesLineSplitter,
    PipesRecord,
    PipesStdioRecord,
    PipesStdioSplitter,
    PipesTextLine,
    bootstrap_env,
    make_context_data,
)

CHILD_TIMEOUT_S = 30.0  # generous for a loaded 2-core machine; a healthy run takes about a second
EVENT_TIMEOUT_S = 10.0
NODE_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "pipes_node" / "pipes_example.js"
CONTEXT = make_context_data(run_id="run-42", asset_keys=["my_asset"], extras={"count": 10})

# An unmodified dagster-pipes program; argv[1] picks what it does.
CHILD = textwrap.dedent(
    """
    import json, os, sys
    from dagster_pipes import decode_param, open_dagster_pipes

    scenario = sys.argv[1]
    METADATA = json.loads(sys.argv[2]) if len(sys.argv) > 2 else None

    def raw_write(text):
        path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)

    with open_dagster_pipes() as pipes:
        if scenario == "all":
            for level in ("debug", "info", "warning", "error", "critical"):
                getattr(pipes.log, level)("a %s line", level)
            pipes.report_asset_materialization(metadata=METADATA, data_version="v1")
            pipes.report_asset_check("positive", passed=True, metadata={"n": {"raw_value": 3, "type": "int"}})
            pipes.report_custom_message({"step": 1})
            pipes.report_custom_message(["two", None])
            pipes.log_external_stream("stdout", "external text\\n", {"k": "v"})
            pipes.log.info("extras=%s run=%s asset=%s", pipes.extras, pipes.run_id, pipes.asset_key)
        elif scenario == "many":
            for i in range(10_000):
                pipes.log.info("log %d", i)
                pipes.report_custom_message(i)
        elif scenario == "big":
            pipes.report_custom_message("x" * (1 << 20))
            pipes.report_custom_message({"blob": "y" * (1 << 20), "n": 1})
        elif scenario == "raise":
            pipes.log.info("about to fail")
            raise ValueError("boom")
        elif scenario == "malformed":
            pipes.log.info("before")
            raw_write("this is not json\\n")
            pipes.log.info("after")
            raw_write("z" * 100_000 + "\\n")
            pipes.report_custom_message("last")
        elif scenario == "live":
            pipes.log.info("first")
            sys.stdin.readline()  # the test answers only once it has received "first"
            pipes.log.info("second")
        elif scenario == "stdio":
            print("plain text before", file=sys.stderr, flush=True)
            pipes.log.info("a message")
            print('{"json": "but not pipes"}', file=sys.stderr, flush=True)
            print("", file=sys.stderr, flush=True)
            pipes.report_custom_message({"k": 1})
            sys.stderr.write('{"__dagster_pipes_version": "0.1", "method": "nope"}\\n')
            print("plain text after", file=sys.stderr, flush=True)
        elif scenario == "tee":
            print("captured stdout line", flush=True)
            pipes.log.info("between")
    """
)

ALL_METADATA: dict[str, Any] = {
    "infer_int": 1,
    "infer_float": 1.5,
    "infer_str": "s",
    "infer_list": [1, "a"],
    "infer_none": None,
    "infer_bool": True,
    "text": {"raw_value": "hello", "type": "text"},
    "url": {"raw_value": "https://example.invalid/x", "type": "url"},
    "path": {"raw_value": "data/out.csv", "type": "path"},
    "notebook": {"raw_value": "nb.ipynb", "type": "notebook"},
    "json": {"raw_value": {"a": [1, 2]}, "type": "json"},
    "md": {"raw_value": "# Title", "type": "md"},
    "float": {"raw_value": 0.5, "type": "float"},
    "int": {"raw_value": 3, "type": "int"},
    "bool": {"raw_value": False, "type": "bool"},
    "dagster_run": {"raw_value": "0123-abcd", "type": "dagster_run"},
    "asset": {"raw_value": "a/b", "type": "asset"},
    "null": {"raw_value": None, "type": "null"},
    "table": {
        "raw_value": {"records": [{"a": 1}], "schema": [{"name": "a", "type": "int"}]},
        "type": "table",
    },
    "table_schema": {"raw_value": {"columns": [{"name": "a", "type": "int"}]}, "type": "table_schema"},
    "table_column_lineage": {
        "raw_value": {"deps_by_column": {"a": [{"asset_key": "up", "column_name": "x"}]}},
        "type": "table_column_lineage",
    },
    "timestamp": {"raw_value": 1_700_000_000.25, "type": "timestamp"},
}


@pytest.fixture
def child_script(tmp_path: Path) -> str:
    path = tmp_path / "pipes_child.py"
    path.write_text(CHILD)
    return str(path)


@asynccontextmanager
async def spawned(
    *argv: str, env: dict[str, str], stdin: int = asyncio.subprocess.DEVNULL
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start a child; whatever happens, kill it if it still runs and reap it."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **env},
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.communicate()


async def run_with_fifo(
    tmp_path: Path, argv: list[str], **bootstrap: Any
) -> tuple[list[PipesRecord], int, bytes, PipesFifoReader]:
    """Run a Pipes program on the FIFO channel; return every record, its status and its stderr."""
    records: list[PipesRecord] = []
    with bootstrap_env(CONTEXT, tmpdir=tmp_path, **bootstrap) as boot:
        reader = boot.channel
        async with reader, spawned(*argv, env=boot.env) as proc:

            async def consume() -> None:
                async for record in reader:
                    records.append(record)

            consumer = asyncio.create_task(consume())
            _, stderr = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT_S)
            assert await reader.drain(timeout_s=EVENT_TIMEOUT_S)
            await asyncio.wait_for(consumer, EVENT_TIMEOUT_S)
        fifo = reader.path
    assert not Path(fifo).exists() and not Path(boot.directory).exists()  # noqa: ASYNC240  # close removed all
    assert proc.returncode is not None
    return records, proc.returncode, stderr, reader


def messages(records: list[Any]) -> list[Any]:
    assert all(isinstance(r, PipesLine) for r in records), [str(r) for r in records if not isinstance(r, PipesLine)]
    return [r.message for r in records]


# ---------------------------------------------------------------------------------- python children


@pytest.mark.parametrize("context_injector", ["env", "file"])
async def test_every_method_arrives_in_order(tmp_path: Path, child_script: str, context_injector: str) -> None:
    argv = [sys.executable, child_script, "all", json.dumps(ALL_METADATA)]
    records, rc, stderr, _ = await run_with_fifo(tmp_path, argv, context_injector=context_injector)
    assert rc == 0, stderr.decode()
    msgs = messages(records)
    assert [m.method for m in msgs] == [
        "opened",
        *["log"] * 5,
        "report_asset_materialization",
        "report_asset_check",
        "report_custom_message",
        "report_custom_message",
        "log_external_stream",
        "log",
        "closed",
    ]
    assert [r.line_no for r in records] == list(range(1, len(records) + 1))
    assert [m.params["level"] for m in msgs[1:6]] == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    assert msgs[1].params["message"] == "a debug line"
    mat = msgs[6].params
    assert mat["asset_key"] == "my_asset" and mat["data_version"] == "v1"
    assert {v["type"] for v in mat["metadata"].values()} == PIPES_METADATA_TYPES
    assert mat["metadata"]["infer_list"] == {"raw_value": [1, "a"], "type": "__infer__"}
    assert msgs[7].params == {
        "asset_key": "my_asset",
        "check_name": "positive",
        "passed": True,
        "metadata": {"n": {"raw_value": 3, "type": "int"}},
        "severity": "ERROR",
    }
    assert [m.params["payload"] for m in msgs[8:10]] == [{"step": 1}, ["two", None]]
    assert msgs[10].params == {"stream": "stdout", "text": "external text\n", "extras": {"k": "v"}}
    assert msgs[11].params["message"] == "extras={'count': 10} run=run-42 asset=my_asset"
    assert msgs[12].params == {}
    validator = _validator()
    for m in msgs:
        validator.validate(m.raw)


async def test_messages_arrive_as_they_are_written(tmp_path: Path, child_script: str) -> None:
    got: list[PipesRecord] = []
    first = asyncio.Event()

    def on_record(record: PipesRecord) -> None:
        got.append(record)
        if isinstance(record, PipesLine) and record.message.params.get("message") == "first":
            first.set()

    with bootstrap_env(CONTEXT, tmpdir=tmp_path, on_record=on_record) as boot:
        async with boot.channel as reader:
            argv = [sys.executable, child_script, "live"]
            async with spawned(*argv, env=boot.env, stdin=asyncio.subprocess.PIPE) as proc:
                # The child is blocked on its stdin until we answer: "first" must already be here.
                await asyncio.wait_for(first.wait(), EVENT_TIMEOUT_S)
                assert proc.returncode is None
                assert [r.message.method for r in got if isinstance(r, PipesLine)] == ["opened", "log"]
                _, stderr = await asyncio.wait_for(proc.communicate(b"go\n"), CHILD_TIMEOUT_S)
                assert proc.returncode == 0, stderr.decode()
            assert await reader.drain()
    assert [r.message.params.get("message") for r in got if isinstance(r, PipesLine)] == [
        None,
        "first",
        "second",
        None,
    ]


async def test_ten_thousand_logs_and_custom_messages_in_order(tmp_path: Path, child_script: str) -> None:
    records, rc, stderr, _ = await run_with_fifo(tmp_path, [sys.executable, child_script, "many"])
    assert rc == 0, stderr.decode()
    msgs = messages(records)
    assert len(msgs) == 20_002
    assert msgs[0].method == "opened" and msgs[-1].method == "closed"
    body = msgs[1:-1]
    assert [m.params["message"] for m in body[0::2]] == [f"log {i}" for i in range(10_000)]
    assert [m.params["payload"] for m in body[1::2]] == list(range(10_000))


async def test_one_mebibyte_payloads(tmp_path: Path, child_script: str) -> None:
    records, rc, stderr, _ = await run_with_fifo(tmp_path, [sys.executable, child_script, "big"])
    assert rc == 0, stderr.decode()
    msgs = messages(records)
    assert [m.method for m in msgs] == ["opened", "report_custom_message", "report_custom_message", "closed"]
    assert msgs[1].params["payload"] == "x" * (1 << 20)
    assert isinstance(records[1], PipesLine) and records[1].size == len(json.dumps(msgs[1].raw))
    assert msgs[2].params["payload"] == {"blob": "y" * (1 << 20), "n": 1}


async def test_exception_is_reported_in_closed(tmp_path: Path, child_script: str) -> None:
    records, rc, stderr, _ = await run_with_fifo(tmp_path, [sys.executable, child_script, "raise"])
    assert rc == 1
    assert b"ValueError: boom" in stderr  # the exception still propagates after `closed`
    msgs = messages(records)
    assert [m.method for m in msgs] == ["opened", "log", "closed"]
    exc = msgs[-1].params["exception"]
    assert exc["name"] == "ValueError"
    assert exc["message"] == "ValueError: boom\n"
    assert any("raise ValueError" in frame for frame in exc["stack"])
    assert exc["cause"] is None and exc["context"] is None


async def test_malformed_and_overlong_lines_are_reported_and_reading_goes_on(tmp_path: Path, child_script: str) -> None:
    argv = [sys.executable, child_script, "malformed"]
    records, rc, stderr, reader = await run_with_fifo(tmp_path, argv, max_line_bytes=64 * 1024)
    assert rc == 0, stderr.decode()
    assert [type(r).__name__ for r in records] == [
        "PipesLine",
        "PipesLine",
        "PipesBadLine",
        "PipesLine",
        "PipesBadLine",
        "PipesLine",
        "PipesLine",
    ]
    assert [r.line_no for r in records] == [1, 2, 3, 4, 5, 6, 7]
    bad, overlong = records[2], records[4]
    assert isinstance(bad, PipesBadLine) and isinstance(overlong, PipesBadLine)
    assert "not JSON" in str(bad.error) and bad.head == b"this is not json"
    assert str(bad).startswith("Pipes message line 3:")
    assert "exceeds the 65536-byte limit" in str(overlong.error) and overlong.head.startswith(b"zzz")
    after = [r.message for r in records if isinstance(r, PipesLine)]
    assert [m.params.get("message", m.params.get("payload")) for m in after[1:4]] == [
        "before",
        "after",
        "last",
    ]
    assert after[-1].method == "closed"
    assert reader.lines_seen == 7


async def test_include_stdio_in_messages_forwards_output_as_external_stream(tmp_path: Path, child_script: str) -> None:
    argv = [sys.executable, child_script, "tee"]
    records, rc, stderr, _ = await run_with_fifo(tmp_path, argv, include_stdio_in_messages=True)
    assert rc == 0, stderr.decode()
    msgs = messages(records)
    methods = [m.method for m in msgs]
    assert methods[0] == "opened" and "closed" in methods
    streamed = "".join(m.params["text"] for m in msgs if m.method == "log_external_stream")
    assert "captured stdout line" in streamed
    # dagster-pipes writes `closed` before it stops capturing: stream messages may follow it.
    assert methods.index("log") < methods.index("closed")


async def test_stderr_channel_separates_messages_from_text(tmp_path: Path, child_script: str) -> None:
    with bootstrap_env(CONTEXT, tmpdir=tmp_path, messages_channel="stderr") as boot:
        splitter = boot.channel
        assert decode_bootstrap(boot.env["DAGSTER_PIPES_MESSAGES"]) == {"stdio": "stderr"}
        records: list[PipesStdioRecord] = []
        async with spawned(sys.executable, child_script, "stdio", env=boot.env) as proc:
            assert proc.stderr is not None
            while chunk := await asyncio.wait_for(proc.stderr.read(4096), CHILD_TIMEOUT_S):
                records += splitter.feed(chunk)
            records += splitter.end()
            assert await asyncio.wait_for(proc.wait(), CHILD_TIMEOUT_S) == 0
    kinds = [(type(r).__name__, r.line_no) for r in records]
    assert kinds == [
        ("PipesLine", 1),
        ("PipesTextLine", 2),
        ("PipesLine", 3),
        ("PipesTextLine", 4),
        ("PipesTextLine", 5),
        ("PipesLine", 6),
        ("PipesBadLine", 7),
        ("PipesTextLine", 8),
        ("PipesLine", 9),
    ]
    texts = [r.text for r in records if isinstance(r, PipesTextLine)]
    assert texts == [b"plain text before", b'{"json": "but not pipes"}', b"", b"plain text after"]
    bad = records[6]
    assert isinstance(bad, PipesBadLine) and "unknown method 'nope'" in str(bad.error)
    assert [r.message.method for r in records if isinstance(r, PipesLine)] == [
        "opened",
        "log",
        "report_custom_message",
        "closed",
    ]


# --------------------------------------------------------------------------------------------- node


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    return node


def _check_node_messages(msgs: list[Any], *, asset: str = "my_asset") -> None:
    assert [m.method for m in msgs] == [
        "opened",
        "log",
        "report_asset_materialization",
        "report_asset_check",
        "closed",
    ]
    assert msgs[1].params == {"message": f"computing 10 squares for {asset} (run run-42)", "level": "INFO"}
    mat = msgs[2].params
    assert mat["asset_key"] == asset and mat["data_version"] == "285"
    assert mat["metadata"]["row_count"] == {"raw_value": 10, "type": "int"}
    assert mat["metadata"]["first_rows"]["type"] == "table"
    assert msgs[3].params["passed"] is True and msgs[3].params["severity"] == "ERROR"
    validator = _validator()
    for m in msgs:
        validator.validate(m.raw)


async def test_node_example_over_the_fifo(tmp_path: Path) -> None:
    argv = [_node(), str(NODE_EXAMPLE)]
    records, rc, stderr, _ = await run_with_fifo(tmp_path, argv, context_injector="file")
    assert rc == 0, stderr.decode()
    msgs = messages(records)
    _check_node_messages(msgs)
    assert msgs[-1].params == {}


async def test_node_example_over_stderr_and_failing(tmp_path: Path) -> None:
    context = make_context_data(run_id="run-42", asset_keys=["my_asset"], extras={"count": 10, "fail": "no disk"})
    with bootstrap_env(context, tmpdir=tmp_path, messages_channel="stderr") as boot:
        async with spawned(_node(), str(NODE_EXAMPLE), env=boot.env) as proc:
            _, stderr = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT_S)
        records = boot.channel.split_lines(stderr.splitlines())
    assert proc.returncode == 1
    msgs = messages(records)
    _check_node_messages(msgs)
    exc = msgs[-1].params["exception"]
    assert exc["name"] == "Error" and exc["message"] == "no disk"
    assert exc["stack"][0] == "Error: no disk"


# ----------------------------------------------------------------------------------- sans-IO parts


def _pipes_line(method: str, params: Any) -> bytes:
    return json.dumps({"__dagster_pipes_version": "0.1", "method": method, "params": params}).encode()


STREAM = b"\n".join(
    [
        _pipes_line("opened", {"extras": {}}),
        b"",
        b"garbage",
        b"w" * 300,
        _pipes_line("log", {"message": "x" * 50, "level": "INFO"}),
        _pipes_line("report_custom_message", {"payload": "p" * 400}),
        _pipes_line("closed", {}),
    ]
)


def _summary(records: list[PipesStdioRecord]) -> list[tuple[str, int, object]]:
    out: list[tuple[str, int, object]] = []
    for r in records:
        if isinstance(r, PipesLine):
            out.append(("line", r.line_no, r.message.method))
        elif isinstance(r, PipesBadLine):
            # How much of an over-long line was seen when it was reported depends on the chunks.
            out.append(("bad", r.line_no, "over-long" if "exceeds the" in r.error.reason else r.error.reason[:20]))
        else:
            out.append(("text", r.line_no, (r.text, r.partial)))
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(STREAM)), max_size=12), st.booleans())
def test_splitter_is_independent_of_chunking(cuts: list[int], stdio: bool) -> None:
    def run(chunks: list[bytes]) -> list[tuple[str, int, object]]:
        splitter = PipesLineSplitter(max_line_bytes=256, stdio=stdio)
        records: list[PipesStdioRecord] = []
        for chunk in chunks:
            records += splitter.feed(chunk)
        return _summary(records + splitter.end())

    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(bounds)]
    whole = run([STREAM])
    # An over-long text line may be cut into a different number of pieces; everything else is identical.
    assert _merge_partials(run(chunks)) == _merge_partials(whole)
    if not stdio:
        assert whole == [
            ("line", 1, "opened"),
            ("bad", 3, "line is not JSON: Ex"),
            ("bad", 4, "over-long"),
            ("line", 5, "log"),
            ("bad", 6, "over-long"),
            ("line", 7, "closed"),
        ]


def _merge_partials(summary: list[tuple[str, int, object]]) -> list[tuple[str, int, object]]:
    merged: list[tuple[str, int, object]] = []
    for kind, no, what in summary:
        if kind == "text" and merged and merged[-1][0] == "text" and merged[-1][1] == no:
            prev = merged.pop()
            assert isinstance(prev[2], tuple) and isinstance(what, tuple)
            what = (prev[2][0] + what[0], what[1])
        merged.append((kind, no, what))
    return merged


def test_stdio_splitter_passes_long_text_on_in_pieces() -> None:
    splitter = PipesStdioSplitter(max_line_bytes=10)
    records = splitter.feed(b"0123456789abcdef") + splitter.feed(b"ghij\nshort") + splitter.end()
    assert records == [
        PipesTextLine(1, b"0123456789abcdef", partial=True),
        PipesTextLine(1, b"ghij"),
        PipesTextLine(2, b"short"),
    ]
    assert splitter.params == {"stdio": "stderr"}
    assert PipesStdioSplitter(stream="stdout").params == {"stdio": "stdout"}
    with pytest.raises(PipesBootstrapError):
        PipesStdioSplitter(stream=cast(Any, "stdin"))


async def test_reader_without_writers_ends_after_finish(tmp_path: Path) -> None:
    reader = PipesFifoReader(tmp_path / "fifo")
    assert stat.S_ISFIFO(os.stat(reader.path).st_mode)
    async with reader:
        assert await reader.drain(timeout_s=EVENT_TIMEOUT_S)
        assert reader.at_eof and await reader.next_batch() == []
    assert not Path(reader.path).exists()  # noqa: ASYNC240
    reader.close()  # idempotent


async def test_reader_keeps_reading_across_writers_and_reports_a_stray_writer(tmp_path: Path) -> None:
    reader = PipesFifoReader(tmp_path / "fifo")
    async with reader:
        for i in range(3):  # like dagster-pipes: open, write one line, close, for every message
            with open(reader.path, "a", encoding="utf-8") as f:  # a FIFO with a reader
                f.write(_pipes_line("report_custom_message", {"payload": i}).decode() + "\n")
        batch = await asyncio.wait_for(reader.next_batch(), EVENT_TIMEOUT_S)
        while len(batch) < 3:
            batch += await asyncio.wait_for(reader.next_batch(), EVENT_TIMEOUT_S)
        assert [r.message.params["payload"] for r in batch if isinstance(r, PipesLine)] == [0, 1, 2]
        assert not reader.at_eof  # three writers came and went: no EOF
        stray = os.open(reader.path, os.O_WRONLY | os.O_NONBLOCK)  # a writer that never closes
        try:
            assert not await reader.drain(timeout_s=0.2)
        finally:
            os.close(stray)
        assert reader.at_eof


async def test_a_slow_consumer_pauses_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipes_module, "PENDING_MAX_RECORDS", 10)
    reader = PipesFifoReader(tmp_path / "fifo")

    def write(first: int) -> None:
        fd = os.open(reader.path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            batch = (_pipes_line("report_custom_message", {"payload": i}) + b"\n" for i in range(first, first + 100))
            data = b"".join(batch)
            assert os.write(fd, data) == len(data)  # fits in the pipe: nothing blocks
        finally:
            os.close(fd)

    async with reader:
        write(0)
        await asyncio.wait_for(_until(lambda: reader.paused), EVENT_TIMEOUT_S)
        seen = reader.lines_seen
        write(100)
        for _ in range(20):
            await asyncio.sleep(0)  # give the loop every chance to read: it must not
        assert reader.lines_seen == seen  # paused: the new lines wait in the pipe, not in our memory
        got = []
        async for record in reader:
            assert isinstance(record, PipesLine)
            got.append(record.message.params["payload"])
            if len(got) == 200:
                reader.finish()
        assert got == list(range(200))
        assert reader.at_eof and not reader.paused


async def test_a_failing_callback_is_logged_once_and_reading_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[int] = []

    def on_record(record: PipesRecord) -> None:
        seen.append(record.line_no)
        raise RuntimeError("consumer bug")

    reader = PipesFifoReader(tmp_path / "fifo", on_record=on_record)
    async with reader:
        fd = os.open(reader.path, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, b"".join(_pipes_line("closed", {}) + b"\n" for _ in range(3)))
        finally:
            os.close(fd)
        assert await reader.drain(timeout_s=EVENT_TIMEOUT_S)
    assert seen == [1, 2, 3]
    errors = [r for r in caplog.records if r.levelname == "ERROR" and "callback failed" in r.getMessage()]
    assert len(errors) == 1


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():  # the reader has no event for this; the caller bounds the wait
        await asyncio.sleep(0)


def test_bootstrap_env_contents_and_cleanup(tmp_path: Path) -> None:
    boot = bootstrap_env(CONTEXT, tmpdir=tmp_path, context_injector="file")
    ctx_params = decode_bootstrap(boot.env["DAGSTER_PIPES_CONTEXT"])
    msg_params = decode_bootstrap(boot.env["DAGSTER_PIPES_MESSAGES"])
    assert json.loads(Path(ctx_params["path"]).read_text()) == CONTEXT
    assert stat.S_ISFIFO(os.stat(msg_params["path"]).st_mode)
    assert set(boot.env) == {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"}
    boot.close()
    boot.close()
    assert os.listdir(tmp_path) == []

    with bootstrap_env(CONTEXT, tmpdir=tmp_path) as boot:
        assert decode_bootstrap(boot.env["DAGSTER_PIPES_CONTEXT"]) == {"data": CONTEXT}
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"context_injector": "s3"}, "unknown Pipes context injector"),
        ({"messages_channel": "socket"}, "unknown Pipes messages channel"),
        ({"context": {"extras": {"blob": os.urandom(200_000).hex()}}}, "use context_injector='file'"),
    ],
)
def test_bootstrap_env_refusals(tmp_path: Path, kwargs: dict[str, Any], reason: str) -> None:
    context = kwargs.pop("context", CONTEXT)
    with pytest.raises(PipesBootstrapError, match=reason):
        bootstrap_env(context, tmpdir=tmp_path, **kwargs)
    assert os.listdir(tmp_path) == []  # nothing left behind


def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_pipes_schema())


def test_bootstrap_dirs_of_dead_nodes_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    import subprocess

    from dpipes.nodes.pipes import BOOTSTRAP_DIR_PREFIX, remove_stale_bootstrap_dirs

    dead = subprocess.Popen(["true"])  # a pid that has exited and been reaped
    dead.wait()
    stale = tmp_path / f"{BOOTSTRAP_DIR_PREFIX}{dead.pid}-abc"
    live = tmp_path / f"{BOOTSTRAP_DIR_PREFIX}{os.getpid()}-def"
    foreign = tmp_path / f"{BOOTSTRAP_DIR_PREFIX}notapid"
    for d in (stale, live, foreign):
        d.mkdir()
        (d / "context.json").write_text("{}")
    assert remove_stale_bootstrap_dirs(tmp_path) == [str(stale)]
    assert not stale.exists() and live.exists() and foreign.exists()
