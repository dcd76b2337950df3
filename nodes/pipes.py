"""The orchestration side of Dagster Pipes that needs no bus: context injectors and message channels.

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
    ``file``: a FIFO, ``{"path": <fifo>}``. dagster-pipes' default writer opens the path in
    append mode for every message, writes one line and closes it, so a plain FIFO reader would see
    end-of-file between any two messages. :class:`PipesFifoReader` therefore holds a write end of
    its own FIFO open: the read end never sees EOF while the program runs, and a message is read as
    soon as its line is written, with no polling. When the supervisor has reaped the program it
    calls :meth:`PipesFifoReader.finish`, which closes that write end; the reader then drains what
    is left and ends at the real EOF, once no process holds the FIFO open.
    ``stderr``/``stdout``: ``{"stdio": <stream>}``; the program writes message lines to that stream
    among its ordinary output. :class:`PipesStdioSplitter` is fed the stream's bytes and tells
    message lines (a JSON object naming ``__dagster_pipes_version``) from plain text.

Both channels split lines with a bounded buffer: a line longer than the limit is reported as a
:class:`PipesBadLine` and skipped, and reading goes on with the next line. Every record carries
its 1-based line number in the channel (blank lines count).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, Self, TypeAlias, TypeVar, cast, overload

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint, InStream
from dpipes.bus.errors import BusError, DpipesError
from dpipes.bus.pipes import (
    BUS_OFFER_KEY,
    MAX_LINE_BYTES,
    PIPES_CONTEXT_ENV_VAR,
    PIPES_MESSAGES_ENV_VAR,
    PIPES_VERSION_FIELD,
    PipesMessage,
    PipesMessageError,
    encode_bootstrap,
    parse_message,
)

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

DRAIN_TIMEOUT_S: Final = 5.0  # after finish(), how long drain() waits for stray writers to close the FIFO
FIFO_PIPE_BYTES: Final = 1024 * 1024  # F_SETPIPE_SZ: a 1 MiB pipe moves ~4x what the default 64 KiB does
READ_CHUNK_BYTES: Final = 1024 * 1024
READ_BUDGET_BYTES: Final = 8 * 1024 * 1024  # per readiness callback, so one busy writer cannot starve the loop
PENDING_MAX_RECORDS: Final = 16 * 1024  # unconsumed records before reading pauses (the writer then blocks)
PENDING_MAX_BYTES: Final = 32 * 1024 * 1024
ENV_STRING_MAX_BYTES: Final = 128 * 1024  # Linux MAX_ARG_STRLEN: one "NAME=value\0" string of execve
BAD_LINE_HEAD_BYTES: Final = 200
BUS_MAX_WRITERS: Final = 64  # concurrent writer streams on one bus reader; each may hold a credit window
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_MESSAGE_MARKER: Final = json.dumps(PIPES_VERSION_FIELD).encode()


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


class PipesBootstrapError(DpipesError, ValueError):
    """A Pipes bootstrap cannot be built as asked (unknown injector or channel, context too big)."""


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class PipesLine:
    """A valid Pipes message, with its line number in the channel."""

    line_no: int
    message: PipesMessage
    size: int = 0  # bytes of the line, without its newline


@dataclass(frozen=True, slots=True)
class PipesBadLine:
    """A line that is not a valid Pipes message (malformed or over-long); reading went on after it."""

    line_no: int
    error: PipesMessageError
    head: bytes  # the line's first bytes, for the operator
    size: int = 0  # bytes of the line seen when it was reported
    source: str = ""  # where it came from when not a line of a file (``the bus writer <addr>``)

    def __str__(self) -> str:
        if self.source:
            return f"Pipes message {self.line_no} from {self.source}: {self.error}"
        return f"Pipes message line {self.line_no}: {self.error}"


@dataclass(frozen=True, slots=True)
class PipesTextLine:
    """Plain text among the messages of a stdio channel (without its newline)."""

    line_no: int
    text: bytes
    partial: bool = False  # the line was longer than the limit; its next piece follows with the same number


PipesRecord: TypeAlias = PipesLine | PipesBadLine
PipesStdioRecord: TypeAlias = PipesLine | PipesBadLine | PipesTextLine


# ----------------------------------------------------------------------------------------- splitting


class PipesLineSplitter:
    """Turns a byte stream into Pipes records, line by line, with a bounded line buffer (sans-IO).

    With ``stdio=True`` a line is a message only if it is a JSON object naming
    ``__dagster_pipes_version``; any other line is :class:`PipesTextLine`, and an over-long text
    line is passed on in pieces instead of being dropped. Otherwise every non-blank line must be a
    message, and blank lines are skipped.
    """

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES, stdio: bool = False) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
        self._max = max_line_bytes
        self._stdio = stdio
        self._buf = bytearray()
        self._line_no = 1  # number of the line being accumulated
        self._discarding = False  # inside an over-long line already reported
        self._continuing_text = False  # inside an over-long text line already partly passed on

    @property
    def lines_seen(self) -> int:
        """How many complete lines have been consumed."""
        return self._line_no - 1

    def feed(self, data: bytes) -> list[PipesStdioRecord]:
        """Consume a chunk; return the records of the lines it completed."""
        out: list[PipesStdioRecord] = []
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return out
            self._discarding = False
            self._line_no += 1
            data = data[nl + 1 :]
        buf = self._buf
        scan = len(buf)  # what is already buffered holds no newline: search only the new bytes
        buf += data
        pos = 0
        while (nl := buf.find(b"\n", scan)) >= 0:
            if nl - pos > self._max and not (self._stdio and self._is_text(buf, pos, nl)):
                self._overlong(bytes(buf[pos : pos + BAD_LINE_HEAD_BYTES]), nl - pos, out, complete=True)
            else:
                self._line(bytes(buf[pos:nl]), out)
            self._line_no += 1
            self._continuing_text = False
            pos = scan = nl + 1
        if pos:
            del buf[:pos]
        if len(buf) > self._max:
            if self._stdio and (self._continuing_text or _MESSAGE_MARKER not in buf):
                out.append(PipesTextLine(self._line_no, bytes(buf), partial=True))
                self._continuing_text = True
            else:
                self._overlong(bytes(buf[:BAD_LINE_HEAD_BYTES]), len(buf), out, complete=False)
                self._discarding = True
            buf.clear()
        return out

    def end(self) -> list[PipesStdioRecord]:
        """The stream ended: return the record of a last line that had no newline, if any."""
        out: list[PipesStdioRecord] = []
        if self._buf and not self._discarding:
            self._line(bytes(self._buf), out)
            self._line_no += 1
        self._buf.clear()
        self._discarding = self._continuing_text = False
        return out

    def _is_text(self, buf: bytearray, start: int, end: int) -> bool:
        return self._continuing_text or not _looks_like_message(buf[start:end])

    def _overlong(self, head: bytes, size: int, out: list[PipesStdioRecord], *, complete: bool) -> None:
        seen = f"{size}" if complete else f"more than {size}"
        reason = f"line of {seen} bytes exceeds the {self._max}-byte limit; skipped"
        out.append(PipesBadLine(self._line_no, PipesMessageError(reason), head, size))

    def _line(self, line: bytes, out: list[PipesStdioRecord]) -> None:
        if self._stdio:
            if self._continuing_text or not _looks_like_message(line):
                out.append(PipesTextLine(self._line_no, line))
                return
        elif not line.strip():
            return
        try:
            out.append(PipesLine(self._line_no, parse_message(line, max_line_bytes=self._max), len(line)))
        except PipesMessageError as e:
            out.append(PipesBadLine(self._line_no, e, line[:BAD_LINE_HEAD_BYTES], len(line)))


def _looks_like_message(line: bytes | bytearray) -> bool:
    return line.lstrip()[:1] == b"{" and _MESSAGE_MARKER in line


# ------------------------------------------------------------------------------------------ channels


class PipesMessageChannel(ABC):
    """Where an external process's messages arrive: its bootstrap params, and cleanup."""

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The messages params to hand the external process (``DAGSTER_PIPES_MESSAGES``)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the channel holds; idempotent."""


class PipesStdioSplitter(PipesMessageChannel):
    """The ``stdio`` channel: feed it a child's stderr (or stdout) bytes to get messages and text."""

    def __init__(self, *, stream: Literal["stderr", "stdout"] = "stderr", max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if stream not in ("stderr", "stdout"):
            raise PipesBootstrapError(f"Pipes stdio stream must be 'stderr' or 'stdout', got {stream!r}")
        self.stream = stream
        self._splitter = PipesLineSplitter(max_line_bytes=max_line_bytes, stdio=True)

    @property
    def params(self) -> dict[str, Any]:
        return {"stdio": self.stream}

    def feed(self, data: bytes) -> list[PipesStdioRecord]:
        """Consume a chunk of the stream; return the records of the lines it completed."""
        return self._splitter.feed(data)

    def end(self) -> list[PipesStdioRecord]:
        """The stream ended: return the record of its unterminated last line, if any."""
        return self._splitter.end()

    def split_lines(self, lines: Iterable[bytes]) -> list[PipesStdioRecord]:
        """Classify whole lines (with or without their newlines), then end the stream."""
        out: list[PipesStdioRecord] = []
        for line in lines:
            out += self.feed(line if line.endswith(b"\n") else line + b"\n")
        return out + self.end()

    def close(self) -> None:
        pass


class _QueuedRecords(PipesMessageChannel):
    """What the FIFO and bus readers share: records queued for ``async for`` / :meth:`next_batch`.

    A subclass fills ``_pending``, sets ``_wakeup`` when it adds records or ends (``_eof``), and
    says in :meth:`_consumed` what taking a record frees (reading may resume).
    """

    _pending: deque[PipesRecord]
    _pending_bytes: int
    _eof: bool
    _paused: bool
    _wakeup: asyncio.Event
    _on_record: Callable[[PipesRecord], object] | None
    _callback_failed: bool

    @property
    def at_eof(self) -> bool:
        """True once every writer has finished after :meth:`finish` (or the reader closed)."""
        return self._eof

    @property
    def paused(self) -> bool:
        """True while reading waits for the consumer to take queued records."""
        return self._paused

    @abstractmethod
    def start(self) -> None:
        """Begin reading on the running loop."""

    @abstractmethod
    def finish(self) -> None:
        """The external process is gone: end once what its writers still send has been read."""

    async def drain(self, *, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """:meth:`finish`, then wait until every writer has finished.

        Returns False if one was still writing after ``timeout_s`` (see :meth:`_give_up`); reading
        stops there all the same. With no ``on_record`` callback, another task must consume the
        records meanwhile, or reading stays paused and this times out.
        """
        self.start()
        self.finish()
        try:
            async with asyncio.timeout(timeout_s):
                while not self._eof:
                    await self._wait()
        except TimeoutError:
            await self._give_up(timeout_s)
            return False
        return True

    @abstractmethod
    async def _give_up(self, timeout_s: float) -> None:
        """:meth:`drain` waited ``timeout_s`` in vain: say so, stop reading, end the channel."""

    @abstractmethod
    def _pause(self) -> None:
        """Too much is queued: stop reading (so the writers block) until :meth:`_unpause`."""

    @abstractmethod
    def _unpause(self) -> None:
        """The consumer caught up: read again."""

    def __str__(self) -> str:
        return type(self).__name__

    def _deliver(self, records: Sequence[PipesRecord]) -> None:
        """Hand records to the callback, or queue them (pausing reading past the bounds)."""
        if not records:
            return
        if self._on_record is not None:
            for record in records:
                try:
                    self._on_record(record)
                except Exception:
                    if not self._callback_failed:
                        log.exception("Pipes record callback failed on %s (repeats at debug)", self)
                        self._callback_failed = True
                    else:
                        log.debug("Pipes record callback failed on %s", self, exc_info=True)
            return
        self._pending.extend(records)
        self._pending_bytes += sum(_size(r) for r in records)
        self._wakeup.set()
        if len(self._pending) >= PENDING_MAX_RECORDS or self._pending_bytes >= PENDING_MAX_BYTES:
            self._pause()

    def _consumed(self, record: PipesRecord) -> None:
        """``record`` left the queue: read again once the queue is down to half its bounds."""
        self._pending_bytes -= _size(record)
        if (
            self._paused
            and len(self._pending) < PENDING_MAX_RECORDS // 2
            and self._pending_bytes < PENDING_MAX_BYTES // 2
        ):
            self._unpause()

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> PipesRecord:
        while not self._pending:
            if self._eof:
                raise StopAsyncIteration
            await self._wait()
        record = self._pending.popleft()
        self._consumed(record)
        return record

    async def next_batch(self) -> list[PipesRecord]:
        """Every queued record (waiting for at least one); ``[]`` once the channel has ended."""
        while not self._pending:
            if self._eof:
                return []
            await self._wait()
        batch = list(self._pending)
        self._pending.clear()
        for record in batch:
            self._consumed(record)
        return batch

    async def _wait(self) -> None:
        self._wakeup.clear()
        await self._wakeup.wait()


class PipesFifoReader(_QueuedRecords):
    """The ``file`` channel: a FIFO whose messages are read as they are written.

    Reading runs on the event loop (``loop.add_reader`` on the non-blocking read end): there is
    no thread to hand records across and no polling interval, the wake-up is the kernel's, and a
    slow consumer pauses reading, which blocks the writer exactly like a full pipe. Records go to
    ``on_record`` if given (called on the loop, once per record), else they are queued for
    ``async for record in reader`` / :meth:`next_batch`.

    Lifecycle: construct (makes the FIFO and opens both ends), :meth:`start` on the loop, fork the
    program, reap it, :meth:`drain` (or :meth:`finish` and keep iterating to the end), then
    :meth:`close`, which unlinks the FIFO. ``async with`` does ``start`` and ``close``.

    Writes of more than ``PIPE_BUF`` (4 KiB) bytes by *concurrent* writers to one FIFO can
    interleave; dagster-pipes writes from one thread except for its ``include_stdio_in_messages``
    capture threads.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        on_record: Callable[[PipesRecord], object] | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        self.path = os.fspath(path)
        self._on_record = on_record
        self._splitter = PipesLineSplitter(max_line_bytes=max_line_bytes)
        self._pending: deque[PipesRecord] = deque()
        self._pending_bytes = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False  # registered with add_reader
        self._paused = False
        self._eof = False
        self._closed = False
        self._wakeup = asyncio.Event()
        self._callback_failed = False
        os.mkfifo(self.path, 0o600)
        self._rfd = self._wfd = -1
        try:
            # Read end first: opening a FIFO's write end without blocking needs a reader.
            self._rfd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            self._wfd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            self.close()
            raise
        with contextlib.suppress(OSError):  # EPERM past the user's pipe quota: keep the default size
            fcntl.fcntl(self._rfd, _F_SETPIPE_SZ, FIFO_PIPE_BYTES)

    def __str__(self) -> str:
        return f"Pipes FIFO {self.path}"

    @property
    def params(self) -> dict[str, Any]:
        return {"path": self.path}

    @property
    def lines_seen(self) -> int:
        """How many complete lines have been read so far."""
        return self._splitter.lines_seen

    def start(self) -> None:
        """Begin reading on the running loop."""
        if self._closed:
            raise RuntimeError(f"Pipes FIFO reader {self.path} is closed")
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._resume()

    def finish(self) -> None:
        """The external process is gone: drop our own write end, so reading ends at the real EOF."""
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1
            if self._loop is not None and not self._paused:
                # No writer may be left to trigger a readiness event: look once ourselves.
                self._loop.call_soon(self._on_readable)

    async def _give_up(self, timeout_s: float) -> None:
        # some process (a leaked descendant) still holds the FIFO open
        log.warning("Pipes FIFO %s still open by a writer %.1f s after its process ended", self.path, timeout_s)
        self._stop_reading()
        self._eof = True
        self._wakeup.set()

    def close(self) -> None:
        """Stop reading, close both ends and remove the FIFO; queued records stay readable."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        for fd in (self._rfd, self._wfd):
            if fd >= 0:
                os.close(fd)
        self._rfd = self._wfd = -1
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._eof = True
        self._wakeup.set()

    # ------------------------------------------------------------------------------------ internals

    def _resume(self) -> None:
        assert self._loop is not None
        if not self._reading and not self._eof and self._rfd >= 0:
            self._loop.add_reader(self._rfd, self._on_readable)
            self._reading = True
        self._paused = False

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self._rfd)
        self._reading = False

    def _on_readable(self) -> None:
        budget = READ_BUDGET_BYTES
        while budget > 0 and not self._paused and not self._eof and self._rfd >= 0:
            try:
                data = os.read(self._rfd, READ_CHUNK_BYTES)
            except BlockingIOError:
                return
            except OSError as e:
                log.error("reading Pipes FIFO %s failed, ending it: %s", self.path, e)
                data = b""
            if not data:
                self._stop_reading()
                self._eof = True
                self._deliver(cast(list[PipesRecord], self._splitter.end()))
                self._wakeup.set()
                return
            budget -= len(data)
            self._deliver(cast(list[PipesRecord], self._splitter.feed(data)))  # no text records: stdio=False

    def _pause(self) -> None:
        self._stop_reading()
        self._paused = True

    def _unpause(self) -> None:
        if not self._closed:
            self._resume()
            assert self._loop is not None
            self._loop.call_soon(self._on_readable)  # EOF may already be waiting, with no new event


def _size(record: PipesRecord) -> int:
    # What a queued record costs, roughly: a parsed message takes about its line's size again in objects.
    return len(record.head) if isinstance(record, PipesBadLine) else 2 * record.size + 256


class PipesBusReader(_QueuedRecords):
    """The ``bus`` channel: Pipes messages that programs send straight onto the bus.

    The reader owns ``endpoint`` (an in-process endpoint of the node's hub, ``hub.endpoint(name)``)
    and offers it in :attr:`params` with ``hub``, the client endpoint a program attaches to. Any
    number of writers may open streams to it; each payload frame of a ``PIPES`` message is one
    message, validated with :func:`~dpipes.bus.pipes.parse_message` and numbered per stream. A frame
    that is not a valid message, any other data message, a stream that breaks off and one still open
    when :meth:`drain` gives up are each reported as a :class:`PipesBadLine` naming the writer.

    The consumption interface is :class:`PipesFifoReader`'s: ``on_record`` (called on the loop) or
    ``async for`` / :meth:`next_batch`; :meth:`start`, :meth:`finish` (the process is gone: end once
    the streams open have ended), :meth:`drain`, :meth:`close` (which closes the endpoint, so a late
    writer is refused and falls back to its file). A slow consumer pauses reading: the streams are
    no longer read, so their writers get no more credit and block.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        hub: str,
        *,
        on_record: Callable[[PipesRecord], object] | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
    ) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
        self.endpoint = endpoint
        self.hub = hub
        self._on_record = on_record
        self._max = max_line_bytes
        self._pending: deque[PipesRecord] = deque()
        self._pending_bytes = 0
        self._paused = False
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._wakeup = asyncio.Event()
        self._streams: dict[InStream, asyncio.Task[None]] = {}
        self._counts: dict[InStream, int] = {}  # messages read per open stream
        self._tasks: list[asyncio.Task[None]] = []  # accepting streams, reading the inbox
        self._started = self._finished = self._eof = self._closed = False
        self._callback_failed = False
        self.messages_seen = 0  # payload frames read, valid or not
        self.writers_seen = 0  # streams accepted
        self.ignored = 0  # control messages outside any stream (errors about our own sends), logged

    def __str__(self) -> str:
        return f"Pipes bus reader {self.endpoint.addr}"

    @property
    def params(self) -> dict[str, Any]:
        return {BUS_OFFER_KEY: {"hub": self.hub, "to": self.endpoint.addr}}

    def start(self) -> None:
        """Begin accepting writer streams on the running loop."""
        if self._closed:
            raise RuntimeError(f"Pipes bus reader {self.endpoint.addr} is closed")
        if not self._started:
            self._started = True
            addr = self.endpoint.addr
            self._tasks = [
                asyncio.create_task(self._accept(), name=f"pipes bus reader {addr} accept"),
                asyncio.create_task(self._inbox(), name=f"pipes bus reader {addr} inbox"),
            ]

    def finish(self) -> None:
        """The external process is gone: end once the streams still open have ended."""
        self._finished = True
        self._check_end()

    async def _give_up(self, timeout_s: float) -> None:
        # a stream still open: its writer was killed, or handed its channel to a process that lives
        # on; each is reported as a bad record and cancelled
        log.warning(
            "Pipes bus reader %s: %d stream(s) still open %.1f s after the process ended",
            self.endpoint.addr,
            len(self._streams),
            timeout_s,
        )
        tasks = list(self._streams.values())
        for stream in list(self._streams):
            n = self._counts.get(stream, 0)
            reason = f"stream still open {timeout_s:g} s after its process ended, after {n} messages; the rest is lost"
            self._deliver([_bus_bad(n + 1, reason, stream.src)], force=True)
            with contextlib.suppress(BusError):
                stream.cancel("the Pipes reader stopped waiting")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._end()

    def close(self) -> None:
        """Stop reading and close the endpoint; queued records stay readable."""
        if self._closed:
            return
        self._closed = True
        # No CANCEL to the writers: once the endpoint is gone the hub bounces each later message,
        # which tells a writer exactly which messages to write to its file instead.
        for task in [*self._tasks, *self._streams.values()]:
            task.cancel()
        self.endpoint.close()
        self._eof = True
        self._resumed.set()
        self._wakeup.set()

    # ------------------------------------------------------------------------------------ internals

    async def _accept(self) -> None:
        while True:
            try:
                stream = await self.endpoint.accept()
            except BusError as e:  # the endpoint or its hub closed: no stream can come any more
                if not self._closed:
                    log.warning("Pipes bus reader %s stopped accepting: %s", self.endpoint.addr, e)
                self._finished = True
                self._check_end()
                return
            self.writers_seen += 1
            if len(self._streams) >= BUS_MAX_WRITERS:
                reason = f"refused: {BUS_MAX_WRITERS} writer streams are already open on this reader"
                self._deliver([_bus_bad(1, reason, stream.src)], force=True)
                with contextlib.suppress(BusError):
                    stream.cancel(reason)
                continue
            self._counts[stream] = 0
            self._streams[stream] = asyncio.create_task(
                self._read(stream), name=f"pipes bus reader {self.endpoint.addr} from {stream.src}"
            )

    async def _read(self, stream: InStream) -> None:
        try:
            while True:
                while self._paused:
                    await self._resumed.wait()
                msg = await stream.read()
                if msg is None:
                    return
                self._deliver(self._records(stream, msg))
        except BusError as e:  # cancelled by the writer, its node lost, a byte count that does not add up
            n = self._counts.get(stream, 0)
            self._deliver([_bus_bad(n + 1, f"stream broke off after {n} messages: {e}", stream.src)], force=True)
        finally:
            self._streams.pop(stream, None)
            self._counts.pop(stream, None)
            self._check_end()

    def _records(self, stream: InStream, msg: codec.Message) -> list[PipesRecord]:
        n = self._counts[stream]
        frames = getattr(msg, "frames", ())
        out: list[PipesRecord] = []
        if not isinstance(msg, codec.Pipes) or not frames:
            what = f"a {msg.KIND} bus message, not PIPES" if frames else f"a {msg.KIND} bus message with no frames"
            for frame in frames or (b"",):
                n += 1
                view = memoryview(frame)
                out.append(_bus_bad(n, f"{what}: not a Pipes message", stream.src, view, view.nbytes))
        else:
            for frame in frames:
                n += 1
                view = memoryview(frame)
                size = view.nbytes
                if size > self._max:
                    out.append(
                        _bus_bad(
                            n,
                            f"message of {size} bytes exceeds the {self._max}-byte limit; skipped",
                            stream.src,
                            view,
                            size,
                        )
                    )
                    continue
                line = view.tobytes()
                try:
                    out.append(PipesLine(n, parse_message(line, max_line_bytes=self._max), size))
                except PipesMessageError as e:
                    out.append(PipesBadLine(n, e, line[:BAD_LINE_HEAD_BYTES], size, _bus_source(stream.src)))
        self.messages_seen += n - self._counts[stream]
        self._counts[stream] = n
        return out

    async def _inbox(self) -> None:
        """Messages sent to the endpoint outside a stream: data is reported, control is logged."""
        while True:
            while self._paused:
                await self._resumed.wait()
            try:
                msg = await self.endpoint.recv()
            except BusError:
                return
            if msg.KIND in codec.DATA_KINDS:
                frames = getattr(msg, "frames", ()) or (b"",)
                reason = f"a {msg.KIND} bus message outside a stream: not read (a writer must open a stream)"
                self._deliver([_bus_bad(i, reason, msg.src, memoryview(f)) for i, f in enumerate(frames, 1)])
                continue
            self.ignored += 1
            log_fn = log.warning if self.ignored == 1 else log.debug
            log_fn(
                "Pipes bus reader %s: ignored a %s message from %s: %.200s",
                self.endpoint.addr,
                msg.KIND,
                msg.src,
                getattr(msg, "message", ""),
            )

    def _check_end(self) -> None:
        if self._finished and not self._streams and not self._eof:
            self._end()

    def _end(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._eof = True
        self._wakeup.set()

    def _deliver(self, records: Sequence[PipesRecord], *, force: bool = False) -> None:
        if not self._closed or force:
            super()._deliver(records)

    def _pause(self) -> None:
        self._paused = True
        self._resumed.clear()

    def _unpause(self) -> None:
        self._paused = False
        self._resumed.set()


def _bus_source(addr: str) -> str:
    return f"the bus writer {addr}"


def _bus_bad(n: int, reason: str, addr: str, head: memoryview | bytes = b"", size: int = 0) -> PipesBadLine:
    return PipesBadLine(n, PipesMessageError(reason), bytes(head[:BAD_LINE_HEAD_BYTES]), size, _bus_source(addr))


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

    def close(self) -> None:
        """Close the channel and the injector and remove the bootstrap's files; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.channel.close()
            self.injector.close()
        finally:
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
