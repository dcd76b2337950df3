"""The orchestration-side Python API of Dagster Pipes, in the shape of Dagster's own.

Two ways in:

``open_pipes_session``
    For a caller that starts the external process itself. The session injects the context (a
    :class:`~dpipes.nodes.pipes.PipesContextInjector`: env, file, temp file), opens a message
    channel (a :class:`PipesMessageReader`: a FIFO read as messages arrive, a temp file read at
    the end, or both a FIFO and the bus for programs using
    :class:`~dpipes.bus.pipes_writer.PipesBusMessageWriter`), and hands out the bootstrap
    environment variables to give the process. Every message lands in the session's
    :class:`PipesMessageHandler`, sorted by kind and kept in order::

        async with open_pipes_session(context_data=make_context_data(run_id="r1")) as session:
            proc = await asyncio.create_subprocess_exec(*argv, env={**os.environ, **session.get_bootstrap_env_vars()})
            await proc.wait()
        session.message_handler.materializations

``run_pipes``
    Runs a dpipes pipeline text (``"python3@beta job.py"``) on any node: a given ``HOST:PORT`` or
    ``ipc://`` endpoint, else a node embedded in this process. The nodes do the Pipes bootstrap of
    every stage; this collects the stages' messages, stdout and stderr and returns a frozen
    :class:`PipesResult`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from dpipes.bus.hub import Hub
from dpipes.bus.pipes import MAX_LINE_BYTES, PIPES_CONTEXT_ENV_VAR, PIPES_MESSAGES_ENV_VAR, encode_bootstrap
from dpipes.nodes.pipes import (
    DRAIN_TIMEOUT_S,
    PipesBadLine,
    PipesBusReader,
    PipesContextInjector,
    PipesEnvContextInjector,
    PipesFifoReader,
    PipesFileContextInjector,
    PipesLine,
    PipesLineSplitter,
    PipesRecord,
)

if TYPE_CHECKING:
    from dpipes.nodes.protocol import RunReply

__all__ = [
    "PipesBusMessageReader",
    "PipesContextInjector",
    "PipesEnvContextInjector",
    "PipesExceptionInfo",
    "PipesFifoMessageReader",
    "PipesFileContextInjector",
    "PipesMessageHandler",
    "PipesMessageReader",
    "PipesResult",
    "PipesSession",
    "PipesStageResult",
    "PipesTempFileContextInjector",
    "PipesTempFileMessageReader",
    "open_pipes_session",
    "run_pipes",
]

TEMP_PREFIX: Final = "dpipes-pipes-"
READ_CHUNK_BYTES: Final = 1024 * 1024


# ------------------------------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True)
class PipesExceptionInfo:
    """The exception a Pipes session closed with (``closed`` params ``exception``)."""

    name: str
    message: str
    stack: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, exc: Mapping[str, Any]) -> PipesExceptionInfo:
        """Build it from the ``exception`` object of a ``closed`` message."""
        stack = exc.get("stack") or ()
        return cls(
            name=str(exc.get("name") or "Exception"),
            message=str(exc.get("message") or ""),
            stack=tuple(str(s) for s in stack) if isinstance(stack, list | tuple) else (),
        )

    def __str__(self) -> str:
        # dagster-pipes' message is already "Name: text" (traceback.format_exception_only)
        text = self.message.strip()
        return text if text.startswith(self.name) else f"{self.name}: {text}".rstrip(": ")


class PipesMessageHandler:
    """Collects the messages of one external process, in arrival order, sorted by kind."""

    def __init__(self) -> None:
        self._messages: list[Mapping[str, Any]] = []
        self._bad_lines: list[PipesBadLine] = []

    def handle_message(self, message: Mapping[str, Any]) -> None:
        """Take one validated Pipes message (the whole JSON object)."""
        self._messages.append(message)

    def handle_record(self, record: PipesRecord) -> None:
        """Take one record of a channel: a message, or a line that was not one."""
        if isinstance(record, PipesLine):
            self.handle_message(record.message.raw)
        else:
            self._bad_lines.append(record)

    def _params(self, method: str) -> list[Mapping[str, Any]]:
        return [m.get("params") or {} for m in self._messages if m.get("method") == method]

    @property
    def messages(self) -> list[Mapping[str, Any]]:
        """Every message, in order."""
        return list(self._messages)

    @property
    def bad_lines(self) -> list[PipesBadLine]:
        """Lines of the channel that were not valid Pipes messages."""
        return list(self._bad_lines)

    @property
    def received_opened(self) -> bool:
        return any(m.get("method") == "opened" for m in self._messages)

    @property
    def received_closed(self) -> bool:
        return any(m.get("method") == "closed" for m in self._messages)

    @property
    def logs(self) -> list[Mapping[str, Any]]:
        """``log`` params: ``{"message", "level"}``."""
        return self._params("log")

    @property
    def materializations(self) -> list[Mapping[str, Any]]:
        """``report_asset_materialization`` params: ``{"asset_key", "metadata", "data_version"}``."""
        return self._params("report_asset_materialization")

    @property
    def checks(self) -> list[Mapping[str, Any]]:
        """``report_asset_check`` params: ``{"asset_key", "check_name", "passed", "severity", "metadata"}``."""
        return self._params("report_asset_check")

    @property
    def custom_messages(self) -> list[Any]:
        """The payloads of ``report_custom_message``."""
        return [p.get("payload") for p in self._params("report_custom_message")]

    @property
    def exception(self) -> PipesExceptionInfo | None:
        """The exception of the ``closed`` message, if the session closed with one."""
        for params in self._params("closed"):
            if exc := params.get("exception"):
                return PipesExceptionInfo.from_params(exc)
        return None


# ----------------------------------------------------------------------------------------- injectors


class PipesTempFileContextInjector(PipesContextInjector):
    """The context is a JSON file in a fresh temporary directory; :meth:`close` removes both."""

    def __init__(self, *, tmpdir: str | os.PathLike[str] | None = None) -> None:
        self._tmpdir = os.fspath(tmpdir) if tmpdir is not None else None
        self._dir: str | None = None

    def inject(self, context: Mapping[str, Any]) -> dict[str, Any]:
        self._dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self._tmpdir)
        path = os.path.join(self._dir, "context.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(context, f)
        return {"path": path}

    def close(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


# ------------------------------------------------------------------------------------------- readers


class PipesMessageReader(ABC):
    """Opens the channel the external process writes its messages to, feeding a handler."""

    @abstractmethod
    def read_messages(self, handler: PipesMessageHandler) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        """Open the channel; yield its params for ``DAGSTER_PIPES_MESSAGES``; on exit deliver the rest."""


class PipesFifoMessageReader(PipesMessageReader):
    """A FIFO read on the event loop as each message is written (``{"path": <fifo>}``).

    Args:
        tmpdir: where the FIFO's private directory is made (default: the system's).
        include_stdio_in_messages: ask dagster-pipes to forward the process's own stdout/stderr.
        drain_timeout_s: at the end, how long to wait for writers still holding the FIFO open.
    """

    def __init__(
        self,
        *,
        tmpdir: str | os.PathLike[str] | None = None,
        include_stdio_in_messages: bool = False,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self._tmpdir = os.fspath(tmpdir) if tmpdir is not None else None
        self._include_stdio = include_stdio_in_messages
        self._drain_timeout_s = drain_timeout_s
        self._max_line_bytes = max_line_bytes

    @contextlib.asynccontextmanager
    async def read_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        directory = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self._tmpdir)
        fifo: PipesFifoReader | None = None
        try:
            fifo = PipesFifoReader(
                os.path.join(directory, "messages"),
                on_record=handler.handle_record,
                max_line_bytes=self._max_line_bytes,
            )
            fifo.start()
            async with self._more_channels(handler) as more:
                params = dict(fifo.params)
                for channel in more:
                    params.update(channel.params)
                if self._include_stdio:
                    params["include_stdio_in_messages"] = True
                yield params
                # The caller's process has ended: read what it wrote, on every channel, to the end.
                await asyncio.gather(*(r.drain(timeout_s=self._drain_timeout_s) for r in (fifo, *more)))
        finally:
            if fifo is not None:
                fifo.close()
            shutil.rmtree(directory, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def _more_channels(self, handler: PipesMessageHandler) -> AsyncIterator[list[PipesBusReader]]:
        """Channels read beside the FIFO, for the same handler (none here)."""
        yield []


class PipesBusMessageReader(PipesFifoMessageReader):
    """A FIFO and the bus at once: ``{"path": <fifo>, "dpipes_bus": {"hub": ..., "to": ...}}``.

    An unmodified dagster-pipes program writes to the FIFO; one whose message writer is
    :class:`~dpipes.bus.pipes_writer.PipesBusMessageWriter` sends its messages over the bus to a
    :class:`~dpipes.nodes.pipes.PipesBusReader` on a hub this reader starts in-process (``ipc://``
    only, in a private temporary directory); both feed the session's handler. At the end both are
    drained, the hub is closed and every file is removed.

    Args:
        tmpdir: where the FIFO's private directory is made (default: the system's).
        include_stdio_in_messages: ask dagster-pipes to forward the process's own stdout/stderr.
        drain_timeout_s: at the end, how long to wait for writers still holding a channel open.
        max_line_bytes: longest message accepted, on either channel.
    """

    @contextlib.asynccontextmanager
    async def _more_channels(self, handler: PipesMessageHandler) -> AsyncIterator[list[PipesBusReader]]:
        # ipc only (the external process runs on this machine), in the hub's own private temp dir:
        # not tmpdir, since an ipc:// path is limited to 107 bytes.
        async with Hub(f"pipes-{uuid.uuid4().hex[:12]}", tcp=None) as hub:
            bus = PipesBusReader(
                hub.endpoint("pipes"),
                hub.ipc_endpoint,
                on_record=handler.handle_record,
                max_line_bytes=self._max_line_bytes,
            )
            bus.start()
            try:
                yield [bus]
            finally:
                bus.close()


class PipesTempFileMessageReader(PipesMessageReader):
    """A regular temporary file (``{"path": <file>}``), read once when the session ends."""

    def __init__(self, *, tmpdir: str | os.PathLike[str] | None = None, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._tmpdir = os.fspath(tmpdir) if tmpdir is not None else None
        self._max_line_bytes = max_line_bytes

    @contextlib.asynccontextmanager
    async def read_messages(self, handler: PipesMessageHandler) -> AsyncIterator[dict[str, Any]]:
        directory = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=self._tmpdir)
        path = os.path.join(directory, "messages")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            yield {"path": path}
            splitter = PipesLineSplitter(max_line_bytes=self._max_line_bytes)
            with open(path, "rb") as f:  # noqa: ASYNC230 (a local file, read once at the end)
                while chunk := f.read(READ_CHUNK_BYTES):
                    _deliver(handler, splitter.feed(chunk))
            _deliver(handler, splitter.end())
        finally:
            shutil.rmtree(directory, ignore_errors=True)


def _deliver(handler: PipesMessageHandler, records: Iterable[object]) -> None:
    for record in records:
        if isinstance(record, PipesLine | PipesBadLine):  # no text records: the splitter is not in stdio mode
            handler.handle_record(record)


# ------------------------------------------------------------------------------------------- session


@dataclass(frozen=True)
class PipesSession:
    """One open Pipes session: what to hand the external process, and where its messages go."""

    context_data: Mapping[str, Any]
    context_params: Mapping[str, Any]
    message_params: Mapping[str, Any]
    message_handler: PipesMessageHandler

    def get_bootstrap_params(self) -> dict[str, Any]:
        """The two bootstrap parameter maps, not yet encoded."""
        return {PIPES_CONTEXT_ENV_VAR: dict(self.context_params), PIPES_MESSAGES_ENV_VAR: dict(self.message_params)}

    def get_bootstrap_env_vars(self) -> dict[str, str]:
        """The environment variables to add to the external process's environment."""
        return {name: encode_bootstrap(params) for name, params in self.get_bootstrap_params().items()}


