"""The Hub with real sockets: links, routing, errors, heartbeats, credit, tap, hostile input."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from dpipes.bus import codec, tap
from dpipes.bus import hub as hub_module
from dpipes.bus.client import Client
from dpipes.bus.endpoint import Endpoint, StreamCancelled
from dpipes.bus.errors import BusError, NoRoute, PeerLost, ProtocolMismatch, RequestFailed, RequestTimeout
from dpipes.bus.hub import Hub
from dpipes.bus.hub import links as hub_links
from dpipes.bus.streams import CREDIT_GRANT_FRACTION

HUBPROC = Path(__file__).with_name("hubproc.py")
WAIT_S = 10.0  # the bound on every wait for the network in these tests


async def until(condition: Any, timeout: float = WAIT_S) -> None:
    """Poll ``condition()`` until true, failing the test after ``timeout``."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def heard_hello(hub: Hub, peer: Hub) -> bool:
    """Whether ``hub`` has had ``peer``'s HELLO. A link learned from a HELLO is up at once, before its
    own connection is made and its own HELLO answered: until then that HELLO is still on its way."""
    return (peer.node, peer.instance) in hub._peer_idents.values()


@contextlib.asynccontextmanager
async def linked(*names: str) -> AsyncIterator[list[Hub]]:
    """Hubs on loopback, every pair linked both ways, each HELLO heard (no connection still being made)."""
    async with contextlib.AsyncExitStack() as stack:
        hubs = [await stack.enter_async_context(Hub(name)) for name in names]
        for i, a in enumerate(hubs):
            for b in hubs[i + 1 :]:
                await a.connect_peer(b.tcp_endpoint)
        await until(lambda: all(len(h.peers) == len(hubs) - 1 for h in hubs))
        await until(lambda: all(heard_hello(h, p) for h in hubs for p in hubs if p is not h))
        yield hubs


