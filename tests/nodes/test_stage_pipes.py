"""How a stage's Pipes messages are grouped into PIPES bus messages."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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
