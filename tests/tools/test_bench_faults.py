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


def test_without_network_namespaces_the_link_cut_rows_are_skipped_saying_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from dpipes.tools.bench import netns

    # A mock, and the only one: this test run cannot take its own root away.
    monkeypatch.setattr(netns, "netns_unavailable_reason", lambda: "network-namespace tests need root")
    rows = faults.link_cut_rows(tmp_path, 16 << 20)
    assert [(r.scenario, r.skipped, r.ok) for r in rows] == [(s, True, True) for s in faults.LINK_CUT_ROWS]
    assert all(r.report == "skipped: network-namespace tests need root" for r in rows)
    assert all("  skip  " in line for line in faults.format_matrix(rows).splitlines()[1:])
