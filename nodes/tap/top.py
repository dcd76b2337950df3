"""``dpipes-tap top``: a live full-screen view of the bus with ``rich.live``.

The view is drawn from a :class:`~dpipes.nodes.tap.graph.Graph` fed by the tap, redrawn
``TOP_REFRESH_PER_S`` times a second (a newer state replaces an older one; nothing queues):
a header (taps, events, events dropped by the tap, malformed events), nodes with their event
rates, pipelines with their stages and states, edges with rates, bytes and credit, the recent
Pipes messages and the recent errors.

Keys: ``q`` quits; ``s`` sorts the edges by the next of rate, bytes, name; ``p`` shows only the
next pipeline (drill down), ``a`` all of them again. When standard output is not a terminal the
same content is printed as plain lines (or ``--json``) once a second instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import termios
import tty
from collections.abc import Iterator
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from dpipes.nodes.tap.graph import Graph, edge_text
from dpipes.nodes.tap.rates import human_bytes
from dpipes.nodes.tap.source import TapSource
from dpipes.nodes.tap.view import clock

log = logging.getLogger(__name__)

TOP_REFRESH_PER_S = 4  # redraws per second: live enough, cheap enough
SORTS = ("rate", "bytes", "name")
RECENT_LINES = 8  # Pipes messages and errors shown


class TopState:
    """What the keys changed: the edge sort and the pipeline drilled into."""

    def __init__(self) -> None:
        self.sort = SORTS[0]
        self.pipeline: str | None = None
        self.quit = False

    def key(self, key: str, graph: Graph) -> None:
        """Apply one key press."""
        if key == "q":
            self.quit = True
        elif key == "s":
            self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        elif key == "a":
            self.pipeline = None
        elif key == "p" and graph.pipelines:
            ids = list(graph.pipelines)
            self.pipeline = ids[(ids.index(self.pipeline) + 1) % len(ids)] if self.pipeline in ids else ids[0]


def view(graph: Graph, source: TapSource, state: TopState) -> Group:
    """The whole screen."""
    now = graph.now
    head = Text.assemble(
        ("dpipes-tap top", "bold"),
        f"  {clock(now) if now else '--'}  taps: {', '.join(t.node or t.endpoint for t in source.targets)}  ",
        f"events: {graph.events:,}  ",
        (f"dropped: {source.dropped:,}", "bold red" if source.dropped else ""),
        f"  malformed: {source.malformed:,}  sort: {state.sort}",
        f"  pipeline: {state.pipeline}" if state.pipeline else "",
        "   [q]uit [s]ort [p]ipeline [a]ll",
    )
    nodes = Table(title="nodes", expand=True)
    for col in ("node", "events", "events/s", "dropped"):
        nodes.add_column(col)
    for n in graph.nodes.values():
        nodes.add_row(n.name, f"{n.events:,}", f"{n.rate.per_s(now)[0]:.1f}", f"{n.dropped:,}")
    pipelines = Table(title="pipelines", expand=True)
    for col in ("pipeline", "stage", "program", "node", "state"):
        pipelines.add_column(col)
    shown = [p for p in graph.pipelines.values() if state.pipeline in (None, p.id)]
    for p in shown:
        state_text = "failed: " + p.failed if p.failed else ("done" if p.done else "running")
        pipelines.add_row(p.id, "", p.text or "", p.entry, state_text)
        for s in sorted(p.stages.values(), key=lambda s: s.index):
            style = "red" if s.code not in (None, 0) else ""
            pipelines.add_row("", str(s.index), " ".join(s.argv) or "?", s.node, Text(s.status, style=style))
    edges = Table(title="edges", expand=True)
    for col in ("from", "to", "kind", "msgs/s", "bytes/s", "messages", "bytes", "credit"):
        edges.add_column(col)
    drilled = graph.pipelines.get(state.pipeline) if state.pipeline is not None else None
    chosen = graph.edges_of(drilled) if drilled is not None else list(graph.edges.values())
    keyed = {"rate": lambda e: -e.rate.per_s(now)[1], "bytes": lambda e: -e.bytes, "name": lambda e: (e.src, e.dst)}
    for e in sorted(chosen, key=keyed[state.sort])[:30]:
        msgs, bps = e.rate.per_s(now)
        credit = e.ended or ("blocked" if e.credit <= 0 else human_bytes(e.credit))
        edges.add_row(
            e.src,
            e.dst,
            e.kind,
            f"{msgs:.1f}",
            f"{human_bytes(bps)}/s",
            f"{e.messages:,}",
            human_bytes(e.bytes),
            credit,
        )
    recent = Text("\n".join(list(graph.pipes)[-RECENT_LINES:]) or "(none yet)")
    errors = Text("\n".join(list(graph.errors)[-RECENT_LINES:]) or "(none)", style="red")
    return Group(
        head,
        nodes,
        pipelines,
        edges,
        Text("Pipes messages", style="bold"),
        recent,
        Text("errors", style="bold"),
        errors,
    )


def plain_lines(graph: Graph, source: TapSource) -> list[str]:
    """The same content as lines, for a standard output that is not a terminal."""
    now = graph.now
    out = [
        f"-- {clock(now) if now else '--'} events {graph.events} dropped {source.dropped} malformed {source.malformed}"
    ]
    for n in graph.nodes.values():
        out.append(f"node {n.name}: {n.events} events, {n.rate.per_s(now)[0]:.1f}/s, dropped {n.dropped}")
    out += graph.list_lines()
    out += [f"pipes {m}" for m in list(graph.pipes)[-RECENT_LINES:]]
    out += [f"error {m}" for m in list(graph.errors)[-RECENT_LINES:]]
    return out


@contextlib.contextmanager
def _keys(loop: asyncio.AbstractEventLoop, on_key: Any) -> Iterator[None]:
    """Deliver single key presses from a terminal's standard input to ``on_key``."""
    fd = sys.stdin.fileno()
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    loop.add_reader(fd, lambda: on_key(os.read(fd, 32).decode(errors="replace")))
    try:
        yield
    finally:
        loop.remove_reader(fd)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def run_top(source: TapSource, *, console: Console | None = None) -> None:
    """Show the live view until ``q`` (or the caller cancels)."""
    from dpipes.nodes.tap.verbs import decoded_events

    graph, state = Graph(), TopState()
    loop = asyncio.get_running_loop()
    quit_now = asyncio.Event()

    def on_key(keys: str) -> None:
        for key in keys:
            state.key(key, graph)
        if state.quit:
            quit_now.set()

    async def feed() -> None:
        async for event, decoded, missed in decoded_events(source):
            graph.take(event, decoded, missed)

    feeder = asyncio.create_task(feed(), name="dpipes-tap top reader")
    console = console or Console()
    try:
        with (
            _keys(loop, on_key),
            Live(view(graph, source, state), console=console, screen=True, auto_refresh=False) as live,
        ):
            while not quit_now.is_set():
                try:
                    await asyncio.wait_for(quit_now.wait(), 1 / TOP_REFRESH_PER_S)
                except TimeoutError:
                    pass
                if feeder.done():
                    feeder.result()
                live.update(view(graph, source, state), refresh=True)
    finally:
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder


__all__ = ["TopState", "edge_text", "plain_lines", "run_top", "view"]
