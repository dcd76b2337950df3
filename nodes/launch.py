"""How a node's child process is made to die with the node, at the least cost to start it.

A stage never outlives its node: its leader runs with ``PR_SET_PDEATHSIG`` = ``SIGKILL`` (Linux),
so a node that dies hard (``kill -9``) takes its stages with it. Python sets that only from a
``preexec_fn``, and a ``preexec_fn`` makes :mod:`subprocess` ``fork()`` the whole interpreter and
run Python in the child until it execs. Measured in a daemon-sized process (about 35 MiB), that
blocks the node's loop 5-7 ms a start, against about 0.4 ms for the ``vfork()`` subprocess uses
when there is no ``preexec_fn``: most of what the node spends starting ``echo x | cat``.

So when util-linux's ``setpriv`` is here and knows ``--pdeathsig``, the node starts
``setpriv --pdeathsig KILL -- PROG ARGS...`` without a ``preexec_fn``: setpriv sets the same death
signal and execs the program in the same process (same pid, process group and session, the same
descriptors and signal dispositions; the death signal survives the exec). :func:`launcher` says
which words go before the program; None means "use :func:`die_with_parent` as the
``preexec_fn``", as it is when setpriv is missing, and for a program we cannot see as an
executable file from here (a missing program, one not executable, a directory), so that those
start errors stay the ones ``Popen`` raises, naming the program.

One difference, documented rather than hidden: ``die_with_parent`` kills the child at once when
the node died between the fork and the ``prctl`` (the child was already re-parented); setpriv has
no such check, so a node killed within that window (setpriv's start, well under a millisecond)
can leave that one stage running. A node that stops normally terminates every stage's process
group either way (:class:`dpipes.nodes.supervisor.Supervisor`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Mapping

__all__ = ["die_with_parent", "launcher"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_SETPRIV_PROBE_TIMEOUT_S = 5.0

_setpriv: list[str] | None = None  # the words before a program, once probed
_probed = False
_preexec_of: dict[int, Callable[[], None] | None] = {}  # by our pid: the parent it checks for is us


def launcher(program: str, *, env: Mapping[str, str], cwd: str | os.PathLike[str] | None) -> list[str] | None:
    """The words to start before ``program`` so that it dies with this process (``setpriv ... --``),
    or None when the caller must fork it with :func:`die_with_parent` as its ``preexec_fn``."""
    prefix = _setpriv_prefix()
    if prefix is None or not _visible_executable(program, env, cwd):
        return None
    return prefix


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when this process dies (None off Linux).

    It runs in the child between fork and exec, with the interpreter prepared for it
    (``PyOS_AfterFork_Child``); it calls one libc function looked up here, before any fork. A
    parent already gone by then (the child was re-parented) means the child kills itself at once.
    """
    pid = os.getpid()
    if pid not in _preexec_of:
        _preexec_of[pid] = _make_preexec()
    return _preexec_of[pid]


def _make_preexec() -> Callable[[], None] | None:
    if not os.path.exists("/proc/self"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _setpriv_prefix() -> list[str] | None:
    """``[setpriv, --pdeathsig, KILL, --]`` when this host's setpriv has that option, else None
    (asked once per process: util-linux before 2.33 has no ``--pdeathsig``)."""
    global _setpriv, _probed
    if not _probed:
        _probed = True
        path = shutil.which("setpriv", path=os.defpath + ":/usr/sbin:/sbin")
        if path is not None and os.path.exists("/proc/self") and _knows_pdeathsig(path):
            _setpriv = [path, "--pdeathsig", "KILL", "--"]
    return _setpriv


def _knows_pdeathsig(setpriv: str) -> bool:
    try:
        done = subprocess.run(
            [setpriv, "--help"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_SETPRIV_PROBE_TIMEOUT_S,
            env={"PATH": os.defpath, "LC_ALL": "C"},
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and b"--pdeathsig" in done.stdout


def _visible_executable(program: str, env: Mapping[str, str], cwd: str | os.PathLike[str] | None) -> bool:
    """Whether ``program`` is an executable file as the child will look it up (its ``PATH``, or
    relative to ``cwd`` when it has a ``/``)."""
    if "/" not in program:
        return shutil.which(program, path=env.get("PATH", os.defpath)) is not None
    path = os.path.join(os.fspath(cwd) if cwd is not None else os.getcwd(), program)
    return os.path.isfile(path) and os.access(path, os.X_OK)
