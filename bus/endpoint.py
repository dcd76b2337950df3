"""The endpoint API: a named party on the bus that sends, receives, requests and streams.

An ``Endpoint`` does not know how its messages travel: an in-process endpoint hands them to its
hub directly, a client endpoint (``dpipes.bus.client``) sends them over a DEALER socket to a hub.
Streams and their credit accounting live here, the same for both.

A receiving endpoint enforces what the spec's *Flow control* lets a sender do (codec, *Limits of a
receiver*): a data message that starts after the sender spent all the credit granted to it cancels
its stream with ``ERROR`` ``credit-exceeded``; a stream beyond the endpoint's ``max_streams`` open
incoming streams is refused with ``ERROR`` ``over-limit``. Either is counted
(:attr:`Endpoint.refused`), logged once per ``REFUSED_LOG_INTERVAL_S``, and what the stream had
queued is dropped, as is whatever more it sends. So no sender holds more of a node's memory than
``max_streams`` windows (plus one message each).

Many endpoints, each within its bound, can still add up: a hub's endpoints share one
:class:`HeldBytes`, the bytes the hub holds for all its senders together under one cap (what its
in-process endpoints have queued and not yet granted back, and what waits for clients that do not
read). A data message that would take it past the cap is refused, ``ERROR`` ``over-limit``, as a
stream beyond ``max_streams`` is; a sender within its credit is never refused while the hub is
under the cap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, Protocol

from dpipes.bus import codec
from dpipes.bus.codec import MAX_HELD_BYTES, Buffer, Message
from dpipes.bus.errors import (
    BusError,
    NoRoute,
    PeerLost,
    RequestFailed,
    RequestTimeout,
    StreamError,
)

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 10.0  # default wait for a REPLY; control requests are small and fast
CREDIT_GRANT_FRACTION = 4  # grant credit once a quarter of the window has been consumed
YIELD_EVERY_MESSAGES = 256  # a sender with credit still lets the loop run this often...
YIELD_EVERY_BYTES = 1 << 20  # ...or after this many bytes, so heartbeats and readers keep going
YIELD_SHIFT = (YIELD_EVERY_BYTES // YIELD_EVERY_MESSAGES).bit_length() - 1  # bytes -> message units
MAX_IN_STREAMS = 64  # incoming streams open at once on one endpoint, by default; each holds up to a window
DEAD_STREAMS_REMEMBERED = 1024  # streams we refused: what more they send is dropped unanswered
REFUSED_LOG_INTERVAL_S = 10.0  # an endpoint logs the streams it refuses at most once per interval
READ_MANY_MESSAGES = 4096  # what read_chunks hands over at most per call: a batch's worth


class HeldBytes:
    """What a hub holds for its senders, all together (queued in its endpoints' incoming streams,
    waiting for its clients), under one cap; refusals counted and logged once per interval."""

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


class Transport(Protocol):
    """How an endpoint's messages leave it: to its hub in-process, or over a socket."""

    def send(self, msg: Message) -> None:
        """Deliver ``msg``; failures come back as ERROR messages."""

    def send_frames(self, dst: str, frames: list[Any]) -> None:
        """Deliver an already encoded message ``[header, *payload]`` addressed to ``dst``."""


def _error_for(msg: codec.Error) -> BusError:
    text = f"{msg.message} (at node {msg.node!r})" if msg.node else msg.message
    if msg.code == "peer-lost":
        return PeerLost(text)
    if msg.code in ("no-route", "no-endpoint", "not-linked"):
        return NoRoute(text)
    return BusError(text)


