"""dpipes-bench peers: without the extra, one line and exit 2; with it, a quick run's table has every
row, arrived/sent for both sides, and ratios; a peer that drops data is shown dropping it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from dpipes.tools.bench.peers import Run, dora_command, throughput_rows
from dpipes.tools.bench.result import COUNTED_HEADER, format_table
from tests.tools.bench_table import assert_aligned, bench_command, cells, rows

PEER_ROWS = [
    "peers.zenoh_tcp_1MiB",
    "peers.zenoh_tcp_1MiB_cpu",
    "peers.zenoh_shm_1MiB",
    "peers.zenoh_shm_1MiB_cpu",
    "peers.zenoh_rate_64B",
    "peers.zenoh_rate_64B_cpu_sender",
    "peers.zenoh_rate_64B_cpu_receiver",
    "peers.zenoh_rate_64B_batch_api",
    "peers.zenoh_rate_64B_batch_api_cpu_sender",
    "peers.zenoh_rate_64B_batch_api_cpu_receiver",
    "peers.zenoh_roundtrip_64B_p50",
    "peers.zenoh_roundtrip_64B_p99",
    *(
        f"peers.dora_{shape}_{pool}_pool{cpu}"
        for shape in ("one_large_batch", "stream_10k_batches")
        for pool in ("default", "large")
        for cpu in ("", "_cpu")
    ),
]
COUNT = re.compile(r"(\d+)/(\d+)")


def _missing() -> list[str]:
    """The distributions of the extra missing here, found without importing them."""
    pairs = (("eclipse-zenoh", "zenoh"), ("dora-rs", "dora"))
    names = [dist for dist, module in pairs if importlib.util.find_spec(module) is None]
    return names + ([] if dora_command() else ["dora-rs-cli"])


def test_without_the_extra_says_what_to_install_in_one_line(tmp_path: Path) -> None:
    # Peers that cannot be imported, whether or not the real ones are installed here.
    for module in ("zenoh", "dora"):
        (tmp_path / module).mkdir()
        (tmp_path / module / "__init__.py").write_text(f"raise ImportError('no {module} here')\n")
    done = subprocess.run(
        [*bench_command(), "peers", "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    (line,) = lines
    assert line.startswith("dpipes-bench peers: ")
    assert "eclipse-zenoh" in line and "dora-rs" in line
    assert "pip install -e '.[peers]'" in line


def run(seconds: float, sent: int, arrived: int, nbytes: int) -> Run:
    return Run(seconds=seconds, sent=sent, arrived=arrived, nbytes=nbytes, sender_cpu_s=0.5, receiver_cpu_s=0.25)


def test_a_peer_that_drops_data_is_shown_dropping_it_and_its_rate_counts_what_arrived() -> None:
    ours = [run(1.0, 100, 100, 100_000_000), run(2.0, 100, 100, 100_000_000)]
    theirs = [run(0.5, 100, 21, 21_000_000), run(0.5, 100, 89, 89_000_000)]
    rate, cpu = throughput_rows("peers.x", "a peer", ours, theirs, 1.0)
    assert (rate.delivered, rate.baseline_delivered) == ((200, 200), (110, 200))
    assert rate.value == pytest.approx(75.0)  # median of 100 and 50 MB/s
    assert rate.baseline_value == pytest.approx(110.0)  # median of 42 and 178 MB/s: what arrived
    assert cpu.value == pytest.approx(7.5) and not cpu.higher_is_better  # 0.75 CPU s per 0.1 GB

    table = format_table([rate, cpu])
    assert_aligned(table)
    assert [text for _s, _e, text in cells(table.splitlines()[0])] == list(COUNTED_HEADER)
    assert [(row[4], row[8]) for row in rows(table)] == [("200/200", "110/200")] * 2
    record = json.loads(json.dumps(rate.as_json()))
    assert (record["ratio_min"], record["ratio_max"]) == (
        pytest.approx(50 / 178, abs=1e-3),
        pytest.approx(100 / 42, abs=1e-3),
    )
    assert {k: record[k] for k in ("delivered", "sent", "baseline_delivered", "baseline_sent")} == {
        "delivered": 200,
        "sent": 200,
        "baseline_delivered": 110,
        "baseline_sent": 200,
    }


@pytest.mark.timeout(600)
@pytest.mark.skipif(bool(_missing()), reason=f"the peers extra is not installed ({', '.join(_missing())})")
def test_quick_run_shows_every_row_with_arrived_sent_and_ratios() -> None:
    done = subprocess.run(
        [*bench_command(), "peers", "--quick", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=540,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = done.stdout
    assert_aligned(table)
    assert [text for _s, _e, text in cells(table.splitlines()[0])] == list(COUNTED_HEADER)
    found = rows(table)
    assert [row[0] for row in found] == PEER_ROWS
    for row in found:
        ours, theirs = COUNT.fullmatch(row[4]), COUNT.fullmatch(row[8])
        assert ours and theirs, row
        assert int(ours[1]) == int(ours[2]) > 0, f"dpipes lost data: {row}"  # dpipes never drops
        assert 0 <= int(theirs[1]) <= int(theirs[2]) and int(theirs[2]) > 0, row
        assert float(row[1]) > 0 and float(row[5]) > 0, row
        assert row[9].endswith("x") and float(row[9][:-1]) > 0, row
