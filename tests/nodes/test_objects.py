"""Object modes: parsing program text into objects, writing it back, msgpack batches and metadata."""

from __future__ import annotations

import json
import math
from typing import Any, cast

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpipes.bus.errors import DecodeError, DpipesError, StageError
from dpipes.nodes import objects as objects_module
from dpipes.nodes.objects import (
    DEFAULT_METADATA_KEY,
    EXT_BIGINT,
    MAX_DEPTH,
    WIRE_MAX_OBJECTS,
    ObjectMode,
    ObjectModeError,
    ObjectPackError,
    ObjectParser,
    ObjectWriter,
    make_metadata,
    pack_batch,
    unpack_batch,
    with_metadata,
)

WHERE = "stage 2 (jq@beta)"
JSON_HINT = "each line must be one JSON object"
YAML_HINT = "each document must be one YAML map"

SAMPLE: list[dict[str, Any]] = [
    {"i": 1, "name": "x"},
    {"unicode": "é ü 漢字 😀 \u2028 tab\there", "ключ": "значение", "": "empty key"},
    {"nested": {"list": [1, [2, [3, {"deep": None}]], {}], "map": {"a": {"b": {"c": []}}}}},
    {"numbers": [0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**100, -(2**70), 1.5, -0.25, 1e300, 5e-324]},
    {"booleans": [True, False], "t": True, "f": False, "none": None, "nulls": {"a": None, "b": [None]}},
    {"string with newline": "a\nb\r\nc", "quotes": "\"'\\", "looks like yaml": "--- {a: 1}"},
    {},
]


def parse_all(mode: ObjectMode, data: bytes, **kwargs: Any) -> list[dict[str, Any]]:
    parser = ObjectParser(mode, where=WHERE, **kwargs)
    return parser.feed(data) + parser.end()


def parse_error(mode: ObjectMode, data: bytes, **kwargs: Any) -> ObjectModeError:
    with pytest.raises(ObjectModeError) as info:
        parse_all(mode, data, **kwargs)
    return info.value


# -- json ------------------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    text = ObjectWriter("json").write(SAMPLE)
    assert text.count(b"\n") == len(SAMPLE)
    assert b'{"i":1,"name":"x"}\n' in text  # compact
    assert "漢字".encode() in text  # UTF-8, not \\u escapes
    assert parse_all("json", text) == SAMPLE


def test_json_through_batches_round_trip() -> None:
    parsed = parse_all("json", ObjectWriter("json").write(SAMPLE))
    assert unpack_batch(pack_batch(parsed), where="stage 1") == SAMPLE


def test_json_reads_what_other_programs_print() -> None:
    text = b'{"a": 1, "b": [1, 2]}\r\n  {"c": "\\u00e9\\ud83d\\ude00"}  \n{"d":NaN}'
    objs = parse_all("json", text)
    assert objs[:2] == [{"a": 1, "b": [1, 2]}, {"c": "é😀"}]
    assert math.isnan(objs[2]["d"])


def test_json_blank_lines_are_skipped_but_counted() -> None:
    text = b'\n{"a":1}\n\n   \r\n\t\n{"b":2}\n\n'
    assert parse_all("json", text) == [{"a": 1}, {"b": 2}]
    err = parse_error("json", text + b"42\n")
    assert err.number == 8


def test_json_unterminated_last_line_is_an_object() -> None:
    parser = ObjectParser("json", where=WHERE)
    assert parser.feed(b'{"a":1}\n{"b":') == [{"a": 1}]
    assert parser.feed(b"2}") == []
    assert parser.end() == [{"b": 2}]
    assert parser.end() == []


