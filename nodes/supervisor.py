"""Stage supervision: the one place where a node starts, watches, signals and reaps child processes.

A stage is an ordinary program forked without a shell, in its own process group, with three pipes
(stdin, stdout, stderr) whose kernel buffers are raised to ``PIPE_BUFFER_BYTES``. The node pumps
bytes through them with :class:`StageProcess`: non-blocking ``os.read``/``os.write`` driven by the
loop's ``add_reader``/``add_writer``, in chunks of up to ``READ_CHUNK_BYTES``, never per byte; a
streaming producer's writes are gathered into fewer, larger chunks (``read_stdout(coalesce=True)``).

Unix pipe semantics are kept on purpose:

* the child starts with ``SIGPIPE`` at its default action (Python ignores it; ``restore_signals``
  puts it back), so a producer whose stdout reader went away dies of ``SIGPIPE`` as in a shell;
  :meth:`StageProcess.close_stdout` is how the node says "downstream is gone";
* writing into a stdin whose program has exited raises :class:`StdinClosed`, which the node turns
  into "stop the upstream stage", again as ``SIGPIPE`` would;
* a stdout nobody reads fills its pipe and the child blocks: memory stays bounded;
* the child inherits no descriptor but its three pipes (``close_fds``);
* the child never outlives its node: its leader is started with ``PR_SET_PDEATHSIG`` = ``SIGKILL``
  (Linux), so a node that dies hard (``kill -9``) takes its stages with it instead of leaving a
  ``sleep 45`` to run its course. Members a leader forked itself are in its process group and see
  its pipes close; the signal reaches only the leader, as the kernel defines it. How it is set
  without forking the whole interpreter for each start is :mod:`dpipes.nodes.launch`'s job.

:meth:`StageProcess.terminate` signals the whole process group (``SIGTERM``, then ``SIGKILL``
after ``TERMINATE_GRACE_S``), so grandchildren a stage forked die with it. The :class:`Supervisor`
owns every stage of a node and terminates them all, bounded, in ``aclose()``.

Its length (about 770 lines) is one job's, kept whole on purpose: fork, pump, watch, reap and kill
share the process group, the pidfd and the pipe ends, and their edge cases are explained where
they happen.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from dpipes.bus.errors import DpipesError, StageError
from dpipes.nodes.launch import die_with_parent, launcher

__all__ = [
    "PIPE_BUFFER_BYTES",
    "READ_CHUNK_BYTES",
    "STDERR_TAIL_BYTES",
    "TERMINATE_GRACE_S",
    "ExitStatus",
    "ProgramNotFound",
    "StageProcess",
    "StageStartError",
    "StdinClosed",
    "Supervisor",
    "set_pipe_size",
    "start_stage",
]

log = logging.getLogger(__name__)

PIPE_BUFFER_BYTES = 1 << 20
"""Kernel buffer asked for each stage pipe: Python moves ~4x more through 1 MiB than through 64 KiB."""

READ_CHUNK_BYTES = 1 << 20
"""Default ``read_stdout`` chunk: as large as the pipe (``PIPE_BUFFER_BYTES``), so that a stage whose
output goes over the bus yields as few messages as its pipe allows. Each message costs every hop the
same Python and system calls whatever its size: on a 2-node ``cat | cat@b``, reads of up to 1 MiB
(about 600 KiB on average, against about 220 KiB with a 256 KiB cap) took about 15% less CPU per GB
over both nodes and the client. A read of a few bytes still returns at once."""

BULK_READ_BYTES = 64 << 10
COALESCE_BELOW_BYTES = 256 << 10
COALESCE_WAIT_S = 0.0005
"""A producer whose last read gave at least ``BULK_READ_BYTES`` is streaming: ``cat`` writes
128 KiB a time, and a pump that reads each write as it lands sends a message per write. With
``coalesce``, a read that finds such a producer's pipe holding less than ``COALESCE_BELOW_BYTES``
waits ``COALESCE_WAIT_S`` once (at most a loop pass of epoll's millisecond) so that the pipe fills:
on a 2-node ``cat | cat@b`` messages of 256 KiB to 1 MiB instead of 128 KiB, and with them several
times fewer messages, wake-ups and credit grants on every hop. The bar is a quarter of the pipe, not
more, so that a producer faster than the wait (its pipe filled before we come back) is never
held up by it. A producer that writes less than ``BULK_READ_BYTES`` (a line at a time, a trickle)
is read at once, as before: its latency is unchanged."""

YIELD_EVERY_BYTES = 4 << 20
"""A pipe that never runs dry (``yes``, a fast reader of our writes) would let a read or write loop
run without ever suspending; after this many bytes without waiting, we yield to the loop once."""

STDERR_CHUNK_BYTES = 64 << 10
"""``read_stderr`` chunk: stderr is a side channel, usually small lines."""

STDERR_TAIL_BYTES = 64 << 10
"""How much of the end of a stage's stderr is kept for its exit report."""

TERMINATE_GRACE_S = 3.0
"""Time a stage's process group gets between ``SIGTERM`` and ``SIGKILL``."""

REAP_TIMEOUT_S = 5.0
"""Bound on waiting for the kernel to deliver a ``SIGKILL``-ed leader's exit; it is never refused."""

GROUP_POLL_MIN_S = 0.002
GROUP_POLL_MAX_S = 0.1
"""Backoff bounds for polling "has the process group emptied?" during the grace: the kernel has no
event for it. Used only once the leader has exited and members it forked remain."""

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_PIPE_MAX_SIZE_PATH = "/proc/sys/fs/pipe-max-size"


class StageStartError(StageError, OSError):
    """A stage's program could not be started (not executable, bad working directory, ...)."""


class ProgramNotFound(StageStartError, FileNotFoundError):
    """A stage's program does not exist on this node's ``PATH`` (or at the given path)."""


class StdinClosed(DpipesError, BrokenPipeError):
    """The stage's stdin is closed (its program exited or closed it): stop feeding it, as SIGPIPE."""


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """How a stage's process ended: an exit ``code``, or the ``signal`` that killed it."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """From a ``subprocess`` return code, where ``-N`` means killed by signal ``N``."""
        if returncode < 0:
            return cls(signal=-returncode)
        return cls(code=returncode)

    @property
    def ok(self) -> bool:
        """True for ``exit 0``."""
        return self.code == 0

    @property
    def shell_code(self) -> int:
        """The status a POSIX shell reports in ``$?``: the code, or ``128 + signal``."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 0

    def describe(self) -> str:
        """Human form: ``"exit 3"`` or ``"killed by SIGKILL"``."""
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = f"signal {self.signal}"
            return f"killed by {name}"
        return f"exit {self.code}"

    def __str__(self) -> str:
        return self.describe()


def set_pipe_size(fd: int, size: int = PIPE_BUFFER_BYTES) -> int:
    """Raise a pipe's kernel buffer to ``size``, or as close as the kernel allows; never raises.

    Returns:
        The pipe's buffer size afterwards (0 if it cannot even be queried, e.g. not a pipe).
    """
    attempts = [size]
    try:
        with open(_PIPE_MAX_SIZE_PATH, "rb") as f:
            limit = int(f.read())
        if limit < size:
            attempts.append(limit)
    except (OSError, ValueError):
        pass
    for want in attempts:
        try:
            return fcntl.fcntl(fd, _F_SETPIPE_SZ, want)
        except OSError as e:  # EPERM over the unprivileged limit, EBUSY if data would not fit, ...
            log.debug("F_SETPIPE_SZ %d on fd %d refused: %s", want, fd, e)
    try:
        return fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        return 0


def _buffered(fd: int) -> int:
    """Bytes waiting in the pipe ``fd`` (``FIONREAD``)."""
    avail = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, avail, True)
    return avail[0]


