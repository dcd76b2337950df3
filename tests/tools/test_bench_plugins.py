"""dpipes-bench plugins, quickly, as a user runs it: each figure beside its baseline, every row delivered."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from dpipes.tools.bench import plugins
from tests.tools.bench_table import bench_command

# A stand-in for a daemon: one child that spends CPU ahead of the run (as a plugin worker imports),
# which this parent reaps when told to, then waits until its stdin closes.
_PARENT = """
import os, sys, time
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(w)
    start = time.process_time()
    while time.process_time() - start < 0.3:
        pass
    print("busy", flush=True)
    os.read(r, 1)
    os._exit(0)
os.close(r)
sys.stdin.readline()
os.close(w)
os.waitpid(pid, 0)
print("reaped", flush=True)
sys.stdin.readline()
"""


@pytest.mark.timeout(300)
def test_quick_plugins_suite_measures_every_figure_and_delivers_every_row() -> None:
    done = subprocess.run(
        [*bench_command(), "plugins", "--quick", "--repeat", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=290,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [line["name"] for line in lines] == [
        "plugins.cross_node_arrow_25MiB",
        "plugins.cross_node_arrow_cpu",
        "plugins.same_host_program_to_plugin_25MiB",
        "plugins.batches_per_s",
        "plugins.pass_through_us_per_batch",
        "plugins.stage_starts_per_s",
    ]
    for line in lines:
        assert math.isfinite(line["value"]) and line["value"] > 0, line
        assert math.isfinite(line["baseline_value"]) and line["baseline_value"] > 0, line
        assert line["delivered"] == line["sent"] and line["baseline_delivered"] == line["baseline_sent"], line


def test_run_cpu_is_not_cut_by_a_child_reaped_while_it_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker spent its CPU before the run and is reaped just as the run's CPU is read: taking
    its CPU off must come with its CPU being in the daemon's total (once this read -0.3 s)."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdin is not None and parent.stdout is not None
    try:
        assert parent.stdout.readline() == "busy\n"
        run = plugins._RunCpu([parent.pid])
        assert sum(run.before.values()) >= 0.25  # the child's work ahead of the run is seen

        read_cpu = plugins._proc_cpu
        reaped = False

        def reap_after_the_read(pid: int, *, reaped_too: bool = True) -> float:
            nonlocal reaped
            cpu = read_cpu(pid, reaped=reaped_too)
            if not reaped:  # the child ends and is reaped right after the parent's total was read
                reaped = True
                parent.stdin.write("go\n")
                parent.stdin.flush()
                assert parent.stdout.readline() == "reaped\n"
            return cpu

        monkeypatch.setattr(plugins, "_proc_cpu", lambda pid, reaped=True: reap_after_the_read(pid, reaped_too=reaped))
        assert -0.05 < run.seconds() < 0.15
        assert reaped
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)
        parent.stdout.close()