def test_json_feeding_at_every_split_point() -> None:
    text = ObjectWriter("json").write(SAMPLE) + b"\n" + b'{"last": "\xc3\xa9"}'
    expected = [*SAMPLE, {"last": "é"}]
    for cut in range(len(text) + 1):
        parser = ObjectParser("json", where=WHERE)
        assert parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.end() == expected, cut


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"42", "is a number, not a JSON object"),
        (b"-1.5e3", "is a number, not a JSON object"),
        (b"[1, 2]", "is a list, not a JSON object"),
        (b'"text"', "is a string, not a JSON object"),
        (b"null", "is a null, not a JSON object"),
        (b"true", "is a boolean, not a JSON object"),
        (b'{"a" 1}', "is not valid JSON (Expecting ':' delimiter at column 6)"),
        (b'{"a": 1}}', "is not valid JSON (Extra data at column 9)"),
        (b'{"a": 1} {"b": 2}', "is not valid JSON (Extra data"),
        (b"hello world", "is not valid JSON (Expecting value at column 1)"),
        (b'{"a": "\xff"}', "is not valid UTF-8 (byte 0xff at column 8)"),
        (b'{"a": "\\ud800"}', "holds a lone UTF-16 surrogate escape (\\ud800)"),
        (b'{"a": "x\\uDC00"}', "holds a lone UTF-16 surrogate escape (\\udc00)"),
    ],
)
def test_json_error_names_stage_and_line(line: bytes, problem: str) -> None:
    err = parse_error("json", b'{"ok": 1}\n\n{"ok": 2}\n' + line + b'\n{"ok": 3}\n')
    assert (err.where, err.number, err.line) == (WHERE, 4, 4)
    assert str(err).startswith(f"{WHERE}: line 4 {problem}")
    assert JSON_HINT in str(err) and "use --json only with programs that print JSON objects" in str(err)


def test_json_error_line_numbers_across_feeds() -> None:
    parser = ObjectParser("json", where=WHERE)
    assert parser.feed(b'{"a":1}\n{"a"') == [{"a": 1}]
    assert parser.feed(b":2}\n\n") == [{"a": 2}]
    with pytest.raises(ObjectModeError, match=r"line 5 is a list") as info:
        parser.feed(b'{"a":3}\n[3]\n{"a":4}\n')
    assert info.value.number == 5


def test_json_error_shows_the_start_of_a_long_line() -> None:
    err = parse_error("json", b"[" + b"1, " * 1000 + b"1]\n")
    assert err.text.startswith("'[1, 1, 1,") and err.text.endswith("'…")
    assert len(err.text) < 90
    assert "is a list" in str(err) and len(str(err)) < 400


def test_json_over_long_line() -> None:
    long = b'{"a": "' + b"x" * 100 + b'"}'
    assert parse_all("json", long + b"\n", max_object_bytes=len(long)) == [{"a": "x" * 100}]
    err = parse_error("json", b'{"ok": 1}\n' + long + b"\n", max_object_bytes=len(long) - 1)
    assert err.number == 2 and f"is longer than {len(long) - 1} bytes" in str(err)
    # An unterminated line is refused as soon as it is too long, not when its newline comes.
    parser = ObjectParser("json", where=WHERE, max_object_bytes=1000)
    parser.feed(b'{"ok": 1}\n{"a": "')
    for _ in range(9):
        parser.feed(b"x" * 100)
    with pytest.raises(ObjectModeError, match=r"line 2 is longer than 1000 bytes"):
        parser.feed(b"x" * 100)


