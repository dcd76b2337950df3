"""The Dagster workload of `dpipes-bench pipes`, small: both clients deliver every message to Dagster."""

import os
from pathlib import Path

import pytest

try:
    import dagster  # noqa: F401
except ImportError:  # only outside CI: there the test extra installs dagster, and its absence must fail
    if os.environ.get("CI"):
        raise
    pytest.skip("dagster is not installed (pip install -e '.[test]')", allow_module_level=True)

from dpipes.nodes.dagster.bench import CLIENTS, asset_bursts


def test_both_clients_deliver_the_whole_burst_to_dagster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No daemon: the dpipes client embeds a node for each run; nothing of this machine's is read.
    monkeypatch.setenv("DPIPES_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setenv("DPIPES_CONFIG_PATHS", "")
    monkeypatch.delenv("DPIPES_NODE", raising=False)
    runs = asset_bursts(messages=200, repeat=1, warm=False)
    assert set(runs) == set(CLIENTS)
    for client, (run,) in runs.items():
        assert run.delivered == 202, client  # every custom message and both markers
        assert run.rate > 0 and run.wall_s > 0
