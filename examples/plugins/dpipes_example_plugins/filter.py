"""``filter``: keeps the rows for which a condition holds. Config: ``expr`` (``"amount > 100"``)."""

from __future__ import annotations

import pyarrow as pa

from dpipes.nodes.plugins import Anchor, Plugin, Provider
from dpipes_example_plugins.expressions import parse_expression


class Filter(Plugin):
    """One input (``Input``), one output (``Output``): the rows where ``expr`` is true."""

    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)
        self.condition = parse_expression(provider.tool_config.get("expr", ""))
        self.seen = self.kept = 0

    def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
        kept = batch.filter(self.condition)
        self.seen += batch.num_rows
        self.kept += kept.num_rows
        self.provider.write_to_anchor("Output", kept)

    def on_incoming_connection_complete(self, anchor: Anchor) -> None:
        pass

    def on_complete(self) -> None:
        self.provider.io.info("filter kept %d of %d rows", self.kept, self.seen)
