"""A plugin stage on this node: its worker process, started and watched as a program is.

A plugin stage (``%NAME``) runs in a worker (:mod:`dpipes.nodes.plugins.worker`) that this node
forks under its supervisor, in its own process group, so cancel, kill and the no-orphan rule hold
as for any stage. Its data does not pass through the node: at negotiation the node reserves the
stage address ``<node>/<pipeline>.<index>`` on its hub for the worker
(:meth:`~dpipes.bus.hub.Hub.reserve`), and the worker attaches under it over ``ipc://``, so
upstream may send before the worker is up. The node keeps an endpoint of its own for the stage,
``<node>/<pipeline>.worker.<index>``, from which it forwards the worker's stderr (a plugin's
``print``, the one-line error of a failed worker) to the client as any stage's stderr.

:class:`WorkerRun` writes the worker's spec to its stdin, forwards its stderr, and reports its
exit: the worker's status (the code it writes to its stdout as it exits, its stderr closed, else
what the reap finds), and, when it failed without being cancelled, ``error`` (its output is not
complete; the coordinator then cancels the run): the worker's own last line when it wrote one,
else how it ended (``killed by SIGKILL``). Only once that report is sent does the node
release the stage address, and with it the hub cancels every stream the worker sent and did not
end (:meth:`~dpipes.bus.hub.Hub.release`), naming how the stage ended: however the worker went,
no reader of it waits for the rest, and none fails before the coordinator has the stage's own account.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time

from dpipes.bus import codec
from dpipes.bus.errors import BusError
from dpipes.nodes.protocol import MAX_TEXT_CHARS, ExitReport, StartRequest
from dpipes.nodes.stage import ERROR_REPORT_CHARS, STDERR_TAIL_REPORT_CHARS, Stage
from dpipes.nodes.supervisor import ExitStatus, StageProcess, StdinClosed

log = logging.getLogger(__name__)

__all__ = ["WORKER_ARGV", "WorkerRun", "worker_endpoint_name"]

ANNOUNCE_MAX_BYTES = 16
"""Bound on reading a worker's exit code from its stdout (a decimal line of up to 3 digits)."""

WORKER_ARGV = (sys.executable, "-m", "dpipes.nodes.plugins.worker")
"""What a node forks for a plugin stage: its own interpreter, so the plugins installed beside it."""


def worker_endpoint_name(pipeline: str, index: int) -> str:
    """The node's own endpoint of a plugin stage (its stderr comes from there): ``<pipeline>.worker.<index>``."""
    return f"{pipeline}.worker.{index}"


class WorkerRun:
    """Drives one started worker: its spec in, its stderr out, then its exit report.

    Args:
        stage: the stage, its worker started (``proc``).
        wiring: the stage's ``start`` request.
        spec: what is still to write of the worker's spec, as JSON (the node writes what the pipe
            takes as it starts the worker; this writes the rest, maybe nothing, then closes stdin).
        node: this node's name.
    """

    def __init__(self, stage: Stage, wiring: StartRequest, spec: bytes, *, node: str) -> None:
        assert stage.proc is not None, "worker not started"
        self.stage = stage
        self.proc: StageProcess = stage.proc
        self.wiring = wiring
        self.spec = spec
        self.node = node

    async def run(self) -> ExitReport:
        """Until the worker has exited and its stderr is forwarded; its report."""
        proc, stage = self.proc, self.stage
        stderr = asyncio.create_task(self._stderr())
        announced = asyncio.create_task(self._announced())
        try:
            with contextlib.suppress(StdinClosed):  # it died before reading: its status says how
                await proc.write_stdin(self.spec)
            proc.close_stdin()
            await stderr
            code = await announced
            # Its own word, stderr over, as it exits: not after the kernel has freed its memory.
            # Killed first (or no word at all), the reap says how it ended; the reap still comes.
            status = proc.status or (ExitStatus(code=code) if code is not None else await proc.wait())
        except asyncio.CancelledError:
            stderr.cancel()
            announced.cancel()
            raise
        tail = proc.stderr_tail.decode(errors="replace")
        error = ""
        if not status.ok and not stage.cancelled and status.signal != signal.SIGPIPE:
            last = next((line for line in reversed(tail.splitlines()) if line.strip()), "")
            said = last.startswith(f"dpipes: {stage.describe}: ")  # the worker's own account, stage named once
            error = last.removeprefix(f"dpipes: {stage.describe}: ") if said else f"plugin {stage.plugin} worker "
            error += "" if said else status.describe()
            error += ": its output is not complete"
        return ExitReport(
            pipeline=stage.pipeline,
            stage=stage.index,
            node=self.node,
            code=status.code if status.code is not None else -1,
            signal=status.signal or 0,
            status=status.describe(),
            sigpipe=status.signal == signal.SIGPIPE,
            error=error[:ERROR_REPORT_CHARS],
            cancelled=stage.cancelled[:MAX_TEXT_CHARS],
            stderr_tail=tail[-STDERR_TAIL_REPORT_CHARS:] if not status.ok else "",
            started=stage.started,
            ended=time.time(),  # its bytes pass by this node (the worker is on the bus): not counted here
        )

    async def _announced(self) -> int | None:
        """The exit code the worker wrote to its stdout just before its exit (see
        :mod:`dpipes.nodes.plugins.worker`); None when it ended without one (killed, SIGPIPE, not
        started), or wrote what is not one."""
        line = b""
        while b"\n" not in line and len(line) <= ANNOUNCE_MAX_BYTES:
            data = await self.proc.read_stdout(ANNOUNCE_MAX_BYTES)
            if not data:
                return None
            line += data
        self.proc.close_stdout()  # nothing more comes; our end goes now, not with the reap
        word = line.partition(b"\n")[0]
        if not word.isdigit() or len(word) > 3 or int(word) > 255:
            return None
        return int(word)

    async def _stderr(self) -> None:
        stage, proc = self.stage, self.proc
        out = None
        try:
            while data := await proc.read_stderr():
                if out is None:
                    out = stage.endpoint.open_stream(self.wiring.stderr_to)
                await out.send(codec.Stderr(frames=(data,)))
            if out is not None:
                await out.close()
        except BusError as exc:
            log.info("node %s: %s: stderr not delivered: %s", self.node, stage.describe, exc)
            while await proc.read_stderr():  # keep reading: a full pipe would stop the worker
                pass
