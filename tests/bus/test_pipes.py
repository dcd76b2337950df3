"""The Pipes wire codec: bootstrap encoding against dagster-pipes, message validation, bounds, schema."""

from __future__ import annotations

import base64
import copy
import gzip
import json
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast, get_args

import dagster_pipes as dp
import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpipes.bus.errors import DecodeError
from dpipes.bus.pipes import (
    MAX_JSON_DEPTH,
    MAX_LINE_BYTES,
    PIPES_LOG_LEVELS,
    PIPES_METADATA_TYPES,
    PIPES_METHODS,
    PIPES_PROTOCOL_VERSION,
    PIPES_VERSION_FIELD,
    PipesMessage,
    PipesMessageError,
    decode_bootstrap,
    encode_bootstrap,
    load_pipes_schema,
    parse_message,
)

SCHEMA = load_pipes_schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def envelope(method: Any, params: Any) -> dict[str, Any]:
    return {PIPES_VERSION_FIELD: PIPES_PROTOCOL_VERSION, "method": method, "params": params}


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


# ------------------------------------------------------------------------------------- constants


def test_tables_match_dagster_pipes() -> None:
    assert PIPES_PROTOCOL_VERSION == dp.PIPES_PROTOCOL_VERSION
    assert PIPES_VERSION_FIELD == dp.PIPES_PROTOCOL_VERSION_FIELD
    assert set(PIPES_METHODS) == set(get_args(dp.Method))
    assert set(PIPES_METADATA_TYPES) == set(get_args(dp.PipesMetadataType))
    assert set(SCHEMA["properties"]["method"]["enum"]) == set(PIPES_METHODS)
    assert set(SCHEMA["$defs"]["metadataValue"]["properties"]["type"]["enum"]) == set(PIPES_METADATA_TYPES)
    assert set(SCHEMA["$defs"]["log"]["properties"]["level"]["enum"]) == set(PIPES_LOG_LEVELS)
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


# ------------------------------------------------------------------------------------- bootstrap


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_bootstrap_round_trips_with_dagster_pipes(value: Any) -> None:
    ours = encode_bootstrap(value)
    assert ours == dp.encode_param(value)  # byte-for-byte the same encoding
    assert dp.decode_param(ours) == value
    assert decode_bootstrap(dp.encode_param(value)) == value
    assert decode_bootstrap(ours.encode()) == value


