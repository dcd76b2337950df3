"""Dagster materializes assets through dpipes: real dagster, real daemons, results read through Dagster's APIs."""

# No `from __future__ import annotations`: Dagster reads the assets' annotations as objects.
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

try:
    import dagster as dg
except ImportError:  # only outside CI: there the test extra installs dagster, and its absence must fail
    if os.environ.get("CI"):
        raise
    pytest.skip("dagster is not installed (pip install -e '.[test]')", allow_module_level=True)

from dpipes.nodes.dagster import DpipesPipesClient
from tests.nodes.daemons import Daemon, daemons

PY = sys.executable  # the interpreter with dagster-pipes, whatever PATH says
EXTRAS = {"limit": 10, "nested": {"list": [1, None, "x"], "flag": False}, "dpipes": "a key of the user's own"}

REPORTER = """
import os
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("on " + os.environ["DPIPES_NODE"])
    pipes.log.warning("careful")
    facts = {"extras": pipes.extras, "run_id": pipes.run_id, "job_name": pipes.job_name,
             "asset_key": pipes.asset_key, "code_version": pipes.code_version,
             "pipeline": os.environ["DPIPES_PIPELINE"], "stage": os.environ["DPIPES_STAGE"],
             "env": os.environ.get("ASSET_ENV")}
    pipes.report_asset_materialization(
        metadata={
            "facts": {"raw_value": facts, "type": "json"},
            "int": {"raw_value": 3, "type": "int"},
            "float": {"raw_value": 1.5, "type": "float"},
            "text": {"raw_value": "x", "type": "text"},
            "bool": {"raw_value": True, "type": "bool"},
            "url": {"raw_value": "https://example.com/a", "type": "url"},
            "path": {"raw_value": "/data/orders.csv", "type": "path"},
            "notebook": {"raw_value": "/nb/orders.ipynb", "type": "notebook"},
            "md": {"raw_value": "# orders", "type": "md"},
            "null": {"raw_value": None, "type": "null"},
            "timestamp": {"raw_value": 1700000000.5, "type": "timestamp"},
            "run": {"raw_value": pipes.run_id, "type": "dagster_run"},
            "asset": {"raw_value": "raw/orders", "type": "asset"},
            "inferred": 7,
        },
        data_version="v42",
    )
"""

MULTI = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    for key in pipes.asset_keys:
        version = pipes.code_version_by_asset_key[key]
        pipes.report_asset_materialization(asset_key=key, metadata={"version": {"raw_value": version, "type": "text"}})
"""

PARTITIONED = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    window = pipes.partition_time_window
    pipes.report_asset_materialization(metadata={"key": pipes.partition_key, "start": window["start"]})
"""

CHECKED = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.report_asset_materialization(metadata={"rows": 5})
    pipes.report_asset_check(check_name="positive", passed=False, severity="WARN",
                             metadata={"bad_rows": {"raw_value": 2, "type": "int"}})
"""

RAISES = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("about to fail")
    raise ValueError("bad input row 7")
"""

FIRST_STAGE = """
import os
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("stage 0 on " + os.environ["DPIPES_NODE"])
    pipes.report_asset_materialization(asset_key="orders", metadata={"rows": 3})
    print("a\\nb\\nc", flush=True)
"""

SECOND_STAGE = """
import os, sys
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    rows = sys.stdin.read().split()
    pipes.log.info("stage 1 on " + os.environ["DPIPES_NODE"] + " read " + ",".join(rows))
    pipes.report_asset_materialization(asset_key="customers", metadata={"rows": len(rows)})
"""

RAISES_LATE = """
import sys
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    try:
        while True:
            sys.stdout.write("x" * 65536)
            sys.stdout.flush()
    except BrokenPipeError:
        sys.stdout = None  # nothing more to flush at exit
    raise ValueError("stage 0 saw its reader go")
"""

RAISES_AT_ONCE = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    raise KeyError("stage 1")
"""

STREAMS = """
import sys
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("logged once")
    pipes.log_external_stream("stdout", "streamed to dagster\\n")
    print("plain stderr", file=sys.stderr, flush=True)
    print("plain stdout", flush=True)
"""


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("programs")
    texts = {
        "reporter": REPORTER, "multi": MULTI, "partitioned": PARTITIONED, "checked": CHECKED, "raises": RAISES,
        "raises_late": RAISES_LATE, "raises_at_once": RAISES_AT_ONCE, "first": FIRST_STAGE, "second": SECOND_STAGE,
        "streams": STREAMS,
    }  # fmt: skip
    out = {}
    for name, text in texts.items():
        (directory / f"{name}.py").write_text(text)
        out[name] = str(directory / f"{name}.py")
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def nodes(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, Daemon]]:
    """alpha and beta on loopback, shared by the module's tests (each test is a Dagster run)."""
    runtime = tmp_path_factory.mktemp("run")
    runtime.chmod(0o700)
    async with daemons(runtime, ["alpha", "beta"]) as (alpha, beta):
        yield {"alpha": alpha, "beta": beta}


