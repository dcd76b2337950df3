"""The object modes of a pipeline (``dpipes --json`` / ``--yaml``): program text, objects, msgpack batches.

In an object mode a stage's program reads and writes *objects*; between nodes objects travel as
msgpack batches. This module is the pure part: it parses what a program prints
(:class:`ObjectParser`), prints what a program reads (:class:`ObjectWriter`), packs and unpacks
batches (:func:`pack_batch`, :func:`unpack_batch`) and stamps metadata (:func:`with_metadata`).
No I/O, no asyncio; the stage pumps call it.

Its length (about 800 lines) is one job's: the limits below are the point of this module, and
the parser, the writer and the batch codec share them and the error that names stage and line.

Objects
    An object is a ``dict`` with ``str`` keys whose values are ``None``, ``bool``, ``int`` (at most
    ``MAX_INT_DIGITS`` decimal digits), ``float`` (NaN and infinities included), ``str`` (valid
    Unicode: no lone surrogates), ``list`` or such a ``dict``, nested at most ``MAX_DEPTH`` levels
    (the object itself is level 1). That is JSON's data model, so an object printed in either mode
    can be read back in either mode. :class:`ObjectParser` and :func:`unpack_batch` only ever return
    such objects, and :func:`pack_batch` and :class:`ObjectWriter` expect them.

json mode (what a program prints)
    UTF-8 text, one JSON object per ``\\n``-terminated line; a ``\\r`` before the ``\\n`` is allowed
    (it is JSON whitespace). Lines are numbered from 1. A blank line (only spaces, tabs, ``\\r``) is
    skipped, though it counts for numbering: a trailing empty line is common and carries no value.
    An unterminated last line is still an object. Anything else is an :class:`ObjectModeError`
    naming the stage and line: a line that is a number, string, list, ``true``/``false``/``null``,
    invalid JSON or UTF-8, longer than ``max_object_bytes``, nested deeper than ``MAX_DEPTH``, or
    holding a lone UTF-16 surrogate escape (``"\\ud800"``, not a Unicode character; RFC 8259 8.2).
    ``NaN``/``Infinity`` are read and written as Python's ``json`` does.

yaml mode (what a program prints)
    A stream of YAML documents read with PyYAML's safe loader (YAML 1.1 resolution, so ``yes`` is
    ``true``). Documents are cut at lines that start with ``---`` followed by a space, tab or line
    end (YAML forbids such a line inside a document); the ``---`` before the first document is
    optional. Documents are numbered from 1; a ``---`` at the very start does not make an empty
    document 0. A document with no content (only comments or blank lines) is skipped but counted.
    Each document must be a map. YAML values outside JSON's data model are converted: timestamps to
    ISO 8601 strings, ``!!binary`` to its base64 text, ``!!set`` to a map of its members to null,
    ``!!omap``/``!!pairs`` to lists of ``[key, value]`` lists, and map keys that are not strings to
    their JSON spelling (``1`` -> ``"1"``, ``true`` -> ``"true"``, ``null`` -> ``"null"``). Anchors
    and aliases are expanded; a document whose expansion exceeds ``max_object_bytes`` (counting one
    per value plus string lengths) is refused, which stops alias bombs. ``%`` directives are not
    supported.

What a program reads (:class:`ObjectWriter`)
    json: one compact line per object (``{"a":1,"b":"é"}``, UTF-8, no ASCII escaping).
    yaml: each object as a document that starts with a ``---`` line (PyYAML safe dumper, keys in
    object order, Unicode as is). Given the metadata of the batch, the writer adds it to each object
    as :func:`with_metadata` would, encoding it once per batch.

Wire: one object batch = one payload frame
    A msgpack array of maps, at most ``WIRE_MAX_OBJECTS`` of them and ``WIRE_MAX_BYTES`` in all.
    Strings are msgpack str (UTF-8); there is no bin. An int outside msgpack's 64-bit range is ext
    type 1 (``EXT_BIGINT``) holding its two's complement, big-endian, in at most ``MAX_INT_BYTES``
    bytes. The decoder refuses anything else (another ext type, bin, a map key that is not a
    string, an element that is not a map, nesting deeper than ``MAX_DEPTH``, trailing bytes) with a
    :class:`DecodeError` naming where the batch came from. A msgpack timestamp (ext -1) decodes to
    an int of nanoseconds, which is still a JSON value.

Metadata
    Each object delivered to a program carries a map at its root under a configurable key (default
    ``DEFAULT_METADATA_KEY``) saying where it came from: see :func:`make_metadata`. The key is put
    last, replacing one that was there: the latest producer is where the object comes from now.

Batching (for the pumps)
    Cut a batch when it holds ``BATCH_MAX_OBJECTS`` objects or was parsed from ``BATCH_MAX_BYTES`` of
    text, whichever comes first. One object is at most ``max_object_bytes`` (default 16 MiB) of
    text and packs to at most about 3 times that (a float like ``1.`` becomes 9 bytes), so a batch
    stays within a payload frame; only a YAML document blown up by aliases can pack to more, and
    :func:`pack_batch` then refuses the batch.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import json.encoder
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Literal, TypeAlias

import msgpack

from dpipes.bus.codec import MAX_PAYLOAD_FRAME_BYTES
from dpipes.bus.errors import DecodeError, DpipesError, StageError

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_OBJECTS",
    "DEFAULT_METADATA_KEY",
    "EXT_BIGINT",
    "MAX_DEPTH",
    "MAX_INT_BYTES",
    "MAX_INT_DIGITS",
    "MAX_OBJECT_BYTES",
    "WIRE_MAX_BYTES",
    "WIRE_MAX_OBJECTS",
    "Object",
    "ObjectMode",
    "ObjectModeError",
    "ObjectPackError",
    "ObjectParser",
    "ObjectWriter",
    "make_metadata",
    "pack_batch",
    "unpack_batch",
    "with_metadata",
]

ObjectMode: TypeAlias = Literal["json", "yaml"]
Object: TypeAlias = dict[str, Any]
_Text: TypeAlias = bytes | bytearray | str  # program text quoted in an error

DEFAULT_METADATA_KEY: Final = "__dpipes"
MAX_OBJECT_BYTES: Final = 16 * 1024 * 1024  # one line / document of program text
MAX_DEPTH: Final = 64  # nesting of maps and lists in one object; the object itself is level 1
MAX_INT_DIGITS: Final = 4300  # CPython's default int/str limit, which json.loads enforces
MAX_INT_BYTES: Final = (10**MAX_INT_DIGITS).bit_length() // 8 + 1  # 1786: any such int, signed
EXT_BIGINT: Final = 1
BATCH_MAX_OBJECTS: Final = 1000  # sender: cut a batch at this many objects ...
BATCH_MAX_BYTES: Final = 256 * 1024  # ... or at this much program text parsed into it
WIRE_MAX_OBJECTS: Final = 65536  # receiver: far above BATCH_MAX_OBJECTS, bounds per-batch work
WIRE_MAX_BYTES: Final = MAX_PAYLOAD_FRAME_BYTES

_SNIPPET_CHARS: Final = 80
_INT_LIMIT: Final = 10**MAX_INT_DIGITS
# The Cython composer of yaml.CSafeLoader recurses about 0.6 KiB of C stack per nesting level with
# no check (a 200 000-deep document crashes the process); below this many levels it is safe even
# in a thread with a small stack. Deeper-looking documents are measured with the event parser first.
_YAML_C_SAFE_DEPTH: Final = 256
_YAML_DEEP_PREFIX = re.compile(rb"^[ \t?:-]{%d}" % (_YAML_C_SAFE_DEPTH // 4), re.MULTILINE)
_YAML_MARKER = re.compile(rb"^---[ \t\r\n]", re.MULTILINE)
_YAML_MARKER_AT_END = re.compile(rb"^---(?:[ \t\r\n]|\Z)", re.MULTILINE)
_YAML_DIRECTIVE = re.compile(rb"^%", re.MULTILINE)  # unsupported; parsed alone, such a document fails
_NOT_LOADED: Final = object()
# The encodings of an empty msgpack bin (bin8/16/32 of length 0): the one bin max_bin_len=0 lets by.
_EMPTY_BINS: Final = (b"\xc4\x00", b"\xc5\x00\x00", b"\xc6\x00\x00\x00\x00")


@functools.cache
def _yaml() -> tuple[Any, Any, Any]:
    """PyYAML and its (C, where built) safe loader and dumper, imported at the first YAML use:
    a pipeline in bytes or json mode does not pay its ~20 ms of start-up."""
    import yaml

    return yaml, getattr(yaml, "CSafeLoader", yaml.SafeLoader), getattr(yaml, "CSafeDumper", yaml.SafeDumper)


_HINTS: Final[dict[str, str]] = {
    "json": "each line must be one JSON object (a {...} map); use --json only with programs that print JSON objects",
    "yaml": (
        "each document must be one YAML map (key: value pairs), documents separated by '---' lines; "
        "use --yaml only with programs that print YAML maps"
    ),
}


class ObjectModeError(StageError, ValueError):
    """A program printed something that is not an object of its stage's mode.

    ``number`` is the 1-based line (json) or document (yaml); ``line`` is the line where it starts.
    """

    def __init__(self, *, where: str, mode: ObjectMode, number: int, line: int, problem: str, text: _Text) -> None:
        self.where = where
        self.mode = mode
        self.number = number
        self.line = line
        self.problem = problem
        self.text = _snippet(text)
        position = f"line {number}" if mode == "json" else f"document {number} (line {line})"
        super().__init__(f"{where}: {position} {problem}: {self.text}; {_HINTS[mode]}")


class ObjectPackError(DpipesError, ValueError):
    """Objects hold something that cannot travel between nodes, or a batch is too large."""


class _Refused(Exception):
    """Internal: a value broke a rule; the caller adds where it was."""


def _snippet(text: _Text) -> str:
    if not isinstance(text, str):
        text = bytes(text[: _SNIPPET_CHARS * 4]).decode("utf-8", "replace")
    head = text[:_SNIPPET_CHARS]
    return repr(head) + ("…" if len(text) > _SNIPPET_CHARS else "")


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, dict):
        return "map"
    return type(value).__name__


def _too_deep(level: list[Any], limit: int = MAX_DEPTH) -> bool:
    """Whether any container in ``level`` (each at depth 1) holds containers nested beyond ``limit``."""
    depth = 1
    while level:
        if depth > limit:
            return True
        level = [v for c in level for v in (c.values() if type(c) is dict else c) if type(v) in (dict, list)]
        depth += 1
    return False


def _scalars(value: Any) -> Iterator[Any]:
    """Every map key and every value that is not a map or list, anywhere inside ``value``."""
    todo = [value]
    while todo:
        item = todo.pop()
        if type(item) is dict:
            todo.extend(item.keys())
            todo.extend(item.values())
        elif type(item) is list:
            todo.extend(item)
        else:
            yield item


def _lone_surrogate(value: Any) -> str | None:
    """The first string in ``value`` that UTF-8 cannot encode (it holds a lone surrogate), if any."""
    for item in _scalars(value):
        if type(item) is str and not item.isascii():
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
    return None


class ObjectParser:
    """Turns what a program prints into objects, line by line (json) or document by document (yaml).

    Bounded: a line or document longer than ``max_object_bytes`` is refused as soon as it is, not
    when it ends. After an :class:`ObjectModeError` the stage has failed; do not feed the parser
    again. Objects parsed from the same :meth:`feed` before the bad one are not returned.
    """

    def __init__(self, mode: ObjectMode, *, where: str, max_object_bytes: int = MAX_OBJECT_BYTES) -> None:
        """Create a parser.

        Args:
            mode: ``"json"`` (one object per line) or ``"yaml"`` (one map per document).
            where: names the stage in error messages, e.g. ``"stage 2 (jq@beta)"``.
            max_object_bytes: the longest line or document accepted.
        """
        if mode not in ("json", "yaml"):
            raise ValueError(f"object mode must be 'json' or 'yaml', not {mode!r}")
        if max_object_bytes < 1:
            raise ValueError(f"max_object_bytes must be positive, not {max_object_bytes}")
        self.mode: ObjectMode = mode
        self.where = where
        self.max_object_bytes = max_object_bytes
        self._buf = bytearray()  # json: the unterminated line; yaml: the unfinished document
        self._line = 0  # json: lines consumed; yaml: lines before the unfinished document
        self._docs = 0  # yaml: documents numbered so far
        self._scanned = 0  # yaml: bytes of _buf already searched for '---' lines
        self._preamble = True  # yaml: no '---' line seen yet
        self._decode = json.JSONDecoder().raw_decode

    def feed(self, data: bytes | bytearray | memoryview) -> list[Object]:
        """Parse a chunk of program output.

        Returns:
            The objects completed by this chunk, in order; a partial line or document stays buffered.

        Raises:
            ObjectModeError: something printed is not an object of this mode, or is too long.
        """
        if self.mode == "json":
            return self._feed_json(bytes(data) if isinstance(data, memoryview) else data)
        return self._feed_yaml(data)

    def end(self) -> list[Object]:
        """Parse what is left when the program's output ends (an unterminated last line is an object)."""
        if self.mode == "json":
            if not self._buf:
                return []
            block, self._buf = self._buf, bytearray()
            return self._json_lines(block)
        out: list[Object] = []
        buf = self._buf
        starts = [m.start() for m in _YAML_MARKER_AT_END.finditer(buf, self._scanned)]
        self._cut_documents(starts, out)
        if self._buf:
            self._yaml_documents([bytes(self._buf)], out)
        self._buf = bytearray()
        self._scanned = 0
        return out

    # -- json ------------------------------------------------------------------------------------

    def _error(self, number: int, problem: str, text: _Text, line: int | None = None) -> ObjectModeError:
        return ObjectModeError(
            where=self.where,
            mode=self.mode,
            number=number,
            line=number if line is None else line,
            problem=problem,
            text=text,
        )

    def _too_long(self, number: int, text: _Text, line: int | None = None) -> ObjectModeError:
        return self._error(
            number, f"is longer than {self.max_object_bytes} bytes, the limit for one object", text, line
        )

    def _feed_json(self, data: bytes | bytearray) -> list[Object]:
        nl = data.rfind(b"\n")
        if nl < 0:
            self._buf += data
            if len(self._buf) > self.max_object_bytes:
                raise self._too_long(self._line + 1, self._buf)
            return []
        block: bytes | bytearray
        if self._buf:
            block = self._buf
            block += data[:nl]
        else:
            block = data[:nl]
        self._buf = bytearray(data[nl + 1 :])
        out = self._json_lines(block)
        if len(self._buf) > self.max_object_bytes:
            raise self._too_long(self._line + 1, self._buf)
        return out

    def _json_lines(self, block: bytes | bytearray) -> list[Object]:
        """Parse complete lines: one decode and one split per block, then the C scanner per line."""
        first = self._line + 1
        if len(block) > self.max_object_bytes:
            for i, raw_line in enumerate(bytes(block).split(b"\n")):
                if len(raw_line) > self.max_object_bytes:
                    raise self._too_long(first + i, raw_line)
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as e:
            start = block.rfind(b"\n", 0, e.start) + 1
            end = block.find(b"\n", e.start)
            column = len(block[start : e.start].decode("utf-8", "replace")) + 1
            raise self._error(
                first + block.count(b"\n", 0, e.start),
                f"is not valid UTF-8 (byte 0x{block[e.start]:02x} at column {column})",
                block[start : end if end >= 0 else len(block)],
            ) from None
        lines = text.split("\n")  # not splitlines(): U+2028 and friends are allowed inside JSON strings
        self._line += len(lines)
        out: list[Object] = []
        append = out.append
        decode = self._decode
        for i, line in enumerate(lines):
            try:
                obj, end = decode(line)
            except (ValueError, RecursionError):
                end = -1
            if end != len(line) or type(obj) is not dict:
                obj = self._json_line_slowly(line, first + i)
                if obj is None:
                    continue
            append(obj)
        # Checks whose cheap block-wide test almost always passes. Each object line has a '{' of its
        # own, so when the block has few brackets to spare, no line can nest deeper than MAX_DEPTH.
        if text.count("{") + text.count("[") - len(out) >= MAX_DEPTH or "\\ud" in text or "\\uD" in text:
            self._check_lines(lines, out, first)
        return out

    def _json_line_slowly(self, line: str, number: int) -> Object | None:
        """Parse a line the fast path refused: blank, surrounded by whitespace, or wrong."""
        if not line.strip(" \t\r"):
            return None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise self._error(number, f"is not valid JSON ({e.msg} at column {e.colno})", line) from None
        except RecursionError:
            raise self._error(number, f"nests deeper than {MAX_DEPTH} levels", line) from None
        if type(obj) is not dict:
            raise self._error(number, f"is a {_kind(obj)}, not a JSON object", line)
        return obj

    def _check_lines(self, lines: list[str], objects: list[Object], first: int) -> None:
        """Find the line that nests too deeply or holds a lone surrogate escape, if any."""
        it = iter(objects)
        for i, line in enumerate(lines):
            if not line.strip(" \t\r"):
                continue
            obj = next(it)
            if line.count("{") + line.count("[") > MAX_DEPTH and _too_deep([obj]):
                raise self._error(first + i, f"nests deeper than {MAX_DEPTH} levels", line)
            if ("\\ud" in line or "\\uD" in line) and (bad := _lone_surrogate(obj)) is not None:
                surrogate = next(f"\\u{ord(c):04x}" for c in bad if 0xD800 <= ord(c) <= 0xDFFF)
                raise self._error(
                    first + i,
                    f"holds a lone UTF-16 surrogate escape ({surrogate}), which is not a Unicode character",
                    line,
                )

    # -- yaml ------------------------------------------------------------------------------------

    def _feed_yaml(self, data: bytes | bytearray | memoryview) -> list[Object]:
        buf = self._buf
        buf += data
        end = buf.rfind(b"\n") + 1  # search complete lines only: '---' must be followed by a blank
        out: list[Object] = []
        if end > self._scanned:
            starts = [m.start() for m in _YAML_MARKER.finditer(buf, self._scanned, end)]
            self._scanned = end - self._cut_documents(starts, out)
        if len(self._buf) > self.max_object_bytes:
            raise self._too_long(self._docs + 1, self._buf, self._line + 1)
        return out

    def _cut_documents(self, starts: list[int], out: list[Object]) -> int:
        """Parse the documents of ``_buf`` that end where a '---' line in ``starts`` begins; return bytes cut."""
        buf = self._buf
        docs: list[bytes] = []
        prev = 0
        for pos in starts:
            if pos == 0:  # the unfinished document's own '---' line
                self._preamble = False
                continue
            docs.append(bytes(buf[prev:pos]))
            prev = pos
        if prev:
            self._buf = buf[prev:]
        self._yaml_documents(docs, out)
        return prev

    def _yaml_documents(self, docs: list[bytes], out: list[Object]) -> None:
        """Parse whole documents, many with one loader when that is safe: a loader per document costs
        more than parsing a small one. Any trouble, and each is parsed alone for an exact error."""
        yaml, loader, _ = _yaml()
        if len(docs) > 1 and not any(
            len(doc) > self.max_object_bytes or _yaml_may_be_deep(doc) or _YAML_DIRECTIVE.search(doc) for doc in docs
        ):
            skip = 1 if self._preamble and _blank_yaml(docs[0]) else 0  # yields no document at all
            try:
                values = list(yaml.load_all(b"".join(docs[skip:]), Loader=loader))
            except (yaml.YAMLError, ValueError, OverflowError, TypeError, RecursionError):
                values = []
            if len(values) == len(docs) - skip:
                for doc, value in zip(docs, [None] * skip + values, strict=True):
                    self._yaml_document(doc, out, value)
                return
        for doc in docs:
            self._yaml_document(doc, out)

    def _yaml_document(self, doc: bytes, out: list[Object], value: Any = _NOT_LOADED) -> None:
        number = self._docs + 1
        line = self._line + 1
        preamble, self._preamble = self._preamble, False
        self._line += doc.count(b"\n")
        if len(doc) > self.max_object_bytes:
            raise self._too_long(number, doc, line)
        try:
            if value is _NOT_LOADED:
                value = self._load_yaml(doc, line)
            if value is None and _blank_yaml(doc):
                if not preamble:  # a leading '---' does not make an empty document before it
                    self._docs = number
                return
            self._docs = number
            if type(value) is not dict:
                raise _Refused(f"is a {_kind(value)}, not a YAML map")
            out.append(_JsonModel(self.max_object_bytes)(value, 1))
        except _Refused as e:
            text = doc[4:] if doc.startswith(b"---\n") else doc  # show the content, not the bare '---'
            raise self._error(number, str(e), text, line) from None

    def _load_yaml(self, doc: bytes, line: int) -> Any:
        yaml, loader, _ = _yaml()
        try:
            if _yaml_may_be_deep(doc) and _yaml_too_deep(doc):
                raise _Refused(f"nests deeper than {MAX_DEPTH} levels")
            return yaml.load(doc, Loader=loader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            problem = e.problem or e.context or "malformed"
            at = f" at line {line + mark.line}, column {mark.column + 1}" if mark is not None else ""
            raise _Refused(f"is not valid YAML ({problem}{at})") from None
        except yaml.YAMLError as e:
            raise _Refused(f"is not valid YAML ({e})") from None
        except (ValueError, OverflowError, TypeError, RecursionError) as e:
            raise _Refused(f"cannot be loaded ({type(e).__name__}: {e})") from None


def _blank_yaml(doc: bytes) -> bool:
    """Whether a document holds nothing but its '---' line, comments, blank lines and '...'."""
    for raw in doc.split(b"\n"):
        line = raw.strip()
        if line.startswith(b"---"):
            line = line[3:].strip()
        if line and not line.startswith(b"#") and line != b"...":
            return False
    return True


def _yaml_may_be_deep(doc: bytes) -> bool:
    """A cheap bound: flow nesting needs a bracket per level; block nesting, a column per two levels."""
    return doc.count(b"[") + doc.count(b"{") > _YAML_C_SAFE_DEPTH // 2 or _YAML_DEEP_PREFIX.search(doc) is not None


def _yaml_too_deep(doc: bytes) -> bool:
    """Measure nesting with libyaml's event parser, which keeps its stack on the heap."""
    yaml, loader, _ = _yaml()
    depth = 0
    for event in yaml.parse(doc, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return False


class _JsonModel:
    """Copies a loaded YAML value into JSON's data model, with aliases expanded under a budget."""

    def __init__(self, budget: int) -> None:
        self.budget = budget

    def _spend(self, amount: int) -> None:
        self.budget -= amount
        if self.budget < 0:
            raise _Refused("expands to more than max_object_bytes of values (anchors and aliases?)")

    def __call__(self, value: Any, depth: int) -> Any:
        t = type(value)
        if t is str:
            self._spend(len(value) + 1)
            if not value.isascii() and _lone_surrogate(value) is not None:
                raise _Refused("holds a lone UTF-16 surrogate escape, which is not a Unicode character")
            return value
        if t is dict or t is set:
            if depth > MAX_DEPTH:
                raise _Refused(f"nests deeper than {MAX_DEPTH} levels")
            self._spend(1)
            if t is set:
                return {k: None for k in sorted(self._key(k) for k in value)}
            return {self._key(k): self(v, depth + 1) for k, v in value.items()}
        if t is list or t is tuple:
            if depth > MAX_DEPTH:
                raise _Refused(f"nests deeper than {MAX_DEPTH} levels")
            self._spend(1)
            return [self(v, depth + 1) for v in value]
        self._spend(1)
        if value is None or t is bool or t is float:
            return value
        if t is int:
            if abs(value) >= _INT_LIMIT:
                raise _Refused(f"holds an integer of more than {MAX_INT_DIGITS} digits")
            return value
        if t is datetime.datetime or t is datetime.date:
            return value.isoformat()
        if t is bytes:
            self._spend(len(value) * 4 // 3)
            return base64.b64encode(value).decode("ascii")
        raise _Refused(f"holds a value of type {t.__name__}, which objects cannot carry")

    def _key(self, key: Any) -> str:
        if type(key) is str:
            self._spend(len(key) + 1)
            return key
        value = self(key, MAX_DEPTH)  # a hashable key is a scalar; this spends and checks it
        if type(value) is str:
            return value
        if type(value) is float:
            return _float_key(value)
        return json.dumps(value)


def _float_key(value: float) -> str:
    if math.isfinite(value):
        return repr(value)
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


# -- writing -------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    raise TypeError(f"a {type(value).__name__} value is not part of an object (only JSON types are)")


def _make_json_encoder() -> Callable[[Any], str]:
    """One reusable C encoder: json.dumps builds a new one per call, which is half the cost of a line."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is not None:
        try:
            c_encode = c_make_encoder(
                None, _json_default, json.encoder.encode_basestring, None, ":", ",", False, False, True
            )
            if "".join(c_encode({"a": [1, 1.5, None, "é"]}, 0)) == '{"a":[1,1.5,null,"é"]}':
                return lambda obj: "".join(c_encode(obj, 0))
        except (TypeError, ValueError):  # another signature: fall back to the public API
            pass
    return json.JSONEncoder(
        ensure_ascii=False, separators=(",", ":"), check_circular=False, default=_json_default
    ).encode


_encode_json: Final = _make_json_encoder()


class ObjectWriter:
    """Turns objects into what a program reads: JSON lines or YAML documents."""

    def __init__(self, mode: ObjectMode, *, metadata_key: str = DEFAULT_METADATA_KEY) -> None:
        """Create a writer.

        Args:
            mode: ``"json"`` or ``"yaml"``.
            metadata_key: where :meth:`write` puts the ``metadata`` it is given.
        """
        if mode not in ("json", "yaml"):
            raise ValueError(f"object mode must be 'json' or 'yaml', not {mode!r}")
        self.mode: ObjectMode = mode
        self.metadata_key = metadata_key

    def write(self, objects: Sequence[Object], *, metadata: dict[str, Any] | None = None) -> bytes:
        """Encode objects for a program's stdin.

        Args:
            objects: the objects, left unchanged.
            metadata: when given, each object is written as :func:`with_metadata` would make it
                (``metadata`` last under ``metadata_key``); in json mode the map is encoded once per
                call instead of once per object, which more than doubles throughput.

        Returns:
            json: one compact line per object; yaml: one ``---`` document per object.
        """
        if not objects:
            return b""
        key = self.metadata_key
        if self.mode == "json":
            if metadata is None:
                return ("\n".join(map(_encode_json, objects)) + "\n").encode("utf-8")
            member = f"{_encode_json(key)}:{_encode_json(metadata)}"
            tail = f",{member}}}"
            lines = []
            for obj in objects:
                if key in obj:
                    obj = {k: v for k, v in obj.items() if k != key}
                lines.append(_encode_json(obj)[:-1] + tail if obj else f"{{{member}}}")
            return ("\n".join(lines) + "\n").encode("utf-8")
        if metadata is not None:
            objects = with_metadata([dict(obj) for obj in objects], key, metadata)
        yaml, _, dumper = _yaml()
        data: bytes = yaml.dump_all(
            objects,
            Dumper=dumper,
            explicit_start=True,
            allow_unicode=True,
            sort_keys=False,
            default_flow_style=False,
            encoding="utf-8",
        )
        return data


# -- batches -------------------------------------------------------------------------------------


def _pack_default(value: Any) -> Any:
    # msgpack calls this for an int outside its 64-bit range, and for types it does not know.
    if isinstance(value, int):
        if abs(value) >= _INT_LIMIT:
            raise ObjectPackError(f"an integer of more than {MAX_INT_DIGITS} digits cannot travel between nodes")
        return msgpack.ExtType(EXT_BIGINT, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))
    raise ObjectPackError(f"a {type(value).__name__} value cannot travel between nodes; objects hold only JSON types")


def _unpack_ext(code: int, data: bytes) -> int:
    if code != EXT_BIGINT:
        raise ValueError(f"msgpack extension type {code} is not used in object batches")
    value = int.from_bytes(data, "big", signed=True)
    if abs(value) >= _INT_LIMIT:
        raise ValueError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return value


def pack_batch(objects: Sequence[Object]) -> bytes:
    """Pack objects into one payload frame (a msgpack array of maps).

    Raises:
        ObjectPackError: a value is not of JSON's data model, or the batch exceeds ``WIRE_MAX_BYTES``.
    """
    try:
        data: bytes = msgpack.packb(objects, use_bin_type=True, default=_pack_default)
    except UnicodeEncodeError:
        raise ObjectPackError("a string holds a lone UTF-16 surrogate, which cannot travel between nodes") from None
    except ValueError as e:
        if isinstance(e, ObjectPackError):
            raise
        raise ObjectPackError(f"objects cannot be packed: {e}") from None
    if len(data) > WIRE_MAX_BYTES:
        raise ObjectPackError(f"a batch of {len(objects)} objects packs to {len(data)} bytes (limit {WIRE_MAX_BYTES})")
    return data


def unpack_batch(data: bytes | bytearray | memoryview, *, where: str) -> list[Object]:
    """Unpack one payload frame of objects; hostile or malformed data raises only :class:`DecodeError`.

    Args:
        data: the frame.
        where: names the sender in error messages, e.g. ``"stage 1 (cat@alpha)"``.
    """
    size = memoryview(data).nbytes
    if size > WIRE_MAX_BYTES:
        raise DecodeError(f"{where}: object batch is {size} bytes (limit {WIRE_MAX_BYTES})")
    try:
        batch = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,  # map keys are str, or bytes from an empty bin (checked below)
            max_bin_len=0,
            max_ext_len=MAX_INT_BYTES,
            ext_hook=_unpack_ext,
            timestamp=2,  # a timestamp ext becomes an int of nanoseconds
        )
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as e:
        raise DecodeError(f"{where}: malformed object batch ({type(e).__name__}: {e})") from None
    if type(batch) is not list:
        raise DecodeError(f"{where}: an object batch must be a msgpack array, not a {_kind(batch)}")
    if len(batch) > WIRE_MAX_OBJECTS:
        raise DecodeError(f"{where}: object batch holds {len(batch)} objects (limit {WIRE_MAX_OBJECTS})")
    if set(map(type, batch)) - {dict}:
        i, bad = next((i, o) for i, o in enumerate(batch) if type(o) is not dict)
        raise DecodeError(f"{where}: element {i} of an object batch is a {_kind(bad)}, not a map")
    if _too_deep(batch):
        raise DecodeError(f"{where}: an object in a batch nests deeper than {MAX_DEPTH} levels")
    raw = bytes(data) if isinstance(data, memoryview) else data
    if any(pattern in raw for pattern in _EMPTY_BINS) and _holds_bytes(batch):
        raise DecodeError(f"{where}: an object in a batch holds binary data (msgpack bin), which objects cannot")
    return batch


def _holds_bytes(value: Any) -> bool:
    return any(type(item) is bytes for item in _scalars(value))


# -- metadata ------------------------------------------------------------------------------------


def make_metadata(
    *,
    addr: str,
    port: int,
    service: str,
    node: str,
    stage: int,
    argv: list[str] | None = None,
    environ: dict[str, str] | None = None,
    credential: str | None = None,
) -> dict[str, Any]:
    """The metadata map of objects produced by one stage; the optional fields only when configured.

    Args:
        addr: the producing node's address.
        port: its port.
        service: the program or plugin that produced the objects (``dp.<name>`` without ``dp.``).
        node: the producing node's name.
        stage: the producing stage's index in the pipeline (0 for the first, as ``dpipes --status``
            numbers them; -1 for the input of ``dpipes`` itself).
        argv: the program's command line.
        environ: environment variables shared with consumers.
        credential: the producer's credential (e.g. its public key).
    """
    meta: dict[str, Any] = {
        "dp.addr": addr,
        "dp.port": port,
        "dp.service": service,
        "dp.node": node,
        "dp.stage": stage,
    }
    if argv is not None:
        meta["dp.argv"] = list(argv)
    if environ is not None:
        meta["dp.environ"] = dict(environ)
    if credential is not None:
        meta["dp.credential"] = credential
    return meta


def with_metadata(objects: list[Object], key: str, meta: dict[str, Any]) -> list[Object]:
    """Put ``meta`` under ``key`` in each object, last, replacing what was there; returns ``objects``.

    Every object shares the one ``meta`` map: do not change it afterwards.
    """
    for obj in objects:
        obj.pop(key, None)
        obj[key] = meta
    return objects
