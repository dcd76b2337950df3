"""Same-host shared memory: large payloads as handles between a client and its hub, zero-copy,
reclaimed when read and when either side is killed, and nothing left behind on the host."""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dpipes.bus import client as client_module
from dpipes.bus import codec, shm, shm_receive
from dpipes.bus.arrow_stream import ArrowStreamReader, ArrowStreamWriter
from dpipes.bus.client import Client
from dpipes.bus.errors import ConfigError, DecodeError, PeerLost
from dpipes.bus.hub import Hub
from dpipes.bus.hub import clients as hub_clients
from dpipes.bus.streams import OutStream
from tests.bus.test_hub import WAIT_S, linked, process, until

MIB = 1 << 20

pytestmark = pytest.mark.skipif(not shm.host_id(), reason="needs Linux memfd_create and /proc")


def chunk(i: int) -> bytes:
    return i.to_bytes(8, "big") * (MIB // 8)


def segments_mapped_here() -> list[str]:
    """This process's mappings of dpipes shared-memory segments (its own or another's)."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if "memfd:dpipes-" in line]


def nothing_mapped_once_the_stash_is_dropped() -> bool:
    """What a closed pool leaves mapped here is only the segments kept for the next pool."""
    shm.drop_stash()
    return segments_mapped_here() == []


@pytest.fixture(autouse=True)
def no_stash_between_tests() -> Iterator[None]:
    shm.drop_stash()
    yield
    shm.drop_stash()


def dev_shm() -> set[str]:
    """Names in /dev/shm, but for what other programs on a shared machine make there meanwhile
    (multiprocessing's semaphores, Zenoh's segments): dpipes' memfds have no name there at all."""
    names = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    return {n for n in names if not n.startswith("sem.") and not n.endswith(".zenoh")}


async def test_a_client_hands_large_payloads_to_its_hub_in_shared_memory_zero_copy() -> None:
    async with Hub("alpha") as a, Client(a.ipc_endpoint) as client:
        sink = a.endpoint("sink")
        stream = client.endpoint.open_stream("alpha/sink")
        for i in range(3):
            await stream.send_bytes(chunk(i))
        await stream.send_bytes(b"small")  # through the socket, as before
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await sink.accept(timeout=WAIT_S)
        pool = client._pool
        assert pool is not None
        first = await reader.read(timeout=WAIT_S)
        assert isinstance(first, codec.Bytes) and first.frames[0].readonly  # a view of the client's segment
        assert bytes(first.frames[0]) == chunk(0) and pool.leased >= 1
        del first
        got = [bytes((await reader.read(timeout=WAIT_S)).frames[0]) for _ in range(3)]  # type: ignore[union-attr]
        assert got == [chunk(1), chunk(2), b"small"]
        assert await reader.read(timeout=WAIT_S) is None
        assert await closing == 3 * MIB + 5
        gc.collect()
        await until(lambda: pool.leased == 0)  # every lease came back once read
        allocated = pool.allocated
        stream = client.endpoint.open_stream("alpha/sink")
        await stream.send_bytes(chunk(9))
        reader = await sink.accept(timeout=WAIT_S)
        assert bytes((await reader.read(timeout=WAIT_S)).frames[0]) == chunk(9)  # type: ignore[union-attr]
        assert pool.allocated == allocated  # the segment was reused, not another one made
    assert nothing_mapped_once_the_stash_is_dropped()


async def test_a_hub_hands_large_payloads_to_its_client_and_arrow_batches_arrive_zero_copy() -> None:
    pa = pytest.importorskip("pyarrow")
    batch = pa.RecordBatch.from_pydict({"x": pa.array(range(300_000), pa.int64()), "y": pa.array([1.5] * 300_000)})
    async with Hub("alpha") as a, Client(a.ipc_endpoint) as client:
        src = a.endpoint("src")
        writer = ArrowStreamWriter(src.open_stream(client.endpoint.addr), batch.schema)

        async def send() -> None:
            await writer.write_all([batch, batch])
            await writer.close(timeout=WAIT_S)

        sending = asyncio.create_task(send())
        received = [b async for b in ArrowStreamReader(await client.endpoint.accept(timeout=WAIT_S))]
        await sending
        assert [b.equals(batch) for b in received] == [True, True]
        assert client._reader is not None and client._reader.mapped_bytes > 0  # it came as handles
        assert a._pool is not None and a._pool.leased >= 1  # the client still holds the batches
        del received
        gc.collect()
        await until(lambda: a._pool is not None and a._pool.leased == 0)


async def test_a_hub_cuts_several_payloads_for_its_client_from_one_segment() -> None:
    async with Hub("alpha") as a, Client(a.ipc_endpoint) as client:
        stream = a.endpoint("src").open_stream(client.endpoint.addr)
        payloads = [chunk(i)[: 600_000 + i] for i in range(3)]  # each over MIN_PAYLOAD_BYTES, under a segment
        for payload in payloads:
            await stream.send_bytes(payload)
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await client.endpoint.accept(timeout=WAIT_S)
        got = [await reader.read(timeout=WAIT_S) for _ in payloads]
        assert [bytes(m.frames[0]) for m in got] == payloads  # type: ignore[union-attr]
        assert all(m.frames[0].readonly for m in got)  # type: ignore[union-attr]
        pool = a._pool
        assert pool is not None and len(pool._by_handle) == 1  # all three in one segment, at offsets
        assert await reader.read(timeout=WAIT_S) is None and await closing == sum(map(len, payloads))
        del got
        gc.collect()
        await until(lambda: pool.leased == 0)


async def test_a_payload_for_another_node_leaves_shared_memory_on_the_way() -> None:
    async with linked("alpha", "beta") as (a, b), Client(a.ipc_endpoint) as client:
        sink = b.endpoint("sink")
        stream = client.endpoint.open_stream("beta/sink")
        await stream.send_bytes(chunk(7))
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await sink.accept(timeout=WAIT_S)
        msg = await reader.read(timeout=WAIT_S)
        assert isinstance(msg, codec.Bytes) and bytes(msg.frames[0]) == chunk(7)
        assert not msg.frames[0].readonly or b._reader.mapped_bytes == 0  # beta never mapped anything
        assert await reader.read(timeout=WAIT_S) is None and await closing == MIB
        pool = client._pool
        assert pool is not None
        await until(lambda: pool.leased == 0)  # alpha copied it out and gave the lease back


async def test_a_byte_chunk_of_several_frames_leaves_shared_memory_as_one_frame() -> None:
    # An Arrow IPC writer's batch is a frame per buffer; as bytes they are one chunk, lying end to
    # end in the lease: every hub on the way and the reader handle it as one frame.
    parts = (chunk(1)[:200_000], chunk(2)[:100_001], chunk(3)[:300_000])
    async with linked("alpha", "beta") as (a, b), Client(a.ipc_endpoint) as client:
        sink = b.endpoint("sink")
        stream = client.endpoint.open_stream("beta/sink")
        await stream.send(codec.Bytes(frames=parts))
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await sink.accept(timeout=WAIT_S)
        msg = await reader.read(timeout=WAIT_S)
        assert isinstance(msg, codec.Bytes) and [bytes(f) for f in msg.frames] == [b"".join(parts)]
        assert await reader.read(timeout=WAIT_S) is None and await closing == sum(map(len, parts))
    assert shm._joined([5, 3, 4, 1], 8) == [8, 5] and shm._joined([9, 2], 8) == [9, 2]


async def test_a_payload_from_another_node_reaches_a_same_host_client_in_its_hubs_shared_memory() -> None:
    async with linked("alpha", "beta") as (a, b), Client(b.ipc_endpoint) as client:
        stream = a.endpoint("src").open_stream(client.endpoint.addr)
        await stream.send_bytes(chunk(3))
        await stream.send_bytes(b"small")  # through the socket, as before
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await client.endpoint.accept(timeout=WAIT_S)
        first = await reader.read(timeout=WAIT_S)
        assert isinstance(first, codec.Bytes) and first.frames[0].readonly  # a view of beta's segment
        assert bytes(first.frames[0]) == chunk(3)
        pool = b._pool
        assert pool is not None and pool.leased == 1
        assert bytes((await reader.read(timeout=WAIT_S)).frames[0]) == b"small"  # type: ignore[union-attr]
        assert await reader.read(timeout=WAIT_S) is None and await closing == MIB + 5
        del first
        gc.collect()
        await until(lambda: pool.leased == 0)  # the client's SHM_FREE for alpha/src stopped at beta


async def test_a_byte_streams_chunks_from_another_node_lie_end_to_end_in_the_hubs_shared_memory() -> None:
    import pyarrow as pa

    size = shm.MIN_PAYLOAD_BYTES + 1  # odd: no padding between them either
    async with linked("alpha", "beta") as (a, b), Client(b.ipc_endpoint) as client:
        stream = a.endpoint("src").open_stream(client.endpoint.addr)
        for i in range(3):
            await stream.send_bytes(chunk(i)[:size])
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await client.endpoint.accept(timeout=WAIT_S)
        got = [await reader.read(timeout=WAIT_S) for _ in range(3)]
        frames = [msg.frames[0] for msg in got if isinstance(msg, codec.Bytes)]
        assert [bytes(f) for f in frames] == [chunk(i)[:size] for i in range(3)]
        addresses = [pa.py_buffer(f).address for f in frames]
        assert addresses[1] == addresses[0] + size and addresses[2] == addresses[1] + size
        assert await reader.read(timeout=WAIT_S) is None and await closing == 3 * size
        del got, frames
        gc.collect()
        pool = b._pool
        assert pool is not None
        await until(lambda: pool.leased == 0)


def test_packed_leases_lie_end_to_end_and_the_next_lease_that_is_not_starts_aligned() -> None:
    pool = shm.Pool()
    try:
        packed = [pool.lease([chunk(i)[: 1000 + i]], "alpha/sink", packed=True) for i in range(3)]
        assert all(lease is not None for lease in packed)
        offsets = [lease.offset for lease in packed if lease is not None]
        assert offsets == [0, 1000, 2001]
        aligned = pool.lease([b"x" * 10], "alpha/sink")
        assert aligned is not None and aligned.offset == shm.LEASE_ALIGN * -(-3003 // shm.LEASE_ALIGN)
        whole = pool.lease([chunk(4)], "alpha/sink", packed=True)  # 1 MiB: still cut from the shared segment
        assert whole is not None and whole.handle == aligned.handle and whole.offset == aligned.offset + 10
        beyond = pool.lease([chunk(5) + b"y"], "alpha/sink", packed=True)  # over PACKED_LEASE_BYTES: its own
        assert beyond is not None and beyond.handle != aligned.handle and beyond.offset == 0
        leases = [*packed, aligned, whole, beyond]
        assert pool.release([lease.id for lease in leases if lease is not None], "alpha/sink") == 6
        assert pool.used == 0
        again = pool.lease([b"z"], "alpha/sink", packed=True)
        assert again is not None and again.offset == 0  # every lease back: the segment is cut afresh
    finally:
        pool.close()


async def test_a_client_attached_under_a_reserved_name_shares_memory_both_ways() -> None:
    async with Hub("alpha") as a:
        a.reserve("p.1")  # a plugin worker's stage address, kept for it before it attaches
        async with Client(a.ipc_endpoint, name="p.1") as worker:
            sink = a.endpoint("sink")
            out = worker.endpoint.open_stream("alpha/sink")
            await out.send_bytes(chunk(1))
            closing = asyncio.create_task(out.close(timeout=WAIT_S))
            reader = await sink.accept(timeout=WAIT_S)
            msg = await reader.read(timeout=WAIT_S)
            assert isinstance(msg, codec.Bytes) and msg.frames[0].readonly  # a view of the worker's segment
            assert worker._pool is not None and worker._pool.leased == 1
            assert await reader.read(timeout=WAIT_S) is None and await closing == MIB
            back = a.endpoint("src").open_stream(worker.endpoint.addr)
            await back.send_bytes(chunk(2))
            got = await (await worker.endpoint.accept(timeout=WAIT_S)).read(timeout=WAIT_S)
            assert isinstance(got, codec.Bytes) and got.frames[0].readonly and bytes(got.frames[0]) == chunk(2)
            back.cancel()


@pytest.mark.parametrize("reserve", [0, 4 * shm.SHARED_SEGMENT_BYTES], ids=["no-reserve", "reserve"])
async def test_a_sender_killed_while_its_payload_is_read_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch, reserve: int
) -> None:
    monkeypatch.setattr(hub_clients, "CLIENT_TIMEOUT_S", 1.0)  # notice the dead client soon
    before = dev_shm()
    async with Hub("alpha") as a:
        sink = a.endpoint("sink")
        async with process("blast", a.ipc_endpoint, "2", str(MIB), "alpha", str(reserve)) as (proc, _addr):
            reader = await sink.accept(timeout=WAIT_S)
            held = [await reader.read(timeout=WAIT_S) for _ in range(2)]
            assert segments_mapped_here() != []  # read in place, in the sender's segments
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        # The memory outlives its creator while read: the views still hold the right bytes.
        assert [bytes(m.frames[0]) for m in held] == [chunk(0), chunk(1)]  # type: ignore[union-attr]
        await until(lambda: not a._clients)  # the hub detached the silent client
        del held, reader
        gc.collect()
        await until(lambda: segments_mapped_here() == [])
    assert dev_shm() == before


async def test_a_receiver_killed_holding_leases_gives_them_all_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "PEER_TIMEOUT_S", 1.0)  # notice the dead hub soon
    before = dev_shm()
    async with process("sink-ipc", "beta") as (proc, ipc):
        async with Client(ipc) as client:
            stream = client.endpoint.open_stream("beta/sink")
            for i in range(3):
                await stream.send_bytes(chunk(i))  # accepted, never read: the leases stay out
            pool = client._pool
            assert pool is not None
            await until(lambda: pool.leased == 3)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            with pytest.raises(PeerLost):
                await client.endpoint.recv(timeout=WAIT_S)
            assert pool.leased == 0  # a dead reader pins nothing
            assert segments_mapped_here() != []  # kept for reuse until the client closes
    assert nothing_mapped_once_the_stash_is_dropped()
    assert dev_shm() == before


