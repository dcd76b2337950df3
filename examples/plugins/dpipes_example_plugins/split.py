"""``split``: rows where a condition holds go to ``True``, the others (null included) to ``False``."""

from __future__ import annotations

import pyarrow as pa

from dpipes.nodes.plugins import Anchor, Plugin, Provider
from dpipes_example_plugins.expressions import parse_expression


class Split(Plugin):
    """One input (``Input``), two outputs (``True``, ``False``). Config: ``expr``."""

    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)
        condition = parse_expression(provider.tool_config.get("expr", ""))
        self.holds = condition
        self.fails = ~condition | condition.is_null()  # a row is on exactly one side

    def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
        # both anchors get every batch's schema, so a reader of an empty side still knows its columns
        self.provider.write_to_anchor("True", batch.filter(self.holds))
        self.provider.write_to_anchor("False", batch.filter(self.fails))

    def on_incoming_connection_complete(self, anchor: Anchor) -> None:
        pass

    def on_complete(self) -> None:
        pass
