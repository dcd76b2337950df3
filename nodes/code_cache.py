"""The code ``@dataclass`` generates, compiled once and remembered between daemon starts.

For each class, :mod:`dataclasses` writes the source of its ``__init__``, ``__setattr__``,
``__eq__``, ``__repr__``, ... and compiles it with ``exec`` while the module that defines the class
is imported. A daemon imports about 90 dataclasses (codec frames, control messages, discovery
records), about 370 such compilations: 20-30 ms of CPU at every start, half the CPU of dpipes' own
imports, where eight daemons starting at once on two cores wait for each other's CPU
(``dpipes-bench discovery``). The source is the same at every start.

:func:`install` gives the :mod:`dataclasses` module an ``exec`` of its own that looks the source up
in a table of code objects read from the cache file and compiles only what is not there;
:func:`save` writes the table back when something was compiled. What runs is unchanged: the
code is ``compile(source, "<string>", "exec", dont_inherit=True)``, which is what ``exec(source)``
compiles in :mod:`dataclasses` (a module without ``__future__`` imports to pass on). Where a
Python's :mod:`dataclasses` does not call ``exec`` by that name, nothing changes but the speed.

The file: ``$XDG_CACHE_HOME/dpipes/dataclass-code-<interpreter>.marshal`` (default under
``~/.cache``), one per interpreter build (:data:`sys.implementation.cache_tag` and
:data:`sys.hexversion`: stricter than a ``.pyc``'s magic number). It holds code objects, so it is
read only from a directory that belongs to the user and that no one else can write to, and only
when the file is the user's and no one else can write to it either (the trust the user's own
``.pyc`` files get); a file that is missing, too big (``MAX_CACHE_BYTES``), malformed or for
another interpreter is ignored and replaced. Every failure is logged at debug level and costs
only the compilations it would have saved; deleting the file is always safe.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import logging
import marshal
import os
import stat
import sys
from pathlib import Path
from types import CodeType
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["MAX_CACHE_BYTES", "CodeCache", "cache_file", "install", "save"]

CACHE_ENV = "XDG_CACHE_HOME"
CACHE_FORMAT = 1  # bumped when the file's layout changes; another layout is a miss
MAX_CACHE_BYTES = 8 << 20  # a daemon's classes make ~0.4 MiB; more is not ours
MAX_ENTRIES = 4096  # beyond this a save keeps only what its own process used
_INTERPRETER = f"{sys.implementation.cache_tag}-{sys.hexversion:08x}"


def cache_file() -> Path:
    """Where the code is cached: ``$XDG_CACHE_HOME/dpipes/dataclass-code-<interpreter>.marshal``."""
    base = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache")
    return Path(base) / "dpipes" / f"dataclass-code-{_INTERPRETER}.marshal"


def _only_ours(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


class CodeCache:
    """Source text -> compiled code, loaded from and saved to ``path`` (None: neither)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.loaded: dict[str, CodeType] = {}
        self.used: dict[str, CodeType] = {}
        self.compiled = 0  # sources not found in the cache

    def load(self) -> None:
        """Read the file; anything wrong with it leaves the cache empty (and logged at debug level)."""
        if self.path is None:
            return
        try:
            if not _only_ours(self.path.parent.stat()):
                log.debug("dataclass code cache %s: its directory is not private; not read", self.path)
                return
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if not stat.S_ISREG(st.st_mode) or not _only_ours(st):
                    log.debug("dataclass code cache %s: not a private file of ours; not read", self.path)
                    return
                raw = f.read(MAX_CACHE_BYTES + 1)
        except OSError as exc:
            log.debug("dataclass code cache %s not read: %s", self.path, exc)
            return
        if len(raw) > MAX_CACHE_BYTES:
            log.debug("dataclass code cache %s is over %d bytes; ignored", self.path, MAX_CACHE_BYTES)
            return
        try:
            data = marshal.loads(raw)
        except (EOFError, ValueError, TypeError) as exc:
            log.debug("dataclass code cache %s is not marshal data (%s); ignored", self.path, exc)
            return
        if (
            not isinstance(data, tuple)
            or len(data) != 3
            or data[:2] != (CACHE_FORMAT, _INTERPRETER)
            or not isinstance(data[2], dict)
            or not all(isinstance(k, str) and isinstance(v, CodeType) for k, v in data[2].items())
        ):
            log.debug("dataclass code cache %s: another layout or interpreter; ignored", self.path)
            return
        self.loaded = data[2]

    def exec(self, source: Any, globals: Any = None, locals: Any = None, /) -> None:
        """``exec``, with a text ``source`` compiled through the cache."""
        if isinstance(source, str):
            code = self.loaded.get(source)
            if code is None:
                code = compile(source, "<string>", "exec", dont_inherit=True)
                self.compiled += 1
            self.used[source] = code
            source = code
        builtins.exec(source, globals, locals)

    def save(self) -> None:
        """Write the table when something was compiled: what was loaded and what was used."""
        if not self.compiled or self.path is None:
            return
        from dpipes.bus.private import private_dir

        table = {**self.loaded, **self.used}
        if len(table) > MAX_ENTRIES:
            table = dict(self.used)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        try:
            what = "dataclass code cache directory"
            private_dir(self.path.parent, what=what, error=OSError, remedy=f"set {CACHE_ENV}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(marshal.dumps((CACHE_FORMAT, _INTERPRETER, table)))
            os.replace(tmp, self.path)  # daemons starting together each write a whole file; the last one stays
        except OSError as exc:
            log.debug("dataclass code cache %s not written: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return
        self.loaded, self.compiled = table, 0


_installed: CodeCache | None = None


def install(path: Path | None = None) -> CodeCache:
    """Load the cache (``path``, default :func:`cache_file`) and route :mod:`dataclasses`' ``exec``
    through it, once per process; later calls return the cache installed first."""
    global _installed
    if _installed is None:
        if path is None:
            try:
                path = cache_file()
            except RuntimeError as exc:  # no home directory to be found: compile as usual
                log.debug("no dataclass code cache: %s", exc)
                return CodeCache(None)
        cache = CodeCache(path)
        cache.load()
        dataclasses.exec = cache.exec  # type: ignore[attr-defined]  # a module global shadows the builtin
        _installed = cache
    return _installed


def save() -> None:
    """Write the installed cache back if this process compiled anything new (no-op if not installed)."""
    if _installed is not None:
        _installed.save()
