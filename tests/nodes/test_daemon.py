"""Runtime files, claims, and the daemon process: foreground, detached, signals, stop."""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dpipes.bus.keys import load_keypair
from dpipes.nodes import paths
from dpipes.nodes.daemon import stop_daemon
from dpipes.nodes.paths import AlreadyRunning, RuntimeDirError

FAKE_NODE = Path(__file__).with_name("fake_node.py")
DEADLINE_S = 15.0  # generous: the machine is shared; every wait polls a condition and ends early


def wait_for(condition: Callable[[], object], what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling a condition under a deadline


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "DPIPES_CONFIG_PATHS": "", **extra}


def dpipesd(*args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
    """``dpipesd ARGS`` with the fake node, to completion (detached: until the parent returns)."""
    return subprocess.run(
        [sys.executable, str(FAKE_NODE), *args], capture_output=True, text=True, env=env(**extra_env), timeout=30
    )


def is_gone(pid: int) -> bool:
    return not paths.pid_alive(pid)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Path]:
    """A runtime directory; any daemon still named in its pid or lock files is killed at the end.

    A detached daemon is not our descendant (it was double-forked), so the leak guard cannot see it.
    """
    where = tmp_path / "rt"
    yield where
    for f in [*where.glob("*.pid"), *where.glob("*.lock")] if where.exists() else []:
        pid = paths.read_pid(f)
        if pid is not None and pid != os.getpid() and paths.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            wait_for(functools.partial(is_gone, pid), f"pid {pid} to die")
            pytest.fail(f"test left daemon pid {pid} ({f.name}) running")


def no_runtime_files(where: Path) -> list[str]:
    """Names of the files a stopped daemon must not leave (logs stay)."""
    return sorted(p.name for p in where.iterdir() if p.suffix != ".log")


# -- paths ---------------------------------------------------------------------------------------


def test_runtime_dir_precedence() -> None:
    both = {"DPIPES_RUNTIME_DIR": "/srv/dp", "XDG_RUNTIME_DIR": "/run/user/7"}
    assert paths.runtime_dir_path(both) == Path("/srv/dp")
    assert paths.runtime_dir_path({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path("/run/user/7/dpipes")
    assert paths.runtime_dir_path({"DPIPES_RUNTIME_DIR": "", "XDG_RUNTIME_DIR": ""}) == Path(
        f"/tmp/dpipes-{os.getuid()}"
    )
    assert paths.runtime_dir_path({}) == Path(f"/tmp/dpipes-{os.getuid()}")


def test_runtime_dir_created_private_and_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o000)
    try:
        made = paths.runtime_dir({"DPIPES_RUNTIME_DIR": "a/b"})
    finally:
        os.umask(old)
    assert made == tmp_path / "a" / "b"
    assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700
    assert paths.runtime_dir({"XDG_RUNTIME_DIR": str(tmp_path)}) == tmp_path / "dpipes"
    assert paths.runtime_dir({"DPIPES_RUNTIME_DIR": "a/b"}) == made  # existing and private: fine


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_runtime_dir_refuses_one_others_can_write(tmp_path: Path, mode: int) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(RuntimeDirError, match=r"writable by its group or others .*chmod 700"):
        paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(shared)})


def test_runtime_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(RuntimeDirError, match="is not a directory"):
        paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(tmp_path / "f")})


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a directory to another user")
def test_runtime_dir_refuses_another_users(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)
    with pytest.raises(RuntimeDirError, match="belongs to uid 65534, not to you"):
        paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(theirs)})


def test_read_pid_tolerates_junk(tmp_path: Path) -> None:
    f = tmp_path / "x.pid"
    assert paths.read_pid(f) is None
    for text, want in [("", None), ("abc\n", None), ("0\n", None), ("-4\n", None), ("42\n", 42), ("42 alpha\n", 42)]:
        f.write_text(text)
        assert paths.read_pid(f) == want, text


def test_local_is_not_a_daemon_name() -> None:
    assert paths.check_daemon_name("alpha") is None
    assert "reserved" in (paths.check_daemon_name(paths.LOCAL_NAME) or "")


