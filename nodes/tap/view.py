"""What a tap event says: typed control bodies, printable samples, objects, Arrow schemas and rows, Pipes.

:class:`Decoder` turns each :class:`~dpipes.bus.tap.TapEvent` into a plain, JSON-able map (the
*decoded event*) that ``echo --json`` prints and ``--field``/``--filter`` address, and
:func:`line` turns that map into one line for a person. A decoder keeps a little state, bounded:
the method of each request still unanswered (a ``REPLY`` does not say which method it answers)
and the Arrow schema of each stream (it travels once, on the stream's first message).

Keys of a decoded event: ``time, node, n, kind, src, dst, sid, seq, size`` always (and
``replay: true`` in an event a hub re-published from a replay); then by kind
``method, body`` (``REQUEST``; ``body`` typed by :mod:`dpipes.nodes.protocol` when it is one of
its methods, else as sent, with ``invalid`` saying why); ``method, ok, error, code, body``
(``REPLY``); ``credit`` (``CREDIT``); ``total`` (``EOF``/``EOF_ACK``); ``reason`` (``CANCEL``);
``code, message, at, to`` (``ERROR``); ``peer, up, reason`` (``LINK``); ``text, sampled,
truncated`` (``BYTES``/``STDERR``: the sample as UTF-8 text, other bytes as ``\\xNN``, and its
size); ``count, meta, objects, truncated`` (``OBJECTS``: the objects the sample holds whole);
``arrow, schema, rows`` (``ARROW``); ``stage, messages`` (``PIPES``: each Pipes message, parsed).
"""

from __future__ import annotations

import ast
import collections
import datetime
import json
import logging
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import msgpack

from dpipes.bus.tap import TapEvent
from dpipes.nodes.pipes_frames import PipesFrameError, decode_frame

log = logging.getLogger(__name__)

MAX_PENDING_REQUESTS = 4096  # requests remembered until their reply; the oldest are forgotten
MAX_ARROW_STREAMS = 256  # streams whose schema is remembered
SHOW_ROWS = 5  # rows of an Arrow batch shown
LINE_TEXT_CHARS = 120  # characters of a sample shown on one line


