"""The dpipes command line, run as the real command: numbering, exit codes, failing fast, basics."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.nodes.daemons import environment

RUN_TIMEOUT_S = 60.0  # a whole dpipes run with an embedded node, on a busy machine


def dpipes(runtime_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``dpipes`` with no input and no daemon to find (unless the test starts one)."""
    return subprocess.run(
        [sys.executable, "-m", "dpipes.tools.dpipes", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**environment(runtime_dir), **(env or {})},
        timeout=RUN_TIMEOUT_S,
    )


def test_help_says_stages_count_from_0(tmp_path: Path) -> None:
    done = dpipes(tmp_path, "--help")
    assert done.returncode == 0
    assert "numbered from 0" in done.stdout
    assert '"stage 0"' in done.stdout


def test_unknown_pin_counts_stages_from_0(tmp_path: Path) -> None:
    done = dpipes(tmp_path, "seq 3 | sort@nowhere")
    assert done.returncode != 0
    assert "stage 1 (sort@nowhere): no known node is named 'nowhere'" in done.stderr


@pytest.mark.parametrize(
    ("pipeline", "where"),
    [
        ("seq 3 | sort > out", "in stage 1 at column 14"),
        ("seq 3 || sort", "in stage 0 at column 7"),
        ("seq 3 | sort@ -r", "in stage 1 at column 13"),
    ],
)
def test_pipeline_syntax_error_exits_2_before_contacting_a_node(tmp_path: Path, pipeline: str, where: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # an entry node that must not be contacted
        port = listener.getsockname()[1]
        done = dpipes(tmp_path, "--node", f"127.0.0.1:{port}", pipeline)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert done.returncode == 2, done.stderr
    assert f"dpipes: pipeline syntax error {where}" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        (["--node", "nowhere"], {}, "--node 'nowhere': 'nowhere' is not HOST:PORT"),
        (["--node", "beta:99999"], {}, "port 99999 in 'beta:99999' is out of range"),
        (["--node", "tcp://be ta:5757"], {}, "is not a host name or IP address"),
        (["--node", "ipc://"], {}, "names no socket path"),
        ([], {"DPIPES_NODE": "beta"}, "$DPIPES_NODE 'beta': 'beta' is not HOST:PORT"),
        (["--nodes", "--node", "beta:"], {}, "--node 'beta:'"),
    ],
)
def test_malformed_entry_node_exits_2(tmp_path: Path, flags: list[str], env: dict[str, str], expected: str) -> None:
    done = dpipes(tmp_path, *flags, "seq 3", env=env)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert "ipc://PATH" in done.stderr  # says how to write it
