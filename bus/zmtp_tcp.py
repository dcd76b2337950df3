"""A hub's link to a peer hub without libzmq's I/O thread: a ZMTP DEALER over TCP, driven by the loop.

A hub sends to a peer through its own DEALER (a *link*, :mod:`dpipes.bus.hub.links`) and hears the
peer's traffic on its ROUTER. Through libzmq, a message on a link wakes three threads on its way
out of the process: the loop hands it to the DEALER's queue, libzmq's I/O thread wakes to write it,
and the peer's I/O thread and loop wake to read it. A request/reply round trip between two hubs
thus crossed six thread wake-ups. Written by the loop itself (``sendmsg`` on a non-blocking TCP
socket, what :class:`dpipes.bus.zmtp.Stream` does), a message leaves without the sender's I/O
thread: four wake-ups. On the machine of issue 16 (2 cores, shared), between two hubs on one
host: CPU per 64 B REQUEST/REPLY round trip 68 -> 45 us (source hub) and 58 -> 42 us (sink hub).
The p50 moved little on an idle machine (98 -> 97 us: both processes' threads find an idle core)
but the p99 did (168-193 -> 130-136 us), and beside a CPU burner, where every extra wake-up waits
for a core, the p50 went from 0.88-0.89x Zenoh's to 1.02-1.04x.

What it costs: the loop now does the kernel's share of sending too, which libzmq's I/O thread did
beside it on the other core, so a 1 MiB stream went from 6.5-7.0 to 5.3 GB/s on an idle machine.
Two things won that back: large messages queued in one pass of the loop leave in one ``sendmsg``
(:meth:`TcpDealer._flush_soon`; the peer's reads are larger and fewer), and a link to a hub on
this host has a bounded send buffer (:meth:`TcpDealer._bound_send_buffer`; a link to another host
keeps the kernel's autotuning). Together, 1 MiB messages between two hubs on one host went past
libzmq's DEALER (7.0 vs 4.1 GB/s in the same run, about half its CPU per GB).

The peer cannot tell this DEALER from libzmq's: it speaks ZMTP 3.0 with the NULL mechanism, gives
the peer's ROUTER our routing id as the ``READY`` command's ``Identity``, answers ``PING``, and
keeps the behaviour of the libzmq DEALER the hub used to open (see ``_ensure_link``):

* ``IMMEDIATE``: nothing is handed to a connection before its handshake is done. Until then what
  is sent waits in :attr:`backlog`, in order, as it did in :class:`dpipes.bus.pump.Pump`'s backlog
  when libzmq said ``EAGAIN``; it leaves when the handshake completes. Bytes handed to a
  connection that then breaks are lost, as libzmq drops a broken connection's pipe.
* ``RECONNECT_IVL`` / ``RECONNECT_IVL_MAX``: a refused connect, a handshake that fails or does not
  finish in ``HANDSHAKE_TIMEOUT_S``, and a connection the peer closes are retried after
  ``RECONNECT_IVL_S``, doubling up to ``RECONNECT_IVL_MAX_S``, reset by a completed handshake.
* ``SNDHWM``: at most ``SEND_QUEUE_BYTES`` wait for the socket; more waits in :attr:`backlog`.
  Credit bounds stream data far below it; the bound keeps a slow peer from holding I/O vectors
  of everything the hub sends it.
* ``MAXMSGSIZE``, ``TCP_KEEPALIVE``, ``LINGER``: a frame over ``max_frame_bytes`` is never read
  (the connection is dropped); the kernel notices a dead peer; :meth:`close` writes what waits
  for at most its ``linger_ms``.

Hostile input: a peer that breaks ZMTP (a garbage greeting, a frame over the limit, too many
frames) is dropped, the :class:`~dpipes.bus.zmtp.ZmtpError` handed to ``on_error`` (the hub counts
and logs it once per interval, as any bad message) and the link reconnects, backing off.

Limits: NULL only. A hub with keys links through libzmq, CURVE and all (no hand-written crypto);
so does any endpoint this module does not parse (not ``tcp://host:port``).
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

from dpipes.bus.zmtp import MAX_FRAME_BYTES, Stream, ZmtpClosed, ZmtpError

__all__ = ["TcpDealer", "tcp_address"]

log = logging.getLogger(__name__)

RECONNECT_IVL_S = 0.1  # libzmq's RECONNECT_IVL as the hub set it: a restarted peer is back within a heartbeat
RECONNECT_IVL_MAX_S = 2.0  # libzmq's RECONNECT_IVL_MAX as the hub set it
HANDSHAKE_TIMEOUT_S = 30.0  # libzmq's HANDSHAKE_IVL default: a peer that accepts and says nothing is retried
SEND_QUEUE_BYTES = 64 << 20  # our SNDHWM: bytes handed to a connection and not yet taken by the kernel
LOCAL_SNDBUF_BYTES = 512 << 10  # SO_SNDBUF of a link to this host (the kernel doubles it): see _on_connected
COALESCE_BYTES = 64 << 10  # queued this much: the write waits for the loop's next pass (see _flush_soon)
DRAIN_BATCH_MESSAGES = 512  # messages handled per wake-up before yielding to other tasks
CLOSE_DISCARD_BYTES = 4 << 20  # unread input read away at close (a close with unread input resets the connection)


def tcp_address(endpoint: str) -> tuple[str, int] | None:
    """``tcp://host:port`` as (host, port), or None for anything else (libzmq then links)."""
    if not endpoint.startswith("tcp://"):
        return None
    host, sep, port = endpoint[6:].rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or host == "*" or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if ";" in host or "/" in host or any(c.isspace() for c in host):  # libzmq's source-address syntax, or junk
        return None
    return host, int(port)