class Decoder:
    """Decodes tap events in the order one tap saw them."""

    def __init__(self) -> None:
        self._methods: collections.OrderedDict[tuple[str, int], str] = collections.OrderedDict()
        self._schemas: collections.OrderedDict[tuple[str, int], Any] = collections.OrderedDict()

    def decode(self, event: TapEvent) -> dict[str, Any]:
        """The decoded map of ``event`` (see the module docstring)."""
        out: dict[str, Any] = {
            "time": event.t,
            "node": event.node,
            "n": event.n,
            "kind": event.kind,
            "src": event.src,
            "dst": event.dst,
            "sid": event.sid,
            "seq": event.seq,
            "size": event.size,
        }
        if event.replay:
            out["replay"] = True
        handler = self._KINDS.get(event.kind)
        if handler is not None:
            try:
                handler(self, event, event.fields, out)
            except Exception as exc:  # a field of the wrong shape: show the event, say why
                out["invalid"] = f"{type(exc).__name__}: {exc}"
        return out

    def _request(self, event: TapEvent, fields: Mapping[str, Any], out: dict[str, Any]) -> None:
        from dpipes.nodes import protocol

        method = str(fields.get("method", ""))
        out["method"] = method
        self._methods[(event.src, event.seq)] = method
        while len(self._methods) > MAX_PENDING_REQUESTS:
            self._methods.popitem(last=False)
        body = fields.get("body", {})
        try:
            out["body"] = _plain(protocol.parse_request(method, body).to_body())
        except protocol.ControlError as exc:
            out["body"] = _plain(body)
            out["invalid"] = str(exc)

    def _reply(self, event: TapEvent, fields: Mapping[str, Any], out: dict[str, Any]) -> None:
        from dpipes.nodes import protocol

        method = self._methods.pop((event.dst, event.seq), "")
        out["method"] = method
        out["ok"] = bool(fields.get("ok", True))
        out["error"] = str(fields.get("error", ""))
        body = fields.get("body", {})
        if not out["ok"]:
            out["code"] = body.get("code", "") if isinstance(body, dict) else ""
            out["body"] = _plain(body)
            return
        try:
            out["body"] = _plain(protocol.parse_reply(method, body).to_body()) if method else _plain(body)
        except protocol.ControlError as exc:
            out["body"] = _plain(body)
            out["invalid"] = str(exc)

    def _simple(self, event: TapEvent, fields: Mapping[str, Any], out: dict[str, Any]) -> None:
        for wire, key in _RENAMED.get(event.kind, ()):
            out[key] = _plain(fields.get(wire))

    def _bytes(self, event: TapEvent, fields: Mapping[str, Any], out: dict[str, Any]) -> None:
        sample = event.sample or b""
        out["text"] = sample.decode("utf-8", "backslashreplace")
        out["sampled"] = len(sample)
        out["truncated"] = len(sample) < event.size

    def _objects(self, event: TapEvent, fields: Mapping[str, Any], out: dict[str, Any]) -> None:
        out["count"] = fields.get("count", 0)
        out["meta"] = _plain(fields.get("meta", {}))
        objects, whole = objects_in(event.sample or b"")
        out["objects"] = objects
        out["truncated"] = not whole

    def _arrow(self, event: TapEvent, fields: Mapping[str, Any], out: dict[str, Any]) -> None:
        import pyarrow as pa

        meta = fields.get("arrow", {})
        out["arrow"] = _plain(meta)
        key = (event.src, event.sid)
        if event.schema is not None:
            self._schemas[key] = (pa.ipc.read_schema(pa.py_buffer(event.schema)), event.schema)
            while len(self._schemas) > MAX_ARROW_STREAMS:
                self._schemas.popitem(last=False)
        known = self._schemas.get(key)
        if known is None:
            out["schema"] = None
            return
        schema, schema_bytes = known
        out["schema"] = schema.to_string(show_schema_metadata=False)
        out["rows"] = arrow_rows(
            meta, schema_bytes, event.sample or b"", event.size, has_schema=event.schema is not None
        )

    def _pipes(self, event: TapEvent, fields: Mapping[str, Any], out: dict[str, Any]) -> None:
        out["stage"] = fields.get("stage", 0)
        messages: list[Any] = []
        for text in event.pipes or ():
            item = decode_frame(text.encode() if isinstance(text, str) else text)
            if isinstance(item, PipesFrameError):
                messages.append({"error": str(item)[:LINE_TEXT_CHARS], "line": item.line})
            else:
                messages.append(item)
        out["messages"] = messages if event.pipes is not None else None

    _KINDS: dict[str, Callable[[Decoder, TapEvent, Mapping[str, Any], dict[str, Any]], None]] = {
        "REQUEST": _request,
        "REPLY": _reply,
        "CREDIT": _simple,
        "EOF": _simple,
        "EOF_ACK": _simple,
        "CANCEL": _simple,
        "ERROR": _simple,
        "LINK": _simple,
        "BYTES": _bytes,
        "STDERR": _bytes,
        "OBJECTS": _objects,
        "ARROW": _arrow,
        "PIPES": _pipes,
    }


_RENAMED: dict[str, tuple[tuple[str, str], ...]] = {
    "CREDIT": (("bytes", "credit"),),
    "EOF": (("total", "total"),),
    "EOF_ACK": (("total", "total"),),
    "CANCEL": (("reason", "reason"),),
    "ERROR": (("code", "code"), ("message", "message"), ("node", "at"), ("to", "to")),
    "LINK": (("node", "peer"), ("up", "up"), ("reason", "reason")),
}


def _plain(value: Any) -> Any:
    """``value`` with bytes made printable and tuples made lists: JSON-able."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return printable(bytes(value))
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def printable(data: bytes) -> str:
    """Bytes as text: UTF-8 where it is, ``\\xNN`` for other bytes, control characters escaped."""
    return escape(data.decode("utf-8", "backslashreplace"))


def escape(text: str) -> str:
    """``text`` on one line: control characters escaped as Python would."""
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode() for c in text)


def objects_in(sample: bytes) -> tuple[list[Any], bool]:
    """The objects an OBJECTS sample (the start of a msgpack array) holds whole, and whether that is all."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(sample), 1), strict_map_key=False)
    unpacker.feed(sample)
    try:
        count = unpacker.read_array_header()
    except (msgpack.OutOfData, ValueError, msgpack.UnpackException):
        return [], False
    objects = []
    try:
        for _ in range(count):
            objects.append(_plain(unpacker.unpack()))
    # TypeError: a map whose key is an array or a map (msgpack allows it; a dict cannot hold it).
    except (msgpack.OutOfData, ValueError, TypeError, msgpack.UnpackException):
        return objects, False
    return objects, True


