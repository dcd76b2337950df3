"""Pipes message readers: a program's messages as they are written, from a FIFO or from the bus.

``file`` channel: dagster-pipes' default writer opens the path in append mode for every message,
writes one line and closes it, so a plain FIFO reader would see end-of-file between any two
messages. :class:`PipesFifoReader` therefore holds a write end of its own FIFO open: the read end
never sees EOF while the program runs, and a message is read as soon as its line is written, with
no polling. When the supervisor has reaped the program it calls :meth:`PipesFifoReader.finish`,
which closes that write end; the reader then drains what is left and ends at the real EOF, once no
process holds the FIFO open. :class:`PipesBusReader` takes the messages a program sends straight
onto the bus (:class:`dpipes.bus.pipes_writer.PipesBusMessageWriter`).

Both queue records for ``async for`` / ``next_batch`` and pause reading past ``PENDING_MAX_*``, so
a writer faster than its consumer blocks, as on a full pipe.
"""

# About 580 lines: the FIFO and the bus readers share their queue, pausing and draining
# (_QueuedRecords); apart, each would repeat it.

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from abc import abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Self, cast

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint, InStream
from dpipes.bus.errors import BusError
from dpipes.bus.pipes import (
    BUS_OFFER_KEY,
    MAX_LINE_BYTES,
    PipesMessageError,
    parse_message,
)
from dpipes.nodes.pipes_lines import (
    BAD_LINE_HEAD_BYTES,
    PipesBadLine,
    PipesLine,
    PipesLineSplitter,
    PipesMessageChannel,
    PipesRecord,
)

__all__ = [
    "DRAIN_TIMEOUT_S",
    "PipesBusReader",
    "PipesFifoReader",
]


log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S: Final = 5.0  # after finish(), how long drain() waits for stray writers to close the FIFO
FIFO_PIPE_BYTES: Final = 1024 * 1024  # F_SETPIPE_SZ: a 1 MiB pipe moves ~4x what the default 64 KiB does
READ_CHUNK_BYTES: Final = 1024 * 1024
READ_BUDGET_BYTES: Final = 8 * 1024 * 1024  # per readiness callback, so one busy writer cannot starve the loop
PENDING_MAX_RECORDS: Final = 16 * 1024  # unconsumed records before reading pauses (the writer then blocks)
PENDING_MAX_BYTES: Final = 32 * 1024 * 1024
BUS_MAX_WRITERS: Final = 64  # concurrent writer streams on one bus reader; each may hold a credit window
_F_SETPIPE_SZ: Final = getattr(fcntl, "F_SETPIPE_SZ", 1031)


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
                    out.append(PipesLine(n, parse_message(line, max_line_bytes=self._max), size, line))
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
