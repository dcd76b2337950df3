"""The dpipesd command line: help, usage and configuration errors, flags reaching the node."""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpipes.nodes import paths
from dpipes.tools.dpipesd import main

FAKE_NODE = Path(__file__).parents[1] / "nodes" / "fake_node.py"
NOTIFY_WAIT_S = 30.0  # a daemon's start (Python, imports) and graceful stop, on a busy machine


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPIPES_CONFIG_PATHS", "")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_help_explains_files_and_stopping(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for text in (
        "dpipesd --stop --name beta",
        "kill $(cat RUNTIME_DIR/NAME.pid)",
        "$XDG_RUNTIME_DIR/dpipes",
        "$DPIPES_RUNTIME_DIR",
        "local.sock",
        "NAME.log",
        "-- sort -r",
        "--peer alpha=10.0.0.1:5757",
        "2 usage or configuration error",
    ):
        assert text in out, text


@pytest.mark.parametrize(
    ("contents", "expected"),
    [
        ('listen = "nowhere"\n', "key 'listen': 'nowhere' is not HOST:PORT"),
        ('lisen = "0.0.0.0:1"\n', "unknown key 'lisen'; did you mean 'listen'?"),
        ("[limits]\nmax_stages = 0\n", "key 'limits.max_stages': must be at least 1"),
        ("name = \n", "invalid TOML"),
    ],
)
def test_config_file_errors_exit_2_naming_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], contents: str, expected: str
) -> None:
    conf = tmp_path / "node.toml"
    conf.write_text(contents)
    code, out, err = run(["--config", str(conf), "--runtime-dir", str(tmp_path / "rt")], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith(f"dpipesd: {conf}: ") and expected in err
    assert not (tmp_path / "rt").exists()  # nothing was started


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "/nonexistent/dpipesd.toml"], "dpipesd: /nonexistent/dpipesd.toml: config file not found"),
        (["--listen", "localhost"], "dpipesd: command line: key 'listen': 'localhost' is not HOST:PORT"),
        (["--listen", "127.0.0.1:99999"], "port 99999 in '127.0.0.1:99999' is out of range"),
        (["--name", "a.b"], "dpipesd: command line: key 'name': 'a.b' is not a valid node name"),
        (["--name", "local"], "dpipesd: node name 'local' is reserved"),
        (["--peer", "beta"], "dpipesd: --peer 'beta': 'beta' is not HOST:PORT"),
        (["--peer", "b@d=beta:5757"], "dpipesd: --peer 'b@d=beta:5757': 'b@d' is not a valid node name"),
        (["--peer", "x=a:1", "x=b:2"], "dpipesd: --peer 'x=b:2': peer name 'x' given twice"),
        (["--"], "'--' must be followed by the program"),
        (["--stop", "--", "sort"], "cannot go with --stop, --status or --print-config"),
        (["--stop", "--status"], "not allowed with argument"),
        (["--log-level", "LOUD"], "invalid choice: 'LOUD'"),
        (["stray"], "unrecognized arguments: stray"),
    ],
)
def test_usage_and_config_errors_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, _, err = run(["--runtime-dir", str(tmp_path / "rt"), *argv], capsys)
    assert code == 2
    assert expected in err
    assert not (tmp_path / "rt").exists()


