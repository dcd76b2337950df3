"""The Hub: one node's sockets, links to peer hubs, routing, heartbeats and the tap mirror.

Sockets (all created from the one ``zmq.Context`` the hub owns, all closed in ``aclose``):

* a ROUTER bound on TCP (for peer hubs and remote clients) and on ``ipc://`` (local clients);
* one outbound DEALER per peer hub (a *link*), as in Zyre: a hub always sends to a peer through
  its own DEALER, so a full peer blocks that link only, and ZeroMQ never drops on it;
* an XPUB tap mirror that publishes one small event per routed message while, and only while,
  someone is subscribed (the events are specified in :mod:`dpipes.bus.tap`).

Routing is direct: ``node/endpoint`` is delivered locally when ``node`` is this hub, sent on the
link to ``node`` otherwise; a message for a node we have no link to, or for an endpoint that does
not exist, comes back to its sender as an ``ERROR``. A hub never relays between two other nodes.

**Security.** Given ``security`` (:class:`~dpipes.bus.auth.HubSecurity`: the node's key pair and
its trust store), the ROUTER is a CurveZMQ server on TCP and NULL on ``ipc://``, both behind
pyzmq's asyncio ZAP handler (:class:`~dpipes.bus.auth.Gatekeeper`): a TCP peer must hold a key
the trust store admits, an ``ipc://`` peer must run as the daemon's own uid. Links are CURVE
clients that need the peer's key (``add_peer(endpoint, key=...)``); a HELLO or WELCOME whose node
name is not the one its key is pinned to (known_nodes) is refused, naming the node and both
fingerprints. Every message from a client or peer must carry the ZAP ``User-Id`` its connection
was admitted with (a connection that took over another's routing id is dropped and counted), and
:meth:`Hub.identity_of` tells the node who is behind a bus address. Without ``security`` the hub
speaks plain ZMTP (loopback tests, ``--insecure``) and everyone is ``INSECURE``.

Node identity: one name, one live instance. A ``HELLO`` (or a ``WELCOME``) whose node name is
linked with another instance that we heard from within ``TAKEOVER_SILENCE_S`` is refused with
``BYE`` naming both instances and where each is, and logged (once per name per interval); the
running link is not touched, so a forged ``HELLO`` cannot take down a transfer and two honest
nodes with one name do not flap: the second is refused. A restarted node (same name, a new
instance, the old one silent because it died) takes over as soon as the old instance has been
silent ``TAKEOVER_SILENCE_S``: its own retries (a refused static link says ``HELLO`` again every
``REFUSED_RETRY_S``) or ours, when the old link is lost, link it. This holds without keys; keys
(CURVE) decide who may use a name at all.

What a hub does with bad messages, idle clients and at shutdown is part of the wire spec
(:mod:`dpipes.bus.codec`, *Sessions* and *Bad messages*). Everything read off a socket is checked
at the ROUTER or link boundary; names and reasons from the wire are logged with ``%r`` so that a
newline in them cannot forge a log line.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import ipaddress
import logging
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from dpipes.bus import codec, shm
from dpipes.bus.auth import TAP_ZAP_DOMAIN, ZAP_DOMAIN, Gatekeeper, HubSecurity, identity_from_user_id
from dpipes.bus.codec import (
    BAD_MESSAGE_INTERVAL_S,
    BYE_LINGER_MS,
    CLIENT_TIMEOUT_S,
    CLOSE_DRAIN_S,
    HEARTBEAT_INTERVAL_S,
    MAX_BAD_MESSAGES,
    MAX_FRAME_BYTES,
    MAX_NODE_NAME_CHARS,
    MAX_STRING_CHARS,
    PEER_TIMEOUT_S,
    Message,
)
from dpipes.bus.endpoint import MAX_IN_STREAMS, Endpoint
from dpipes.bus.errors import BusError, DecodeError, PeerLost, ProtocolMismatch, RequestTimeout, SecurityError
from dpipes.bus.keys import PublicKey
from dpipes.bus.pump import Pump, send_frames
from dpipes.bus.tap import TAP_HWM, Mirror
from dpipes.bus.trust import INSECURE, Identity

log = logging.getLogger(__name__)

CLIENT_BACKLOG_MESSAGES = 100_000  # messages held for a client whose pipe is full; more detaches it
CLIENT_BACKLOG_BYTES = 64 * 1024 * 1024  # ...or payload bytes held so: a client that does not read is detached
MAX_CLIENTS = 512  # clients attached at once; one more ATTACH is refused
MAX_CLIENTS_PER_ADDRESS = 128  # of those, from one remote address or, over ipc, one local user
# A HELLO (or WELCOME) naming a linked node with another instance replaces that link only if the
# linked instance has been silent this long: a live node PINGs every HEARTBEAT_INTERVAL_S, so this
# is four missed heartbeats; it is under PEER_TIMEOUT_S, so a restarted node takes over before
# its old incarnation is even declared lost.
TAKEOVER_SILENCE_S = 4 * HEARTBEAT_INTERVAL_S
REFUSED_RETRY_S = 2 * PEER_TIMEOUT_S  # a static link that was refused says HELLO again this often
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
    pump: Pump
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
    reserved: bool = False  # a name held for a client that has not attached yet (``Hub.reserve``)


@dataclasses.dataclass(frozen=True)
class PeerInfo:
    """A linked peer hub as ``Hub.peers`` shows it."""

    node: str
    instance: str
    endpoint: str
    up: bool
    last_heard_s: float
    info: dict[str, Any]


class Hub:
    """One node of the bus.

    Args:
        node: this node's name, unique on the bus.
        tcp: where the ROUTER listens for peers and remote clients (port 0: any free port), or
            None for no TCP.
        ipc: the ``ipc://`` path for local parties; None makes one in a private temp directory.
        tap: where the tap XPUB listens; None: an ``ipc://`` path beside ``ipc``.
        advertise: the host to tell peers, when ``tcp`` binds a wildcard address.
        info: what this node tells peers about itself in HELLO (programs, version, ...).
        max_clients: clients attached at once; ``ATTACH`` beyond it is refused.
        max_clients_per_address: of those, from one remote address or one local user (ipc).
        client_backlog_bytes: bytes held for a client that does not read, beyond which (or
            beyond ``CLIENT_BACKLOG_MESSAGES`` messages) it is detached with ``BYE``.
        security: CurveZMQ keys and trust (see *Security* in the module docstring); None: no
            keys, for loopback tests and ``--insecure`` nodes.
    """

    def __init__(
        self,
        node: str,
        *,
        tcp: str | None = "tcp://127.0.0.1:0",
        ipc: str | None = None,
        tap: str | None = None,
        advertise: str | None = None,
        info: dict[str, Any] | None = None,
        max_clients: int = MAX_CLIENTS,
        max_clients_per_address: int = MAX_CLIENTS_PER_ADDRESS,
        client_backlog_bytes: int = CLIENT_BACKLOG_BYTES,
        security: HubSecurity | None = None,
    ) -> None:
        if not _valid_node_name(node):
            raise ValueError(f"invalid node name {node!r:.80}: use 1-{MAX_NODE_NAME_CHARS} characters without '/'")
        self.node = node
        self.instance = uuid.uuid4().hex
        self.info = dict(info or {})
        self._want_tcp = tcp
        self._want_ipc = ipc
        self._want_tap = tap
        self._advertise = advertise
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._router: Pump | None = None
        self._tap: Pump | None = None
        self._tap_topics: set[bytes] = set()
        self.tcp_endpoint = ""
        self.ipc_endpoint = ""
        self.tap_endpoint = ""
        self._links: dict[str, _Link] = {}  # by endpoint we connect to
        self._by_node: dict[str, _Link] = {}  # up links by node name
        self._peer_idents: dict[bytes, tuple[str, str]] = {}  # a peer's DEALER identity -> (node, instance)
        self._clients: dict[bytes, _Client] = {}
        self._local: dict[str, Endpoint | _Client] = {}  # endpoint name -> party
        self.stats: dict[str, PeerStats] = collections.defaultdict(PeerStats)
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._client_ids = 0
        self._clash_logged_at: dict[str, float] = {}  # node name -> when a clash on it was last logged
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.link_listeners: list[Callable[[str, bool, str], None]] = []  # (node, up, reason)
        self.client_listeners: list[Callable[[str], None]] = []  # (address) of a client that left
        self._transport = _InProcess(self)
        self.max_clients = max_clients
        self.max_clients_per_address = max_clients_per_address
        self.client_backlog_bytes = client_backlog_bytes
        self._security = security
        self._gate: Gatekeeper | None = None
        self._peer_user_ids: dict[bytes, str | None] = {}  # a peer's DEALER identity -> its ZAP User-Id
        self._host_id = shm.host_id()
        self._pool: shm.Pool | None = None  # made when a same-host client first gets a large payload
        self._reader = shm.Reader(self._free_later)
        self._frees: dict[str, list[int]] = {}  # leases our endpoints have done with, by sender
        self._frees_scheduled = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind every socket and start heartbeats; returns when the hub accepts connections."""
        self._loop = asyncio.get_running_loop()
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        _set_common(router)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable send raises instead of vanishing
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a reconnecting client with its old id takes over
        tap_sock = self._ctx.socket(zmq.XPUB)
        tap_sock.setsockopt(zmq.LINGER, 0)
        tap_sock.setsockopt(zmq.SNDHWM, TAP_HWM)  # a slow tap loses events, never slows the bus
        if self._security is not None:
            self._gate = Gatekeeper(self._ctx, self._security, node=self.node)
            self._gate.start()  # binds the context's ZAP endpoint: before any socket binds
            router.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)  # ZAP for every connection, NULL (ipc) too
            tap_sock.setsockopt(zmq.ZAP_DOMAIN, TAP_ZAP_DOMAIN)  # a key needs the tap right here
        try:
            if self._want_tcp:
                self._bind(router, self._want_tcp)
                self.tcp_endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
            ipc = self._want_ipc
            if ipc is None:
                self._tmpdir = tempfile.TemporaryDirectory(prefix="dpipes-hub-")
                ipc = f"ipc://{self._tmpdir.name}/bus.sock"
            self._bind(router, ipc)
            self.ipc_endpoint = ipc
            tap = self._want_tap or ipc.rsplit(".sock", 1)[0] + "-tap.sock"
            self._bind(tap_sock, tap)
            self.tap_endpoint = tap_sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            router.close(0)
            tap_sock.close(0)
            if self._gate is not None:
                self._gate.stop()
            self._ctx.term()
            raise BusError(f"node {self.node}: cannot listen: {exc}") from exc
        self._router = Pump(router, self._on_router)
        self._tap = Pump(tap_sock, self._on_tap_subscription)
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name=f"hub {self.node} heartbeats")
        log.info("node %s listening on %s %s (tap %s)", self.node, self.tcp_endpoint, self.ipc_endpoint, tap)

    def _bind(self, sock: zmq.Socket[Any], endpoint: str) -> None:
        """Bind ``sock``: as a CURVE server on TCP when the hub has keys; ``ipc://`` stays NULL,
        its peers checked by uid in ZAP. libzmq takes the mechanism of each bind from the socket's
        options at bind time, so one socket serves both."""
        if self._security is not None:
            tcp = endpoint.startswith("tcp://")
            if tcp:
                pair = self._security.keypair
                sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret_z85.encode("ascii"))
                sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.z85.encode("ascii"))
            sock.setsockopt(zmq.CURVE_SERVER, 1 if tcp else 0)  # 0: back to the NULL mechanism
        sock.bind(endpoint)

    @property
    def secure(self) -> bool:
        """Whether this hub has keys (CURVE on TCP, peer uids checked on ``ipc://``)."""
        return self._security is not None

    @property
    def public_key(self) -> PublicKey | None:
        """This node's CURVE public key (what discovery advertises), or None without keys."""
        return self._security.keypair.public if self._security is not None else None

    def identity_of(self, addr: str) -> Identity | None:
        """Who is behind bus address ``addr``, as the transport established it.

        For a client attached here: its key (``Identity.key``) or, over ``ipc://``, its uid
        (``Identity.local_user``); for an in-process endpoint: this daemon's own user; for an
        address on a linked peer node: that node's key (``Identity.peer_node``). Without keys
        every caller is :data:`~dpipes.bus.trust.INSECURE`. None for an address nobody holds.
        """
        node, name = codec.split_addr(addr)
        if self._security is None:
            return INSECURE
        if node == self.node:
            party = self._local.get(name)
            if isinstance(party, Endpoint):
                return Identity.local_user(os.getuid())
            return identity_from_user_id(party.user_id) if party is not None else None
        link = self._by_node.get(node)
        if link is None or not link.up:
            return None
        if link.key is not None:
            return Identity.peer_node(node, link.key.fingerprint)
        return None

    async def aclose(self) -> None:
        """Say BYE to peers and clients, drain queued messages under a bound, close every socket. Idempotent."""
        if self._closed or self._ctx is None:
            return
        self._closed = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            try:
                await self._heartbeat_task
            except asyncio.CancelledError:
                pass
        for link in self._links.values():
            if link.up:
                self._link_send(link, codec.Bye(src=f"{self.node}/", dst=f"{link.node}/", reason="node stopping"))
        for client in list(self._clients.values()):
            self._router_send(client.ident, self._bye_to(client, f"node {self.node} is stopping"))
        try:
            await asyncio.wait_for(self._drain_all(), CLOSE_DRAIN_S)
        except TimeoutError:
            log.warning("node %s: closing with undelivered messages after %.1f s", self.node, CLOSE_DRAIN_S)
        error = BusError(f"node {self.node} closed")
        for party in list(self._local.values()):
            if isinstance(party, Endpoint):
                party.fail_all(error)
        for link in self._links.values():
            for waiter in link.waiters:
                if not waiter.done():
                    waiter.set_exception(error)
            link.pump.close(linger_ms=BYE_LINGER_MS)
        if self._tap is not None:
            self._tap.close()
        if self._router is not None:
            self._router.close(linger_ms=BYE_LINGER_MS)  # the clients' BYEs are queued there
        if self._gate is not None:
            self._gate.stop()
        self._ctx.term()
        if self._pool is not None:
            self._pool.close()
        self._reader.close()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()

    async def _drain_all(self) -> None:
        for link in list(self._links.values()):
            await link.pump.drained()

    # -- endpoints -----------------------------------------------------------------------------

    def endpoint(
        self, name: str, *, window: int = codec.INITIAL_CREDIT_BYTES, max_streams: int = MAX_IN_STREAMS
    ) -> Endpoint:
        """An in-process endpoint ``node/name`` on this hub (``window`` and ``max_streams``: see
        :class:`~dpipes.bus.endpoint.Endpoint`; they bound what senders can make it hold)."""
        if not name or "/" in name or len(name) > codec.MAX_ENDPOINT_NAME_CHARS:
            raise ValueError(
                f"invalid endpoint name {name!r:.80}: use 1-{codec.MAX_ENDPOINT_NAME_CHARS} characters without '/'"
            )
        if name in self._local:
            raise BusError(f"endpoint {self.node}/{name} already exists")
        ep = Endpoint(
            f"{self.node}/{name}", self._transport, window=window, max_streams=max_streams, on_close=self._forget
        )
        self._local[name] = ep
        return ep

    def reserve(self, name: str) -> str:
        """Hold the name ``node/name`` for a client that will ATTACH with it (a plugin worker the
        node is about to fork); its address.

        Until that client attaches, messages to the name wait here, in order, within
        ``CLIENT_BACKLOG_MESSAGES`` (what a sender may send before the client grants credit is the
        protocol's initial credit per stream, so this bounds nothing new); then they go to it. The
        first ATTACH naming it over the hub's ``ipc://`` path takes it (a process of this host,
        whose uid the hub checks); one over TCP is refused as for a name that is taken.
        """
        if not name or "/" in name:
            raise ValueError(f"invalid endpoint name {name!r}")
        if name in self._local:
            raise BusError(f"endpoint {self.node}/{name} already exists")
        self._local[name] = _Client(ident=b"", addr=f"{self.node}/{name}", last_heard=time.monotonic(), reserved=True)
        return f"{self.node}/{name}"

    def release(self, name: str) -> None:
        """Drop ``node/name``: a reservation nobody claimed, or the client attached under it (it
        is gone: what it still had queued here is dropped). Idempotent."""
        party = self._local.get(name)
        if isinstance(party, _Client):
            held, party.backlog, party.backlog_bytes = list(party.backlog), collections.deque(), 0
            if party.reserved:
                del self._local[name]
            else:
                self._detach(party)
            for frames in held:  # never delivered: their senders learn it, as for a name that is gone
                try:
                    header = codec.decode_header(frames[0])
                except DecodeError:
                    continue
                self._bounce(header, "no-endpoint", f"endpoint {name!r} on node {self.node} is gone")

    def client_is_local(self, addr: str) -> bool:
        """Whether the client at ``addr`` attached over our ``ipc://`` path, so runs on this host.

        The kernel says so, not the client: only a process of this host can connect to a Unix
        socket, and ZeroMQ reports a TCP peer's address as an IP literal, an IPC peer's otherwise.
        """
        party = self._local.get(codec.split_addr(addr)[1]) if codec.split_addr(addr)[0] == self.node else None
        return isinstance(party, _Client) and party.local

    def _forget(self, ep: Endpoint) -> None:
        name = codec.split_addr(ep.addr)[1]
        if self._local.get(name) is ep:
            del self._local[name]

    # -- peers ---------------------------------------------------------------------------------

    @property
    def peers(self) -> dict[str, PeerInfo]:
        """Every peer hub currently linked, by node name."""
        now = time.monotonic()
        return {
            link.node: PeerInfo(link.node, link.instance, link.endpoint, link.up, now - link.last_heard, link.info)
            for link in self._by_node.values()
        }

    def add_peer(self, endpoint: str, *, key: PublicKey | None = None) -> None:
        """Link to the hub at ``endpoint`` (``tcp://host:port``) and keep retrying while it is away.

        A hub with keys needs the peer's public ``key`` (from known_nodes or discovery).
        """
        self._ensure_link(endpoint, static=True, key=key)

    def learn_peer(self, endpoint: str, *, key: PublicKey | None = None) -> None:
        """Link to a hub we heard of (from gossip); forgotten again if it is lost."""
        self._ensure_link(endpoint, static=False, key=key)

    def drop_peer(self, endpoint: str, reason: str = "dropped on request") -> bool:
        """Close our link to ``endpoint``: one that is not up, or a learned one that is (its node is
        then lost to our endpoints, as on a missed heartbeat). A static link that is up stays: the
        operator asked for it. Whether a link was closed."""
        link = self._links.get(endpoint)
        if link is None or (link.up and link.static):
            return False
        if link.up:
            self._link_send(link, codec.Bye(src=f"{self.node}/", dst=f"{link.node}/", reason=reason[:MAX_STRING_CHARS]))
            self._link_down(link, reason)
        error = BusError(f"node {self.node}: link to {endpoint} dropped: {reason}")
        for waiter in link.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        link.waiters.clear()
        self._drop_link(link)
        log.debug("node %s: dropped the link to %s: %s", self.node, endpoint, reason)
        return True

    async def connect_peer(self, endpoint: str, *, timeout: float = 10.0, key: PublicKey | None = None) -> str:
        """Link to the hub at ``endpoint`` and return its node name once the link is up.

        Raises:
            ProtocolMismatch: the peer refused our HELLO (another protocol version, a name clash),
                or (with keys) it is not the node its key is pinned to.
            RequestTimeout: the peer did not answer within ``timeout`` (with keys: also a peer
                whose key is not ``key``, or that does not trust ours: CURVE fails silently).
            SecurityError: this hub has keys and ``key`` is None.
        """
        link = self._ensure_link(endpoint, static=True, key=key)
        if link.up:
            return link.node
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        link.waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise RequestTimeout(f"node {self.node}: no answer from {endpoint} within {timeout:g} s") from None

    def _ensure_link(self, endpoint: str, *, static: bool, key: PublicKey | None = None) -> _Link:
        link = self._links.get(endpoint)
        if link is not None:
            link.static = link.static or static
            if link.refused:
                link.refused = ""
                self._hello(link)
            return link
        assert self._ctx is not None, "hub not started"
        if self._security is not None and key is None:
            raise SecurityError(
                f"node {self.node}: cannot link to {endpoint} securely: its node key is unknown; "
                "pin it with: dpipes keys pin NODE KEY"
            )
        sock = self._ctx.socket(zmq.DEALER)
        _set_common(sock)
        if self._security is not None and key is not None:
            pair = self._security.keypair  # our node key: the peer's gatekeeper knows it from its known_nodes
            sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret_z85.encode("ascii"))
            sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.z85.encode("ascii"))
            sock.setsockopt(zmq.CURVE_SERVERKEY, key.z85.encode("ascii"))
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: a HELLO to a dead peer fails fast
        sock.setsockopt(zmq.RECONNECT_IVL, 100)  # a restarted peer is back within a heartbeat
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.ROUTING_ID, b"hub:" + self.instance.encode() + b":" + os.urandom(4).hex().encode())
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close(0)
            raise
        link = _Link(endpoint=endpoint, pump=Pump(sock, lambda frames: None), static=static, key=key)
        link.pump.on_message = functools.partial(self._on_link_reply, link)
        self._links[endpoint] = link
        self._hello(link)
        return link

    def _hello(self, link: _Link) -> None:
        endpoints = {"bus": self.advertised_endpoint, "tap": self.tap_endpoint}
        self._link_send(
            link,
            codec.Hello(
                src=f"{self.node}/", dst="", node=self.node, instance=self.instance, endpoints=endpoints, info=self.info
            ),
        )

    @property
    def advertised_endpoint(self) -> str:
        """The tcp endpoint peers are told to reach this hub at (the ``advertise`` host if given)."""
        host_port = self.tcp_endpoint.removeprefix("tcp://")
        host, _, port = host_port.rpartition(":")
        if self._advertise:
            return f"tcp://{self._advertise}:{port}"
        return self.tcp_endpoint if host not in ("0.0.0.0", "*", "[::]") else f"tcp://*:{port}"

    def _link_send(self, link: _Link, msg: Message) -> None:
        try:
            link.pump.send(codec.encode(msg))
        except zmq.ZMQError as exc:
            log.debug("node %s: send to %s failed: %s", self.node, link.endpoint, exc)

    def _on_link_reply(self, link: _Link, frames: list[Any]) -> None:
        """Messages on our DEALER: the peer's answers to HELLO, its goodbyes, its errors."""
        try:
            msg = codec.decode([f.buffer for f in frames])
        except codec.VersionMismatch as exc:
            reason = exc.header.get("reason") if isinstance(exc.header.get("reason"), str) else ""
            self._refused(
                link,
                f"it speaks protocol version {exc.version!r:.20}, we speak {codec.PROTOCOL_VERSION}"
                + (f" ({reason:.200})" if reason else ""),
            )
            return
        except DecodeError as exc:
            # Nobody to answer: this is the peer answering us. Counted, logged, dropped.
            self._note_bad(self.stats[link.node or link.endpoint], link.node or link.endpoint, exc)
            return
        if isinstance(msg, codec.Welcome):
            if not _valid_node_name(msg.node):
                self._refused(link, f"it calls itself {msg.node!r:.80}, which is not a node name")
            elif (problem := self._key_problem(msg.node, link.key)) is not None:
                self._refused(link, problem)
            else:
                if msg.info:  # what it offers, known before the link counts as up
                    link.info = msg.info
                self._link_up(link, msg.node, msg.instance)
        elif isinstance(msg, codec.Bye):
            if link.up:
                self._link_down(link, f"said goodbye: {msg.reason:.200}", orderly=True)
            else:
                self._refused(link, msg.reason)
        elif isinstance(msg, codec.Error) and msg.code == "not-linked":
            if link.up:
                self._link_down(link, "it no longer knows this link (restarted, or it had declared us lost)")
            self._hello(link)
        elif isinstance(msg, codec.Error):
            self._on_peer_error(link.node or link.endpoint, msg)

    def _on_peer_error(self, peer: str, error: codec.Error) -> None:
        """An ERROR a peer hub sent about something we sent it: to the endpoint it names, or the log."""
        node, name = codec.split_addr(error.dst)
        if node == self.node and name in self._local:
            self._send_local(error)
            return
        stats = self.stats[peer]
        stats.errors_heard += 1
        now = time.monotonic()
        if now - stats.errors_logged_at >= BAD_MESSAGE_INTERVAL_S:
            stats.errors_logged_at = now
            log.warning(
                "node %s: peer %.64r reports %.32r: %.300r (%d such reports in all)",
                self.node,
                peer,
                error.code,
                error.message,
                stats.errors_heard,
            )

    def _key_problem(self, node: str, key: PublicKey | None) -> str | None:
        """Why ``key`` may not speak as node ``node`` (pinned to another key, unknown), or None."""
        if self._security is None:
            return None
        if key is None:
            return f"node {node!r:.80} presented no key"
        try:
            self._security.store().nodes.check(node, key)
        except SecurityError as exc:
            return str(exc)
        return None

    def _refused(self, link: _Link, reason: str) -> None:
        (log.debug if link.refused == reason else log.error)(
            "node %s: peer at %s refused the link: %.600r", self.node, link.endpoint, reason
        )  # a static link retries: the same refusal again is not news
        link.refused, link.refused_at = reason, time.monotonic()
        error = ProtocolMismatch(f"node {self.node}: peer at {link.endpoint} refused the link: {reason}")
        for waiter in link.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        link.waiters.clear()

    def _link_up(self, link: _Link, node: str, instance: str) -> None:
        """Make ``link`` the route to ``node``: on its WELCOME, or at once when the peer said HELLO.

        A link learned from a peer's HELLO is routable before our own HELLO is answered: our
        DEALER delivers in order, so whatever we send follows our HELLO. Waiting for WELCOME
        instead would bounce what we owe the peer meanwhile (the CREDIT for its first data).
        """
        existing = self._by_node.get(node)
        if existing is not None and existing is not link:
            taken = self._name_taken(node, instance, link.endpoint)
            if taken:  # it answered our HELLO: tell it we do not take it, and why
                self._link_send(link, codec.Bye(src=f"{self.node}/", dst=f"{node}/", reason=taken[:MAX_STRING_CHARS]))
                self._refused(link, taken)
                if not link.static:
                    self._drop_link(link)
                return
            if existing.instance == instance and existing.up:
                # Two addresses of one peer (127.0.0.1 and localhost, say): keep the first.
                self._drop_link(link)
                for waiter in link.waiters:
                    if not waiter.done():
                        waiter.set_result(node)
                return
            self._link_down(existing, "restarted as a new instance")
            self._drop_link(existing)
        was_up = link.up and link.instance == instance
        link.node, link.instance, link.up, link.last_heard = node, instance, True, time.monotonic()
        self._by_node[node] = link
        for waiter in link.waiters:
            if not waiter.done():
                waiter.set_result(node)
        link.waiters.clear()
        if not was_up:
            log.info("node %s: link to %r (%s) up", self.node, node, link.endpoint)
            self._announce_link(node, True, "linked")

    def _link_down(self, link: _Link, reason: str, *, orderly: bool = False) -> None:
        """The link to ``link.node`` is gone: ``orderly`` when the peer said BYE, lost otherwise."""
        if not link.up:
            return
        link.up = False
        if self._by_node.get(link.node) is link:
            del self._by_node[link.node]
        for ident, peer in list(self._peer_idents.items()):
            if peer == (link.node, link.instance):
                del self._peer_idents[ident]
                self._peer_user_ids.pop(ident, None)
        (log.info if orderly else log.warning)(
            "node %s: peer %r %s: %.300r", self.node, link.node, "left" if orderly else "lost", reason
        )
        self._announce_link(link.node, False, reason)
        if not link.static:
            self._drop_link(link)

    def _drop_link(self, link: _Link) -> None:
        if self._links.get(link.endpoint) is link:
            del self._links[link.endpoint]
        if self._by_node.get(link.node) is link:
            del self._by_node[link.node]
        link.pump.close()

    def _announce_link(self, node: str, up: bool, reason: str) -> None:
        for listener in self.link_listeners:
            listener(node, up, reason)
        for name, party in list(self._local.items()):
            msg = codec.Link(src=f"{self.node}/", dst=f"{self.node}/{name}", node=node, up=up, reason=reason)
            if isinstance(party, Endpoint):
                party._deliver(msg)
            else:
                self._to_client(party, codec.encode(msg))

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            # A busy loop may not have read the peers' pings yet: read what is waiting first, so
            # that only real silence counts.
            assert self._router is not None
            self._router.poll_now()
            now = time.monotonic()
            for link in list(self._links.values()):
                if link.up:
                    if now - link.last_heard > PEER_TIMEOUT_S:
                        self._link_down(link, f"no heartbeat for {now - link.last_heard:.1f} s")
                        if link.static:
                            self._hello(link)
                    else:
                        self._link_send(link, codec.Ping(src=f"{self.node}/", dst=f"{link.node}/"))
                elif not link.refused:
                    self._hello(link)
                elif link.static and now - link.refused_at >= REFUSED_RETRY_S:
                    self._hello(link)  # the name it clashed with may be gone, its version upgraded
            for client in list(self._clients.values()):
                silent = now - client.last_heard
                if silent > CLIENT_TIMEOUT_S:
                    log.info("node %s: client %r silent for %.1f s, detached", self.node, client.addr, silent)
                    reason = (
                        f"silent for {silent:.1f} s: a client must PING every {HEARTBEAT_INTERVAL_S:g} s"
                        f" and is detached after {CLIENT_TIMEOUT_S:g} s"
                    )
                    self._router_send(client.ident, self._bye_to(client, reason))
                    self._detach(client)
                elif client.backlog:
                    self._flush_client(client)

    # -- the ROUTER: everything peers and clients send us ----------------------------------------

    def _on_router(self, frames: list[Any]) -> None:
        ident = frames[0].bytes
        count = len(frames)
        if count < 2 or count > codec.MAX_FRAMES + 1:
            what = "no header frame" if count < 2 else f"{count - 1} frames (limit {codec.MAX_FRAMES})"
            self._bad(self._sender(ident), DecodeError(f"message with {what}"))
            return
        try:
            header = codec.decode_header(frames[1], count - 2)
        except codec.VersionMismatch as exc:
            self._refuse_version(ident, exc)
            return
        except DecodeError as exc:
            self._bad(self._sender(ident), exc)
            return
        kind = header["kind"]
        peer = self._peer_idents.get(ident)
        if peer is not None:
            node, instance = peer
            if self._security is not None and frames[1].get("User-Id") != self._peer_user_ids.get(ident):
                self._impostor(ident, node, frames[1].get("User-Id"))
                return
            link = self._by_node.get(node)
            if link is not None:
                if link.instance != instance:  # a connection of an instance that was replaced: stale, not bad
                    if kind not in ("PING", "BYE"):
                        self.stats[node].dropped += 1
                        log.debug("node %s: dropped a %s from a replaced instance of %r", self.node, kind, node)
                    return
                link.last_heard = time.monotonic()
            if kind == "PING":
                return
            if kind == "BYE":
                if link is not None:
                    reason = header.get("reason")
                    self._link_down(link, f"said goodbye: {reason if type(reason) is str else ''}", orderly=True)
                return
            if kind == "HELLO":
                self._on_hello(ident, frames)
                return
            if codec.split_addr(header["src"])[0] != node:
                error = DecodeError(f"source {header['src']!r:.80} is not on node {node!r}")
                self._bad(_Sender(node, ident, peer=node), error, header)
                return
            if codec.split_addr(header["dst"])[0] != self.node:
                error = DecodeError(f"destination {header['dst']!r:.80} is not on node {self.node!r}: no relaying")
                self._bad(_Sender(node, ident, peer=node), error, header)
                return
            self._route(ident, header, frames)
            return
        client = self._clients.get(ident)
        if client is not None:
            if self._security is not None and frames[1].get("User-Id") != client.user_id:
                self._impostor(ident, client.addr, frames[1].get("User-Id"))
                return
            client.last_heard = time.monotonic()
            if kind == "PING":
                self._to_client(client, codec.encode(codec.Pong(src=f"{self.node}/", dst=client.addr)))
                return
            if kind == "BYE":
                self._detach(client)
                return
            if header["src"] != client.addr:
                error = DecodeError(f"source {header['src']!r:.80} is not this client's address {client.addr!r}")
                self._bad(_Sender(client.addr, ident, client=client), error, header)
                return
            self._route(ident, header, frames)
            return
        if kind == "HELLO":
            self._on_hello(ident, frames)
        elif kind == "ATTACH":
            self._on_attach(ident, frames)
        elif kind not in ("BYE", "ERROR"):
            self._router_send(
                ident,
                codec.encode(
                    codec.Error(
                        src=f"{self.node}/",
                        dst=header["src"],
                        sid=header["sid"],
                        seq=header["seq"],
                        code="not-linked",
                        node=self.node,
                        to=header["dst"],
                        message=f"node {self.node} does not know this link; say HELLO first",
                    )
                ),
            )

    def _impostor(self, ident: bytes, who: str, user_id: str | None) -> None:
        """A message on ``who``'s routing id from another authenticated party (a connection that
        took the id over, ROUTER_HANDOVER): dropped and counted, never routed as ``who``'s."""
        self._note_bad(
            self.stats[UNLINKED],
            UNLINKED,
            DecodeError(f"a connection of {user_id!r:.80} used the routing id of {who!r:.80}"),
        )

    def _sender(self, ident: bytes) -> _Sender:
        peer = self._peer_idents.get(ident)
        if peer is not None:
            return _Sender(peer[0], ident, peer=peer[0])
        client = self._clients.get(ident)
        if client is not None:
            return _Sender(client.addr, ident, client=client)
        return _Sender(UNLINKED, ident)

    def _note_bad(self, stats: PeerStats, who: str, exc: Exception) -> bool:
        """Count a bad message from ``who``; log it when it opens an interval, and then return True."""
        stats.dropped += 1
        stats.bad += 1
        stats.last_error = str(exc)
        now = time.monotonic()
        if now - stats.interval_start >= BAD_MESSAGE_INTERVAL_S:
            stats.interval_start, stats.interval_bad = now, 1
            log.warning(
                "node %s: dropped a bad message from %.80r (%d in all; next report in %g s at the earliest): %s",
                self.node,
                who,
                stats.bad,
                BAD_MESSAGE_INTERVAL_S,
                stats.last_error[:300],
            )
            return True
        stats.interval_bad += 1
        log.debug("node %s: dropped bad message #%d from %.80r: %s", self.node, stats.bad, who, stats.last_error[:300])
        return False

    def _bad(self, sender: _Sender, exc: DecodeError, header: Any = None) -> None:
        """A bad message from ``sender``: count it, answer it, drop the sender, as the spec says."""
        if header is None:
            header = exc.header
        stats = self.stats[sender.key]
        if self._note_bad(stats, sender.key, exc) and not (
            type(header) is dict and header.get("kind") in ("ERROR", "BYE")  # never answered: no loops
        ):
            error = codec.encode(self._bad_message_error(sender, header, exc))
            if sender.client is not None:
                self._to_client(sender.client, error)
            else:
                self._router_send(sender.ident, error)
        if stats.interval_bad > MAX_BAD_MESSAGES and sender.key != UNLINKED:
            self._drop_sender(
                sender,
                f"{stats.interval_bad} bad messages within {BAD_MESSAGE_INTERVAL_S:g} s (limit {MAX_BAD_MESSAGES});"
                f" the last: {exc}",
            )

    def _bad_message_error(self, sender: _Sender, header: Any, exc: Exception) -> codec.Error:
        """The ERROR bad-message for ``sender``; the bad message's own fields only where they are sound."""
        fields = header if type(header) is dict else {}

        def text(key: str) -> str:
            value = fields.get(key)
            return value if type(value) is str and len(value) <= MAX_STRING_CHARS else ""

        def number(key: str) -> int:
            value = fields.get(key)
            return value if type(value) is int and 0 <= value < 2**63 else 0

        if sender.client is not None:
            dst = sender.client.addr
        elif sender.peer:  # its hub hands the ERROR on to the endpoint that sent the message
            src = text("src")
            dst = src if codec.split_addr(src)[0] == sender.peer else f"{sender.peer}/"
        else:
            dst = text("src")
        message = f"node {self.node} dropped a bad message: {exc}"
        return codec.Error(
            src=f"{self.node}/",
            dst=dst,
            sid=number("sid"),
            seq=number("seq"),
            code="bad-message",
            message=message[:MAX_STRING_CHARS],
            node=self.node,
            to=text("dst"),
        )

    def _drop_sender(self, sender: _Sender, reason: str) -> None:
        """Detach a client, or take down the link of a peer, that sent too many bad messages; tell it BYE."""
        reason = f"dropped by node {self.node}: {reason}"[:MAX_STRING_CHARS]
        if sender.client is not None:
            log.warning("node %s: detached client %r: %s", self.node, sender.client.addr, reason[:300])
            self._router_send(sender.ident, self._bye_to(sender.client, reason))
            self._detach(sender.client)
        elif sender.peer:
            log.warning("node %s: dropped peer %r: %s", self.node, sender.peer, reason[:300])
            # On the connection it used, i.e. to its link to us: its hub takes it as a goodbye.
            self._router_send(sender.ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=reason)))
            self._peer_idents.pop(sender.ident, None)
            self._peer_user_ids.pop(sender.ident, None)
            link = self._by_node.get(sender.peer)
            if link is not None:
                self._link_down(link, reason)

    def _bye_to(self, client: _Client, reason: str) -> list[Any]:
        return codec.encode(codec.Bye(src=f"{self.node}/", dst=client.addr, reason=reason[:MAX_STRING_CHARS]))

    def _router_send(self, ident: bytes, frames: list[Any]) -> bool:
        assert self._router is not None
        try:
            send_frames(self._router.sock, [ident, *frames])
            self._router.after_send()
            return True
        except zmq.ZMQError as exc:  # EAGAIN: pipe full; EHOSTUNREACH: gone
            log.debug("node %s: cannot answer %r: %s", self.node, ident[:24], exc)
            return False

    def _refuse_version(self, ident: bytes, exc: codec.VersionMismatch) -> None:
        node = exc.header.get("node", "?")
        stats = self.stats[self._sender(ident).key]
        if exc.header.get("kind") not in ("HELLO", "ATTACH"):
            self._note_bad(stats, self._sender(ident).key, exc)
        else:  # counted here, and logged below as the refusal it is
            stats.dropped += 1
            stats.bad += 1
            stats.last_error = str(exc)
            reason = f"node {self.node} speaks protocol version {codec.PROTOCOL_VERSION}, not {exc.version!r:.20}"
            log.error(
                "node %s: refused a link from %.80r: it speaks protocol version %.20r, we speak %d",
                self.node,
                node,
                exc.version,
                codec.PROTOCOL_VERSION,
            )
            self._router_send(ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=reason)))

    def _on_hello(self, ident: bytes, frames: list[Any]) -> None:
        try:
            hello = codec.decode([f.buffer for f in frames[1:]])
        except DecodeError as exc:
            sender = self._sender(ident)
            if sender.key != UNLINKED:
                self._bad(sender, exc)
                return
            self._note_bad(self.stats[UNLINKED], UNLINKED, exc)  # it waits for an answer: always give one
            reason = f"node {self.node} refused a malformed HELLO: {exc}"[:MAX_STRING_CHARS]
            self._router_send(ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=reason)))
            return
        assert isinstance(hello, codec.Hello)
        user_id: str | None = None
        peer_key: PublicKey | None = None
        if self._security is not None:
            user_id = frames[1].get("User-Id")
            identity = identity_from_user_id(user_id)
            if identity is not None and identity.fingerprint and self._gate is not None:
                peer_key = self._gate.key_of(identity.fingerprint)
            problem = None
            if identity is None or (identity.uid is None and peer_key is None):
                problem = f"node {self.node} cannot tell who is saying HELLO as {hello.node!r:.80}"
            elif peer_key is not None:
                problem = self._key_problem(hello.node, peer_key)
            if problem is not None:
                log.error("node %s: refused a link from %.80r: %s", self.node, hello.node, problem)
                bye = codec.Bye(src=f"{self.node}/", reason=problem[:MAX_STRING_CHARS])
                self._router_send(ident, codec.encode(bye))
                return
            if peer_key is None:  # a local daemon of our own user, over ipc: its key, if pinned
                peer_key = self._security.store().nodes.key_for(hello.node)
        if hello.node == self.node or not _valid_node_name(hello.node):
            if hello.node == self.node:
                reason = f"node name {hello.node!r} is this node's own name: give every node a unique name"
            else:
                reason = f"{hello.node!r:.80} is not a node name: use 1-{MAX_NODE_NAME_CHARS} characters without '/'"
            log.error("node %s: refused a link from instance %.8r: %s", self.node, hello.instance, reason)
            self._router_send(ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=reason)))
            return
        taken = self._name_taken(hello.node, hello.instance, self._hello_origin(hello, frames[1]))
        if taken:
            self.stats[hello.node].dropped += 1
            self._router_send(ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=taken[:MAX_STRING_CHARS])))
            return
        self._peer_idents[ident] = (hello.node, hello.instance)
        self._peer_user_ids[ident] = user_id
        self._router_send(
            ident,
            codec.encode(
                codec.Welcome(
                    src=f"{self.node}/", dst=f"{hello.node}/", node=self.node, instance=self.instance, info=self.info
                )
            ),
        )
        link = self._by_node.get(hello.node)
        if link is not None and link.instance == hello.instance:
            link.info, link.endpoints = hello.info, hello.endpoints
            return
        if link is not None:
            self._link_down(link, "restarted as a new instance")
        bus = hello.endpoints.get("bus")
        if not isinstance(bus, str) or not bus.startswith("tcp://"):
            return  # a peer without TCP can reach us but we cannot reach it
        if self._security is not None and peer_key is None:
            log.warning("node %s: cannot link back to %r: its key is not pinned", self.node, hello.node)
            return
        try:
            if bus.startswith("tcp://*:"):
                peer_addr = frames[1].get("Peer-Address")
                bus = f"tcp://{peer_addr}:{bus.rsplit(':', 1)[1]}"
            stale = self._links.get(bus)
            if self._security is not None and stale is not None and not stale.up:
                # Ours was refused at the CURVE handshake (opened before the peer trusted us), and
                # libzmq never reconnects after a ZAP refusal: its HELLO says it trusts us now.
                self._drop_link(stale)
            new = self._ensure_link(bus, static=stale is not None and stale.static, key=peer_key)
            if stale is not None and new is not stale:
                new.waiters += stale.waiters
        except zmq.ZMQError as exc:  # an endpoint libzmq cannot connect to
            self._note_bad(self.stats[hello.node], hello.node, DecodeError(f"cannot link back to {bus!r:.100}: {exc}"))
            return
        new.info, new.endpoints = hello.info, hello.endpoints
        self._link_up(new, hello.node, hello.instance)

    @staticmethod
    def _hello_origin(hello: codec.Hello, frame: Any) -> str:
        """Where a HELLO says its hub listens, and the address it came from, for messages."""
        bus = hello.endpoints.get("bus")
        source = _peer_address(frame)
        return f"{bus if isinstance(bus, str) else '(no endpoint)'!r:.120} from {source or 'an unknown address'}"

    def _name_taken(self, node: str, instance: str, origin: str) -> str:
        """Why ``instance`` may not use the name ``node`` (another live instance is linked under it), or ""."""
        existing = self._by_node.get(node)
        if existing is None or not existing.up or existing.instance == instance:
            return ""
        silent = time.monotonic() - existing.last_heard
        if silent >= TAKEOVER_SILENCE_S:
            return ""  # the linked instance is gone (restarted, or died): the new one takes over
        reason = (
            f"node name {node!r} is linked with instance {existing.instance:.16} at {existing.endpoint}"
            f" on node {self.node}; instance {instance:.16} at {origin} is refused: give every node a unique name"
        )
        now = time.monotonic()
        if now - self._clash_logged_at.get(node, -math.inf) >= BAD_MESSAGE_INTERVAL_S:
            self._clash_logged_at[node] = now
            log.error("node %s: %.600r", self.node, reason)
        else:
            log.debug("node %s: %.600r", self.node, reason)
        return reason

    def _on_attach(self, ident: bytes, frames: list[Any]) -> None:
        try:
            attach = codec.decode([f.buffer for f in frames[1:]])
        except DecodeError as exc:
            self._note_bad(self.stats[UNLINKED], UNLINKED, exc)  # it waits for an answer: always give one
            error = self._bad_message_error(_Sender(UNLINKED, ident), exc.header, exc)
            self._router_send(ident, codec.encode(error))
            return
        assert isinstance(attach, codec.Attach)
        name = attach.name
        if not name:
            self._client_ids += 1
            name = f"client-{self._client_ids}-{os.urandom(3).hex()}"
        held = self._local.get(name)
        if isinstance(held, _Client) and held.reserved and _over_ipc(frames[1]):  # the worker it was held for
            held.ident, held.reserved, held.last_heard, held.local = ident, False, time.monotonic(), True
            if self._security is not None:
                held.user_id = frames[1].get("User-Id")
            self._clients[ident] = held
            self._router_send(ident, codec.encode(codec.Attached(src=f"{self.node}/", dst=held.addr, addr=held.addr)))
            if held.backlog:
                self._flush_client(held)
            return
        source = _peer_address(frames[1])
        refusal = ""
        if "/" in name or name in self._local:
            refusal = f"endpoint name {name!r:.100} is taken or invalid on node {self.node}"
        elif len(self._clients) >= self.max_clients:
            refusal = f"node {self.node} has {len(self._clients)} clients attached, its limit"
        elif sum(c.source == source for c in self._clients.values()) >= self.max_clients_per_address:
            where = f"from {source}" if source else "from one address"
            refusal = f"node {self.node} has {self.max_clients_per_address} clients attached {where}, its limit"
        if refusal:
            self.stats[UNLINKED].dropped += 1
            log.debug("node %s: refused ATTACH: %s", self.node, refusal)
            self._router_send(
                ident,
                codec.encode(
                    codec.Error(
                        src=f"{self.node}/",
                        dst=attach.src,
                        code="refused",
                        node=self.node,
                        message=refusal,
                    )
                ),
            )
            return
        local = _over_ipc(frames[1])
        shared = local and bool(self._host_id) and attach.host == self._host_id
        client = _Client(
            ident=ident,
            addr=f"{self.node}/{name}",
            last_heard=time.monotonic(),
            local=local,
            shm=shared,
            source=source,
        )
        if self._security is not None:
            client.user_id = frames[1].get("User-Id")
        self._clients[ident] = client
        self._local[name] = client
        self._router_send(
            ident, codec.encode(codec.Attached(src=f"{self.node}/", dst=client.addr, addr=client.addr, shm=shared))
        )

    def _detach(self, client: _Client) -> None:
        if self._pool is not None:
            self._pool.reclaim(client.addr)  # it reads none of our leases any more, dead or alive
        self._reader.forget(client.addr)  # its segments stay mapped only while read
        self._clients.pop(client.ident, None)
        name = codec.split_addr(client.addr)[1]
        if self._local.get(name) is client:
            del self._local[name]
        error = PeerLost(f"client {client.addr} detached from node {self.node}")
        for party in list(self._local.values()):  # what it was sending or being sent is gone with it
            if isinstance(party, Endpoint):
                party.fail_party(client.addr, error)
        for listener in self.client_listeners:
            listener(client.addr)

    # -- routing ------------------------------------------------------------------------------

    def _route(self, ident: bytes, header: dict[str, Any], frames: list[Any]) -> None:
        """Deliver a message from ``ident`` whose header is decoded; ``frames`` as the ROUTER gave them."""
        node, name = codec.split_addr(header["dst"])
        if self._tap_topics:
            self._publish_tap(header, frames[2:])
        if node == self.node:
            party = self._local.get(name)
            if party is None:
                if not name and header["kind"] == "ERROR":  # a peer's ERROR about what this hub sent it
                    try:
                        error = codec.from_header(header)
                    except DecodeError as exc:
                        self._bad(self._sender(ident), exc, header)
                        return
                    assert isinstance(error, codec.Error)
                    self._on_peer_error(self._sender(ident).key, error)
                    return
                self._bounce(header, "no-endpoint", f"no endpoint {name!r:.100} on node {self.node}")
            elif isinstance(party, Endpoint):
                try:
                    msg = codec.from_header(header, [f.buffer for f in frames[2:]])
                    if isinstance(msg, codec.Shm):
                        msg = self._unshared(msg)
                except DecodeError as exc:
                    self._bad(self._sender(ident), exc, header)
                    return
                if isinstance(msg, codec.ShmFree):
                    if self._pool is not None:
                        self._pool.release(msg.leases, msg.src)
                    return
                party._deliver(msg)
            elif header["kind"] == "SHM" and not party.shm:
                self._route_unshared(ident, header, party)
            else:
                self._to_client(party, frames[1:])
            return
        link = self._by_node.get(node)
        if link is None:
            self._bounce(header, "no-route", f"node {self.node} has no link to node {node!r:.100}")
            return
        if header["kind"] == "SHM":  # handles mean nothing on another host
            self._route_unshared(ident, header, link)
            return
        link.pump.send(frames[1:])

    def _unshared(self, msg: codec.Shm) -> Message:
        """The message an SHM stands for, its payload frames views of the sender's segment.

        Raises:
            DecodeError: the handle names no segment we can map, or the message inside is malformed.
        """
        views = self._reader.views(msg.src, msg.handle, msg.lease, msg.sizes)
        return codec.from_header(msg.inner_header(), views)

    def _route_unshared(self, ident: bytes, header: dict[str, Any], to: _Client | _Link) -> None:
        """An SHM for a party we share no memory with: the message it stands for, copied out on the way."""
        try:
            shm_msg = codec.from_header(header)
            assert isinstance(shm_msg, codec.Shm)
            frames = codec.encode(self._unshared(shm_msg))  # zmq holds the views until sent; then they are freed
        except DecodeError as exc:
            self._bad(self._sender(ident), exc, header)
            return
        if isinstance(to, _Client):
            self._to_client(to, frames)
        else:
            to.pump.send(frames)

    def _free_later(self, sender: str, lease: int) -> None:
        """Our reader dropped a lease's views (maybe inside a garbage collection): tell its sender soon."""
        self._frees.setdefault(sender, []).append(lease)
        if not self._frees_scheduled and self._loop is not None and not self._closed:
            self._frees_scheduled = shm.call_soon(self._loop, self._send_frees)
            if not self._frees_scheduled:  # the loop is closed: nobody is left to tell
                self._frees.clear()

    def _send_frees(self) -> None:
        self._frees_scheduled = False
        frees, self._frees = self._frees, {}
        if self._closed:
            return
        for sender, leases in frees.items():
            party = self._local.get(codec.split_addr(sender)[1])
            if isinstance(party, _Client) and party.addr == sender:  # gone: its pool went with it
                self._to_client(party, codec.encode(codec.ShmFree(src=f"{self.node}/", dst=sender, leases=leases)))

    def _send_local(self, msg: Message) -> None:
        """The transport of in-process endpoints."""
        node, name = codec.split_addr(msg.dst)
        if self._tap_topics:
            self._publish_tap(codec.header_of(msg), getattr(msg, "frames", ()))
        if node == self.node:
            party = self._local.get(name)
            if party is None:
                self._bounce(codec.header_of(msg), "no-endpoint", f"no endpoint {name!r} on node {self.node}")
            elif isinstance(party, Endpoint):
                if isinstance(msg, codec.ShmFree):
                    if self._pool is not None:
                        self._pool.release(msg.leases, msg.src)
                    return
                party._deliver(msg)
            else:
                if party.shm and msg.HAS_PAYLOAD and msg.payload_bytes >= shm.MIN_PAYLOAD_BYTES:
                    self._to_client(party, self._shared(msg, party))
                else:
                    self._to_client(party, codec.encode(msg))
            return
        link = self._by_node.get(node)
        if link is None:
            self._bounce(codec.header_of(msg), "no-route", f"node {self.node} has no link to node {node!r}")
            return
        link.pump.send(codec.encode(msg))

    def _shared(self, msg: Message, client: _Client) -> list[Any]:
        """``msg`` for a same-host client: as an SHM in our pool, or encoded as it is when it cannot be."""
        if self._pool is None:
            self._pool = shm.Pool()
        handed = shm.shared(self._pool, codec.header_of(msg), msg.frames)  # type: ignore[attr-defined]
        return handed if handed is not None else codec.encode(msg)

    def _send_frames_local(self, dst: str, frames: list[Any]) -> None:
        """The transport of in-process endpoints, for messages they encoded themselves."""
        node = codec.split_addr(dst)[0]
        link = self._by_node.get(node)
        if link is not None and not self._tap_topics:
            link.pump.send(frames)  # the hot path: straight onto the link
            return
        try:
            msg = codec.decode(frames)
        except DecodeError as exc:  # our own endpoint made it: a bug, not hostile input
            raise BusError(f"node {self.node}: an endpoint encoded a bad message: {exc}") from exc
        self._send_local(msg)

    def _bounce(self, header: dict[str, Any], code: str, text: str) -> None:
        if header["kind"] in ("ERROR", "CREDIT", "EOF_ACK", "LINK", "PONG", "SHM_FREE"):
            self.stats[header["src"]].dropped += 1
            log.debug("node %s: dropped undeliverable %s to %s", self.node, header["kind"], header["dst"])
            return
        error = codec.Error(
            src=f"{self.node}/",
            dst=header["src"],
            sid=header["sid"],
            seq=header["seq"],
            code=code,
            message=text,
            node=self.node,
            to=header["dst"],
        )
        src_node = codec.split_addr(header["src"])[0]
        if src_node == self.node:
            self._send_local(error)
        elif (link := self._by_node.get(src_node)) is not None:
            self._link_send(link, error)

    def _to_client(self, client: _Client, frames: list[Any]) -> None:
        if client.backlog or client.reserved:  # in order, behind what waits; bounded (``_hold``)
            self._hold(client, frames)
            return
        assert self._router is not None
        try:
            send_frames(self._router.sock, [client.ident, *frames])
        except zmq.Again:
            self._hold(client, frames)
            assert self._loop is not None
            self._loop.call_later(0.002, self._flush_client, client)
        except zmq.ZMQError:  # EHOSTUNREACH: the client went away without BYE
            self._detach(client)
        else:
            self._router.after_send()

    def _hold(self, client: _Client, frames: list[Any]) -> None:
        """Keep ``frames`` for a client whose pipe is full; one that holds too much is detached."""
        nbytes = sum(len(f) for f in frames)
        held = client.backlog_bytes + nbytes
        if (len(client.backlog) >= CLIENT_BACKLOG_MESSAGES or held > self.client_backlog_bytes) and (
            client.ident in self._clients
        ):
            self.stats[client.addr].dropped += len(client.backlog) + 1
            reason = (
                f"not reading: {len(client.backlog)} messages, {client.backlog_bytes} bytes held for it"
                f" (limits {CLIENT_BACKLOG_MESSAGES}, {self.client_backlog_bytes})"
            )
            log.warning("node %s: detached client %r: %s", self.node, client.addr, reason)
            client.backlog.clear()
            client.backlog_bytes = 0
            self._router_send(client.ident, self._bye_to(client, f"detached by node {self.node}: {reason}"))
            self._detach(client)
            return
        client.backlog.append(frames)
        client.backlog_bytes += nbytes

    def _flush_client(self, client: _Client) -> None:
        assert self._router is not None and self._loop is not None
        if self._closed or client.ident not in self._clients:
            return
        sock = self._router.sock
        while client.backlog:
            try:
                send_frames(sock, [client.ident, *client.backlog[0]])
            except zmq.Again:
                self._loop.call_later(0.002, self._flush_client, client)
                return
            except zmq.ZMQError:
                self._detach(client)
                return
            client.backlog_bytes -= sum(len(f) for f in client.backlog.popleft())
        self._router.after_send()

    # -- tap mirror -----------------------------------------------------------------------------

    _tap_mirror: Mirror | None = None  # made at the first subscription

    def _on_tap_subscription(self, frames: list[Any]) -> None:
        data = frames[0].bytes
        if self._tap_mirror is None:
            self._tap_mirror = Mirror(self.node)
        if data[:1] == b"\x01":
            self._tap_topics.add(data[1:])
            self._tap_mirror.on_subscription(data[1:], True)
        elif data[:1] == b"\x00":
            self._tap_topics.discard(data[1:])
            self._tap_mirror.on_subscription(data[1:], False)

    def _publish_tap(self, header: dict[str, Any], payload: Any) -> None:
        assert self._tap is not None and self._tap_mirror is not None
        self._tap_mirror.publish(self._tap.sock, header, payload)

    @property
    def tapped(self) -> bool:
        """Whether anyone subscribes to the tap: the hub mirrors what it routes only then."""
        return bool(self._tap_topics)

    @property
    def tap_refused(self) -> int:
        """Tap events the XPUB refused to send (each is a gap in the events' ``n``)."""
        return self._tap_mirror.refused if self._tap_mirror is not None else 0


class _InProcess:
    """The transport of a hub's in-process endpoints."""

    __slots__ = ("send", "send_frames")

    def __init__(self, hub: Hub) -> None:
        self.send = hub._send_local
        self.send_frames = hub._send_frames_local


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
