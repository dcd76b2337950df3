"""Plugins installed for daemons under test: the examples, a few broken ones and a tally, as pip would install them."""

from __future__ import annotations

import csv
import io
import textwrap
import tomllib
from pathlib import Path

import pytest

from dpipes.nodes.plugins.registry import ENTRY_POINT_GROUP

EXAMPLES = Path(__file__).parents[3] / "examples" / "plugins"
SALES = "region,amount\nnorth,50\nsouth,150\nnorth,200\neast,300\nsouth,20\nnorth,120\n"  # rt's sales.csv

BROKEN_SOURCE = """\
import threading
import pyarrow as pa
from dpipes.nodes.plugins import Plugin

class Stuck(Plugin):
    \"\"\"Never returns from its first callback.\"\"\"
    def on_record_batch(self, batch, anchor):
        threading.Event().wait()
    def on_incoming_connection_complete(self, anchor):
        pass
    def on_complete(self):
        pass

class Astray(Plugin):
    \"\"\"Writes to an anchor it was not given.\"\"\"
    def on_record_batch(self, batch, anchor):
        self.provider.write_to_anchor("Nowhere", batch)
    def on_incoming_connection_complete(self, anchor):
        pass
    def on_complete(self):
        pass

class Shifty(Plugin):
    \"\"\"Changes its output's schema after the first table it writes.\"\"\"
    def on_record_batch(self, batch, anchor):
        self.provider.write_to_anchor("Output", pa.table({"x": [1]}))
        self.provider.write_to_anchor("Output", pa.table({"x": ["one"]}))
    def on_incoming_connection_complete(self, anchor):
        pass
    def on_complete(self):
        pass

class Stalls(Plugin):
    \"\"\"Says so, writes its first table to each of its outputs, then never returns: a worker to kill mid-output.\"\"\"
    def on_record_batch(self, batch, anchor):
        self.provider.io.info("stalling")
        for name in self.provider.outgoing_anchors:
            self.provider.write_to_anchor(name, batch)
        threading.Event().wait()
    def on_incoming_connection_complete(self, anchor):
        pass
    def on_complete(self):
        pass

class Tally(Plugin):
    \"\"\"Writes, at the end, each input connection that completed: its anchor and the rows it got.\"\"\"
    def __init__(self, provider):
        super().__init__(provider)
        self.rows = {}
        self.ended = []
    def on_record_batch(self, batch, anchor):
        self.rows[anchor] = self.rows.get(anchor, 0) + batch.num_rows
    def on_incoming_connection_complete(self, anchor):
        optional = self.provider.incoming_anchors[anchor.name].optional
        self.ended.append((anchor.name, self.rows.get(anchor, 0), optional))
    def on_complete(self):
        names, rows, optional = zip(*self.ended) if self.ended else ((), (), ())
        table = pa.table({"anchor": list(names), "rows": list(rows), "optional": list(optional)})
        self.provider.write_to_anchor("Output", table)

class Where(Plugin):
    \"\"\"An input plugin that writes where it runs: its pid, working directory and stage variables.\"\"\"
    def on_record_batch(self, batch, anchor):
        pass
    def on_incoming_connection_complete(self, anchor):
        pass
    def on_complete(self):
        import os
        row = {"pid": os.getpid(), "cwd": os.getcwd(), "pwd": os.environ.get("PWD", "")}
        row.update({k: os.environ.get(k, "") for k in ("DPIPES_PIPELINE", "DPIPES_STAGE", "DPIPES_NODE")})
        self.provider.write_to_anchor("Output", pa.table({k: [v] for k, v in row.items()}))

class Lastwords(Plugin):
    \"\"\"At the very end: many io messages, a line on stderr, its one table, then one more message.\"\"\"
    def on_record_batch(self, batch, anchor):
        pass
    def on_incoming_connection_complete(self, anchor):
        pass
    def on_complete(self):
        for i in range(600):
            self.provider.io.info("message %d", i)
        print("printed at the end")
        self.provider.write_to_anchor("Output", pa.table({"n": list(range(50000))}))
        self.provider.io.info("last words")

class Raises(Plugin):
    def on_record_batch(self, batch, anchor):
        raise ZeroDivisionError("the plugin's own bug")
    def on_incoming_connection_complete(self, anchor):
        pass
    def on_complete(self):
        pass
"""


def install_plugins(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site directory with the example plugins' distribution and ``ptest-broken``; daemons started
    after this (their environment copies ours) find both through ``PYTHONPATH``."""
    root.mkdir()
    (root / "ptest_broken_plugins.py").write_text(BROKEN_SOURCE)
    examples = root / "dpipes_example_plugins-0.1.0.dist-info"
    examples.mkdir()
    (examples / "METADATA").write_text("Metadata-Version: 2.1\nName: dpipes-example-plugins\nVersion: 0.1.0\n")
    points = tomllib.loads((EXAMPLES / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    lines = "".join(f"{name} = {value}\n" for name, value in points.items())
    (examples / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    broken = root / "ptest_broken-1.0.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: ptest-broken\nVersion: 1.0\n")
    (broken / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
            [{ENTRY_POINT_GROUP}]
            stuck = ptest_broken_plugins:Stuck
            stalls = ptest_broken_plugins:Stalls
            astray = ptest_broken_plugins:Astray
            shifty = ptest_broken_plugins:Shifty
            raises = ptest_broken_plugins:Raises
            tally = ptest_broken_plugins:Tally
            where = ptest_broken_plugins:Where
            lastwords = ptest_broken_plugins:Lastwords
            """)
    )
    monkeypatch.setenv("PYTHONPATH", f"{root}:{EXAMPLES}")
    return root


def rows(data: bytes) -> list[dict[str, str]]:
    """A CSV output's rows, as dicts by header."""
    return list(csv.DictReader(io.StringIO(data.decode())))
