"""A ZeroMQ DEALER over a Unix socket in plain Python: ZMTP 3.0 with the NULL mechanism.

The short client path (:mod:`dpipes.nodes.local_run`) talks to its hub's ROUTER over ``ipc://``
through this instead of pyzmq, whose import alone costs a short run about as much as the rest of
the client. It speaks what libzmq's ROUTER expects of a peer DEALER (ZMTP 3.0, rfc.zeromq.org/
spec/23; commands as in spec/37) and nothing more:

* the greeting: signature ``FF 00*8 7F``, version 3.0, mechanism ``NULL``, as-server 0, filler;
  the peer's is read back and must say version 3 or later and ``NULL``;
* the handshake: our ``READY`` with ``Socket-Type: DEALER`` (and an empty ``Identity``), then the
  peer's ``READY``, or its ``ERROR`` (a ZAP handler refused us: the reason is raised);
* traffic: frames (flags ``MORE`` 0x01, ``LONG`` 0x02, ``COMMAND`` 0x04; a one- or eight-byte
  big-endian size), a message being the frames up to one without ``MORE``; a ``PING`` command is
  answered with ``PONG`` (ZMTP 3.1 heartbeats, should a peer send them), other commands ignored.

A frame over ``max_frame_bytes`` or a flags byte with unknown bits is a broken peer: the
connection is closed and :class:`ZmtpError` raised; nothing read off the socket is trusted
beyond those bounds. Sends block (a local hub reads at once); :meth:`Connection.recv` never
blocks: call it once before polling :meth:`Connection.fileno` (bytes that came with the
handshake are already read), and again each time it polls readable.
"""

from __future__ import annotations

import socket
import struct

from dpipes.bus.errors import BusError

__all__ = ["Connection", "ZmtpError"]

_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
_MORE, _LONG, _COMMAND = 0x01, 0x02, 0x04
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
RECV_CHUNK_BYTES = 1 << 20  # one recv takes up to this much; a 1 MiB message in one system call
MAX_COMMAND_BYTES = 64 * 1024  # a handshake command (READY, ERROR) larger than this is malformed


class ZmtpError(BusError, ConnectionError):
    """The peer broke ZMTP, refused us in its handshake, or went away."""


def _frame_header(flags: int, size: int) -> bytes:
    if size <= 255:
        return bytes((flags, size))
    return bytes((flags | _LONG,)) + _U64.pack(size)


def _command(name: bytes, body: bytes = b"") -> bytes:
    data = bytes((len(name),)) + name + body
    return _frame_header(_COMMAND, len(data)) + data


def _property(name: bytes, value: bytes) -> bytes:
    return bytes((len(name),)) + name + _U32.pack(len(value)) + value


