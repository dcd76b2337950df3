"""Dagster Pipes through real daemons: unmodified dagster-pipes programs and the Node.js example."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from dpipes.bus.tap import decode_event
from tests.nodes.daemons import daemons, dpipes

TAP_WAIT_S = 15.0  # gossip passes every 2 s; generous for a loaded machine
EXAMPLE_JS = Path(__file__).parents[2] / "examples" / "pipes_node" / "pipes_example.js"

REPORTER = """
import os, sys
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("from " + os.environ["DPIPES_NODE"] + " limit " + str(pipes.extras["limit"]))
    pipes.log.warning("careful")
    pipes.report_asset_materialization(
        asset_key="orders",
        metadata={"rows": {"raw_value": 3, "type": "int"}, "note": {"raw_value": "x", "type": "text"}},
    )
    pipes.report_asset_check(check_name="not_empty", passed=True, asset_key="orders")
    pipes.report_custom_message({"payload": [1, 2, 3]})
    sys.stdout.write(sys.stdin.read().upper())
"""

FAILING = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log.info("about to fail")
    raise ValueError("bad input row 7")
"""

MANY = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    for i in range(10000):
        pipes.log.info(f"log {i}")
        pipes.report_custom_message(i)
"""

MALFORMED_IN_THE_MIDDLE = """
import json, os
from dagster_pipes import open_dagster_pipes, decode_param
path = decode_param(os.environ["DAGSTER_PIPES_MESSAGES"])["path"]
with open_dagster_pipes() as pipes:
    pipes.log.info("before")
    with open(path, "a") as f:
        f.write("this is not a message\\n")
    pipes.log.info("after")
"""

STDERR_MIXED = """
import os, sys
from dagster_pipes import open_dagster_pipes
print("plain text before", file=sys.stderr, flush=True)
with open_dagster_pipes() as pipes:
    pipes.log.info("a message on stderr")
    print("plain text inside", file=sys.stderr, flush=True)
"""


def script(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def messages(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def run_on_beta(rt: Path, tmp_path: Path, text: str, pipeline: str = "python3@beta {}") -> tuple[Any, list[dict]]:
    """Run the program ``text`` as ``pipeline`` from node alpha; the run, and the Pipes messages of stage 0."""
    program = script(tmp_path, "program.py", text)
    out = tmp_path / "pipes.jsonl"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ran = await dpipes(rt, "--node", alpha.host_port, "--pipes-json", str(out), pipeline.format(program))
    assert ran.code == 0, ran.stderr[-2000:]
    return ran, [m["message"] for m in messages(out) if m.get("stage") == 0 and "message" in m]


async def test_every_method_reaches_the_client_from_a_remote_node(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "reporter.py", REPORTER)
    out = tmp_path / "pipes.jsonl"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ran = await dpipes(
            rt, "--node", alpha.host_port, "--extra", "limit=10", "--asset", "orders", "--pipes-json", str(out),
            f"cat | python3@beta {program}", input=b"abc\n",
        )  # fmt: skip
    assert ran.code == 0, ran.stderr
    assert ran.stdout == b"ABC\n"
    assert "[stage 1 python3@beta] INFO from beta limit 10" in ran.stderr
    assert "[stage 1 python3@beta] WARNING careful" in ran.stderr
    assert "stage 1 python3@beta: materialized orders; checks not_empty: passed" in ran.stderr
    lines = messages(out)
    contexts = [line for line in lines if "context" in line]
    assert [c["stage"] for c in contexts] == [0, 1]
    assert contexts[1]["node"] == "beta" and contexts[1]["context"]["asset_keys"] == ["orders"]
    assert contexts[1]["context"]["extras"]["limit"] == 10
    methods = [line["message"]["method"] for line in lines if "message" in line]
    assert methods == ["opened", "log", "log", "report_asset_materialization", "report_asset_check",
                       "report_custom_message", "closed"]  # fmt: skip
    materialization = next(
        line["message"] for line in lines if line.get("message", {}).get("method") == "report_asset_materialization"
    )
    assert materialization["params"]["metadata"]["rows"] == {"raw_value": 3, "type": "int"}


async def test_an_exception_inside_pipes_fails_the_run(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "failing.py", FAILING)
    async with daemons(rt, ["alpha"]) as (alpha,):
        ran = await dpipes(rt, "--node", alpha.host_port, f"python3 {program} | cat")
    assert ran.code == 1  # the last stage (cat) succeeded: the Pipes failure decides
    assert "Pipes closed with ValueError: bad input row 7" in ran.stderr


async def test_ten_thousand_logs_and_custom_messages_arrive_complete_and_in_order(rt: Path, tmp_path: Path) -> None:
    _ran, payloads = await run_on_beta(rt, tmp_path, MANY)
    logs = [p["params"]["message"] for p in payloads if p["method"] == "log"]
    custom = [p["params"]["payload"] for p in payloads if p["method"] == "report_custom_message"]
    assert logs == [f"log {i}" for i in range(10000)]
    assert custom == list(range(10000))


async def test_a_malformed_line_is_reported_and_later_messages_still_arrive(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "malformed.py", MALFORMED_IN_THE_MIDDLE)
    async with daemons(rt, ["alpha"]) as (alpha,):
        ran = await dpipes(rt, "--node", alpha.host_port, f"python3 {program}")
    assert ran.code == 0, ran.stderr
    assert "INFO before" in ran.stderr and "INFO after" in ran.stderr
    assert "Pipes: Pipes message line 3" in ran.stderr
    assert ran.stderr.index("INFO before") < ran.stderr.index("Pipes message line 3") < ran.stderr.index("INFO after")


async def test_the_stderr_channel_separates_messages_from_plain_text(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "mixed.py", STDERR_MIXED)
    out = tmp_path / "pipes.jsonl"
    async with daemons(rt, ["alpha"]) as (alpha,):
        ran = await dpipes(
            rt, "--node", alpha.host_port, "--pipes-messages", "stderr", "--pipes-json", str(out), f"python3 {program}"
        )
    assert ran.code == 0, ran.stderr
    assert "plain text before" in ran.stderr and "plain text inside" in ran.stderr
    assert "INFO a message on stderr" in ran.stderr
    assert "__dagster_pipes_version" not in ran.stderr  # messages were taken out of the text
    assert [m["message"]["method"] for m in messages(out) if "message" in m] == ["opened", "log", "closed"]


STDOUT_MIXED = """
import os, sys
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    for line in sys.stdin:
        sys.stdout.write(line.upper())
        pipes.log.info("saw " + line.strip())
    pipes.report_asset_materialization(asset_key="upper")
