"""Where a node's runtime files live, and how a daemon holds its name there.

The runtime directory (``$DPIPES_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/dpipes``, else
``/tmp/dpipes-<uid>``; owner-only, checked at each use) is :mod:`dpipes.nodes.runtime_dir`'s, whose
names this module re-exports.

Files of the daemon of node ``N``, all in that directory:

``N.sock``
    the hub's ``ipc://`` endpoint for local parties (``ipc://<dir>/N.sock``).
``N-tap.sock``
    the tap mirror (``dpipes-tap``).
``N-fds.sock``
    the descriptor drop, where a local ``dpipes`` hands over its stdin and stdout
    (:mod:`dpipes.nodes.fdpass`).
``N.pid``
    the daemon's pid, one line, written atomically (temporary file, then rename) only once the
    node listens; so ``kill $(cat N.pid)`` works and a reader never sees half a file.
``N.log``
    the detached daemon's stdout, stderr and log (appended to; a foreground daemon logs to
    stderr instead).
``N.lock``
    held with ``flock`` for the daemon's whole life: this, not the pid file, decides whether the
    name is taken. The kernel drops the lock when the process dies however it dies, so a crashed
    daemon never blocks its successor, two daemons starting at once cannot both win, and a reused
    pid in a stale pid file cannot fool it. It holds ``"<pid> <name> <start>"``, written at once,
    which names the holder while its pid file is not written yet; ``<start>`` is the holder's start
    time (field 22 of ``/proc/PID/stat``), so that a pid reused by another process is told apart.

**Whatever the umask.** Every file here is owner-only: the pid, lock and log files are created
with mode 0600 (and set to it when they exist), and the daemon binds its sockets under umask 077
and then checks them (:func:`secure_sockets`): a socket another user could connect to would let
that user run programs as this one. Before :func:`stop_daemon <dpipes.nodes.daemon.stop_daemon>`
signals the pid it read, :func:`check_holder` verifies that this pid is the process that holds the
name's lock and was started when the lock file says: a pid file rewritten by someone else, or a pid
reused since, is refused rather than signalled.

**The host's local socket.** The first daemon on a host also answers at ``ipc://<dir>/local.sock``
(:func:`local_endpoint`), so that ``dpipes`` finds a node without being told its name. It is a
second claim, on the name ``local`` (:data:`LOCAL_NAME`), with the same files: ``local.lock``,
``local.pid`` and ``local-tap.sock``. A daemon first claims its own name (:func:`claim`), then
tries :func:`claim_local`; if that succeeds it binds its hub at ``local.sock`` (tap
``local-tap.sock``) *instead of* ``N.sock``, and :meth:`Claim.alias` makes ``N.sock`` and
``N-tap.sock`` symbolic links to them, so that the node is reachable by its name as well.
Otherwise ``local.lock`` is held by a live daemon and this one binds ``N.sock``. The claim is
free again when its holder exits; the next daemon to start takes it (a running daemon does not
move). Files a dead holder left are removed by whoever claims the name next. ``local`` is
therefore not a valid daemon name (:func:`check_daemon_name`).

A client (the ``dpipes`` CLI) calls :func:`local_daemon`: it answers with the endpoints when
``local.sock`` exists and ``local.pid`` names a live process, else None (start an embedded node).
"""

# A little over 500 lines, one job: runtime files and their ownership rules, every check beside its
# reason (the security issue's umask and other-uid cases live here).

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from pathlib import Path
from typing import NamedTuple

from dpipes.bus.errors import DpipesError
from dpipes.nodes.runtime_dir import (
    LOCAL_NAME,
    RUNTIME_DIR_ENV,
    RuntimeDirError,
    local_socket,
    runtime_dir,
    runtime_dir_path,
)

