"""The stages this node runs: its side of ``negotiate``, ``start`` and ``cancel``.

:class:`Stages` owns every stage of any pipeline on this node, from the negotiation that reserves
its endpoint to the exit report that ends it:

* ``negotiate`` asks the :class:`~dpipes.nodes.policy.Policy` whether the caller may run the
  stage here (a refusal is answered ``refused``, ``unauthorized`` when the caller's key may not,
  or ``protocol`` for another protocol version), links to the nodes its neighbours run on (data
  goes straight between them, never relayed; ``unreachable`` if it cannot), and reserves the
  stage's endpoint ``<node>/<pipeline>.<index>``, whose window is ``[limits] credit_bytes``;
* ``start`` (``not-found`` unless negotiated here; ``unauthorized`` from another party than
  the one that negotiated it) forks the program under the node's supervisor, in a clean
  environment (:mod:`~dpipes.nodes.stage_env`), its working directory (``start.cwd``, from the
  configured ``workdir``) and with its Pipes bootstrap, and runs it
  (:class:`~dpipes.nodes.stage.StageRun`) in a task; when it has exited, the report goes to every
  ``report_to`` address;
* ``cancel`` marks every stage of a pipeline cancelled (with the reason) and terminates its
  process group, bounded.

At its first stage start, the node removes the Pipes bootstrap directories that nodes killed
without closing them left behind (:func:`~dpipes.nodes.pipes.remove_stale_bootstrap_dirs`).

A plugin stage (``argv[0]`` is ``%NAME``) is negotiated the same way, but its stage address is
reserved on the hub for the worker process that ``start`` forks (:mod:`dpipes.nodes.plugin_stage`),
and released after its exit report is sent: then the streams its worker left unended are cancelled.

A stage whose program exited before its input arrived keeps its endpoint ``LATE_INPUT_S`` more to
cancel that input when it comes, so its producer sees a closed pipe rather than silence.

A stage negotiated and not started within ``UNSTARTED_EXPIRY_S`` (its coordinator died, or was
never going to start it) is forgotten: its endpoint closes (what was sent to it fails) and its
kept pipe ends close; a later ``start`` is answered ``not-found``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import logging
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, DpipesError, StageError
from dpipes.bus.hub import Hub
from dpipes.bus.trust import Identity
from dpipes.nodes import policy as _policy
from dpipes.nodes.config import NodeConfig
from dpipes.nodes.policy import Policy
from dpipes.nodes.protocol import (
    BAD_REQUEST,
    CONTROL_TIMEOUT_S,
    NOT_FOUND,
    PROTOCOL,
    REFUSED,
    REPORT_TIMEOUT_S,
    UNAUTHORIZED,
    UNREACHABLE,
    ClaimRequest,
    ControlError,
    Empty,
    ExitReport,
    NegotiateReply,
    NegotiateRequest,
    ProgressReport,
    StartReply,
    StartRequest,
    call,
    host_identity,
)
from dpipes.nodes.stage import DirectPipes, Stage, StageRun
from dpipes.nodes.stage_env import stage_environment, user_of
from dpipes.nodes.supervisor import StageProcess, Supervisor

if TYPE_CHECKING:
    from dpipes.nodes.plugin_stage import WorkerRun
    from dpipes.nodes.plugins.spec import WorkerSpec
    from dpipes.nodes.worker_pool import WorkerPool

log = logging.getLogger(__name__)

CANCEL_TIMEOUT_S = 10.0  # terminate (TERM, grace, KILL) one stage
LATE_INPUT_S = 10.0  # how long an exited stage's endpoint waits to refuse input that comes late
# A coordinator starts its stages once every node has answered negotiate (each within
# CONTROL_TIMEOUT_S, in parallel): three times that is ample for an honest one.
UNSTARTED_EXPIRY_S = 3 * CONTROL_TIMEOUT_S

Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


class NegotiationRefused(ControlError):
    """A node refused a stage before anything started; the message names node, program, reason.

    ``code`` is the protocol's (``refused``, ``protocol``, ``unreachable``); ``reason`` the
    policy's finer one (``not-allowed``, ``not-found``, ``version``, ...), or "" when the policy
    did not refuse.
    """

    def __init__(self, message: str, *, code: str = REFUSED, reason: str = "") -> None:
        super().__init__(code, message)
        self.reason = reason


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
        workers: plugin workers started ahead of need, if the node keeps any.
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
        workers: WorkerPool | None = None,
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
        self.workers = workers
        self._stages: dict[tuple[str, int], Stage] = {}
        # A plugin worker's direct output, held open by the node too until the worker's exit is
        # known: should it fail, its reader here is cancelled before it can see an end of input.
        self._held_outputs: dict[tuple[str, int], int] = {}
        self._swept = False  # the bootstrap dirs of dead nodes, removed once
        self._remover: ThreadPoolExecutor | None = None  # made at the first removal
        # How much a producer may have in flight towards a stage here: the protocol's initial
        # credit, and what a larger window adds is granted as the stream opens.
        self.window = config.limits.credit_bytes
        self.host = host_identity()  # in negotiate replies: the coordinator tells our host's stages by it

    def __len__(self) -> int:
        return len(self._stages)

    async def negotiate(self, request: NegotiateRequest, src: str) -> NegotiateReply:
        """Check and reserve one stage for the party at ``src``; its endpoint's address.

        Raises:
            NegotiationRefused: the policy refused (the caller too), a neighbour's node is
                unreachable, or the stage is already here.
        """
        pipeline, index, argv = request.pipeline, request.stage, list(request.argv)
        transport = self.hub.identity_of(src)
        caller = _policy.caller_of(transport, request.caller, own_coordinator=src == self.ctl.addr)
        if isinstance(caller, _policy.Refusal):
            raise NegotiationRefused(f"node {self.node}: {caller.message}", code=UNAUTHORIZED, reason=caller.code)
        refusal = await self.policy.refusal(
            argv,
            mode=request.mode,
            protocol=request.protocol,
            require=request.require,
            caller=caller,
            pinned=request.pinned,
        )
        if refusal is not None:
            code = {_policy.PROTOCOL: PROTOCOL, _policy.UNAUTHORIZED: UNAUTHORIZED}.get(refusal.code, REFUSED)
            raise NegotiationRefused(refusal.message, code=code, reason=refusal.code)
        await self._link_neighbours(request.peers)
        if (pipeline, index) in self._stages:
            raise NegotiationRefused(f"stage {index} of pipeline {pipeline} is already here")
        if argv[0].startswith(_policy.PLUGIN_SIGIL):
            return self._negotiate_plugin(request, caller, src)
        endpoint = self.hub.endpoint(f"{pipeline}.{index}", window=self.window, max_streams=1)  # its stdin
        describe = f"stage {index} ({argv[0]}@{self.node})"
        stage = self._stages[(pipeline, index)] = Stage(
            pipeline, index, argv, request.mode, endpoint, describe, caller=caller, negotiated_by=src
        )
        stage.who = _who(caller, None if src == self.ctl.addr else transport)
        stage.expiry = asyncio.get_running_loop().call_later(UNSTARTED_EXPIRY_S, self._expire, stage)
        return NegotiateReply(addr=endpoint.addr, host=self.host)

    def _expire(self, stage: Stage) -> None:
        """A stage negotiated ``UNSTARTED_EXPIRY_S`` ago and never started: forget it."""
        if stage.proc is not None or self._stages.get((stage.pipeline, stage.index)) is not stage:
            return
        log.info(
            "node %s: %s not started within %g s of its negotiation: forgotten",
            self.node,
            stage.describe,
            UNSTARTED_EXPIRY_S,
        )
        self._forget(stage)
        self.direct.close(stage.pipeline, (stage.index - 1, stage.index))

    def _negotiate_plugin(self, request: NegotiateRequest, caller: Identity, src: str) -> NegotiateReply:
        """Reserve a plugin stage's address for its worker, and an endpoint of the node's for it."""
        from dpipes.nodes.pipeline import plugin_config
        from dpipes.nodes.plugin_stage import worker_endpoint_name

        pipeline, index, argv = request.pipeline, request.stage, list(request.argv)
        plugin = argv[0][len(_policy.PLUGIN_SIGIL) :]
        try:
            config = {**plugin_config(argv), **request.config}
        except ValueError as exc:
            raise ControlError(BAD_REQUEST, str(exc), field="argv") from None
        addr = self.hub.reserve(f"{pipeline}.{index}")
        endpoint = self.hub.endpoint(worker_endpoint_name(pipeline, index), window=self.window)
        describe = f"stage {index} (%{plugin}@{self.node})"
        stage = self._stages[(pipeline, index)] = Stage(
            pipeline,
            index,
            argv,
            request.mode,
            endpoint,
            describe,
            plugin=plugin,
            config=config,
            caller=caller,
            negotiated_by=src,
        )
        stage.who = _who(caller, None if src == self.ctl.addr else self.hub.identity_of(src))
        stage.expiry = asyncio.get_running_loop().call_later(UNSTARTED_EXPIRY_S, self._expire, stage)
        return NegotiateReply(addr=addr)

    async def _start_worker(self, stage: Stage, wiring: StartRequest) -> StartReply:
        """Fork a plugin stage's worker (:mod:`dpipes.nodes.plugins.worker`) and run it."""
        from dpipes.nodes.plugin_stage import WORKER_ARGV
        from dpipes.nodes.plugins.spec import WorkerSpec

        spec = WorkerSpec(
            hub=self.hub.ipc_endpoint,
            name=f"{stage.pipeline}.{stage.index}",
            pipeline=stage.pipeline,
            stage=stage.index,
            node=self.node,
            plugin=stage.plugin,
            config=stage.config,
            mode=stage.mode,
            messages_to=wiring.stderr_to,
            inputs=wiring.inputs,
            outputs=wiring.outputs,
            callback_timeout_s=float(self.config.limits.plugin_callback_s),
            window=self.window,
            cwd=self.workdir(wiring.cwd),  # a plugin opening a relative path finds what a program would
            env={**self._env(stage, wiring), "PWD": self.workdir(wiring.cwd)},
            temp_dir=_plugin_temp_dir(stage),
        )
        env = stage_environment(self.config.pass_env, worker=True)
        env.update(spec.env)
        stage.env = env
        stage.started = time.time()
        # A neighbour here: one kernel pipe, whose end the worker gets (nodes.plugins.spec: Direct edges).
        fd_in = self.direct.end(stage.pipeline, stage.index - 1, reader=True) if wiring.direct_in else None
        fd_out = self.direct.end(stage.pipeline, stage.index, reader=False) if wiring.direct_out else None
        fds = [fd for fd in (fd_in, fd_out) if fd is not None]
        if fd_out is not None:
            self._held_outputs[(stage.pipeline, stage.index)] = os.dup(fd_out)
        # A missing working directory is refused by the fork below, as for a program (one stat).
        ready = self.workers.take() if self.workers is not None and os.path.isdir(spec.cwd) else None  # noqa: ASYNC240
        if ready is not None and self.workers is not None:
            ready, spec = await self._hand_fds(ready, spec, fd_in, fd_out)
        if ready is None:
            spec = dataclasses.replace(spec, input_fd=_fd_or_bus(fd_in), output_fd=_fd_or_bus(fd_out))
        try:
            stage.proc = ready or await self.supervisor.start(
                WORKER_ARGV, env=env, cwd=spec.cwd, forward_stderr=True, pass_fds=fds
            )
        except StageError as exc:
            self._release_output(stage)
            shutil.rmtree(stage.temp_dir, ignore_errors=True)
            raise ControlError(REFUSED, str(exc)) from None
        finally:
            if ready is not None:
                for fd in fds:  # the worker has its own copies now
                    os.close(fd)
        # The spec at once, not from the stage's task: the worker enters its stage (attaches, loads
        # the plugin) while this node starts the rest of the run; the task writes what did not fit.
        spec_bytes = spec.to_json()
        sent = stage.proc.write_stdin_now(spec_bytes)
        stage.task = self._spawn(self._run(stage, wiring, spec_bytes[sent:]), stage.describe)
        if self.workers is not None:
            self.workers.used(stage.task)
        self._log_started(stage, "plugin worker")
        return StartReply(pid=stage.proc.pid, context={})

    async def _hand_fds(
        self, ready: StageProcess, spec: WorkerSpec, fd_in: int | None, fd_out: int | None
    ) -> tuple[StageProcess | None, WorkerSpec]:
        """Send a taken worker its direct edges; None for the worker if it could not take them."""
        from dpipes.nodes.plugins.spec import FD_BUS, FD_SENT

        assert self.workers is not None
        try:
            self.workers.hand_fds(ready, [fd for fd in (fd_in, fd_out) if fd is not None])
        except OSError as exc:  # it died idle: fork one instead
            log.info("node %s: a plugin worker started ahead could not take its pipes: %s", self.node, exc)
            await ready.terminate()
            return None, spec
        sent = dataclasses.replace(
            spec,
            input_fd=FD_BUS if fd_in is None else FD_SENT,
            output_fd=FD_BUS if fd_out is None else FD_SENT,
        )
        return ready, sent

    async def _link_neighbours(self, peers: Mapping[str, str]) -> None:
        """Make sure we link to the nodes our stage exchanges data with (directly: no relaying)."""
        missing = {n: e for n, e in peers.items() if n != self.node and n not in self.hub.peers}
        known = self.policy.trust().nodes if self.policy.trust is not None else None
        results = await asyncio.gather(
            *(
                self.hub.connect_peer(e, timeout=CONTROL_TIMEOUT_S, key=known.key_for(n) if known else None)
                for n, e in missing.items()
            ),
            return_exceptions=True,
        )
        for node, outcome in zip(missing, results, strict=True):
            if isinstance(outcome, BaseException):
                raise NegotiationRefused(
                    f"node {self.node} cannot reach node {node} at {missing[node]}: {outcome}", code=UNREACHABLE
                )

    async def start(self, wiring: StartRequest, src: str) -> StartReply:
        """Fork a stage negotiated by the party at ``src`` and run it; its pid and Pipes context.

        Raises:
            ControlError: the stage was not negotiated here (``not-found``), or by another party
                (``unauthorized``), or its program could not start (``refused``).
        """
        stage = self._stages.get((wiring.pipeline, wiring.stage))
        which = f"stage {wiring.stage} of pipeline {wiring.pipeline}"
        if stage is None:
            raise ControlError(NOT_FOUND, f"node {self.node}: {which} was not negotiated (or expired unstarted)")
        if stage.negotiated_by != src or stage.proc is not None:
            raise ControlError(UNAUTHORIZED, f"node {self.node}: {which} is not {src!r:.120}'s to start")
        if stage.expiry is not None:
            stage.expiry.cancel()
        if stage.plugin:
            return await self._start_worker(stage, wiring)
        from dpipes.nodes.stage_pipes import StagePipes

        if not self._swept:  # at the first start, not at the node's: it imports what only runs need
            from dpipes.nodes.pipes import remove_stale_bootstrap_dirs

            self._swept = True
            self._spawn(self._in_remover(remove_stale_bootstrap_dirs), "remove stale Pipes bootstrap dirs")
        env = stage_environment(self.config.pass_env)  # never the daemon's own: nodes.stage_env
        env.update(self._env(stage, wiring))
        cwd = env["PWD"] = self.workdir(wiring.cwd)  # PWD: a shell's pwd trusts it when it is right
        stage.pipes = StagePipes(
            wiring.pipes,
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
                self.policy.command(stage.argv),
                env=env,
                forward_stderr=True,
                stdin_fd=stdin_fd,
                stdout_fd=stdout_fd,
                cwd=cwd,
            )
        except StageError as exc:  # not executable, a bad working directory, the node stopping
            stage.pipes.close()
            raise ControlError(REFUSED, f"{stage.describe}: {exc}") from None
        except BaseException:
            stage.pipes.close()
            raise
        stage.started = time.time()
        if wiring.stdout_token:  # the client reads the output here: held until it claims it
            stage.claim_token, stage.reader = wiring.stdout_token, asyncio.get_running_loop().create_future()
        stage.task = self._spawn(self._run(stage, wiring), stage.describe)
        self._log_started(stage, "program")
        return StartReply(pid=stage.proc.pid, context=stage.pipes.context)

    async def claim(self, request: ClaimRequest, src: str) -> Empty:
        """Send the held stdout of a stage to ``src``, who holds its token (protocol: ``claim``).

        Only the first claim with the right token counts: the token is forgotten as it is taken,
        so the output goes to exactly one reader, chosen before any of it was read.

        Raises:
            ControlError: ``not-found`` (no such stage here, its output is not held, or it was
                claimed already: a token works once), ``unauthorized`` (a wrong token, or a caller
                who is neither the stage's caller nor the party that negotiated it).
        """
        stage = self._stages.get((request.pipeline, request.stage))
        which = f"the output of stage {request.stage} of pipeline {request.pipeline}"
        if stage is None or stage.reader is None or not stage.claim_token:
            raise ControlError(NOT_FOUND, f"node {self.node}: {which} is not held here for a claim (or was claimed)")
        if not hmac.compare_digest(stage.claim_token.encode(), request.token.encode()):
            raise ControlError(UNAUTHORIZED, f"node {self.node}: a wrong token for {which}")
        transport = self.hub.identity_of(src)
        # The stage's caller, or whoever negotiated it (the entry node, relaying its client's
        # claim), or this daemon's own user over ipc, who can read anything of ours anyway.
        allowed = (stage.caller, self.hub.identity_of(stage.negotiated_by), Identity.local_user(os.getuid()))
        if transport is None or transport not in allowed:
            raise ControlError(UNAUTHORIZED, f"node {self.node}: {which} is not {transport or src!r:.120}'s to read")
        stage.claim_token = ""
        stage.reader.set_result(src)
        log.info("node %s: %s goes to %s (%s)", self.node, which, src, transport)
        return Empty()

    def _log_started(self, stage: Stage, what: str) -> None:
        """The record of every run (issue 12): who, what, where; the argv escaped (``%r`` of its
        shell words), so that no argument can forge a log line."""
        assert stage.proc is not None
        log.info(
            "node %s: started stage %d of pipeline %s for %s: %s %r, pid %d",
            self.node,
            stage.index,
            stage.pipeline,
            stage.who,
            what,
            shlex.join(stage.argv),
            stage.proc.pid,
        )

    def workdir(self, cwd: str) -> str:
        """Where a stage starts: ``cwd`` from ``start`` (relative ones from the configured
        ``workdir``), else that ``workdir`` (``~``: this node's user's home)."""
        return os.path.normpath(os.path.join(os.path.expanduser(self.config.workdir), cwd))

    def _env(self, stage: Stage, wiring: StartRequest) -> dict[str, str]:
        host, _, port = self.hub.tcp_endpoint.removeprefix("tcp://").rpartition(":")
        return {
            "DPIPES_ADDR": host,
            "DPIPES_PORT": port,
            "DPIPES_SERVICE": f"dp.{os.path.basename(stage.argv[0])}",
            "DPIPES_NODE": self.node,
            "DPIPES_PIPELINE": stage.pipeline,
            "DPIPES_STAGE": str(stage.index),
            "DPIPES_ARGV": shlex.join(stage.argv),
            "DPIPES_USER": user_of(stage.caller),  # authenticated; start.user is only what the client says
        }

    async def _run(self, stage: Stage, wiring: StartRequest, worker_spec: bytes = b"") -> None:
        run: StageRun | WorkerRun
        if stage.plugin:
            from dpipes.nodes.plugin_stage import WorkerRun

            run = WorkerRun(stage, wiring, worker_spec, node=self.node)
        else:
            run = StageRun(
                stage,
                wiring,
                node=self.node,
                config=self.config,
                tcp_endpoint=self.hub.tcp_endpoint,
                on_unread_input=lambda: self._linger(stage),
                on_progress=lambda report: self._send_progress(wiring.progress_to, report),
            )
        try:
            report = await run.run()
            stage.outcome = _outcome(stage, report)
            if report.error:  # a failed worker's output is not complete: its reader must not think it is
                await self._cancel_reader(stage, report.error)
        except BaseException:
            self._release_name(stage)
            raise
        finally:
            self._release_output(stage)
            if stage.temp_dir:  # the worker's own cleanup does not run when it is killed
                self._remove_later(stage.temp_dir)
            self._forget(stage, keep_name=True)
            self.direct.close(stage.pipeline, (stage.index - 1, stage.index))  # a neighbour that never started
            if stage.pipes is not None:
                stage.pipes.close(remove_directory=False)
                self._remove_later(stage.pipes.directory)
        log.info("node %s: %s %s", self.node, stage.describe, report.status)
        try:
            await asyncio.gather(*(self._report(addr, report) for addr in wiring.report_to))
        finally:
            # Only now are the streams a worker left unended cancelled: the coordinator has this
            # stage's own account of its failure before a reader of its output fails for want of the rest.
            self._release_name(stage)
        self._on_exit()

    def _remove_later(self, directory: str) -> None:
        """Remove ``directory`` in a thread, not on the loop: one ``rmdir`` took 1-4 ms on this
        project's machines (ext4 /tmp), and the stage's exit report, with every other stage's
        traffic, waited for it (a short run's end waited for one per stage)."""
        self._spawn(self._in_remover(shutil.rmtree, directory, ignore_errors=True), f"remove {directory}")

    async def _in_remover(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Run ``fn`` on the one thread that removes directories, in order. Not the loop's default
        pool: it grows a thread whenever none is idle, so a burst of exits under load would leave
        the daemon with more threads for good (up to the pool's maximum), and one thread keeps up."""
        if self._remover is None:
            self._remover = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dpipes-remove")
        await asyncio.get_running_loop().run_in_executor(self._remover, functools.partial(fn, *args, **kwargs))

    async def _cancel_reader(self, stage: Stage, error: str) -> None:
        """Cancel the stage that reads ``stage``'s direct output here (before it sees the pipe's end)."""
        reader = self._stages.get((stage.pipeline, stage.index + 1))
        if (stage.pipeline, stage.index) not in self._held_outputs or reader is None:
            return
        reader.cancelled = reader.cancelled or f"{stage.describe} failed"
        reader.stop.set()
        with contextlib.suppress(TimeoutError):  # bounded; the coordinator cancels the run anyway
            await self._kill(reader)

    def _release_output(self, stage: Stage) -> None:
        if (fd := self._held_outputs.pop((stage.pipeline, stage.index), None)) is not None:
            os.close(fd)

    def _send_progress(self, addr: str, report: ProgressReport) -> None:
        """A one-way ``progress`` report: a lost one is replaced by the next, so nothing waits."""
        try:
            self.ctl.send(codec.Request(dst=addr, method=report.METHOD, body=report.to_body()))
        except BusError as exc:
            log.debug("node %s: progress of stage %s not sent to %s: %s", self.node, report.stage, addr, exc)

    async def _report(self, addr: str, report: ExitReport) -> None:
        try:
            await call(self.ctl, addr, report, timeout=REPORT_TIMEOUT_S)
        except DpipesError as exc:  # unreachable, or the receiver refused the report
            log.warning("node %s: exit report of stage %s not delivered to %s: %s", self.node, report.stage, addr, exc)

    async def cancel(self, pipeline: str, reason: str, *, by: str | None = None) -> int:
        """Terminate every stage of ``pipeline`` here (``by``: those the party at that address
        negotiated, so that nobody else may stop them); how many there were."""
        stages = [s for (p, _i), s in self._stages.items() if p == pipeline and by in (None, s.negotiated_by)]
        if by is not None and not stages:
            return 0
        self.direct.close(pipeline)  # a neighbour that has not started will not
        for stage in stages:
            stage.cancelled = stage.cancelled or reason
            stage.stop.set()
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
            if stage.expiry is not None:
                stage.expiry.cancel()
            stage.stop.set()
        await asyncio.gather(*(self._kill(stage) for stage in stages), return_exceptions=True)
        self.direct.close_all()
        if self._remover is not None:  # what it was given still runs; the process waits for it at exit
            self._remover.shutdown(wait=False)

    async def _kill(self, stage: Stage) -> None:
        if stage.proc is not None:
            await asyncio.wait_for(stage.proc.terminate(), CANCEL_TIMEOUT_S)

    def _forget(self, stage: Stage, *, keep_name: bool = False) -> None:
        """Drop ``stage``: its record, its endpoint, and (unless ``keep_name``) a plugin stage's address."""
        if stage.expiry is not None:
            stage.expiry.cancel()
        self._stages.pop((stage.pipeline, stage.index), None)
        if not keep_name:
            self._release_name(stage)
        if not stage.lingering:
            stage.endpoint.close()

    def _release_name(self, stage: Stage) -> None:
        """A plugin stage's address, held for its worker (gone, or never came), goes; every stream the
        worker sent and did not end is cancelled with how the stage ended, so that no reader waits
        for the rest of it or takes what came for the whole."""
        if stage.plugin:
            self.hub.release(f"{stage.pipeline}.{stage.index}", reason=stage.outcome or f"{stage.describe} ended")

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


def _outcome(stage: Stage, report: ExitReport) -> str:
    """How ``stage`` ended, for the readers of what it left unfinished."""
    if report.error:
        return f"{stage.describe} failed: {report.error}"
    if stage.cancelled:
        return f"{stage.describe} was cancelled: {stage.cancelled}"
    return f"{stage.describe}: {report.status}"


def _fd_or_bus(fd: int | None) -> int:
    """A forked worker's ``input_fd``/``output_fd``: the descriptor it inherits, or the bus (-1)."""
    return -1 if fd is None else fd


def _who(caller: Identity, transport: Identity | None) -> str:
    """Whom a stage runs for, and through whom when a node asked on the caller's behalf."""
    if transport is None or transport == caller:
        return str(caller)
    return f"{caller}, asked by {transport}"


__all__ = ["NegotiationRefused", "Stages"]


def _plugin_temp_dir(stage: Stage) -> str:
    """A fresh directory for a plugin stage's ``temp_dir``, kept on the stage so the node removes it."""
    stage.temp_dir = tempfile.mkdtemp(prefix=f"dpipes-plugin-{stage.plugin}-")
    return stage.temp_dir
