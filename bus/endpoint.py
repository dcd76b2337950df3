"""The endpoint API: a named party on the bus that sends, receives, requests and streams.

An ``Endpoint`` does not know how its messages travel: an in-process endpoint hands them to its
hub directly, a client endpoint (``dpipes.bus.client``) sends them over a DEALER socket to a hub.
Streams and their credit accounting, the same for both, are :mod:`dpipes.bus.streams`.

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
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dpipes.bus import codec, shm
from dpipes.bus.codec import Message
from dpipes.bus.errors import (
    BusError,
    NoRoute,
    PeerLost,
    RequestFailed,
    RequestTimeout,
    StreamError,
)
from dpipes.bus.streams import (
    REFUSED_LOG_INTERVAL_S,
    HeldBytes,
    InStream,
    OutStream,
    StreamCancelled,
    Waitable,
    readdress,
)

__all__ = ["Endpoint", "HeldBytes", "InStream", "OutStream", "StreamCancelled", "Transport"]

log = logging.getLogger(__name__)


REQUEST_TIMEOUT_S = 10.0  # default wait for a REPLY; control requests are small and fast
MAX_IN_STREAMS = 64  # incoming streams open at once on one endpoint, by default; each holds up to a window
DEAD_STREAMS_REMEMBERED = 1024  # streams we refused: what more they send is dropped unanswered


class Transport(Protocol):
    """How an endpoint's messages leave it: to its hub in-process, or over a socket."""

    def send(self, msg: Message) -> None:
        """Deliver ``msg``; failures come back as ERROR messages."""

    def send_frames(self, dst: str, frames: list[Any]) -> None:
        """Deliver an already encoded message ``[header, *payload]`` addressed to ``dst``."""

    def lease_filled(self, dst: str, nbytes: int, fill: Callable[[memoryview], Sequence[int]]) -> shm.Lease | None:
        """Shared memory with ``dst``'s side for a payload ``fill`` writes in place (``shm.Pool.lease_filled``);
        None when this transport shares none or has no room: send the payload as frames instead."""


