"""Small messages coalesced into BATCH transfers: order, credit and errors stay per message."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import msgpack
import pytest
import zmq
import zmq.asyncio

from dpipes.bus import codec
from dpipes.bus.client import Client
from dpipes.bus.errors import DecodeError, NoRoute
from dpipes.bus.hub import Hub
from dpipes.bus.streams import CREDIT_GRANT_FRACTION, YIELD_EVERY_MESSAGES
from tests.bus.test_hub import WAIT_S, linked, until
from tests.bus.test_hub_hostile import answer, attach, raw_socket, tracebacks

COUNT = 3000  # more than one batch's worth between yields of the sender


def chunk(i: int) -> bytes:
    return f"message {i:05d}|".encode() * (1 + i % 3)  # sizes vary, so a wrong split shows


# -- the codec ---------------------------------------------------------------------------------


def test_a_batch_stands_for_its_members_in_order() -> None:
    parts = [b"ab", b"", b"cde"]
    batch = codec.Batch(src="a/s", dst="b/r", sid=7, seq=40, of="STDERR", sizes=[2, 0, 3], frames=(b"".join(parts),))
    decoded = codec.decode([bytes(f) for f in codec.encode(batch)])
    members = decoded.members()  # type: ignore[attr-defined]
    assert [(m.KIND, m.src, m.dst, m.sid, m.seq) for m in members] == [
        ("STDERR", "a/s", "b/r", 7, 40 + i) for i in range(3)
    ]
    assert [bytes(m.frames[0]) for m in members] == parts
    assert members[2] == codec.Stderr(src="a/s", dst="b/r", sid=7, seq=42, frames=(members[2].frames[0],))


def test_a_member_is_the_frozen_message_its_kind_makes() -> None:
    batch = codec.Batch(src="a/s", dst="b/r", sid=7, seq=40, sizes=[2, 3], frames=(b"abcde",))
    member = codec.decode([bytes(f) for f in codec.encode(batch)]).members()[1]  # type: ignore[attr-defined]
    made = codec.Bytes(src="a/s", dst="b/r", sid=7, seq=41, frames=(member.frames[0],))
    assert type(member) is codec.Bytes
    assert member == made and hash(member) == hash(made) and repr(member) == repr(made)
    with pytest.raises(dataclasses.FrozenInstanceError):
        member.seq = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        del member.src  # type: ignore[misc]
    assert member.payload_bytes == 3


@pytest.mark.parametrize(
    ("changes", "frames", "what"),
    [
        ({"sizes": [1, 1]}, [b"abc"], "add up to 2 bytes, its payload frame has 3"),
        ({"sizes": []}, [b""], "no member"),
        ({"sid": 0}, [b"abc"], "outside a stream"),
        ({"of": "OBJECTS"}, [b"abc"], "'of' must be one of BYTES, STDERR"),
        ({"sizes": [3, -1]}, [b"abc"], "'sizes' must hold non-negative"),
        ({"sizes": "3"}, [b"abc"], "'sizes' must be an array"),
        ({"seq": 2**63 - 1, "sizes": [1, 2]}, [b"abc"], "runs past"),
        ({}, [], "exactly 1 payload frame"),
        ({}, [b"ab", b"c"], "exactly 1 payload frame"),
    ],
)
def test_malformed_batches_are_decode_errors(changes: dict[str, object], frames: list[bytes], what: str) -> None:
    header = codec.header_of(codec.Batch(src="a/s", dst="b/r", sid=7, seq=1, sizes=[3]))
    header.update(changes)
    with pytest.raises(DecodeError, match=what):
        codec.decode([msgpack.packb(header), *frames])


# -- on the bus --------------------------------------------------------------------------------


async def test_small_messages_arrive_in_order_each_as_its_own_message_in_fewer_transfers() -> None:
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")
        assert b._router is not None
        transfers_before = b._router.received  # what beta's ROUTER took off the wire
        for i in range(COUNT):
            await stream.send_bytes(chunk(i))
        await stream.send_bytes(b"L" * codec.BATCH_BELOW_BYTES)  # a large one goes alone, after the small ones
        await stream.send_bytes(chunk(COUNT))
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await dst.accept(timeout=WAIT_S)
        got = []
        while (msg := await reader.read(timeout=WAIT_S)) is not None:
            assert type(msg) is codec.Bytes and len(msg.frames) == 1
            got.append((msg.seq, bytes(msg.frames[0])))
        expected = [chunk(i) for i in range(COUNT)] + [b"L" * codec.BATCH_BELOW_BYTES, chunk(COUNT)]
        assert got == list(enumerate(expected, 1))
        assert await closing == sum(map(len, expected))
        # Every small message of a loop pass shared a transfer: far fewer than one per message.
        assert b._router.received - transfers_before < COUNT // 10


async def test_a_client_sends_and_receives_batches_through_its_hub() -> None:
    async with Hub("alpha") as a:
        async with Client(a.ipc_endpoint) as sender, Client(a.ipc_endpoint) as receiver:
            stream = sender.endpoint.open_stream(receiver.endpoint.addr)
            await stream.send_many(chunk(i) for i in range(COUNT))
            closing = asyncio.create_task(stream.close(timeout=WAIT_S))
            reader = await receiver.endpoint.accept(timeout=WAIT_S)
            got: list[bytes] = []
            while chunks := await reader.read_chunks(limit=1000, timeout=WAIT_S):
                assert len(chunks) <= 1000
                got.extend(bytes(c) for c in chunks)
            assert got == [chunk(i) for i in range(COUNT)]
            assert await closing == reader.received == sum(map(len, got))


async def test_credit_is_per_message_inside_a_batch() -> None:
    size = 64
    cost = size + codec.MESSAGE_CREDIT_BYTES
    may_send = -(-codec.INITIAL_CREDIT_BYTES // cost)  # the spec's units, message by message
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")

        async def write_forever() -> None:
            while True:
                await stream.send_many([b"c" * size] * 100)

        writer = asyncio.create_task(write_forever())
        try:
            await until(lambda: stream.cost >= stream.limit)
            assert stream.sent == may_send * size  # not a byte more: it waits for credit mid-batch
            reader = await dst.accept(timeout=WAIT_S)
            taken = 1
            await reader.read(timeout=WAIT_S)
            while taken * cost < codec.INITIAL_CREDIT_BYTES // CREDIT_GRANT_FRACTION:  # when the endpoint grants
                taken += len(await reader.read_chunks(limit=7, timeout=WAIT_S))
            await until(lambda: stream.limit > codec.INITIAL_CREDIT_BYTES)
            assert stream.limit == codec.INITIAL_CREDIT_BYTES + taken * cost
        finally:
            writer.cancel()


async def test_an_undeliverable_batch_is_reported_for_its_first_message() -> None:
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")
        await stream.send_many(chunk(i) for i in range(10))
        reader = await dst.accept(timeout=WAIT_S)
        assert [bytes(c) for c in await reader.read_chunks(timeout=WAIT_S)] == [chunk(i) for i in range(10)]
        dst.close()  # the receiver is gone: the next batch bounces
        await stream.send_many(chunk(i) for i in range(10, 20))
        with pytest.raises(NoRoute, match="no endpoint 'dst'"):
            await until(lambda: stream.failed_seq is not None)
            await stream.send_bytes(b"more")
        assert stream.failed_seq == 11  # the first message that did not arrive; the ten before it did


async def test_a_malformed_batch_gets_a_coded_answer_and_the_stream_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dpipes")
    ctx = zmq.asyncio.Context()
    try:
        async with Hub("alpha") as a, raw_socket(ctx, a.ipc_endpoint) as sock:
            sink = a.endpoint("sink")
            addr = await attach(sock, "batcher")
            bad = codec.header_of(codec.Batch(src=addr, dst="alpha/sink", sid=5, seq=1, sizes=[2, 2]))
            await sock.send_multipart([msgpack.packb(bad), b"abc"])
            error = await answer(sock)
            assert isinstance(error, codec.Error) and error.code == "bad-message"
            assert (error.sid, error.seq) == (5, 1) and "add up to" in error.message
            good = codec.Batch(src=addr, dst="alpha/sink", sid=5, seq=1, sizes=[2, 1], frames=(b"abc",))
            await sock.send_multipart(codec.encode(good))
            reader = await sink.accept(timeout=WAIT_S)
            assert [bytes(c) for c in await reader.read_chunks(timeout=WAIT_S)] == [b"ab", b"c"]
            assert a.stats[addr].bad == 1
    finally:
        ctx.term()
    assert tracebacks(caplog.records) == []


async def test_a_reused_buffer_is_sent_as_it_was_when_sent() -> None:
    async with Hub("alpha") as a:
        src, dst = a.endpoint("src"), a.endpoint("dst")
        stream = src.open_stream("alpha/dst")
        buffer = bytearray(b"first")
        await stream.send_bytes(buffer)
        buffer[:] = b"again"  # before the loop pass ends, as a readinto loop would
        await stream.send_bytes(memoryview(buffer))
        buffer[:] = b"third"
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await dst.accept(timeout=WAIT_S)
        got = []
        while chunks := await reader.read_chunks(timeout=WAIT_S):
            got.extend(bytes(c) for c in chunks)
        assert got == [b"first", b"again"]
        assert await closing == 10


async def test_views_of_other_shapes_are_sent_as_their_bytes() -> None:
    words = memoryview(b"abcdefgh").cast("i")  # read-only, two items of four bytes
    strided = memoryview(b"abcdef")[::2]  # read-only, not contiguous
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")
        for chunk_ in (b"one", words, strided, memoryview(b"plain")):
            await stream.send_bytes(chunk_)
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await dst.accept(timeout=WAIT_S)
        got = []
        while (msg := await reader.read(timeout=WAIT_S)) is not None:
            got.append(bytes(msg.frames[0]))  # type: ignore[attr-defined]
        assert got == [b"one", b"abcdefgh", b"ace", b"plain"]
        assert await closing == reader.received == 19


async def test_read_and_read_chunks_take_turns_inside_one_batch() -> None:
    async with Hub("alpha") as a:
        src, dst = a.endpoint("src"), a.endpoint("dst")
        stream = src.open_stream("alpha/dst")
        for first in (0, 10):  # two batches: two loop passes
            await stream.send_many(chunk(i) for i in range(first, first + 10))
            await asyncio.sleep(0)
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await dst.accept(timeout=WAIT_S)
        got = [(0, bytes(c)) for c in await reader.read_chunks(limit=3, timeout=WAIT_S)]
        while True:
            msg = await reader.read(timeout=WAIT_S)
            if msg is None:
                break
            got.append((msg.seq, bytes(msg.frames[0])))  # type: ignore[attr-defined]
            assert type(msg) is codec.Bytes
            assert msg == codec.Bytes(src="alpha/src", dst="alpha/dst", sid=msg.sid, seq=msg.seq, frames=msg.frames)  # type: ignore[attr-defined]
            with pytest.raises(dataclasses.FrozenInstanceError):
                msg.seq = 0  # type: ignore[misc]
            got += [(0, bytes(c)) for c in await reader.read_chunks(limit=4, timeout=WAIT_S)]
        assert [c for _, c in got] == [chunk(i) for i in range(20)]
        assert [seq for seq, _ in got if seq] == [4, 9, 14, 19]  # read() names each message's own seq
        assert await closing == reader.received


async def test_a_busy_sender_keeps_its_run_open_across_the_passes_it_only_yields() -> None:
    passes = 3  # the sender lets the loop run twice on the way (YIELD_EVERY_MESSAGES each)
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")
        await stream.send_bytes(b"first")  # the stream's first message opens it at beta
        reader = await dst.accept(timeout=WAIT_S)
        assert await reader.read(timeout=WAIT_S) is not None
        assert b._router is not None
        transfers_before = b._router.received
        for i in range(passes * YIELD_EVERY_MESSAGES):
            await stream.send_bytes(chunk(i))
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        got = []
        while (msg := await reader.read(timeout=WAIT_S)) is not None:
            got.append(bytes(msg.frames[0]))  # type: ignore[attr-defined]
        assert got == [chunk(i) for i in range(passes * YIELD_EVERY_MESSAGES)]
        await closing
        assert b._router.received - transfers_before == 2  # one BATCH, not one per pass, and the EOF


async def test_a_sender_that_stops_has_its_run_sent_in_that_pass() -> None:
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        stream = src.open_stream("beta/dst")
        count = YIELD_EVERY_MESSAGES + 10  # it yielded once on the way, with more to send then
        for i in range(count):
            await stream.send_bytes(chunk(i))
        # The sender now waits for something else: what it queued must arrive without more sends.
        reader = await dst.accept(timeout=WAIT_S)
        got = [bytes(c) for c in await reader.read_chunks(timeout=WAIT_S)]
        while len(got) < count:
            got += [bytes(c) for c in await reader.read_chunks(timeout=WAIT_S)]
        assert got == [chunk(i) for i in range(count)]
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        assert await reader.read(timeout=WAIT_S) is None
        assert await closing == reader.received


async def test_a_busy_sender_that_also_sends_large_messages_keeps_one_end_of_pass_pending() -> None:
    passes = 20
    async with linked("alpha", "beta") as (a, b):
        src, dst = a.endpoint("src"), b.endpoint("dst")
        small, large = src.open_stream("beta/dst"), src.open_stream("beta/dst")
        calls = 0
        end_of_pass = src._end_of_pass

        def counted() -> None:
            nonlocal calls
            calls += 1
            end_of_pass()

        src._end_of_pass = counted  # type: ignore[method-assign]
        for _ in range(passes):  # each large message flushes the small ones queued before it
            for i in range(YIELD_EVERY_MESSAGES):
                await small.send_bytes(chunk(i))
            await large.send_bytes(b"L" * codec.BATCH_BELOW_BYTES)
        closing = asyncio.gather(small.close(timeout=WAIT_S), large.close(timeout=WAIT_S))
        for _ in range(2):
            reader = await dst.accept(timeout=WAIT_S)
            while await reader.read(timeout=WAIT_S) is not None:
                pass
        small_bytes = passes * sum(len(chunk(i)) for i in range(YIELD_EVERY_MESSAGES))
        assert await closing == [small_bytes, passes * codec.BATCH_BELOW_BYTES]
        assert calls <= 2 * passes  # one pending per pass, not one more for every flush before it