async def test_a_client_writes_large_arrow_batches_straight_into_shared_memory_read_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pa = pytest.importorskip("pyarrow")
    from dpipes.bus.arrow import ArrowEncoder

    as_frames: list[int] = []  # rows of the batches encoded as their own buffers
    encode = ArrowEncoder.encode

    def spied(self: ArrowEncoder, batch: pa.RecordBatch) -> list:  # type: ignore[type-arg]
        as_frames.append(batch.num_rows)
        return encode(self, batch)  # a spy: each is still encoded and sent as before

    monkeypatch.setattr(ArrowEncoder, "encode", spied)
    rows = 100_000
    big = pa.RecordBatch.from_pydict(
        {
            "x": pa.array(range(rows), pa.int64()),
            "s": pa.array([None if i % 7 == 0 else f"v{i}" for i in range(rows)]),
            "l": pa.array([[i, i + 1] for i in range(rows)], pa.list_(pa.int32())),
        }
    )
    batches = [big, big.slice(3, rows - 10), big.slice(0, 5)]  # the last is small: it goes as frames
    async with Hub("alpha") as a, Client(a.ipc_endpoint) as client:
        sink = a.endpoint("sink", window=64 * MIB)
        writer = ArrowStreamWriter(client.endpoint.open_stream("alpha/sink"), big.schema)

        async def send() -> None:
            await writer.write_all(batches)
            await writer.close(timeout=WAIT_S)

        sending = asyncio.create_task(send())
        received = [b async for b in ArrowStreamReader(await sink.accept(timeout=WAIT_S))]
        await sending
        assert [b.equals(want) for b, want in zip(received, batches, strict=True)] == [True, True, True]
        assert as_frames == [5]  # the large ones were written as IPC into shared memory
        pool = client._pool
        assert pool is not None and pool.leased == 2  # the two large batches, held by what was read
        segments = [line.split()[0] for line in segments_mapped_here() if " r--s " in line]  # the hub's maps
        inside = [
            any(lo <= buf.address < hi for lo, hi in (map(lambda x: int(x, 16), s.split("-")) for s in segments))
            for buf in received[0].column(0).buffers()
            if buf is not None
        ]
        assert inside and all(inside)  # rebuilt in place, in the client's segment
        del received
        gc.collect()
        await until(lambda: pool.leased == 0)
    assert nothing_mapped_once_the_stash_is_dropped()


