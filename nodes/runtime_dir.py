"""Where this host's runtime directory is, and the host's local socket in it.

:mod:`dpipes.nodes.paths` says what lives in the directory and how daemons hold their names there;
this module is the part a client needs to find the host's daemon, kept apart so that the short
path of ``dpipes`` (:mod:`dpipes.nodes.local_wire`) imports no more than that (``paths`` takes
:mod:`typing` for its named tuples, a few milliseconds of a start that lasts tens).

The runtime directory is, in order of precedence:

1. ``$DPIPES_RUNTIME_DIR`` (``dpipesd --runtime-dir DIR`` sets it);
2. ``$XDG_RUNTIME_DIR/dpipes`` when ``XDG_RUNTIME_DIR`` is set (``/run/user/<uid>/dpipes`` on
   systemd hosts: private to the user, emptied at logout and boot);
3. ``/tmp/dpipes-<uid>``.

:func:`runtime_dir` creates it with mode 0700 when it is missing, and refuses one that belongs to
another user or that its group or others can write to: the sockets in it accept commands that run
programs, so nobody else may plant or replace them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from dpipes.bus.errors import DpipesError
from dpipes.bus.private import private_dir

__all__ = ["LOCAL_NAME", "RUNTIME_DIR_ENV", "RuntimeDirError", "local_socket", "runtime_dir", "runtime_dir_path"]

RUNTIME_DIR_ENV = "DPIPES_RUNTIME_DIR"
LOCAL_NAME = "local"  # the host's first daemon also answers at local.sock (dpipes.nodes.paths)


class RuntimeDirError(DpipesError, PermissionError):
    """The runtime directory cannot be used (wrong owner, writable by others, not a directory)."""


def runtime_dir_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where the runtime directory is (see the module docstring), as an absolute path; creates nothing."""
    if environ.get(RUNTIME_DIR_ENV):
        path = Path(environ[RUNTIME_DIR_ENV]).expanduser()
    elif environ.get("XDG_RUNTIME_DIR"):
        path = Path(environ["XDG_RUNTIME_DIR"]) / "dpipes"
    else:
        path = Path("/tmp") / f"dpipes-{os.getuid()}"
    return path.absolute()  # a detached daemon changes directory to /


def runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """The runtime directory (see the module docstring), created with mode 0700 when missing.

    Raises:
        RuntimeDirError: it cannot be created, is not a directory, belongs to another user, or is
            writable by its group or others.
    """
    path = runtime_dir_path(environ)
    # A directory the user chose may be a link; anywhere else (the shared /tmp) a link is a trap
    # someone else set: it would point our sockets into a directory of their choosing.
    return private_dir(
        path,
        what="runtime directory",
        error=RuntimeDirError,
        remedy=f"set {RUNTIME_DIR_ENV} to a directory of your own",
        follow_links=bool(environ.get(RUNTIME_DIR_ENV)),
    )


def local_socket(dir: Path) -> Path:
    """``<dir>/local.sock``: the hub socket of the host's first daemon."""
    return Path(dir) / f"{LOCAL_NAME}.sock"
