"""The client side of a pipeline run: ask the entry node, stream stdin in, stdout and stderr out.

``run_pipeline`` is what the ``dpipes`` command does once it has an entry node. Exit codes it
computes (the command documents them):

* the last stage's status (its exit code, or 128 + signal), or with ``pipefail`` the last non-zero
  one, leaving out stages stopped by SIGPIPE because a later stage finished early (as ``head``);
* ``EXIT_DPIPES_FAILED`` (125) when dpipes itself failed: a refusal, a lost node, a bus error,
  a stage whose data could not be moved (output that is not objects in an object mode);
* ``EXIT_INTERRUPTED`` (130) after Ctrl-C cancelled every stage.

A last stage on another node than the entry node is read where it runs: the client claims its
output there (:mod:`dpipes.nodes.direct_read`), or through the entry node when it cannot.

What a run comes to (each stage's result, the exit code, the joblog) is :mod:`dpipes.nodes.results`;
how a command finds its entry node is :mod:`dpipes.nodes.entry`. Both are re-exported here.
"""

# A little over 500 lines: one run seen from the client (request, streams, reports, Ctrl-C), kept
# whole so that its ordering rules (reports before the run reply, cancel before it) read in one place.

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from dpipes.bus import codec
from dpipes.bus.client import Client
from dpipes.bus.endpoint import Endpoint, InStream
from dpipes.bus.errors import BusError, DpipesError
from dpipes.nodes.dataflow import Incoming, Outgoing
from dpipes.nodes.entry import EntryKeys, attach, embedded_node, entry_from, entry_keys, known_nodes, local_daemon
from dpipes.nodes.fd_output import write_all, writes_at_once
from dpipes.nodes.fdpass import hand_over
from dpipes.nodes.pipes_frames import PipesFrameError, decode_frame
from dpipes.nodes.protocol import (
    CTL,
    ONE_WAY,
    PIPELINE_PROTOCOL,
    RUN_TIMEOUT_S,
    UNKNOWN_METHOD,
    CancelRequest,
    ControlError,
    ExitReport,
    FailedReport,
    ProgressReport,
    RunReply,
    RunRequest,
    call,
    current_user,
    parse_request,
)
from dpipes.nodes.results import (
    EXIT_DPIPES_FAILED,
    EXIT_INTERRUPTED,
    JOBLOG_COLUMNS,
    RunFailed,
    RunResult,
    StageResult,
    exit_code_of,
    format_joblog,
    run_exit_code,
)

if TYPE_CHECKING:
    from dpipes.nodes.progress import ProgressView

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 15.0  # after Ctrl-C or a failure: how long we wait for the stages' exit reports
STDIN_CHUNK_BYTES = 256 * 1024


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What the user asked for."""

    pipeline: str
    mode: str = "bytes"
    stdin: bool = False
    pipefail: bool = False
    tag: bool = False
    require: tuple[str, ...] = ()
    pipes: dict[str, Any] = dataclasses.field(default_factory=dict)  # extras, assets, partition, context, messages
    pipes_json: str | None = None  # write every stage's Pipes context and messages here, as JSON lines
    workdir: str = ""  # --cwd: where every stage starts (relative: from each stage's default place)
    workflow: dict[str, Any] = dataclasses.field(default_factory=dict)  # a workflow document; then pipeline names it
    edge_format: str = "csv"  # a program's bytes at an edge with a plugin: csv, ndjson or arrow
    direct_read: bool = True  # read the last stage's output at its node, not through the entry node


class _Output:
    """Writes to a file descriptor in order: at once to a file or device, through a worker thread to a
    pipe or socket, so that a slow reader never blocks the loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = asyncio.Lock()
        self.broken = False
        self._inline = writes_at_once(fd)

    async def write(self, data: bytes | memoryview) -> None:
        if self.broken:
            return
        try:
            if self._inline:
                write_all(self.fd, data)
                return
            async with self._lock:
                await asyncio.to_thread(write_all, self.fd, data)
        except BrokenPipeError:
            self.broken = True


class _ViewOutput:
    """Writes through a progress view, which prints above its live table."""

    broken = False

    def __init__(self, view: ProgressView) -> None:
        self.view = view

    async def write(self, data: bytes | memoryview) -> None:
        self.view.write(bytes(data))


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


