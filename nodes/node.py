"""A dpipes node: its lifecycle, and the wiring of the parts that do its jobs.

The parts, one module each: :mod:`~dpipes.nodes.dispatch` serves the control endpoint,
:mod:`~dpipes.nodes.policy` decides what may run here, :mod:`~dpipes.nodes.stages` runs this
node's stages (one :mod:`~dpipes.nodes.stage` each), :mod:`~dpipes.nodes.coordinator` coordinates
the pipelines this node is entry for. The node starts them in order and, should a step fail,
closes what had started in reverse order; ``aclose`` does the same for a node that ran. What the
node knows of other nodes is its :class:`~dpipes.discovery.directory.NodeDirectory`, fed here with
static peers, mDNS events, link events and gossip; the node carries out the links and unlinks it asks for,
gossips what it says every ``GOSSIP_INTERVAL_S``, places stages and answers ``info`` from it.

The control endpoint ``<node>/ctl`` speaks the control protocol, whose spec and typed messages
are :mod:`dpipes.nodes.protocol`; this module maps each method to the part that answers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, ConfigError, SecurityError
from dpipes.bus.hub import Hub
from dpipes.bus.keys import PublicKey
from dpipes.bus.trust import KnownNodes
from dpipes.discovery.directory import GOSSIP_MIN_INTERVAL_S, Action, Link, NodeDirectory, vet_by
from dpipes.discovery.interfaces import resolve_interfaces
from dpipes.discovery.mdns import MdnsDiscovery, MdnsEvent, NodeSeen
from dpipes.discovery.table import NodeRecord, new_instance_id
from dpipes.nodes.config import HostPort, NodeConfig
from dpipes.nodes.dispatch import ControlServer
from dpipes.nodes.fdpass import FdDrop, drop_path
from dpipes.nodes.policy import Policy, parse_requirement
from dpipes.nodes.protocol import (
    CTL,
    GOSSIP_INTERVAL_S,
    MAX_ITEMS,
    MAX_TEXT_CHARS,
    PIPELINE_PROTOCOL,
    CancelReply,
    CancelRequest,
    ClaimRequest,
    Empty,
    ExitReport,
    GossipRequest,
    InfoReply,
    InfoRequest,
    NegotiateReply,
    NegotiateRequest,
    NodeEntry,
    RunReply,
    RunRequest,
    StartReply,
    StartRequest,
)
from dpipes.nodes.security import node_security
from dpipes.nodes.supervisor import Supervisor

# What only a run needs (coordination, stages, the pipeline parser, object modes, Pipes, plugin
# workers) is imported at the first request for one, not at start: eight daemons starting on two
# cores converge sooner (dpipes-bench discovery). See Node._run_parts.
if TYPE_CHECKING:
    from dpipes.nodes.coordinator import Coordinator
    from dpipes.nodes.pipeline import NodeInfo
    from dpipes.nodes.stage import DirectPipes
    from dpipes.nodes.stages import Stages
    from dpipes.nodes.worker_pool import WorkerPool

log = logging.getLogger(__name__)


class Node:
    """One dpipes node: hub, supervisor and control endpoint.

    Args:
        config: the node's configuration (name, listen address, peers, allowed programs, ...).
        exclusive: ``dpipesd -- PROG ARGS``: the only program this node runs, with ARGS put
            before each stage's own arguments.
        ipc: the hub's ipc endpoint (default: a private temporary path).
        tap: the tap endpoint (default: beside ``ipc``).
        exit_after_one: stop serving once one stage has run here (``dpipesd --exit``).
        listen: override of ``config.listen`` as ``tcp://HOST:PORT`` (port 0: any free port).
        worker_pool: keep ``[limits] plugin_workers_ready`` plugin workers started ahead of need
            (:mod:`dpipes.nodes.worker_pool`); never with ``exit_after_one``.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        exclusive: list[str] | None = None,
        ipc: str | None = None,
        tap: str | None = None,
        exit_after_one: bool = False,
        listen: str | None = None,
        worker_pool: bool = True,
    ) -> None:
        self.config = config
        self.name = config.name
        self.security = node_security(config)
        self.policy = Policy(
            config.name, config, exclusive=exclusive, trust=self.security.store if self.security is not None else None
        )
        self.exclusive = self.policy.exclusive
        self.exit_after_one = exit_after_one
        tcp = listen or f"tcp://{_zmq_host(config.listen.host)}:{config.listen.port}"
        check_exposure(config.name, tcp, insecure=config.insecure, keys=self.security is not None)
        self.plugins = self.policy.offered_plugins()  # name -> version, as installed when the node started
        self.hub = Hub(
            config.name,
            tcp=tcp,
            ipc=ipc,
            tap=tap,
            info={"programs": sorted(self.offered()), "plugins": sorted(self.plugins), "plugin_versions": self.plugins},
            max_clients=config.limits.max_clients,
            max_clients_per_address=config.limits.max_clients_per_address,
            client_backlog_bytes=config.limits.client_backlog_bytes,
            max_held_bytes=config.limits.max_held_bytes,
            security=self.security,
        )
        # One incarnation id for the links and for mDNS, ordered by start time: the directory tells
        # a restarted node from a stale record by comparing them (discovery/table.py).
        self.hub.instance = new_instance_id()
        self.supervisor = Supervisor()
        # Plugin workers started ahead of need; none for one stage (--exit) or one command (embedded).
        self.worker_pool_size = config.limits.plugin_workers_ready if worker_pool and not exit_after_one else 0
        self.workers: WorkerPool | None = None
        # The parts that run pipelines, made by the first request for a run (_run_parts):
        self.direct: DirectPipes | None = None  # kept ends of kernel pipes between stages here
        self.stages: Stages | None = None
        self.coordinator: Coordinator | None = None
        self.control: ControlServer | None = None
        self._ctl: Endpoint | None = None
        self._fd_drop: FdDrop | None = None  # local clients hand their stdin/stdout over here
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped: asyncio.Event | None = None
        self._started = contextlib.AsyncExitStack()  # how to undo start(), step by step
        self._closed = False
        # every node this one knows, and the links it wants; with keys, only nodes known_nodes trusts
        self.directory = NodeDirectory(config.name, vet=vet_by(self._known_nodes) if self.hub.secure else None)
        self._gossiped_at: dict[str, float] = {}  # linked peer -> when we last told it what we know
        self._mdns: MdnsDiscovery | None = None
        self.static_keys: dict[str, PublicKey] = {}  # static peer endpoint -> its pinned node key

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def tcp_endpoint(self) -> str:
        return self.hub.tcp_endpoint

    @property
    def ipc_endpoint(self) -> str:
        return self.hub.ipc_endpoint

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Listen, link to the configured peers, and answer control requests.

        Should a step fail, what the earlier ones started is closed, in reverse order, before the
        error propagates: a node that did not start holds no socket, task or descriptor.
        """
        self._stopped = asyncio.Event()
        try:
            await self._start(self._started)
        except BaseException:
            self._closed = True
            await self._started.aclose()
            raise

    async def _start(self, undo: contextlib.AsyncExitStack) -> None:
        await self.hub.start()
        undo.push_async_callback(self.hub.aclose)
        await self.supervisor.__aenter__()
        undo.push_async_callback(self.supervisor.aclose)
        try:
            drop = FdDrop(drop_path(self.hub.ipc_endpoint))
            drop.start()
            self._fd_drop = drop
            undo.callback(drop.close)
        except OSError as exc:  # local clients then send their data over the bus, as remote ones
            log.warning("node %s: no descriptor drop beside %s: %s", self.name, self.hub.ipc_endpoint, exc)
        self._ctl = ctl = self.hub.endpoint(CTL, max_streams=0)  # requests and reports only: no streams
        undo.callback(ctl.close)
        self.control = server = ControlServer(
            self.name,
            ctl,
            {
                "run": self._on_run,
                "negotiate": self._on_negotiate,
                "start": self._on_start,
                "claim": self._on_claim,
                "cancel": self._on_cancel,
                "exit": self._on_exit,
                "info": self._on_info,
                "gossip": self._on_gossip,
            },
            spawn=self._spawn,
        )
        undo.push_async_callback(self._cancel_tasks)
        self.hub.link_listeners.append(self._on_link)
        self.hub.client_listeners.append(self._on_client_gone)
        undo.callback(self.hub.link_listeners.remove, self._on_link)
        undo.callback(self.hub.client_listeners.remove, self._on_client_gone)
        now = time.monotonic()
        me = NodeRecord(
            self.name,
            self.hub.instance,
            codec.PROTOCOL_VERSION,
            {"bus": self.hub.advertised_endpoint},
            programs=tuple(sorted(self.offered())),
            plugins=tuple(sorted(self.plugins)),
        )
        self._apply(self.directory.set_self(me, now))
        for name, peer in self.config.nodes.items():
            endpoint = f"tcp://{_zmq_host(peer.host)}:{peer.port}"
            if self.security is not None:
                key = self.static_peer_key(name, peer)
                if key is not None:
                    self.static_keys[endpoint] = key
            self._apply(self.directory.add_static(endpoint, now))
        self._spawn(server.serve(), "control")
        self._spawn(self._gossip_forever(), "gossip")
        await self._start_mdns(undo)

    def _run_parts(self) -> tuple[Stages, Coordinator]:
        """This node's stages and the coordinator of the runs it is entry for, made (and their
        modules imported) by the first request that needs them: a node reaches ready and joins
        the mesh without them. That first request pays the imports (~5 ms of CPU)."""
        if self.stages is None or self.coordinator is None:
            assert self._ctl is not None, "node not started"
            from dpipes.nodes.coordinator import Coordinator
            from dpipes.nodes.stage import DirectPipes
            from dpipes.nodes.stages import Stages

            if self.worker_pool_size:
                from dpipes.nodes.plugin_stage import WORKER_ARGV
                from dpipes.nodes.stage_env import stage_environment
                from dpipes.nodes.worker_pool import WorkerPool

                # Waiting workers start from a stage's clean environment (never the daemon's own);
                # the spec each one takes adds that stage's variables.
                env = stage_environment(self.config.pass_env, worker=True)
                self.workers = WorkerPool(
                    self.supervisor, WORKER_ARGV, env=env, size=self.worker_pool_size, node=self.name
                )
                self._started.push_async_callback(self.workers.aclose)
            self.direct = DirectPipes()
            self.stages = Stages(
                node=self.name,
                hub=self.hub,
                supervisor=self.supervisor,
                policy=self.policy,
                config=self.config,
                ctl=self._ctl,
                direct=self.direct,
                spawn=self._spawn,
                on_exit=self.stop if self.exit_after_one else lambda: None,
                workers=self.workers,
            )
            self.coordinator = Coordinator(
                node=self.name,
                hub=self.hub,
                config=self.config,
                ctl=self._ctl,
                table=self.table,
                direct=self.direct,
                fd_drop=self._fd_drop,
                spawn=self._spawn,
            )
        return self.stages, self.coordinator

    def static_peer_key(self, name: str, peer: HostPort) -> PublicKey | None:
        """The key static peer ``name`` must present: pinned in known_nodes; for one on loopback,
        else this node's own (most likely another daemon of this user, sharing the key directory:
        :mod:`~dpipes.nodes.security`; if it is not, CURVE fails and it stays down). None: it is
        not linked (logged, with how to pin it), only listed."""
        assert self.security is not None
        key = self.security.store().nodes.key_for(name)
        if key is None and _is_loopback(peer.host):
            key = self.security.keypair.public
            log.info("node %s: static peer %s at %s: linking with this node's own key", self.name, name, peer)
        if key is None:
            log.error(
                "node %s: not linking to static peer %s at %s: its node key is unknown; run 'dpipes keys' on %s "
                "and pin it here: dpipes keys pin %s KEY",
                self.name,
                name,
                peer,
                name,
                name,
            )
        return key

    def mdns_addresses(self) -> list[str]:
        """Where to advertise and browse: the interfaces this node can be reached at.

        A node listening on loopback only (the default) cannot be reached from the LAN, so it does
        no mDNS at all; one listening on an address uses that address's interface; one listening
        on every address (``0.0.0.0``, with --insecure) uses ``interfaces`` from its configuration,
        by default every usable interface.
        """
        host = self.hub.tcp_endpoint.removeprefix("tcp://").rpartition(":")[0]
        if host in ("0.0.0.0", "*", ""):
            return resolve_interfaces(self.config.interfaces)
        try:
            if ipaddress.ip_address(host).is_loopback or ipaddress.ip_address(host).version != 4:
                return []
        except ValueError:
            return []
        return resolve_interfaces(self.config.interfaces or (host,))

    async def _start_mdns(self, undo: contextlib.AsyncExitStack) -> None:
        addresses = self.mdns_addresses()
        if not addresses:
            log.info("node %s: no mDNS (listening on loopback only); peers come from config and gossip", self.name)
            return
        port = self.hub.tcp_endpoint.rpartition(":")[2]
        record = NodeRecord(
            name=self.name,
            instance_id=self.hub.instance,
            protocol_version=codec.PROTOCOL_VERSION,
            endpoints={"bus": f"tcp://{addresses[0]}:{port}"},
            addresses=tuple(addresses),
            programs=tuple(sorted(self.offered())),
            plugins=tuple(sorted(self.plugins)),
            key=self.hub.public_key,  # public by design: peers vet it against their known_nodes
        )
        mdns = MdnsDiscovery(record, interfaces=addresses, on_event=self._on_mdns)
        await mdns.start()
        self._mdns = mdns
        undo.push_async_callback(mdns.aclose)  # goodbye packets: the others drop us at once
        log.info("node %s: mDNS discovery on %s", self.name, ", ".join(addresses))

    def _on_mdns(self, event: MdnsEvent) -> None:
        now = time.monotonic()
        if isinstance(event, NodeSeen):
            self._apply(self.directory.mdns_seen(event.record, now))
        else:
            self._apply(self.directory.mdns_gone(event.name, event.instance_id, now))

    def _apply_unless_closed(self, actions: list[Action]) -> None:
        if not self._closed:
            self._apply(actions)

    def _apply(self, actions: list[Action]) -> None:
        """Carry out what the directory asks for."""
        for action in actions:
            if isinstance(action, Link):
                key = action.key or self.static_keys.get(action.endpoint)  # discovery's vetted key, or the pin
                if self.security is not None and key is None:
                    # A static peer whose key is unknown (logged at start); discovered peers come vetted.
                    log.debug("node %s: not linking to %s: no node key known for it", self.name, action.endpoint)
                    continue
                try:
                    (self.hub.add_peer if action.static else self.hub.learn_peer)(action.endpoint, key=key)
                except SecurityError as exc:
                    log.error("node %s: not linking %s: %s", self.name, action.endpoint, exc)
            elif self.hub.drop_peer(action.endpoint, action.reason):
                log.debug("node %s: unlinked %s: %s", self.name, action.endpoint, action.reason)

    async def serve(self) -> None:
        """Run until ``stop()`` (or, with ``exit_after_one``, until one stage has run here)."""
        assert self._stopped is not None, "node not started"
        await self._stopped.wait()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def aclose(self) -> None:
        """Cancel every stage (bounded), then close what start() opened, in reverse. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self.workers is not None:  # first: stages ending below must not start replacements
            await self.workers.aclose()
        if self.stages is not None:
            await self.stages.aclose()
        await self._started.aclose()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"node {self.name}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("node %s: task %s failed", self.name, task.get_name(), exc_info=task.exception())

    async def _cancel_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _known_nodes(self) -> KnownNodes:
        """The peer nodes this node trusts, read afresh (``dpipes keys pin`` takes effect at once)."""
        assert self.security is not None, "only a node with keys vets node keys"
        return self.security.store().nodes

    # -- what this node offers -----------------------------------------------------------------

    def offered(self) -> set[str]:
        """Programs this node says it runs: its exclusive program, else allow list and [apps]."""
        return self.policy.offered()

    def table(self) -> dict[str, NodeInfo]:
        """What this node knows of every node, for placement: itself and the nodes linked and up."""
        from dpipes.nodes.pipeline import NodeInfo

        self._refresh_links(time.monotonic())
        return {name: NodeInfo(name, programs) for name, programs in self.directory.programs_by_node().items()}

    def _refresh_links(self, now: float) -> None:
        """What each linked peer offers, as its latest HELLO said: a peer's HELLO may come after its
        link is up, and placement and ``info`` must not wait for the next gossip round to see it."""
        for name, peer in self.hub.peers.items():
            self._apply(self.directory.link_info(name, peer.info, now))

    # -- control requests: each goes to the part that does the job ------------------------------

    async def _on_run(self, request: RunRequest, src: str) -> RunReply:
        return await self._run_parts()[1].run(request, src)

    async def _on_negotiate(self, request: NegotiateRequest, src: str) -> NegotiateReply:
        return await self._run_parts()[0].negotiate(request, src)

    async def _on_start(self, request: StartRequest, src: str) -> StartReply:
        return await self._run_parts()[0].start(request, src)

    async def _on_claim(self, request: ClaimRequest, src: str) -> Empty:
        return await self._run_parts()[0].claim(request, src)

    async def _on_cancel(self, request: CancelRequest, src: str) -> CancelReply:
        stages, coordinator = self._run_parts()
        run = coordinator.client_cancels(request.pipeline, src)
        if run is not None:  # the client cancels: tell every node
            await coordinator.cancel(run, request.reason)
            return CancelReply()
        return CancelReply(stages=await stages.cancel(request.pipeline, request.reason, by=src))

    async def _on_exit(self, report: ExitReport, src: str) -> Empty:
        self._run_parts()[1].on_exit(report)
        return Empty()

    def _on_link(self, node: str, up: bool, reason: str) -> None:
        now = time.monotonic()
        if up:
            peer = self.hub.peers.get(node)
            if peer is not None:
                key = self._known_nodes().key_for(node) if self.hub.secure else None  # the hub checked it
                self._apply(self.directory.link_up(node, peer.instance, peer.endpoint, peer.info, now, key=key))
            self._gossip(first=node)  # a new neighbour: share what we know at once, so the mesh closes fast
            return
        # The hub says an orderly departure only in the reason's text, for now (the bus's to type).
        orderly = reason.startswith("said goodbye")
        relink = self.directory.link_down(node, orderly=orderly, reason=reason, now=now)
        if relink:
            # The hub calls us before it drops its lost link: a new one to that endpoint now
            # would be that very link, dropped right after. Once the hub is done, then.
            asyncio.get_running_loop().call_soon(self._apply_unless_closed, relink)
        self._gossiped_at.pop(node, None)
        if self.coordinator is not None:
            self.coordinator.on_link_lost(node, reason)

    def _on_client_gone(self, addr: str) -> None:
        if self.coordinator is not None:
            self.coordinator.on_client_gone(addr)

    async def _on_info(self, request: InfoRequest, src: str) -> InfoReply:
        self._refresh_links(time.monotonic())
        heard_s = {name: peer.last_heard_s for name, peer in self.hub.peers.items()}
        nodes = tuple(
            NodeEntry(
                name=e.name,
                endpoint=e.endpoint,
                programs=e.programs,
                source=e.source,
                last_seen_s=e.last_seen_s,
                up=e.up,
                plugin_versions=self._plugin_versions(e.name),
                tap=self._tap_of(e.name, e.endpoint),
            )
            for e in self.directory.entries(time.monotonic(), heard_s=heard_s)
        )
        return InfoReply(node=self.name, protocol=PIPELINE_PROTOCOL, nodes=nodes)

    def _tap_of(self, node: str, bus: str) -> str:
        """The TCP tap endpoint of ``node``: ours, or what its HELLO or WELCOME said (checked: a
        peer's info is input like any other), its wildcard host made the host of its bus endpoint
        ``bus``; "" when there is none."""
        if node == self.name:
            said: Any = self.hub.advertised_tap_endpoint
        else:
            peer = self.hub.peers.get(node)
            said = peer.info.get("tap") if peer is not None and isinstance(peer.info, dict) else None
        if not isinstance(said, str) or not said.startswith("tcp://") or len(said) > MAX_TEXT_CHARS:
            return ""
        host = bus.removeprefix("tcp://").rpartition(":")[0]
        if said.startswith("tcp://*:") and bus.startswith("tcp://") and host not in ("", "*"):
            return f"tcp://{host}:{said.rpartition(':')[2]}"
        return said

    def _plugin_versions(self, node: str) -> dict[str, str]:
        """The plugins ``node`` offers with their versions: ours, or what its HELLO said (checked:
        a peer's info is input like any other)."""
        if node == self.name:
            return dict(self.plugins)
        peer = self.hub.peers.get(node)
        said = peer.info.get("plugin_versions") if peer is not None and isinstance(peer.info, dict) else None
        if not isinstance(said, dict):
            return {}
        return {
            k: v
            for k, v in list(said.items())[:MAX_ITEMS]
            if isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_TEXT_CHARS and len(v) <= MAX_TEXT_CHARS
        }

    # -- gossip: a node that knows one peer learns the rest ---------------------------------

    def _gossip(self, *, first: str = "") -> None:
        """Tell linked peers the nodes we are linked to (a one-way REQUEST): ``first`` at once, the
        others unless they heard from us within the directory's gossip rate limit."""
        if self._ctl is None:
            return
        now = time.monotonic()
        body = GossipRequest(**self.directory.gossip_body()).to_body()
        for name in self.directory.linked():
            if name != first and now - self._gossiped_at.get(name, -GOSSIP_MIN_INTERVAL_S) < GOSSIP_MIN_INTERVAL_S:
                continue
            with contextlib.suppress(BusError):
                self._ctl.send(codec.Request(dst=f"{name}/{CTL}", method="gossip", body=body))
                self._gossiped_at[name] = now

    async def _gossip_forever(self) -> None:
        while True:
            await asyncio.sleep(GOSSIP_INTERVAL_S)  # a periodic timer, not a wait for something
            now = time.monotonic()
            self._refresh_links(now)
            self._apply(self.directory.expire(now))
            self._gossip()

    async def _on_gossip(self, request: GossipRequest, src: str) -> Empty:
        via = codec.split_addr(src)[0]  # rejections are the directory's: coded, counted, logged once
        self._apply(self.directory.gossip(via, request.to_body(), time.monotonic()))
        return Empty()