def _error_for(msg: codec.Error) -> BusError:
    text = f"{msg.message} (at node {msg.node!r})" if msg.node else msg.message
    if msg.code == "peer-lost":
        return PeerLost(text)
    if msg.code in ("no-route", "no-endpoint", "not-linked"):
        return NoRoute(text)
    return BusError(text)


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
        self._node = codec.split_addr(addr)[0]
        self._held = held
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._inbox = Waitable(self._loop)
        self._accepts = Waitable(self._loop)
        self._window = window
        self._max_streams = max_streams
        self._out: dict[int, OutStream] = {}
        self._in: dict[tuple[str, int], InStream] = {}
        self._dead: collections.OrderedDict[tuple[str, int], None] = collections.OrderedDict()
        self.refused: collections.Counter[str] = collections.Counter()  # streams refused, by ERROR code
        self._refused_logged_at = -math.inf
        # request id -> (dst, future, deadline, method, timeout): a tuple, made once per request
        self._requests: dict[int, tuple[str, asyncio.Future[codec.Reply], float, str, float]] = {}
        self._expiry: asyncio.TimerHandle | None = None  # at the earliest deadline of a pending request
        self._expiry_at = math.inf
        self._ids = itertools.count(1)
        self._on_close = on_close
        self._closed = False
        self._runs: list[OutStream] = []  # streams with small chunks queued in this loop pass
        self._flush_scheduled = False
        self.link_listeners: list[Callable[[codec.Link], None]] = []
        self._on_request: Callable[[codec.Request], None] | None = None

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
        """``stream`` queued a run of small chunks: send it at the end of this loop pass (later only
        while its sender is busy: ``_end_of_pass``)."""
        self._runs.append(stream)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_of_pass)

    def _end_of_pass(self) -> None:
        """Send the runs of small chunks queued in this loop pass, unless their senders are busy.

        A sender that only lets the loop run (``OutStream._yielding``) is back in the next pass
        with more: its run stays open until it stops (waits for credit or anything else, or
        ends) or the run is full (``OutStream._put``), so a busy stream of small messages sends
        fewer, larger batches. A sender that stops has its run sent at the end of the pass it
        stopped in, as before: nothing waits longer when the link is idle.
        """
        runs = self._runs
        if runs and all(stream._yielding for stream in runs):
            # Each time a run fills, its stream queues its next run again: name each stream once.
            self._runs = list(dict.fromkeys(runs))
            self._loop.call_soon(self._end_of_pass)
            return
        self._flush_scheduled = False
        self._flush_runs()

    def _flush_runs(self) -> None:
        # Now, before anything else this endpoint sends; a pending _end_of_pass stays the one
        # (it takes any run queued from here on), so a busy sender never has two.
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
            msg = readdress(msg, self.addr, msg.dst, msg.sid, msg.seq)
        self._send(msg)

    async def recv(self, timeout: float | None = None) -> Message:
        """The next message that is not part of a stream, a reply or flow control."""
        msg: Message = await self._inbox.get(timeout)
        return msg

    def on_request(self, handler: Callable[[codec.Request], None] | None) -> None:
        """Hand each REQUEST that reaches this endpoint to ``handler`` as it is delivered, instead of
        queueing it for ``recv``; None: queue them again.

        ``handler`` runs inside the delivery (the hub's or the client's socket callback), as a
        Zenoh subscriber's callback runs in Zenoh's thread: it must not block. It answers with
        :meth:`reply`, at once or later (from a task it starts). Answered at once, a request's
        REPLY leaves in the loop pass its REQUEST arrived in, where one read with ``recv`` waits
        for its task's turn, a pass later. An exception from ``handler`` is logged and answered
        as a failed REPLY, so that the caller does not wait for its timeout.
        """
        self._on_request = handler

    def _answer(self, handler: Callable[[codec.Request], None], request: codec.Request) -> None:
        try:
            handler(request)
        except Exception as exc:  # a handler bug must not stop the delivery; it is logged loudly
            log.exception("endpoint %s: the request handler failed on %s", self.addr, request.method)
            with contextlib.suppress(BusError):
                self.reply(request, error=f"endpoint {self.addr}: {request.method} failed: {exc!r:.200}")

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
        # The deadline is kept beside the future, not in ``asyncio.wait_for`` (which wraps the future
        # in a second one: its reply reaches us a loop pass later) nor in a timer per request (made
        # and cancelled for every request, 2-3 us of a round trip): one timer of the endpoint's
        # waits for the earliest deadline of all its pending requests (``_expire``).
        deadline = self._loop.time() + timeout
        self._requests[rid] = (dst, future, deadline, method, timeout)
        if deadline < self._expiry_at:
            self._expire_at(deadline)
        try:
            if dst.partition("/")[0] != self._node:  # encoded on its way anyway: pack it here, in one step
                self._send_frames(dst, [codec.packb_request(self.addr, dst, rid, method, body or {})])
            else:  # an endpoint of this node may get the message as it is, never encoded
                self._send(codec.Request(src=self.addr, dst=dst, seq=rid, method=method, body=body or {}))
            reply = await future
        finally:
            self._requests.pop(rid, None)
        if not reply.ok:
            raise RequestFailed(f"{method} at {dst} failed: {reply.error}", reply.body)
        return reply.body

    def _expire_at(self, when: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = when
        self._expiry = self._loop.call_at(when, self._expire)

    def _expire(self) -> None:
        """The earliest deadline of a pending request has come: fail every request past its own,
        and wait for the earliest of the others. With one timeout for all (the usual case) this
        runs about once per timeout, however many requests come and go meanwhile."""
        self._expiry, self._expiry_at = None, math.inf
        now = self._loop.time()
        earliest = math.inf
        for dst, future, deadline, method, timeout in self._requests.values():
            if future.done():
                continue
            if deadline <= now:
                future.set_exception(RequestTimeout(f"{method} to {dst}: no reply within {timeout:g} s"))
            elif deadline < earliest:
                earliest = deadline
        if earliest < math.inf:
            self._expire_at(earliest)

    def reply(self, request: codec.Request, body: dict[str, Any] | None = None, *, error: str = "") -> None:
        """Answer ``request``: with ``body``, or as a failure when ``error`` is given."""
        dst = request.src
        if dst.partition("/")[0] != self._node:  # as in ``request``: packed here when it goes to another node
            self._send_frames(dst, [codec.packb_reply(self.addr, dst, request.seq, not error, body or {}, error)])
            return
        self._send(codec.Reply(src=self.addr, dst=dst, seq=request.seq, ok=not error, body=body or {}, error=error))

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
        elif self._on_request is not None and isinstance(msg, codec.Request):  # the other end of a round trip
            self._answer(self._on_request, msg)
        elif isinstance(msg, codec.Error):
            self._on_error(msg)
        elif isinstance(msg, codec.Link):
            self._on_link(msg)
        else:
            self._inbox.put(msg)

    def _deliver_shared(self, msg: Message) -> None:
        """A data message whose payload lies in its sender's shared memory (``dpipes.bus.shm``):
        its stream's window opens to ``shm.SHARED_WINDOW_BYTES``, as its bytes wait in no socket,
        and the hub's cap does not count them (they are the sender's, bounded by its pool)."""
        if msg.sid and msg.KIND in codec.DATA_KINDS:
            self._to_in_stream(msg, shared=True)
        else:
            self._deliver(msg)

    def _to_in_stream(self, msg: Message, *, shared: bool = False) -> None:
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
        code = stream._take(msg, shared)
        if not code and shared:
            stream._widen(shm.SHARED_WINDOW_BYTES)
        elif code == "credit-exceeded":
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
            stream._grant_later(self._window - codec.INITIAL_CREDIT_BYTES)
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
        for dst, future, *_ in list(self._requests.values()):
            if codec.split_addr(dst)[0] == msg.node and not future.done():
                future.set_exception(error)

    def fail_party(self, addr: str, error: BaseException, *, incoming: bool = True) -> None:
        """Fail the streams to and (unless not ``incoming``) from ``addr`` (a client that went away)
        and drop what they queued."""
        for out in [o for o in self._out.values() if o.dst == addr]:
            out._fail(error)
        if incoming:
            for ins in [i for i in self._in.values() if i.src == addr]:
                ins._refuse(error)

    def fail_all(self, error: BaseException) -> None:
        """Fail every stream, request and reader of this endpoint (its transport is gone)."""
        for out in list(self._out.values()):
            out._fail(error)
        for ins in list(self._in.values()):
            ins._fail(error)
        for _dst, future, *_ in list(self._requests.values()):
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
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry, self._expiry_at = None, math.inf
        if self._on_close is not None:
            self._on_close(self)
