"""A client's entry node: its address checked and probed, a local daemon or an embedded node found.

A client (``dpipes``, ``run_pipes``) names its entry node as ``HOST:PORT``, ``tcp://HOST:PORT`` or
``ipc://PATH`` (``--node``, ``$DPIPES_NODE``), and over TCP optionally which node it expects
there: ``NAME@HOST:PORT``. :func:`parse_entry` checks that text as a command line is checked: a
malformed one is the user's mistake (:class:`EntryAddressError`, a ``ValueError``) and no node is
contacted.

**Keys** (:func:`entry_keys`). Over ``ipc://`` a client needs no key: the node checks its uid.
Over TCP the client speaks CurveZMQ with its own key pair (``client`` in the key directory,
created on first use) and must know the node's public key beforehand, as ssh knows a host's key
from known_hosts: it takes the key pinned in known_nodes for the node's name. The name is the
``NAME@`` given, else the host itself when known_nodes has a node of that name (``--node
beta:5757``, as ssh looks up the host name typed), else the host's first label (``beta.lan``).
A node not pinned is :class:`~dpipes.bus.trust.UnknownNode`, saying which ``dpipes keys pin``
command to run; a node that does not hold its pinned key (the handshake fails without a word) is
:class:`~dpipes.bus.errors.KeyChanged` naming both fingerprints when the node advertises its new
key over mDNS, else :class:`~dpipes.bus.errors.WrongServerKey`. What mDNS says is never trusted
by itself: it is shown, or checked against a pinned fingerprint (a pin by fingerprint alone gets
its key that way, and known_nodes records it). ``insecure`` attaches without keys, for a node
started with ``--insecure``.

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
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpipes.bus.auth import ClientCurve
from dpipes.bus.client import Client
from dpipes.bus.errors import BusError, DpipesError, KeyChanged, WrongServerKey
from dpipes.bus.keyring import Keyring
from dpipes.bus.keys import PublicKey
from dpipes.bus.trust import KnownNodes, UnknownNode
from dpipes.nodes import paths
from dpipes.nodes.config import HostPort
from dpipes.nodes.local_wire import find_local_daemon
from dpipes.nodes.protocol import CTL, RUN_TIMEOUT_S, ControlError, InfoReply, InfoRequest, NodeEntry, call
from dpipes.nodes.results import RunFailed

__all__ = [
    "ENTRY_PROBE_TIMEOUT_S",
    "EntryAddressError",
    "EntryKeys",
    "EntryUnreachable",
    "KeyLookup",
    "abandoned_local_daemon",
    "attach",
    "embedded_node",
    "entry_and_keys",
    "entry_from",
    "entry_keys",
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


_NODE_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # as known_nodes names a node


def split_entry(text: str) -> tuple[str, str]:
    """``NAME@HOST:PORT`` -> ``(NAME, HOST:PORT)``; any other form -> ``("", text)``.

    Raises:
        EntryAddressError: ``NAME`` is not a node name.
    """
    if text.startswith("ipc://") or "@" not in text:
        return "", text
    name, _, rest = text.partition("@")
    if not _NODE_NAME_RE.fullmatch(name):
        raise EntryAddressError(f"{text!r}: {name!r} is not a node name; write NAME@HOST:PORT")
    return name, rest


def parse_entry(text: str) -> str:
    """``[NAME@]HOST:PORT``, ``[NAME@]tcp://HOST:PORT`` or ``ipc://PATH`` -> the endpoint to attach to.

    Raises:
        EntryAddressError: the text is none of these.
    """
    text = split_entry(text)[1]
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


KeyLookup = Callable[[str], Awaitable[PublicKey | None]]
"""``async lookup(node)``: the key node ``node`` advertises, or None (mDNS by default)."""

OWN_NODE_KEY = "your own node key"  # EntryKeys.pinned_at of a node expected to be one of this user's daemons


@dataclass(frozen=True, slots=True)
class EntryKeys:
    """What a client needs to attach to a node over TCP: the node's name, and the CURVE keys."""

    node: str
    curve: ClientCurve
    pinned_at: str = ""
    """Where the node's key was pinned (``known_nodes:LINE``), for messages."""


def _entry_node_name(text: str, endpoint: str, known: KnownNodes) -> str:
    """The name of the node a client expects at ``endpoint`` (see *Keys*)."""
    name, _ = split_entry(text)
    if name:
        return name
    host = endpoint.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    for candidate in (host, host.split(".")[0]):
        if candidate in known.entries:
            return candidate
    pinned = ", ".join(sorted(known.entries)) or "none yet"
    raise UnknownNode(
        f"dpipes does not know which node listens at {endpoint.removeprefix('tcp://')}, so not which key to "
        f"expect there: name it, --node NAME@{endpoint.removeprefix('tcp://')}, NAME as pinned in "
        f"{known.path or 'known_nodes'} (pinned: {pinned}); or, for a node started with --insecure, add --insecure"
    )