def test_status_and_stop_when_not_running(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rt = str(tmp_path / "rt")
    assert run(["--status", "--name", "alpha", "--runtime-dir", rt], capsys) == (3, "node alpha is not running\n", "")
    code, _, err = run(["--stop", "--name", "alpha", "--runtime-dir", rt], capsys)
    assert code == 0 and "node alpha is not running" in err


def test_flags_reach_the_node(tmp_path: Path) -> None:
    conf = tmp_path / "node.toml"
    conf.write_text('name = "fromfile"\nallow = ["cat"]\n[nodes]\nbeta = "10.0.0.3:5757"\n')
    argv = [
        "--foreground",
        "--exit",
        "--config",
        str(conf),
        "--runtime-dir",
        str(tmp_path / "rt"),
        "--name",
        "alpha",
        "--listen",
        "127.0.0.1:0",
        "--peer",
        "10.0.0.2:5757",
        "gw=gw.lan:5758",
        "--peer",
        "[::1]:5757",
        "--allow",
        "sort",
        "uniq",
        "--log-level",
        "debug",
        "--",
        "sort",
        "-r",
        "--key=2",
    ]
    done = subprocess.run(
        [sys.executable, str(FAKE_NODE), *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "DPIPES_CONFIG_PATHS": ""},
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stderr.splitlines() if "fake node {" in x)
    described = json.loads(line.split("fake node ", 1)[1])
    assert described == {
        "name": "alpha",
        "listen": "127.0.0.1:0",
        "nodes": {"beta": "10.0.0.3:5757", "gw": "gw.lan:5758", "peer1": "10.0.0.2:5757", "peer2": "[::1]:5757"},
        "allow": ["sort", "uniq"],
        "exclusive": ["sort", "-r", "--key=2"],
        "ipc": f"ipc://{tmp_path}/rt/local.sock",
        "tap": f"ipc://{tmp_path}/rt/local-tap.sock",
        "exit_after_one": True,
    }
    assert " DEBUG " in done.stderr or " INFO " in done.stderr
    assert sorted(p.name for p in (tmp_path / "rt").iterdir()) == []  # exited by itself, cleaned up


def test_module_runs_as_a_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dpipes.tools.dpipesd", "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0 and done.stdout.startswith("usage: dpipesd [options] [-- PROG [ARGS...]]")


@pytest.mark.skipif(importlib.util.find_spec("dpipes.nodes.node") is None, reason="dpipes.nodes.node not written yet")
def test_real_node_detached_then_stopped(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    cmd = [sys.executable, "-m", "dpipes.tools.dpipesd", "--runtime-dir", str(rt)]
    environ = {**os.environ, "DPIPES_CONFIG_PATHS": ""}
    started = subprocess.run(
        [*cmd, "--name", "alpha", "--listen", "127.0.0.1:0"], capture_output=True, text=True, env=environ, timeout=30
    )
    pid = paths.read_pid(rt / "alpha.pid")
    try:
        assert started.returncode == 0, started.stderr + (rt / "alpha.log").read_text()
        first = started.stdout.splitlines()[0]
        assert first.startswith("node alpha ready: tcp://127.0.0.1:") and not first.startswith(
            "node alpha ready: tcp://127.0.0.1:0 "
        )
        assert first.endswith(f" ipc://{rt}/local.sock")
        assert (rt / "local.sock").is_socket() and (rt / "local-tap.sock").is_socket()
        local = paths.local_daemon(rt)
        assert local is not None and (local.pid, local.name) == (pid, "alpha")
        stopped = subprocess.run([*cmd, "--stop", "--name", "alpha"], capture_output=True, text=True, env=environ)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout == f"stopped node alpha (pid {pid})\n"
    finally:
        if pid is not None and paths.pid_alive(pid):  # a failed test must not leave the daemon behind
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while paths.pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.02)  # polling a condition under a deadline
    assert pid is not None and not paths.pid_alive(pid)
    assert sorted(p.name for p in rt.iterdir()) == ["alpha.log"]


def test_print_config_shows_each_value_with_its_source_and_starts_nothing(tmp_path: Path) -> None:
    conf = tmp_path / "node.toml"
    conf.write_text('name = "fromfile"\nallow = ["cat"]\n')
    flags = ["--runtime-dir", str(tmp_path / "rt"), "--config", str(conf), "--print-config"]
    flags += ["--listen", "127.0.0.1:6000", "--peer", "beta=10.0.0.2:5757"]
    done = subprocess.run(
        [sys.executable, "-m", "dpipes.tools.dpipesd", *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "DPIPES_CONFIG_PATHS": ""},
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert 'name = "fromfile"' in lines[1] and lines[1].endswith(f"# {conf}")
    assert any(x.startswith('listen = "127.0.0.1:6000"') and x.endswith("# --listen") for x in lines)
    assert any(x.startswith('beta = "10.0.0.2:5757"') and x.endswith("# --peer") for x in lines)
    assert any(x.startswith("max_stages = 64") and x.endswith("# default") for x in lines)
    assert any(x.startswith("max_held_bytes = 1073741824") and x.endswith("# default") for x in lines)
    assert not (tmp_path / "rt").exists()


def test_help_names_the_xdg_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "$XDG_CONFIG_HOME/dpipes/dpipesd.toml" in out and "--print-config" in out


@pytest.mark.skipif(importlib.util.find_spec("dpipes.nodes.node") is None, reason="dpipes.nodes.node not written yet")
def test_foreground_under_a_service_manager(tmp_path: Path) -> None:
    """Type=notify: READY=1 once listening, STOPPING=1 on SIGTERM; the ready line appears once."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify.sock"))
    manager.settimeout(NOTIFY_WAIT_S)
    cmd = [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--runtime-dir", str(tmp_path / "rt")]
    env = {**os.environ, "DPIPES_CONFIG_PATHS": "", "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    with manager, subprocess.Popen(
        [*cmd, "--name", "alpha", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    ) as daemon:
        try:
            ready = manager.recv(4096).decode().split("\n")
            assert ready[:2] == ["READY=1", f"MAINPID={daemon.pid}"]
            assert ready[2].startswith("STATUS=node alpha listening on tcp://127.0.0.1:")
            daemon.send_signal(signal.SIGTERM)
            assert manager.recv(4096) == b"STOPPING=1\nSTATUS=node alpha stopping"
            out, err = daemon.communicate(timeout=NOTIFY_WAIT_S)
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    assert daemon.returncode == 0, err
    assert out.startswith("node alpha ready: ")
    assert (out + err).count("node alpha ready:") == 1, err


def test_systemd_example_runs_the_daemon_attached_as_type_notify() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(Path(__file__).parents[2] / "examples" / "systemd" / "dpipesd.service")
    assert unit["Service"]["Type"] == "notify"
    assert unit["Service"]["ExecStart"].split()[1:] == ["--foreground"]


def test_main_leaves_the_collector_as_it_found_it(capsys: pytest.CaptureFixture[str]) -> None:
    """main() turns the garbage collector off for a start; whatever it does, it turns it back on."""
    import gc

    assert gc.isenabled()
    for argv in (["--help"], ["--print-config"], ["--name", "bad name"]):
        main(argv)
        assert gc.isenabled(), argv
    capsys.readouterr()


# Run in a daemon of its own: the node it builds reports, once it serves, what the process has
# imported and how its collector stands, then stops (serve() returns: the daemon exits 0).
_READY_PROBE = """
import gc, json, sys
from dpipes.tools import dpipesd

RUN_ONLY = ("dpipes.nodes.coordinator", "dpipes.nodes.stages", "dpipes.nodes.stage", "dpipes.nodes.pipeline",
            "dpipes.nodes.worker_pool", "dpipes.nodes.plugin_stage", "difflib")

def factory(config, /, **options):
    from dpipes.nodes.node import Node

    class Probe(Node):
        async def serve(self):
            print(json.dumps({"imported": [m for m in RUN_ONLY if m in sys.modules], "collecting": gc.isenabled(),
                              "frozen": gc.get_freeze_count()}), flush=True)
            stages, coordinator = self._run_parts()  # what the first request for a run makes
            print(json.dumps({"stages": type(stages).__name__, "coordinator": type(coordinator).__name__}), flush=True)

    return Probe(config, **options)

sys.exit(dpipesd.main(sys.argv[1:], node_factory=factory))
"""


@pytest.mark.skipif(importlib.util.find_spec("dpipes.nodes.node") is None, reason="dpipes.nodes.node not written yet")
def test_a_node_is_ready_without_its_run_machinery_and_with_its_collector_on(tmp_path: Path) -> None:
    """What only runs need is imported by the first request for one, not by the start (eight
    daemons starting on two cores wait for each other's CPU); the collector, off during the start,
    runs again from ready, over a heap whose start-up part is frozen."""
    flags = ["--foreground", "--runtime-dir", str(tmp_path / "rt"), "--name", "probe", "--listen", "127.0.0.1:0"]
    done = subprocess.run(
        [sys.executable, "-c", _READY_PROBE, *flags],
        capture_output=True,
        text=True,
        env={**os.environ, "DPIPES_CONFIG_PATHS": "", "XDG_CACHE_HOME": str(tmp_path / "cache")},
        timeout=NOTIFY_WAIT_S,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["imported"] == [] and lines[0]["collecting"] is True and lines[0]["frozen"] > 1000, lines
    assert lines[1] == {"stages": "Stages", "coordinator": "Coordinator"}
    # the next start finds its dataclasses compiled (dpipes.nodes.code_cache)
    assert list((tmp_path / "cache" / "dpipes").glob("dataclass-code-*.marshal")), "no dataclass code cache written"