def nested_json(depth: int) -> bytes:
    """An object nesting ``depth`` levels of maps and lists (the object itself is level 1)."""
    inner = depth - 1
    return (
        b'{"a":'
        + b'[{"b":' * (inner // 2)
        + b"[1]" * (inner % 2)
        + b"1" * (1 - inner % 2)
        + b"}]" * (inner // 2)
        + b"}"
    )


def test_json_nesting_limit() -> None:
    ok = nested_json(MAX_DEPTH)
    (obj,) = parse_all("json", b'{"ok":1}\n' * 3 + ok + b"\n")[3:]
    assert obj == json.loads(ok)
    err = parse_error("json", b'{"ok":1}\n' + nested_json(MAX_DEPTH + 1) + b"\n")
    assert err.number == 2 and f"nests deeper than {MAX_DEPTH} levels" in str(err)
    err = parse_error("json", b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n")  # beyond the C scanner
    assert err.number == 1 and "nests deeper" in str(err)


def test_json_many_brackets_without_depth_are_fine() -> None:
    line = b'{"list": [' + b",".join([b'{"a": []}'] * 200) + b"]}"
    assert parse_all("json", line + b"\n" + line) == [json.loads(line)] * 2


# -- yaml ------------------------------------------------------------------------------------------


def test_yaml_round_trip() -> None:
    text = ObjectWriter("yaml").write(SAMPLE)
    assert text.startswith(b"---\n") and text.count(b"---") >= len(SAMPLE)
    assert "漢字".encode() in text
    assert parse_all("yaml", text) == SAMPLE


def test_yaml_multi_document_stream_with_optional_first_marker() -> None:
    body = b"a: 1\nb: [x, y]\n---\nc:\n  d: null\n--- {e: 2}\n---\n# only a comment\n---\n...\n"
    expected = [{"a": 1, "b": ["x", "y"]}, {"c": {"d": None}}, {"e": 2}]
    assert parse_all("yaml", body) == expected
    assert parse_all("yaml", b"---\n" + body) == expected
    assert parse_all("yaml", b"# header\n\n---\n" + body) == expected
    assert parse_all("yaml", b"") == []
    assert parse_all("yaml", b"a: 1") == [{"a": 1}]


def test_yaml_marker_needs_a_blank_after_it() -> None:
    assert parse_all("yaml", b"a: |\n  text\n---x: 1\n") == [{"a": "text\n", "---x": 1}]
    assert parse_all("yaml", b"a: 1\n----: 2\n") == [{"a": 1, "----": 2}]
    assert parse_all("yaml", b"a: 1\n---\t\nb: 2\n---") == [{"a": 1}, {"b": 2}]


def test_yaml_feeding_at_every_split_point() -> None:
    text = b"a: 1\n--- {b: 2}\n---\n# empty\n---\nc: [1, 2]\nd: '\xc3\xa9'\n---\ne: f\n"
    expected = [{"a": 1}, {"b": 2}, {"c": [1, 2], "d": "é"}, {"e": "f"}]
    for cut in range(len(text) + 1):
        parser = ObjectParser("yaml", where=WHERE)
        assert parser.feed(text[:cut]) + parser.feed(text[cut:]) + parser.end() == expected, cut


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (b"42\n", "is a number, not a YAML map"),
        (b"just text\n", "is a string, not a YAML map"),
        (b"- a\n- b\n", "is a list, not a YAML map"),
        (b"null\n", "is a null, not a YAML map"),
        (b"a: [1\nb: 2\n", "is not valid YAML ("),
        (b"a: 1\n b: 2\n", "is not valid YAML (mapping values are not allowed"),
    ],
)
def test_yaml_error_names_stage_and_document(doc: bytes, problem: str) -> None:
    err = parse_error("yaml", b"a: 1\n---\nb: 2\n---\n# empty\n---\n" + doc + b"---\nc: 3\n")
    assert (err.where, err.number, err.line) == (WHERE, 4, 6)
    assert str(err).startswith(f"{WHERE}: document 4 (line 6) {problem}")
    assert YAML_HINT in str(err) and "use --yaml only with programs that print YAML maps" in str(err)
    assert err.text.startswith(repr(doc.decode()[:5])[:-1])  # the content, not the bare '---'


def test_yaml_first_document_is_one_without_a_marker() -> None:
    assert parse_error("yaml", b"42\n---\na: 1\n").number == 1
    assert parse_error("yaml", b"---\n42\n---\na: 1\n").number == 1
    assert parse_error("yaml", b"a: 1\n---\n42\n").number == 2


def test_yaml_types_become_json_types() -> None:
    doc = b"""
when: 2024-01-02
at: 2001-12-14 21:59:43.10 -05:00
blob: !!binary aGVsbG8=
members: !!set {b, a}
ordered: !!omap [{x: 1}, {y: 2}]
3: int key
2.5: float key
true: bool key
null: null key
2024-05-06: date key
yes: 0x10
"""
    (obj,) = parse_all("yaml", doc)
    assert obj == {
        "when": "2024-01-02",
        "at": "2001-12-14T21:59:43.100000-05:00",
        "blob": "aGVsbG8=",
        "members": {"a": None, "b": None},
        "ordered": [["x", 1], ["y", 2]],
        "3": "int key",
        "2.5": "float key",
        "true": 16,  # YAML 1.1: 'yes' is true too, and the later key wins
        "null": "null key",
        "2024-05-06": "date key",
    }
    assert unpack_batch(pack_batch([obj]), where="x") == [obj]
    assert parse_all("json", ObjectWriter("json").write([obj])) == [obj]


def test_yaml_aliases_expand_within_a_budget() -> None:
    shared = b"base: &b {x: 1, y: [1, 2]}\none: *b\ntwo: *b\n"
    (obj,) = parse_all("yaml", shared)
    assert obj["one"] == obj["two"] == {"x": 1, "y": [1, 2]}
    assert obj["one"] is not obj["two"]  # expanded: changing one leaves the other alone
    bomb = b"a: &a [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
        b"%s: &%s [*%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s, *%s]\n" % ((bytes([c]),) * 2 + (bytes([c - 1]),) * 10)
        for c in range(ord("b"), ord("k"))
    )
    err = parse_error("yaml", bomb, max_object_bytes=100_000)  # 10**10 values unless refused
    assert "expands to more than max_object_bytes" in str(err)
    recursive = parse_error("yaml", b"a: &a [*a]\n")
    assert "nests deeper" in str(recursive) or "expands" in str(recursive)


