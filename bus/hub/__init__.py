"""The Hub: one node's sockets, links to peer hubs, routing, heartbeats and the tap mirror.

Sockets (all created from the one ``zmq.Context`` the hub owns, all closed in ``aclose``):

* a ROUTER bound on TCP (for peer hubs and remote clients) and on ``ipc://`` (local clients);
* one outbound DEALER per peer hub (a *link*), as in Zyre: a hub always sends to a peer through
  its own DEALER, so a full peer blocks that link only, and ZeroMQ never drops on it;
* an XPUB tap mirror that publishes one small event per routed message (one per ``BATCH``, which
  readers expand into its members' events) while, and only while, someone is subscribed (the
  events are specified in :mod:`dpipes.bus.tap`); and, where the hub listens on TCP, the same
  mirror on a TCP tap endpoint, behind the tap's ZAP domain when the hub has keys.

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

**Link loss.** A link is lost when its peer has been silent ``PEER_TIMEOUT_S`` (six missed
heartbeats; the heartbeat loop looks every ``HEARTBEAT_INTERVAL_S``, so a dead peer or a pulled
cable is reported within 3.5 s): the hub's endpoints get ``LINK`` (up false) and every run with a
stage on that node fails, naming it. A shorter outage is not a loss, and costs nothing: the TCP
connection under the link stays open, ZeroMQ neither drops nor reorders on it, TCP sends again
what the outage swallowed, and a run across it goes on with every byte in order. The silence a
peer sees is the outage plus TCP's retransmission backoff (the first lost segment again about
0.2 s later, then at doubling intervals), so an outage of up to about a second is always
survived (``dpipes-bench faults`` cuts 0.5 s); a longer one under ``PEER_TIMEOUT_S`` may go either
way, and is then reported as a loss, named, like any other. After a loss the hub drops a learned
link and keeps retrying a static one; the node asks again for a link to a node that mDNS still
advertises (:mod:`dpipes.discovery.directory`), so when the cable is back the link is too, within
the DEALER's reconnect backoff (at most 2 s) and one heartbeat.

What a hub does with bad messages, idle clients and at shutdown is part of the wire spec
(:mod:`dpipes.bus.codec`, *Sessions* and *Bad messages*). Everything read off a socket is checked
at the ROUTER or link boundary; names and reasons from the wire are logged with ``%r`` so that a
newline in them cannot forge a log line.

**The tap.** The XPUB mirror listens on ``ipc://`` (``tap_endpoint``, beside the ROUTER's path)
and, when the hub listens on TCP, on TCP too (``tcp_tap_endpoint``, any free port of the same host
unless ``tcp_tap`` says otherwise), for taps on other hosts. The hub advertises it as
``info["tap"]`` in its ``HELLO`` and ``WELCOME`` (``tcp://*:PORT`` for a wildcard bind, as the bus
endpoint). With keys the TCP tap is a CURVE server under the tap's ZAP domain
(:data:`~dpipes.bus.auth.TAP_ZAP_DOMAIN`): a client key needs the ``tap`` right; over ``ipc://``
the uid rule holds, as for the ROUTER.

**Parts.** :class:`Hub` (here: its sockets, lifecycle and heartbeat loop) is made of one part per
job, each a module of this package: ``links`` (peer hubs: HELLO/WELCOME, takeover, reconnects),
``clients`` (attached clients: ATTACH, the idle rule, BYE, backlogs), ``routing`` (delivery),
``boundary`` (everything read off the ROUTER, and the bad-message rules), ``security`` (CURVE
binds, node keys, ZAP ``User-Id`` checks) and ``mirror`` (the tap); ``state`` holds the records
they share. The parts are mixins over the one hub's state, as the single class was.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq

from dpipes.bus import codec, heap, shm
from dpipes.bus.auth import TAP_ZAP_DOMAIN, ZAP_DOMAIN, Gatekeeper, HubSecurity
from dpipes.bus.codec import BYE_LINGER_MS, CLOSE_DRAIN_S, HEARTBEAT_INTERVAL_S, MAX_HELD_BYTES, MAX_NODE_NAME_CHARS
from dpipes.bus.endpoint import MAX_IN_STREAMS, Endpoint, HeldBytes
from dpipes.bus.errors import BusError
from dpipes.bus.hub import sockdir
from dpipes.bus.hub.boundary import Boundary
from dpipes.bus.hub.clients import (
    CLIENT_BACKLOG_BYTES,
    CLIENT_BACKLOG_MESSAGES,
    MAX_CLIENTS,
    MAX_CLIENTS_PER_ADDRESS,
    Clients,
)
from dpipes.bus.hub.links import REFUSED_RETRY_S, TAKEOVER_SILENCE_S, Links
from dpipes.bus.hub.mirror import TapMirror
from dpipes.bus.hub.routing import Routing, _InProcess
from dpipes.bus.hub.security import Security
from dpipes.bus.hub.state import (
    ROUTER_HWM,
    UNLINKED,
    PeerInfo,
    PeerStats,
    _Client,
    _Link,
    _set_common,
    _valid_node_name,
    any_port,
)
from dpipes.bus.pump import Pump
from dpipes.bus.tap import TAP_HWM

log = logging.getLogger(__name__)

__all__ = [
    "CLIENT_BACKLOG_BYTES",
    "CLIENT_BACKLOG_MESSAGES",
    "MAX_CLIENTS",
    "MAX_CLIENTS_PER_ADDRESS",
    "MAX_HELD_BYTES",
    "REFUSED_RETRY_S",
    "ROUTER_HWM",
    "TAKEOVER_SILENCE_S",
    "UNLINKED",
    "Hub",
    "PeerInfo",
    "PeerStats",
]


class Hub(Links, Clients, Routing, Boundary, Security, TapMirror):
    """One node of the bus.

    Args:
        node: this node's name, unique on the bus.
        tcp: where the ROUTER listens for peers and remote clients (port 0: any free port), or
            None for no TCP.
        ipc: the ``ipc://`` path for local parties; None makes one in a private temp directory.
        tap: where the tap XPUB listens; None: an ``ipc://`` path beside ``ipc``.
        tcp_tap: where the tap XPUB also listens on TCP, for taps on other hosts, when the hub
            has ``tcp``; None: on the host ``tcp`` binds, any free port. Advertised to peers as
            ``info["tap"]`` (see *The tap* in the module docstring).
        advertise: the host to tell peers, when ``tcp`` binds a wildcard address.
        info: what this node tells peers about itself in HELLO (programs, version, ...).
        max_clients: clients attached at once; ``ATTACH`` beyond it is refused.
        max_clients_per_address: of those, from one remote address or one local user (ipc).
        client_backlog_bytes: bytes held for a client that does not read, beyond which (or
            beyond ``CLIENT_BACKLOG_MESSAGES`` messages) it is detached with ``BYE``.
        max_held_bytes: what the hub holds for all its senders together (its endpoints' queued
            incoming streams and its clients' backlogs, :attr:`held`); a data message that would
            take it past this is refused with ``ERROR`` ``over-limit``.
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
        tcp_tap: str | None = None,
        advertise: str | None = None,
        info: dict[str, Any] | None = None,
        max_clients: int = MAX_CLIENTS,
        max_clients_per_address: int = MAX_CLIENTS_PER_ADDRESS,
        client_backlog_bytes: int = CLIENT_BACKLOG_BYTES,
        max_held_bytes: int = MAX_HELD_BYTES,
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
        self._want_tcp_tap = tcp_tap
        self._advertise = advertise
        self._tmpdir: tempfile.TemporaryDirectory[str] | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._router: Pump | None = None
        self._tap: Pump | None = None
        self._tap_topics: set[bytes] = set()
        self.tcp_endpoint = ""
        self.ipc_endpoint = ""
        self.tap_endpoint = ""
        self.tcp_tap_endpoint = ""  # the tap's TCP listener, when the hub has one
        self._links: dict[str, _Link] = {}  # by endpoint we connect to
        self._by_node: dict[str, _Link] = {}  # up links by node name
        self._peer_idents: dict[bytes, tuple[str, str]] = {}  # a peer's DEALER identity -> (node, instance)
        self._clients: dict[bytes, _Client] = {}
        self._local: dict[str, Endpoint | _Client] = {}  # endpoint name -> party
        self._left_open: dict[str, _Client] = {}  # reserved names left with unended streams (clients)
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
        self.held = HeldBytes(max_held_bytes)  # shared by our endpoints and our clients' backlogs
        self._security = security
        self._gate: Gatekeeper | None = None
        self._peer_user_ids: dict[bytes, str | None] = {}  # a peer's DEALER identity -> its ZAP User-Id
        self._host_id = shm.host_id()
        self._pool: shm.Pool | None = None  # made when a same-host client first gets a large payload
        self._reader = shm.Reader(self._free_later)
        self._frees = shm.Frees(self._send_frees)  # leases our endpoints have done with
        self._handles_due: list[_Client] = []  # clients with SHM messages of ours to send this pass

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Bind every socket and start heartbeats; returns when the hub accepts connections."""
        self._loop = self._frees.loop = asyncio.get_running_loop()
        heap.keep_message_memory()  # received messages reuse the C heap's memory (dpipes.bus.heap)
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
                self._tmpdir = sockdir.make()  # and removes those of hubs killed before closing
                ipc = f"ipc://{self._tmpdir.name}/bus.sock"
            self._bind(router, ipc)
            self.ipc_endpoint = ipc
            tap = self._want_tap or ipc.rsplit(".sock", 1)[0] + "-tap.sock"
            self._bind(tap_sock, tap)
            self.tap_endpoint = tap_sock.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.tcp_endpoint:  # as a CURVE server under the tap's ZAP domain when the hub has keys
                self._bind(tap_sock, self._want_tcp_tap or any_port(self.tcp_endpoint))
                self.tcp_tap_endpoint = tap_sock.getsockopt_string(zmq.LAST_ENDPOINT)
                self.info["tap"] = self.advertised_tap_endpoint
        except zmq.ZMQError as exc:
            router.close(0)
            tap_sock.close(0)
            if self._tmpdir is not None:
                self._tmpdir.cleanup()
            if self._gate is not None:
                self._gate.stop()
            self._ctx.term()
            raise BusError(f"node {self.node}: cannot listen: {exc}") from exc
        self._router = Pump(router, self._on_router, routed=True)
        self._tap = Pump(tap_sock, self._on_tap_subscription)
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name=f"hub {self.node} heartbeats")
        log.info(
            "node %s listening on %s %s (tap %s %s)",
            self.node,
            self.tcp_endpoint,
            self.ipc_endpoint,
            self.tap_endpoint,
            self.tcp_tap_endpoint,
        )

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
            f"{self.node}/{name}",
            self._transport,
            window=window,
            max_streams=max_streams,
            on_close=self._forget,
            held=self.held,
        )
        self._local[name] = ep
        return ep

    def _forget(self, ep: Endpoint) -> None:
        name = codec.split_addr(ep.addr)[1]
        if self._local.get(name) is ep:
            del self._local[name]

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            # A busy loop may not have read the peers' pings yet: read what is waiting first, so
            # that only real silence counts.
            assert self._router is not None
            self._router.poll_now()
            now = time.monotonic()
            self._beat_links(now)
            self._beat_clients(now)
