"""Workflow documents to graphs (no daemon), and workflows run by real daemons through the real dpipes."""

from __future__ import annotations

import asyncio
import csv
import io
import signal
import textwrap
from pathlib import Path

import pytest

from dpipes.nodes.pipeline import parse_pipeline
from dpipes.nodes.workflow import Connection, Graph, WorkflowError, load_workflow, parse_workflow
from tests.nodes.daemons import daemons, dpipes, start_dpipes
from tests.nodes.plugins.test_worker import kill_when_stalling, workers_of
from tests.nodes.plugins.workers import install_plugins

WAIT_S = 30.0

SPLIT = {
    "stages": {
        "gen": {"plugin": "generate", "node": "beta", "config": {"rows": 100, "batch_rows": 7}},
        "split": {"plugin": "split", "config": {"expr": "n >= 60"}},
        "big": {"plugin": "summarize", "config": {"agg": "n:sum"}},
        "small": {"program": "wc -l"},
    },
    "connections": [
        {"from": "gen", "to": "split"},
        {"from": "split.True", "to": "big"},
        {"from": "split.False", "to": "small"},
    ],
    "output": "big",
}


# -- documents to graphs -------------------------------------------------------------------------


def test_a_pipeline_is_the_linear_graph() -> None:
    graph = Graph.from_pipeline(parse_pipeline("cat f | %filter expr=x | sort"), stdin=True)
    assert graph.connections == [Connection(0, "Output", 1, "Input"), Connection(1, "Output", 2, "Input")]
    assert graph.stdin_to == (0, "Input") and graph.stdout_from == (2, "Output")
    assert graph.configs == [{}, {"expr": "x"}, {}]
    inputs, outputs = graph.plugin_edges(1, ["a/p.0", "b/p.1", "a/p.2"], "a/client", edge_format="csv")
    assert [(i.anchor, i.src, i.format) for i in inputs] == [("Input", "a/p.0", "csv")]
    assert [(o.anchor, o.dst, o.format) for o in outputs] == [("Output", "a/p.2", "csv")]


def test_a_splitter_graph_numbers_the_output_stage_last() -> None:
    graph = parse_workflow(SPLIT, stdin=False)
    assert [s.text for s in graph.stages] == ["gen", "split", "small", "big"]
    assert [s.argv for s in graph.stages] == [("%generate",), ("%split",), ("wc", "-l"), ("%summarize",)]
    assert graph.stages[0].node == "beta"
    assert graph.stdout_from == (3, "Output") and graph.stdin_to is None
    addrs = ["n/p.0", "n/p.1", "n/p.2", "n/p.3"]
    _inputs, outputs = graph.plugin_edges(1, addrs, "n/c", edge_format="csv")
    assert {(o.anchor, o.dst, o.format) for o in outputs} == {("True", "n/p.3", "batches"), ("False", "n/p.2", "csv")}
    assert graph.program_edges(2, addrs, "n/c") == ("n/p.1", "n/c")  # an unconnected program output: the client


def test_two_anchors_of_one_stage_into_one_join_are_told_apart_by_anchor() -> None:
    doc = {
        "stages": {"s": {"plugin": "split"}, "j": {"plugin": "join", "config": {"on": "n"}}},
        "connections": [{"from": "s.True", "to": "j.Left"}, {"from": "s.False", "to": "j.Right"}],
    }
    graph = parse_workflow(doc, stdin=False)
    inputs, _ = graph.plugin_edges(1, ["n/p.0", "n/p.1"], "n/c", edge_format="csv")
    got = [(i.anchor, i.connection, i.src_anchor) for i in inputs]
    assert got == [("Left", "#1", "True"), ("Right", "#1", "False")]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"stages": {}}, "stages: must be a map"),
        ({"stages": {"a b": {"program": "cat"}}}, "stages.a b: a stage name"),
        ({"stages": {"a": {"program": "cat", "plugin": "x"}}}, "stages.a: give either program"),
        ({"stages": {"a": {"plugin": "x/y"}}}, "stages.a.plugin: must be a plugin name"),
        ({"stages": {"a": {"program": "cat", "config": {}}}}, "stages.a.config: only a plugin"),
        ({"stages": {"a": {"program": "cat", "colour": 1}}}, "stages.a.colour: unknown key"),
        ({"connections": [{"from": "gen", "to": "nowhere"}]}, "connections.0.to: no stage named 'nowhere'"),
        ({"connections": [{"from": "gen", "to": "gen"}]}, "connections.0: connects a stage to itself"),
        ({"output": "gen.Output", "connections": []}, None),
        ({"connections": [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}]}, "connections: form a cycle"),
        ({"connections": [{"from": "a", "to": "c"}, {"from": "b", "to": "c"}]}, "stages.c: a program has one stdin"),
    ],
)
def test_a_bad_document_names_the_key(change: dict, says: str | None) -> None:
    doc = {
        "stages": {
            "gen": {"plugin": "generate"},
            "a": {"program": "cat"},
            "b": {"program": "cat"},
            "c": {"program": "cat"},
        },
        "connections": [{"from": "gen", "to": "a"}, {"from": "a", "to": "b"}, {"from": "b", "to": "c"}],
        **change,
    }
    if says is None:
        parse_workflow(doc, stdin=False)
        return
    with pytest.raises(WorkflowError, match="workflow: " + says.replace("(", r"\(").replace(".", r"\.")):
        parse_workflow(doc, stdin=False)


