"""Recordings of the tap: one row per event, in a file ordinary tools open (pyarrow, pandas, DuckDB).

A file whose name ends in ``.parquet`` is Parquet; any other name is an Arrow IPC file (the
Feather v2 format: ``pyarrow.ipc.open_file``, ``pandas.read_feather``). Both hold the same table:

=================  ==========  ============================================================
column             type        what
=================  ==========  ============================================================
``time``           float64     when the hub routed the message, seconds since the Unix epoch
``node``           string      the hub that saw it
``n``              uint64      that hub's event number
``dropped_before`` uint64      events of that hub the recorder missed just before this one
``kind``           string      the bus message kind
``src``, ``dst``   string      its addresses
``sid``, ``seq``   uint64      its stream id and sequence number
``size``           uint64      its payload bytes
``sample``         binary      the payload sample (null for kinds without payload)
``decoded``        string      the decoded event as JSON (:mod:`dpipes.nodes.tap.view`)
``event``          binary      the message's tap event (:mod:`dpipes.bus.tap`) as the hub sent it,
                               or, for a member of a batch event, as the member's own event:
                               replay reads this column, so it replays exactly what was seen
=================  ==========  ============================================================

The schema's metadata holds ``dpipes.tap.version`` (the tap format version) and
``dpipes.tap.recorder`` (a JSON map: the taps read, the sample size). Rows are written in
batches of ``RECORD_BATCH_EVENTS`` or every ``RECORD_FLUSH_S``, so a recorder stopped by a signal
loses nothing it had read, and a file is complete once its writer is closed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from dpipes.bus.tap import TAP_VERSION, TapEvent, decode_events

log = logging.getLogger(__name__)

RECORD_BATCH_EVENTS = 1024  # rows per written batch
RECORD_FLUSH_S = 1.0  # a quiet bus still reaches the file within this

SCHEMA = pa.schema(
    [
        ("time", pa.float64()),
        ("node", pa.string()),
        ("n", pa.uint64()),
        ("dropped_before", pa.uint64()),
        ("kind", pa.string()),
        ("src", pa.string()),
        ("dst", pa.string()),
        ("sid", pa.uint64()),
        ("seq", pa.uint64()),
        ("size", pa.uint64()),
        ("sample", pa.binary()),
        ("decoded", pa.string()),
        ("event", pa.binary()),
    ]
)


def is_parquet(path: Path) -> bool:
    """Parquet by its name, else Arrow IPC."""
    return path.suffix.lower() == ".parquet"


class Recorder:
    """Writes rows to a recording; ``with Recorder(path, taps=...) as rec: rec.add(...)``."""

    def __init__(self, path: Path, *, recorder: dict[str, Any]) -> None:
        self.path = path
        self.rows = 0
        meta = {b"dpipes.tap.version": str(TAP_VERSION).encode(), b"dpipes.tap.recorder": json.dumps(recorder).encode()}
        self._schema = SCHEMA.with_metadata(meta)
        self._pending: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
        self._writer: Any
        if is_parquet(path):
            import pyarrow.parquet as pq

            self._writer = pq.ParquetWriter(path, self._schema)
        else:
            self._writer = pa.ipc.new_file(path, self._schema)

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def add(self, event: TapEvent, decoded: dict[str, Any], dropped_before: int) -> None:
        """One row; written once ``RECORD_BATCH_EVENTS`` are pending (or at :meth:`flush`)."""
        p = self._pending
        p["time"].append(event.t)
        p["node"].append(event.node)
        p["n"].append(event.n)
        p["dropped_before"].append(dropped_before)
        p["kind"].append(event.kind)
        p["src"].append(event.src)
        p["dst"].append(event.dst)
        p["sid"].append(event.sid)
        p["seq"].append(event.seq)
        p["size"].append(event.size)
        p["sample"].append(event.sample)
        p["decoded"].append(json.dumps(decoded, ensure_ascii=False, default=str))
        p["event"].append(event.encode())
        if len(p["time"]) >= RECORD_BATCH_EVENTS:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows."""
        count = len(self._pending["time"])
        if not count:
            return
        batch = pa.RecordBatch.from_pydict(self._pending, schema=self._schema)
        if is_parquet(self.path):
            self._writer.write_table(pa.Table.from_batches([batch]))
        else:
            self._writer.write_batch(batch)
        self.rows += count
        for column in self._pending.values():
            column.clear()

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        if self._writer is None:
            return
        self.flush()
        self._writer.close()
        self._writer = None


def read_table(path: Path) -> pa.Table:
    """The whole recording as a table.

    Raises:
        ValueError: the file is not a recording (not Arrow IPC or Parquet, or other columns).
    """
    try:
        if is_parquet(path):
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise ValueError(f"{path}: not a dpipes-tap recording: {exc}") from None
    missing = [name for name in ("time", "node", "n", "kind", "event") if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a dpipes-tap recording: no column {', '.join(missing)}")
    return table


def events(path: Path) -> Iterator[tuple[TapEvent, int]]:
    """Each recorded event (decoded from its ``event`` column) with its ``dropped_before``; a batch
    event written there by another tool is its members."""
    table = read_table(path)
    dropped = table.column("dropped_before").to_pylist() if "dropped_before" in table.column_names else None
    for i, data in enumerate(table.column("event").to_pylist()):
        for j, event in enumerate(decode_events(data)):
            yield event, (dropped[i] or 0) if dropped and not j else 0


def summary(path: Path) -> dict[str, Any]:
    """What a recording holds: events, time span, hubs, kinds, edges, bytes, drops."""
    table = read_table(path)
    rows = table.num_rows
    meta = table.schema.metadata or {}
    times = table.column("time").to_pylist()
    kinds: dict[str, int] = {}
    nodes: dict[str, int] = {}
    edges: dict[str, dict[str, int]] = {}
    data_bytes = 0
    cols = {name: table.column(name).to_pylist() for name in ("kind", "node", "src", "dst", "size")}
    for i in range(rows):
        kind = cols["kind"][i]
        kinds[kind] = kinds.get(kind, 0) + 1
        nodes[cols["node"][i]] = nodes.get(cols["node"][i], 0) + 1
        if kind in ("BYTES", "OBJECTS", "ARROW", "STDERR", "PIPES"):
            edge = edges.setdefault(f"{cols['src'][i]} -> {cols['dst'][i]}", {"messages": 0, "bytes": 0})
            edge["messages"] += 1
            edge["bytes"] += cols["size"][i]
            data_bytes += cols["size"][i]
    dropped = sum(table.column("dropped_before").to_pylist()) if "dropped_before" in table.column_names else 0
    start, end = (min(times), max(times)) if times else (math.nan, math.nan)
    return {
        "file": str(path),
        "format": "parquet" if is_parquet(path) else "arrow",
        "tap_version": meta.get(b"dpipes.tap.version", b"?").decode(),
        "recorder": json.loads(meta.get(b"dpipes.tap.recorder", b"{}")),
        "events": rows,
        "dropped": dropped,
        "start": start,
        "end": end,
        "duration_s": (end - start) if times else 0.0,
        "data_bytes": data_bytes,
        "kinds": dict(sorted(kinds.items())),
        "nodes": dict(sorted(nodes.items())),
        "edges": dict(sorted(edges.items())),
    }
