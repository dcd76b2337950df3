"""The stages this node runs: its side of ``negotiate``, ``start`` and ``cancel``.

:class:`Stages` owns every stage of any pipeline on this node, from the negotiation that reserves
its endpoint to the exit report that ends it:

* ``negotiate`` asks the :class:`~dpipes.nodes.policy.Policy` (a refusal is a
  :class:`NegotiationRefused` carrying the refusal's code), links to the nodes its neighbours run
  on (data goes straight between them, never relayed), and reserves the stage's endpoint
  ``<node>/<pipeline>.<index>``, whose window is ``[limits] credit_bytes``;
* ``start`` forks the program under the node's supervisor, in its environment and with its Pipes
  bootstrap, and runs it (:class:`~dpipes.nodes.stage.StageRun`) in a task; when it has exited,
  the report goes to every ``report_to`` address;
* ``cancel`` marks every stage of a pipeline cancelled (with the reason) and terminates its
  process group, bounded.

A stage whose program exited before its input arrived keeps its endpoint ``LATE_INPUT_S`` more to
cancel that input when it comes, so its producer sees a closed pipe rather than silence.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, StageError
from dpipes.bus.hub import Hub
from dpipes.nodes.config import NodeConfig
from dpipes.nodes.policy import Policy
from dpipes.nodes.stage import DirectPipes, ExitReport, Stage, StageRun, Wiring
from dpipes.nodes.supervisor import Supervisor

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 10.0  # linking to a neighbour's node during negotiation
REPORT_TIMEOUT_S = 5.0  # an exit report nobody acknowledges is logged and dropped after this
CANCEL_TIMEOUT_S = 10.0  # terminate (TERM, grace, KILL) one stage
LATE_INPUT_S = 10.0  # how long an exited stage's endpoint waits to refuse input that comes late

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


class NegotiationRefused(StageError):
    """A node refused a stage before anything started; the message names node, program, reason.

    ``code`` is the policy's refusal code (``not-allowed``, ``not-found``, ``version``, ...), or
    ``unreachable`` / ``duplicate`` for what the node itself could not do.
    """

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class Stages:
    """Every stage on this node.

    Args:
        node: this node's name.
        hub: its hub (stage endpoints, links to neighbours).
        supervisor: forks and reaps the programs.
        policy: decides whether a stage may run here.
        config: the node's configuration.
        ctl: the node's control endpoint, which sends exit reports.
        direct: the kept ends of kernel pipes between stages here.
        spawn: starts a task the node tracks (and cancels when it closes).
        on_exit: called after each stage's report has been sent.
    """

    def __init__(
        self,
        *,
        node: str,
        hub: Hub,
        supervisor: Supervisor,
        policy: Policy,
        config: NodeConfig,
        ctl: Endpoint,
        direct: DirectPipes,
        spawn: Spawn,
        on_exit: Callable[[], None] = lambda: None,
    ) -> None:
        self.node = node
        self.hub = hub
        self.supervisor = supervisor
        self.policy = policy
        self.config = config
        self.ctl = ctl
        self.direct = direct
        self._spawn = spawn
        self._on_exit = on_exit
        self._stages: dict[tuple[str, int], Stage] = {}
        # How much a producer may have in flight towards a stage here: the protocol's initial
        # credit, and what a larger window adds is granted as the stream opens.
        self.window = config.limits.credit_bytes

    def __len__(self) -> int:
        return len(self._stages)

    async def negotiate(self, body: Mapping[str, Any], *, caller: str) -> dict[str, Any]:
        """Check and reserve one stage; its endpoint's address (``addr``).

        Raises:
            NegotiationRefused: the policy refused, a neighbour's node is unreachable, or the stage
                is already here.
        """
        pipeline, index, argv = str(body["pipeline"]), int(body["stage"]), [str(a) for a in body["argv"]]
        mode = str(body.get("mode", "bytes"))
        require = [str(r) for r in body.get("require", [])]
        refusal = await self.policy.refusal(
            argv, mode=mode, protocol=body.get("protocol"), require=require, caller=caller
        )
        if refusal is not None:
            raise NegotiationRefused(refusal.message, code=refusal.code)
        await self._link_neighbours(body.get("peers", {}))
        if (pipeline, index) in self._stages:
            raise NegotiationRefused(f"stage {index} of pipeline {pipeline} is already here", code="duplicate")
        endpoint = self.hub.endpoint(f"{pipeline}.{index}", window=self.window)
        describe = f"stage {index} ({argv[0]}@{self.node})"
        self._stages[(pipeline, index)] = Stage(pipeline, index, argv, mode, endpoint, describe)
        return {"addr": endpoint.addr}

    async def _link_neighbours(self, peers: Mapping[str, str]) -> None:
        """Make sure we link to the nodes our stage exchanges data with (directly: no relaying)."""
        missing = {n: str(e) for n, e in peers.items() if n != self.node and n not in self.hub.peers}
        results = await asyncio.gather(
            *(self.hub.connect_peer(e, timeout=CONTROL_TIMEOUT_S) for e in missing.values()),
            return_exceptions=True,
        )
        for node, outcome in zip(missing, results, strict=True):
            if isinstance(outcome, BaseException):
                raise NegotiationRefused(
                    f"node {self.node} cannot reach node {node} at {missing[node]}: {outcome}", code="unreachable"
                )

    async def start(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """Fork a negotiated stage and run it; its ``pid`` and Pipes ``context``.

        Raises:
            StageError: the stage was not negotiated here, or its program could not start.
        """
        stage = self._stages.get((str(body["pipeline"]), int(body["stage"])))
        if stage is None:
            which = f"stage {body['stage']} of pipeline {body['pipeline']}"
            raise StageError(f"node {self.node}: {which} was not negotiated")
        wiring = Wiring.from_body(body)
        from dpipes.nodes.stage_pipes import StagePipes

        env = dict(os.environ)
        env.update(self._env(stage, wiring))
        stage.pipes = StagePipes(
            body.get("pipes") or {},
            pipeline=stage.pipeline,
            stage=stage.index,
            node=self.node,
            argv=stage.argv,
            bus=(self.hub.endpoint(f"{stage.pipeline}.{stage.index}.pipes"), self.hub.ipc_endpoint),
        )
        env.update(stage.pipes.env)
        stage.env = env
        # Two neighbours both here exchange bytes through one kernel pipe, as in a shell.
        stdin_fd = self.direct.end(stage.pipeline, stage.index - 1, reader=True) if wiring.direct_in else None
        stdout_fd = self.direct.end(stage.pipeline, stage.index, reader=False) if wiring.direct_out else None
        try:
            stage.proc = await self.supervisor.start(
                self.policy.command(stage.argv), env=env, forward_stderr=True, stdin_fd=stdin_fd, stdout_fd=stdout_fd
            )
        except BaseException:
            stage.pipes.close()
            raise
        stage.task = self._spawn(self._run(stage, wiring), stage.describe)
        log.info("node %s: started %s pid %d", self.node, stage.describe, stage.proc.pid)
        return {"pid": stage.proc.pid, "context": stage.pipes.context}

    def _env(self, stage: Stage, wiring: Wiring) -> dict[str, str]:
        host, _, port = self.hub.tcp_endpoint.removeprefix("tcp://").rpartition(":")
        return {
            "DPIPES_ADDR": host,
            "DPIPES_PORT": port,
            "DPIPES_SERVICE": f"dp.{os.path.basename(stage.argv[0])}",
            "DPIPES_NODE": self.node,
            "DPIPES_PIPELINE": stage.pipeline,
            "DPIPES_STAGE": str(stage.index),
            "DPIPES_ARGV": shlex.join(stage.argv),
            "DPIPES_USER": wiring.user,
        }

    async def _run(self, stage: Stage, wiring: Wiring) -> None:
        run = StageRun(
            stage,
            wiring,
            node=self.node,
            config=self.config,
            tcp_endpoint=self.hub.tcp_endpoint,
            on_unread_input=lambda: self._linger(stage),
        )
        try:
            report = await run.run()
        finally:
            self._forget(stage)
            self.direct.close(stage.pipeline, (stage.index - 1, stage.index))  # a neighbour that never started
            if stage.pipes is not None:
                stage.pipes.close()
        log.info("node %s: %s %s", self.node, stage.describe, report.status)
        await asyncio.gather(*(self._report(addr, report) for addr in wiring.report_to))
        self._on_exit()

    async def _report(self, addr: str, report: ExitReport) -> None:
        try:
            await self.ctl.request(addr, "exit", report.body(), timeout=REPORT_TIMEOUT_S)
        except BusError as exc:
            log.warning("node %s: exit report of stage %s not delivered to %s: %s", self.node, report.stage, addr, exc)

    async def cancel(self, pipeline: str, reason: str) -> int:
        """Terminate every stage of ``pipeline`` here; how many there were."""
        self.direct.close(pipeline)  # a neighbour that has not started will not
        stages = [s for (p, _i), s in self._stages.items() if p == pipeline]
        for stage in stages:
            stage.cancelled = stage.cancelled or reason
        await asyncio.gather(*(self._kill(s) for s in stages), return_exceptions=True)
        for stage in stages:
            if stage.proc is None:  # negotiated, never started
                self._forget(stage)
        return len(stages)

    async def aclose(self, reason: str = "node stopping") -> None:
        """Cancel every stage here (bounded) and close the kept pipe ends."""
        stages = list(self._stages.values())
        for stage in stages:
            stage.cancelled = stage.cancelled or reason
        await asyncio.gather(*(self._kill(stage) for stage in stages), return_exceptions=True)
        self.direct.close_all()

    async def _kill(self, stage: Stage) -> None:
        if stage.proc is not None:
            await asyncio.wait_for(stage.proc.terminate(), CANCEL_TIMEOUT_S)

    def _forget(self, stage: Stage) -> None:
        self._stages.pop((stage.pipeline, stage.index), None)
        if not stage.lingering:
            stage.endpoint.close()

    def _linger(self, stage: Stage) -> None:
        stage.lingering = True
        self._spawn(self._refuse_late_input(stage), f"late input of {stage.describe}")

    async def _refuse_late_input(self, stage: Stage) -> None:
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


__all__ = ["NegotiationRefused", "Stages"]
