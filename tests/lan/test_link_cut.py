"""A link cut (a veth set down) and restored, between namespaced daemons: issue 14's fault matrix.

The scenario is :func:`dpipes.tools.bench.faults.link_cut`, the one ``dpipes-bench faults`` prints
as two rows; here each thing a user would notice is asserted on its own.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from dpipes.tools.bench import faults

pytestmark = pytest.mark.timeout(300)

TRANSFER_BYTES = 16 << 20  # enough that a quarter is out before the cut and the rest must cross it


async def test_a_cut_link_fails_the_run_naming_the_node_then_comes_back(lan: Any, tmp_path: Path) -> None:
    # `lan` (the fixture) only gates on root and namespaces; the scenario builds its own LAN.
    r = await faults.link_cut(tmp_path, TRANSFER_BYTES)

    # Cut past the loss timeout: the run fails, naming the node behind the cut, as for a killed node.
    assert r.exit_code == 125, r
    assert "node 'h1' lost" in r.report, r
    # What arrived is a prefix of what was sent: nothing corrupted, nothing from later.
    assert 0 < r.delivered < r.sent and r.prefix, r
    # The nodes on this side of the cut hold no more than before the run.
    assert r.resources == "back", r

    # The veth up again: the link comes back by itself, and a run across it delivers every byte.
    assert r.relinked_s < math.inf, r
    assert r.rerun_exit == 0 and r.rerun_equal, r
    assert r.resources_after == "back", r

    # A cut well under the loss timeout (dpipes.bus.hub, *Link loss*): the run goes on, every
    # byte arrives, in order.
    assert r.short_exit == 0 and r.short_equal, r

    # The same figures are the two rows `dpipes-bench faults` prints.
    rows = faults.link_cut_matrix_rows(r)
    table = faults.format_matrix(rows)
    print(table)
    assert [row.scenario for row in rows] == list(faults.LINK_CUT_ROWS)
    assert all(row.ok and not row.skipped for row in rows), table