class TcpDealer:
    """One link: a DEALER connected to the ROUTER at ``endpoint``, reconnecting while it lives.

    The same surface as :class:`dpipes.bus.pump.Pump` where the hub uses it: :meth:`send`,
    ``on_message``, :attr:`backlog`, :meth:`drained`, :meth:`close`. Received frames are
    memoryviews.

    Args:
        endpoint: ``tcp://host:port`` (see :func:`tcp_address`).
        on_message: called with each message's frames, from the loop.
        routing_id: the identity the peer's ROUTER gives us (libzmq's ``ROUTING_ID``).
        on_error: called with a protocol error of the peer's, before the link reconnects.
        max_frame_bytes: the largest frame taken from the peer (libzmq's ``MAXMSGSIZE``).

    Raises:
        ValueError: ``endpoint`` is not a ``tcp://host:port``.
    """

    def __init__(
        self,
        endpoint: str,
        on_message: Callable[[list[memoryview]], None],
        *,
        routing_id: bytes,
        on_error: Callable[[ZmtpError], None] | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        address = tcp_address(endpoint)
        if address is None:
            raise ValueError(f"cannot link to {endpoint!r:.100}: expected tcp://host:port")
        self.endpoint = endpoint
        self.on_message = on_message  # may be replaced before the loop runs again
        self.on_error = on_error
        self._host, self._port = address
        self._routing_id = routing_id
        self._max_frame_bytes = max_frame_bytes
        self._loop = loop or asyncio.get_running_loop()
        self._backlog: collections.deque[list[Any]] = collections.deque()
        self._sock: socket.socket | None = None
        self._stream: Stream | None = None
        self._writing = False  # the writer callback is registered (connecting, or bytes wait)
        self._soon: asyncio.Handle | None = None  # a write left for the loop's next pass (_flush_soon)
        self._retry: asyncio.TimerHandle | None = None  # the next connect attempt
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._resolving: asyncio.Future[Any] | None = None
        self._interval_s = RECONNECT_IVL_S
        self._waiters: list[asyncio.Future[None]] = []  # of drained()
        self._closed = False
        self.sent = 0  # messages handed to a connection
        self.received = 0
        self.connects = 0  # handshakes completed
        self.errors = 0  # connections dropped for a protocol error of the peer's
        self._connect()

    # -- connecting --------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection's handshake is done: what is sent goes to it."""
        return self._stream is not None and self._stream.ready

    def _connect(self) -> None:
        self._retry = None
        if self._closed:
            return
        # IPv4 for names, as libzmq without ZMQ_IPV6 (the hub sets none); an IPv6 literal as it is.
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:  # a numeric address needs no resolver (and no thread)
            infos = socket.getaddrinfo(self._host, self._port, family, socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
        except (socket.gaierror, UnicodeError):  # a name: resolved in a thread, as libzmq's resolver does
            resolving = self._loop.run_in_executor(
                None, socket.getaddrinfo, self._host, self._port, family, socket.SOCK_STREAM
            )
            self._resolving = resolving
            resolving.add_done_callback(self._on_resolved)
            return
        self._dial(infos)

    def _on_resolved(self, resolving: asyncio.Future[Any]) -> None:
        if resolving is not self._resolving or self._closed:
            return
        self._resolving = None
        if resolving.cancelled():
            return
        exc = resolving.exception()
        if exc is not None:
            self._lost(f"cannot resolve {self._host!r:.100}: {exc}")
            return
        self._dial(resolving.result())

    def _dial(self, infos: list[Any]) -> None:
        family, _, _, _, address = infos[0]
        try:  # out of descriptors, say: retried like a refused connect, as libzmq would
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            self._lost(f"cannot open a socket: {exc.strerror or exc}")
            return
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as libzmq: a message leaves at once
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # let the kernel notice dead TCP peers too
            err = sock.connect_ex(address)
        except OSError as exc:
            err = exc.errno or errno.EINVAL
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._lost(f"cannot connect: {os.strerror(err)}")
            return
        self._sock = sock
        self._loop.add_writer(sock.fileno(), self._on_connected)
        self._writing = True
        self._handshake_timer = self._loop.call_later(HANDSHAKE_TIMEOUT_S, self._on_handshake_timeout)

    def _on_connected(self) -> None:
        sock = self._sock
        assert sock is not None
        self._loop.remove_writer(sock.fileno())
        self._writing = False
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._lost(f"cannot connect: {os.strerror(err)}")
            return
        self._bound_send_buffer(sock)
        self._stream = Stream(sock, identity=self._routing_id, max_frame_bytes=self._max_frame_bytes)
        self._loop.add_reader(sock.fileno(), self._on_readable)
        self._flush()  # our greeting and READY

    @staticmethod
    def _bound_send_buffer(sock: socket.socket) -> None:
        """Fix a link to a hub on this host at ``LOCAL_SNDBUF_BYTES`` of send buffer.

        Left to the kernel's autotuning, a 1 MiB stream grows the buffer to its 4 MiB maximum: over
        loopback the sender runs megabytes ahead of the peer's reads, and the bytes it copies in are
        cold when the peer copies them out. Bounded, it stays about 1 MiB ahead. Issue 16's 1 MiB
        stream between two hubs (2 cores, shared; medians of 5 alternated pairs): 2.8-3.7 -> 6.0-7.0
        GB/s, CPU per GB x0.52-0.66 sending and x0.57-0.65 receiving, beside a CPU burner x1.6 and
        x0.62 (libzmq's DEALER: 4.1 GB/s, 0.20 s/GB sending). In the profile (no hardware counters
        on that machine) the two copies took 22% fewer samples per GB, and the kernel's TCP work
        with interrupts off 63% fewer. A peer on another host keeps the autotuning: its buffer
        must cover the path's bandwidth-delay product.
        """
        try:
            if sock.getsockname()[0] == sock.getpeername()[0]:  # loopback, or this host's own address
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, LOCAL_SNDBUF_BYTES)
        except OSError:
            pass  # the connection broke already: the first read says so

    def _on_handshake_timeout(self) -> None:
        self._handshake_timer = None
        if not self.connected:
            self._lost(f"no ZMTP handshake in {HANDSHAKE_TIMEOUT_S:g} s")

    def _on_ready(self) -> None:
        """The handshake is done: what waited goes now."""
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._interval_s = RECONNECT_IVL_S
        self.connects += 1
        log.debug("link to %s: connected", self.endpoint)
        self._flush()

    def _lost(self, reason: str) -> None:
        """Drop the connection (or the attempt) and try again after the reconnect interval."""
        self._teardown()
        if self._closed:
            return
        log.debug("link to %s: %s; reconnecting in %g s", self.endpoint, reason, self._interval_s)
        self._retry = self._loop.call_later(self._interval_s, self._connect)
        self._interval_s = min(2 * self._interval_s, RECONNECT_IVL_MAX_S)
        self._wake()  # what was handed to the connection is gone: drained() looks again

    def _teardown(self) -> None:
        if self._soon is not None:
            self._soon.cancel()
            self._soon = None
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        sock, self._sock, self._stream = self._sock, None, None
        if sock is not None:
            self._loop.remove_reader(sock.fileno())
            if self._writing:
                self._loop.remove_writer(sock.fileno())
                self._writing = False
            sock.close()

    # -- receiving ---------------------------------------------------------------------------

    def _on_readable(self) -> None:
        stream = self._stream
        if stream is None:
            return
        handle = self.on_message
        try:
            for _ in range(DRAIN_BATCH_MESSAGES):
                ready = stream.ready
                frames = stream.recv()
                if not ready and stream.ready:
                    self._on_ready()
                if frames is None:
                    if stream.wants_write() and not self._writing and self._stream is stream:
                        self._flush()  # a PONG the socket did not take at once
                    return
                self.received += 1
                try:
                    handle(frames)
                except Exception:  # a handler bug must not stop the link; it is logged loudly
                    log.exception("message handler failed on the link to %s", self.endpoint)
                if self._stream is not stream:
                    return  # closed (or dropped) by the handler
        except ZmtpClosed as exc:
            self._lost(str(exc))
            return
        except ZmtpError as exc:
            self.errors += 1
            if self.on_error is not None:
                self.on_error(exc)
            else:
                log.warning("link to %s: %s", self.endpoint, exc)
            self._lost(str(exc))
            return
        self._loop.call_soon(self._on_readable_again, stream)  # more may be buffered: after other tasks

    def _on_readable_again(self, stream: Stream) -> None:
        if self._stream is stream:
            self._on_readable()

    # -- sending -----------------------------------------------------------------------------

    def send(self, frames: list[Any]) -> None:
        """Hand one message (bytes, memoryviews, zmq.Frames) to the connection, or queue it in order."""
        stream = self._stream
        if self._backlog or stream is None or not stream.ready or stream.queued_bytes > SEND_QUEUE_BYTES:
            self._backlog.append(frames)
            return
        stream.queue(frames)
        self.sent += 1
        if self._writing or self._soon is not None:
            return
        if stream.queued_bytes < COALESCE_BYTES:
            self._flush()  # a small message leaves at once: a round trip waits for nothing
        else:
            self._soon = self._loop.call_soon(self._flush_soon, stream)

    def _flush_soon(self, stream: Stream) -> None:
        """Write what large messages this pass of the loop queued, in one ``sendmsg``.

        A sender of large messages queues several in one pass when credit comes back. Written one
        ``sendmsg`` each, every write pushes its own burst of segments at the peer and wakes its
        I/O thread: issue 16's 1 MiB stream between two hubs had the peer's libzmq read 148 KB a
        ``recv`` (349 KB from libzmq's DEALER), in three times as many wake-ups. Written together,
        about 1.9 MB leave a call and the peer reads 450 KB a ``recv``. On that machine (2 cores,
        shared, noisy), medians of 18 alternated pairs: 2.9 -> 3.4 GB/s (x1.14), CPU per GB x0.96
        sending and x0.93 receiving; beside a CPU burner, 10 pairs, the same throughput at x0.88
        sending CPU. Small messages skip this: the pass's wait would be their latency.
        """
        self._soon = None
        if self._stream is stream:
            self._flush()

    def _flush(self) -> None:
        """Write what waits; hand the backlog over as room frees; watch for writability if need be."""
        stream = self._stream
        if stream is None:
            return
        backlog = self._backlog
        while True:
            try:
                done = stream.flush()
            except ZmtpError as exc:
                self._lost(str(exc))
                return
            if not done:
                if not self._writing:
                    self._loop.add_writer(stream.fileno(), self._flush)
                    self._writing = True
                return
            if not (backlog and stream.ready):
                break
            while backlog and stream.queued_bytes <= SEND_QUEUE_BYTES:
                stream.queue(backlog.popleft())
                self.sent += 1
        if self._writing:
            self._loop.remove_writer(stream.fileno())
            self._writing = False
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    @property
    def backlog(self) -> int:
        """Messages waiting for a connection (or for room in its queue)."""
        return len(self._backlog)

    def _draining(self) -> bool:
        stream = self._stream
        return bool(self._backlog) or (stream is not None and stream.ready and stream.wants_write())

    async def drained(self) -> None:
        """Return once every queued message has been handed to the kernel (or the link closed)."""
        while self._draining() and not self._closed:
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            await waiter

    # -- closing -----------------------------------------------------------------------------

    def close(self, linger_ms: int = 0) -> None:
        """Write what the connection holds for at most ``linger_ms``, then close it; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._resolving is not None:
            self._resolving.cancel()
            self._resolving = None
        stream = self._stream
        if stream is not None and stream.ready:
            if self._soon is not None:  # what send() left for the next pass goes now, as it would have
                try:
                    stream.flush()
                except ZmtpError:
                    pass  # the peer is gone: the teardown below closes our end
            if linger_ms > 0 and stream.wants_write():
                self._linger(stream, linger_ms / 1000)
            try:  # a close with unread input would reset the connection, and the peer lose what we sent
                for _ in range(CLOSE_DISCARD_BYTES // (256 * 1024)):
                    if not stream.sock.recv(256 * 1024):
                        break
            except OSError:
                pass
        self._teardown()
        self._backlog.clear()
        self._wake()

    @staticmethod
    def _linger(stream: Stream, linger_s: float) -> None:
        """Block (the loop, briefly: a BYE's linger) until what is queued is written, or ``linger_s``."""
        deadline = time.monotonic() + linger_s
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        try:
            while not stream.flush():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                poller.poll(max(1, int(left * 1000)))
        except ZmtpError:
            pass  # the peer is gone: nothing more can be delivered
