"""A stage's Pipes options, and how its messages are grouped into PIPES bus messages."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpipes.bus.errors import StageError
from dpipes.nodes.pipes_options import check_stage_options, options_for_stage, split_stage_selector
from dpipes.nodes.stage_pipes import BATCH_BYTES, BATCH_FRAMES, batches_of


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