class _Tagger:
    """Prefixes each stderr line of one stage with ``[stage N prog@node] ``."""

    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self._at_line_start = True

    def feed(self, data: bytes) -> bytes:
        out = bytearray()
        for line in data.splitlines(keepends=True):
            if self._at_line_start:
                out += self.prefix
            out += line
            self._at_line_start = line.endswith(b"\n")
        return bytes(out)


async def run_pipeline(
    entry: str,
    options: RunOptions,
    *,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    on_started: Callable[[RunReply], None] | None = None,
    on_pipes: Callable[[int, Mapping[str, Any]], None] | None = None,
    handle_sigint: bool = True,
    progress: ProgressView | None = None,
    keys: EntryKeys | None = None,
) -> RunResult:
    """Run ``options.pipeline`` through the node at ``entry`` (an ipc:// or tcp:// endpoint).

    Args:
        on_pipes: called with (stage index, the Pipes message, decoded once) for each message as
            it arrives; every stage's messages are also kept in its ``StageResult.pipes``.
        progress: a live view of the run (:mod:`dpipes.nodes.progress`): the nodes send progress
            reports, and the stages' stderr (and our stdout, when it is the view's terminal) is
            written through it.
        keys: over TCP, the keys to attach with (:func:`~dpipes.nodes.entry.entry_keys`).

    Raises:
        SecurityError: the node's key is not the pinned one, or it refused our key.
        RunFailed: the entry node is unreachable or refused the pipeline before it started.
    """
    try:
        client = await attach(entry, keys)  # a SecurityError (a key refused) is no BusError: it goes up as it is
    except BusError as exc:
        raise RunFailed(f"cannot reach a dpipes node at {entry}: {exc}") from None
    try:
        run = _Run(client.endpoint, options, stdin_fd, stdout_fd, stderr_fd, on_started)
        run.on_pipes = on_pipes
        run.keys = keys
        stdout_to_view = progress is not None and _is_terminal(stdout_fd)
        if progress is not None:
            run.view = progress
            run.stderr = _ViewOutput(progress)
            if stdout_to_view:  # our output and the live table share a terminal: print it above the table
                run.stdout = _ViewOutput(progress)
        if entry.startswith("ipc://") and options.mode == "bytes":  # a node on this host: offer our stdio
            fds = {
                **({} if stdout_to_view else {"stdout": stdout_fd}),
                **({"stdin": stdin_fd} if options.stdin else {}),
            }
            run.local_fds = hand_over(entry, fds) if fds else None
        try:
            return await run.run(handle_sigint)
        finally:
            if progress is not None:
                progress.stop()
            if run.direct is not None:
                await run.direct.aclose()
    finally:
        await client.aclose()


