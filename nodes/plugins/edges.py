"""Conversion at the edge between a program and a plugin: CSV, JSON lines and Arrow IPC streams.

A program writes bytes; a plugin takes record batches. The plugin worker turns a program's output
into batches with :func:`read_batches` and a plugin's output into a program's input with
:func:`open_writer`. Both use pyarrow's own incremental readers and writers, never hand-written
parsing:

============  ====================================  =============================================
format        reading (program -> plugin)           writing (plugin -> program)
============  ====================================  =============================================
``csv``       ``pyarrow.csv.open_csv``: a header    ``pyarrow.csv.CSVWriter``: a header line, then
              line, then rows; column types are     one block of rows per batch
              inferred from the first block
``ndjson``    ``pyarrow.json.open_json``: one JSON  pyarrow has no JSON writer: ``to_pylist`` and
              object per line; types inferred from  the standard ``json`` encoder, one object per
              the first block                       line (dates and times as ISO 8601 text,
                                                    decimals as numbers' text, binary as base64)
``arrow``     ``pyarrow.ipc.open_stream``: an       ``pyarrow.ipc.new_stream``
              Arrow IPC stream (not the file
              format); every batch is validated
============  ====================================  =============================================

Memory is bounded by the block size (``EDGE_BLOCK_BYTES``; a CSV row or JSON line larger than one
block does not parse), except that an Arrow IPC batch is as large as the program wrote it.

Input that does not parse raises :class:`~dpipes.nodes.plugins.errors.EdgeDecodeError` naming the
edge (``where``, e.g. ``"stage 0 (cat@alpha)"``), the format, the line when pyarrow tells it (a
CSV row with the wrong number of fields: ``line 52``, counting the header as line 1), else how
many rows had been read, and pyarrow's own reason. A value that does not fit the type inferred
from the first block (``x`` in an integer column) is such an error too: write a header-consistent
first block, or convert at the program.
"""

from __future__ import annotations

import abc
import base64
import datetime
import decimal
import json
import logging
from collections.abc import Iterator
from typing import Any, BinaryIO, Final, Literal

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as pa_ipc
import pyarrow.json as pa_json

from dpipes.bus.arrow_validate import validate_batch
from dpipes.nodes.plugins.errors import EdgeDecodeError

log = logging.getLogger(__name__)

__all__ = ["EDGE_BLOCK_BYTES", "EDGE_FORMATS", "EdgeFormat", "EdgeWriter", "open_writer", "read_batches"]

EdgeFormat = Literal["csv", "ndjson", "arrow"]
EDGE_FORMATS: Final = ("csv", "ndjson", "arrow")
EDGE_BLOCK_BYTES: Final = 1024 * 1024  # per read: big enough for wide rows, small enough to keep an edge light


def _check_format(fmt: str) -> None:
    if fmt not in EDGE_FORMATS:
        raise ValueError(f"edge format {fmt!r}: use one of {', '.join(EDGE_FORMATS)}")


def read_batches(
    fmt: EdgeFormat, source: BinaryIO | pa.NativeFile, *, where: str = "input", block_bytes: int = EDGE_BLOCK_BYTES
) -> Iterator[pa.RecordBatch]:
    """Record batches parsed incrementally from ``source`` (a binary file, pipe or pyarrow stream).

    Raises:
        EdgeDecodeError: the bytes do not parse as ``fmt`` (see the module docstring).
        ValueError: ``fmt`` is not a known format.
    """
    _check_format(fmt)
    if fmt == "csv":
        return _read_csv(source, where, block_bytes)
    if fmt == "ndjson":
        return _read_json(source, where, block_bytes)
    return _read_ipc(source, where)


def _read_csv(source: Any, where: str, block_bytes: int) -> Iterator[pa.RecordBatch]:
    bad_rows: list[Any] = []

    def invalid_row(row: Any) -> str:  # pyarrow tells the row's line here, and nowhere else
        bad_rows.append(row)
        return "error"

    rows = 0
    try:
        # use_threads=False: rows are numbered only when blocks are parsed in order
        reader = pa_csv.open_csv(
            source,
            read_options=pa_csv.ReadOptions(block_size=block_bytes, use_threads=False),
            parse_options=pa_csv.ParseOptions(invalid_row_handler=invalid_row),
        )
        for batch in reader:
            rows += batch.num_rows
            yield batch
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        if bad_rows and bad_rows[0].number is not None:
            row = bad_rows[0]
            at = f"line {row.number} has {row.actual_columns} fields, the header {row.expected_columns}"
        else:
            at = f"after {rows} rows"
        raise EdgeDecodeError(f"{where}: CSV does not parse: {at}: {exc}") from None


def _read_json(source: Any, where: str, block_bytes: int) -> Iterator[pa.RecordBatch]:
    rows = 0
    try:
        reader = pa_json.open_json(source, read_options=pa_json.ReadOptions(block_size=block_bytes, use_threads=False))
        for batch in reader:
            rows += batch.num_rows
            yield batch
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise EdgeDecodeError(f"{where}: JSON lines do not parse: after {rows} rows: {exc}") from None


def _read_ipc(source: Any, where: str) -> Iterator[pa.RecordBatch]:
    batches = 0
    try:
        with pa_ipc.open_stream(source) as reader:
            for batch in reader:
                validate_batch(batch)  # offsets and UTF-8 of bytes another process wrote
                batches += 1
                yield batch
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OSError) as exc:  # OSError: truncated
        raise EdgeDecodeError(f"{where}: not an Arrow IPC stream: after {batches} batches: {exc}") from None


class EdgeWriter(abc.ABC):
    """Writes record batches of one schema to a program's input in one format."""

    @abc.abstractmethod
    def write(self, batch: pa.RecordBatch | pa.Table) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Finish the format (the IPC end marker); the sink itself stays open."""


class _PyarrowWriter(EdgeWriter):
    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if isinstance(batch, pa.Table):
            self._writer.write_table(batch)
        else:
            self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"a {type(value).__name__} value has no JSON form")


class _JsonLinesWriter(EdgeWriter):
    def __init__(self, sink: Any) -> None:
        self._sink = sink

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        lines = [json.dumps(row, default=_json_default, ensure_ascii=False) for row in batch.to_pylist()]
        if lines:
            self._sink.write(("\n".join(lines) + "\n").encode("utf-8"))

    def close(self) -> None:
        pass


def open_writer(fmt: EdgeFormat, sink: BinaryIO | pa.NativeFile, schema: pa.Schema) -> EdgeWriter:
    """A writer of ``schema``'s batches to ``sink`` in ``fmt``.

    Raises:
        ValueError: ``fmt`` is not a known format.
    """
    _check_format(fmt)
    if fmt == "csv":
        return _PyarrowWriter(pa_csv.CSVWriter(sink, schema))
    if fmt == "arrow":
        return _PyarrowWriter(pa_ipc.new_stream(sink, schema))
    return _JsonLinesWriter(sink)
