"""The dpipes tap event format, version 2. This docstring is the spec.

Every hub mirrors what it routes on its tap, a ZeroMQ XPUB socket (``Hub.tap_endpoint`` on
``ipc://``, the ``tap`` entry of the ``endpoints`` map in its ``HELLO``; and ``Hub.tcp_tap_endpoint``
when the hub listens on TCP, ``info["tap"]`` in its ``HELLO`` and ``WELCOME``). A subscriber (a ZeroMQ SUB socket)
subscribes to the empty topic and receives single-frame messages, **tap events**: one per
transfer the hub routes (to a local endpoint, a client or a peer hub). Link traffic the hub
handles itself (``HELLO``/``WELCOME``, ``PING``/``PONG``, ``BYE``, ``ATTACH``) is not routed and
is not mirrored. Data that does not cross a hub is not mirrored either: an edge between two
stages on one node that is a kernel pipe (two programs, or a program or plugin and a plugin
stage's worker, ``start.direct_in``/``direct_out`` in ``dpipes.nodes.protocol``) shows no events,
though the stages' stderr, Pipes messages and control traffic do. An event stands for one
message, except a *batch event*: a ``BATCH`` (several small messages of a stream in one
transfer) is mirrored as one event that stands for each of its members (see *Batch events*), so
that the tap costs the hub one event per transfer, not one per few bytes routed. A ``BATCH``
whose ``of`` or ``sizes`` do not fit its payload is mirrored as one plain event of kind ``BATCH``.

Costs and losses
    While nobody subscribes the hub does no tap work at all. While someone does, it encodes one
    event per routed transfer and sends it without blocking: the mirror is **lossy**. A
    subscriber that reads too slowly loses events (ZeroMQ drops them at its queue of
    ``TAP_HWM`` events, so that a stalled tap costs the hub at most that many bounded events),
    and so does every subscriber when the hub's send fails (counted in ``Mirror.refused``). Each
    event carries its hub's event number ``n``, consecutive per hub, so a subscriber counts
    every event it missed from the gaps and can say "dropped N events". Numbers count messages:
    a batch event of ``members`` messages takes the numbers ``n`` to ``n + members - 1``, and the
    next event's ``n`` follows them, so a lost batch event is a gap of its ``members``. An ``n``
    lower than the previous one means the hub restarted.

Subscriptions
    The topic ``b""`` receives every event. A subscriber may also subscribe to the topic
    ``b"sample=N"`` (N decimal, at most ``MAX_SAMPLE_BYTES``): it asks the hub for payload
    samples of N bytes. The hub uses the largest N any subscriber asks for, else
    ``DEFAULT_SAMPLE_BYTES``. (Events are msgpack maps, whose first byte is never ``s``, so this
    topic never matches an event: it is a request only.)

The event
    One msgpack map with string keys (decode with ``raw=False``). Keys not listed are ignored.

    ==========  ==========  ====================================================================
    key         type        meaning
    ==========  ==========  ====================================================================
    ``v``       int         the tap format version, ``TAP_VERSION`` (see *Versions*)
    ``t``       float       when the hub routed the message: seconds since the Unix epoch
    ``node``    str         the name of the hub's node
    ``n``       int         the hub's event number: 0, 1, 2, ... from the hub's start
    ``kind``    str         the bus message kind (``dpipes.bus.codec``)
    ``src``     str         the message's source address ``node/endpoint``
    ``dst``     str         its destination address
    ``sid``     int         its stream id (0 outside streams)
    ``seq``     int         its sequence number (the request id of ``REQUEST``/``REPLY``)
    ``size``    int         total bytes of its payload frames (0 for kinds without payload)
    ``frames``  int         number of its payload frames
    ``fields``  map         its kind-specific header fields as the hub routed them (below)
    ``sample``  bin         data kinds only (``BYTES``, ``OBJECTS``, ``ARROW``, ``STDERR``): the
                            first bytes of the payload, the frames concatenated, at most the
                            sample size (see *Subscriptions*); the whole payload when it is
                            not larger
    ``pipes``   [str]       ``PIPES`` only: its payload frames, each one Pipes message as JSON
                            text, when they add up to at most ``PIPES_MAX_BYTES``; else nil
    ``schema``  bin         ``ARROW`` only, on the first part of a stream (the ``arrow`` map has
                            ``schema``): the stream's Arrow IPC schema message when it is at
                            most ``SCHEMA_MAX_BYTES``; else absent
    ``replay``  bool        true in an event a hub re-published from a replay (see *Replays*),
                            whose other keys are the recorded event's; else absent
    ``members`` int         a batch event only (see *Batch events*); else absent
    ==========  ==========  ====================================================================

``fields`` by kind (the codec's header keys, with their types there): ``REQUEST``: ``method,
body``; ``REPLY``: ``ok, body, error`` (the method is the one of the ``REQUEST`` with the same
``seq`` from ``dst``); ``CREDIT``: ``bytes``; ``EOF``/``EOF_ACK``: ``total``; ``CANCEL``:
``reason``; ``ERROR``: ``code, message, node, to``; ``LINK``: ``node, up, reason``;
``OBJECTS``: ``count, meta`` (the sample is the start of the msgpack array of objects);
``ARROW``: ``arrow`` (the map of ``dpipes.bus.arrow``); ``PIPES``: ``stage``; others: empty. A
``REQUEST``/``REPLY`` body is the control protocol's (``dpipes.nodes.protocol``).

Batch events
    A batch event is the event of one sound ``BATCH`` (``of``, ``sizes`` and ``seq`` as the codec
    checks them) and stands for its ``members`` messages. Its keys are those of the ``BATCH``
    message's event (``kind`` ``BATCH``; ``fields``: ``of``, ``sizes``; ``size`` the sum of
    ``sizes``; ``frames`` 1; ``src``, ``dst``, ``sid``, ``seq`` the batch's), and:

    ================  =====  ==============================================================
    key               type   meaning
    ================  =====  ==============================================================
    ``members``       int    the number of messages, ``len(sizes)``, 1 to ``MAX_BATCH_MESSAGES``
    ``sample_bytes``  int    S: the sample size the hub used (see *Subscriptions*)
    ``sampled``       int    K: how many members, from the first, have a sample
    ``sample``        bin    the samples of the first K members, one after another: member
                             i's is the first ``min(sizes[i], S)`` bytes of its payload; at
                             most ``BATCH_SAMPLE_BYTES`` in all
    ================  =====  ==============================================================

    Member i (from 0) is the message of kind ``of``, ``src``, ``dst`` and ``sid`` of the batch,
    ``seq`` the batch's ``seq + i``, ``size`` ``sizes[i]``, one payload frame, no kind fields,
    routed at ``t``; it takes event number ``n + i``. A reader expands a batch event into these
    member events (:func:`decode_events`), each the event the member would have had alone in
    version 1, without a sample past the first K. Small members are all sampled: the hub
    samples members until the next would pass ``BATCH_SAMPLE_BYTES``.

Versions
    Version 2 added batch events (version 1 mirrored each member of a ``BATCH`` as an event of
    its own). A reader reads versions 1 and 2 (a version-1 event is a version-2 event that is
    never a batch event) and refuses any other with a :class:`TapVersionError` that names the
    version it got and the ones it reads; a version-1 reader refuses version-2 events as
    malformed, counting them, not crashing.

Replays
    A recording is played back onto a node's bus through the node's tap
    (``dpipes-tap replay FILE --to NODE``): a client connects a socket that can send upstream
    (ZeroMQ XSUB) to the hub's tap, subscribes to nothing, and sends recorded events up, one
    single-frame event per message (an event is a msgpack map, so it never starts with the byte
    0 or 1 of a subscription). The hub checks each (:func:`decode_event`), drops a malformed one
    (counted in ``Mirror.bad_replays``, logged once per ``BAD_REPLAY_LOG_INTERVAL_S``), and
    publishes the others to its subscribers with ``replay`` set, as lossy as its own events.
    A replayed event keeps its ``node``, ``n`` and ``t`` (a batch event stays one, with its
    ``members``) and does not take a number of the hub's own: readers count the gaps of replayed
    events apart from the hub's. Sending up needs what
    reading needs: with keys, a key with the ``tap`` right.

Limits
    An event is bounded: ``fields`` by the codec's header limit (``MAX_HEADER_BYTES``), the
    sample by ``MAX_SAMPLE_BYTES`` (a batch event's by ``BATCH_SAMPLE_BYTES``), ``pipes`` by
    ``PIPES_MAX_BYTES``, ``schema`` by ``SCHEMA_MAX_BYTES``; a tap of a 1 GiB transfer holds no
    more than its socket's queue of such events. :func:`decode_wire` (and :func:`decode_events`,
    :func:`decode_event`) checks every key and limit and raises ``TapDecodeError`` for anything
    else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq

from dpipes.bus.codec import MAX_BATCH_MESSAGES, MAX_CONTAINER_ITEMS, MAX_HEADER_BYTES, MAX_STRING_CHARS
from dpipes.bus.errors import DecodeError

log = logging.getLogger(__name__)

TAP_VERSION = 2  # 2: batch events (1 mirrored each member of a BATCH alone)
READ_VERSIONS = (1, 2)  # a version-1 event reads as a version-2 one that is never a batch event

DEFAULT_SAMPLE_BYTES = 256  # enough to recognise text, a JSON object or an Arrow header
MAX_SAMPLE_BYTES = 16 * 1024  # what a subscriber may ask for: TAP_HWM events of it are the hub's worst case
PIPES_MAX_BYTES = 256 * 1024  # a PIPES message up to this size shows its messages on the tap
SCHEMA_MAX_BYTES = 64 * 1024  # an Arrow schema up to this size travels with its stream's first event
BATCH_SAMPLE_BYTES = 64 * 1024  # a batch event's samples in all: every member of a batch of small messages
MAX_EVENT_BYTES = MAX_HEADER_BYTES + BATCH_SAMPLE_BYTES + PIPES_MAX_BYTES + SCHEMA_MAX_BYTES + 4096
BAD_REPLAY_LOG_INTERVAL_S = 10.0  # a flood of bad replayed events logs one line per interval
TAP_HWM = 1000  # events a hub queues per subscriber; a slow tap loses events, never slows the bus or grows it

SAMPLE_TOPIC = b"sample="
DATA_KINDS = frozenset({"BYTES", "OBJECTS", "ARROW", "STDERR"})
_COMMON = frozenset({"v", "kind", "src", "dst", "sid", "seq"})
_MEMBER_KINDS = ("BYTES", "STDERR")  # what a BATCH may carry (the codec's ``of``)

_packb = msgpack.Packer(use_bin_type=True).pack


class TapDecodeError(DecodeError):
    """A tap event that is not well-formed or breaks a limit."""


class TapVersionError(TapDecodeError):
    """A tap event of a format version this reader does not read (a newer hub's, most likely)."""


@dataclasses.dataclass(frozen=True, slots=True)
class TapEvent:
    """One decoded tap event (see the module docstring for each field)."""

    t: float
    node: str
    n: int
    kind: str
    src: str
    dst: str
    sid: int = 0
    seq: int = 0
    size: int = 0
    frames: int = 0
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    sample: bytes | None = None
    pipes: tuple[str, ...] | None = None
    schema: bytes | None = None
    replay: bool = False

    def to_map(self) -> dict[str, Any]:
        """The event as its wire map (``encode`` of it gives the bytes a hub sends)."""
        out: dict[str, Any] = {
            "v": TAP_VERSION,
            "t": self.t,
            "node": self.node,
            "n": self.n,
            "kind": self.kind,
            "src": self.src,
            "dst": self.dst,
            "sid": self.sid,
            "seq": self.seq,
            "size": self.size,
            "frames": self.frames,
            "fields": self.fields,
        }
        if self.sample is not None:
            out["sample"] = self.sample
        if self.kind == "PIPES":
            out["pipes"] = list(self.pipes) if self.pipes is not None else None
        if self.schema is not None:
            out["schema"] = self.schema
        if self.replay:
            out["replay"] = True
        return out

    def encode(self) -> bytes:
        """The event's wire bytes."""
        return _packb(self.to_map())


@dataclasses.dataclass(frozen=True, slots=True)
class TapBatch:
    """One decoded batch event: the members of a ``BATCH`` (see *Batch events*)."""

    t: float
    node: str
    n: int
    of: str
    src: str
    dst: str
    sid: int
    seq: int
    sizes: tuple[int, ...]
    sample: bytes
    sampled: int
    sample_bytes: int
    replay: bool = False

    def events(self) -> list[TapEvent]:
        """The member events it stands for, in order."""
        out, at, limit = [], 0, self.sample_bytes
        for i, size in enumerate(self.sizes):
            sample = None
            if i < self.sampled:
                take = min(size, limit)
                sample, at = self.sample[at : at + take], at + take
            member = TapEvent(
                self.t, self.node, self.n + i, self.of, self.src, self.dst, self.sid, self.seq + i, size, 1,
                {}, sample, replay=self.replay,
            )  # fmt: skip
            out.append(member)
        return out

    def to_map(self) -> dict[str, Any]:
        """The event as its wire map."""
        out = _batch_map(self.t, self.node, self.n, self.of, self.src, self.dst, self.sid, self.seq, list(self.sizes))
        out.update(sample=self.sample, sampled=self.sampled, sample_bytes=self.sample_bytes)
        if self.replay:
            out["replay"] = True
        return out

    def encode(self) -> bytes:
        """The event's wire bytes."""
        return _packb(self.to_map())


def _batch_map(
    t: float, node: str, n: int, of: str, src: str, dst: str, sid: int, seq: int, sizes: list[int]
) -> dict[str, Any]:
    return {
        "v": TAP_VERSION,
        "t": t,
        "node": node,
        "n": n,
        "kind": "BATCH",
        "src": src,
        "dst": dst,
        "sid": sid,
        "seq": seq,
        "size": sum(sizes),
        "frames": 1,
        "fields": {"of": of, "sizes": sizes},
        "members": len(sizes),
    }


class Mirror:
    """A hub's tap state: its event counter, the sample size subscribers asked for, what it refused."""

    __slots__ = ("_asked", "_bad_replay_logged", "bad_replays", "n", "node", "refused", "replayed", "sample_bytes")

    def __init__(self, node: str) -> None:
        self.node = node
        self.n = 0
        self.refused = 0
        self.replayed = 0  # events re-published from a replay (see *Replays*)
        self.bad_replays = 0  # ...and the malformed ones dropped instead
        self._bad_replay_logged = -math.inf
        self.sample_bytes = DEFAULT_SAMPLE_BYTES
        self._asked: set[int] = set()

    def on_subscription(self, topic: bytes, subscribed: bool) -> None:
        """Note a (un)subscription to ``topic``; a ``sample=N`` topic sets the sample size."""
        if not topic.startswith(SAMPLE_TOPIC):
            return
        try:
            size = min(max(int(topic[len(SAMPLE_TOPIC) :][:16]), 0), MAX_SAMPLE_BYTES)
        except ValueError:
            return
        (self._asked.add if subscribed else self._asked.discard)(size)
        self.sample_bytes = max(self._asked, default=DEFAULT_SAMPLE_BYTES)

    def publish(self, sock: zmq.Socket[Any], header: dict[str, Any], payload: Sequence[Any]) -> None:
        """Encode one routed message's event and send it without blocking; count a refusal."""
        if header["kind"] == "BATCH" and (view := _batch_payload(header, payload)) is not None:
            self._publish_batch(sock, header, view)
            return
        self._send(sock, encode_event(self.node, self.n, header, payload, sample_bytes=self.sample_bytes))

    def _publish_batch(self, sock: zmq.Socket[Any], header: dict[str, Any], view: memoryview) -> None:
        """A sound ``BATCH`` as one batch event that stands for its members (see *Batch events*):
        a batch of small messages would otherwise be the tap's worst case, one event per few bytes
        routed. Per member it costs an int in ``sizes`` and, past the common case, a slice."""
        sizes, limit = header["sizes"], self.sample_bytes
        if view.nbytes <= BATCH_SAMPLE_BYTES and max(sizes) <= limit:  # small members: the payload is the samples
            sample, sampled = view.tobytes(), len(sizes)
        else:
            parts, budget, at = [], BATCH_SAMPLE_BYTES, 0
            for size in sizes:
                take = min(size, limit)
                if take > budget:
                    break
                parts.append(view[at : at + take])
                budget -= take
                at += size
            sample, sampled = b"".join(parts), len(parts)
        event = _batch_map(
            time.time(), self.node, self.n, header["of"], header["src"], header["dst"], header["sid"], header["seq"],
            sizes,
        )  # fmt: skip
        event.update(sample=sample, sampled=sampled, sample_bytes=limit)
        self._send(sock, _packb(event), len(sizes))

    def replay(self, sock: zmq.Socket[Any], frames: Sequence[Any]) -> None:
        """Re-publish an event a client sent up to the tap (see *Replays*), or drop a bad one."""
        try:
            if len(frames) != 1:
                raise TapDecodeError(f"a replayed event is one frame, not {len(frames)}")
            event = dataclasses.replace(decode_wire(frames[0].bytes), replay=True)
        except TapDecodeError as exc:
            self.bad_replays += 1
            now = time.monotonic()
            if now - self._bad_replay_logged >= BAD_REPLAY_LOG_INTERVAL_S:
                self._bad_replay_logged = now
                log.warning(
                    "node %s: dropped a bad replayed tap event (%d so far): %s", self.node, self.bad_replays, exc
                )
            return
        members = len(event.sizes) if isinstance(event, TapBatch) else 1
        self.replayed += members
        try:
            sock.send(event.encode(), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.refused += members  # lossy as the hub's own events; the gap in the replayed `n` tells

    def _send(self, sock: zmq.Socket[Any], event: bytes, members: int = 1) -> None:
        """Send an event that takes ``members`` event numbers."""
        self.n += members
        try:
            sock.send(event, zmq.NOBLOCK)
        except zmq.ZMQError:
            self.refused += members  # lossy by design; the gap in `n` tells every subscriber


def _batch_payload(header: dict[str, Any], payload: Sequence[Any]) -> memoryview | None:
    """The payload of a ``BATCH`` whose members can be told apart, as the codec checks them; else
    None. The hub mirrors before the recipient checks it, so a peer's batch may be hostile; the
    checks run at C speed (``map``, ``min``, ``sum``), not once per member in Python."""
    sizes, of = header.get("sizes"), header.get("of")
    if type(of) is not str or of not in _MEMBER_KINDS or type(sizes) is not list or len(payload) != 1:
        return None
    if not header["sid"] or not 0 < len(sizes) <= MAX_BATCH_MESSAGES or header["seq"] + len(sizes) > 2**63:
        return None
    if set(map(type, sizes)) != {int} or min(sizes) < 0:
        return None
    view = memoryview(payload[0]).cast("B")
    return view if sum(sizes) == view.nbytes else None


def encode_event(
    node: str,
    n: int,
    header: dict[str, Any],
    payload: Sequence[Any],
    *,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    now: float | None = None,
) -> bytes:
    """The tap event of one routed message: its decoded ``header`` and its payload frames.

    Runs once per routed message while someone taps the hub: it copies at most the sample.
    """
    kind = header["kind"]
    views = [memoryview(f) for f in payload] if payload else []
    size = sum(v.nbytes for v in views) if views else 0
    event: dict[str, Any] = {
        "v": TAP_VERSION,
        "t": time.time() if now is None else now,
        "node": node,
        "n": n,
        "kind": kind,
        # decode_header checked these where present; a header may leave them out (their defaults)
        "src": header.get("src", ""),
        "dst": header.get("dst", ""),
        "sid": header.get("sid", 0),
        "seq": header.get("seq", 0),
        "size": size,
        "frames": len(views),
        "fields": {k: v for k, v in header.items() if k not in _COMMON} if len(header) > len(_COMMON) else {},
    }
    if kind in DATA_KINDS:
        event["sample"] = _sample(views, sample_bytes)
        if kind == "ARROW":
            arrow = header.get("arrow")
            schema_len = arrow.get("schema") if isinstance(arrow, dict) else None
            if type(schema_len) is int and 0 < schema_len <= SCHEMA_MAX_BYTES and views:
                event["schema"] = bytes(views[0][:schema_len])
    elif kind == "PIPES":
        event["pipes"] = [bytes(v).decode("utf-8", "replace") for v in views] if size <= PIPES_MAX_BYTES else None
    return _packb(event)


def _sample(views: list[memoryview], limit: int) -> bytes:
    if len(views) == 1:  # the common case: one frame, one slice
        return views[0].cast("B")[:limit].tobytes()
    out = bytearray()
    for view in views:
        if len(out) >= limit:
            break
        out += view.cast("B")[: limit - len(out)]
    return bytes(out)


_TYPES: dict[str, tuple[type, ...]] = {
    "t": (float, int),
    "node": (str,),
    "n": (int,),
    "kind": (str,),
    "src": (str,),
    "dst": (str,),
    "sid": (int,),
    "seq": (int,),
    "size": (int,),
    "frames": (int,),
    "fields": (dict,),
}


def decode_events(data: bytes | memoryview) -> list[TapEvent]:
    """Decode and check one tap event, as the per-message events it stands for: a batch event's
    members (see *Batch events*), else the one event.

    Raises:
        TapDecodeError: it is not an event of a version this reads, within the limits.
    """
    event = decode_wire(data)
    return event.events() if isinstance(event, TapBatch) else [event]


def decode_event(data: bytes | memoryview) -> TapEvent:
    """Decode and check one tap event that stands for one message.

    Raises:
        TapDecodeError: it is not an event of a version this reads, within the limits, or it is a
            batch event (read those with :func:`decode_events`).
    """
    event = decode_wire(data)
    if isinstance(event, TapBatch):
        raise TapDecodeError(f"a batch event of {len(event.sizes)} messages: read it with decode_events")
    return event


def decode_wire(data: bytes | memoryview) -> TapEvent | TapBatch:
    """Decode and check one tap event as it was sent: a batch event stays one :class:`TapBatch`.

    Raises:
        TapDecodeError: it is not an event of a version this reads, within the limits.
    """
    if len(data) > MAX_EVENT_BYTES:
        raise TapDecodeError(f"tap event is {len(data)} bytes (limit {MAX_EVENT_BYTES})")
    try:
        raw = msgpack.unpackb(
            data,
            raw=False,
            max_str_len=PIPES_MAX_BYTES,
            max_bin_len=max(BATCH_SAMPLE_BYTES, SCHEMA_MAX_BYTES),
            max_array_len=MAX_CONTAINER_ITEMS,
            max_map_len=MAX_CONTAINER_ITEMS,
            max_ext_len=0,
            strict_map_key=True,
        )
    except Exception as exc:  # msgpack raises several types for bad input; all mean the same
        raise TapDecodeError(f"tap event is not valid msgpack: {exc}") from None
    if type(raw) is not dict:
        raise TapDecodeError(f"tap event must be a map, got {type(raw).__name__}")
    version = raw.get("v")
    if type(version) is not int or version not in READ_VERSIONS:
        raise TapVersionError(
            f"tap event format version {version!r:.20} is not one this reader reads"
            f" ({', '.join(map(str, READ_VERSIONS))}): a newer dpipes made it, upgrade this one"
        )
    values: dict[str, Any] = {}
    for key, types in _TYPES.items():
        value: Any = raw.get(key)
        if type(value) not in types:
            raise TapDecodeError(f"tap event field {key!r} must be {types[0].__name__}, got {type(value).__name__}")
        if types[0] is int and not 0 <= value < 2**63:
            raise TapDecodeError(f"tap event field {key!r} is out of range: {value!r:.40}")
        if types[0] is str and len(value) > MAX_STRING_CHARS:
            raise TapDecodeError(f"tap event field {key!r} is {len(value)} characters (limit {MAX_STRING_CHARS})")
        values[key] = value
    values["t"] = float(values["t"])
    replay = raw.get("replay", False)
    if type(replay) is not bool:
        raise TapDecodeError(f"tap event field 'replay' must be bool, got {type(replay).__name__}")
    values["replay"] = replay
    if version >= 2 and "members" in raw:
        return _batch(raw, values)
    for key, limit in (("sample", MAX_SAMPLE_BYTES), ("schema", SCHEMA_MAX_BYTES)):
        value = raw.get(key)
        if value is not None and type(value) is not bytes:
            raise TapDecodeError(f"tap event field {key!r} must be bytes, got {type(value).__name__}")
        if value is not None and len(value) > limit:
            raise TapDecodeError(f"tap event field {key!r} is {len(value)} bytes (limit {limit})")
        values[key] = value
    pipes = raw.get("pipes")
    if pipes is not None:
        if type(pipes) is not list or any(type(p) is not str for p in pipes):
            raise TapDecodeError("tap event field 'pipes' must be a list of strings")
        if sum(len(p) for p in pipes) > PIPES_MAX_BYTES:
            raise TapDecodeError(f"tap event field 'pipes' holds more than {PIPES_MAX_BYTES} characters")
        values["pipes"] = tuple(pipes)
    return TapEvent(**values)


def _batch(raw: dict[str, Any], values: dict[str, Any]) -> TapBatch:
    """The batch event of a checked event map (see *Batch events*)."""
    fields, members = values["fields"], raw["members"]
    if values["kind"] != "BATCH":
        raise TapDecodeError(f"a batch event's kind must be BATCH, got {values['kind']!r:.40}")
    of, sizes = fields.get("of"), fields.get("sizes")
    if type(of) is not str or of not in _MEMBER_KINDS:
        raise TapDecodeError(f"a batch event's members must be BYTES or STDERR, got {of!r:.40}")
    if type(sizes) is not list or any(type(size) is not int or not 0 <= size < 2**63 for size in sizes):
        raise TapDecodeError("a batch event's sizes must be a list of byte counts")
    if type(members) is not int or not 1 <= members <= MAX_BATCH_MESSAGES or members != len(sizes):
        raise TapDecodeError(f"a batch event's members ({members!r:.20}) must be its {len(sizes)} sizes, at least 1")
    if sum(sizes) != values["size"]:
        raise TapDecodeError(f"a batch event's sizes add up to {sum(sizes)}, its size is {values['size']}")
    if values["n"] + members > 2**63 or values["seq"] + members > 2**63:
        raise TapDecodeError("a batch event's members run past 2**63 - 1")
    sample, sampled, limit = raw.get("sample"), raw.get("sampled"), raw.get("sample_bytes")
    if type(limit) is not int or not 0 <= limit <= MAX_SAMPLE_BYTES:
        raise TapDecodeError(f"a batch event's sample_bytes must be 0 to {MAX_SAMPLE_BYTES}, got {limit!r:.20}")
    if type(sampled) is not int or not 0 <= sampled <= members:
        raise TapDecodeError(f"a batch event's sampled must be 0 to its {members} members, got {sampled!r:.20}")
    if type(sample) is not bytes or len(sample) != sum(min(size, limit) for size in sizes[:sampled]):
        raise TapDecodeError("a batch event's sample must be its sampled members' samples, one after another")
    return TapBatch(
        values["t"], values["node"], values["n"], of, values["src"], values["dst"], values["sid"], values["seq"],
        tuple(sizes), sample, sampled, limit, values["replay"],
    )  # fmt: skip


def event_schema() -> dict[str, Any]:
    """The JSON schema of a decoded tap event, for implementers in other languages.

    The repository keeps it as ``bus/tap_schema.json``; a test checks that the file equals this.
    """
    counter = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
    text = {"type": "string", "maxLength": MAX_STRING_CHARS}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "dpipes-tap-event",
        "title": f"dpipes tap event, version {TAP_VERSION}",
        "description": (
            "A msgpack map, one per routed transfer: one message, or with 'members' the members of a BATCH."
            " See dpipes.bus.tap for the spec."
        ),
        "type": "object",
        "required": ["v", "t", "node", "n", "kind", "src", "dst", "sid", "seq", "size", "frames", "fields"],
        "properties": {
            "v": {"const": TAP_VERSION},
            "t": {"type": "number"},
            "node": text,
            "n": counter,
            "kind": text,
            "src": text,
            "dst": text,
            "sid": counter,
            "seq": counter,
            "size": counter,
            "frames": counter,
            "fields": {"type": "object"},
            "sample": {"description": "msgpack bin", "maxLength": MAX_SAMPLE_BYTES},
            "pipes": {
                "type": ["array", "null"],
                "items": {"type": "string"},
                "maxItems": MAX_CONTAINER_ITEMS,
            },
            "schema": {"description": "msgpack bin: an Arrow IPC schema message", "maxLength": SCHEMA_MAX_BYTES},
            "replay": {"type": "boolean", "description": "re-published by a hub from a replay"},
            "members": {"type": "integer", "minimum": 1, "maximum": MAX_BATCH_MESSAGES},
            "sampled": {"type": "integer", "minimum": 0, "maximum": MAX_BATCH_MESSAGES},
            "sample_bytes": {"type": "integer", "minimum": 0, "maximum": MAX_SAMPLE_BYTES},
        },
        "if": {"required": ["members"]},
        "then": {
            "description": "a batch event: the members' samples one after another",
            "required": ["sample", "sampled", "sample_bytes"],
            "properties": {
                "kind": {"const": "BATCH"},
                "fields": {"type": "object", "required": ["of", "sizes"]},
                "sample": {"description": "msgpack bin", "maxLength": BATCH_SAMPLE_BYTES},
            },
        },
    }


def schema_text() -> str:
    """``event_schema()`` as the text of ``bus/tap_schema.json``."""
    return json.dumps(event_schema(), indent=2, sort_keys=True) + "\n"