class _Run:
    def __init__(
        self,
        ep: Endpoint,
        options: RunOptions,
        stdin_fd: int,
        stdout_fd: int,
        stderr_fd: int,
        on_started: Callable[[RunReply], None] | None,
    ) -> None:
        self.ep = ep
        self.options = options
        self.stdin_fd = stdin_fd
        self.stdout: _Output | _ViewOutput = _Output(stdout_fd)
        self.stderr: _Output | _ViewOutput = _Output(stderr_fd)
        self.on_started = on_started
        self.ctl = f"{ep.node}/{CTL}"
        self.pipeline = ""
        self.stages: list[StageResult] = []
        self.error = ""
        self.interrupted = False
        self._done = asyncio.Event()
        self._readers: set[asyncio.Task[None]] = set()
        self.pipes_json: Any = None
        self.on_pipes: Callable[[int, Mapping[str, Any]], None] | None = None  # each Pipes message as it arrives
        self.local_fds: str | None = None  # the token of our stdin/stdout, handed to the entry node
        self._starting: asyncio.Future[Any] | None = None  # the run request, until answered
        self.refused_reports = 0  # reports to us that were not of their method's shape
        self.view: ProgressView | None = None  # a live view of the run, fed with progress reports
        self.keys: EntryKeys | None = None  # how we attached to the entry node over TCP
        self.direct: Client | None = None  # attached to the last stage's node, whose output we read there
        self._direct_readers: set[asyncio.Task[None]] = set()

    async def run(self, handle_sigint: bool) -> RunResult:
        request = RunRequest(
            pipeline=self.options.pipeline,
            protocol=PIPELINE_PROTOCOL,
            mode=self.options.mode,
            stdin=self.options.stdin,
            require=tuple(self.options.require),
            user=current_user(),
            pipes=dict(self.options.pipes),
            local_fds=self.local_fds or "",
            cwd=_cwd(),
            workdir=self.options.workdir,
            progress=self.view is not None,
            workflow=self.options.workflow,
            edge_format=self.options.edge_format,
            direct_read=self.options.direct_read,
        )
        loop = asyncio.get_running_loop()
        if handle_sigint:  # before asking: a Ctrl-C while the nodes start the stages is not lost
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
        try:
            return await self._started(request)
        finally:
            if handle_sigint:
                loop.remove_signal_handler(signal.SIGINT)

    async def _started(self, request: RunRequest) -> RunResult:
        self._starting = asyncio.ensure_future(call(self.ep, self.ctl, request, timeout=RUN_TIMEOUT_S))
        try:
            reply: RunReply = await self._starting
        except ControlError as exc:  # refused, with its code
            raise RunFailed(str(exc), code=exc.code) from None
        except BusError as exc:  # no answer
            raise RunFailed(str(exc)) from None
        except asyncio.CancelledError:
            if not self.interrupted or not self._starting.cancelled():
                raise
            return RunResult("", [], EXIT_INTERRUPTED, "interrupted before the pipeline started")  # twice
        self.pipeline = reply.pipeline
        self.stages = [StageResult(s.index, s.node, list(s.argv), placed=s.placed, offer=s.offer) for s in reply.stages]
        for stage in self.stages:
            log.info("stage %d %s@%s: %s", stage.index, stage.argv[0], stage.node, stage.placement() or "placed")
        if self.view is not None:
            self.view.start(self.stages)
        if self.options.pipes_json:
            self.pipes_json = open(self.options.pipes_json, "w", encoding="utf-8")  # noqa: ASYNC230 (once, at start; closed in run)
            for s in reply.stages:
                self._json_line({"stage": s.index, "node": s.node, "context": s.context})
        if self.on_started is not None:
            self.on_started(reply)
        if self.interrupted:  # Ctrl-C came while the stages were starting: cancel them now
            self._cancel_for_interrupt()
        tasks = [asyncio.create_task(self._accept(self.ep)), asyncio.create_task(self._control())]
        if reply.read_token:  # the last stage holds its output until we say where we read it
            tasks.append(asyncio.create_task(self._claim_output(reply)))
        if self.options.stdin and not reply.stdin_direct:  # else the first stage reads our stdin itself
            tasks.append(asyncio.create_task(self._feed_stdin(reply.stages[0].addr)))
        try:
            await self._done.wait()
            if self._readers:
                _done, open_streams = await asyncio.wait(self._readers, timeout=CANCEL_WAIT_S)
                if open_streams and not self.interrupted and not self.error:  # a node ends a stage's
                    # streams as it reports its exit, even a worker's that died mid-stream: a bug
                    names = ", ".join(sorted(task.get_name() for task in open_streams))
                    log.warning("gave up after %g s on streams that never ended: %s", CANCEL_WAIT_S, names)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for reader in self._readers:
                reader.cancel()
            if self.pipes_json is not None:
                self.pipes_json.close()
        code = run_exit_code(
            self.stages, interrupted=self.interrupted, error=self.error, pipefail=self.options.pipefail
        )
        return RunResult(self.pipeline, self.stages, code, self.error)

    def _json_line(self, obj: dict[str, Any]) -> None:
        self.pipes_json.write(json.dumps(obj, separators=(",", ":"), allow_nan=True) + "\n")
        self.pipes_json.flush()

    async def _on_pipes(self, stage: StageResult | None, tag: bytes, frame: Any) -> None:
        """One Pipes frame from a stage, decoded once: kept by the stage's handler, logged now."""
        item = decode_frame(frame)
        if stage is None:
            return
        if isinstance(item, PipesFrameError):
            stage.pipes.handle_frame_error(item)
            await self.stderr.write(tag + f"Pipes: {item}\n".encode())
            return
        stage.pipes.handle_message(item)
        if self.on_pipes is not None:
            self.on_pipes(stage.index, item)
        if self.view is not None:
            from dpipes.nodes.progress import progress_of

            if (fraction := progress_of(item)) is not None:
                self.view.fraction(stage.index, fraction)
        if self.pipes_json is not None:
            self._json_line({"stage": stage.index, "node": stage.node, "message": item})
        method, params = item.get("method"), item.get("params") or {}
        if method == "log":
            await self.stderr.write(tag + f"{params.get('level', 'INFO')} {params.get('message', '')}\n".encode())
        elif method == "closed" and params.get("exception"):
            await self.stderr.write(tag + f"Pipes closed with {stage.pipes_exception}\n".encode())

    def _interrupt(self) -> None:
        if self.interrupted:  # a second Ctrl-C: stop waiting
            self._done.set()
            if self._starting is not None and not self._starting.done():
                self._starting.cancel()  # the nodes cancel the run once we have gone
            return
        self.interrupted = True
        if self.pipeline:  # else the run is still starting: cancelled as soon as it has started
            self._cancel_for_interrupt()

    def _cancel_for_interrupt(self) -> None:
        asyncio.get_running_loop().call_later(CANCEL_WAIT_S, self._done.set)
        self._readers.add(asyncio.create_task(self._cancel("interrupted by the user (Ctrl-C)"), name="cancel"))

    async def _cancel(self, reason: str) -> None:
        with contextlib.suppress(DpipesError):  # the node is gone, or refused: the reports say the rest
            await call(self.ep, self.ctl, CancelRequest(pipeline=self.pipeline, reason=reason), timeout=CANCEL_WAIT_S)

    def _check_done(self) -> None:
        if all(s.reported for s in self.stages):
            self._done.set()

    async def _control(self) -> None:
        """Exit reports and failures, as REQUEST messages to our endpoint."""
        try:
            while True:
                msg = await self.ep.recv()
                if not isinstance(msg, codec.Request):
                    continue
                try:
                    report = parse_request(msg.method, msg.body)
                    if not isinstance(report, ExitReport | FailedReport | ProgressReport):
                        raise ControlError(UNKNOWN_METHOD, f"a dpipes client takes no {msg.method!r} request")
                except ControlError as exc:
                    if msg.method not in ONE_WAY:
                        self._refuse(msg, exc)
                    continue
                if isinstance(report, ProgressReport):  # one-way: no answer
                    if report.pipeline == self.pipeline and self.view is not None:
                        self.view.update(report.stage, report.bytes_in, report.bytes_out)
                    continue
                self.ep.reply(msg, {})
                if report.pipeline != self.pipeline:
                    continue
                if isinstance(report, ExitReport):
                    self._on_exit(report)
                elif not self.error:
                    self._on_failed(report)
        except BusError as exc:  # our node is gone: nothing more will come
            if not self.error:
                self.error = str(exc)
            self._done.set()

    def _refuse(self, msg: codec.Request, exc: ControlError) -> None:
        """Answer a report that is not of its method's shape (coded); logged once per run."""
        self.ep.reply(msg, exc.body(), error=str(exc))
        self.refused_reports += 1
        level = logging.WARNING if self.refused_reports == 1 else logging.DEBUG
        log.log(level, "refused a %s report from %s: %s", msg.method[:64], msg.src, exc)

    def _on_exit(self, report: ExitReport) -> None:
        if not 0 <= report.stage < len(self.stages):
            return
        stage = self.stages[report.stage]
        stage.code, stage.signal, stage.status = report.code, report.signal, report.status
        stage.sigpipe = report.sigpipe
        stage.error, stage.cancelled, stage.stderr_tail = report.error, report.cancelled, report.stderr_tail
        stage.started, stage.ended = report.started, report.ended
        stage.bytes_in, stage.bytes_out = report.bytes_in, report.bytes_out
        stage.reported = True
        if self.view is not None:
            self.view.exited(stage)
        self._check_done()

    def _on_failed(self, report: FailedReport) -> None:
        self.error = report.error or "the pipeline failed"
        if self.stages and self.stages[-1].index in report.lost:  # its node is gone: so is what we read there
            for reader in self._direct_readers:
                reader.cancel()
        for index in report.lost:
            if 0 <= index < len(self.stages) and not self.stages[index].reported:  # else its own report stands
                lost = self.stages[index]
                lost.status, lost.reported = f"lost with node {lost.node}", True
        asyncio.get_running_loop().call_later(CANCEL_WAIT_S, self._done.set)
        self._check_done()

    async def _accept(self, ep: Endpoint, readers: set[asyncio.Task[None]] | None = None) -> None:
        last = self.stages[-1]
        last_addr = f"{last.node}/{self.pipeline}.{last.index}"
        while True:
            stream = await ep.accept()
            task = asyncio.create_task(self._read(stream, stream.src == last_addr), name=f"from {stream.src}")
            self._readers.add(task)
            if readers is not None:
                readers.add(task)

    async def _claim_output(self, reply: RunReply) -> None:
        """Claim the last stage's output, at its node if we can (:mod:`dpipes.nodes.direct_read`),
        and read it where it then comes."""
        from dpipes.nodes.direct_read import claim_output

        try:
            self.direct = await claim_output(self.ep, reply, self.keys)
        except DpipesError as exc:  # nobody will read the output: the run cannot end well
            if not self.error:
                self.error = f"the output of stage {reply.stages[-1].index} could not be claimed: {exc}"
            await self._cancel(self.error)
            return
        if self.direct is not None:
            await self._accept(self.direct.endpoint, self._direct_readers)

    async def _read(self, stream: InStream, may_be_stdout: bool) -> None:
        index = _stage_index(stream.src)
        stage = self.stages[index] if 0 <= index < len(self.stages) else None
        tagger = (
            _Tagger(f"[stage {index} {stage.argv[0]}@{stage.node}] ".encode()) if stage and self.options.tag else None
        )
        incoming = Incoming(self.options.mode, where="the output of dpipes")
        try:
            pipes_tag = f"[stage {index} {stage.argv[0]}@{stage.node}] ".encode() if stage else b""
            while (msg := await stream.read()) is not None:
                if isinstance(msg, codec.Pipes):
                    for frame in msg.frames:
                        await self._on_pipes(stage, pipes_tag, frame)
                    continue
                if isinstance(msg, codec.Stderr) or not may_be_stdout:
                    for frame in msg.frames:  # type: ignore[attr-defined]
                        await self.stderr.write(tagger.feed(bytes(frame)) if tagger else frame)
                    continue
                if self.stdout.broken:
                    stream.cancel("the output of dpipes was closed")
                    return
                for data in incoming.data(msg):
                    await self.stdout.write(data)
        except DpipesError as exc:
            if not self.error and not self.interrupted:
                log.debug("stream from %s failed: %s", stream.src, exc)

    async def _feed_stdin(self, addr: str) -> None:
        out = self.ep.open_stream(addr)
        meta: dict[str, Any] = {}
        if self.options.mode != "bytes":  # objects carry where they came from; bytes carry nothing
            from dpipes.nodes.objects import make_metadata

            meta = make_metadata(addr=socket.gethostname(), port=0, service="dpipes", node=self.ep.node, stage=-1)
        outgoing = Outgoing(self.options.mode, where="the input of dpipes (stdin)", meta=meta)
        try:
            while True:
                data = await asyncio.to_thread(_read_some, self.stdin_fd, STDIN_CHUNK_BYTES)
                if not data:
                    break
                for message in outgoing.messages(data):
                    await out.send(message)
            for message in outgoing.end():
                await out.send(message)
            await out.close()
        except BusError:
            pass  # the first stage stopped reading (it exited, or was cancelled): as a closed pipe
        except DpipesError as exc:  # our own input is not objects: nothing sensible can run
            out.cancel(str(exc))
            if not self.error:
                self.error = str(exc)
            await self._cancel(str(exc))


def _cwd() -> str:
    """Our working directory, where stages on our host start; "" when it is gone (deleted)."""
    try:
        return os.getcwd()
    except OSError:
        return ""


def _read_some(fd: int, size: int) -> bytes:
    try:
        return os.read(fd, size)
    except OSError:
        return b""


def _stage_index(addr: str) -> int:
    name = codec.split_addr(addr)[1]
    try:
        return int(name.rsplit(".", 1)[1])
    except (IndexError, ValueError):
        return -1


__all__ = [
    "EXIT_DPIPES_FAILED",
    "EXIT_INTERRUPTED",
    "JOBLOG_COLUMNS",
    "EntryKeys",
    "RunFailed",
    "RunOptions",
    "RunResult",
    "StageResult",
    "embedded_node",
    "entry_from",
    "entry_keys",
    "exit_code_of",
    "format_joblog",
    "known_nodes",
    "local_daemon",
    "run_pipeline",
]
