"""PipesBusMessageWriter in real dagster-pipes programs, read by open_pipes_session + PipesBusMessageReader."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from dpipes.bus import codec
from dpipes.bus.client import Client
from dpipes.bus.pipes import MAX_LINE_BYTES
from dpipes.nodes.pipes import make_context_data
from dpipes.nodes.pipes_session import (
    PipesBusMessageReader,
    PipesFifoMessageReader,
    PipesMessageHandler,
    PipesMessageReader,
    PipesSession,
    open_pipes_session,
)

CHILD_TIMEOUT_S = 60.0  # generous for a loaded 2-core machine; a healthy run takes about a second
CONTEXT = make_context_data(run_id="run-7", asset_keys=["orders"], extras={"count": 3})
BUS_CHANNEL = "channel PipesBusMessageWriterChannel"
FILE_CHANNEL = "channel PipesFileMessageWriterChannel"

# A real dagster-pipes program; argv[1] picks what it does. It prints which channel its writer opened.
CHILD = textwrap.dedent(
    """
    import sys, threading
    from contextlib import contextmanager
    from dagster_pipes import open_dagster_pipes
    from dpipes.bus.pipes_writer import PipesBusMessageWriter

    class Reporting(PipesBusMessageWriter):
        @contextmanager
        def open(self, params):
            with super().open(params) as channel:
                print("channel", type(channel).__name__, flush=True)
                yield channel

    scenario = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    writer = None if scenario == "default" else Reporting()
    if scenario == "no-close":
        pipes = open_dagster_pipes(message_writer=writer)
        for i in range(n):
            pipes.report_custom_message(i)
        sys.exit(0)  # no close(): the atexit hook must deliver
    with open_dagster_pipes(message_writer=writer) as pipes:
        if scenario in ("all", "default"):
            for level in ("debug", "info", "warning", "error", "critical"):
                getattr(pipes.log, level)(f"a {level} message")
            pipes.report_asset_materialization(metadata={"rows": {"raw_value": 3, "type": "int"}}, data_version="v1")
            pipes.report_asset_check(check_name="not_empty", passed=True, severity="WARN")
            pipes.report_custom_message({"count": pipes.extras["count"]})
            pipes.log_external_stream("stdout", "some text")
        elif scenario == "burst":
            for i in range(n):
                pipes.log.info(f"log {i}")
                pipes.report_custom_message(i)
        elif scenario == "threads":
            def emit(t):
                for i in range(n):
                    pipes.report_custom_message([t, i])
            threads = [threading.Thread(target=emit, args=(t,)) for t in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        elif scenario == "big":
            pipes.report_custom_message("x" * n)
            pipes.log.info("after")
    """
)
ALL_METHODS = [
    "opened",
    *["log"] * 5,
    "report_asset_materialization",
    "report_asset_check",
    "report_custom_message",
    "log_external_stream",
    "closed",
]


@pytest.fixture
def child(tmp_path: Path) -> str:
    path = tmp_path / "child.py"
    path.write_text(CHILD)
    return str(path)


async def run_child(argv: list[str], env: Mapping[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


async def run_session(
    argv: list[str], reader: PipesMessageReader | None = None
) -> tuple[PipesMessageHandler, tuple[int, str, str]]:
    async with open_pipes_session(context_data=CONTEXT, message_reader=reader or PipesBusMessageReader()) as session:
        result = await run_child(argv, session.get_bootstrap_env_vars())
    return session.message_handler, result


def methods(handler: PipesMessageHandler) -> list[str]:
    return [m["method"] for m in handler.messages]


async def test_every_method_arrives_over_the_bus(child: str, tmp_path: Path) -> None:
    handler, (code, out, err) = await run_session([child, "all"], PipesBusMessageReader(tmpdir=tmp_path))
    assert (code, out, err) == (0, BUS_CHANNEL + "\n", "")
    assert methods(handler) == ALL_METHODS
    assert [log["level"] for log in handler.logs] == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    assert handler.materializations == [
        {"asset_key": "orders", "metadata": {"rows": {"raw_value": 3, "type": "int"}}, "data_version": "v1"}
    ]
    assert [(c["check_name"], c["passed"], c["severity"]) for c in handler.checks] == [("not_empty", True, "WARN")]
    assert handler.custom_messages == [{"count": 3}]
    assert handler.bad_lines == []
    assert os.listdir(tmp_path) == ["child.py"]  # the FIFO's directory is gone


async def test_an_unmodified_program_is_read_through_the_fifo_of_the_same_reader(child: str) -> None:
    handler, (code, out, err) = await run_session([child, "default"])
    assert (code, out, err) == (0, "", "")
    assert methods(handler) == ALL_METHODS
    assert handler.bad_lines == []


async def test_ten_thousand_logs_and_custom_messages_complete_and_in_order(child: str) -> None:
    n = 10_000
    handler, (code, out, err) = await run_session([child, "burst", str(n)])
    assert (code, out, err) == (0, BUS_CHANNEL + "\n", "")
    assert len(handler.messages) == 2 * n + 2
    assert [log["message"] for log in handler.logs] == [f"log {i}" for i in range(n)]
    assert handler.custom_messages == list(range(n))
    assert methods(handler)[1:5] == ["log", "report_custom_message"] * 2  # interleaved as written
    assert handler.bad_lines == []


async def test_messages_written_from_several_threads_all_arrive_each_in_order(child: str) -> None:
    n = 2_000
    handler, (code, _, err) = await run_session([child, "threads", str(n)])
    assert (code, err) == (0, "")
    payloads = handler.custom_messages
    assert len(payloads) == 4 * n
    for t in range(4):
        assert [i for tt, i in payloads if tt == t] == list(range(n))


async def test_a_one_mebibyte_payload(child: str) -> None:
    handler, (code, out, err) = await run_session([child, "big", str(1 << 20)])
    assert (code, out, err) == (0, BUS_CHANNEL + "\n", "")
    assert handler.custom_messages == ["x" * (1 << 20)]
    assert [log["message"] for log in handler.logs] == ["after"]


async def test_a_message_over_the_line_limit_is_reported_and_the_program_goes_on(child: str) -> None:
    size = MAX_LINE_BYTES + 1024
    handler, (code, out, err) = await run_session([child, "big", str(size)])
    assert (code, out) == (0, BUS_CHANNEL + "\n")
    assert f"over the {MAX_LINE_BYTES}-byte limit; the reader will report it" in err
    (bad,) = handler.bad_lines
    assert "exceeds the" in str(bad.error) and bad.line_no == 2  # "opened" was message 1 of the stream
    assert str(bad).startswith("Pipes message 2 from the bus writer ")
    assert methods(handler) == ["opened", "log", "closed"]


async def test_a_program_that_never_closes_still_delivers_what_it_wrote(child: str) -> None:
    handler, (code, out, err) = await run_session([child, "no-close", "1000"])
    assert (code, out, err) == (0, BUS_CHANNEL + "\n", "")
    assert methods(handler) == ["opened"] + ["report_custom_message"] * 1000  # no "closed": it never closed
    assert handler.custom_messages == list(range(1000))


class UnreachableBusReader(PipesMessageReader):
    """A FIFO reader whose params also offer a bus hub that nobody answers at."""

    def __init__(self, hub: str) -> None:
        self.hub = hub
        self._fifo = PipesFifoMessageReader()

    @asynccontextmanager
    async def read_messages(self, handler: PipesMessageHandler) -> Any:
        async with self._fifo.read_messages(handler) as params:
            yield {**params, "dpipes_bus": {"hub": self.hub, "to": "nowhere/pipes"}}


@pytest.mark.parametrize("socket_file", ["missing", "not a socket"])
async def test_the_writer_falls_back_to_the_file_when_the_hub_does_not_answer(
    child: str, tmp_path: Path, socket_file: str
) -> None:
    path = tmp_path / "hub.sock"
    if socket_file == "not a socket":
        path.write_text("")  # a path exists, but nothing listens: only the attach timeout tells
    hub = f"ipc://{path}"
    handler, (code, out, err) = await run_session([child, "all"], UnreachableBusReader(hub))
    assert (code, out) == (0, FILE_CHANNEL + "\n")
    assert err.count("dpipes: ") == 1 and hub in err and "writing Pipes messages to " in err, err
    assert methods(handler) == ALL_METHODS
    assert handler.bad_lines == []


async def test_malformed_frames_on_the_bus_are_reported_and_later_messages_arrive(child: str) -> None:
    good = b'{"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": "raw"}}'
    async with open_pipes_session(context_data=CONTEXT, message_reader=PipesBusMessageReader()) as session:
        offer = session.message_params["dpipes_bus"]
        async with Client(offer["hub"], name="raw-writer") as client:
            out = client.endpoint.open_stream(offer["to"])
            await out.send(codec.Pipes(stage=0, frames=(b"not json at all", good, b'{"method": "log"}')))
            await out.send(codec.Bytes(frames=(b"plain bytes",)))
            await out.send(codec.Pipes(stage=0, frames=(good,)))
            await asyncio.wait_for(out.close(), CHILD_TIMEOUT_S)
            writer = client.endpoint.addr
        code, _, err = await run_child([child, "burst", "3"], session.get_bootstrap_env_vars())
    assert (code, err) == (0, "")
    handler = session.message_handler
    assert handler.custom_messages == ["raw", "raw", 0, 1, 2]
    bad = [str(b) for b in handler.bad_lines]
    assert len(bad) == 3, bad
    assert bad[0].startswith(f"Pipes message 1 from the bus writer {writer}: line is not JSON")
    assert bad[1].startswith(f"Pipes message 3 from the bus writer {writer}: missing '__dagster_pipes_version'")
    assert (
        bad[2] == f"Pipes message 4 from the bus writer {writer}: a BYTES bus message, not PIPES: not a Pipes message"
    )
    assert handler.bad_lines[0].head == b"not json at all"


async def test_the_session_offers_both_channels(tmp_path: Path) -> None:
    async with open_pipes_session(
        context_data=CONTEXT, message_reader=PipesBusMessageReader(tmpdir=tmp_path, include_stdio_in_messages=True)
    ) as session:
        params = session.message_params
        assert set(params) == {"path", "dpipes_bus", "include_stdio_in_messages"}
        assert params["path"].startswith(str(tmp_path))
        assert params["dpipes_bus"]["hub"].startswith("ipc://")
        assert params["dpipes_bus"]["to"].endswith("/pipes")
        assert isinstance(session, PipesSession)
        hub_path = params["dpipes_bus"]["hub"].removeprefix("ipc://")
        assert exists(hub_path)
    assert not exists(hub_path) and os.listdir(tmp_path) == []


def exists(path: str) -> bool:
    return os.path.exists(path)
