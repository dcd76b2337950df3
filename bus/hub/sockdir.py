"""A hub's own socket directory, when it was given no ``ipc://`` path, and the sweep of dead ones.

A hub started without an ``ipc://`` endpoint (an embedded node, a test's, a benchmark's) binds
``bus.sock`` and ``bus-tap.sock`` in a private temporary directory, ``dpipes-hub-XXXXXXXX``
(mode 0700), and removes it when it closes. A process killed with SIGKILL cannot: its directory
stays. So each new one first removes such directories of a dead hub: ours (same owner), older
than ``STALE_AFTER_S`` (a hub starting right now has made its directory but not bound yet), and
whose every socket refuses a connection (``ECONNREFUSED``: nobody listens there, in any network
namespace; ``/proc/net/unix`` would show only this one's). A directory with a socket that
accepts, that cannot be tried, or that holds anything else is left alone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

PREFIX = "dpipes-hub-"
SOCKETS = frozenset({"bus.sock", "bus-tap.sock"})
STALE_AFTER_S = 60.0
PROBE_TIMEOUT_S = 0.2
MAX_SWEPT = 64  # directories removed by one start, at most: the sweep stays cheap


def make() -> tempfile.TemporaryDirectory[str]:
    """A new private socket directory, after removing dead hubs' ones (:func:`sweep`)."""
    with contextlib.suppress(OSError):
        sweep(Path(tempfile.gettempdir()))
    return tempfile.TemporaryDirectory(prefix=PREFIX)


def _dead(path: str) -> bool:
    """Whether the Unix socket ``path`` refuses connections: nobody listens there any more."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT_S)  # a listener with a full backlog would block the connect
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False  # not a socket, not ours to read, too slow to answer...: leave it
    return False  # a live hub: it sees a connection close before its greeting, as from any client


def sweep(where: Path) -> int:
    """Remove dead hubs' socket directories in ``where`` (see the module docstring); how many."""
    removed, now, uid = 0, time.time(), os.getuid()
    with os.scandir(where) as entries:
        for entry in entries:
            if removed >= MAX_SWEPT:
                break
            if not entry.name.startswith(PREFIX) or not entry.is_dir(follow_symlinks=False):
                continue
            info = entry.stat(follow_symlinks=False)
            if info.st_uid != uid or now - info.st_mtime < STALE_AFTER_S:
                continue
            names = set(os.listdir(entry.path))
            if not names <= SOCKETS or not all(_dead(os.path.join(entry.path, name)) for name in names):
                continue
            shutil.rmtree(entry.path, ignore_errors=True)
            removed += 1
    return removed
