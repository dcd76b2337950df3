"""What a plugin author codes against: ``Plugin``, ``Anchor``, the provider and its ``io``.

The shape is Alteryx's Python SDK v2 (``PluginV2`` and its provider), so a plugin written for one
reads naturally in the other. The engine (:class:`~dpipes.nodes.plugins.runner.PluginRunner`, used
by the test harness today and by the node's plugin worker later) constructs the plugin with a
provider, then calls, one at a time and never concurrently:

1. ``on_record_batch(batch, anchor)`` for each chunk arriving on an input anchor, in the order
   the upstream wrote them; ``batch`` is a ``pyarrow.Table`` of the anchor's one schema;
2. ``on_incoming_connection_complete(anchor)`` when that input ends, also for an (optional) input
   anchor that received nothing;
3. ``on_complete()`` once, last: an input plugin (no input anchors) produces its data here.

A callback that raises fails the stage: the traceback goes out through ``io.error`` and the
engine raises :class:`~dpipes.nodes.plugins.errors.CallbackFailed`. Outgoing anchors the plugin
did not close are closed after ``on_complete``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa

log = logging.getLogger(__name__)

__all__ = ["Anchor", "AnchorSpec", "Environment", "Plugin", "PluginIO", "Provider"]


class Anchor(NamedTuple):
    """An input anchor and the connection into it that a callback is about."""

    name: str
    connection: str


@dataclass(frozen=True, slots=True)
class AnchorSpec:
    """A declared anchor: its name, its schema when known, and whether an input may stay unconnected."""

    name: str
    schema: pa.Schema | None = None
    optional: bool = False


@dataclass(frozen=True, slots=True)
class Environment:
    """Where a plugin instance runs.

    Attributes:
        pipeline: the run's id (``"harness"`` in the test harness).
        stage: the stage's index in the run, from 0.
        node: the node running the stage.
        plugin: the plugin's name (its entry point name, or its reference).
        temp_dir: a directory the plugin owns for the run; removed after it.
        update_only: a schema pass: only ``__init__`` runs (push outgoing metadata there);
            no callback is called and no data flows.
    """

    pipeline: str
    stage: int
    node: str
    plugin: str
    temp_dir: Path
    update_only: bool = False


class PluginIO(abc.ABC):
    """Messages to the person running the pipeline: they travel as Dagster Pipes messages.

    ``info``/``warn``/``error`` are Pipes ``log`` messages (levels ``INFO``, ``WARNING``,
    ``ERROR``); ``msg % args`` is formatted as ``logging`` does. ``update_progress`` is a Pipes
    ``report_custom_message`` whose payload is ``{"type": "dpipes.progress", "fraction": F}``.
    """

    @abc.abstractmethod
    def info(self, msg: str, *args: Any) -> None: ...

    @abc.abstractmethod
    def warn(self, msg: str, *args: Any) -> None: ...

    @abc.abstractmethod
    def error(self, msg: str, *args: Any) -> None: ...

    @abc.abstractmethod
    def update_progress(self, fraction: float) -> None:
        """Report how far the stage is, from 0.0 to 1.0.

        Raises:
            ValueError: ``fraction`` is not a finite number in [0, 1].
        """


class Provider(abc.ABC):
    """What the engine gives a plugin: its outputs, its messages, its configuration."""

    @property
    @abc.abstractmethod
    def io(self) -> PluginIO: ...

    @property
    @abc.abstractmethod
    def environment(self) -> Environment: ...

    @property
    @abc.abstractmethod
    def tool_config(self) -> dict[str, Any]:
        """The stage's configuration (``key=value`` on the command line, a workflow's ``config``)."""

    @property
    @abc.abstractmethod
    def incoming_anchors(self) -> Mapping[str, AnchorSpec]: ...

    @property
    @abc.abstractmethod
    def outgoing_anchors(self) -> Mapping[str, AnchorSpec]:
        """The outgoing anchors; ``schema`` is the one pushed or first written, else None."""

    @property
    @abc.abstractmethod
    def logger(self) -> logging.Logger:
        """A logger for the plugin's own diagnostics (the node's log, not the user's terminal)."""

    @abc.abstractmethod
    def write_to_anchor(self, name: str, data: pa.Table | pa.RecordBatch) -> None:
        """Send a table or batch on outgoing anchor ``name`` (zero-copy; each chunk travels as a batch).

        It returns at once unless the reader downstream is behind (flow control, as a full pipe
        blocks a writer); that wait is not counted against the engine's callback timeout.

        Raises:
            UnknownAnchor: the plugin declares no outgoing anchor ``name``.
            AnchorClosed: the anchor was closed.
            SchemaChanged: ``data``'s schema differs from the anchor's (pushed or first written).
        """

    @abc.abstractmethod
    def close_outgoing_anchor(self, name: str) -> None:
        """End outgoing anchor ``name``: its reader sees the end of its input (idempotent)."""

    @abc.abstractmethod
    def push_outgoing_metadata(self, name: str, schema: pa.Schema) -> None:
        """Announce anchor ``name``'s schema before any data (the schema of an empty output).

        Raises:
            UnknownAnchor, SchemaChanged: as ``write_to_anchor``.
        """


class Plugin(abc.ABC):
    """Base class of a plugin: subclass it, keep ``provider``, implement the three callbacks."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    @abc.abstractmethod
    def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
        """Process one chunk that arrived on input ``anchor``."""

    @abc.abstractmethod
    def on_incoming_connection_complete(self, anchor: Anchor) -> None:
        """Input ``anchor`` ended (also called for an optional input that got no data)."""

    @abc.abstractmethod
    def on_complete(self) -> None:
        """Every input ended; write what remains (an input plugin writes everything here)."""
