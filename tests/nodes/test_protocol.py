"""The control protocol: typed bodies round-trip, every malformed body is a coded refusal naming
its field, the JSON schema agrees with the parser and is current, and the spec names every field."""

from __future__ import annotations

import functools
import json
import re
import typing
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpipes.nodes import protocol
from dpipes.nodes.protocol import BODIES, Body, ControlError

SCHEMA_FILE = Path(protocol.__file__).with_name("control_schema.json")

json_leaf = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=12) | st.floats(allow_nan=False)
)
json_maps = st.dictionaries(
    st.text(max_size=8),
    st.recursive(
        json_leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=12,
    ),
    max_size=4,
)
wire_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8) | st.integers(), inner, max_size=3),
    max_leaves=10,
)


def strategy_for(hint: Any, bounds: dict[str, Any]) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(hint)
    if hint is str:
        if bounds["choices"]:
            return st.sampled_from(bounds["choices"])
        return st.text(min_size=1 if bounds["non_empty"] else 0, max_size=30)
    if hint is bool:
        return st.booleans()
    if hint is int:
        low = bounds["min"] if bounds["min"] is not None else -(2**62)
        high = bounds["max"] if bounds["max"] is not None else 2**62
        return st.integers(low, high)
    if hint is float:
        return st.floats(allow_nan=False, allow_infinity=False)
    if origin is tuple:
        item = strategy_for(typing.get_args(hint)[0], protocol._bounds())
        return st.lists(item, min_size=1 if bounds["non_empty"] else 0, max_size=4).map(tuple)
    if origin is dict:
        value_type = typing.get_args(hint)[1]
        if value_type is Any:
            return json_maps
        return st.dictionaries(st.text(max_size=8), strategy_for(value_type, protocol._bounds()), max_size=4)
    if isinstance(hint, type) and issubclass(hint, Body):
        return body_strategy(hint)
    raise AssertionError(hint)


def body_strategy(cls: type[Body]) -> st.SearchStrategy[Body]:
    return st.builds(cls, **{name: strategy_for(hint, b) for name, hint, _d, b in cls._fields()})


any_body = st.one_of([body_strategy(cls) for cls in sorted(set(BODIES.values()), key=lambda c: c.__name__)])


def off_the_wire(body: Body) -> Any:
    return msgpack.unpackb(msgpack.packb(body.to_body()), raw=False, strict_map_key=False)


@given(any_body)
@settings(max_examples=300)
def test_every_body_round_trips_through_msgpack(body: Body) -> None:
    assert type(body).parse(off_the_wire(body)) == body


@functools.cache
def body_validator(name: str) -> Any:
    """The schema file's validator for body ``name``, checked and built once (``jsonschema.validate``
    does both per call)."""
    defs = json.loads(SCHEMA_FILE.read_text())["$defs"]
    schema = {"$defs": defs, "$ref": f"#/$defs/{name}"}
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


@given(any_body)
@settings(max_examples=200)
def test_real_bodies_validate_against_the_schema(body: Body) -> None:
    body_validator(type(body).__name__).validate(json.loads(json.dumps(body.to_body())))


@given(st.sampled_from(protocol.METHODS), wire_values)
@settings(max_examples=500)
def test_any_body_off_the_wire_is_parsed_or_refused_with_a_code(method: str, body: Any) -> None:
    try:
        protocol.parse_request(method, body)
    except ControlError as exc:
        assert exc.code == protocol.BAD_REQUEST and exc.field
        assert exc.body() == {"code": "bad-request", "field": exc.field}


def required_fields(cls: type[Body]) -> list[tuple[str, Any]]:
    return [(name, hint) for name, hint, default, _b in cls._fields() if default is protocol._MISSING]


