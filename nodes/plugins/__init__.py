"""Writing a dpipes plugin: a Python class that processes Arrow tables, in the shape of Alteryx's ``PluginV2``.

A plugin is a class; the engine constructs it with a *provider* and calls it with
``pyarrow.Table`` chunks::

    import pyarrow.compute as pc
    from dpipes.nodes.plugins import Anchor, Plugin, Provider

    class Positive(Plugin):
        \"\"\"Keeps the rows whose ``column`` (config, default "amount") is above 0.\"\"\"

        def __init__(self, provider: Provider) -> None:
            super().__init__(provider)               # keeps self.provider
            self.column = provider.tool_config.get("column", "amount")
            self.kept = 0

        def on_record_batch(self, batch, anchor: Anchor) -> None:
            out = batch.filter(pc.greater(batch[self.column], 0))
            self.kept += out.num_rows
            self.provider.write_to_anchor("Output", out)

        def on_incoming_connection_complete(self, anchor: Anchor) -> None:
            pass

        def on_complete(self) -> None:
            self.provider.io.info("kept %d rows", self.kept)

The calls, one at a time (never two at once, so a plugin needs no locks):

``__init__(provider)``
    Read ``provider.tool_config`` (the stage's configuration, a dict), ``provider.environment``
    (pipeline, stage, node, plugin name, a ``temp_dir`` of its own, ``update_only``: a schema
    pass, where only ``__init__`` runs and a plugin may ``push_outgoing_metadata``).
``on_record_batch(batch, anchor)``
    Each chunk of an input, in the order the upstream wrote it; ``anchor`` is
    ``Anchor(name, connection)``. Every chunk of one anchor has the same schema.
``on_incoming_connection_complete(anchor)``
    That input ended (also called for an optional input that got nothing).
``on_complete()``
    Last. An input plugin (no input anchors) writes all its data here.

The provider: ``write_to_anchor(name, table_or_batch)``, ``close_outgoing_anchor(name)`` (the
engine closes what is left open after ``on_complete``), ``push_outgoing_metadata(name, schema)``,
``io.info/warn/error(msg, *args)`` and ``io.update_progress(fraction)`` (Dagster Pipes ``log``
and ``report_custom_message`` messages, so they reach the person running the pipeline),
``incoming_anchors``, ``outgoing_anchors``, ``logger``.

The rules, each a named error that fails the stage (:mod:`dpipes.nodes.plugins.errors`): writing
to an anchor the plugin does not declare (:class:`UnknownAnchor`); a second schema on one anchor
(:class:`SchemaChanged`); writing after closing (:class:`AnchorClosed`); a callback that raises
(:class:`CallbackFailed`, its traceback sent through ``io.error``) or does not return within the
engine's timeout (:class:`CallbackTimeout`).

Test it without a daemon with :class:`~dpipes.nodes.plugins.harness.PluginTestService` (Alteryx's
``SdkToolTestService`` shape); make it installable with ``dpipes plugin new NAME``, which writes a
package with the ``dpipes.plugins`` entry point (:mod:`dpipes.nodes.plugins.registry`) and a test.
``examples/plugins/`` in the dpipes repository holds a filter, a group-by, a generator, a splitter,
a join and a progress reporter.

The modules: ``api`` (what a plugin codes against), ``runner`` (the engine's driver: order, rules,
timeout), ``provider`` (the rules and the exact Pipes messages), ``transport`` (the seams output
goes through), ``harness``, ``registry``, ``edges`` (CSV, JSON lines and Arrow IPC at the edge
between a program and a plugin), ``scaffold``, ``worker`` (the process a node forks to run a
plugin stage: ``dpipes '... | %plugin@node key=value'``, or a workflow's stage).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dpipes.nodes.plugins.api import Anchor, AnchorSpec, Environment, Plugin, PluginIO, Provider
    from dpipes.nodes.plugins.errors import (
        AnchorClosed,
        BadReference,
        CallbackFailed,
        CallbackTimeout,
        EdgeDecodeError,
        NotAPlugin,
        PluginError,
        PluginImportFailed,
        PluginNotFound,
        SchemaChanged,
        UnknownAnchor,
    )
    from dpipes.nodes.plugins.harness import PluginTestService, SdkToolTestService
    from dpipes.nodes.plugins.registry import PluginInfo, installed_plugins, load_plugin
    from dpipes.nodes.plugins.runner import PluginRunner

__all__ = [
    "Anchor",
    "AnchorClosed",
    "AnchorSpec",
    "BadReference",
    "CallbackFailed",
    "CallbackTimeout",
    "EdgeDecodeError",
    "Environment",
    "NotAPlugin",
    "Plugin",
    "PluginError",
    "PluginIO",
    "PluginImportFailed",
    "PluginInfo",
    "PluginNotFound",
    "PluginRunner",
    "PluginTestService",
    "Provider",
    "SchemaChanged",
    "SdkToolTestService",
    "UnknownAnchor",
    "installed_plugins",
    "load_plugin",
]

# Names are imported on first use (PEP 562), so `dpipes plugin new` does not load pyarrow.
_HOMES = {
    "api": ("Anchor", "AnchorSpec", "Environment", "Plugin", "PluginIO", "Provider"),
    "errors": (
        "AnchorClosed",
        "BadReference",
        "CallbackFailed",
        "CallbackTimeout",
        "EdgeDecodeError",
        "NotAPlugin",
        "PluginError",
        "PluginImportFailed",
        "PluginNotFound",
        "SchemaChanged",
        "UnknownAnchor",
    ),
    "harness": ("PluginTestService", "SdkToolTestService"),
    "registry": ("PluginInfo", "installed_plugins", "load_plugin"),
    "runner": ("PluginRunner",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
