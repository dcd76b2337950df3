"""The verbs of ``dpipes-tap``, as async generators of :class:`Out` lines the front end prints.

Each verb reads a :class:`~dpipes.nodes.tap.source.TapSource` (or a recording) and yields what a
person or a program should see: ``Out(text)`` for standard output, ``Out(text, notice=True)``
for standard error (such as "dropped 12 events": the tap is lossy and says so). Stopping is the
caller's business (``--count``, a signal, the end of a recording).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dpipes.bus.errors import DpipesError
from dpipes.bus.tap import TapEvent
from dpipes.nodes.tap import record as recording
from dpipes.nodes.tap.graph import Graph
from dpipes.nodes.tap.rates import RATE_KINDS, Window, bw_text, hz_text
from dpipes.nodes.tap.source import TapSource, Target
from dpipes.nodes.tap.view import Decoder, Filter, clock, escape, field, line, matches_what, pipes_text

log = logging.getLogger(__name__)

REPORT_INTERVAL_S = 1.0  # hz, bw, list and plain top print a report this often
PIPES_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclasses.dataclass(frozen=True, slots=True)
class Out:
    """A line of output; a notice goes to standard error."""

    text: str
    notice: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Selection:
    """Which events a verb shows: ``WHAT`` arguments (any of them) and a ``--filter``."""

    what: Sequence[str] = ()
    filter: Filter | None = None

    def __call__(self, decoded: Mapping[str, Any]) -> bool:
        if self.what and not any(matches_what(decoded, w) for w in self.what):
            return False
        return self.filter is None or self.filter(decoded)


def dropped_notice(missed: int, total: int, as_json: bool) -> Out:
    """The notice of events the tap missed."""
    if as_json:
        return Out(json.dumps({"dropped": missed, "dropped_total": total}), notice=True)
    return Out(f"-- dropped {missed:,} events ({total:,} in all): the tap is lossy and did not keep up", notice=True)


async def decoded_events(source: TapSource) -> AsyncIterator[tuple[TapEvent, dict[str, Any], int]]:
    """Each event of ``source``, decoded, with the number of events missed just before it."""
    decoder = Decoder()
    seen = source.dropped
    async for event in source:
        missed, seen = source.dropped - seen, source.dropped
        yield event, decoder.decode(event), missed


def render(decoded: Mapping[str, Any], event: TapEvent, *, fields: Sequence[str], raw: bool, as_json: bool) -> str:
    """An event as ``echo`` prints it."""
    if raw:
        wire = event.to_map()
        for key in ("sample", "schema"):
            if wire.get(key) is not None:
                wire[key] = wire[key].hex()
        return json.dumps(wire, ensure_ascii=False, default=str)
    if fields:
        values = [field(decoded, f) for f in fields]
        if as_json:
            return json.dumps(dict(zip(fields, values, strict=True)), ensure_ascii=False, default=str)
        return "\t".join(
            escape(v) if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str) for v in values
        )
    if as_json:
        return json.dumps(decoded, ensure_ascii=False, default=str)
    return line(decoded)


async def echo(
    source: TapSource,
    select: Selection,
    *,
    fields: Sequence[str] = (),
    raw: bool = False,
    as_json: bool = False,
    count: int | None = None,
) -> AsyncIterator[Out]:
    """``dpipes-tap echo``: every selected event, decoded; ``count`` of them at most."""
    shown = 0
    async for event, decoded, missed in decoded_events(source):
        if missed:
            yield dropped_notice(missed, source.dropped, as_json)
        if not select(decoded):
            continue
        yield Out(render(decoded, event, fields=fields, raw=raw, as_json=as_json))
        shown += 1
        if count is not None and shown >= count:
            return


def _stage_of(addr: str) -> tuple[str, int] | None:
    endpoint = addr.partition("/")[2]
    pid, dot, index = endpoint.rpartition(".")
    return (pid, int(index)) if dot and index.isdigit() else None


async def pipes(
    source: TapSource,
    *,
    pipeline: str | None = None,
    stage: int | None = None,
    level: str | None = None,
    as_json: bool = False,
    count: int | None = None,
) -> AsyncIterator[Out]:
    """``dpipes-tap pipes``: every Pipes message of every stage the taps see, one line each."""
    least = PIPES_LEVELS.index(level.lower()) if level else 0
    shown = 0
    async for _event, d, missed in decoded_events(source):
        if missed:
            yield dropped_notice(missed, source.dropped, as_json)
        if d["kind"] != "PIPES":
            continue
        where = _stage_of(d["src"])
        if where is None or (pipeline and where[0] != pipeline) or (stage is not None and where[1] != stage):
            continue
        for frame in d.get("messages") or ():
            message = frame.get("message", frame) if isinstance(frame, dict) else {}
            params = message.get("params") if isinstance(message, dict) else None
            if least and not (
                message.get("method") == "log"
                and isinstance(params, dict)
                and str(params.get("level", "")).lower() in PIPES_LEVELS[least:]
            ):
                continue
            if as_json:
                text = json.dumps(
                    {"time": d["time"], "node": d["node"], "pipeline": where[0], "stage": where[1], "message": frame},
                    ensure_ascii=False,
                    default=str,
                )
            else:
                text = (
                    f"{clock(d['time'])} {where[0]} stage {where[1]}@{d['src'].partition('/')[0]}: {pipes_text(frame)}"
                )
            yield Out(text)
            shown += 1
            if count is not None and shown >= count:
                return


async def _reports(
    source: TapSource,
    take: Callable[[TapEvent, dict[str, Any], int], None],
    report: Callable[[], list[Out]],
    *,
    interval: float = REPORT_INTERVAL_S,
    reports: int | None = None,
) -> AsyncIterator[Out]:
    """Feed every event to ``take`` while yielding ``report()`` every ``interval``."""

    async def feed() -> None:
        async for event, decoded, missed in decoded_events(source):
            take(event, decoded, missed)

    feeder = asyncio.create_task(feed(), name="dpipes-tap reader")
    made = 0
    try:
        while reports is None or made < reports:
            done, _ = await asyncio.wait({feeder}, timeout=interval)
            if done:
                feeder.result()  # the reader failed: raise its error
                return
            for out in report():
                yield out
            made += 1
    finally:
        feeder.cancel()
        try:
            await feeder
        except asyncio.CancelledError:
            pass


async def rates(
    source: TapSource,
    whats: Sequence[str],
    *,
    bandwidth: bool,
    window: int,
    select: Filter | None = None,
    as_json: bool = False,
    reports: int | None = None,
) -> AsyncIterator[Out]:
    """``dpipes-tap hz`` (``bandwidth`` False) or ``bw``: one report line per WHAT every second."""
    windows = {what: Window(window) for what in whats}
    dropped = [0]

    def take(event: TapEvent, decoded: dict[str, Any], missed: int) -> None:
        dropped[0] += missed
        if decoded["kind"] not in RATE_KINDS or (select is not None and not select(decoded)):
            return
        for what, w in windows.items():
            if matches_what(decoded, what):
                w.add(event.t, event.size)

    def report() -> list[Out]:
        out = []
        if dropped[0]:
            out.append(dropped_notice(dropped[0], source.dropped, as_json))
            dropped[0] = 0
        for what, w in windows.items():
            stats = w.bw() if bandwidth else w.hz()
            if as_json:
                out.append(Out(json.dumps({"what": what, **(dataclasses.asdict(stats) if stats else {})})))
            else:
                out.append(Out(bw_text(what, stats) if bandwidth else hz_text(what, stats)))  # type: ignore[arg-type]
        return out

    async for out in _reports(source, take, report, reports=reports):
        yield out


async def listing(
    source: TapSource, *, verbose: bool = False, as_json: bool = False, reports: int | None = None
) -> AsyncIterator[Out]:
    """``dpipes-tap list``: pipelines, stages and edges as seen so far, every second."""
    graph = Graph()

    def report() -> list[Out]:
        if as_json:
            return [Out(json.dumps(snapshot(graph), default=str))]
        lines = graph.list_lines(verbose=verbose) or ["(no pipelines seen yet)"]
        if source.dropped:
            lines.append(f"(dropped {source.dropped:,} events)")
        return [Out(f"-- {clock(graph.now or time.time())}"), *(Out(t) for t in lines)]

    async for out in _reports(source, graph.take, report, reports=reports):
        yield out


def snapshot(graph: Graph) -> dict[str, Any]:
    """The graph as one JSON-able map (``list --json``, ``top --json``)."""
    now = graph.now
    return {
        "time": now,
        "events": graph.events,
        "nodes": [
            {"node": n.name, "events": n.events, "events_per_s": n.rate.per_s(now)[0], "dropped": n.dropped}
            for n in graph.nodes.values()
        ],
        "pipelines": [
            {
                "id": p.id,
                "text": p.text,
                "mode": p.mode,
                "failed": p.failed,
                "done": p.done,
                "stages": [dataclasses.asdict(s) for s in sorted(p.stages.values(), key=lambda s: s.index)],
            }
            for p in graph.pipelines.values()
        ],
        "edges": [
            {
                "src": e.src,
                "dst": e.dst,
                "sid": e.sid,
                "kind": e.kind,
                "messages": e.messages,
                "bytes": e.bytes,
                "messages_per_s": e.rate.per_s(now)[0],
                "bytes_per_s": e.rate.per_s(now)[1],
                "credit": e.credit,
                "ended": e.ended,
            }
            for e in graph.edges.values()
        ],
        "pipes": list(graph.pipes)[-10:],
        "errors": list(graph.errors)[-10:],
    }


async def record(source: TapSource, path: Path, select: Selection, *, count: int | None = None) -> AsyncIterator[Out]:
    """``dpipes-tap record FILE``: write every selected event; a notice per second of progress."""
    recorder_meta = {"taps": [dataclasses.asdict(t) for t in source.targets], "sample_bytes": source.sample_bytes}
    written = 0
    last_flush = time.monotonic()
    with recording.Recorder(path, recorder=recorder_meta) as rec:
        try:
            missed_total = 0
            async for event, decoded, missed in decoded_events(source):
                missed_total += missed
                if not select(decoded):
                    continue
                rec.add(event, decoded, missed_total)
                missed_total = 0
                written += 1
                if written == 1:
                    yield Out(f"recording to {path}: events arrive", notice=True)
                if time.monotonic() - last_flush >= recording.RECORD_FLUSH_S:
                    rec.flush()
                    last_flush = time.monotonic()
                    yield Out(f"recorded {written:,} events to {path} (dropped {source.dropped:,})", notice=True)
                if count is not None and written >= count:
                    break
        finally:
            rec.close()
    yield Out(f"recorded {written:,} events to {path} (dropped {source.dropped:,})", notice=True)


async def replay_events(path: Path, *, rate: float = 1.0) -> AsyncIterator[tuple[TapEvent, int]]:
    """The events of a recording with their original timing divided by ``rate`` (0: at once)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    first: float | None = None
    for event, dropped in recording.events(path):
        if first is None:
            first = event.t
        if rate > 0:
            delay = start + (event.t - first) / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the recording's own timing, not a synchronisation
        yield event, dropped


