"""What every benchmark suite returns, and how ``dpipes-bench`` prints it.

A suite is a function ``(*, repeat, quick, progress) -> list[Result]``: each ``Result`` is one
figure of dpipes beside its baseline, both the median of ``repeat`` samples taken in the same run.
A suite that cannot run on this machine (a missing package, no root) raises ``SuiteUnavailable``
before it measures anything. Only the standard library here: ``dpipes-bench --help`` imports this.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

COLUMN_GAP = "  "  # two spaces between columns; no cell holds two spaces in a row, so columns stay findable


class SuiteUnavailable(RuntimeError):
    """A suite cannot run here; the message says what it needs and how to get it."""


@dataclasses.dataclass(frozen=True)
class Result:
    """One benchmark line: ``value`` (dpipes) against ``baseline_value`` in ``unit``."""

    name: str
    unit: str
    value: float
    baseline: str
    baseline_value: float
    samples: tuple[float, ...]
    baseline_samples: tuple[float, ...]
    target: float | None = None  # the ratio we aim for, where the issue sets one
    higher_is_better: bool = True

    @property
    def ratio(self) -> float:
        if not self.baseline_value or not self.value:
            return 0.0
        return self.value / self.baseline_value if self.higher_is_better else self.baseline_value / self.value

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "min": min(self.samples),
            "max": max(self.samples),
            "baseline": self.baseline,
            "baseline_value": self.baseline_value,
            "baseline_min": min(self.baseline_samples),
            "baseline_max": max(self.baseline_samples),
            "ratio": round(self.ratio, 3),
            "target_ratio": self.target,
        }


def result(
    name: str,
    unit: str,
    samples: list[float],
    baseline: str,
    baseline_samples: list[float],
    *,
    target: float | None = None,
    higher_is_better: bool = True,
) -> Result:
    """A ``Result`` from repeated samples: medians, with every sample kept for min/max."""
    return Result(
        name=name,
        unit=unit,
        value=statistics.median(samples),
        baseline=baseline,
        baseline_value=statistics.median(baseline_samples),
        samples=tuple(samples),
        baseline_samples=tuple(baseline_samples),
        target=target,
        higher_is_better=higher_is_better,
    )


def against_target(name: str, unit: str, samples: list[float], target: float) -> Result:
    """A figure with no baseline program, only a target it should not exceed (a time, say)."""
    return Result(
        name=name,
        unit=unit,
        value=statistics.median(samples),
        baseline=f"target: at most {target:g} {unit}",
        baseline_value=target,
        samples=tuple(samples),
        baseline_samples=(target,),
        higher_is_better=False,
    )


def _cells(r: Result) -> list[str]:
    flag = "" if r.target is None or r.ratio >= r.target else " (below target)"
    return [
        r.name,
        f"{r.value:.4g}",
        f"{min(r.samples):.4g}",
        f"{max(r.samples):.4g}",
        f"{r.baseline_value:.4g}",
        f"{r.ratio:.2f}x",
        f"{r.target:.2f}x" if r.target is not None else "-",
        f"{r.unit} / {r.baseline}{flag}",
    ]


HEADER = ("benchmark", "dpipes", "min", "max", "baseline", "ratio", "target", "unit / baseline")
LEFT_ALIGNED = {0, len(HEADER) - 1}  # names and text; the figures between are right-aligned


def format_table(results: list[Result]) -> str:
    """The results as a table whose columns are as wide as their widest cell, header included."""
    rows = [list(HEADER), *(_cells(r) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]

    def line(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return COLUMN_GAP.join(
            c.ljust(w) if i in LEFT_ALIGNED else c.rjust(w) for i, (c, w) in enumerate(cells)
        ).rstrip()

    header = line(rows[0])
    return "\n".join([header, "-" * len(header), *(line(row) for row in rows[1:])])