def test_yaml_nesting_limit_without_crashing() -> None:
    ok = b"a: " + b"[" * (MAX_DEPTH - 1) + b"]" * (MAX_DEPTH - 1) + b"\n"
    assert parse_all("yaml", ok)
    assert "nests deeper" in str(parse_error("yaml", b"a: " + b"[" * MAX_DEPTH + b"]" * MAX_DEPTH + b"\n"))
    # libyaml's composer would overflow the C stack on these; they must be refused, not crash.
    # Which of the two refuses first (our scan, or a libyaml that limits nesting itself) and in
    # which words is the library's business: the property is a clean refusal naming the document.
    for deep in (b"a: " + b"[" * 300_000 + b"]" * 300_000, b"a:\n" + b"- " * 300_000 + b"x"):
        err = parse_error("yaml", b"ok: 1\n---\n" + deep + b"\n")
        assert err.number == 2 and str(err).startswith(f"{WHERE}: document 2 ")
        assert len(str(err)) < 1000  # the document is quoted short, not whole


def test_yaml_over_long_document() -> None:
    doc = b"a: " + b"x" * 100 + b"\n"
    assert parse_all("yaml", b"---\n" + doc, max_object_bytes=len(doc) + 4) == [{"a": "x" * 100}]
    err = parse_error("yaml", b"ok: 1\n---\n" + doc + b"---\nb: 1\n", max_object_bytes=50)
    assert (err.number, err.line) == (2, 2) and "is longer than 50 bytes" in str(err)
    parser = ObjectParser("yaml", where=WHERE, max_object_bytes=1000)
    parser.feed(b"---\nlines:\n")
    with pytest.raises(ObjectModeError, match=r"document 1 \(line 1\) is longer than 1000 bytes"):
        for _ in range(100):
            parser.feed(b"- " + b"y" * 20 + b"\n")


def test_yaml_refuses_lone_surrogate_escapes() -> None:
    err = parse_error("yaml", b'a: 1\n---\nb: "\\ud800"\n')  # libyaml refuses it; PyYAML's reader would not
    assert err.number == 2 and ("invalid Unicode character escape" in str(err) or "surrogate" in str(err))
    assert parse_all("yaml", b'a: "\\U0001F600 \\u00e9"\n') == [{"a": "😀 é"}]


# -- hypothesis: any JSON-model object round trips, however the text is cut ------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
flat_objects_st = st.lists(
    st.dictionaries(
        st.text(max_size=4), scalars | st.lists(scalars, max_size=3) | st.just({"k": [1.5, None]}), max_size=4
    ),
    min_size=1,
    max_size=4,
)  # cheap to draw, for tests that only need some valid batch to corrupt
objects_st = st.lists(st.dictionaries(st.text(max_size=8), values, max_size=5), max_size=6)


def feed_in_pieces(mode: ObjectMode, text: bytes, cuts: list[int]) -> list[dict[str, Any]]:
    parser = ObjectParser(mode, where=WHERE)
    out: list[dict[str, Any]] = []
    prev = 0
    for cut in sorted({c % (len(text) + 1) for c in cuts}):
        out += parser.feed(text[prev:cut])
        prev = cut
    return out + parser.feed(text[prev:]) + parser.end()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objs=objects_st, cuts=st.lists(st.integers(min_value=0), max_size=8), mode=st.sampled_from(["json", "yaml"]))