class Connection:
    """One DEALER connection to the ROUTER listening at a Unix socket ``path``.

    Args:
        max_frame_bytes: the largest frame it accepts (the bus's ``MAX_FRAME_BYTES``).
    """

    def __init__(self, path: str, *, max_frame_bytes: int, timeout: float) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = bytearray()
        self._frames: list[bytes] = []  # of the message being received
        self._closed = False
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(path)
            self._handshake()
            self._sock.setblocking(False)
        except OSError as exc:
            self.close()
            raise ZmtpError(f"no ZMTP peer at {path}: {exc.strerror or exc}") from None
        except ZmtpError:
            self.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def _read_exactly(self, size: int) -> bytes:
        while len(self._buf) < size:
            data = self._sock.recv(max(size - len(self._buf), 4096))
            if not data:
                raise ZmtpError("the peer closed the connection during the handshake")
            self._buf += data
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out

    def _handshake(self) -> None:
        self._sock.sendall(_GREETING[:11])  # signature and major version first, as the spec allows
        peer = self._read_exactly(11)
        if peer[0] != 0xFF or peer[9] != 0x7F or peer[10] < 3:
            raise ZmtpError("the peer does not speak ZMTP 3")
        self._sock.sendall(_GREETING[11:])
        rest = self._read_exactly(53)
        if rest[1:21].rstrip(b"\x00") != b"NULL":
            raise ZmtpError(f"the peer asks for mechanism {rest[1:21].rstrip(bytes(1))!r}, not NULL")
        ready = _property(b"Socket-Type", b"DEALER") + _property(b"Identity", b"")
        self._sock.sendall(_command(b"READY", ready))
        flags = self._read_exactly(1)[0]
        size = _U64.unpack(self._read_exactly(8))[0] if flags & _LONG else self._read_exactly(1)[0]
        if not flags & _COMMAND or size > MAX_COMMAND_BYTES:
            raise ZmtpError("the peer sent no handshake command")
        body = self._read_exactly(size)
        name = body[1 : 1 + body[0]] if body else b""
        if name == b"ERROR":
            reason = body[7 : 7 + body[6]].decode("utf-8", "replace") if len(body) > 6 else ""
            raise ZmtpError(f"the peer refused the connection: {reason or 'no reason given'}")
        if name != b"READY":
            raise ZmtpError(f"the peer answered the handshake with {name!r}")

    def send(self, frames: list[bytes | bytearray | memoryview]) -> None:
        """Send one message (blocking until the kernel took it)."""
        last = len(frames) - 1
        parts: list[bytes | bytearray | memoryview] = []
        for i, frame in enumerate(frames):
            size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
            parts += (_frame_header(_MORE if i < last else 0, size), frame)
        self._sendall(parts)

    def _sendall(self, parts: list[bytes | bytearray | memoryview]) -> None:
        if self._closed:
            raise ZmtpError("the connection is closed")
        self._sock.setblocking(True)
        try:
            views = [memoryview(p).cast("B") for p in parts]
            while views:
                sent = self._sock.sendmsg(views[:64])
                while views and sent >= views[0].nbytes:
                    sent -= views[0].nbytes
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except OSError as exc:
            self.close()
            raise ZmtpError(f"the peer went away: {exc.strerror or exc}") from None
        finally:
            if not self._closed:
                self._sock.setblocking(False)

    def recv(self) -> list[list[bytes]]:
        """Every whole message that arrived (each a list of frames); ``[]`` when none did.

        Raises:
            ZmtpError: the peer closed the connection or broke the protocol.
        """
        try:
            data = self._sock.recv(RECV_CHUNK_BYTES)
        except (BlockingIOError, InterruptedError):
            data = None  # nothing new; what came with the handshake may still hold messages
        except OSError as exc:
            self.close()
            raise ZmtpError(f"the peer went away: {exc.strerror or exc}") from None
        if data == b"":
            self.close()
            raise ZmtpError("the peer closed the connection")
        if data:
            self._buf += data
        return self._messages() if self._buf else []

    def _messages(self) -> list[list[bytes]]:
        buf, pos, out = self._buf, 0, []
        while len(buf) - pos >= 2:
            flags = buf[pos]
            if flags & ~(_MORE | _LONG | _COMMAND):
                self.close()
                raise ZmtpError(f"the peer sent a frame with flags {flags:#x}")
            if flags & _LONG:
                if len(buf) - pos < 9:
                    break
                size, start = _U64.unpack_from(buf, pos + 1)[0], pos + 9
            else:
                size, start = buf[pos + 1], pos + 2
            if size > self.max_frame_bytes:
                self.close()
                raise ZmtpError(f"the peer sent a frame of {size} bytes, over {self.max_frame_bytes}")
            if len(buf) - start < size:
                break
            frame = bytes(buf[start : start + size])
            pos = start + size
            if flags & _COMMAND:
                if frame[:5] == b"\x04PING":  # ZMTP 3.1 heartbeat: echo its context back
                    self._sendall([_command(b"PONG", frame[7:])])
                continue
            self._frames.append(frame)
            if not flags & _MORE:
                out.append(self._frames)
                self._frames = []
        del buf[:pos]
        return out

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._closed = True
        self._sock.close()