class _Pipe:
    """Our non-blocking end of one stage pipe, awaited through the loop's reader/writer callbacks."""

    __slots__ = ("_busy", "_loop", "_unyielded", "_waiter", "_watched", "_writable", "bulk", "fd", "name")

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int | None, name: str, *, writable: bool) -> None:
        if fd is not None:  # None: the stage's end is not ours (connected straight to another stage)
            os.set_blocking(fd, False)
        self._loop = loop
        self.fd: int | None = fd
        self.name = name
        self._writable = writable
        self._waiter: asyncio.Future[None] | None = None
        self._busy = False
        self._unyielded = 0
        self.bulk = False  # the last read found at least BULK_READ_BYTES: a streaming producer
        self._watched = False  # our fd is registered with the loop (see ready())

    def claim(self) -> int | None:
        """Start an operation: one at a time per pipe. Returns the fd, or None once closed."""
        if self._busy:
            raise RuntimeError(f"another task is already using the stage's {self.name}")
        if self.fd is not None:
            self._busy = True
        return self.fd

    def release(self) -> None:
        self._busy = False

    @property
    def busy(self) -> bool:
        """An operation is under way (between :meth:`claim` and :meth:`release`)."""
        return self._busy

    def moved(self, nbytes: int) -> None:
        """Count bytes moved without suspending."""
        self._unyielded += nbytes

    async def fair(self) -> None:
        """Yield to the loop once every YIELD_EVERY_BYTES moved without suspending; called before
        an operation, so a cancellation here loses no data."""
        if self._unyielded >= YIELD_EVERY_BYTES:
            self._unyielded = 0
            await asyncio.sleep(0)

    async def ready(self) -> bool:
        """Wait until the fd is readable (or writable); False if the pipe was closed meanwhile."""
        fd = self.fd
        if fd is None:
            return False
        self._unyielded = 0
        waiter = self._loop.create_future()
        self._waiter = waiter
        if not self._watched:  # a stream waits again and again: registered once, not per wait
            self._watched = True
            if self._writable:
                self._loop.add_writer(fd, self._wake)
            else:
                self._loop.add_reader(fd, self._wake)
        try:
            await waiter
        finally:
            self._waiter = None
        return self.fd is not None

    def _wake(self) -> None:
        if self._waiter is not None:
            if not self._waiter.done():
                self._waiter.set_result(None)
        elif self._watched:  # ready while nobody waits: unregister, or the loop calls us every pass
            self._unwatch()

    def _unwatch(self) -> None:
        fd, self._watched = self.fd, False
        if fd is not None:
            if self._writable:
                self._loop.remove_writer(fd)
            else:
                self._loop.remove_reader(fd)

    def close(self) -> None:
        """Close our end (idempotent); a task waiting in ``ready()`` wakes and sees it closed."""
        if self.fd is None:
            return
        self._unwatch()
        fd, self.fd = self.fd, None
        self._wake()
        os.close(fd)