def test_bootstrap_of_real_params() -> None:
    for params in (
        {"data": {"run_id": "r", "extras": {"k": [1, 2]}}},
        {"path": "ctx.json"},
        {"stdio": "stderr"},
    ):
        assert decode_bootstrap(dp.encode_param(params)) == params
        loader = dp.PipesMappingParamsLoader({dp.DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_bootstrap(params)})
        assert loader.load_context_params() == params


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def raw_deflate(data: bytes) -> bytes:
    deflater = zlib.compressobj(wbits=-15)
    return deflater.compress(data) + deflater.flush()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b64(gzip.compress(b"{}")), "not a zlib stream"),
        (b64(raw_deflate(b"{}")), "not a zlib stream"),
        (b64(zlib.compress(b"{}")[:-3]), "truncated"),
        (b64(zlib.compress(b"{}") + b"junk"), "after its zlib stream"),
        ("not base64!", "not base64"),
        ("QUJD=extra", "not base64"),
        (b64(zlib.compress(b"\xff\xfe{}")), "not UTF-8 JSON"),
        (b64(zlib.compress(b"{'a': 1}")), "not UTF-8 JSON"),
        (b64(zlib.compress(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))), "nested deeper"),
        (b64(zlib.compress(b"[" * 100_000)), "nested deeper"),
    ],
)
def test_bootstrap_rejects_malformed(value: str, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        decode_bootstrap(value)


def test_bootstrap_zip_bomb_is_stopped_while_inflating() -> None:
    bomb = b64(zlib.compress(b"[" + b" " * (64 << 20) + b"]", 9))  # 64 MiB of JSON in ~64 KiB
    assert len(bomb) < 200_000
    with pytest.raises(DecodeError, match="inflates beyond"):
        decode_bootstrap(bomb)
    with pytest.raises(DecodeError, match="inflates beyond the 10-byte limit"):
        decode_bootstrap(encode_bootstrap({"a": "0123456789"}), max_json_bytes=10)
    assert decode_bootstrap(encode_bootstrap("x" * 8), max_json_bytes=10) == "x" * 8


def test_bootstrap_length_bound() -> None:
    with pytest.raises(DecodeError, match="exceeds the 8 limit"):
        decode_bootstrap(encode_bootstrap({"a": 1}), max_chars=8)
    with pytest.raises(DecodeError, match="must be a string"):
        decode_bootstrap(cast(Any, 123))


# ------------------------------------------------------------------------ real dagster-pipes output

ALL_METADATA: dict[str, Any] = {
    "infer_int": 1,
    "infer_float": 1.5,
    "infer_str": "s",
    "infer_list": [1, "a"],
    "infer_none": None,
    "infer_bool": True,
    "text": {"raw_value": "hello", "type": "text"},
    "url": {"raw_value": "https://example.invalid/x", "type": "url"},
    "path": {"raw_value": "data/out.csv", "type": "path"},
    "notebook": {"raw_value": "nb.ipynb", "type": "notebook"},
    "json": {"raw_value": {"a": [1, 2]}, "type": "json"},
    "json_list": {"raw_value": [1, 2], "type": "json"},
    "md": {"raw_value": "# Title", "type": "md"},
    "float": {"raw_value": 0.5, "type": "float"},
    "float_int": {"raw_value": 2, "type": "float"},
    "int": {"raw_value": 3, "type": "int"},
    "bool": {"raw_value": False, "type": "bool"},
    "dagster_run": {"raw_value": "0123-abcd", "type": "dagster_run"},
    "asset": {"raw_value": "a/b", "type": "asset"},
    "null": {"raw_value": None, "type": "null"},
    "table": {
        "raw_value": {"records": [{"a": 1, "b": "x"}], "schema": [{"name": "a", "type": "int"}]},
        "type": "table",
    },
    "table_schema": {
        "raw_value": {"columns": [{"name": "a", "type": "int", "description": "the a"}]},
        "type": "table_schema",
    },
    "table_column_lineage": {
        "raw_value": {"deps_by_column": {"a": [{"asset_key": "up", "column_name": "x"}]}},
        "type": "table_column_lineage",
    },
    "timestamp": {"raw_value": 1_700_000_000.25, "type": "timestamp"},
    "infer": {"raw_value": {"nested": True}, "type": "__infer__"},
}


class _CaptureChannel(dp.PipesMessageWriterChannel):
    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines

    def write_message(self, message: dp.PipesMessage) -> None:
        self.lines.append((json.dumps(message) + "\n").encode())  # what the file writer writes


class _CaptureWriter(dp.PipesMessageWriter[_CaptureChannel]):
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    @contextmanager
    def open(self, params: dp.PipesParams) -> Iterator[_CaptureChannel]:
        yield _CaptureChannel(self.lines)


def dagster_pipes_lines(*, fail: bool = False) -> list[bytes]:
    """Message lines produced by dagster-pipes' own PipesContext, in this process."""
    context: dict[str, Any] = {
        "asset_keys": ["my/asset", "other"],
        "code_version_by_asset_key": None,
        "provenance_by_asset_key": None,
        "partition_key": None,
        "partition_key_range": None,
        "partition_time_window": None,
        "run_id": "run-1",
        "job_name": None,
        "retry_number": 0,
        "extras": {},
    }
    loader = dp.PipesMappingParamsLoader(
        {
            dp.DAGSTER_PIPES_CONTEXT_ENV_VAR: encode_bootstrap({"data": context}),
            dp.DAGSTER_PIPES_MESSAGES_ENV_VAR: encode_bootstrap({"path": "unused"}),
        }
    )
    writer = _CaptureWriter()
    pipes = dp.PipesContext(loader, dp.PipesDefaultContextLoader(), writer)
    if fail:
        with pytest.raises(ValueError), pipes:
            try:
                try:
                    raise KeyError("inner")
                except KeyError:
                    raise TypeError("middle")  # noqa: B904  # an implicit __context__ on purpose
            except TypeError as e:
                raise ValueError("outer") from e
        return writer.lines
    with pipes:
        for level in ("debug", "info", "warning", "error", "critical"):
            getattr(pipes.log, level)(f"a {level} line")
        pipes.report_asset_materialization(metadata=ALL_METADATA, data_version="v1", asset_key="my/asset")
        pipes.report_asset_materialization(asset_key="other")  # metadata and data_version null
        pipes.report_asset_check("c1", passed=True, asset_key="my/asset")
        pipes.report_asset_check(
            "c2",
            passed=False,
            severity="WARN",
            metadata={"n": {"raw_value": 1, "type": "int"}},
            asset_key="other",
        )
        pipes.report_custom_message({"any": ["json", 1, None]})
        pipes.report_custom_message(None)
        pipes.log_external_stream("stdout", "some output\n")
        pipes.log_external_stream("stderr", "some error\n", extras={"k": 1})
    return writer.lines


def test_real_messages_parse_and_match_the_schema() -> None:
    lines = dagster_pipes_lines()
    messages = [parse_message(x) for x in lines]
    assert [m.method for m in messages] == [
        "opened",
        *["log"] * 5,
        "report_asset_materialization",
        "report_asset_materialization",
        "report_asset_check",
        "report_asset_check",
        "report_custom_message",
        "report_custom_message",
        "log_external_stream",
        "log_external_stream",
        "closed",
    ]
    assert [m.params["level"] for m in messages[1:6]] == ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    metadata = messages[6].params["metadata"]
    assert set(metadata) == set(ALL_METADATA)
    assert {v["type"] for v in metadata.values()} == PIPES_METADATA_TYPES
    assert messages[7].params == {"asset_key": "other", "data_version": None, "metadata": None}
    assert messages[-1].params == {}  # success is an empty object, not {"exception": null}
    for x, m in zip(lines, messages, strict=True):
        assert m.raw == json.loads(x)
        VALIDATOR.validate(m.raw)


def test_real_failure_message() -> None:
    closed = parse_message(dagster_pipes_lines(fail=True)[-1])
    assert closed.method == "closed"
    exc = closed.params["exception"]
    assert exc["name"] == "ValueError"
    assert exc["message"] == "ValueError: outer\n"
    assert exc["cause"]["name"] == "TypeError"
    assert exc["context"] is None  # `raise ... from` suppresses the context
    assert exc["cause"]["context"]["name"] == "KeyError"
    assert exc["cause"]["cause"] is None
    assert all(isinstance(frame, str) for frame in exc["stack"])
    VALIDATOR.validate(closed.raw)


def test_parse_accepts_str_and_no_newline() -> None:
    msg = parse_message('{"__dagster_pipes_version": "0.1", "method": "opened", "params": {"extras": {}}}')
    assert msg == PipesMessage("opened", {"extras": {}}, {**envelope("opened", {"extras": {}})})
    assert parse_message(line(envelope("closed", None))).params == {}
    assert parse_message(line(envelope("opened", {}))).params == {}


# ---------------------------------------------------------------------------------- invalid messages

MAT = {"asset_key": "a", "metadata": None, "data_version": None}
CHK = {"asset_key": "a", "check_name": "c", "passed": True, "severity": "ERROR", "metadata": None}
EXC: dict[str, Any] = {"message": "m", "stack": [], "name": None, "cause": None, "context": None}


def md(value: Any, kind: str) -> dict[str, Any]:
    return {**MAT, "metadata": {"m": {"raw_value": value, "type": kind}}}


# (message object, method in the error, field in the error, reason fragment)
INVALID: list[tuple[Any, str | None, str | None, str]] = [
    ([1, 2], None, None, "must be a JSON object"),
    ({"method": "log", "params": {}}, None, None, "missing '__dagster_pipes_version'"),
    (
        {**envelope("log", {}), PIPES_VERSION_FIELD: "0.2"},
        None,
        PIPES_VERSION_FIELD,
        "unsupported protocol version",
    ),
    ({PIPES_VERSION_FIELD: "0.1", "params": {}}, None, None, "missing 'method'"),
    (envelope(7, {}), None, "method", "expected a string"),
    (envelope("report_progress", {}), None, "method", "unknown method"),
    ({PIPES_VERSION_FIELD: "0.1", "method": "log"}, "log", None, "missing 'params'"),
    (envelope("log", None), "log", "params", "expected an object, got null"),
    (envelope("log", []), "log", "params", "expected an object"),
    (envelope("opened", {"extras": []}), "opened", "params.extras", "expected an object"),
    (envelope("closed", {"exception": "boom"}), "closed", "params.exception", "expected an exception"),
    (envelope("closed", {"exception": {**EXC, "stack": "x"}}), "closed", "params.exception.stack", "array"),
    (
        envelope("closed", {"exception": {**EXC, "stack": [1]}}),
        "closed",
        "params.exception.stack[0]",
        "string",
    ),
    (envelope("closed", {"exception": {"message": "m"}}), "closed", "params.exception", "missing key"),
    (
        envelope("closed", {"exception": {**EXC, "cause": {**EXC, "context": {**EXC, "name": 3}}}}),
        "closed",
        "params.exception.cause.context.name",
        "a string or null",
    ),
    (envelope("log", {"message": "m"}), "log", "params", "missing required key(s) level"),
    (envelope("log", {"message": "m", "level": "warn"}), "log", "params.level", "got 'warn'"),
    (envelope("log", {"message": "m", "level": "Level 25"}), "log", "params.level", "expected one of"),
    (envelope("log", {"message": 1, "level": "INFO"}), "log", "params.message", "expected a string"),
    (envelope("log", {"message": "m", "level": "INFO", "x": 1}), "log", "params", "unknown key(s) 'x'"),
    (
        envelope("report_asset_materialization", {"asset_key": "a"}),
        "report_asset_materialization",
        "params",
        "missing",
    ),
    (
        envelope("report_asset_materialization", {**MAT, "data_version": 1}),
        "report_asset_materialization",
        "params.data_version",
        "a string or null",
    ),
    (
        envelope("report_asset_materialization", {**MAT, "metadata": []}),
        "report_asset_materialization",
        "params.metadata",
        "an object",
    ),
    (
        envelope("report_asset_materialization", {**MAT, "metadata": {"m": 1}}),
        "report_asset_materialization",
        "params.metadata.m",
        "{raw_value, type}",
    ),
    (
        envelope("report_asset_materialization", {**MAT, "metadata": {"m": {"raw_value": 1}}}),
        "report_asset_materialization",
        "params.metadata.m",
        "exactly the keys",
    ),
    (
        envelope("report_asset_materialization", md(1, "job")),
        "report_asset_materialization",
        "params.metadata.m.type",
        "unknown metadata type 'job'",
    ),
    (
        envelope("report_asset_materialization", md(1, "text")),
        None,
        "params.metadata.m.raw_value",
        "a string",
    ),
    (envelope("report_asset_materialization", md(1, "url")), None, "params.metadata.m.raw_value", "a string"),
    (envelope("report_asset_materialization", md("x", "json")), None, "params.metadata.m.raw_value", "array"),
    (
        envelope("report_asset_materialization", md("1", "float")),
        None,
        "params.metadata.m.raw_value",
        "number",
    ),
    (
        envelope("report_asset_materialization", md(True, "float")),
        None,
        "params.metadata.m.raw_value",
        "number",
    ),
    (
        envelope("report_asset_materialization", md(1.5, "int")),
        None,
        "params.metadata.m.raw_value",
        "integer",
    ),
    (
        envelope("report_asset_materialization", md(True, "int")),
        None,
        "params.metadata.m.raw_value",
        "integer",
    ),
    (envelope("report_asset_materialization", md(0, "bool")), None, "params.metadata.m.raw_value", "boolean"),
    (
        envelope("report_asset_materialization", md(None, "timestamp")),
        None,
        "params.metadata.m.raw_value",
        "number",
    ),
    (envelope("report_asset_materialization", md(0, "null")), None, "params.metadata.m.raw_value", "null"),
    (envelope("report_asset_materialization", md([], "table")), None, "params.metadata.m.raw_value", "table"),
    (
        envelope("report_asset_materialization", md({"records": [1], "schema": []}, "table")),
        None,
        "params.metadata.m.raw_value.records[0]",
        "an object",
    ),
    (
        envelope("report_asset_materialization", md({"records": [], "schema": [{"name": "a"}]}, "table")),
        None,
        "params.metadata.m.raw_value.schema[0].type",
        "a string",
    ),
    (
        envelope("report_asset_materialization", md({"cols": []}, "table_schema")),
        None,
        "params.metadata.m.raw_value.columns",
        "columns",
    ),
    (
        envelope(
            "report_asset_materialization",
            md({"deps_by_column": {"a": [{"asset_key": "u"}]}}, "table_column_lineage"),
        ),
        None,
        "params.metadata.m.raw_value.deps_by_column.a[0].column_name",
        "a string",
    ),
    (
        envelope("report_asset_check", {**CHK, "passed": "yes"}),
        "report_asset_check",
        "params.passed",
        "boolean",
    ),
    (
        envelope("report_asset_check", {**CHK, "severity": "warn"}),
        "report_asset_check",
        "params.severity",
        "WARN",
    ),
    (
        envelope("report_asset_check", {**CHK, "check_name": None}),
        "report_asset_check",
        "params.check_name",
        "string",
    ),
    (
        envelope("report_asset_check", {**CHK, "metadata": {"m": {"raw_value": 1, "type": "x"}}}),
        None,
        "type",
        "unknown",
    ),
    (
        envelope("report_custom_message", {}),
        "report_custom_message",
        "params",
        "missing required key(s) payload",
    ),
    (
        envelope("report_custom_message", {"payload": 1, "more": 2}),
        "report_custom_message",
        "params",
        "unknown key",
    ),
    (
        envelope("log_external_stream", {"stream": "stdin", "text": "x"}),
        None,
        "params.stream",
        "'stdout', 'stderr'",
    ),
    (envelope("log_external_stream", {"stream": "stdout", "text": 1}), None, "params.text", "string"),
    (
        envelope("log_external_stream", {"stream": "stdout", "text": "", "extras": 1}),
        None,
        "params.extras",
        "object",
    ),
]


@pytest.mark.parametrize(("obj", "method", "field", "reason"), INVALID)
def test_invalid_messages_are_named(obj: Any, method: str | None, field: str | None, reason: str) -> None:
    with pytest.raises(PipesMessageError) as info:
        parse_message(line(obj))
    err = info.value
    assert reason in str(err)
    if method is not None:
        assert err.method == method
        assert str(err).startswith(method)
    if field is not None:
        assert err.field is not None and err.field.endswith(field)
    assert isinstance(err, DecodeError) and isinstance(err, ValueError)
    # The schema, for other languages, draws the same line.
    assert not VALIDATOR.is_valid(obj)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty line"),
        (b"  \n", "empty line"),
        (b"{not json}\n", "not JSON"),
        (b'{"a": 1} trailing\n', "not JSON"),
        (
            b'{"__dagster_pipes_version": "0.1", "method": "log", "params": {"message": "\xff", "level": "INFO"}}',
            "not UTF-8",
        ),
        (line(envelope("report_custom_message", {"payload": "\ud800"})), "lone UTF-16 surrogate"),
        (line(envelope("report_custom_message", {"payload": {"\udfff": 1}})), "lone UTF-16 surrogate"),
        (b'{"__dagster_pipes_version": "0.1", "method": "log", "params": %b}' % (b"1" * 5000), "not JSON"),
        ("\ud800".encode("utf-8", "surrogatepass"), "not UTF-8"),
    ],
)
def test_malformed_lines(raw: bytes, reason: str) -> None:
    with pytest.raises(PipesMessageError, match=reason):
        parse_message(raw)


