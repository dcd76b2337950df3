"""Edges between programs and plugins: pyarrow's readers and writers, incremental, bad input named."""

from __future__ import annotations

import datetime
import io
import os
import threading

import pyarrow as pa
import pytest

from dpipes.nodes.plugins.edges import EDGE_FORMATS, open_writer, read_batches
from dpipes.nodes.plugins.errors import EdgeDecodeError

WRITER_WAIT_S = 30.0  # the writer holds its pipe open at most this long; the test does not wait on it


def sample() -> pa.Table:
    return pa.table({"id": pa.array(range(1000), pa.int64()), "name": [f"n{i}" for i in range(1000)]})


@pytest.mark.parametrize("fmt", EDGE_FORMATS)
def test_round_trip_through_each_format(fmt: str) -> None:
    table = sample()
    buf = io.BytesIO()
    writer = open_writer(fmt, buf, table.schema)  # type: ignore[arg-type]
    for batch in table.to_batches(max_chunksize=300):
        writer.write(batch)
    writer.close()
    buf.seek(0)
    back = pa.Table.from_batches(list(read_batches(fmt, buf, block_bytes=4096)))  # type: ignore[arg-type]
    assert back.equals(table)


def test_json_lines_writer_gives_json_for_dates_decimals_and_binary() -> None:
    import decimal
    import json

    table = pa.table(
        {
            "d": [datetime.date(2024, 5, 1)],
            "t": [datetime.datetime(2024, 5, 1, 12, 30)],
            "x": pa.array([decimal.Decimal("1.50")], pa.decimal128(5, 2)),
            "b": [b"\x00\xff"],
        }
    )
    buf = io.BytesIO()
    open_writer("ndjson", buf, table.schema).write(table)
    assert json.loads(buf.getvalue()) == {"d": "2024-05-01", "t": "2024-05-01T12:30:00", "x": "1.50", "b": "AP8="}


def test_a_csv_row_with_the_wrong_field_count_is_named_by_line() -> None:
    data = b"a,b\n" + b"1,2\n" * 50 + b"5,6,7\n" + b"8,9\n"
    with pytest.raises(EdgeDecodeError, match=r"stage 0 \(cat@alpha\): CSV does not parse: line 52 has 3 fields"):
        list(read_batches("csv", io.BytesIO(data), where="stage 0 (cat@alpha)", block_bytes=64))


def test_a_csv_value_that_does_not_fit_the_inferred_type_is_named() -> None:
    data = b"a,b\n" + b"1,2\n" * 50 + b"x,2\n"
    with pytest.raises(EdgeDecodeError, match=r"CSV does not parse: after \d+ rows: .*'x'"):
        list(read_batches("csv", io.BytesIO(data), block_bytes=64))


def test_malformed_json_lines_and_ipc_are_named() -> None:
    with pytest.raises(EdgeDecodeError, match="JSON lines do not parse: after 0 rows"):
        list(read_batches("ndjson", io.BytesIO(b'{"a": 1}\nnot json\n')))
    with pytest.raises(EdgeDecodeError, match="not an Arrow IPC stream"):
        list(read_batches("arrow", io.BytesIO(b"\xff\xff\xff\xff" + b"garbage" * 10)))


def test_an_ipc_batch_with_a_hostile_offset_is_refused() -> None:
    good = pa.record_batch({"s": ["a", "b", "c"]})
    offsets = good.column(0).buffers()[1]
    hostile_offsets = pa.py_buffer(bytearray(offsets.to_pybytes()))
    view = memoryview(hostile_offsets).cast("i")
    view[1] = 1_000_000  # points far outside the data buffer
    arr = pa.Array.from_buffers(pa.string(), 3, [None, hostile_offsets, good.column(0).buffers()[2]])
    buf = io.BytesIO()
    with pa.ipc.new_stream(buf, good.schema) as writer:
        writer.write_batch(pa.record_batch([arr], schema=good.schema))
    with pytest.raises(EdgeDecodeError, match="not an Arrow IPC stream: after 0 batches"):
        list(read_batches("arrow", io.BytesIO(buf.getvalue())))


@pytest.mark.parametrize(
    ("data", "offsets"),
    [(b"ok\xff", [0, 2, 3]), ("é".encode(), [0, 1, 2])],  # not UTF-8; a character cut between two strings
    ids=["not-utf8", "cut-character"],
)
def test_an_ipc_batch_whose_text_is_not_utf8_is_refused_after_the_good_ones(data: bytes, offsets: list[int]) -> None:
    good = pa.record_batch({"s": ["a", "é", None]})
    bad = pa.Array.from_buffers(
        pa.string(), 2, [None, pa.py_buffer(pa.array(offsets, pa.int32()).buffers()[1]), pa.py_buffer(data)]
    )
    buf = io.BytesIO()
    with pa.ipc.new_stream(buf, good.schema) as writer:
        writer.write_batch(good)
        writer.write_batch(pa.record_batch([bad], schema=good.schema))
    got = []
    with pytest.raises(
        EdgeDecodeError, match=r"stage 0 \(cat@alpha\): not an Arrow IPC stream: after 1 batches: .*UTF8"
    ):
        for batch in read_batches("arrow", io.BytesIO(buf.getvalue()), where="stage 0 (cat@alpha)"):
            got.append(batch)
    assert [b.to_pylist() for b in got] == [good.to_pylist()]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="use one of csv, ndjson, arrow"):
        read_batches("xml", io.BytesIO(b""))  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["csv", "ndjson", "arrow"])
def test_reading_is_incremental_over_a_pipe(fmt: str) -> None:
    """The first batch arrives while the program is still writing: nothing waits for the end."""
    table = sample()
    head = io.BytesIO()
    writer = open_writer(fmt, head, table.schema)  # type: ignore[arg-type]
    for _ in range(200):  # a few blocks' worth
        writer.write(table)
    data = head.getvalue()
    rfd, wfd = os.pipe()
    finish, closed = threading.Event(), threading.Event()

    def program() -> None:
        with os.fdopen(wfd, "wb") as out:
            out.write(data)
            out.flush()
            finish.wait(WRITER_WAIT_S)  # the program is still running, its stdout still open
        closed.set()

    thread = threading.Thread(target=program)
    thread.start()
    try:
        with os.fdopen(rfd, "rb") as source:
            batches = read_batches(fmt, source, block_bytes=64 * 1024)  # type: ignore[arg-type]
            first = next(batches)
            still_writing = not closed.is_set()
            finish.set()
            rest = list(batches)
        assert still_writing and first.num_rows > 0
        assert sum(b.num_rows for b in [first, *rest]) == 200 * table.num_rows
    finally:
        finish.set()
        thread.join()