@contextlib.asynccontextmanager
async def process(*argv: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    proc = await asyncio.create_subprocess_exec(sys.executable, str(HUBPROC), *argv, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = await asyncio.wait_for(proc.stdout.readline(), WAIT_S)
        yield proc, first.decode().strip()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_link_handshake_learns_names_both_ways() -> None:
    async with Hub("alpha") as a, Hub("beta") as b:
        assert await a.connect_peer(b.tcp_endpoint) == "beta"
        await until(lambda: "alpha" in b.peers)
        assert a.peers["beta"].up and a.peers["beta"].instance == b.instance
        assert b.peers["alpha"].instance == a.instance


async def test_request_reply_across_hubs_and_from_clients() -> None:
    async with linked("alpha", "beta") as (a, b):
        server = b.endpoint("svc")

        async def serve() -> None:
            while True:
                req = await server.recv()
                assert isinstance(req, codec.Request)
                server.reply(req, {"echo": req.body, "from": req.src})

        task = asyncio.create_task(serve())
        try:
            caller = a.endpoint("caller")
            assert await caller.request("beta/svc", "echo", {"n": 1}) == {"echo": {"n": 1}, "from": "alpha/caller"}
            for where in (a.ipc_endpoint, a.tcp_endpoint):
                async with Client(where, name="cli") as client:
                    reply = await client.endpoint.request("beta/svc", "echo", {"n": 2})
                    assert reply == {"echo": {"n": 2}, "from": "alpha/cli"}
        finally:
            task.cancel()


async def test_a_client_attached_over_ipc_is_known_to_be_on_this_host() -> None:
    async with Hub("alpha") as hub:
        async with Client(hub.ipc_endpoint) as near, Client(hub.tcp_endpoint) as far:
            addr = near.endpoint.addr
            assert hub.client_is_local(addr)
            assert not hub.client_is_local(far.endpoint.addr)  # loopback TCP could be a tunnel's end
        await until(lambda: not hub.client_is_local(addr))  # it said goodbye
        local_endpoint = hub.endpoint("inproc")
        assert not hub.client_is_local(local_endpoint.addr)  # an endpoint of the hub itself is no client


async def test_three_hubs_route_directly_without_relay() -> None:
    async with linked("alpha", "beta", "gamma") as (a, b, c):
        ctx = zmq.asyncio.Context()
        tap = ctx.socket(zmq.SUB)
        tap.connect(b.tap_endpoint)
        tap.subscribe(b"")
        try:
            await until(lambda: b._tap_topics)
            src, dst = a.endpoint("src"), c.endpoint("dst")
            stream = src.open_stream("gamma/dst")
            for _ in range(20):
                await stream.send_bytes(b"x" * 1000)
            reader = await dst.accept()
            got = 0
            closing = asyncio.create_task(stream.close())
            while (msg := await reader.read()) is not None:
                got += msg.payload_bytes
            assert await closing == got == 20_000
            assert await tap.poll(100) == 0  # beta routed nothing
        finally:
            tap.close(0)
            ctx.term()


async def test_undeliverable_messages_come_back_as_errors() -> None:
    async with linked("alpha", "beta") as (a, _b):
        ep = a.endpoint("ep")
        with pytest.raises(NoRoute, match="no link to node 'nowhere'"):
            await ep.request("nowhere/x", "m")
        with pytest.raises(NoRoute, match="no endpoint 'nobody' on node beta"):
            await ep.request("beta/nobody", "m")
        stream = ep.open_stream("beta/nobody")
        await stream.send_bytes(b"data")
        with pytest.raises(NoRoute, match="nobody"):
            await stream.close(timeout=WAIT_S)
        ep.send(codec.Request(dst="beta/nobody", method="plain", seq=999))
        error = await ep.recv(timeout=WAIT_S)  # not a pending request: it arrives as a message
        assert isinstance(error, codec.Error) and error.code == "no-endpoint" and error.to == "beta/nobody"


async def test_request_timeout_names_method_and_destination() -> None:
    async with Hub("alpha") as a:
        a.endpoint("silent")
        with pytest.raises(RequestTimeout, match="ping to alpha/silent"):
            await a.endpoint("caller").request("alpha/silent", "ping", timeout=0.2)


async def test_each_pending_request_times_out_by_its_own_timeout_and_the_others_stay_answerable() -> None:
    async with Hub("alpha") as a:
        server, caller = a.endpoint("server"), a.endpoint("caller")
        patient = asyncio.create_task(caller.request("alpha/server", "slow", timeout=WAIT_S))
        first = await server.recv(timeout=WAIT_S)  # asked first, with the longer timeout
        with pytest.raises(RequestTimeout, match=r"quick to alpha/server: no reply within 0\.2 s"):
            await caller.request("alpha/server", "quick", timeout=0.2)
        assert not patient.done()  # the earlier deadline failed only its own request
        assert isinstance(first, codec.Request)
        server.reply(first, {"late": True})
        assert await asyncio.wait_for(patient, WAIT_S) == {"late": True}
        with pytest.raises(RequestTimeout, match="again to alpha/server"):  # a later one still has a deadline
            await caller.request("alpha/server", "again", timeout=0.1)


async def test_a_request_handler_answers_as_requests_arrive_and_a_failing_one_is_answered_as_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with linked("alpha", "beta") as (a, b):
        server, caller = b.endpoint("server"), a.endpoint("caller")

        def answer(request: codec.Request) -> None:
            if request.method == "boom":
                raise ValueError("no such thing")
            server.reply(request, {"echo": request.body})

        server.on_request(answer)
        assert await caller.request("beta/server", "echo", {"n": 1}, timeout=WAIT_S) == {"echo": {"n": 1}}
        with pytest.raises(RequestFailed, match="boom failed: ValueError"):  # at once, not after a timeout
            await caller.request("beta/server", "boom", timeout=WAIT_S)
        assert "the request handler failed on boom" in caplog.text
        server.on_request(None)  # back to recv
        asked = asyncio.create_task(caller.request("beta/server", "later", timeout=WAIT_S))
        msg = await server.recv(timeout=WAIT_S)
        assert isinstance(msg, codec.Request) and msg.method == "later"
        server.reply(msg, {"ok": 1})
        assert await asyncio.wait_for(asked, WAIT_S) == {"ok": 1}


async def test_protocol_mismatch_is_refused_on_both_sides(caplog: pytest.LogCaptureFixture) -> None:
    ctx = zmq.asyncio.Context()
    try:
        async with Hub("alpha") as a:
            # A peer of another version says HELLO to us: it gets a BYE naming both versions.
            peer = ctx.socket(zmq.DEALER)
            peer.connect(a.tcp_endpoint)
            hello = dict(codec.header_of(codec.Hello(node="future", instance="i")), v=codec.PROTOCOL_VERSION + 1)
            await peer.send(msgpack.packb(hello))
            bye = codec.decode(await asyncio.wait_for(peer.recv_multipart(), WAIT_S))
            assert isinstance(bye, codec.Bye) and "protocol version" in bye.reason
            assert "refused a link from 'future'" in caplog.text
            peer.close(0)

            # We say HELLO to a peer of another version: connect_peer raises, naming the reason.
            fake = ctx.socket(zmq.ROUTER)
            port = fake.bind_to_random_port("tcp://127.0.0.1")

            async def answer() -> None:
                ident, _header = await fake.recv_multipart()
                reply = dict(codec.header_of(codec.Bye(reason="speaks a newer one")), v=codec.PROTOCOL_VERSION + 1)
                await fake.send_multipart([ident, msgpack.packb(reply)])

            task = asyncio.create_task(answer())
            mismatch = rf"protocol version {codec.PROTOCOL_VERSION + 1}, we speak {codec.PROTOCOL_VERSION}"
            with pytest.raises(ProtocolMismatch, match=mismatch):
                await a.connect_peer(f"tcp://127.0.0.1:{port}")
            await task
            fake.close(0)
    finally:
        ctx.term()


async def test_a_second_node_with_our_name_is_refused() -> None:
    async with Hub("alpha") as a, Hub("alpha") as twin:
        with pytest.raises(ProtocolMismatch, match="unique name"):
            await twin.connect_peer(a.tcp_endpoint)


async def test_malformed_input_is_counted_logged_once_and_harmless(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dpipes.bus.hub")
    ctx = zmq.asyncio.Context()
    try:
        async with Hub("alpha") as a:
            attacker = ctx.socket(zmq.DEALER)
            attacker.connect(a.tcp_endpoint)
            junk = [
                [b"\xc1"],
                [b"not msgpack at all"],
                [msgpack.packb([1, 2])],
                [msgpack.packb({"v": codec.PROTOCOL_VERSION, "kind": "NOPE"})],
                [msgpack.packb({"v": codec.PROTOCOL_VERSION, "kind": "BYTES", "src": 5})],
                [b"\x80" * (codec.MAX_HEADER_BYTES + 1)],
            ] * 10
            for frames in junk:
                await attacker.send_multipart(frames)
            bad_hello = dict(codec.header_of(codec.Hello()), endpoints="not a map")
            await attacker.send_multipart([msgpack.packb(bad_hello)])
            await until(lambda: sum(s.dropped for s in a.stats.values()) == len(junk) + 1)
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "bad message" in r.message]
            assert len(warnings) == 1  # once per peer; the rest at debug level
            async with Client(a.ipc_endpoint) as client:  # the hub still serves
                ep = a.endpoint("svc")
                task = asyncio.create_task(ep.recv())
                client.endpoint.send(codec.Request(dst="alpha/svc", method="still-alive"))
                assert (await asyncio.wait_for(task, WAIT_S)).method == "still-alive"  # type: ignore[attr-defined]
            attacker.close(0)
    finally:
        ctx.term()


async def test_client_spoofing_another_source_is_dropped() -> None:
    async with Hub("alpha") as a:
        victim = a.endpoint("victim")
        async with Client(a.ipc_endpoint, name="liar") as liar:
            liar.send(codec.Request(src="alpha/admin", dst="alpha/victim", method="m"))
            await until(lambda: a.stats["alpha/liar"].dropped == 1)
            assert len(victim._inbox) == 0


async def test_endpoint_name_taken_is_refused() -> None:
    async with Hub("alpha") as a:
        a.endpoint("taken")
        with pytest.raises(BusError, match="'taken' is taken"):
            async with Client(a.ipc_endpoint, name="taken"):
                pass


async def test_a_reserved_name_holds_a_stream_until_its_client_attaches() -> None:
    async with Hub("alpha") as a:
        assert a.reserve("p.1") == "alpha/p.1"
        with pytest.raises(BusError, match="already exists"):
            a.endpoint("p.1")
        out = a.endpoint("src").open_stream("alpha/p.1")
        await out.send_bytes(b"sent before anyone listened")
        closing = asyncio.ensure_future(out.close())
        async with Client(a.ipc_endpoint, name="p.1") as worker:  # the plugin worker the name was kept for
            stream = await worker.endpoint.accept(timeout=WAIT_S)
            assert (await stream.read(timeout=WAIT_S)).frames[0] == b"sent before anyone listened"
            assert await stream.read(timeout=WAIT_S) is None
            assert await asyncio.wait_for(closing, WAIT_S) == len(b"sent before anyone listened")


async def test_releasing_an_unclaimed_name_fails_what_waited_for_it() -> None:
    async with Hub("alpha") as a:
        a.reserve("p.2")
        out = a.endpoint("src").open_stream("alpha/p.2")
        await out.send_bytes(b"x")
        closing = asyncio.ensure_future(out.close())
        a.release("p.2")  # its worker died before it attached
        # Gone before or after "x" left its sender's batch: either way the sender learns it, named.
        with pytest.raises(NoRoute, match=r"'p\.2' on node alpha"):
            await asyncio.wait_for(closing, WAIT_S)
        a.release("p.2")  # idempotent
        a.endpoint("p.2")  # and the name is free again


async def test_releasing_a_name_cancels_what_its_client_sent_and_did_not_end() -> None:
    # A plugin worker that died mid-output: its node releases the name, with how the stage ended.
    async with linked("alpha", "beta") as (a, b):
        a.reserve("p.1")
        here, there = a.endpoint("here"), b.endpoint("there")
        async with Client(a.ipc_endpoint, name="p.1") as worker:
            ended = worker.endpoint.open_stream("alpha/here")
            await ended.send_bytes(b"whole")
            closing = asyncio.ensure_future(ended.close())
            whole = await here.accept(timeout=WAIT_S)
            assert (await whole.read(timeout=WAIT_S)).frames[0] == b"whole"
            assert await whole.read(timeout=WAIT_S) is None  # ended with EOF: a clean end
            await asyncio.wait_for(closing, WAIT_S)
            for dst in ("alpha/here", "beta/there"):
                await worker.endpoint.open_stream(dst).send_bytes(b"half")
            halves = [await here.accept(timeout=WAIT_S), await there.accept(timeout=WAIT_S)]
            for half in halves:  # what it sent before it went is read first
                assert (await half.read(timeout=WAIT_S)).frames[0] == b"half"
            a.release("p.1", reason="stage 1 (%p@alpha) failed: boom")
            for half in halves:
                with pytest.raises(
                    StreamCancelled, match=r"from alpha/p\.1 cancelled: stage 1 \(%p@alpha\) failed: boom"
                ):
                    await half.read(timeout=WAIT_S)


async def test_a_client_that_leaves_streams_unended_has_them_cancelled_when_its_name_is_released() -> None:
    # Its BYE (or its silence) does not cancel them: the node, which reports the stage first, says why.
    async with Hub("alpha") as a:
        a.reserve("p.1")
        reader = a.endpoint("reader")
        async with Client(a.ipc_endpoint, name="p.1") as worker:
            await worker.endpoint.open_stream("alpha/reader").send_bytes(b"half")
            stream = await reader.accept(timeout=WAIT_S)
        await until(lambda: "p.1" not in a._local)  # its BYE detached it
        assert (await stream.read(timeout=WAIT_S)).frames[0] == b"half"
        a.release("p.1", reason="stage 1 (%p@alpha) killed by SIGKILL")
        with pytest.raises(StreamCancelled, match=r"killed by SIGKILL"):
            await stream.read(timeout=WAIT_S)
        a.release("p.1", reason="again")  # idempotent: nothing is cancelled twice


async def test_killed_peer_fails_streams_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_links, "PEER_TIMEOUT_S", 1.0)
    async with Hub("alpha") as a, process("sink", "victim") as (proc, endpoint):
        await a.connect_peer(endpoint)
        src = a.endpoint("src")
        stream = src.open_stream("victim/sink")
        requester = asyncio.create_task(src.request("victim/nobody-answers", "m", timeout=60))

        async def write_forever() -> None:
            while True:
                await stream.send_bytes(b"z" * 65536)  # the sink never reads: we block on credit

        writer = asyncio.create_task(write_forever())
        await until(lambda: stream.cost >= stream.limit)  # throttled by credit
        proc.send_signal(signal.SIGKILL)
        loop = asyncio.get_running_loop()
        killed_at = loop.time()
        with pytest.raises(PeerLost, match="node 'victim' lost: no heartbeat"):
            await asyncio.wait_for(writer, WAIT_S)
        assert loop.time() - killed_at < 1.0 + 2 * hub_module.HEARTBEAT_INTERVAL_S + 1.0
        with pytest.raises((PeerLost, NoRoute)):
            await asyncio.wait_for(requester, WAIT_S)
        assert "victim" not in a.peers


async def test_credit_throttles_a_fast_producer_and_bounds_memory() -> None:
    window = codec.INITIAL_CREDIT_BYTES
    chunk = 64 * 1024
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")
        total = 64 * 1024 * 1024
        worst_gap = 0
        worst_queue = 0

        async def produce() -> None:
            nonlocal worst_gap
            for _ in range(total // chunk):
                await stream.send_bytes(b"p" * chunk)
            await stream.close()

        producer = asyncio.create_task(produce())
        reader = await dst.accept(timeout=WAIT_S)
        received = 0
        while True:
            worst_queue = max(worst_queue, len(reader._queue))
            worst_gap = max(worst_gap, stream.sent - received)
            msg = await reader.read()
            if msg is None:
                break
            received += msg.payload_bytes
            await asyncio.sleep(0.0005)  # the deliberately slow consumer
        await producer
        assert received == total
        # The producer never ran further ahead than the window plus one message...
        assert worst_gap <= window + chunk
        # ...so what waits in the receiver is bounded by the window, not by the stream's size.
        assert worst_queue <= window // chunk + 2


async def test_stream_tail_survives_a_sender_that_exits_right_after_close(tmp_path: Path) -> None:
    async with Hub("alpha", ipc=f"ipc://{tmp_path}/bus.sock") as a:
        sink = a.endpoint("sink")
        count, size = 300_000, 16
        async with process("blast", a.ipc_endpoint, str(count), str(size), "alpha") as (proc, _addr):
            reader = await sink.accept(timeout=WAIT_S)
            expected = 0
            while (msg := await reader.read(timeout=WAIT_S)) is not None:
                data = bytes(msg.frames[0])  # type: ignore[attr-defined]
                assert data == expected.to_bytes(8, "big") * 2, f"message {expected} out of order or damaged"
                expected += 1
            assert expected == count
            assert proc.stdout is not None
            assert (await proc.stdout.readline()).decode().strip() == f"acked {count * size}"
            assert await proc.wait() == 0


async def test_reader_cancel_stops_the_sender_like_a_closed_pipe() -> None:
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")
        await stream.send_bytes(b"first")
        reader = await dst.accept(timeout=WAIT_S)
        assert (await reader.read()).payload_bytes == 5  # type: ignore[union-attr]
        reader.cancel("head has enough")

        async def keep_writing() -> None:
            while True:
                await stream.send_bytes(b"more" * 1000)
                await asyncio.sleep(0.001)

        with pytest.raises(StreamCancelled, match="head has enough"):
            await asyncio.wait_for(keep_writing(), WAIT_S)
        assert isinstance(StreamCancelled("x"), BrokenPipeError)


async def test_tap_publishes_only_while_subscribed() -> None:
    async with linked("alpha", "beta") as (a, _b):
        src = a.endpoint("src")
        a.endpoint("dst")
        assert not a._tap_topics
        src.send(codec.Request(dst="alpha/dst", method="unseen"))
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.connect(a.tap_endpoint)
        sub.subscribe(b"")
        try:
            await until(lambda: bool(a._tap_topics))
            src.send(codec.Request(dst="alpha/dst", method="seen"))
            stream = src.open_stream("beta/nobody")
            await stream.send_bytes(b"12345")
            events = [tap.decode_event(await asyncio.wait_for(sub.recv(), WAIT_S)) for _ in range(2)]
            assert [(e.kind, e.src, e.dst) for e in events] == [
                ("REQUEST", "alpha/src", "alpha/dst"),
                ("BYTES", "alpha/src", "beta/nobody"),
            ]
            assert events[1].size == 5 and events[1].sid == stream.sid and events[1].sample == b"12345"
            assert events[0].fields["method"] == "seen" and events[1].n == events[0].n + 1
        finally:
            sub.close(0)
            ctx.term()
        await until(lambda: not a._tap_topics)


async def test_close_is_idempotent_and_fails_pending_operations() -> None:
    a = Hub("alpha")
    await a.start()
    ep: Endpoint = a.endpoint("ep")
    pending = asyncio.create_task(ep.recv())
    await asyncio.sleep(0)
    await a.aclose()
    await a.aclose()
    with pytest.raises(BusError, match="closed"):
        await pending


async def test_invalid_names_are_rejected_early() -> None:
    with pytest.raises(ValueError, match="node name"):
        Hub("a/b")
    async with Hub("alpha") as a:
        with pytest.raises(ValueError, match="endpoint name"):
            a.endpoint("x/y")
        a.endpoint("one")
        with pytest.raises(BusError, match="already exists"):
            a.endpoint("one")


async def test_a_peer_that_said_hello_is_routable_before_it_answers_ours() -> None:
    # Regression: what we owed a new peer (the CREDIT for its first data) used to bounce as
    # "no route" while our own link back to it waited for WELCOME, and its stream stalled.
    ctx = zmq.asyncio.Context()
    fake = ctx.socket(zmq.ROUTER)  # the peer's ROUTER: it takes our HELLO and never answers
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    dealer = ctx.socket(zmq.DEALER)
    try:
        async with Hub("alpha") as a:
            dealer.connect(a.tcp_endpoint)
            hello = codec.Hello(
                src="slowpoke/", node="slowpoke", instance="i1", endpoints={"bus": f"tcp://127.0.0.1:{port}"}
            )
            await dealer.send_multipart(codec.encode(hello))
            assert isinstance(codec.decode(await asyncio.wait_for(dealer.recv_multipart(), WAIT_S)), codec.Welcome)
            assert "slowpoke" in a.peers
            a.endpoint("ep").send(codec.Credit(dst="slowpoke/src", sid=7, bytes=4096))
            first = codec.decode((await asyncio.wait_for(fake.recv_multipart(), WAIT_S))[1:])
            second = codec.decode((await asyncio.wait_for(fake.recv_multipart(), WAIT_S))[1:])
            assert isinstance(first, codec.Hello) and first.node == "alpha"
            assert isinstance(second, codec.Credit) and (second.sid, second.bytes) == (7, 4096)
    finally:
        dealer.close(0)
        fake.close(0)
        ctx.term()


async def test_a_receiver_may_open_a_larger_window() -> None:
    window = 3 * codec.INITIAL_CREDIT_BYTES
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst", window=window)
        stream = src.open_stream("beta/dst")
        await stream.send_bytes(b"w")
        await dst.accept(timeout=WAIT_S)  # opened, never read: only the window's credit is there
        await until(lambda: stream.limit == window)


async def test_credit_is_counted_in_the_units_the_spec_states() -> None:
    # The spec: a data message costs its payload bytes plus MESSAGE_CREDIT_BYTES; a sender may
    # start one while it has spent less than it was granted; CREDIT.bytes grants units.
    size = 4096  # small enough that counting payload alone would let 2048 through, not 1928
    cost = size + codec.MESSAGE_CREDIT_BYTES
    may_send = -(-codec.INITIAL_CREDIT_BYTES // cost)  # ceil: the last message may overshoot
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")

        async def write_forever() -> None:
            while True:
                await stream.send_bytes(b"c" * size)

        writer = asyncio.create_task(write_forever())
        try:
            await until(lambda: stream.cost >= stream.limit)
            assert stream.sent == may_send * size  # and no more: it waits for credit
            reader = await dst.accept(timeout=WAIT_S)
            taken = 0
            while taken * cost < codec.INITIAL_CREDIT_BYTES // CREDIT_GRANT_FRACTION:  # when the endpoint grants
                await reader.read(timeout=WAIT_S)
                taken += 1
            await until(lambda: stream.limit > codec.INITIAL_CREDIT_BYTES)
            assert stream.limit == codec.INITIAL_CREDIT_BYTES + taken * cost
        finally:
            writer.cancel()


async def test_a_stream_that_has_ended_is_granted_no_more_credit() -> None:
    # Its EOF is here before the reader takes the last messages: the sender sends nothing more, so
    # the reader owes it no CREDIT, only the EOF_ACK with the right total.
    size = 4096
    count = codec.INITIAL_CREDIT_BYTES // CREDIT_GRANT_FRACTION // size + 2  # past one grant's worth
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")
        for _ in range(count):
            await stream.send_bytes(b"c" * size)
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await dst.accept(timeout=WAIT_S)
        await until(lambda: (last := reader._queue.last()) is not None and last.KIND == "EOF")
        taken = 0
        while (msg := await reader.read(timeout=WAIT_S)) is not None:
            taken += msg.payload_bytes
        assert taken == count * size
        assert await closing == count * size
        assert stream.limit == codec.INITIAL_CREDIT_BYTES


async def test_a_link_is_up_with_what_its_peer_offers() -> None:
    # alpha has no TCP, so beta cannot link back and say HELLO: only WELCOME can tell alpha.
    async with Hub("alpha", tcp=None, info={"programs": ["cat"]}) as a, Hub("beta", info={"programs": ["sort"]}) as b:
        assert await a.connect_peer(b.tcp_endpoint) == "beta"
        # Placement on alpha never sees beta up with nothing to offer; nor a tap without beta's TCP tap.
        assert a.peers["beta"].info == {"programs": ["sort"], "tap": b.tcp_tap_endpoint}
        assert b.tcp_tap_endpoint.startswith("tcp://127.0.0.1:") and not a.tcp_tap_endpoint
