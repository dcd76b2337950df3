"""The daemon process around a node: detaching, pid and log files, signals, stopping.

:func:`run_daemon` is the process-level entry point of ``dpipesd`` (like ``uvicorn.run``: it owns the
process, so it configures logging, handles signals and writes to the terminal); the CLI
(``dpipes.tools.dpipesd``) only parses arguments and builds the configuration.

Starting, in the background (the default)::

    parent ──fork──> child ──setsid, fork──> daemon         (the child exits at once)
      │                                        │ chdir /, umask 022, stdin </dev/null,
      │                                        │ stdout+stderr >>N.log; claims N (and local);
      │                                        │ starts the node: it listens
      │                                        │ writes N.pid (and local.pid) atomically
      │<───── "ready <tcp endpoint> <ipc endpoint>\\n" ─┘  or "error <message>\\n"
      prints the endpoints, pid and files; exits 0          (or the error on stderr; exits 1)

The parent reads one line from a pipe (bounded by :data:`READY_TIMEOUT_S`); end of file without a
line means the daemon died before it was ready, and its log says why. With ``foreground`` the node
runs in the calling process, logging to stderr; it still claims its name and writes its pid file.
Both print the same lines on stdout once the node listens, the first being
``node NAME ready: TCP-ENDPOINT IPC-ENDPOINT``; a script may wait for it.

Under systemd (``Type=notify``, see ``examples/systemd/dpipesd.service``) run it with
``--foreground``: the node sends ``READY=1`` (with ``MAINPID`` and a ``STATUS``) to
``$NOTIFY_SOCKET`` once it listens, and ``STOPPING=1`` when it is told to stop
(:mod:`dpipes.nodes.sdnotify`).

Stopping: SIGTERM or SIGINT closes the node gracefully (``node.aclose()``, which cancels running
stages) within :data:`STOP_TIMEOUT_S`; past that the daemon exits anyway. A second SIGINT exits at
once. Either way the daemon removes its pid file and gives up its claims (see
:mod:`dpipes.nodes.paths`; a daemon killed with SIGKILL leaves files that the next one on the same
name removes). :func:`stop_daemon` sends SIGTERM to the pid in the pid file, once
:func:`paths.check_holder <dpipes.nodes.paths.check_holder>` has confirmed that this pid is the
process holding the name's lock (a rewritten pid file or a reused pid is refused, not signalled),
and waits for the process to be gone.

Runtime files are owner-only whatever the umask: the node binds its sockets under umask 077, the
daemon checks them (:func:`paths.secure_sockets <dpipes.nodes.paths.secure_sockets>`) before it
writes its pid file and says it is ready, and the pid, lock and log files are created 0600.
"""

# About 650 lines, one job: the process around a node (detach, files, signals, stop, sd_notify);
# the diagram above is most of what a reader needs, and the stop path's pid checks belong beside it.

from __future__ import annotations

import asyncio
import contextlib
import gc
import getpass
import logging
import os
import select
import shlex
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from dpipes.bus.errors import DpipesError, KeyFileError
from dpipes.bus.keyring import Keyring
from dpipes.bus.keys import KeyPair
from dpipes.nodes import code_cache, paths, sdnotify
from dpipes.nodes.config import NodeConfig
from dpipes.nodes.paths import AlreadyRunning, Claim, NodeFiles, RuntimeDirError
from dpipes.nodes.security import node_keypair

__all__ = [
    "LOG_FORMAT",
    "READY_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "STOP_WAIT_S",
    "DaemonError",
    "DaemonStatus",
    "NodeFactory",
    "ServingNode",
    "node_keypair",
    "run_daemon",
    "status",
    "stop_daemon",
]

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 10.0  # graceful node.aclose() on SIGTERM/SIGINT; stages get their own, shorter, bound
READY_TIMEOUT_S = 60.0  # the detaching parent's wait for "ready": binding takes well under a second
STOP_WAIT_S = STOP_TIMEOUT_S + 5.0  # stop_daemon's wait for the process to go: the node's bound plus cleanup
STOP_POLL_S = 0.05  # how often stop_daemon looks whether the process is gone
LEFTOVER_TASKS_S = 2.0  # tasks still pending once the node is closed get this long to finish cancelling
EXIT_INTERRUPTED = 130  # the shell's code for death by SIGINT, used on a second Ctrl-C
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DETACHED_LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"  # runs share N.log


