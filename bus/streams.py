"""Streams between endpoints and their credit: what one stream may send and what a hub may hold.

An :class:`OutStream` sends within the credit its receiver granted and waits for more; an
:class:`InStream` queues what arrived, grants credit back as its reader consumes it, and enforces
the spec's *Flow control* (codec, *Limits of a receiver*) on a sender that ignores it. A hub's
endpoints share one :class:`HeldBytes`: the bytes held for all its senders together, under one
cap. :class:`~dpipes.bus.endpoint.Endpoint` opens, accepts and routes to these streams; how its
messages travel is its transport's business, so streams are the same in-process and over a socket.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from dpipes.bus import codec
from dpipes.bus.codec import MAX_HELD_BYTES, Buffer, Message
from dpipes.bus.errors import (
    BusError,
    RequestTimeout,
    StreamError,
)

if TYPE_CHECKING:
    from dpipes.bus.endpoint import Endpoint

__all__ = ["HeldBytes", "InStream", "OutStream", "StreamCancelled", "Waitable", "readdress"]

log = logging.getLogger(__name__)

# Grant credit once half the window has been consumed: a stream of 1 MiB messages in the default
# 8 MiB window then sends a CREDIT every 4 messages, not every 2 as at a quarter, and each one
# wakes both sides' I/O threads and loops (on one host, with payloads in shared memory, that was
# 6% of both processes' CPU); the half still granted covers the grant's round trip.
CREDIT_GRANT_FRACTION = 2
YIELD_EVERY_MESSAGES = 256  # a sender with credit still lets the loop run this often...
# ...or after this many bytes, so heartbeats and readers keep going (some 0.4 ms of 1 MiB chunks
# copied into shared memory). What a client leases in one pass travels as one SHM_BATCH: at 4 MiB
# (four 1 MiB chunks a transfer) the hub took 22 us of CPU per chunk, at 8 MiB 15-18 (and the
# sender 1-3 less); 16 MiB saved little more and kept twice as much in flight.
YIELD_EVERY_BYTES = 8 << 20
YIELD_SHIFT = (YIELD_EVERY_BYTES // YIELD_EVERY_MESSAGES).bit_length() - 1  # bytes -> message units
REFUSED_LOG_INTERVAL_S = 10.0  # an endpoint (or a hub's held bytes) logs what it refuses at most once per interval
READ_MANY_MESSAGES = 4096  # what read_chunks hands over at most per call: a batch's worth
_RUN_FLUSH_BYTES = codec.BATCH_BELOW_BYTES * 16  # a run this large leaves at once, not at the end of the pass
_BATCH_BELOW_BYTES = codec.BATCH_BELOW_BYTES
_MAX_BATCH_MESSAGES = codec.MAX_BATCH_MESSAGES
_MESSAGE_CREDIT_BYTES = codec.MESSAGE_CREDIT_BYTES


class HeldBytes:
    """What a hub holds for its senders, all together (queued in its endpoints' incoming streams,
    waiting for its clients), under one cap; refusals counted and logged once per interval.
    Payloads that lie in a sender's shared memory (``dpipes.bus.shm``) are not the hub's: its
    pool and the stream's credit bound them."""

    def __init__(self, limit: int = MAX_HELD_BYTES) -> None:
        self.limit = limit
        self.bytes = 0
        self.peak = 0  # the most held at once
        self.refused = 0  # data messages refused because they would have taken it past ``limit``
        self._logged_at = -math.inf

    def take(self, nbytes: int, *, force: bool = False) -> bool:
        """Hold ``nbytes`` more, if that stays within the cap (or anyway, when ``force``: a small
        control message, bounded elsewhere)."""
        if self.bytes + nbytes > self.limit and not force:
            return False
        self.bytes += nbytes
        self.peak = max(self.peak, self.bytes)
        return True

    def release(self, nbytes: int) -> None:
        """``nbytes`` held so far are held no more."""
        self.bytes -= nbytes

    def refuse(self, node: str, what: str) -> str:
        """Count a refusal of ``what`` for the cap; the reason to give its sender."""
        self.refused += 1
        text = f"node {node} refused {what}: it holds {self.bytes} bytes for its senders (limit {self.limit})"
        now = time.monotonic()
        if now - self._logged_at >= REFUSED_LOG_INTERVAL_S:
            self._logged_at = now
            log.warning("%.300s (%d messages refused so in all)", text, self.refused)
        return text


