"""The plugin worker: one plugin stage, in a process of its own, attached to its node's hub.

The node forks it for a plugin stage (``%NAME`` in a pipeline, a plugin in a workflow) under its
supervisor, as it forks a program, so the same cancel, kill and no-orphan rules hold:
``python -m dpipes.nodes.plugins.worker``, with the stage's :class:`WorkerSpec` as one JSON
document on stdin (then closed). The worker

1. attaches to the hub at ``spec.hub`` (``ipc://``) under the stage's own endpoint name, which
   the node reserved (:meth:`dpipes.bus.hub.Hub.reserve`): what upstream sent before the worker
   was up waited there;
2. loads the plugin (:func:`~dpipes.nodes.plugins.registry.load_plugin`, on a thread while it
   attaches) and constructs it through a :class:`~dpipes.nodes.plugins.runner.PluginRunner`, whose
   rules and callback timeout hold;
3. takes each input connection (``spec.inputs``) as the bus stream from its ``src``: ``ARROW``
   batches from another plugin (``batches``; when one stage sends several streams here, the
   ``anchor`` key of a stream's first part says which of its output anchors it is), or a
   program's output converted at the boundary by :mod:`~dpipes.nodes.plugins.edges` (``csv``,
   ``ndjson``, ``arrow``: an Arrow IPC stream; in an object mode, ``OBJECTS`` batches become
   tables of their objects). Each connection feeds the runner from a thread of its own through a
   bounded queue, so credit is granted only as the plugin consumes. A *direct* input (the spec's
   ``input_fd``: a kernel pipe from a neighbour on this node) is no stream: pyarrow reads it
   straight from the descriptor on the plugin's thread (:mod:`~dpipes.nodes.plugins.direct`);
   a thread reads its first bytes ahead while the worker attaches and loads the plugin.
   An input with no ``src`` (an optional anchor that nothing feeds) ends at once: the plugin
   gets its ``on_incoming_connection_complete`` without data. When every input ended, the runner completes;
4. sends each outgoing anchor to each of its destinations (``spec.outputs``): ``ARROW`` streams
   to a plugin (zero-copy framing of :mod:`dpipes.bus.arrow`), else the edge's format as
   ``BYTES`` (``OBJECTS`` in an object mode) to a program or the client. Writes wait for credit:
   a slow reader blocks the plugin's write, as a full pipe blocks a writer (that wait does not
   count against the callback timeout). An anchor that carried no schema at all ends an
   ``ARROW`` stream with one empty batch of no columns, so its reader still learns which anchor
   ended; the reader skips it. A *direct* output (``output_fd``) is written by pyarrow straight
   onto the descriptor, on the plugin's thread; a full pipe blocks the write as credit would;
   with a direct input too, it is flushed before that input's read would wait, not per batch;
5. sends the plugin's ``io`` messages as ``PIPES`` messages (one message's JSON per frame, as a
   node sends any stage's) to ``spec.messages_to``.

A node may start a worker before it has a stage for it (``--pooled``, :mod:`dpipes.nodes.worker_pool`):
it imports what every worker needs, then waits on stdin; the spec's ``cwd`` and ``env`` make it the
stage's, as they are for a worker forked for the stage.

Exit status (the node reports it as the stage's)
    0: done, every output acknowledged by its reader. ``EXIT_PLUGIN_FAILED`` (1): the plugin
    failed (a callback raised or did not return within the timeout, an anchor rule was broken).
    ``EXIT_BAD_INPUT`` (2): an input did not convert (a CSV that does not parse, a schema that
    changed mid-stream) or its stream failed. ``EXIT_BAD_OUTPUT`` (3): an output could not be
    delivered. ``EXIT_NOT_STARTED`` (4): the spec, the plugin or the hub failed before any data.
    A reader that went away (``| head``) ends the worker by ``SIGPIPE``, as it would a program.
    On a failure, one line on stderr names the stage, node and plugin, and every output stops where
    it is, never ended: its node cancels each output stream once it has reported the stage's exit
    (the hub keeps which streams the worker left unended, :meth:`dpipes.bus.hub.Hub.release`), so
    no reader takes a partial output for a whole one, and the stage's own failure is the one the
    pipeline's coordinator hears first, not its reader's for want of the rest. A worker killed
    (SIGKILL, a cancel) leaves its streams the same way, and they end the same way.

The worker ends with ``os._exit`` once its streams are settled: a callback that never returned
still holds the runner's thread, which nothing else could stop. Just before, it closes its stderr
and writes its exit code, one decimal line, to its stdout (a pipe of its node's): the node reports
the stage ended from that line, not after the kernel has freed the worker's memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import faulthandler
import io
import json
import logging
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import pyarrow as pa
from dagster_pipes import PipesMessage, PipesMessageWriterChannel

from dpipes.bus import codec
from dpipes.bus.arrow import ArrowDecoder, ArrowEncoder
from dpipes.bus.client import Client
from dpipes.bus.endpoint import Endpoint, InStream, OutStream, StreamCancelled
from dpipes.bus.errors import BusError, DpipesError
from dpipes.nodes.plugins.api import AnchorSpec, Environment
from dpipes.nodes.plugins.direct import DirectInput, DirectOutput, HeldWrites, ReadAhead, receive_fds
from dpipes.nodes.plugins.edges import EdgeWriter, open_writer, read_batches
from dpipes.nodes.plugins.errors import EdgeDecodeError, PluginError, SchemaChanged
from dpipes.nodes.plugins.registry import installed_plugins, load_plugin
from dpipes.nodes.plugins.runner import PluginRunner
from dpipes.nodes.plugins.spec import FD_BUS, FD_SENT, FD_SOCKET_FLAG, MAX_SPEC_BYTES, POOLED_FLAG, WorkerSpec
from dpipes.nodes.plugins.transport import Transport
from dpipes.nodes.protocol import PluginInput, PluginOutput

log = logging.getLogger(__name__)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_BAD_OUTPUT",
    "EXIT_NOT_STARTED",
    "EXIT_PLUGIN_FAILED",
    "WorkerSpec",
    "main",
]

EXIT_PLUGIN_FAILED: Final = 1
EXIT_BAD_INPUT: Final = 2
EXIT_BAD_OUTPUT: Final = 3
EXIT_NOT_STARTED: Final = 4

ANCHOR_KEY: Final = "anchor"  # in a stream's first ARROW part: the sender's output anchor
ALIGN_FROM_BYTES: Final = 64  # a read this large handed over as a view of a chunk must be 8-byte aligned
SHARE_FROM_BYTES: Final = 64 * 1024  # a buffer a writer hands over this large is sent as it is, not copied
GATHER_KEEP_BYTES: Final = 64 << 20  # per input: gather buffers kept for reuse (a pass-through's batches in flight)
GATHER_REUSE_FROM_BYTES: Final = 64 * 1024  # a gathered read this large takes a kept buffer
GATHER_ROUND_BYTES: Final = 256 * 1024  # a kept buffer's size is rounded up to this, so that the next batch fits it
FEED_QUEUE_ITEMS: Final = 8  # per input connection: messages read ahead of the plugin (credit does the rest)
SEND_AHEAD_BATCHES: Final = 32  # per output: batches the plugin may write ahead of the loop sending them
# ... and bytes: a batch of a megabyte or more waits once this much is unsent. Every byte ahead is
# memory this short-lived process faults in afresh (32 batches of 1.8 MB ahead of a slower reader:
# 60 MB of new pages per run), and the reader's credit, not this queue, keeps large batches flowing.
SEND_AHEAD_BYTES: Final = 8 << 20
PIPES_BATCH_FRAMES: Final = 256  # io messages sent together in one PIPES message
OUTPUT_CLOSE_TIMEOUT_S: Final = 60.0  # after the last batch: a reader that acknowledges nothing for this long is gone
FD_RECEIVE_TIMEOUT_S: Final = 10.0  # a pooled worker's direct edges: the node sent them before the spec

_PR_SET_NAME: Final = 15  # <linux/prctl.h>

T = TypeVar("T")


class _Failed(Exception):
    """The run failed: ``code`` is the exit status, ``str()`` the line for stderr."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _DownstreamGone(DpipesError, BrokenPipeError):
    """A reader of an output cancelled it (it exited early): the worker ends as by SIGPIPE."""


