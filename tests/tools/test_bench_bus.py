"""dpipes-bench bus: the 64-byte round trip (d), dpipes REQUEST/REPLY beside a raw pyzmq echo."""

from __future__ import annotations

import pytest

from dpipes.tools.bench.bus import percentile, round_trip_benchmarks


def test_percentile_is_the_nearest_rank() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 100 .. 1, unordered on purpose
    assert (percentile(values, 50), percentile(values, 99), percentile(values, 100)) == (50.0, 99.0, 100.0)
    assert percentile([7.0], 99) == 7.0


@pytest.mark.timeout(120)
def test_round_trip_rows_between_two_processes() -> None:
    marks: list[str] = []
    p50, p99 = round_trip_benchmarks(2, marks.append, 50)
    assert marks == [".", "."]
    assert (p50.name, p99.name) == ("bus.roundtrip_64B_p50", "bus.roundtrip_64B_p99")
    for row in (p50, p99):
        assert row.unit == "us" and not row.higher_is_better
        assert len(row.samples) == len(row.baseline_samples) == 2
        assert row.value > 0 and row.baseline_value > 0 and row.ratio > 0
    # within each run the 99th percentile is at least the median
    assert all(hi >= lo for lo, hi in zip(p50.samples, p99.samples, strict=True))
    assert all(hi >= lo for lo, hi in zip(p50.baseline_samples, p99.baseline_samples, strict=True))
