"""One daemon, many runs of every outcome kind: its descriptors, threads, children and memory
come back to where they started.

The runs go through the real client API over TCP (so the stage's input crosses the bus and the
daemon's stdin pump does the work), one kind after another, ``RUNS_PER_KIND`` of each
(``DPIPES_LEAK_RUNS`` overrides; ``dpipes-bench faults`` runs more).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from dpipes.nodes.run import RunFailed, RunOptions, run_pipeline
from tests.nodes.daemons import Daemon, daemons
from tests.procs import Resources, resources

RUNS_PER_KIND = int(os.environ.get("DPIPES_LEAK_RUNS", "100"))  # a leak of one fd per run shows at once
WARM_UP_RUNS = 3  # per kind: lazy imports, caches and the thread pool reach their size first
SETTLE_TIMEOUT_S = 20.0  # exited stages are reaped and their ends closed; lingering endpoints expire
RSS_SLACK_KIB = 24 * 1024  # allocator noise; a leak of a pipe buffer or a queue per run is far more
RUN_TIMEOUT_S = 60.0

pytestmark = pytest.mark.timeout(600)


async def _run(daemon: Daemon, options: RunOptions, stdin_fd: int, on_started: Callable[[], None] | None = None) -> int:
    with open(os.devnull, "wb") as out, open(os.devnull, "wb") as err:
        result = await asyncio.wait_for(
            run_pipeline(
                daemon.tcp,
                options,
                stdin_fd=stdin_fd,
                stdout_fd=out.fileno(),
                stderr_fd=err.fileno(),
                on_started=(lambda _reply: on_started()) if on_started else None,
                handle_sigint=False,
            ),
            RUN_TIMEOUT_S,
        )
    return result.exit_code


async def success(daemon: Daemon) -> None:
    with tempfile.TemporaryFile() as f:
        f.write(b"x\n" * 1000)
        f.seek(0)
        assert await _run(daemon, RunOptions("cat | wc -l", stdin=True), f.fileno()) == 0


async def refusal(daemon: Daemon) -> None:
    with pytest.raises(RunFailed, match="dpipes-no-such-program"):
        await _run(daemon, RunOptions("dpipes-no-such-program"), -1)


async def cancel(daemon: Daemon) -> None:
    """The client goes away while its stage runs: the node cancels the run."""
    started = asyncio.Event()
    task = asyncio.create_task(_run(daemon, RunOptions("sleep 30"), -1, started.set))
    await asyncio.wait_for(started.wait(), RUN_TIMEOUT_S)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def early_exit(daemon: Daemon) -> None:
    """The stage stops reading while its input still comes (the producer gets a closed pipe)."""
    with tempfile.TemporaryFile() as f:
        f.write(b"y" * (4 << 20))
        f.seek(0)
        assert await _run(daemon, RunOptions("head -c 1", stdin=True), f.fileno()) == 0


async def exit_before_input(daemon: Daemon) -> None:
    """The stage exits before its input arrives (``echo x | true@b``)."""
    r, w = os.pipe()
    exited = asyncio.Event()

    async def write_after_exit() -> None:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while daemon.children() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # polling a condition (the stage has exited) under a deadline
        os.write(w, b"x\n")
        os.close(w)
        exited.set()

    feeder: asyncio.Task[None] | None = None

    def on_started() -> None:
        nonlocal feeder
        feeder = asyncio.create_task(write_after_exit())

    try:
        code = await _run(daemon, RunOptions("true", stdin=True), r, on_started)
        assert code in (0, 125), code  # true's own status, or its input refused: either way no leak
        assert feeder is not None
        await feeder
    finally:
        os.close(r)
        if not exited.is_set():
            with contextlib.suppress(OSError):
                os.close(w)


KINDS: dict[str, Callable[[Daemon], Awaitable[None]]] = {
    "success": success,
    "refusal": refusal,
    "cancel": cancel,
    "early exit": early_exit,
    "exit before input": exit_before_input,
}


async def _settled(pid: int, baseline: Resources) -> Resources:
    """The daemon's resources once they are back at ``baseline`` (or the last reading at the deadline)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        now = resources(pid)
        back = now.fds <= baseline.fds and now.children == 0 and now.threads <= baseline.threads
        if back or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.1)  # polling a condition under a deadline


async def test_runs_of_every_outcome_leave_the_daemon_as_they_found_it(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        pid = alpha.proc.pid
        for kind in KINDS.values():
            for _ in range(WARM_UP_RUNS):
                await kind(alpha)
        baseline = await _settled(pid, resources(pid))
        after: dict[str, Resources] = {}
        for name, kind in KINDS.items():
            for _ in range(RUNS_PER_KIND):
                await kind(alpha)
            after[name] = await _settled(pid, baseline)
        table = "\n".join(f"  after {RUNS_PER_KIND} x {name}: {r}" for name, r in after.items())
        print(f"baseline: {baseline}\n{table}")
        for name, r in after.items():
            assert r.fds <= baseline.fds, f"descriptors leaked by {name!r} runs: {baseline} ->\n{table}"
            assert r.children == 0, f"children left by {name!r} runs:\n{table}"
            assert r.threads <= baseline.threads, f"threads left by {name!r} runs: {baseline} ->\n{table}"
        final = after[list(KINDS)[-1]]
        assert final.rss_kib <= baseline.rss_kib + RSS_SLACK_KIB, f"memory kept: {baseline} -> {final}"
