"""Reading a ``dpipes-bench`` table back: its cells, and whether its columns line up."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

# A cell is a run of words separated by single spaces; columns are two or more spaces apart.
_CELL = re.compile(r"\S+(?: \S+)*")


def bench_command() -> list[str]:
    """The installed ``dpipes-bench`` console script beside this Python."""
    script = Path(sys.executable).with_name("dpipes-bench")
    assert os.access(script, os.X_OK), f"dpipes-bench is not installed beside {sys.executable}"
    return [str(script)]


def cells(line: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of every cell of one table line."""
    return [(m.start(), m.end(), m[0]) for m in _CELL.finditer(line)]


def rows(table: str) -> list[list[str]]:
    """The cells of every result row (no header, no rule)."""
    _header, _rule, *lines = table.splitlines()
    return [[text for _s, _e, text in cells(line)] for line in lines]


def assert_aligned(table: str) -> None:
    """Every line has the header's columns, and each column's cells all start (left-aligned
    text) or all end (right-aligned figures) at one offset."""
    header, rule, *lines = table.splitlines()
    assert rule and set(rule) == {"-"}, rule
    assert lines, "the table has no rows"
    spans = [cells(line) for line in (header, *lines)]
    for line, row in zip((header, *lines), spans, strict=True):
        assert len(row) == len(spans[0]), f"{len(row)} cells, the header has {len(spans[0])}: {line!r}"
    for k, (_s, _e, title) in enumerate(spans[0]):
        starts = {row[k][0] for row in spans}
        ends = {row[k][1] for row in spans}
        assert len(starts) == 1 or len(ends) == 1, f"column {title!r} is ragged:\n{table}"