def materialize(assets: list[Any], nodes: dict[str, Daemon], **kwargs: Any) -> tuple[Any, list[str]]:
    """Materialize through alpha; the run's result, and the messages of its logs."""
    instance = dg.DagsterInstance.ephemeral()
    client = DpipesPipesClient(node=nodes["alpha"].host_port, insecure=True, env={"ASSET_ENV": "from the resource"})
    result = dg.materialize(assets, resources={"dpipes": client}, instance=instance, **kwargs)
    logs = [entry.message for entry in instance.all_logs(result.run_id)]  # user logs and Dagster's events
    return result, logs


def test_a_single_asset_gets_every_metadata_type_and_exactly_its_extras(
    nodes: dict[str, Daemon], programs: dict[str, str]
) -> None:
    @dg.asset(code_version="v7")
    def orders(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient) -> dg.MaterializeResult:
        return dpipes.run(
            context=context, command=f"{PY} {programs['reporter']}", extras=EXTRAS
        ).get_materialize_result()

    result, logs = materialize([orders], nodes)
    assert result.success
    assert "on alpha" in logs and "careful" in logs
    (event,) = result.get_asset_materialization_events()
    mat = event.materialization
    assert mat.asset_key == dg.AssetKey("orders")
    assert mat.tags["dagster/data_version"] == "v42"
    meta = mat.metadata
    facts = meta["facts"].value
    assert facts["extras"] == EXTRAS  # exactly as given: dpipes adds no key of its own
    assert facts["run_id"] == result.run_id and facts["job_name"] == result.dagster_run.job_name
    assert facts["asset_key"] == "orders" and facts["code_version"] == "v7"
    assert facts["stage"] == "0" and facts["pipeline"] != result.run_id  # dpipes' own id, in DPIPES_PIPELINE
    assert facts["env"] == "from the resource"
    expected = {
        "int": (dg.IntMetadataValue, 3),
        "float": (dg.FloatMetadataValue, 1.5),
        "text": (dg.TextMetadataValue, "x"),
        "bool": (dg.BoolMetadataValue, True),
        "url": (dg.UrlMetadataValue, "https://example.com/a"),
        "path": (dg.PathMetadataValue, "/data/orders.csv"),
        "notebook": (dg.NotebookMetadataValue, "/nb/orders.ipynb"),
        "md": (dg.MarkdownMetadataValue, "# orders"),
        "null": (dg.NullMetadataValue, None),
        "timestamp": (dg.TimestampMetadataValue, 1700000000.5),
        "run": (dg.DagsterRunMetadataValue, result.run_id),
        "asset": (dg.DagsterAssetMetadataValue, dg.AssetKey(["raw", "orders"])),
        "inferred": (dg.IntMetadataValue, 7),
    }
    for key, (kind, value) in expected.items():
        assert isinstance(meta[key], kind), key
        assert meta[key].value == value, key


def test_a_multi_asset_gets_every_key_and_its_code_version(nodes: dict[str, Daemon], programs: dict[str, str]) -> None:
    @dg.multi_asset(specs=[dg.AssetSpec("orders", code_version="v1"), dg.AssetSpec("customers", code_version="v2")])
    def both(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient):  # type: ignore[no-untyped-def]
        yield from dpipes.run(context=context, command=f"{PY} {programs['multi']}").get_results()

    result, _ = materialize([both], nodes)
    assert result.success
    versions = {
        e.materialization.asset_key.to_user_string(): e.materialization.metadata["version"].value
        for e in result.get_asset_materialization_events()
    }
    assert versions == {"orders": "v1", "customers": "v2"}


def test_a_partitioned_asset_gets_its_partition_and_time_window(
    nodes: dict[str, Daemon], programs: dict[str, str]
) -> None:
    @dg.asset(partitions_def=dg.DailyPartitionsDefinition(start_date="2024-01-01"))
    def daily(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient) -> dg.MaterializeResult:
        return dpipes.run(context=context, command=f"{PY} {programs['partitioned']}").get_materialize_result()

    result, _ = materialize([daily], nodes, partition_key="2024-01-02")
    assert result.success
    (event,) = result.get_asset_materialization_events()
    assert event.partition == "2024-01-02"
    assert event.materialization.metadata["key"].value == "2024-01-02"
    assert event.materialization.metadata["start"].value.startswith("2024-01-02T00:00:00")


def test_a_failed_asset_check_reaches_dagster_with_its_severity(
    nodes: dict[str, Daemon], programs: dict[str, str]
) -> None:
    @dg.asset(check_specs=[dg.AssetCheckSpec("positive", asset="checked")])
    def checked(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient) -> dg.MaterializeResult:
        return dpipes.run(context=context, command=f"{PY} {programs['checked']}").get_materialize_result()

    result, _ = materialize([checked], nodes)
    assert result.success  # a failed check with WARN does not fail the run
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == "positive" and evaluation.asset_key == dg.AssetKey("checked")
    assert evaluation.passed is False
    assert evaluation.severity == dg.AssetCheckSeverity.WARN
    assert evaluation.metadata["bad_rows"].value == 2


