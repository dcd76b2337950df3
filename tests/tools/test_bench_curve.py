"""dpipes-bench curve: the bus with keys beside the same bus without, and libzmq's own ceiling."""

from __future__ import annotations

import pytest

from dpipes.tools.bench.curve import curve_benchmarks


@pytest.mark.timeout(300)
def test_every_curve_figure_is_measured_beside_its_plain_twin() -> None:
    marks: list[str] = []
    rows = {r.name: r for r in curve_benchmarks(repeat=1, quick=True, progress=marks.append)}
    assert marks == ["."]
    assert set(rows) == {
        "curve.throughput_1MiB",
        "curve.rate_64B",
        "curve.client_attach",
        "curve.pipeline_start",
        "curve.libzmq_1MiB",
    }
    for row in rows.values():
        assert len(row.samples) == len(row.baseline_samples) == 1
        assert row.value > 0 and row.baseline_value > 0
    assert (rows["curve.throughput_1MiB"].target, rows["curve.rate_64B"].target) == (0.7, 0.8)
    assert rows["curve.libzmq_1MiB"].target is None  # the ceiling is a reference, not a target of ours
