"""Plugin workers started ahead of need: a plugin stage takes one that has already imported pyarrow.

A plugin worker spends most of its start (0.3-0.8 s, more on a busy host) importing pyarrow, pyzmq
and the bus before it reads its spec. A :class:`WorkerPool` keeps up to ``size`` workers that have
done that and wait, blocked on their stdin, for a spec (:mod:`dpipes.nodes.plugins.worker`: the
spec carries the stage's working directory and environment, so one worker fits any stage). The
rules:

- *Bounded*: at most ``size`` idle workers (``[limits] plugin_workers_ready``; 0: none, every
  plugin stage forks its own worker as before).
- *Filled on use*: an idle node pays nothing. The pool starts filling when a plugin stage has run
  here (its worker forked or taken), and starts each replacement once the stage that used a
  worker is over, its exit reported, so a replacement never competes for the CPU with the run
  it replaces, nor delays the report its client waits for (a worker's start costs 0.3-0.8 CPU-s).
- *Oldest first*: a stage takes the idle worker started longest ago, the one most likely done
  with its imports (the newest may still be importing, after a run that just ended).
- *Used once*: a worker runs one stage and exits; the pool never hands out a worker twice, so no
  state of one run (a plugin's module globals, its threads) reaches another.
- *Never orphaned*: each worker is started by the node's :class:`~dpipes.nodes.supervisor.Supervisor`
  (own process group, ``PR_SET_PDEATHSIG``), which terminates idle ones with the rest on
  ``aclose()``; an idle worker whose node vanished reads the end of its stdin and exits. A worker
  found dead when taken is reaped and the next one taken.
- *Off* for ``dpipesd --exit`` and for the node ``dpipes`` embeds for one command (the node says
  so with ``size=0``): neither would run a second plugin stage.

Idle workers are started as ``... worker --pooled --fd-socket=N`` and are named ``dpipes-ready`` in
``ps -o comm``; a worker running a stage is named ``dpipes-worker``. ``N`` is the worker's end of a
Unix socket pair whose other end the pool keeps: :meth:`WorkerPool.hand_fds` sends a stage's
direct edges (kernel pipes to its neighbours on this node) over it, as a forked worker gets them at
fork (*Direct edges* in :mod:`dpipes.nodes.plugins.spec`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from typing import Any

from dpipes.bus.errors import StageError
from dpipes.nodes.plugins.spec import FD_SOCKET_FLAG, POOLED_FLAG
from dpipes.nodes.supervisor import StageProcess, Supervisor

log = logging.getLogger(__name__)

__all__ = ["POOLED_FLAG", "WorkerPool"]


class WorkerPool:
    """Up to ``size`` plugin workers started ahead of need (see the module docstring).

    Args:
        supervisor: the node's supervisor, which starts, tracks and terminates every worker.
        argv: the worker's command (``WORKER_ARGV``); the pool adds ``POOLED_FLAG``.
        env: the workers' environment (a stage's clean one, see nodes/stage_env.py); the spec adds each stage's.
        size: the most idle workers kept; 0 turns the pool off.
        node: this node's name, for the log.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        argv: tuple[str, ...],
        *,
        env: Mapping[str, str],
        size: int,
        node: str,
    ) -> None:
        self.supervisor = supervisor
        self.argv = (*argv, POOLED_FLAG)
        self.env = dict(env)
        self.size = max(0, size)
        self.node = node
        self._idle: list[StageProcess] = []
        self._sockets: dict[StageProcess, socket.socket] = {}  # the pool's end of each idle worker's descriptor socket
        self._starting = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self.taken = 0  # workers handed to a stage (a figure for tests and the log)

    @property
    def idle(self) -> int:
        """Workers ready now."""
        return len(self._idle)

    def take(self) -> StageProcess | None:
        """A ready worker for a stage, or None (the caller forks one). Call :meth:`hand_fds`, then
        :meth:`used` with the stage's run."""
        while self._idle:
            proc = self._idle.pop(0)
            if proc.status is None:
                self.taken += 1
                return proc
            log.info("node %s: an idle plugin worker had ended (%s)", self.node, proc.status)
            self._close_socket(proc)
            self._spawn(proc.terminate())  # reaps it and sweeps its group
        return None

    def hand_fds(self, proc: StageProcess, fds: Sequence[int]) -> None:
        """Send ``fds`` (a stage's direct edges, maybe none) to the worker ``proc`` taken from here, before
        its spec; they stay the caller's to close. The worker's descriptor socket is closed after.

        Raises:
            OSError: the worker's socket is gone (it died): the caller forks a worker instead.
        """
        sock = self._sockets.pop(proc)
        with sock:
            if fds:
                socket.send_fds(sock, [b"fds"], list(fds))

    def used(self, stage_over: Awaitable[Any]) -> None:
        """A plugin stage took a worker (or forked one): once ``stage_over`` (the stage's run, to its
        exit report) is done, whatever its outcome, fill the pool up to ``size``, one at a time."""
        if self.size and not self._closed:
            self._spawn(self._fill_after(stage_over))

    async def _fill_after(self, stage_over: Awaitable[Any]) -> None:
        await asyncio.wait([asyncio.ensure_future(stage_over)])
        while not self._closed and len(self._idle) + self._starting < self.size:
            if not await self._fill_one():
                return

    async def _fill_one(self) -> bool:
        """Start one idle worker; whether it started."""
        self._starting += 1
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = (*self.argv, f"{FD_SOCKET_FLAG}={theirs.fileno()}")
        try:
            proc = await self.supervisor.start(argv, env=self.env, forward_stderr=True, pass_fds=(theirs.detach(),))
        except StageError as exc:  # the node is stopping, or the interpreter cannot start
            ours.close()
            log.info("node %s: no plugin worker started ahead: %s", self.node, exc)
            return False
        finally:
            self._starting -= 1
        if self._closed:
            ours.close()
            await proc.terminate()
            return False
        self._sockets[proc] = ours
        self._idle.append(proc)  # its stderr is read once a stage takes it: an idle worker says nothing
        return True

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Stop filling and terminate the idle workers (the supervisor ends the busy ones with their stages)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        idle, self._idle = self._idle, []
        for proc in idle:
            self._close_socket(proc)
        await asyncio.gather(*(proc.terminate() for proc in idle), return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _close_socket(self, proc: StageProcess) -> None:
        if (sock := self._sockets.pop(proc, None)) is not None:
            sock.close()
