"""Dagster Pipes wire format, protocol version 0.1: bootstrap parameters and message lines.

This module docstring is the spec. It follows the installed ``dagster-pipes`` library (the
external side) and Dagster's orchestration-side message handler; where the two disagree, the
stricter rule that Dagster would still accept is written here. A JSON schema of the same rules,
for other languages, ships beside this module as ``pipes_schema.json`` (:func:`load_pipes_schema`).

Bootstrap parameters
--------------------
The orchestrator hands the external process two parameter maps, each a JSON object encoded as
``base64(zlib(json))``: standard base64 with padding, of a zlib stream (RFC 1950: a 2-byte
header and an Adler-32 trailer; *not* gzip, *not* raw deflate), of UTF-8 JSON text. It puts them
in the environment variables ``DAGSTER_PIPES_CONTEXT`` and ``DAGSTER_PIPES_MESSAGES`` (or the
CLI arguments ``--dagster-pipes-context``/``--dagster-pipes-messages``).

- context params: ``{"data": <context>}`` (the context inline) or ``{"path": "<file>"}`` (a
  JSON file holding the context).
- messages params: ``{"path": "<file>"}`` (append one JSON line per message to that path), or
  ``{"stdio": "stderr" | "stdout"}`` (write the lines to that stream), or
  ``{"buffered_stdio": ...}`` (the same, all at close). ``"include_stdio_in_messages": true``
  next to ``path`` makes the Python library also forward its own stdout/stderr as
  ``log_external_stream`` messages.

:func:`encode_bootstrap` gives byte-for-byte the same string as ``dagster_pipes.encode_param``.
:func:`decode_bootstrap` reads anything that function produces, but is bounded: at most
``MAX_BOOTSTRAP_CHARS`` characters in, at most ``MAX_BOOTSTRAP_JSON_BYTES`` bytes after
inflating (checked while inflating, so a zip bomb costs no memory), strict base64, one complete
zlib stream with nothing after it, UTF-8 JSON nested at most ``MAX_JSON_DEPTH`` deep.

Messages
--------
One message is one line: a UTF-8 JSON object followed by ``\\n`` (the newline is optional to
:func:`parse_message`; the readers split on it). The envelope::

    {"__dagster_pipes_version": "0.1", "method": <method>, "params": <object>}

Other envelope keys are ignored (kept in :attr:`PipesMessage.raw`). A line is at most
``MAX_LINE_BYTES`` bytes (16 MiB, so a 1 MiB custom payload fits with room to spare), and its
JSON is nested at most ``MAX_JSON_DEPTH`` deep (the envelope is depth 1). ``NaN`` and
``Infinity`` are accepted, as Python's ``json`` (and so dagster-pipes) writes them for float
values; strings must be valid Unicode (a lone UTF-16 surrogate escape such as ``"\\ud800"`` is
rejected, as nothing downstream could re-encode it).

Methods and their params. A field marked *required* must be present (it may still be null where
the type allows); Dagster's handler calls ``handler(**params)`` for every method except
``opened`` and ``closed``, so those methods take no other keys.

``opened``
    ``{"extras": object}``; the library always sends ``extras``, optional here; other keys
    allowed.
``closed``
    ``{}`` on success (the library sends an empty object, not ``{"exception": null}``), or
    ``{"exception": <exception> | null}``; params may also be null. Other keys allowed.
    ``<exception>`` is ``{"message": str, "stack": [str], "name": str | null,
    "cause": <exception> | null, "context": <exception> | null}``, all five required.
``log``
    ``{"message": str, "level": "DEBUG" | "INFO" | "WARNING" | "ERROR" | "CRITICAL"}``, both
    required. (Python's logging turns a custom level into ``"Level 25"``; that is rejected.)
``report_asset_materialization``
    ``{"asset_key": str | null, "metadata": <metadata> | null, "data_version": str | null}``,
    all required; a null ``asset_key`` means the one asset in scope.
``report_asset_check``
    ``{"asset_key": str | null, "check_name": str, "passed": bool,
    "severity": "ERROR" | "WARN", "metadata": <metadata> | null}``, all required.
``report_custom_message``
    ``{"payload": <any JSON>}``, required.
``log_external_stream``
    ``{"stream": "stdout" | "stderr", "text": str, "extras": object | null}``; ``extras``
    optional (the library always sends ``{}``).

``<metadata>`` is an object mapping names to ``{"raw_value": <JSON>, "type": <type>}`` with
exactly those two keys. ``raw_value`` is checked against ``type``:

================================  ==============================================================
``__infer__``                     any JSON (Dagster infers the type)
``text`` ``url`` ``path``         string
``notebook`` ``md``
``dagster_run`` ``asset``         string (a run id; an asset key as a ``/``-separated string)
``json``                          object, array or null
``float``                         number or null (an integral number is fine)
``int``                           integer or null
``bool``                          boolean or null
``timestamp``                     number (seconds since the epoch)
``null``                          null
``table``                         ``{"records": [object], "schema": [<column>]}``
``table_schema``                  ``{"columns": [<column>]}``
``table_column_lineage``          ``{"deps_by_column": {name: [{"asset_key": str,
                                  "column_name": str}]}}``
================================  ==============================================================

``<column>`` is an object with string ``name`` and ``type`` (other keys are Dagster's business).

Every violation raises :class:`PipesMessageError` (a :class:`~dpipes.bus.errors.DecodeError`)
whose message names the method and the field, e.g. ``report_asset_check: params.severity:
expected one of 'ERROR', 'WARN', got 'warn'``.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from dpipes.bus.errors import DecodeError

__all__ = [
    "MAX_BOOTSTRAP_CHARS",
    "MAX_BOOTSTRAP_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_LINE_BYTES",
    "PIPES_CONTEXT_ENV_VAR",
    "PIPES_LOG_LEVELS",
    "PIPES_MESSAGES_ENV_VAR",
    "PIPES_METADATA_TYPES",
    "PIPES_METHODS",
    "PIPES_PROTOCOL_VERSION",
    "PIPES_VERSION_FIELD",
    "PipesMessage",
    "PipesMessageError",
    "PipesMethod",
    "decode_bootstrap",
    "encode_bootstrap",
    "load_pipes_schema",
    "parse_message",
]

PIPES_PROTOCOL_VERSION: Final = "0.1"
PIPES_VERSION_FIELD: Final = "__dagster_pipes_version"
PIPES_CONTEXT_ENV_VAR: Final = "DAGSTER_PIPES_CONTEXT"
PIPES_MESSAGES_ENV_VAR: Final = "DAGSTER_PIPES_MESSAGES"
BUS_OFFER_KEY: Final = "dpipes_bus"  # messages params key offering the bus (dpipes.bus.pipes_writer)

MAX_BOOTSTRAP_CHARS: Final = 4 * 1024 * 1024  # env strings are capped at 128 KiB by Linux; files are not
MAX_BOOTSTRAP_JSON_BYTES: Final = 16 * 1024 * 1024
MAX_LINE_BYTES: Final = 16 * 1024 * 1024
MAX_JSON_DEPTH: Final = 100  # generous for exception chains and nested payloads; the C parser stops ~1000

PIPES_LOG_LEVELS: Final = frozenset({"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"})
PIPES_CHECK_SEVERITIES: Final = ("ERROR", "WARN")
PIPES_STREAMS: Final = ("stdout", "stderr")

_ZLIB_CHUNK = 64 * 1024
_SCHEMA_FILE = "pipes_schema.json"


class PipesMessageError(DecodeError):
    """A Pipes message line is malformed: the message names the method and the field."""

    def __init__(self, reason: str, *, method: str | None = None, field: str | None = None) -> None:
        self.reason = reason
        self.method = method
        self.field = field
        where = ": ".join(part for part in (method, field) if part)
        super().__init__(f"{where}: {reason}" if where else reason)


@dataclass(frozen=True, slots=True)
class PipesMessage:
    """One validated Pipes message: its method, its params (``{}`` for null), the whole object."""

    method: str
    params: Mapping[str, Any]
    raw: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class PipesMethod:
    """The params rule of one Pipes method."""

    name: str
    required: frozenset[str]
    optional: frozenset[str]
    other_keys: bool  # False where Dagster calls ``handler(**params)``: an unknown key would crash it
    params_nullable: bool
    check: Callable[[Mapping[str, Any]], None]


# ---------------------------------------------------------------------------------------- bootstrap


def encode_bootstrap(obj: Any) -> str:
    """Encode a bootstrap parameter map as ``base64(zlib(json))``, exactly as dagster-pipes does.

    Raises:
        TypeError: ``obj`` is not JSON-serialisable.
    """
    serialized = json.dumps(obj)
    return base64.b64encode(zlib.compress(serialized.encode("utf-8"))).decode("ascii")


def decode_bootstrap(
    s: str | bytes,
    *,
    max_chars: int = MAX_BOOTSTRAP_CHARS,
    max_json_bytes: int = MAX_BOOTSTRAP_JSON_BYTES,
) -> Any:
    """Decode a ``base64(zlib(json))`` bootstrap value, within bounds.

    Args:
        s: the encoded value, as found in ``DAGSTER_PIPES_CONTEXT``/``DAGSTER_PIPES_MESSAGES``.
        max_chars: longest encoded value accepted.
        max_json_bytes: most JSON bytes the zlib stream may inflate to.

    Returns:
        The decoded JSON value.

    Raises:
        DecodeError: the value is too long, not base64, not one complete zlib stream, inflates
            beyond ``max_json_bytes``, or is not UTF-8 JSON.
    """
    if not isinstance(s, str | bytes):
        raise DecodeError(f"Pipes bootstrap value must be a string, got {type(s).__name__}")
    if len(s) > max_chars:
        raise DecodeError(f"Pipes bootstrap value of {len(s)} characters exceeds the {max_chars} limit")
    try:
        compressed = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise DecodeError(f"Pipes bootstrap value is not base64: {e}") from None
    inflater = zlib.decompressobj()  # wbits=15: zlib header required, so gzip or raw deflate fail
    try:
        data = inflater.decompress(compressed, max_json_bytes + 1)
    except zlib.error as e:
        raise DecodeError(f"Pipes bootstrap value is not a zlib stream: {e}") from None
    if len(data) > max_json_bytes or inflater.unconsumed_tail:
        raise DecodeError(f"Pipes bootstrap value inflates beyond the {max_json_bytes}-byte limit")
    if not inflater.eof:
        raise DecodeError("Pipes bootstrap value is a truncated zlib stream")
    if inflater.unused_data:
        raise DecodeError("Pipes bootstrap value has bytes after its zlib stream")
    try:
        value = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise DecodeError(f"Pipes bootstrap JSON is nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DecodeError(f"Pipes bootstrap value is not UTF-8 JSON: {e}") from None
    _check_json(value, check_strings=False, error=DecodeError)
    return value


def load_pipes_schema() -> dict[str, Any]:
    """The JSON schema (draft 2020-12) of a protocol 0.1 message, as shipped with this module."""
    from importlib import resources  # here: every client imports this module, few read the schema

    text = resources.files(__package__ or "dpipes.bus").joinpath(_SCHEMA_FILE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


# ---------------------------------------------------------------------------------------- messages


def parse_message(line: bytes | str, *, max_line_bytes: int = MAX_LINE_BYTES) -> PipesMessage:
    """Parse and validate one Pipes message line (protocol 0.1).

    Args:
        line: one line, with or without its trailing newline.
        max_line_bytes: longest line accepted, in UTF-8 bytes.

    Returns:
        The validated message.

    Raises:
        PipesMessageError: anything about the line is wrong; the message says what and where.
    """
    if isinstance(line, str):
        try:
            line = line.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PipesMessageError(f"line is not valid Unicode: {e.reason}") from None
    elif not isinstance(line, bytes):
        raise PipesMessageError(f"line must be bytes or str, got {type(line).__name__}")
    if len(line) > max_line_bytes:
        raise PipesMessageError(f"line of {len(line)} bytes exceeds the {max_line_bytes}-byte limit")
    if not line.strip():
        raise PipesMessageError("empty line")
    try:
        obj = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise PipesMessageError(f"line is not UTF-8: {e.reason} at byte {e.start}") from None
    except RecursionError:
        raise PipesMessageError(f"JSON is nested deeper than {MAX_JSON_DEPTH}") from None
    except ValueError as e:
        raise PipesMessageError(f"line is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise PipesMessageError(f"message must be a JSON object, got {_kind(obj)}")
    # A lone surrogate can only arrive as a \\u escape: look for the escape before paying for a scan.
    _check_json(obj, check_strings=b"\\ud" in line or b"\\uD" in line, error=PipesMessageError)

    version = obj.get(PIPES_VERSION_FIELD, _MISSING)
    if version is _MISSING:
        raise PipesMessageError(f"missing {PIPES_VERSION_FIELD!r}: not a Pipes message")
    if version != PIPES_PROTOCOL_VERSION:
        raise PipesMessageError(
            f"unsupported protocol version {_show(version)}; this reader speaks {PIPES_PROTOCOL_VERSION!r}",
            field=PIPES_VERSION_FIELD,
        )
    method = obj.get("method", _MISSING)
    if method is _MISSING:
        raise PipesMessageError("missing 'method'")
    if not isinstance(method, str):
        raise PipesMessageError(f"expected a string, got {_show(method)}", field="method")
    spec = PIPES_METHODS.get(method)
    if spec is None:
        raise PipesMessageError(
            f"unknown method {_show(method)}; expected one of {', '.join(PIPES_METHODS)}", field="method"
        )
    if "params" not in obj:
        raise PipesMessageError("missing 'params'", method=method)
    params = obj["params"]
    if params is None:
        if not spec.params_nullable:
            raise PipesMessageError("expected an object, got null", method=method, field="params")
        params = {}
    elif not isinstance(params, dict):
        raise PipesMessageError(f"expected an object, got {_show(params)}", method=method, field="params")
    missing = spec.required - params.keys()
    if missing:
        raise PipesMessageError(f"missing required key(s) {', '.join(sorted(missing))}", method=method, field="params")
    if not spec.other_keys:
        unknown = params.keys() - spec.required - spec.optional
        if unknown:
            raise PipesMessageError(
                f"unknown key(s) {', '.join(sorted(map(repr, unknown)))}", method=method, field="params"
            )
    try:
        spec.check(params)
    except _FieldError as e:
        raise PipesMessageError(e.reason, method=method, field=f"params.{e.field}") from None
    return PipesMessage(method=method, params=params, raw=obj)


# ------------------------------------------------------------------------------------ param checks

_MISSING: Final = object()


class _FieldError(Exception):
    """Internal: a field check failed; parse_message adds the method."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)
        self.field = field
        self.reason = reason


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _show(v: Any) -> str:
    """A short description of a wrong value for an error message."""
    if isinstance(v, str | int | float) or v is None:
        text = json.dumps(v) if not isinstance(v, str) else repr(v)
        return text if len(text) <= 60 else text[:57] + "..."
    return _kind(v)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _expect(ok: bool, field: str, expected: str, v: Any) -> None:
    if not ok:
        raise _FieldError(field, f"expected {expected}, got {_show(v)}")


