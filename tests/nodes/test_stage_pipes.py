"""A stage's Pipes options, and how its messages are grouped into PIPES bus messages."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpipes.bus.errors import StageError
from dpipes.bus.pipes import parse_message
from dpipes.nodes.pipes_options import check_env, check_stage_options, options_for_stage, split_stage_selector
from dpipes.nodes.stage_pipes import (
    BATCH_BYTES,
    BATCH_FRAMES,
    STDIO_TEXT_MAX_CHARS,
    StdioTee,
    batches_of,
    stage_context,
)


@given(st.lists(st.integers(min_value=0, max_value=BATCH_BYTES + 10), max_size=2 * BATCH_FRAMES + 3))
def test_batches_keep_every_frame_in_order_within_their_bounds(sizes: list[int]) -> None:
    frames = [i.to_bytes(4, "big") + b"x" * size for i, size in enumerate(sizes)]
    batches = list(batches_of(frames))
    assert [f for batch in batches for f in batch] == frames  # nothing lost, nothing reordered
    for batch in batches:
        assert 1 <= len(batch) <= BATCH_FRAMES
        assert sum(map(len, batch[:-1])) < BATCH_BYTES  # only the frame that crossed the bound may overshoot


def test_a_burst_travels_in_few_bus_messages() -> None:
    frames = [b'{"message":{}}'] * 10_000
    assert len(list(batches_of(frames))) == -(-10_000 // BATCH_FRAMES)


def test_a_stage_s_own_options_merge_extras_and_replace_the_rest() -> None:
    options = {
        "extras": {"a": 1, "b": 1},
        "assets": ["all"],
        "partition": "p",
        "messages": "file",
        "stages": {"1": {"extras": {"b": 2}, "assets": ["own"], "messages": "stdout"}},
    }
    assert options_for_stage(options, 0) == {"extras": {"a": 1, "b": 1}, "assets": ["all"], "partition": "p",
                                             "messages": "file"}  # fmt: skip
    assert options_for_stage(options, 1) == {"extras": {"a": 1, "b": 2}, "assets": ["own"], "partition": "p",
                                             "messages": "stdout"}  # fmt: skip


def test_stage_selectors() -> None:
    assert split_stage_selector("2:orders") == (2, "orders")
    assert split_stage_selector("orders") == (None, "orders")
    assert split_stage_selector("*:12:30") == (None, "12:30")
    assert split_stage_selector("a:b=1") == (None, "a:b=1")


def test_options_for_a_stage_the_pipeline_does_not_have_are_refused() -> None:
    check_stage_options({"stages": {"1": {"assets": ["x"]}}}, 2)
    with pytest.raises(StageError, match="stage 2: the pipeline has 2 stage"):
        check_stage_options({"stages": {"2": {"assets": ["x"]}}}, 2)
    with pytest.raises(StageError, match="unknown colour"):
        check_stage_options({"stages": {"0": {"colour": "red"}}}, 1)


def test_a_stage_s_context_carries_exactly_the_given_extras() -> None:
    extras = {"limit": 10, "nested": {"a": [1, None]}, "dpipes": "the user's own key"}
    context = stage_context({"extras": extras, "assets": ["orders"], "partition": "2024-01-01"}, pipeline="p1")
    assert context["extras"] == extras
    assert context["run_id"] == "p1"
    assert context["asset_keys"] == ["orders"]
    assert context["partition_key_range"] == {"start": "2024-01-01", "end": "2024-01-01"}


def test_an_orchestrator_s_context_is_kept_whole_under_the_stage_s_extras() -> None:
    given = {
        "run_id": "dagster-run",
        "job_name": "job",
        "asset_keys": ["a", "b"],
        "code_version_by_asset_key": {"a": "v1", "b": None},
        "provenance_by_asset_key": {"a": None, "b": None},
        "partition_key": None,
        "partition_key_range": None,
        "partition_time_window": None,
        "retry_number": 2,
        "extras": {"x": 1},
    }
    assert stage_context({"context_data": given}, pipeline="p1") == given
    own = stage_context({"context_data": given, "extras": {"y": 2}, "assets": ["a"]}, pipeline="p1")
    assert own["extras"] == {"x": 1, "y": 2} and own["run_id"] == "dagster-run"
    assert own["asset_keys"] == ["a"] and own["code_version_by_asset_key"] == {"a": "v1"}
    with pytest.raises(StageError, match="context_data must be a map"):
        stage_context({"context_data": ["no"]}, pipeline="p1")


def test_a_client_sets_plain_variables_but_not_what_decides_which_code_runs() -> None:
    assert check_env({"AWS_REGION": "eu-west-1", "MY_LIMIT": "10"}) == {"AWS_REGION": "eu-west-1", "MY_LIMIT": "10"}
    for name in ("LD_PRELOAD", "PYTHONPATH", "PATH", "DPIPES_NODE", "DAGSTER_PIPES_CONTEXT"):
        with pytest.raises(StageError, match=f"{name} may not be set"):
            check_env({name: "x"})
    with pytest.raises(StageError, match="not a variable name"):
        check_env({"A=B": "x"})
    with pytest.raises(StageError, match="string without NUL"):
        check_env({"A": 1})
    with pytest.raises(StageError, match="env: LD_PRELOAD"):  # refused at the entry node, before anything starts
        check_stage_options({"stages": {"0": {"env": {"LD_PRELOAD": "x"}}}}, 1)


def test_a_stage_s_own_env_merges_over_the_pipeline_s() -> None:
    options = {"env": {"A": "1", "B": "1"}, "stages": {"1": {"env": {"B": "2"}, "stdio": True}}}
    assert options_for_stage(options, 1) == {"env": {"A": "1", "B": "2"}, "stdio": True}


def test_stdio_becomes_valid_log_external_stream_messages_whatever_the_chunks() -> None:
    tee = StdioTee("stderr")
    data = "warn: é\n".encode() + b"\xff odd\n"
    frames = [f for i in range(len(data)) for f in tee.frames(data[i : i + 1])] + tee.frames(b"", end=True)
    messages = [parse_message(json.dumps(json.loads(f)["message"]).encode()) for f in frames]
    assert {m.method for m in messages} == {"log_external_stream"}
    assert {m.params["stream"] for m in messages} == {"stderr"}
    assert "".join(m.params["text"] for m in messages) == "warn: é\n\ufffd odd\n"  # é split across chunks


def test_a_large_chunk_is_cut_into_bounded_messages() -> None:
    frames = StdioTee("stdout").frames(b"x" * (2 * STDIO_TEXT_MAX_CHARS + 1))
    assert len(frames) == 3
    assert all(len(f) < STDIO_TEXT_MAX_CHARS + 200 for f in frames)
