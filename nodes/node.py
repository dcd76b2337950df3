"""A dpipes node: its lifecycle, and the wiring of the parts that do its jobs.

The parts, one module each: :mod:`~dpipes.nodes.dispatch` serves the control endpoint,
:mod:`~dpipes.nodes.policy` decides what may run here, :mod:`~dpipes.nodes.stages` runs this
node's stages (one :mod:`~dpipes.nodes.stage` each), :mod:`~dpipes.nodes.coordinator` coordinates
the pipelines this node is entry for. The node starts them in order and, should a step fail,
closes what had started in reverse order; ``aclose`` does the same for a node that ran. Until the
node directory lands in ``discovery/``, the node keeps its own list of where it learned of each
peer, answers ``info`` from it and gossips it.

Every node has a control endpoint ``<node>/ctl`` that answers REQUEST messages:

``run`` (client -> entry node)
    Body: ``pipeline`` (text), ``mode`` ("bytes" | "json" | "yaml"), ``stdin`` (bool: the client
    streams data into the first stage), ``require`` (list of ``"prog>=ver"``), ``protocol``,
    ``user``, ``pipes`` (Pipes options for every stage, and under ``stages`` a stage number's own:
    see :func:`~dpipes.nodes.pipes_options.options_for_stage`). The entry node parses, places,
    negotiates with every chosen node and starts every stage; it answers with ``pipeline`` (id)
    and ``stages`` (``index, node, argv, addr``), or with an error naming the stage, node, program
    and reason. Nothing starts unless every node agreed.
``negotiate`` (coordinator -> each node)
    Body: ``pipeline, stage, argv, mode, protocol, require, user``. The node checks the pipeline
    protocol, the data mode, that the program exists and is allowed here, and the version
    constraint; on success it reserves the stage's endpoint ``<node>/<pipeline>.<stage>``.
``start``
    Body adds ``stdin_from`` (address or ""), ``stdout_to``, ``stderr_to`` (where stderr and Pipes
    messages go), ``report_to`` (addresses that get the ``exit`` report), ``pipes`` (this
    stage's Pipes options: ``extras``, ``assets``, ``partition``, ``context``, ``messages``),
    ``direct_in`` / ``direct_out`` (the neighbour is on this node too: the two share one kernel
    pipe, made by whichever starts first, and nothing of that edge passes through the node). The reply
    carries ``context``: the Pipes context the stage was started with.
``cancel``
    Body: ``pipeline``, ``reason``: terminate every stage of it here (process group, bounded).
``exit`` (node -> client and coordinator)
    Body: ``pipeline, stage, node, code, signal, status, sigpipe, error, cancelled, stderr_tail``;
    ``error`` says what went wrong moving the stage's data ("" when nothing did), ``cancelled`` why
    the stage was cancelled ("" when it was not). Answered with an empty reply so that no report is
    lost silently.
``failed`` (coordinator -> client)
    Body: ``pipeline, error, lost``: the run failed as a whole (a node was lost, ...); ``lost``
    lists the stages that will never report (they ran on the lost node).

Data: a stage's stdout is a stream from its endpoint to the next stage's endpoint (or to the
client); its stdin is the one stream that arrives at its endpoint; its stderr is a stream of
``STDERR`` messages to the client, opened only when the program writes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, ConfigError, StageError
from dpipes.bus.hub import Hub
from dpipes.discovery.interfaces import resolve_interfaces
from dpipes.discovery.mdns import MdnsDiscovery, MdnsEvent, NodeSeen
from dpipes.discovery.table import NodeRecord, new_instance_id
from dpipes.nodes.config import NodeConfig
from dpipes.nodes.coordinator import Coordinator
from dpipes.nodes.dispatch import ControlServer
from dpipes.nodes.fdpass import FdDrop, drop_path
from dpipes.nodes.policy import Policy, parse_requirement
from dpipes.nodes.protocol import CTL
from dpipes.nodes.stage import DirectPipes
from dpipes.nodes.stages import NegotiationRefused, Stages
from dpipes.nodes.supervisor import Supervisor

# What only a run needs (the pipeline parser, object modes, Pipes) is imported at the first run,
# not at start: eight daemons starting on two cores converge sooner (dpipes-bench discovery).
if TYPE_CHECKING:
    from dpipes.nodes.pipeline import NodeInfo

log = logging.getLogger(__name__)

GOSSIP_INTERVAL_S = 2.0  # how often a node tells its peers the nodes it knows (also at once on a new link)


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
    ) -> None:
        self.config = config
        self.name = config.name
        self.policy = Policy(config.name, config, exclusive=exclusive)
        self.exclusive = self.policy.exclusive
        self.exit_after_one = exit_after_one
        tcp = listen or f"tcp://{_zmq_host(config.listen.host)}:{config.listen.port}"
        check_exposure(config.name, tcp, insecure=config.insecure)
        self.hub = Hub(config.name, tcp=tcp, ipc=ipc, tap=tap, info={"programs": sorted(self.offered())})
        self.supervisor = Supervisor()
        self.direct = DirectPipes()  # kept ends of kernel pipes between stages here
        self.stages: Stages | None = None  # made by start(), with the control endpoint
        self.coordinator: Coordinator | None = None
        self._ctl: Endpoint | None = None
        self._fd_drop: FdDrop | None = None  # local clients hand their stdin/stdout over here
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stopped: asyncio.Event | None = None
        self._started = contextlib.AsyncExitStack()  # how to undo start(), step by step
        self._closed = False
        self._sources: dict[str, str] = {}  # link endpoint -> how we learned of it: static, mdns, gossip
        self._mdns: MdnsDiscovery | None = None

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
        self._ctl = ctl = self.hub.endpoint(CTL)
        undo.callback(ctl.close)
        self.stages = Stages(
            node=self.name,
            hub=self.hub,
            supervisor=self.supervisor,
            policy=self.policy,
            config=self.config,
            ctl=ctl,
            direct=self.direct,
            spawn=self._spawn,
            on_exit=self.stop if self.exit_after_one else lambda: None,
        )
        self.coordinator = Coordinator(
            node=self.name,
            hub=self.hub,
            config=self.config,
            ctl=ctl,
            table=self.table,
            direct=self.direct,
            fd_drop=self._fd_drop,
            spawn=self._spawn,
        )
        server = ControlServer(
            self.name,
            ctl,
            {
                "run": self.coordinator.run,
                "negotiate": self._on_negotiate,
                "start": self._on_start,
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
        for peer in self.config.nodes.values():
            endpoint = f"tcp://{_zmq_host(peer.host)}:{peer.port}"
            self._sources[endpoint] = "static"
            self.hub.add_peer(endpoint)
        self._spawn(server.serve(), "control")
        self._spawn(self._gossip_forever(), "gossip")
        await self._start_mdns(undo)

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
            instance_id=new_instance_id(),
            protocol_version=codec.PROTOCOL_VERSION,
            endpoints={"bus": f"tcp://{addresses[0]}:{port}"},
            addresses=tuple(addresses),
            programs=tuple(sorted(self.offered())),
        )
        mdns = MdnsDiscovery(record, interfaces=addresses, on_event=self._on_mdns)
        await mdns.start()
        self._mdns = mdns
        undo.push_async_callback(mdns.aclose)  # goodbye packets: the others drop us at once
        log.info("node %s: mDNS discovery on %s", self.name, ", ".join(addresses))

    def _on_mdns(self, event: MdnsEvent) -> None:
        if not isinstance(event, NodeSeen) or event.record.name == self.name:
            return  # a node that leaves says BYE on its links; a vanished one fails its heartbeats
        endpoint = event.record.endpoints.get("bus", "")
        if not endpoint.startswith("tcp://"):
            return
        if "*" in endpoint and event.record.addresses:
            endpoint = f"tcp://{event.record.addresses[0]}:{endpoint.rpartition(':')[2]}"
        self._sources[endpoint] = "mdns"
        if event.record.name not in self.hub.peers:
            self.hub.learn_peer(endpoint)

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

    # -- what this node offers -----------------------------------------------------------------

    def offered(self) -> set[str]:
        """Programs this node says it runs: its exclusive program, else allow list and [apps]."""
        return self.policy.offered()

    def table(self) -> dict[str, NodeInfo]:
        """What this node knows of every node, for placement."""
        from dpipes.nodes.pipeline import NodeInfo

        table = {self.name: NodeInfo(self.name, frozenset(self.offered()))}
        for name, peer in self.hub.peers.items():
            programs = peer.info.get("programs", []) if isinstance(peer.info, dict) else []
            table[name] = NodeInfo(name, frozenset(p for p in programs if isinstance(p, str)))
        return table

    # -- control requests: each goes to the part that does the job ------------------------------

    async def _on_negotiate(self, msg: codec.Request) -> dict[str, Any]:
        assert self.stages is not None
        return await self.stages.negotiate(msg.body, caller=str(msg.body.get("user", "")))

    async def _on_start(self, msg: codec.Request) -> dict[str, Any]:
        assert self.stages is not None
        return await self.stages.start(msg.body)

    async def _on_cancel(self, msg: codec.Request) -> dict[str, Any]:
        assert self.stages is not None and self.coordinator is not None
        pipeline, reason = str(msg.body["pipeline"]), str(msg.body.get("reason", "cancelled"))
        run = self.coordinator.client_cancels(pipeline, msg.src)
        if run is not None:  # the client cancels: tell every node
            await self.coordinator.cancel(run, reason)
            return {}
        return {"stages": await self.stages.cancel(pipeline, reason)}

    async def _on_exit(self, msg: codec.Request) -> dict[str, Any]:
        assert self.coordinator is not None
        self.coordinator.on_exit(msg.body)
        return {}

    def _on_link(self, node: str, up: bool, reason: str) -> None:
        if up:
            self._gossip()  # a new neighbour: share what we know at once, so the mesh closes fast
        elif self.coordinator is not None:
            self.coordinator.on_link_lost(node, reason)

    def _on_client_gone(self, addr: str) -> None:
        if self.coordinator is not None:
            self.coordinator.on_client_gone(addr)

    async def _on_info(self, msg: codec.Request) -> dict[str, Any]:
        nodes = [
            {
                "name": self.name,
                "endpoint": self.hub.tcp_endpoint,
                "programs": sorted(self.offered()),
                "source": "self",
                "last_seen_s": 0.0,
                "up": True,
            }
        ]
        for name, peer in sorted(self.hub.peers.items()):
            programs = peer.info.get("programs", []) if isinstance(peer.info, dict) else []
            nodes.append(
                {
                    "name": name,
                    "endpoint": peer.endpoint,
                    "programs": [p for p in programs if isinstance(p, str)],
                    "source": self._sources.get(peer.endpoint, "linked"),
                    "last_seen_s": round(peer.last_heard_s, 3),
                    "up": peer.up,
                }
            )
        return {"node": self.name, "nodes": nodes}

    # -- gossip: a node that knows one peer learns the rest ---------------------------------

    def _known(self) -> dict[str, str]:
        return {name: peer.endpoint for name, peer in self.hub.peers.items() if "*" not in peer.endpoint}

    def _gossip(self) -> None:
        """Tell every linked peer which nodes we know and where (a one-way REQUEST)."""
        if self._ctl is None:
            return
        known = self._known()
        for name in list(self.hub.peers):
            with contextlib.suppress(BusError):
                self._ctl.send(codec.Request(dst=f"{name}/{CTL}", method="gossip", body={"peers": known}))

    async def _gossip_forever(self) -> None:
        while True:
            await asyncio.sleep(GOSSIP_INTERVAL_S)  # a periodic timer, not a wait for something
            self._gossip()

    async def _on_gossip(self, msg: codec.Request) -> dict[str, Any]:
        peers = msg.body.get("peers", {})
        if not isinstance(peers, dict):
            raise StageError("gossip: 'peers' must be a map of node name to endpoint")
        for name, endpoint in peers.items():
            if name == self.name or name in self.hub.peers or not isinstance(endpoint, str):
                continue
            if not endpoint.startswith("tcp://"):
                continue
            self._sources.setdefault(endpoint, "gossip")
            self.hub.learn_peer(endpoint)
        return {}


def check_exposure(name: str, tcp: str, *, insecure: bool) -> None:
    """Refuse to serve programs beyond loopback without keys, unless told so (loudly).

    Until CurveZMQ keys are in place, anyone who reaches a node's port can run programs as the
    node's user; listening on loopback only is the safe default.

    Raises:
        ConfigError: ``tcp`` is not a loopback address and ``insecure`` is false.
    """
    host = tcp.removeprefix("tcp://").rpartition(":")[0].strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    if not insecure:
        raise ConfigError(
            f"node {name} would listen on {host or '*'} without keys: anyone who can reach it could run programs "
            "as this user. Listen on 127.0.0.1 (the default), or accept that risk on a trusted network with "
            "--insecure (config: insecure = true)."
        )
    log.warning(
        "node %s: INSECURE: listening on %s without keys; anyone who can reach it can run programs as this user",
        name,
        host or "*",
    )


def _zmq_host(host: str) -> str:
    return "*" if host in ("0.0.0.0", "", "*") else host


__all__ = ["NegotiationRefused", "Node", "check_exposure", "parse_requirement"]