def _check_str(params: Mapping[str, Any], key: str, *, nullable: bool = False) -> None:
    v = params[key]
    _expect(isinstance(v, str) or (nullable and v is None), key, "a string or null" if nullable else "a string", v)


def _check_choice(params: Mapping[str, Any], key: str, choices: tuple[str, ...] | frozenset[str]) -> None:
    v = params[key]
    if not isinstance(v, str) or v not in choices:
        ordered = sorted(choices) if isinstance(choices, frozenset) else list(choices)
        raise _FieldError(key, f"expected one of {', '.join(map(repr, ordered))}, got {_show(v)}")


def _check_opened(params: Mapping[str, Any]) -> None:
    if "extras" in params:
        v = params["extras"]
        _expect(isinstance(v, dict) or v is None, "extras", "an object", v)


def _check_closed(params: Mapping[str, Any]) -> None:
    if params.get("exception") is not None:
        _check_exception(params["exception"], "exception")


def _check_exception(exc: Any, field: str) -> None:
    # Iterative: a cause/context chain is as long as the sender made it (bounded by MAX_JSON_DEPTH).
    todo = [(exc, field)]
    while todo:
        e, where = todo.pop()
        _expect(isinstance(e, dict), where, "an exception object", e)
        missing = {"message", "stack", "name", "cause", "context"} - e.keys()
        if missing:
            raise _FieldError(where, f"missing key(s) {', '.join(sorted(missing))}")
        _expect(isinstance(e["message"], str), f"{where}.message", "a string", e["message"])
        stack = e["stack"]
        _expect(isinstance(stack, list), f"{where}.stack", "an array of strings", stack)
        for i, frame in enumerate(stack):
            _expect(isinstance(frame, str), f"{where}.stack[{i}]", "a string", frame)
        _expect(isinstance(e["name"], str) or e["name"] is None, f"{where}.name", "a string or null", e["name"])
        for link in ("cause", "context"):
            if e[link] is not None:
                todo.append((e[link], f"{where}.{link}"))


