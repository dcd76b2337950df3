"""Plugin workers started ahead of need (dpipes.nodes.worker_pool), on real daemons."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import signal
from pathlib import Path

import pytest

from dpipes.bus.errors import ConfigError
from dpipes.nodes.config import load_config
from dpipes.nodes.node import Node
from tests.nodes.daemons import daemons, dpipes
from tests.nodes.plugins.test_worker import no_workers_left, workers_of

WAIT_S = 30.0


async def until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), WAIT_S)
    except TimeoutError:
        pytest.fail(f"waited {WAIT_S} s for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_a_stage_runs_in_a_worker_started_ahead_with_its_own_directory_and_variables(
    rt: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with daemons(rt, ["alpha"]) as (alpha,):
        assert workers_of(alpha.proc.pid, idle=True) == []  # an idle node pays nothing
        first = await dpipes(rt, "--node", alpha.host_port, "%where@alpha")
        assert first.code == 0, first.stderr
        await until(lambda: len(workers_of(alpha.proc.pid, idle=True)) == 2, "the pool to fill (2 by default)")
        ready = set(workers_of(alpha.proc.pid, idle=True))
        out = await dpipes(rt, "--node", alpha.host_port, "--cwd", str(elsewhere), "%where@alpha")
        assert out.code == 0, out.stderr
        (row,) = csv.DictReader(io.StringIO(out.stdout.decode()))
        assert int(row["pid"]) in ready  # it ran in a worker that was waiting
        assert row["cwd"] == row["pwd"] == str(elsewhere)  # --cwd, as a forked worker's
        assert row["DPIPES_NODE"] == "alpha" and row["DPIPES_STAGE"] == "0" and row["DPIPES_PIPELINE"]
        (first_row,) = csv.DictReader(io.StringIO(first.stdout.decode()))
        assert row["DPIPES_PIPELINE"] != first_row["DPIPES_PIPELINE"]
        # Used once: it ends (its run may end a few milliseconds before it does) and never waits again.
        await until(lambda: not alive(int(row["pid"])), "the worker that ran the stage to end")
        await until(lambda: len(workers_of(alpha.proc.pid, idle=True)) == 2, "the pool to refill")
        assert int(row["pid"]) not in workers_of(alpha.proc.pid, idle=True)
        await no_workers_left(alpha.proc.pid)  # nothing runs a stage now


async def test_what_a_plugin_writes_and_says_last_all_arrives_from_forked_and_pooled_workers(rt: Path) -> None:
    """The worker ends with ``os._exit``: its last table, every io message and its stderr still
    arrive, whether its output crosses the hub to the client or a pipe to a program beside it."""
    async with daemons(rt, ["alpha"]) as (alpha,):
        for run in range(4):
            if run:  # the first run forks its worker; the others take one started ahead
                await until(lambda: len(workers_of(alpha.proc.pid, idle=True)) == 2, "the pool to fill")
            pipeline = "%lastwords@alpha" if run % 2 == 0 else "%lastwords@alpha | cat@alpha"
            out = await dpipes(rt, "--node", alpha.host_port, pipeline)
            assert out.code == 0, out.stderr
            assert [int(row["n"]) for row in csv.DictReader(io.StringIO(out.stdout.decode()))] == list(range(50000))
            said = [line.split("INFO ", 1)[1] for line in out.stderr.splitlines() if "INFO " in line]
            assert said == [f"message {i}" for i in range(600)] + ["last words"], said[-3:]
            assert "printed at the end" in out.stderr
        await until(lambda: workers_of(alpha.proc.pid) == [], "no worker running a stage")


async def test_a_stage_takes_the_worker_started_longest_ago(rt: Path) -> None:
    """The newest idle worker may still be importing (its refill began as the last run ended)."""
    async with daemons(rt, ["alpha"]) as (alpha,):
        assert (await dpipes(rt, "--node", alpha.host_port, "%where@alpha")).code == 0
        await until(lambda: len(workers_of(alpha.proc.pid, idle=True)) == 2, "the pool to fill (2 by default)")
        first_two = set(workers_of(alpha.proc.pid, idle=True))
        pids = []
        for _ in range(2):  # the first run's refill joins the pool after both of the first two
            out = await dpipes(rt, "--node", alpha.host_port, "%where@alpha")
            assert out.code == 0, out.stderr
            (row,) = csv.DictReader(io.StringIO(out.stdout.decode()))
            pids.append(int(row["pid"]))
            await until(lambda: len(workers_of(alpha.proc.pid, idle=True)) == 2, "the pool to refill")
        assert set(pids) == first_two


async def test_a_failing_plugin_in_a_pooled_worker_leaves_no_worker_but_the_idle_ones(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        assert (await dpipes(rt, "--node", alpha.host_port, "%where@alpha")).code == 0
        await until(lambda: workers_of(alpha.proc.pid, idle=True), "a worker started ahead")
        out = await dpipes(rt, "--node", alpha.host_port, "seq 3 | %raises@alpha | cat")
        assert out.code != 0 and "stage 1 (%raises@alpha): plugin raises" in out.stderr
        await no_workers_left(alpha.proc.pid)


async def test_idle_workers_end_with_their_node(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        assert (await dpipes(rt, "--node", alpha.host_port, "%where@alpha")).code == 0
        await until(lambda: workers_of(alpha.proc.pid, idle=True), "a worker started ahead")
        idle = workers_of(alpha.proc.pid, idle=True)
        alpha.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(alpha.proc.wait(), WAIT_S)
        await until(lambda: not any(alive(pid) for pid in idle), "the idle workers to end")


async def test_a_node_killed_hard_takes_its_idle_workers_with_it(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        assert (await dpipes(rt, "--node", alpha.host_port, "%where@alpha")).code == 0
        await until(lambda: workers_of(alpha.proc.pid, idle=True), "a worker started ahead")
        idle = workers_of(alpha.proc.pid, idle=True)
        alpha.proc.kill()
        await asyncio.wait_for(alpha.proc.wait(), WAIT_S)
        await until(lambda: not any(alive(pid) for pid in idle), "the idle workers to end (PR_SET_PDEATHSIG)")


async def test_the_pool_is_configurable_and_off_where_one_stage_runs(rt: Path, tmp_path: Path) -> None:
    off = tmp_path / "off.toml"
    off.write_text("[limits]\nplugin_workers_ready = 0\n")
    async with daemons(rt, ["alpha"], extra={"alpha": ["--config", str(off)]}) as (alpha,):
        assert (await dpipes(rt, "--node", alpha.host_port, "%where@alpha")).code == 0
        assert (await dpipes(rt, "--node", alpha.host_port, "%where@alpha")).code == 0
        assert workers_of(alpha.proc.pid, idle=True) == []
    config = load_config(environ={"DPIPES_CONFIG_PATHS": ""})
    assert config.limits.plugin_workers_ready == 2
    assert Node(config, exit_after_one=True).worker_pool_size == 0  # dpipesd --exit: one stage
    assert Node(config, worker_pool=False).worker_pool_size == 0  # the node dpipes embeds for one command
    (tmp_path / "bad.toml").write_text("[limits]\nplugin_workers_ready = -1\n")
    with pytest.raises(ConfigError, match=r"plugin_workers_ready.*at least 0"):
        load_config(environ={"DPIPES_CONFIG_PATHS": str(tmp_path / "bad.toml")})
