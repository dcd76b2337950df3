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
    # (arrived, sent) summed over every sample, where the suite counts what the receiver got
    # (messages, replies, Arrow arrays): a figure from a run that lost data says so beside it.
    delivered: tuple[int, int] | None = None
    baseline_delivered: tuple[int, int] | None = None

    @property
    def ratio(self) -> float:
        return self._ratio(self.value, self.baseline_value)

    def _ratio(self, value: float, baseline_value: float) -> float:
        if not baseline_value or not value:
            return 0.0
        return value / baseline_value if self.higher_is_better else baseline_value / value

    def as_json(self) -> dict[str, Any]:
        counts: dict[str, Any] = {}
        if len(self.samples) == len(self.baseline_samples) > 1:
            # Interleaved suites take sample i of both sides back to back: the spread of those pairs.
            pairs = [self._ratio(v, b) for v, b in zip(self.samples, self.baseline_samples, strict=True)]
            counts |= {"ratio_min": round(min(pairs), 3), "ratio_max": round(max(pairs), 3)}
        if self.delivered is not None:
            counts |= {"delivered": self.delivered[0], "sent": self.delivered[1]}
        if self.baseline_delivered is not None:
            counts |= {"baseline_delivered": self.baseline_delivered[0], "baseline_sent": self.baseline_delivered[1]}
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
            **counts,
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
    delivered: tuple[int, int] | None = None,
    baseline_delivered: tuple[int, int] | None = None,
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
        delivered=delivered,
        baseline_delivered=baseline_delivered,
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


def _count(pair: tuple[int, int] | None) -> str:
    return "-" if pair is None else f"{pair[0]}/{pair[1]}"


def _cells(r: Result, *, counted: bool) -> list[str]:
    flag = "" if r.target is None or r.ratio >= r.target else " (below target)"
    ours = [r.name, f"{r.value:.4g}", f"{min(r.samples):.4g}", f"{max(r.samples):.4g}"]
    theirs = [f"{r.baseline_value:.4g}"]
    if counted:
        ours.append(_count(r.delivered))
        theirs += [f"{min(r.baseline_samples):.4g}", f"{max(r.baseline_samples):.4g}", _count(r.baseline_delivered)]
    return [
        *ours,
        *theirs,
        f"{r.ratio:.2f}x",
        f"{r.target:.2f}x" if r.target is not None else "-",
        f"{r.unit} / {r.baseline}{flag}",
    ]


HEADER = ("benchmark", "dpipes", "min", "max", "baseline", "ratio", "target", "unit / baseline")
# Where a suite counts deliveries (the peers), each side shows its range and arrived/sent too.
COUNTED_HEADER = (
    "benchmark", "dpipes", "min", "max", "delivered",
    "baseline", "min", "max", "delivered", "ratio", "target", "unit / baseline",
)  # fmt: skip


def format_table(results: list[Result]) -> str:
    """The results as a table whose columns are as wide as their widest cell, header included.

    When any result counts what arrived (``delivered``), both sides get min, max and
    arrived/sent columns.
    """
    counted = any(r.delivered is not None or r.baseline_delivered is not None for r in results)
    header = COUNTED_HEADER if counted else HEADER
    left_aligned = {0, len(header) - 1}  # names and text; the figures between are right-aligned
    rows = [list(header), *(_cells(r, counted=counted) for r in results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return COLUMN_GAP.join(
            c.ljust(w) if i in left_aligned else c.rjust(w) for i, (c, w) in enumerate(cells)
        ).rstrip()

    top = line(rows[0])
    return "\n".join([top, "-" * len(top), *(line(row) for row in rows[1:])])