def _check_log(params: Mapping[str, Any]) -> None:
    _check_str(params, "message")
    _check_choice(params, "level", PIPES_LOG_LEVELS)


def _check_materialization(params: Mapping[str, Any]) -> None:
    _check_str(params, "asset_key", nullable=True)
    _check_metadata(params["metadata"], "metadata")
    _check_str(params, "data_version", nullable=True)


def _check_asset_check(params: Mapping[str, Any]) -> None:
    _check_str(params, "asset_key", nullable=True)
    _check_str(params, "check_name")
    _expect(isinstance(params["passed"], bool), "passed", "a boolean", params["passed"])
    _check_choice(params, "severity", PIPES_CHECK_SEVERITIES)
    _check_metadata(params["metadata"], "metadata")


def _check_custom(params: Mapping[str, Any]) -> None:
    pass  # any JSON payload; size and depth are already bounded


def _check_external_stream(params: Mapping[str, Any]) -> None:
    _check_choice(params, "stream", PIPES_STREAMS)
    _check_str(params, "text")
    if "extras" in params:
        v = params["extras"]
        _expect(isinstance(v, dict) or v is None, "extras", "an object or null", v)


# -------------------------------------------------------------------------------------- metadata


def _raw_any(v: Any, field: str) -> None:
    pass


