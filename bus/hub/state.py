"""What the parts of a hub share: the records of links, clients and senders, and the checks of
addresses and socket options that more than one part makes."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import logging
import math
from typing import Any

import zmq

from dpipes.bus.codec import (
    MAX_FRAME_BYTES,
    MAX_NODE_NAME_CHARS,
)
from dpipes.bus.keys import PublicKey
from dpipes.bus.pump import Pump
from dpipes.bus.zmtp_tcp import TcpDealer

log = logging.getLogger(__name__)

ROUTER_HWM = 100_000  # per-peer queue in messages; credits keep streams far below it


def _valid_node_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NODE_NAME_CHARS and "/" not in name


def _peer_address(frame: Any) -> str:
    """Where a ROUTER frame came from: the remote IP address for TCP, ``local uid N`` for ipc
    (libzmq says ``localhost:UID:GID:PID`` there), "" when libzmq cannot say."""
    try:
        address = str(frame.get("Peer-Address") or "")
    except (zmq.ZMQError, AttributeError):
        return ""
    parts = address.split(":")
    if len(parts) == 4 and parts[0] == "localhost" and parts[1].isdigit():
        return f"local uid {parts[1]}"
    return address


def _over_ipc(frame: Any) -> bool:
    """Whether ``frame`` came over our ``ipc://`` path: its ``Peer-Address`` is not an IP literal
    (a TCP peer's always is; libzmq gives an IPC peer's credentials instead)."""
    try:
        peer = frame.get("Peer-Address")
    except (zmq.ZMQError, AttributeError, TypeError):
        return False
    if not isinstance(peer, str) or not peer:  # unknown: not proven local
        return False
    try:
        ipaddress.ip_address(peer)
    except ValueError:
        return True
    return False


def _set_common(sock: zmq.Socket[Any]) -> None:
    sock.setsockopt(zmq.LINGER, 0)  # nothing may block shutdown; ends of streams are acknowledged
    sock.setsockopt(zmq.SNDHWM, ROUTER_HWM)  # a safety net only: credit bounds stream data
    sock.setsockopt(zmq.RCVHWM, ROUTER_HWM)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # a frame over the limit never gets allocated
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)  # let the kernel notice dead TCP peers too


UNLINKED = "(unlinked)"  # the stats key of every party that is neither a linked peer nor a client


@dataclasses.dataclass
class PeerStats:
    """What a hub counts about one peer (hub link or client)."""

    received: int = 0
    dropped: int = 0  # messages from it the hub did not deliver: bad ones and undeliverable ones
    bad: int = 0  # of those, bad messages (malformed, or breaking a session rule)
    last_error: str = ""
    interval_start: float = -math.inf  # when the current bad-message interval began (monotonic)
    interval_bad: int = 0  # bad messages within the current interval
    errors_heard: int = 0  # ERROR messages this peer addressed to the hub itself
    errors_logged_at: float = -math.inf


@dataclasses.dataclass(frozen=True)
class _Sender:
    """Who sent a message on the ROUTER: a linked peer, an attached client, or neither."""

    key: str  # the stats key: a node name, a client address, or UNLINKED
    ident: bytes
    peer: str = ""  # the node name of a linked peer
    client: _Client | None = None


@dataclasses.dataclass
class _Link:
    """Our outbound DEALER to one peer hub, and what we know of that peer."""

    endpoint: str
    pump: Pump | TcpDealer  # a TcpDealer on hubs without keys (tcp://), else libzmq's DEALER
    static: bool  # configured by the user: keep retrying forever
    node: str = ""
    instance: str = ""
    up: bool = False
    last_heard: float = 0.0
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    endpoints: dict[str, Any] = dataclasses.field(default_factory=dict)
    refused: str = ""
    refused_at: float = 0.0  # when (monotonic) it was refused; a static link retries later
    waiters: list[asyncio.Future[str]] = dataclasses.field(default_factory=list)
    key: PublicKey | None = None  # the peer's CURVE key this link connects with (secure hubs)


@dataclasses.dataclass
class _Client:
    """A party attached to our ROUTER: a local or remote client endpoint."""

    ident: bytes
    addr: str
    last_heard: float
    local: bool = False  # attached over ipc://: a process of this host
    source: str = ""  # the remote address it connected from (``local uid N`` for ipc)
    backlog: collections.deque[list[Any]] = dataclasses.field(default_factory=collections.deque)
    backlog_bytes: int = 0
    user_id: str | None = None  # the ZAP User-Id of its connection (secure hubs): who it is
    shm: bool = False  # on this host: SHM messages go to it as they are, and from us to it
    shm_batch: bool = False  # it takes SHM_BATCH too (else each member goes as an SHM)
    # SHM messages of ours made for it in this loop pass (each the message's header and its lease),
    # sent at the end of the pass, or before anything else we send it (``Hub._to_client``).
    handles: list[tuple[dict[str, Any], dict[str, Any]]] = dataclasses.field(default_factory=list)
    reserved: bool = False  # a name held for a client that has not attached yet (``Hub.reserve``)
    # The streams it sends and has not ended with EOF, as (dst, sid), for a client whose name the
    # hub reserved (a node's plugin worker): cancelled in its name when it goes (``Hub.release``).
    # None: not kept (any other client).
    open_streams: dict[tuple[str, int], None] | None = None


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """A linked peer hub as ``Hub.peers`` shows it."""

    node: str
    instance: str
    endpoint: str
    up: bool
    last_heard_s: float
    info: dict[str, Any]


def advertised(endpoint: str, advertise: str | None) -> str:
    """``tcp://host:port`` as others are told to reach it: the ``advertise`` host if given, else
    the bound host, but ``tcp://*:port`` for a wildcard bind (the peer substitutes the address
    it heard us from)."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    if advertise:
        return f"tcp://{advertise}:{port}"
    return endpoint if host not in ("0.0.0.0", "*", "[::]") else f"tcp://*:{port}"


def any_port(endpoint: str) -> str:
    """``tcp://host:port`` with port 0: another listener on the same host, on any free port."""
    return endpoint.rpartition(":")[0] + ":0"
