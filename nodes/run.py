"""The client side of a pipeline run: ask the entry node, stream stdin in, stdout and stderr out.

``run_pipeline`` is what the ``dpipes`` command does once it has an entry node. Exit codes it
computes (the command documents them):

* the last stage's status (its exit code, or 128 + signal), or with ``pipefail`` the last non-zero
  one, leaving out stages stopped by SIGPIPE because a later stage finished early (as ``head``);
* ``EXIT_DPIPES_FAILED`` (125) when dpipes itself failed: a refusal, a lost node, a bus error,
  a stage whose data could not be moved (output that is not objects in an object mode);
* ``EXIT_INTERRUPTED`` (130) after Ctrl-C cancelled every stage.

Why this module is over 500 lines: the client side of a run is about 500 of them; the rest
(``entry_from``, ``local_daemon``, ``embedded_node``, ``known_nodes``) is how a command finds its
entry node, which belongs in :mod:`dpipes.nodes.entry` and moves there once the work under way in
that module has landed (moving it now would collide with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dpipes.bus import codec
from dpipes.bus.client import Client
from dpipes.bus.endpoint import Endpoint, InStream
from dpipes.bus.errors import BusError, DpipesError
from dpipes.nodes.dataflow import Incoming, Outgoing
from dpipes.nodes.fdpass import hand_over
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
    InfoReply,
    InfoRequest,
    NodeEntry,
    ProgressReport,
    RunReply,
    RunRequest,
    call,
    current_user,
    parse_request,
)

if TYPE_CHECKING:
    from dpipes.nodes.progress import ProgressView

log = logging.getLogger(__name__)

EXIT_DPIPES_FAILED = 125
EXIT_INTERRUPTED = 130
CANCEL_WAIT_S = 15.0  # after Ctrl-C or a failure: how long we wait for the stages' exit reports
STDIN_CHUNK_BYTES = 256 * 1024


class RunFailed(DpipesError):
    """The pipeline could not run, or failed as a whole (refusal, lost node); the message says why.

    ``code`` is the entry node's error code (:mod:`dpipes.nodes.protocol`, *Errors*) when it
    answered with one, else "".
    """

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


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


@dataclasses.dataclass
class StageResult:
    index: int
    node: str
    argv: list[str]
    code: int = -1
    signal: int = 0
    status: str = "did not report"
    sigpipe: bool = False
    error: str = ""  # what went wrong moving its data (the output is then incomplete)
    cancelled: str = ""  # why it was cancelled (Ctrl-C, a failed neighbour, a lost node, ...)
    stderr_tail: str = ""
    reported: bool = False
    materializations: list[str] = dataclasses.field(default_factory=list)
    checks: list[str] = dataclasses.field(default_factory=list)
    pipes_exception: str = ""  # the stage's Pipes session closed with this exception
    pipes_errors: int = 0  # lines that were not valid Pipes messages
    started: float = 0.0  # wall clock on its node when its program started; 0: unknown
    ended: float = 0.0  # ... and when it exited
    bytes_in: int = -1  # bytes its node wrote to its stdin; -1: not seen (a kernel pipe), or unknown
    bytes_out: int = -1  # bytes its node read from its stdout
    placed: str = ""  # why it went to its node: pinned, offered, local ("" from an older node)
    offer: str = ""  # the node's offer it matched, when offered

    def placement(self) -> str:
        """Why this stage ran on its node, for a person ("" when the node did not say)."""
        program = self.argv[0] if self.argv else "?"
        if self.placed == "pinned":
            return "pinned"
        if self.placed == "offered":
            shown = f" as {self.offer!r}" if self.offer and self.offer != program else ""
            return f"offered by {self.node}{shown}"
        if self.placed == "local":
            return f"local: no node offers {program!r}" if "/" not in program else "local: a path here"
        return ""

    @property
    def shell_code(self) -> int:
        if not self.reported:
            return EXIT_DPIPES_FAILED
        return 128 + self.signal if self.signal else self.code

    def describe(self) -> str:
        text = f"stage {self.index} {self.argv[0] if self.argv else '?'}@{self.node}: {self.status}"
        if self.sigpipe and self.signal:
            text += " (its reader finished early)"
        if self.error and not self.sigpipe:
            text += f" ({self.error})"
        elif self.cancelled and not self.sigpipe:
            text += f" (cancelled: {self.cancelled})"
        if self.pipes_exception:
            text += f" (Pipes closed with {self.pipes_exception})"
        return text

    def pipes_summary(self) -> str:
        """Materializations and checks this stage reported, or "" when none."""
        parts = []
        if self.materializations:
            parts.append(f"materialized {', '.join(self.materializations)}")
        if self.checks:
            parts.append(f"checks {', '.join(self.checks)}")
        if self.pipes_errors:
            parts.append(f"{self.pipes_errors} invalid Pipes line(s)")
        return "; ".join(parts)


@dataclasses.dataclass
class RunResult:
    pipeline: str
    stages: list[StageResult]
    exit_code: int
    error: str = ""


def exit_code_of(stages: list[StageResult], *, pipefail: bool) -> int:
    """The pipeline's exit code from its stages, as a shell computes it.

    With ``pipefail``, a stage left out is only one its reader's early end *killed* (SIGPIPE, or
    our cancel of it): a stage that exited with a code of its own failed, whichever stage
    finished first (``false | true`` is 1, as in bash, even when ``true`` ended before ``false``
    had its EOF acknowledged).
    """
    if not stages:
        return 0
    if pipefail:
        for stage in reversed(stages):
            stopped_by_reader = stage.sigpipe and stage.signal != 0 and stage is not stages[-1]
            if stage.shell_code != 0 and not stopped_by_reader:
                return stage.shell_code
        return 0
    return stages[-1].shell_code


JOBLOG_COLUMNS = ("Stage", "Node", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal", "Command")
"""The joblog's header: GNU parallel's ``--joblog`` columns, with the stage (from 0) and its node
for parallel's ``Seq`` and ``Host``."""


