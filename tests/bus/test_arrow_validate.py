"""validate_batch: Arrow's own verdict on every batch, hostile text and offsets included."""

from __future__ import annotations

import struct

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpipes.bus import arrow_validate
from dpipes.bus.arrow_validate import BULK_FROM_ROWS, validate_batch


@pytest.fixture
def bulk_from_any_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bulk check for batches of any size (as shipped, small ones go to Arrow's own check)."""
    monkeypatch.setattr(arrow_validate, "BULK_FROM_ROWS", 0)


bulk = pytest.mark.usefixtures("bulk_from_any_size")


def text_column(data: bytes, offsets: list[int], *, large: bool = False, valid: list[bool] | None = None) -> pa.Array:
    """A string column built from raw buffers, as a reader of someone else's bytes would get it."""
    kind, fmt = (pa.large_string(), "q") if large else (pa.string(), "i")
    bitmap = None
    if valid is not None:
        bits = sum(1 << i for i, ok in enumerate(valid) if ok)
        bitmap = pa.py_buffer(bits.to_bytes((len(valid) + 7) // 8 or 1, "little"))
    return pa.Array.from_buffers(
        kind,
        len(offsets) - 1,
        [bitmap, pa.py_buffer(struct.pack(f"<{len(offsets)}{fmt}", *offsets)), pa.py_buffer(data)],
    )


def verdicts(batch: pa.RecordBatch) -> tuple[str, str]:
    """Ours and Arrow's, as text: an assertion about the batch itself would print it, and printing an
    invalid batch can crash the interpreter."""
    return we_say(batch), arrow_says(batch)


def arrow_says(batch: pa.RecordBatch) -> str:
    """Arrow's own full validation: '' when valid, else its message."""
    try:
        batch.validate(full=True)
    except pa.ArrowInvalid as exc:
        return str(exc)
    return ""


def we_say(batch: pa.RecordBatch) -> str:
    try:
        validate_batch(batch)
    except pa.ArrowInvalid as exc:
        return str(exc)
    return ""


def batch_of(column: pa.Array) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([column], names=["s"])


@bulk
@pytest.mark.parametrize(
    ("what", "data", "offsets", "valid", "ok"),
    [
        ("ascii", b"abcdef", [0, 2, 2, 6], None, True),
        ("accents", "éaü€".encode(), [0, 2, 3, 5, 8], None, True),
        ("a character cut between two strings", "é".encode(), [0, 1, 2], None, False),
        ("an empty string inside a character", "é".encode(), [0, 1, 1, 2], None, False),
        ("an empty string inside a character, nulls around it", "é".encode(), [0, 1, 1, 2], [False, True, False], True),
        ("a surrogate", b"\xed\xa0\x80", [0, 3], None, False),
        ("an overlong form", b"\xc0\x80", [0, 2], None, False),
        ("past U+10FFFF", b"\xf4\x90\x80\x80", [0, 4], None, False),
        ("a truncated character at the end", b"a\xe2\x82", [0, 1, 3], None, False),
        ("a stray continuation byte", b"a\x80", [0, 2], None, False),
        ("bytes under a null that are not text", b"a\xff", [0, 1, 2], [True, False], True),
        ("a noncharacter", "\ufffe".encode(), [0, 3], None, True),
        ("offsets out of order", b"abc", [0, 2, 1, 3], None, False),
    ],
)
@pytest.mark.parametrize("large", [False, True])
def test_the_same_verdict_as_arrow(
    what: str, data: bytes, offsets: list[int], valid: list[bool] | None, ok: bool, large: bool
) -> None:
    ours, arrows = verdicts(batch_of(text_column(data, offsets, large=large, valid=valid)))
    assert (arrows == "") is ok, what
    assert ours == arrows, what  # the same error text: Arrow's own


@bulk
def test_a_slice_is_checked_where_it_starts() -> None:
    column = text_column("aé".encode(), [0, 1, 2, 3])  # a, the first byte of é, the second
    ours, arrows = verdicts(batch_of(column.slice(1, 1)))
    assert ours == arrows != ""
    ours, arrows = verdicts(batch_of(column.slice(0, 1)))
    assert ours == arrows == ""


@bulk
def test_other_columns_are_validated_in_full() -> None:
    good = pa.array(["x", "y"])
    bad_list = pa.ListArray.from_buffers(
        pa.list_(pa.int64()), 2, [None, pa.py_buffer(struct.pack("<3i", 0, 5, 1))], children=[pa.array([1, 2, 3])]
    )
    ours, arrows = verdicts(pa.RecordBatch.from_arrays([good, bad_list], names=["s", "l"]))
    assert ours == arrows != ""
    nested = pa.StructArray.from_arrays([text_column(b"\xff", [0, 1])], names=["s"])
    ours, arrows = verdicts(pa.RecordBatch.from_arrays([nested], names=["t"]))
    assert ours == arrows != ""


@bulk
def test_an_empty_or_byteless_column_is_valid() -> None:
    assert we_say(batch_of(pa.array([], pa.string()))) == ""
    assert we_say(batch_of(pa.array(["", None, ""], pa.large_string()))) == ""


@bulk
@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.binary(max_size=6) | st.text(max_size=4).map(lambda s: s.encode("utf-8", "surrogatepass")), max_size=8),
    st.lists(st.booleans(), min_size=8, max_size=8),
    st.integers(0, 3),
    st.booleans(),
)
def test_hostile_text_gets_arrows_verdict(pieces: list[bytes], valid: list[bool], nudge: int, large: bool) -> None:
    """Random bytes and cuts (some inside characters, some past the data): always Arrow's verdict."""
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    data = b"".join(pieces)
    if nudge and len(offsets) > 2:  # move one cut by a byte or so, into a character or out of order
        offsets[1] = max(0, offsets[1] + nudge - 2)
    column = text_column(data, offsets, large=large, valid=valid[: len(offsets) - 1] if nudge == 3 else None)
    ours, arrows = verdicts(batch_of(column))
    assert ours == arrows


@pytest.mark.parametrize("bad", [b"\xff", "é".encode()[:1]], ids=["not-utf8", "half-a-character"])
def test_a_large_batch_takes_the_bulk_check_and_gets_arrows_verdict(bad: bytes) -> None:
    rows = BULK_FROM_ROWS + 7
    good = [f"väl {i}" for i in range(rows)]
    assert we_say(batch_of(pa.array(good))) == ""
    pieces = [s.encode() for s in good[:-1]] + [bad]
    offsets = [0]
    for piece in pieces:
        offsets.append(offsets[-1] + len(piece))
    ours, arrows = verdicts(batch_of(text_column(b"".join(pieces), offsets)))
    assert ours == arrows != ""
