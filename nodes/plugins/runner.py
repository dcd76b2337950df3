"""The driver: runs one plugin instance over its inputs exactly as the engine does.

The test harness drives a :class:`PluginRunner` step by step; the node's plugin worker will drive
one from its input streams. The runner owns the order and the rules:

- The plugin's code (its ``__init__`` and every callback) runs on one thread of the runner's own,
  one call at a time; a call that does not return within ``callback_timeout_s`` raises
  :class:`CallbackTimeout` and fails the runner. Time the call spends inside the transport (a
  write waiting for flow control because the reader downstream is slow) does not count: the
  timeout bounds the plugin's own code, not its consumers. Python cannot stop a thread, so a
  timed-out thread is abandoned (a daemon thread): the worker process then exits, which ends it.
- Per input anchor and connection: batches in the order given, then one completion; a batch after
  the completion is refused. Each connection is one stream with one schema: a batch whose schema
  differs from the anchor's declared one (or, if none was declared, from the connection's first
  batch) raises :class:`SchemaChanged`. Two connections into one anchor may differ.
- An exception in the plugin's code is reported with its traceback through ``io.error`` and
  raised as :class:`CallbackFailed` (the plugin's exception chained), or as the rule it broke
  (:class:`UnknownAnchor`, :class:`SchemaChanged`, :class:`AnchorClosed`) when the provider saw
  one, even if the plugin caught it. After a failure every call raises the same error.
- :meth:`PluginRunner.feed` makes the calls of one whole input (``record_batch`` for each batch,
  then ``incoming_complete``) with one hand-over to the plugin's thread instead of one per batch
  (about 20 µs each, more under load): the worker uses it for a plugin's only input. The rules and
  the timeout are the same; time the plugin's thread spends waiting for the next batch is not the
  plugin's, as time in the transport is not.
- :meth:`PluginRunner.complete` calls ``on_complete`` and then closes every outgoing anchor the
  plugin left open. In a schema pass (``environment.update_only``) only ``__init__`` runs: the
  callbacks are skipped and the outgoing anchors carry the schemas pushed there.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

import pyarrow as pa
from dagster_pipes import PipesMessageWriterChannel

from dpipes.bus.errors import DpipesError
from dpipes.nodes.plugins.api import Anchor, AnchorSpec, Environment
from dpipes.nodes.plugins.errors import CallbackFailed, CallbackTimeout, PluginError, SchemaChanged, UnknownAnchor
from dpipes.nodes.plugins.provider import EngineProvider, _brief
from dpipes.nodes.plugins.registry import check_plugin_class
from dpipes.nodes.plugins.transport import Transport

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CONNECTION", "AnchorsLike", "PluginRunner", "anchor_specs"]

DEFAULT_CONNECTION: Final = "#1"  # the connection name of an anchor's only input, as Alteryx names it

AnchorsLike = Mapping[str, "pa.Schema | AnchorSpec | None"] | Sequence[AnchorSpec] | Sequence[str]


def anchor_specs(anchors: AnchorsLike) -> dict[str, AnchorSpec]:
    """``{name: schema | None | AnchorSpec}``, ``[AnchorSpec]`` or ``[name]`` -> ``{name: AnchorSpec}``."""
    if isinstance(anchors, Mapping):
        return {n: v if isinstance(v, AnchorSpec) else AnchorSpec(n, v) for n, v in anchors.items()}
    specs = [a if isinstance(a, AnchorSpec) else AnchorSpec(a) for a in anchors]
    return {spec.name: spec for spec in specs}


class _Call:
    __slots__ = ("args", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _NotThePlugins(Exception):
    """In :meth:`PluginRunner.feed`'s loop: ``error`` came from its input, not from the plugin's code."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


def _serve(calls: queue.SimpleQueue[_Call | None]) -> None:
    while (call := calls.get()) is not None:
        try:
            call.result = call.fn(*call.args)
        except BaseException as exc:  # the plugin's SystemExit or KeyboardInterrupt fails it, not this thread
            call.error = exc
        finally:
            call.done.set()


