"""The plugin SDK's errors: one branch of the dpipes tree, each leaf also the matching stdlib type.

Every message names the plugin and the anchor or reference at fault and says what to do; the
worker adds the stage and node when it reports one.
"""

from __future__ import annotations

from dpipes.bus.errors import DpipesError


class PluginError(DpipesError):
    """A plugin could not be found, loaded or run as the rules say."""


class PluginNotFound(PluginError, LookupError):
    """No installed plugin has that name (entry point group ``dpipes.plugins``), or no such file."""


class PluginImportFailed(PluginError, ImportError):
    """The module a plugin reference names raised while importing; the cause is chained."""


class NotAPlugin(PluginError, TypeError):
    """A reference names something that is not a plugin class (no ``on_record_batch``, ...)."""


class BadReference(PluginError, ValueError):
    """A plugin reference is not ``name``, ``module:Class`` or ``file.py:Class``."""


class UnknownAnchor(PluginError, LookupError):
    """A plugin wrote to (or the engine fed) an anchor the plugin does not declare."""


class AnchorClosed(PluginError, ValueError):
    """A plugin wrote to an outgoing anchor after closing it."""


class SchemaChanged(PluginError, ValueError):
    """The schema on an anchor changed mid-stream; a stream has one schema."""


class CallbackFailed(PluginError):
    """A plugin callback raised; the traceback went out through ``io.error``; the cause is chained."""


class CallbackTimeout(PluginError, TimeoutError):
    """A plugin callback did not return within the timeout the engine gave."""


class EdgeDecodeError(PluginError, ValueError):
    """A program's output at an edge to a plugin does not parse as its format (CSV, JSON lines, Arrow)."""


class ScaffoldError(PluginError, ValueError):
    """``dpipes plugin new`` cannot write the package: a bad name, or the directory is not empty."""
