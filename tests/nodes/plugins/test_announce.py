"""A plugin stage's exit report from the code its worker announces as it exits (dpipes.nodes.plugin_stage).

The worker writes its exit code to its stdout, stderr closed, just before ``os._exit``; the node
reports from that line rather than after the kernel has freed the worker's memory. Stand-in
workers (small real programs under a real supervisor) stay alive after announcing, so that the
report is seen to come before the reap, or die before announcing, so that the reap decides.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from types import SimpleNamespace
from typing import Any

from dpipes.nodes.plugin_stage import WorkerRun
from dpipes.nodes.stage import Stage
from dpipes.nodes.supervisor import Supervisor

ANNOUNCES_THEN_LINGERS = (
    "import os, sys, time\nsys.stdin.buffer.read()\nos.close(2)\nos.write(1, b'{code}\\n')\ntime.sleep(60)\n"
)
DIES_BEFORE_ANNOUNCING = "import os, signal, sys\nsys.stdin.buffer.read()\nos.kill(os.getpid(), signal.SIGKILL)\n"
WAIT_S = 30.0
WRITES_GARBAGE_THEN_EXITS = (
    "import os, sys\nsys.stdin.buffer.read()\nos.close(2)\nos.write(1, b'x' * 100)\nos._exit(5)\n"
)


async def _report(sup: Supervisor, source: str) -> tuple[Any, Any]:
    proc = await sup.start([sys.executable, "-c", source], env={}, forward_stderr=True)
    stage = Stage(
        pipeline="p1", index=0, argv=["%fake"], mode="arrow", endpoint=None, describe="stage 1 (%fake@n)", plugin="fake"
    )  # type: ignore[arg-type]  # no stderr comes: the endpoint is never used
    stage.proc = proc
    run = WorkerRun(stage, SimpleNamespace(stderr_to="x"), b"{}", node="n")  # type: ignore[arg-type]
    report = await asyncio.wait_for(run.run(), WAIT_S)  # a report that waited for the reap: TimeoutError
    return report, proc


async def test_the_report_takes_the_announced_code_before_the_worker_is_reaped() -> None:
    async with Supervisor(grace_s=0.0) as sup:
        report, proc = await _report(sup, ANNOUNCES_THEN_LINGERS.format(code=3))
        assert proc.status is None, "the worker is still alive: the report did not wait for its reap"
        assert (report.code, report.signal, report.status) == (3, 0, "exit 3")
        assert report.error.endswith("exit 3: its output is not complete")
        await proc.kill()  # no orphan: the supervisor still owns it


async def test_a_worker_killed_before_announcing_is_reported_as_killed() -> None:
    async with Supervisor() as sup:
        report, proc = await _report(sup, DIES_BEFORE_ANNOUNCING)
        assert proc.status is not None
        assert (report.code, report.signal) == (-1, signal.SIGKILL)
        assert "killed by SIGKILL" in report.status


async def test_what_is_not_a_code_is_ignored_and_the_reap_decides() -> None:
    async with Supervisor() as sup:
        report, proc = await _report(sup, WRITES_GARBAGE_THEN_EXITS)
        assert proc.status is not None
        assert (report.code, report.status) == (5, "exit 5")
