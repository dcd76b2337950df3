"""Telling a service manager how the daemon is doing: systemd's ``sd_notify`` protocol.

Under a ``Type=notify`` unit, systemd sets ``NOTIFY_SOCKET`` to the address of a Unix datagram
socket and waits for ``READY=1`` before it considers the service started (and starts the units
ordered after it). The protocol, from ``sd_notify(3)``: one datagram of newline-separated
``KEY=VALUE`` assignments (``READY=1``, ``STOPPING=1``, ``STATUS=free text``, ``MAINPID=N``); an
address starting with ``@`` is in the abstract namespace (the ``@`` stands for a NUL byte).

:func:`notify` does nothing when ``NOTIFY_SOCKET`` is unset, so the daemon calls it
unconditionally. A failure to send is logged, never raised: a service manager that went away must
not stop the node.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["NOTIFY_SOCKET_ENV", "notify"]

log = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def notify(environ: Mapping[str, str] | None = None, **fields: str | int) -> bool:
    """Send ``fields`` (``READY=1``, ``STATUS="..."``) to ``$NOTIFY_SOCKET``; whether it was sent.

    ``notify(READY=1, STATUS="listening on ...")`` sends ``READY=1\\nSTATUS=listening on ...``.
    """
    environ = os.environ if environ is None else environ
    address = environ.get(NOTIFY_SOCKET_ENV)
    if not address or not fields:
        return False
    if address[0] not in "/@":
        log.warning("%s=%r is not a Unix socket path or @abstract name; not notifying", NOTIFY_SOCKET_ENV, address)
        return False
    target = "\0" + address[1:] if address[0] == "@" else address
    message = "\n".join(f"{key}={' '.join(str(value).splitlines())}" for key, value in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8", errors="replace"), target)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", address, exc.strerror or exc)
        return False
    return True
