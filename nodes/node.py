"""A dpipes node: its hub, its stages, negotiation, and the coordination of pipelines it is entry for.

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
    Body: ``pipeline, stage, argv, mode, protocol, require``. The node checks the pipeline
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
    Body: ``pipeline, stage, node, code, signal, status, sigpipe, error, stderr_tail``; answered
    with an empty reply so that no report is lost silently.
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
import dataclasses
import ipaddress
import logging
import os
import re
import shlex
import shutil
import signal
import uuid
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint, OutStream, StreamCancelled
from dpipes.bus.errors import BusError, ConfigError, DpipesError, StageError
from dpipes.bus.hub import Hub
from dpipes.discovery.interfaces import resolve_interfaces
from dpipes.discovery.mdns import MdnsDiscovery, MdnsEvent, NodeSeen
from dpipes.discovery.table import NodeRecord, new_instance_id
from dpipes.nodes.config import NodeConfig
from dpipes.nodes.fdpass import FdDrop, drop_path
from dpipes.nodes.pipes_options import check_stage_options, options_for_stage
from dpipes.nodes.protocol import CTL, MODES, PIPELINE_PROTOCOL
from dpipes.nodes.supervisor import StageProcess, StdinClosed, Supervisor, set_pipe_size

# What only a run needs (the pipeline parser, object modes, Pipes) is imported at the first run,
# not at start: eight daemons starting on two cores converge sooner (dpipes-bench discovery).
if TYPE_CHECKING:
    from dpipes.nodes.pipeline import NodeInfo, StageSpec
    from dpipes.nodes.pipes import PipesBusReader, PipesFifoReader
    from dpipes.nodes.stage_pipes import StagePipes

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 10.0  # negotiate/start/cancel answers; they involve no data
REPORT_TIMEOUT_S = 5.0  # an exit report nobody acknowledges is logged and dropped after this
VERSION_PROBE_TIMEOUT_S = 2.0  # `prog --version` when the config declares no version
CANCEL_TIMEOUT_S = 10.0  # terminate (TERM, grace, KILL) all stages of a pipeline here
GOSSIP_INTERVAL_S = 2.0  # how often a node tells its peers the nodes it knows (also at once on a new link)
LATE_INPUT_S = 10.0  # how long an exited stage's endpoint waits to refuse input that comes late
STDERR_TAIL_REPORT_BYTES = 4096  # the end of a failed stage's stderr, in its exit report

_REQUIRE_RE = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|==|!=|>|<)\s*([0-9][0-9A-Za-z.+-]*)\s*$")
_VERSION_RE = re.compile(r"(\d+(?:\.\d+)+|\d+)")


class NegotiationRefused(StageError):
    """A node refused a stage before anything started; the message names node, program, reason."""


def parse_requirement(text: str) -> tuple[str, str, tuple[int, ...]]:
    """``"sort>=9.1"`` -> ``("sort", ">=", (9, 1))``.

    Raises:
        ValueError: the text is not ``PROG OP VERSION``.
    """
    match = _REQUIRE_RE.match(text)
    if not match:
        raise ValueError(f"bad requirement {text!r}: write PROG OP VERSION, e.g. 'sort>=9' (OP: >= <= == != > <)")
    return match[1], match[2], version_tuple(match[3])


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading dotted number of a version string as a tuple: ``"9.1-rc"`` -> ``(9, 1)``."""
    match = _VERSION_RE.search(text)
    return tuple(int(p) for p in match[1].split(".")) if match else ()