@contextlib.asynccontextmanager
async def open_pipes_session(
    *,
    context_data: Mapping[str, Any],
    context_injector: PipesContextInjector | None = None,
    message_reader: PipesMessageReader | None = None,
) -> AsyncIterator[PipesSession]:
    """Open a Pipes session for an external process the caller runs inside the ``async with``.

    Args:
        context_data: the Pipes context (see :func:`dpipes.nodes.pipes.make_context_data`).
        context_injector: default :class:`PipesEnvContextInjector` (inline in the environment).
        message_reader: default :class:`PipesFifoMessageReader` (messages read as they are written).

    Returns:
        The session. Leave the ``async with`` once the process has ended: the reader then delivers
        the remaining messages, and the injector and the reader remove their files.
    """
    injector = context_injector if context_injector is not None else PipesEnvContextInjector()
    reader = message_reader if message_reader is not None else PipesFifoMessageReader()
    handler = PipesMessageHandler()
    try:
        context_params = injector.inject(context_data)
        async with reader.read_messages(handler) as message_params:
            yield PipesSession(context_data, context_params, message_params, handler)
    finally:
        injector.close()


# ----------------------------------------------------------------------------------------- the client


@dataclass(frozen=True)
class PipesStageResult:
    """What one stage of a pipeline run reported."""

    index: int
    node: str
    argv: tuple[str, ...]
    exit_code: int  # as a shell reports it: 128 + signal for a killed program
    status: str
    context: Mapping[str, Any]
    messages: tuple[Mapping[str, Any], ...]
    logs: tuple[Mapping[str, Any], ...]
    materializations: tuple[Mapping[str, Any], ...]
    checks: tuple[Mapping[str, Any], ...]
    custom_messages: tuple[Any, ...]
    exception: PipesExceptionInfo | None
    invalid_lines: int = 0  # lines of the stage's channel that were not Pipes messages