__all__ = [
    "LOCAL_NAME",
    "RUNTIME_DIR_ENV",
    "AlreadyRunning",
    "Claim",
    "LocalDaemon",
    "NodeFiles",
    "RuntimeDirError",
    "check_daemon_name",
    "check_holder",
    "claim",
    "claim_local",
    "local_daemon",
    "local_endpoint",
    "local_leftovers",
    "lock_holders",
    "node_files",
    "pid_alive",
    "process_start_time",
    "read_pid",
    "release",
    "runtime_dir",
    "runtime_dir_path",
    "secure_sockets",
]

_CLAIM_RETRIES = 20  # a lock file replaced under us between open and flock: try the new one


class AlreadyRunning(DpipesError, RuntimeError):
    """Another live process holds this node name in the runtime directory."""

    def __init__(self, message: str, *, name: str, pid: int | None, pid_file: Path) -> None:
        super().__init__(message)
        self.name = name
        self.pid = pid
        self.pid_file = pid_file


def check_daemon_name(name: str) -> str | None:
    """What is wrong with ``name`` as a daemon's name in a runtime directory, or None."""
    if name == LOCAL_NAME:
        return f"node name {LOCAL_NAME!r} is reserved for the host's default socket; choose another name"
    return None


class NodeFiles(NamedTuple):
    """The runtime files of one name in one runtime directory.

    A named tuple, not a dataclass: the short client path finds the local daemon here, and
    :mod:`dataclasses` costs a start of ``dpipes`` several milliseconds of imports.
    """

    dir: Path
    name: str

    @property
    def sock(self) -> Path:
        return self.dir / f"{self.name}.sock"

    @property
    def tap_sock(self) -> Path:
        return self.dir / f"{self.name}-tap.sock"

    @property
    def fds_sock(self) -> Path:
        return self.dir / f"{self.name}-fds.sock"

    @property
    def pid(self) -> Path:
        return self.dir / f"{self.name}.pid"

    @property
    def log(self) -> Path:
        return self.dir / f"{self.name}.log"

    @property
    def lock(self) -> Path:
        return self.dir / f"{self.name}.lock"

    @property
    def ipc_endpoint(self) -> str:
        return f"ipc://{self.sock}"

    @property
    def tap_endpoint(self) -> str:
        return f"ipc://{self.tap_sock}"


def node_files(dir: Path, name: str) -> NodeFiles:
    """The runtime files of node ``name`` (or of :data:`LOCAL_NAME`) in ``dir``."""
    return NodeFiles(Path(dir), name)


def local_endpoint(dir: Path) -> str:
    """``ipc://<dir>/local.sock``: where the host's first daemon also answers."""
    return f"ipc://{local_socket(dir)}"


def read_pid(path: Path) -> int | None:
    """The pid on the first line of ``path``, or None if it is missing, empty or not a pid."""
    try:
        text = Path(path).read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    first = text.split(None, 1)[0] if text.split() else ""
    return int(first) if first.isdigit() and int(first) > 0 else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists; it is someone else's
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return True  # no /proc: trust kill(0)
    state = stat_line[stat_line.rfind(b")") + 2 :][:1]
    return state not in (b"Z", b"X")  # a zombie has exited; only its parent has not reaped it


