"""What travels on a pipeline edge in each data mode, and what a program reads and writes.

bytes
    A program's output goes out as ``BYTES`` chunks, unchanged; they are written to the next
    program as they are.
json / yaml
    A program's output is parsed into objects (``ObjectParser``: a line or document that is not
    an object is an error naming the stage and line) and goes out as ``OBJECTS`` batches carrying
    the producer's metadata once per batch; the receiving side writes them to the next program as
    JSON lines or YAML documents, each with the metadata under the configured key.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dpipes.bus import codec
from dpipes.bus.errors import StageError

# dpipes.nodes.objects (msgpack batches, JSON and YAML) is imported only by an object-mode edge:
# a bytes pipeline, the common case, does not pay for it when dpipes starts.


class Outgoing:
    """Turns a program's output bytes into the messages of its outgoing edge."""

    def __init__(self, mode: str, *, where: str, meta: dict[str, Any]) -> None:
        self.mode = mode
        self.meta = meta
        self._parser = None
        if mode != "bytes":
            from dpipes.nodes.objects import ObjectParser

            self._parser = ObjectParser(mode, where=where)  # type: ignore[arg-type]

    def messages(self, data: bytes) -> list[codec.Message]:
        """Messages for one chunk of output (bytes mode: one; object modes: whole objects only).

        Raises:
            ObjectModeError: in an object mode, the output holds something that is not an object.
        """
        if self._parser is None:
            return [codec.Bytes(frames=(data,))]
        return self._batches(self._parser.feed(data))

    def end(self) -> list[codec.Message]:
        """Messages for what remains at the end of the output."""
        return self._batches(self._parser.end()) if self._parser is not None else []

    def _batches(self, objects: Sequence[Any]) -> list[codec.Message]:
        from dpipes.nodes.objects import BATCH_MAX_OBJECTS, pack_batch

        return [
            codec.Objects(count=len(chunk), meta=self.meta, frames=(pack_batch(chunk),))
            for start in range(0, len(objects), BATCH_MAX_OBJECTS)
            if (chunk := objects[start : start + BATCH_MAX_OBJECTS])
        ]


class Incoming:
    """Turns the messages of an incoming edge into what a program reads."""

    def __init__(self, mode: str, *, where: str, metadata_key: str | None = None) -> None:
        self.mode = mode
        self.where = where
        self._writer = None
        if mode != "bytes":
            from dpipes.nodes.objects import DEFAULT_METADATA_KEY, ObjectWriter

            self._writer = ObjectWriter(mode, metadata_key=metadata_key or DEFAULT_METADATA_KEY)  # type: ignore[arg-type]

    def data(self, msg: codec.Message) -> list[Any]:
        """The buffers to write for one message.

        Raises:
            StageError: the message is not of the edge's mode.
            DecodeError: an object batch is malformed.
        """
        if self._writer is None:
            if not isinstance(msg, codec.Bytes):
                raise StageError(f"{self.where}: got {msg.KIND} on a bytes edge")
            return list(msg.frames)
        if not isinstance(msg, codec.Objects) or len(msg.frames) != 1:
            raise StageError(f"{self.where}: got {msg.KIND} on a {self.mode} edge (expected one OBJECTS batch)")
        from dpipes.nodes.objects import unpack_batch

        objects = unpack_batch(msg.frames[0], where=self.where)
        return [self._writer.write(objects, metadata=msg.meta or None)]
