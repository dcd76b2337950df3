"""Full validation of a record batch that another process wrote, with Arrow's verdict and less CPU.

A batch read from bytes another process wrote (an Arrow IPC stream on a pipe, a bus message) is
checked as ``RecordBatch.validate(full=True)`` checks it before anything else touches it: offsets
within their buffers and in order, null counts that match their bitmaps, and text that is UTF-8.
That last check is the costly one: Arrow validates each string of a ``string`` column on its own,
about 6 ns a value whatever its length (a 205 MiB stream of 8M short strings: 40-50 ms of CPU, as
much as reading the stream from its pipe). :func:`validate_batch` reaches the same verdict another
way for ``string`` and ``large_string`` columns of a batch of at least ``BULK_FROM_ROWS`` rows
(below, Arrow's own check costs less than these steps):

1. the column viewed as ``binary`` (the same buffers) is fully validated by Arrow: its offsets and
   null count, everything but the text;
2. the bytes its offsets span, from the first to the last, are decoded as UTF-8 at once (Python's
   strict decoder: well-formed UTF-8 as Unicode defines it, no surrogates, no overlong forms,
   nothing past U+10FFFF);
3. when that text is not all ASCII, every string must start on a character, not inside one: the
   byte at each start offset is not a continuation byte (``10xxxxxx``). A valid whole whose every
   cut falls between characters is valid in each of its pieces.

Each step passing proves every string valid, nulls included, which is all that Arrow asks of the
column (it does not look at the bytes of a null). When a step fails, the batch is not rejected on
our word: Arrow's own full validation of that column decides, and raises its own error (a null
whose bytes are not text passes there, as it always did). Other types, and a ``string`` inside a
list or struct, are validated by Arrow as before. The result is the same as ``validate(full=True)``
for any input; ``tests/bus/test_arrow_validate.py`` holds it so on hostile bytes.
"""

from __future__ import annotations

import codecs

import pyarrow as pa

__all__ = ["has_text_columns", "validate_batch"]

BULK_FROM_ROWS = 4096  # fewer rows: Arrow's own check of each string costs less than our steps' fixed ~5 us
_CONTINUATION_MASK = 0xC0  # a UTF-8 continuation byte is 10xxxxxx
_CONTINUATION = 0x80


def validate_batch(batch: pa.RecordBatch) -> None:
    """As ``batch.validate(full=True)``: return if the batch is valid, else raise as it does.

    Raises:
        pyarrow.ArrowInvalid: the batch is not valid (Arrow's own message).
    """
    if batch.num_rows < BULK_FROM_ROWS or not has_text_columns(batch.schema):
        batch.validate(full=True)
        return
    batch.validate()  # the batch's shape and each column's buffers, sizes only: cheap
    for column in batch.columns:
        if _is_text(column.type) and _text_column_valid(column):
            continue
        try:
            column.validate(full=True)
        except pa.ArrowInvalid:
            batch.validate(full=True)  # the batch's own message, naming the column
            raise


def has_text_columns(schema: pa.Schema) -> bool:
    """Whether batches of ``schema`` have columns that :func:`validate_batch` checks its own way
    (``string`` and ``large_string`` ones); without, it is ``validate(full=True)`` and a look at
    the schema's types, which a reader of many batches of one schema can look at once."""
    return any(_is_text(kind) for kind in schema.types)


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def _text_column_valid(column: pa.Array) -> bool:
    """Whether ``column`` (``string`` or ``large_string``) is certainly valid; False when unsure."""
    large = pa.types.is_large_string(column.type)
    try:
        column.view(pa.large_binary() if large else pa.binary()).validate(full=True)
    except pa.ArrowInvalid:
        return False
    count = len(column)
    buffers = column.buffers()
    if count == 0 or buffers[2] is None:
        return True  # no bytes at all: offsets all equal (checked above), nothing to decode
    offsets = pa.Array.from_buffers(
        pa.int64() if large else pa.int32(), count + 1, [None, buffers[1]], offset=column.offset
    )
    first, last = offsets[0].as_py(), offsets[count].as_py()
    text = memoryview(buffers[2]).cast("B")[first:last]  # within the buffer: checked above
    try:
        decoded, _ = codecs.utf_8_decode(text, "strict", True)
    except UnicodeDecodeError:
        return False
    if decoded.isascii():
        return True  # one byte a character: every offset falls between two
    import pyarrow.compute as pc  # here: a plugin worker has it, a mere importer of this module need not

    data = pa.Array.from_buffers(pa.uint8(), last - first, [None, buffers[2].slice(first, last - first)])
    starts = pc.subtract(offsets.slice(0, count), pa.scalar(first, offsets.type))
    starts = pc.filter(starts, pc.less(starts, pa.scalar(last - first, offsets.type)))  # an empty string at the end
    at_starts = pc.bit_wise_and(pc.take(data, starts), pa.scalar(_CONTINUATION_MASK, pa.uint8()))
    return not pc.any(pc.equal(at_starts, pa.scalar(_CONTINUATION, pa.uint8()))).as_py()