class StreamCancelled(StreamError, BrokenPipeError):
    """The other end cancelled the stream (for a sender: the reader is gone, as EPIPE)."""


class Waitable:
    """A FIFO of items with one waiting reader, cheap when items are already there."""

    __slots__ = ("_error", "_items", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._items: collections.deque[Any] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop = loop
        self._error: BaseException | None = None

    def put(self, item: Any) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def __len__(self) -> int:
        return len(self._items)

    def peek(self) -> Any:
        return self._items[0]

    def last(self) -> Any:
        """The item queued last; None when nothing is queued."""
        return self._items[-1] if self._items else None

    def popleft(self) -> Any:
        return self._items.popleft()

    async def get(self, timeout: float | None = None) -> Any:
        while not self._items:
            if self._error is not None:
                raise self._error
            self._waiter = self._loop.create_future()
            if timeout is None:
                await self._waiter
            else:
                try:
                    await asyncio.wait_for(self._waiter, timeout)
                except TimeoutError:
                    raise RequestTimeout(f"nothing arrived within {timeout:g} s") from None
        return self._items.popleft()


class OutStream:
    """The sending end of a stream, throttled by the receiver's credit."""

    def __init__(self, endpoint: Endpoint, dst: str, sid: int, credit: int) -> None:
        self.endpoint = endpoint
        self.dst = dst
        self.sid = sid
        self.sent = 0  # payload bytes sent
        self.cost = 0  # credit used: payload plus MESSAGE_CREDIT_BYTES per message
        self.limit = credit  # credit granted in all, so far
        self.failed_seq: int | None = None  # the first message the bus bounced (it and later ones never arrived)
        self._seq = 0
        self._wakeup: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._acked: asyncio.Future[int] = endpoint._loop.create_future()
        self._closed = False
        self._since_yield = 0  # messages + bytes // 4096 sent since we last let the loop run
        self._bytes_prefix = codec.stream_header_prefix("BYTES", endpoint.addr, dst, sid)
        # Small chunks queued in this loop pass, not yet handed to the transport: one BATCH at
        # the end of the pass (codec spec, *Batches*; or of a later one while the sender is
        # busy), or earlier when it is full or anything else this endpoint sends must follow them.
        self._run: list[Buffer] = []
        self._run_bytes = 0
        self._run_seq = 0  # the seq of the run's first message
        self._yielding = False  # its sender only lets the loop run, with more to send at once

    @property
    def node(self) -> str:
        return codec.split_addr(self.dst)[0]

    async def _reserve(self) -> None:
        if self._since_yield >= YIELD_EVERY_MESSAGES:
            self._since_yield = 0
            # Busy: this stream's run waits for our next turn (see Endpoint._end_of_pass).
            self._yielding = True
            try:
                await asyncio.sleep(0)
            finally:
                self._yielding = False
        while self.cost >= self.limit:
            if self._error is not None:
                raise self._error
            self._wakeup = self.endpoint._loop.create_future()
            await self._wakeup
        if self._error is not None:
            raise self._error

    async def send_bytes(self, data: Buffer) -> None:
        """Send one chunk as one message, waiting first while the receiver has granted no credit.

        A small chunk leaves at the end of this loop pass, with the stream's other small chunks of
        the pass, in one BATCH (a mutable one is copied first: the caller may reuse it at once); a
        sender that only lets the loop run, with more to send at once, keeps adding to that BATCH
        until it stops or the BATCH is full.
        """
        nbytes = len(data) if type(data) is not memoryview else data.nbytes
        self._since_yield += 1 + (nbytes >> YIELD_SHIFT)
        if self.cost >= self.limit or self._error is not None or self._since_yield >= YIELD_EVERY_MESSAGES:
            await self._reserve()
        run = self._run
        if not run or type(data) is not bytes or nbytes >= _BATCH_BELOW_BYTES:
            self._put(data, nbytes)
            return
        # What _put does for a small bytes chunk joining this pass's run, written out here: the
        # common case of a stream of small messages.
        self._seq += 1
        self.sent += nbytes
        self.cost += nbytes + _MESSAGE_CREDIT_BYTES
        run.append(data)
        self._run_bytes += nbytes
        if len(run) >= _MAX_BATCH_MESSAGES or self._run_bytes >= _RUN_FLUSH_BYTES:
            self._flush()

    async def send_many(self, chunks: Iterable[Buffer]) -> None:
        """Send each chunk as one message, in order, under credit as ``send_bytes`` does, for less per chunk."""
        put = self._put
        for data in chunks:
            nbytes = len(data) if not isinstance(data, memoryview) else data.nbytes
            self._since_yield += 1 + (nbytes >> YIELD_SHIFT)
            if self.cost >= self.limit or self._error is not None or self._since_yield >= YIELD_EVERY_MESSAGES:
                await self._reserve()
            put(data, nbytes)

    def _put(self, data: Buffer, nbytes: int) -> None:
        """Account for one BYTES message and queue it in the run, or send it now when it is large."""
        self._seq += 1
        self.sent += nbytes
        self.cost += nbytes + codec.MESSAGE_CREDIT_BYTES
        if nbytes >= codec.BATCH_BELOW_BYTES:
            if self._run:
                self._flush()
            self.endpoint._send_frames(self.dst, [self._bytes_prefix + codec.packb_int(self._seq), data])
            return
        run = self._run
        if not run:
            self._run_seq = self._seq
            self.endpoint._batching(self)
        if type(data) is not bytes and not (
            type(data) is memoryview and data.readonly and data.ndim == 1 and data.itemsize == 1 and data.contiguous
        ):
            # It leaves later: what the caller writes into it meanwhile must not. And every chunk
            # of a run is one its _flush can measure with len() and join as it is.
            data = bytes(data)
        run.append(data)
        self._run_bytes += nbytes
        if len(run) >= _MAX_BATCH_MESSAGES or self._run_bytes >= _RUN_FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        """Hand the queued run of small chunks to the transport: one message alone, else a BATCH."""
        run = self._run
        if not run:
            return
        self._run = []
        self._run_bytes = 0
        if len(run) == 1:
            frames = [self._bytes_prefix + codec.packb_int(self._run_seq), run[0]]
        else:
            sizes = list(map(len, run))  # bytes, or views of single bytes (_put): each len() is its size
            batch = codec.Batch(src=self.endpoint.addr, dst=self.dst, sid=self.sid, seq=self._run_seq, sizes=sizes)
            frames = [codec.packb_header(batch), b"".join(run)]
        self.endpoint._send_frames_now(self.dst, frames)

    async def send(self, msg: Message) -> None:
        """Send a data message (``Objects``, ``Arrow``, ...); its addressing is filled in here."""
        nbytes = msg.payload_bytes
        self._since_yield += 1 + (nbytes >> YIELD_SHIFT)
        await self._reserve()
        self._seq += 1
        self.sent += nbytes
        self.cost += nbytes + codec.MESSAGE_CREDIT_BYTES
        self.endpoint._send(readdress(msg, self.endpoint.addr, self.dst, self.sid, self._seq))

    async def send_in_place(
        self, kind: str, nbytes: int, fill: Callable[[memoryview], tuple[dict[str, Any], Sequence[int]]]
    ) -> bool:
        """Send a data message of ``kind`` whose payload ``fill`` writes straight into shared memory.

        For a receiver on this host that shares memory with us (``dpipes.bus.shm``): the payload's
        one copy is ``fill`` writing it (an Arrow IPC writer, say), not a copy of finished frames.
        ``fill`` gets a writable view of ``nbytes`` bytes, valid during the call only, and returns
        the message's kind fields and its payload frames' sizes (end to end in the view).

        Returns:
            False, having sent nothing and not called ``fill``, when the transport shares no
            memory with the receiver's side or has no room: send the payload as frames instead.
        """
        self._since_yield += 1 + (nbytes >> YIELD_SHIFT)
        await self._reserve()
        fields: dict[str, Any] = {}

        def fill_lease(view: memoryview) -> Sequence[int]:
            made, sizes = fill(view)
            fields.update(made)
            return sizes

        lease = self.endpoint._transport.lease_filled(self.dst, nbytes, fill_lease)
        if lease is None:
            return False
        payload = sum(lease.sizes)
        self._seq += 1
        self.sent += payload
        self.cost += payload + codec.MESSAGE_CREDIT_BYTES
        self.endpoint._send(
            codec.shm_message(
                self.endpoint.addr,
                self.dst,
                self.sid,
                self._seq,
                kind,
                fields=fields,
                handle=lease.handle,
                lease=lease.id,
                sizes=list(lease.sizes),
                offset=lease.offset,
            )
        )
        return True

    async def close(self, timeout: float | None = None) -> int:
        """Send EOF and wait until the receiver has acknowledged every byte; returns the total."""
        if not self._closed:
            self._closed = True
            if self._error is not None:
                raise self._error
            self._seq += 1
            self.endpoint._send(
                codec.Eof(src=self.endpoint.addr, dst=self.dst, sid=self.sid, seq=self._seq, total=self.sent)
            )
        try:
            if timeout is None:
                return await asyncio.shield(self._acked)
            return await asyncio.wait_for(asyncio.shield(self._acked), timeout)
        except TimeoutError:
            raise RequestTimeout(
                f"stream {self.sid} to {self.dst}: no EOF acknowledgement within {timeout:g} s"
            ) from None
        finally:
            if self._acked.done():
                self.endpoint._out.pop(self.sid, None)

    def cancel(self, reason: str = "cancelled") -> None:
        """Abandon the stream: the receiver learns it is incomplete."""
        if self._error is None:
            self.endpoint._send(codec.Cancel(src=self.endpoint.addr, dst=self.dst, sid=self.sid, reason=reason))
        self._fail(StreamCancelled(f"stream {self.sid} to {self.dst} cancelled: {reason}"))

    def _grant(self, nbytes: int) -> None:
        self.limit += nbytes
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _fail(self, error: BaseException, *, bounced_seq: int | None = None) -> None:
        self._run = []  # not sent yet, and never taken now: the receiver is gone or said stop
        self._run_bytes = 0
        if self._error is None:
            self._error = error
            self.failed_seq = bounced_seq
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)
        if not self._acked.done():
            self._acked.set_exception(error)
            self._acked.exception()  # mark retrieved: close() may never be called
        self.endpoint._out.pop(self.sid, None)

    def _ack(self, total: int) -> None:
        if total != self.sent and not self._acked.done():
            self._fail(StreamError(f"stream {self.sid} to {self.dst}: receiver took {total} of {self.sent} bytes"))
        elif not self._acked.done():
            self._acked.set_result(total)


