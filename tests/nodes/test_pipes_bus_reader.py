"""PipesBusReader on a real hub, against real dagster-pipes programs using PipesBusMessageWriter."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from dpipes.bus import codec
from dpipes.bus.client import Client
from dpipes.bus.hub import Hub
from dpipes.bus.pipes import PIPES_CONTEXT_ENV_VAR, PIPES_MESSAGES_ENV_VAR, encode_bootstrap
from dpipes.nodes import pipes_readers as pipes_module
from dpipes.nodes.pipes import PipesBadLine, PipesBusReader, PipesFifoReader, PipesLine, PipesRecord, make_context_data
from tests.nodes.test_pipes_channel import spawned

CHILD_TIMEOUT_S = 60.0
EVENT_TIMEOUT_S = 20.0
CONTEXT = make_context_data(run_id="run-9")

# A real dagster-pipes program with our bus writer: "first" then, after a line on stdin, N more messages.
CHILD = textwrap.dedent(
    """
    import sys
    from dagster_pipes import open_dagster_pipes
    from dpipes.bus.pipes_writer import PipesBusMessageWriter

    n, size = int(sys.argv[1]), int(sys.argv[2])
    with open_dagster_pipes(message_writer=PipesBusMessageWriter()) as pipes:
        pipes.report_custom_message("first")
        if sys.stdin.readline() != "go\\n":
            sys.exit(3)
        for i in range(n):
            pipes.report_custom_message([i, "x" * size])
    """
)


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.01)  # polling a condition under the caller's timeout


@asynccontextmanager
async def bus_reader(tmp_path: Path, **kwargs: object) -> AsyncIterator[tuple[PipesBusReader, PipesFifoReader]]:
    async with Hub("pipes-test", tcp=None) as hub:
        reader = PipesBusReader(hub.endpoint("pipes"), hub.ipc_endpoint, **kwargs)  # type: ignore[arg-type]
        fifo = PipesFifoReader(tmp_path / "fifo")
        try:
            async with reader, fifo:
                yield reader, fifo
        finally:
            reader.close()


@asynccontextmanager
async def writer_child(
    tmp_path: Path, reader: PipesBusReader, fifo: PipesFifoReader, n: int, size: int = 0
) -> AsyncIterator[asyncio.subprocess.Process]:
    program = tmp_path / "child.py"
    program.write_text(CHILD)
    env = {
        PIPES_CONTEXT_ENV_VAR: encode_bootstrap({"data": CONTEXT}),
        PIPES_MESSAGES_ENV_VAR: encode_bootstrap({**fifo.params, **reader.params}),
    }
    async with spawned(sys.executable, str(program), str(n), str(size), env=env, stdin=asyncio.subprocess.PIPE) as proc:
        yield proc


def payloads(records: list[PipesRecord]) -> list[object]:
    out = []
    for r in records:
        assert isinstance(r, PipesLine), str(r)
        if r.message.method == "report_custom_message":
            out.append(r.message.params["payload"])
    return out


async def next_records(reader: PipesBusReader | PipesFifoReader, count: int) -> list[PipesRecord]:
    got: list[PipesRecord] = []
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        while len(got) < count:
            batch = await reader.next_batch()
            assert batch, f"the channel ended after {got}"
            got += batch
    return got


async def test_params_offer_the_hub_and_the_endpoint(tmp_path: Path) -> None:
    async with bus_reader(tmp_path) as (reader, _fifo):
        hub = reader.hub
        assert reader.params == {"dpipes_bus": {"hub": hub, "to": reader.endpoint.addr}}
        assert hub.startswith("ipc://") and reader.endpoint.addr == "pipes-test/pipes"


async def test_a_reader_without_writers_ends_after_finish(tmp_path: Path) -> None:
    async with bus_reader(tmp_path) as (reader, _fifo):
        assert not reader.at_eof
        assert await reader.drain(timeout_s=EVENT_TIMEOUT_S)
        assert reader.at_eof and await reader.next_batch() == []


async def test_a_slow_consumer_pauses_reading_and_the_writer_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipes_module, "PENDING_MAX_RECORDS", 10)
    n, size = 3_000, 4_096  # 12 MiB: more than a stream's 8 MiB credit window
    async with bus_reader(tmp_path) as (reader, fifo), writer_child(tmp_path, reader, fifo, n, size) as proc:
        assert payloads(await next_records(reader, 2)) == ["first"]  # "opened", then "first"
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        await asyncio.wait_for(until(lambda: reader.paused), EVENT_TIMEOUT_S)
        seen = reader.messages_seen
        for _ in range(50):
            await asyncio.sleep(0)  # give the loop every chance to read: it must not
        assert reader.messages_seen == seen  # paused: the rest waits in the writer, not in our memory
        got: list[PipesRecord] = []
        async with asyncio.timeout(CHILD_TIMEOUT_S):
            while batch := await reader.next_batch():
                assert len(batch) <= 10 + 512  # the bound, overshot by at most one PIPES message
                got += batch
                if len(got) == n + 1:  # the messages, then "closed"
                    assert await proc.wait() == 0
                    reader.finish()
        assert [p[0] for p in payloads(got)] == list(range(n))  # type: ignore[index]
        assert reader.at_eof and not reader.paused


async def test_a_writer_killed_mid_stream_is_reported_when_drain_gives_up(tmp_path: Path) -> None:
    async with bus_reader(tmp_path) as (reader, fifo), writer_child(tmp_path, reader, fifo, 0) as proc:
        assert payloads(await next_records(reader, 2)) == ["first"]
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
        assert not await reader.drain(timeout_s=0.5)
        (bad,) = await reader.next_batch()
        assert isinstance(bad, PipesBadLine) and bad.line_no == 3
        assert str(bad).startswith("Pipes message 3 from the bus writer pipes-test/")
        assert "still open 0.5 s after its process ended, after 2 messages" in str(bad)
        assert reader.at_eof and await reader.next_batch() == []


async def test_when_the_bus_fails_mid_run_the_writer_goes_on_in_its_file(tmp_path: Path) -> None:
    n = 500
    async with bus_reader(tmp_path) as (reader, fifo), writer_child(tmp_path, reader, fifo, n) as proc:
        assert payloads(await next_records(reader, 2)) == ["first"]
        reader.close()  # the stream is cancelled and the endpoint gone: the writer must notice
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        got = await next_records(fifo, n + 1)
        assert payloads(got) == [[i, ""] for i in range(n)]
        assert isinstance(got[-1], PipesLine) and got[-1].message.method == "closed"
        assert await asyncio.wait_for(proc.wait(), CHILD_TIMEOUT_S) == 0
        err = (await proc.stderr.read()).decode()
        assert err.count("dpipes: ") == 1 and "failed" in err and f"to {fifo.path} from now on" in err, err


async def test_data_outside_a_stream_is_reported(tmp_path: Path) -> None:
    async with bus_reader(tmp_path) as (reader, _fifo), Client(reader.hub, name="stray") as client:
        client.endpoint.send(codec.Pipes(dst=reader.endpoint.addr, stage=0, frames=(b"{}",)))
        (bad,) = await next_records(reader, 1)
        assert str(bad) == (
            "Pipes message 1 from the bus writer pipes-test/stray:"
            " a PIPES bus message outside a stream: not read (a writer must open a stream)"
        )