class _Waitable:
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
        # the end of the pass (codec spec, *Batches*), or earlier when it is full or anything
        # else this endpoint sends must follow them.
        self._run: list[Buffer] = []
        self._run_bytes = 0
        self._run_seq = 0  # the seq of the run's first message

    @property
    def node(self) -> str:
        return codec.split_addr(self.dst)[0]

    async def _reserve(self) -> None:
        if self._since_yield >= YIELD_EVERY_MESSAGES:
            self._since_yield = 0
            await asyncio.sleep(0)
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
        the pass, in one BATCH (a mutable one is copied first: the caller may reuse it at once).
        """
        nbytes = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._since_yield += 1 + (nbytes >> YIELD_SHIFT)
        if self.cost >= self.limit or self._error is not None or self._since_yield >= YIELD_EVERY_MESSAGES:
            await self._reserve()
        self._put(data, nbytes)

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
        if type(data) is not bytes and not (isinstance(data, memoryview) and data.readonly):
            data = bytes(data)  # it leaves later: what the caller writes into it meanwhile must not
        run.append(data)
        self._run_bytes += nbytes
        if len(run) >= codec.MAX_BATCH_MESSAGES or self._run_bytes >= codec.BATCH_BELOW_BYTES * 16:
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
            sizes = [len(c) if not isinstance(c, memoryview) else c.nbytes for c in run]
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
        self.endpoint._send(_readdress(msg, self.endpoint.addr, self.dst, self.sid, self._seq))

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


_member = codec.stream_message
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
        self._queue = _Waitable(endpoint._loop)
        self._eof = False
        self._arrived = 0  # credit units of the data messages that arrived (read or not)
        self._allowed = max(window, codec.INITIAL_CREDIT_BYTES)  # units granted: initial, window, grants
        self._batch: codec.Batch | None = None  # the BATCH being read, member by member
        self._member = 0  # the index of its next member
        self._offset = 0  # where that member's payload starts in the batch's frame
        self._held = 0  # credit units of ours the endpoint's HeldBytes counts: arrived, not granted back

    @property
    def node(self) -> str:
        return codec.split_addr(self.src)[0]

    async def read(self, timeout: float | None = None) -> Message | None:
        """The next data message, or None at the end of the stream.

        Raises:
            StreamCancelled: the sender cancelled the stream.
            PeerLost: the sender's node was lost.
        """
        if self._batch is not None:
            return self._next_member()
        if self._eof and not self._queue:
            return None
        msg = await self._queue.get(timeout)
        if msg.KIND == "BATCH":
            self._batch, self._member, self._offset = msg, 0, 0
            return self._next_member()
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
        self._took(1, msg.payload_bytes)
        return msg

    def _took(self, messages: int, nbytes: int) -> None:
        """The reader took ``messages`` messages of ``nbytes`` payload bytes: grant credit when due."""
        self.received += nbytes
        self._consumed += nbytes + messages * codec.MESSAGE_CREDIT_BYTES
        if self._consumed - self._granted >= self._grant_step:
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

    def _next_member(self) -> Message:
        batch = self._batch
        assert batch is not None
        i, at = self._member, self._offset
        sizes = batch.sizes
        size = sizes[i]
        self._offset = at + size
        self._member = i + 1
        if i + 1 == len(sizes):
            self._batch = None
        # _took, inlined: this runs once per small message
        self.received += size
        self._consumed += size + codec.MESSAGE_CREDIT_BYTES
        if self._consumed - self._granted >= self._grant_step:
            self._took(0, 0)
        return _member(
            _KINDS[batch.of], batch.src, batch.dst, batch.sid, batch.seq + i, (batch.frames[0][at : at + size],)
        )

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
                self._batch, self._member, self._offset = msg, 0, 0
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
        self._queue = _Waitable(self.endpoint._loop)
        self._batch = None
        self._release()
        self.endpoint._in.pop((self.src, self.sid), None)
        self.endpoint._bury(self.src, self.sid)

    def _take(self, msg: Message) -> str:
        """Queue a data message or EOF that arrived; "" if taken, else the ERROR code refusing it:
        ``credit-exceeded`` (it breaks the sender's credit) or ``over-limit`` (the hub's cap)."""
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
        self._queue = _Waitable(self.endpoint._loop)  # its reader gets ``error``, not a short stream
        self._batch = None
        self._fail(error)
        self.endpoint._bury(self.src, self.sid)


def _readdress(msg: Message, src: str, dst: str, sid: int, seq: int) -> Message:
    return dataclasses.replace(msg, src=src, dst=dst, sid=sid, seq=seq)


class Endpoint:
    """A named party ``node/name`` on the bus.

    Args:
        addr: this endpoint's full address.
        transport: how messages whose ``src`` is filled in leave this endpoint.
        window: the credit this endpoint keeps open for each incoming stream: at least
            ``INITIAL_CREDIT_BYTES`` (every stream starts with that much); more is granted at once
            when a stream opens. A larger window lets big messages pipeline; it bounds memory.
        max_streams: how many incoming streams may be open at once; one more is refused with
            ``ERROR`` ``over-limit``. 0 for an endpoint that takes no streams (a control endpoint).
            With ``window`` it bounds what senders can make this endpoint hold.
        held: what this endpoint's hub holds for all its senders, shared by its endpoints under
            one cap; data past that cap is refused ``over-limit``. None: this endpoint's bounds only.
    """

    def __init__(
        self,
        addr: str,
        transport: Transport,
        *,
        window: int = codec.INITIAL_CREDIT_BYTES,
        max_streams: int = MAX_IN_STREAMS,
        on_close: Callable[[Endpoint], None] | None = None,
        held: HeldBytes | None = None,
    ) -> None:
        self.addr = addr
        self._held = held
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._inbox = _Waitable(self._loop)
        self._accepts = _Waitable(self._loop)
        self._window = window
        self._max_streams = max_streams
        self._out: dict[int, OutStream] = {}
        self._in: dict[tuple[str, int], InStream] = {}
        self._dead: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self.refused: collections.Counter[str] = collections.Counter()  # streams refused, by ERROR code
        self._refused_logged_at = -math.inf
        self._requests: dict[int, tuple[str, asyncio.Future[codec.Reply]]] = {}
        self._ids = itertools.count(1)
        self._on_close = on_close
        self._closed = False
        self._runs: list[OutStream] = []  # streams with small chunks queued in this loop pass
        self._flush_scheduled = False
        self.link_listeners: list[Callable[[codec.Link], None]] = []

    @property
    def node(self) -> str:
        return codec.split_addr(self.addr)[0]

    def _send(self, msg: Message) -> None:
        if self._closed:
            raise BusError(f"endpoint {self.addr} is closed")
        if self._runs:  # what the streams queued goes first: nothing overtakes it
            self._flush_runs()
        self._transport.send(msg)

    def _send_frames(self, dst: str, frames: list[Any]) -> None:
        if self._closed:
            raise BusError(f"endpoint {self.addr} is closed")
        if self._runs:
            self._flush_runs()
        self._transport.send_frames(dst, frames)

    def _send_frames_now(self, dst: str, frames: list[Any]) -> None:
        """A stream's flushed run: in the order the runs were queued, with nothing flushed first."""
        if self._closed:
            raise BusError(f"endpoint {self.addr} is closed")
        self._transport.send_frames(dst, frames)

    def _batching(self, stream: OutStream) -> None:
        """``stream`` queued a run of small chunks: send it at the end of this loop pass at the latest."""
        self._runs.append(stream)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_runs)

    def _flush_runs(self) -> None:
        self._flush_scheduled = False
        runs, self._runs = self._runs, []
        for stream in runs:
            try:
                stream._flush()
            except BusError as exc:  # the transport is gone: the stream's next call raises it
                stream._fail(exc)

    # -- plain messages ----------------------------------------------------------------------

    def send(self, msg: Message) -> None:
        """Send one message; ``src`` is set to this endpoint. Errors come back as messages."""
        if msg.src != self.addr:
            msg = _readdress(msg, self.addr, msg.dst, msg.sid, msg.seq)
        self._send(msg)

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message that is not part of a stream, a reply or flow control."""
        msg: Message = await self._inbox.get(timeout)
        return msg

    # -- request / reply ---------------------------------------------------------------------

    async def request(
        self,
        dst: str,
        method: str,
        body: dict[str, Any] | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> dict[str, Any]:
        """Send a REQUEST and return the body of its successful REPLY.

        Raises:
            RequestTimeout: no reply within ``timeout``.
            NoRoute, PeerLost: the request could not reach ``dst``.
            RequestFailed: the other side replied with an error (its reply body is kept).
        """
        rid = next(self._ids)
        future: asyncio.Future[codec.Reply] = self._loop.create_future()
        self._requests[rid] = (dst, future)
        try:
            self._send(codec.Request(src=self.addr, dst=dst, seq=rid, method=method, body=body or {}))
            try:
                reply = await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise RequestTimeout(f"{method} to {dst}: no reply within {timeout:g} s") from None
        finally:
            self._requests.pop(rid, None)
        if not reply.ok:
            raise RequestFailed(f"{method} at {dst} failed: {reply.error}", reply.body)
        return reply.body

    def reply(self, request: codec.Request, body: dict[str, Any] | None = None, *, error: str = "") -> None:
        """Answer ``request``: with ``body``, or as a failure when ``error`` is given."""
        self._send(
            codec.Reply(src=self.addr, dst=request.src, seq=request.seq, ok=not error, body=body or {}, error=error)
        )

    # -- streams -----------------------------------------------------------------------------

    def open_stream(self, dst: str) -> OutStream:
        """Start a stream to ``dst``; nothing is sent until the first data."""
        sid = next(self._ids)
        stream = OutStream(self, dst, sid, codec.INITIAL_CREDIT_BYTES)
        self._out[sid] = stream
        return stream

    async def accept(self, timeout: float | None = None) -> InStream:
        """The next stream another endpoint opened towards this one."""
        stream: InStream = await self._accepts.get(timeout)
        return stream

    def expect(self, src: str, sid: int) -> InStream:
        """Claim stream ``sid`` from ``src`` before it arrives (it will not go to ``accept``)."""
        stream = self._in.get((src, sid))
        if stream is None:
            stream = self._in[(src, sid)] = self._new_in_stream(src, sid)
        return stream

    # -- delivery from the transport -----------------------------------------------------------

    def _deliver(self, msg: Message) -> None:
        if msg.sid:
            if msg.KIND in codec.DATA_KINDS or isinstance(msg, codec.Eof):
                self._to_in_stream(msg)
                return
            if isinstance(msg, codec.Credit):
                out = self._out.get(msg.sid)
                if out is not None and out.dst == msg.src:
                    out._grant(msg.bytes)
                return
            if isinstance(msg, codec.EofAck):
                out = self._out.get(msg.sid)
                if out is not None and out.dst == msg.src:
                    out._ack(msg.total)
                return
            if isinstance(msg, codec.Cancel):
                self._on_cancel(msg)
                return
        if isinstance(msg, codec.Reply):
            pending = self._requests.get(msg.seq)
            if pending is not None and pending[0] == msg.src and not pending[1].done():
                pending[1].set_result(msg)
        elif isinstance(msg, codec.Error):
            self._on_error(msg)
        elif isinstance(msg, codec.Link):
            self._on_link(msg)
        else:
            self._inbox.put(msg)

    def _to_in_stream(self, msg: Message) -> None:
        key = (msg.src, msg.sid)
        stream = self._in.get(key)
        if stream is None:
            if key in self._dead or (isinstance(msg, codec.Eof) and msg.total):
                return  # more of a stream we refused or already gave up on
            if len(self._in) >= self._max_streams:
                what = f"{self._max_streams} incoming streams are open" if self._max_streams else "it takes no streams"
                self._refuse(msg, "over-limit", f"endpoint {self.addr} refused stream {msg.sid}: {what}")
                return
            stream = self._in[key] = self._new_in_stream(msg.src, msg.sid)
            self._accepts.put(stream)
        code = stream._take(msg)
        if code == "credit-exceeded":
            text = f"stream {msg.sid} from {msg.src} sent past the credit {self.addr} granted ({stream._allowed} units)"
            self._refuse(msg, code, text)
            stream._refuse(StreamError(text))
        elif code:
            assert self._held is not None
            text = self._held.refuse(self.node, f"stream {msg.sid} from {msg.src} to {self.addr}")
            self._refuse(msg, code, text, logged=True)
            stream._refuse(BusError(text))

    def _refuse(self, msg: Message, code: str, text: str, *, logged: bool = False) -> None:
        """Refuse the stream of ``msg``: tell its sender with a coded ERROR, count it, log it once
        per interval (unless ``logged``: the hub's :class:`HeldBytes` did)."""
        self._bury(msg.src, msg.sid)
        self.refused[code] += 1
        now = time.monotonic()
        if not logged and now - self._refused_logged_at >= REFUSED_LOG_INTERVAL_S:
            self._refused_logged_at = now
            log.warning("%.300s (%d streams refused here in all)", text, self.refused.total())
        error = codec.Error(
            src=self.addr, dst=msg.src, sid=msg.sid, seq=msg.seq, code=code, message=text, node=self.node, to=self.addr
        )
        with contextlib.suppress(BusError):
            self._send(error)

    def _bury(self, src: str, sid: int) -> None:
        """Remember a stream we are done with, so that what more it sends is dropped unanswered."""
        self._dead[(src, sid)] = None
        if len(self._dead) > DEAD_STREAMS_REMEMBERED:
            self._dead.popitem(last=False)

    def _new_in_stream(self, src: str, sid: int) -> InStream:
        stream = InStream(self, src, sid, self._window)
        if self._window > codec.INITIAL_CREDIT_BYTES:  # every stream starts with the protocol's credit
            self._send(codec.Credit(src=self.addr, dst=src, sid=sid, bytes=self._window - codec.INITIAL_CREDIT_BYTES))
        return stream

    def _on_cancel(self, msg: codec.Cancel) -> None:
        out = self._out.get(msg.sid)
        if out is not None and out.dst == msg.src:
            out._fail(StreamCancelled(f"stream {msg.sid} to {msg.src} cancelled: {msg.reason}"))
            return
        ins = self._in.get((msg.src, msg.sid))
        if ins is not None:
            ins._fail(StreamCancelled(f"stream {msg.sid} from {msg.src} cancelled: {msg.reason}"))

    def _on_error(self, msg: codec.Error) -> None:
        error = _error_for(msg)
        if msg.sid:
            out = self._out.get(msg.sid)
            if out is not None and out.dst == msg.to:
                out._fail(error, bounced_seq=msg.seq)
                return
            ins = self._in.get((msg.to, msg.sid))
            if ins is not None:
                ins._fail(error)
                return
        pending = self._requests.get(msg.seq)
        if pending is not None and pending[0] == msg.to and not pending[1].done():
            pending[1].set_exception(error)
            return
        self._inbox.put(msg)

    def _on_link(self, msg: codec.Link) -> None:
        for listener in self.link_listeners:
            listener(msg)
        if msg.up:
            return
        error = PeerLost(f"node {msg.node!r} lost: {msg.reason}")
        for out in list(self._out.values()):
            if out.node == msg.node:
                out._fail(error)
        for ins in list(self._in.values()):
            if ins.node == msg.node:
                ins._fail(error)
        for dst, future in list(self._requests.values()):
            if codec.split_addr(dst)[0] == msg.node and not future.done():
                future.set_exception(error)

    def fail_party(self, addr: str, error: BaseException) -> None:
        """Fail the streams to and from ``addr`` (a client that went away) and drop what they queued."""
        for out in [o for o in self._out.values() if o.dst == addr]:
            out._fail(error)
        for ins in [i for i in self._in.values() if i.src == addr]:
            ins._refuse(error)

    def fail_all(self, error: BaseException) -> None:
        """Fail every stream, request and reader of this endpoint (its transport is gone)."""
        for out in list(self._out.values()):
            out._fail(error)
        for ins in list(self._in.values()):
            ins._fail(error)
        for _dst, future in list(self._requests.values()):
            if not future.done():
                future.set_exception(error)
        self._inbox.fail(error)
        self._accepts.fail(error)

    def close(self) -> None:
        """Detach from the bus; pending operations fail. Idempotent."""
        if self._closed:
            return
        if self._runs:  # what was sent before close is sent
            self._flush_runs()
        self.fail_all(BusError(f"endpoint {self.addr} closed"))
        self._closed = True
        if self._on_close is not None:
            self._on_close(self)
