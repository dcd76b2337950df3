"""Arrow record batches over bus streams: the framing of ``dpipes.bus.arrow`` on credit streams."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import pyarrow as pa

from dpipes.bus import codec
from dpipes.bus.arrow import ARROW_CHUNK_BYTES, ArrowDecoder, ArrowEncoder
from dpipes.bus.endpoint import InStream, OutStream
from dpipes.bus.errors import DecodeError, StreamError


class ArrowStreamWriter:
    """Sends record batches of one schema on an ``OutStream``; the schema goes with the first."""

    def __init__(self, stream: OutStream, schema: pa.Schema, *, chunk_bytes: int = ARROW_CHUNK_BYTES) -> None:
        self.stream = stream
        self._encoder = ArrowEncoder(schema, chunk_bytes=chunk_bytes)

    async def write(self, batch: pa.RecordBatch) -> None:
        """Send one batch (in several parts when it is larger than the chunk size)."""
        for meta, frames in self._encoder.encode(batch):
            await self.stream.send(codec.Arrow(arrow=dict(meta), frames=tuple(frames)))

    async def write_all(self, batches: Iterable[pa.RecordBatch]) -> None:
        for batch in batches:
            await self.write(batch)

    async def close(self, timeout: float | None = None) -> int:
        """End the stream and wait until the reader acknowledged every byte."""
        return await self.stream.close(timeout)


class ArrowStreamReader:
    """Rebuilds record batches, zero-copy, from the ``ARROW`` messages of an ``InStream``."""

    def __init__(self, stream: InStream) -> None:
        self.stream = stream
        self._decoder = ArrowDecoder()

    @property
    def schema(self) -> pa.Schema | None:
        return self._decoder.schema

    async def read(self, timeout: float | None = None) -> pa.RecordBatch | None:
        """The next batch, or None at the end of the stream.

        Raises:
            StreamError: the stream carried something other than Arrow, or ended inside a batch.
            DecodeError: a part was malformed (the stream is then unusable; it is cancelled).
        """
        while True:
            msg = await self.stream.read(timeout)
            if msg is None:
                if self._decoder.pending:
                    raise StreamError(f"Arrow stream from {self.stream.src} ended inside a batch")
                return None
            if not isinstance(msg, codec.Arrow):
                self.stream.cancel(f"expected ARROW, got {msg.KIND}")
                raise StreamError(f"Arrow stream from {self.stream.src} carried a {msg.KIND} message")
            try:
                batch = self._decoder.feed(msg.arrow, msg.frames)
            except DecodeError:
                self.stream.cancel("malformed Arrow part")
                raise
            if batch is not None:
                return batch

    def __aiter__(self) -> AsyncIterator[pa.RecordBatch]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[pa.RecordBatch]:
        while (batch := await self.read()) is not None:
            yield batch
