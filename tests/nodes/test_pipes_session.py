"""The orchestration API: open_pipes_session with real dagster-pipes children, run_pipes on real nodes."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from dpipes.bus.errors import SecurityError
from dpipes.nodes.pipes import make_context_data
from dpipes.nodes.pipes_session import (
    PipesContextInjector,
    PipesEnvContextInjector,
    PipesFifoMessageReader,
    PipesFileContextInjector,
    PipesMessageReader,
    PipesStageResult,
    PipesTempFileContextInjector,
    PipesTempFileMessageReader,
    open_pipes_session,
    run_pipes,
)
from dpipes.nodes.run import RunFailed
from tests.nodes.daemons import daemons, dpipes, environment

CHILD_TIMEOUT_S = 60.0
LINK_WAIT_S = 30.0
POLL_INTERVAL_S = 0.1  # between looks at the node table, under LINK_WAIT_S

REPORTER = """
import sys
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("limit " + str(pipes.extras["limit"]) + " asset " + pipes.asset_key)
    pipes.report_asset_materialization(metadata={"rows": {"raw_value": 3, "type": "int"}})
    pipes.report_asset_check(check_name="not_empty", passed=True)
    pipes.report_custom_message({"payload": [1, 2, 3]})
    sys.stdout.write("done\\n")
"""
METHODS = ["opened", "log", "report_asset_materialization", "report_asset_check", "report_custom_message", "closed"]

FAILING = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("about to fail")
    raise ValueError("bad input row 7")
"""


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


async def await_known(rt: Path, host_port: str, name: str) -> None:
    """Poll the entry node's table until it knows ``name`` (its peer links asynchronously)."""

    async def known() -> None:
        while True:
            listed = await dpipes(rt, "--node", host_port, "--nodes", "--json")
            assert listed.code == 0, listed.stderr
            if name in {json.loads(line)["name"] for line in listed.stdout.splitlines()}:
                return
            await asyncio.sleep(POLL_INTERVAL_S)

    await asyncio.wait_for(known(), LINK_WAIT_S)


async def run_child(program: str, env: dict[str, str]) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, program, env={**os.environ, **env}, stdout=asyncio.subprocess.PIPE
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), CHILD_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out


@pytest.mark.parametrize(
    ("injector", "reader"),
    [
        ("env", "fifo"),
        ("file", "fifo"),
        ("tempfile", "fifo"),
        ("env", "tempfile"),
    ],
)
async def test_a_session_collects_every_message_of_a_real_dagster_pipes_child(
    tmp_path: Path, injector: str, reader: str
) -> None:
    injectors: dict[str, PipesContextInjector] = {
        "env": PipesEnvContextInjector(),
        "file": PipesFileContextInjector(tmp_path / "context.json"),
        "tempfile": PipesTempFileContextInjector(tmpdir=tmp_path),
    }
    readers: dict[str, PipesMessageReader] = {
        "fifo": PipesFifoMessageReader(tmpdir=tmp_path),
        "tempfile": PipesTempFileMessageReader(tmpdir=tmp_path),
    }
    program = script(tmp_path, "reporter.py", REPORTER)
    context = make_context_data(run_id="r1", asset_keys=["orders"], extras={"limit": 10})
    async with open_pipes_session(
        context_data=context, context_injector=injectors[injector], message_reader=readers[reader]
    ) as session:
        env = session.get_bootstrap_env_vars()
        assert set(env) == {"DAGSTER_PIPES_CONTEXT", "DAGSTER_PIPES_MESSAGES"}
        code, out = await run_child(program, env)
    assert (code, out) == (0, b"done\n")
    handler = session.message_handler
    assert [m["method"] for m in handler.messages] == METHODS
    assert [(log["level"], log["message"]) for log in handler.logs] == [("INFO", "limit 10 asset orders")]
    assert handler.materializations[0]["asset_key"] == "orders"
    assert handler.materializations[0]["metadata"]["rows"] == {"raw_value": 3, "type": "int"}
    assert [(c["check_name"], c["passed"]) for c in handler.checks] == [("not_empty", True)]
    assert handler.custom_messages == [{"payload": [1, 2, 3]}]
    assert handler.received_opened and handler.received_closed and handler.exception is None
    assert handler.bad_lines == []
    assert sorted(os.listdir(tmp_path)) == ["reporter.py"]  # every file the session made is gone


async def test_a_session_reports_the_exception_a_child_closed_with(tmp_path: Path) -> None:
    program = script(tmp_path, "failing.py", FAILING)
    async with open_pipes_session(context_data=make_context_data(run_id="r2")) as session:
        code, _ = await run_child(program, session.get_bootstrap_env_vars())
    assert code == 1
    exc = session.message_handler.exception
    assert exc is not None and exc.name == "ValueError"
    assert str(exc) == "ValueError: bad input row 7"
    assert any("raise ValueError" in frame for frame in exc.stack)