# -- threads <-> the loop ------------------------------------------------------------------------


def _in_thread(loop: asyncio.AbstractEventLoop, name: str, fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run ``fn`` on a daemon thread of its own (it may block for a long time); its result."""
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the loop, which decides
            outcome: tuple[T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        with contextlib.suppress(RuntimeError):  # the loop closed first: nobody is waiting any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=body, name=name, daemon=True).start()
    return future


class _Handoff:
    """A bounded queue from the loop to one thread: the loop awaits room, the thread blocks for items.

    The thread that takes an item wakes a waiting loop with one ``call_soon_threadsafe``; no
    thread is started per item, however often the reader is behind.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, max_items: int) -> None:
        self._loop = loop
        self._max = max_items
        self._items: collections.deque[Any] = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._room: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        """On the loop: queue ``item`` whatever the bound (an end marker)."""
        with self._ready:
            self._items.append(item)
            self._ready.notify()

    async def put(self, item: Any) -> None:
        """On the loop: queue ``item``, waiting while the queue is full (so no credit is granted)."""
        while True:
            with self._ready:
                if len(self._items) < self._max:
                    self._items.append(item)
                    self._ready.notify()
                    return
                room = self._room = self._loop.create_future()
            await room

    def get(self) -> Any:
        """On the thread: the next item, waiting for it."""
        with self._ready:
            while not self._items:
                self._ready.wait()
            item = self._items.popleft()
            room, self._room = self._room, None
        if room is not None:
            self._loop.call_soon_threadsafe(_wake, room)
        return item


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _scan_refs(kept: list[Any]) -> list[int]:
    """The reference count of each of ``kept``'s items, as seen from here."""
    return [sys.getrefcount(item) for item in kept]


# What _scan_refs counts for an item only its list refers to, measured once by the same code rather
# than written down: how many references an interpreter's loop and call take differs between
# versions, and a count assumed too high would hand out a buffer that is still in use.
_FREE_REFS: Final = _scan_refs([object()])[0]


