"""The entry node of a client: its address checked before anything runs.

A client (``dpipes``, ``run_pipes``) names its entry node as ``HOST:PORT``, ``tcp://HOST:PORT`` or
``ipc://PATH`` (``--node``, ``$DPIPES_NODE``). :func:`parse_entry` checks that text as a command
line is checked: a malformed one is the user's mistake (:class:`EntryAddressError`, a
``ValueError``) and no node is contacted.
"""

from __future__ import annotations

import logging

from dpipes.bus.errors import DpipesError
from dpipes.nodes.config import HostPort

__all__ = [
    "EntryAddressError",
    "parse_entry",
]

log = logging.getLogger(__name__)


class EntryAddressError(DpipesError, ValueError):
    """An entry node's address is malformed; the message says what is wrong and how to write it."""


def parse_entry(text: str) -> str:
    """``HOST:PORT``, ``tcp://HOST:PORT`` or ``ipc://PATH`` -> the endpoint to attach to.

    Raises:
        EntryAddressError: the text is none of these.
    """
    if text.startswith("ipc://"):
        if not text.removeprefix("ipc://"):
            raise EntryAddressError(f"{text!r} names no socket path: write ipc://PATH")
        return text
    try:
        address = HostPort.parse(text.removeprefix("tcp://"))
    except ValueError as exc:
        raise EntryAddressError(f"{exc}; an entry node is HOST:PORT, tcp://HOST:PORT or ipc://PATH") from None
    if address.host == "*":
        raise EntryAddressError(f"{text!r}: '*' is for listening; name the node's host")
    return f"tcp://{address}"
