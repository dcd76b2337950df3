"""dpipes-bench bus --tap, quickly: the bus with a tap reader attached, beside the same without one."""

from __future__ import annotations

import json
import subprocess

from tests.tools.bench_table import bench_command


def test_quick_tap_suite_measures_the_bus_with_and_without_a_tap() -> None:
    done = subprocess.run(
        [*bench_command(), "bus", "--tap", "--quick", "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    results = {r["name"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(results) == {"bus.tapped_1MiB", "bus.tap_events_1MiB", "bus.tapped_64B", "bus.tap_events_64B"}
    for name in ("bus.tapped_1MiB", "bus.tapped_64B"):
        assert results[name]["value"] > 0 and results[name]["baseline"] == "the same, no tap"
    for name in ("bus.tap_events_1MiB", "bus.tap_events_64B"):
        assert 0 < results[name]["value"] <= results[name]["baseline_value"]  # got some, and never more than sent
