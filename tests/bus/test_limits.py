"""Receivers enforce the credit they grant and bound their streams (codec, *Limits of a receiver*)."""

from __future__ import annotations

import asyncio
import os

import pytest

from dpipes.bus import codec, shm
from dpipes.bus.client import Client
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, StreamError
from dpipes.bus.hub import Hub
from tests.bus.test_hub import WAIT_S, heard_hello, linked, until

CHUNK = 1 << 20


async def _errors(ep: Endpoint) -> list[codec.Error]:
    """The ERRORs that reached ``ep``'s inbox so far (those no stream or request claimed)."""
    found = []
    while True:
        try:
            msg = await ep.recv(timeout=0.05)
        except BusError:
            return found
        if isinstance(msg, codec.Error):
            found.append(msg)


def _flood(ep: Endpoint, dst: str, sid: int, nbytes: int, chunk: int = CHUNK) -> None:
    """Send ``nbytes`` on stream ``sid`` as fast as the socket takes them, ignoring credit."""
    for seq in range(1, nbytes // chunk + 1):
        ep.send(codec.Bytes(dst=dst, sid=sid, seq=seq, frames=(b"\0" * chunk,)))


async def test_a_sender_past_its_credit_is_cancelled_with_a_coded_error() -> None:
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        src_stream = src.open_stream("beta/dst")  # an honest stream beside it keeps working
        _flood(src, "beta/dst", 999, 4 * codec.INITIAL_CREDIT_BYTES)
        await until(lambda: dst.refused["credit-exceeded"] == 1)
        errors = await _errors(src)
        assert [(e.code, e.sid, e.to) for e in errors] == [("credit-exceeded", 999, "beta/dst")]
        # The reader of the cancelled stream learns it was cut short, and nothing of it is kept.
        reader = await dst.accept(timeout=WAIT_S)
        with pytest.raises(StreamError, match="past the credit"):
            while await reader.read(timeout=WAIT_S) is not None:
                pass
        assert not dst._in
        await src_stream.send_bytes(b"fine")
        await src_stream_close(dst, src_stream)


async def src_stream_close(dst: Endpoint, stream: object) -> None:
    reader = await dst.accept(timeout=WAIT_S)
    close = asyncio.create_task(stream.close(timeout=WAIT_S))  # type: ignore[attr-defined]
    got = b""
    while (msg := await reader.read(timeout=WAIT_S)) is not None:
        got += b"".join(bytes(f) for f in msg.frames)
    assert got == b"fine" and await close == 4


async def test_streams_beyond_an_endpoints_bound_are_refused() -> None:
    async with Hub("alpha") as hub:
        ctl = hub.endpoint("ctl", max_streams=0)
        one = hub.endpoint("one", max_streams=1)
        client = Client(hub.ipc_endpoint)
        await client.start()
        try:
            ep = client.endpoint
            for sid in (1, 2, 3):
                ep.send(codec.Bytes(dst="alpha/ctl", sid=sid, seq=1, frames=(b"x",)))
                ep.send(codec.Bytes(dst="alpha/ctl", sid=sid, seq=2, frames=(b"x",)))  # dropped unanswered
                ep.send(codec.Bytes(dst="alpha/one", sid=10 + sid, seq=1, frames=(b"x",)))
            await until(lambda: ctl.refused["over-limit"] == 3 and one.refused["over-limit"] == 2)
            errors = await _errors(ep)
            assert sorted((e.to, e.sid) for e in errors) == [
                ("alpha/ctl", 1), ("alpha/ctl", 2), ("alpha/ctl", 3), ("alpha/one", 12), ("alpha/one", 13)
            ]  # fmt: skip
            assert {e.code for e in errors} == {"over-limit"}
            assert not ctl._in and len(one._in) == 1
        finally:
            await client.aclose()


async def test_a_hub_attaches_no_more_clients_than_its_bound() -> None:
    async with Hub("alpha", max_clients=8, max_clients_per_address=2) as hub:
        first, second, third = Client(hub.ipc_endpoint), Client(hub.ipc_endpoint), Client(hub.ipc_endpoint)
        await first.start()
        await second.start()
        try:
            with pytest.raises(BusError, match=f"2 clients attached from local uid {os.getuid()}, its limit"):
                await third.start()
            await second.aclose()
            await until(lambda: len(hub._clients) == 1)
            await third.start()  # a place came free
            await third.aclose()
        finally:
            await first.aclose()
            await second.aclose()


async def test_drop_peer_closes_a_link_that_is_not_up_and_a_learned_one_on_request() -> None:
    async with linked("alpha", "beta") as (a, b):
        fds = len(os.listdir("/proc/self/fd"))  # both ways connected (linked() awaits each HELLO heard)
        a.learn_peer("tcp://127.0.0.1:1")  # nobody listens there: the link never comes up
        assert a.drop_peer("tcp://127.0.0.1:1") and "tcp://127.0.0.1:1" not in a._links
        await until(lambda: len(os.listdir("/proc/self/fd")) <= fds)
        assert not a.drop_peer(b.tcp_endpoint)  # static (connect_peer) and up: the operator's
        a.learn_peer(b.tcp_endpoint)  # learned as well: still the operator's
        assert not a.drop_peer(b.tcp_endpoint)
        c = Hub("gamma")
        await c.start()
        try:
            c.learn_peer(a.tcp_endpoint)
            # alpha's HELLO on its link back, still on its way, would link gamma to alpha again.
            await until(lambda: "gamma" in a.peers and "alpha" in c.peers and heard_hello(a, c) and heard_hello(c, a))
            assert c.drop_peer(a.tcp_endpoint, "unwanted")
            assert "alpha" not in c.peers
            await until(lambda: "gamma" not in a.peers)  # it said BYE
        finally:
            await c.aclose()


async def test_what_a_hub_holds_for_all_its_senders_stays_under_its_cap() -> None:
    window = codec.INITIAL_CREDIT_BYTES
    cap = 5 * window // 2  # less than the three windows one flooder fills: the cap must refuse some
    senders, streams = 4, 3
    chunk = shm.MIN_PAYLOAD_BYTES // 2  # through the socket: a stream in shared memory has a wider window
    async with Hub("alpha", max_held_bytes=cap) as hub:
        sinks = [hub.endpoint(f"sink{i}", max_streams=streams) for i in range(senders)]  # nobody reads them
        flooders = [Client(hub.ipc_endpoint) for _ in range(senders)]
        for client in flooders:
            await client.start()
        try:
            for i, client in enumerate(flooders):  # every stream's credit first, then as much past it
                for sid in range(1, streams + 1):
                    _flood(client.endpoint, f"alpha/sink{i}", sid, window, chunk)
                for sid in range(1, streams + 1):
                    for seq in range(window // chunk + 1, 2 * window // chunk + 1):
                        past = codec.Bytes(dst=f"alpha/sink{i}", sid=sid, seq=seq, frames=(b"\1" * chunk,))
                        client.endpoint.send(past)
            # Each stream ends refused, for the cap or for its credit, and what it held is let go.
            await until(lambda: sum(s.refused.total() for s in sinks) == senders * streams)
            await until(lambda: hub.held.bytes == 0)
            codes = {e.code for client in flooders for e in await _errors(client.endpoint)}
        finally:
            for client in flooders:
                await client.aclose()
        assert codes == {"over-limit", "credit-exceeded"}
        assert hub.held.refused >= senders and sum(s.refused["over-limit"] for s in sinks) == hub.held.refused
        assert window < hub.held.peak <= cap, hub.held.peak
        # An honest run afterwards goes through whole, many windows' worth.
        drain = hub.endpoint("drain")
        honest = Client(hub.ipc_endpoint)
        await honest.start()
        try:
            stream = honest.endpoint.open_stream("alpha/drain")
            data = os.urandom(CHUNK) * (4 * window // CHUNK)

            async def send() -> int:
                for at in range(0, len(data), CHUNK):
                    await stream.send_bytes(data[at : at + CHUNK])
                return await stream.close(timeout=WAIT_S)

            sending = asyncio.create_task(send())
            reader = await drain.accept(timeout=WAIT_S)
            got = bytearray()
            while (msg := await reader.read(timeout=WAIT_S)) is not None:
                got += b"".join(bytes(f) for f in msg.frames)  # type: ignore[attr-defined]
            assert await sending == len(data) and got == data
            assert hub.held.peak <= cap and hub.held.bytes == 0
        finally:
            await honest.aclose()
