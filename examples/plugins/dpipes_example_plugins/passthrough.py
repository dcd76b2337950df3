"""``passthrough``: passes every batch on unchanged and reports progress while it does.

Config: ``expected_rows`` (how many rows the input will have; progress is rows seen / expected,
capped at 0.99 until the input ends, then 1.0). Without it, progress is only reported at the end.
The provider sends a progress message only when the fraction moved by a percent, so calling
``update_progress`` per batch costs nothing on the bus.
"""

from __future__ import annotations

import pyarrow as pa

from dpipes.nodes.plugins import Anchor, Plugin, Provider

PROGRESS_BEFORE_END = 0.99  # an estimate never claims the end before the input says so


class Passthrough(Plugin):
    """One input (``Input``), one output (``Output``)."""

    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)
        expected = provider.tool_config.get("expected_rows")
        self.expected = int(expected) if expected is not None else None
        self.seen = 0

    def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
        self.provider.write_to_anchor("Output", batch)
        self.seen += batch.num_rows
        if self.expected:
            self.provider.io.update_progress(min(self.seen / self.expected, PROGRESS_BEFORE_END))

    def on_incoming_connection_complete(self, anchor: Anchor) -> None:
        self.provider.io.update_progress(1.0)

    def on_complete(self) -> None:
        pass