"""


async def test_the_stdout_channel_takes_messages_out_of_the_data(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "upper.py", STDOUT_MIXED)
    out = tmp_path / "pipes.jsonl"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ran = await dpipes(
            rt, "--node", alpha.host_port, "--pipes-messages", "0:stdout", "--pipes-json", str(out),
            f"python3@beta {program} | cat -n", input=b"a\nb\n",
        )  # fmt: skip
    assert ran.code == 0, ran.stderr
    assert ran.stdout.split() == [b"1", b"A", b"2", b"B"]  # only the data reached the next stage
    assert "INFO saw a" in ran.stderr and "INFO saw b" in ran.stderr
    assert "stage 0 python3@beta: materialized upper" in ran.stderr
    methods = [m["message"]["method"] for m in messages(out) if m.get("stage") == 0 and "message" in m]
    assert methods == ["opened", "log", "log", "report_asset_materialization", "closed"]


CONTEXT_ECHO = """
import json, sys
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    sys.stdout.write(sys.stdin.read())
    assets = pipes.asset_keys if pipes.is_asset_step else None
    sys.stdout.write(json.dumps([pipes.extras.get("limit"), pipes.extras.get("who"), assets]) + "\\n")
"""


async def test_per_stage_options_reach_only_their_stage(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "echo_context.py", CONTEXT_ECHO)
    out = tmp_path / "pipes.jsonl"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ran = await dpipes(
            rt, "--node", alpha.host_port, "--extra", "limit=1", "--extra", "1:limit=2", "--extra", "1:who=\"b\"",
            "--asset", "1:orders", "--pipes-json", str(out), f"python3 {program} | python3@beta {program}",
        )  # fmt: skip
    assert ran.code == 0, ran.stderr
    assert [json.loads(line) for line in ran.stdout.splitlines()] == [[1, None, None], [2, "b", ["orders"]]]
    contexts = {line["stage"]: line["context"] for line in messages(out) if "context" in line}
    assert contexts[0]["extras"]["limit"] == 1 and contexts[0]["asset_keys"] is None
    assert contexts[1]["extras"]["limit"] == 2 and contexts[1]["asset_keys"] == ["orders"]


async def test_a_stage_selector_beyond_the_pipeline_is_a_usage_error(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        ran = await dpipes(rt, "--node", alpha.host_port, "--asset", "2:orders", "true | true")
    assert ran.code == 2
    assert "--asset '2:orders': the pipeline has 2 stage(s), numbered 0-1" in ran.stderr


EXTERNAL_STREAM = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.log_external_stream("stdout", "captured line\\n", extras={"worker": 3})
"""


async def test_log_external_stream_reaches_the_client_from_a_remote_node(rt: Path, tmp_path: Path) -> None:
    _ran, received = await run_on_beta(rt, tmp_path, EXTERNAL_STREAM)
    (message,) = [m for m in received if m["method"] == "log_external_stream"]
    assert message["params"] == {"stream": "stdout", "text": "captured line\n", "extras": {"worker": 3}}


BUS_WRITER = """
import os, sys
from dagster_pipes import open_dagster_pipes
from dpipes.bus.pipes_writer import PipesBusMessageWriter
with open_dagster_pipes(message_writer=PipesBusMessageWriter()) as pipes:
    for i in range(10000):
        pipes.log.info(f"log {i}")
        pipes.report_custom_message(i)
    pipes.report_asset_materialization(asset_key="orders")
    sys.stdout.write(type(pipes._message_channel).__name__ + "\\n")  # which channel the writer took
"""


