"""A test harness for plugin authors, in the shape of Alteryx's ``SdkToolTestService``. No daemon.

In a test (pytest or any runner)::

    import pyarrow as pa
    from dpipes.nodes.plugins.harness import PluginTestService
    from my_plugin import Upper

    def test_upper():
        service = PluginTestService(
            Upper,
            input_anchors={"Input": pa.schema([("name", pa.string())])},
            output_anchors=["Output"],
            config={"column": "name"},
        )
        service.run_on_record_batch(pa.table({"name": ["ada"]}), "Input")
        service.run_on_incoming_connection_complete("Input")
        service.run_on_complete()
        assert service.output("Output").column("name").to_pylist() == ["ADA"]
        assert service.io_stream == []          # or ["INFO:...", "WARNING:...", ...]

The plugin runs through the same :class:`~dpipes.nodes.plugins.runner.PluginRunner` as in a
pipeline, so the same rules hold (one schema per anchor, no unknown anchor, callbacks one at a
time, an exception fails with :class:`CallbackFailed` and its traceback in ``io_stream``).
What to inspect afterwards:

- ``data_streams``: outgoing anchor -> list of the record batches written, in order;
  ``output(name)``: them as one ``pyarrow.Table`` (None if the anchor never got a schema);
  ``schemas``: anchor -> schema; ``closed``: the anchors that ended.
- ``io_messages``: every Pipes message ``provider.io`` sent, as dicts (the wire shape);
  ``io_stream``: the log messages as ``"LEVEL:text"`` strings (``INFO``, ``WARNING``, ``ERROR``);
  ``progress``: the fractions ``update_progress`` reported.
"""

from __future__ import annotations

import logging
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
from dagster_pipes import PipesMessage

from dpipes.nodes.plugins.api import Anchor, Environment
from dpipes.nodes.plugins.provider import PROGRESS_MESSAGE_TYPE
from dpipes.nodes.plugins.runner import DEFAULT_CONNECTION, AnchorsLike, PluginRunner
from dpipes.nodes.plugins.transport import MemoryMessageChannel, MemoryTransport

log = logging.getLogger(__name__)

__all__ = ["PluginTestService", "SdkToolTestService"]


class PluginTestService:
    """Runs one plugin instance in memory, one callback per ``run_on_*`` call.

    Args:
        plugin_class: the plugin under test.
        input_anchors, output_anchors: ``{name: schema or None}``, ``[name]`` or ``[AnchorSpec]``;
            a declared input schema is enforced on the batches the test feeds.
        config: ``provider.tool_config``.
        update_only: construct for a schema pass (the ``run_on_*`` callbacks then do nothing).
        callback_timeout_s: fail a callback that runs longer (None: no bound).
        plugin_name: ``provider.environment.plugin`` (default: the class name).

    The plugin is constructed here. ``provider.environment.temp_dir`` is a fresh directory that
    :meth:`close` (or leaving a ``with`` block) removes.
    """

    def __init__(
        self,
        plugin_class: type,
        input_anchors: AnchorsLike = (),
        output_anchors: AnchorsLike = (),
        config: Mapping[str, Any] | None = None,
        *,
        update_only: bool = False,
        callback_timeout_s: float | None = None,
        plugin_name: str | None = None,
    ) -> None:
        self._temp = tempfile.TemporaryDirectory(prefix="dpipes-plugin-test-")
        self.transport = MemoryTransport()
        self.channel = MemoryMessageChannel()
        environment = Environment(
            pipeline="harness",
            stage=0,
            node=socket.gethostname(),
            plugin=plugin_name or plugin_class.__name__,
            temp_dir=Path(self._temp.name),
            update_only=update_only,
        )
        self.runner = PluginRunner(
            plugin_class,
            incoming=input_anchors,
            outgoing=output_anchors,
            config=config,
            environment=environment,
            transport=self.transport,
            channel=self.channel,
            callback_timeout_s=callback_timeout_s,
        )
        try:
            self.runner.start()
        except BaseException:
            self.close()
            raise

    @property
    def plugin(self) -> Any:
        return self.runner.plugin

    @property
    def provider(self) -> Any:
        return self.runner.provider

    def run_on_record_batch(self, batch: pa.Table | pa.RecordBatch, anchor: Anchor | str) -> None:
        """Feed ``batch`` to input ``anchor`` (a name, or ``Anchor(name, connection)``)."""
        name, connection = _anchor(anchor)
        self.runner.record_batch(name, batch, connection=connection)

    def run_on_incoming_connection_complete(self, anchor: Anchor | str) -> None:
        """End input ``anchor``."""
        name, connection = _anchor(anchor)
        self.runner.incoming_complete(name, connection=connection)

    def run_on_complete(self) -> None:
        """Call ``on_complete``; outgoing anchors left open are closed after it."""
        self.runner.complete()

    def close(self) -> None:
        self.runner.close()
        self._temp.cleanup()

    def __enter__(self) -> PluginTestService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ inspection

    @property
    def data_streams(self) -> dict[str, list[pa.RecordBatch]]:
        return self.transport.batches

    @property
    def schemas(self) -> dict[str, pa.Schema]:
        return self.transport.schemas

    @property
    def closed(self) -> set[str]:
        return self.transport.closed

    def output(self, anchor: str) -> pa.Table | None:
        return self.transport.table(anchor)

    @property
    def io_messages(self) -> list[PipesMessage]:
        return self.channel.messages

    @property
    def io_stream(self) -> list[str]:
        return [
            f"{m['params']['level']}:{m['params']['message']}"  # type: ignore[index]
            for m in self.channel.messages
            if m["method"] == "log"
        ]

    @property
    def progress(self) -> list[float]:
        return [
            m["params"]["payload"]["fraction"]  # type: ignore[index]
            for m in self.channel.messages
            if m["method"] == "report_custom_message" and m["params"]["payload"].get("type") == PROGRESS_MESSAGE_TYPE  # type: ignore[index]
        ]


SdkToolTestService = PluginTestService  # the name Alteryx's SDK gives it, for authors who know that one


def _anchor(anchor: Anchor | str) -> tuple[str, str]:
    if isinstance(anchor, str):
        return anchor, DEFAULT_CONNECTION
    return anchor.name, anchor.connection
