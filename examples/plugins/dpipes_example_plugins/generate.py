"""``generate``: an input plugin (no input anchors) that writes ``rows`` rows in ``on_complete``.

Config: ``rows`` (default 10), ``batch_rows`` (default 65536). Columns: ``n`` (0, 1, ...) and
``square`` (n * n).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from dpipes.nodes.plugins import Anchor, Plugin, Provider

SCHEMA = pa.schema([("n", pa.int64()), ("square", pa.int64())])


class Generate(Plugin):
    """No inputs, one output (``Output``)."""

    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)
        self.rows = int(provider.tool_config.get("rows", 10))
        self.batch_rows = int(provider.tool_config.get("batch_rows", 65536))
        if self.rows < 0 or self.batch_rows < 1:
            raise ValueError(f"rows must be >= 0 and batch_rows >= 1, got {self.rows} and {self.batch_rows}")
        provider.push_outgoing_metadata("Output", SCHEMA)  # the schema is known even for rows=0

    def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
        raise AssertionError("generate has no input anchors")

    def on_incoming_connection_complete(self, anchor: Anchor) -> None:
        pass

    def on_complete(self) -> None:
        for start in range(0, self.rows, self.batch_rows):
            n = pa.array(range(start, min(start + self.batch_rows, self.rows)), pa.int64())
            self.provider.write_to_anchor("Output", pa.record_batch([n, pc.multiply(n, n)], schema=SCHEMA))
