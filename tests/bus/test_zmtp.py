"""dpipes.bus.zmtp against libzmq itself (a pyzmq ROUTER on ipc://), and against raw peers that
break the protocol: what a real hub sends arrives whole, what is not ZMTP is refused with a coded
error, never a traceback from deep in a parser."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from dpipes.bus import zmtp
from dpipes.bus.zmtp import Dealer, ZmtpError

WAIT_S = 10.0


@pytest.fixture
def router(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], str]]:
    """A libzmq ROUTER bound at an ipc:// path, as a hub's; yields it and the path."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))  # a lost message fails the test, not hangs it
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    path = str(tmp_path / "hub.sock")
    sock.bind(f"ipc://{path}")
    try:
        yield sock, path
    finally:
        sock.close()
        ctx.term()


def recv_whole(dealer: Dealer) -> list[bytes]:
    """The next message, waiting for it (bounded)."""
    for _ in range(10_000):
        got = dealer.recv()
        if got is not None:
            return [bytes(frame) for frame in got]
        ready = select.select([dealer.fileno()], [dealer.fileno()] if dealer.wants_write() else [], [], WAIT_S)
        assert ready != ([], [], []), "no message within the wait"
        dealer.flush()
    raise AssertionError("no whole message")


def test_messages_both_ways_with_a_libzmq_router(router: tuple[zmq.Socket[bytes], str]) -> None:
    sock, path = router
    dealer = Dealer(path, timeout_s=WAIT_S)
    try:
        sent = [b"header", b"", b"x" * 255, b"y" * 256, os.urandom(3 << 20)]  # short, empty, LONG frames
        dealer.send(list(sent))
        while not dealer.flush():  # 3 MiB is more than the socket takes at once
            select.select([], [dealer.fileno()], [], WAIT_S)
        ident, *frames = sock.recv_multipart()
        assert frames == sent
        sock.send_multipart([ident, *sent])
        assert recv_whole(dealer) == sent
        for i in range(200):  # many small ones, in order
            sock.send_multipart([ident, b"%d" % i])
        assert [recv_whole(dealer) for _ in range(200)] == [[b"%d" % i] for i in range(200)]
    finally:
        dealer.close(linger_s=1.0)


def test_close_delivers_what_was_queued(router: tuple[zmq.Socket[bytes], str]) -> None:
    sock, path = router
    dealer = Dealer(path, timeout_s=WAIT_S)
    last = os.urandom(4 << 20)
    dealer.send([b"bye", last])
    dealer.close(linger_s=WAIT_S)  # ZeroMQ's LINGER: what was sent leaves before the socket closes
    assert sock.recv_multipart()[1:] == [b"bye", last]


@settings(max_examples=50)
@given(
    st.lists(st.lists(st.binary(max_size=300), min_size=1, max_size=4), min_size=1, max_size=6),
    st.integers(min_value=1, max_value=7),
)
def test_any_messages_arrive_as_sent_however_the_stream_is_cut(messages: list[list[bytes]], cut: int) -> None:
    """A raw peer writes the encoded stream a few bytes at a time: frames split anywhere come whole."""
    stream = b"".join(_encode(frames) for frames in messages)
    with _raw_peer(lambda conn: _trickle(conn, stream, cut)) as path:
        dealer = Dealer(path, timeout_s=WAIT_S)
        try:
            assert [recv_whole(dealer) for _ in messages] == messages
        finally:
            dealer.close()


def test_a_ping_is_answered_with_pong() -> None:
    answers: list[bytes] = []

    def peer(conn: socket.socket) -> None:
        conn.sendall(zmtp._command(b"PING", b"\x00\x0a" + b"ctx1"))
        conn.sendall(_encode([b"after"]))
        answers.append(_read_exactly(conn, 2 + 1 + 4 + 4))

    with _raw_peer(peer) as path:
        dealer = Dealer(path, timeout_s=WAIT_S)
        try:
            assert recv_whole(dealer) == [b"after"]
        finally:
            dealer.close(linger_s=1.0)
    assert answers == [zmtp._command(b"PONG", b"ctx1")]


@pytest.mark.parametrize(
    ("greeting", "error"),
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n".ljust(64, b"\x00"), "no greeting signature"),
        (zmtp.SIGNATURE + b"\x02\x00" + b"\x00" * 52, "speaks ZMTP 2.0, not 3"),
        (zmtp.GREETING[:12] + b"CURVE".ljust(20, b"\x00") + zmtp.GREETING[32:], "CURVE mechanism"),
    ],
    ids=["not-zmtp", "old-version", "curve"],
)
def test_a_peer_that_is_not_a_null_zmtp3_router_is_refused(greeting: bytes, error: str) -> None:
    def peer(conn: socket.socket) -> None:
        _read_exactly(conn, 64 + len(zmtp.READY))
        conn.sendall(greeting)
        _read_exactly(conn, 1)  # until the client hangs up

    with _raw_peer(peer, greeting=False) as path:
        with pytest.raises(ZmtpError, match=error):
            Dealer(path, timeout_s=WAIT_S)