def _pid_fd(pid: int) -> int | None:
    """A pidfd for ``pid`` (Linux 5.3+), or None where the platform has none."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(pid)
    except OSError:
        return None
    return fd


def _has_live_member(pgid: int) -> bool:
    """True if a process of group ``pgid`` exists and is not a zombie (True if /proc cannot tell)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return True
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # after "(comm)": state, ppid, pgrp, ...; comm may itself contain ") "
        fields = stat[stat.rfind(b")") + 2 :].split(None, 3)
        if len(fields) >= 3 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            return True
    return False


class StageProcess:
    """One running stage program and our ends of its pipes; create with :func:`start_stage`."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        argv: Sequence[str],
        *,
        stdin_fd: int | None,
        stdout_fd: int | None,
        stderr_fd: int,
        pipe_size: int,
        forward_stderr: bool,
        on_closed: Callable[[StageProcess], None] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._popen = popen
        self.argv: tuple[str, ...] = tuple(argv)
        self.pid: int = popen.pid
        self.pgid: int = popen.pid  # started as its own group leader
        self.pipe_size = pipe_size
        self._stdin = _Pipe(loop, stdin_fd, "stdin", writable=True)
        self._stdout = _Pipe(loop, stdout_fd, "stdout", writable=False)
        self._stderr = _Pipe(loop, stderr_fd, "stderr", writable=False)
        self._tail = bytearray()
        self._status: ExitStatus | None = None
        self._exited: asyncio.Future[ExitStatus] = loop.create_future()
        self._group_gone = False
        self._terminating: asyncio.Task[ExitStatus] | None = None
        self._on_closed = on_closed
        self._pidfd = _pid_fd(self.pid)
        if self._pidfd is not None:
            loop.add_reader(self._pidfd, self._poll_exit)
        else:  # no pidfd: one daemon thread blocks in waitpid, as asyncio's ThreadedChildWatcher
            threading.Thread(target=self._wait_thread, name=f"dpipes-reap-{self.pid}", daemon=True).start()
        self._stderr_drain: asyncio.Task[None] | None = None
        if not forward_stderr:
            self._stderr_drain = loop.create_task(self._drain_stderr(), name=f"stderr-{self.pid}")

    def __repr__(self) -> str:
        state = self._status.describe() if self._status else "running"
        return f"<StageProcess pid={self.pid} argv={list(self.argv)!r} {state}>"

    # -- data path -------------------------------------------------------------------------------

    async def read_stdout(self, max_bytes: int = READ_CHUNK_BYTES, *, coalesce: bool = False) -> bytes:
        """Read the next chunk of the program's stdout, up to ``max_bytes``.

        With ``coalesce``, a streaming producer's writes are gathered into one chunk
        (``BULK_READ_BYTES``); a slow one's are read as they come.

        Returns:
            The bytes available now (waiting only if none are), or ``b""`` at end of file (the
            pipe is then closed on our side).
        """
        return await self._read(self._stdout, max_bytes, coalesce=coalesce)

    async def read_stderr(self, max_bytes: int = STDERR_CHUNK_BYTES) -> bytes:
        """Read the next chunk of stderr (``b""`` at end); only for stages started with
        ``forward_stderr=True``. Every chunk also feeds :attr:`stderr_tail`."""
        if self._stderr_drain is not None:
            raise RuntimeError("stderr is drained internally; start the stage with forward_stderr=True")
        return await self._read(self._stderr, max_bytes)

    async def _read(self, pipe: _Pipe, max_bytes: int, *, coalesce: bool = False) -> bytes:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        fd = pipe.claim()
        if fd is None:
            return b""
        try:
            await pipe.fair()
            waited = not (coalesce and pipe.bulk)
            while True:
                if not waited and _buffered(fd) < min(COALESCE_BELOW_BYTES, max_bytes):
                    waited = True  # once per read: a producer that stops is not waited for again
                    await asyncio.sleep(COALESCE_WAIT_S)  # before reading: a cancel here loses nothing
                    if pipe.fd is None:
                        return b""
                try:
                    data = os.read(fd, max_bytes)
                except BlockingIOError:
                    if not await pipe.ready():
                        return b""
                    continue
                if not data:
                    pipe.close()
                    return data
                if pipe is self._stderr:
                    self._keep_tail(data)
                pipe.moved(len(data))
                pipe.bulk = len(data) >= BULK_READ_BYTES
                return data
        finally:
            pipe.release()

    def _keep_tail(self, data: bytes) -> None:
        tail = self._tail
        tail += data[-STDERR_TAIL_BYTES:]
        if len(tail) > STDERR_TAIL_BYTES:
            del tail[: len(tail) - STDERR_TAIL_BYTES]

    async def _drain_stderr(self) -> None:
        while await self._read(self._stderr, STDERR_CHUNK_BYTES):
            pass

    async def write_stdin(self, data: bytes | bytearray | memoryview) -> None:
        """Write all of ``data`` to the program's stdin; returns once the pipe has taken it.

        Returning means the bytes are in the kernel pipe, so the caller may grant its upstream
        credit for them: a program that stops reading stops its producer.

        If cancelled, a prefix of ``data`` may have been written.

        Raises:
            StdinClosed: the program exited or closed its stdin, or ``close_stdin()`` was called;
                the caller should stop its upstream as ``SIGPIPE`` would.
        """
        pipe = self._stdin
        fd = pipe.claim()
        if fd is None:
            raise StdinClosed(f"stdin of {self._name()} is closed")
        view = memoryview(data).cast("B")
        try:
            while view:
                await pipe.fair()
                try:
                    written = os.write(fd, view)
                    view = view[written:]
                    pipe.moved(written)
                except BlockingIOError:
                    if not await pipe.ready():
                        raise StdinClosed(f"stdin of {self._name()} was closed while writing") from None
                except BrokenPipeError:
                    raise StdinClosed(f"{self._name()} no longer reads its stdin") from None
        finally:
            pipe.release()
            view.release()

    def write_stdin_now(self, data: bytes | bytearray | memoryview) -> int:
        """Write to the program's stdin what its pipe takes at once, never waiting; how many bytes
        it took (0 when it takes none now, is closed, or :meth:`write_stdin` is writing). The
        caller writes the rest with :meth:`write_stdin`, which also reports a program gone."""
        pipe = self._stdin
        if pipe.fd is None or pipe.busy:
            return 0
        try:
            return os.write(pipe.fd, data)
        except (BlockingIOError, BrokenPipeError):
            return 0

    def close_stdin(self) -> None:
        """Close the program's stdin: it reads end of file (idempotent)."""
        self._stdin.close()

    def close_stdout(self) -> None:
        """Close our end of stdout: nobody will read it, so the program gets ``SIGPIPE`` (or
        ``EPIPE``) on its next write, as a producer whose consumer exited (idempotent)."""
        self._stdout.close()

    def stdout_buffered(self) -> int:
        """Bytes the program has written to stdout that we have not read yet (0 once closed)."""
        fd = self._stdout.fd
        return 0 if fd is None else _buffered(fd)

    @property
    def stderr_tail(self) -> bytes:
        """The last ``STDERR_TAIL_BYTES`` of stderr read so far, for the exit report."""
        return bytes(self._tail)

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def status(self) -> ExitStatus | None:
        """The exit status once the program has been reaped, else None."""
        return self._status

    async def wait(self) -> ExitStatus:
        """Wait for the program (the group leader) to exit and return how it ended.

        Does not read the pipes: a caller that does not pump stdout must not expect a chatty
        program to finish.
        """
        return await asyncio.shield(self._exited)

    def _poll_exit(self) -> None:
        """pidfd readable: the leader exited; reap it (``Popen.poll`` does a WNOHANG waitpid)."""
        returncode = self._popen.poll()
        if returncode is not None:
            self._set_exited(returncode)

    def _wait_thread(self) -> None:
        returncode = self._popen.wait()
        with contextlib.suppress(RuntimeError):  # the loop closed first: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._set_exited, returncode)

    def _set_exited(self, returncode: int) -> None:
        if self._status is not None:
            return
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._status = ExitStatus.from_returncode(returncode)
        # Once reaped, the group id may be reused as soon as no member is left: note now if none
        # is, so that a later terminate() never signals a stranger's group.
        self.send_signal(0)
        log.debug("stage %s (pid %d) %s", self.argv[0], self.pid, self._status.describe())
        self._exited.set_result(self._status)

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the stage's whole process group (no-op once the group is empty)."""
        if self._group_gone:
            return
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            self._group_gone = True
        except PermissionError:  # a member changed credentials (setuid); signal what we still can
            if self._status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)

    async def terminate(self, grace_s: float = TERMINATE_GRACE_S) -> ExitStatus:
        """Stop the stage and everything it forked, then reap it and close our pipe ends.

        Sends ``SIGTERM`` to the process group, waits up to ``grace_s`` for it to empty, then
        ``SIGKILL``. Idempotent, also for a stage that has already exited (it sweeps any stragglers
        left in its group). If cancelled, the group is killed before ``CancelledError`` propagates.

        Returns:
            The leader's exit status.
        """
        if self._terminating is None:
            self._terminating = self._loop.create_task(self._terminate(grace_s), name=f"term-{self.pid}")
        try:
            return await asyncio.shield(self._terminating)
        except asyncio.CancelledError:
            self.send_signal(signal.SIGKILL)
            raise

    async def kill(self) -> ExitStatus:
        """``SIGKILL`` the stage's process group at once (also cutting short a ``terminate()`` in
        its grace), reap it and close our pipe ends."""
        self.send_signal(signal.SIGKILL)
        return await self.terminate(grace_s=0.0)

    async def aclose(self) -> None:
        """Same as :meth:`terminate` with the default grace."""
        await self.terminate()

    async def _terminate(self, grace_s: float) -> ExitStatus:
        deadline = time.monotonic() + grace_s
        try:
            if grace_s > 0:
                self.send_signal(signal.SIGTERM)
                self.send_signal(signal.SIGCONT)  # a stopped (SIGSTOP) group cannot act on SIGTERM
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._exited), grace_s)
                # The leader is gone; members it forked may still be finishing within the grace.
                delay = GROUP_POLL_MIN_S
                while self._group_alive() and (left := deadline - time.monotonic()) > 0:
                    await asyncio.sleep(min(delay, left))
                    delay = min(2 * delay, GROUP_POLL_MAX_S)
            self.send_signal(signal.SIGKILL)
            try:
                status = await asyncio.wait_for(asyncio.shield(self._exited), REAP_TIMEOUT_S)
            except TimeoutError:  # e.g. stuck in uninterruptible I/O; reaped later by the pidfd
                log.warning("stage %s (pid %d) not reaped %.1fs after SIGKILL", self.argv[0], self.pid, REAP_TIMEOUT_S)
                status = ExitStatus(signal=signal.SIGKILL)
        finally:
            self._close_pipes()
        return status

    def _group_alive(self) -> bool:
        """True while the process group has a member that has not exited."""
        if self._group_gone:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            self._group_gone = True
            return False
        except PermissionError:
            return True
        # Killed orphans linger as zombies until init reaps them, and still count for killpg().
        return _has_live_member(self.pgid)

    def _close_pipes(self) -> None:
        if self._stderr_drain is not None:
            self._stderr_drain.cancel()
        for pipe in (self._stdin, self._stdout, self._stderr):
            pipe.close()
        if self._on_closed is not None:
            on_closed, self._on_closed = self._on_closed, None
            on_closed(self)

    def _name(self) -> str:
        return f"stage {self.argv[0]!r} (pid {self.pid})"


