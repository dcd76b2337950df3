"""One name, one live instance: forged and duplicate HELLOs are refused; a restarted node takes over."""

from __future__ import annotations

import asyncio
import signal
import uuid

import pytest
import zmq
import zmq.asyncio

from dpipes.bus import codec
from dpipes.bus.errors import ProtocolMismatch
from dpipes.bus.hub import Hub
from dpipes.bus.hub import links as hub_links
from tests.bus.test_hub import WAIT_S, linked, process, until

CHUNK = 64 * 1024


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused static link retries at every heartbeat, so a test sees many retries soon."""
    monkeypatch.setattr(hub_links, "REFUSED_RETRY_S", 0.0)


async def test_a_forged_hello_does_not_kill_a_running_transfer() -> None:
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")
        await stream.send_bytes(b"x" * CHUNK)
        reader = await dst.accept(timeout=WAIT_S)
        assert await reader.read(timeout=WAIT_S) is not None
        alpha_instance = b.peers["alpha"].instance
        ctx = zmq.asyncio.Context()
        forger = ctx.socket(zmq.DEALER)
        forger.setsockopt(zmq.LINGER, 0)
        try:
            forger.connect(b.tcp_endpoint)
            hello = codec.Hello(
                src="alpha/", node="alpha", instance=uuid.uuid4().hex, endpoints={"bus": "tcp://127.0.0.1:9"}
            )
            await forger.send_multipart(codec.encode(hello))
            answer = codec.decode(await asyncio.wait_for(forger.recv_multipart(), WAIT_S))
        finally:
            forger.close(0)
            ctx.term()
        assert isinstance(answer, codec.Bye)
        assert alpha_instance[:16] in answer.reason and hello.instance[:16] in answer.reason
        assert "unique name" in answer.reason
        # The transfer goes on to the end, on the link it had.
        for _ in range(15):
            await stream.send_bytes(b"x" * CHUNK)
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        got = CHUNK
        while (msg := await reader.read(timeout=WAIT_S)) is not None:
            got += msg.payload_bytes
        assert await closing == got == 16 * CHUNK
        assert b.peers["alpha"].instance == alpha_instance


async def test_two_honest_nodes_with_one_name_do_not_flap(quick_retries: None) -> None:
    async with Hub("hub") as hub, Hub("pi") as first, Hub("pi") as second:
        events: list[tuple[str, bool]] = []
        hub.link_listeners.append(lambda node, up, reason: events.append((node, up)))
        await first.connect_peer(hub.tcp_endpoint)
        await until(lambda: "pi" in hub.peers)
        with pytest.raises(ProtocolMismatch) as refused:
            await second.connect_peer(hub.tcp_endpoint)
        message = str(refused.value)
        assert first.instance[:16] in message and second.instance[:16] in message
        # It keeps trying (a static link), is refused each time, and the first's link never drops.
        await until(lambda: hub.stats["pi"].dropped >= 5)
        assert hub.peers["pi"].instance == first.instance
        assert [e for e in events if e[0] == "pi"] == [("pi", True)]
        assert "hub" not in second.peers


async def test_a_restarted_node_takes_over_once_its_old_instance_is_silent(quick_retries: None) -> None:
    async with Hub("alpha") as a, process("sink", "beta") as (proc, endpoint):
        a.add_peer(endpoint)
        await until(lambda: "beta" in a.peers)
        old = a.peers["beta"].instance
        proc.send_signal(signal.SIGKILL)  # dies without a word: its link is only silent
        await proc.wait()
        async with Hub("beta") as restarted:
            restarted.add_peer(a.tcp_endpoint)
            await until(lambda: "beta" in a.peers and a.peers["beta"].instance == restarted.instance)
            assert a.peers["beta"].instance != old
            await until(lambda: "alpha" in restarted.peers)
