"""Arrow record batches through real hubs: exact, zero-copy on arrival, schema once."""

from __future__ import annotations

import asyncio

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import zmq

from dpipes.bus import codec
from dpipes.bus.arrow_stream import ArrowStreamReader, ArrowStreamWriter
from dpipes.bus.errors import StreamError
from dpipes.bus.hub import Hub

WAIT_S = 20.0


def numeric_batch(rows: int) -> pa.RecordBatch:
    cols = {f"f{i}": pc.random(rows) for i in range(4)}
    cols |= {f"i{i}": pc.cast(pc.floor(pc.multiply(pc.random(rows), float(1 << 40))), pa.int64()) for i in range(4)}
    return pa.RecordBatch.from_pydict(cols)


def buffers_of(array: pa.Array) -> list[pa.Buffer]:
    out = [b for b in array.buffers() if b is not None]
    if isinstance(array, pa.DictionaryArray):
        out += buffers_of(array.dictionary)
    return out


async def test_batches_cross_hubs_exactly_and_arrive_zero_copy() -> None:
    batches = [numeric_batch(1_000_000), numeric_batch(10_000), numeric_batch(0)]
    mixed = pa.RecordBatch.from_pydict(
        {
            "s": ["a", None, "ccc"] * 1000,
            "l": [[1, 2], None, []] * 1000,
            "d": pa.array(["x", "y", "x"] * 1000).dictionary_encode(),
        }
    )
    async with Hub("alpha") as a, Hub("beta") as b:
        await a.connect_peer(b.tcp_endpoint)
        src, dst = a.endpoint("src"), b.endpoint("dst")

        # Record the memory of every frame the hub hands to the receiving endpoint.
        received_frames: list[memoryview] = []
        deliver = dst._deliver

        def spy(msg: codec.Message) -> None:
            if isinstance(msg, codec.Arrow):
                received_frames.extend(msg.frames)
            deliver(msg)

        dst._deliver = spy  # type: ignore[method-assign]

        async def send(schema: pa.Schema, items: list[pa.RecordBatch]) -> int:
            writer = ArrowStreamWriter(src.open_stream("beta/dst"), schema, chunk_bytes=8 << 20)
            await writer.write_all(items)
            return await writer.close(timeout=WAIT_S)

        for schema, items in ((batches[0].schema, batches), (mixed.schema, [mixed, mixed.slice(7, 100)])):
            sending = asyncio.create_task(send(schema, items))
            reader = ArrowStreamReader(await dst.accept(timeout=WAIT_S))
            got = [batch async for batch in reader]
            await sending
            assert len(got) == len(items)
            for sent, back in zip(items, got, strict=True):
                assert back.equals(sent)
            assert reader.schema == schema

        ranges = []
        for frame in received_frames:
            if frame.nbytes >= 65536:  # large frames are views of the very zmq.Frame off the socket
                assert isinstance(frame.obj, zmq.Frame)
            address = pa.py_buffer(frame).address
            ranges.append((address, address + frame.nbytes))
        for batch in got:
            for column in batch.columns:
                for buf in buffers_of(column):
                    if buf.size:
                        assert any(lo <= buf.address and buf.address + buf.size <= hi for lo, hi in ranges), (
                            "a received buffer is not inside a received frame: it was copied"
                        )


async def test_schema_travels_once_per_stream() -> None:
    async with Hub("alpha") as a:
        src, dst = a.endpoint("src"), a.endpoint("dst")
        batch = numeric_batch(100)
        writer = ArrowStreamWriter(src.open_stream("alpha/dst"), batch.schema)
        for _ in range(5):
            await writer.write(batch)
        closing = asyncio.create_task(writer.close())
        stream = await dst.accept(timeout=WAIT_S)
        metas = []
        while (msg := await stream.read()) is not None:
            metas.append(msg.arrow)  # type: ignore[attr-defined]
        await closing
        assert ["schema" in m for m in metas] == [True, False, False, False, False]


async def test_a_non_arrow_message_on_an_arrow_stream_is_an_error() -> None:
    async with Hub("alpha") as a:
        src, dst = a.endpoint("src"), a.endpoint("dst")
        out = src.open_stream("alpha/dst")
        await out.send_bytes(b"not arrow")
        reader = ArrowStreamReader(await dst.accept(timeout=WAIT_S))
        with pytest.raises(StreamError, match="carried a BYTES message"):
            await reader.read()