async def entry_keys(
    text: str, endpoint: str, *, keyring: Keyring | None = None, lookup: KeyLookup | None = None
) -> tuple[EntryKeys, bool]:
    """The keys to attach to the TCP node ``endpoint`` that ``text`` (``--node``) named; and whether
    this user's client key pair was created just now.

    Args:
        lookup: ``async (node) -> PublicKey | None``, what the node advertises (default: mDNS).

    Raises:
        UnknownNode: no node name to expect there, or that node is not pinned (the message says
            which ``dpipes keys pin`` to run).
        KeyFileError: the key directory or the client pair cannot be used.
    """
    ring = keyring or Keyring()
    known = ring.known()
    try:
        name = _entry_node_name(text, endpoint, known)
    except UnknownNode:
        own = ring.node()
        if own is None:
            raise
        # No name to look up: expect one of this user's own daemons, which share its node key
        # (they trust each other, and this user's client, by it). Anyone else fails the handshake.
        client, created = ring.client()
        return EntryKeys(endpoint.removeprefix("tcp://"), ClientCurve(client, own.public), OWN_NODE_KEY), created
    entry = known.entries.get(name)
    if entry is None or entry.key is None:
        advertised = await _advertised(name, lookup)
        if entry is not None and advertised is not None:
            entry = known.check(name, advertised)  # a pin by fingerprint learns its key; KeyChanged if not its
        if entry is None or entry.key is None:
            raise UnknownNode(_not_pinned(name, endpoint, entry is not None, advertised))
    client, created = ring.client()
    return EntryKeys(name, ClientCurve(client, entry.key), entry.where), created


def _not_pinned(name: str, endpoint: str, by_fingerprint: bool, advertised: PublicKey | None) -> str:
    where = endpoint.removeprefix("tcp://")
    head = (
        f"node {name} ({where}) is pinned by fingerprint only, and dpipes needs its key"
        if by_fingerprint
        else f"node {name} ({where}) is not a known node: dpipes needs its key to connect"
    )
    if advertised is not None:
        return (
            f"{head}. It advertises key {advertised.fingerprint} on the LAN; if that is the fingerprint "
            f"'dpipes keys' shows on {name}, pin it: dpipes keys pin {name} '{advertised.z85}'"
        )
    return (
        f"{head}: pin it with: dpipes keys pin {name} KEY, KEY as dpipesd printed it when {name} started "
        f"('dpipes keys' on {name} shows it); or, for a node started with --insecure, add --insecure"
    )


async def _advertised(name: str, lookup: KeyLookup | None) -> PublicKey | None:
    if lookup is None:
        from dpipes.discovery.mdns import advertised_key

        return await advertised_key(name)
    return await lookup(name)


async def attach(entry: str, keys: EntryKeys | None = None, *, lookup: KeyLookup | None = None) -> Client:
    """A started client attached to the node at ``entry`` (with ``keys`` over TCP); the caller closes it.

    Raises:
        KeyChanged: the node does not hold its pinned key and advertises another (both named).
        WrongServerKey: it does not hold its pinned key, and advertises none.
        BusError: other failures to attach (refused client key, nothing answers, ...).
    """
    client = Client(entry, curve=keys.curve if keys is not None else None)
    try:
        await client.start()
    except WrongServerKey as exc:
        assert keys is not None
        advertised = await _advertised(keys.node, lookup)
        pinned = keys.curve.server_key
        where = f" ({keys.pinned_at})" if keys.pinned_at else ""
        if advertised is not None and advertised != pinned:
            raise KeyChanged(
                f"node {keys.node} at {entry.removeprefix('tcp://')} presents key {advertised.fingerprint}, but it "
                f"is pinned to {pinned.fingerprint}{where}: REFUSED. Someone may be impersonating {keys.node}, or "
                f"its key was replaced. If you know it was replaced, check the new fingerprint on {keys.node} "
                f"itself ('dpipes keys'), then: dpipes keys pin {keys.node} '{advertised.z85}'"
            ) from None
        if keys.pinned_at == OWN_NODE_KEY:
            raise UnknownNode(
                f"the node at {keys.node} is not one of your own daemons (which hold {pinned.fingerprint}), and "
                f"dpipes does not know which node it is: pin its key and name it, --node NAME@{keys.node}; "
                "or, for a node started with --insecure, add --insecure"
            ) from None
        raise WrongServerKey(
            f"{exc}. Node {keys.node} is pinned to {pinned.fingerprint}{where}; check 'dpipes keys' on "
            f"{keys.node} and, if its key was replaced, pin the new one: dpipes keys pin {keys.node} KEY"
        ) from None
    return client


async def entry_and_keys(text: str, *, insecure: bool = False) -> tuple[str, EntryKeys | None]:
    """The endpoint ``text`` (``--node``) names, and the keys to attach there with (None over ipc,
    or with ``insecure``). A client pair created just now is logged as a warning (said once).

    Raises:
        EntryAddressError: ``text`` is malformed.
        UnknownNode, KeyFileError: as for :func:`entry_keys`.
    """
    endpoint = parse_entry(text)
    if endpoint.startswith("ipc://") or insecure:
        return endpoint, None
    keys, created = await entry_keys(text, endpoint)
    if created:
        log.warning(
            "created your client key pair %s in %s", keys.curve.keypair.fingerprint, keys.curve.keypair.path.parent
        )
    return endpoint, keys


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
    return find_local_daemon()


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


async def known_nodes(entry: str, keys: EntryKeys | None = None) -> list[NodeEntry]:
    """Every node the node at ``entry`` knows (itself first): name, endpoint, programs, source,
    last seen, up. ``keys``: to attach over TCP with CURVE (:func:`entry_keys`).

    Raises:
        SecurityError: the node's key is not the pinned one, or it refused our key.
        RunFailed: nothing answers at ``entry``, or not as a node does.
    """
    try:
        client = await attach(entry, keys)
        try:
            ep = client.endpoint
            reply: InfoReply = await call(ep, f"{ep.node}/{CTL}", InfoRequest(), timeout=RUN_TIMEOUT_S)
        finally:
            await client.aclose()
    except ControlError as exc:
        raise RunFailed(f"cannot ask the dpipes node at {entry}: {exc}", code=exc.code) from None
    except BusError as exc:
        raise RunFailed(f"cannot ask the dpipes node at {entry}: {exc}") from None
    return list(reply.nodes)