class _GatherBuffers:
    """Buffers for what a read gathers across chunks, reused once nothing refers to them any more.

    Such a read is an IPC message body (a whole batch) that spans two received chunks. With a
    fresh buffer of pyarrow's pool per body (freed later on another thread, the loop's, once its
    bytes were sent on), the kernel zeroing new pages took a third to two thirds of a
    pass-through plugin's thread on a 205 MiB stream; with these, none after the first
    batches in flight. A kept buffer is free again when only this pool refers to it:
    a view of it (the batch's buffers, their slices, the frames sent on) holds a reference to it
    until released. At most ``GATHER_KEEP_BYTES`` are kept; past that a read takes a buffer that
    is not kept.
    """

    def __init__(self, keep_bytes: int = GATHER_KEEP_BYTES) -> None:
        self._kept: list[pa.Buffer] = []
        self._kept_bytes = 0
        self._keep_bytes = keep_bytes

    def take(self, size: int) -> memoryview:
        """A writable view of ``size`` bytes, in a buffer nobody else uses now."""
        for buf, refs in zip(self._kept, _scan_refs(self._kept), strict=True):
            if refs == _FREE_REFS and buf.size >= size:  # a view anywhere makes it more
                return memoryview(buf).cast("B")[:size]
        buf = pa.allocate_buffer(-(-size // GATHER_ROUND_BYTES) * GATHER_ROUND_BYTES)
        if self._kept_bytes + buf.size <= self._keep_bytes:
            self._kept.append(buf)
            self._kept_bytes += buf.size
        return memoryview(buf).cast("B")[:size]

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes


class _Feed(io.RawIOBase):
    """A byte stream read by pyarrow on a thread, written by the loop through a :class:`_Handoff`.

    ``read(n)`` gives exactly ``n`` bytes, fewer only at the end (pyarrow's readers take a short
    read for the end of the stream). What lies within one received chunk is handed over as a view
    of it, zero-copy, when it starts 8-byte aligned (Arrow's buffers want that). A large read
    that spans chunks lying end to end in memory (a stream's chunks from another node, which
    this node's hub leases packed in its shared memory) is one view over them too, which keeps
    each of them alive; what spans chunks lying apart is gathered once into a buffer
    (:class:`_GatherBuffers`: reused, not faulted in afresh for every batch).
    """

    def __init__(self, items: _Handoff) -> None:
        super().__init__()
        self._items = items
        self._buf = memoryview(b"")
        self._chunks: list[memoryview] = []  # the received chunks ``_buf`` lies in, in order
        self._ahead: memoryview | None = None  # the chunk after them, taken to look at where it lies
        self._eof = False
        self._gather = _GatherBuffers()

    def readable(self) -> bool:
        return True

    def _next(self) -> bool:
        """Take the next chunk: whether there was one (not the end)."""
        chunk = self._following()
        if chunk is None:
            return False
        self._ahead = None
        self._buf = chunk
        self._chunks = [chunk]
        return True

    def _following(self) -> memoryview | None:
        """The chunk after the ones taken, waiting for it; None at the end."""
        while self._ahead is None and not self._eof:
            item = self._items.get()
            if item is None:
                self._eof = True
            elif item:
                self._ahead = memoryview(item).cast("B")
        return self._ahead

    def _joined(self, size: int) -> None:
        """Join ``_buf`` with the chunks after it while they lie right after it in memory, until it
        holds ``size`` bytes: one view over them, whose base keeps each chunk it covers alive (and
        none before it, so a long stream pins nothing it has read)."""
        start = pa.py_buffer(self._buf).address
        end = start + len(self._buf)
        chunks = [c for c in self._chunks if _address_range(c)[1] > start]
        while end - start < size:
            chunk = self._following()
            if chunk is None:
                break
            at, after = _address_range(chunk)
            if at != end:
                break
            self._ahead = None
            chunks.append(chunk)
            end = after
        if len(chunks) > 1 and end - start > len(self._buf):
            self._buf = memoryview(pa.foreign_buffer(start, end - start, base=tuple(chunks))).cast("B")
            self._chunks = chunks

    def peek(self) -> bool:
        """Wait for the first bytes: whether there are any."""
        return bool(self._buf) or self._next()

    def read(self, size: int | None = -1) -> Any:
        if size is None or size < 0:
            return b"".join(self._rest())
        if 0 < len(self._buf) < size and size >= GATHER_REUSE_FROM_BYTES:
            self._joined(size)
        buf = self._buf
        if len(buf) >= size:
            piece = buf[:size]
            if size < ALIGN_FROM_BYTES or pa.py_buffer(piece).address % 8 == 0:
                self._buf = buf[size:]
                return piece
        if size >= GATHER_REUSE_FROM_BYTES:
            view = self._gather.take(size)
        else:
            view = memoryview(pa.allocate_buffer(size)).cast("B")
        at = 0
        while at < size:
            if not buf:
                if not self._next():
                    break
                buf = self._buf
            n = min(size - at, len(buf))
            view[at : at + n] = buf[:n]
            at += n
            buf = buf[n:]
        self._buf = buf
        return view if at == size else view[:at]

    def _rest(self) -> Any:
        while self._buf or self._next():
            yield self._buf
            self._buf = memoryview(b"")

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        n = len(data)
        b[:n] = memoryview(data).cast("B")
        return n


def _address_range(view: memoryview) -> tuple[int, int]:
    """Where ``view``'s bytes start and end in this process's memory."""
    at: int = pa.py_buffer(view).address
    return at, at + view.nbytes


# -- inputs ----------------------------------------------------------------------------------------


class _Input:
    """One input connection: a bus stream read by the loop, fed to the runner by a thread."""

    def __init__(self, spec: PluginInput, worker: _Worker) -> None:
        self.spec = spec
        self.worker = worker
        self.items = _Handoff(worker.loop, FEED_QUEUE_ITEMS)
        self.where = f"input {spec.anchor!r} (from {spec.src or 'nothing'})"
        self.stream: InStream | None = None
        self.direct: DirectInput | None = None  # a kernel pipe from a neighbour here, in place of a stream
        if spec is worker.spec.direct_input:
            self.where = f"input {spec.anchor!r} (a pipe from {spec.src})"
            self.direct = DirectInput(
                worker.spec.input_fd, spec.format, where=self.where, ahead=worker.ahead, held=worker.held
            )
        if not spec.src:  # an optional anchor nothing feeds: it ends at once, without data
            self.items.put_nowait(None)

    async def put(self, item: Any) -> None:
        await self.items.put(item)  # the plugin is behind: wait for it (and so grant no credit)

    async def pump(self, stream: InStream, first: codec.Message | None) -> None:
        """Read the stream to its end into the queue (None at the end)."""
        self.stream = stream
        fmt, mode = self.spec.format, self.worker.spec.mode
        decoder = ArrowDecoder() if fmt == "batches" else None
        msg = first if first is not None else await stream.read()
        while msg is not None:
            if decoder is not None:
                if not isinstance(msg, codec.Arrow):
                    raise _Failed(EXIT_BAD_INPUT, f"{self.where}: got {msg.KIND} where Arrow batches were expected")
                batch = decoder.feed(msg.arrow, msg.frames)
                if batch is not None:
                    await self.put(batch)
            elif mode != "bytes":
                if not isinstance(msg, codec.Objects) or len(msg.frames) != 1:
                    raise _Failed(EXIT_BAD_INPUT, f"{self.where}: got {msg.KIND} on a {mode} edge")
                from dpipes.nodes.objects import unpack_batch

                await self.put(unpack_batch(msg.frames[0], where=self.where))
            else:
                if not isinstance(msg, codec.Bytes):
                    raise _Failed(EXIT_BAD_INPUT, f"{self.where}: got {msg.KIND} on a bytes edge")
                for frame in msg.frames:
                    await self.put(frame)
            msg = await stream.read()
        await self.put(None)

    def feed(self) -> None:
        """On the connection's thread: convert and hand every batch to the runner, then its end."""
        runner, anchor, connection = self.worker.runner, self.spec.anchor, self.spec.connection
        if len(self.worker.inputs) == 1:  # the only input: its batches pulled on the plugin's thread
            runner.feed(anchor, self._batches(), connection=connection)
            return
        for batch in self._batches():
            runner.record_batch(anchor, batch, connection=connection)
        runner.incoming_complete(anchor, connection=connection)

    def _batches(self) -> Any:
        fmt, mode = self.spec.format, self.worker.spec.mode
        if self.direct is not None:
            yield from self.direct.batches()
        elif fmt == "batches":
            while (batch := self.items.get()) is not None:
                if batch.num_columns == 0 and batch.num_rows == 0:
                    continue  # the end marker of an anchor that never had a schema
                yield batch
        elif mode != "bytes":  # objects, as they arrived; the first batch fixes the types
            schema = None
            rows = 0
            while (objects := self.items.get()) is not None:
                try:
                    table = pa.Table.from_pylist(objects, schema=schema)
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    raise EdgeDecodeError(f"{self.where}: objects do not convert: after {rows} rows: {exc}") from None
                schema = schema or table.schema
                rows += table.num_rows
                yield from table.to_batches()
        else:
            feed = _Feed(self.items)
            if feed.peek():  # an empty input (a program that wrote nothing, /dev/null) has no batches
                yield from read_batches(fmt, feed, where=self.where)  # type: ignore[arg-type]


# -- outputs ---------------------------------------------------------------------------------------


class _Collector:
    """The sink pyarrow's writers write to: what they wrote since the last take, as payload frames.

    With ``share`` (the IPC writer's sink), the large ``pyarrow.Buffer`` writes, which are a
    batch's own buffers, stay frames of their own, zero-copy (the frame keeps the buffer alive
    until it is sent); small writes in between (metadata, padding) are copied and joined. Without
    it every write is copied: the CSV writer refills one buffer of its own for every batch.
    """

    def __init__(self, *, share: bool) -> None:
        self.frames: list[Any] = []
        self._small: list[bytes] = []
        self._share = share
        self.closed = False

    def write(self, data: Any) -> int:
        nbytes = data.size if isinstance(data, pa.Buffer) else memoryview(data).nbytes
        if not self._share or nbytes < SHARE_FROM_BYTES or not isinstance(data, pa.Buffer | bytes):
            self._small.append(bytes(data))  # it may be reused once this returns
        else:
            self._join_small()
            for at in range(0, nbytes, codec.MAX_PAYLOAD_FRAME_BYTES):
                self.frames.append(data[at : at + codec.MAX_PAYLOAD_FRAME_BYTES])
        return nbytes

    def flush(self) -> None:
        pass

    def _join_small(self) -> None:
        if self._small:
            self.frames.append(b"".join(self._small))
            self._small = []

    def take(self) -> list[Any]:
        """The frames written since the last take, in order."""
        self._join_small()
        frames, self.frames = self.frames, []
        return frames


class _Sink:
    """One destination of an outgoing anchor: its stream and its encoding."""

    def __init__(self, spec: PluginOutput, worker: _Worker) -> None:
        self.spec = spec
        self.worker = worker
        self.stream: OutStream | None = worker.ep.open_stream(spec.dst) if spec.dst else None
        self.encoder: ArrowEncoder | None = None
        self.writer: EdgeWriter | None = None
        self.collector = _Collector(share=spec.format == "arrow")
        self.schema: pa.Schema | None = None
        self._outgoing: Any = None
        self._first = True

    def open(self, schema: pa.Schema) -> None:
        self.schema = schema
        if self.spec.format == "batches":
            self.encoder = ArrowEncoder(schema)
        else:
            self.writer = open_writer(self.spec.format, self.collector, schema)  # type: ignore[arg-type]
            if self.worker.spec.mode != "bytes":
                from dpipes.nodes.dataflow import Outgoing

                self._outgoing = Outgoing(self.worker.spec.mode, where=self.worker.spec.describe, meta={})

    def encode(self, batch: pa.RecordBatch) -> list[codec.Message]:
        """On the plugin's thread: the messages that carry ``batch``."""
        if self.stream is None:
            return []
        if self.encoder is not None:
            schema = self.encoder.schema
            if not batch.schema.equals(schema):  # equal but for metadata: the stream's own
                batch = pa.RecordBatch.from_arrays(batch.columns, schema=schema)
            return self._arrow_parts(batch)
        assert self.writer is not None
        self.writer.write(batch)
        return self._bytes_messages(self.collector.take())

    def _arrow_parts(self, batch: pa.RecordBatch) -> list[codec.Message]:
        assert self.encoder is not None
        try:
            parts = self.encoder.encode(batch)
        except ValueError:
            if batch.num_rows < 2:
                raise
            half = batch.num_rows // 2  # too large for one bus batch: in halves, each its own
            return self._arrow_parts(batch.slice(0, half)) + self._arrow_parts(batch.slice(half))
        out: list[codec.Message] = []
        for meta, frames in parts:
            arrow = dict(meta)
            if self._first:
                arrow[ANCHOR_KEY] = self.spec.anchor
                self._first = False
            out.append(codec.Arrow(arrow=arrow, frames=tuple(frames)))
        return out

    def _bytes_messages(self, frames: list[Any]) -> list[codec.Message]:
        if not frames:
            return []
        if self._outgoing is not None:
            return list(self._outgoing.messages(b"".join(frames)))
        step = codec.MAX_FRAMES - 1
        return [codec.Bytes(frames=tuple(frames[at : at + step])) for at in range(0, len(frames), step)]

    def finish(self) -> list[codec.Message]:
        """On the plugin's thread: the messages that end the format (no schema: an end marker)."""
        if self.stream is None:
            return []
        if self.schema is None:
            if self.spec.format != "batches":
                return []
            self.open(pa.schema([]))
            return self._arrow_parts(pa.RecordBatch.from_pylist([], schema=pa.schema([])))
        out: list[codec.Message] = []
        if self.writer is not None:
            self.writer.close()
            out += self._bytes_messages(self.collector.take())
        if self._outgoing is not None:
            out += list(self._outgoing.end())
        return out


class _Sender:
    """Sends one sink's messages on the loop, in order, up to ``SEND_AHEAD_BATCHES`` (and
    ``SEND_AHEAD_BYTES``) behind the plugin.

    The plugin's thread hands each batch's messages over without waiting for the loop; it waits
    only when that many are not sent yet (the reader has granted no credit for them): flow
    control as a full pipe, and the time a write spends there is the transport's, not the
    plugin's. A batch is always taken when nothing is unsent, however large. A failure is kept
    and raised on the plugin's thread at its next write.
    """

    _CLOSE: Final = object()

    def __init__(self, sink: _Sink, describe: str) -> None:
        self.sink = sink
        self.describe = describe
        self.error: BaseException | None = None
        self.loop = asyncio.get_running_loop()
        self._unsent = threading.Condition(threading.Lock())
        self._unsent_items = 0
        self._unsent_bytes = 0
        self._ended = False  # the loop's side stopped: nobody waits for room any more
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.ensure_future(self._run())

    def submit(self, messages: list[codec.Message] | object) -> None:
        """From the plugin's thread: queue ``messages`` (or the end), waiting while too much is unsent."""
        nbytes = sum(m.payload_bytes for m in messages) if isinstance(messages, list) else 0
        with self._unsent:
            while not self._ended and _too_far_ahead(self._unsent_items, self._unsent_bytes, nbytes):
                self._unsent.wait()
            if self.error is not None:
                raise self.error
            self._unsent_items += 1
            self._unsent_bytes += nbytes
        self.loop.call_soon_threadsafe(self._items.put_nowait, (messages, nbytes))

    def _sent(self, nbytes: int) -> None:
        with self._unsent:
            self._unsent_items -= 1
            self._unsent_bytes -= nbytes
            self._unsent.notify()

    async def _run(self) -> None:
        stream = self.sink.stream
        assert stream is not None
        try:
            while (item := await self._items.get())[0] is not self._CLOSE:
                messages, nbytes = item
                for msg in messages:
                    await stream.send(msg)
                self._sent(nbytes)
            await stream.close(OUTPUT_CLOSE_TIMEOUT_S)
        except StreamCancelled as exc:
            self.error = _DownstreamGone(f"{self.describe}: the reader of {self.sink.spec.anchor!r} went away")
            raise self.error from exc
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            with self._unsent:  # a writer waiting for room learns of the end
                self._ended = True
                self._unsent.notify_all()


def _too_far_ahead(unsent_items: int, unsent_bytes: int, nbytes: int) -> bool:
    """Whether a batch of ``nbytes`` must wait for the loop to send what is unsent first."""
    if not unsent_items:
        return False  # the next one always goes, however large
    return unsent_items >= SEND_AHEAD_BATCHES or unsent_bytes + nbytes > SEND_AHEAD_BYTES


class _BusTransport(Transport):
    """The runner's transport: each outgoing anchor to its sinks, sent by the loop under credit."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.sinks: dict[str, list[_Sink]] = {}
        self.senders: dict[int, _Sender] = {}
        self.direct: dict[str, list[DirectOutput]] = {}  # kernel pipes to a neighbour here, in place of streams
        for spec in worker.spec.outputs:
            if spec.dst and worker.spec.output_fd >= 0:
                where = f"{worker.spec.describe}: output {spec.anchor!r} (a pipe to {spec.dst})"
                out = DirectOutput(
                    worker.spec.output_fd, spec.format, where=where, gone=_DownstreamGone, held=worker.held
                )
                self.direct.setdefault(spec.anchor, []).append(out)
                continue
            sink = _Sink(spec, worker)
            self.sinks.setdefault(spec.anchor, []).append(sink)
            if sink.stream is not None:
                self.senders[id(sink)] = _Sender(sink, worker.spec.describe)

    def open_anchor(self, name: str, schema: pa.Schema) -> None:
        for out in self.direct.get(name, ()):
            out.open(schema)
        for sink in self.sinks.get(name, ()):
            sink.open(schema)

    def write(self, name: str, batch: pa.RecordBatch) -> None:
        for out in self.direct.get(name, ()):
            out.write(batch)
        for sink in self.sinks.get(name, ()):
            messages = sink.encode(batch)
            if messages:
                self.senders[id(sink)].submit(messages)

    def close_anchor(self, name: str) -> None:
        for out in self.direct.get(name, ()):
            out.close()
        for sink in self.sinks.get(name, ()):
            messages = sink.finish()
            if sink.stream is not None:
                sender = self.senders[id(sink)]
                if messages:
                    sender.submit(messages)
                sender.submit(_Sender._CLOSE)

    async def settled(self) -> None:
        """Until every output is sent and acknowledged (every anchor is closed by then)."""
        await asyncio.gather(*(sender.task for sender in self.senders.values()))

    def stop_all(self) -> None:
        """Stop every output where it is, never ended: a direct one closed without its format's
        end, a bus stream left as it is, for the node to cancel once it has reported the stage."""
        for outs in self.direct.values():
            for out in outs:
                out.abort()
        for sender in self.senders.values():
            sender.task.cancel()


class _BusChannel(PipesMessageWriterChannel):
    """``provider.io``'s channel: messages queued by the plugin's thread, sent as PIPES by the loop."""

    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.stream: OutStream | None = None
        self._pending: list[bytes] = []
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def write_message(self, message: PipesMessage) -> None:
        frame = json.dumps(message, separators=(",", ":"), allow_nan=True).encode()  # a frame is the message
        self._loop.call_soon_threadsafe(self._queue, frame)

    def _queue(self, frame: bytes) -> None:
        self._pending.append(frame)
        self._wake.set()

    async def serve(self) -> None:
        """Send what is queued until closed; a failure to deliver messages is logged, not fatal."""
        spec = self.worker.spec
        try:
            while not (self._closed and not self._pending):
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    batch, self._pending = self._pending[:PIPES_BATCH_FRAMES], self._pending[PIPES_BATCH_FRAMES:]
                    if self.stream is None:
                        self.stream = self.worker.ep.open_stream(spec.messages_to)
                    await self.stream.send(codec.Pipes(stage=spec.stage, frames=tuple(batch)))
            if self.stream is not None:
                await self.stream.close(OUTPUT_CLOSE_TIMEOUT_S)
        except BusError as exc:
            log.warning("%s: plugin messages not delivered: %s", spec.describe, exc)

    def close(self) -> None:
        self._closed = True
        self._wake.set()


# -- the worker --------------------------------------------------------------------------------------


class _Worker:
    def __init__(self, spec: WorkerSpec, ep: Endpoint, ahead: ReadAhead | None = None) -> None:
        self.spec = spec
        self.ep = ep
        self.ahead = ahead  # the direct input, read since the worker entered its stage
        self.loop = asyncio.get_running_loop()
        self.runner: Any = None
        self.transport: _BusTransport | None = None
        # A direct input (then the only one) flushes the direct outputs before it waits (nodes.plugins.direct).
        direct = spec.direct_input
        self.held = HeldWrites() if direct is not None and HeldWrites.fits(direct.format) else None
        self.inputs = [_Input(i, self) for i in spec.inputs]

    async def run(self, channel: _BusChannel, temp_dir: Path, plugin: asyncio.Future[type]) -> None:
        """Run the stage with the plugin class ``plugin`` loads (:func:`_load`)."""
        spec = self.spec
        try:
            plugin_class = await plugin
        except PluginError as exc:
            raise _Failed(EXIT_NOT_STARTED, str(exc)) from None
        self.transport = _BusTransport(self)
        fed = {i.anchor for i in spec.inputs if i.src}
        incoming = {i.anchor: AnchorSpec(i.anchor, optional=i.anchor not in fed) for i in spec.inputs}
        outgoing = {o.anchor: None for o in spec.outputs}
        environment = Environment(
            pipeline=spec.pipeline, stage=spec.stage, node=spec.node, plugin=spec.plugin, temp_dir=temp_dir
        )
        self.runner = PluginRunner(
            plugin_class,
            incoming=incoming,
            outgoing=outgoing,
            config=spec.config,
            environment=environment,
            transport=self.transport,
            channel=channel,
            callback_timeout_s=spec.callback_timeout_s,
        )
        await self._plugin_step(self.runner.start)
        tasks = [asyncio.ensure_future(self._accept_all())]
        tasks += [asyncio.ensure_future(self._plugin_step(conn.feed)) for conn in self.inputs]
        try:
            await _first_failure(tasks)
        finally:
            for task in tasks:
                task.cancel()
        await self._plugin_step(self.runner.complete)
        await self.transport.settled()

    async def _plugin_step(self, fn: Callable[[], None]) -> None:
        """Run one engine step on a thread; turn what goes wrong into the worker's exit."""
        try:
            await _in_thread(self.loop, f"{self.spec.describe} step", fn)
        except _DownstreamGone:
            raise
        except (EdgeDecodeError, SchemaChanged) as exc:
            # The provider keeps the rule the plugin broke; any other schema change is its input's.
            broken = self.runner is not None and self.runner.provider.violation is exc
            raise _Failed(EXIT_PLUGIN_FAILED if broken else EXIT_BAD_INPUT, str(exc)) from None
        except PluginError as exc:
            cause = exc.__cause__
            if isinstance(cause, _DownstreamGone):
                raise cause from None
            if isinstance(cause, EdgeDecodeError):
                raise _Failed(EXIT_BAD_INPUT, str(cause)) from None
            if isinstance(cause, BusError):  # an output failed under a write
                raise _Failed(EXIT_BAD_OUTPUT, f"output: {cause}") from None
            raise _Failed(EXIT_PLUGIN_FAILED, str(exc)) from None
        except BusError as exc:
            raise _Failed(EXIT_BAD_OUTPUT, f"output: {exc}") from None
        except Exception as exc:  # a bug of ours, not the plugin's: still one line, and the trace in the log
            log.error("%s: worker step failed", self.spec.describe, exc_info=exc)
            raise _Failed(EXIT_PLUGIN_FAILED, f"worker failed: {type(exc).__name__}: {exc}") from None

    async def _accept_all(self) -> None:
        """Match each stream that arrives to its input connection, and pump it."""
        waiting = [conn for conn in self.inputs if conn.spec.src and conn.direct is None]
        pumps: list[asyncio.Future[None]] = []
        try:
            while waiting:
                stream = await self.ep.accept()
                candidates = [c for c in waiting if c.spec.src == stream.src]
                first: codec.Message | None = None
                if len(candidates) > 1:  # one stage sends several anchors here: its first part says which
                    first = await stream.read()
                    anchor = first.arrow.get(ANCHOR_KEY) if isinstance(first, codec.Arrow) else None
                    candidates = [c for c in candidates if c.spec.src_anchor == anchor]
                if not candidates:
                    stream.cancel(f"{self.spec.describe} expects no (more) input from {stream.src}")
                    continue
                conn = candidates[0]
                waiting.remove(conn)
                pumps.append(asyncio.ensure_future(self._pump(conn, stream, first)))
            await _first_failure(pumps)
        finally:
            for pump in pumps:
                pump.cancel()

    async def _pump(self, conn: _Input, stream: InStream, first: codec.Message | None) -> None:
        try:
            await conn.pump(stream, first)
        except DpipesError as exc:  # the stream failed or was malformed: the input is not whole
            stream.cancel(str(exc)[:200])
            raise _Failed(EXIT_BAD_INPUT, f"{conn.where}: {exc}") from None

    def cancel_inputs(self, reason: str) -> None:
        for conn in self.inputs:
            if conn.stream is not None:
                conn.stream.cancel(reason)


async def _first_failure(tasks: Sequence[asyncio.Future[Any]]) -> None:
    """Wait for every task; the first to fail fails this at once."""
    pending = set(tasks)
    while pending:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]


def _load(spec: WorkerSpec) -> asyncio.Future[type]:
    """The stage's plugin class, loaded (imported: 3-6 ms) on a thread of its own while the worker
    attaches to its hub (1-2 ms), where a short run's start waited for one, then the other. Not on
    the loop's default executor: a plugin whose import never returns would hold the worker's exit,
    which joins that executor's threads."""
    return _in_thread(asyncio.get_running_loop(), f"{spec.describe} load", lambda: load_plugin(spec.plugin))


async def _run(spec: WorkerSpec) -> int:
    # A direct input is read from now on, while the worker attaches and loads (nodes.plugins.direct).
    ahead = ReadAhead(spec.input_fd) if spec.direct_input is not None else None
    plugin = _load(spec)
    try:
        client = Client(spec.hub, name=spec.name, window=spec.window)
        await client.start()
    except BusError as exc:
        plugin.cancel()
        _say(_failure_line(spec, f"cannot attach to node {spec.node}'s hub: {exc}"))
        return EXIT_NOT_STARTED
    worker = _Worker(spec, client.endpoint, ahead)
    channel = _BusChannel(worker)
    messages = asyncio.ensure_future(channel.serve())
    code = 0
    with _temp_dir(spec) as temp:
        try:
            await worker.run(channel, temp, plugin)
        except _DownstreamGone:
            if worker.transport is not None:
                worker.transport.stop_all()
            worker.cancel_inputs(f"{spec.describe} stopped: its reader went away")
            code = -signal.SIGPIPE
        except _Failed as exc:
            code = exc.code
            _say(_failure_line(spec, exc))
            if worker.transport is not None:
                worker.transport.stop_all()
            worker.cancel_inputs(f"{spec.describe} failed")
        except BusError as exc:
            code = EXIT_BAD_OUTPUT
            _say(_failure_line(spec, f"output: {exc}"))
            if worker.transport is not None:
                worker.transport.stop_all()
            worker.cancel_inputs(f"{spec.describe} failed")
        channel.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(messages, OUTPUT_CLOSE_TIMEOUT_S)
        await client.aclose()
    return code


@contextlib.contextmanager
def _temp_dir(spec: WorkerSpec) -> Iterator[Path]:
    """The plugin's ``temp_dir``: the node's (it removes it, even after a SIGKILL), else one of ours."""
    if spec.temp_dir:
        yield Path(spec.temp_dir)
        return
    with tempfile.TemporaryDirectory(prefix=f"dpipes-plugin-{spec.plugin}-") as temp:
        yield Path(temp)


def _take_direct_fds(spec: WorkerSpec, argv: Sequence[str]) -> WorkerSpec:
    """``spec`` with the descriptors of its direct edges that came over the descriptor socket.

    A worker forked for its stage got them at fork; one started ahead of need reads them from its
    socket (``--fd-socket=N``), which is closed either way (see :mod:`dpipes.nodes.plugins.spec`).
    More than one direct input or output is refused (``ValueError``): only a linear pipeline's
    single edges are direct.
    """
    sock = next((int(a.partition("=")[2]) for a in argv if a.startswith(FD_SOCKET_FLAG + "=")), None)
    sent = [fd == FD_SENT for fd in (spec.input_fd, spec.output_fd)]
    if sum(1 for i in spec.inputs if i.src) > 1 and spec.input_fd != FD_BUS:
        raise ValueError("a direct input, but more than one input connection")
    if sum(1 for o in spec.outputs if o.dst) > 1 and spec.output_fd != FD_BUS:
        raise ValueError("a direct output, but more than one output destination")
    if sock is None:
        if any(sent):
            raise ValueError("descriptors to come over a socket, but no descriptor socket")
        return spec
    fds = receive_fds(sock, sum(sent), timeout_s=FD_RECEIVE_TIMEOUT_S) if any(sent) else []
    if not any(sent):
        os.close(sock)
    fd_in = fds.pop(0) if sent[0] else spec.input_fd
    fd_out = fds.pop(0) if sent[1] else spec.output_fd
    return dataclasses.replace(spec, input_fd=fd_in, output_fd=fd_out)


def _failure_line(spec: WorkerSpec, error: object) -> str:
    """``dpipes: stage 1 (%filter@beta): plugin filter: <what>``: stage, node and plugin, once each."""
    text = str(error)
    text = text.removeprefix(f"plugin {spec.plugin}: ")
    return f"dpipes: {spec.describe}: plugin {spec.plugin}: {text}"


def _say(line: str) -> None:
    """One line for the person running the pipeline: the node forwards the worker's stderr."""
    sys.stderr.write(line.rstrip() + "\n")
    sys.stderr.flush()


def _name_process(name: bytes) -> None:
    """What ``ps -o comm`` shows (Linux ``PR_SET_NAME``): ``dpipes-ready`` idle, ``dpipes-worker`` running a stage."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the name is only a convenience
        pass


def main() -> None:
    """The worker process: the spec from stdin, run, ``os._exit`` with the status (see the module)."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID: every thread's stack on stderr (a stuck plugin)
    # Batches off the bus are zero-copy views of message frames, which need not be aligned to
    # their value width; Acero (group-by, joins) then copies only what is misaligned, quietly.
    os.environ.setdefault("ACERO_ALIGNMENT_HANDLING", "reallocate")
    status_fd = os.dup(1)  # the node's pipe for the exit status, announced before the exit (not inherited)
    os.dup2(2, 1)  # a plugin's print() goes where its node forwards stderr; stdout carries no data
    pooled = POOLED_FLAG in sys.argv[1:]
    if pooled:  # started ahead of need: everything above is imported; wait for a stage
        with contextlib.suppress(Exception):  # read now, while idle (the stage's load reports a failure)
            installed_plugins()
        _name_process(b"dpipes-ready")
    data = sys.stdin.buffer.read(MAX_SPEC_BYTES)
    if pooled and not data:  # the pool or its node closed without using it
        os._exit(0)
    _name_process(b"dpipes-worker")
    try:
        spec = WorkerSpec.from_json(data)
    except (ValueError, TypeError, DpipesError) as exc:
        _say(f"dpipes: plugin worker: bad spec on stdin: {exc}")
        os._exit(EXIT_NOT_STARTED)
    try:  # a forked worker starts there already; one started ahead of need enters it now
        os.chdir(spec.cwd)
    except OSError as exc:
        _say(_failure_line(spec, f"cannot enter the working directory {spec.cwd}: {exc.strerror}"))
        os._exit(EXIT_NOT_STARTED)
    os.environ.update(spec.env)
    try:
        spec = _take_direct_fds(spec, sys.argv[1:])
    except (OSError, ValueError) as exc:
        _say(_failure_line(spec, f"cannot take its direct edges from node {spec.node}: {exc}"))
        os._exit(EXIT_NOT_STARTED)
    code = asyncio.run(_run(spec))
    sys.stdout.flush()
    sys.stderr.flush()
    if code == -signal.SIGPIPE:  # as a program whose reader went away
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGPIPE)
    _announce(status_fd, code)
    os._exit(code)


def _announce(status_fd: int, code: int) -> None:
    """Tell the node the exit status ahead of the exit, stderr closed first: the kernel frees the
    worker's memory (its pyarrow, the batches it held: 5-10 ms for ~100 MB) before the node could
    reap it, and the stage's report need not wait for that. A worker that dies before this line is
    reported as the reap finds it."""
    with contextlib.suppress(OSError):
        os.close(1)
        os.close(2)  # with 1 its last copy: the node sees the end of the stage's stderr
        os.write(status_fd, b"%d\n" % code)


if __name__ == "__main__":
    main()