def _raw_str(v: Any, field: str) -> None:
    _expect(isinstance(v, str), field, "a string", v)


def _raw_json(v: Any, field: str) -> None:
    _expect(isinstance(v, dict | list) or v is None, field, "an object, array or null", v)


def _raw_float(v: Any, field: str) -> None:
    _expect(_is_number(v) or v is None, field, "a number or null", v)


def _raw_int(v: Any, field: str) -> None:
    _expect(_is_int(v) or v is None, field, "an integer or null", v)


def _raw_bool(v: Any, field: str) -> None:
    _expect(isinstance(v, bool) or v is None, field, "a boolean or null", v)


def _raw_timestamp(v: Any, field: str) -> None:
    _expect(_is_number(v), field, "a number (seconds since the epoch)", v)


def _raw_null(v: Any, field: str) -> None:
    _expect(v is None, field, "null", v)


def _check_columns(v: Any, field: str) -> None:
    _expect(isinstance(v, list), field, "an array of columns", v)
    for i, col in enumerate(v):
        where = f"{field}[{i}]"
        _expect(isinstance(col, dict), where, "a column object", col)
        for key in ("name", "type"):
            _expect(isinstance(col.get(key), str), f"{where}.{key}", "a string", col.get(key))


def _raw_table(v: Any, field: str) -> None:
    _expect(isinstance(v, dict), field, "a table object", v)
    records = v.get("records")
    _expect(isinstance(records, list), f"{field}.records", "an array of objects", records)
    for i, record in enumerate(records):
        _expect(isinstance(record, dict), f"{field}.records[{i}]", "an object", record)
    _check_columns(v.get("schema"), f"{field}.schema")


