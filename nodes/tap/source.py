"""Where the taps are, and one SUB socket that reads them: events in, gaps and garbage counted.

A node's tap endpoint (its hub's XPUB) is ``ipc://<runtime dir>/<name>-tap.sock`` for a daemon
(:mod:`dpipes.nodes.paths`), ``local-tap.sock`` for the host's local daemon. :func:`resolve`
finds the endpoints to read: the local daemon's by default; ``--node`` NAME, HOST:PORT (the
node's bus endpoint: its name comes from an ``info`` call) or a tap endpoint itself; ``--all``:
every node the entry node knows (its ``info`` reply) whose tap is reachable from this host;
``--endpoint``: any tap endpoint (a hub's, or a replay's ``--publish``).

:class:`TapSource` connects one SUB socket to them all and yields decoded events. It never asks
the hubs to wait: a slow reader loses events at its socket's queue (``RCVHWM``), and the source
counts them from the gaps in each hub's event numbers (``dropped``), as it counts events it
could not decode (``malformed``, logged once per ``MALFORMED_LOG_INTERVAL_S``). When it reads
several hubs, a message seen by two of them (sent from one node to another) is yielded once, at
its *home* hub when that hub is read, else at the other: the hub of its source node, but for
answers (``REPLY``, ``CREDIT``, ``EOF_ACK``) the hub of their destination, so that a request and
its reply, or a stream's data and its credit, come from one hub in the order it routed them.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from dpipes.bus.codec import split_addr
from dpipes.bus.errors import DpipesError
from dpipes.bus.tap import DEFAULT_SAMPLE_BYTES, MAX_SAMPLE_BYTES, SAMPLE_TOPIC, TAP_HWM, TapEvent, decode_event
from dpipes.bus.tap import TapDecodeError as TapDecodeError

log = logging.getLogger(__name__)

MALFORMED_LOG_INTERVAL_S = 10.0  # a flood of bad events logs one line per interval, not one each
DRAIN_BATCH_EVENTS = 512  # events read per wake-up before yielding to the loop


ANSWER_KINDS = frozenset({"REPLY", "CREDIT", "EOF_ACK"})
"""Answers, shown at their destination's hub: the hub that saw the request or the stream's data."""


class TapError(DpipesError):
    """No tap to read: no daemon, an unknown node, an endpoint that is not there."""


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One tap to read: the node's name ("" when not known yet) and its tap endpoint."""

    node: str
    endpoint: str


def _tap_of(runtime: Path, name: str) -> str | None:
    from dpipes.nodes.paths import node_files

    sock = node_files(runtime, name).tap_sock
    return f"ipc://{sock}" if sock.exists() else None


async def resolve(
    node: str | None = None,
    *,
    all: bool = False,
    runtime: Path | None = None,
    endpoint: str | None = None,
    insecure: bool = False,
) -> list[Target]:
    """The taps to read for ``--node``/``--all``/``--endpoint`` (see the module docstring).

    Raises:
        TapError: nothing to read, with what to do about it.
    """
    from dpipes.nodes import paths, run
    from dpipes.nodes.entry import EntryKeys, entry_and_keys

    if endpoint is not None:
        if not endpoint.startswith(("ipc://", "tcp://")):
            raise TapError(f"bad tap endpoint {endpoint!r}: write ipc://PATH or tcp://HOST:PORT")
        return [Target("", endpoint)]

    try:
        runtime = runtime or paths.runtime_dir()
    except (OSError, DpipesError) as exc:
        raise TapError(f"no runtime directory: {exc}") from None
    entry: str
    keys: EntryKeys | None = None
    if node is None:
        local = paths.local_daemon(runtime)
        if local is None:
            raise TapError(f"no dpipesd runs on this host (runtime directory {runtime}): start one, or give --node")
        if not all:
            return [Target(local.name, local.tap_endpoint)]
        entry = local.ipc_endpoint
    elif node.startswith(("ipc://", "tcp://")) and node.endswith("-tap.sock"):
        return [Target("", node)]
    elif ":" in node or node.startswith("ipc://"):
        try:  # over TCP with keys: [NAME@]HOST:PORT, the node's key pinned in known_nodes
            entry, keys = await entry_and_keys(node, insecure=insecure)
        except DpipesError as exc:
            raise TapError(str(exc)) from None
    else:
        tap = _tap_of(runtime, node)
        if tap is None:
            raise TapError(f"no tap of node {node!r} in {runtime}: is its dpipesd running on this host?")
        if not all:
            return [Target(node, tap)]
        entry = paths.node_files(runtime, node).ipc_endpoint
    try:
        known = await run.known_nodes(entry, keys)
    except DpipesError as exc:
        raise TapError(str(exc)) from None
    targets, unreachable = [], []
    for entry_node in known:
        if not (all or entry_node.source == "self") or not entry_node.up:
            continue
        tap = _tap_of(runtime, entry_node.name)
        if tap is None:
            unreachable.append(entry_node.name)
        else:
            targets.append(Target(entry_node.name, tap))
    if unreachable:
        log.warning("no tap reachable from this host for node(s) %s (taps listen on ipc only)", ", ".join(unreachable))
    if not targets:
        raise TapError(f"no tap reachable for the node(s) at {entry}: run dpipes-tap on their host")
    return targets