async def start_stage(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike[str] | None = None,
    forward_stderr: bool = False,
    on_closed: Callable[[StageProcess], None] | None = None,
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
    pass_fds: Sequence[int] = (),
) -> StageProcess:
    """Fork ``argv`` (no shell) in its own process group with pipes for stdin, stdout and stderr.

    Args:
        argv: the program and its arguments; the program is looked up on ``env["PATH"]`` (or the
            system default path when ``env`` has none) unless it contains a ``/``.
        env: the program's complete environment (nothing is inherited from this process).
        cwd: its working directory (default: ours).
        forward_stderr: True if the caller reads stderr with ``read_stderr()``; otherwise the stage
            drains stderr itself, keeping only :attr:`StageProcess.stderr_tail`, so that an unread
            stderr never blocks the program.
        on_closed: called once the stage has been terminated and its pipes closed.
        stdin_fd, stdout_fd: give the child this descriptor as its stdin (stdout) instead of a pipe
            of ours: the end of a pipe whose other end another stage holds, so that data passes
            between the two programs as in a shell, without us. The descriptor is the child's
            from then on: it is closed here, whatever happens; ``read_stdout``/``write_stdin``
            then see a closed pipe.
        pass_fds: more descriptors the child gets under the same numbers (a plugin worker's
            direct edges, :mod:`dpipes.nodes.plugin_stage`); like ``stdin_fd``, the child's from
            then on: closed here, whatever happens.

    Returns:
        The running stage.

    Raises:
        ProgramNotFound: the program does not exist.
        StageStartError: it exists but could not be started (permissions, bad ``cwd``, ...).
    """
    argv = list(argv)
    given = (stdin_fd, stdout_fd, None)
    ours: list[int | None] = []
    theirs: list[int] = [fd for fd in (*given, *pass_fds) if fd is not None]  # closed below, whatever happens
    if not argv or not argv[0]:
        for taken in theirs:
            os.close(taken)
        raise StageStartError(f"cannot start a stage with no program: argv={argv!r}")
    child: list[int] = []
    try:
        pipe_size = 0
        for child_reads, end in zip((True, False, False), given, strict=True):  # stdin, stdout, stderr
            if end is not None:
                ours.append(None)
                child.append(end)
                continue
            r, w = os.pipe()
            pipe_size = set_pipe_size(w)
            ours.append(w if child_reads else r)
            theirs.append(r if child_reads else w)
            child.append(r if child_reads else w)
        try:
            # Popen blocks only until the child has exec'd or failed to (under a millisecond
            # without a preexec_fn: see dpipes.nodes.launch); we want its fd and signal options,
            # and reap through a pidfd, not its blocking wait().
            prefix = launcher(argv[0], env=env, cwd=cwd)
            popen = subprocess.Popen(  # noqa: ASYNC220
                [*prefix, *argv] if prefix else argv,
                stdin=child[0],
                stdout=child[1],
                stderr=child[2],
                env=dict(env),
                cwd=cwd,
                close_fds=True,  # the child gets its three pipes and nothing else of ours
                pass_fds=tuple(pass_fds),  # ... but these
                restore_signals=True,  # SIGPIPE back to default, so `yes | head -1` ends
                start_new_session=True,  # own session and process group: signalled as one
                preexec_fn=None if prefix else die_with_parent(),  # dies with the node (PR_SET_PDEATHSIG)
            )
        except FileNotFoundError as e:
            if cwd is not None and e.filename is not None and os.fspath(e.filename) == os.fspath(cwd):
                raise StageStartError(f"cannot start {argv[0]!r}: no working directory {cwd!s}") from e
            raise ProgramNotFound(
                f"program not found: {argv[0]!r} (not on this node's PATH); install it or give its full path"
            ) from e
        except OSError as e:
            raise StageStartError(f"cannot start {argv[0]!r}: {e.strerror or e}") from e
        except ValueError as e:  # a NUL in argv or env
            raise StageStartError(f"cannot start {argv[0]!r}: {e}") from e
    except BaseException:
        for mine in ours:
            if mine is not None:
                os.close(mine)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    log.debug("started stage %s as pid %d (pipes %d bytes)", argv[0], popen.pid, pipe_size)
    assert ours[2] is not None
    return StageProcess(
        popen,
        argv,
        stdin_fd=ours[0],
        stdout_fd=ours[1],
        stderr_fd=ours[2],
        pipe_size=pipe_size,
        forward_stderr=forward_stderr,
        on_closed=on_closed,
    )