def _raw_table_schema(v: Any, field: str) -> None:
    _expect(isinstance(v, dict), field, "a table schema object", v)
    _check_columns(v.get("columns"), f"{field}.columns")


def _raw_lineage(v: Any, field: str) -> None:
    _expect(isinstance(v, dict), field, "a column lineage object", v)
    deps_by_column = v.get("deps_by_column")
    _expect(isinstance(deps_by_column, dict), f"{field}.deps_by_column", "an object", deps_by_column)
    for column, deps in deps_by_column.items():
        where = f"{field}.deps_by_column.{column}"
        _expect(isinstance(deps, list), where, "an array of dependencies", deps)
        for i, dep in enumerate(deps):
            _expect(isinstance(dep, dict), f"{where}[{i}]", "a dependency object", dep)
            for key in ("asset_key", "column_name"):
                _expect(isinstance(dep.get(key), str), f"{where}[{i}].{key}", "a string", dep.get(key))


# Metadata ``type`` -> check of ``raw_value``; the keys are dagster-pipes' ``PipesMetadataType``.
_RAW_VALUE_CHECKS: Final[Mapping[str, Callable[[Any, str], None]]] = MappingProxyType(
    {
        "__infer__": _raw_any,
        "text": _raw_str,
        "url": _raw_str,
        "path": _raw_str,
        "notebook": _raw_str,
        "json": _raw_json,
        "md": _raw_str,
        "float": _raw_float,
        "int": _raw_int,
        "bool": _raw_bool,
        "dagster_run": _raw_str,
        "asset": _raw_str,
        "null": _raw_null,
        "table": _raw_table,
        "table_schema": _raw_table_schema,
        "table_column_lineage": _raw_lineage,
        "timestamp": _raw_timestamp,
    }
)
PIPES_METADATA_TYPES: Final = frozenset(_RAW_VALUE_CHECKS)
_METADATA_VALUE_KEYS: Final = frozenset({"raw_value", "type"})


