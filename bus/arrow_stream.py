"""Arrow record batches over bus streams: the framing of ``dpipes.bus.arrow`` on credit streams.

Across hosts (and to small batches) a batch goes as its own buffers, zero-copy; to a receiver
that shares memory with us (``dpipes.bus.shm``) it is written once, by pyarrow's IPC writer,
into that memory, and read there in place.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pyarrow as pa

from dpipes.bus import codec, shm
from dpipes.bus.arrow import ARROW_CHUNK_BYTES, MAX_CHUNK_BYTES, ArrowDecoder, ArrowEncoder
from dpipes.bus.endpoint import InStream, OutStream
from dpipes.bus.errors import DecodeError, StreamError

log = logging.getLogger(__name__)


class ArrowStreamWriter:
    """Sends record batches of one schema on an ``OutStream``; the schema goes with the first."""

    def __init__(self, stream: OutStream, schema: pa.Schema, *, chunk_bytes: int = ARROW_CHUNK_BYTES) -> None:
        self.stream = stream
        self._encoder = ArrowEncoder(schema, chunk_bytes=chunk_bytes)

    async def write(self, batch: pa.RecordBatch) -> None:
        """Send one batch (in several parts when it is larger than the chunk size).

        To a receiver that shares memory with us, a large batch is instead serialized once, in
        the ``"ipc"`` encoding, straight into that memory (``OutStream.send_in_place``): one copy
        on this side, and the receiver rebuilds it with pyarrow's IPC reader, in place.
        """
        size = self._encoder.ipc_size(batch)
        if size is not None and shm.MIN_PAYLOAD_BYTES <= size <= MAX_CHUNK_BYTES:
            try:
                if await self.stream.send_in_place("ARROW", size, functools.partial(self._fill, batch)):
                    return
            except (OSError, pa.ArrowException) as exc:  # the size was wrong: pyarrow's writer found out
                log.warning("Arrow stream to %s: a batch did not fit %d shared bytes: %s", self.stream.dst, size, exc)
        for meta, frames in self._encoder.encode(batch):
            await self.stream.send(codec.Arrow(arrow=dict(meta), frames=tuple(frames)))

    def _fill(self, batch: pa.RecordBatch, out: memoryview) -> tuple[dict[str, Any], list[int]]:
        meta, sizes = self._encoder.encode_ipc_into(batch, out)
        return {"arrow": dict(meta)}, sizes

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