def version_satisfies(have: tuple[int, ...], op: str, want: tuple[int, ...]) -> bool:
    width = max(len(have), len(want))
    a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
    return {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[op]


@dataclasses.dataclass
class _Stage:
    """One stage of a pipeline on this node."""

    pipeline: str
    index: int
    argv: list[str]
    mode: str
    endpoint: Endpoint
    describe: str
    proc: StageProcess | None = None
    task: asyncio.Task[None] | None = None
    cancelled: str = ""
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    pipes: StagePipes | None = None
    lingering: bool = False  # its endpoint outlives it briefly, to refuse late input


@dataclasses.dataclass
class _Run:
    """A pipeline this node coordinates."""

    pipeline: str
    client: str
    stages: list[StageSpec]
    nodes: list[str]
    exited: set[int] = dataclasses.field(default_factory=set)
    failed: str = ""


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
        self.exclusive = list(exclusive) if exclusive else None
        self.exit_after_one = exit_after_one
        tcp = listen or f"tcp://{_zmq_host(config.listen.host)}:{config.listen.port}"
        check_exposure(config.name, tcp, insecure=config.insecure)
        self.hub = Hub(config.name, tcp=tcp, ipc=ipc, tap=tap, info={"programs": sorted(self.offered())})
        self.supervisor = Supervisor()
        self._ctl: Endpoint | None = None
        self._stages: dict[tuple[str, int], _Stage] = {}
        self._edges: dict[tuple[str, int], int] = {}  # (pipeline, i): our end of a direct pipe i -> i+1
        self._fd_drop: FdDrop | None = None  # local clients hand their stdin/stdout over here
        self._runs: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._versions: dict[str, tuple[int, ...]] = {}
        self._stopped: asyncio.Event | None = None
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
        """Listen, link to the configured peers, and answer control requests."""
        self._stopped = asyncio.Event()
        await self.hub.start()
        await self.supervisor.__aenter__()
        try:
            drop = FdDrop(drop_path(self.hub.ipc_endpoint))
            drop.start()
            self._fd_drop = drop
        except OSError as exc:  # local clients then send their data over the bus, as remote ones
            log.warning("node %s: no descriptor drop beside %s: %s", self.name, self.hub.ipc_endpoint, exc)
        self._ctl = self.hub.endpoint(CTL)
        self.hub.link_listeners.append(self._on_link)
        self.hub.client_listeners.append(self._on_client_gone)
        for peer in self.config.nodes.values():
            endpoint = f"tcp://{_zmq_host(peer.host)}:{peer.port}"
            self._sources[endpoint] = "static"
            self.hub.add_peer(endpoint)
        self._spawn(self._serve_ctl(), "control")
        self._spawn(self._gossip_forever(), "gossip")
        await self._start_mdns()

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

    async def _start_mdns(self) -> None:
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
        self._mdns = MdnsDiscovery(record, interfaces=addresses, on_event=self._on_mdns)
        await self._mdns.start()
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
        """Cancel every stage (bounded), close the hub. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        stages = list(self._stages.values())
        for stage in stages:
            stage.cancelled = stage.cancelled or "node stopping"
        await asyncio.gather(*(self._kill(stage) for stage in stages), return_exceptions=True)
        for pipeline in {p for p, _ in self._edges}:
            self._close_edges(pipeline)
        if self._fd_drop is not None:
            self._fd_drop.close()
        await self.supervisor.aclose()
        if self._mdns is not None:
            await self._mdns.aclose()  # goodbye packets: the others drop us at once
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.hub.aclose()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"node {self.name}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("node %s: task %s failed", self.name, task.get_name(), exc_info=task.exception())

    # -- what this node offers -----------------------------------------------------------------

    def offered(self) -> set[str]:
        """Programs this node says it runs: its exclusive program, else allow list and [apps]."""
        if self.exclusive:
            return {os.path.basename(self.exclusive[0])}
        return set(self.config.allow or ()) | set(self.config.apps)

    def _resolve(self, program: str) -> str | None:
        app = self.config.apps.get(program)
        if app is not None and app.path:
            return app.path if os.access(app.path, os.X_OK) else None
        return shutil.which(program)

    async def _refusal(self, argv: list[str], mode: str, protocol: Any, require: list[str]) -> str:
        """Why this node will not run ``argv``, or "" when it will."""
        program = argv[0] if argv else ""
        if protocol != PIPELINE_PROTOCOL:
            return f"pipeline protocol {protocol!r} is not node {self.name}'s {PIPELINE_PROTOCOL}: upgrade one side"
        if mode not in MODES:
            return f"data mode {mode!r} is not one of {', '.join(MODES)}"
        if self.exclusive is not None:
            only = os.path.basename(self.exclusive[0])
            if os.path.basename(program) != only:
                return f"program {program!r} is not allowed: node {self.name} runs only {only!r}"
        elif self.config.allow is not None and program not in self.config.allow:
            allowed = ", ".join(sorted(self.config.allow)) or "nothing"
            return f"program {program!r} is not allowed on node {self.name} (allowed: {allowed})"
        path = self._resolve(self.exclusive[0] if self.exclusive else program)
        if path is None:
            return f"program {program!r} not found on node {self.name} (not in its PATH, nor in [apps])"
        for text in require:
            try:
                name, op, want = parse_requirement(text)
            except ValueError as exc:
                return str(exc)
            if name != program:
                continue
            have = await self._version_of(program, path)
            if not have:
                return f"version of {program!r} unknown here, cannot check {text!r} (declare it in [apps.{program}])"
            if not version_satisfies(have, op, want):
                shown = ".".join(map(str, have))
                return f"{program} version {shown} on node {self.name} does not satisfy {text!r}"
        return ""

    async def _version_of(self, program: str, path: str) -> tuple[int, ...]:
        app = self.config.apps.get(program)
        if app is not None and app.version:
            return version_tuple(app.version)
        if program not in self._versions:
            self._versions[program] = await asyncio.to_thread(_probe_version, path)
        return self._versions[program]

    # -- control requests -------------------------------------------------------------------

    async def _serve_ctl(self) -> None:
        assert self._ctl is not None
        handlers = {
            "run": self._on_run,
            "negotiate": self._on_negotiate,
            "start": self._on_start,
            "cancel": self._on_cancel,
            "exit": self._on_exit,
            "info": self._on_info,
            "gossip": self._on_gossip,
        }
        while True:
            msg = await self._ctl.recv()
            if not isinstance(msg, codec.Request):
                continue
            handler = handlers.get(msg.method)
            if handler is None:
                self._ctl.reply(msg, error=f"node {self.name} has no method {msg.method!r}")
                continue
            self._spawn(self._answer(handler, msg), f"{msg.method} from {msg.src}")

    async def _answer(self, handler: Any, msg: codec.Request) -> None:
        assert self._ctl is not None
        try:
            body = await handler(msg)
        except DpipesError as exc:
            self._ctl.reply(msg, error=str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            self._ctl.reply(msg, error=f"malformed {msg.method} request: {exc!r}")
        except Exception as exc:
            log.exception("node %s: %s failed", self.name, msg.method)
            self._ctl.reply(msg, error=f"node {self.name}: internal error in {msg.method}: {exc!r}")
        else:
            self._ctl.reply(msg, body)

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
        assert self._ctl is not None
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

    async def _on_negotiate(self, msg: codec.Request) -> dict[str, Any]:
        b = msg.body
        pipeline, index, argv = str(b["pipeline"]), int(b["stage"]), [str(a) for a in b["argv"]]
        reason = await self._refusal(argv, b.get("mode", "bytes"), b.get("protocol"), list(b.get("require", [])))
        if reason:
            raise NegotiationRefused(reason)
        await self._link_neighbours(b.get("peers", {}))
        if (pipeline, index) in self._stages:
            raise NegotiationRefused(f"stage {index} of pipeline {pipeline} is already here")
        endpoint = self.hub.endpoint(f"{pipeline}.{index}")
        describe = f"stage {index} ({argv[0]}@{self.name})"
        self._stages[(pipeline, index)] = _Stage(pipeline, index, argv, b.get("mode", "bytes"), endpoint, describe)
        return {"addr": endpoint.addr}

    async def _link_neighbours(self, peers: Mapping[str, str]) -> None:
        """Make sure we link to the nodes our stage exchanges data with (directly: no relaying)."""
        missing = {n: e for n, e in peers.items() if n != self.name and n not in self.hub.peers}
        results = await asyncio.gather(
            *(self.hub.connect_peer(str(e), timeout=CONTROL_TIMEOUT_S) for e in missing.values()),
            return_exceptions=True,
        )
        for node, outcome in zip(missing, results, strict=True):
            if isinstance(outcome, BaseException):
                raise NegotiationRefused(f"node {self.name} cannot reach node {node} at {missing[node]}: {outcome}")

    async def _on_start(self, msg: codec.Request) -> dict[str, Any]:
        b = msg.body
        stage = self._stages.get((str(b["pipeline"]), int(b["stage"])))
        if stage is None:
            raise StageError(f"node {self.name}: stage {b['stage']} of pipeline {b['pipeline']} was not negotiated")
        argv = (self.exclusive + stage.argv[1:]) if self.exclusive else stage.argv
        env = dict(os.environ)
        env.update(self._stage_env(stage, b))
        from dpipes.nodes.stage_pipes import StagePipes

        stage.pipes = StagePipes(
            b.get("pipes") or {},
            pipeline=stage.pipeline,
            stage=stage.index,
            node=self.name,
            argv=stage.argv,
            bus=(self.hub.endpoint(f"{stage.pipeline}.{stage.index}.pipes"), self.hub.ipc_endpoint),
        )
        env.update(stage.pipes.env)
        stage.env = env
        program = self._resolve(argv[0]) or argv[0]
        # Two neighbours both here exchange bytes through one kernel pipe, as in a shell.
        stdin_fd = self._direct_end(stage.pipeline, stage.index - 1, reader=True) if b.get("direct_in") else None
        stdout_fd = self._direct_end(stage.pipeline, stage.index, reader=False) if b.get("direct_out") else None
        try:
            stage.proc = await self.supervisor.start(
                [program, *argv[1:]], env=env, forward_stderr=True, stdin_fd=stdin_fd, stdout_fd=stdout_fd
            )
        except BaseException:
            stage.pipes.close()
            raise
        stage.task = self._spawn(self._run_stage(stage, b), stage.describe)
        log.info("node %s: started %s pid %d", self.name, stage.describe, stage.proc.pid)
        return {"pid": stage.proc.pid, "context": stage.pipes.context}

    def _direct_end(self, pipeline: str, edge: int, *, reader: bool) -> int:
        """A stage's end of the pipe between stages ``edge`` and ``edge + 1`` of ``pipeline``, both
        on this node: made by whichever of the two starts first, which keeps the other end for the
        second (:meth:`_close_edges` closes it should the second never start)."""
        if (end := self._edges.pop((pipeline, edge), None)) is not None:
            return end
        r, w = os.pipe()
        set_pipe_size(w)
        self._edges[(pipeline, edge)] = w if reader else r
        return r if reader else w

    def _close_edges(self, pipeline: str, edges: Sequence[int] | None = None) -> None:
        """Close the kept ends of direct pipes of ``pipeline`` (all, or those numbered ``edges``)."""
        for key in [k for k in self._edges if k[0] == pipeline and (edges is None or k[1] in edges)]:
            os.close(self._edges.pop(key))

    def _stage_env(self, stage: _Stage, body: Mapping[str, Any]) -> dict[str, str]:
        host, _, port = self.hub.tcp_endpoint.removeprefix("tcp://").rpartition(":")
        return {
            "DPIPES_ADDR": host,
            "DPIPES_PORT": port,
            "DPIPES_SERVICE": f"dp.{os.path.basename(stage.argv[0])}",
            "DPIPES_NODE": self.name,
            "DPIPES_PIPELINE": stage.pipeline,
            "DPIPES_STAGE": str(stage.index),
            "DPIPES_ARGV": shlex.join(stage.argv),
            "DPIPES_USER": str(body.get("user", "")),
        }

    async def _on_cancel(self, msg: codec.Request) -> dict[str, Any]:
        pipeline, reason = str(msg.body["pipeline"]), str(msg.body.get("reason", "cancelled"))
        run = self._runs.get(pipeline)
        if run is not None and msg.src == run.client:  # the client cancels: tell every node
            await self._cancel_run(run, reason)
            return {}
        self._close_edges(pipeline)  # a neighbour that has not started will not
        stages = [s for (p, _i), s in self._stages.items() if p == pipeline]
        for stage in stages:
            stage.cancelled = stage.cancelled or reason
        await asyncio.gather(*(self._kill(s) for s in stages), return_exceptions=True)
        for stage in stages:
            if stage.proc is None:  # negotiated, never started
                self._forget(stage)
        return {"stages": len(stages)}

    async def _kill(self, stage: _Stage) -> None:
        if stage.proc is not None:
            await asyncio.wait_for(stage.proc.terminate(), CANCEL_TIMEOUT_S)

    def _forget(self, stage: _Stage) -> None:
        self._stages.pop((stage.pipeline, stage.index), None)
        if not stage.lingering:
            stage.endpoint.close()

    async def _refuse_late_input(self, stage: _Stage) -> None:
        """A stage that exited before its input arrived: cancel that input when it comes."""
        try:
            stream = await asyncio.wait_for(stage.endpoint.accept(), LATE_INPUT_S)
            stream.cancel(f"{stage.describe} exited without reading its input")
        except (TimeoutError, BusError):
            pass
        finally:
            if stage.task is not None:  # the stage's own output may still await its acknowledgement
                await asyncio.wait({stage.task})
            stage.endpoint.close()

    # -- running one stage -------------------------------------------------------------------

    async def _run_stage(self, stage: _Stage, body: Mapping[str, Any]) -> None:
        from dpipes.nodes.dataflow import Incoming, Outgoing
        from dpipes.nodes.objects import make_metadata
        from dpipes.nodes.stage_pipes import batches_of, frame_of

        proc = stage.proc
        assert proc is not None
        ep = stage.endpoint
        pipes = stage.pipes
        assert pipes is not None
        errors: list[str] = []
        sigpipe = False

        async def stdin_pump() -> None:
            stdin_from = str(body.get("stdin_from") or "")
            if not stdin_from or body.get("direct_in"):  # no input, or a pipe straight from upstream
                proc.close_stdin()
                return
            stream = None
            try:
                stream = await ep.accept()
            except asyncio.CancelledError:  # the program exited before its input arrived
                stage.lingering = True
                self._spawn(self._refuse_late_input(stage), f"late input of {stage.describe}")
                raise
            incoming = Incoming(stage.mode, where=f"input of {stage.describe}", metadata_key=self.config.metadata_key)
            try:
                while (msg := await stream.read()) is not None:
                    for frame in incoming.data(msg):
                        await proc.write_stdin(frame)
            except (StdinClosed, asyncio.CancelledError) as exc:
                stream.cancel(f"{stage.describe} closed its input")  # upstream gets SIGPIPE, as in a shell
                if isinstance(exc, asyncio.CancelledError):
                    raise
            except DpipesError as exc:  # the bus failed, or the data was not of the edge's mode
                if not stage.cancelled:
                    errors.append(f"input: {exc}")
                stream.cancel(str(exc))
                await proc.terminate()
            finally:
                proc.close_stdin()

        async def stdout_pump() -> None:
            nonlocal sigpipe
            if body.get("direct_out"):  # a pipe straight to downstream: nothing passes through us
                return
            out = ep.open_stream(str(body["stdout_to"]))
            host, _, port = self.hub.tcp_endpoint.removeprefix("tcp://").rpartition(":")
            shared = {k: stage.env[k] for k in self.config.metadata_environ if k in stage.env}
            meta = make_metadata(
                addr=host,
                port=int(port or 0),
                service=os.path.basename(stage.argv[0]),
                node=self.name,
                stage=stage.index,
                argv=list(stage.argv) if self.config.metadata_argv else None,
                environ=shared if self.config.metadata_environ else None,
            )
            outgoing = Outgoing(stage.mode, where=stage.describe, meta=meta)
            try:
                if pipes.channel == "stdout":  # messages among the program's output: take them out
                    while True:
                        raw = await proc.read_stdout()
                        data, frames = pipes.split(raw, end=not raw)
                        await send_pipes(frames)
                        if data:
                            for message in outgoing.messages(data):
                                await out.send(message)
                        if not raw:
                            break
                    for message in outgoing.end():
                        await out.send(message)
                elif stage.mode == "bytes":  # the hot path: no per-chunk objects
                    while data := await proc.read_stdout():
                        await out.send_bytes(data)
                else:
                    while data := await proc.read_stdout():
                        for message in outgoing.messages(data):
                            await out.send(message)
                    for message in outgoing.end():
                        await out.send(message)
                await out.close()
            except StreamCancelled:
                sigpipe = True  # downstream is gone: the program gets SIGPIPE, as in a shell
                proc.close_stdout()
            except DpipesError as exc:  # the bus failed, or the program wrote something not an object
                if not stage.cancelled:
                    errors.append(f"output: {exc}" if isinstance(exc, BusError) else str(exc))
                out.cancel(str(exc))
                proc.close_stdout()
                await proc.terminate()

        pipes_out: list[OutStream] = []  # opened at the first message

        async def send_pipes(frames: list[bytes]) -> None:
            if not pipes_out:
                pipes_out.append(ep.open_stream(str(body["stderr_to"])))
            for batch in batches_of(frames):
                await pipes_out[0].send(codec.Pipes(stage=stage.index, frames=batch))

        async def stderr_pump() -> None:
            out = None
            split = pipes.channel == "stderr"
            try:
                while True:
                    raw = await proc.read_stderr()
                    data = raw
                    if split:  # messages among the program's stderr: take them out
                        data, frames = pipes.split(raw, end=not raw)
                        await send_pipes(frames)
                    if data:
                        if out is None:
                            out = ep.open_stream(str(body["stderr_to"]))
                        await out.send(codec.Stderr(frames=(data,)))
                    if not raw:
                        break
                if out is not None:
                    await out.close()
            except BusError as exc:
                log.info("node %s: %s: stderr not delivered: %s", self.name, stage.describe, exc)

        sending = asyncio.Lock()  # the FIFO's and the bus's messages share one stream to the client

        async def pipes_pump(reader: PipesFifoReader | PipesBusReader) -> None:
            reader.start()
            try:
                while batch := await reader.next_batch():
                    async with sending:
                        await send_pipes([frame_of(record) for record in batch])
            except BusError as exc:
                log.info("node %s: %s: Pipes messages not delivered: %s", self.name, stage.describe, exc)

        async def close_pipes() -> None:
            if pipes_out:
                await pipes_out[0].close()

        readers = [pipes.boot.channel, *([pipes.bus] if pipes.bus else [])] if pipes.channel == "file" else []
        try:
            pumps = [asyncio.create_task(p()) for p in (stdin_pump, stdout_pump, stderr_pump)]
            pumps += [asyncio.create_task(pipes_pump(r)) for r in readers]
            status = await proc.wait()
            if not pumps[0].done():
                pumps[0].cancel()  # nobody will read what still comes: refuse it as a closed pipe
            # The program is gone: read its messages to the end (bounded, should a descendant hold on).
            await asyncio.gather(*(r.drain() for r in readers), return_exceptions=True)
            await asyncio.gather(*pumps, return_exceptions=True)
            with contextlib.suppress(BusError):
                await close_pipes()
        except asyncio.CancelledError:
            for p in pumps:
                p.cancel()
            raise
        finally:
            self._forget(stage)
            self._close_edges(stage.pipeline, (stage.index - 1, stage.index))  # a neighbour that never started
            pipes.close()
        tail = proc.stderr_tail[-STDERR_TAIL_REPORT_BYTES:].decode(errors="replace") if not status.ok else ""
        report = {
            "pipeline": stage.pipeline,
            "stage": stage.index,
            "node": self.name,
            "code": status.code if status.code is not None else -1,
            "signal": status.signal or 0,
            "status": status.describe(),
            "sigpipe": sigpipe or status.signal == signal.SIGPIPE,
            "error": "; ".join(errors) or (f"cancelled: {stage.cancelled}" if stage.cancelled else ""),
            "stderr_tail": tail,
        }
        log.info("node %s: %s %s", self.name, stage.describe, status.describe())
        await asyncio.gather(*(self._report(addr, report) for addr in body.get("report_to", [])))
        if self.exit_after_one:
            self.stop()

    async def _report(self, addr: str, report: dict[str, Any]) -> None:
        assert self._ctl is not None
        try:
            await self._ctl.request(str(addr), "exit", report, timeout=REPORT_TIMEOUT_S)
        except BusError as exc:
            log.warning(
                "node %s: exit report of stage %s not delivered to %s: %s", self.name, report["stage"], addr, exc
            )

    # -- coordinating a pipeline (this node is its entry) ----------------------------------

    def _offered_elsewhere(self, program: str, refused_by: str) -> str:
        """A hint naming the other nodes that offer ``program`` (pin the stage to one: PROG@NODE)."""
        others = sorted(n for n, info in self.table().items() if n != refused_by and program in info.programs)
        return f" (offered by {', '.join(others)}: pin it with {program}@{others[0]})" if others else ""

    def table(self) -> dict[str, NodeInfo]:
        """What this node knows of every node, for placement."""
        from dpipes.nodes.pipeline import NodeInfo

        table = {self.name: NodeInfo(self.name, frozenset(self.offered()))}
        for name, peer in self.hub.peers.items():
            programs = peer.info.get("programs", []) if isinstance(peer.info, dict) else []
            table[name] = NodeInfo(name, frozenset(p for p in programs if isinstance(p, str)))
        return table

    async def _on_run(self, msg: codec.Request) -> dict[str, Any]:
        token = msg.body.get("local_fds")
        handed = await self._fd_drop.take(str(token)) if token and self._fd_drop is not None else {}
        try:
            return await self._start_run(msg, handed)
        finally:
            for fd in handed.values():  # what no stage took: the client's data goes over the bus
                os.close(fd)

    async def _start_run(self, msg: codec.Request, handed: dict[str, int]) -> dict[str, Any]:
        """Parse, place, negotiate, start; ``handed``: the local client's descriptors, by name (a
        stage that uses one takes it out)."""
        from dpipes.nodes.pipeline import PipelineSyntaxError, PlacementError, parse_pipeline, place

        assert self._ctl is not None
        b = msg.body
        mode = b.get("mode", "bytes")
        if mode not in MODES:
            raise StageError(f"data mode {mode!r} is not one of {', '.join(MODES)}")
        require = [str(r) for r in b.get("require", [])]
        for text in require:
            parse_requirement(text)  # a bad --require is the user's error, before anything else
        try:
            stages = parse_pipeline(str(b["pipeline"]))
        except PipelineSyntaxError as exc:
            raise StageError(str(exc)) from None
        if len(stages) > self.config.limits.max_stages:
            raise StageError(f"{len(stages)} stages, more than this node's limit of {self.config.limits.max_stages}")
        check_stage_options(b.get("pipes") or {}, len(stages))
        try:
            nodes = place(stages, self.table(), local=self.name)
        except PlacementError as exc:
            raise StageError(str(exc)) from None
        pipeline = uuid.uuid4().hex[:12]
        run = _Run(pipeline, msg.src, stages, nodes)
        self._runs[pipeline] = run

        def describe(i: int) -> str:
            return f"stage {i} ({stages[i].argv[0]}@{nodes[i]})"

        negotiations = await asyncio.gather(
            *(
                self._ctl.request(
                    f"{node}/{CTL}",
                    "negotiate",
                    {
                        "pipeline": pipeline,
                        "stage": i,
                        "argv": list(stages[i].argv),
                        "mode": mode,
                        "protocol": b.get("protocol", PIPELINE_PROTOCOL),
                        "require": require,
                        "peers": self._endpoints_of(nodes[max(0, i - 1) : i + 2]),
                    },
                    timeout=CONTROL_TIMEOUT_S,
                )
                for i, node in enumerate(nodes)
            ),
            return_exceptions=True,
        )
        refusals = [
            f"{describe(i)}: {_strip_failed(str(r))}{self._offered_elsewhere(stages[i].argv[0], nodes[i])}"
            for i, r in enumerate(negotiations)
            if isinstance(r, BaseException)
        ]
        if refusals:
            await self._cancel_run(run, "negotiation refused", notify=False)
            raise NegotiationRefused("refused before anything started:\n  " + "\n  ".join(refusals))
        addrs = [r["addr"] for r in negotiations]  # type: ignore[index]
        client = msg.src
        # Which edges are kernel pipes: neighbours on one node, and, with what a client on this
        # host handed over, its stdin to a first stage here and a last stage here to its stdout.
        direct = [_direct_edge(b, [*nodes, self.name], i) for i in range(len(nodes))]
        stdin_direct = "stdin" in handed and bool(b.get("stdin")) and nodes[0] == self.name and mode == "bytes"
        stdout_direct = "stdout" in handed and direct[-1]
        if stdin_direct:
            self._edges[(pipeline, -1)] = handed.pop("stdin")
        if stdout_direct:
            self._edges[(pipeline, len(nodes) - 1)] = handed.pop("stdout")
        starts = await asyncio.gather(
            *(
                self._ctl.request(
                    f"{node}/{CTL}",
                    "start",
                    {
                        "pipeline": pipeline,
                        "stage": i,
                        "stdin_from": (addrs[i - 1] if i else (client if b.get("stdin") else "")),
                        "stdout_to": addrs[i + 1] if i + 1 < len(addrs) else client,
                        "stderr_to": client,
                        "report_to": [client, self._ctl.addr],
                        "user": b.get("user", ""),
                        "pipes": options_for_stage(b.get("pipes") or {}, i),
                        "direct_in": direct[i - 1] if i else stdin_direct,
                        "direct_out": direct[i] if i + 1 < len(nodes) else stdout_direct,
                    },
                    timeout=CONTROL_TIMEOUT_S,
                )
                for i, node in reversed(list(enumerate(nodes)))  # downstream first: readers ready
            ),
            return_exceptions=True,
        )
        failures = [r for r in starts if isinstance(r, BaseException)]
        if failures:
            await self._cancel_run(run, "start failed", notify=False)
            self._close_edges(pipeline)
            raise StageError("could not start the pipeline: " + "; ".join(_strip_failed(str(f)) for f in failures))
        contexts = list(reversed(starts))  # started downstream first
        return {
            "pipeline": pipeline,
            "stdin_direct": stdin_direct,  # the client does not feed the first stage
            "stdout_direct": stdout_direct,  # nor does output come to it: the last stage writes there
            "stages": [
                {
                    "index": i,
                    "node": nodes[i],
                    "argv": list(stages[i].argv),
                    "addr": addrs[i],
                    "context": contexts[i].get("context", {}),
                }
                for i in range(len(stages))
            ],
        }

    def _endpoints_of(self, nodes: list[str]) -> dict[str, str]:
        """Where each of ``nodes`` listens, as this node knows it (itself included)."""
        out = {}
        peers = self.hub.peers
        for node in nodes:
            if node == self.name:
                out[node] = self.hub.advertised_endpoint
            elif node in peers:
                out[node] = peers[node].endpoint
        return out

    async def _cancel_run(self, run: _Run, reason: str, *, notify: bool = True) -> None:
        assert self._ctl is not None
        if notify and not run.failed:
            run.failed = reason
        await asyncio.gather(
            *(
                self._ctl.request(
                    f"{node}/{CTL}", "cancel", {"pipeline": run.pipeline, "reason": reason}, timeout=CANCEL_TIMEOUT_S
                )
                for node in sorted(set(run.nodes))
                if node in self.hub.peers or node == self.name
            ),
            return_exceptions=True,
        )
        if not notify:
            self._runs.pop(run.pipeline, None)

    async def _on_exit(self, msg: codec.Request) -> dict[str, Any]:
        run = self._runs.get(str(msg.body.get("pipeline")))
        if run is not None:
            index = int(msg.body["stage"])
            run.exited.add(index)
            error = str(msg.body.get("error", ""))
            if error and not run.failed and not error.startswith("cancelled"):
                # A stage that could not move its data dooms the rest: stop them rather than wait.
                self._spawn(self._cancel_run(run, f"stage {index} failed: {error}"), f"cancel {run.pipeline}")
            if len(run.exited) == len(run.stages):
                self._runs.pop(run.pipeline, None)
        return {}

    def _on_link(self, node: str, up: bool, reason: str) -> None:
        if up:
            self._gossip()  # a new neighbour: share what we know at once, so the mesh closes fast
            return
        for run in list(self._runs.values()):
            if node in run.nodes and not run.failed:
                stages = ", ".join(f"stage {i} ({run.stages[i].argv[0]})" for i, n in enumerate(run.nodes) if n == node)
                error = f"node {node!r} lost ({reason}) while running {stages}"
                lost = [i for i, n in enumerate(run.nodes) if n == node]
                self._spawn(self._fail_run(run, error, lost), f"fail {run.pipeline}")

    def _on_client_gone(self, addr: str) -> None:
        for run in list(self._runs.values()):
            if run.client == addr and not run.failed:
                self._spawn(self._cancel_run(run, f"client {addr} went away"), f"cancel {run.pipeline}")

    async def _fail_run(self, run: _Run, error: str, lost: list[int]) -> None:
        assert self._ctl is not None
        run.failed = error
        run.exited.update(lost)  # no report will come from a lost node
        log.warning("node %s: pipeline %s failed: %s", self.name, run.pipeline, error)
        with contextlib.suppress(BusError):
            await self._ctl.request(
                run.client, "failed", {"pipeline": run.pipeline, "error": error, "lost": lost}, timeout=REPORT_TIMEOUT_S
            )
        await self._cancel_run(run, error)


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


def _strip_failed(message: str) -> str:
    """Drop the transport's "METHOD at ADDR failed: " prefix: the stage description says where."""
    return re.sub(r"^\w+ at \S+ failed: ", "", message)


def _direct_edge(run: Mapping[str, Any], nodes: list[str], i: int) -> bool:
    """Whether stages ``i`` and ``i + 1`` exchange data through a kernel pipe rather than the bus:
    both on one node, bytes mode (object modes add metadata on the way), and stage ``i``'s stdout
    is not a Pipes channel (which the node reads)."""
    messages = options_for_stage(run.get("pipes") or {}, i).get("messages")
    return nodes[i] == nodes[i + 1] and run.get("mode", "bytes") == "bytes" and messages != "stdout"


def _zmq_host(host: str) -> str:
    return "*" if host in ("0.0.0.0", "", "*") else host


def _probe_version(path: str) -> tuple[int, ...]:
    """The version a program prints for ``--version`` (first number on its first line)."""
    import subprocess

    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, timeout=VERSION_PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    first = (out.stdout or out.stderr).decode(errors="replace").splitlines()[:1]
    return version_tuple(first[0]) if first else ()


__all__ = ["NegotiationRefused", "Node", "parse_requirement"]