async def test_an_arrow_batch_for_another_node_leaves_shared_memory_on_the_way() -> None:
    pa = pytest.importorskip("pyarrow")
    batch = pa.RecordBatch.from_pydict({"x": pa.array(range(100_000), pa.int64())})
    async with linked("alpha", "beta") as (a, b), Client(a.ipc_endpoint) as client:
        sink = b.endpoint("sink")
        writer = ArrowStreamWriter(client.endpoint.open_stream("beta/sink"), batch.schema)
        await writer.write(batch)
        closing = asyncio.create_task(writer.close(timeout=WAIT_S))
        received = [got async for got in ArrowStreamReader(await sink.accept(timeout=WAIT_S))]
        assert [got.equals(batch) for got in received] == [True]
        await closing
        pool = client._pool
        assert pool is not None and pool.allocated > 0 and b._reader.mapped_bytes == 0
        await until(lambda: pool.leased == 0)  # alpha copied it out and gave the lease back


async def test_a_closed_clients_segments_serve_the_next_client_of_the_process() -> None:
    async with Hub("alpha") as a:
        sink = a.endpoint("sink")
        handles = []
        for i in range(2):
            async with Client(a.ipc_endpoint) as client:
                stream = client.endpoint.open_stream("alpha/sink")
                await stream.send_bytes(chunk(i))
                closing = asyncio.create_task(stream.close(timeout=WAIT_S))
                reader = await sink.accept(timeout=WAIT_S)
                assert bytes((await reader.read(timeout=WAIT_S)).frames[0]) == chunk(i)  # type: ignore[union-attr]
                assert await reader.read(timeout=WAIT_S) is None and await closing == MIB
                pool = client._pool
                assert pool is not None
                handles.append(set(pool._by_handle))
            # Closed at once: the client waited for its hub to give the lease back, so that the
            # segment went to the stash instead of being unmapped.
        assert handles[0] == handles[1]  # the second client made no segment: it took the first's
        assert shm._STASH.bytes == MIB  # a 1 MiB chunk had a segment of its own
        assert a._reader.maps == 1  # and the hub read it in the mapping it had parked, not mapped anew
    assert nothing_mapped_once_the_stash_is_dropped()


