"""dpipes-bench pipe, quickly: every figure is measured against its baseline in the same run."""

from __future__ import annotations

import math

import pytest

from dpipes.tools.bench.pipe import pipe_benchmarks


@pytest.mark.timeout(120)
def test_quick_pipe_suite_measures_every_figure_against_its_baseline() -> None:
    marks: list[str] = []
    results = pipe_benchmarks(repeat=1, quick=True, progress=marks.append)
    assert [r.name for r in results] == [
        "pipe.throughput_64MiB",
        "pipe.one_node_throughput_64MiB",
        "pipe.start_to_finish",
        "pipe.added_start_to_finish",
    ]
    assert marks
    for r in results:
        assert r.samples and r.baseline_samples
        assert all(math.isfinite(v) and v > 0 for v in (r.value, r.baseline_value, r.ratio))
