"""dpipes.bus.zmtp_tcp, a hub's link without libzmq's I/O thread, against libzmq's own ROUTER and
against raw TCP peers that break ZMTP; and the hub's links through it (restart, garbage, leaks)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import zmq

from dpipes.bus import zmtp, zmtp_tcp
from dpipes.bus.hub import Hub
from dpipes.bus.pump import Pump
from dpipes.bus.zmtp_tcp import TcpDealer, tcp_address

WAIT_S = 10.0  # the bound on every wait for the network in these tests


async def until(condition: Any, timeout: float = WAIT_S) -> None:
    """Poll ``condition()`` until true, failing the test after ``timeout``."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


class Router:
    """A libzmq ROUTER on the loop, recording what arrives and echoing when asked."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str = "tcp://127.0.0.1:0", *, echo: bool = False) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.got: list[list[bytes]] = []
        self.echo = echo
        self.pump = Pump(self.sock, self._on_message, routed=True)

    def _on_message(self, frames: list[Any]) -> None:
        message = [frames[0], *(f.bytes for f in frames[1:])]
        self.got.append(message)
        if self.echo:
            self.pump.send(message)

    def close(self) -> None:
        self.pump.close()


@contextlib.asynccontextmanager
async def zmq_context() -> AsyncIterator[zmq.Context[Any]]:
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        yield ctx
    finally:
        ctx.term()


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def raw_listener() -> Iterator[tuple[socket.socket, str]]:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield listener, f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_endpoints_it_takes_and_leaves_to_libzmq() -> None:
    assert tcp_address("tcp://127.0.0.1:5555") == ("127.0.0.1", 5555)
    assert tcp_address("tcp://[::1]:5555") == ("::1", 5555)
    assert tcp_address("tcp://host.example:1") == ("host.example", 1)
    for other in ("ipc:///tmp/x", "tcp://*:5555", "tcp://127.0.0.1:0", "tcp://127.0.0.1", "tcp://a;b:1", "tcp://:1"):
        assert tcp_address(other) is None, other


async def test_a_libzmq_router_sees_our_routing_id_and_answers_in_order() -> None:
    async with zmq_context() as ctx:
        router = Router(ctx, echo=True)
        got: list[list[bytes]] = []
        dealer = TcpDealer(router.endpoint, lambda frames: got.append([bytes(f) for f in frames]), routing_id=b"us")
        try:
            for i in range(100):  # sent before the connection is up: they wait, in order
                dealer.send([b"h", str(i).encode()])
            await until(lambda: len(got) == 100)
            assert [m[1] for m in got] == [str(i).encode() for i in range(100)]
            assert {m[0] for m in router.got} == {b"us"}
            assert dealer.connects == 1 and dealer.backlog == 0
        finally:
            dealer.close()
            router.close()


async def test_a_host_name_is_resolved_without_blocking_the_loop() -> None:
    async with zmq_context() as ctx:
        router = Router(ctx)
        port = router.endpoint.rsplit(":", 1)[1]
        dealer = TcpDealer(f"tcp://localhost:{port}", lambda frames: None, routing_id=b"us")
        try:
            dealer.send([b"by name"])
            await until(lambda: router.got == [[b"us", b"by name"]])
        finally:
            dealer.close()
            router.close()


async def test_after_the_peer_restarts_the_link_delivers_again() -> None:
    async with zmq_context() as ctx:
        router = Router(ctx)
        endpoint = router.endpoint
        dealer = TcpDealer(endpoint, lambda frames: None, routing_id=b"us")
        try:
            dealer.send([b"before"])
            await until(lambda: router.got == [[b"us", b"before"]])
            router.close()
            await until(lambda: not dealer.connected)  # the peer's close is noticed
            dealer.send([b"while away"])  # waits for the next connection, as with IMMEDIATE
            assert dealer.backlog == 1
            router = Router(ctx, endpoint)  # the same port: the peer restarted
            await until(lambda: router.got == [[b"us", b"while away"]])
            assert dealer.connects == 2
        finally:
            dealer.close()
            router.close()


async def test_many_messages_arrive_in_order_through_partial_writes_and_the_backlog(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(zmtp_tcp, "SEND_QUEUE_BYTES", 1 << 20)  # the safety bound, reached at once
    payload = os.urandom(256 * 1024)
    count = 400  # 100 MiB: far more than the kernel's socket buffers take at once
    async with zmq_context() as ctx:
        router = Router(ctx)
        dealer = TcpDealer(router.endpoint, lambda frames: None, routing_id=b"us")
        try:
            await until(lambda: dealer.connected)
            most_waiting = 0
            for i in range(count):
                dealer.send([struct.pack(">I", i), payload])
                most_waiting = max(most_waiting, dealer.backlog)
            assert most_waiting > 0  # the bound held messages back rather than queueing their bytes
            await asyncio.wait_for(dealer.drained(), WAIT_S)
            await until(lambda: len(router.got) == count)
            assert [struct.unpack(">I", m[1])[0] for m in router.got] == list(range(count))
            assert all(m[2] == payload for m in router.got)
        finally:
            dealer.close()
            router.close()


async def test_large_messages_of_one_pass_leave_in_one_write_and_small_ones_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[int] = []  # bytes queued at each flush
    flush = zmtp.Stream.flush

    def counted(stream: zmtp.Stream) -> bool:
        writes.append(stream.queued_bytes)
        return flush(stream)

    monkeypatch.setattr(zmtp.Stream, "flush", counted)
    payload = os.urandom(zmtp_tcp.COALESCE_BYTES)
    async with zmq_context() as ctx:
        router = Router(ctx)
        dealer = TcpDealer(router.endpoint, lambda frames: None, routing_id=b"us")
        try:
            await until(lambda: dealer.connected)
            writes.clear()
            for i in range(4):
                dealer.send([struct.pack(">I", i), payload])
            assert writes == []  # they wait for the loop's next pass
            await asyncio.wait_for(dealer.drained(), WAIT_S)
            assert writes[0] >= 4 * len(payload)  # and leave together
            writes.clear()
            dealer.send([struct.pack(">I", 4), b"small"])
            assert writes  # a small message is written at once
            dealer.send([struct.pack(">I", 5), payload])
            dealer.close(linger_ms=int(WAIT_S * 1000))  # a write left for the next pass is not lost
            assert dealer._soon is None
            await until(lambda: len(router.got) == 6)
            assert [struct.unpack(">I", m[1])[0] for m in router.got] == list(range(6))
            assert router.got[5][2] == payload and router.got[4][2] == b"small"
        finally:
            dealer.close()
            router.close()


async def test_a_link_to_this_host_bounds_its_send_buffer() -> None:
    async with zmq_context() as ctx:
        router = Router(ctx)
        dealer = TcpDealer(router.endpoint, lambda frames: None, routing_id=b"us")
        try:
            await until(lambda: dealer.connected)
            assert dealer._sock is not None
            size = dealer._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            assert size in (zmtp_tcp.LOCAL_SNDBUF_BYTES, 2 * zmtp_tcp.LOCAL_SNDBUF_BYTES)  # Linux doubles it
        finally:
            dealer.close()
            router.close()


async def test_a_refused_connect_is_retried_with_backoff_until_the_peer_listens() -> None:
    with raw_listener() as (_listener, endpoint):
        pass  # a port nothing listens on (now)
    dealer = TcpDealer(endpoint, lambda frames: None, routing_id=b"us")
    try:
        dealer.send([b"first"])
        await until(lambda: dealer._interval_s >= 4 * zmtp_tcp.RECONNECT_IVL_S)  # refused, twice or more
        async with zmq_context() as ctx:
            try:
                router = Router(ctx, endpoint)
            except zmq.ZMQError:
                pytest.skip("another process took the ephemeral port meanwhile")
            try:
                await until(lambda: router.got == [[b"us", b"first"]])
            finally:
                router.close()
    finally:
        dealer.close()


def _garbage_peer(listener: socket.socket, accepted: list[int], stop: threading.Event) -> None:
    """Accept connections and answer each with an HTTP error instead of a ZMTP greeting."""
    listener.settimeout(0.05)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        accepted.append(1)
        with conn:
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n".ljust(64, b"\x00"))
            conn.settimeout(1.0)
            with contextlib.suppress(OSError):
                conn.recv(4096)


async def test_a_garbage_peer_is_refused_counted_and_retried_without_a_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dpipes")
    with raw_listener() as (listener, endpoint):
        accepted: list[int] = []
        stop = threading.Event()
        peer = threading.Thread(target=_garbage_peer, args=(listener, accepted, stop), daemon=True)
        peer.start()
        try:
            async with Hub("alpha") as hub:
                hub.add_peer(endpoint)
                await until(lambda: len(accepted) >= 3 and hub.stats[endpoint].bad >= 3)  # reconnects
                assert not hub.peers
                async with Hub("beta") as other:  # and the hub goes on serving
                    assert await hub.connect_peer(other.tcp_endpoint, timeout=WAIT_S) == "beta"
        finally:
            stop.set()
            peer.join(WAIT_S)
    assert "no greeting signature" in hub.stats[endpoint].last_error
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "bad message" in r.getMessage()]
    assert len(warnings) == 1  # the first of the interval; the rest at debug
    assert not [r for r in caplog.records if r.exc_info]


async def test_a_frame_over_the_limit_drops_the_connection_before_it_is_read() -> None:
    errors: list[zmtp.ZmtpError] = []
    with raw_listener() as (listener, endpoint):
        dealer = TcpDealer(
            endpoint, lambda frames: None, routing_id=b"us", on_error=errors.append, max_frame_bytes=1024
        )
        try:
            conn, _ = await asyncio.get_running_loop().sock_accept(listener)
            with conn:
                ready = zmtp._command(b"READY", zmtp._property(b"Socket-Type", b"ROUTER"))
                conn.sendall(zmtp.GREETING + ready + bytes([zmtp.LONG]) + struct.pack(">Q", 1 << 40))
                await until(lambda: errors)
            assert "over the limit" in str(errors[0]) and dealer.errors == 1
            assert not dealer.connected
        finally:
            dealer.close()


async def test_closing_leaves_no_descriptor_callback_or_task_behind() -> None:
    tasks = asyncio.all_tasks()
    async with zmq_context() as ctx:
        router = Router(ctx, echo=True)
        try:
            before = open_fds()
            got: list[Any] = []
            connected = TcpDealer(router.endpoint, got.append, routing_id=b"a")
            connected.send([b"x"])
            await until(lambda: got)
            with raw_listener() as (_listener, endpoint):
                pass
            retrying = TcpDealer(endpoint, got.append, routing_id=b"b")  # refused: a retry is pending
            await until(lambda: retrying._retry is not None)
            connected.close(linger_ms=100)
            retrying.close()
            retrying.close()  # idempotent
            assert retrying._retry is None and connected._stream is None
            await until(lambda: open_fds() == before)  # libzmq closes its end when it notices ours
            assert asyncio.all_tasks() == tasks
            await asyncio.sleep(3 * zmtp_tcp.RECONNECT_IVL_S)  # nothing reconnects after close
            assert open_fds() == before and len(got) == 1
        finally:
            router.close()


async def test_hub_links_without_keys_use_it_and_a_restarted_peer_is_linked_again() -> None:
    async with Hub("alpha") as a:
        async with Hub("beta") as b:
            endpoint = b.tcp_endpoint
            assert await a.connect_peer(endpoint, timeout=WAIT_S) == "beta"
            assert isinstance(a._links[endpoint].pump, TcpDealer)
        await until(lambda: "beta" not in a.peers)
        async with Hub("beta", tcp=endpoint) as restarted:  # the same port: the peer restarted
            await until(lambda: "beta" in a.peers and a.peers["beta"].up)
            server, caller = restarted.endpoint("server"), a.endpoint("caller")
            server.on_request(lambda request: server.reply(request, {"echo": request.body}))
            assert await caller.request("beta/server", "echo", {"n": 1}, timeout=WAIT_S) == {"echo": {"n": 1}}