async def test_a_clients_reserve_is_made_at_attach_serves_a_stream_without_new_segments_and_goes_at_close(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shm, "STASH_BYTES", 2 * shm.SHARED_SEGMENT_BYTES)  # less than the reserve
    reserve = 8 * shm.SHARED_SEGMENT_BYTES  # the stream's window (SHARED_WINDOW_BYTES) and then some
    payloads = [chunk(i)[: 600_000 + i] for i in range(160)]  # 10k-row Arrow batches' size: cut from shared segments
    assert sum(map(len, payloads)) > reserve  # the reserve's segments are cut again and again
    before = dev_shm()
    async with Hub("alpha") as a:
        sink = a.endpoint("sink")
        for run in range(2):
            async with Client(a.ipc_endpoint, shm_reserve=reserve) as client:
                pool = client.shm_pool
                assert pool is not None and pool.allocated == reserve and pool.used == 0  # made at attach
                made, from_stash = pool.made, pool.from_stash
                # The first client made them (pre-faulted); the next took the first's from the stash.
                assert (made, from_stash) == ((8, 0) if run == 0 else (0, 8))
                stream = client.endpoint.open_stream("alpha/sink")

                async def send(stream: OutStream = stream) -> int:
                    for payload in payloads:
                        await stream.send_bytes(payload)
                    return await stream.close(timeout=WAIT_S)

                sending = asyncio.create_task(send())
                reader = await sink.accept(timeout=WAIT_S)
                for i in range(len(payloads)):
                    msg = await reader.read(timeout=WAIT_S)
                    assert isinstance(msg, codec.Bytes) and msg.frames[0].readonly  # in the reserve, in place
                    assert bytes(msg.frames[0][:8]) == payloads[i][:8]
                    del msg
                assert await reader.read(timeout=WAIT_S) is None and await sending == sum(map(len, payloads))
                # No segment was made or taken while the stream ran: the reserve served all of it.
                assert (pool.made, pool.from_stash, pool.allocated) == (made, from_stash, reserve)
                assert pool.fallbacks == 0
            # Closed: the stash keeps the reserve (more than STASH_BYTES) for the next client.
            assert shm._STASH.bytes == reserve
    plain = shm.Pool()  # a pool without a reserve, closing: the stash still keeps no more than the reserve
    lease = plain.lease([chunk(0) * 16], "alpha/sink")  # 16 MiB: larger than any stashed segment, made
    assert lease is not None and plain.made == 1 and plain.release([lease.id], "alpha/sink") == 1
    plain.close()
    # The two oldest reserved ones gave way.
    assert sorted(segment.size for segment in shm._STASH._free) == [shm.SHARED_SEGMENT_BYTES] * 6 + [16 * MIB]
    assert shm._STASH.bytes == reserve
    assert nothing_mapped_once_the_stash_is_dropped()
    assert shm._STASH.reserved == 0  # and the bound is STASH_BYTES again
    assert dev_shm() == before


async def test_a_clients_reserve_serves_a_stream_of_mid_size_arrow_batches_without_new_segments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pa = pytest.importorskip("pyarrow")
    # In flight at most a window of 8 MiB (three batches), the frees not sent back yet (up to
    # FREE_BATCH_BYTES: four more), the one the reader holds and one on its way: each batch takes a
    # reserve segment whole, so a reserve of 12 leaves room for how the loops happen to take turns.
    monkeypatch.setattr(shm, "SHARED_WINDOW_BYTES", 8 * MIB)
    assert shm_receive.FREE_BATCH_BYTES == 8 * MIB  # what the room above is worked out for
    reserve = 12 * shm.SHARED_SEGMENT_BYTES
    rows = 40_000  # 8 int64 columns: 2.56 MB a batch, in a 4 MiB segment's class
    batch = pa.RecordBatch.from_pydict({f"c{i}": pa.array(range(i, i + rows), pa.int64()) for i in range(8)})
    batches = [batch] * 40  # 102 MB, more than the reserve: its segments serve again and again
    async with Hub("alpha") as a, Client(a.ipc_endpoint, shm_reserve=reserve) as client:
        pool = client.shm_pool
        assert pool is not None and (pool.made, pool.allocated) == (12, reserve)
        sink = a.endpoint("sink")
        writer = ArrowStreamWriter(client.endpoint.open_stream("alpha/sink"), batch.schema)

        async def send() -> None:
            await writer.write_all(batches)
            await writer.close(timeout=WAIT_S)

        sending = asyncio.create_task(send())
        arrived = 0
        async for got in ArrowStreamReader(await sink.accept(timeout=WAIT_S)):
            assert got.num_rows == rows
            arrived += 1
        await sending
        assert arrived == len(batches)
        # Every batch went in shared memory, and no segment was made or taken while they did.
        assert (pool.made, pool.from_stash, pool.allocated, pool.fallbacks) == (12, 0, reserve, 0)


async def test_a_reserve_above_the_pools_cap_is_refused_before_attaching() -> None:
    with pytest.raises(ConfigError, match=r"shm_reserve of \d+ bytes .* above the shared-memory pool's cap"):
        Client("ipc:///nowhere", shm_reserve=shm.POOL_BYTES + 1)
    with pytest.raises(ConfigError, match="0 or more"):
        Client("ipc:///nowhere", shm_reserve=-1)
    with pytest.raises(ConfigError, match="above"):
        shm.Pool(limit=4 * shm.SHARED_SEGMENT_BYTES, reserve=4 * shm.SHARED_SEGMENT_BYTES + 1)  # five segments
    assert shm.check_reserve(shm.POOL_BYTES) == shm.POOL_BYTES  # the cap itself may be reserved
    assert shm.check_reserve(1) == shm.SHARED_SEGMENT_BYTES  # whole segments


def test_a_payload_of_another_size_takes_the_room_of_free_reserved_segments_at_the_cap() -> None:
    seg = shm.SHARED_SEGMENT_BYTES
    pool = shm.Pool(limit=4 * seg, reserve=4 * seg)
    try:
        assert pool.fill_reserve() == 4 and pool.allocated == 4 * seg
        assert pool.fill_reserve() == 0  # held already
        small = pool.lease([b"x" * 600_000], "alpha/sink")  # cut from a reserved segment
        assert small is not None and pool.made == 4
        large = pool.lease([b"y" * (2 * seg)], "alpha/sink")  # a segment of its own, where two free ones were
        assert large is not None and pool.made == 5 and pool.allocated == 4 * seg
        assert pool.lease([b"z" * (2 * seg)], "alpha/sink") is None  # what is leased fills the cap: inline
        assert pool.fallbacks == 1 and pool.allocated == 4 * seg
    finally:
        pool.close()


