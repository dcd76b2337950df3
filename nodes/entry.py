"""A client's entry node: its address checked and probed, a local daemon or an embedded node found.

A client (``dpipes``, ``run_pipes``) names its entry node as ``HOST:PORT``, ``tcp://HOST:PORT`` or
``ipc://PATH`` (``--node``, ``$DPIPES_NODE``). :func:`parse_entry` checks that text as a command
line is checked: a malformed one is the user's mistake (:class:`EntryAddressError`, a
``ValueError``) and no node is contacted.

:func:`probe_entry` then makes one plain socket connection to the address, under
:data:`ENTRY_PROBE_TIMEOUT_S`, before the bus attaches. The bus alone would wait out its attach
timeout and say the same thing whatever went wrong; the probe fails at once and names the cause,
as ssh does: the host name does not resolve, the connection was refused (no node listens there),
nothing answered in time (the host is down or a firewall drops the packets), or the kernel's own
reason (network unreachable, ...). Each is an :class:`EntryUnreachable`, also a
``ConnectionError``. A node whose TCP port accepts the probe sees a connection that closes before
its ZMTP greeting, which ZeroMQ ignores.

:func:`abandoned_local_daemon` explains why a client found no daemon at the host's local socket
although one ran: it crashed or was killed, leaving its socket file behind. :func:`local_daemon`
finds this host's running daemon, :func:`embedded_node` runs a node inside the client when none
runs, and :func:`known_nodes` asks a node whom it knows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from pathlib import Path
from typing import Any

from dpipes.bus.client import Client
from dpipes.bus.errors import BusError, DpipesError
from dpipes.nodes import paths
from dpipes.nodes.config import HostPort
from dpipes.nodes.protocol import CTL, RUN_TIMEOUT_S, ControlError, InfoReply, InfoRequest, NodeEntry, call
from dpipes.nodes.results import RunFailed

__all__ = [
    "ENTRY_PROBE_TIMEOUT_S",
    "EntryAddressError",
    "EntryUnreachable",
    "abandoned_local_daemon",
    "embedded_node",
    "entry_from",
    "known_nodes",
    "local_daemon",
    "parse_entry",
    "probe_entry",
]

log = logging.getLogger(__name__)

# A node on the LAN accepts a TCP connection within milliseconds; a host that is down or a firewall
# that drops the SYN would otherwise hold the user for the kernel's connect timeout (about 2 min).
ENTRY_PROBE_TIMEOUT_S = 3.0


class EntryAddressError(DpipesError, ValueError):
    """An entry node's address is malformed; the message says what is wrong and how to write it."""


class EntryUnreachable(DpipesError, ConnectionError):
    """Nothing answers at the entry node's address; the message names the address and the cause."""


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


def probe_entry(endpoint: str, *, timeout: float = ENTRY_PROBE_TIMEOUT_S) -> None:
    """Connect to ``endpoint`` (as :func:`parse_entry` gives it) once and close; return if it accepts.

    Raises:
        EntryUnreachable: naming the endpoint and the cause.
    """
    if endpoint.startswith("ipc://"):
        family, target, shown = socket.AF_UNIX, endpoint.removeprefix("ipc://"), endpoint
    else:
        address = HostPort.parse(endpoint.removeprefix("tcp://"))
        shown = str(address)
        try:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            reason = f"cannot resolve {address.host!r}: {exc.strerror}"
            raise EntryUnreachable(f"no dpipes node at {shown}: {reason}") from None
        family, _, _, _, target = infos[0]  # type: ignore[assignment]
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.settimeout(timeout)
        probe.connect(target)
    except TimeoutError:
        raise EntryUnreachable(
            f"no dpipes node answers at {shown}: no reply within {timeout:g} s (is the host up? a firewall?)"
        ) from None
    except FileNotFoundError:
        raise EntryUnreachable(f"no dpipes node at {shown}: no such socket") from None
    except ConnectionRefusedError:
        raise EntryUnreachable(f"no dpipes node at {shown}: connection refused (is dpipesd running there?)") from None
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise EntryUnreachable(f"no dpipes node at {shown}: {reason.lower()}") from None
    finally:
        probe.close()
    log.debug("entry node %s accepts connections", shown)


