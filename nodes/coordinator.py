"""Pipeline coordination: the runs this node is entry for.

A client's ``run`` request comes to its entry node, whose :class:`Coordinator`:

1. checks the protocol version, parses the pipeline and checks what the user gave (``--require``,
   Pipes options, the node's ``[limits] max_stages``), each refusal with its code (``protocol``,
   ``syntax``, ``bad-request`` naming the field, ``limit``);
2. places every stage (:func:`~dpipes.nodes.pipeline.place`, over the node table it is given;
   ``placement`` when it cannot);
3. negotiates with every chosen node at once, naming the client it asks for (``negotiate.caller``,
   protocol: *Who asks*); one refusal aborts the run before anything starts,
   and the error lists every refused stage, naming the other nodes that offer its program (coded
   ``refused``, or the one code every refusal shares);
4. starts every stage, downstream first, so that each reader is ready before its writer; one
   failure cancels what started;
5. tracks the run until every stage has reported its exit: a stage that reports an ``error`` (its
   data could not be moved) cancels the rest, a lost node fails the run (``failed`` to the client,
   naming the stages that will never report), and a client that goes away cancels it.

Where each stage starts is decided here too (protocol: *Working directories*): in the client's
directory on the client's host, which is this node's when the client attached over ipc.

A run is a graph (:mod:`dpipes.nodes.workflow`): a workflow's stages and connections, or a linear
pipeline's (each stage's output to the next one's input); each stage's wiring (``stdin_from`` and
``stdout_to`` for a program, ``inputs`` and ``outputs`` for a plugin) comes from it. Which edges
are kernel pipes rather than bus streams is decided here: in a linear pipeline, neighbouring
programs on one node in bytes mode, and, when the client is on this host and handed its stdin and stdout over, its first
stage's input and last stage's output (:mod:`dpipes.nodes.fdpass`). And whether the client reads
the last stage's output from that stage's node itself (``run.direct_read``): then the last stage
holds its stdout under a one-time token, which the reply gives the client with that node's
endpoint, until the client claims it there, or through us should it not get through.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import secrets
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import DpipesError, StageError
from dpipes.bus.hub import Hub
from dpipes.bus.trust import IdentityKind
from dpipes.nodes.config import NodeConfig
from dpipes.nodes.fdpass import FdDrop
from dpipes.nodes.pipes_options import check_stage_options, options_for_stage
from dpipes.nodes.policy import LOCAL_CALLER_PREFIX, parse_requirement
from dpipes.nodes.protocol import (
    BAD_REQUEST,
    CONTROL_TIMEOUT_S,
    LIMIT,
    MAX_TEXT_CHARS,
    PIPELINE_PROTOCOL,
    PLACEMENT,
    PROTOCOL,
    REFUSED,
    REPORT_TIMEOUT_S,
    SYNTAX,
    UNAUTHORIZED,
    UNREACHABLE,
    CancelRequest,
    ControlError,
    ExitReport,
    FailedReport,
    NegotiateReply,
    NegotiateRequest,
    RunReply,
    RunRequest,
    StageInfo,
    StartReply,
    StartRequest,
    call,
    host_identity,
)
from dpipes.nodes.stage import DirectPipes
from dpipes.nodes.stages import NegotiationRefused

if TYPE_CHECKING:
    from dpipes.nodes.pipeline import NodeInfo, StageSpec
    from dpipes.nodes.workflow import Graph

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 10.0  # a node terminates (TERM, grace, KILL) all stages of a pipeline within this
FAILED_REPORT_CHARS = 4 * MAX_TEXT_CHARS  # the bound of a ``failed`` report's error
CLAIM_TOKEN_BYTES = 24  # a ``claim`` token's randomness: not guessable while the output waits

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


@dataclasses.dataclass
class Run:
    """A pipeline this node coordinates."""

    pipeline: str
    client: str
    stages: list[StageSpec]
    nodes: list[str]
    exited: set[int] = dataclasses.field(default_factory=set)
    failed: str = ""  # why the run failed as a whole; "" while it has not
    lost_nodes: set[str] = dataclasses.field(default_factory=set)  # nodes whose loss the client was told


class Coordinator:
    """The runs this node is entry for.

    Args:
        node: this node's name.
        hub: its hub (who is linked, and where they listen).
        config: the node's configuration (``[limits]``).
        ctl: the node's control endpoint, which asks the other nodes.
        table: what this node knows of every node, for placement.
        direct: the kept ends of kernel pipes, where a local client's stdin and stdout go.
        fd_drop: where local clients hand their stdin and stdout over, if this node has one.
        spawn: starts a task the node tracks (and cancels when it closes).
    """

    def __init__(
        self,
        *,
        node: str,
        hub: Hub,
        config: NodeConfig,
        ctl: Endpoint,
        table: Callable[[], Mapping[str, NodeInfo]],
        direct: DirectPipes,
        fd_drop: FdDrop | None,
        spawn: Spawn,
    ) -> None:
        self.node = node
        self.hub = hub
        self.config = config
        self.ctl = ctl
        self.table = table
        self.direct = direct
        self.fd_drop = fd_drop
        self._spawn = spawn
        self.runs: dict[str, Run] = {}
        self._owner = ""  # our local user's client key fingerprint, read (or made) at the first need
        self.host = host_identity()  # stages on nodes of this host start where a local client is

    # -- run: parse, place, negotiate, start -----------------------------------------------

    async def run(self, request: RunRequest, client: str) -> RunReply:
        """Answer the ``run`` request of the client at ``client``: the pipeline id and its stages.

        Raises:
            ControlError: the pipeline was refused (its code says why); nothing runs.
        """
        token = request.local_fds
        handed = await self.fd_drop.take(token) if token and self.fd_drop is not None else {}
        try:
            return await self._start(request, client, handed)
        finally:
            for fd in handed.values():  # what no stage took: the client's data goes over the bus
                os.close(fd)

    def _parse(self, request: RunRequest) -> Graph:
        """The stages of ``request`` and how they connect (a linear pipeline, or a workflow's
        graph), once every check that needs no other node has passed."""
        from dpipes.nodes.pipeline import PipelineSyntaxError, parse_pipeline
        from dpipes.nodes.workflow import Graph, WorkflowError, parse_workflow

        if request.protocol != PIPELINE_PROTOCOL:
            theirs = f"pipeline protocol {request.protocol!r}"
            raise ControlError(PROTOCOL, f"{theirs} is not node {self.node}'s {PIPELINE_PROTOCOL}: upgrade one side")
        for i, text in enumerate(request.require):
            try:
                parse_requirement(text)  # a bad --require is the user's error, before anything else
            except ValueError as exc:
                raise ControlError(BAD_REQUEST, str(exc), field=f"require.{i}") from None
        try:
            if request.workflow:
                graph = parse_workflow(request.workflow, stdin=request.stdin)
            else:
                graph = Graph.from_pipeline(parse_pipeline(request.pipeline), stdin=request.stdin)
        except (PipelineSyntaxError, WorkflowError) as exc:
            raise ControlError(SYNTAX, str(exc)) from None
        stages = graph.stages
        limit = self.config.limits.max_stages
        if len(stages) > limit:
            raise ControlError(LIMIT, f"{len(stages)} stages, more than this node's limit of {limit}")
        try:
            check_stage_options(request.pipes, len(stages))
        except StageError as exc:
            raise ControlError(BAD_REQUEST, str(exc), field="pipes") from None
        return graph

    async def _start(self, request: RunRequest, client: str, handed: dict[str, int]) -> RunReply:
        """Parse, place, negotiate, start; ``handed``: the local client's descriptors, by name (a
        stage that uses one takes it out)."""
        from dpipes.nodes.pipeline import PlacementError, placements

        graph = self._parse(request)
        stages = graph.stages
        caller_for = self._callers(client)
        try:
            placed = placements(stages, self.table(), local=self.node)
        except PlacementError as exc:
            raise ControlError(PLACEMENT, str(exc)) from None
        nodes = [p.node for p in placed]
        for i, p in enumerate(placed):
            log.info("node %s: stage %d (%r) to %s: %s %r", self.node, i, stages[i].program, p.node, p.why, p.offer)
        pipeline = uuid.uuid4().hex[:12]
        run = Run(pipeline, client, stages, nodes)
        self.runs[pipeline] = run

        def describe(i: int) -> str:
            return f"stage {i} ({stages[i].argv[0]}@{nodes[i]})"

        negotiations = await asyncio.gather(
            *(
                call(
                    self.ctl,
                    node,
                    NegotiateRequest(
                        pipeline=pipeline,
                        stage=i,
                        argv=tuple(stages[i].argv),
                        protocol=request.protocol,
                        mode=request.mode,
                        require=request.require,
                        user=request.user,
                        peers=self._endpoints_of([nodes[j] for j in graph.neighbours(i)]),
                        pinned=stages[i].node is not None,
                        config=graph.configs[i],
                        caller=caller_for(node),
                    ),
                    timeout=CONTROL_TIMEOUT_S,
                )
                for i, node in enumerate(nodes)
            ),
            return_exceptions=True,
        )
        refused = [(i, r) for i, r in enumerate(negotiations) if isinstance(r, BaseException)]
        if refused:
            await self.cancel(run, "negotiation refused", notify=False)
            lines = [
                f"{describe(i)}: {_strip_failed(str(r))}{self._offered_elsewhere(stages[i].argv[0], nodes[i])}"
                for i, r in refused
            ]
            raise NegotiationRefused(
                "refused before anything started:\n  " + "\n  ".join(lines), code=_code_of(r for _i, r in refused)
            )
        addrs = [r.addr for r in negotiations if isinstance(r, NegotiateReply)]
        cwds = self._working_dirs(request, client, [r.host for r in negotiations if isinstance(r, NegotiateReply)])
        # Which edges are kernel pipes: neighbours on one node, and, with what a client on this
        # host handed over, its stdin to a first stage here and a last stage here to its stdout.
        direct = [graph.linear and _direct_edge(request, [*nodes, self.node], i, graph) for i in range(len(nodes))]
        stdin_direct = (
            "stdin" in handed
            and graph.stdin_to is not None
            and graph.linear
            and nodes[0] == self.node
            and request.mode == "bytes"
        )
        stdout_direct = "stdout" in handed and direct[-1]
        if stdin_direct:
            self.direct.keep(pipeline, -1, handed.pop("stdin"))
        if stdout_direct:
            self.direct.keep(pipeline, len(nodes) - 1, handed.pop("stdout"))
        edge_format = request.edge_format if request.mode == "bytes" else "ndjson"  # object modes: objects
        read = self._direct_read(request, graph, nodes)
        token = secrets.token_urlsafe(CLAIM_TOKEN_BYTES) if read else ""

        def wiring(i: int) -> StartRequest:
            stdin_from, stdout_to = graph.program_edges(i, addrs, client)
            inputs, outputs = (
                graph.plugin_edges(i, addrs, client, edge_format=edge_format) if graph.is_plugin(i) else ((), ())
            )
            return StartRequest(
                pipeline=pipeline,
                stage=i,
                stdin_from=stdin_from,
                stdout_to=stdout_to,
                stderr_to=client,
                report_to=(client, self.ctl.addr),
                user=request.user,
                pipes=options_for_stage(request.pipes, i),
                direct_in=direct[i - 1] if i else stdin_direct,
                direct_out=direct[i] if i + 1 < len(nodes) else stdout_direct,
                cwd=cwds[i],
                progress_to=client if request.progress else "",
                inputs=inputs,
                outputs=outputs,
                stdout_token=token if i == len(nodes) - 1 else "",
            )

        starts = await asyncio.gather(
            *(
                call(self.ctl, node, wiring(i), timeout=CONTROL_TIMEOUT_S)
                for i, node in reversed(list(enumerate(nodes)))  # downstream first: readers ready
            ),
            return_exceptions=True,
        )
        by_stage = list(reversed(starts))  # started downstream first
        failures = [r for r in by_stage if isinstance(r, BaseException)]
        if failures:
            await self.cancel(run, "start failed", notify=False)
            self.direct.close(pipeline)
            named = [
                f"{describe(i)}: {_strip_failed(str(r))}"
                for i, r in enumerate(by_stage)
                if isinstance(r, BaseException)
            ]
            message = "could not start the pipeline: " + "; ".join(named)
            raise ControlError(_code_of(failures), message)
        contexts = [r.context for r in by_stage if isinstance(r, StartReply)]
        return RunReply(
            pipeline=pipeline,
            stdin_direct=stdin_direct,  # the client does not feed the first stage
            stdout_direct=stdout_direct,  # nor does output come to it: the last stage writes there
            stages=tuple(
                StageInfo(
                    index=i,
                    node=nodes[i],
                    argv=tuple(stages[i].argv),
                    addr=addrs[i],
                    context=contexts[i],
                    placed=placed[i].why,
                    offer=placed[i].offer,
                )
                for i in range(len(stages))
            ),
            read_endpoint=read[0] if read else "",
            read_key=read[1] if read else "",
            read_token=token,
        )

    def _direct_read(self, request: RunRequest, graph: Graph, nodes: Sequence[str]) -> tuple[str, str] | None:
        """Where the client may read the last stage's stdout itself (its node's bus endpoint, and
        the key that node authenticated with here, "" without keys), or None: through us.

        Offered when the client asks (``direct_read``), the pipeline is linear, its last stage is
        a program on another node, and that node is linked to us at an address a client can dial.
        The client then learns the node's key from us: whatever path it takes, its data passes
        nodes it trusts through us already, and a forged key only makes its connection fail.
        """
        last = len(nodes) - 1
        if not (request.direct_read and graph.linear and not graph.is_plugin(last) and nodes[last] != self.node):
            return None
        node = nodes[last]
        peer = self.hub.peers.get(node)
        if peer is None or not peer.up or not peer.endpoint.startswith("tcp://") or "://*:" in peer.endpoint:
            return None
        key = self.hub.peer_key(node)
        if self.hub.secure and key is None:
            return None
        return peer.endpoint, key.z85 if key is not None else ""

    def _callers(self, client: str) -> Callable[[str], str]:
        """``negotiate.caller`` for each node, for the client at ``client`` (protocol: *Who asks*).

        Raises:
            ControlError: ``unauthorized``: nobody this node knows holds ``client``.
        """
        who = self.hub.identity_of(client)
        if who is None:
            raise ControlError(UNAUTHORIZED, f"node {self.node} cannot tell who {client!r:.120} is")
        if who.kind is IdentityKind.KEY:
            return lambda node: who.fingerprint
        if who.kind is IdentityKind.LOCAL_USER:
            local = f"{LOCAL_CALLER_PREFIX}{who.uid}"
            return lambda node: local if node == self.node else self._owner_fingerprint()
        return lambda node: ""  # no keys here: nobody is authenticated

    def _owner_fingerprint(self) -> str:
        """Our local user's client key, as the other nodes know it (``client.key`` in our key directory)."""
        if not self._owner:
            from dpipes.nodes.security import owner_client_fingerprint

            self._owner = owner_client_fingerprint(self.config)
        return self._owner

    def _working_dirs(self, request: RunRequest, client: str, hosts: Sequence[str]) -> list[str]:
        """Each stage's ``start.cwd`` (protocol: *Working directories*): the client's directory
        for stages on its host, when it attached here over ipc; ``--cwd`` on top, for every stage."""
        here = self.hub.client_is_local(client) and bool(request.cwd)
        out = []
        for host in hosts:
            base = request.cwd if here and host == self.host else ""
            out.append(os.path.join(base, request.workdir) if request.workdir else base)
        return out

    def _offered_elsewhere(self, program: str, refused_by: str) -> str:
        """A hint naming the other nodes that offer ``program`` (pin the stage to one: PROG@NODE)."""
        from dpipes.nodes.pipeline import offer_matches

        others = sorted(
            n
            for n, info in self.table().items()
            if n != refused_by and any(offer_matches(o, [program]) for o in info.programs)
        )
        return f" (offered by {', '.join(others)}: pin it with {program}@{others[0]})" if others else ""

    def _endpoints_of(self, nodes: list[str]) -> dict[str, str]:
        """Where each of ``nodes`` listens, as this node knows it (itself included)."""
        out = {}
        peers = self.hub.peers
        for node in nodes:
            if node == self.node:
                out[node] = self.hub.advertised_endpoint
            elif node in peers:
                out[node] = peers[node].endpoint
        return out

    # -- the run's life: cancel, exits, losses ----------------------------------------------

    def client_cancels(self, pipeline: str, src: str) -> Run | None:
        """The run ``src`` may cancel as its client, or None (then only this node's stages stop)."""
        run = self.runs.get(pipeline)
        return run if run is not None and src == run.client else None

    async def cancel(self, run: Run, reason: str, *, notify: bool = True) -> None:
        """Cancel every stage of ``run`` on every node still reachable. ``notify`` false: the run
        never started, and is forgotten at once (no stage will report)."""
        if notify and not run.failed:
            run.failed = reason
        cancel = CancelRequest(pipeline=run.pipeline, reason=reason[:MAX_TEXT_CHARS])
        await asyncio.gather(
            *(
                call(self.ctl, node, cancel, timeout=CANCEL_TIMEOUT_S)
                for node in sorted(set(run.nodes))
                if node in self.hub.peers or node == self.node
            ),
            return_exceptions=True,
        )
        if not notify:
            self.runs.pop(run.pipeline, None)

    def on_exit(self, report: ExitReport) -> None:
        """A stage's exit report: a stage whose data could not be moved dooms the rest."""
        run = self.runs.get(report.pipeline)
        if run is None:
            return
        run.exited.add(report.stage)
        if report.error and not run.failed:  # a cancelled stage reports ``cancelled``, not an error
            reason = f"stage {report.stage} failed: {report.error}"
            self._spawn(self.cancel(run, reason), f"cancel {run.pipeline}")
        if len(run.exited) == len(run.stages):
            self.runs.pop(run.pipeline, None)

    def on_link_lost(self, node: str, reason: str) -> None:
        """``node`` is gone: every run with a stage there fails (its other stages are cancelled).

        A run already being cancelled is included: a neighbour of the lost node may have seen it
        first and failed its own stage, whose report started the cancel; the lost node's stages
        may never report to the client, which must hear that rather than wait for them for ever.
        """
        for run in list(self.runs.values()):
            if node not in run.nodes or node in run.lost_nodes:
                continue
            run.lost_nodes.add(node)
            # Every stage there, reported to us or not: its report to the client may have been lost
            # with the node (the client keeps the status of a stage whose report it has).
            lost = [i for i, n in enumerate(run.nodes) if n == node]
            stages = ", ".join(f"stage {i} ({run.stages[i].argv[0]})" for i in lost)
            error = f"node {node!r} lost ({reason}) while running {stages}"
            self._spawn(self._fail(run, error, lost), f"fail {run.pipeline}")

    def on_client_gone(self, addr: str) -> None:
        """The client at ``addr`` went away: its runs are cancelled."""
        for run in list(self.runs.values()):
            if run.client == addr and not run.failed:
                self._spawn(self.cancel(run, f"client {addr} went away"), f"cancel {run.pipeline}")

    async def _fail(self, run: Run, error: str, lost: list[int]) -> None:
        run.failed = error
        run.exited.update(lost)  # no report will come from a lost node
        if len(run.exited) == len(run.stages):
            self.runs.pop(run.pipeline, None)
        log.warning("node %s: pipeline %s failed: %s", self.node, run.pipeline, error)
        report = FailedReport(pipeline=run.pipeline, error=error[:FAILED_REPORT_CHARS], lost=tuple(lost))
        with contextlib.suppress(DpipesError):  # the client is gone, or refused it: nobody else to tell
            await call(self.ctl, run.client, report, timeout=REPORT_TIMEOUT_S)
        await self.cancel(run, error)


