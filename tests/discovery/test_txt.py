"""The DNS-SD TXT codec and name mapping: round trips, size bounds, malformed input."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zeroconf import BadTypeInNameException, service_type_name

from dpipes.bus.errors import ConfigError, DecodeError
from dpipes.discovery.table import NodeRecord
from dpipes.discovery.txt import (
    MAX_LABEL_BYTES,
    SERVICE_TYPE,
    TXT_BUDGET_BYTES,
    TXT_ENTRY_MAX_BYTES,
    TXT_MAX_BYTES,
    TXT_MAX_ENTRIES,
    ProgramOffer,
    TxtError,
    build_txt,
    check_node_name,
    decode_node_txt,
    decode_offer_txt,
    encode_node_txt,
    encode_offer_txt,
    instance_from_service_name,
    offer_instance,
    parse_txt,
    program_label,
    program_subtype,
)

IID = "0190f3a2b4c5d6e7f8a9"


def node(**kw: Any) -> NodeRecord:
    endpoints = {"bus": "tcp://10.77.0.2:5555", "tap": "tcp://10.77.0.2:5556"}
    base = NodeRecord("alpha", IID, 3, endpoints, programs=("sort", "uniq"), plugins=("topk",))
    return dataclasses.replace(base, **kw)


def entries(text: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(text):
        out.append(text[pos + 1 : pos + 1 + text[pos]])
        pos += 1 + text[pos]
    return out


def test_round_trip() -> None:
    encoded = encode_node_txt(node())
    assert encoded.omitted == () and encoded.invalid == ()
    got = decode_node_txt(encoded.text, instance="alpha", addresses=["10.77.0.2"], now=7.0)
    assert got.name == "alpha" and got.instance_id == IID and got.protocol_version == 3
    assert dict(got.endpoints) == {"bus": "tcp://10.77.0.2:5555", "tap": "tcp://10.77.0.2:5556"}
    assert got.programs == ("sort", "uniq") and got.plugins == ("topk",)
    assert got.addresses == ("10.77.0.2",) and got.source == "mdns" and got.last_seen == 7.0
    assert entries(encoded.text)[0] == b"txtvers=1"


def test_long_program_lists_are_chunked_within_entry_and_budget_limits() -> None:
    programs = tuple(f"program-with-a-long-name-{i:04d}" for i in range(400))
    encoded = encode_node_txt(node(programs=programs))
    assert len(encoded.text) <= TXT_BUDGET_BYTES
    assert all(len(e) <= TXT_ENTRY_MAX_BYTES for e in entries(encoded.text))
    props = parse_txt(encoded.text)
    assert props["more"] == "pr"  # programs cut; the short plugin list still fit after them
    got = decode_node_txt(encoded.text)
    kept = len(got.programs)
    assert 0 < kept < 400
    assert got.programs == tuple(sorted(programs))[:kept]  # a sorted prefix, no name split
    assert encoded.omitted == tuple(sorted(programs))[kept:]
    assert got.plugins == ("topk",)


def test_bigger_budget_keeps_everything() -> None:
    programs = tuple(f"p{i}" for i in range(600))
    encoded = encode_node_txt(node(programs=programs), budget=TXT_MAX_BYTES)
    assert encoded.omitted == () and "more" not in parse_txt(encoded.text)
    assert len(decode_node_txt(encoded.text).programs) == 600


def test_invalid_program_names_are_reported_not_encoded() -> None:
    encoded = encode_node_txt(node(programs=("ok", "a,b", "bad\nname", "", "x" * 200)))
    assert decode_node_txt(encoded.text).programs == ("ok",)
    assert set(encoded.invalid) == {"a,b", "bad\nname", "", "x" * 200}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"name": "has.dot"}, "cannot be advertised"),
        ({"name": "has@at"}, "cannot be advertised"),
        ({"name": "x" * 49}, "cannot be advertised"),
        ({"instance_id": "not valid!"}, "instance id"),
        ({"endpoints": {"Bad Key": "tcp://x:1"}}, "endpoint key"),
        ({"endpoints": {"bus": "tcp://" + "x" * 300}}, "too long"),
        ({"endpoints": {f"e{i}": "tcp://x:1" for i in range(17)}}, "endpoints"),
    ],
)
def test_encoding_rejects_what_cannot_be_advertised(change: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        encode_node_txt(node(programs=(), plugins=(), **change))


def test_mandatory_entries_over_budget_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="budget"):
        encode_node_txt(node(), budget=60)


def test_parse_txt_rules() -> None:
    text = build_txt([("Key", "first"), ("key", "second"), ("flag", None), ("empty", "")])
    assert parse_txt(text) == {"key": "first", "flag": None, "empty": ""}
    assert parse_txt(b"") == {} and parse_txt(b"\x00") == {}
    with pytest.raises(ValueError, match="over the 255"):
        build_txt([("k", "v" * 300)])


VALID = encode_node_txt(node()).text


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x09txtvers=1\x20n=alpha", "claims 32 bytes"),
        (b"\x05=oops", "invalid key"),
        (b"\x03\xff=x", "invalid key"),
        (b"\x09txtvers=1\x03n=\xff", "not UTF-8"),
        (build_txt([("txtvers", "2"), ("n", "alpha"), ("id", IID), ("pv", "1")]), "txtvers"),
        (build_txt([("txtvers", "1"), ("id", IID), ("pv", "1")]), "lacks 'n'"),
        (build_txt([("txtvers", "1"), ("n", "al.pha"), ("id", IID), ("pv", "1")]), "valid node name"),
        (build_txt([("txtvers", "1"), ("n", "alpha"), ("id", "x y"), ("pv", "1")]), "instance id"),
        (build_txt([("txtvers", "1"), ("n", "alpha"), ("id", IID), ("pv", "-1")]), "protocol version"),
        (build_txt([("txtvers", "1"), ("n", "alpha"), ("id", IID), ("pv", "9" * 20)]), "protocol version"),
        (build_txt([("txtvers", "1"), ("n", "alpha"), ("id", IID)]), "lacks 'pv'"),
        (VALID + build_txt([("ep.BAD KEY", "x")]), "endpoint"),
        (VALID + build_txt([("ep.empty", "")]), "endpoint"),
        (
            build_txt([("txtvers", "1"), ("n", "alpha"), ("id", IID), ("pv", "1"), ("pr0", "a,,b")]),
            "invalid name",
        ),
        (VALID + b"\x00" * (TXT_MAX_BYTES + 1), "exceeds"),
        (b"\x01x" * (TXT_MAX_ENTRIES + 1), "entries"),
    ],
)
def test_malformed_txt_raises_txt_error(data: bytes, match: str) -> None:
    with pytest.raises(TxtError, match=match):
        decode_node_txt(data)


def test_txt_error_is_a_decode_error_and_names_the_instance_mismatch() -> None:
    with pytest.raises(DecodeError, match="found under instance 'beta'"):
        decode_node_txt(VALID, instance="beta")
    assert decode_node_txt(VALID, instance="ALPHA").name == "alpha"  # DNS is case-insensitive


def test_many_endpoints_from_the_network_are_bounded() -> None:
    data = VALID + build_txt([(f"ep.e{i}", "tcp://x:1") for i in range(20)])
    with pytest.raises(TxtError, match="more than 16 endpoints"):
        decode_node_txt(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_raise_anything_but_txt_error(data: bytes) -> None:
    try:
        decode_node_txt(data)
    except TxtError:
        pass
    try:
        decode_offer_txt(data)
    except TxtError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=0, max_value=len(VALID)))
def test_corrupted_valid_records_never_raise_anything_but_txt_error(junk: bytes, at: int) -> None:
    for data in (VALID[:at], VALID[:at] + junk + VALID[at:]):
        try:
            decode_node_txt(data)
        except TxtError:
            pass


program_names = st.text(
    st.characters(codec="utf-8", exclude_characters=",", min_codepoint=0x20),
    min_size=1,
    max_size=40,
).filter(lambda s: "\x7f" not in s)


@settings(max_examples=200, deadline=None)
@given(
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}", fullmatch=True),
    st.lists(program_names, max_size=30),
    st.lists(program_names, max_size=5),
    st.integers(min_value=0, max_value=10**6),
)
def test_round_trip_property(name: str, programs: list[str], plugins: list[str], pv: int) -> None:
    endpoints = {"bus": "tcp://10.0.0.1:1"}
    record = NodeRecord(name, IID, pv, endpoints, (), tuple(programs), tuple(plugins))
    encoded = encode_node_txt(record, budget=TXT_MAX_BYTES)
    assert encoded.omitted == () and encoded.invalid == ()
    got = decode_node_txt(encoded.text, instance=name)
    assert got.programs == tuple(sorted(set(programs)))
    assert got.plugins == tuple(sorted(set(plugins)))
    assert got.protocol_version == pv and got.name == name


@settings(max_examples=300, deadline=None)
@given(program_names | st.text(min_size=1, max_size=200).filter(lambda s: "," not in s))
def test_program_subtypes_are_valid_dns_sd_names(program: str) -> None:
    label = program_label(program)
    assert len(f"_dp-{label}".encode()) <= MAX_LABEL_BYTES
    assert "." not in label
    assert service_type_name(program_subtype(program)) == SERVICE_TYPE
    instance = offer_instance(program, "program", "n" * 48)
    assert len(instance.encode()) <= MAX_LABEL_BYTES and instance.endswith("@" + "n" * 48)


def test_program_label_examples() -> None:
    assert program_subtype("sort") == "_dp-sort._sub._dpipes._tcp.local."
    assert program_label("python3.11") == "python3_2e11"
    assert program_label("Sort") == program_label("sort")  # DNS is case-insensitive anyway
    assert program_label("g++") == "g_2b_2b"
    long = program_label("a" * 100)
    assert len(long) == MAX_LABEL_BYTES - 4 and long != program_label("a" * 101)
    assert offer_instance("sort", "program", "alpha") == "sort@alpha"
    assert offer_instance("sort", "plugin", "alpha") == "pl-sort@alpha"


def test_offer_round_trip_and_errors() -> None:
    offer = ProgramOffer("python3.11", "program", "alpha", IID)
    got = decode_offer_txt(encode_offer_txt(offer), addresses=["10.77.0.2"])
    assert got == ProgramOffer("python3.11", "program", "alpha", IID, ("10.77.0.2",))
    bad_kind = build_txt([("txtvers", "1"), ("n", "alpha"), ("id", IID), ("prog", "x"), ("kind", "daemon")])
    with pytest.raises(TxtError, match="neither"):
        decode_offer_txt(bad_kind)
    with pytest.raises(TxtError, match="lacks 'prog'"):
        decode_offer_txt(build_txt([("txtvers", "1"), ("n", "alpha"), ("id", IID)]))
    with pytest.raises(ConfigError):
        encode_offer_txt(ProgramOffer("a,b", "program", "alpha", IID))


def test_service_names() -> None:
    assert instance_from_service_name("alpha._dpipes._tcp.local.") == "alpha"
    assert instance_from_service_name("Alpha._DPIPES._tcp.local.") == "Alpha"
    for bad in ("alpha._http._tcp.local.", "._dpipes._tcp.local.", "_dpipes._tcp.local."):
        with pytest.raises(TxtError):
            instance_from_service_name(bad)
    assert check_node_name("node-1_a") == "node-1_a"
    with pytest.raises(BadTypeInNameException):
        service_type_name("_dp-" + "x" * 60 + "._sub._dpipes._tcp.local.")  # why long labels are cut