def test_a_mid_size_payload_takes_a_free_reserved_segment_rather_than_a_new_one() -> None:
    seg = shm.SHARED_SEGMENT_BYTES
    pool = shm.Pool(reserve=4 * seg)
    try:
        assert pool.fill_reserve() == 4 and pool.made == 4
        # 2.56 MB: a 10k-row Arrow batch four times over, in a 4 MiB segment's class, of which
        # the pool has none: each takes a reserved segment whole.
        leases = [pool.lease([b"x" * 2_560_000], "alpha/sink") for _ in range(4)]
        assert all(lease is not None and lease.offset == 0 for lease in leases)
        assert len({lease.handle for lease in leases}) == 4  # type: ignore[union-attr]
        assert (pool.made, pool.from_stash, pool.allocated, pool.used) == (4, 0, 4 * seg, 4 * seg)
        assert pool.release([leases[1].id], "alpha/sink") == 1  # type: ignore[union-attr]
        again = pool.lease([b"y" * 2_560_000], "alpha/sink")  # the one given back last
        assert again is not None and again.handle == leases[1].handle  # type: ignore[union-attr]
        # With none free, the pool makes a segment of the payload's own class (under the cap).
        fifth = pool.lease([b"z" * 2_560_000], "alpha/sink")
        assert fifth is not None and pool.made == 5 and pool.allocated == 4 * seg + 4 * MIB
    finally:
        pool.close()


def test_a_payloads_own_segment_may_be_a_larger_free_one_of_the_pool_or_the_stash() -> None:
    first = shm.Pool()
    try:
        lease = first.lease([b"x" * 3_000_000], "alpha/sink")  # a 4 MiB segment, made
        assert lease is not None and first.release([lease.id], "alpha/sink") == 1
        again = first.lease([chunk(0)], "alpha/sink")  # 1 MiB: the free 4 MiB one, not a new one
        assert again is not None and again.handle == lease.handle and first.made == 1
        assert first.release([again.id], "alpha/sink") == 1
    finally:
        first.close()  # its free segment goes to the stash
    second = shm.Pool()
    try:
        taken = second.lease([chunk(1) * 2], "alpha/sink")  # 2 MiB: the stashed 4 MiB segment
        assert taken is not None and taken.handle == lease.handle
        assert (second.made, second.from_stash, second.allocated) == (0, 1, 4 * MIB)
    finally:
        second.close()
    assert nothing_mapped_once_the_stash_is_dropped()


def test_the_stash_gives_back_its_oldest_segments_to_keep_the_last_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "STASH_BYTES", 4 * MIB)
    first = shm.Pool()
    lease = first.lease([chunk(0)], "alpha/sink")  # 1 MiB: a segment of its own
    assert lease is not None and first.release([lease.id], "alpha/sink") == 1
    first.close()
    second = shm.Pool()
    leases = [second.lease([chunk(i) * 2], "alpha/sink") for i in range(2)]  # two 2 MiB segments
    assert second.made == 2  # the stashed 1 MiB one is too small for either
    assert second.release([lease.id for lease in leases if lease is not None], "alpha/sink") == 2
    second.close()
    # The next pool is likelier to need what the last one used than the older 1 MiB segment.
    assert sorted(segment.size for segment in shm._STASH._free) == [2 * MIB, 2 * MIB]
    assert shm._STASH.bytes == 4 * MIB
    assert nothing_mapped_once_the_stash_is_dropped()  # the 1 MiB one was unmapped, not leaked


def test_a_forked_child_keeps_none_of_its_parents_segments() -> None:
    pool = shm.Pool()
    lease = pool.lease([chunk(1)], "alpha/sink")
    assert lease is not None and pool.release([lease.id], "alpha/sink") == 1
    pool.close()
    assert shm._STASH.bytes == MIB  # the 1 MiB chunk's own segment
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # both would write into the same segments
        os.write(write, b"%d %d" % (shm._STASH.bytes, len(segments_mapped_here())))
        os._exit(0)
    os.close(write)
    assert os.read(read, 64) == b"0 0"
    os.close(read)
    os.waitpid(pid, 0)
    assert shm._STASH.bytes == MIB  # the parent's are still there for it


def test_a_payload_filled_in_place_gives_its_lease_back_when_the_writer_fails() -> None:
    pool = shm.Pool(limit=shm.SHARED_SEGMENT_BYTES)
    try:

        def fail(view: memoryview) -> list[int]:
            view[:3] = b"abc"
            raise OSError("write out of bounds")

        with pytest.raises(OSError, match="out of bounds"):
            pool.lease_filled(MIB, "alpha/sink", fail)
        assert pool.leased == 0 and pool.used == 0
        lease = pool.lease_filled(MIB, "alpha/sink", lambda view: [10, 20])
        assert lease is not None and lease.sizes == (10, 20) and pool.leased == 1
        called = []
        big = shm.SHARED_SEGMENT_BYTES  # a segment of its own: over the limit
        assert pool.lease_filled(big, "alpha/sink", lambda view: called.append(1) or [1]) is None  # full
        assert called == [] and pool.fallbacks == 1
        with pytest.raises(ValueError, match="leased"):
            pool.lease_filled(MIB, "alpha/sink", lambda view: [MIB + 1])  # more than it had room for
        assert pool.leased == 1
    finally:
        pool.close()


