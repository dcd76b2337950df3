"""The orchestration side of Dagster Pipes that needs no bus: context injectors and the bootstrap.

A node runs each program as a Pipes *external process*. Before the fork it builds a
:class:`PipesBootstrap` with :func:`bootstrap_env`: the two environment variables the program's
``dagster-pipes`` library reads (``DAGSTER_PIPES_CONTEXT``, ``DAGSTER_PIPES_MESSAGES``; the
encoding is specified in :mod:`dpipes.bus.pipes`), the files they point at, and the channel on
which the program's messages come back. Closing the bootstrap removes every file it made.

Context injectors
    ``env``: the context travels inline, ``{"data": <context>}``. Linux caps one environment
    string at 128 KiB, so a larger context is refused with a hint to use ``file``.
    ``file``: the context is written to ``context.json`` in the bootstrap's private directory,
    ``{"path": <file>}``.

Message channels
    ``file``: a FIFO, ``{"path": <fifo>}``, read by :class:`~dpipes.nodes.pipes_readers.PipesFifoReader`
    as each message is written. ``stderr``/``stdout``: ``{"stdio": <stream>}``; the program writes
    message lines to that stream among its ordinary output, and
    :class:`~dpipes.nodes.pipes_lines.PipesStdioSplitter` takes them out. The channels and their
    records live in :mod:`dpipes.nodes.pipes_lines` and :mod:`dpipes.nodes.pipes_readers`; this
    module re-exports them, so ``from dpipes.nodes.pipes import PipesFifoReader`` keeps working.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar, overload

from dpipes.bus.pipes import (
    MAX_LINE_BYTES,
    PIPES_CONTEXT_ENV_VAR,
    PIPES_MESSAGES_ENV_VAR,
    encode_bootstrap,
)
from dpipes.nodes.pipes_lines import (
    PipesBadLine,
    PipesBootstrapError,
    PipesLine,
    PipesLineSplitter,
    PipesMessageChannel,
    PipesRecord,
    PipesStdioRecord,
    PipesStdioSplitter,
    PipesTextLine,
)
from dpipes.nodes.pipes_readers import DRAIN_TIMEOUT_S, PipesBusReader, PipesFifoReader

__all__ = [
    "DRAIN_TIMEOUT_S",
    "PipesBadLine",
    "PipesBootstrap",
    "PipesBootstrapError",
    "PipesBusReader",
    "PipesContextInjector",
    "PipesEnvContextInjector",
    "PipesFifoReader",
    "PipesFileContextInjector",
    "PipesLine",
    "PipesLineSplitter",
    "PipesMessageChannel",
    "PipesRecord",
    "PipesStdioRecord",
    "PipesStdioSplitter",
    "PipesTextLine",
    "bootstrap_env",
    "make_context_data",
]


log = logging.getLogger(__name__)

ENV_STRING_MAX_BYTES: Final = 128 * 1024  # Linux MAX_ARG_STRLEN: one "NAME=value\0" string of execve


BOOTSTRAP_DIR_PREFIX: Final = "dpipes-pipes-"
"""A bootstrap's private directory is ``<tmpdir>/dpipes-pipes-<pid of its node>-<random>``."""