def test_random_objects_and_splits_round_trip(objs: list[dict[str, Any]], cuts: list[int], mode: ObjectMode) -> None:
    text = ObjectWriter(mode).write(objs)
    assert feed_in_pieces(mode, text, cuts) == objs
    assert unpack_batch(pack_batch(objs), where="x") == objs


# -- batches ---------------------------------------------------------------------------------------


def test_batch_round_trip_and_inputs() -> None:
    frame = pack_batch(SAMPLE)
    assert unpack_batch(frame, where="x") == SAMPLE
    assert unpack_batch(memoryview(frame), where="x") == SAMPLE
    assert unpack_batch(bytearray(frame), where="x") == SAMPLE
    assert unpack_batch(pack_batch([]), where="x") == []
    assert msgpack.unpackb(pack_batch([{"n": 2**64}]), raw=False, ext_hook=lambda code, data: (code, data)) == [
        {"n": (EXT_BIGINT, b"\x01" + b"\x00" * 8)}
    ]


def test_pack_refuses_what_cannot_travel() -> None:
    with pytest.raises(ObjectPackError, match="lone UTF-16 surrogate"):
        pack_batch([{"a": "\ud800"}])
    with pytest.raises(ObjectPackError, match="a set value cannot travel"):
        pack_batch([{"a": {1, 2}}])
    with pytest.raises(ObjectPackError, match="more than 4300 digits"):
        pack_batch([{"a": 10**5000}])


def where_error(data: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        unpack_batch(data, where="stage 1 (cat@alpha)")
    assert str(info.value).startswith("stage 1 (cat@alpha): ")
    return info.value


def nested_dict(depth: int) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for _ in range(depth - 1):
        obj = {"a": obj}
    return obj


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "malformed object batch"),
        (b"\x92\x80", "malformed object batch"),  # truncated
        (msgpack.packb([{}]) + b"\x00", "malformed object batch"),  # trailing bytes
        (msgpack.packb({"a": 1}), "must be a msgpack array, not a map"),
        (msgpack.packb([{}, 1]), "element 1 of an object batch is a number"),
        (msgpack.packb([[]]), "element 0 of an object batch is a list"),
        (msgpack.packb([{1: 2}]), "malformed object batch"),  # a map key that is not a string
        (msgpack.packb([{"a": {2: 2}}]), "malformed object batch"),
        (msgpack.packb([{"a": b"bytes"}], use_bin_type=True), "malformed object batch"),
        (msgpack.packb([{"a": b""}], use_bin_type=True), "holds binary data"),
        (msgpack.packb([{"a": {b"": 1}}], use_bin_type=True), "holds binary data"),
        (msgpack.packb([{"a": msgpack.ExtType(5, b"x")}]), "extension type 5"),
        (msgpack.packb([{"a": msgpack.ExtType(EXT_BIGINT, b"\x01" * 3000)}]), "malformed object batch"),
        (msgpack.packb([{"a": msgpack.ExtType(EXT_BIGINT, b"\x7f" * 1786)}]), "more than 4300 digits"),
        (msgpack.packb([{"a": "x"}]).replace(b"x", b"\xff"), "malformed object batch"),  # not UTF-8
        (b"\x91\x81\xa1a" + b"\x91" * 100_000 + b"\xc0", "malformed object batch"),  # past msgpack's stack
        (msgpack.packb([nested_dict(MAX_DEPTH + 1)]), f"nests deeper than {MAX_DEPTH} levels"),
        (msgpack.packb([{}] * (WIRE_MAX_OBJECTS + 1)), f"limit {WIRE_MAX_OBJECTS}"),
    ],
    ids=lambda value: value if isinstance(value, str) else "batch",
)
def test_hostile_batches_raise_decode_error(data: bytes, problem: str) -> None:
    assert problem in str(where_error(data))


def test_batch_limits() -> None:
    assert unpack_batch(msgpack.packb([nested_dict(MAX_DEPTH)]), where="x") == [nested_dict(MAX_DEPTH)]
    assert unpack_batch(msgpack.packb([{"t": msgpack.Timestamp(1, 5)}]), where="x") == [{"t": 1_000_000_005}]
    # Bytes that merely look like an empty bin (a uint16 of 0xc400) are fine.
    assert unpack_batch(pack_batch([{"n": 0xC400}]), where="x") == [{"n": 0xC400}]


