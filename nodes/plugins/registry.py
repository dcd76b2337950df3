"""Finding plugins: installed ones by entry point, ad-hoc ones by ``module:Class`` or ``file.py:Class``.

An installed plugin is an entry point in the group ``dpipes.plugins`` of any installed
distribution, its name the plugin's name, its value ``module:Class``::

    [project.entry-points."dpipes.plugins"]
    upper = "dpipes_plugin_upper.plugin:Upper"

A *reference* is one of:

- ``NAME`` (no colon): the installed plugin ``NAME``;
- ``package.module:Class`` (``Class`` may be dotted, ``Outer.Inner``): imported as Python would;
- ``path/to/file.py:Class``: that file, loaded as a module of its own (``.py`` or a ``/`` before
  the colon says it is a file).

The table of installed plugins is read once and kept while the metadata it came from is
unchanged (:func:`dpipes.nodes.plugin_cache.installation_stamp`: each ``sys.path`` entry and the
distribution directories in it, by modification time, which ``pip install`` and ``pip uninstall``
change); reading every distribution's ``entry_points.txt`` cost a node 20-50 ms per plugin stage.

A plugin class is a class with callable ``on_record_batch``, ``on_incoming_connection_complete``
and ``on_complete`` that is not abstract; subclassing :class:`~dpipes.nodes.plugins.api.Plugin` is
the way to get that right. Errors: :class:`PluginNotFound` (no such entry point, module, file or
attribute), :class:`PluginImportFailed` (the module raised while importing; chained),
:class:`NotAPlugin`, :class:`BadReference`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import sys
from pathlib import Path
from typing import Any, Final, NamedTuple

from dpipes.nodes.plugin_cache import installation_stamp
from dpipes.nodes.plugins.errors import BadReference, NotAPlugin, PluginImportFailed, PluginNotFound

log = logging.getLogger(__name__)

__all__ = ["ENTRY_POINT_GROUP", "PluginInfo", "check_plugin_class", "installed_plugins", "load_plugin"]

ENTRY_POINT_GROUP: Final = "dpipes.plugins"
CALLBACKS: Final = ("on_record_batch", "on_incoming_connection_complete", "on_complete")


class PluginInfo(NamedTuple):
    """An installed plugin: its ``module:Class`` reference and its distribution's version."""

    reference: str
    version: str


_found: tuple[list[list[object]], dict[str, importlib.metadata.EntryPoint]] | None = None  # (stamp, table)


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    global _found
    stamp = installation_stamp()
    if _found is not None and _found[0] == stamp:
        return _found[1]
    found = _read_entry_points()
    _found = (stamp, found)
    return found


def _read_entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found and found[ep.name].value != ep.value:
            log.warning(
                "plugin %s is installed twice (%s and %s); using the first", ep.name, found[ep.name].value, ep.value
            )
            continue
        found.setdefault(ep.name, ep)
    return found


def installed_plugins() -> dict[str, PluginInfo]:
    """Every installed plugin: name -> (reference, version), sorted by name. Nothing is imported."""
    out = {}
    for name, ep in sorted(_entry_points().items()):
        version = ep.dist.version if ep.dist is not None else ""
        out[name] = PluginInfo(ep.value, version)
    return out


def check_plugin_class(obj: Any, reference: str) -> type:
    """``obj`` if it is a usable plugin class.

    Raises:
        NotAPlugin: it is not a class, lacks a callback, or is abstract (naming what is missing).
    """
    if not isinstance(obj, type):
        raise NotAPlugin(f"plugin {reference}: {type(obj).__name__} {obj!r:.80} is not a class")
    missing = [name for name in CALLBACKS if not callable(getattr(obj, name, None))]
    if missing:
        raise NotAPlugin(f"plugin {reference}: class {obj.__qualname__} has no {', '.join(missing)}; subclass Plugin")
    if inspect.isabstract(obj):
        abstract = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        raise NotAPlugin(f"plugin {reference}: class {obj.__qualname__} does not implement {abstract}")
    return obj


def _attribute(module: Any, path: str, reference: str) -> Any:
    obj = module
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise PluginNotFound(f"plugin {reference}: {module.__name__} has no {path!r}") from None
    return obj


def _import_module(name: str, reference: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise PluginNotFound(f"plugin {reference}: no module named {exc.name!r} (is it installed?)") from None
        raise PluginImportFailed(f"plugin {reference}: importing {name} failed: {exc}") from exc
    except Exception as exc:
        raise PluginImportFailed(f"plugin {reference}: importing {name} failed: {type(exc).__name__}: {exc}") from exc


def _load_file(path: Path, reference: str) -> Any:
    if not path.is_file():
        raise PluginNotFound(f"plugin {reference}: no file {str(path)!r}")
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:12]
    name = f"_dpipes_plugin_{resolved.stem}_{digest}"
    if name in sys.modules:  # loaded once per process, as an import would be
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise BadReference(f"plugin {reference}: {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up while it executes
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PluginImportFailed(f"plugin {reference}: loading {path} failed: {type(exc).__name__}: {exc}") from exc
    return module


def load_plugin(reference: str) -> type:
    """The plugin class ``reference`` names (see the module docstring for the three forms).

    Raises:
        BadReference, PluginNotFound, PluginImportFailed, NotAPlugin.
    """
    if not isinstance(reference, str) or not reference.strip():
        raise BadReference(f"a plugin reference is NAME, module:Class or file.py:Class, got {reference!r}")
    target, colon, attr = reference.rpartition(":")
    if not colon:
        return _load_installed(reference)
    if not target or not attr:
        raise BadReference(f"plugin reference {reference!r}: write module:Class or file.py:Class")
    if target.endswith(".py") or "/" in target:
        module = _load_file(Path(target), reference)
    else:
        module = _import_module(target, reference)
    return check_plugin_class(_attribute(module, attr, reference), reference)


def _load_installed(name: str) -> type:
    ep = _entry_points().get(name)
    if ep is None:
        known = ", ".join(_entry_points()) or "none"
        raise PluginNotFound(
            f"plugin {name}: no installed plugin of that name (entry point group {ENTRY_POINT_GROUP!r}; "
            f"installed: {known})"
        )
    dist = f" (from {ep.dist.name} {ep.dist.version})" if ep.dist is not None else ""
    module_name, _, attr = ep.value.partition(":")
    module = _import_module(module_name.strip(), f"{name}{dist}")
    if not attr:
        raise NotAPlugin(f"plugin {name}{dist}: its entry point {ep.value!r} names a module, not module:Class")
    return check_plugin_class(_attribute(module, attr.strip(), f"{name}{dist}"), f"{name}{dist}")