def test_str_with_surrogate() -> None:
    with pytest.raises(PipesMessageError, match="not valid Unicode"):
        parse_message('{"x": "\ud800"}')
    with pytest.raises(PipesMessageError, match="bytes or str"):
        parse_message(cast(Any, None))


def test_nan_is_accepted_as_dagster_pipes_writes_it() -> None:
    raw = json.dumps(envelope("report_asset_materialization", md(float("nan"), "float")))
    assert "NaN" in raw
    parse_message(raw)


# ------------------------------------------------------------------------------------------- bounds


def nested_payload(levels: int) -> bytes:
    # The envelope is depth 1, params 2, the payload 3: `levels` lists make the payload that deep.
    return b'{"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": %s}}' % (
        b"[" * levels + b"]" * levels
    )


def test_depth_bound() -> None:
    assert parse_message(nested_payload(MAX_JSON_DEPTH - 2)).method == "report_custom_message"
    with pytest.raises(PipesMessageError, match="nested deeper than"):
        parse_message(nested_payload(MAX_JSON_DEPTH - 1))
    with pytest.raises(PipesMessageError, match="nested deeper than"):
        parse_message(nested_payload(200_000))  # past the C parser's recursion limit


def test_line_length_bound() -> None:
    big = line(envelope("report_custom_message", {"payload": "x" * (1 << 20)}))
    assert parse_message(big).params["payload"] == "x" * (1 << 20)  # 1 MiB payload passes by default
    with pytest.raises(PipesMessageError, match="exceeds the 1000-byte limit"):
        parse_message(big, max_line_bytes=1000)
    with pytest.raises(PipesMessageError, match=f"exceeds the {MAX_LINE_BYTES}-byte limit"):
        parse_message(b" " * (MAX_LINE_BYTES + 1))