def format_joblog(stages: list[StageResult]) -> str:
    """The run as a joblog: a header, then one tab-separated line per stage (``-`` where unknown).

    ``Starttime``: Unix seconds on the stage's node when its program started; ``JobRuntime``:
    seconds it ran; ``Send`` / ``Receive``: bytes its node wrote to its stdin / read from its
    stdout (``-`` for an edge that is a kernel pipe, which no node sees); ``Exitval``: its exit
    code (``-`` when it did not report, as a stage of a lost node); ``Signal``: what killed it, or
    0; ``Command``: its argv in shell words.
    """
    lines = ["\t".join(JOBLOG_COLUMNS)]
    for s in stages:
        known = s.reported and s.started > 0
        lines.append(
            "\t".join(
                (
                    str(s.index),
                    s.node,
                    f"{s.started:.3f}" if known else "-",
                    f"{max(0.0, s.ended - s.started):.3f}" if known and s.ended else "-",
                    str(s.bytes_in) if s.bytes_in >= 0 else "-",
                    str(s.bytes_out) if s.bytes_out >= 0 else "-",
                    str(s.code) if s.reported else "-",
                    str(s.signal),
                    shlex.join(s.argv).replace("\t", " ").replace("\n", " "),
                )
            )
        )
    return "\n".join(lines) + "\n"


