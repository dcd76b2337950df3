"""A plugin worker's direct edges: a kernel pipe to a neighbour on the same node, read and written by pyarrow.

When a plugin stage's neighbour in a linear pipeline runs on the same node (a program, or another
plugin's worker), or the node holds the local client's own stdin or stdout, the edge between them
is one kernel pipe (that descriptor), as between two programs: its data never crosses the hub
(see *Direct edges* in :mod:`dpipes.nodes.plugins.spec` for how the worker gets the descriptor).
The worker reads such an input with :class:`DirectInput` and writes such an output with
:class:`DirectOutput`, both straight on the descriptor with pyarrow's own readers and writers
(:mod:`~dpipes.nodes.plugins.edges`): no bus messages, no credit, no thread hand-off per chunk.
Flow control is the pipe's: a writer blocks while its pipe is full, as a program does.

The edge's format is the one a bus edge would carry (``csv``, ``ndjson``, ``arrow``), and
``batches`` between two plugins is an Arrow IPC stream. A reader gives pyarrow exactly the bytes
it asks for, fewer only at the end (pyarrow's readers take a short read of a pipe for the end):
small reads (an IPC message's length and metadata) through a buffer of ``READ_BUFFER_BYTES``, and
a large one (a message body, a CSV block) straight into a buffer of pyarrow's memory pool. That
pool reuses its pages, where a ``bytes`` per body would fault fresh ones in (a 205 MiB IPC stream
took a quarter less CPU to read so, with 40 page faults instead of 9,000). A writer writes each
batch in one go (pyarrow's writers make several small writes per batch, gathered in a buffer of
``DIRECT_BUFFER_BYTES`` and flushed after each batch, so that a batch reaches its reader as it is
written). When the worker's input is a direct edge too (:class:`HeldWrites`), its outputs are
flushed instead before a read of that input would wait for its writer, at the input's end, when
the buffer fills, and at ``close``: while input is there to be read at once, the plugin's small
batches go out in one write of many, and its reader wakes once for them, not once per batch (a
pipe between programs fills so, through stdio's buffers). A batch then waits at most for what
the plugin makes of the input already in the pipe.
A worker may start reading a direct input before its plugin asks for data (:class:`ReadAhead`):
a thread reads the pipe into one buffer of ``READ_AHEAD_BYTES`` at most while the worker attaches
to its hub and loads its plugin (3-8 ms, during which the program upstream would otherwise stop on
a full pipe), and stops when the plugin's first read takes over; the reader then serves those bytes
first, as views of that buffer (a message that runs past its end is gathered into one buffer of
its own), then reads the pipe itself.
An output's end marker is written at ``close``; a worker that fails calls ``abort`` instead, so that an
Arrow reader downstream sees a truncated stream, not a complete one; and the node, which holds
the pipe open too until the worker's exit is known, cancels that reader before it sees any end.

What the worker cannot tell on such an edge: how many bytes crossed it (``exit`` reports -1, as for
any direct edge), and the tap sees nothing of it (only what crosses the hub is published there).
"""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

import pyarrow as pa

from dpipes.nodes.plugins.edges import EdgeWriter, open_writer, read_batches
from dpipes.nodes.plugins.errors import EdgeDecodeError

log = logging.getLogger(__name__)

__all__ = [
    "DIRECT_BUFFER_BYTES",
    "READ_AHEAD_BYTES",
    "DirectInput",
    "DirectOutput",
    "HeldWrites",
    "ReadAhead",
    "receive_fds",
]

DIRECT_BUFFER_BYTES: Final = 1024 * 1024
READ_BUFFER_BYTES: Final = 64 * 1024  # an input's read-ahead for small reads; a read this large bypasses it
READ_AHEAD_BYTES: Final = 16 * 1024 * 1024  # a worker's start at ~3 GB/s; its pages are faulted in only as filled
FD_MESSAGE_BYTES: Final = 64  # the descriptor socket's message: its payload says nothing (the spec does)


def receive_fds(sock_fd: int, count: int, *, timeout_s: float) -> list[int]:
    """``count`` descriptors from the node over the descriptor socket ``sock_fd`` (then closed).

    Raises:
        OSError: the socket failed, timed out, or carried another number of descriptors.
    """
    with socket.socket(fileno=sock_fd) as sock:
        sock.settimeout(timeout_s)
        _data, fds, _flags, _addr = socket.recv_fds(sock, FD_MESSAGE_BYTES, max(count, 1))
    if len(fds) != count:
        for fd in fds:
            os.close(fd)
        raise OSError(f"expected {count} descriptor(s) from the node, got {len(fds)}")
    return fds


