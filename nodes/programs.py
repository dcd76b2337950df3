"""Why a stage's program cannot be run here, in words a user can act on.

The node resolves a stage's program (``[apps.P].path``, else a path as given, else a search of
``PATH``) and refuses the stage when that finds nothing runnable. "not found" is then only one of
the reasons: a path may name a directory, or a file without execute permission, and ``PATH`` may
hold such entries under the program's name. :func:`describe_missing` tells them apart; it is pure
apart from ``stat``/``access`` calls on the candidate paths.
"""

from __future__ import annotations

import logging
import os
import stat

__all__ = ["describe_missing"]

log = logging.getLogger(__name__)


def describe_missing(
    program: str, resolved: str | None, *, node: str, search_path: str | None = None
) -> str:
    """The refusal text for ``program``, which did not resolve to something runnable on ``node``.

    Args:
        program: the stage's program word, as the user wrote it (``sort``, ``./x``, ``/opt/x``).
        resolved: the path the node tried and found unusable (``[apps.P].path``), or None when
            it searched for ``program`` as given.
        node: the node's name, for the message.
        search_path: the ``PATH`` that was searched (default ``os.environ["PATH"]``).

    Returns:
        ``program 'P' on node N: PATH is a directory, not a program``, ``... is not executable``
        (with its mode and the fix), or ``program 'P' not found on node N (...)``.
    """
    if resolved is not None:
        return _describe_path(program, resolved, node, where="its [apps] path")
    if "/" in program:
        return _describe_path(program, program, node, where="")
    search_path = os.environ.get("PATH", os.defpath) if search_path is None else search_path
    for directory in search_path.split(os.pathsep):
        candidate = os.path.join(directory or ".", program)
        if os.path.lexists(candidate):
            problem = _problem(candidate)
            if problem is not None:
                return f"program {program!r} on node {node}: {candidate} (found in PATH) {problem}"
    return f"program {program!r} not found on node {node} (not in its PATH, nor in [apps])"


def _describe_path(program: str, path: str, node: str, *, where: str) -> str:
    shown = f"{path} ({where})" if where else path
    problem = _problem(path)
    if problem is None:  # it exists and runs: the caller's resolution and ours disagree (a race)
        problem = "could not be resolved"
    if program == path:
        return f"program {program!r} on node {node} {problem}"
    return f"program {program!r} on node {node}: {shown} {problem}"


def _problem(path: str) -> str | None:
    """What keeps ``path`` from being run, or None when nothing does."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {os.readlink(path)})"
        return "does not exist"
    except PermissionError:
        return "cannot be reached: permission denied on a directory of its path"
    except OSError as exc:
        return f"cannot be examined: {exc.strerror or exc}"
    if stat.S_ISDIR(info.st_mode):
        return "is a directory, not a program"
    if not stat.S_ISREG(info.st_mode):
        return "is not a regular file"
    if not os.access(path, os.X_OK):
        mode = stat.filemode(info.st_mode)
        return f"is not executable ({mode}): make it so with chmod +x {path}"
    return None
