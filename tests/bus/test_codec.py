"""The wire codec: round trips, hostile input, limits, and the JSON schema of the header."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any
from unittest import mock

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
_FIELD_STRATEGIES = {
    "str": st.text(max_size=50),
    "int": ints,
    "bool": st.booleans(),
    "dict[str, Any]": maps,
    "list[int]": st.lists(st.integers(0, 50), max_size=5),
    "list[dict[str, Any]]": st.lists(  # SHM_BATCH members: an SHM's keys, each there or not
        st.fixed_dictionaries(
            {},
            optional={
                "fields": maps,
                "handle": st.text(max_size=50),
                "lease": ints,
                "sizes": st.lists(st.integers(0, 50), max_size=5),
                "offset": ints,
            },
        ),
        min_size=1,
        max_size=4,
    ),
}


def message_strategy(cls: type[codec.Message]) -> st.SearchStrategy[codec.Message]:
    fields: dict[str, Any] = {"src": addresses, "dst": addresses, "sid": ints, "seq": ints}
    low, high = cls.PAYLOAD_FRAMES
    for field in dataclasses.fields(cls):
        if field.name in fields:
            continue
        if field.name == "frames":
            fields["frames"] = st.lists(st.binary(max_size=200), min_size=low, max_size=min(high, 5)).map(tuple)
        else:
            fields[field.name] = _FIELD_STRATEGIES[str(field.type)]
    if cls is codec.Batch:  # a sound batch: in a stream, members that add up to its one frame
        fields["sid"] = st.integers(1, 2**63 - 1)
        fields["seq"] = st.integers(0, 2**62)
        fields["of"] = st.sampled_from(["BYTES", "STDERR"])
        parts = st.lists(st.binary(max_size=40), min_size=1, max_size=6)
        fields["frames"] = parts.map(lambda parts: (b"".join(parts),))
    if cls is codec.Shm or cls is codec.ShmBatch:
        fields["of"] = st.sampled_from(["BYTES", "OBJECTS", "ARROW", "STDERR", "PIPES"])
    if cls is codec.ShmBatch:  # in a stream, its members' seqs within 2**63
        fields["sid"] = st.integers(1, 2**63 - 1)
        fields["seq"] = st.integers(0, 2**62)
    strategy = st.builds(cls, **fields)
    if cls is codec.Batch:
        strategy = strategy.map(lambda m: dataclasses.replace(m, sizes=_split(len(m.frames[0]), m.seq)))
    if cls is codec.Objects:  # the count must fit the batch: each object takes a byte at least
        strategy = strategy.map(lambda m: dataclasses.replace(m, count=m.count % (m.frames[0].__len__() + 1)))
    return strategy


def _split(nbytes: int, salt: int) -> list[int]:
    """Member sizes adding up to ``nbytes``: a few, some empty, varied by ``salt``."""
    cut = salt % (nbytes + 1)
    return [cut, 0, nbytes - cut] if salt % 2 else [nbytes]


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
    payload = codec.encode(msg)[1:]
    for name, _check, _default in msg._SPEC:
        bad = dict(header, **{name: junk if not isinstance(header[name], dict) else "not a map"})
        with pytest.raises(DecodeError, match=name):
            codec.decode([msgpack.packb(bad), *payload])


_ROUND_TRIP_JUNK = st.one_of(json_leaf, maps, st.lists(st.integers(0, 5), max_size=3))


@given(st.sampled_from([codec.Request, codec.Reply]), st.data())
@settings(max_examples=300)
def test_requests_and_replies_decode_as_every_kind_does(cls: type[codec.Message], data: st.DataObject) -> None:
    """REQUEST and REPLY are built in one test of all their fields when they are sound: what that
    takes and what it refuses (and how the refusal reads) are what the checks of every kind say."""
    header = codec.header_of(cls(src="a/b", dst="c/d", seq=7))
    for name, _check, _default in cls._SPEC:
        what = data.draw(st.sampled_from(["keep", "drop", "junk", "long", "deep"]))
        if what == "drop":
            del header[name]
        elif what == "junk":
            header[name] = data.draw(_ROUND_TRIP_JUNK)
        elif what == "long":
            header[name] = "x" * (codec.MAX_STRING_CHARS + 1)
        elif what == "deep":
            header[name] = {"k": [functools.reduce(lambda inner, _: {"k": inner}, range(codec.MAX_DEPTH), 1)]}
    payload = data.draw(st.lists(st.binary(max_size=3), max_size=1))
    outcomes = []
    for quick in (True, False):
        with contextlib.ExitStack() as stack:
            if not quick:  # every field through its own checker, as for the other kinds
                stack.enter_context(mock.patch.object(codec, "_reply_message", lambda *args: None))
                stack.enter_context(mock.patch.object(codec, "_request_message", lambda *args: None))
            try:
                outcomes.append(codec.from_header(header, payload))
            except DecodeError as exc:
                outcomes.append((str(exc), exc.header))
    assert outcomes[0] == outcomes[1]


def test_a_body_nested_as_deep_as_the_limit_decodes_and_one_level_more_is_refused() -> None:
    base = codec.header_of(codec.Request(src="a/b", dst="c/d", method="m"))
    for leaf in (1, "x", None, {}, []):  # the innermost value: a leaf, or an empty map or array (a level)
        for inner in (dict, list):
            deep: Any = leaf
            # The body itself is the outermost level, and an empty container the innermost.
            for level in range(codec.MAX_DEPTH - 1 - (type(leaf) in (dict, list))):
                deep = {"k": deep} if (level % 2 if inner is dict else not level % 2) else [deep, 2]
            msg = codec.decode([msgpack.packb(dict(base, body={"k": deep, "flat": 1}))])
            assert isinstance(msg, codec.Request) and msg.body["flat"] == 1
            with pytest.raises(DecodeError, match=f"nests deeper than {codec.MAX_DEPTH} levels"):
                codec.decode([msgpack.packb(dict(base, body={"flat": 1, "k": [deep]}))])


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


def test_packed_request_and_reply_are_the_messages_encoded() -> None:
    body = {"p": b"\x00" * 64, "n": [1, 2]}
    request = codec.Request(src="a/x", dst="b/y", seq=7, method="echo", body=body)
    assert codec.packb_request("a/x", "b/y", 7, "echo", body) == codec.encode(request)[0]
    for ok, error in ((True, ""), (False, "it broke")):
        reply = codec.Reply(src="b/y", dst="a/x", seq=7, ok=ok, body=body, error=error)
        assert codec.packb_reply("b/y", "a/x", 7, ok, body, error) == codec.encode(reply)[0]


def test_schema_file_is_current() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json.loads(json.dumps(codec.header_schema()))


@functools.cache
def header_validator() -> Any:
    """The schema file's validator, checked and built once (``jsonschema.validate`` does both per call)."""
    schema = json.loads(SCHEMA_FILE.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@given(any_message)
@settings(max_examples=200)
def test_real_headers_validate_against_schema(msg: codec.Message) -> None:
    header = msgpack.unpackb(codec.encode(msg)[0], raw=False)
    header = json.loads(json.dumps(header, default=lambda b: b.hex()))  # JSON has no bytes
    header_validator().validate(header)


def test_schema_rejects_what_decode_rejects() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    header = codec.header_of(codec.Credit(bytes=5))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(header, bytes="five"), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(header, v=99), schema)