def _pyarrow_format(fmt: str) -> str:
    """The edge format on a pipe: ``batches`` (plugin to plugin) is an Arrow IPC stream."""
    return "arrow" if fmt == "batches" else fmt


class ReadAhead:
    """The first bytes of a pipe, read on a thread of its own until :meth:`take` (see the module).

    The thread waits in ``poll`` on the pipe and on a wake-up pipe, and reads only what the pipe
    holds, so :meth:`take` never waits for a writer: it wakes the thread and joins it.
    """

    def __init__(self, fd: int, limit: int = READ_AHEAD_BYTES) -> None:
        self._fd = fd
        self._buffer = pa.allocate_buffer(limit)
        self._filled = 0
        self._eof = False
        self._error: OSError | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._read, name="direct input read-ahead", daemon=True)
        self._thread.start()

    @property
    def read(self) -> int:
        """Bytes read so far."""
        return self._filled

    def _read(self) -> None:
        view = memoryview(self._buffer).cast("B")
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        try:
            while self._filled < len(view):
                if self._wake_r in dict(poller.poll()):
                    return
                got = os.readv(self._fd, [view[self._filled :]])  # readable: returns at once
                if not got:
                    self._eof = True
                    return
                self._filled += got
        except OSError as exc:
            self._error = exc
        finally:
            view.release()

    def take(self) -> tuple[pa.Buffer, bool]:
        """Stop reading: the bytes read, and whether the pipe's end came after them.

        Raises:
            OSError: reading the pipe failed.
        """
        os.write(self._wake_w, b"\0")
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._error is not None:
            raise self._error
        return self._buffer.slice(0, self._filled), self._eof


class _WholeReads(io.RawIOBase):
    """A pipe read as pyarrow wants it: ``read(n)`` gives ``n`` bytes, fewer only at the end; the bytes
    read ahead first, as views, then one read of at least ``READ_BUFFER_BYTES`` into a buffer of
    pyarrow's memory pool (see the module)."""

    def __init__(self, file: io.BufferedIOBase, head: pa.Buffer | None = None, *, ended: bool = False) -> None:
        super().__init__()
        self.file = file
        self.head = head if head is not None and head.size else None
        self.at = 0
        self.ended = ended  # the pipe's end came right after ``head``

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> Any:
        if self.head is not None:
            return self._read_head(-1 if size is None else size)
        if size is None or size < READ_BUFFER_BYTES:
            return self.file.read(size)
        out = pa.allocate_buffer(size)
        got = self.file.readinto(memoryview(out).cast("B"))  # a BufferedReader fills it, or reaches the end
        return out if got == size else out.slice(0, got)

    def _read_head(self, size: int) -> Any:
        head, at = self.head, self.at
        assert head is not None
        left = head.size - at
        if 0 <= size < left:
            self.at += size
            return head.slice(at, size)
        self.head = None  # this read takes the rest of it
        if size == left or (self.ended and size >= 0):
            return head.slice(at)
        if size < 0:
            return head.slice(at).to_pybytes() + (b"" if self.ended else self.file.read())
        out = pa.allocate_buffer(size)
        view = memoryview(out).cast("B")
        view[:left] = memoryview(head).cast("B")[at:]
        got = left + self.file.readinto(view[left:])
        return out if got == size else out.slice(0, got)


class HeldWrites:
    """The direct outputs of a worker whose input is a direct edge too, and whether any holds a
    written batch not yet flushed: the input flushes them before it would wait (see the module).
    Both sides run on the plugin's thread: only for an input that pyarrow reads there (:meth:`fits`)."""

    @staticmethod
    def fits(fmt: str) -> bool:
        """Whether an input of ``fmt`` may flush the outputs: pyarrow reads an Arrow IPC stream on the
        caller's thread, but CSV and JSON ahead on an I/O thread of its own, where a flush would race
        the plugin's writes."""
        return _pyarrow_format(fmt) == "arrow"

    def __init__(self) -> None:
        self.outputs: list[DirectOutput] = []
        self.pending = False

    def flush(self) -> None:
        self.pending = False
        for out in self.outputs:
            out.flush_held()


class _Pipe(io.FileIO):
    """An input's descriptor, read by its ``BufferedReader``: before a read that would wait for the
    writer, ``held``'s outputs are flushed."""

    def __init__(self, fd: int, held: HeldWrites | None) -> None:
        super().__init__(fd, "rb")
        self.held = held
        self._ready = select.poll()
        self._ready.register(fd, select.POLLIN)

    def readinto(self, buffer: Any) -> int | None:
        held = self.held
        if held is None:
            return super().readinto(buffer)
        if held.pending and not self._ready.poll(0):
            held.flush()
        return super().readinto(buffer)

    def readall(self) -> bytes:
        if self.held is not None and self.held.pending:
            self.held.flush()
        return super().readall()