def test_an_optional_input_left_unconnected_is_an_input_from_nothing() -> None:
    doc = {
        "stages": {"gen": {"plugin": "generate"}, "j": {"plugin": "join", "inputs": ["Left", "Right"]}},
        "connections": [{"from": "gen", "to": "j.Left"}],
    }
    graph = parse_workflow(doc, stdin=False)
    assert graph.extra_inputs == {1: ("Left", "Right")}
    inputs, _ = graph.plugin_edges(1, ["n/p.0", "n/p.1"], "n/c", edge_format="csv")
    assert [(i.anchor, i.connection, i.src) for i in inputs] == [("Left", "#1", "n/p.0"), ("Right", "#1", "")]
    with pytest.raises(WorkflowError, match=r"stages\.a\.inputs: only a plugin has named input anchors"):
        parse_workflow({"stages": {"a": {"program": "cat", "inputs": ["In"]}}}, stdin=False)


def test_several_unconnected_outputs_ask_which_is_stdout() -> None:
    doc = {"stages": {"a": {"program": "cat"}, "b": {"program": "cat"}}}
    asks = r"say which stage's output is dpipes' stdout \(unconnected outputs: a, b\)"
    with pytest.raises(WorkflowError, match=asks):
        parse_workflow(doc, stdin=False)


def test_yaml_and_toml_files_load_alike(tmp_path: Path) -> None:
    yaml_file = tmp_path / "flow.yaml"
    yaml_file.write_text(
        textwrap.dedent("""\
            stages:
              gen: {plugin: generate, config: {rows: 3}}
              split: {plugin: split, config: {expr: "n > 1"}, outputs: [True, False]}
            connections:
              - {from: gen, to: split}
            output: split.True
            """)
    )
    toml_file = tmp_path / "flow.toml"
    toml_file.write_text(
        textwrap.dedent("""\
            output = "split.True"
            [stages.gen]
            plugin = "generate"
            config = {rows = 3}
            [stages.split]
            plugin = "split"
            config = {expr = "n > 1"}
            outputs = ["True", "False"]
            [[connections]]
            from = "gen"
            to = "split"
            """)
    )
    from_yaml, from_toml = load_workflow(yaml_file), load_workflow(toml_file)
    assert parse_workflow(from_yaml, stdin=False) == parse_workflow(from_toml, stdin=False)
    assert parse_workflow(from_yaml, stdin=False).extra_outputs == {1: ("True", "False")}
    (tmp_path / "bad.yaml").write_text("stages: [unclosed\n")
    with pytest.raises(WorkflowError, match=r"bad\.yaml: does not parse"):
        load_workflow(tmp_path / "bad.yaml")


# -- workflows on real daemons ---------------------------------------------------------------------