def test_a_program_that_raises_fails_the_step_with_its_exception(
    nodes: dict[str, Daemon], programs: dict[str, str]
) -> None:
    @dg.asset
    def broken(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient) -> dg.MaterializeResult:
        return dpipes.run(context=context, command=f"{PY} {programs['raises']}").get_materialize_result()

    result, logs = materialize([broken], nodes, raise_on_error=False)
    assert not result.success
    assert "about to fail" in logs
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    error = failure.step_failure_data.error.cause  # Dagster wraps what the step raised
    assert error.cls_name == "DagsterPipesExecutionError"
    assert "stage 0" in error.message and "@alpha: exit 1" in error.message
    assert "ValueError: bad input row 7" in error.message
    assert "[pipes] external process pipes closed with exception" in logs  # Dagster's engine event, from `closed`


def test_a_program_runs_on_the_remote_node_it_is_pinned_to(nodes: dict[str, Daemon], programs: dict[str, str]) -> None:
    @dg.asset
    def remote(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient) -> dg.MaterializeResult:
        return dpipes.run(
            context=context, command=f"{PY}@beta {programs['reporter']}", extras={"k": 1}
        ).get_materialize_result()

    result, logs = materialize([remote], nodes)
    assert result.success
    assert "on beta" in logs
    (event,) = result.get_asset_materialization_events()
    assert event.materialization.metadata["facts"].value["extras"] == {"k": 1}


def test_both_stages_of_a_pipeline_report_into_one_session(nodes: dict[str, Daemon], programs: dict[str, str]) -> None:
    @dg.multi_asset(specs=[dg.AssetSpec("orders"), dg.AssetSpec("customers")])
    def pipeline(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient):  # type: ignore[no-untyped-def]
        command = f"{PY} {programs['first']} | {PY}@beta {programs['second']}"
        yield from dpipes.run(context=context, command=command).get_results()

    result, logs = materialize([pipeline], nodes)
    assert result.success
    assert "stage 0 on alpha" in logs and "stage 1 on beta read a,b,c" in logs
    rows = {
        e.materialization.asset_key.to_user_string(): e.materialization.metadata["rows"].value
        for e in result.get_asset_materialization_events()
    }
    assert rows == {"orders": 3, "customers": 3}
    assert not [m for m in logs if "after closed" in m or "did not receive" in m]  # one session, closed once


@pytest.mark.parametrize("include_stdio_in_messages", [True, False])
def test_stdio_reaches_the_step_once_as_messages_or_at_the_end(
    nodes: dict[str, Daemon],
    programs: dict[str, str],
    capfd: pytest.CaptureFixture[str],
    include_stdio_in_messages: bool,
) -> None:
    @dg.asset
    def streams(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient) -> dg.MaterializeResult:
        invocation = dpipes.run(context=context, command=f"{PY} {programs['streams']}")
        streamed = {m["params"]["stream"] for m in invocation.result.messages if m["method"] == "log_external_stream"}
        context.log.info(f"streamed: {sorted(streamed)}")
        return invocation.get_materialize_result()

    client = DpipesPipesClient(
        node=nodes["alpha"].host_port, insecure=True, include_stdio_in_messages=include_stdio_in_messages
    )
    instance = dg.DagsterInstance.ephemeral()
    result = dg.materialize([streams], resources={"dpipes": client}, instance=instance)
    assert result.success
    logs = [entry.message for entry in instance.all_logs(result.run_id)]
    # The node sends the stage's stderr and stdout as messages only when asked; the program's own
    # log_external_stream message comes either way.
    assert ("streamed: ['stderr', 'stdout']" if include_stdio_in_messages else "streamed: ['stdout']") in logs
    out, err = capfd.readouterr()
    assert out.count("streamed to dagster") == 1  # written by Dagster's handler
    assert err.count("plain stderr") == 1  # as a message, or forwarded at the end: once
    assert out.count("plain stdout") == 1
    assert "[stage 0" not in err  # the run client's own report of the logs: Dagster has them already


def test_a_pipeline_whose_stages_both_raise_closes_with_the_first_stage_s_exception(
    nodes: dict[str, Daemon], programs: dict[str, str]
) -> None:
    @dg.asset
    def broken(context: dg.AssetExecutionContext, dpipes: DpipesPipesClient) -> dg.MaterializeResult:
        # Stage 1 raises at once; stage 0 raises only once its reader is gone: it closes last.
        command = f"{PY} {programs['raises_late']} | {PY}@beta {programs['raises_at_once']}"
        return dpipes.run(context=context, command=command).get_materialize_result()

    instance = dg.DagsterInstance.ephemeral()
    client = DpipesPipesClient(node=nodes["alpha"].host_port, insecure=True)
    result = dg.materialize([broken], resources={"dpipes": client}, instance=instance, raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    message = failure.step_failure_data.error.cause.message
    assert "stage 0" in message and "ValueError: stage 0 saw its reader go" in message
    assert "stage 1" in message and "KeyError: 'stage 1'" in message  # every failed stage is named
    closed = [e for e in instance.all_logs(result.run_id) if "closed with exception" in e.message]
    assert len(closed) == 1  # one session, closed once: with stage 0's exception
    assert closed[0].dagster_event is not None
    assert "stage 0 saw its reader go" in closed[0].dagster_event.engine_event_data.error.message