class Gaps:
    """Counts the events a reader missed, from each hub's consecutive event numbers."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self.dropped = 0
        self.by_node: dict[str, int] = {}

    def note(self, node: str, n: int) -> int:
        """Take event ``n`` of hub ``node``; the number of its events missed just before it."""
        last = self._last.get(node)
        self._last[node] = n
        if last is None or n <= last:  # the first event seen, or the hub restarted
            return 0
        missed = n - last - 1
        if missed:
            self.dropped += missed
            self.by_node[node] = self.by_node.get(node, 0) + missed
        return missed


class TapSource:
    """Reads tap events from one or more hubs; ``async with``, then ``async for event in source``.

    Args:
        targets: the taps (from :func:`resolve`).
        sample_bytes: the payload sample size to ask the hubs for.
        hwm: events queued in this process before the hubs drop them for it.
    """

    def __init__(self, targets: Sequence[Target], *, sample_bytes: int = DEFAULT_SAMPLE_BYTES, hwm: int = TAP_HWM):
        if not targets:
            raise TapError("no tap to read")
        self.targets = list(targets)
        self.sample_bytes = max(0, min(sample_bytes, MAX_SAMPLE_BYTES))
        self._hwm = hwm
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._raw: zmq.Socket[Any] | None = None
        self.gaps = Gaps()
        self.malformed = 0
        self.received = 0
        self._malformed_logged = 0.0
        self._hubs = {t.node for t in self.targets if t.node}
        self._batch: collections.deque[bytes] = collections.deque()

    @property
    def dropped(self) -> int:
        """Events the hubs published that this reader missed."""
        return self.gaps.dropped

    async def __aenter__(self) -> TapSource:
        self._ctx = zmq.asyncio.Context()
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)  # a tap owes nobody anything at exit
        sock.setsockopt(zmq.RCVHWM, self._hwm)  # bounded memory: past it the hub drops, and we count
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # an event is far smaller; a bigger one is not a tap's
        for target in self.targets:
            sock.connect(target.endpoint)
        sock.subscribe(b"")
        if self.sample_bytes != DEFAULT_SAMPLE_BYTES:
            sock.subscribe(SAMPLE_TOPIC + str(self.sample_bytes).encode())
        self._sock = sock
        self._raw = zmq.Socket.shadow(sock.underlying)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the socket and context. Idempotent."""
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __aiter__(self) -> AsyncIterator[TapEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[TapEvent]:
        while True:
            event = await self.next()
            if event is not None:
                yield event

    async def next(self, timeout: float | None = None) -> TapEvent | None:
        """The next event; None when none came within ``timeout`` seconds (None: wait for one).

        Cancelling it loses nothing: what was read and not yet returned stays for the next call.
        """
        assert self._sock is not None and self._raw is not None, "use 'async with TapSource(...)'"
        while True:
            while self._batch:
                event = self._take(self._batch.popleft())
                if event is not None:
                    return event
            for _ in range(DRAIN_BATCH_EVENTS):
                try:
                    self._batch.append(self._raw.recv(zmq.NOBLOCK, copy=True))
                except zmq.Again:
                    break
            if self._batch:
                continue
            if not await self._sock.poll(None if timeout is None else int(timeout * 1000)):  # POLLIN
                return None

    def _take(self, data: bytes) -> TapEvent | None:
        try:
            event = decode_event(data)
        except TapDecodeError as exc:
            self.malformed += 1
            now = time.monotonic()
            if now - self._malformed_logged >= MALFORMED_LOG_INTERVAL_S:
                self._malformed_logged = now
                log.warning("dropped a malformed tap event (%d so far): %s", self.malformed, exc)
            return None
        self.received += 1
        self.gaps.note(event.node, event.n)
        self._hubs.add(event.node)
        if len(self.targets) > 1:
            src, dst = split_addr(event.src)[0], split_addr(event.dst)[0]
            home = dst if event.kind in ANSWER_KINDS else src
            if event.node != home and home in self._hubs:
                return None  # the hub of its home node shows it
        return event