@given(st.sampled_from(sorted(BODIES)), st.data())
@settings(max_examples=100)
def test_a_missing_or_mistyped_field_is_refused_by_name(key: tuple[str, str], data: st.DataObject) -> None:
    cls = BODIES[key]
    valid = data.draw(body_strategy(cls)).to_body()
    for name, _hint in required_fields(cls):
        with pytest.raises(ControlError) as missing:
            cls.parse({k: v for k, v in valid.items() if k != name})
        assert missing.value.field == name and "missing" in str(missing.value)
    for name, hint, _d, _b in cls._fields():
        wrong: Any = True if hint is int else 1 if hint is bool else [True] if hint is str else "text"
        with pytest.raises(ControlError) as mistyped:
            cls.parse({**valid, name: wrong})
        assert mistyped.value.code == protocol.BAD_REQUEST and mistyped.value.field == name


def test_bounds_are_enforced_and_named() -> None:
    ok = protocol.RunRequest(pipeline="seq 5", protocol=2).to_body()
    cases = {
        "pipeline": "x" * (protocol.MAX_PIPELINE_CHARS + 1),
        "mode": "xml",
        "require": ["x"] * (protocol.MAX_ITEMS + 1),
        "user": "u" * (protocol.MAX_TEXT_CHARS + 1),
    }
    for name, value in cases.items():
        with pytest.raises(ControlError) as info:
            protocol.parse_request("run", {**ok, name: value})
        assert info.value.field == name
    with pytest.raises(ControlError) as deep:
        nested: dict[str, Any] = {}
        for _ in range(40):
            nested = {"a": nested}
        protocol.parse_request("run", {**ok, "pipes": nested})
    assert deep.value.field == "pipes" and "deeper" in str(deep.value)
    with pytest.raises(ControlError) as empty_argv:
        protocol.parse_request("negotiate", {"pipeline": "p", "stage": 0, "argv": [], "protocol": 2})
    assert empty_argv.value.field == "argv"
    with pytest.raises(ControlError) as nested_field:
        protocol.parse_reply(
            "run", {"pipeline": "p", "stages": [{"index": 0, "node": "a", "argv": "seq", "addr": "a/p.0"}]}
        )
    assert nested_field.value.field == "stages.0.argv"


def test_unknown_keys_are_ignored_for_compatible_additions() -> None:
    body = {"pipeline": "p", "reason": "why", "from_the_future": {"x": 1}}
    assert protocol.parse_request("cancel", body) == protocol.CancelRequest(pipeline="p", reason="why")


def test_unknown_method_is_its_own_code() -> None:
    with pytest.raises(ControlError) as info:
        protocol.parse_request("format-disk", {})
    assert info.value.code == protocol.UNKNOWN_METHOD and "run" in str(info.value)


def test_a_reply_without_a_code_is_internal_and_codes_survive() -> None:
    assert protocol.error_of("run", "a/ctl", "boom", {}).code == protocol.INTERNAL
    err = protocol.error_of("run", "a/ctl", "no", {"code": "refused", "field": ""})
    assert (err.code, str(err)) == ("refused", "no")


def test_schema_file_is_current() -> None:
    assert SCHEMA_FILE.read_text() == protocol.schema_text(), "regenerate nodes/control_schema.json"


def test_the_spec_names_every_method_field_and_code() -> None:
    doc = protocol.__doc__ or ""
    for (method, _role), cls in BODIES.items():
        assert f"``{method}``" in doc, method
        for name, _h, _d, _b in cls._fields():
            assert re.search(rf"\b{name}: ", doc), f"{method}: field {name} is not in the spec"
    for code in protocol.CODES:
        assert f"``{code}``" in doc, code
    # The limits table gives every constant's value: the numbers must be the code's.
    table = dict(re.findall(r"``([A-Z_]+)``\s+([0-9.]+)", doc))
    names = ("MAX_TEXT_CHARS", "MAX_PIPELINE_CHARS", "MAX_ITEMS", "CONTROL_TIMEOUT_S", "RUN_TIMEOUT_S")
    for constant in (*names, "REPORT_TIMEOUT_S", "GOSSIP_INTERVAL_S"):
        assert float(table[constant]) == getattr(protocol, constant), constant