class PluginRunner:
    """Runs one instance of ``plugin_class``: construct, feed, complete, under the rules above.

    Args:
        plugin_class: the plugin (a :class:`~dpipes.nodes.plugins.api.Plugin` subclass, or any class
            with the three callbacks).
        incoming, outgoing: the anchors, as ``{name: schema or None}`` or ``[AnchorSpec]``.
        config: the stage's configuration (``provider.tool_config``).
        environment: where it runs (``provider.environment``).
        transport: where outgoing batches go.
        channel: where ``io`` messages go (a ``dagster_pipes.PipesMessageWriterChannel``).
        callback_timeout_s: the longest ``__init__`` or one callback may take; None: no bound.
    """

    def __init__(
        self,
        plugin_class: type,
        *,
        incoming: AnchorsLike = (),
        outgoing: AnchorsLike = (),
        config: Mapping[str, Any] | None = None,
        environment: Environment,
        transport: Transport,
        channel: PipesMessageWriterChannel,
        callback_timeout_s: float | None = None,
    ) -> None:
        self.plugin_class = check_plugin_class(plugin_class, environment.plugin)
        self.name = environment.plugin
        self.callback_timeout_s = callback_timeout_s
        self.incoming = anchor_specs(incoming)
        self.provider = EngineProvider(
            environment=environment,
            config=config or {},
            incoming=self.incoming,
            outgoing=anchor_specs(outgoing),
            transport=transport,
            channel=channel,
        )
        self.plugin: Any = None
        self.failure: PluginError | None = None
        self.flow_control_extensions = 0  # times a callback's deadline moved because it waited in the transport
        self._input_schemas: dict[tuple[str, str], pa.Schema] = {}  # per connection: each is its own stream
        self._ended: set[tuple[str, str]] = set()
        self._completed = False
        self._lock = threading.Lock()  # one engine call at a time, whichever thread makes it
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._current = ""  # what feed()'s call is doing now, for its errors
        self._thread = threading.Thread(target=_serve, args=(self._calls,), name=f"plugin {self.name}", daemon=True)
        self._thread.start()
        self._stop = weakref.finalize(self, self._calls.put, None)  # a forgotten runner still ends its thread

    @property
    def update_only(self) -> bool:
        return self.provider.environment.update_only

    def close(self) -> None:
        """End the runner's thread once it is idle (an abandoned callback keeps it, as a daemon)."""
        self._stop()

    def __enter__(self) -> PluginRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ steps

    def start(self) -> None:
        """Construct the plugin with its provider (its ``__init__`` runs under the timeout)."""
        with self._lock:
            if self.plugin is None:
                self.plugin = self._call("__init__", self.plugin_class, self.provider)

    def record_batch(
        self, anchor: str, batch: pa.Table | pa.RecordBatch, *, connection: str = DEFAULT_CONNECTION
    ) -> None:
        """Call ``on_record_batch`` with ``batch`` (as a ``pyarrow.Table``) on input ``anchor``.

        Raises:
            UnknownAnchor: the plugin declares no input ``anchor``.
            SchemaChanged: ``batch``'s schema is not the anchor's.
            PluginError: the connection already ended, or the runner failed before.
            CallbackFailed, CallbackTimeout: the plugin raised, or did not return in time.
        """
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        with self._lock:
            self._check_input(anchor, connection)
            declared = self.incoming[anchor].schema
            known = self._input_schemas.setdefault((anchor, connection), declared or table.schema)
            if not known.equals(table.schema, check_metadata=False):
                raise self._schema_changed(anchor, connection, known, table.schema)
            if not self.update_only:
                self._call(
                    f"on_record_batch (anchor {anchor!r}, connection {connection})",
                    self._plugin().on_record_batch,
                    table,
                    Anchor(anchor, connection),
                )

    def feed(
        self,
        anchor: str,
        batches: Iterable[pa.Table | pa.RecordBatch],
        *,
        connection: str = DEFAULT_CONNECTION,
    ) -> None:
        """``record_batch`` for each of ``batches`` (pulled on the plugin's thread), then ``incoming_complete``.

        The runner is held until ``batches`` ends: use it for a plugin's only input connection
        (another connection's calls would wait for this one to end). An exception raised by
        ``batches`` itself (its input did not convert) propagates as it is and does not fail the
        runner, as it would not if the caller had iterated.

        Raises:
            As :meth:`record_batch` and :meth:`incoming_complete`.
        """
        with self._lock:
            self._check_input(anchor, connection)
            call = _Call(self._feed_here, (anchor, connection, iter(batches)))
            self._current = f"on_record_batch (anchor {anchor!r}, connection {connection})"
            self._calls.put(call)
            timed_out = not self._wait(call)
            what = self._current
            if timed_out:
                self._timed_out(what)
            if isinstance(call.error, _NotThePlugins):
                raise call.error.error from None
            self._settle(call, what)

    def _feed_here(self, anchor: str, connection: str, batches: Iterator[pa.Table | pa.RecordBatch]) -> None:
        """On the plugin's thread: :meth:`feed`'s loop; the plugin's own exceptions propagate, others are wrapped."""
        plugin = self._plugin()
        declared = self.incoming[anchor].schema
        where = Anchor(anchor, connection)
        # Once per batch below, so what does not change is looked up here (a pass-through plugin's
        # whole cost per 100-row batch is some 12 us; each attribute chain is a part of it).
        waiting, update_only, key = self.provider.waiting(), self.update_only, (anchor, connection)
        while True:
            with waiting:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                except BaseException as exc:
                    raise _NotThePlugins(exc) from None
            table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
            known = self._input_schemas.setdefault(key, declared or table.schema)
            if not known.equals(table.schema, check_metadata=False):
                raise _NotThePlugins(self._schema_changed(anchor, connection, known, table.schema))
            if not update_only:
                plugin.on_record_batch(table, where)
        self._ended.add((anchor, connection))
        self._current = f"on_incoming_connection_complete (anchor {anchor!r}, connection {connection})"
        if not self.update_only:
            plugin.on_incoming_connection_complete(where)

    def incoming_complete(self, anchor: str, *, connection: str = DEFAULT_CONNECTION) -> None:
        """Call ``on_incoming_connection_complete``: input ``anchor``'s ``connection`` ended."""
        with self._lock:
            self._check_input(anchor, connection)
            self._ended.add((anchor, connection))
            if not self.update_only:
                self._call(
                    f"on_incoming_connection_complete (anchor {anchor!r}, connection {connection})",
                    self._plugin().on_incoming_connection_complete,
                    Anchor(anchor, connection),
                )

    def complete(self) -> None:
        """Call ``on_complete``, then close the outgoing anchors left open; the runner is done."""
        with self._lock:
            self._check_failed()
            if self._completed:
                raise PluginError(f"plugin {self.name}: complete() was already called")
            if not self.update_only:
                self._call("on_complete", self._plugin().on_complete)
            self._completed = True
            self.provider.close_all()
        self.close()

    def run(self, inputs: Mapping[str, Iterable[pa.Table | pa.RecordBatch]] | None = None) -> None:
        """The whole life: construct, every input anchor's batches then its completion, complete.

        Input anchors are fed one after the other, in declaration order; one that ``inputs`` does
        not mention (an optional input left unconnected) is completed without data.
        """
        inputs = inputs or {}
        if unknown := sorted(set(inputs) - set(self.incoming)):
            raise UnknownAnchor(f"plugin {self.name}: no input anchor {unknown[0]!r} ({self._declared()})")
        self.start()
        for name in self.incoming:
            for batch in inputs.get(name, ()):
                self.record_batch(name, batch)
            self.incoming_complete(name)
        self.complete()

    # -------------------------------------------------------------------------------- internals

    def _declared(self) -> str:
        return "it declares: " + (", ".join(repr(n) for n in self.incoming) or "no input anchors")

    def _plugin(self) -> Any:
        if self.plugin is None:
            raise PluginError(f"plugin {self.name}: a callback before start()")
        return self.plugin

    def _check_failed(self) -> None:
        if self.failure is not None:
            raise PluginError(f"plugin {self.name} failed earlier: {self.failure}") from self.failure

    def _check_input(self, anchor: str, connection: str) -> None:
        self._check_failed()
        if anchor not in self.incoming:
            raise UnknownAnchor(f"plugin {self.name}: no input anchor {anchor!r} ({self._declared()})")
        if (anchor, connection) in self._ended or self._completed:
            raise PluginError(f"plugin {self.name}: input anchor {anchor!r} (connection {connection}) already ended")

    def _schema_changed(self, anchor: str, connection: str, known: pa.Schema, got: pa.Schema) -> SchemaChanged:
        return SchemaChanged(
            f"plugin {self.name}: input anchor {anchor!r} (connection {connection}) changed schema "
            f"mid-stream from ({_brief(known)}) to ({_brief(got)})"
        )

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the plugin's thread under the timeout; turn what goes wrong into a named error."""
        call = _Call(fn, args)
        self._calls.put(call)
        if not self._wait(call):
            self._timed_out(what)
        return self._settle(call, what)

    def _timed_out(self, what: str) -> None:
        text = f"plugin {self.name}: {what} did not return within {self.callback_timeout_s:g} s"
        error = CallbackTimeout(text)
        self._fail(error, text)
        raise error

    def _settle(self, call: _Call, what: str) -> Any:
        """The result of a finished ``call``, or the named error for what went wrong in it."""
        if call.error is not None:
            exc = call.error
            if isinstance(exc, BrokenPipeError) and isinstance(exc, DpipesError):
                # A transport's reader went away (see Transport.write): as SIGPIPE ends a program, no error to report.
                self.failure = CallbackFailed(f"plugin {self.name}: {what}: the reader of an output went away")
                raise self.failure from exc
            text = "".join(traceback.format_exception(exc)).rstrip()
            error = self.provider.violation or CallbackFailed(
                f"plugin {self.name}: {what} raised {type(exc).__name__}: {exc}"
            )
            self._fail(error, f"plugin {self.name}: {what} raised:\n{text}")
            if error is exc:
                raise error
            raise error from exc
        if self.provider.violation is not None:  # the plugin caught the error the rule raised
            error = self.provider.violation
            self._fail(error, f"plugin {self.name}: {what} broke a rule: {error}")
            raise error
        return call.result

    def _wait(self, call: _Call) -> bool:
        """Wait for ``call`` until its own time (time in the transport left out) exceeds the timeout."""
        timeout = self.callback_timeout_s
        if timeout is None:
            return call.done.wait()
        start, blocked_before = time.monotonic(), self.provider.blocked_s()
        expired = False
        while not call.done.is_set():
            own_s = (time.monotonic() - start) - (self.provider.blocked_s() - blocked_before)
            if own_s >= timeout:
                return call.done.is_set()
            if expired:  # the deadline passed while the plugin waited in the transport: it moved
                self.flow_control_extensions += 1
            expired = not call.done.wait(timeout - own_s)
        return True

    def _fail(self, error: PluginError, report: str) -> None:
        self.failure = error
        self.provider.io.error("%s", report)
        log.debug("%s", report)