_new_message = codec._new_message
_Unfrozen = codec._Unfrozen
_KINDS = codec.KINDS


class InStream:
    """The receiving end of a stream; reading grants the sender more credit."""

    def __init__(self, endpoint: Endpoint, src: str, sid: int, window: int) -> None:
        self.endpoint = endpoint
        self.src = src
        self.sid = sid
        self.received = 0  # payload bytes taken by the reader
        self._consumed = 0  # credit units taken by the reader
        self._granted = 0  # of those, how many were already granted back
        self._grant_step = max(1, window // CREDIT_GRANT_FRACTION)
        self._queue = Waitable(endpoint._loop)
        self._eof = False
        self._arrived = 0  # credit units of the data messages that arrived (read or not)
        self._allowed = max(window, codec.INITIAL_CREDIT_BYTES)  # units granted: initial, window, grants
        self._batch: codec.Batch | None = None  # the BATCH being read, member by member
        self._parts: tuple[Any, ...] = ()  # its kind's class, src, dst, sid, seq, frame and sizes, as read() takes them
        self._member = 0  # the index of its next member
        self._offset = 0  # where that member's payload starts in the batch's frame
        self._held = 0  # credit units of ours the endpoint's HeldBytes counts: arrived, not granted back
        self._window = window
        self._later = 0  # credit units granted in this loop pass, told the sender at its end (_tell_later)

    @property
    def node(self) -> str:
        return codec.split_addr(self.src)[0]

    def _widen(self, window: int) -> None:
        """Open the window to ``window`` credit units if it is smaller: grant the difference, told
        the sender at the end of this pass."""
        if window <= self._window or self._eof:
            return
        grant = window - max(self._window, codec.INITIAL_CREDIT_BYTES)
        self._window = window
        self._grant_step = max(1, window // CREDIT_GRANT_FRACTION)
        if grant > 0:
            self._allowed += grant
            self._grant_later(grant)

    def _over(self) -> bool:
        """Whether the sender will send nothing more on this stream: its EOF is here (taken or
        queued), or the stream is over at this end (cancelled, refused, failed)."""
        last = self._queue.last()
        if self._eof or (last is not None and last.KIND == "EOF"):
            return True
        return self.endpoint._in.get((self.src, self.sid)) is not self

    def _grant_later(self, units: int) -> None:
        """Tell the sender of ``units`` more credit (already counted in ``_allowed``) at the end of
        this loop pass, in one CREDIT with any other grant made later in it.

        For a window opened as a stream's first message arrives: a short stream's EOF often
        arrives in the same pass (a 64 MB Arrow batch and its EOF, say), and a stream that has
        ended needs no credit; the CREDIT would only be one more message for both sides to handle
        before the EOF_ACK.
        """
        if not self._later:
            self.endpoint._loop.call_soon(self._tell_later)
        self._later += units

    def _tell_later(self) -> None:
        units, self._later = self._later, 0
        if self._over():
            return  # it ended (or was refused or cancelled) meanwhile
        with contextlib.suppress(BusError):  # the transport is gone: so is the sender, for us
            self.endpoint._send(codec.Credit(src=self.endpoint.addr, dst=self.src, sid=self.sid, bytes=units))

    async def read(self, timeout: float | None = None) -> Message | None:
        """The next data message, or None at the end of the stream.

        Raises:
            StreamCancelled: the sender cancelled the stream.
            PeerLost: the sender's node was lost.
        """
        if self._batch is None:
            if self._eof and not self._queue:
                return None
            msg = await self._queue.get(timeout)
            if msg.KIND == "EOF":
                self._eof = True
                self._release()
                self.endpoint._in.pop((self.src, self.sid), None)
                if msg.total != self.received:
                    raise StreamError(
                        f"stream {self.sid} from {self.src}: EOF says {msg.total} bytes, {self.received} arrived"
                    )
                self.endpoint._send(codec.EofAck(src=self.endpoint.addr, dst=self.src, sid=self.sid, total=msg.total))
                return None
            if msg.KIND != "BATCH":
                self._took(1, msg.payload_bytes)
                return msg
            self._begin(msg)
        # The next member of the BATCH being read: this runs once per small message, so what
        # _took and codec.stream_message do is written out here.
        cls, src, dst, sid, seq, view, sizes = self._parts
        i, at = self._member, self._offset
        size = sizes[i]
        end = at + size
        self._offset = end
        self._member = i + 1
        if i + 1 == len(sizes):
            self._batch = None
        self.received += size
        consumed = self._consumed = self._consumed + size + _MESSAGE_CREDIT_BYTES
        if consumed - self._granted >= self._grant_step:
            self._took(0, 0)
        member: Any = _new_message(_Unfrozen)  # codec.stream_message, written out
        member.src = src
        member.dst = dst
        member.sid = sid
        member.seq = seq + i
        member.frames = (view[at:end],)
        member.__class__ = cls
        return member

    def _begin(self, batch: codec.Batch) -> None:
        """Read ``batch`` member by member from now on (``read`` and ``read_chunks`` alike)."""
        self._batch, self._member, self._offset = batch, 0, 0
        self._parts = (_KINDS[batch.of], batch.src, batch.dst, batch.sid, batch.seq, batch.frames[0], batch.sizes)

    def _took(self, messages: int, nbytes: int) -> None:
        """The reader took ``messages`` messages of ``nbytes`` payload bytes: grant credit when due."""
        self.received += nbytes
        self._consumed += nbytes + messages * codec.MESSAGE_CREDIT_BYTES
        if self._consumed - self._granted >= self._grant_step:
            if self._over():
                # Credit would be a message for nobody (and one more for both sides to handle
                # before its EOF_ACK). What we hold of the stream is released when the reader
                # takes its EOF (or drops it).
                return
            grant = self._consumed - self._granted
            self._granted = self._consumed
            self._allowed += grant
            if self._held:  # what was granted back is the reader's now, not ours
                held = self.endpoint._held
                freed = min(grant, self._held)
                self._held -= freed
                if held is not None:
                    held.release(freed)
            self.endpoint._send(codec.Credit(src=self.endpoint.addr, dst=self.src, sid=self.sid, bytes=grant))

    async def read_chunks(self, limit: int = READ_MANY_MESSAGES, timeout: float | None = None) -> list[memoryview]:
        """The payload frames of the next messages already here, waiting only for the first.

        At most ``limit`` messages' worth (each message sent by ``send_bytes`` or ``send_many`` is
        one frame, so one chunk per message, in order); an empty list at the end of the stream.
        Credit is granted for each message taken, as ``read`` does, without making a message object
        per chunk: the cheap way through a stream of many small messages.

        Raises:
            StreamCancelled: the sender cancelled the stream.
            PeerLost: the sender's node was lost.
        """
        chunks: list[memoryview] = []
        taken = 0  # messages taken so far, accounted for already
        queue = self._queue
        if self._batch is None and (not queue or queue.peek().KIND == "EOF"):
            msg = await self.read(timeout)  # the ordinary way: EOF, failures and timeouts as read's
            if msg is None:
                return chunks
            chunks.extend(msg.frames)  # type: ignore[attr-defined]
            taken = 1
            queue = self._queue  # a cancel meanwhile replaced it
        messages = nbytes = 0
        while taken + messages < limit:
            batch = self._batch
            if batch is not None:
                view, at, sizes = batch.frames[0], self._offset, batch.sizes
                end = min(len(sizes), self._member + limit - taken - messages)
                for i in range(self._member, end):
                    size = sizes[i]
                    chunks.append(view[at : at + size])
                    at += size
                messages += end - self._member
                nbytes += at - self._offset
                self._member, self._offset = end, at
                if end == len(sizes):
                    self._batch = None
                continue
            if not queue or queue.peek().KIND == "EOF":
                break  # read() takes an EOF, once what came before it is accounted for
            msg = queue.popleft()
            if msg.KIND == "BATCH":
                self._begin(msg)
                continue
            chunks.extend(msg.frames)
            messages += 1
            nbytes += msg.payload_bytes
        self._took(messages, nbytes)
        return chunks

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Message]:
        while (msg := await self.read()) is not None:
            yield msg

    def cancel(self, reason: str = "reader closed") -> None:
        """Tell the sender to stop (as a closed pipe does) and drop what is queued."""
        if not self._eof:
            self.endpoint._send(codec.Cancel(src=self.endpoint.addr, dst=self.src, sid=self.sid, reason=reason))
        self._eof = True
        self._queue = Waitable(self.endpoint._loop)
        self._batch = None
        self._release()
        self.endpoint._in.pop((self.src, self.sid), None)
        self.endpoint._bury(self.src, self.sid)

    def _take(self, msg: Message, shared: bool = False) -> str:
        """Queue a data message or EOF that arrived; "" if taken, else the ERROR code refusing it:
        ``credit-exceeded`` (it breaks the sender's credit) or ``over-limit`` (the hub's cap, which
        does not count a payload ``shared`` in its sender's memory)."""
        cost = 0
        if msg.KIND == "BATCH":  # its members, each of which had to start within the credit
            assert isinstance(msg, codec.Batch)
            cost = msg.payload_bytes + len(msg.sizes) * codec.MESSAGE_CREDIT_BYTES
            if self._arrived + cost - (msg.sizes[-1] + codec.MESSAGE_CREDIT_BYTES) >= self._allowed:
                return "credit-exceeded"  # its last member started with no credit left
        elif msg.KIND != "EOF":
            if self._arrived >= self._allowed:  # it started with no credit left: the spec forbids it
                return "credit-exceeded"
            cost = msg.payload_bytes + codec.MESSAGE_CREDIT_BYTES
        if cost:
            if not shared:
                held = self.endpoint._held
                if held is not None and not held.take(cost):
                    return "over-limit"
                self._held += cost
            self._arrived += cost
        self._queue.put(msg)
        return ""

    def _release(self) -> None:
        """Count nothing of this stream in the hub's held bytes any more: it is over."""
        if self._held and self.endpoint._held is not None:
            self.endpoint._held.release(self._held)
        self._held = 0

    def _fail(self, error: BaseException) -> None:
        self._queue.fail(error)
        self._release()  # what is queued is the reader's to drop; nothing more arrives here
        self.endpoint._in.pop((self.src, self.sid), None)

    def _refuse(self, error: BaseException) -> None:
        """Drop what is queued and fail the reader: the sender broke the receiver's limits."""
        self._queue = Waitable(self.endpoint._loop)  # its reader gets ``error``, not a short stream
        self._batch = None
        self._fail(error)
        self.endpoint._bury(self.src, self.sid)


def readdress(msg: Message, src: str, dst: str, sid: int, seq: int) -> Message:
    return dataclasses.replace(msg, src=src, dst=dst, sid=sid, seq=seq)