def _buffer_sizes(node: Mapping[str, Any]) -> Iterator[int]:
    for size in node.get("bufs", ()):
        if size:
            yield size
    for child in node.get("children", ()):
        yield from _buffer_sizes(child)
    if "dict" in node:
        yield from _buffer_sizes(node["dict"])


def arrow_rows(meta: Mapping[str, Any], schema: bytes, sample: bytes, size: int, *, has_schema: bool) -> Any:
    """The first rows of a one-part batch whose whole body is in the sample, else None."""
    from dpipes.bus.arrow import ArrowDecoder

    if meta.get("part") != 0 or meta.get("end_of_chunk") is not True or len(sample) < size:
        return None
    body = sample[len(schema) :] if has_schema else sample
    if meta.get("encoding") == "ipc":
        sizes = [meta.get("ipc_bytes", 0)]
    else:
        sizes = [s for column in meta.get("columns", ()) for s in _buffer_sizes(column)]
    if sum(sizes) != len(body):
        return None
    frames, at = [schema], 0
    for s in sizes:
        frames.append(body[at : at + s])
        at += s
    part = {**meta, "batch": 0, "frames": len(frames), "schema": len(schema)}
    batch = ArrowDecoder().feed(part, frames)
    if batch is None:
        return None
    return _plain(batch.slice(0, SHOW_ROWS).to_pylist())


# -- selecting events ------------------------------------------------------------------------


def matches_what(decoded: Mapping[str, Any], what: str) -> bool:
    """Does the event concern ``what``: an address, a node (``NODE/``), a pipeline id or a stage?

    ``NODE/ENDPOINT`` matches a message from or to that address; ``NODE/`` anything from or to
    that node; ``PIPELINE`` (a run's id) any message of its stages (``*/PIPELINE.N``) or a
    control message that names it; ``PIPELINE.N`` one stage; a kind name (``BYTES``) that kind.
    """
    if what == decoded["kind"]:
        return True
    for addr in (decoded["src"], decoded["dst"]):
        if addr == what or (what.endswith("/") and addr.startswith(what)):
            return True
        endpoint = addr.partition("/")[2]
        if endpoint == what or endpoint.startswith(what + "."):
            return True
    body = decoded.get("body")
    return isinstance(body, dict) and body.get("pipeline") == what


def field(decoded: Any, path: str) -> Any:
    """The value at a dotted ``path`` (``body.stages.0.node``) of a decoded event; None if absent."""
    value = decoded
    for part in path.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


_COMPARE: dict[type[ast.cmpop], Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}


class Filter:
    """A ``--filter`` expression over a decoded event, in Python's expression syntax, evaluated safely.

    Names are keys of the decoded event (``kind``, ``size``, ``src``, ...), ``a.b`` and ``a[0]``
    reach inside; comparisons, ``in``, ``and``/``or``/``not``, constants, lists and tuples.
    Nothing else (no calls): ``kind == 'BYTES' and size > 1000``, ``'beta/' in dst``,
    ``method == 'exit' and body.code != 0``. A comparison that does not apply (None < 3) is false.
    """

    def __init__(self, text: str) -> None:
        try:
            tree = ast.parse(text, mode="eval")
        except SyntaxError as exc:
            raise ValueError(f"filter {text!r}: {exc.msg}") from None
        for node in ast.walk(tree):
            if not isinstance(node, _ALLOWED):
                raise ValueError(
                    f"filter {text!r}: {type(node).__name__} is not allowed (names, comparisons, and/or/not)"
                )
        self.text = text
        self._tree = tree.body

    def __call__(self, decoded: Mapping[str, Any]) -> bool:
        try:
            return bool(self._eval(self._tree, decoded))
        except TypeError:
            return False

    def _eval(self, node: ast.AST, env: Mapping[str, Any]) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return env.get(node.id)
        if isinstance(node, ast.Attribute):
            return field(self._eval(node.value, env), node.attr)
        if isinstance(node, ast.Subscript):
            return field(self._eval(node.value, env), str(self._eval(node.slice, env)))
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self._eval(e, env) for e in node.elts]
        if isinstance(node, ast.BoolOp):
            values = (self._eval(v, env) for v in node.values)
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.UnaryOp):
            value = self._eval(node.operand, env)
            return not value if isinstance(node.op, ast.Not) else -value
        if isinstance(node, ast.Compare):
            left = self._eval(node.left, env)
            for op, comparator in zip(node.ops, node.comparators, strict=True):
                right = self._eval(comparator, env)
                if not _COMPARE[type(op)](left, right):
                    return False
                left = right
            return True
        raise ValueError(f"filter {self.text!r}: cannot evaluate {type(node).__name__}")


