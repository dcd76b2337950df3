"""Where the taps are, and one SUB socket that reads them: events in, gaps and garbage counted.

A node's tap endpoint (its hub's XPUB) is ``ipc://<runtime dir>/<name>-tap.sock`` for a daemon
(:mod:`dpipes.nodes.paths`), ``local-tap.sock`` for the host's local daemon, and a TCP endpoint
for taps on other hosts (the ``tap`` of the node in an ``info`` reply). :func:`resolve` finds
the endpoints to read: the local daemon's by default; ``--node`` NAME, HOST:PORT (the node's bus
endpoint: its name comes from an ``info`` call) or a tap endpoint itself; ``--all``: every node
the entry node knows (its ``info`` reply, the node's directory); ``--endpoint``: any tap endpoint
(a hub's, or a replay's ``--to ENDPOINT``). A node of this host is read over ``ipc://``, any other
over TCP: with CURVE when this user pinned the node's key (``dpipes keys pin``), this user's
client key then needing the ``tap`` right on that node; in plain TCP otherwise, as the node's
bus is reached.

:class:`TapSource` connects one SUB socket to them all and yields decoded events, one per
message: a batch event (the members of a ``BATCH``, one event on the wire) is yielded as its
members' events, each numbered as the hub numbered it. It never asks the hubs to wait: a slow
reader loses events at its socket's queue (``RCVHWM``), and the source counts them from the gaps
in each hub's event numbers (``dropped``), as it counts events it could not decode
(``malformed``, logged once per ``MALFORMED_LOG_INTERVAL_S``; an event of a newer tap format
among them, named by its version). When it reads
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

from dpipes.bus.auth import ClientCurve
from dpipes.bus.codec import split_addr
from dpipes.bus.errors import DpipesError, KeyFileError, TrustFileError
from dpipes.bus.keyring import Keyring
from dpipes.bus.tap import (
    DEFAULT_SAMPLE_BYTES,
    MAX_SAMPLE_BYTES,
    SAMPLE_TOPIC,
    TAP_HWM,
    TapBatch,
    TapEvent,
    decode_wire,
)
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
    """One tap to read: the node's name ("" when not known yet), its tap endpoint, and the keys to
    read a TCP tap with CURVE (None: plain)."""

    node: str
    endpoint: str
    curve: ClientCurve | None = None


def _tap_of(runtime: Path, name: str) -> str | None:
    from dpipes.nodes.paths import node_files

    sock = node_files(runtime, name).tap_sock
    return f"ipc://{sock}" if sock.exists() else None


def client_curve(node: str, keyring: Keyring | None = None) -> ClientCurve | None:
    """CURVE keys to read ``node``'s TCP tap with: this user's client pair and the key pinned for
    ``node`` in known_nodes; None when it is not pinned.

    Raises:
        TapError: the key files cannot be read.
    """
    ring = keyring if keyring is not None else Keyring()
    try:
        key = ring.known().key_for(node)
        return ClientCurve(ring.client()[0], key) if key is not None else None
    except (KeyFileError, TrustFileError, OSError) as exc:
        raise TapError(f"cannot read the keys to tap node {node!r}: {exc}") from None


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
    only: str | None = None  # the one node to read; None: every node (``--all``)
    itself = False  # ...or the entry node itself, whatever its name
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
        itself = not all
    elif (tap := _tap_of(runtime, node)) is not None:
        if not all:
            return [Target(node, tap)]
        entry = paths.node_files(runtime, node).ipc_endpoint
    else:  # a node of another host: the local daemon's directory knows its TCP tap
        local = paths.local_daemon(runtime)
        if local is None:
            raise TapError(f"no tap of node {node!r} in {runtime}, and no dpipesd here to ask: give --node HOST:PORT")
        entry, only = local.ipc_endpoint, None if all else node
    try:
        known = await run.known_nodes(entry, keys)
    except DpipesError as exc:
        raise TapError(str(exc)) from None
    targets, unreachable = [], []
    for entry_node in known:
        if (itself and entry_node.source != "self") or only not in (None, entry_node.name) or not entry_node.up:
            continue
        target = _target(runtime, entry_node.name, entry_node.tap, insecure=insecure)
        if target is None:
            unreachable.append(entry_node.name)
        else:
            targets.append(target)
    if unreachable:
        log.warning("no tap reachable from this host for node(s) %s (no TCP tap known)", ", ".join(unreachable))
    if not targets:
        raise TapError(f"no tap reachable for the node(s) at {entry}: run dpipes-tap on their host")
    return targets


def _target(runtime: Path, node: str, tcp_tap: str, *, insecure: bool = False) -> Target | None:
    """How to read ``node``: over ``ipc://`` when it runs here, else at its TCP tap ``tcp_tap``
    (plain with ``insecure``, else with CURVE when its key is pinned)."""
    tap = _tap_of(runtime, node)
    if tap is not None:
        return Target(node, tap)
    if not tcp_tap.startswith("tcp://") or tcp_tap.startswith("tcp://*:"):  # a wildcard nobody resolved
        return None
    return Target(node, tcp_tap, None if insecure else client_curve(node))


def use_keys(sock: zmq.Socket[Any], curve: ClientCurve | None) -> None:
    """Make ``sock``'s next connect a CURVE client with ``curve``, or plain (NULL) without."""
    if curve is None:
        sock.setsockopt(zmq.CURVE_SERVER, 0)  # 0: back to the NULL mechanism
        return
    sock.setsockopt(zmq.CURVE_SECRETKEY, curve.keypair.secret_z85.encode("ascii"))
    sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.keypair.public.z85.encode("ascii"))
    sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key.z85.encode("ascii"))


class Gaps:
    """Counts the events a reader missed, from each hub's consecutive event numbers."""

    def __init__(self) -> None:
        self._last: dict[str, int] = {}
        self.dropped = 0
        self.by_node: dict[str, int] = {}

    def note(self, node: str, n: int, members: int = 1) -> int:
        """Take event ``n`` of hub ``node`` (a batch event: events ``n`` to ``n + members - 1``);
        the number of its events missed just before it."""
        last = self._last.get(node)
        self._last[node] = n + members - 1
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
        self._members: collections.deque[TapEvent] = collections.deque()  # of a batch event, not yet yielded

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
            use_keys(sock, target.curve)  # libzmq takes the mechanism of each connect at connect time
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
            if self._members:
                return self._members.popleft()
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
        """The event of ``data``, or of a batch event its first member (the others wait in
        ``_members``); None when it is malformed or another hub shows it."""
        try:
            event = decode_wire(data)
        except TapDecodeError as exc:
            self.malformed += 1
            now = time.monotonic()
            if now - self._malformed_logged >= MALFORMED_LOG_INTERVAL_S:
                self._malformed_logged = now
                log.warning("dropped a malformed tap event (%d so far): %s", self.malformed, exc)
            return None
        members = len(event.sizes) if isinstance(event, TapBatch) else 1
        self.received += members
        hub = f"{event.node} (replay)" if event.replay else event.node  # replays are numbered apart
        self.gaps.note(hub, event.n, members)
        self._hubs.add(event.node)
        if len(self.targets) > 1:
            kind = event.of if isinstance(event, TapBatch) else event.kind
            src, dst = split_addr(event.src)[0], split_addr(event.dst)[0]
            home = dst if kind in ANSWER_KINDS else src
            if event.node != home and home in self._hubs:
                return None  # the hub of its home node shows it
        if isinstance(event, TapBatch):
            first, *rest = event.events()
            self._members.extend(rest)
            return first
        return event
