"""A non-blocking pyzmq DEALER with :class:`dpipes.bus.zmtp.Dealer`'s methods, for ``tcp://`` and CURVE.

The short path of ``dpipes`` speaks ZMTP itself on this host's Unix sockets (:mod:`dpipes.bus.zmtp`),
where no crypto is needed. A hub over TCP with keys wants CurveZMQ, which is not written by hand
here: this module lends libzmq's DEALER the same five methods (``fileno``, ``send``, ``recv``,
``flush``/``wants_write``, ``close``), so that :class:`dpipes.nodes.local_wire.BlockingClient`
drives either. It is imported only by a run that needs it (pyzmq's import costs a short run more
than the rest of its client).

Two things differ from a plain socket, and the caller minds them:

* ``fileno()`` is libzmq's ``ZMQ_FD``, edge-triggered: it signals a change, not a state. After
  anything was sent or received, :meth:`ZmqDealer.pending` says whether a message waits although
  the descriptor may never signal it; a caller polls with no timeout then.
* a refused CURVE handshake (the node does not admit our key, or holds another key than the one
  given) is silent on the socket itself: a monitor socket says it, and :meth:`ZmqDealer.recv`
  raises it as :class:`~dpipes.bus.zmtp.ZmtpError`, as the hand-written dealer raises an ``ERROR``.

Hostile input: libzmq refuses a frame over ``MAX_FRAME_BYTES`` (``MAXMSGSIZE``: the connection is
dropped) and a message of more than ``MAX_MESSAGE_FRAMES`` frames raises
:class:`~dpipes.bus.zmtp.ZmtpError`, as in :mod:`dpipes.bus.zmtp`.
"""

from __future__ import annotations

from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from dpipes.bus.zmtp import MAX_FRAME_BYTES, MAX_MESSAGE_FRAMES, ZmtpError

__all__ = ["ZmqDealer"]

REFUSALS = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class ZmqDealer:
    """One libzmq DEALER connected to ``endpoint``, with CURVE when ``keys`` are given.

    Args:
        endpoint: a ``tcp://`` (or any libzmq) endpoint.
        keys: ``(our public, our secret, the server's public)`` keys, Z85; None: no CURVE.
    """

    def __init__(self, endpoint: str, *, keys: tuple[str, str, str] | None = None) -> None:
        self.ctx: zmq.Context[Any] = zmq.Context(io_threads=1)
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)  # close() lingers itself, bounded by its argument
        self.sock.setsockopt(zmq.SNDHWM, 0)  # as zmtp.Dealer's queue: the caller's credit bounds it
        self.sock.setsockopt(zmq.RCVHWM, 100_000)  # a safety net only: credit bounds stream data
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # a frame over the limit is never allocated
        self.sock.setsockopt(zmq.RECONNECT_IVL, -1)  # one connection: a lost node is gone, not redialled
        if keys is not None:
            public, secret, server = keys
            self.sock.setsockopt(zmq.CURVE_PUBLICKEY, public.encode("ascii"))
            self.sock.setsockopt(zmq.CURVE_SECRETKEY, secret.encode("ascii"))
            self.sock.setsockopt(zmq.CURVE_SERVERKEY, server.encode("ascii"))
        self.monitor = self.sock.get_monitor_socket(REFUSALS | zmq.EVENT_DISCONNECTED)
        self.curve = keys is not None
        self.endpoint = endpoint
        try:
            self.sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ZmtpError(f"cannot connect to {endpoint}: {exc}") from None

    def fileno(self) -> int:
        return int(self.sock.getsockopt(zmq.FD))

    def pending(self) -> bool:
        """Whether a message waits to be received (the edge-triggered descriptor may not say so)."""
        return bool(int(self.sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)

    def send(self, frames: list[bytes | memoryview]) -> None:
        """Queue one message; libzmq's I/O thread writes it.

        Raises:
            ZmtpError: the socket cannot take it (closed).
        """
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            raise ZmtpError(f"cannot send to {self.endpoint}: {exc}") from None

    def wants_write(self) -> bool:
        return False  # libzmq's I/O thread writes what is queued

    def flush(self) -> bool:
        return True

    def recv(self) -> list[memoryview] | None:
        """The next whole message's frames, or None when none waits.

        Raises:
            ZmtpError: the node refused the handshake or went away, or sent too many frames.
        """
        self._check_monitor()
        try:
            frames = self.sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        except zmq.ZMQError as exc:
            raise ZmtpError(f"cannot receive from {self.endpoint}: {exc}") from None
        if len(frames) > MAX_MESSAGE_FRAMES:
            raise ZmtpError(f"a message of more than {MAX_MESSAGE_FRAMES} frames from {self.endpoint}")
        return [frame.buffer for frame in frames]

    def _check_monitor(self) -> None:
        try:
            kind = recv_monitor_message(self.monitor, flags=zmq.NOBLOCK)["event"]
        except zmq.Again:
            return
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise ZmtpError(f"the node at {self.endpoint} refused this client's key")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            raise ZmtpError(f"the node at {self.endpoint} does not speak {'CURVE' if self.curve else 'NULL'}")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            raise ZmtpError(f"the node at {self.endpoint} does not hold the key it was said to hold")
        if kind == zmq.EVENT_DISCONNECTED:
            raise ZmtpError(f"the node at {self.endpoint} closed the connection")

    def close(self, linger_s: float = 0.0) -> None:
        """Let what is queued leave for at most ``linger_s``, then close the sockets and the context."""
        self.sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(0)
        self.sock.close()
        self.ctx.term()