@dataclass(frozen=True)
class PipesResult:
    """What a pipeline run produced: its exit code, its output, and every stage's Pipes messages."""

    pipeline: str
    exit_code: int
    stdout: bytes
    stderr: bytes
    stages: tuple[PipesStageResult, ...]
    error: str = ""  # dpipes itself failed (a lost node, a refusal after start)
    messages: tuple[Mapping[str, Any], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(m for s in self.stages for m in s.messages))

    @property
    def logs(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(x for s in self.stages for x in s.logs)

    @property
    def materializations(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(x for s in self.stages for x in s.materializations)

    @property
    def checks(self) -> tuple[Mapping[str, Any], ...]:
        return tuple(x for s in self.stages for x in s.checks)

    @property
    def custom_messages(self) -> tuple[Any, ...]:
        return tuple(x for s in self.stages for x in s.custom_messages)

    @property
    def exception(self) -> PipesExceptionInfo | None:
        """The first stage's Pipes exception, if any stage closed with one."""
        return next((s.exception for s in self.stages if s.exception is not None), None)


async def run_pipes(
    command: str,
    *,
    node: str | None = None,
    extras: Mapping[str, Any] | None = None,
    assets: Sequence[str] = (),
    partition: str | None = None,
    context_injector: str = "env",
    messages_channel: str = "file",
    stage_options: Mapping[int, Mapping[str, Any]] | None = None,
    input: bytes | None = None,
    tmpdir: str | os.PathLike[str] | None = None,
    context_data: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    stdio: bool = False,
    on_message: Callable[[int, Mapping[str, Any]], None] | None = None,
) -> PipesResult:
    """Run a dpipes pipeline whose stages speak Pipes, and collect what they report.

    Args:
        command: the pipeline text, as given to ``dpipes`` (``"python3@beta job.py"``).
        node: the entry node, ``HOST:PORT`` or a ``tcp://`` / ``ipc://`` endpoint; default a node
            embedded in this process for the duration of the run.
        extras, assets, partition: the Pipes context every stage gets.
        context_injector: ``"env"`` or ``"file"``, done by each stage's node.
        messages_channel: ``"file"`` (a FIFO), ``"stderr"`` or ``"stdout"`` (message lines taken out
            of that stream), done by each stage's node.
        stage_options: a stage number's own options (keys ``extras``, ``assets``, ``partition``,
            ``context``, ``messages``, ``env``, ``stdio``), over the pipeline-wide ones: extras and
            env merge, the rest replace.
        input: bytes for the first stage's stdin (default: no stdin).
        tmpdir: where the capture files go (default: the system's temporary directory).
        context_data: a whole Pipes context every stage starts from (an orchestrator's: its run
            id, job, asset keys, code versions, partition...); ``extras``, ``assets`` and
            ``partition`` apply over it.
        env: environment variables for every stage's program (see
            :func:`~dpipes.nodes.pipes_options.check_env` for the names a node refuses).
        stdio: ask the nodes for each stage's stderr, and the last stage's stdout, as
            ``log_external_stream`` messages too.
        on_message: called with (stage index, the Pipes message) as each message arrives, on the
            event loop of this call.

    Returns:
        The frozen result; ``exit_code`` is what ``dpipes`` would exit with (1 when a stage's
        Pipes session closed with an exception, 125 when dpipes itself failed).

    Raises:
        RunFailed: the entry node is unreachable or refused the pipeline.
    """
    from dpipes.nodes.run import RunOptions, embedded_node, entry_from, run_pipeline

    pipes: dict[str, Any] = {
        "extras": dict(extras or {}),
        "assets": list(assets),
        "partition": partition,
        "context": context_injector,
        "messages": messages_channel,
    }
    if context_data is not None:
        pipes["context_data"] = dict(context_data)
    if env:
        pipes["env"] = dict(env)
    if stdio:
        pipes["stdio"] = True
    if stage_options:
        pipes["stages"] = {str(index): dict(own) for index, own in stage_options.items()}
    # What the stages report is collected as the run hands it over: contexts with the start, each
    # message as it arrives (the frames are JSON, see dpipes.nodes.stage_pipes).
    contexts: dict[int, Mapping[str, Any]] = {}
    handlers: dict[int, PipesMessageHandler] = collections.defaultdict(PipesMessageHandler)

    def started(reply: RunReply) -> None:
        contexts.update((s.index, s.context) for s in reply.stages)

    def on_pipes(index: int, frame: bytes) -> None:
        item = json.loads(frame)
        if "message" in item:
            handlers[index].handle_message(item["message"])
            if on_message is not None:
                on_message(index, item["message"])

    with tempfile.TemporaryDirectory(prefix=TEMP_PREFIX, dir=tmpdir) as directory:
        paths = {name: os.path.join(directory, name) for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "wb") as f:  # noqa: ASYNC230 (a local file, written once)
            f.write(input or b"")
        options = RunOptions(pipeline=command, stdin=input is not None, pipes=pipes)
        fds = {
            "stdin_fd": os.open(paths["stdin"], os.O_RDONLY),
            "stdout_fd": os.open(paths["stdout"], os.O_WRONLY | os.O_CREAT, 0o600),
            "stderr_fd": os.open(paths["stderr"], os.O_WRONLY | os.O_CREAT, 0o600),
        }
        try:
            async with contextlib.AsyncExitStack() as stack:
                entry = (
                    entry_from(node)
                    if node is not None
                    else (await stack.enter_async_context(embedded_node())).ipc_endpoint
                )
                ran = await run_pipeline(
                    entry,
                    options,
                    handle_sigint=False,
                    on_started=started,
                    on_pipes=on_pipes,
                    stdin_fd=fds["stdin_fd"],
                    stdout_fd=fds["stdout_fd"],
                    stderr_fd=fds["stderr_fd"],
                )
        finally:
            for fd in fds.values():
                os.close(fd)
        stdout, stderr = _read(paths["stdout"]), _read(paths["stderr"])
    stages = tuple(
        PipesStageResult(
            index=s.index,
            node=s.node,
            argv=tuple(s.argv),
            exit_code=s.shell_code,
            status=s.status,
            context=contexts.get(s.index, {}),
            messages=tuple(handlers[s.index].messages),
            logs=tuple(handlers[s.index].logs),
            materializations=tuple(handlers[s.index].materializations),
            checks=tuple(handlers[s.index].checks),
            custom_messages=tuple(handlers[s.index].custom_messages),
            exception=handlers[s.index].exception,
            invalid_lines=s.pipes_errors,
        )
        for s in ran.stages
    )
    return PipesResult(ran.pipeline, ran.exit_code, stdout, stderr, stages, ran.error)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
