"""The plain-Python ZMTP DEALER (dpipes.bus.zmtp) against libzmq's ROUTER, a refusing ZAP handler,
and a hand-written peer that sends what libzmq never would."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from dpipes.bus.zmtp import Connection, ZmtpError

TIMEOUT_S = 10.0
MAX_FRAME = 1 << 20


def wait_for(conn: Connection, count: int = 1) -> list[list[bytes]]:
    """Poll ``conn`` until ``count`` messages arrived (bounded by TIMEOUT_S)."""
    import select

    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    got = conn.recv()  # what came with the handshake first
    while len(got) < count:
        assert poller.poll(int(TIMEOUT_S * 1000)), f"only {len(got)} of {count} messages arrived"
        got += conn.recv()
    return got


@pytest.fixture
def router(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], str]]:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(TIMEOUT_S * 1000))  # a test that fails must not hang
    path = f"{tmp_path}/r.sock"
    sock.bind(f"ipc://{path}")
    yield sock, path
    sock.close()
    ctx.term()


def test_messages_both_ways_with_libzmq(router: tuple[zmq.Socket[bytes], str]) -> None:
    sock, path = router
    conn = Connection(path, max_frame_bytes=MAX_FRAME, timeout=TIMEOUT_S)
    try:
        big = bytes(range(256)) * 1024  # a LONG frame
        conn.send([b"head", b"", big])
        ident, *frames = sock.recv_multipart()
        assert frames == [b"head", b"", big]
        sock.send_multipart([ident, b"one"])
        sock.send_multipart([ident, b"two", big, b""])
        assert wait_for(conn, 2) == [[b"one"], [b"two", big, b""]]
    finally:
        conn.close()


def test_a_zap_refusal_is_raised_with_its_reason(tmp_path: Path) -> None:
    ctx = zmq.Context()
    zap = ctx.socket(zmq.REP)  # the ZAP handler (RFC 27) of this context, before anything binds
    zap.setsockopt(zmq.LINGER, 0)
    zap.bind("inproc://zeromq.zap.01")
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ZAP_DOMAIN, b"test")  # ZAP for NULL connections too, as the hub does on ipc
    sock.bind(f"ipc://{tmp_path}/r.sock")

    def deny() -> None:
        request = zap.recv_multipart()  # version, request id, domain, address, identity, mechanism
        zap.send_multipart([b"1.0", request[1], b"400", b"not you", b"", b""])

    thread = threading.Thread(target=deny, daemon=True)
    thread.start()
    try:
        with pytest.raises(ZmtpError, match="refused the connection"):
            Connection(f"{tmp_path}/r.sock", max_frame_bytes=MAX_FRAME, timeout=TIMEOUT_S)
    finally:
        thread.join(TIMEOUT_S)
        sock.close()
        zap.close()
        ctx.term()


def test_nothing_listening_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ZmtpError, match="no ZMTP peer"):
        Connection(f"{tmp_path}/none.sock", max_frame_bytes=MAX_FRAME, timeout=TIMEOUT_S)


# -- a hand-written peer -------------------------------------------------------------------------

_READY_BODY = b"\x05READY\x0bSocket-Type" + struct.pack(">I", 6) + b"ROUTER"
READY = bytes((0x04, len(_READY_BODY))) + _READY_BODY
GREETING = b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"NULL".ljust(20, b"\x00") + bytes(32)


def frame(data: bytes, *, more: bool = False) -> bytes:
    flags = 0x01 if more else 0
    if len(data) > 255:
        return bytes((flags | 0x02,)) + struct.pack(">Q", len(data)) + data
    return bytes((flags, len(data))) + data


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[str, list[bytes]]]:
    """A Unix socket server that greets, says READY, then writes each chunk put in its list."""
    path = f"{tmp_path}/p.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    chunks: list[bytes] = []

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(GREETING + READY)
            for chunk in chunks:
                conn.sendall(chunk)
            conn.settimeout(TIMEOUT_S)
            try:
                while conn.recv(65536):  # until the client closes
                    pass
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, chunks
    thread.join(TIMEOUT_S)
    server.close()


@pytest.mark.parametrize(
    ("stream", "problem"),
    [
        (b"\xf0\x01x", "flags"),  # bits no ZMTP frame has
        (b"\x02" + struct.pack(">Q", MAX_FRAME + 1), "over"),  # a size past the bound, never allocated
    ],
)
def test_a_broken_peer_is_an_error_not_a_crash(peer: tuple[str, list[bytes]], stream: bytes, problem: str) -> None:
    path, chunks = peer
    chunks.append(stream)
    conn = Connection(path, max_frame_bytes=MAX_FRAME, timeout=TIMEOUT_S)
    with pytest.raises(ZmtpError, match=problem):
        wait_for(conn)
    conn.close()


messages = st.lists(st.lists(st.binary(max_size=600), min_size=1, max_size=4), min_size=1, max_size=6)


@given(messages=messages, cuts=st.lists(st.integers(min_value=1, max_value=4000), max_size=8))
def test_messages_survive_any_split_of_the_stream(tmp_path_factory: pytest.TempPathFactory, messages: list[list[bytes]],
                                                   cuts: list[int]) -> None:  # fmt: skip
    wire = b"".join(frame(f, more=i < len(m) - 1) for m in messages for i, f in enumerate(m))
    wire += b"\x04\x07\x04PING\x00\x00"  # a heartbeat among them: answered, not delivered
    pieces, start = [], 0
    for cut in sorted(cuts):
        pieces.append(wire[start:cut])
        start = max(start, cut)
    pieces.append(wire[start:])
    path = f"{tmp_path_factory.mktemp('z')}/p.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(GREETING + READY)
            for piece in pieces:
                conn.sendall(piece)
            conn.settimeout(TIMEOUT_S)
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    conn = Connection(path, max_frame_bytes=MAX_FRAME, timeout=TIMEOUT_S)
    try:
        assert wait_for(conn, len(messages)) == messages
    finally:
        conn.close()
        thread.join(TIMEOUT_S)
        server.close()