def test_oversized_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = pack_batch([{"a": "x" * 1000}])
    monkeypatch.setattr(objects_module, "WIRE_MAX_BYTES", len(frame) - 1)
    assert f"is {len(frame)} bytes (limit {len(frame) - 1})" in str(where_error(frame))
    with pytest.raises(ObjectPackError, match="packs to"):
        pack_batch([{"a": "x" * 1000}])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_decode_error(data: bytes) -> None:
    try:
        batch = unpack_batch(data, where="x")
    except DecodeError:
        return
    assert type(batch) is list and all(type(o) is dict for o in batch)


@settings(max_examples=150, deadline=None)
@given(
    objs=flat_objects_st,
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_corrupted_batches_raise_only_decode_error(objs: list[dict[str, Any]], flips: list[tuple[int, int]]) -> None:
    frame = bytearray(pack_batch(objs))
    for pos, value in flips:
        frame[pos % len(frame)] = value
    try:
        batch = unpack_batch(bytes(frame), where="x")
    except DecodeError:
        return
    ObjectWriter("json").write(batch)  # whatever got through is a writable object
    ObjectWriter("yaml").write(batch)
    pack_batch(batch)


# -- metadata --------------------------------------------------------------------------------------


def test_make_metadata() -> None:
    base = make_metadata(addr="10.0.0.2", port=6000, service="jq", node="beta", stage=2)
    assert base == {"dp.addr": "10.0.0.2", "dp.port": 6000, "dp.service": "jq", "dp.node": "beta", "dp.stage": 2}
    full = make_metadata(
        addr="10.0.0.2",
        port=6000,
        service="jq",
        node="beta",
        stage=2,
        argv=["jq", "."],
        environ={"LANG": "C"},
        credential="pubkey",
    )
    assert full == {**base, "dp.argv": ["jq", "."], "dp.environ": {"LANG": "C"}, "dp.credential": "pubkey"}


def test_with_metadata_replaces_and_puts_it_last() -> None:
    old = make_metadata(addr="a", port=1, service="cat", node="alpha", stage=1)
    new = make_metadata(addr="b", port=2, service="jq", node="beta", stage=2)
    objs = [{"x": 1}, {DEFAULT_METADATA_KEY: old, "y": 2}, {}]
    assert with_metadata(objs, DEFAULT_METADATA_KEY, new) is objs
    assert objs == [{"x": 1, "__dpipes": new}, {"y": 2, "__dpipes": new}, {"__dpipes": new}]
    assert [list(o)[-1] for o in objs] == ["__dpipes"] * 3
    with_metadata(objs, "__meta", old)
    assert objs[0] == {"x": 1, "__dpipes": new, "__meta": old}


@pytest.mark.parametrize("mode", ["json", "yaml"])
def test_writer_adds_metadata_without_changing_objects(mode: ObjectMode) -> None:
    meta = make_metadata(addr="10.0.0.2", port=6000, service="jq", node="beta", stage=2, argv=["jq", "-c", "."])
    objs = [*SAMPLE, {"__dpipes": {"dp.node": "old"}, "z": 1}, {"__dpipes": 1}]
    before = [dict(o) for o in objs]
    text = ObjectWriter(mode).write(objs, metadata=meta)
    assert objs == before
    expected = with_metadata([dict(o) for o in objs], "__dpipes", meta)
    assert text == ObjectWriter(mode).write(expected)
    assert parse_all(mode, text) == expected
    assert b"&id" not in text  # a shared metadata map is written out in full, not as a YAML alias
    custom = ObjectWriter(mode, metadata_key="__meta").write([{"a": 1}], metadata=meta)
    assert parse_all(mode, custom) == [{"a": 1, "__meta": meta}]


def test_errors_are_in_the_tree() -> None:
    assert issubclass(ObjectModeError, StageError) and issubclass(ObjectModeError, ValueError)
    assert issubclass(ObjectPackError, DpipesError) and issubclass(ObjectPackError, ValueError)
    assert issubclass(DecodeError, ValueError)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="object mode"):
        ObjectParser(cast(Any, "xml"), where=WHERE)
    with pytest.raises(ValueError, match="object mode"):
        ObjectWriter(cast(Any, "csv"))
    with pytest.raises(ValueError, match="max_object_bytes"):
        ObjectParser("json", where=WHERE, max_object_bytes=0)