def process_start_time(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (``/proc/PID/stat`` field 22), or None.

    A pid names a process only together with its start time: pids are reused.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    fields = stat_line[stat_line.rfind(b")") + 2 :].split()  # the command name may hold spaces
    try:
        return int(fields[19])  # field 22 of the whole line; the first two are before ")"
    except (IndexError, ValueError):
        return None


def lock_holders(path: Path) -> set[int] | None:
    """The pids holding a ``flock`` on file ``path`` (from ``/proc/locks``), or None if unknown."""
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    holders = set()
    for line in lines:
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; a waiter's line has "->" after "1:".
        words = line.split()
        if len(words) < 6 or words[1] != "FLOCK":
            continue
        where = words[5].rsplit(":", 1)
        if len(where) == 2 and where[1] == str(inode) and words[4].isdigit():
            holders.add(int(words[4]))
    return holders


def check_holder(files: NodeFiles, pid: int) -> str | None:
    """What is wrong with taking ``pid`` for the daemon that holds ``files``' name, or None if it is.

    It is, when the lock file names ``pid`` with ``pid``'s start time and (where ``/proc/locks``
    tells) ``pid`` holds the lock. Anything else is a pid file rewritten by someone else, or a
    pid reused since: signalling it would hit a process that is not this daemon.
    """
    try:
        text = files.lock.read_text(encoding="utf-8", errors="replace").split()
    except OSError as e:
        return f"cannot read its lock file {files.lock}: {e.strerror or e}"
    lock_pid = int(text[0]) if text and text[0].isdigit() else None
    if lock_pid != pid:
        return f"its pid file {files.pid} says pid {pid} but its lock file {files.lock} says pid {lock_pid}"
    holders = lock_holders(files.lock)
    if holders is not None and pid not in holders:
        return f"pid {pid} does not hold the lock {files.lock} (held by {sorted(holders) or 'nobody'})"
    recorded = text[2] if len(text) > 2 else "-"
    started = process_start_time(pid)
    if recorded != "-" and started is not None and str(started) != recorded:
        return f"pid {pid} started at tick {started}, not at tick {recorded} as the daemon did: the pid was reused"
    return None


def secure_sockets(files: NodeFiles) -> None:
    """Make the sockets of ``files`` owner-only (mode 0600), and check that they are.

    A socket in the runtime directory accepts commands that run programs as this user; its mode
    comes from the umask at bind time, which may have been anything. Links (aliases) are skipped:
    their targets are checked under their own name.

    Raises:
        RuntimeDirError: a socket belongs to another user, or its mode cannot be set.
    """
    for path in (files.sock, files.tap_sock, files.fds_sock):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        if st.st_uid != os.getuid():
            raise RuntimeDirError(f"socket {path} belongs to uid {st.st_uid}, not to this daemon (uid {os.getuid()})")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, 0o600)
            if stat.S_IMODE(path.lstat().st_mode) & 0o077:
                raise RuntimeDirError(f"socket {path}: cannot make it owner-only")