def test_a_dealer_is_not_a_router() -> None:
    def peer(conn: socket.socket) -> None:
        _read_exactly(conn, 64 + len(zmtp.READY))
        conn.sendall(zmtp.GREETING + zmtp._command(b"READY", zmtp._property(b"Socket-Type", b"DEALER")))
        _read_exactly(conn, 1)

    with _raw_peer(peer, greeting=False) as path:
        with pytest.raises(ZmtpError, match="DEALER socket, not a ROUTER"):
            Dealer(path, timeout_s=WAIT_S)


def test_libzmq_refusing_us_as_its_peer_is_a_coded_error(tmp_path: Path) -> None:
    """A PUB takes no DEALER: libzmq hangs up during the handshake."""
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(f"ipc://{tmp_path}/pub.sock")
    try:
        with pytest.raises(ZmtpError):
            Dealer(f"{tmp_path}/pub.sock", timeout_s=WAIT_S)
    finally:
        pub.close()
        ctx.term()


def test_a_refusal_by_the_hubs_zap_handler_names_its_reason(tmp_path: Path) -> None:
    """A hub's ZAP handler refuses a peer of another uid: libzmq sends ERROR, we raise it."""
    ctx = zmq.Context()
    zap = ctx.socket(zmq.REP)
    zap.setsockopt(zmq.LINGER, 0)
    zap.bind("inproc://zeromq.zap.01")
    hub = ctx.socket(zmq.ROUTER)
    hub.setsockopt(zmq.LINGER, 0)
    hub.setsockopt(zmq.ZAP_DOMAIN, b"dpipes")
    hub.bind(f"ipc://{tmp_path}/hub.sock")

    def refuse() -> None:
        if zap.poll(int(WAIT_S * 1000)):
            version, request_id, *_ = zap.recv_multipart()
            zap.send_multipart([version, request_id, b"400", b"not this node's user", b"", b""])

    thread = threading.Thread(target=refuse)
    thread.start()
    try:
        with pytest.raises(ZmtpError, match="refused the connection"):
            Dealer(f"{tmp_path}/hub.sock", timeout_s=WAIT_S)
    finally:
        thread.join()
        hub.close()
        zap.close()
        ctx.term()


def test_a_silent_peer_times_out() -> None:
    done = threading.Event()
    with _raw_peer(lambda conn: done.wait(WAIT_S), greeting=False) as path:
        try:
            with pytest.raises(TimeoutError):
                Dealer(path, timeout_s=0.2)
        finally:
            done.set()


def test_nothing_listening_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Dealer(str(tmp_path / "none.sock"), timeout_s=WAIT_S)


# -- a raw peer: a Unix socket server speaking (or not) the protocol by hand --------------------


def _encode(frames: list[bytes]) -> bytes:
    out = b""
    for i, frame in enumerate(frames):
        more = zmtp.MORE if i < len(frames) - 1 else 0
        if len(frame) > 255:
            out += bytes([more | zmtp.LONG]) + struct.pack(">Q", len(frame)) + frame
        else:
            out += bytes([more, len(frame)]) + frame
    return out


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = conn.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _trickle(conn: socket.socket, data: bytes, cut: int) -> None:
    for i in range(0, len(data), cut):
        conn.sendall(data[i : i + cut])


@contextlib.contextmanager
def _raw_peer(act: Callable[[socket.socket], object], *, greeting: bool = True) -> Iterator[str]:
    """A Unix socket server at a fresh path that accepts one connection; with ``greeting`` it does
    a ROUTER's side of the NULL handshake by hand; then ``act(conn)``, then it closes. Yields the path."""
    with tempfile.TemporaryDirectory(prefix="dpipes-zmtp-") as tmp:
        path = os.path.join(tmp, "peer.sock")
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(1)
        server.settimeout(WAIT_S)

        def serve() -> None:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(WAIT_S)
                if greeting:
                    _read_exactly(conn, 64 + len(zmtp.READY))  # the client's greeting and READY
                    conn.sendall(zmtp.GREETING + zmtp._command(b"READY", zmtp._property(b"Socket-Type", b"ROUTER")))
                with contextlib.suppress(OSError):  # the client may close first
                    act(conn)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            yield path
        finally:
            thread.join(WAIT_S)
            server.close()


@pytest.mark.parametrize(
    "sent, reason",
    [
        (bytes([zmtp.LONG]) + struct.pack(">Q", zmtp.MAX_FRAME_BYTES + 1), "over the limit"),  # before it is read
        (_encode([b"f"] * (zmtp.MAX_MESSAGE_FRAMES + 1)), "more than"),
        (_encode([b"one"])[:-1], "closed the connection"),  # a frame cut short, then the peer hangs up
    ],
    ids=["frame-past-the-limit", "too-many-frames", "peer-hangs-up"],
)
def test_a_hostile_or_broken_peer_is_a_coded_error(sent: bytes, reason: str) -> None:
    with _raw_peer(lambda conn: conn.sendall(sent)) as path:
        dealer = Dealer(path, timeout_s=WAIT_S)
        try:
            with pytest.raises(ZmtpError, match=reason):
                recv_whole(dealer)
        finally:
            dealer.close()