def _check_metadata(metadata: Any, field: str) -> None:
    if metadata is None:
        return
    _expect(isinstance(metadata, dict), field, "an object of metadata values or null", metadata)
    for name, value in metadata.items():
        where = f"{field}.{name}"
        _expect(isinstance(value, dict), where, "a {raw_value, type} object", value)
        if value.keys() != _METADATA_VALUE_KEYS:
            raise _FieldError(where, f"expected exactly the keys raw_value, type, got {', '.join(sorted(value))}")
        kind = value["type"]
        check = _RAW_VALUE_CHECKS.get(kind) if isinstance(kind, str) else None
        if check is None:
            raise _FieldError(
                f"{where}.type",
                f"unknown metadata type {_show(kind)}; expected one of {', '.join(_RAW_VALUE_CHECKS)}",
            )
        check(value["raw_value"], f"{where}.raw_value")


# ------------------------------------------------------------------------------------------ table


def _method(
    name: str,
    check: Callable[[Mapping[str, Any]], None],
    *,
    required: tuple[str, ...] = (),
    optional: tuple[str, ...] = (),
    other_keys: bool = False,
    params_nullable: bool = False,
) -> PipesMethod:
    return PipesMethod(name, frozenset(required), frozenset(optional), other_keys, params_nullable, check)


PIPES_METHODS: Final[Mapping[str, PipesMethod]] = MappingProxyType(
    {
        m.name: m
        for m in (
            _method("opened", _check_opened, optional=("extras",), other_keys=True),
            _method("closed", _check_closed, optional=("exception",), other_keys=True, params_nullable=True),
            _method("log", _check_log, required=("message", "level")),
            _method(
                "report_asset_materialization",
                _check_materialization,
                required=("asset_key", "metadata", "data_version"),
            ),
            _method(
                "report_asset_check",
                _check_asset_check,
                required=("asset_key", "check_name", "passed", "severity", "metadata"),
            ),
            _method("report_custom_message", _check_custom, required=("payload",)),
            _method(
                "log_external_stream",
                _check_external_stream,
                required=("stream", "text"),
                optional=("extras",),
            ),
        )
    }
)


# -------------------------------------------------------------------------------------- JSON walk


def _check_json(value: Any, *, check_strings: bool, error: type[DecodeError]) -> None:
    """Bound the nesting depth of a parsed JSON value; optionally reject unencodable strings."""
    visit = (dict, list, str) if check_strings else (dict, list)
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, str):
            _check_unicode(v, error)
            continue
        if not isinstance(v, dict | list):
            continue
        if depth > MAX_JSON_DEPTH:
            raise error(f"JSON is nested deeper than {MAX_JSON_DEPTH}")
        if isinstance(v, dict):
            if check_strings:
                for key in v:
                    _check_unicode(key, error)
            children: Iterable[Any] = v.values()
        else:
            children = v
        todo.extend((child, depth + 1) for child in children if isinstance(child, visit))


def _check_unicode(s: str, error: type[DecodeError]) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise error("a JSON string holds a lone UTF-16 surrogate") from None
