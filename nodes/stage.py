"""One stage on this node: its record, its data pumps, its exit report, and its direct pipes.

A started stage is a forked program (:class:`~dpipes.nodes.supervisor.StageProcess`) between the
bus and the stage's endpoint ``<node>/<pipeline>.<index>``. A :class:`StageRun` drives it with one
task per pump and returns an :class:`ExitReport` once the program has exited and every pump ended:

stdin
    the one stream that arrives at the endpoint, decoded for the stage's data mode and written to
    the program. A program that closes its stdin cancels that stream (its producer then gets
    SIGPIPE, as in a shell); an input that arrives after the program exited is refused by the
    owner (``on_unread_input``).
stdout
    a stream to ``stdout_to``; bytes mode sends chunks as read (a streaming program's writes
    gathered into chunks of up to 1 MiB: ``read_stdout(coalesce=True)``), object modes wrap each
    object with its ``__dpipes`` metadata. A cancelled stream is downstream gone: the program gets SIGPIPE.
    A last stage started with ``stdout_token`` holds its stdout (reads none of it) until a
    ``claim`` with that token names its reader (:meth:`Stages.claim`), so that the client may read
    it from this node directly; unclaimed for ``CLAIM_TIMEOUT_S``, the stage fails.
stderr
    a stream of ``STDERR`` messages to ``stderr_to``, opened at the first byte.
Pipes
    the stage's Dagster Pipes messages (from its FIFO, its bus endpoint, or taken out of its stdout
    or stderr) as ``PIPES`` messages on one stream to ``stderr_to``, opened at the first message.
    With the ``stdio`` option, also its stderr, and the last stage's stdout (the one that goes to
    the client), as ``log_external_stream`` messages the node makes from what it reads; a middle
    stage's stdout is pipeline data and stays that.

The report also says when the program started and ended (wall clock) and how many bytes this
node wrote to its stdin and read from its stdout (``-1`` for an edge that is a kernel pipe).

Status is typed (:class:`~dpipes.nodes.protocol.ExitReport`): a stage stopped by a cancel has
``cancelled`` (the reason) in its report, and ``error`` holds only what went wrong moving its data;
nobody matches either in text.

Neighbouring stages on one node exchange bytes through one kernel pipe (:class:`DirectPipes`), made
by whichever of the two starts first; nothing of that edge passes through the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint, OutStream, StreamCancelled
from dpipes.bus.errors import BusError, DpipesError, StageError
from dpipes.bus.trust import INSECURE, Identity
from dpipes.nodes.config import NodeConfig
from dpipes.nodes.protocol import (
    CLAIM_TIMEOUT_S,
    MAX_TEXT_CHARS,
    PROGRESS_INTERVAL_S,
    ExitReport,
    ProgressReport,
    StartRequest,
)
from dpipes.nodes.supervisor import StageProcess, StdinClosed, set_pipe_size

if TYPE_CHECKING:
    from dpipes.nodes.pipes import PipesBusReader, PipesFifoReader
    from dpipes.nodes.stage_pipes import StagePipes

log = logging.getLogger(__name__)

STDERR_TAIL_REPORT_CHARS = 4096  # the end of a failed stage's stderr, in its report (the protocol allows 4x)
ERROR_REPORT_CHARS = MAX_TEXT_CHARS  # what went wrong moving its data, in its report (the bound)


@dataclasses.dataclass
class Stage:
    """One stage of a pipeline on this node, from negotiation to its exit report."""

    pipeline: str
    index: int
    argv: list[str]
    mode: str
    endpoint: Endpoint
    describe: str
    proc: StageProcess | None = None
    task: asyncio.Task[None] | None = None
    cancelled: str = ""  # why it was cancelled; "" while it was not
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    pipes: StagePipes | None = None
    lingering: bool = False  # its endpoint outlives it briefly, to refuse late input
    expiry: asyncio.TimerHandle | None = None  # forgets it, should it be negotiated and never started
    started: float = 0.0  # wall clock when its program started (for the exit report)
    bytes_in: int = 0  # data written to its program's stdin by this node
    bytes_out: int = 0  # data read from its program's stdout by this node
    plugin: str = ""  # a plugin stage: the plugin's name (its worker holds the stage address)
    config: dict[str, Any] = dataclasses.field(default_factory=dict)  # a plugin stage's configuration
    temp_dir: str = ""  # a plugin stage's temp_dir: made by the node, removed when the stage ends
    outcome: str = ""  # how it ended, once it has: why a plugin worker's unended streams are cancelled
    stop: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # set when it is cancelled
    caller: Identity = INSECURE  # whom it runs for, as the transport established it (nodes.policy.caller_of)
    negotiated_by: str = ""  # the bus address that negotiated it: only that one may start it
    who: str = ""  # the caller for the log, with the node that asked on its behalf
    claim_token: str = ""  # its stdout waits for a ``claim`` with this token (start.stdout_token)
    reader: asyncio.Future[str] | None = None  # where that claim sends its stdout, once it came


class DirectPipes:
    """The kept ends of kernel pipes between neighbouring stages on this node, by (pipeline, edge).

    Edge ``i`` joins stage ``i`` to ``i + 1``; edge ``-1`` and the last edge may hold a local
    client's own stdin and stdout, handed over (:mod:`dpipes.nodes.fdpass`).
    """

    def __init__(self) -> None:
        self._ends: dict[tuple[str, int], int] = {}

    def keep(self, pipeline: str, edge: int, fd: int) -> None:
        """Keep ``fd`` as the end of ``edge`` the stage that starts there will take."""
        self._ends[(pipeline, edge)] = fd

    def end(self, pipeline: str, edge: int, *, reader: bool) -> int:
        """A stage's end of the pipe of ``edge``: made by whichever of its two stages starts first,
        which keeps the other end for the second (closed by :meth:`close` should it never start)."""
        if (end := self._ends.pop((pipeline, edge), None)) is not None:
            return end
        r, w = os.pipe()
        set_pipe_size(w)
        self._ends[(pipeline, edge)] = w if reader else r
        return r if reader else w

    def close(self, pipeline: str, edges: Sequence[int] | None = None) -> None:
        """Close the kept ends of ``pipeline`` (all, or those of ``edges``)."""
        for key in [k for k in self._ends if k[0] == pipeline and (edges is None or k[1] in edges)]:
            os.close(self._ends.pop(key))

    def close_all(self) -> None:
        for pipeline in {p for p, _ in self._ends}:
            self.close(pipeline)


class StageRun:
    """Drives one started stage: a task per pump, then its exit report.

    Args:
        stage: the stage, its program started (``proc``) and its Pipes side made (``pipes``).
        wiring: where its data goes (its ``start`` request).
        node: this node's name.
        config: the node's configuration (object metadata settings).
        tcp_endpoint: where this node listens (the ``dp.addr``/``dp.port`` of its objects).
        on_unread_input: called when the program exited before its input arrived; the owner
            keeps the endpoint a while to refuse that input.
        on_progress: sends a ``progress`` report to ``wiring.progress_to`` (only when that is set).
    """

    def __init__(
        self,
        stage: Stage,
        wiring: StartRequest,
        *,
        node: str,
        config: NodeConfig,
        tcp_endpoint: str,
        on_unread_input: Callable[[], None],
        on_progress: Callable[[ProgressReport], None] | None = None,
    ) -> None:
        assert stage.proc is not None and stage.pipes is not None, "stage not started"
        self.stage = stage
        self.proc: StageProcess = stage.proc
        self.pipes: StagePipes = stage.pipes
        self.wiring = wiring
        self.node = node
        self.config = config
        self.tcp_endpoint = tcp_endpoint
        self._on_unread_input = on_unread_input
        self._on_progress = on_progress if wiring.progress_to else None
        self.errors: list[str] = []
        self.sigpipe = False
        self._pipes_out: OutStream | None = None  # opened at the first Pipes message
        self._pipes_sending = asyncio.Lock()  # the FIFO's and the bus's messages share one stream
        from dpipes.nodes.stage_pipes import StdioTee  # loaded already: the stage's Pipes side is made

        last = wiring.stdout_to == wiring.stderr_to  # only the last stage's stdout goes to the client
        self._stdio_err = StdioTee("stderr") if self.pipes.stdio else None
        self._stdio_out = StdioTee("stdout") if self.pipes.stdio and last else None

    async def run(self) -> ExitReport:
        """Pump until the program has exited and its output is delivered; its report."""
        proc, pipes = self.proc, self.pipes
        readers: list[PipesFifoReader | PipesBusReader] = []
        if pipes.channel == "file":
            readers = [pipes.boot.channel, *([pipes.bus] if pipes.bus else [])]
        pumps: list[asyncio.Task[None]] = []
        ticker: asyncio.Task[None] | None = None
        try:
            pumps = [asyncio.create_task(p()) for p in (self._stdin, self._stdout, self._stderr)]
            pumps += [asyncio.create_task(self._pipes_reader(r)) for r in readers]
            if self._on_progress is not None:
                ticker = asyncio.create_task(self._progress(self._on_progress))
            status = await proc.wait()
            if ticker is not None:
                ticker.cancel()
            ended = time.time()
            if not pumps[0].done():
                pumps[0].cancel()  # nobody will read what still comes: refuse it as a closed pipe
            # The program is gone: read its messages to the end (bounded, should a descendant hold on).
            await asyncio.gather(*(r.drain() for r in readers), return_exceptions=True)
            await _pumps_unless_stopped(pumps, self.stage.stop)
            if self._pipes_out is not None:
                with contextlib.suppress(BusError):
                    await self._pipes_out.close()
        except asyncio.CancelledError:
            for p in [*pumps, *([ticker] if ticker else [])]:
                p.cancel()
            raise
        stage = self.stage
        tail = proc.stderr_tail.decode(errors="replace")[-STDERR_TAIL_REPORT_CHARS:] if not status.ok else ""
        return ExitReport(
            pipeline=stage.pipeline,
            stage=stage.index,
            node=self.node,
            code=status.code if status.code is not None else -1,
            signal=status.signal or 0,
            status=status.describe(),
            sigpipe=self.sigpipe or status.signal == signal.SIGPIPE,
            error="; ".join(self.errors)[:ERROR_REPORT_CHARS],
            cancelled=stage.cancelled[:MAX_TEXT_CHARS],
            stderr_tail=tail,
            started=stage.started,
            ended=ended,
            bytes_in=self._counts()[0],
            bytes_out=self._counts()[1],
        )

    def _counts(self) -> tuple[int, int]:
        """Bytes in and out so far; -1 for an edge that is a kernel pipe (it passes by us)."""
        stage = self.stage
        return (-1 if self.wiring.direct_in else stage.bytes_in, -1 if self.wiring.direct_out else stage.bytes_out)

    async def _progress(self, send: Callable[[ProgressReport], None]) -> None:
        """While the program runs: its counts, every ``PROGRESS_INTERVAL_S`` when they changed."""
        sent = None
        while True:
            counts = self._counts()
            if counts != sent:
                stage = self.stage
                send(
                    ProgressReport(
                        pipeline=stage.pipeline,
                        stage=stage.index,
                        node=self.node,
                        bytes_in=counts[0],
                        bytes_out=counts[1],
                    )
                )
                sent = counts
            await asyncio.sleep(PROGRESS_INTERVAL_S)  # a periodic report, not a wait for something

    async def _stdin(self) -> None:
        from dpipes.nodes.dataflow import Incoming

        stage, proc = self.stage, self.proc
        if not self.wiring.stdin_from or self.wiring.direct_in:  # no input, or a pipe straight from upstream
            proc.close_stdin()
            return
        try:
            stream = await stage.endpoint.accept()
        except asyncio.CancelledError:  # the program exited before its input arrived
            proc.close_stdin()  # our end of its stdin pipe: every path closes it, this one too
            self._on_unread_input()
            raise
        incoming = Incoming(stage.mode, where=f"input of {stage.describe}", metadata_key=self.config.metadata_key)
        try:
            while (msg := await stream.read()) is not None:
                for frame in incoming.data(msg):
                    await proc.write_stdin(frame)
                    stage.bytes_in += len(frame)
        except (StdinClosed, asyncio.CancelledError) as exc:
            stream.cancel(f"{stage.describe} closed its input")  # upstream gets SIGPIPE, as in a shell
            if isinstance(exc, asyncio.CancelledError):
                raise
        except DpipesError as exc:  # the bus failed, or the data was not of the edge's mode
            if not stage.cancelled:
                self.errors.append(f"input: {exc}")
            stream.cancel(str(exc))
            await proc.terminate()
        finally:
            proc.close_stdin()

    async def _stdout(self) -> None:
        from dpipes.nodes.dataflow import Outgoing

        stage, proc, pipes = self.stage, self.proc, self.pipes
        if self.wiring.direct_out:  # a pipe straight to downstream: nothing passes through us
            return
        try:
            reader = await self._stdout_reader()
        except StageError as exc:
            self.errors.append(f"output: {exc}")
            proc.close_stdout()
            await proc.terminate()
            return
        out = stage.endpoint.open_stream(reader)
        outgoing = Outgoing(stage.mode, where=stage.describe, meta=self._metadata())
        tee = self._stdio_out
        try:
            if pipes.channel == "stdout":  # messages among the program's output: take them out
                while True:
                    raw = await proc.read_stdout(coalesce=True)
                    stage.bytes_out += len(raw)
                    data, frames = pipes.split(raw, end=not raw)
                    await self._send_pipes(frames)
                    if tee is not None:
                        await self._send_stdio(tee.frames(data, end=not raw))
                    if data:
                        for message in outgoing.messages(data):
                            await out.send(message)
                    if not raw:
                        break
                for message in outgoing.end():
                    await out.send(message)
            elif stage.mode == "bytes":  # the hot path: no per-chunk objects
                while data := await proc.read_stdout(coalesce=True):
                    stage.bytes_out += len(data)
                    if tee is not None:
                        await self._send_stdio(tee.frames(data))
                    await out.send_bytes(data)
            else:
                while data := await proc.read_stdout(coalesce=True):
                    stage.bytes_out += len(data)
                    if tee is not None:
                        await self._send_stdio(tee.frames(data))
                    for message in outgoing.messages(data):
                        await out.send(message)
                for message in outgoing.end():
                    await out.send(message)
            if tee is not None and pipes.channel != "stdout":
                await self._send_stdio(tee.frames(b"", end=True))
            await out.close()
        except StreamCancelled:
            self.sigpipe = True  # downstream is gone: the program gets SIGPIPE, as in a shell
            proc.close_stdout()
        except asyncio.CancelledError:  # the run was cancelled while its reader had not acknowledged
            out.cancel(stage.cancelled or "cancelled")
            raise
        except DpipesError as exc:  # the bus failed, or the program wrote something not an object
            if not stage.cancelled:
                self.errors.append(f"output: {exc}" if isinstance(exc, BusError) else str(exc))
            out.cancel(str(exc))
            proc.close_stdout()
            await proc.terminate()

    async def _stdout_reader(self) -> str:
        """Where the stdout goes: ``stdout_to``, or, when it is held for a claim, whoever claimed it.

        Nothing is read from the program before this is known, so every byte goes to the one
        reader the claim chose (its pipe fills and it waits, as behind a slow reader).

        Raises:
            StageError: nobody claimed it within ``CLAIM_TIMEOUT_S`` (the client is gone).
        """
        reader = self.stage.reader
        if reader is None:
            return self.wiring.stdout_to
        try:
            return await asyncio.wait_for(asyncio.shield(reader), CLAIM_TIMEOUT_S)
        except TimeoutError:
            self.stage.claim_token = ""  # too late for anyone now
            what = f"the output of {self.stage.describe}"
            raise StageError(f"nobody claimed {what} within {CLAIM_TIMEOUT_S:g} s") from None

    def _metadata(self) -> dict[str, Any]:
        """The ``__dpipes`` map of this stage's objects (object modes only use it)."""
        from dpipes.nodes.objects import make_metadata
        from dpipes.nodes.stage_env import user_of

        stage, config = self.stage, self.config
        host, _, port = self.tcp_endpoint.removeprefix("tcp://").rpartition(":")
        shared = {k: stage.env[k] for k in config.metadata_environ if k in stage.env}
        return make_metadata(
            addr=host,
            port=int(port or 0),
            service=os.path.basename(stage.argv[0]),
            node=self.node,
            stage=stage.index,
            argv=list(stage.argv) if config.metadata_argv else None,
            environ=shared if config.metadata_environ else None,
            credential=(user_of(stage.caller) or None) if config.metadata_credential else None,
        )

    async def _stderr(self) -> None:
        stage, proc, pipes = self.stage, self.proc, self.pipes
        out = None
        split = pipes.channel == "stderr"
        try:
            while True:
                raw = await proc.read_stderr()
                data = raw
                if split:  # messages among the program's stderr: take them out
                    data, frames = pipes.split(raw, end=not raw)
                    await self._send_pipes(frames)
                if self._stdio_err is not None:
                    await self._send_stdio(self._stdio_err.frames(data, end=not raw))
                if data:
                    if out is None:
                        out = stage.endpoint.open_stream(self.wiring.stderr_to)
                    await out.send(codec.Stderr(frames=(data,)))
                if not raw:
                    break
            if out is not None:
                await out.close()
        except BusError as exc:
            log.info("node %s: %s: stderr not delivered: %s", self.node, stage.describe, exc)

    async def _pipes_reader(self, reader: PipesFifoReader | PipesBusReader) -> None:
        from dpipes.nodes.stage_pipes import frame_of

        reader.start()
        try:
            while batch := await reader.next_batch():
                async with self._pipes_sending:
                    await self._send_pipes([frame_of(record) for record in batch])
        except BusError as exc:
            log.info("node %s: %s: Pipes messages not delivered: %s", self.node, self.stage.describe, exc)

    async def _send_stdio(self, frames: list[bytes]) -> None:
        """``log_external_stream`` messages, between the channel readers' batches."""
        if frames:
            async with self._pipes_sending:
                await self._send_pipes(frames)

    async def _send_pipes(self, frames: list[bytes]) -> None:
        from dpipes.nodes.stage_pipes import batches_of

        if not frames:
            return
        if self._pipes_out is None:
            self._pipes_out = self.stage.endpoint.open_stream(self.wiring.stderr_to)
        for batch in batches_of(frames):
            await self._pipes_out.send(codec.Pipes(stage=self.stage.index, frames=batch))


async def _pumps_unless_stopped(pumps: list[asyncio.Task[None]], stop: asyncio.Event) -> None:
    """Wait for the pumps of an exited program; should its stage be cancelled meanwhile, end them.

    A cancelled run's reader may be gone without a word (a plugin worker killed with SIGKILL):
    an output waiting for its acknowledgement would then wait forever.
    """
    rest: asyncio.Future[Any] = asyncio.gather(*pumps, return_exceptions=True)
    stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({rest, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
    if not rest.done():
        for pump in pumps:
            pump.cancel()
        await rest


__all__ = ["DirectPipes", "Stage", "StageRun"]
