"""A ZeroMQ DEALER spoken without libzmq: ZMTP 3.0 with the NULL mechanism, on one Unix socket.

The short path of ``dpipes`` (:mod:`dpipes.nodes.local_wire`) attaches to this host's hub over its
``ipc://`` socket, sends a request and reads a few replies. Importing pyzmq for that cost more than
the rest of the client together (about 18 ms of CPU of a ~25 ms interpreter start, on the machine
of issue 16), and its I/O thread and context teardown added more at exit. An ``ipc://`` endpoint
is a plain ``AF_UNIX`` stream socket and ZMTP is a short protocol, so this module speaks it
directly: a hub's ROUTER (libzmq) cannot tell this peer from a pyzmq DEALER.

What is spoken, from the specs (ZMTP 3.0, rfc.zeromq.org/spec/23; PING and PONG of 3.1, spec 37):

* the greeting, 64 octets each way: signature ``FF 00*8 7F``, version ``03 00``, mechanism
  ``NULL`` padded to 20 octets, as-server ``00``, 31 octets of filler. The peer must say version
  3 or later and ``NULL`` (a hub's ``ipc://`` ROUTER does);
* the NULL handshake: each side sends a ``READY`` command with its ``Socket-Type`` (ours
  ``DEALER`` and an empty ``Identity``, as libzmq's DEALER sends them); the peer's must be
  ``ROUTER``. An ``ERROR`` command instead (the hub's ZAP handler refused us) fails the handshake
  with its reason;
* then messages: each frame is a flags octet (``MORE`` 0x01, ``LONG`` 0x02, ``COMMAND`` 0x04), its
  size in one octet, or eight (network order) when ``LONG``, and its body. A ``PING`` command is
  answered with ``PONG`` and its context; any other command is ignored, as the spec asks.

A DEALER talking to a ROUTER sends and receives the frames of a message as they are: the ROUTER
adds and removes the routing identity itself. The socket is non-blocking after the handshake:
:meth:`Dealer.recv` returns None when no whole message is buffered, :meth:`Dealer.send` queues
what the socket does not take at once (ZeroMQ's send queue, unbounded as ``SNDHWM`` 0 is; the
caller's credit bounds it) and :meth:`Dealer.flush` writes it when :meth:`Dealer.wants_write`
says to poll for it.

Hostile input: a frame longer than ``MAX_FRAME_BYTES``, a message of more than
``MAX_MESSAGE_FRAMES`` frames or a malformed greeting or handshake raises :class:`ZmtpError`,
and the connection is then unusable (a stream has no resynchronisation point); the caller treats
the hub as gone.
"""

from __future__ import annotations

import _socket  # the socket module's core: socket's enums cost a start 2 ms to import, and we need none
import collections
import itertools
import struct
import time

from dpipes.bus.errors import BusError

__all__ = ["MAX_FRAME_BYTES", "MAX_MESSAGE_FRAMES", "Dealer", "Stream", "ZmtpClosed", "ZmtpError"]

MAX_FRAME_BYTES = 256 << 20  # far above any bus frame (chunks are at most a few MiB); a bound on memory
MAX_MESSAGE_FRAMES = 1024  # a bus message is a header and a few payload frames
READ_CHUNK_BYTES = 256 * 1024  # one recv when more is needed (or what the frame still lacks)
IOV_MAX = 1024  # buffers per sendmsg (Linux's UIO_MAXIOV)

SIGNATURE = b"\xff" + b"\x00" * 8 + b"\x7f"
GREETING = SIGNATURE + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
GREETING_BYTES = 64

MORE, LONG, COMMAND = 0x01, 0x02, 0x04


class ZmtpError(BusError, ConnectionError):
    """The peer broke ZMTP (greeting, handshake, a frame past a limit), refused us, or went away."""


class ZmtpClosed(ZmtpError):
    """The peer closed the connection, or it broke: no fault of the protocol."""


def _command(name: bytes, data: bytes = b"") -> bytes:
    body = bytes([len(name)]) + name + data
    if len(body) > 255:
        return bytes([COMMAND | LONG]) + struct.pack(">Q", len(body)) + body
    return bytes([COMMAND, len(body)]) + body


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


