"""The wire codec: round trips, hostile input, limits, and the JSON schema of the header."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpipes.bus import codec
from dpipes.bus.errors import DecodeError

SCHEMA_FILE = Path(codec.__file__).with_name("header_schema.json")

addresses = st.text(max_size=40)
ints = st.integers(min_value=0, max_value=2**63 - 1)
json_leaf = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20) | st.binary(max_size=20)
maps = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        json_leaf,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=20,
    ),
    max_size=5,
)
frames = st.lists(st.binary(max_size=200), max_size=5).map(tuple)

_FIELD_STRATEGIES = {"str": st.text(max_size=50), "int": ints, "bool": st.booleans(), "dict[str, Any]": maps}


def message_strategy(cls: type[codec.Message]) -> st.SearchStrategy[codec.Message]:
    fields: dict[str, Any] = {"src": addresses, "dst": addresses, "sid": ints, "seq": ints}
    for field in dataclasses.fields(cls):
        if field.name in fields:
            continue
        fields[field.name] = frames if field.name == "frames" else _FIELD_STRATEGIES[str(field.type)]
    return st.builds(cls, **fields)


any_message = st.one_of([message_strategy(cls) for cls in codec.KINDS.values()])


def as_received(encoded: list[Any]) -> list[bytes]:
    """What a socket hands back: every frame as separate bytes."""
    return [bytes(f) for f in encoded]


@given(any_message)
@settings(max_examples=400)
def test_decode_inverts_encode_for_every_kind(msg: codec.Message) -> None:
    assert codec.decode(as_received(codec.encode(msg))) == msg


def test_every_kind_is_exercised() -> None:
    assert {"HELLO", "WELCOME", "PING", "BYE", "CREDIT", "EOF", "EOF_ACK", "BYTES", "ARROW", "PIPES"} <= set(
        codec.KINDS
    )
    for name, cls in codec.KINDS.items():
        assert cls.KIND == name
        assert dataclasses.is_dataclass(cls)
        with pytest.raises(dataclasses.FrozenInstanceError):
            cls().src = "x"  # type: ignore[misc]


@given(st.lists(st.binary(max_size=300), min_size=0, max_size=6))
@settings(max_examples=400)
def test_random_bytes_raise_only_decode_error(raw: list[bytes]) -> None:
    try:
        codec.decode(raw)
    except DecodeError:
        pass


@given(any_message, st.data())
@settings(max_examples=400)
def test_mutated_messages_raise_only_decode_error(msg: codec.Message, data: st.DataObject) -> None:
    received = as_received(codec.encode(msg))
    header = bytearray(received[0])
    for _ in range(data.draw(st.integers(1, 4))):
        choice = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(0, len(header) - 1)))
        if choice == "flip" and header:
            header[pos] ^= data.draw(st.integers(1, 255))
        elif choice == "cut":
            del header[pos:]
        else:
            header[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        codec.decode([bytes(header), *received[1:]])
    except DecodeError:
        pass


@given(any_message, maps)
def test_wrong_field_types_are_named(msg: codec.Message, junk: dict[str, Any]) -> None:
    header = codec.header_of(msg)
    for name, _check, _default in msg._SPEC:
        bad = dict(header, **{name: junk if not isinstance(header[name], dict) else "not a map"})
        with pytest.raises(DecodeError, match=name):
            codec.decode([msgpack.packb(bad)])


def test_limits_are_enforced() -> None:
    base = codec.header_of(codec.Request(src="a/b", dst="c/d", method="m"))
    with pytest.raises(DecodeError, match="limit"):
        codec.decode([b"\x80" * (codec.MAX_HEADER_BYTES + 1)])
    with pytest.raises(DecodeError, match="characters"):
        codec.decode([msgpack.packb(dict(base, method="x" * (codec.MAX_STRING_CHARS + 1)))])
    deep: Any = 1
    for _ in range(codec.MAX_DEPTH + 1):
        deep = {"k": deep}
    with pytest.raises(DecodeError, match="deeper"):
        codec.decode([msgpack.packb(dict(base, body=deep))])
    with pytest.raises(DecodeError, match="frames"):
        codec.decode([msgpack.packb(codec.header_of(codec.Bytes()))] + [b""] * codec.MAX_FRAMES)
    with pytest.raises(DecodeError, match="no payload"):
        codec.decode([msgpack.packb(base), b"extra"])
    with pytest.raises(DecodeError, match="non-negative"):
        codec.decode([msgpack.packb(dict(base, sid=-1))])
    with pytest.raises(DecodeError, match="unknown message kind"):
        codec.decode([msgpack.packb(dict(base, kind="SHOUT"))])
    with pytest.raises(DecodeError, match="map"):
        codec.decode([msgpack.packb([1, 2, 3])])
    with pytest.raises(DecodeError, match="no header"):
        codec.decode([])


def test_payload_frame_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codec, "MAX_PAYLOAD_FRAME_BYTES", 1000)
    frames = codec.encode(codec.Bytes(frames=(b"x" * 1001,)))
    with pytest.raises(DecodeError, match="payload frame is 1001 bytes"):
        codec.decode(frames)


def test_other_protocol_version_is_told_apart() -> None:
    header = dict(codec.header_of(codec.Hello(node="n")), v=codec.PROTOCOL_VERSION + 1)
    with pytest.raises(codec.VersionMismatch) as info:
        codec.decode([msgpack.packb(header)])
    assert info.value.version == codec.PROTOCOL_VERSION + 1
    assert info.value.header["node"] == "n"


def test_payload_is_zero_copy_views_of_received_frames() -> None:
    received = [bytes(codec.encode(codec.Bytes())[0]), bytearray(b"payload")]
    msg = codec.decode(received)
    view = msg.frames[0]  # type: ignore[attr-defined]
    assert isinstance(view, memoryview)
    received[1][0:1] = b"P"  # the view sees the received buffer, not a copy
    assert bytes(view) == b"Payload"


def test_stream_header_prefix_matches_encode() -> None:
    prefix = codec.stream_header_prefix("BYTES", "a/x", "b/y", 9)
    for seq in (0, 1, 127, 128, 65536, 2**40):
        assert prefix + codec.packb_int(seq) == codec.encode(codec.Bytes(src="a/x", dst="b/y", sid=9, seq=seq))[0]


def test_schema_file_is_current() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json.loads(json.dumps(codec.header_schema()))


@given(any_message)
@settings(max_examples=200)
def test_real_headers_validate_against_schema(msg: codec.Message) -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    header = msgpack.unpackb(codec.encode(msg)[0], raw=False)
    header = json.loads(json.dumps(header, default=lambda b: b.hex()))  # JSON has no bytes
    jsonschema.validate(header, schema)


def test_schema_rejects_what_decode_rejects() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    header = codec.header_of(codec.Credit(bytes=5))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(header, bytes="five"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(header, v=99), schema)
