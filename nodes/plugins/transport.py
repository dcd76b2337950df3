"""The seams between a running plugin and where its output goes: record batches and Pipes messages.

A :class:`Transport` receives what the provider lets through (the rules are checked before it is
called: known anchor, one schema, not closed). :class:`MemoryTransport` keeps it for the test
harness; the node's plugin worker will send it as ``ARROW`` bus streams under credit. Messages go
to a ``dagster_pipes.PipesMessageWriterChannel``: :class:`MemoryMessageChannel` here, the bus
channel (:class:`dpipes.bus.pipes_writer.PipesBusMessageWriterChannel`) in the worker.

Both are called from the thread that runs the plugin's callbacks, one call at a time.
"""

from __future__ import annotations

import abc
import logging
import threading

import pyarrow as pa
from dagster_pipes import PipesMessage, PipesMessageWriterChannel

log = logging.getLogger(__name__)

__all__ = ["MemoryMessageChannel", "MemoryTransport", "Transport"]


class Transport(abc.ABC):
    """Where a plugin's outgoing anchors go."""

    @abc.abstractmethod
    def open_anchor(self, name: str, schema: pa.Schema) -> None:
        """Anchor ``name`` has schema ``schema``: called once, before its first ``write``."""

    @abc.abstractmethod
    def write(self, name: str, batch: pa.RecordBatch) -> None:
        """Send one batch on anchor ``name``.

        May block while the reader downstream has no credit (flow control, like a full pipe); the
        runner does not count that time against the callback timeout. A reader that went away
        (``| head``) is raised as a ``DpipesError`` that is also a ``BrokenPipeError``: the runner
        then ends the plugin as SIGPIPE ends a program, reporting no error of the plugin's.
        """

    @abc.abstractmethod
    def close_anchor(self, name: str) -> None:
        """Anchor ``name`` ended: once per anchor, opened or not."""


class MemoryTransport(Transport):
    """Keeps every anchor's schema, batches and end in memory (the test harness's transport)."""

    def __init__(self) -> None:
        self.schemas: dict[str, pa.Schema] = {}
        self.batches: dict[str, list[pa.RecordBatch]] = {}
        self.closed: set[str] = set()

    def open_anchor(self, name: str, schema: pa.Schema) -> None:
        self.schemas[name] = schema
        self.batches.setdefault(name, [])

    def write(self, name: str, batch: pa.RecordBatch) -> None:
        self.batches[name].append(batch)

    def close_anchor(self, name: str) -> None:
        self.closed.add(name)

    def table(self, name: str) -> pa.Table | None:
        """Everything written on ``name`` as one table; None if it never got a schema."""
        if name not in self.schemas:
            return None
        return pa.Table.from_batches(self.batches[name], schema=self.schemas[name])


class MemoryMessageChannel(PipesMessageWriterChannel):
    """Keeps the Pipes messages written to it, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.messages: list[PipesMessage] = []

    def write_message(self, message: PipesMessage) -> None:
        with self._lock:
            self.messages.append(message)