class DirectInput:
    """One input connection read from a descriptor (its own thread calls :meth:`batches`), maybe
    begun by ``ahead`` (a :class:`ReadAhead` on the same descriptor); ``held``: the worker's direct
    outputs, flushed before a read would wait (on the same thread: the plugin's)."""

    def __init__(
        self, fd: int, fmt: str, *, where: str, ahead: ReadAhead | None = None, held: HeldWrites | None = None
    ) -> None:
        self.file = io.BufferedReader(_Pipe(fd, held), READ_BUFFER_BYTES)
        self.held = held
        self.format = _pyarrow_format(fmt)
        self.where = where
        self.ahead = ahead

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The edge's record batches, to its end (then the descriptor is closed).

        Raises:
            EdgeDecodeError: the bytes do not parse (see :func:`~dpipes.nodes.plugins.edges.read_batches`).
        """
        with self.file:
            try:
                head, ended = self.ahead.take() if self.ahead is not None else (None, False)
            except OSError as exc:
                raise EdgeDecodeError(f"{self.where}: cannot read it: {exc}") from None
            if not (head and head.size) and (ended or not self.file.peek(1)):
                return  # nothing at all (a program that wrote nothing; an anchor never opened)
            source = pa.PythonFile(_WholeReads(self.file, head, ended=ended), mode="r")
            yield from read_batches(self.format, source, where=self.where)  # type: ignore[arg-type]
        if self.held is not None and self.held.pending:  # the input's end (an IPC stream's own end marker)
            self.held.flush()


class DirectOutput:
    """One destination of an outgoing anchor written on a descriptor, on the plugin's thread.

    Args:
        fd: the descriptor (the worker's from now on).
        fmt: the edge's format.
        where: the edge, for errors.
        gone: the error a write to a pipe whose reader has gone raises (the worker then ends as
            by ``SIGPIPE``).
        held: flush a batch not after it is written but when ``held`` is flushed (by the worker's
            direct input, see the module); None: after each batch.
    """

    def __init__(
        self, fd: int, fmt: str, *, where: str, gone: Callable[[str], BaseException], held: HeldWrites | None = None
    ) -> None:
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.sink = pa.BufferedOutputStream(pa.PythonFile(self.file, mode="w"), DIRECT_BUFFER_BYTES)
        self.format = _pyarrow_format(fmt)
        self.where = where
        self.gone = gone
        self.schema: pa.Schema | None = None
        self.writer: EdgeWriter | None = None
        self.held = held
        self.broken = False  # a held flush found the reader gone: said at the plugin's next write or close
        if held is not None:
            held.outputs.append(self)

    def open(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.writer = self._io(lambda: open_writer(self.format, self.sink, schema))  # type: ignore[arg-type]

    def write(self, batch: pa.RecordBatch) -> None:
        assert self.writer is not None and self.schema is not None, "write before open"
        if not batch.schema.equals(self.schema):  # equal but for metadata: the stream's own
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=self.schema)
        try:  # not through _io: a lambda and a call per batch are a tenth of a small batch's cost
            if self.broken:
                raise BrokenPipeError
            self.writer.write(batch)
            if self.held is None:
                self.sink.flush()
            else:
                self.held.pending = True
        except BrokenPipeError:
            raise self.gone(f"{self.where}: its reader went away") from None

    def flush_held(self) -> None:
        """Write what the buffer holds (for :class:`HeldWrites`, under the input's read: a reader that
        went away is told to the plugin at its next write or close, not raised into the read)."""
        if self.broken or self.file.closed:
            return
        try:
            self.sink.flush()
        except BrokenPipeError:
            self.broken = True

    def close(self) -> None:
        """The format's end (an anchor that never had a schema writes nothing), then the descriptor."""
        try:
            if self.broken:
                raise self.gone(f"{self.where}: its reader went away")
            if self.writer is not None:
                writer = self.writer
                self._io(writer.close)
            self._io(self.sink.close)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the descriptor without the format's end: the reader sees a truncated stream."""
        if not self.file.closed:
            try:
                self.file.close()
            except OSError:  # the reader went away: nothing more to say to it
                pass

    def _io(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except BrokenPipeError:
            raise self.gone(f"{self.where}: its reader went away") from None
