"""dpipes-bench plugins, quickly, as a user runs it: each figure beside its baseline, every row delivered."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from tests.tools.bench_table import bench_command


@pytest.mark.timeout(300)
def test_quick_plugins_suite_measures_every_figure_and_delivers_every_row() -> None:
    done = subprocess.run(
        [*bench_command(), "plugins", "--quick", "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=290,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["name"] for line in lines] == [
        "plugins.cross_node_arrow_25MiB",
        "plugins.cross_node_arrow_cpu",
        "plugins.same_host_program_to_plugin_25MiB",
        "plugins.batches_per_s",
        "plugins.pass_through_us_per_batch",
        "plugins.stage_starts_per_s",
    ]
    for line in lines:
        assert math.isfinite(line["value"]) and line["value"] > 0, line
        assert math.isfinite(line["baseline_value"]) and line["baseline_value"] > 0, line
        assert line["delivered"] == line["sent"] and line["baseline_delivered"] == line["baseline_sent"], line