_ALLOWED = (
    ast.Expression,
    ast.Constant,
    ast.Name,
    ast.Load,
    ast.Attribute,
    ast.Subscript,
    ast.List,
    ast.Tuple,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.Not,
    ast.USub,
    ast.Compare,
    *_COMPARE,
)


# -- one line for a person -------------------------------------------------------------------


def clock(t: float) -> str:
    """``HH:MM:SS.mmm`` local time."""
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def line(d: Mapping[str, Any]) -> str:
    """One decoded event as one line: time, hub, kind, src -> dst, then what the message says."""
    head = f"{clock(d['time'])} {d['node']} {d['kind']:<7} {d['src']} -> {d['dst']}"
    if d["sid"]:
        head += f" sid {d['sid']}"
    return f"{head}  {what_it_says(d)}".rstrip()


def what_it_says(d: Mapping[str, Any]) -> str:
    """The part of :func:`line` after the addresses."""
    kind = d["kind"]
    if kind == "REQUEST":
        return f"#{d['seq']} {d.get('method')}({_short(d.get('body'))})" + _invalid(d)
    if kind == "REPLY":
        if d.get("ok"):
            return f"#{d['seq']} {d.get('method') or '?'} ok {_short(d.get('body'))}" + _invalid(d)
        return f"#{d['seq']} {d.get('method') or '?'} failed [{d.get('code')}]: {d.get('error')}"
    if kind in ("BYTES", "STDERR"):
        text = escape(d.get("text", ""))
        more = d["size"] - d.get("sampled", d["size"])
        shown = text[:LINE_TEXT_CHARS] + ("..." if len(text) > LINE_TEXT_CHARS or d.get("truncated") else "")
        return f'seq {d["seq"]} {d["size"]} B "{shown}"' + (f" (+{more} B)" if more > 0 else "")
    if kind == "OBJECTS":
        shown = _short(d.get("objects"))
        return f"seq {d['seq']} {d.get('count')} objects, {d['size']} B {shown}" + (
            " ..." if d.get("truncated") else ""
        )
    if kind == "ARROW":
        arrow = d.get("arrow") or {}
        rows = arrow.get("rows")
        text = f"batch {arrow.get('batch')} part {arrow.get('part')}" + (f", {rows} rows" if rows is not None else "")
        text += f", {d['size']} B"
        if d.get("schema"):
            text += " schema: " + "; ".join(d["schema"].splitlines())
        if d.get("rows"):
            text += " rows: " + _short(d["rows"])
        return text
    if kind == "PIPES":
        messages = d.get("messages")
        if messages is None:
            return f"stage {d.get('stage')} {d['size']} B of Pipes messages (too large to show)"
        return f"stage {d.get('stage')} " + " | ".join(pipes_text(m) for m in messages)
    keys = [k for k in ("credit", "total", "reason", "code", "message", "at", "to", "peer", "up") if k in d]
    return " ".join(f"{k}={d[k]}" for k in keys) + _invalid(d)


def pipes_text(frame: Mapping[str, Any]) -> str:
    """One Pipes message (or a node's ``{"error", "line"}`` report of a bad line) in words."""
    message = frame.get("message", frame) if isinstance(frame, Mapping) else frame
    if not isinstance(message, Mapping):
        return _short(frame)
    method = message.get("method", "?")
    params = message.get("params") or {}
    if not isinstance(params, Mapping):
        return f"{method} {_short(params)}"
    if method == "log":
        return f"log {params.get('level', '')}: {params.get('message', '')}"
    if method == "report_asset_materialization":
        return f"materialized {params.get('asset_key', '')}"
    if method == "report_asset_check":
        passed = "passed" if params.get("passed") else "failed"
        return f"check {params.get('check_name', '')} on {params.get('asset_key', '')} {passed}"
    if method == "report_custom_message":
        return f"custom {_short(params.get('payload'))}"
    if method in ("opened", "closed"):
        return method
    return f"{method} {_short(params)}"


def _short(value: Any, limit: int = LINE_TEXT_CHARS) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str, separators=(", ", ": "))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _invalid(d: Mapping[str, Any]) -> str:
    return f"  (not protocol: {d['invalid']})" if d.get("invalid") else ""
