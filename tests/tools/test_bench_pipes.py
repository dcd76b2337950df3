"""dpipes-bench pipes: the suite runs (quick mode) against real dagster and returns well-formed results."""

from __future__ import annotations

import math

import pytest

from dpipes.tools.bench.pipes import burst_rate, dagster_available, latencies_ms, percentiles, pipes_benchmarks


def custom(payload: object) -> dict[str, object]:
    return {"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": payload}}


def test_figures_from_arrivals() -> None:
    arrivals = [
        (100.5, custom({"start": 100.0})),
        (100.6, {"method": "log", "params": {"message": "x"}}),
        (101.0, custom({"end": 100.9})),
    ]
    assert burst_rate(arrivals, 5) == pytest.approx(10.0)
    lat = latencies_ms([(10.002, custom({"i": 0, "t": 10.0})), (10.004, custom({"i": 1, "t": 10.001}))])
    assert lat == pytest.approx([2.0, 3.0])
    p50, p99 = percentiles([float(i) for i in range(101)])
    assert (p50, p99) == pytest.approx((50.0, 99.0))


@pytest.mark.timeout(90)
@pytest.mark.skipif(not dagster_available(), reason="the baseline needs the real dagster package (pip install dagster)")
def test_quick_suite_returns_positive_results() -> None:
    marks: list[str] = []
    results = pipes_benchmarks(repeat=1, quick=True, progress=marks.append)
    names = [r.name for r in results]
    assert names == [
        "pipes.burst_rate",
        "pipes.burst_wall",
        "pipes.latency_p50",
        "pipes.latency_p99",
        "pipes.latency_p50_target",
        *(
            f"pipes.{who}_{figure}"
            for who in ("bus_writer", "session_bus_writer")
            for figure in ("rate", "wall", "latency_p50", "latency_p99")
        ),
        "pipes.dagster_asset_rate",
        "pipes.dagster_asset_wall",
    ]
    assert marks == ["."]
    for r in results:
        assert r.samples and r.baseline_samples
        assert r.value > 0 and r.baseline_value > 0 and math.isfinite(r.value) and math.isfinite(r.baseline_value)
        assert r.ratio > 0
        assert set(r.as_json()) >= {"name", "value", "unit", "baseline_value", "ratio"}
    rates = [r for r in results if r.unit == "msg/s"]
    assert [r.name for r in rates] == [
        "pipes.burst_rate",
        "pipes.bus_writer_rate",
        "pipes.session_bus_writer_rate",
        "pipes.dagster_asset_rate",
    ]
    assert all(r.higher_is_better for r in rates)
    assert all(not r.higher_is_better for r in results if r not in rates)
