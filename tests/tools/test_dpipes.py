"""The dpipes command line, run as the real command: numbering, exit codes, failing fast, basics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
