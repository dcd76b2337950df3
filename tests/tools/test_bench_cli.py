"""The dpipes-bench command line: what it imports for --help, a suite that cannot run, the table."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpipes.tools.bench.result import Result, format_table, result
from tests.tools.bench_table import assert_aligned, bench_command, rows


def test_help_imports_neither_pyarrow_nor_dagster() -> None:
    probe = (
        "import sys\n"
        "from dpipes.tools.bench.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'pyarrow', 'dagster', 'dagster_pipes', 'zmq'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert "dpipes-bench" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


def test_pipes_without_dagster_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    # A dagster that cannot be imported, whether or not the real one is installed here: the one
    # failure a user without the extra meets, which this machine may not otherwise show.
    shadow = tmp_path / "dagster"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('no dagster here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [*bench_command(), "pipes", "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith("dpipes-bench pipes: ") and "dagster" in line
    # Installs that work from a checkout; the distribution is on no package index.
    assert "pip install dagster" in line and "pip install -e '.[bench]'" in line
    assert "dpipes-bus[bench]" not in line


def figure(name: str, value: float, *, target: float | None = None) -> Result:
    return result(name, "MB/s", [value, value * 2], "a baseline with words", [value / 3], target=target)


def test_table_columns_are_as_wide_as_their_widest_cell() -> None:
    results = [
        figure("a", 1.0),
        figure("pipes.session_bus_writer_latency_p99_and_then_some", 123456789.0, target=0.5),
        figure("b.rate", 0.000123456, target=1e9),  # below its target
    ]
    table = format_table(results)
    assert_aligned(table)
    names = [row[0] for row in rows(table)]
    assert names == [r.name for r in results]
    assert [row[6] for row in rows(table)] == ["-", "0.50x", "1000000000.00x"]
    assert rows(table)[2][-1].endswith("(below target)")


def test_json_and_table_carry_the_same_figures() -> None:
    r = figure("bus.rate_64B", 300.0, target=0.3)
    (row,) = rows(format_table([r]))
    assert float(row[1]) == pytest.approx(r.value, rel=1e-3)
    assert float(row[5].rstrip("x")) == pytest.approx(r.as_json()["ratio"], rel=1e-2)
