"""A batch of small messages on the tap: one hub event on the wire, the same per-message output in
every reader (echo, hz, bw), and losses still counted in messages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from dpipes.bus import codec, tap
from dpipes.bus.hub import Hub
from dpipes.nodes.tap import verbs
from dpipes.nodes.tap.source import TapSource, Target
from dpipes.nodes.tap.view import Decoder

WAIT_S = 30.0  # a generous bound for a loaded machine; every wait ends as soon as its condition holds
CHUNKS = [b"line %d\n" % i for i in range(40)] + [b"", b"a longer line " * 30]  # one BATCH: < 256 messages


async def until(condition: Any) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT_S)


async def first(outs: AsyncIterator[verbs.Out], want: Any) -> dict[str, Any]:
    """The first JSON report of ``outs`` that ``want`` accepts."""

    async def look() -> dict[str, Any]:
        async for out in outs:
            report = json.loads(out.text)
            if not out.notice and want(report):
                return report
        raise AssertionError("the reports ended")

    return await asyncio.wait_for(look(), WAIT_S)


async def subscribed(hub: Hub, sources: list[TapSource], wire: zmq.asyncio.Socket) -> None:
    """Wait until every reader gets the hub's events (the hub cannot tell how many subscribe):
    send probes to an endpoint nobody shows until each has seen one, then drop what they read."""
    probe, _sink = hub.endpoint("probe"), hub.endpoint("probe-sink")
    stream = probe.open_stream("alpha/probe-sink")
    seen = [False] * (len(sources) + 1)

    async def poll() -> None:
        while not all(seen):
            await stream.send_bytes(b"probe")
            for i, source in enumerate(sources):
                while await source.next(0.01) is not None:
                    seen[i] = True
            while await wire.poll(10):
                await wire.recv()
                seen[-1] = True

    await asyncio.wait_for(poll(), WAIT_S)


def alone(stream_sid: int, t: float, n: int) -> list[str]:
    """``echo``'s lines for CHUNKS as version 1 published them: one event per message."""
    decoder, lines = Decoder(), []
    for i, chunk in enumerate(CHUNKS):
        frames = codec.encode(codec.Bytes(src="alpha/src", dst="alpha/dst", sid=stream_sid, seq=1 + i, frames=(chunk,)))
        event = tap.decode_event(tap.encode_event("alpha", n + i, codec.decode_header(frames[0]), frames[1:], now=t))
        lines.append(verbs.render(decoder.decode(event), event, fields=(), raw=False, as_json=False))
    return lines


async def test_a_batch_is_one_hub_event_and_echo_hz_bw_show_its_messages() -> None:
    async with Hub("alpha") as hub:
        target = Target("alpha", hub.tap_endpoint)
        ctx = zmq.asyncio.Context()
        wire = ctx.socket(zmq.SUB)  # what the hub sends, undecoded
        wire.connect(hub.tap_endpoint)
        wire.subscribe(b"")
        try:
            async with TapSource([target]) as for_echo, TapSource([target]) as for_hz, TapSource([target]) as for_bw:
                await subscribed(hub, [for_echo, for_hz, for_bw], wire)
                src, dst = hub.endpoint("src"), hub.endpoint("dst")
                stream = src.open_stream("alpha/dst")
                echo = verbs.echo(for_echo, verbs.Selection(what=["alpha/dst"]), count=len(CHUNKS))
                hz = verbs.rates(for_hz, ["alpha/dst"], bandwidth=False, window=1000, as_json=True)
                bw = verbs.rates(for_bw, ["alpha/dst"], bandwidth=True, window=1000, as_json=True)
                await stream.send_many(CHUNKS)  # one loop pass: one BATCH
                reader = await dst.accept()
                got: list[bytes] = []
                while len(got) < len(CHUNKS):
                    got += [bytes(c) for c in await reader.read_chunks()]
                await stream.send_bytes(b"after\n")  # ...and one message after it, on its own
                got += [bytes(c) for c in await reader.read_chunks()]
                assert got == [*CHUNKS, b"after\n"]

                data_events = []
                while len(data_events) < 2:
                    event = tap.decode_wire(await asyncio.wait_for(wire.recv(), WAIT_S))
                    if event.dst == "alpha/dst":
                        data_events.append(event)
                batch, after = data_events  # the hub sent one event for all of CHUNKS
                assert isinstance(batch, tap.TapBatch) and len(batch.sizes) == len(CHUNKS)
                assert isinstance(after, tap.TapEvent) and after.n == batch.n + len(CHUNKS)

                lines = [out.text async for out in echo]
                assert lines == alone(stream.sid, batch.t, batch.n)

                hz_report = await first(hz, lambda r: r.get("messages", 0) >= len(CHUNKS) + 1)
                bw_report = await first(bw, lambda r: r.get("messages", 0) >= len(CHUNKS) + 1)
                sizes = [len(c) for c in CHUNKS] + [len(b"after\n")]
                assert hz_report["messages"] == bw_report["messages"] == len(sizes)
                assert (bw_report["min"], bw_report["max"]) == (min(sizes), max(sizes))
                assert bw_report["mean"] == sum(sizes) / len(sizes)
                assert for_echo.dropped == for_hz.dropped == for_bw.dropped == 0
                await hz.aclose()
                await bw.aclose()
        finally:
            wire.close(0)
            ctx.term()


async def test_a_lost_batch_event_is_counted_as_its_messages(tmp_path: Path) -> None:
    ctx = zmq.asyncio.Context()
    hub = ctx.socket(zmq.XPUB)  # stands in for a hub's tap: it sends events made by hand
    hub.setsockopt(zmq.LINGER, 0)
    hub.bind(f"ipc://{tmp_path}/tap.sock")

    def single(n: int) -> bytes:
        return tap.TapEvent(t=1.0, node="alpha", n=n, kind="BYTES", src="alpha/a", dst="alpha/b", sid=1, seq=n).encode()

    def batch(n: int, members: int) -> bytes:
        return tap.TapBatch(
            t=1.0, node="alpha", n=n, of="BYTES", src="alpha/a", dst="alpha/b", sid=1, seq=n, sizes=(1,) * members,
            sample=b"x" * members, sampled=members, sample_bytes=tap.DEFAULT_SAMPLE_BYTES,
        ).encode()  # fmt: skip

    try:
        async with TapSource([Target("alpha", f"ipc://{tmp_path}/tap.sock")]) as source:
            await asyncio.wait_for(hub.recv(), WAIT_S)  # the reader's subscription
            for data in (single(0), batch(1, 3), single(4), single(9), batch(10, 2), single(12)):  # 5..8 lost
                await hub.send(data)
            numbers = []
            while len(numbers) < 9:
                event = await source.next(WAIT_S)
                assert event is not None
                numbers.append(event.n)
            assert numbers == [0, 1, 2, 3, 4, 9, 10, 11, 12]
            assert (source.received, source.dropped) == (9, 4)
    finally:
        hub.close(0)
        ctx.term()