class DaemonError(DpipesError, RuntimeError):
    """The node could not be started (it could not listen, its factory failed, ...)."""


class ServingNode(Protocol):
    """What the daemon needs of a node: ``dpipes.nodes.node.Node`` is one."""

    name: str

    @property
    def tcp_endpoint(self) -> str: ...

    async def __aenter__(self) -> Any:
        """Start: return once the node listens."""

    async def serve(self) -> None:
        """Return when the node should stop by itself (e.g. after one stage with ``exit_after_one``)."""

    async def aclose(self) -> None:
        """Stop serving, cancel what runs, close every socket. Idempotent."""


class NodeFactory(Protocol):
    """Builds the node; ``dpipes.nodes.node.Node`` itself is one."""

    def __call__(
        self, config: NodeConfig, /, *, exclusive: list[str] | None, ipc: str, tap: str, exit_after_one: bool
    ) -> ServingNode: ...


@dataclass(frozen=True, slots=True)
class DaemonStatus:
    """A running daemon, as its runtime files describe it."""

    name: str
    pid: int
    pid_file: Path
    log_file: Path
    ipc_endpoint: str
    local: bool
    """Whether it also answers at the host's local socket."""


# -- running -----------------------------------------------------------------------------------


def _locate(name: str, runtime_dir: Path | None, err: TextIO) -> tuple[Path, paths.NodeFiles] | int:
    """The runtime directory and files of node ``name``, or the exit code after saying what is wrong."""
    problem = paths.check_daemon_name(name)
    if problem is not None:
        print(f"dpipesd: {problem}", file=err)
        return 2
    try:
        where = _runtime_dir(runtime_dir)
    except RuntimeDirError as e:
        print(f"dpipesd: {e}", file=err)
        return 1
    return where, paths.node_files(where, name)