def abandoned_local_daemon(runtime_dir: Path | None = None) -> str | None:
    """Why the host's local socket does not answer although a daemon ran, or None if none ran.

    Call it after finding no daemon there; the text says which daemon left the socket and where its
    log is.
    """
    try:
        where = paths.runtime_dir_path() if runtime_dir is None else runtime_dir
        left = paths.local_leftovers(where)
    except (OSError, DpipesError):
        return None
    if left is None:
        return None
    who = f"node {left.name}" if left.name else "the daemon"
    pid = f" (pid {left.pid})" if left.pid else ""
    logfile = f"; its log: {paths.node_files(where, left.name).log}" if left.name else ""
    return f"{who}{pid} at {left.ipc_endpoint} does not answer: it crashed or was killed{logfile}"


LOCAL_PROBE_TIMEOUT_S = 1.0  # a live local daemon answers ATTACH at once
STATIC_PEER_WAIT_S = 2.0  # an embedded node gives its configured peers this long to link


def entry_from(node: str) -> str:
    """``HOST:PORT`` (or a full ``tcp://`` / ``ipc://`` endpoint) -> the endpoint to attach to."""
    if node.startswith(("tcp://", "ipc://")):
        return node
    host, sep, port = node.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise RunFailed(f"bad node address {node!r}: write HOST:PORT (or tcp://HOST:PORT, ipc://PATH)")
    return f"tcp://{host}:{port}"


async def local_daemon() -> str | None:
    """The ipc endpoint of this host's running daemon, or None when none answers."""
    try:
        endpoint = paths.local_endpoint(paths.runtime_dir())
    except (OSError, DpipesError):
        return None
    # A plain connect says whether a daemon listens there (a dead one leaves its socket file
    # behind: ECONNREFUSED), in a fraction of a millisecond instead of a whole bus attachment.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(LOCAL_PROBE_TIMEOUT_S)
        probe.connect(endpoint.removeprefix("ipc://"))
    except OSError:
        return None
    finally:
        probe.close()
    return endpoint


@contextlib.asynccontextmanager
async def embedded_node() -> Any:
    """A node inside this process for the duration of one command (when no daemon runs)."""
    from dpipes.nodes.config import load_config
    from dpipes.nodes.node import Node

    config = load_config()
    async with Node(config, listen="tcp://127.0.0.1:0", worker_pool=False) as node:  # one command: no workers ahead
        secure = node.security is not None
        peers = [f"tcp://{p.host}:{p.port}" for p in config.nodes.values()]
        if peers:  # with keys, a peer whose key is unknown was logged by the node, and is not linked
            await asyncio.gather(
                *(
                    node.hub.connect_peer(endpoint, timeout=STATIC_PEER_WAIT_S, key=node.static_keys.get(endpoint))
                    for endpoint in peers
                    if not secure or endpoint in node.static_keys
                ),
                return_exceptions=True,
            )
        yield node


async def known_nodes(entry: str) -> list[NodeEntry]:
    """Every node the node at ``entry`` knows (itself first): name, endpoint, programs, source,
    last seen, up.

    Raises:
        RunFailed: nothing answers at ``entry``, or not as a node does.
    """
    try:
        async with Client(entry) as client:
            ep = client.endpoint
            reply: InfoReply = await call(ep, f"{ep.node}/{CTL}", InfoRequest(), timeout=RUN_TIMEOUT_S)
    except ControlError as exc:
        raise RunFailed(f"cannot ask the dpipes node at {entry}: {exc}", code=exc.code) from None
    except BusError as exc:
        raise RunFailed(f"cannot ask the dpipes node at {entry}: {exc}") from None
    return list(reply.nodes)
