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
written).
Its end marker is written at ``close``; a worker that fails calls ``abort`` instead, so that an
Arrow reader downstream sees a truncated stream, not a complete one; and the node, which holds
the pipe open too until the worker's exit is known, cancels that reader before it sees any end.

What the worker cannot tell on such an edge: how many bytes crossed it (``exit`` reports -1, as for
any direct edge), and the tap sees nothing of it (only what crosses the hub is published there).
"""

from __future__ import annotations

import io
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any, Final

import pyarrow as pa

from dpipes.nodes.plugins.edges import EdgeWriter, open_writer, read_batches

log = logging.getLogger(__name__)

__all__ = ["DIRECT_BUFFER_BYTES", "DirectInput", "DirectOutput", "receive_fds"]

DIRECT_BUFFER_BYTES: Final = 1024 * 1024
READ_BUFFER_BYTES: Final = 64 * 1024  # an input's read-ahead for small reads; a read this large bypasses it
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


class _WholeReads(io.RawIOBase):
    """A pipe read as pyarrow wants it: ``read(n)`` gives ``n`` bytes, fewer only at the end; one of at
    least ``READ_BUFFER_BYTES`` is read into a buffer of pyarrow's memory pool (see the module)."""

    def __init__(self, file: io.BufferedIOBase) -> None:
        super().__init__()
        self.file = file

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> Any:
        if size is None or size < READ_BUFFER_BYTES:
            return self.file.read(size)
        out = pa.allocate_buffer(size)
        got = self.file.readinto(memoryview(out).cast("B"))  # a BufferedReader fills it, or reaches the end
        return out if got == size else out.slice(0, got)


class DirectInput:
    """One input connection read from a descriptor (its own thread calls :meth:`batches`)."""

    def __init__(self, fd: int, fmt: str, *, where: str) -> None:
        self.file = io.BufferedReader(io.FileIO(fd, "rb"), READ_BUFFER_BYTES)
        self.format = _pyarrow_format(fmt)
        self.where = where

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The edge's record batches, to its end (then the descriptor is closed).

        Raises:
            EdgeDecodeError: the bytes do not parse (see :func:`~dpipes.nodes.plugins.edges.read_batches`).
        """
        with self.file:
            if not self.file.peek(1):  # nothing at all (a program that wrote nothing; an anchor never opened)
                return
            source = pa.PythonFile(_WholeReads(self.file), mode="r")
            yield from read_batches(self.format, source, where=self.where)  # type: ignore[arg-type]


class DirectOutput:
    """One destination of an outgoing anchor written on a descriptor, on the plugin's thread.

    Args:
        fd: the descriptor (the worker's from now on).
        fmt: the edge's format.
        where: the edge, for errors.
        gone: the error a write to a pipe whose reader has gone raises (the worker then ends as
            by ``SIGPIPE``).
    """

    def __init__(self, fd: int, fmt: str, *, where: str, gone: Callable[[str], BaseException]) -> None:
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.sink = pa.BufferedOutputStream(pa.PythonFile(self.file, mode="w"), DIRECT_BUFFER_BYTES)
        self.format = _pyarrow_format(fmt)
        self.where = where
        self.gone = gone
        self.schema: pa.Schema | None = None
        self.writer: EdgeWriter | None = None

    def open(self, schema: pa.Schema) -> None:
        self.schema = schema
        self.writer = self._io(lambda: open_writer(self.format, self.sink, schema))  # type: ignore[arg-type]

    def write(self, batch: pa.RecordBatch) -> None:
        assert self.writer is not None and self.schema is not None, "write before open"
        if not batch.schema.equals(self.schema):  # equal but for metadata: the stream's own
            batch = pa.RecordBatch.from_arrays(batch.columns, schema=self.schema)
        try:  # not through _io: a lambda and a call per batch are a tenth of a small batch's cost
            self.writer.write(batch)
            self.sink.flush()
        except BrokenPipeError:
            raise self.gone(f"{self.where}: its reader went away") from None

    def close(self) -> None:
        """The format's end (an anchor that never had a schema writes nothing), then the descriptor."""
        try:
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
