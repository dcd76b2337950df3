"""Zero-copy framing of Arrow record batches on the bus. This docstring is the spec of the ``arrow``
map that an ``ARROW`` message carries in its header, and of that message's payload frames.

A *stream* of record batches (one ``sid`` in the bus header) has one schema. An
:class:`ArrowEncoder` turns each batch into one or more *parts*; each part is one ``ARROW`` message:
an ``arrow`` meta map plus a list of payload frames. An :class:`ArrowDecoder` takes the parts of a
stream in order and gives back each batch when its last part arrives. This module knows nothing of
sockets or of the header codec: it works on ``(meta, frames)`` pairs. The format has no version
of its own: a change to it bumps the bus protocol version carried in every header.

The ``arrow`` map
    A msgpack map with string keys. Keys not listed are ignored. Integers are non-negative and
    never msgpack booleans.

    ================  ========  ==============================================================
    key               type      meaning
    ================  ========  ==============================================================
    ``batch``         int       index of the batch in the stream: 0, 1, 2, ... (every part)
    ``part``          int       index of this part in its batch: 0, 1, 2, ... (every part)
    ``frames``        int       number of payload frames of this part (every part)
    ``end_of_chunk``  bool      true on the last part of a batch, false on the others (every
                                part); a part that is not the last has at least one frame
    ``schema``        int       stream's first part only (batch 0, part 0), and there always:
                                the byte length of this part's first payload frame, which holds
                                the stream's schema as one Arrow IPC schema message and nothing
                                else (``Schema.serialize()``: continuation marker, length,
                                flatbuffer)
    ``anchor``        str       optional, a stream's first part only: the sender's output anchor
                                (a plugin worker names which of its outputs a stream is, when it
                                sends several to one receiver)
    ``rows``          int       part 0 of every batch: the batch's number of rows
    ``encoding``      str       part 0 of every batch: ``"buffers"`` or ``"ipc"``
    ``columns``       [node]    part 0, ``"buffers"`` only: one node per schema field, in order
    ``ipc_bytes``     int       part 0, ``"ipc"`` only: byte length of the batch's IPC stream
    ================  ========  ==============================================================

    The schema travels as a payload frame, not in the map, because the bus header is bounded
    (64 KiB) and a wide schema is not; every other key is small.

A ``node`` (``"buffers"`` encoding)
    Describes one array in Arrow's physical layout, typed by the matching schema field (children
    and dictionaries by the child field and value type). A map:

    ============  ===========  ==============================================================
    key           type         meaning
    ============  ===========  ==============================================================
    ``n``         int          length of the array, in items
    ``nulls``     int          number of null items among ``[off, off + n)``; the validity
                               buffer is present if and only if this is not 0 (the null
                               type, which has no buffers, has ``nulls`` = ``n``)
    ``off``       int          offset, in items, of the array's first item in its buffers
    ``bufs``      [int | nil]  byte size of each of the array's own buffers, in the order of
                               the Arrow columnar format; nil is an absent buffer
    ``children``  [node]       nested types only: one node per child field
    ``dict``      node         dictionary-encoded types only: the dictionary (values type)
    ============  ===========  ==============================================================

    Own buffers by type (``v`` is the validity bitmap, nil when there are no nulls):
    null: ``[nil]``; boolean: ``[v, bits]``; fixed-width types (integers, floats, decimals,
    dates, times, timestamps, durations, intervals, fixed-size binary): ``[v, values]``;
    binary and utf8: ``[v, int32 offsets, data]``; large_binary and large_utf8: ``[v, int64
    offsets, data]``; list and map: ``[v, int32 offsets]`` + 1 child (a map's child is its
    entries struct); large_list: ``[v, int64 offsets]`` + 1 child; fixed_size_list: ``[v]`` + 1
    child; struct: ``[v]`` + one child per field; dictionary: ``[v, indices]`` + ``dict``; an
    extension type: the node of its storage type. All values little-endian.

    Other types (unions, views, run-end encoded, ...) use the ``"ipc"`` encoding.

Payload frames
    The *body* of a batch is the list of its buffers: for ``"buffers"``, a pre-order walk over
    the nodes of ``columns`` (a node's own ``bufs``, then its ``children`` in order, then its
    ``dict``); for ``"ipc"``, one buffer of ``ipc_bytes`` bytes holding an Arrow IPC *stream*
    (schema, dictionaries, exactly one record batch, optional end marker) equal in schema to the
    stream's. Absent and empty buffers take no frame. Each present buffer travels either in one
    frame, or, when larger than the sender's chunk size, in several consecutive frames (possibly
    in several parts) that the receiver concatenates. A frame never holds bytes of two buffers.
    After the optional schema frame, the frames of a batch's parts, in order, are exactly its
    body: their sizes add up to each buffer's size in turn.

What the sender does (informative)
    Frames are the batch's own buffers, or zero-copy slices of them: nothing of the body is copied,
    with two exceptions. (1) A var-width or list array that is a slice not starting at the beginning
    of its offsets gets its offsets rebased to start at 0: a copy of 4 or 8 bytes per item of the
    slice, never of the values, so that a slice ships only the values it refers to instead of the
    whole parent buffers. (2) The ``"ipc"`` encoding writes the batch once into an IPC stream; it is
    used for types the buffers encoding does not describe, for layouts whose meta would exceed
    ``MAX_LAYOUT_BYTES``, and for a large batch to a receiver that shares memory with the sender
    (``dpipes.bus.shm``): there the IPC writer serializes the batch straight into the shared
    segment, which is the one copy a shared-memory hand-over needs anyway, and the receiver reads it
    in place with one call of pyarrow's IPC reader, one part however large. That stream has no end
    marker, so that the receiver reads its heads and never touches the far end of the segment. A
    slice keeps its offset modulo 8 as ``off`` so that bitmaps can be sliced at byte boundaries;
    fixed-width and bitmap buffers are cut to the slice. Dictionaries travel with every batch (no
    delta dictionaries). A stream sends its schema once, in its first part. Parts are filled up to
    ``chunk_bytes`` of payload and ``MAX_FRAMES_PER_PART`` frames.

What the receiver does
    Every value read from the map is type-checked and bounded by the ``MAX_*`` constants below;
    counts must match the frames, buffer sizes must cover each node's declared length for its
    type, and any violation raises :class:`~dpipes.bus.errors.DecodeError` (never another
    exception); ``columns`` that pack to the same msgpack bytes as the last batch's, with as many
    ``rows``, are that batch's layout and are not checked again. Frames are wrapped with
    ``pyarrow.py_buffer`` (zero-copy); only a buffer that came in several frames is copied once, to
    join it. An ``"ipc"`` body of a schema without dictionaries is read message by message with
    pyarrow's IPC functions (schema, one record batch, nothing but an end marker after it), its
    schema message skipped unparsed when it has the bytes of the stream's schema frame; one with
    dictionaries by pyarrow's stream reader. Every rebuilt batch is checked with
    ``RecordBatch.validate(full=True)`` before it is returned: for fixed-width columns that costs
    a popcount of the validity bitmaps, for var-width, list and dictionary columns one pass over
    the offsets, indices and UTF-8 data (the UTF-8 of a large batch's string columns in bulk, by
    ``dpipes.bus.arrow_validate``: the same verdict, an eighth of the CPU for 10k rows of short
    strings). That pass is needed: Arrow's cheap validation only looks at the first and last
    offsets, and one hostile offset in between would let a later read run outside the frame.
    After a ``DecodeError`` the decoder is failed: the stream lost data, and every later ``feed``
    raises too.
"""