def remove_stale_bootstrap_dirs(tmpdir: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the bootstrap directories of nodes that died without closing them (``kill -9``).

    Only this user's directories whose owner pid is gone are removed; a running node's are left.
    Returns the paths removed.
    """
    where = os.fspath(tmpdir) if tmpdir is not None else tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(where)
    except OSError:
        return []
    for name in names:
        if not name.startswith(BOOTSTRAP_DIR_PREFIX):
            continue
        pid = name[len(BOOTSTRAP_DIR_PREFIX) :].partition("-")[0]
        path = os.path.join(where, name)
        try:
            owner = os.lstat(path).st_uid
        except OSError:
            continue
        if not pid.isdigit() or owner != os.getuid() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if removed:
        log.info("removed %d Pipes bootstrap dir(s) left by nodes that died: %s", len(removed), ", ".join(removed))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------------------- injectors


class PipesContextInjector(ABC):
    """Hands the context to the external process: returns the context params, cleans up after."""

    @abstractmethod
    def inject(self, context: Mapping[str, Any]) -> dict[str, Any]:
        """Make ``context`` reachable; return the params for ``DAGSTER_PIPES_CONTEXT``."""

    @abstractmethod
    def close(self) -> None:
        """Remove what :meth:`inject` made; idempotent."""


class PipesEnvContextInjector(PipesContextInjector):
    """The context travels inline in ``DAGSTER_PIPES_CONTEXT``: ``{"data": <context>}``."""

    def inject(self, context: Mapping[str, Any]) -> dict[str, Any]:
        return {"data": dict(context)}

    def close(self) -> None:
        pass  # nothing was made


class PipesFileContextInjector(PipesContextInjector):
    """The context is a JSON file: ``{"path": <file>}``; :meth:`close` removes it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._written = False

    def inject(self, context: Mapping[str, Any]) -> dict[str, Any]:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._written = True
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(context, f)
        return {"path": self.path}

    def close(self) -> None:
        if self._written:
            self._written = False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


# ----------------------------------------------------------------------------------------- bootstrap

C = TypeVar("C", bound=PipesMessageChannel)


@dataclass(eq=False)
class PipesBootstrap(Generic[C]):
    """What one external process needs: its environment, and the channel its messages come back on."""

    env: dict[str, str]
    channel: C
    injector: PipesContextInjector
    directory: str  # private to this bootstrap; removed by close()
    _closed: bool = field(default=False, init=False, repr=False)

    def close(self, *, remove_directory: bool = True) -> None:
        """Close the channel and the injector and remove the bootstrap's files; idempotent.

        ``remove_directory`` false leaves :attr:`directory` to the caller, who removes it off its
        event loop (a node: one ``rmdir`` took 1-4 ms on a journaling disk here).
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.channel.close()
            self.injector.close()
        finally:
            if remove_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PipesBootstrap[C]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@overload
def bootstrap_env(
    context: Mapping[str, Any],
    *,
    context_injector: Literal["env", "file"] = ...,
    messages_channel: Literal["file"] = ...,
    tmpdir: str | os.PathLike[str],
    include_stdio_in_messages: bool = ...,
    on_record: Callable[[PipesRecord], object] | None = ...,
    max_line_bytes: int = ...,
) -> PipesBootstrap[PipesFifoReader]: ...


@overload
def bootstrap_env(
    context: Mapping[str, Any],
    *,
    context_injector: Literal["env", "file"] = ...,
    messages_channel: Literal["stderr", "stdout"],
    tmpdir: str | os.PathLike[str],
    include_stdio_in_messages: bool = ...,
    on_record: Callable[[PipesRecord], object] | None = ...,
    max_line_bytes: int = ...,
) -> PipesBootstrap[PipesStdioSplitter]: ...


def bootstrap_env(
    context: Mapping[str, Any],
    *,
    context_injector: Literal["env", "file"] = "env",
    messages_channel: Literal["file", "stderr", "stdout"] = "file",
    tmpdir: str | os.PathLike[str],
    include_stdio_in_messages: bool = False,
    on_record: Callable[[PipesRecord], object] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> PipesBootstrap[Any]:
    """Prepare the Pipes bootstrap of one external process.

    Args:
        context: the Pipes context data (see :func:`make_context_data`).
        context_injector: ``"env"`` (inline) or ``"file"`` (a JSON file).
        messages_channel: ``"file"`` (a FIFO read by :class:`PipesFifoReader`) or ``"stderr"`` /
            ``"stdout"`` (lines among the stream's output, split by :class:`PipesStdioSplitter`).
        tmpdir: directory in which a private directory for this process's files is made.
        include_stdio_in_messages: with the ``file`` channel, ask dagster-pipes to forward the
            program's own stdout/stderr as ``log_external_stream`` messages.
        on_record: with the ``file`` channel, the reader's callback (else records are queued).
        max_line_bytes: longest message line accepted.

    Returns:
        The environment to add to the child's, the channel and the files; ``close()`` it when the
        process has been reaped and its messages drained.

    Raises:
        PipesBootstrapError: unknown injector or channel, or the context is too big for ``env``.
    """
    if context_injector not in ("env", "file"):
        raise PipesBootstrapError(f"unknown Pipes context injector {context_injector!r}; use 'env' or 'file'")
    if messages_channel not in ("file", "stderr", "stdout"):
        raise PipesBootstrapError(
            f"unknown Pipes messages channel {messages_channel!r}; use 'file', 'stderr' or 'stdout'"
        )
    directory = tempfile.mkdtemp(prefix=f"{BOOTSTRAP_DIR_PREFIX}{os.getpid()}-", dir=os.fspath(tmpdir))
    injector: PipesContextInjector = (
        PipesEnvContextInjector()
        if context_injector == "env"
        else PipesFileContextInjector(os.path.join(directory, "context.json"))
    )
    channel: PipesMessageChannel | None = None
    try:
        context_value = encode_bootstrap(injector.inject(context))
        if len(PIPES_CONTEXT_ENV_VAR) + 1 + len(context_value) + 1 > ENV_STRING_MAX_BYTES:
            raise PipesBootstrapError(
                f"the Pipes context encodes to {len(context_value)} bytes, over the"
                f" {ENV_STRING_MAX_BYTES}-byte limit of one environment variable; use context_injector='file'"
            )
        if messages_channel == "file":
            channel = PipesFifoReader(
                os.path.join(directory, "messages"), on_record=on_record, max_line_bytes=max_line_bytes
            )
        else:
            channel = PipesStdioSplitter(stream=messages_channel, max_line_bytes=max_line_bytes)
        messages_params = channel.params
        if include_stdio_in_messages and messages_channel == "file":
            messages_params["include_stdio_in_messages"] = True
        env = {
            PIPES_CONTEXT_ENV_VAR: context_value,
            PIPES_MESSAGES_ENV_VAR: encode_bootstrap(messages_params),
        }
    except BaseException:
        if channel is not None:
            channel.close()
        injector.close()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return PipesBootstrap(env=env, channel=channel, injector=injector, directory=directory)


def make_context_data(
    *,
    run_id: str,
    asset_keys: Sequence[str] | None = None,
    job_name: str | None = None,
    partition_key: str | None = None,
    retry_number: int = 0,
    extras: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Pipes context data with every key dagster-pipes reads (it indexes them without defaults)."""
    return {
        "asset_keys": list(asset_keys) if asset_keys is not None else None,
        "code_version_by_asset_key": {k: None for k in asset_keys} if asset_keys is not None else None,
        "provenance_by_asset_key": {k: None for k in asset_keys} if asset_keys is not None else None,
        "partition_key": partition_key,
        "partition_key_range": {"start": partition_key, "end": partition_key} if partition_key else None,
        "partition_time_window": None,
        "run_id": run_id,
        "job_name": job_name,
        "retry_number": retry_number,
        "extras": dict(extras or {}),
    }