class Supervisor:
    """Owns every stage of a node: starts them, tracks them, and terminates them all on ``aclose()``.

    Use as ``async with Supervisor() as sup: stage = await sup.start(argv, env=...)``. Call
    ``terminate()`` on each stage when its pipeline ends (cheap once it has exited; it sweeps its
    process group); the supervisor then forgets it.
    """

    def __init__(self, *, grace_s: float = TERMINATE_GRACE_S) -> None:
        self.grace_s = grace_s
        self._stages: set[StageProcess] = set()
        self._closed = False
        self.started = 0
        """Programs started since the supervisor was made (what a refusal must leave at 0)."""

    @property
    def stages(self) -> frozenset[StageProcess]:
        """The stages started and not yet terminated."""
        return frozenset(self._stages)

    async def start(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str | os.PathLike[str] | None = None,
        forward_stderr: bool = False,
        stdin_fd: int | None = None,
        stdout_fd: int | None = None,
        pass_fds: Sequence[int] = (),
    ) -> StageProcess:
        """Start a stage under this supervisor; see :func:`start_stage`."""
        if self._closed:
            for fd in (stdin_fd, stdout_fd, *pass_fds):
                if fd is not None:
                    os.close(fd)
            raise StageError(f"cannot start {list(argv)[:1]!r}: the node's supervisor is shutting down")
        stage = await start_stage(
            argv,
            env=env,
            cwd=cwd,
            forward_stderr=forward_stderr,
            on_closed=self._stages.discard,
            stdin_fd=stdin_fd,
            stdout_fd=stdout_fd,
            pass_fds=pass_fds,
        )
        self._stages.add(stage)
        self.started += 1
        return stage

    async def aclose(self) -> None:
        """Terminate every stage concurrently: bounded by the grace plus the reap timeout."""
        self._closed = True
        stages = list(self._stages)
        if stages:
            log.debug("terminating %d stage(s)", len(stages))
            await asyncio.gather(*(s.terminate(self.grace_s) for s in stages), return_exceptions=True)
        self._stages.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