@pytest.fixture
def rt(rt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runtime directory (conftest's), for daemons that find the test plugins installed."""
    install_plugins(tmp_path / "site", monkeypatch)
    return rt


def write_yaml(path: Path, doc: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def test_a_splitters_two_outputs_go_to_different_stages(rt: Path) -> None:
    flow = write_yaml(rt.parent / "split.yaml", SPLIT)
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        out = await dpipes(rt, "--node", alpha.host_port, "--status", "--workflow", str(flow))
        assert out.code == 0, out.stderr
        assert list(csv.DictReader(io.StringIO(out.stdout.decode()))) == [{"n_sum": str(sum(range(60, 100)))}]
        assert "\n61\n" in f"\n{out.stderr}"  # the False side's wc -l (a header and 60 rows), shown on stderr
        for line in ("stage 0 %generate@beta: exit 0", "stage 2 wc@alpha: exit 0", "stage 3 %summarize@alpha: exit 0"):
            assert line in out.stderr


async def test_a_join_takes_two_inputs_from_programs_and_from_one_splitter(rt: Path) -> None:
    programs = {
        "stages": {
            "left": {"program": ["printf", "id,name\\n1,a\\n2,b\\n3,c\\n"]},
            "right": {"program": ["printf", "id,score\\n1,10\\n3,30\\n"]},
            "join": {"plugin": "join", "node": "beta", "config": {"on": "id"}},
            "sort": {"program": "sort"},
        },
        "connections": [
            {"from": "left", "to": "join.Left"},
            {"from": "right", "to": "join.Right"},
            {"from": "join", "to": "sort"},
        ],
    }
    one_splitter = {
        "stages": {
            "gen": {"plugin": "generate", "config": {"rows": 100, "batch_rows": 9}},
            "split": {"plugin": "split", "node": "beta", "config": {"expr": "n >= 37"}},
            "join": {"plugin": "join", "config": {"on": "n", "type": "full outer"}},
            "count": {"program": "wc -l"},
        },
        "connections": [
            {"from": "gen", "to": "split"},
            {"from": "split.True", "to": "join.Left"},
            {"from": "split.False", "to": "join.Right"},
            {"from": "join", "to": "count"},
        ],
    }
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        out = await dpipes(rt, "--node", alpha.host_port, "--workflow", str(write_yaml(rt.parent / "j.yaml", programs)))
        assert out.code == 0, out.stderr
        assert out.stdout.decode().splitlines() == ['"id","name","score"', '1,"a",10', '3,"c",30']
        flow = write_yaml(rt.parent / "one.yaml", one_splitter)
        out = await dpipes(rt, "--node", alpha.host_port, "--workflow", str(flow))
        assert out.code == 0, out.stderr
        assert out.stdout.decode().split() == ["101"]  # every row once: a header and 100 rows


async def test_an_optional_input_that_nothing_feeds_still_completes_in_the_plugin(rt: Path) -> None:
    flow = rt.parent / "optional.yaml"
    flow.write_text(
        textwrap.dedent("""\
            stages:
              gen: {plugin: generate, config: {rows: 7, batch_rows: 3}}
              tally: {plugin: tally, node: beta, inputs: [Left, Right]}
            connections:
              - {from: gen, to: tally.Left}
            """)
    )
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        out = await dpipes(rt, "--node", alpha.host_port, "--workflow", str(flow))
        assert out.code == 0, out.stderr
        ended = list(csv.DictReader(io.StringIO(out.stdout.decode())))
        assert ended == [
            {"anchor": "Left", "rows": "7", "optional": "false"},
            {"anchor": "Right", "rows": "0", "optional": "true"},
        ] or ended == [
            {"anchor": "Right", "rows": "0", "optional": "true"},
            {"anchor": "Left", "rows": "7", "optional": "false"},
        ]


async def test_a_workflow_fails_and_cancels_like_a_pipeline(rt: Path) -> None:
    failing = {
        "stages": {"gen": {"plugin": "generate", "config": {"rows": 5}}, "bad": {"plugin": "raises", "node": "beta"}},
        "connections": [{"from": "gen", "to": "bad"}],
    }
    stuck = {
        "stages": {"gen": {"plugin": "generate", "config": {"rows": 5}}, "stuck": {"plugin": "stuck", "node": "beta"}},
        "connections": [{"from": "gen", "to": "stuck"}],
    }
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        flow = write_yaml(rt.parent / "bad.yaml", failing)
        out = await dpipes(rt, "--node", alpha.host_port, "--workflow", str(flow))
        assert out.code != 0 and "stage 1 (%raises@beta): plugin raises" in out.stderr
        flow = write_yaml(rt.parent / "s.yaml", stuck)
        proc = await start_dpipes(rt, "--node", alpha.host_port, "--workflow", str(flow))

        async def worker_running() -> None:
            while not workers_of(beta.proc.pid):
                await asyncio.sleep(0.02)

        await asyncio.wait_for(worker_running(), WAIT_S)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: every stage everywhere is cancelled
        await asyncio.wait_for(proc.communicate(), WAIT_S)
        assert proc.returncode == 130
        assert workers_of(beta.proc.pid) == []


async def test_a_splitter_killed_mid_output_ends_both_its_readers_and_the_run(
    rt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpipes.nodes.run import RunOptions

    flow = {  # SPLIT's connections
        **SPLIT,
        "stages": {
            "gen": {"plugin": "generate", "node": "alpha", "config": {"rows": 100, "batch_rows": 7}},
            "split": {"plugin": "stalls", "node": "beta"},  # writes to True and False, then stalls
            "big": {"program": "wc -l"},
            "small": {"program": "wc -l"},
        },
    }
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        options = RunOptions("workflow split", workflow=flow)
        result, out, err = await kill_when_stalling(alpha, beta, options, monkeypatch)
        assert out == b"" and not any(line.strip().isdigit() for line in err.decode().splitlines())  # no wc counted
        assert result.exit_code != 0
        [split] = [s for s in result.stages if s.argv[0] == "%stalls"]
        assert "plugin stalls worker killed by SIGKILL" in split.describe()
        assert workers_of(beta.proc.pid) == []


async def test_a_malformed_workflow_is_refused_before_any_node_is_asked(rt: Path) -> None:
    flow = write_yaml(rt.parent / "bad.yaml", {"stages": {"a": {"program": "cat", "plugin": "x"}}})
    out = await dpipes(rt, "--node", "127.0.0.1:1", "--workflow", str(flow))
    assert out.code == 2 and "workflow: stages.a: give either program (argv) or plugin (a name)" in out.stderr
