"""``join``: joins the rows of two inputs, ``Left`` and ``Right``, on key columns.

Config: ``on`` (the key columns, ``"id"`` or ``"id,day"``), ``type`` (``inner``, the default,
``left outer``, ``right outer``, ``full outer``, ``left semi``, ``left anti``). ``Right`` is held in
memory; ``Left`` streams: its batches are joined as they arrive once ``Right`` has ended (until
then they wait). Output columns: ``Left``'s, then ``Right``'s that are not keys.
"""

from __future__ import annotations

import pyarrow as pa

from dpipes.nodes.plugins import Anchor, Plugin, Provider

JOIN_TYPES = ("inner", "left outer", "right outer", "full outer", "left semi", "left anti")
STREAMING_TYPES = ("inner", "left outer", "left semi", "left anti")  # per Left batch, the result is final


class Join(Plugin):
    """Two inputs (``Left``, ``Right``), one output (``Output``)."""

    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)
        self.on = [w.strip() for w in str(provider.tool_config.get("on", "")).split(",") if w.strip()]
        self.type = str(provider.tool_config.get("type", "inner"))
        if not self.on:
            raise ValueError("join needs on=KEY (the key columns, comma-separated)")
        if self.type not in JOIN_TYPES:
            raise ValueError(f"join type {self.type!r}: use one of {', '.join(JOIN_TYPES)}")
        self.right: list[pa.Table] = []
        self.waiting_left: list[pa.Table] = []
        self.right_done = False

    def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
        if anchor.name == "Right":
            self.right.append(batch)
        elif self.right_done and self.type in STREAMING_TYPES:
            self._emit(batch)
        else:
            self.waiting_left.append(batch)

    def on_incoming_connection_complete(self, anchor: Anchor) -> None:
        if anchor.name == "Right":
            self.right_done = True
            if self.type in STREAMING_TYPES:
                for batch in self.waiting_left:
                    self._emit(batch)
                self.waiting_left = []

    def _right(self) -> pa.Table:
        if self.right:
            return pa.concat_tables(self.right)
        schema = self.provider.incoming_anchors["Right"].schema
        if schema is None:
            raise ValueError("join: Right got no rows and declares no schema")
        return schema.empty_table()

    def _emit(self, left: pa.Table) -> None:
        self.provider.write_to_anchor("Output", left.join(self._right(), self.on, join_type=self.type))

    def on_complete(self) -> None:
        if self.waiting_left:  # a type that needs all of Left (right/full outer)
            self._emit(pa.concat_tables(self.waiting_left))
