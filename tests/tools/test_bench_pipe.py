"""dpipes-bench pipe, quickly, as a user runs it: every figure beside its baseline, in an aligned table."""

from __future__ import annotations

import math
import subprocess

import pytest

from tests.tools.bench_table import assert_aligned, bench_command, rows


@pytest.mark.timeout(120)
def test_quick_pipe_suite_measures_every_figure_against_its_baseline() -> None:
    done = subprocess.run(
        [*bench_command(), "pipe", "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=110,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert "." in done.stderr  # progress marks, off stdout
    assert_aligned(done.stdout)
    table = rows(done.stdout)
    assert [row[0] for row in table] == [
        "pipe.throughput_64MiB",
        "pipe.throughput_64MiB_cpu",
        "pipe.direct_read_64MiB_cpu",
        "pipe.direct_read_64MiB_entry_cpu",
        "pipe.direct_read_64MiB",
        "pipe.direct_read_short_64MiB_cpu",
        "pipe.direct_read_short_64MiB_entry_cpu",
        "pipe.direct_read_short_64MiB",
        "pipe.direct_read_short_start",
        "pipe.direct_read_short_start_cpu",
        "pipe.one_node_throughput_64MiB",
        "pipe.start_to_finish",
        "pipe.python_floor",
        "pipe.start_full_path",
        "pipe.added_start_to_finish",
        "pipe.client_cpu",
    ]
    for row in table:
        value, low, high, baseline, ratio = (float(cell.rstrip("x")) for cell in row[1:6])
        assert all(math.isfinite(v) and v > 0 for v in (value, low, high, baseline, ratio)), row
        assert low <= value <= high, row