# About 900 lines, one job: the ARROW framing. The first 110 are its spec; the encoder and the
# decoder below share its node layout and limits, so they stay beside each other and the spec.

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final, NotRequired, TypeAlias, TypedDict

import msgpack
import pyarrow as pa
import pyarrow.compute as pc

from dpipes.bus.arrow_validate import has_text_columns, validate_batch
from dpipes.bus.errors import DecodeError

log = logging.getLogger(__name__)

ARROW_CHUNK_BYTES: Final = 16 * 1024 * 1024  # payload of one part: big frames, bounded messages
MAX_CHUNK_BYTES: Final = 64 * 1024 * 1024  # the bus's largest payload frame
MAX_FRAMES_PER_PART: Final = 1024  # well under the bus's frames per message
MAX_FRAMES_PER_BATCH: Final = 65536  # bounds per-frame work and memory for one batch
MAX_LAYOUT_NODES: Final = 4096  # nodes in one batch's ``columns`` (a header holds no more)
MAX_LAYOUT_BYTES: Final = 32 * 1024  # sender: msgpack size of a layout; larger goes as IPC
MAX_TYPE_DEPTH: Final = 12  # nesting levels of a schema's types (the header nests 2 per level)
MAX_ROWS: Final = 2**31 - 1  # length of any array in a batch, rows or nested values
MAX_BATCH_BYTES: Final = 2**31  # a batch's body; a larger batch must be split by the sender
MAX_SCHEMA_BYTES: Final = 1024 * 1024  # the serialized schema frame
# A receiver keeps the schemas it read last, by their frame's bytes: each new stream sends its
# schema again, and reading and checking it (8 flat columns) was most of a fresh decoder's first
# batch (40 of 70 us), on every stream of one batch. A sender keeps what it learns of a new
# stream's schema the same way: walking its types took 18 us of a fresh encoder's 25 (over 100 us
# on a cold cache, in a stream of one 64 MB batch). Bounded in count and in bytes: a schema frame
# this large or larger is read every time.
SCHEMAS_REMEMBERED: Final = 64
REMEMBERED_SCHEMA_BYTES: Final = 64 * 1024

BufferLike: TypeAlias = "pa.Buffer | memoryview"
FrameLike: TypeAlias = "pa.Buffer | memoryview | bytes | bytearray"


class ArrowNode(TypedDict):
    """One array of a ``"buffers"`` layout (see the module docstring)."""

    n: int
    nulls: int
    off: int
    bufs: list[int | None]
    children: NotRequired[list[ArrowNode]]
    dict: NotRequired[ArrowNode]


class ArrowMeta(TypedDict, total=False):
    """The ``arrow`` map of one part (see the module docstring)."""

    batch: int
    part: int
    frames: int
    end_of_chunk: bool
    schema: int
    rows: int
    encoding: str
    columns: list[ArrowNode]
    ipc_bytes: int


ArrowPart: TypeAlias = tuple[ArrowMeta, list[BufferLike]]

# Physical buffers per layout kind, by the Arrow columnar format.
_OWN_BUFFERS: Final = {
    "null": 1,
    "bool": 2,
    "fixed": 2,
    "dict": 2,
    "binary": 3,
    "large_binary": 3,
    "list": 2,
    "large_list": 2,
    "fixed_size_list": 1,
    "struct": 1,
}
_OFFSET_BYTES: Final = {"binary": 4, "large_binary": 8, "list": 4, "large_list": 8}
_OFFSET_TYPES: Final = {4: pa.int32(), 8: pa.int64()}
_EMPTY: Final = pa.py_buffer(b"")
_IPC_END_BYTES: Final = 8  # the end-of-stream marker an IPC stream writer writes when closed
_IPC_ENDS: Final = (b"\xff\xff\xff\xff\x00\x00\x00\x00", b"\x00\x00\x00\x00")  # and the legacy one
# What pyarrow may raise on bad input; turned into DecodeError at the decoder's boundary.
_BAD_INPUT: Final = (
    pa.ArrowException,
    OSError,  # pyarrow's ArrowIOError, e.g. from the IPC reader
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    BufferError,
    MemoryError,
    StopIteration,
    EOFError,  # pa.ipc.read_message on a stream that ends (an end marker) where a message should be
)