# --------------------------------------------------------------------------------------- properties

VALID_LINES = dagster_pipes_lines() + dagster_pipes_lines(fail=True)
VALID_OBJECTS = [json.loads(x) for x in VALID_LINES]


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_messages(draw: st.DrawFn) -> Any:
    obj = copy.deepcopy(draw(st.sampled_from(VALID_OBJECTS)))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(obj))
        path = draw(st.sampled_from(paths))
        if not path:
            obj = draw(json_values)
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(json_values | st.sampled_from(sorted(PIPES_METADATA_TYPES)))
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6) | st.sampled_from(["params", "raw_value", "type"]))] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return obj


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_messages())
def test_mutated_messages_raise_only_pipes_message_error(obj: Any) -> None:
    try:
        msg = parse_message(json.dumps(obj))
    except PipesMessageError as e:
        if VALIDATOR.is_valid(obj):
            # The only rule the schema cannot say: an "int" raw value written with a fraction.
            assert "expected an integer or null" in str(e), (str(e), obj)
        return
    assert msg.raw == obj
    VALIDATOR.validate(obj)  # whatever the parser accepts, the schema accepts


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_random_input_raises_only_pipes_message_error(raw: bytes) -> None:
    try:
        parse_message(raw)
    except PipesMessageError:
        pass
