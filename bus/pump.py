"""Drive a ZeroMQ socket from an asyncio loop without a Future per message.

``zmq.asyncio`` creates a Future for every call, even a non-blocking one, and costs about ten
times the blocking API on small messages. A ``Pump`` instead watches the socket's FD with
``loop.add_reader`` and, whenever ZeroMQ says the socket is readable, drains it with ``NOBLOCK``
until ``EAGAIN``, handing each multipart message to a callback. Sends go straight to the socket
with ``NOBLOCK``; on ``EAGAIN`` they wait in order in a bounded backlog flushed when the socket is
writable again.

ZeroMQ's FD is edge-triggered and any operation on the socket may consume the edge (see
zmq_getsockopt(3), ZMQ_FD): a send may process the command that announced a message, and the FD
then stays quiet while the message waits. So after a send we ask ``EVENTS`` at once, in place,
and drain in the next loop pass only if a message is waiting; an ``EVENTS`` (or a ``recv``) that
finds nothing re-arms the FD, so the next message signals it again. Asked in place rather than in
a pass scheduled for it, the check costs one ``getsockopt`` (about 1.3 us) instead of that and a
loop pass of its own (an ``epoll_wait``, the loop's own work and the callback, about 2 us more on
an idle loop): a request/reply round trip took three passes per side, now two. Sends made while
the pump drains its own socket need no check: the drain itself asks again before it stops.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

import zmq
from zmq.backend import Socket as _RawSocket

log = logging.getLogger(__name__)

DRAIN_BATCH_MESSAGES = 512  # messages handled per wake-up before yielding to other tasks
COPY_UP_TO_BYTES = 1 << 20
"""Frames up to this size are copied into ZeroMQ's own message; larger ones are shared (zero-copy).