class Claim:
    """A process's exclusive hold on one name's files in a runtime directory, until :meth:`release`."""

    def __init__(self, files: NodeFiles, fd: int, owner: str) -> None:
        self.files = files
        self.owner = owner
        """The node that holds the claim (for the local claim: the daemon's own name)."""
        self._fd: int | None = fd
        self._aliases: list[Path] = []

    def __bool__(self) -> bool:
        return self._fd is not None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def write_pid(self, pid: int | None = None) -> Path:
        """Write the pid file atomically (temporary file, then rename); return its path."""
        pid = os.getpid() if pid is None else pid
        tmp = self.files.pid.with_name(f".{self.files.pid.name}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a crash of a process with our pid: O_EXCL below must create it
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # the mode given to open() is cut by the umask, never widened; still
            os.write(fd, f"{pid}\n".encode("ascii"))
        finally:
            os.close(fd)
        os.replace(tmp, self.files.pid)
        return self.files.pid

    def alias(self, target: Claim) -> None:
        """Make this name's sockets symbolic links to ``target``'s (the local socket's owner)."""
        for link, to in (
            (self.files.sock, target.files.sock),
            (self.files.tap_sock, target.files.tap_sock),
            (self.files.fds_sock, target.files.fds_sock),
        ):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(to.name)  # relative: the directory may move, as a whole
            self._aliases.append(link)

    def release(self) -> None:
        """Remove the pid file, sockets and lock file, then drop the lock. Idempotent."""
        if self._fd is None:
            return
        for path in (self.files.pid, self.files.sock, self.files.tap_sock, self.files.fds_sock, self.files.lock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        # Unlinked before unlocking: a process that opened the old lock file and locks it after us
        # sees that it is no longer at its path (claim() compares inodes) and tries again.
        fd, self._fd = self._fd, None
        os.close(fd)

    def __repr__(self) -> str:
        return f"Claim({self.files.name!r} in {str(self.files.dir)!r}, owner={self.owner!r}, held={self.held})"


def _holder(files: NodeFiles) -> tuple[int | None, str]:
    """Pid and owner name of whoever holds ``files``: the pid file first, then the lock file."""
    pid = read_pid(files.pid)
    try:
        text = files.lock.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        text = []
    owner = text[1] if len(text) > 1 else ""
    if pid is None and text and text[0].isdigit():
        pid = int(text[0])
    return pid, owner


def _try_claim(files: NodeFiles, owner: str) -> Claim | None:
    """Take the lock of ``files`` without waiting; None when a live process holds it."""
    for _ in range(_CLAIM_RETRIES):
        fd = os.open(files.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(files.lock))
        except FileNotFoundError:
            same = False
        if not same:  # released and removed between our open and our flock: the file is a new one
            os.close(fd)
            continue
        # The lock is ours, so whoever wrote the other files is gone: clear what it left.
        for path in (files.pid, files.sock, files.tap_sock):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        os.fchmod(fd, 0o600)  # an old lock file may have been made under another umask
        os.ftruncate(fd, 0)
        start = process_start_time(os.getpid())
        os.pwrite(fd, f"{os.getpid()} {owner} {start if start is not None else '-'}\n".encode(), 0)
        return Claim(files, fd, owner)
    raise RuntimeError(f"{files.lock}: replaced {_CLAIM_RETRIES} times while being locked")


def claim(dir: Path, name: str) -> Claim:
    """Claim node ``name`` in runtime directory ``dir`` for this process; clears stale files.

    Raises:
        AlreadyRunning: a live daemon holds the name; the message says how to stop it.
    """
    files = node_files(dir, name)
    held = _try_claim(files, name)
    if held is None:
        pid, _ = _holder(files)
        shown = "pid unknown: it is starting" if pid is None else f"pid {pid}"
        raise AlreadyRunning(
            f"node {name} is already running ({shown}, pid file {files.pid}); "
            f"stop it with: dpipesd --stop --name {name}",
            name=name,
            pid=pid,
            pid_file=files.pid,
        )
    return held


def claim_local(dir: Path, name: str) -> Claim | None:
    """Claim the host's local socket for node ``name``; None (falsy) when a live daemon has it."""
    return _try_claim(node_files(dir, LOCAL_NAME), name)


def release(*claims: Claim | None) -> None:
    """Release each claim given (None is skipped); see :meth:`Claim.release`."""
    for held in claims:
        if held is not None:
            held.release()


class LocalDaemon(NamedTuple):
    """The daemon that answers at the host's local socket."""

    pid: int
    name: str
    """Its node name ("" if not known)."""
    ipc_endpoint: str
    tap_endpoint: str


def local_daemon(dir: Path) -> LocalDaemon | None:
    """The daemon behind ``local.sock`` in ``dir``, if that socket exists and a live process owns it.

    Reads files only (it never takes a lock), so it cannot disturb a daemon that is starting.
    """
    files = node_files(dir, LOCAL_NAME)
    pid = read_pid(files.pid)
    if pid is None or not files.sock.exists() or not pid_alive(pid):
        return None
    _, owner = _holder(files)
    return LocalDaemon(pid=pid, name=owner, ipc_endpoint=files.ipc_endpoint, tap_endpoint=files.tap_endpoint)


def local_leftovers(dir: Path) -> LocalDaemon | None:
    """The daemon that left ``local.sock`` in ``dir``, read from its files, if the socket is there.

    For a client that found nothing answering at that socket: it names the daemon that crashed
    (or was killed) without cleaning up, so the client can say so. Reads files only.
    """
    files = node_files(dir, LOCAL_NAME)
    if not files.sock.is_socket():
        return None
    pid, owner = _holder(files)
    return LocalDaemon(pid=pid or 0, name=owner, ipc_endpoint=files.ipc_endpoint, tap_endpoint=files.tap_endpoint)
