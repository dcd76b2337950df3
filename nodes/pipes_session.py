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
)
from dpipes.nodes.pipes_frames import PipesExceptionInfo, PipesMessageHandler

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
    insecure: bool = False,
) -> PipesResult:
    """Run a dpipes pipeline whose stages speak Pipes, and collect what they report.

    Args:
        command: the pipeline text, as given to ``dpipes`` (``"python3@beta job.py"``).
        node: the entry node, as ``dpipes --node`` takes it: ``[NAME@]HOST:PORT`` (over TCP with
            your client key and the node's key pinned in known_nodes, as ``dpipes`` does) or a
            ``tcp://`` / ``ipc://`` endpoint; default a node embedded in this process for the
            duration of the run.
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
        insecure: reach a TCP ``node`` without keys (a node started with ``--insecure``).
        on_message: called with (stage index, the Pipes message) as each message arrives, on the
            event loop of this call.

    Returns:
        The frozen result; ``exit_code`` is what ``dpipes`` would exit with (1 when a stage's
        Pipes session closed with an exception, 125 when dpipes itself failed).

    Raises:
        RunFailed: the entry node is unreachable or refused the pipeline.
        DpipesError: ``node`` is malformed, or its key is not pinned (the message says what to run).
    """
    from dpipes.nodes.entry import entry_and_keys
    from dpipes.nodes.run import RunOptions, embedded_node, run_pipeline

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
    # What the stages report is collected as the run hands it over: contexts with the start, and
    # each stage's messages in its StageResult.pipes (on_message sees each as it arrives).
    contexts: dict[int, Mapping[str, Any]] = {}

    def started(reply: RunReply) -> None:
        contexts.update((s.index, s.context) for s in reply.stages)

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
                if node is not None:
                    entry, keys = await entry_and_keys(node, insecure=insecure)
                else:
                    entry, keys = (await stack.enter_async_context(embedded_node())).ipc_endpoint, None
                ran = await run_pipeline(
                    entry,
                    options,
                    keys=keys,
                    handle_sigint=False,
                    on_started=started,
                    on_pipes=on_message,
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
            messages=tuple(s.pipes.messages),
            logs=tuple(s.pipes.logs),
            materializations=tuple(s.pipes.materializations),
            checks=tuple(s.pipes.checks),
            custom_messages=tuple(s.pipes.custom_messages),
            exception=s.pipes.exception,
            invalid_lines=s.pipes_errors,
        )
        for s in ran.stages
    )
    return PipesResult(ran.pipeline, ran.exit_code, stdout, stderr, stages, ran.error)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