def test_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    where = paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(tmp_path / "rt")})
    held = paths.claim(where, "alpha")
    with pytest.raises(AlreadyRunning) as info:  # flock: a second open file conflicts, even in-process
        paths.claim(where, "alpha")
    assert info.value.pid == os.getpid()  # from the lock file: the pid file is not written yet
    pid_file = held.write_pid()
    assert pid_file == where / "alpha.pid" and paths.read_pid(pid_file) == os.getpid()
    with pytest.raises(AlreadyRunning) as info:
        paths.claim(where, "alpha")
    assert str(info.value) == (
        f"node alpha is already running (pid {os.getpid()}, pid file {pid_file}); "
        "stop it with: dpipesd --stop --name alpha"
    )
    paths.claim(where, "beta").release()  # another name is free
    held.release()
    held.release()  # idempotent
    assert no_runtime_files(where) == []
    paths.claim(where, "alpha").release()


def test_alias_links_a_name_to_the_local_socket(tmp_path: Path) -> None:
    where = paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(tmp_path / "rt")})
    own = paths.claim(where, "alpha")
    local = paths.claim_local(where, "alpha")
    assert local and local.owner == "alpha"
    own.alias(local)
    assert os.readlink(where / "alpha.sock") == "local.sock"
    assert os.readlink(where / "alpha-tap.sock") == "local-tap.sock"
    paths.release(local, own, None)
    assert no_runtime_files(where) == []


def test_stale_local_claim_is_recovered(tmp_path: Path) -> None:
    where = paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(tmp_path / "rt")})
    gone = dead_pid()
    (where / "local.pid").write_text(f"{gone}\n")
    (where / "local.lock").write_text(f"{gone} alpha\n")
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(where / "local.sock"))
    leftover.close()  # a socket file with nobody behind it, as a SIGKILLed daemon leaves it
    assert paths.local_daemon(where) is None

    local = paths.claim_local(where, "beta")
    assert local
    assert not (where / "local.pid").exists() and not (where / "local.sock").exists()
    assert (where / "local.lock").read_text() == f"{os.getpid()} beta {paths.process_start_time(os.getpid())}\n"
    local.release()


HOLDER = """
import socket, sys
from pathlib import Path
from dpipes.nodes import paths
where = Path(sys.argv[1])
own = paths.claim(where, "alpha")
local = paths.claim_local(where, "alpha")
local.write_pid()
own.write_pid()
s = socket.socket(socket.AF_UNIX)
s.bind(str(where / "local.sock"))
print("held", flush=True)
sys.stdin.read()
"""


def test_local_claim_follows_a_live_holder_and_survives_its_sigkill(tmp_path: Path) -> None:
    where = paths.runtime_dir({"DPIPES_RUNTIME_DIR": str(tmp_path / "rt")})
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(where)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert paths.claim_local(where, "beta") is None
        found = paths.local_daemon(where)
        assert found is not None
        assert (found.pid, found.name) == (holder.pid, "alpha")
        assert found.ipc_endpoint == f"ipc://{where}/local.sock" == paths.local_endpoint(where)
        with pytest.raises(AlreadyRunning, match=f"pid {holder.pid}"):
            paths.claim(where, "alpha")
    finally:
        holder.kill()  # SIGKILL: no cleanup; the kernel drops its locks
        holder.wait()
        holder.stdin.close()  # type: ignore[union-attr]
        holder.stdout.close()  # type: ignore[union-attr]
    assert paths.local_daemon(where) is None  # the pid file names a dead process
    local = paths.claim_local(where, "beta")
    own = paths.claim(where, "alpha")
    assert local and own
    paths.release(local, own)


# -- the daemon, with a fake node ----------------------------------------------------------------


def fake_log(text: str) -> dict[str, object]:
    """What the fake node said it was built with, from a log."""
    for line in text.splitlines():
        if "fake node {" in line:
            described: dict[str, object] = json.loads(line.split("fake node ", 1)[1])
            return described
    raise AssertionError(f"no fake node line in:\n{text}")


