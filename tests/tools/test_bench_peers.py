"""dpipes-bench peers: without the extra, one line and exit 2; with it, a quick run's table has every
row, arrived/sent for both sides, and ratios; a peer that drops data is shown dropping it; the Arrow
rows take every set of a session as a sample."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dpipes.tools.bench import peers
from dpipes.tools.bench.bus import ARROW_SETS
from dpipes.tools.bench.peers import (
    MESSAGES_1MIB,
    MESSAGES_1MIB_SHM,
    TIMED_SETS,
    Run,
    await_dora,
    dora_command,
    dora_sets,
    throughput_rows,
)
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
    rate, cpu = throughput_rows("peers.x", "a peer", [[r] for r in ours], [[r] for r in theirs], 1.0)
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


def test_every_set_of_a_session_is_a_sample_and_cpu_per_gb_is_over_the_session() -> None:
    # Two sessions of three sets each; the peer's second session lost an array of one set and never
    # delivered another set at all (dora's sink saw none of it: no last arrival).
    ours = [[run(1.0, 1, 1, 100_000_000)] * 3, [run(0.5, 1, 1, 100_000_000)] * 3]
    theirs = [
        [run(0.25, 10, 10, 100_000_000), run(0.5, 10, 10, 100_000_000), run(1.0, 10, 10, 100_000_000)],
        [run(0.25, 10, 9, 90_000_000), run(float("inf"), 10, 0, 0), run(0.5, 10, 10, 100_000_000)],
    ]
    rate, cpu = throughput_rows("peers.x", "a peer", ours, theirs, 1.0)
    assert rate.samples == (100.0,) * 3 + (200.0,) * 3
    assert rate.baseline_samples == (400.0, 200.0, 100.0, 360.0, 200.0)  # the set that never ended: none
    assert (rate.value, rate.baseline_value) == (pytest.approx(150.0), pytest.approx(200.0))
    assert (rate.delivered, rate.baseline_delivered) == ((6, 6), (49, 60))
    assert cpu.delivered == rate.delivered and cpu.baseline_delivered == rate.baseline_delivered
    # One figure per session: its sets' CPU (0.75 s each) over its sets' bytes.
    assert cpu.samples == (pytest.approx(7.5), pytest.approx(7.5))
    assert cpu.baseline_samples == (pytest.approx(7.5), pytest.approx(2.25 / 0.19))


def test_a_dora_set_that_stalled_counts_as_sent_but_is_no_sample_and_later_sets_are_not_sent() -> None:
    steps = [
        {"ready": True},
        {"set": 0, "sent": 100},
        {"set": 0, "sent": 100, "start": 10.0, "cpu_s": 0.01},
        {"set": 1, "sent": 100},
        {"set": 1, "sent": 100, "start": 20.0, "cpu_s": 0.02},
        {"set": 2, "sent": 100},  # its send_output never returned
    ]
    sink = {
        "0": {"arrived": 98, "nbytes": 98_000, "end": 10.5, "complete": True, "cpu_s": 0.03},  # dropped 2
        "1": {"arrived": 60, "nbytes": 60_000, "end": 20.1, "complete": False, "cpu_s": 0.0},  # never ended
    }
    first, second, third = dora_sets(steps, sink)
    assert first == Run(0.5, 100, 98, 98_000, 0.01, 0.03)
    assert second == Run(float("inf"), 100, 60, 60_000, 0.02, 0.0)
    assert third == Run(float("inf"), 100, 0, 0, 0.0, 0.0)
    (rate, _cpu) = throughput_rows("peers.x", "dora", [[first]] * 3, [[first, second, third]], None)
    assert rate.baseline_samples == (pytest.approx(0.196),)
    assert rate.baseline_delivered == (158, 300)
    (rate, _cpu) = throughput_rows("peers.x", "dora", [[first]], [[second, third]], None)
    assert rate.baseline_samples == (0.0,)  # no set ended at all: 0, not an empty row


STALLED_DORA = """
import pathlib, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
pathlib.Path(sys.argv[1]).write_text('{"ready": true}\\n')
signal.sigwait({signal.SIGINT})  # as dora run stops on Ctrl-C
pathlib.Path(sys.argv[2]).write_text("stopped")
"""


def test_a_dora_run_whose_source_makes_no_step_is_stopped_as_by_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(peers, "DORA_STALL_S", 0.2)
    monkeypatch.setattr(peers, "DORA_POLL_S", 0.01)
    monkeypatch.setattr(peers, "DORA_RUN_TIMEOUT_S", 60.0)  # not stopped: killed, and None
    progress, stopped = tmp_path / "source.jsonl", tmp_path / "stopped"
    command = [sys.executable, "-c", STALLED_DORA, str(progress), str(stopped)]
    proc = subprocess.Popen(command, start_new_session=True)  # as dora_run starts dora run
    try:
        assert await_dora(proc, progress, "a set") == 0
    finally:
        proc.kill()
        proc.wait()
    assert stopped.read_text() == "stopped"


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
        assert float(row[1]) > 0 and row[9].endswith("x"), row
        if int(theirs[1]) == int(theirs[2]):
            assert float(row[5]) > 0 and float(row[9][:-1]) > 0, row
        else:  # dora dropped arrays or stalled: its MB/s counts what arrived in the sets that ended
            assert row[0].startswith("peers.dora_") and float(row[5]) >= 0, row
    quick = 10  # what --quick divides sizes by
    sent = {row[0]: (int(row[4].split("/")[1]), int(row[8].split("/")[1])) for row in found}
    assert sent["peers.zenoh_tcp_1MiB"] == (MESSAGES_1MIB // quick,) * 2
    assert sent["peers.zenoh_shm_1MiB"] == (MESSAGES_1MIB_SHM // quick,) * 2
    for shape, (batches, _rows) in ARROW_SETS.items():
        for pool in ("default", "large"):
            # Each side sent its set TIMED_SETS times in the one run, each a sample; dora fewer
            # only if it stalled (the module docstring), in whole sets.
            ours_sent, theirs_sent = sent[f"peers.dora_{shape}_{pool}_pool"]
            assert ours_sent == TIMED_SETS * batches
            assert theirs_sent % batches == 0 and batches <= theirs_sent <= TIMED_SETS * batches