Sharing a Python buffer is not free: pyzmq registers it with its garbage-collector thread, and when
the I/O thread has sent it, that thread wakes, takes the GIL from the loop and drops the reference,
with a ``getpid`` or two per message on the way. Up to about a megabyte the copy costs less: on a
2-node ``cat | cat@b`` (its chunks are reads of up to 1 MiB, ``READ_CHUNK_BYTES`` in
:mod:`dpipes.nodes.supervisor`) copying them took each node's CPU per GB from 1.0-1.7 s to
0.85-1.25 s, and a PUSH of 256 KiB-1 MiB messages 10-25% less CPU. Past a few megabytes (Arrow
batches) the copy is the larger cost and sharing stays."""

# pyzmq's sugar send_multipart/recv_multipart cost 3-4x the backend calls per small message (type
# checks, an EVENTS or RCVMORE getsockopt per frame); the pump calls the backend directly.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
# ``events & zmq.POLLIN`` calls the IntFlag's reflected operator and builds an enum member: about
# 20x the cost of a plain int ``&``, twice per wake-up of every pump.
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_raw_send = _RawSocket.send
_raw_recv = _RawSocket.recv
# The sugar's getsockopt converts its option to an enum member first: 0.4 us of the 1.8 an EVENTS
# costs, asked once or twice per wake-up of every pump. The backend's get, with EVENTS: an int.
_raw_get: Callable[[Any, int], int] = _RawSocket.get  # type: ignore[assignment]
_EVENTS = int(zmq.EVENTS)


def send_frames(sock: zmq.Socket[Any], frames: list[Any]) -> None:
    """Send one multipart message without blocking; frames over ``COPY_UP_TO_BYTES`` zero-copy.

    Raises:
        zmq.Again: the socket's queue is full; nothing was sent (multipart sends are atomic).
    """
    last = len(frames) - 1
    if not last:  # one frame (requests, replies, credit): no loop
        frame = frames[0]
        _raw_send(sock, frame, _NOBLOCK, not isinstance(frame, zmq.Frame) and len(frame) <= COPY_UP_TO_BYTES, False)
        return
    for i, frame in enumerate(frames):
        copy = not isinstance(frame, zmq.Frame) and len(frame) <= COPY_UP_TO_BYTES
        _raw_send(sock, frame, _NOBLOCK | _SNDMORE if i < last else _NOBLOCK, copy, False)


def recv_frames(sock: zmq.Socket[Any]) -> list[zmq.Frame]:
    """Receive one multipart message without blocking, as zmq.Frame objects.

    Raises:
        zmq.Again: nothing is waiting.
    """
    frame = _raw_recv(sock, _NOBLOCK, False, False)
    frames = [frame]
    while frame.more:
        frame = _raw_recv(sock, _NOBLOCK, False, False)
        frames.append(frame)
    return frames


def recv_routed(sock: zmq.Socket[Any]) -> list[Any]:
    """Receive one message from a ROUTER without blocking: its sender's routing id as bytes, then
    its frames as zmq.Frame objects.

    The routing id is always followed by the message's own frames, so it needs no ``more`` to
    look at: received as bytes, it costs no Frame to make and read back (about 0.3 us a message).

    Raises:
        zmq.Again: nothing is waiting.
    """
    frames: list[Any] = [_raw_recv(sock, _NOBLOCK, True, False)]
    frame = _raw_recv(sock, _NOBLOCK, False, False)
    frames.append(frame)
    while frame.more:
        frame = _raw_recv(sock, _NOBLOCK, False, False)
        frames.append(frame)
    return frames


class Pump:
    """One socket, its reader callback, and its send backlog."""

    def __init__(
        self,
        sock: zmq.Socket[Any],
        on_message: Callable[[list[Any]], None],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        routed: bool = False,
    ) -> None:
        self.sock = sock
        self.on_message = on_message  # may be replaced before the loop runs again
        self._loop = loop or asyncio.get_running_loop()
        self._backlog: collections.deque[list[Any]] = collections.deque()
        self._writable: asyncio.Future[None] | None = None
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._scheduled = False
        self._draining = False  # in _on_fd's loop: a send on this socket needs no check of its own
        self._closed = False
        self._recv = recv_routed if routed else recv_frames  # a ROUTER's messages start with bytes
        self.sent = 0
        self.received = 0
        self._loop.add_reader(self._fd, self._on_fd)
        # ZeroMQ may already hold messages whose edge fired before we watched the FD.
        self._schedule()

    # -- receiving -----------------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._on_fd)

    def _on_fd(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        sock = self.sock
        if self._backlog:  # only then does POLLOUT matter; else a recv tells what EVENTS would
            try:
                events: int = _raw_get(sock, _EVENTS)
            except zmq.ZMQError:
                return
            if events & _POLLOUT:
                self._flush()  # its sends may consume the edge: the recv below looks, and re-arms
            elif not events & _POLLIN:
                return
        handle, recv = self.on_message, self._recv
        self._draining = True
        try:
            for i in range(DRAIN_BATCH_MESSAGES):
                try:
                    frames = recv(sock)
                except zmq.Again:  # nothing waits (a wake-up for a command, not a message); re-armed
                    return
                except zmq.ZMQError:
                    if self._closed or i == 0:  # closed, or its context is ending
                        return
                    raise
                self.received += 1
                try:
                    handle(frames)
                except Exception:  # a handler bug must not stop the pump; it is logged loudly
                    log.exception("message handler failed on %s", self.sock)
                if self._closed:
                    return
                # One message per wake-up is the common case of requests and large chunks: ask
                # EVENTS (1.3 us) rather than try a recv that raises zmq.Again (2.9 us). EVENTS
                # without POLLIN also re-arms the FD, as the Again would.
                if i == 0 and not _raw_get(sock, _EVENTS) & _POLLIN:
                    return
        finally:
            self._draining = False
        self._schedule()  # more may be waiting: continue after other tasks ran

    def poll_now(self) -> None:
        """Handle whatever is waiting on the socket now (one batch), without waiting for the loop."""
        if not self._closed:
            self._on_fd()

    # -- sending -------------------------------------------------------------------------------

    def send(self, frames: list[Any]) -> None:
        """Send one multipart message now, or queue it behind earlier ones if the socket is full.

        Raises:
            zmq.ZMQError: the socket refused it for another reason than a full queue (for a
                ROUTER with ROUTER_MANDATORY: the peer is unknown, ``EHOSTUNREACH``).
        """
        if self._backlog:
            self._backlog.append(frames)
            return
        try:
            send_frames(self.sock, frames)
        except zmq.Again:
            self._backlog.append(frames)
            self._schedule()  # flushed once EVENTS says POLLOUT
            return
        self.sent += 1
        self.after_send()

    def after_send(self) -> None:
        """Someone sent on this socket: the send may have consumed the FD's edge for a message
        that arrived meanwhile, so look now whether one waits, and drain it in the next pass."""
        if self._draining or self._scheduled or self._closed:
            return  # the drain, or the pass already scheduled, looks anyway
        try:
            events: int = _raw_get(self.sock, _EVENTS)
        except zmq.ZMQError:
            return
        if events & _POLLIN:
            self._schedule()

    def _flush(self) -> None:
        backlog = self._backlog
        while backlog:
            try:
                send_frames(self.sock, backlog[0])
            except zmq.Again:
                return
            backlog.popleft()
            self.sent += 1
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    @property
    def backlog(self) -> int:
        """Messages waiting for the socket to accept them."""
        return len(self._backlog)

    async def drained(self) -> None:
        """Return once every queued message has been handed to ZeroMQ."""
        while self._backlog and not self._closed:
            if self._writable is None or self._writable.done():
                self._writable = self._loop.create_future()
            self._schedule()
            await self._writable

    def close(self, linger_ms: int = 0) -> None:
        """Stop watching the socket and close it; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self.sock.close(linger=linger_ms)