@functools.lru_cache(maxsize=1024)  # called per column per batch; a stream has few distinct types
def _kind(typ: pa.DataType) -> str | None:
    """The layout kind of ``typ`` in the buffers encoding, or None when only IPC can carry it."""
    if isinstance(typ, pa.BaseExtensionType):
        return "ext"
    t = pa.types
    if t.is_null(typ):
        return "null"
    if t.is_dictionary(typ):
        return "dict" if t.is_integer(typ.index_type) else None
    if t.is_boolean(typ):
        return "bool"
    if t.is_binary(typ) or t.is_string(typ):
        return "binary"
    if t.is_large_binary(typ) or t.is_large_string(typ):
        return "large_binary"
    if t.is_list(typ) or t.is_map(typ):
        return "list"
    if t.is_large_list(typ):
        return "large_list"
    if t.is_fixed_size_list(typ):
        return "fixed_size_list"
    if t.is_struct(typ):
        return "struct"
    try:
        width = typ.bit_width
    except ValueError:  # unions, views, run-end encoded, ...
        return None
    if width % 8 or typ.num_buffers != 2 or typ.num_fields:
        return None
    return "fixed"


def _inner_types(typ: pa.DataType) -> list[pa.DataType]:
    """The types nested one level inside ``typ``: child fields, dictionary values, storage."""
    if isinstance(typ, pa.BaseExtensionType):
        return [typ.storage_type]
    if pa.types.is_dictionary(typ):
        return [typ.value_type]
    return [typ.field(i).type for i in range(typ.num_fields)]


def _walk_schema(schema: pa.Schema) -> tuple[int, bool]:
    """Return the type nesting depth of ``schema`` and whether every type has a buffers layout."""
    depth, native = 0, True
    todo = [(field.type, 1) for field in schema]
    while todo:
        typ, level = todo.pop()
        if not isinstance(typ, pa.BaseExtensionType):
            depth = max(depth, level)
            if depth > MAX_TYPE_DEPTH:
                break  # deep enough to refuse; do not walk a hostile schema further
        native = native and _kind(typ) is not None
        inner_level = level if isinstance(typ, pa.BaseExtensionType) else level + 1
        todo.extend((inner, inner_level) for inner in _inner_types(typ))
    return depth, native


def _has_dictionary(schema: pa.Schema) -> bool:
    """Whether any type of ``schema``, at any depth, is dictionary-encoded."""
    todo = [field.type for field in schema]
    while todo:
        typ = todo.pop()
        if pa.types.is_dictionary(typ):
            return True
        todo.extend(_inner_types(typ))
    return False


# --------------------------------------------------------------------------------------- encoder


