"""Tap events: the spec's round trip, bounds, hostile input, the schema, and a hub's mirror."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import jsonschema
import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import given
from hypothesis import strategies as st

from dpipes.bus import codec, tap
from dpipes.bus.errors import DecodeError
from dpipes.bus.hub import Hub

SCHEMA_FILE = Path(tap.__file__).with_name("tap_schema.json")
WAIT_S = 10.0


async def until(condition: object, timeout: float = WAIT_S) -> None:
    async def poll() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def test_schema_file_is_current() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json.loads(tap.schema_text())


MESSAGES = [
    codec.Request(src="a/c", dst="a/ctl", seq=7, method="run", body={"pipeline": "seq 3 | sort@b"}),
    codec.Reply(src="a/ctl", dst="a/c", seq=7, ok=False, body={"code": "syntax"}, error="bad"),
    codec.Credit(src="b/p.1", dst="a/p.0", sid=3, bytes=65536),
    codec.Eof(src="a/p.0", dst="b/p.1", sid=3, seq=9, total=123),
    codec.Cancel(src="b/p.1", dst="a/p.0", sid=3, reason="head has enough"),
    codec.Error(src="a/", dst="a/c", code="no-route", message="no link", node="a", to="z/x"),
    codec.Bytes(src="a/p.0", dst="b/p.1", sid=3, seq=1, frames=(b"hello ", b"world\n")),
    codec.Objects(src="a/p.0", dst="b/p.1", sid=3, count=1, meta={"dp.node": "a"}, frames=(msgpack.packb([{"x": 1}]),)),
    codec.Pipes(src="b/p.1", dst="a/c", sid=5, stage=1, frames=(b'{"message": {"method": "log"}}',)),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: m.KIND)
def test_an_event_says_what_was_routed_and_validates(msg: codec.Message) -> None:
    frames = codec.encode(msg)
    data = tap.encode_event("a", 42, codec.decode_header(frames[0]), frames[1:], now=1.5)
    event = tap.decode_event(data)
    assert (event.node, event.n, event.t, event.kind) == ("a", 42, 1.5, msg.KIND)
    assert (event.src, event.dst, event.sid, event.seq) == (msg.src, msg.dst, msg.sid, msg.seq)
    assert event.size == msg.payload_bytes and event.frames == len(frames) - 1
    assert event.fields == {name: getattr(msg, name) for name, _c, _d in msg._SPEC}
    assert event.encode() == data  # decode and encode are inverses
    jsonschema.validate(msgpack.unpackb(data), json.loads(SCHEMA_FILE.read_text()))
    if msg.KIND == "BYTES":
        assert event.sample == b"hello world\n"
    if msg.KIND == "PIPES":
        assert event.pipes == ('{"message": {"method": "log"}}',)


def test_a_sample_is_bounded_whatever_the_payload() -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    header = codec.header_of(codec.Bytes(src="a/x", dst="b/y", sid=1))
    data = tap.encode_event("a", 0, header, [chunk] * 64, sample_bytes=300)
    event = tap.decode_event(data)
    assert event.size == 64 << 20 and event.frames == 64
    assert event.sample == chunk[:300]
    assert len(data) < 1024
    small = tap.decode_event(tap.encode_event("a", 0, header, [b"ab", b"", b"cd"], sample_bytes=3))
    assert small.sample == b"abc"  # frames concatenated


def test_a_large_pipes_message_is_counted_not_copied() -> None:
    header = codec.header_of(codec.Pipes(src="a/x", dst="b/y", sid=1))
    event = tap.decode_event(tap.encode_event("a", 0, header, [b"x" * (tap.PIPES_MAX_BYTES + 1)]))
    assert event.pipes is None and event.size == tap.PIPES_MAX_BYTES + 1


@given(st.binary(max_size=200))
def test_garbage_is_refused_with_a_decode_error(data: bytes) -> None:
    try:
        tap.decode_event(data)
    except tap.TapDecodeError:
        pass


GOOD = tap.TapEvent(t=0.0, node="a", n=0, kind="BYTES", src="a/x", dst="b/y", sample=b"").to_map()


@given(
    st.sampled_from(sorted(GOOD)),
    st.one_of(st.none(), st.integers(-5, 2**64 - 1), st.text(max_size=5), st.binary(max_size=5), st.floats()),
)
def test_ill_typed_events_are_refused(key: str, value: object) -> None:
    try:
        event = tap.decode_event(msgpack.packb({**GOOD, key: value}))
    except tap.TapDecodeError:
        return
    assert isinstance(event.node, str) and event.n >= 0 and isinstance(event.fields, dict)


def test_over_the_limits_is_refused() -> None:
    for bad in ({"sample": b"x" * (tap.MAX_SAMPLE_BYTES * 2)}, {"node": "n" * 5000}, {"v": 3}, {"sid": -1}):
        with pytest.raises(tap.TapDecodeError):
            tap.decode_event(msgpack.packb({**GOOD, **bad}))


async def test_a_hub_samples_what_its_subscribers_ask_for_and_numbers_its_events() -> None:
    async with Hub("alpha") as hub:
        src, dst = hub.endpoint("src"), hub.endpoint("dst")
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.connect(hub.tap_endpoint)
        sub.subscribe(b"")
        sub.subscribe(b"sample=1000")
        try:
            await until(lambda: b"sample=1000" in hub._tap_topics)
            stream = src.open_stream("alpha/dst")
            await stream.send_bytes(b"y" * 5000)
            reader = await dst.accept()
            await reader.read()
            events = []
            while not any(e.kind == "BYTES" for e in events):
                events.append(tap.decode_event(await asyncio.wait_for(sub.recv(), WAIT_S)))
            data = next(e for e in events if e.kind == "BYTES")
            assert data.sample == b"y" * 1000 and data.size == 5000
            assert [e.n for e in events] == list(range(events[0].n, events[0].n + len(events)))
            sub.unsubscribe(b"sample=1000")
            await until(lambda: b"sample=1000" not in hub._tap_topics)
            await stream.send_bytes(b"z" * 5000)
            while (event := tap.decode_event(await asyncio.wait_for(sub.recv(), WAIT_S))).kind != "BYTES":
                pass
            assert event.sample == b"z" * tap.DEFAULT_SAMPLE_BYTES
        finally:
            sub.close(0)
            ctx.term()


def test_a_header_that_leaves_out_common_keys_never_reaches_the_tap() -> None:
    # The codec refuses it at the boundary (every common key is required), so the hub never
    # routes it and no event is made of it.
    with pytest.raises(DecodeError, match="'src' is missing"):
        codec.decode_header(msgpack.packb({"v": codec.PROTOCOL_VERSION, "kind": "BYTES"}))




async def test_a_batch_is_tapped_as_its_messages() -> None:
    async with Hub("alpha") as hub:
        src, dst = hub.endpoint("src"), hub.endpoint("dst")
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.connect(hub.tap_endpoint)
        sub.subscribe(b"")
        try:
            await until(lambda: hub.tapped)
            stream = src.open_stream("alpha/dst")
            await stream.send_many([b"one", b"two!", b"three"])  # one loop pass: one BATCH
            reader = await dst.accept()
            assert [bytes(c) for c in await reader.read_chunks()] == [b"one", b"two!", b"three"]
            events = []
            while len(events) < 3:
                data = await asyncio.wait_for(sub.recv(), WAIT_S)
                events += [e for e in tap.decode_events(data) if e.sid == stream.sid]
            assert [(e.kind, e.seq, e.size, e.sample) for e in events] == [
                ("BYTES", 1, 3, b"one"),
                ("BYTES", 2, 4, b"two!"),
                ("BYTES", 3, 5, b"three"),
            ]
            assert [e.n for e in events] == list(range(events[0].n, events[0].n + 3))
        finally:
            sub.close(0)
            ctx.term()


async def test_a_batch_sent_to_a_peer_is_tapped_as_each_member_alone() -> None:
    # The hub mirrors what its endpoints send to a peer as they encoded it (no decoding again);
    # each member's event is still exactly what encode_event makes of that message alone, with
    # the sample at the size a subscriber asked for.
    async with Hub("alpha") as a, Hub("beta") as b:
        await a.connect_peer(b.tcp_endpoint)
        src, dst = a.endpoint("src"), b.endpoint("dst")
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.connect(a.tap_endpoint)
        sub.subscribe(b"")
        sub.subscribe(tap.SAMPLE_TOPIC + b"2")
        try:
            await until(lambda: a.tapped and a._tap_mirror is not None and a._tap_mirror.sample_bytes == 2)
            stream = src.open_stream("beta/dst")
            chunks = [b"one", b"two!", b"x"]
            await stream.send_many(chunks)  # one loop pass: one BATCH
            reader = await dst.accept()
            assert [bytes(c) for c in await reader.read_chunks()] == chunks
            events = []
            while len(events) < len(chunks):
                data = await asyncio.wait_for(sub.recv(), WAIT_S)
                events += [e for e in tap.decode_events(data) if e.sid == stream.sid]
            for event, (seq, chunk) in zip(events, enumerate(chunks, 1), strict=True):
                alone = codec.Bytes(src="alpha/src", dst="beta/dst", sid=stream.sid, seq=seq, frames=(chunk,))
                frames = codec.encode(alone)
                expected = tap.encode_event(
                    "alpha", event.n, codec.decode_header(frames[0]), frames[1:], sample_bytes=2, now=event.t
                )
                assert event.encode() == expected
            assert [e.n for e in events] == list(range(events[0].n, events[0].n + len(chunks)))
        finally:
            sub.close(0)
            ctx.term()


async def test_a_hub_re_publishes_replayed_events_and_drops_bad_ones() -> None:
    async with Hub("alpha") as hub:
        ctx = zmq.asyncio.Context()
        sub, up = ctx.socket(zmq.SUB), ctx.socket(zmq.XSUB)  # a reader, and a replay sending up
        sub.connect(hub.tap_endpoint)
        sub.subscribe(b"")
        up.connect(hub.tap_endpoint)
        try:
            await until(lambda: hub.tapped)
            msg = codec.Bytes(src="a/p.0", dst="b/p.1", sid=1, seq=3, frames=(b"recorded\n",))
            frames = codec.encode(msg)
            recorded = tap.encode_event("a", 41, codec.decode_header(frames[0]), frames[1:], now=1.5)
            for bad in (msgpack.packb(["not", "an", "event"]), recorded[:-3]):
                await up.send(bad)
            await up.send_multipart([recorded, b"a second frame"])
            await up.send(recorded)
            event = tap.decode_event(await asyncio.wait_for(sub.recv(), WAIT_S))
            assert event.replay and event == dataclasses.replace(tap.decode_event(recorded), replay=True)
            mirror = hub._tap_mirror
            assert mirror is not None and (mirror.replayed, mirror.bad_replays, mirror.n) == (1, 3, 0)
            jsonschema.validate(msgpack.unpackb(event.encode()), json.loads(SCHEMA_FILE.read_text()))
        finally:
            sub.close(0)
            up.close(0)
            ctx.term()


def member_events(node: str, n: int, batch: codec.Batch, *, sample_bytes: int, now: float) -> list[tap.TapEvent]:
    """What version 1 published for ``batch``: each member's event as if it had travelled alone."""
    out = []
    for i, member in enumerate(batch.members()):
        frames = codec.encode(member)
        header = codec.decode_header(frames[0])
        data = tap.encode_event(node, n + i, header, frames[1:], sample_bytes=sample_bytes, now=now)
        out.append(tap.decode_event(data))
    return out


