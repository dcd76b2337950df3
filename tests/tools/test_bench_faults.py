"""dpipes-bench faults: a few rows of the fault matrix, for real, and the table they print as."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dpipes.tools.bench import faults

pytestmark = pytest.mark.timeout(300)


def test_a_lost_middle_node_a_twin_and_a_forger_each_leave_the_matrix_ok(tmp_path: Path) -> None:
    rows = [
        faults.kill_node("b", tmp_path, 16 << 20, random.Random(14)),
        faults.forged_hello(tmp_path, 16 << 20),
        faults.duplicate_name(tmp_path),
    ]
    table = faults.format_matrix(rows)
    print(table)
    lost, forged, twin = rows
    assert forged.ok and twin.ok, table
    # The lost node's row without its detection time: no timing thresholds in tests (the bench
    # holds it to LOST_NODE_BOUND_S, on a machine that is not running a test suite besides).
    assert lost.exit == "125" and "node 'b' lost" in lost.report and lost.resources == "back", table
    assert forged.delivered == f"{16 << 20}/{16 << 20}"
    assert "node name 'b' is linked with instance" in twin.report
    assert table.splitlines()[0].split()[:2] == ["scenario", "ok"]
