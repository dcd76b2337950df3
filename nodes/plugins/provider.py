"""The provider the engine hands a plugin: it checks the anchor rules and forwards to the seams.

``io`` messages become Dagster Pipes messages, protocol 0.1 (:mod:`dpipes.bus.pipes` is the spec),
written to a ``PipesMessageWriterChannel``. Exactly:

``io.info(msg, *args)`` / ``io.warn`` / ``io.error``
    ``{"__dagster_pipes_version": "0.1", "method": "log",
    "params": {"message": msg % args, "level": "INFO" | "WARNING" | "ERROR"}}``
``io.update_progress(fraction)``
    ``{"__dagster_pipes_version": "0.1", "method": "report_custom_message",
    "params": {"payload": {"type": "dpipes.progress", "fraction": fraction}}}``, ``fraction`` a
    float in [0, 1]. Progress messages are rate-limited: one is sent when ``fraction`` moved by at
    least ``PROGRESS_MIN_STEP`` since the last one sent, or reached 1.0, so a plugin may call this
    per batch without flooding the bus.

The rules (each violation raises the named error inside the plugin's callback *and* is remembered,
so the engine fails the stage with it even if the plugin catches the exception):

- an outgoing anchor the plugin does not declare: :class:`UnknownAnchor`;
- an anchor's schema is fixed by ``push_outgoing_metadata`` or its first write; a different one
  later (field names, types, nullability; schema metadata aside): :class:`SchemaChanged`;
- a write after ``close_outgoing_anchor``: :class:`AnchorClosed`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

import pyarrow as pa
from dagster_pipes import PipesMessage, PipesMessageWriterChannel

from dpipes.bus.pipes import PIPES_PROTOCOL_VERSION, PIPES_VERSION_FIELD
from dpipes.nodes.plugins.api import AnchorSpec, Environment, PluginIO, Provider
from dpipes.nodes.plugins.errors import AnchorClosed, PluginError, SchemaChanged, UnknownAnchor
from dpipes.nodes.plugins.transport import Transport

log = logging.getLogger(__name__)

__all__ = ["PROGRESS_MESSAGE_TYPE", "EngineProvider", "PipesPluginIO", "log_message", "progress_message"]

PROGRESS_MESSAGE_TYPE: Final = "dpipes.progress"
PROGRESS_MIN_STEP: Final = 0.01  # a progress bar moves in percent; finer steps are noise on the bus


def log_message(level: str, text: str) -> PipesMessage:
    """The Pipes ``log`` message of ``text`` at ``level`` (``INFO``, ``WARNING``, ``ERROR``, ...)."""
    return {PIPES_VERSION_FIELD: PIPES_PROTOCOL_VERSION, "method": "log", "params": {"message": text, "level": level}}


def progress_message(fraction: float) -> PipesMessage:
    """The Pipes ``report_custom_message`` that says a stage is ``fraction`` done."""
    payload = {"type": PROGRESS_MESSAGE_TYPE, "fraction": fraction}
    return {
        PIPES_VERSION_FIELD: PIPES_PROTOCOL_VERSION,
        "method": "report_custom_message",
        "params": {"payload": payload},
    }


def _format(msg: str, args: tuple[Any, ...]) -> str:
    if not args:
        return str(msg)
    try:
        return str(msg) % args
    except (TypeError, ValueError):  # as logging would, keep the message rather than fail the plugin
        return f"{msg} {args!r}"


class PipesPluginIO(PluginIO):
    """``provider.io``: each call is one Pipes message on ``channel``."""

    def __init__(self, channel: PipesMessageWriterChannel) -> None:
        self._channel = channel
        self._last_progress: float | None = None

    def info(self, msg: str, *args: Any) -> None:
        self._channel.write_message(log_message("INFO", _format(msg, args)))

    def warn(self, msg: str, *args: Any) -> None:
        self._channel.write_message(log_message("WARNING", _format(msg, args)))

    def error(self, msg: str, *args: Any) -> None:
        self._channel.write_message(log_message("ERROR", _format(msg, args)))

    def update_progress(self, fraction: float) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not math.isfinite(fraction):
            raise ValueError(f"update_progress takes a number from 0.0 to 1.0, got {fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"update_progress takes a number from 0.0 to 1.0, got {fraction}")
        last = self._last_progress
        if last is not None and abs(fraction - last) < PROGRESS_MIN_STEP and not (fraction == 1.0 != last):
            return
        self._last_progress = float(fraction)
        self._channel.write_message(progress_message(float(fraction)))


class _TransportClock:
    """Time spent in the transport or waiting for input, as a reusable context manager.

    Entered twice per batch (the wait for the batch, the write of the result): a class rather than a
    ``contextlib.contextmanager`` generator, which costs about 1.5 us per use against 0.6 us here,
    a tenth of a pass-through plugin's whole cost per small batch. Blocks do not nest.
    """

    __slots__ = ("_lock", "_since", "_total_s")

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the runner's watchdog reads it from another thread
        self._total_s = 0.0
        self._since: float | None = None

    def seconds(self) -> float:
        """Seconds inside blocks so far, the current one included."""
        with self._lock:
            since = self._since
            return self._total_s + (time.monotonic() - since if since is not None else 0.0)

    def __enter__(self) -> None:
        entered = time.monotonic()
        with self._lock:
            self._since = entered

    def __exit__(self, *exc: object) -> None:
        left = time.monotonic()
        with self._lock:
            if self._since is not None:
                self._total_s += left - self._since
            self._since = None


class EngineProvider(Provider):
    """The provider of :class:`~dpipes.nodes.plugins.runner.PluginRunner`: rules, then the seams."""

    def __init__(
        self,
        *,
        environment: Environment,
        config: Mapping[str, Any],
        incoming: Mapping[str, AnchorSpec],
        outgoing: Mapping[str, AnchorSpec],
        transport: Transport,
        channel: PipesMessageWriterChannel,
    ) -> None:
        self._environment = environment
        self._config = dict(config)
        self._incoming = MappingProxyType(dict(incoming))
        self._outgoing_declared = dict(outgoing)
        self._schemas: dict[str, pa.Schema] = {}
        self._closed: set[str] = set()
        self._transport = transport
        self._io = PipesPluginIO(channel)
        self._logger = logging.getLogger(f"dpipes.plugin.{environment.plugin}")
        self._lock = threading.Lock()  # a plugin may write from its own threads; the seams see one call at a time
        self._clock = _TransportClock()
        self.violation: PluginError | None = None  # the first rule broken; the engine fails the stage with it

    @property
    def io(self) -> PluginIO:
        return self._io

    @property
    def environment(self) -> Environment:
        return self._environment

    @property
    def tool_config(self) -> dict[str, Any]:
        return self._config

    @property
    def incoming_anchors(self) -> Mapping[str, AnchorSpec]:
        return self._incoming

    @property
    def outgoing_anchors(self) -> Mapping[str, AnchorSpec]:
        return MappingProxyType(
            {
                name: AnchorSpec(name, self._schemas.get(name, spec.schema), spec.optional)
                for name, spec in self._outgoing_declared.items()
            }
        )

    @property
    def logger(self) -> logging.Logger:
        return self._logger

    def blocked_s(self) -> float:
        """Seconds spent so far inside the transport (waiting for flow control), the current wait included."""
        return self._clock.seconds()

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        """For the engine: time spent in this block (waiting for input) is not the plugin's own either."""
        return self._clock

    def _broken(self, error: PluginError) -> PluginError:
        if self.violation is None:
            self.violation = error
        return error

    def _check_schema(self, name: str, schema: pa.Schema) -> None:
        """Fix anchor ``name``'s schema on first use; refuse another one later. Holds ``_lock``."""
        if name not in self._outgoing_declared:
            declared = ", ".join(repr(n) for n in self._outgoing_declared) or "none"
            raise self._broken(
                UnknownAnchor(
                    f"plugin {self._environment.plugin}: no outgoing anchor {name!r} (it declares: {declared})"
                )
            )
        if name in self._closed:
            raise self._broken(
                AnchorClosed(f"plugin {self._environment.plugin}: wrote to outgoing anchor {name!r} after closing it")
            )
        known = self._schemas.get(name) or self._outgoing_declared[name].schema
        if known is not None and not known.equals(schema, check_metadata=False):
            raise self._broken(
                SchemaChanged(
                    f"plugin {self._environment.plugin}: outgoing anchor {name!r} changed schema mid-stream "
                    f"from ({_brief(known)}) to ({_brief(schema)}); an anchor carries one schema"
                )
            )
        if name not in self._schemas:
            self._schemas[name] = known if known is not None else schema
            with self._clock:
                self._transport.open_anchor(name, self._schemas[name])

    def write_to_anchor(self, name: str, data: pa.Table | pa.RecordBatch) -> None:
        if not isinstance(data, pa.Table | pa.RecordBatch):
            raise TypeError(f"write_to_anchor takes a pyarrow Table or RecordBatch, got {type(data).__name__}")
        with self._lock:
            self._check_schema(name, data.schema)
            schema = self._schemas[name]
            batches = data.to_batches() if isinstance(data, pa.Table) else [data]
            for batch in batches:
                if batch.num_rows:
                    # the declared schema may differ in metadata only: ship the anchor's own (a batch's
                    # schema is a new object each time: compare, ~0.1 us, rather than rebuild, ~20 us)
                    if not batch.schema.equals(schema, check_metadata=True):
                        batch = pa.RecordBatch.from_arrays(batch.columns, schema=schema)
                    with self._clock:
                        self._transport.write(name, batch)

    def close_outgoing_anchor(self, name: str) -> None:
        with self._lock:
            if name not in self._outgoing_declared:
                raise self._broken(UnknownAnchor(f"plugin {self._environment.plugin}: no outgoing anchor {name!r}"))
            if name not in self._closed:
                self._closed.add(name)
                with self._clock:
                    self._transport.close_anchor(name)

    def push_outgoing_metadata(self, name: str, schema: pa.Schema) -> None:
        if not isinstance(schema, pa.Schema):
            raise TypeError(f"push_outgoing_metadata takes a pyarrow Schema, got {type(schema).__name__}")
        with self._lock:
            self._check_schema(name, schema)

    def close_all(self) -> None:
        """Close every outgoing anchor the plugin left open (after ``on_complete``)."""
        for name in self._outgoing_declared:
            self.close_outgoing_anchor(name)


def _brief(schema: pa.Schema, limit: int = 200) -> str:
    text = ", ".join(f"{f.name}: {f.type}" for f in schema)
    return text if len(text) <= limit else text[: limit - 3] + "..."