async def test_the_bus_writer_sends_straight_onto_the_bus_of_a_remote_node(rt: Path, tmp_path: Path) -> None:
    ran, payloads = await run_on_beta(rt, tmp_path, BUS_WRITER, "python3@beta {} | cat")
    assert ran.stdout == b"PipesBusMessageWriterChannel\n"  # the node offered the bus and the writer took it
    assert "stage 0 python3@beta: materialized orders" in ran.stderr
    assert "instead" not in ran.stderr  # the bus was taken: no notice of a fallback to the FIFO
    assert [p["params"]["message"] for p in payloads if p["method"] == "log"] == [f"log {i}" for i in range(10000)]
    assert [p["params"]["payload"] for p in payloads if p["method"] == "report_custom_message"] == list(range(10000))
    assert payloads[0]["method"] == "opened" and payloads[-1]["method"] == "closed"


async def test_the_tap_of_the_stage_s_node_shows_its_pipes_messages(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "reporter.py", REPORTER)
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ctx = zmq.asyncio.Context()
        tap = ctx.socket(zmq.SUB)
        tap.connect(f"ipc://{rt}/beta-tap.sock")
        tap.subscribe(b"")
        try:
            await asyncio.wait_for(tap.recv(), TAP_WAIT_S)  # subscribed: gossip between the nodes shows
            ran = await dpipes(rt, "--node", alpha.host_port, "--extra", "limit=3", f"python3@beta {program}")
            assert ran.code == 0, ran.stderr
            seen: list[dict] = []
            while not any(m.get("method") == "closed" for m in seen):
                event = decode_event(await asyncio.wait_for(tap.recv(), TAP_WAIT_S))
                if event.kind == "PIPES":
                    assert event.src.startswith("beta/") and event.pipes is not None
                    seen += [json.loads(frame) for frame in event.pipes]  # as the program wrote them
        finally:
            tap.close(0)
            ctx.term()
    assert [m["method"] for m in seen][:3] == ["opened", "log", "log"]
    assert seen[1]["params"]["message"] == "from beta limit 3"


@pytest.mark.skipif(shutil.which("node") is None, reason="the Node.js example needs `node`")
async def test_the_nodejs_example_speaks_pipes_unmodified(rt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pipes.jsonl"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ran = await dpipes(rt, "--node", alpha.host_port, "--pipes-json", str(out), f"node@beta {EXAMPLE_JS}")
    assert ran.code == 0, ran.stderr
    methods = [m["message"]["method"] for m in messages(out) if "message" in m]
    assert methods[0] == "opened" and methods[-1] == "closed"
    assert {"log", "report_asset_materialization", "report_asset_check"} <= set(methods)


NEVER_CLOSES = """
import os, sys
from dagster_pipes import open_dagster_pipes
pipes = open_dagster_pipes()  # opened, never closed: the process simply ends
pipes.log.info("opened and leaving")
sys.stdout.flush()
os._exit(0)
"""

BIG_PAYLOAD = """
from dagster_pipes import open_dagster_pipes
with open_dagster_pipes() as pipes:
    pipes.report_custom_message({"blob": "x" * (1 << 20)})
"""


async def test_a_process_that_never_closes_pipes_is_an_ordinary_exit(rt: Path, tmp_path: Path) -> None:
    program = script(tmp_path, "never.py", NEVER_CLOSES)
    out = tmp_path / "pipes.jsonl"
    async with daemons(rt, ["alpha"]) as (alpha,):
        ran = await dpipes(rt, "--node", alpha.host_port, "--pipes-json", str(out), f"python3 {program}")
    assert ran.code == 0, ran.stderr
    methods = [m["message"]["method"] for m in messages(out) if "message" in m]
    assert methods == ["opened", "log"]  # everything written arrived; no `closed` was invented


async def test_a_one_mebibyte_custom_payload_arrives_whole_from_a_remote_node(rt: Path, tmp_path: Path) -> None:
    _ran, received = await run_on_beta(rt, tmp_path, BIG_PAYLOAD)
    custom = [m for m in received if m["method"] == "report_custom_message"]
    assert custom[0]["params"]["payload"] == {"blob": "x" * (1 << 20)}


async def test_pipes_stdio_across_nodes_keeps_a_middle_stage_s_output_data(rt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pipes.jsonl"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ran = await dpipes(
            rt, "--node", alpha.host_port, "--pipes-stdio", "--pipes-json", str(out),
            "sh -c 'echo middle; echo oops >&2' | sh@beta -c 'tr a-z A-Z; echo late >&2'",
        )  # fmt: skip
    assert ran.code == 0, ran.stderr
    assert ran.stdout == b"MIDDLE\n"
    assert "oops" in ran.stderr and "late" in ran.stderr  # shown as before
    streams = [
        (line["stage"], line["message"]["params"]["stream"], line["message"]["params"]["text"])
        for line in messages(out)
        if line.get("message", {}).get("method") == "log_external_stream"
    ]
    assert sorted(streams) == [(0, "stderr", "oops\n"), (1, "stderr", "late\n"), (1, "stdout", "MIDDLE\n")]
