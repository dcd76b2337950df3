"""``summarize``: a group-by aggregate, computed incrementally (memory grows with groups, not rows).

Config: ``by`` (the key columns, ``"region"`` or ``"region,year"``; empty: one group of all rows),
``agg`` (``column:function`` pairs, comma-separated; functions ``sum``, ``count``, ``min``,
``max``, ``mean``; default ``count`` of rows). Output columns: the keys, then
``<column>_<function>`` (``count`` alone for the row count).

Each batch is aggregated on arrival into partial results (sum, count, min, max per group); the
partials are combined in ``on_complete``. The output is sorted by the keys.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from dpipes.nodes.plugins import Anchor, Plugin, Provider

FUNCTIONS = ("sum", "count", "min", "max", "mean")
PARTS = {"sum": ("sum",), "count": ("count",), "min": ("min",), "max": ("max",), "mean": ("sum", "count")}
COMBINE = {"sum": "sum", "count": "sum", "min": "min", "max": "max"}  # how partials of a part combine
FOLD_PARTIALS = 64  # partial tables kept before folding them into one: memory follows groups, not batches


def _words(value: object) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    return [w.strip() for w in str(value or "").split(",") if w.strip()]


class Summarize(Plugin):
    """One input (``Input``), one output (``Output``)."""

    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)
        self.by = _words(provider.tool_config.get("by", ""))
        self.aggs: list[tuple[str, str]] = []
        for item in _words(provider.tool_config.get("agg", "")):
            column, _, function = item.rpartition(":")
            if not column or function not in FUNCTIONS:
                raise ValueError(f"agg {item!r}: write column:function, function one of {', '.join(FUNCTIONS)}")
            self.aggs.append((column, function))
        # the partial columns: (input column, part); "__rows" counts rows
        self.parts = sorted({(c, p) for c, f in self.aggs for p in PARTS[f]} | {("__rows", "sum")})
        self.partials: list[pa.Table] = []

    def _aggregate(self, table: pa.Table, combine: bool) -> pa.Table:
        """One row per group: the keys, then a ``column__part`` column per partial."""
        specs = [(f"{c}__{p}" if combine else c, COMBINE[p] if combine else p) for c, p in self.parts]
        grouped = table.group_by(self.by).aggregate(specs)
        columns = {key: grouped[key] for key in self.by}
        for (c, p), (source, function) in zip(self.parts, specs, strict=True):
            columns[f"{c}__{p}"] = grouped[f"{source}_{function}"]
        return pa.table(columns)

    def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
        rows = batch.append_column("__rows", pa.array([1] * batch.num_rows, pa.int64()))
        self.partials.append(self._aggregate(rows, combine=False))
        if len(self.partials) >= FOLD_PARTIALS:
            self.partials = [self._aggregate(pa.concat_tables(self.partials), combine=True)]

    def on_incoming_connection_complete(self, anchor: Anchor) -> None:
        pass

    def on_complete(self) -> None:
        if not self.partials:
            self.provider.io.warn("summarize got no rows")
            return
        table = self._aggregate(pa.concat_tables(self.partials), combine=True)
        columns: dict[str, pa.ChunkedArray] = {key: table[key] for key in self.by}
        if not self.aggs:
            columns["count"] = table["__rows__sum"]
        for column, function in self.aggs:
            if function == "mean":
                total = pc.cast(table[f"{column}__sum"], pa.float64())
                columns[f"{column}_mean"] = pc.divide(total, table[f"{column}__count"])
            else:
                columns[f"{column}_{function}"] = table[f"{column}__{function}"]
        out = pa.table(columns)
        if self.by:
            out = out.sort_by([(key, "ascending") for key in self.by])
        self.provider.write_to_anchor("Output", out)