async def test_run_pipes_on_an_embedded_node(rt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in environment(rt).items():
        monkeypatch.setenv(name, value)  # no system config, runtime files under this test
    program = script(tmp_path, "reporter.py", REPORTER)
    result = await run_pipes(f"python3 {program} | tr a-z A-Z", extras={"limit": 5}, assets=["orders"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"DONE\n"
    assert [s.exit_code for s in result.stages] == [0, 0]
    first, second = result.stages
    assert first.context["asset_keys"] == ["orders"] and first.context["extras"]["limit"] == 5
    assert [m["method"] for m in first.messages] == METHODS
    assert second.messages == ()  # tr does not speak Pipes
    assert result.messages == first.messages
    assert [log["message"] for log in result.logs] == ["limit 5 asset orders"]
    assert [m["asset_key"] for m in result.materializations] == ["orders"]
    assert [c["check_name"] for c in result.checks] == ["not_empty"]
    assert result.custom_messages == ({"payload": [1, 2, 3]},)
    assert result.exception is None
    with pytest.raises(AttributeError):
        result.exit_code = 3


async def test_run_pipes_collects_from_a_stage_on_a_second_daemon(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "reporter.py", REPORTER)
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        await await_known(rt, alpha.host_port, "beta")
        result = await run_pipes(
            f"python3@beta {program}", node=alpha.host_port, insecure=True, extras={"limit": 7}, assets=["orders"]
        )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"done\n"
    (stage,) = result.stages
    assert stage.node == "beta"
    assert stage.context["extras"] == {"limit": 7}  # exactly the user's: dpipes adds none
    assert stage.context["run_id"] == result.pipeline
    assert [m["method"] for m in stage.messages] == METHODS
    assert stage.materializations[0]["metadata"]["rows"] == {"raw_value": 3, "type": "int"}
    assert [log["message"] for log in stage.logs] == ["limit 7 asset orders"]


async def test_run_pipes_reports_the_exception_raised_inside_pipes(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "failing.py", FAILING)
    async with daemons(rt, ["alpha"]) as (alpha,):
        result = await run_pipes(f"python3 {program}", node=alpha.host_port, insecure=True)
    assert result.exit_code == 1
    assert result.exception is not None
    assert str(result.exception) == "ValueError: bad input row 7"
    assert [log["message"] for log in result.logs] == ["about to fail"]
    assert result.messages[-1]["method"] == "closed"


async def test_run_pipes_reaches_a_keyed_node_over_tcp_with_keys_as_dpipes_does(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "failing.py", FAILING)
    async with daemons(rt, ["alpha"], secure=True) as (alpha,):
        result = await run_pipes(f"python3 {program}", node=alpha.host_port)  # your own daemon: your keys
        assert result.logs and result.logs[0]["message"] == "about to fail"
        with pytest.raises(SecurityError):  # without keys a keyed node lets nobody in, and says so
            await run_pipes("true", node=alpha.host_port, insecure=True)


async def test_run_pipes_gives_a_stage_its_own_options(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "reporter.py", REPORTER)
    async with daemons(rt, ["alpha"]) as (alpha,):
        result = await run_pipes(
            f"cat | python3 {program}",
            node=alpha.host_port,
            insecure=True,
            extras={"limit": 1},
            input=b"",
            stage_options={1: {"extras": {"limit": 9}, "assets": ["orders"], "messages": "stdout"}},
        )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"done\n"  # the messages went out of stdout, the data stayed
    first, second = result.stages
    assert first.context["extras"]["limit"] == 1 and first.context["asset_keys"] is None
    assert [log["message"] for log in second.logs] == ["limit 9 asset orders"]
    assert [m["method"] for m in second.messages] == METHODS


async def test_run_pipes_refuses_options_for_a_stage_that_does_not_exist(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        with pytest.raises(RunFailed, match="Pipes options for stage 3: the pipeline has 1 stage"):
            await run_pipes("true", node=alpha.host_port, insecure=True, stage_options={3: {"assets": ["x"]}})


def streamed(stage: PipesStageResult) -> dict[str, str]:
    """The text of each stream a stage's node sent as log_external_stream messages."""
    out: dict[str, str] = {}
    for m in stage.messages:
        if m["method"] == "log_external_stream":
            out[m["params"]["stream"]] = out.get(m["params"]["stream"], "") + m["params"]["text"]
    return out


async def test_stdio_sends_stderr_and_the_output_as_messages_even_from_a_local_node(
    rt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in environment(rt).items():
        monkeypatch.setenv(name, value)
    # The embedded node is on this host: without stdio the last stage would write straight to our file.
    result = await run_pipes("sh -c 'echo middle; echo oops >&2' | sh -c 'tr a-z A-Z; echo late >&2'", stdio=True)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == b"MIDDLE\n"  # the output is still the output
    first, last = result.stages
    assert streamed(first) == {"stderr": "oops\n"}  # a middle stage's stdout is pipeline data only
    assert streamed(last) == {"stdout": "MIDDLE\n", "stderr": "late\n"}
    assert b"oops" in result.stderr and b"late" in result.stderr  # stderr still arrives as stderr


async def test_without_stdio_no_output_becomes_a_message(rt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in environment(rt).items():
        monkeypatch.setenv(name, value)
    result = await run_pipes("sh -c 'echo out; echo err >&2'")
    assert result.stdout == b"out\n" and b"err" in result.stderr
    assert result.messages == ()