def run_daemon(
    config: NodeConfig,
    *,
    exclusive: list[str] | None,
    foreground: bool,
    exit_after_one: bool,
    log_level: str,
    node_factory: NodeFactory,
    runtime_dir: Path | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run node ``config.name`` as a daemon until it is stopped; return the process's exit status.

    Args:
        config: the node's configuration.
        exclusive: ``dpipesd -- PROG ARGS``: the only program the node runs, or None.
        foreground: stay attached and log to stderr, instead of detaching.
        exit_after_one: ``dpipesd --exit``: stop once the node's ``serve()`` returns after one stage.
        log_level: a :mod:`logging` level name (``"INFO"``, ...).
        node_factory: builds the node (see :class:`NodeFactory`).
        runtime_dir: where the pid, log and socket files go (default: :func:`paths.runtime_dir`).
        out: where the "ready" lines go once the node listens (default ``sys.stdout``).
        err: where errors before the node runs are reported (default ``sys.stderr``).

    Returns:
        0 when the node ran and stopped (or, detaching, once it is ready), 1 on a runtime error
        (already running, cannot listen, ...), 2 when ``config.name`` cannot be a daemon's name.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    located = _locate(config.name, runtime_dir, err)
    if isinstance(located, int):
        return located
    _where, files = located
    try:
        node_key, created = node_keypair(config)
    except KeyFileError as e:
        print(f"dpipesd: node {config.name}: {e}", file=err)
        return 1
    if created:
        print(f"dpipesd: created the key pair of node {config.name} in {node_key.path.parent}", file=err)
    keys = _ReadyKeys(node_key, _user_client_key(err))
    run = _Run(
        config,
        files,
        exclusive=exclusive,
        exit_after_one=exit_after_one,
        node_factory=node_factory,
        # Attached, the ready lines on stdout say it already; detached, the log is where it is kept.
        ready_log_level=logging.DEBUG if foreground else logging.INFO,
    )
    if foreground:
        _configure_logging(log_level, LOG_FORMAT)
        try:
            return run.run(lambda tcp, ipc: _say_ready(out, files, tcp, ipc, os.getpid(), log_to="stderr", keys=keys))
        except (AlreadyRunning, DaemonError) as e:
            print(f"dpipesd: {e}", file=err)
            return 1
    return _detach(run, log_level, out=out, err=err, keys=keys)


class _Run:
    """One daemon run: claim the name (and maybe the local socket), serve the node, release."""

    def __init__(
        self,
        config: NodeConfig,
        files: NodeFiles,
        *,
        exclusive: list[str] | None,
        exit_after_one: bool,
        node_factory: NodeFactory,
        ready_log_level: int = logging.INFO,
    ) -> None:
        self.config = config
        self.ready_log_level = ready_log_level
        self.files = files
        self.exclusive = list(exclusive) if exclusive else None
        self.exit_after_one = exit_after_one
        self.node_factory = node_factory
        self.own: Claim | None = None
        self.local: Claim | None = None

    def run(self, ready: Callable[[str, str], None]) -> int:
        """Serve until stopped; call ``ready(tcp, ipc)`` once listening, with the pid file written.

        Raises:
            AlreadyRunning: the name is taken.
            DaemonError: the node could not start.
        """
        self.own = paths.claim(self.files.dir, self.config.name)
        try:
            self.local = paths.claim_local(self.files.dir, self.config.name)
            return _run_loop(self._serve(ready))
        finally:
            self.release()

    def release(self) -> None:
        paths.release(self.local, self.own)

    @property
    def bound(self) -> NodeFiles:
        """The files whose sockets the hub binds: the local socket's when we hold it."""
        return self.local.files if self.local else self.files

    def _listening(self, node: ServingNode, ready: Callable[[str, str], None]) -> None:
        assert self.own is not None
        try:
            paths.secure_sockets(self.bound)
        except RuntimeDirError as exc:
            raise DaemonError(f"node {node.name}: {exc}") from exc
        pid_file = self.own.write_pid()
        if self.local:
            self.local.write_pid()
            self.own.alias(self.local)
        ipc = self.bound.ipc_endpoint
        log.log(
            self.ready_log_level,
            "node %s ready: %s %s (pid %d, pid file %s)",
            node.name,
            node.tcp_endpoint,
            ipc,
            os.getpid(),
            pid_file,
        )
        # What start-up made (modules, the node itself) lives as long as the daemon: keep it out of
        # the collector's full passes, which otherwise stall the loop ~8 ms each (the Pipes p99).
        # dpipesd turns the collector off for the start (tools/dpipesd.py); from here on it runs. No
        # gc.collect() first: start-up leaves little cyclic garbage (~470 of ~46k objects, frozen
        # with the rest: some KiB), and the full pass cost ~15 ms of CPU per start, which 8 daemons
        # starting on 2 cores feel.
        gc.freeze()
        gc.enable()
        ready(node.tcp_endpoint, ipc)
        sdnotify.notify(READY=1, MAINPID=os.getpid(), STATUS=f"node {node.name} listening on {node.tcp_endpoint} {ipc}")
        code_cache.save()  # what the start compiled that the cache lacked (dpipesd installs it)

    async def _serve(self, ready: Callable[[str, str], None]) -> int:
        loop = asyncio.get_running_loop()
        stopping = asyncio.Event()
        name = self.config.name

        def on_signal(signum: signal.Signals) -> None:
            if not stopping.is_set():
                log.info("node %s: %s: stopping (at most %.0f s)", name, signum.name, STOP_TIMEOUT_S)
                sdnotify.notify(STOPPING=1, STATUS=f"node {name} stopping")
                stopping.set()
            elif signum == signal.SIGINT:
                log.warning("node %s: second SIGINT: exiting at once", name)
                self.release()
                _flush_logs()
                os._exit(EXIT_INTERRUPTED)
            else:
                log.info("node %s: %s: already stopping", name, signum.name)

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        try:
            node = self.node_factory(
                self.config,
                exclusive=self.exclusive,
                ipc=self.bound.ipc_endpoint,
                tap=self.bound.tap_endpoint,
                exit_after_one=self.exit_after_one,
            )
        except DpipesError as exc:  # the configuration refused (an exposed listen address, ...)
            raise DaemonError(str(exc)) from exc
        try:
            # Sockets get their mode from the umask at bind time: bind under 077, so that no
            # socket is ever reachable by others, even for the moment before secure_sockets().
            umask = os.umask(0o077)
            try:
                await node.__aenter__()
            finally:
                os.umask(umask)  # stages inherit the daemon's own umask, not ours
        except Exception as exc:
            log.debug("node %s: start failed", name, exc_info=True)
            await _close(node)
            raise DaemonError(str(exc) or f"node {name}: cannot start: {type(exc).__name__}") from exc
        code = 0
        serving: asyncio.Future[None] | None = None
        try:
            self._listening(node, ready)
            serving = asyncio.ensure_future(node.serve())
            stop = asyncio.ensure_future(stopping.wait())
            await asyncio.wait({serving, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if serving.done():
                if serving.exception() is not None:
                    log.error("node %s failed", name, exc_info=serving.exception())
                    code = 1
                else:
                    log.info("node %s: done", name)
        finally:
            if not await _close(node):
                code = 1
            if serving is not None and not serving.done():
                serving.cancel()
        log.info("node %s: stopped", name)
        return code


async def _close(node: ServingNode) -> bool:
    """``node.aclose()`` within STOP_TIMEOUT_S; whether it finished cleanly."""
    closing = asyncio.ensure_future(node.aclose())
    done, _ = await asyncio.wait({closing}, timeout=STOP_TIMEOUT_S)
    if not done:
        # Not cancelled: a close that ignores cancellation would hold us here again.
        log.error("node %s did not close within %.0f s; exiting anyway", node.name, STOP_TIMEOUT_S)
        return False
    if closing.exception() is not None:
        log.error("node %s: close failed", node.name, exc_info=closing.exception())
        return False
    return True


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run(main)``, except that tasks left over at the end get a bounded time to cancel."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            leftovers = asyncio.all_tasks(loop)
            for task in leftovers:
                task.cancel()
            if leftovers:
                loop.run_until_complete(asyncio.wait(leftovers, timeout=LEFTOVER_TASKS_S))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _runtime_dir(given: Path | None) -> Path:
    """``given`` (checked like any runtime directory), else the default one."""
    return paths.runtime_dir() if given is None else paths.runtime_dir({paths.RUNTIME_DIR_ENV: str(given)})


def _configure_logging(level: str, fmt: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(), format=fmt, force=True)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


# -- detaching ---------------------------------------------------------------------------------


class _ReadyPipe:
    """The daemon's end of the readiness pipe: one line, then closed."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def send(self, line: str) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        text = " ".join(line.split("\n")) + "\n"
        try:
            os.write(fd, text.encode("utf-8", errors="replace"))
        except OSError:
            pass  # the parent is gone (interrupted): nobody to tell
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _detach(run: _Run, log_level: str, *, out: TextIO, err: TextIO, keys: _ReadyKeys) -> int:
    """Fork the daemon off (see the module docstring); in the parent, report whether it got ready."""
    for stream in (sys.stdout, sys.stderr, out, err):
        stream.flush()  # or the children would write the parent's buffered output again
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child; the tests see its effects
        pipe = _ReadyPipe(write_fd)
        try:
            os.close(read_fd)
            os.setsid()  # no controlling terminal: Ctrl-C and hangups of the shell do not reach us
            if os.fork() != 0:
                os._exit(0)  # the daemon is not a session leader, so it can never get a terminal back
            _daemon(run, log_level, pipe)
        except BaseException as e:
            pipe.send(f"error cannot detach: {e}")
        os._exit(1)
    os.close(write_fd)
    files = run.files
    try:
        os.waitpid(child, 0)  # the intermediate child exits as soon as it has forked
        line = _read_line(read_fd, READY_TIMEOUT_S)
    finally:
        os.close(read_fd)
    name = run.config.name
    if line is None:
        print(
            f"dpipesd: node {name} is not ready after {READY_TIMEOUT_S:.0f} s; see its log {files.log}. "
            f"It may still be starting: stop it with: dpipesd --stop --name {name}",
            file=err,
        )
        return 1
    if line == "":
        print(f"dpipesd: node {name} exited before it was ready; see its log {files.log}", file=err)
        return 1
    word, _, rest = line.partition(" ")
    if word == "ready":
        tcp, _, ipc = rest.partition(" ")
        _say_ready(out, files, tcp, ipc, paths.read_pid(files.pid), log_to=str(files.log), keys=keys)
        return 0
    if word == "error":
        print(f"dpipesd: {rest}", file=err)
        return 1
    print(f"dpipesd: node {name}: unexpected answer while starting: {line!r}; see its log {files.log}", file=err)
    return 1


@dataclass(frozen=True, slots=True)
class _ReadyKeys:
    """The keys the ready message names: the node's, and its user's client key (if it can be had)."""

    node: KeyPair
    client: KeyPair | None


def _user_client_key(err: TextIO) -> KeyPair | None:
    """This user's client key pair, as ``dpipes`` uses it (created on first use, said on ``err``);
    None if the key directory cannot be used (the node's own key may live elsewhere)."""
    ring = Keyring()
    try:
        pair, created = ring.client()
    except KeyFileError as e:
        log.debug("no client key of this user to name in the ready message: %s", e)
        return None
    if created:
        print(f"dpipesd: created your client key pair {pair.fingerprint} in {ring.dir}", file=err)
    return pair


def _say_ready(
    out: TextIO, files: NodeFiles, tcp: str, ipc: str, pid: int | None, *, log_to: str, keys: _ReadyKeys
) -> None:
    """Tell the user (or a script, which can wait for the first line) where the node listens, and how
    another host's node admits this node and this user (the first contact, copied and pasted)."""
    where = "" if files.dir == paths.runtime_dir_path() else f" --runtime-dir {files.dir}"
    stop = f"dpipesd --stop --name {files.name}{where}"
    key = keys.node
    try:
        print(f"node {files.name} ready: {tcp} {ipc}", file=out)
        pin = f"dpipes keys pin {files.name} {shlex.quote(key.public.z85)}"
        print(f"node key {key.fingerprint}; other hosts trust it with: {pin}", file=out)
        if keys.client is not None:
            try:
                user = getpass.getuser()
            except (OSError, KeyError):  # a uid without a passwd entry (a container)
                user = str(os.getuid())
            who = f"{user}@{socket.gethostname()}"
            trust = (
                f"dpipes keys trust {shlex.quote(keys.client.public.z85)} --comment {shlex.quote(who)} "
                "--run 'PROG [ARG-PATTERN...]'"
            )
            print(f"your client key {keys.client.fingerprint}; another node admits it with: {trust}", file=out)
        print(f"pid {pid}, pid file {files.pid}, log {log_to}", file=out)
        print(f"stop with: {stop}   or: kill $(cat {files.pid})", file=out, flush=True)
    except (OSError, ValueError):  # nobody reads our stdout any more (closed pipe or stream)
        log.debug("node %s: ready message not delivered", files.name, exc_info=True)


def _read_line(fd: int, timeout: float) -> str | None:
    """One line from ``fd``: "" at end of file without a line, None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return ""
        data += chunk
    return data.split(b"\n", 1)[0].decode("utf-8", errors="replace")


def _daemon(run: _Run, log_level: str, pipe: _ReadyPipe) -> None:  # pragma: no cover - in the daemon
    """The detached daemon's life; never returns."""
    code = 1
    try:
        os.chdir("/")  # hold no directory busy (an unmount, a deleted checkout)
        os.umask(0o022)
        log_fd = os.open(run.files.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        os.fchmod(log_fd, 0o600)  # one left by an older run may have another mode
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(null_fd)
        os.close(log_fd)
        _configure_logging(log_level, DETACHED_LOG_FORMAT)
        code = run.run(lambda tcp, ipc: pipe.send(f"ready {tcp or '-'} {ipc}"))
    except (AlreadyRunning, DaemonError) as e:
        log.error("%s", e)
        pipe.send(f"error {e}")
    except BaseException as e:
        log.exception("node %s: daemon failed", run.config.name)
        pipe.send(f"error node {run.config.name}: {type(e).__name__}: {e} (see its log {run.files.log})")
    finally:
        pipe.close()
        run.release()
        _flush_logs()
        os._exit(code)


# -- stopping and status -----------------------------------------------------------------------


def stop_daemon(
    name: str,
    runtime_dir: Path | None = None,
    *,
    timeout: float = STOP_WAIT_S,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Stop the daemon of node ``name``: SIGTERM, then wait (bounded) for its process to be gone.

    Returns:
        0 when it stopped or was not running (stale files are removed), 1 when it could not be
        signalled or did not stop within ``timeout``, 2 for a name no daemon can have.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    located = _locate(name, runtime_dir, err)
    if isinstance(located, int):
        return located
    where, files = located
    stale_pid = paths.read_pid(files.pid)
    had_pid_file = files.pid.exists()
    try:
        # Taking the name is the one reliable test that no daemon holds it; we give it back at once.
        paths.claim(where, name).release()
    except AlreadyRunning as e:
        pid = e.pid
    else:
        _clear_stale_local(where, stale_pid)
        if had_pid_file:
            print(
                f"dpipesd: node {name} is not running (removed stale pid file {files.pid} of pid {stale_pid})", file=err
            )
        else:
            print(f"dpipesd: node {name} is not running (no pid file {files.pid})", file=err)
        return 0
    if pid is None:
        print(f"dpipesd: node {name} is starting and its pid is not known yet; try again", file=err)
        return 1
    problem = paths.check_holder(files, pid)
    if problem is not None:
        print(f"dpipesd: refusing to signal pid {pid} as node {name}: {problem}", file=err)
        return 1
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # it just exited
    except PermissionError:
        print(f"dpipesd: cannot signal node {name} (pid {pid}): permission denied", file=err)
        return 1
    deadline = time.monotonic() + timeout
    while paths.pid_alive(pid):
        if time.monotonic() > deadline:
            print(
                f"dpipesd: node {name} (pid {pid}) did not stop within {timeout:.0f} s; see its log {files.log}; "
                f"force it with: kill -KILL {pid}",
                file=err,
            )
            return 1
        time.sleep(STOP_POLL_S)  # a process that is not our child cannot be waited for
    if files.pid.exists() or files.lock.exists():
        with contextlib.suppress(AlreadyRunning):  # a new daemon already took the name: its files
            paths.claim(where, name).release()
    _clear_stale_local(where, pid)
    print(f"stopped node {name} (pid {pid})", file=out)
    return 0


def _clear_stale_local(where: Path, pid: int | None) -> None:
    """Remove the local socket's files if process ``pid``, now gone, left them (it was SIGKILLed)."""
    local = paths.node_files(where, paths.LOCAL_NAME)
    if pid is not None and paths.read_pid(local.pid) == pid:
        paths.release(paths.claim_local(where, ""))  # None if another daemon holds it already


def status(name: str, runtime_dir: Path | None = None) -> DaemonStatus | None:
    """The running daemon of node ``name``, from its pid file; None when it is not running.

    Reads files only; it never signals or locks anything.

    Raises:
        RuntimeDirError: the runtime directory cannot be used.
    """
    where = _runtime_dir(runtime_dir)
    files = paths.node_files(where, name)
    pid = paths.read_pid(files.pid)
    if pid is None or not paths.pid_alive(pid):
        return None
    local = paths.local_daemon(where)
    is_local = local is not None and local.pid == pid
    return DaemonStatus(
        name=name,
        pid=pid,
        pid_file=files.pid,
        log_file=files.log,
        ipc_endpoint=local.ipc_endpoint if local is not None and is_local else files.ipc_endpoint,
        local=is_local,
    )