def _ready_command(identity: bytes) -> bytes:
    """Our ``READY``: a DEALER, and the routing id (libzmq's ``ROUTING_ID``) its ROUTER is to use."""
    return _command(b"READY", _property(b"Socket-Type", b"DEALER") + _property(b"Identity", identity))


READY = _ready_command(b"")


def _check_greeting(greeting: memoryview | bytes) -> None:
    """Raises ZmtpError unless ``greeting`` (64 octets) is a ZMTP 3 peer's with the NULL mechanism."""
    if greeting[0] != 0xFF or greeting[9] & 1 == 0:
        raise ZmtpError("the peer does not speak ZMTP 3: no greeting signature")
    if greeting[10] < 3:
        raise ZmtpError(f"the peer speaks ZMTP {greeting[10]}.{greeting[11]}, not 3")
    mechanism = bytes(greeting[12:32]).rstrip(b"\x00")
    if mechanism != b"NULL":
        raise ZmtpError(f"the peer asks for the {mechanism.decode('ascii', 'replace')} mechanism, not NULL")


def _check_ready(body: memoryview) -> None:
    """Raises ZmtpError unless the handshake command ``body`` is a ROUTER's ``READY`` (an ``ERROR``: its reason)."""
    name_size = body[0] if body else 0
    name, data = bytes(body[1 : 1 + name_size]), body[1 + name_size :]
    if name == b"ERROR":
        reason = bytes(data[1 : 1 + data[0]]).decode("utf-8", "replace") if data else ""
        raise ZmtpError(f"the peer refused the connection: {reason or 'no reason given'}")
    if name != b"READY":
        raise ZmtpError(f"the peer sent {name[:32]!r} instead of READY")
    kind = _properties(data).get("socket-type", b"")
    if kind != b"ROUTER":
        raise ZmtpError(f"the peer is a {kind[:32].decode('ascii', 'replace') or '?'} socket, not a ROUTER")


def _properties(data: memoryview) -> dict[str, bytes]:
    """A ``READY`` command's metadata, name -> value.

    Raises:
        ZmtpError: the properties overrun the command.
    """
    found: dict[str, bytes] = {}
    at = 0
    while at < len(data):
        size = data[at]
        name = bytes(data[at + 1 : at + 1 + size])
        at += 1 + size
        if at + 4 > len(data):
            raise ZmtpError("malformed READY from the peer: a property overruns the command")
        (length,) = struct.unpack_from(">I", data, at)
        at += 4
        if at + length > len(data):
            raise ZmtpError("malformed READY from the peer: a property overruns the command")
        found[name.decode("ascii", "replace").lower()] = bytes(data[at : at + length])
        at += length
    return found


