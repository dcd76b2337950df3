"""The installed plugins a node offers, remembered between starts while the installation is unchanged.

Listing the installed plugins (:func:`dpipes.nodes.plugins.registry.installed_plugins`) imports
``importlib.metadata`` (which imports ``email``, ``csv``, ``zipfile``) and reads every installed
distribution's entry points: 35-45 ms of CPU at every daemon start, where eight daemons starting
at once on two cores wait for each other's CPU, though the answer only changes when something is
installed or removed. :func:`installed_plugin_versions` answers from a cache file when the
installation looks unchanged, else lists afresh and rewrites the file.

*Unchanged* means: the same ``sys.path``, each entry with the same modification time (or still
missing), and the same ``*.dist-info`` and ``*.egg-info`` directories in each, with the same
times (:func:`installation_stamp`). Installing, upgrading or removing a distribution adds or
removes such a directory in a ``sys.path`` directory, which changes that directory's time;
``importlib.metadata`` keys its own lookup cache on the same times (``FastPath``). Not seen: a
distribution's ``entry_points.txt`` rewritten in place inside its directory (a legacy ``setup.py
develop`` re-run), and distributions that a custom ``sys.meta_path`` finder provides; after
either, delete the cache file.

The file: ``$XDG_CACHE_HOME/dpipes/plugins-<paths>.json`` (default ``~/.cache/dpipes``; the
directory is created 0700 and refused if another user could write to it), ``<paths>`` a checksum
of ``sys.path``: each installation (a virtual environment, the system's Python) keeps its own
file, so that a daemon and a ``dpipes`` of two installations, started in turn, do not each list
afresh what the other just wrote over; at most ``MAX_CACHE_FILES`` are kept (a write removes the
least recently written beyond, as throwaway virtual environments come and go). One entry per
file, for the last listing; a file that is
unreadable, too big (``MAX_CACHE_BYTES``), malformed or for another installation is ignored and
replaced. Every failure to read or write it falls back to listing, logged at debug level: the
cache never changes the answer, only its cost.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import zlib
from pathlib import Path

from dpipes.bus.private import private_dir

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_ENV",
    "MAX_CACHE_BYTES",
    "MAX_CACHE_FILES",
    "cache_file",
    "installation_stamp",
    "installed_plugin_versions",
]

CACHE_ENV = "XDG_CACHE_HOME"
CACHE_FORMAT = 1  # bumped when the file's layout changes; another layout is a miss
MAX_CACHE_BYTES = 1 << 20  # a plugin list is a few KiB; more is not ours
MAX_CACHE_FILES = 16  # installations remembered; each is one small file


def cache_file() -> Path:
    """Where this installation's plugin list is cached: ``$XDG_CACHE_HOME/dpipes/plugins-<paths>.json``,
    else under ``~/.cache``; ``<paths>`` is a checksum of ``sys.path`` (the working directory for "")."""
    base = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache")
    paths = "\0".join(entry or os.getcwd() for entry in sys.path)
    return Path(base) / "dpipes" / f"plugins-{zlib.crc32(paths.encode(errors='surrogateescape')):08x}.json"


def installation_stamp() -> list[list[object]]:
    """What installing, upgrading or removing a distribution changes, as JSON values: each
    ``sys.path`` entry with its modification time, and the ``*.dist-info`` and ``*.egg-info``
    directories in it with theirs. Equal stamps, equal entry points (see the module docstring);
    :mod:`dpipes.nodes.plugins.registry` keeps its table in a process on the same stamp."""
    state: list[list[object]] = []
    for entry in sys.path:
        distributions: list[list[object]] = []
        try:
            entry = entry or os.getcwd()  # "" is the working directory, which differs between runs
            mtime: int | None = os.stat(entry).st_mtime_ns
            with os.scandir(entry) as children:
                distributions = [
                    [child.name, child.stat().st_mtime_ns]
                    for child in children
                    if child.name.endswith((".dist-info", ".egg-info"))
                ]
        except NotADirectoryError:
            pass  # a zip file: its own time is in the stamp
        except OSError:
            mtime = None  # missing now; its creation changes the stamp
        state.append([entry, mtime, distributions])
    return state


def _read(path: Path, installation: list[list[object]]) -> dict[str, str] | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CACHE_BYTES + 1)
    except OSError as exc:
        log.debug("plugin cache %s not read: %s", path, exc)
        return None
    if len(raw) > MAX_CACHE_BYTES:
        log.debug("plugin cache %s is over %d bytes; ignored", path, MAX_CACHE_BYTES)
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        log.debug("plugin cache %s is not JSON (%s); ignored", path, exc)
        return None
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("installation") != installation:
        return None
    plugins = data.get("plugins")
    if not isinstance(plugins, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in plugins.items()):
        log.debug("plugin cache %s: malformed plugin list; ignored", path)
        return None
    return plugins


def _write(path: Path, installation: list[list[object]], plugins: dict[str, str]) -> None:
    text = json.dumps({"format": CACHE_FORMAT, "installation": installation, "plugins": plugins})
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        private_dir(path.parent, what="plugin cache directory", error=OSError, remedy=f"set {CACHE_ENV}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)  # daemons starting together each write a whole file; the last one stays
        _prune(path.parent)
    except OSError as exc:
        log.debug("plugin cache %s not written: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _prune(directory: Path) -> None:
    """Remove the least recently written installations' files beyond ``MAX_CACHE_FILES``."""
    files = []
    for entry in os.scandir(directory):
        if entry.name.startswith("plugins-") and entry.name.endswith(".json"):
            with contextlib.suppress(OSError):  # removed meanwhile by another process's prune
                files.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.path))
    for _mtime, stale in sorted(files, reverse=True)[MAX_CACHE_FILES:]:
        with contextlib.suppress(OSError):
            os.unlink(stale)


def installed_plugin_versions(path: Path | None = None) -> dict[str, str]:
    """Every installed plugin, name -> its distribution's version, sorted by name; from the cache
    file ``path`` (default :func:`cache_file`) while the installation is unchanged."""
    path = cache_file() if path is None else path
    installation = installation_stamp()
    cached = _read(path, installation)
    if cached is not None:
        return dict(sorted(cached.items()))
    from dpipes.nodes.plugins.registry import installed_plugins  # imports importlib.metadata

    plugins = {name: info.version for name, info in installed_plugins().items()}
    _write(path, installation, plugins)
    return plugins