def _strip_failed(message: str) -> str:
    """Drop the transport's "METHOD at ADDR failed: " prefix: the stage description says where."""
    return re.sub(r"^\w+ at \S+ failed: ", "", message)


def _code_of(failures: Iterable[BaseException]) -> str:
    """The code of a run that failed at these nodes: the one they share, else ``refused``."""
    codes = {f.code if isinstance(f, ControlError) else UNREACHABLE for f in failures}
    return codes.pop() if len(codes) == 1 else REFUSED


def _direct_edge(run: RunRequest, nodes: Sequence[str], i: int, graph: Graph) -> bool:
    """Whether stages ``i`` and ``i + 1`` exchange data through a kernel pipe rather than the bus:
    both on one node, bytes mode (object modes add metadata on the way), the node does not read
    stage ``i``'s stdout (not a Pipes channel, not the last stage's output sent as ``stdio``
    messages; ``nodes`` ends with the client's node: stage ``i + 1`` may be the client). A plugin
    stage's worker takes its end of such a pipe too (nodes/plugins/direct.py)."""
    own = options_for_stage(run.pipes, i)
    read = not graph.is_plugin(i) and (
        own.get("messages") == "stdout" or (i == len(nodes) - 2 and bool(own.get("stdio")))
    )
    return nodes[i] == nodes[i + 1] and run.mode == "bytes" and not read


__all__ = ["Coordinator", "Run"]
