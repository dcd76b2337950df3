"""The environment a stage starts from: a clean, documented one, never the daemon's own.

A daemon's environment holds what its operator started it with (tokens, passwords, cloud
credentials); a stage is a caller's program and sees none of it. It gets:

``PATH``
    the daemon's (how the node found the program; ``DEFAULT_PATH`` if it has none);
``HOME``, ``USER``, ``LOGNAME``
    those of the node's user, from the password database (the daemon's own values if it has no
    entry);
``LANG``, ``LANGUAGE``, ``LC_*``, ``TZ``, ``TMPDIR``
    the daemon's, when set: how text, times and temporary files behave, no secrets;
``pass_env`` (configuration)
    each variable named there, when the daemon has it: the operator's explicit choice;
``DPIPES_*``
    what dpipes tells the stage (:meth:`~dpipes.nodes.stages.Stages.start`), ``DPIPES_USER``
    among them: whom it runs for, from the authenticated transport (:func:`user_of`), never
    from a request;
the Pipes bootstrap variables and the client's own ``env`` Pipes option
    (:mod:`dpipes.nodes.pipes_options`, which refuses names that change what runs).

A plugin worker is the node's own Python: it also keeps ``PYTHONPATH``, ``PYTHONHOME`` and
``VIRTUAL_ENV``, so that it finds the plugins installed beside the node.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
from collections.abc import Iterable, Mapping

from dpipes.bus.trust import Identity, IdentityKind

__all__ = ["DEFAULT_PATH", "KEPT", "WORKER_KEPT", "is_variable_name", "stage_environment", "user_of"]

log = logging.getLogger(__name__)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"  # POSIX getconf PATH, plus /usr/local/bin
KEPT = ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR")
"""The daemon's variables every stage gets (with ``LC_*``), when set."""
WORKER_KEPT = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
"""What a plugin worker also keeps: where the node's Python finds its plugins."""
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def is_variable_name(name: str) -> bool:
    return bool(_NAME_RE.fullmatch(name))


def stage_environment(
    pass_env: Iterable[str] = (), *, worker: bool = False, environ: Mapping[str, str] = os.environ
) -> dict[str, str]:
    """The environment a stage starts from (see the module docstring), before dpipes' own variables.

    Args:
        pass_env: the configuration's ``pass_env``: more variables of the daemon's to keep.
        worker: for a plugin worker (keeps :data:`WORKER_KEPT` too).
        environ: the daemon's environment.
    """
    names = [*KEPT, *(WORKER_KEPT if worker else ()), *pass_env]
    env = {name: environ[name] for name in names if name in environ}
    env.update({name: value for name, value in environ.items() if name.startswith("LC_")})
    env.setdefault("PATH", DEFAULT_PATH)
    try:
        me = pwd.getpwuid(os.getuid())
        env.update(HOME=me.pw_dir, USER=me.pw_name, LOGNAME=me.pw_name)
    except KeyError:  # a uid without a passwd entry (containers): what the daemon was given
        env.update({name: environ[name] for name in ("HOME", "USER", "LOGNAME") if name in environ})
    return env


def user_of(identity: Identity) -> str:
    """``DPIPES_USER``: a key's fingerprint; a local user's name (``uid:N`` without a passwd
    entry); "" on a node without keys, where nobody is authenticated."""
    if identity.kind is IdentityKind.KEY:
        return identity.fingerprint
    if identity.kind is IdentityKind.LOCAL_USER and identity.uid is not None:
        try:
            return pwd.getpwuid(identity.uid).pw_name
        except KeyError:
            return f"uid:{identity.uid}"
    return ""