# -- the rules of the spec that a literal reader relies on ---------------------------------------

COMMON_KEYS = ("v", "kind", "src", "dst", "sid", "seq")


@given(any_message, st.sampled_from(COMMON_KEYS))
@settings(max_examples=200)
def test_a_missing_common_key_is_named(msg: codec.Message, key: str) -> None:
    header = codec.header_of(msg)
    del header[key]
    with pytest.raises(DecodeError, match=f"'{key}' is missing") as info:
        codec.decode([msgpack.packb(header), *codec.encode(msg)[1:]])
    assert not isinstance(info.value, codec.VersionMismatch)


@given(any_message, st.sampled_from(COMMON_KEYS), st.sampled_from([True, False, 1.0, "1", [1], {"a": 1}, None, -1]))
@settings(max_examples=300)
def test_a_common_key_of_the_wrong_type_is_a_decode_error(msg: codec.Message, key: str, value: Any) -> None:
    header = dict(codec.header_of(msg), **{key: value})
    if key == "v" and type(value) is int:  # an integer version is another version, not malformed
        return
    if key in ("src", "dst") and type(value) is str:  # any string is an address the router judges
        return
    with pytest.raises(DecodeError) as info:
        codec.decode([msgpack.packb(header), *codec.encode(msg)[1:]])
    assert not isinstance(info.value, codec.VersionMismatch)
    assert key in str(info.value) or (key == "kind" and "unknown message kind" in str(info.value))


