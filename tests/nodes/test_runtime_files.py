"""Runtime files are owner-only whatever the umask; another uid is refused; --stop signals only its daemon."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dpipes.bus.keys import load_keypair
from dpipes.nodes import paths
from dpipes.nodes.daemon import stop_daemon
from dpipes.nodes.paths import RuntimeDirError
from tests.nodes.test_daemon import DEADLINE_S, dpipesd, env, wait_for
from tests.users import fork_as, needs_root, nobody


def as_nobody(*targets: Path) -> dict[str, str]:
    """What user ``nobody`` could do to each target (connect to a socket, append to a file):
    ``open`` or ``refused``."""

    def try_each() -> str:  # pragma: no cover - in the child
        lines = []
        for path in targets:
            try:
                if path.suffix == ".sock":
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(path))
                else:
                    open(path, "a").close()
                lines.append(f"{path} open")
            except PermissionError:
                lines.append(f"{path} refused")
        return "\n".join(lines)

    out = fork_as(nobody(), try_each).wait()
    return dict(line.rsplit(" ", 1) for line in out.splitlines())


def modes(where: Path) -> dict[str, int]:
    """Permission bits of every file in ``where`` but symbolic links."""
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in where.iterdir() if not p.is_symlink()}


def start_real_foreground(rt: Path, umask: int, *args: str) -> subprocess.Popen[bytes]:
    """The real ``dpipesd --foreground`` (node alpha) under ``umask``, once it said it is ready."""
    proc = subprocess.Popen(
        [
            *[sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", "alpha"],
            *["--listen", "127.0.0.1:0", *args],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env(DPIPES_RUNTIME_DIR=str(rt)),
        umask=umask,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline().decode()  # bounded by pytest-timeout
    assert first.startswith("node alpha ready:"), first
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=DEADLINE_S)


def test_runtime_files_are_owner_only_under_umask_000(shared_dir: Path) -> None:
    rt = shared_dir / "rt"
    proc = start_real_foreground(rt, 0o000, "--key-dir", str(shared_dir / "keys"))
    try:
        assert proc.stdout is not None
        pair = load_keypair(shared_dir / "keys", "node")  # created by this first start
        assert proc.stdout.readline().decode().startswith(f"node key {pair.fingerprint}; ")
        assert modes(shared_dir / "keys") == {"node.key_secret": 0o600, "node.key": 0o644}
        assert stat.S_IMODE((shared_dir / "keys").stat().st_mode) == 0o700
        found = modes(rt)
        for name in ("local.sock", "local-tap.sock", "local-fds.sock", "alpha.pid", "local.pid", "alpha.lock"):
            assert name in found, sorted(found)
        assert {name: mode for name, mode in found.items() if mode & 0o077} == {}
        assert stat.S_IMODE(rt.stat().st_mode) == 0o700
    finally:
        stop(proc)


def test_detached_log_is_owner_only_under_umask_000(shared_dir: Path) -> None:
    rt = shared_dir / "rt"
    started = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("fake_node.py")), "--runtime-dir", str(rt), "--name", "alpha"],
        capture_output=True,
        text=True,
        env=env(),
        umask=0o000,
        timeout=30,
    )
    assert started.returncode == 0, started.stderr
    try:
        found = modes(rt)
        assert "alpha.log" in found and "local.sock" in found
        assert {name: mode for name, mode in found.items() if mode & 0o077} == {}
    finally:
        assert stop_daemon("alpha", rt) == 0


@needs_root
def test_another_uid_cannot_use_the_sockets_or_rewrite_the_pid_file(shared_dir: Path) -> None:
    rt = shared_dir / "rt"
    proc = start_real_foreground(rt, umask=0o000)
    try:
        rt.chmod(0o711)  # a directory others may traverse (still not write): only the files' modes protect
        control = socket.socket(socket.AF_UNIX)
        control.bind(str(shared_dir / "control.sock"))
        control.listen()
        os.chmod(shared_dir / "control.sock", 0o777)  # shows that nobody could connect to an open socket
        try:
            seen = as_nobody(
                shared_dir / "control.sock",
                rt / "local.sock",
                rt / "local-tap.sock",
                rt / "local-fds.sock",
                rt / "alpha.pid",
                rt / "alpha.lock",
            )
        finally:
            control.close()
        assert seen.pop(str(shared_dir / "control.sock")) == "open"
        assert seen == dict.fromkeys(seen, "refused")
    finally:
        stop(proc)


def test_stop_refuses_a_pid_file_that_names_another_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rt = tmp_path / "rt"
    started = dpipesd("--runtime-dir", str(rt), "--name", "alpha")
    assert started.returncode == 0, started.stderr
    daemon_pid = paths.read_pid(rt / "alpha.pid")
    assert daemon_pid is not None
    victim = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (rt / "alpha.pid").write_text(f"{victim.pid}\n")  # as someone who could write it would
        assert stop_daemon("alpha", rt) == 1
        err = capsys.readouterr().err
        assert f"refusing to signal pid {victim.pid} as node alpha" in err
        assert victim.poll() is None and paths.pid_alive(daemon_pid)
        # The lock file rewritten too: the kernel's lock table still names the real holder.
        (rt / "alpha.lock").write_text(f"{victim.pid} alpha {paths.process_start_time(victim.pid)}\n")
        assert stop_daemon("alpha", rt) == 1
        assert f"pid {victim.pid} does not hold the lock" in capsys.readouterr().err
        assert victim.poll() is None
    finally:
        (rt / "alpha.pid").write_text(f"{daemon_pid}\n")
        (rt / "alpha.lock").write_text(f"{daemon_pid} alpha {paths.process_start_time(daemon_pid)}\n")
        assert stop_daemon("alpha", rt) == 0
        victim.communicate(b"")
    wait_for(lambda: not paths.pid_alive(daemon_pid), "the daemon to stop")


def test_check_holder_refuses_a_reused_pid(tmp_path: Path) -> None:
    where = paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(tmp_path / "rt")})
    held = paths.claim(where, "alpha")
    try:
        held.write_pid()
        assert paths.check_holder(held.files, os.getpid()) is None
        start = paths.process_start_time(os.getpid())
        assert start is not None
        held.files.lock.write_text(f"{os.getpid()} alpha {start - 1}\n")  # as if our pid had been reused
        problem = paths.check_holder(held.files, os.getpid())
        assert problem is not None and "the pid was reused" in problem
    finally:
        held.release()


def test_runtime_dir_refuses_a_planted_link(tmp_path: Path) -> None:
    mine = tmp_path / "elsewhere"
    mine.mkdir(mode=0o700)
    (tmp_path / "xdg").mkdir()
    (tmp_path / "xdg" / "dpipes").symlink_to(mine)
    with pytest.raises(RuntimeDirError, match="is a symbolic link"):
        paths.runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path / "xdg")})
    chosen = paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(tmp_path / "xdg" / "dpipes")})  # chosen: followed
    assert chosen == tmp_path / "xdg" / "dpipes"


def test_secure_sockets_fixes_a_socket_bound_under_umask_000(tmp_path: Path) -> None:
    where = paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(tmp_path / "rt")})
    files = paths.node_files(where, "alpha")
    sock = socket.socket(socket.AF_UNIX)
    old = os.umask(0o000)
    try:
        sock.bind(str(files.sock))
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(files.sock.lstat().st_mode) == 0o777  # what the umask gave
        paths.secure_sockets(files)
        assert stat.S_IMODE(files.sock.lstat().st_mode) == 0o600
    finally:
        sock.close()