def check_exposure(name: str, tcp: str, *, insecure: bool, keys: bool = False) -> None:
    """Refuse to serve programs beyond loopback without keys, unless told so (loudly).

    With keys (the default: a node makes its pair on first start), every TCP peer must hold a key
    the node trusts, on any address. Without keys anyone who reaches the port runs programs as the
    node's user: on loopback that is every local user, beyond it everyone on the network, which a
    node does only with ``insecure``.

    Raises:
        ConfigError: no ``keys``, ``tcp`` is not a loopback address and ``insecure`` is false.
    """
    if keys:
        return
    host = tcp.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    loopback = _is_loopback(host)
    if not insecure:
        if loopback:
            return
        raise ConfigError(
            f"node {name} would listen on {host or '*'} without keys: anyone who can reach it could run programs "
            "as this user. Leave insecure unset (the node then uses its keys), or accept that risk on a "
            "trusted network with --insecure (config: insecure = true)."
        )
    log.warning(
        "node %s: INSECURE (--insecure / insecure = true): no keys, no encryption, no authentication: anyone "
        "who can reach %s can run programs as this user%s",
        name,
        host or "*",
        " (on loopback: every user of this host)" if loopback else "",
    )


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _zmq_host(host: str) -> str:
    return "*" if host in ("0.0.0.0", "", "*") else host


__all__ = ["Node", "check_exposure", "parse_requirement"]