async def replay(
    path: Path,
    select: Selection,
    *,
    rate: float = 1.0,
    fields: Sequence[str] = (),
    raw: bool = False,
    as_json: bool = False,
) -> AsyncIterator[Out]:
    """``dpipes-tap replay FILE``: a recording, printed as ``echo`` printed it live."""
    decoder = Decoder()
    dropped_total = 0
    async for event, dropped in replay_events(path, rate=rate):
        decoded = decoder.decode(event)
        if dropped:
            dropped_total += dropped
            yield dropped_notice(dropped, dropped_total, as_json)
        if select(decoded):
            yield Out(render(decoded, event, fields=fields, raw=raw, as_json=as_json))


PUBLISH_LINGER_MS = 2000  # at the end of a replay, let the last events reach the readers


async def publish(path: Path, endpoint: str, *, rate: float = 1.0) -> AsyncIterator[Out]:
    """``dpipes-tap replay FILE --publish ENDPOINT``: serve a recording as a hub's tap serves events.

    Binds an XPUB at ``endpoint``, waits for a first reader (``dpipes-tap --endpoint ENDPOINT top``,
    ``echo``, ...), then publishes the recorded events, the very bytes the hubs sent, with their
    timing. Readers see the recording's gaps as drops, as they were seen when it was recorded.
    """
    import zmq
    import zmq.asyncio

    from dpipes.bus.tap import TAP_HWM

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.SNDHWM, TAP_HWM)  # a slow reader loses events, as at a hub
    sock.setsockopt(zmq.LINGER, PUBLISH_LINGER_MS)
    try:
        sock.bind(endpoint)
        yield Out(f"replaying {path} on {sock.getsockopt_string(zmq.LAST_ENDPOINT)}: waiting for a reader", notice=True)
        while not (await sock.recv()).startswith(b"\x01"):  # the first subscription
            pass
        sent = 0
        async for event, _dropped in replay_events(path, rate=rate):
            try:
                await sock.send(event.encode(), zmq.NOBLOCK)
            except zmq.Again:
                pass  # lossy, as a hub's tap: the gap in `n` tells the reader
            sent += 1
        yield Out(f"replayed {sent:,} events", notice=True)
    finally:
        sock.close()
        ctx.term()