def _bitmap_window(buf: pa.Buffer, lo: int, hi: int) -> pa.Buffer:
    """Bytes of bitmap ``buf`` holding bits ``[lo, hi)``; ``lo`` is a multiple of 8."""
    return buf.slice(lo // 8, (hi - lo + 7) // 8)


def _count_nulls(validity: pa.Buffer | None, start: int, count: int) -> int:
    """Null (zero) bits of ``validity`` in ``[start, start + count)``; ``count`` is small."""
    if validity is None or count == 0:
        return 0
    bits = memoryview(validity)
    return sum(not (bits[i >> 3] >> (i & 7)) & 1 for i in range(start, start + count))


def _offsets_window(buf: pa.Buffer | None, lo: int, hi: int, width: int) -> tuple[pa.Buffer, int, int]:
    """Offsets of items ``[lo, hi)``, rebased to start at 0, and the first and last raw offsets."""
    count = hi - lo + 1
    if buf is None or buf.size < (hi + 1) * width:  # a zero-length array may have no offsets
        return pa.py_buffer(bytes(width)), 0, 0
    typ = _OFFSET_TYPES[width]
    offsets = pa.Array.from_buffers(typ, count, [None, buf], offset=lo)
    first, last = offsets[0].as_py(), offsets[count - 1].as_py()
    if first == 0:
        return buf.slice(lo * width, count * width), first, last
    return pc.subtract(offsets, pa.scalar(first, typ)).buffers()[1], first, last


def _encode_node(arr: pa.Array, typ: pa.DataType, pre: int, body: list[pa.Buffer | None]) -> ArrowNode:
    """Describe ``arr``, preceded by ``pre`` items of its buffers, and append its buffers to ``body``.

    ``pre`` lets a struct's children start where the struct's window starts (the struct keeps its
    offset modulo 8; pyarrow hands out its children already sliced to the struct's offset).
    """
    kind = _kind(typ)
    if kind == "ext":
        return _encode_node(arr.storage, typ.storage_type, pre, body)
    start, n = arr.offset - pre, len(arr) + pre  # the node's items, in physical positions
    if kind == "null":
        body.append(None)
        return {"n": n, "nulls": n, "off": 0, "bufs": [None]}
    off = start % 8  # bitmaps are cut at byte boundaries
    lo, hi = start - off, start + n  # the window of physical items the node's buffers cover
    bufs = (arr.indices if kind == "dict" else arr).buffers()
    nulls = arr.null_count + _count_nulls(bufs[0], start, pre)
    own: list[pa.Buffer | None] = [_bitmap_window(bufs[0], lo, hi) if nulls else None]
    inner: list[tuple[pa.Array, pa.DataType, int]] = []
    if kind in ("fixed", "dict"):
        width = (typ.index_type if kind == "dict" else typ).bit_width // 8
        own.append(_EMPTY if bufs[1] is None else bufs[1].slice(lo * width, (hi - lo) * width))
    elif kind == "bool":
        own.append(_EMPTY if bufs[1] is None else _bitmap_window(bufs[1], lo, hi))
    elif kind in _OFFSET_BYTES:
        offsets, first, last = _offsets_window(bufs[1], lo, hi, _OFFSET_BYTES[kind])
        own.append(offsets)
        if kind.endswith("binary"):
            own.append(_EMPTY if bufs[2] is None else bufs[2].slice(first, last - first))
        else:
            inner.append((arr.values.slice(first, last - first), typ.field(0).type, 0))
    elif kind == "fixed_size_list":
        size = typ.list_size
        inner.append((arr.values.slice(lo * size, (hi - lo) * size), typ.field(0).type, 0))
    elif kind == "struct":
        inner.extend((arr.field(i), typ.field(i).type, arr.offset - lo) for i in range(typ.num_fields))
    elif kind != "dict":  # pragma: no cover - _walk_schema sends such types as IPC
        raise AssertionError(f"no buffers layout for {typ}")
    body.extend(own)
    node: ArrowNode = {
        "n": n,
        "nulls": nulls,
        "off": off,
        "bufs": [None if b is None else b.size for b in own],
    }
    if inner:
        node["children"] = [_encode_node(child, child_type, p, body) for child, child_type, p in inner]
    if kind == "dict":
        node["dict"] = _encode_node(arr.dictionary, typ.value_type, 0, body)
    return node


_type_facts: dict[bytes, tuple[int, bool, bool]] = {}


def _type_facts_of(schema: pa.Schema, frame: pa.Buffer) -> tuple[int, bool, bool]:
    """The type nesting depth of ``schema``, whether every type has a buffers layout, and whether
    any is dictionary-encoded; ``frame`` is the schema serialized (worked out once per distinct
    frame while remembered, as a receiver remembers schemas: the same bytes, the same types).
    """
    raw = frame.to_pybytes() if frame.size < REMEMBERED_SCHEMA_BYTES else None
    known = None if raw is None else _type_facts.get(raw)
    if known is not None:
        return known
    depth, native = _walk_schema(schema)
    known = (depth, native, _has_dictionary(schema))
    if raw is not None:
        if len(_type_facts) >= SCHEMAS_REMEMBERED:
            _type_facts.clear()  # all at once: safe beside encoders of other threads, and rare
        _type_facts[raw] = known
    return known


class ArrowEncoder:
    """Turns the record batches of one outgoing stream into parts: ``(meta, frames)`` pairs."""

    def __init__(self, schema: pa.Schema, *, chunk_bytes: int = ARROW_CHUNK_BYTES) -> None:
        """Prepare a stream of batches of ``schema``.

        Args:
            schema: the schema of every batch of the stream; sent once, in the first part.
            chunk_bytes: most payload bytes per part; a buffer larger than this is split into
                frames of this size (and joined, one copy, by the receiver).

        Raises:
            ValueError: ``chunk_bytes`` is out of ``[1, MAX_CHUNK_BYTES]``, or the schema is
                nested deeper than ``MAX_TYPE_DEPTH`` or larger than ``MAX_SCHEMA_BYTES``.
        """
        if not isinstance(schema, pa.Schema):
            raise TypeError(f"schema must be a pyarrow.Schema, not {type(schema).__name__}")
        if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes={chunk_bytes} is out of [1, {MAX_CHUNK_BYTES}]")
        self._schema_frame = schema.serialize()
        depth, self._native, dictionary = _type_facts_of(schema, self._schema_frame)
        if depth > MAX_TYPE_DEPTH:
            raise ValueError(f"schema nests types deeper than MAX_TYPE_DEPTH={MAX_TYPE_DEPTH}")
        if self._schema_frame.size > MAX_SCHEMA_BYTES:
            raise ValueError(f"schema is {self._schema_frame.size} bytes serialized (limit {MAX_SCHEMA_BYTES})")
        self._schema = schema
        self._types = schema.types  # once: iterating a schema makes a Field object per column
        self._chunk_bytes = chunk_bytes
        self._batches = 0
        # An IPC stream of a schema without dictionaries has a size known before it is written.
        self._sized_ipc = not dictionary
        # Made once: pyarrow's writer would otherwise read two environment variables per batch.
        self._ipc_options = pa.ipc.IpcWriteOptions()

    @property
    def schema(self) -> pa.Schema:
        """The stream's schema."""
        return self._schema

    def encode(self, batch: pa.RecordBatch) -> list[ArrowPart]:
        """Return the parts that carry ``batch``, in order; the last has ``end_of_chunk`` true.

        Args:
            batch: a record batch of the stream's schema.

        Returns:
            ``(meta, frames)`` pairs: ``meta`` is the ``arrow`` map, ``frames`` are
            ``pyarrow.Buffer`` views of the batch's own memory, to send with ``copy=False``.

        Raises:
            ValueError: the batch has another schema, or breaks ``MAX_BATCH_BYTES`` or
                ``MAX_FRAMES_PER_BATCH`` (split the batch, or raise ``chunk_bytes``).
        """
        if not batch.schema.equals(self._schema):
            raise ValueError(f"batch schema {batch.schema} is not the stream's schema {self._schema}")
        head: ArrowMeta = {"rows": batch.num_rows}
        body: list[pa.Buffer | None] = []
        if self._native:
            columns = [
                _encode_node(column, typ, 0, body) for column, typ in zip(batch.columns, self._types, strict=True)
            ]
            if len(msgpack.packb(columns)) <= MAX_LAYOUT_BYTES:
                head["encoding"], head["columns"] = "buffers", columns
            else:
                log.debug("layout of %d columns exceeds %d bytes; sending IPC", len(columns), MAX_LAYOUT_BYTES)
        if "columns" not in head:
            ipc = self._ipc_stream(batch)
            head["encoding"], head["ipc_bytes"], body = "ipc", ipc.size, [ipc]
        total = sum(buf.size for buf in body if buf is not None)
        if total > MAX_BATCH_BYTES:
            raise ValueError(f"batch body is {total} bytes (limit MAX_BATCH_BYTES={MAX_BATCH_BYTES})")
        parts = self._split(body, first=self._batches == 0)
        frame_count = sum(len(frames) for frames in parts)
        if frame_count > MAX_FRAMES_PER_BATCH:
            raise ValueError(f"batch needs {frame_count} frames (limit {MAX_FRAMES_PER_BATCH}): raise chunk_bytes")
        out: list[ArrowPart] = []
        for index, frames in enumerate(parts):
            meta: ArrowMeta = {
                "batch": self._batches,
                "part": index,
                "frames": len(frames),
                "end_of_chunk": index == len(parts) - 1,
            }
            if index == 0:
                if self._batches == 0:
                    meta["schema"] = self._schema_frame.size
                meta.update(head)
            out.append((meta, frames))
        self._batches += 1
        return out

    def ipc_size(self, batch: pa.RecordBatch) -> int | None:
        """Bytes :meth:`encode_ipc_into` writes for ``batch`` as the stream's next batch, or None
        when that size is not known before writing (a schema with dictionaries)."""
        if not self._sized_ipc:
            return None
        size = self._schema_frame.size + pa.ipc.get_record_batch_size(batch)
        return size + self._schema_frame.size if self._batches == 0 else size

    def encode_ipc_into(self, batch: pa.RecordBatch, out: memoryview) -> tuple[ArrowMeta, list[int]]:
        """Write ``batch`` as the stream's next batch into ``out``: one part, ``"ipc"`` encoding.

        For a transport that hands ``out`` over as shared memory: pyarrow's IPC writer serializes
        the batch there, the one copy of its buffers (the receiver reads them in place). The stream
        gets no end marker (it is optional): the receiver then reads the messages' heads at the
        start of ``out`` and nothing at its end, a page of shared memory it need not touch.

        Returns:
            The part's ``arrow`` map, and the sizes of its frames, end to end at the start of
            ``out``: the schema frame first in the stream's first part, then the IPC stream.

        Raises:
            ValueError: the batch has another schema or breaks ``MAX_BATCH_BYTES``.
            OSError: ``out`` is too small (see :meth:`ipc_size`).
        """
        if not batch.schema.equals(self._schema):
            raise ValueError(f"batch schema {batch.schema} is not the stream's schema {self._schema}")
        sink = pa.FixedSizeBufferWriter(pa.py_buffer(out))
        sizes = []
        if self._batches == 0:
            sink.write(self._schema_frame)
            sizes.append(self._schema_frame.size)
        # Not closed: closing would only write the end marker.
        pa.ipc.RecordBatchStreamWriter(sink, self._schema, options=self._ipc_options).write_batch(batch)
        sizes.append(sink.tell() - sum(sizes))
        if sizes[-1] > MAX_BATCH_BYTES:
            raise ValueError(f"batch is {sizes[-1]} bytes as IPC (limit MAX_BATCH_BYTES={MAX_BATCH_BYTES})")
        meta: ArrowMeta = {
            "batch": self._batches,
            "part": 0,
            "frames": len(sizes),
            "end_of_chunk": True,
            "rows": batch.num_rows,
            "encoding": "ipc",
            "ipc_bytes": sizes[-1],
        }
        if self._batches == 0:
            meta["schema"] = self._schema_frame.size
        self._batches += 1
        return meta, sizes

    def _ipc_stream(self, batch: pa.RecordBatch) -> pa.Buffer:
        """The batch as a one-batch IPC stream: one copy, but any type, dictionaries included."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, self._schema) as writer:
            writer.write_batch(batch)
        return sink.getvalue()

    def _split(self, body: list[pa.Buffer | None], *, first: bool) -> list[list[BufferLike]]:
        """Group the body's buffers into parts; cut only buffers larger than ``chunk_bytes``."""
        chunk = self._chunk_bytes
        parts: list[list[BufferLike]] = [[self._schema_frame] if first else []]
        filled = self._schema_frame.size if first else 0
        for buf in body:
            if buf is None or buf.size == 0:
                continue
            for pos in range(0, buf.size, chunk):
                piece = buf if buf.size <= chunk else buf.slice(pos, min(chunk, buf.size - pos))
                if parts[-1] and (filled + piece.size > chunk or len(parts[-1]) >= MAX_FRAMES_PER_PART):
                    parts.append([])
                    filled = 0
                parts[-1].append(piece)
                filled += piece.size
        return parts


# --------------------------------------------------------------------------------------- decoder


@dataclasses.dataclass(slots=True)
class _Node:
    """A validated node: its type and the body indexes of its buffers (None: absent)."""

    type: Any
    kind: str
    n: int
    nulls: int
    off: int
    slots: list[int | None]
    children: list[_Node]
    dictionary: _Node | None = None


def _int(raw: Mapping[str, Any], key: str, where: str, limit: int) -> int:
    """``raw[key]`` as an int in ``[0, limit]``, or DecodeError."""
    if key not in raw:
        raise DecodeError(f"{where}: missing {key!r}")
    value = raw[key]
    if type(value) is not int:
        raise DecodeError(f"{where}: {key!r} is {type(value).__name__}, expected int")
    if not 0 <= value <= limit:
        raise DecodeError(f"{where}: {key!r}={value} is out of [0, {limit}]")
    return value


def _need(size: int | None, minimum: int, where: str, what: str) -> None:
    if size is None:
        raise DecodeError(f"{where}: the {what} buffer is absent")
    if size < minimum:
        raise DecodeError(f"{where}: the {what} buffer has {size} bytes, the length needs {minimum}")


class _Layout:
    """Checks a batch's ``columns`` against the schema and collects the body's buffer sizes."""

    def __init__(self) -> None:
        self.sizes: list[int | None] = []
        self.total_bytes = 0
        self.nodes = 0

    def node(self, raw: Any, typ: pa.DataType, where: str) -> _Node:
        kind = _kind(typ)
        if kind is None:
            raise DecodeError(f"{where}: type {typ} has no buffers layout; it must come as IPC")
        if kind == "ext":
            storage = self.node(raw, typ.storage_type, where)
            return _Node(typ, kind, storage.n, storage.nulls, storage.off, [], [storage])
        self.nodes += 1
        if self.nodes > MAX_LAYOUT_NODES:
            raise DecodeError(f"layout has more than MAX_LAYOUT_NODES={MAX_LAYOUT_NODES} nodes")
        if not isinstance(raw, Mapping):
            raise DecodeError(f"{where} is {type(raw).__name__}, expected a map")
        n = _int(raw, "n", where, MAX_ROWS)
        nulls = _int(raw, "nulls", where, n)
        off = _int(raw, "off", where, MAX_ROWS - n)
        end = off + n
        sizes = self._sizes(raw, _OWN_BUFFERS[kind], where)
        validity = sizes[0]
        if kind == "null":
            if validity is not None or nulls != n:
                raise DecodeError(f"{where}: a null array has no buffers and {n} nulls")
        elif validity is None:
            if nulls:
                raise DecodeError(f"{where}: {nulls} nulls but no validity buffer")
        elif not nulls:
            raise DecodeError(f"{where}: a validity buffer but no nulls")  # Arrow would ignore it
        else:
            _need(validity, (end + 7) // 8, where, "validity")
        if kind == "bool":
            _need(sizes[1], (end + 7) // 8, where, "values")
        elif kind in ("fixed", "dict"):
            width = (typ.index_type if kind == "dict" else typ).bit_width // 8
            _need(sizes[1], end * width, where, "values")
        elif kind in _OFFSET_BYTES:
            _need(sizes[1], (end + 1) * _OFFSET_BYTES[kind], where, "offsets")
            if len(sizes) > 2:
                _need(sizes[2], 0, where, "data")
        base = len(self.sizes)
        self.sizes.extend(sizes)
        slots = [None if size is None else base + i for i, size in enumerate(sizes)]
        node = _Node(typ, kind, n, nulls, off, slots, [])
        node.children = self._children(raw, typ, where)
        if kind == "fixed_size_list":
            need = end * typ.list_size
            if node.children[0].n < need:
                raise DecodeError(f"{where}: child has {node.children[0].n} items, the length needs {need}")
        elif kind == "struct":
            for index, child in enumerate(node.children):
                if child.n < end:
                    raise DecodeError(f"{where}: child {index} has {child.n} items, the length needs {end}")
        if kind == "dict":
            if "dict" not in raw:
                raise DecodeError(f"{where}: a dictionary array needs 'dict'")
            node.dictionary = self.node(raw["dict"], typ.value_type, f"{where}.dict")
        elif "dict" in raw:
            raise DecodeError(f"{where}: 'dict' on a {typ} array")
        return node

    def _sizes(self, raw: Mapping[str, Any], count: int, where: str) -> list[int | None]:
        sizes = raw.get("bufs")
        if not isinstance(sizes, list | tuple):
            raise DecodeError(f"{where}: 'bufs' is {type(sizes).__name__}, expected a list")
        if len(sizes) != count:
            raise DecodeError(f"{where}: 'bufs' has {len(sizes)} entries, the type has {count} buffers")
        for size in sizes:
            if size is None:
                continue
            if type(size) is not int or not 0 <= size <= MAX_BATCH_BYTES:
                raise DecodeError(f"{where}: buffer size {size!r:.40} is not an int in [0, {MAX_BATCH_BYTES}]")
            self.total_bytes += size
        if self.total_bytes > MAX_BATCH_BYTES:
            raise DecodeError(f"batch body exceeds MAX_BATCH_BYTES={MAX_BATCH_BYTES}")
        return list(sizes)

    def _children(self, raw: Mapping[str, Any], typ: pa.DataType, where: str) -> list[_Node]:
        count = typ.num_fields
        if not count:
            if "children" in raw:
                raise DecodeError(f"{where}: 'children' on a {typ} array")
            return []
        children = raw.get("children")
        if not isinstance(children, list | tuple) or len(children) != count:
            raise DecodeError(f"{where}: 'children' must be a list of {count} nodes")
        return [self.node(child, typ.field(i).type, f"{where}.{i}") for i, child in enumerate(children)]


def _build(node: _Node, body: list[pa.Buffer | None]) -> pa.Array:
    if node.kind == "ext":
        return pa.ExtensionArray.from_storage(node.type, _build(node.children[0], body))
    buffers = [None if slot is None else body[slot] for slot in node.slots]
    if node.dictionary is not None:
        dictionary = _build(node.dictionary, body)
        return pa.DictionaryArray.from_buffers(
            node.type, node.n, buffers, dictionary, null_count=node.nulls, offset=node.off
        )
    children = [_build(child, body) for child in node.children] or None
    return pa.Array.from_buffers(node.type, node.n, buffers, null_count=node.nulls, offset=node.off, children=children)


_schemas: dict[bytes, tuple[pa.Schema, bool, bool]] = {}


def _schema_of(raw: bytes, where: str) -> tuple[pa.Schema, bool, bool]:
    """The schema a stream's schema frame ``raw`` holds, checked, whether it has no dictionary,
    and whether it has text columns (read once per distinct frame while remembered; the same bytes
    read the same).

    Raises:
        DecodeError: the frame is no Arrow IPC schema, or nests types too deep.
    """
    known = _schemas.get(raw)
    if known is not None:
        return known
    schema = ArrowDecoder._read_schema(pa.py_buffer(raw), where)
    known = (schema, not _has_dictionary(schema), has_text_columns(schema))
    if len(raw) < REMEMBERED_SCHEMA_BYTES:
        if len(_schemas) >= SCHEMAS_REMEMBERED:
            _schemas.clear()  # all at once: safe beside decoders of other threads, and rare
        _schemas[raw] = known
    return known


class ArrowDecoder:
    """Rebuilds the record batches of one incoming stream from its parts."""

    def __init__(self) -> None:
        self._schema: pa.Schema | None = None
        self._schema_frame: pa.Buffer | None = None  # the stream's schema as its sender serialized it
        self._plain = False  # the schema has no dictionaries: an IPC batch is one message
        self._text = False  # the schema has string columns: validate_batch checks them in bulk
        self._failed: str | None = None
        self._batch = 0  # index of the batch being received
        # The last "buffers" batch's rows, packed columns, and their checked nodes and sizes.
        self._last_layout: tuple[int, bytes, list[_Node], list[int | None]] | None = None
        self._reset()

    @property
    def schema(self) -> pa.Schema | None:
        """The stream's schema, once its first part has arrived."""
        return self._schema

    @property
    def pending(self) -> bool:
        """True while a batch has started arriving but is not complete."""
        return self._part > 0

    def _reset(self) -> None:
        self._part = 0
        self._rows = 0
        self._encoding = ""
        self._columns: list[_Node] = []
        self._sizes: list[int | None] = []
        self._wanted: list[int] = []  # body indexes of the buffers that take frames, in order
        self._cursor = 0  # index into _wanted of the buffer being filled
        self._filled = 0  # bytes of that buffer received so far
        self._pieces: dict[int, list[pa.Buffer]] = {}
        self._frames = 0

    def feed(self, meta: Mapping[str, Any], frames: Sequence[FrameLike]) -> pa.RecordBatch | None:
        """Take one part; return the batch it completes, or None while the batch is incomplete.

        Args:
            meta: the part's ``arrow`` map, as decoded from the header (untrusted).
            frames: the part's payload frames (memoryviews over received ZeroMQ frames, bytes,
                or pyarrow buffers); the returned batch refers to their memory.

        Returns:
            The rebuilt, validated batch at ``end_of_chunk``; None before.

        Raises:
            DecodeError: the part is malformed, breaks a limit, or does not follow the previous
                one; the decoder is failed from then on.
        """
        if self._failed is not None:
            raise DecodeError(f"arrow stream already failed: {self._failed}")
        try:
            return self._feed(meta, frames)
        except DecodeError as exc:
            self._fail(str(exc))
            raise
        except _BAD_INPUT as exc:
            reason = f"malformed arrow part: {type(exc).__name__}: {exc}"
            self._fail(reason)
            raise DecodeError(reason) from exc

    def _fail(self, reason: str) -> None:
        self._failed = reason
        self._reset()

    def _feed(self, meta: Mapping[str, Any], frames: Sequence[FrameLike]) -> pa.RecordBatch | None:
        if not isinstance(meta, Mapping):
            raise DecodeError(f"arrow meta is {type(meta).__name__}, expected a map")
        where = f"arrow batch {self._batch} part {self._part}"
        count = _int(meta, "frames", where, MAX_FRAMES_PER_PART)
        if count != len(frames):
            raise DecodeError(f"{where}: meta says {count} frames, the message has {len(frames)}")
        if _int(meta, "batch", where, 2**63 - 1) != self._batch:
            raise DecodeError(f"{where}: got batch {meta['batch']}, expected {self._batch}")
        if _int(meta, "part", where, MAX_FRAMES_PER_BATCH) != self._part:
            raise DecodeError(f"{where}: got part {meta['part']}, expected {self._part}")
        end = meta.get("end_of_chunk")
        if type(end) is not bool:
            raise DecodeError(f"{where}: 'end_of_chunk' is {type(end).__name__}, expected bool")
        if not end and not frames:
            raise DecodeError(f"{where}: a part that does not end its batch has no frames")
        self._frames += len(frames)
        if self._frames > MAX_FRAMES_PER_BATCH:
            raise DecodeError(f"{where}: batch has more than MAX_FRAMES_PER_BATCH={MAX_FRAMES_PER_BATCH} frames")
        buffers = [pa.py_buffer(frame) for frame in frames]
        if "schema" in meta:
            if self._schema is not None:
                raise DecodeError(f"{where}: a second schema; a stream sends its schema once")
            size = _int(meta, "schema", where, MAX_SCHEMA_BYTES)
            if not buffers or buffers[0].size != size:
                raise DecodeError(f"{where}: the schema frame is missing or not {size} bytes")
            # Copied: it may lie in a sender's shared memory, which a view kept here would pin.
            raw = buffers.pop(0).to_pybytes()
            self._schema, self._plain, self._text = _schema_of(raw, where)
            self._schema_frame = pa.py_buffer(raw)
        elif self._schema is None:
            raise DecodeError(f"{where}: the stream's first part carries no schema")
        if self._part == 0:
            self._read_head(meta, where)
        else:
            for key in ("rows", "encoding", "columns", "ipc_bytes"):
                if key in meta:
                    raise DecodeError(f"{where}: {key!r} belongs to a batch's first part only")
        self._take(buffers, where)
        if not end:
            self._part += 1
            return None
        if self._cursor != len(self._wanted):
            raise DecodeError(f"{where}: batch ended with body buffer {self._wanted[self._cursor]} incomplete")
        batch = self._assemble(where)
        self._reset()
        self._batch += 1
        return batch

    @staticmethod
    def _read_schema(frame: pa.Buffer, where: str) -> pa.Schema:
        """The schema of a schema frame: one IPC schema message, nothing before or after it."""
        reader = pa.BufferReader(frame)
        try:
            message = pa.ipc.read_message(reader)
            schema = pa.ipc.read_schema(message)
        except _BAD_INPUT as exc:
            raise DecodeError(f"{where}: the schema frame is not an Arrow IPC schema: {exc}") from exc
        if reader.tell() != frame.size:
            raise DecodeError(f"{where}: the schema frame holds bytes after its IPC schema message")
        depth, _ = _walk_schema(schema)
        if depth > MAX_TYPE_DEPTH:
            raise DecodeError(f"{where}: schema nests types deeper than MAX_TYPE_DEPTH={MAX_TYPE_DEPTH}")
        return schema

    def _read_head(self, meta: Mapping[str, Any], where: str) -> None:
        """Check part 0's layout keys and plan which frames fill which buffer."""
        assert self._schema is not None
        self._rows = _int(meta, "rows", where, MAX_ROWS)
        self._encoding = meta.get("encoding", "")
        if self._encoding == "buffers":
            columns = meta.get("columns")
            if not isinstance(columns, list | tuple) or len(columns) != len(self._schema):
                raise DecodeError(f"{where}: 'columns' must be a list of {len(self._schema)} nodes")
            if "ipc_bytes" in meta:
                raise DecodeError(f"{where}: 'ipc_bytes' in a buffers batch")
            self._columns, self._sizes = self._checked_layout(columns, where)
        elif self._encoding == "ipc":
            if "columns" in meta:
                raise DecodeError(f"{where}: 'columns' in an ipc batch")
            self._sizes = [_int(meta, "ipc_bytes", where, MAX_BATCH_BYTES)]
        else:
            raise DecodeError(f"{where}: 'encoding' is {self._encoding!r:.40}, expected 'buffers' or 'ipc'")
        self._wanted = [index for index, size in enumerate(self._sizes) if size]

    def _checked_layout(self, columns: Sequence[Any], where: str) -> tuple[list[_Node], list[int | None]]:
        """The checked nodes of a batch's ``columns`` and its body's buffer sizes.

        The batches of a stream often share one layout (same rows, no nulls): ``columns`` that
        pack to the bytes of the last batch's, with as many rows, are that batch's, checked then
        (the bytes tell a bool or a float from an int, as the checks do). Checking 8 columns again
        was over half the decoding of a 10k-row batch that came as frames.
        """
        assert self._schema is not None
        try:
            packed = msgpack.packb(columns)
        except (TypeError, ValueError, OverflowError):  # not from the wire: checked below, and refused
            packed = None
        last = self._last_layout
        if packed is not None and last is not None and last[0] == self._rows and last[1] == packed:
            return last[2], last[3]
        layout = _Layout()
        nodes = []
        for index, (raw, field) in enumerate(zip(columns, self._schema, strict=True)):
            node = layout.node(raw, field.type, f"{where} column {field.name!r:.40}")
            if node.n != self._rows:
                raise DecodeError(f"{where}: column {index} has {node.n} items, the batch {self._rows} rows")
            nodes.append(node)
        if packed is not None:
            self._last_layout = (self._rows, packed, nodes, layout.sizes)
        return nodes, layout.sizes

    def _take(self, buffers: list[pa.Buffer], where: str) -> None:
        """File each frame under the body buffer it belongs to."""
        for buf in buffers:
            if buf.size == 0:
                raise DecodeError(f"{where}: empty payload frame")
            if self._cursor >= len(self._wanted):
                raise DecodeError(f"{where}: more frames than the batch's buffers need")
            index = self._wanted[self._cursor]
            want = self._sizes[index]
            assert want is not None
            if self._filled + buf.size > want:
                raise DecodeError(
                    f"{where}: a {buf.size}-byte frame overruns body buffer {index} "
                    f"({self._filled} of {want} bytes filled)"
                )
            self._pieces.setdefault(index, []).append(buf)
            self._filled += buf.size
            if self._filled == want:
                self._cursor += 1
                self._filled = 0

    def _body(self) -> list[pa.Buffer | None]:
        body: list[pa.Buffer | None] = []
        for index, size in enumerate(self._sizes):
            pieces = self._pieces.get(index)
            if size is None:
                body.append(None)
            elif not pieces:
                body.append(_EMPTY)
            elif len(pieces) == 1:
                body.append(pieces[0])
            else:
                body.append(pa.py_buffer(b"".join(pieces)))  # the one documented copy
        return body

    def _assemble(self, where: str) -> pa.RecordBatch:
        schema = self._schema
        assert schema is not None
        body = self._body()
        try:
            if self._encoding == "ipc":
                ipc = body[0]
                assert ipc is not None  # "ipc" has one buffer, never absent
                batch = (self._read_ipc if self._plain else self._open_ipc)(ipc, schema, where)
            elif self._columns:
                batch = pa.RecordBatch.from_arrays([_build(n, body) for n in self._columns], schema=schema)
            else:  # no columns: only a struct array can carry the row count
                rows = pa.StructArray.from_buffers(pa.struct([]), self._rows, [None], children=[])
                batch = pa.RecordBatch.from_struct_array(rows).replace_schema_metadata(schema.metadata)
            if self._text:
                validate_batch(batch)
            else:
                batch.validate(full=True)
        except DecodeError:
            raise
        except _BAD_INPUT as exc:
            raise DecodeError(f"{where}: the batch does not rebuild: {type(exc).__name__}: {exc}") from exc
        if batch.num_rows != self._rows:
            raise DecodeError(f"{where}: the batch has {batch.num_rows} rows, meta says {self._rows}")
        return batch

    def _read_ipc(self, buf: pa.Buffer, schema: pa.Schema, where: str) -> pa.RecordBatch:
        """The one batch of an IPC stream of a schema without dictionaries: its schema message,
        then one record batch message, then nothing or the end-of-stream marker.

        Message by message (a third of the cost of pyarrow's stream reader on a 10k-row batch). A
        stream that starts with the bytes of the stream's schema frame (one schema message, read
        and checked with the first part) starts with that schema: it is skipped, not parsed again.
        """
        reader = pa.BufferReader(buf)
        frame = self._schema_frame
        if frame is not None and buf[: frame.size].equals(frame):
            reader.seek(frame.size)
        else:
            head = pa.ipc.read_message(reader)
            if head.type != "schema":
                raise DecodeError(f"{where}: the IPC stream starts with a {head.type} message, not its schema")
            if not pa.ipc.read_schema(head).equals(schema):
                raise DecodeError(f"{where}: the IPC stream's schema is not the stream's")
        message = pa.ipc.read_message(reader)
        if message.type != "record batch":
            raise DecodeError(f"{where}: the IPC stream holds a {message.type} message, not a record batch")
        batch = pa.ipc.read_record_batch(message, schema)
        rest = buf.size - reader.tell()
        if rest and (rest > _IPC_END_BYTES or buf[-rest:].to_pybytes() not in _IPC_ENDS):
            raise DecodeError(f"{where}: the IPC stream holds more than one batch")
        return batch

    @staticmethod
    def _open_ipc(buf: pa.Buffer, schema: pa.Schema, where: str) -> pa.RecordBatch:
        """The one batch of an IPC stream, dictionaries included, by pyarrow's stream reader."""
        reader = pa.ipc.open_stream(buf)
        if not reader.schema.equals(schema):
            raise DecodeError(f"{where}: the IPC stream's schema is not the stream's")
        batch = reader.read_next_batch()
        try:
            reader.read_next_batch()
        except StopIteration:
            return batch
        raise DecodeError(f"{where}: the IPC stream holds more than one batch")