class Pair:
    """A connected inproc PAIR: what a Mirror sends on one end arrives, in order, at the other."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.send, self.recv = self.ctx.socket(zmq.PAIR), self.ctx.socket(zmq.PAIR)
        self.recv.bind("inproc://tap-test")
        self.send.connect("inproc://tap-test")

    def events(self) -> list[bytes]:
        out = []
        while self.recv.poll(0):
            out.append(self.recv.recv())
        return out

    def close(self) -> None:
        self.send.close(0)
        self.recv.close(0)
        self.ctx.term()


def publish(mirror: tap.Mirror, pair: Pair, msg: codec.Message) -> None:
    frames = codec.encode(msg)
    mirror.publish(pair.send, codec.decode_header(frames[0]), [zmq.Frame(f) for f in frames[1:]])


def test_a_batch_is_one_event_that_expands_to_the_events_of_its_members() -> None:
    chunks = [b"%d\n" % i for i in range(100)] + [b"", b"x" * 300]  # an empty member, one past the sample
    batch = codec.Batch(
        src="a/p.0", dst="b/p.1", sid=7, seq=40, sizes=[len(c) for c in chunks], frames=(b"".join(chunks),)
    )
    after = codec.Bytes(src="a/p.0", dst="b/p.1", sid=7, seq=142, frames=(b"after\n",))
    pair, mirror = Pair(), tap.Mirror("a")
    try:
        publish(mirror, pair, batch)
        publish(mirror, pair, after)
        first, second = pair.events()  # one event for the 102 messages of the batch, one for the next
    finally:
        pair.close()
    wire = tap.decode_wire(first)
    assert isinstance(wire, tap.TapBatch) and wire.encode() == first
    jsonschema.validate(msgpack.unpackb(first), json.loads(SCHEMA_FILE.read_text()))
    members = tap.decode_events(first)
    assert members == member_events("a", 0, batch, sample_bytes=tap.DEFAULT_SAMPLE_BYTES, now=wire.t)
    assert members[-1].sample == b"x" * tap.DEFAULT_SAMPLE_BYTES and members[-1].size == 300
    assert tap.decode_event(second).n == len(chunks)  # the batch took one number per member
    assert mirror.n == len(chunks) + 1
    with pytest.raises(tap.TapDecodeError, match="decode_events"):
        tap.decode_event(first)


def test_a_batch_samples_its_first_members_within_the_bound_and_at_the_asked_size() -> None:
    size = 1000
    count = tap.BATCH_SAMPLE_BYTES // size + 10  # more than the bound holds, even at a 1000-byte sample
    chunks = [bytes([i % 256]) * size for i in range(count)]
    batch = codec.Batch(src="a/p.0", dst="b/p.1", sid=7, seq=1, sizes=[size] * count, frames=(b"".join(chunks),))
    pair = Pair()
    try:
        for asked in (10, size):
            mirror = tap.Mirror("a")
            mirror.on_subscription(tap.SAMPLE_TOPIC + str(asked).encode(), True)
            publish(mirror, pair, batch)
            (data,) = pair.events()
            assert len(data) < tap.BATCH_SAMPLE_BYTES + 4 * count + 1024
            members = tap.decode_events(data)
            assert [m.size for m in members] == [size] * count
            sampled = [m for m in members if m.sample is not None]
            assert [m.sample for m in sampled] == [c[:asked] for c in chunks[: len(sampled)]]
            assert all(m.sample is None for m in members[len(sampled) :])
            assert len(sampled) == min(count, tap.BATCH_SAMPLE_BYTES // asked)
    finally:
        pair.close()


def test_a_batch_whose_sizes_do_not_fit_is_one_plain_batch_event() -> None:
    pair, mirror = Pair(), tap.Mirror("a")
    header = {"v": codec.PROTOCOL_VERSION, "kind": "BATCH", "src": "a/x", "dst": "b/y", "sid": 1, "seq": 1}
    try:
        for bad in ({"of": "BYTES", "sizes": [3, 3]}, {"of": "OBJECTS", "sizes": [5]}, {"of": "BYTES", "sizes": [5.0]},
                    {"of": "BYTES", "sizes": [-1, 6]}, {"of": "BYTES", "sizes": []}):  # fmt: skip
            mirror.publish(pair.send, {**header, **bad}, [zmq.Frame(b"hello")])
            (data,) = pair.events()
            event = tap.decode_event(data)  # one message, of kind BATCH
            assert (event.kind, event.size, event.fields) == ("BATCH", 5, bad)
        assert mirror.n == 5
    finally:
        pair.close()


def batch_event(**changes: object) -> dict[str, object]:
    batch = tap.TapBatch(
        t=1.0, node="a", n=0, of="BYTES", src="a/x", dst="b/y", sid=1, seq=1, sizes=(2, 3), sample=b"abcde",
        sampled=2, sample_bytes=256,
    )  # fmt: skip
    wire = batch.to_map()
    for key, value in changes.items():
        if key in ("of", "sizes"):
            wire["fields"] = {**wire["fields"], key: value}
        else:
            wire[key] = value
    return wire


def test_a_batch_event_round_trips() -> None:
    data = msgpack.packb(batch_event())
    assert [(e.n, e.seq, e.size, e.sample) for e in tap.decode_events(data)] == [(0, 1, 2, b"ab"), (1, 2, 3, b"cde")]
    assert tap.decode_wire(data).encode() == data


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": "BYTES"},
        {"of": "OBJECTS"},
        {"sizes": [2, -3]},
        {"sizes": [2, "3"]},
        {"sizes": "23"},
        {"members": 3},
        {"members": 0, "sizes": [], "size": 0, "sampled": 0, "sample": b""},
        {"members": True},
        {"size": 6},
        {"sampled": 3},
        {"sampled": -1},
        {"sample": b"abcd"},
        {"sample": "abcde"},
        {"sample_bytes": tap.MAX_SAMPLE_BYTES + 1},
        {"sample_bytes": 1},  # the samples would add up to 2 bytes, not 5
        {"n": 2**63 - 1},
        {"seq": 2**63 - 1},
    ],
    ids=repr,
)
def test_a_bad_batch_event_is_refused(changes: dict[str, object]) -> None:
    with pytest.raises(tap.TapDecodeError):
        tap.decode_events(msgpack.packb(batch_event(**changes)))


def test_a_newer_format_is_refused_by_its_version_and_an_older_one_read() -> None:
    with pytest.raises(tap.TapVersionError, match=r"version 3\b"):
        tap.decode_events(msgpack.packb({**GOOD, "v": 3}))
    old = tap.decode_event(msgpack.packb({**GOOD, "v": 1, "members": 2}))  # version 1 had no batch events
    assert old == tap.decode_event(msgpack.packb(GOOD))