REPLAY_CONNECT_TIMEOUT_S = 10.0  # a node's tap answers a handshake within a reconnect interval; this is slack
REPLAY_HWM = 100_000  # events queued for the node's tap: a replay at --rate 0 outruns the connection


async def replay_to(path: Path, target: Target, *, rate: float = 1.0) -> AsyncIterator[Out]:
    """``dpipes-tap replay FILE --to NODE``: play a recording onto a node's bus.

    Sends the recorded events up to the node's tap with their timing (see *Replays* in
    :mod:`dpipes.bus.tap`); the hub re-publishes them, marked ``replay``, to whoever reads its tap
    (``dpipes-tap --node NODE top``, ``echo``, ...), beside its own events.

    Raises:
        TapError: the node's tap refused this user's key or uid, or did not answer.
    """
    import zmq
    import zmq.asyncio
    from zmq.utils.monitor import parse_monitor_message

    from dpipes.bus.client import HANDSHAKE_FAILURES
    from dpipes.nodes.tap.source import TapError, use_keys

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.XSUB)  # subscribes to nothing: it only sends up
    sock.setsockopt(zmq.LINGER, PUBLISH_LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, REPLAY_HWM)
    use_keys(sock, target.curve)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILURES)
    try:
        sock.connect(target.endpoint)
        try:
            event = parse_monitor_message(await asyncio.wait_for(monitor.recv_multipart(), REPLAY_CONNECT_TIMEOUT_S))
        except TimeoutError:
            raise TapError(f"the tap of node {target.node} at {target.endpoint} did not answer") from None
        if event["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
            raise TapError(
                f"the tap of node {target.node} at {target.endpoint} refused this replay: it needs a key with the"
                " tap right there (its owner grants it with: dpipes keys trust KEY --tap)"
            )
        yield Out(f"replaying {path} onto node {target.node} ({target.endpoint})", notice=True)
        sent = 0
        async for recorded, _dropped in replay_events(path, rate=rate):
            await sock.send(recorded.encode())
            sent += 1
        yield Out(f"replayed {sent:,} events", notice=True)
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close()
        ctx.term()


def info_lines(path: Path, *, as_json: bool = False) -> list[str]:
    """``dpipes-tap info FILE``: what a recording holds."""
    s = recording.summary(path)
    if as_json:
        return [json.dumps(s, default=str)]
    out = [
        f"file:      {s['file']} ({s['format']}, tap format {s['tap_version']})",
        f"events:    {s['events']:,} (dropped while recording: {s['dropped']:,})",
    ]
    if s["events"]:
        out.append(f"time:      {clock(s['start'])} .. {clock(s['end'])} ({s['duration_s']:.3f} s)")
    out.append(f"data:      {s['data_bytes']:,} bytes")
    out.append("taps:      " + ", ".join(f"{t['node'] or '?'} {t['endpoint']}" for t in s["recorder"].get("taps", [])))
    out.append("by hub:    " + ", ".join(f"{k} {v:,}" for k, v in s["nodes"].items()))
    out.append("by kind:   " + ", ".join(f"{k} {v:,}" for k, v in s["kinds"].items()))
    for edge, e in s["edges"].items():
        out.append(f"edge:      {edge}: {e['messages']:,} messages, {e['bytes']:,} bytes")
    return out


async def nodes_lines(entry_node: str | None, *, as_json: bool = False, insecure: bool = False) -> list[str]:
    """``dpipes-tap nodes``: the nodes the entry node knows, with what they offer and how fresh, and
    the tap ``dpipes-tap`` reads each at (``tap``: ``ipc://`` on this host, else its TCP tap, the
    ``tcp_tap`` column of ``--json``)."""
    from dpipes.nodes import paths, run
    from dpipes.nodes.tap.source import TapError

    keys = None
    if entry_node is None:
        local = paths.local_daemon(paths.runtime_dir())
        if local is None:
            raise TapError("no dpipesd runs on this host: start one, or give --node HOST:PORT")
        entry = local.ipc_endpoint
    elif ":" in entry_node:
        from dpipes.nodes.entry import entry_and_keys

        try:  # over TCP with keys: [NAME@]HOST:PORT, the node's key pinned in known_nodes
            entry, keys = await entry_and_keys(entry_node, insecure=insecure)
        except DpipesError as exc:
            raise TapError(str(exc)) from None
    else:
        entry = paths.node_files(paths.runtime_dir(), entry_node).ipc_endpoint
    try:
        known = await run.known_nodes(entry, keys)
    except DpipesError as exc:
        raise TapError(str(exc)) from None
    rt = paths.runtime_dir()
    rows = []
    for entry_of in known:
        n = entry_of.to_body()
        tap = paths.node_files(rt, n["name"]).tap_sock  # a node of this host is read over ipc, others over TCP
        rows.append({**n, "tap": f"ipc://{tap}" if tap.exists() else n["tap"], "tcp_tap": n["tap"]})
    if as_json:
        return [json.dumps(r) for r in rows]
    table = [("NODE", "ENDPOINT", "TAP", "TCP TAP", "PROGRAMS", "LEARNED FROM", "LAST SEEN", "")]
    for r in rows:
        seen = "now" if r["source"] == "self" else f"{r['last_seen_s']:.1f} s ago"
        table.append(
            (r["name"], r["endpoint"], r["tap"] or "-", r["tcp_tap"] or "-", ",".join(r["programs"]) or "-",
             r["source"], seen, "" if r["up"] else "down")
        )  # fmt: skip
    widths = [max(len(str(r[i])) for r in table) for i in range(len(table[0]))]
    return ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]


async def top_plain(source: TapSource, *, as_json: bool = False, reports: int | None = None) -> AsyncIterator[Out]:
    """``dpipes-tap top`` when standard output is not a terminal: the view as lines every second."""
    from dpipes.nodes.tap.top import plain_lines

    graph = Graph()

    def report() -> list[Out]:
        if as_json:
            return [Out(json.dumps(snapshot(graph), default=str))]
        return [Out(t) for t in plain_lines(graph, source)]

    async for out in _reports(source, graph.take, report, reports=reports):
        yield out