class _Output:
    """Writes to a file descriptor in order: at once to a file or device, through a worker thread to a
    pipe or socket, so that a slow reader never blocks the loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = asyncio.Lock()
        self.broken = False
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        # Files and devices (/dev/null, a terminal) take a write at once; pipes and sockets may not.
        self._inline = stat.S_ISREG(mode) or stat.S_ISCHR(mode)

    async def write(self, data: bytes | memoryview) -> None:
        if self.broken:
            return
        try:
            if self._inline:
                _write_all(self.fd, data)
                return
            async with self._lock:
                await asyncio.to_thread(_write_all, self.fd, data)
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


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
    on_pipes: Callable[[int, bytes], None] | None = None,
    handle_sigint: bool = True,
    progress: ProgressView | None = None,
) -> RunResult:
    """Run ``options.pipeline`` through the node at ``entry`` (an ipc:// or tcp:// endpoint).

    Args:
        on_pipes: called with (stage index, the PIPES frame: JSON ``{"message": ...}`` or
            ``{"error": ..., "line": ...}``) for each Pipes message as it arrives.
        progress: a live view of the run (:mod:`dpipes.nodes.progress`): the nodes send progress
            reports, and the stages' stderr (and our stdout, when it is the view's terminal) is
            written through it.

    Raises:
        RunFailed: the entry node is unreachable or refused the pipeline before it started.
    """
    try:
        client = Client(entry)
        await client.start()
    except BusError as exc:
        raise RunFailed(f"cannot reach a dpipes node at {entry}: {exc}") from None
    try:
        run = _Run(client.endpoint, options, stdin_fd, stdout_fd, stderr_fd, on_started)
        run.on_pipes = on_pipes
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
        self.on_pipes: Callable[[int, bytes], None] | None = None  # each Pipes frame as it arrives
        self.local_fds: str | None = None  # the token of our stdin/stdout, handed to the entry node
        self._starting: asyncio.Future[Any] | None = None  # the run request, until answered
        self.refused_reports = 0  # reports to us that were not of their method's shape
        self.view: ProgressView | None = None  # a live view of the run, fed with progress reports

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
        tasks = [asyncio.create_task(self._accept()), asyncio.create_task(self._control())]
        if self.options.stdin and not reply.stdin_direct:  # else the first stage reads our stdin itself
            tasks.append(asyncio.create_task(self._feed_stdin(reply.stages[0].addr)))
        try:
            await self._done.wait()
            if self._readers:
                await asyncio.wait(self._readers, timeout=CANCEL_WAIT_S)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for reader in self._readers:
                reader.cancel()
            if self.pipes_json is not None:
                self.pipes_json.close()
        broken = [s for s in self.stages if s.error and not s.sigpipe]
        if self.interrupted:
            code = EXIT_INTERRUPTED
        elif self.error or broken:  # a stage's data could not be moved: the output is not complete
            code = EXIT_DPIPES_FAILED
        else:
            code = exit_code_of(self.stages, pipefail=self.options.pipefail)
            if code == 0 and any(s.pipes_exception for s in self.stages):
                code = 1  # a stage's Pipes session failed: so did the run, whatever its exit code
        return RunResult(self.pipeline, self.stages, code, self.error)

    def _json_line(self, obj: dict[str, Any]) -> None:
        self.pipes_json.write(json.dumps(obj, separators=(",", ":"), allow_nan=True) + "\n")
        self.pipes_json.flush()

    async def _on_pipes(self, stage: StageResult | None, tag: bytes, frame: Any) -> None:
        """One Pipes message from a stage: log it now, remember what the summary needs."""
        frame = bytes(frame)
        if self.on_pipes is not None and stage is not None:
            self.on_pipes(stage.index, frame)
        if self.view is not None and stage is not None:
            from dpipes.nodes.progress import progress_of

            if (fraction := progress_of(frame)) is not None:
                self.view.fraction(stage.index, fraction)
        try:
            item = json.loads(frame)
        except ValueError:
            return  # the node validated it; a bad frame here is a bug elsewhere, not user data
        if stage is None:
            return
        if "error" in item:
            stage.pipes_errors += 1
            await self.stderr.write(tag + f"Pipes: {item['error']}\n".encode())
            return
        message = item.get("message", {})
        if self.pipes_json is not None:
            self._json_line({"stage": stage.index, "node": stage.node, "message": message})
        method, params = message.get("method"), message.get("params") or {}
        if method == "log":
            await self.stderr.write(tag + f"{params.get('level', 'INFO')} {params.get('message', '')}\n".encode())
        elif method == "report_asset_materialization":
            stage.materializations.append(str(params.get("asset_key") or "(default asset)"))
        elif method == "report_asset_check":
            outcome = "passed" if params.get("passed") else f"failed ({params.get('severity', 'ERROR')})"
            stage.checks.append(f"{params.get('check_name')}: {outcome}")
        elif method == "closed" and params.get("exception"):
            exc = params["exception"]
            name, text = str(exc.get("name") or "an exception"), str(exc.get("message") or "")
            stage.pipes_exception = text if text.startswith(name) else f"{name}: {text}".rstrip(": ")
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
        self._readers.add(asyncio.create_task(self._cancel("interrupted by the user (Ctrl-C)")))

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
        for index in report.lost:
            if 0 <= index < len(self.stages):
                lost = self.stages[index]
                lost.status, lost.reported = f"lost with node {lost.node}", True
        asyncio.get_running_loop().call_later(CANCEL_WAIT_S, self._done.set)
        self._check_done()

    async def _accept(self) -> None:
        last = self.stages[-1]
        last_addr = f"{last.node}/{self.pipeline}.{last.index}"
        while True:
            stream = await self.ep.accept()
            task = asyncio.create_task(self._read(stream, stream.src == last_addr))
            self._readers.add(task)

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


LOCAL_PROBE_TIMEOUT_S = 1.0  # a live local daemon answers ATTACH at once
STATIC_PEER_WAIT_S = 2.0  # an embedded node gives its configured peers this long to link


def entry_from(node: str) -> str:
    """``HOST:PORT`` (or a full ``tcp://`` / ``ipc://`` endpoint) -> the endpoint to attach to."""
    if node.startswith(("tcp://", "ipc://")):
        return node
    host, sep, port = node.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RunFailed(f"bad node address {node!r}: write HOST:PORT (or tcp://HOST:PORT, ipc://PATH)")
    return f"tcp://{host}:{port}"


async def local_daemon() -> str | None:
    """The ipc endpoint of this host's running daemon, or None when none answers."""
    try:
        from dpipes.nodes import paths

        endpoint = paths.local_endpoint(paths.runtime_dir())
    except (ImportError, OSError, DpipesError):
        return None
    # A plain connect says whether a daemon listens there (a dead one leaves its socket file
    # behind: ECONNREFUSED), in a fraction of a millisecond instead of a whole bus attachment.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(LOCAL_PROBE_TIMEOUT_S)
        probe.connect(endpoint.removeprefix("ipc://"))
    except OSError:
        return None
    finally:
        probe.close()
    return endpoint


@contextlib.asynccontextmanager
async def embedded_node() -> Any:
    """A node inside this process for the duration of one command (when no daemon runs)."""
    from dpipes.nodes.config import load_config
    from dpipes.nodes.node import Node

    config = load_config()
    async with Node(config, listen="tcp://127.0.0.1:0") as node:
        if config.nodes:
            await asyncio.gather(
                *(
                    node.hub.connect_peer(f"tcp://{p.host}:{p.port}", timeout=STATIC_PEER_WAIT_S)
                    for p in config.nodes.values()
                ),
                return_exceptions=True,
            )
        yield node


async def known_nodes(entry: str) -> list[NodeEntry]:
    """Every node the node at ``entry`` knows (itself first): name, endpoint, programs, source,
    last seen, up.

    Raises:
        RunFailed: nothing answers at ``entry``, or not as a node does.
    """
    try:
        async with Client(entry) as client:
            ep = client.endpoint
            reply: InfoReply = await call(ep, f"{ep.node}/{CTL}", InfoRequest(), timeout=RUN_TIMEOUT_S)
    except ControlError as exc:
        raise RunFailed(f"cannot ask the dpipes node at {entry}: {exc}", code=exc.code) from None
    except BusError as exc:
        raise RunFailed(f"cannot ask the dpipes node at {entry}: {exc}") from None
    return list(reply.nodes)