def test_a_boolean_is_not_version_1() -> None:
    header = dict(codec.header_of(codec.Ping()), v=True)
    with pytest.raises(DecodeError, match="'v' must be an integer, got bool"):
        codec.decode([msgpack.packb(header)])


@given(st.sampled_from(sorted(set(codec.KINDS) - codec.DATA_KINDS)), st.integers(1, 3))
def test_payload_frames_only_on_data_kinds(kind: str, extra: int) -> None:
    header = msgpack.packb(codec.header_of(codec.KINDS[kind]()))
    with pytest.raises(DecodeError, match="carries no payload"):
        codec.decode([header] + [b"x"] * extra)
    with pytest.raises(DecodeError, match="carries no payload"):
        codec.decode_header(header, extra)  # what a hub checks before routing on


def test_objects_carry_one_batch_that_can_hold_count_objects() -> None:
    header = msgpack.packb(codec.header_of(codec.Objects(count=3)))
    with pytest.raises(DecodeError, match="exactly 1 payload frame"):
        codec.decode([header])
    with pytest.raises(DecodeError, match="exactly 1 payload frame"):
        codec.decode([header, b"\x93\x80\x80", b"\x90"])
    with pytest.raises(DecodeError, match="count 3 cannot fit a 2-byte batch"):
        codec.decode([header, b"\x92\x80"])
    assert codec.decode([header, b"\x93\x80\x80\x80"]).count == 3  # type: ignore[attr-defined]
    with pytest.raises(DecodeError, match="at least 1 payload frame"):
        codec.decode([msgpack.packb(codec.header_of(codec.Pipes()))])


def test_names_are_bounded_so_that_every_address_fits() -> None:
    node, endpoint = "n" * codec.MAX_NODE_NAME_CHARS, "e" * codec.MAX_ENDPOINT_NAME_CHARS
    longest = f"{node}/{endpoint}"
    assert len(longest) == codec.MAX_STRING_CHARS
    assert codec.decode(codec.encode(codec.Attach(src=longest, name=endpoint))).src == longest  # type: ignore[arg-type]
    for msg, field in [
        (codec.Attach(name=endpoint + "e"), "name"),
        (codec.Hello(node=node + "n"), "node"),
        (codec.Welcome(node=node + "n"), "node"),
        (codec.Link(node=node + "n"), "node"),
    ]:
        with pytest.raises(DecodeError, match=f"field '{field}' is .* characters long"):
            codec.decode(codec.encode(msg))


@given(st.lists(st.one_of(st.none(), st.booleans(), ints, st.text(max_size=5), st.lists(ints))))
def test_unhashable_kinds_are_decode_errors(kinds: list[Any]) -> None:
    header = dict(codec.header_of(codec.Ping()), kind=kinds)
    with pytest.raises(DecodeError, match="unknown message kind"):
        codec.decode([msgpack.packb(header)])