class Stream:
    """ZMTP 3.0 NULL as a DEALER on one connected, non-blocking stream socket, without waiting.

    The sans-wait core of :class:`Dealer` (the CLI's blocking-ish client on a Unix socket) and of
    :class:`dpipes.bus.zmtp_tcp.TcpDealer` (a hub's link, driven by its asyncio loop): it queues our
    greeting and ``READY`` at once, and :meth:`recv` completes the peer's half of the handshake
    (:attr:`ready`) before it returns messages. Whoever owns it decides when to read and write.

    Args:
        sock: a connected stream socket, non-blocking.
        identity: the ``Identity`` of our ``READY`` (libzmq's ``ROUTING_ID``): the routing id the
            peer's ROUTER gives this connection.
        max_frame_bytes: the largest frame taken from the peer (libzmq's ``MAXMSGSIZE``).
    """

    def __init__(self, sock: _socket.socket, *, identity: bytes = b"", max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self.ready = False  # the peer's greeting and READY have come: messages may follow
        self._greeted = False
        self._starved = False  # the last recv() found no whole message: what is buffered is a part
        self._data = b""  # bytes received and not yet parsed, from self._at on
        self._at = 0
        self._more: list[bytes] = []  # bytes received that self._data does not hold yet
        self._more_bytes = 0
        self._frames: list[memoryview] = []  # of the message being parsed
        self._flags = -1  # of the frame being parsed; -1: its flags octet is next
        self._size = -1  # of the frame being parsed; -1: its size is next
        hello = GREETING + (READY if not identity else _ready_command(identity))
        # Queued for the socket. A deque: a slow peer can leave many small frames here, and each
        # one sent leaves from the front (a list's pop(0) moved all the others, each time).
        self._out: collections.deque[memoryview] = collections.deque([memoryview(hello)])
        self.queued_bytes = len(hello)  # in self._out

    def fileno(self) -> int:
        return self.sock.fileno()

    def pending(self) -> bool:
        """Whether bytes read with the handshake, or behind the last message, may hold a message.

        The descriptor is level-triggered, and :meth:`recv` reads until it would block: once it
        returned None, what is buffered is part of a frame, and the descriptor tells of the rest.
        """
        return not self._starved and len(self._data) - self._at + self._more_bytes > 0

    # -- the handshake -----------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Read what there is of the peer's greeting and READY; whether all of it has come.

        Raises:
            ZmtpError: the peer is not a NULL ZMTP 3 ROUTER, refused us, or went away.
        """
        if not self._greeted:
            greeting = self._take(GREETING_BYTES)
            if greeting is None:
                return False
            _check_greeting(greeting)
            self._greeted = True
        frame = self._next_frame()
        if frame is None:
            return False
        flags, body = frame
        if not flags & COMMAND:
            raise ZmtpError("the peer sent a message before its READY")
        _check_ready(body)
        self.ready = True
        return True

    # -- sending -----------------------------------------------------------------------------

    def send(self, frames: list[bytes | memoryview]) -> None:
        """Queue one message (its frames in order) and write what the socket takes now.

        Raises:
            ZmtpError: the peer went away.
        """
        self.queue(frames)
        self.flush()

    def queue(self, frames: list[bytes | memoryview]) -> None:
        """Queue one message (its frames in order) without writing it yet."""
        out = self._out
        last = len(frames) - 1
        queued = 0
        for i, frame in enumerate(frames):
            view = memoryview(frame)
            size = view.nbytes
            more = MORE if i < last else 0
            if size > 255:
                out.append(memoryview(bytes([more | LONG]) + size.to_bytes(8, "big")))
                queued += 9
            else:
                out.append(memoryview(bytes([more, size])))
                queued += 2
            if size:
                out.append(view.cast("B") if view.format != "B" or view.ndim != 1 else view)
                queued += size
        self.queued_bytes += queued

    def wants_write(self) -> bool:
        """Whether queued bytes wait for the socket to be writable."""
        return bool(self._out)

    def flush(self) -> bool:
        """Write what the socket takes now of what is queued; whether all of it left.

        Raises:
            ZmtpError: the peer went away.
        """
        out = self._out
        while out:
            try:
                sent = self.sock.sendmsg(list(itertools.islice(out, IOV_MAX)))
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                raise ZmtpClosed(f"the peer went away: {exc.strerror or exc}") from None
            self.queued_bytes -= sent
            while sent:
                head = out[0]
                if sent >= len(head):
                    sent -= len(head)
                    out.popleft()
                else:
                    out[0] = head[sent:]
                    sent = 0
        return True

    # -- receiving ---------------------------------------------------------------------------

    def recv(self) -> list[memoryview] | None:
        """The next whole message's frames, or None when the socket has no more for now.

        Raises:
            ZmtpError: the peer closed the connection, or broke the protocol.
        """
        if not self.ready and not self._handshake():
            self._starved = True
            return None
        while True:
            frame = self._next_frame()
            if frame is None:
                self._starved = True
                return None
            flags, body = frame
            if flags & COMMAND:
                self._on_command(body)
                continue
            self._frames.append(body)
            if len(self._frames) > MAX_MESSAGE_FRAMES:
                raise ZmtpError(f"a message of more than {MAX_MESSAGE_FRAMES} frames from the peer")
            if not flags & MORE:
                frames, self._frames = self._frames, []
                self._starved = False
                return frames

    def _next_frame(self) -> tuple[int, memoryview] | None:
        """The next whole frame's flags and body, or None until all of it has come."""
        if self._flags < 0:
            head = self._take(1)
            if head is None:
                return None
            self._flags = head[0]
        if self._size < 0:
            size = self._take(8 if self._flags & LONG else 1)
            if size is None:
                return None
            self._size = struct.unpack(">Q", size)[0] if self._flags & LONG else size[0]
            if self._size > self.max_frame_bytes:
                raise ZmtpError(f"a frame of {self._size} bytes from the peer is over the limit")
        body = self._take(self._size)
        if body is None:
            return None
        flags = self._flags
        self._flags = self._size = -1
        return flags, body

    def _on_command(self, body: memoryview) -> None:
        name_size = body[0] if body else 0
        name = bytes(body[1 : 1 + name_size])
        if name == b"PING":  # ZMTP 3.1: TTL (2 octets), then the context to echo
            pong = _command(b"PONG", bytes(body[1 + name_size + 2 :][:16]))
            self._out.append(memoryview(pong))
            self.queued_bytes += len(pong)
            self.flush()
        elif name == b"ERROR":
            data = body[1 + name_size :]
            reason = bytes(data[1 : 1 + data[0]]).decode("utf-8", "replace") if data else ""
            raise ZmtpError(f"the peer closed the connection: {reason or 'an error'}")

    def _take(self, n: int) -> memoryview | None:
        """The next ``n`` bytes of the stream, reading what is there; None until all have come.

        Complete messages are sliced out of the bytes one ``recv`` returned, without a copy; only
        a frame split between reads is joined, once, when its last byte has come.
        """
        have = len(self._data) - self._at
        while have + self._more_bytes < n:
            try:
                chunk = self.sock.recv(max(READ_CHUNK_BYTES, n - have - self._more_bytes))
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                raise ZmtpClosed(f"the peer went away: {exc.strerror or exc}") from None
            if not chunk:
                raise ZmtpClosed("the peer closed the connection")
            self._more.append(chunk)
            self._more_bytes += len(chunk)
        if self._more:
            self._data = b"".join([memoryview(self._data)[self._at :], *self._more])
            self._at = 0
            self._more.clear()
            self._more_bytes = 0
        view = memoryview(self._data)[self._at : self._at + n]
        self._at += n
        return view


class Dealer(Stream):
    """One DEALER connected to a ROUTER at an ``ipc://`` path: whole messages in and out.

    Args:
        path: the Unix socket's path (an ``ipc://`` endpoint without its scheme).
        timeout_s: how long connecting and the handshake may take.

    Raises:
        OSError: nothing accepts connections at ``path``.
        ZmtpError: what answered is not a ZMTP 3 ROUTER with the NULL mechanism, or refused us.
        TimeoutError: the handshake did not finish within ``timeout_s``.
    """

    def __init__(self, path: str, *, timeout_s: float) -> None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)  # close-on-exec, as every socket
        try:
            deadline = time.monotonic() + timeout_s
            sock.settimeout(timeout_s)
            sock.connect(path)
            sock.setblocking(False)
            super().__init__(sock)
            while not (self.flush() and self._handshake()):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no ZMTP handshake from the peer in time")
                _wait(sock.fileno(), left, writable=self.wants_write())
        except BaseException:
            sock.close()
            raise

    # -- closing -----------------------------------------------------------------------------

    def close(self, linger_s: float = 0.0) -> None:
        """Write what is queued for at most ``linger_s`` (ZeroMQ's ``LINGER``), then close."""
        deadline = time.monotonic() + linger_s
        try:
            while not self.flush():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                _wait(self.sock.fileno(), left, writable=True)
        except ZmtpError:
            pass  # the peer is gone: nothing more can be delivered
        finally:
            self.sock.close()


def _wait(fd: int, timeout_s: float, *, writable: bool) -> None:
    """Block until ``fd`` is readable (or writable, when asked), or ``timeout_s`` has passed."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN | (select.POLLOUT if writable else 0))
    poller.poll(max(1, int(timeout_s * 1000)))