async def test_a_stream_in_shared_memory_gets_a_wider_window_that_still_stops_its_sender() -> None:
    async with Hub("alpha") as a, Client(a.ipc_endpoint) as client:
        a.endpoint("sink")  # nobody reads: each sender stops where its credit ends
        large = client.endpoint.open_stream("alpha/sink")
        small = client.endpoint.open_stream("alpha/sink")  # 64 KiB chunks go through the socket

        async def write_forever(stream: OutStream, size: int) -> None:
            for i in itertools.count():
                await stream.send_bytes(chunk(i)[:size])

        writers = [
            asyncio.create_task(write_forever(large, MIB)),
            asyncio.create_task(write_forever(small, 64 << 10)),
        ]
        try:
            await until(lambda: large.limit == shm.SHARED_WINDOW_BYTES and large.cost >= large.limit)
            await until(lambda: small.cost >= small.limit)
            for _ in range(3):
                await asyncio.sleep(0)  # the writers had their turn: nothing more went
            cost = MIB + codec.MESSAGE_CREDIT_BYTES
            assert large.sent == -(-shm.SHARED_WINDOW_BYTES // cost) * MIB  # the wider window, not a byte more
            assert small.limit == codec.INITIAL_CREDIT_BYTES  # the window of a stream through the socket
        finally:
            for writer in writers:
                writer.cancel()


async def test_leases_read_are_given_back_in_one_shm_free_per_batch_of_them() -> None:
    sent: list[dict[str, list[int]]] = []
    frees = shm.Frees(sent.append)
    frees.loop = asyncio.get_running_loop()
    for lease in (1, 2, 3):
        frees.add("alpha/src", lease)
    frees.add("beta/src", 9)
    assert sent == []  # not one message per lease
    await until(lambda: sent != [])  # but soon (FREE_DELAY_S)
    assert sent == [{"alpha/src": [1, 2, 3], "beta/src": [9]}]
    sent.clear()
    for lease in range(shm.FREE_BATCH_LEASES):
        frees.add("alpha/src", lease)
    await asyncio.sleep(0)  # a full batch goes at the end of this loop pass, without the delay
    assert sent == [{"alpha/src": list(range(shm.FREE_BATCH_LEASES))}]
    sent.clear()
    frees.add("alpha/src", 1, shm.FREE_BATCH_BYTES // 2)
    frees.add("alpha/src", 2, shm.FREE_BATCH_BYTES // 2)  # few leases, but much memory: back at once
    await asyncio.sleep(0)
    assert sent == [{"alpha/src": [1, 2]}]


async def test_frees_sent_in_full_batches_arm_one_timer_not_one_that_wakes_the_loop_per_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    armed: list[float] = []
    call_later = shm_receive.call_later

    def counting(loop: asyncio.AbstractEventLoop, delay: float, callback: Any) -> bool:
        armed.append(delay)
        return call_later(loop, delay, callback)

    monkeypatch.setattr(shm_receive, "call_later", counting)
    sent: list[dict[str, list[int]]] = []
    frees = shm.Frees(sent.append)
    frees.loop = asyncio.get_running_loop()
    for batch in range(5):  # a stream of 1 MiB leases read eight at a time
        for lease in range(8):
            frees.add("alpha/src", 8 * batch + lease, MIB)
        await asyncio.sleep(0)
    assert sent == [{"alpha/src": list(range(8 * batch, 8 * batch + 8))} for batch in range(5)]
    assert armed == [shm.FREE_DELAY_S]  # by the first lease; each batch then went at once
    frees.add("alpha/src", 99)  # still within FREE_DELAY_S of that one timer
    await until(lambda: len(sent) == 6)
    assert sent[-1] == {"alpha/src": [99]} and len(armed) == 1


def test_a_large_payload_takes_a_segment_of_its_own_and_the_one_given_back_last_is_reused_first() -> None:
    pool = shm.Pool()
    try:
        leases = [pool.lease([chunk(i)], "alpha/sink") for i in range(3)]  # 1 MiB each
        assert all(lease is not None and lease.offset == 0 for lease in leases)
        assert len({lease.handle for lease in leases}) == 3 and pool.allocated == 3 * MIB
        assert pool.release([leases[0].id], "alpha/sink") == 1
        assert pool.release([leases[2].id], "alpha/sink") == 1
        again = pool.lease([chunk(3)], "alpha/sink")
        assert again is not None and again.handle == leases[2].handle and pool.allocated == 3 * MIB
    finally:
        pool.close()


def test_small_payloads_are_cut_end_to_end_from_one_segment_and_it_is_cut_again_once_all_are_back() -> None:
    pool = shm.Pool()
    try:
        leases = [pool.lease([chunk(i)[: 600_000 + i]], "alpha/sink") for i in range(3)]
        assert all(lease is not None for lease in leases)
        assert len({lease.handle for lease in leases}) == 1 and pool.allocated == shm.SHARED_SEGMENT_BYTES
        offsets = [lease.offset for lease in leases]
        assert offsets[0] == 0 and all(o % shm.LEASE_ALIGN == 0 for o in offsets)
        assert all(b - a >= 600_000 for a, b in itertools.pairwise(offsets))  # none overlaps another
        reader = shm.Reader(lambda sender, lease, nbytes: None)
        for i, lease in enumerate(leases):
            (view,) = reader.views("alpha/src", lease.handle, lease.id, lease.sizes, lease.offset)
            assert bytes(view) == chunk(i)[: 600_000 + i]
        assert pool.release([lease.id for lease in leases[:2]], "alpha/sink") == 2
        again = pool.lease([b"x" * 100], "alpha/sink")
        assert again is not None and again.offset > offsets[2]  # one lease is still out: cut after it
        assert pool.release([leases[2].id, again.id], "alpha/sink") == 2
        last = pool.lease([b"y" * 100], "alpha/sink")
        assert last is not None and last.offset == 0 and pool.allocated == shm.SHARED_SEGMENT_BYTES
        reader.close()
    finally:
        pool.close()


def read_and_forget(reader: shm.Reader, sender: str, lease: shm.Lease) -> bytes:
    """What ``sender``'s ``lease`` holds, read through ``reader``, which then forgets ``sender``."""
    (view,) = reader.views(sender, lease.handle, lease.id, lease.sizes, lease.offset)
    read = bytes(view)
    del view
    reader.forget(sender)
    return read


async def test_a_departed_senders_segment_serves_its_processs_next_sender_until_the_process_gives_it_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shm_receive, "PARKED_CHECK_S", 0.01)
    reader = shm.Reader(lambda sender, lease, nbytes: None)
    pool = shm.Pool()
    lease = pool.lease([chunk(0)], "alpha/sink")
    assert lease is not None
    assert read_and_forget(reader, "alpha/one", lease) == chunk(0)
    await asyncio.sleep(0.05)  # looked at several times meanwhile: the process still holds it
    assert read_and_forget(reader, "alpha/two", lease) == chunk(0)
    assert reader.maps == 1 and reader.mapped_bytes == MIB  # mapped once, parked again
    assert pool.release([lease.id], "alpha/sink") == 1
    pool.close()
    shm.drop_stash()  # the process gives the segment back to the kernel: the hub lets go of it too
    await until(lambda: reader.mapped_bytes == 0)
    gc.collect()
    assert segments_mapped_here() == []
    reader.close()


async def test_a_parked_segment_goes_after_a_while_even_if_its_process_still_holds_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shm_receive, "PARKED_CHECK_S", 0.01)
    monkeypatch.setattr(shm_receive, "PARKED_MAX_S", 0.0)
    reader = shm.Reader(lambda sender, lease, nbytes: None)
    pool = shm.Pool()
    try:
        lease = pool.lease([chunk(0)], "alpha/sink")
        assert lease is not None
        assert read_and_forget(reader, "alpha/one", lease) == chunk(0)
        assert reader.mapped_bytes == MIB
        await until(lambda: reader.mapped_bytes == 0)
        assert read_and_forget(reader, "alpha/two", lease) == chunk(0) and reader.maps == 2  # mapped anew
        reader.close()
        assert reader.mapped_bytes == 0
    finally:
        pool.close()


async def test_a_parked_mapping_serves_a_handle_only_while_it_names_the_same_file() -> None:
    reader = shm.Reader(lambda sender, lease, nbytes: None)
    pool = shm.Pool()
    try:
        lease = pool.lease([chunk(0)], "alpha/sink")
        assert lease is not None
        assert read_and_forget(reader, "alpha/one", lease) == chunk(0)
        # Another file, under the same name, at the same descriptor: the same handle names it now.
        _pid, fd, token, size = lease.handle.split(":")
        other = os.memfd_create(f"dpipes-{token}", os.MFD_CLOEXEC)
        os.ftruncate(other, int(size))
        os.dup2(other, int(fd))
        os.close(other)
        assert read_and_forget(reader, "alpha/two", lease) == bytes(MIB)  # the new file's zeros
        assert reader.maps == 2
        reader.close()
    finally:
        pool.close()


def test_a_receiver_refuses_an_offset_that_puts_the_frames_outside_the_segment() -> None:
    pool = shm.Pool()
    try:
        lease = pool.lease([b"z" * 1000], "alpha/sink")
        assert lease is not None
        reader = shm.Reader(lambda sender, lease, nbytes: None)
        size = shm.SHARED_SEGMENT_BYTES
        for offset, sizes in ((size - 10, [11]), (size, [1]), (size + 1, [0]), (-1, [1]), (2**63 - 1, [2])):
            with pytest.raises(DecodeError, match="inside"):
                reader.views("alpha/src", lease.handle, lease.id, sizes, offset)
        (view,) = reader.views("alpha/src", lease.handle, lease.id, [10], size - 10)  # the last bytes: fine
        assert len(view) == 10
        reader.close()
    finally:
        pool.close()


async def test_a_hub_answers_an_shm_whose_offset_leaves_the_segment_with_a_coded_error() -> None:
    async with Hub("alpha") as a, Client(a.ipc_endpoint) as client:
        a.endpoint("sink")
        pool = client._pool
        assert pool is not None
        lease = pool.lease([chunk(1)], "alpha/sink")
        assert lease is not None
        me = client.endpoint.addr
        member = {
            "handle": lease.handle,
            "lease": lease.id,
            "sizes": [MIB],
            "offset": shm.SHARED_SEGMENT_BYTES - MIB + 1,
        }
        forged = codec.packb_shms(me, "alpha/sink", 0, 1, "BYTES", [member])
        client.send_frames("alpha/sink", [forged])
        error = await client.endpoint.recv(timeout=WAIT_S)
        assert isinstance(error, codec.Error) and error.code == "bad-message" and "inside" in error.message
        assert a.stats[me].bad == 1


# -- SHM_BATCH: a stream's handles of one loop pass in one transfer --------------------------------


def spy_kinds(client: Client) -> list[str]:
    """The kinds of the messages ``client`` hands its socket from now on."""
    pump = client._pump
    assert pump is not None
    kinds: list[str] = []
    send = pump.send

    def spying(frames: list[object]) -> None:
        kinds.append(codec.decode_header(frames[0])["kind"])  # type: ignore[arg-type]
        send(frames)  # type: ignore[arg-type]

    pump.send = spying  # type: ignore[method-assign]
    return kinds


def spy_received_kinds(client: Client) -> list[str]:
    """The kinds of the messages ``client`` receives from now on."""
    pump = client._pump
    assert pump is not None
    kinds: list[str] = []
    on_message = pump.on_message

    def spying(frames: list[Any]) -> None:
        kinds.append(codec.decode_header(frames[0].buffer)["kind"])
        on_message(frames)

    pump.on_message = spying
    return kinds


def shm_member(lease: shm.Lease) -> dict[str, object]:
    return {"handle": lease.handle, "lease": lease.id, "sizes": list(lease.sizes), "offset": lease.offset}


def test_a_shm_batch_stands_for_its_members_in_order() -> None:
    members = [{"handle": "1:2:ab:64", "lease": 5, "sizes": [8]}, {"handle": "1:2:ab:64", "lease": 6, "sizes": [3, 4]}]
    arrow = {"handle": "1:3:cd:64", "lease": 7, "sizes": [1], "offset": 8, "fields": {"arrow": {"n": 1}}}
    batch = codec.ShmBatch(src="a/s", dst="a/r", sid=7, seq=40, of="BYTES", members=[*members, arrow])
    decoded = codec.decode([bytes(f) for f in codec.encode(batch)])
    assert decoded == batch and decoded.payload_bytes == 16
    shms = decoded.shms()  # type: ignore[attr-defined]
    assert shms == [
        codec.Shm(src="a/s", dst="a/r", sid=7, seq=40, of="BYTES", handle="1:2:ab:64", lease=5, sizes=[8]),
        codec.Shm(src="a/s", dst="a/r", sid=7, seq=41, of="BYTES", handle="1:2:ab:64", lease=6, sizes=[3, 4]),
        codec.Shm(
            src="a/s", dst="a/r", sid=7, seq=42, of="BYTES", handle="1:3:cd:64", lease=7, sizes=[1], offset=8,
            fields={"arrow": {"n": 1}},
        ),
    ]  # fmt: skip
    one = codec.decode([codec.packb_shms("a/s", "a/r", 7, 40, "BYTES", members[:1])])
    assert one == shms[0]  # one member: a plain SHM


@pytest.mark.parametrize(
    ("changes", "what"),
    [
        ({"members": []}, "no member"),
        ({"members": [{"lease": 1}, 3]}, "must hold maps"),
        ({"members": {"lease": 1}}, "must be an array"),
        ({"members": [{"lease": -1}]}, "'members.lease' must be a non-negative"),
        ({"members": [{"handle": 5}]}, "'members.handle' must be a string"),
        ({"members": [{"sizes": [1, "2"]}]}, "'members.sizes' must hold non-negative"),
        ({"members": [{"fields": []}]}, "'members.fields' must be a map"),
        ({"sid": 0}, "outside a stream"),
        ({"of": "BATCH"}, "'of' must be one of"),
        ({"seq": 2**63 - 1, "members": [{}, {}]}, "runs past"),
    ],
)
def test_malformed_shm_batches_are_decode_errors(changes: dict[str, object], what: str) -> None:
    header = codec.header_of(codec.ShmBatch(src="a/s", dst="a/r", sid=7, seq=1, members=[{"lease": 1}]))
    header.update(changes)
    with pytest.raises(DecodeError, match=what):
        codec.decode([codec._packb(header)])


async def test_a_streams_handles_of_one_loop_pass_travel_as_one_shm_batch_and_arrive_in_order() -> None:
    async with Hub("alpha") as a, Client(a.ipc_endpoint) as client:
        sink = a.endpoint("sink")
        kinds = spy_kinds(client)
        stream = client.endpoint.open_stream("alpha/sink")
        await stream.send_many([chunk(i) for i in range(3)])  # one pass: no yield, no credit wait
        await stream.send_bytes(b"small")  # behind them, through the socket
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await sink.accept(timeout=WAIT_S)
        got = [bytes(m.frames[0]) async for m in reader]  # type: ignore[attr-defined]
        assert got == [chunk(0), chunk(1), chunk(2), b"small"]
        assert await closing == 3 * MIB + 5
        assert kinds[:2] == ["SHM_BATCH", "BYTES"]  # three handles, one transfer
        pool = client._pool
        assert pool is not None
        gc.collect()
        await until(lambda: pool.leased == 0)  # every member's lease came back once read


async def test_a_shm_batch_reaches_a_same_host_client_whole_or_as_shms_if_it_takes_no_batches() -> None:
    async with (
        Hub("alpha") as a,
        Client(a.ipc_endpoint) as sender,
        Client(a.ipc_endpoint) as new,
        Client(a.ipc_endpoint) as old,
    ):
        held = a._local[codec.split_addr(old.endpoint.addr)[1]]
        assert isinstance(held, hub_clients._Client) and held.shm_batch
        held.shm_batch = False  # a client of before SHM_BATCH: it did not say ATTACH.shm_batch
        for receiver in (new, old):
            kinds, received = spy_kinds(sender), spy_received_kinds(receiver)
            stream = sender.endpoint.open_stream(receiver.endpoint.addr)
            await stream.send_many([chunk(i) for i in range(3)])
            closing = asyncio.create_task(stream.close(timeout=WAIT_S))
            reader = await receiver.endpoint.accept(timeout=WAIT_S)
            got = [(m.seq, bytes(m.frames[0])) async for m in reader]  # type: ignore[attr-defined]
            assert got == [(1, chunk(0)), (2, chunk(1)), (3, chunk(2))]
            assert await closing == 3 * MIB and kinds[0] == "SHM_BATCH"
            handles = [kind for kind in received if kind in ("SHM", "SHM_BATCH")]
            assert handles == (["SHM_BATCH"] if receiver is new else ["SHM", "SHM", "SHM"])
            assert receiver._reader is not None and receiver._reader.mapped_bytes  # zero-copy, as handles
        pool = sender._pool
        assert pool is not None
        gc.collect()
        await until(lambda: pool.leased == 0)


async def test_a_shm_batch_for_another_node_leaves_shared_memory_message_by_message() -> None:
    async with linked("alpha", "beta") as (a, b), Client(a.ipc_endpoint) as client:
        sink = b.endpoint("sink")
        kinds = spy_kinds(client)
        stream = client.endpoint.open_stream("beta/sink")
        await stream.send_many([chunk(i) for i in range(3)])
        closing = asyncio.create_task(stream.close(timeout=WAIT_S))
        reader = await sink.accept(timeout=WAIT_S)
        got = [(m.seq, bytes(m.frames[0])) async for m in reader]  # type: ignore[attr-defined]
        assert got == [(1, chunk(0)), (2, chunk(1)), (3, chunk(2))] and kinds[0] == "SHM_BATCH"
        assert await closing == 3 * MIB and b._reader.mapped_bytes == 0
        pool = client._pool
        assert pool is not None
        await until(lambda: pool.leased == 0)  # alpha copied each out and gave the leases back


async def test_a_hub_answers_a_shm_batch_with_a_member_outside_its_segment_and_delivers_none_of_it() -> None:
    async with Hub("alpha") as a, Client(a.ipc_endpoint) as client:
        sink = a.endpoint("sink")
        pool = client._pool
        assert pool is not None
        good, bad = pool.lease([chunk(1)], "alpha/sink"), pool.lease([chunk(2)], "alpha/sink")
        assert good is not None and bad is not None
        me = client.endpoint.addr
        forged = codec.packb_shms(me, "alpha/sink", 5, 1, "BYTES", [shm_member(good), {**shm_member(bad), "offset": 1}])
        client.send_frames("alpha/sink", [forged])
        error = await client.endpoint.recv(timeout=WAIT_S)
        assert isinstance(error, codec.Error) and error.code == "bad-message" and "inside" in error.message
        assert a.stats[me].bad == 1 and sink._in == {}  # not even the sound member reached the endpoint


async def test_a_hubs_handles_of_one_loop_pass_for_a_client_travel_as_one_shm_batch() -> None:
    async with Hub("alpha") as a, Client(a.ipc_endpoint) as new, Client(a.ipc_endpoint) as old:
        held = a._local[codec.split_addr(old.endpoint.addr)[1]]
        assert isinstance(held, hub_clients._Client)
        held.shm_batch = False  # a client of before SHM_BATCH: it did not say ATTACH.shm_batch
        for receiver in (new, old):
            received = spy_received_kinds(receiver)
            stream = a.endpoint(f"src-{len(received)}-{id(receiver)}").open_stream(receiver.endpoint.addr)
            await stream.send_many([chunk(i) for i in range(3)])  # one pass: leased, then sent at its end
            closing = asyncio.create_task(stream.close(timeout=WAIT_S))
            reader = await receiver.endpoint.accept(timeout=WAIT_S)
            got = [(m.seq, bytes(m.frames[0])) async for m in reader]  # type: ignore[attr-defined]
            assert got == [(1, chunk(0)), (2, chunk(1)), (3, chunk(2))] and await closing == 3 * MIB
            handles = [kind for kind in received if kind in ("SHM", "SHM_BATCH")]
            assert handles == (["SHM_BATCH"] if receiver is new else ["SHM", "SHM", "SHM"])
        pool = a._pool
        assert pool is not None
        gc.collect()
        await until(lambda: pool.leased == 0)