def start_foreground(rt: Path, tmp_path: Path, *args: str, **extra_env: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``dpipesd --foreground ARGS`` (node alpha), once it said it is ready; its stderr goes to a file."""
    err = tmp_path / "stderr.txt"
    with err.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, str(FAKE_NODE), "--foreground", "--runtime-dir", str(rt), *args],
            stdout=subprocess.PIPE,
            stderr=f,
            env=env(**extra_env),
        )
    assert proc.stdout is not None
    first = proc.stdout.readline().decode()  # bounded by pytest-timeout; the pid file is written first
    assert first == f"node alpha ready: tcp://127.0.0.1:5757 ipc://{rt}/local.sock\n", err.read_text()
    assert (rt / "alpha.pid").exists()
    return proc, err


def finish(proc: subprocess.Popen[bytes]) -> int:
    """Its exit status, once it has exited by itself."""
    proc.communicate(timeout=DEADLINE_S)
    return proc.returncode


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill it if a failed test left it running; close its pipe."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def test_foreground_stops_on_sigterm_and_removes_its_files(rt: Path, tmp_path: Path) -> None:
    proc, err = start_foreground(rt, tmp_path, "--name", "alpha")
    try:
        assert paths.read_pid(rt / "alpha.pid") == proc.pid
        assert paths.read_pid(rt / "local.pid") == proc.pid  # the first daemon: it has local.sock
        local = paths.local_daemon(rt)
        assert local is not None and (local.pid, local.name) == (proc.pid, "alpha")
        proc.send_signal(signal.SIGTERM)
        assert finish(proc) == 0
    finally:
        reap(proc)
    log = err.read_text()
    assert fake_log(log)["ipc"] == f"ipc://{rt}/local.sock"
    assert fake_log(log)["tap"] == f"ipc://{rt}/local-tap.sock"
    assert " INFO dpipes.nodes.daemon: node alpha: SIGTERM: stopping" in log  # time, level, logger
    assert "node alpha ready" not in log  # stdout says it, once
    assert no_runtime_files(rt) == []


def test_foreground_second_sigint_exits_at_once(rt: Path, tmp_path: Path) -> None:
    proc, err = start_foreground(rt, tmp_path, "--name", "alpha", FAKE_NODE_HANG_CLOSE="1")
    try:
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: "hanging in aclose" in err.read_text(), "the node to start closing")
        proc.send_signal(signal.SIGINT)
        assert finish(proc) == 130
    finally:
        reap(proc)
    assert "second SIGINT: exiting at once" in err.read_text()
    assert no_runtime_files(rt) == []


def test_foreground_stop_is_bounded(rt: Path, tmp_path: Path) -> None:
    proc, err = start_foreground(rt, tmp_path, "--name", "alpha", FAKE_NODE_HANG_CLOSE="1", FAKE_STOP_TIMEOUT_S="0.2")
    try:
        proc.send_signal(signal.SIGTERM)
        assert finish(proc) == 1
    finally:
        reap(proc)
    assert "node alpha did not close within 0 s; exiting anyway" in err.read_text()
    assert no_runtime_files(rt) == []


def test_detached_daemon_lifecycle(rt: Path) -> None:
    started = dpipesd("--runtime-dir", str(rt), "--name", "alpha")
    assert started.returncode == 0, started.stderr
    pid = paths.read_pid(rt / "alpha.pid")
    assert pid is not None and paths.pid_alive(pid)
    key = load_keypair(Path(os.environ["DPIPES_KEY_DIR"]), "node")  # made by the first start (conftest's dir)
    client = load_keypair(Path(os.environ["DPIPES_KEY_DIR"]), "client")  # this user's, as dpipes uses it
    lines = started.stdout.splitlines()
    trust_line = lines.pop(2)
    assert lines == [
        f"node alpha ready: tcp://127.0.0.1:5757 ipc://{rt}/local.sock",
        f"node key {key.fingerprint}; other hosts trust it with: dpipes keys pin alpha {shlex.quote(key.public.z85)}",
        f"pid {pid}, pid file {rt}/alpha.pid, log {rt}/alpha.log",
        f"stop with: dpipesd --stop --name alpha --runtime-dir {rt}   or: kill $(cat {rt}/alpha.pid)",
    ]
    # The first contact, pasted on another host: its node admits this user's client key.
    assert trust_line.startswith(f"your client key {client.fingerprint}; another node admits it with: dpipes keys ")
    other = rt.parent / "other-host-keys"
    pasted = shlex.split(trust_line.partition("admits it with: ")[2])
    done = subprocess.run(
        [sys.executable, "-m", "dpipes.tools.dpipes", *pasted[1:]],
        env={**env(), "DPIPES_KEY_DIR": str(other)},
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert done.returncode == 0, done.stderr
    admitted = (other / "authorized_keys").read_text()
    assert f"curve {client.public.z85} " in admitted  # with its USER@HOST comment
    # Detached: its own session (not as leader), cwd /, stdin from /dev/null, output to the log.
    assert os.getsid(pid) not in (pid, os.getsid(0))
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    assert os.readlink(f"/proc/{pid}/fd/0") == os.devnull
    assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2") == str(rt / "alpha.log")
    assert (rt / "alpha.sock").is_symlink() and (rt / "local.sock").is_socket()

    again = dpipesd("--runtime-dir", str(rt), "--name", "alpha")
    assert again.returncode == 1
    assert again.stderr == (
        f"dpipesd: node alpha is already running (pid {pid}, pid file {rt}/alpha.pid); "
        "stop it with: dpipesd --stop --name alpha\n"
    )

    beta = dpipesd("--runtime-dir", str(rt), "--name", "beta")  # local.sock is taken: beta.sock
    assert beta.returncode == 0, beta.stderr
    assert fake_log((rt / "beta.log").read_text())["ipc"] == f"ipc://{rt}/beta.sock"
    beta_pid = paths.read_pid(rt / "beta.pid")

    assert stop_daemon("alpha", rt) == 0
    assert not paths.pid_alive(pid)
    assert not any(p.name.startswith(("alpha", "local")) and p.suffix != ".log" for p in rt.iterdir())

    gamma = dpipesd("--runtime-dir", str(rt), "--name", "gamma")  # the next daemon gets local.sock
    assert gamma.returncode == 0, gamma.stderr
    assert fake_log((rt / "gamma.log").read_text())["ipc"] == f"ipc://{rt}/local.sock"
    for name in ("beta", "gamma"):
        assert stop_daemon(name, rt) == 0
    assert beta_pid is not None and not paths.pid_alive(beta_pid)
    assert no_runtime_files(rt) == []


def test_detached_start_failure_is_reported(rt: Path) -> None:
    failed = dpipesd(
        "--runtime-dir", str(rt), "--name", "alpha", FAKE_NODE_FAIL_START="node alpha: cannot listen: Address in use"
    )
    assert failed.returncode == 1
    assert failed.stderr == "dpipesd: node alpha: cannot listen: Address in use\n"
    assert failed.stdout == ""
    wait_for(lambda: no_runtime_files(rt) == [], "the failed daemon to release its name")
    assert "ERROR dpipes.nodes.daemon: node alpha: cannot listen" in (rt / "alpha.log").read_text()


def test_detached_exit_after_one_stage(rt: Path) -> None:
    done = dpipesd("--runtime-dir", str(rt), "--name", "alpha", "--exit", "--", "sort", "-r")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: no_runtime_files(rt) == [], "the daemon to exit by itself")
    described = fake_log((rt / "alpha.log").read_text())
    assert described["exclusive"] == ["sort", "-r"] and described["exit_after_one"] is True


def test_stop_when_not_running(rt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert stop_daemon("alpha", rt) == 0
    assert capsys.readouterr().err == f"dpipesd: node alpha is not running (no pid file {rt}/alpha.pid)\n"
    gone = dead_pid()
    (rt / "alpha.pid").write_text(f"{gone}\n")
    assert stop_daemon("alpha", rt) == 0
    assert capsys.readouterr().err == (
        f"dpipesd: node alpha is not running (removed stale pid file {rt}/alpha.pid of pid {gone})\n"
    )
    assert no_runtime_files(rt) == []
    assert stop_daemon("local", rt) == 2


def test_stop_gives_up_on_a_daemon_that_does_not_stop(rt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    started = dpipesd("--runtime-dir", str(rt), "--name", "alpha", FAKE_NODE_HANG_CLOSE="1", FAKE_STOP_TIMEOUT_S="60")
    assert started.returncode == 0, started.stderr
    pid = paths.read_pid(rt / "alpha.pid")
    assert pid is not None
    try:
        assert stop_daemon("alpha", rt, timeout=0.3) == 1
        assert f"did not stop within 0 s; see its log {rt}/alpha.log; force it with: kill -KILL {pid}" in (
            capsys.readouterr().err
        )
    finally:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not paths.pid_alive(pid), "the daemon to die")
    assert stop_daemon("alpha", rt) == 0  # SIGKILLed: its files are stale, and removed
    assert no_runtime_files(rt) == []