def test_decode_errors_carry_the_header_to_answer() -> None:
    header = dict(codec.header_of(codec.Request(src="a/b", dst="c/d", seq=7)), method=5)
    with pytest.raises(DecodeError) as info:
        codec.decode([msgpack.packb(header)])
    assert info.value.header is not None and info.value.header["seq"] == 7


def test_schema_requires_every_common_key_and_an_integer_version() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    header = codec.header_of(codec.Credit(bytes=5))
    jsonschema.validate(header, schema)
    for key in COMMON_KEYS:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({k: v for k, v in header.items() if k != key}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(dict(header, v=True), schema)


def _documented_constants() -> dict[str, str]:
    doc = codec.__doc__ or ""
    table = doc[doc.index("\nConstants\n") :]
    return dict(re.findall(r"^\s+``([A-Z_]+)``\s+([0-9.]+)\s", table, re.MULTILINE))


def test_the_spec_states_every_constant_with_its_value() -> None:
    documented = _documented_constants()
    names = {
        name
        for name, value in vars(codec).items()
        if name.isupper() and not name.startswith("_") and type(value) in (int, float)
    }
    assert set(documented) == names
    for name, text in documented.items():
        assert float(text) == getattr(codec, name), name


def _nested(depth: int) -> Any:
    return functools.reduce(lambda inner, _: {"k": inner}, range(depth), 1)


@given(
    st.dictionaries(st.sampled_from(["arrow", "other"]), maps | st.integers(0, 3), max_size=2),
    st.lists(st.integers(0, 50), max_size=4),
)
@settings(max_examples=300)
def test_an_arrow_from_shared_memory_is_the_message_its_header_makes(fields: dict[str, Any], sizes: list[int]) -> None:
    # The fields of an SHM or SHM_BATCH member are depth-checked with them, before ``inner``.
    codec._check_depth(fields, "fields")
    views = [memoryview(bytes(n)) for n in sizes]

    def made(build: Any) -> Any:
        try:
            return build()
        except DecodeError:
            return DecodeError

    header = codec._inner_header("ARROW", fields, "n.src", "m.dst", 3, 9)
    expected = made(lambda: codec.from_header(header, views))
    got = made(lambda: codec._inner("ARROW", fields, "n.src", "m.dst", 3, 9, sizes, views))
    assert got == expected
    if got is not DecodeError:
        assert type(got) is codec.Arrow
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.arrow = {}


def test_a_shm_batch_member_whose_fields_nest_too_deep_or_are_no_map_is_refused() -> None:
    def frame(fields: Any) -> bytes:
        member = {"handle": "1:2:ab:64", "lease": 1, "sizes": [8], "offset": 0, "fields": fields}
        return codec.packb_shms("n.src", "m.dst", 3, 9, "ARROW", [dict(member), dict(member, lease=2)])

    # The members' array, a member and its fields are three levels of the batch's own limit.
    msg = codec.decode([frame({"arrow": _nested(codec.MAX_DEPTH - 3)})])
    assert isinstance(msg, codec.ShmBatch)
    with pytest.raises(DecodeError, match="deeper"):
        codec.decode([frame({"arrow": _nested(codec.MAX_DEPTH - 2)})])
    with pytest.raises(DecodeError, match="must be a map"):
        codec.decode([frame([1])])


def test_a_shm_made_by_shm_message_is_the_one_its_class_makes() -> None:
    keys = {"fields": {"arrow": {"batch": 0}}, "handle": "1:2:ab:64", "lease": 4, "sizes": [8, 16], "offset": 64}
    made = codec.shm_message("n.src", "m.dst", 3, 9, "ARROW", **keys)
    assert type(made) is codec.Shm
    assert made == codec.Shm(src="n.src", dst="m.dst", sid=3, seq=9, of="ARROW", **keys)
    assert codec.decode(as_received(codec.encode(made))) == made
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.lease = 5  # type: ignore[misc]
