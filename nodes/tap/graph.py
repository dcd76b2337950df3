"""What the tap has seen, put together: nodes, pipelines, their stages and edges, with rates.

A :class:`Graph` takes decoded events (:mod:`dpipes.nodes.tap.view`) one by one and keeps:

* **pipelines**, from the control conversation (``run`` and its reply: text, stages, nodes,
  argv; ``negotiate``/``start``: a stage's program and where its output goes; ``exit``: its
  status) and, for a run that started before the tap did, from the stage addresses its streams
  use (``<node>/<pipeline>.<index>``);
* **edges**: each data stream (source, destination, stream id) with its data kind, messages and
  bytes, rates over the last ``RATE_WINDOW_S``, its credit state (granted minus spent: the
  sender may send while it is positive; a tap that joined mid-stream sees it only relatively)
  and whether it ended (EOF, CANCEL);
* **nodes**: events per hub, their rate, and what the reader missed;
* the recent Pipes messages and errors (failed replies, ERRORs, stages that failed).

Everything is bounded: finished pipelines beyond ``MAX_PIPELINES`` and idle edges beyond
``MAX_EDGES`` are forgotten oldest first. No clock of its own: times are the events'.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from dpipes.bus.codec import INITIAL_CREDIT_BYTES, MESSAGE_CREDIT_BYTES
from dpipes.nodes.tap.view import pipes_text

if TYPE_CHECKING:
    from dpipes.bus.tap import TapEvent

log = logging.getLogger(__name__)

RATE_WINDOW_S = 2.0  # rates shown are over this much of the recent past
MAX_PIPELINES = 64  # pipelines remembered
MAX_EDGES = 1024  # streams remembered
MAX_RECENT = 50  # recent Pipes messages and errors kept
MAX_RATE_SAMPLES = 100_000  # per edge, bounds memory at any message rate

DATA_KINDS = frozenset({"BYTES", "OBJECTS", "ARROW", "STDERR", "PIPES"})
_STAGE_ADDR = re.compile(r"^([^/]+)/([0-9A-Za-z_-]+)\.(\d+)$")


class Rate:
    """Messages and bytes over the last ``RATE_WINDOW_S`` seconds of event time."""

    __slots__ = ("_samples",)

    def __init__(self) -> None:
        self._samples: collections.deque[tuple[float, int]] = collections.deque(maxlen=MAX_RATE_SAMPLES)

    def add(self, t: float, size: int) -> None:
        self._samples.append((t, size))

    def per_s(self, now: float) -> tuple[float, float]:
        """(messages/s, bytes/s) over the window that ends at ``now``."""
        samples = self._samples
        while samples and samples[0][0] < now - RATE_WINDOW_S:
            samples.popleft()
        return len(samples) / RATE_WINDOW_S, sum(s for _t, s in samples) / RATE_WINDOW_S


@dataclasses.dataclass
class Edge:
    """One data stream."""

    src: str
    dst: str
    sid: int
    kind: str = ""
    messages: int = 0
    bytes: int = 0
    credit: int = INITIAL_CREDIT_BYTES  # granted minus spent, as far as the tap saw
    ended: str = ""  # "", "eof", "cancelled: reason"
    last: float = 0.0
    rate: Rate = dataclasses.field(default_factory=Rate)


@dataclasses.dataclass
class Stage:
    """One stage of a pipeline."""

    index: int
    node: str = ""
    argv: tuple[str, ...] = ()
    addr: str = ""
    stdout_to: str = ""
    status: str = "running"
    code: int | None = None


@dataclasses.dataclass
class Pipeline:
    """One run."""

    id: str
    text: str = ""
    entry: str = ""
    client: str = ""
    mode: str = ""
    first: float = 0.0
    last: float = 0.0
    stages: dict[int, Stage] = dataclasses.field(default_factory=dict)
    failed: str = ""

    @property
    def done(self) -> bool:
        return bool(self.failed) or (bool(self.stages) and all(s.code is not None for s in self.stages.values()))


@dataclasses.dataclass
class NodeSeen:
    """One hub, as its tap showed it."""

    name: str
    events: int = 0
    last: float = 0.0
    dropped: int = 0
    rate: Rate = dataclasses.field(default_factory=Rate)


class Graph:
    """Pipelines, edges and nodes as the tap shows them; fed with decoded events."""

    def __init__(self) -> None:
        self.pipelines: collections.OrderedDict[str, Pipeline] = collections.OrderedDict()
        self.edges: collections.OrderedDict[tuple[str, str, int], Edge] = collections.OrderedDict()
        self.nodes: dict[str, NodeSeen] = {}
        self.pipes: collections.deque[str] = collections.deque(maxlen=MAX_RECENT)
        self.errors: collections.deque[str] = collections.deque(maxlen=MAX_RECENT)
        self.now = 0.0
        self.events = 0
        self._runs: dict[tuple[str, int], str] = {}  # (client, seq) of a `run` request -> its text

    def note_dropped(self, node: str, missed: int) -> None:
        """The reader missed ``missed`` events of hub ``node``."""
        self._node(node).dropped += missed

    def take(self, event: TapEvent, decoded: dict[str, Any], missed: int) -> None:
        """One event as a tap reader hands it over: what was missed before it, then the event."""
        if missed:
            self.note_dropped(event.node, missed)
        self.feed(decoded)

    def _node(self, name: str) -> NodeSeen:
        seen = self.nodes.get(name)
        if seen is None:
            seen = self.nodes[name] = NodeSeen(name)
        return seen

    def pipeline(self, pid: str, t: float) -> Pipeline:
        """The pipeline ``pid``, made when first heard of."""
        p = self.pipelines.get(pid)
        if p is None:
            p = self.pipelines[pid] = Pipeline(pid, first=t)
            self._forget_pipelines()
        p.last = max(p.last, t)
        return p

    def _forget_pipelines(self) -> None:
        while len(self.pipelines) > MAX_PIPELINES:
            victim = next((k for k, p in self.pipelines.items() if p.done), next(iter(self.pipelines)))
            del self.pipelines[victim]

    def _stage_of(self, addr: str, t: float) -> Stage | None:
        m = _STAGE_ADDR.match(addr)
        if m is None:
            return None
        p = self.pipeline(m[2], t)
        stage = p.stages.get(int(m[3]))
        if stage is None:
            stage = p.stages[int(m[3])] = Stage(int(m[3]), node=m[1], addr=addr)
        return stage

    def feed(self, d: Mapping[str, Any]) -> None:
        """Take one decoded event."""
        t, kind = d["time"], d["kind"]
        self.now = max(self.now, t)
        self.events += 1
        node = self._node(d["node"])
        node.events += 1
        node.last = t
        node.rate.add(t, d["size"])
        for addr in (d["src"], d["dst"]):
            self._stage_of(addr, t)
        if kind in DATA_KINDS:
            edge = self._edge(d["src"], d["dst"], d["sid"])
            edge.kind = edge.kind or kind
            edge.messages += 1
            edge.bytes += d["size"]
            edge.credit -= d["size"] + MESSAGE_CREDIT_BYTES
            edge.last = t
            edge.rate.add(t, d["size"])
            if kind == "PIPES":
                for m in d.get("messages") or ():
                    self.pipes.append(f"{d['src']}: {pipes_text(m)}")
        elif kind == "CREDIT":
            self._edge(d["dst"], d["src"], d["sid"]).credit += int(d.get("credit") or 0)
        elif kind == "EOF":
            self._edge(d["src"], d["dst"], d["sid"]).ended = "eof"
        elif kind == "CANCEL":  # from either end: the receiver's goes against the data
            key = (d["dst"], d["src"], d["sid"])
            edge = self.edges[key] if key in self.edges else self._edge(d["src"], d["dst"], d["sid"])
            edge.ended = f"cancelled: {d.get('reason', '')}"
        elif kind == "ERROR":
            self.errors.append(f"{d['node']}: [{d.get('code')}] {d.get('message')}")
        elif kind == "REQUEST":
            self._request(d, t)
        elif kind == "REPLY":
            self._reply(d, t)

    def _edge(self, src: str, dst: str, sid: int) -> Edge:
        key = (src, dst, sid)
        edge = self.edges.get(key)
        if edge is None:
            edge = self.edges[key] = Edge(src, dst, sid)
            while len(self.edges) > MAX_EDGES:
                self.edges.popitem(last=False)
        return edge

    def _request(self, d: Mapping[str, Any], t: float) -> None:
        body, method = d.get("body") or {}, d.get("method")
        if not isinstance(body, dict):
            return
        if method == "run":
            self._runs[(d["src"], d["seq"])] = str(body.get("pipeline", ""))
            while len(self._runs) > MAX_PIPELINES:
                del self._runs[next(iter(self._runs))]
            return
        pid = body.get("pipeline")
        if not isinstance(pid, str) or not pid:
            return
        p = self.pipeline(pid, t)
        if method in ("negotiate", "start", "exit") and isinstance(body.get("stage"), int):
            stage = p.stages.setdefault(body["stage"], Stage(body["stage"]))
            if method == "negotiate":
                stage.argv = tuple(body.get("argv") or ())
                stage.node = stage.node or d["dst"].partition("/")[0]
                p.mode = p.mode or str(body.get("mode", ""))
            elif method == "start":
                stage.stdout_to = str(body.get("stdout_to", ""))
            else:
                stage.code = body.get("code")
                stage.status = str(body.get("status", ""))
                stage.node = stage.node or str(body.get("node", ""))
                if body.get("error") or (body.get("code") and not body.get("sigpipe") and not body.get("cancelled")):
                    self.errors.append(
                        f"{p.id} stage {stage.index}@{stage.node}: {stage.status}"
                        + (f": {body.get('error')}" if body.get("error") else "")
                        + (f" -- {str(body.get('stderr_tail', '')).strip()[-200:]}" if body.get("stderr_tail") else "")
                    )
        elif method == "failed":
            p.failed = str(body.get("error", "failed"))
            self.errors.append(f"{p.id}: {p.failed}")

    def _reply(self, d: Mapping[str, Any], t: float) -> None:
        if not d.get("ok"):
            self.errors.append(f"{d['src']}: {d.get('method') or 'request'} failed [{d.get('code')}]: {d.get('error')}")
            return
        text = self._runs.pop((d["dst"], d["seq"]), None)
        body = d.get("body") or {}
        if d.get("method") != "run" or not isinstance(body, dict) or not body.get("pipeline"):
            return
        p = self.pipeline(str(body["pipeline"]), t)
        p.text = text or p.text
        p.client = d["dst"]
        p.entry = d["src"].partition("/")[0]
        for s in body.get("stages") or ():
            stage = p.stages.setdefault(s["index"], Stage(s["index"]))
            stage.node, stage.argv, stage.addr = s.get("node", ""), tuple(s.get("argv") or ()), s.get("addr", "")

    # -- views -----------------------------------------------------------------------------

    def edges_of(self, p: Pipeline) -> list[Edge]:
        """The data streams from or to the stages of ``p``."""
        return [e for e in self.edges.values() if _pid(e.src) == p.id or _pid(e.dst) == p.id]

    def list_lines(self, *, verbose: bool = False) -> list[str]:
        """``dpipes-tap list``: each pipeline, its stages, and its edges with rates and credit."""
        out = []
        for p in self.pipelines.values():
            state = "failed: " + p.failed if p.failed else ("done" if p.done else "running")
            out.append(
                f"pipeline {p.id} ({state})" + (f": {p.text}" if p.text else "") + (f" [{p.mode}]" if p.mode else "")
            )
            for stage in sorted(p.stages.values(), key=lambda s: s.index):
                argv = " ".join(stage.argv) or "?"
                out.append(f"  stage {stage.index} {argv}@{stage.node or '?'}  {stage.status}")
            for e in self.edges_of(p):
                out.append("  " + edge_text(e, self.now))
        if verbose or not self.pipelines:
            loose = [e for e in self.edges.values() if _pid(e.src) is None and _pid(e.dst) is None]
            for e in loose:
                out.append(edge_text(e, self.now))
        return out


def _pid(addr: str) -> str | None:
    m = _STAGE_ADDR.match(addr)
    return m[2] if m else None


def edge_text(e: Edge, now: float) -> str:
    """One edge: its ends, kind, totals, rates, credit and end."""
    from dpipes.nodes.tap.rates import human_bytes

    msgs, bps = e.rate.per_s(now)
    state = e.ended or ("blocked (no credit)" if e.credit <= 0 else f"credit {human_bytes(e.credit)}")
    return (
        f"{e.src} -> {e.dst} sid {e.sid} {e.kind or '-'}: {e.messages} msgs {human_bytes(e.bytes)}, "
        f"{msgs:.1f} msgs/s {human_bytes(bps)}/s, {state}"
    )
