"""The dpipes bus wire format, version 3. This docstring is the spec.

A bus message is a ZeroMQ multipart message::

    [routing frames ...] HEADER [PAYLOAD ...]

*Routing frames* are added and removed by ZeroMQ itself (a ROUTER prepends the sender's routing
id); the codec never sees them. Everything below describes ``HEADER [PAYLOAD ...]``.

HEADER
    One frame holding a msgpack **map** with string keys. Common keys, **required** in every
    message (a header without one is malformed, whatever its kind):

    ========  =======  ====================================================================
    key       type     meaning
    ========  =======  ====================================================================
    ``v``     int      protocol version, ``PROTOCOL_VERSION``. A msgpack integer: a boolean
                       is not one. A hub answers another integer with ``BYE`` (to ``HELLO``
                       and ``ATTACH``) or drops it
    ``kind``  str      the message kind, one of the names in the table below
    ``src``   str      source address ``node/endpoint`` (``node/`` for the hub itself)
    ``dst``   str      destination address ``node/endpoint`` (``""`` in a first ``HELLO``)
    ``sid``   int      stream id; 0 when not part of a stream. See *Streams* for whose it is
    ``seq``   int      sequence number: per stream for stream messages, the request id for
                       ``REQUEST``/``REPLY``, the offending message's ``seq`` for ``ERROR``
    ========  =======  ====================================================================

    Integers are non-negative and below 2**63. Kind-specific keys follow, with the types below. A
    missing kind key takes its default (empty string, 0, false, empty map; ``REPLY.ok`` defaults
    to true); an unknown key is ignored (room for compatible additions without a version bump).

Addresses and names
    An address is ``node/endpoint``. A node name is 1 to ``MAX_NODE_NAME_CHARS`` characters
    without ``/``; an endpoint name is 1 to ``MAX_ENDPOINT_NAME_CHARS`` characters without
    ``/``, so that every address fits ``MAX_STRING_CHARS``. ``HELLO.node``, ``WELCOME.node``,
    ``LINK.node`` and ``ATTACH.name`` longer than that are malformed.

PAYLOAD
    Zero or more frames of opaque bytes, only for the kinds marked *payload*: any other kind
    with a payload frame is malformed. They are sent zero-copy (``copy=False``) and handed to
    the receiver as ``memoryview`` objects over the received ZeroMQ frames. ``OBJECTS`` has
    exactly one payload frame, as does ``BATCH``, and ``PIPES`` at least one.

Kinds
    Link (hub to hub, over each hub's outbound DEALER link; and hub to attached clients):

    * ``HELLO`` ``node: str, instance: str, endpoints: map, info: map`` -- opens a link or
      attachment of a peer hub; ``endpoints["bus"]`` is where the peer's ROUTER listens.
    * ``WELCOME`` ``node: str, instance: str, info: map`` -- the answer to an acceptable
      ``HELLO``, with what the answering hub tells peers about itself (as its own ``HELLO``'s
      ``info``), so that a link is never up before its peer's offer is known.
    * ``PING`` -- liveness, sent every ``HEARTBEAT_INTERVAL_S`` on every link and by clients.
    * ``PONG`` -- the hub's answer to a client's ``PING``.
    * ``BYE`` ``reason: str`` -- an orderly goodbye; also the refusal of a ``HELLO``, and what a
      hub tells a client or peer it detaches (see *Sessions* and *Bad messages*).
    * ``ATTACH`` ``name: str, host: str, shm_batch: bool`` -- a client asks to become endpoint
      ``node/name`` (an empty name: the hub picks one). Not knowing its address yet, it sends
      ``src`` and ``dst`` empty; from ``ATTACHED`` on, every message it sends carries ``src`` =
      that address. ``host`` says where it runs, for shared memory (see *Shared memory*; empty:
      nowhere); ``shm_batch`` true: it takes ``SHM_BATCH`` messages.
    * ``ATTACHED`` ``addr: str, shm: bool, shm_batch: bool`` -- the hub's answer to ``ATTACH``;
      ``shm`` true: the two may exchange ``SHM`` messages; ``shm_batch`` true as well: the hub
      takes ``SHM_BATCH`` messages too.
    * ``LINK`` ``node: str, up: bool, reason: str`` -- a hub tells its endpoints that a peer
      node came up or was lost.

    Control:

    * ``REQUEST`` ``method: str, body: map`` -- ``seq`` is the request id.
    * ``REPLY`` ``ok: bool, body: map, error: str`` -- ``seq`` repeats the request id.
    * ``CREDIT`` ``bytes: int`` -- the receiver of stream ``sid`` lets its sender spend this many
      more credit units (not payload bytes: see *Flow control*).
    * ``EOF`` ``total: int`` -- the sender of stream ``sid`` has sent everything: ``total``
      payload bytes in all.
    * ``EOF_ACK`` ``total: int`` -- the receiver has taken every byte up to ``EOF``; only now may
      the sender close anything (ZeroMQ drops the unsent tail of a socket closed too early).
    * ``CANCEL`` ``reason: str`` -- either end abandons stream ``sid`` (the receiver: "stop
      sending", as SIGPIPE; the sender: "no more is coming, and it is not complete").
    * ``ERROR`` ``code: str, message: str, node: str, to: str`` -- a message that ``dst`` sent
      to address ``to`` (with this ``sid`` and ``seq``) could not be delivered or done; ``node``
      names where it failed. Codes: ``no-route``, ``no-endpoint``, ``peer-lost``,
      ``not-linked``, ``refused``, ``bad-message``, ``credit-exceeded``, ``over-limit`` (the last
      two: see *Limits of a receiver*). An ``ERROR`` is never answered with one.

    Data (*payload*), normally inside a stream (``sid`` != 0) under credit:

    * ``BYTES`` -- payload frames are raw byte chunks.
    * ``OBJECTS`` ``count: int, meta: map`` -- one payload frame, a msgpack array of ``count``
      objects (maps); ``meta`` says where they came from (``dp.addr``, ``dp.node``, ...), once
      per batch; the receiving node puts it into each object it hands a program. Decoding checks
      what is cheap without unpacking the batch: one frame, and ``count`` no larger than the
      frame's length in bytes (every object takes at least one byte). Whoever unpacks the batch
      checks that it holds ``count`` objects.
    * ``ARROW`` ``arrow: map`` -- Arrow record batch framing; ``arrow`` and the payload frames
      are specified in ``dpipes.bus.arrow``.
    * ``STDERR`` -- payload frames are a program's standard error bytes.
    * ``PIPES`` ``stage: int`` -- one or more payload frames, each one Dagster Pipes message (or the
      report of a line that was not one) as JSON text, in the order the stage wrote them.
    * ``BATCH`` ``of: str, sizes: [int]`` -- several consecutive data messages of stream ``sid``
      in one transfer (see *Batches*): one payload frame, the members' payloads end to end.
    * ``SHM`` ``of: str, fields: map, handle: str, lease: int, sizes: [int], offset: int`` --
      the data message of kind ``of`` with kind fields ``fields`` whose payload frames (``sizes``
      bytes each, from ``offset``) lie in shared memory, not on the wire (see *Shared memory*).
      No payload frame.
    * ``SHM_BATCH`` ``of: str, members: [map]`` -- several consecutive data messages of kind
      ``of`` of stream ``sid``, each an ``SHM``, in one transfer (see *Shared memory*). No
      payload frame.
    * ``SHM_FREE`` ``leases: [int]`` -- the receiver of ``SHM`` messages from ``dst`` has done
      with these leases.

Batches
    A sender may coalesce the small data messages of one stream that it queued in one pass of
    its loop (or in several, while it sends without pause) into one ``BATCH`` (as Zenoh batches
    small messages): per-message work on the way
    (a socket send, a header decoded and routed by each hub) is then paid once per batch. A
    ``BATCH`` with ``src``, ``dst``, ``sid`` and ``seq`` S stands for ``len(sizes)`` messages
    of kind ``of`` (``BYTES``, the default, or ``STDERR``: the kinds without kind fields) with
    the same ``src``, ``dst`` and ``sid`` and the sequence numbers S, S+1, ...; member i has
    one payload frame, the ``sizes[i]`` bytes after those of the members before it. A
    ``BATCH`` is routed as one message (hubs do not split it) and its recipient takes each
    member exactly as if it had arrived alone, in order: ordering, credit (each member costs
    its size plus ``MESSAGE_CREDIT_BYTES``), ``EOF.total`` and the reader's view are per
    message. What a hub answers about a ``BATCH`` it cannot deliver is an ``ERROR`` with the
    batch's ``seq``: the seq of its first member, which, as for any stream message, did not
    arrive, nor did any member or message after it. Malformed, and answered as any malformed
    message: ``sid`` 0, no member, sizes that do not add up to the payload frame's length,
    member seqs past 2**63 - 1, an ``of`` that is not ``BYTES`` or ``STDERR``. A sender batches
    only messages below ``BATCH_BELOW_BYTES`` and at most ``MAX_BATCH_MESSAGES`` of them (the
    header's array limit); a receiver need not batch at all.

Shared memory
    Two parties on one host may hand large payloads over in shared memory
    (``dpipes.bus.shm``): a client says where it runs in ``ATTACH.host`` (boot, PID namespace and
    user, as ``dpipes.bus.shm.host_id``), and the hub answers ``ATTACHED.shm`` true when that is
    where it runs too. Then either may send, instead of a data message of kind ``of`` (``BYTES``,
    ``OBJECTS``, ``ARROW``, ``STDERR`` or ``PIPES``), an ``SHM`` with the same common keys, that
    message's kind fields in ``fields``, and a ``handle`` (``PID:FD:TOKEN:SIZE``: the sender's
    memfd, which the receiver opens as ``/proc/PID/fd/FD`` after checking that its name is
    ``dpipes-TOKEN``) whose ``sum(sizes)`` bytes from byte ``offset`` (0 when absent) are the
    payload frames end to end (a sender cuts the leases of several messages from one segment). The
    receiver takes it exactly as that message (credit, ``EOF.total``, the reader's view; its
    payload frames are read-only views of the segment) and, once its reader has dropped them,
    sends ``SHM_FREE`` with the ``lease`` to the ``SHM``'s ``src``; until then the sender does not
    touch those bytes. A hub that routes an ``SHM`` to a party it shares no memory with (another
    node, a remote client) sends the message of kind ``of`` instead, copied out of the segment,
    and frees the lease itself (``SHM_FREE`` from ``node/``). The other way, a hub may hand a
    same-host client a large data message that came from another node as an ``SHM`` of its own
    memory, ``src`` left as it was: the client's ``SHM_FREE`` then names a ``dst`` on another
    node, and the hub takes it for its own leases instead of passing it on (nobody but the hub
    sends a client handles for another node's sender). A sender gives up every lease held
    by a party that is gone. Malformed: an ``of`` outside that list, ``fields`` that are not
    ``of``'s, more than ``MAX_FRAMES - 1`` sizes, a handle that is not ``PID:FD:TOKEN:SIZE`` or
    names no such segment of a process on this host, an ``offset`` and sizes that do not lie
    inside its segment (``offset + sum(sizes) > SIZE``).

    The ``SHM`` messages of one stream that a sender makes in one pass of its loop may travel as
    one ``SHM_BATCH`` (as small messages travel in a ``BATCH``): one transfer to send, route and
    wake the receiver for, not one per message. A ``SHM_BATCH`` with ``src``, ``dst``, ``sid``
    and ``seq`` S stands for ``len(members)`` ``SHM`` messages of kind ``of`` with the same
    ``src``, ``dst`` and ``sid`` and the sequence numbers S, S+1, ...; member i is a map of
    that ``SHM``'s other keys, ``fields``, ``handle``, ``lease``, ``sizes`` and ``offset``
    (each with its type and default as in ``SHM``). It is routed as one message, and its
    recipient takes each member exactly as if it had arrived alone, in order; a hub that routes
    it to a party it shares no memory with sends each member's message of kind ``of`` instead,
    and to a same-host client that did not say ``ATTACH.shm_batch``, each member as an ``SHM``.
    A party sends ``SHM_BATCH`` only to a hub that said ``ATTACHED.shm_batch`` or a client that
    said ``ATTACH.shm_batch``. Malformed, besides what is malformed in an ``SHM``: ``sid`` 0, no
    member, a member that is not a map, member seqs past 2**63 - 1.

Streams
    A stream is named by its **sender**: the sender's address and a ``sid`` the sender chose
    (non-zero, unique among the sender's open streams; a dpipes endpoint draws stream ids and
    request ids from one counter). The sender's data messages, ``EOF`` and ``CANCEL`` carry
    ``src`` = sender, ``dst`` = receiver and that ``sid``. The receiver's ``CREDIT``,
    ``EOF_ACK`` and ``CANCEL`` carry ``src`` = receiver, ``dst`` = sender and the **sender's**
    ``sid``. So ``sid`` is not unique per source address: one party's messages with the same
    ``sid`` may be about a stream it sends or one it receives, and a party tells streams apart by
    (peer address, ``sid``, direction). The sender numbers its data messages and ``EOF`` with
    ``seq`` 1, 2, 3, ... in sending order (an ``ERROR`` that bounces one names its ``seq``);
    ``CREDIT``, ``EOF_ACK`` and ``CANCEL`` carry ``seq`` 0. A receiver need not check ``seq``:
    the bus keeps a stream's messages in order. A message to party P from peer Q with stream id
    S is about:

    * data or ``EOF``: the stream Q sends to P, (Q, S);
    * ``CREDIT`` or ``EOF_ACK``: the stream P sends to Q with P's id S;
    * ``CANCEL``: the stream P sends to Q with id S if P has one, else the stream (Q, S). When P
      and Q each send the other a stream with the same id, a ``CANCEL`` is read as being about
      P's own stream (the receiver saying "stop"); a sender that must cancel such a stream of
      its own ends it with ``EOF`` short of its data or lets the receiver time out instead;
    * ``ERROR`` with a non-zero ``sid``, where ``to`` plays Q's part: the stream P sends to
      ``to`` with id S if P has one, else the stream (``to``, S).

Flow control
    Credit is counted in **credit units**: a data message costs its payload bytes plus
    ``MESSAGE_CREDIT_BYTES`` (so that a stream of tiny messages is bounded in count too);
    ``EOF`` and ``CANCEL`` cost nothing. Every stream starts with ``INITIAL_CREDIT_BYTES``
    units, granted by the protocol without a message. ``CREDIT.bytes`` adds that many units.
    The sender may start a data message only while the units it has spent are fewer than the
    units granted (so one message may overshoot), and waits otherwise until a ``CREDIT``
    arrives. Receivers grant units back as their consumer takes messages, never before; a
    dpipes endpoint grants once half of its window has been taken, and an endpoint whose
    window is larger than ``INITIAL_CREDIT_BYTES`` grants the difference when the stream
    opens (a stream whose messages arrive in shared memory gets a larger window, granted when
    the first one does: ``dpipes.bus.shm``), at the end of that loop pass. A receiver need
    grant nothing once a stream's ``EOF`` has arrived (its sender sends nothing more), and a
    dpipes endpoint does not. ``EOF.total`` and ``EOF_ACK.total`` count payload bytes only, not units.

Limits of a receiver
    A receiver enforces the credit it granted. A data message that arrives after its sender had
    spent all the units granted to the stream (``INITIAL_CREDIT_BYTES`` plus every ``CREDIT``)
    ends the stream: the receiver answers ``ERROR`` ``credit-exceeded`` (``sid`` and ``seq`` the
    message's, ``to`` the receiver), drops what the stream had queued and fails its reader. A
    receiver may bound how many incoming streams it has open at once (a dpipes endpoint: 64 by
    default, one for a stage's input, none for a node's control endpoint); the first message of
    a stream beyond the bound is answered ``ERROR`` ``over-limit``. Whatever more a refused
    stream sends is dropped unanswered. Both are counted, and logged at most once per interval.
    So a receiver never holds more than its open streams' windows plus one message each. A hub
    may also cap what it holds for all its senders together (its endpoints' queued streams and
    what waits for its clients; a dpipes hub: 1 GiB by default): a data message that would take
    it past the cap is answered ``ERROR`` ``over-limit`` and its stream ends as above. A sender
    within its credit is refused only while the hub is at its cap.

Sessions
    A hub links to each peer hub with ``HELLO``/``WELCOME`` and sends ``PING`` on every link
    every ``HEARTBEAT_INTERVAL_S``; a peer silent for ``PEER_TIMEOUT_S`` is lost: the hub sends
    its endpoints ``LINK`` (up false) and fails the streams that involve it. A client attaches
    with ``ATTACH`` and is answered ``ATTACHED``, or ``ERROR`` (``refused``: the name is taken
    or holds ``/``, or the hub has as many clients attached as it takes, in all or from that
    client's address; ``bad-message``: the ``ATTACH`` is malformed, a name too long included).
    A client that does not read what its hub sends it, so that the hub holds more for it than
    its configured bound (bytes or messages), is detached with ``BYE`` naming why.
    An attached client must send ``PING`` at least every ``HEARTBEAT_INTERVAL_S``; the hub
    answers ``PONG``. A client silent for ``CLIENT_TIMEOUT_S`` is detached: the hub sends it
    ``BYE`` naming why and forgets its address (later messages from it get ``ERROR``
    ``not-linked``). A client whose ``PING`` its hub has left unanswered for ``PEER_TIMEOUT_S``
    takes it as lost (counted from the ``PING``: a client that was itself stopped meanwhile has
    not asked, and reads what waits before it judges). Either side leaves with ``BYE``; a hub
    that stops sends ``BYE`` to every linked peer and every attached client. A hub may hold a
    name for a client that attaches later (a dpipes node's plugin worker). It keeps the streams
    such a client sends and has not ended with ``EOF``, and when the name is released (the client
    is gone, by ``BYE``, silence or death, and its node says why) it cancels each in the client's
    name: ``CANCEL`` with ``src`` the client's address, the stream's ``sid`` and that reason,
    behind whatever the client sent before. So no reader waits for the rest of a stream whose
    sender is gone, or takes what came for the whole.
    Which outages a link survives, and what follows one it does not: :mod:`dpipes.bus.hub`,
    *Link loss*.

Bad messages
    A hub never lets a bad message reach its loop. It decodes each header and counts its frames
    against the kind (not the kind fields or payload of what it only passes on: their recipient
    checks those), and treats these alike:

    * a header that is not a well-formed map of this version within the limits (not msgpack, not a
      map, a required key missing, a value of the wrong type, an unknown kind, payload frames
      the kind does not allow, too many frames);
    * a message that breaks the session's rules: a client's ``src`` that is not its address,
      a peer's ``src`` not on its node, a peer's ``dst`` not on this node (a hub never relays);
    * kind fields that do not decode, on a message for one of the hub's own endpoints or on an
      ``ERROR`` for the hub itself.

    Such a message is dropped and counted against its sender (``Hub.stats``: by node name for
    a linked peer, by address for a client, and all other parties together). The sender is
    answered on the connection the message came by with ``ERROR`` ``bad-message``, whose
    ``message`` names the key or limit that was broken and whose ``sid``, ``seq`` and ``to``
    are the bad message's where those could be read (``dst`` is the client, or the peer's
    endpoint that sent it, or ``node/`` of the peer; the peer's hub hands the ``ERROR`` to
    that endpoint). At most one answer per sender per ``BAD_MESSAGE_INTERVAL_S``; the rest are
    only counted. An ``ERROR`` or ``BYE`` is never answered. The hub logs one line per sender
    per interval, with the count so far. A linked peer or attached client that sends more than
    ``MAX_BAD_MESSAGES`` bad messages within one interval is dropped with ``BYE`` naming why:
    a client is detached, a peer's link is taken down (its streams fail; it may say ``HELLO``
    again).

    The handshakes are answered whatever the rate, since their sender waits: a malformed
    ``ATTACH`` gets ``ERROR`` ``bad-message``, a malformed ``HELLO`` from a party not linked
    yet gets ``BYE``, as does a ``HELLO`` whose ``node`` is this hub's own name or not a node
    name. A header with an integer ``v`` other than ``PROTOCOL_VERSION`` is counted; a
    ``HELLO`` or ``ATTACH`` of that kind is answered ``BYE`` naming both versions, anything
    else is dropped. A message on a connection of a peer instance that has since been replaced
    is dropped (stale, not bad). An ``ERROR`` a peer addresses to the hub itself (``node/``) is
    logged, at most once per peer per interval.

Constants
    Names in ``dpipes.bus.codec``; a test checks that this table matches them.

    ===========================  ==========  ===========================================
    name                         value       unit and meaning
    ===========================  ==========  ===========================================
    ``PROTOCOL_VERSION``         3           the ``v`` of every header
    ``MAX_HEADER_BYTES``         65536       bytes in the header frame
    ``MAX_FRAMES``               4096        frames in a message, header included
    ``MAX_PAYLOAD_FRAME_BYTES``  67108864    bytes in one payload frame (64 MiB)
    ``MAX_FRAME_BYTES``          67109888    bytes in any frame; a socket drops a peer
                                             sending more (``ZMQ_MAXMSGSIZE``)
    ``MAX_STRING_CHARS``         4096        characters in any string value of a header
    ``MAX_NODE_NAME_CHARS``      255         characters in a node name
    ``MAX_ENDPOINT_NAME_CHARS``  3840        characters in an endpoint name
    ``MAX_DEPTH``                32          nesting of maps and arrays in a header value
    ``MAX_CONTAINER_ITEMS``      4096        entries of one map or array in a header
    ``INITIAL_CREDIT_BYTES``     8388608     credit units every stream starts with (8 MiB)
    ``MESSAGE_CREDIT_BYTES``     256         credit units a data message costs beyond its
                                             payload bytes
    ``BATCH_BELOW_BYTES``        16384       bytes: a sender batches data messages smaller
                                             than this
    ``MAX_BATCH_MESSAGES``       4096        members of one ``BATCH``
    ``HEARTBEAT_INTERVAL_S``     0.5         seconds between PINGs on a link or from a client
    ``PEER_TIMEOUT_S``           3.0         seconds of silence after which a peer hub (or,
                                             for a client, its hub) is lost
    ``CLIENT_TIMEOUT_S``         6.0         seconds of silence after which a hub detaches a
                                             client with ``BYE``
    ``BAD_MESSAGE_INTERVAL_S``   10.0        seconds: a hub logs and answers bad messages at
                                             most once per sender per interval
    ``MAX_BAD_MESSAGES``         100         bad messages in one interval after which a hub
                                             drops a peer or client with ``BYE``
    ``CLOSE_DRAIN_S``            2.0         seconds a closing party waits for queued
                                             messages before dropping them
    ``BYE_LINGER_MS``            200         milliseconds a closing socket lets a queued
                                             ``BYE`` reach its peer
    ``CLIENT_BACKLOG_MESSAGES``  100000      messages a dpipes hub holds for a client that
                                             does not read, before it detaches it
    ``CLIENT_BACKLOG_BYTES``     67108864    ... or payload bytes so held (64 MiB; default)
    ``MAX_CLIENTS``              512         clients a dpipes hub attaches at once (default)
    ``MAX_CLIENTS_PER_ADDRESS``  128         of those, from one address or local user
                                             (default)
    ``MAX_HELD_BYTES``           1073741824  bytes a dpipes hub holds for all its senders
                                             together (1 GiB; default)
    ===========================  ==========  ===========================================
"""


# About 1,040 lines, one job: the wire format. The first 290 are its spec (what an implementer
# in another language reads, tested against the code); the rest is one message kind after another.

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeAlias

import msgpack

from dpipes.bus.errors import DecodeError

# 3: SHM.offset (later SHM_BATCH, negotiated at attach: ATTACH.shm_batch, ATTACHED.shm_batch);
# 2: BATCH, SHM, SHM_FREE; WELCOME.info, ATTACH.host, ATTACHED.shm
PROTOCOL_VERSION = 3

MAX_HEADER_BYTES = 64 * 1024
MAX_FRAMES = 4096  # an Arrow batch of many columns travels as one frame per buffer
MAX_PAYLOAD_FRAME_BYTES = 64 * 1024 * 1024
MAX_STRING_CHARS = 4096  # addresses, names, reasons, methods
MAX_NODE_NAME_CHARS = 255  # a DNS label is 63; room for any host-derived name, not for abuse
MAX_ENDPOINT_NAME_CHARS = MAX_STRING_CHARS - MAX_NODE_NAME_CHARS - 1  # node/endpoint fits MAX_STRING_CHARS
MAX_DEPTH = 32  # nesting of maps and arrays inside a header value
MAX_CONTAINER_ITEMS = 4096  # entries of one map or array inside a header

INITIAL_CREDIT_BYTES = 8 * 1024 * 1024
MESSAGE_CREDIT_BYTES = 256  # what each data message costs in credit beyond its payload
BATCH_BELOW_BYTES = 16 * 1024  # larger messages cost little per byte, and are sent at once, uncopied
MAX_BATCH_MESSAGES = MAX_CONTAINER_ITEMS  # the sizes array is a header array

# Session timing, shared by hubs and clients.
HEARTBEAT_INTERVAL_S = 0.5  # how often every link and every client says it is alive
PEER_TIMEOUT_S = 3.0  # silence after which a peer hub is lost: six missed heartbeats
CLIENT_TIMEOUT_S = 6.0  # silence after which a hub detaches a client: twelve missed PINGs (clients may be busier)
BAD_MESSAGE_INTERVAL_S = 10.0  # a hub logs and answers each sender's bad messages once per interval
MAX_BAD_MESSAGES = 100  # bad messages in one interval that make a hub drop the sender: no honest peer sends them
CLOSE_DRAIN_S = 2.0  # bounded wait for queued messages at shutdown before dropping them
BYE_LINGER_MS = 200  # at close, let a BYE already queued reach its peer, briefly
MAX_FRAME_BYTES = MAX_PAYLOAD_FRAME_BYTES + 1024  # a socket's ZMQ_MAXMSGSIZE: libzmq drops a peer sending more

# What a dpipes hub holds, by default (each configurable: a hub's arguments, a node's [limits]).
CLIENT_BACKLOG_MESSAGES = 100_000  # messages held for a client whose pipe is full; more detaches it
CLIENT_BACKLOG_BYTES = 64 * 1024 * 1024  # ...or payload bytes held so: a client that does not read is detached
MAX_CLIENTS = 512  # clients attached at once; one more ATTACH is refused
MAX_CLIENTS_PER_ADDRESS = 128  # of those, from one remote address or, over ipc, one local user
MAX_HELD_BYTES = 1024 * 1024 * 1024  # held for all senders together; past it data is refused over-limit. 64
# full 16 MiB stage windows fit: a pipeline of max_stages stages into this node, all stalled

Buffer: TypeAlias = bytes | bytearray | memoryview
Frames: TypeAlias = list[Any]  # header bytes, then payload buffers (bytes, memoryview, zmq.Frame)

_packb = msgpack.Packer(use_bin_type=True).pack


class VersionMismatch(DecodeError):
    """A well-formed header of another protocol version; ``header`` lets a hub answer it."""

    header: dict[Any, Any]

    def __init__(self, header: dict[Any, Any]) -> None:
        self.version = header.get("v")
        super().__init__(f"protocol version {self.version!r:.20} is not {PROTOCOL_VERSION}", header=header)


def _unpack_header(frame: Buffer) -> Any:
    return msgpack.unpackb(
        frame,
        raw=False,
        max_str_len=MAX_HEADER_BYTES,
        max_bin_len=MAX_HEADER_BYTES,
        max_array_len=MAX_CONTAINER_ITEMS,
        max_map_len=MAX_CONTAINER_ITEMS,
        max_ext_len=0,
    )


_CONTAINERS = frozenset({dict, list})  # what msgpack decodes maps and arrays as; the rest are leaves


def _check_depth(value: Any, name: str) -> None:
    """Raise DecodeError when field ``name``'s map ``value`` nests maps/arrays deeper than MAX_DEPTH.

    Level by level, and only containers go down to the next level, found by their exact type:
    leaves are looked at once, where they are, and a map of leaves (most request and reply
    bodies) is one pass. An Arrow message's map is checked once per batch, and a per-item
    generator cost more than the rest of its decoding. The error's text is made only for an
    error: every REQUEST and REPLY has a map.
    """
    level = [value]
    depth = 1
    while level:
        if depth > MAX_DEPTH:
            raise DecodeError(f"field {name!r} nests deeper than {MAX_DEPTH} levels")
        below: list[Any] = []
        for container in level:
            for item in container.values() if type(container) is dict else container:
                if type(item) in _CONTAINERS:
                    below.append(item)
        level = below
        depth += 1


# -- field checkers: each takes the raw header value and returns it or raises DecodeError ------


def _str(value: Any, name: str) -> str:
    if type(value) is not str:
        raise DecodeError(f"field {name!r} must be a string, got {type(value).__name__}")
    if len(value) > MAX_STRING_CHARS:
        raise DecodeError(f"field {name!r} is {len(value)} characters long (limit {MAX_STRING_CHARS})")
    return value


def _node_name(value: Any, name: str) -> str:
    if len(_str(value, name)) > MAX_NODE_NAME_CHARS:
        raise DecodeError(f"field {name!r} is {len(value)} characters long (node names: {MAX_NODE_NAME_CHARS})")
    return value


def _endpoint_name(value: Any, name: str) -> str:
    if len(_str(value, name)) > MAX_ENDPOINT_NAME_CHARS:
        raise DecodeError(
            f"field {name!r} is {len(value)} characters long (endpoint names: {MAX_ENDPOINT_NAME_CHARS})"
        )
    return value


def _int(value: Any, name: str) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise DecodeError(f"field {name!r} must be a non-negative 64-bit integer, got {value!r:.40}")
    return value


def _bool(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise DecodeError(f"field {name!r} must be a boolean, got {type(value).__name__}")
    return value


def _map(value: Any, name: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise DecodeError(f"field {name!r} must be a map, got {type(value).__name__}")
    _check_depth(value, name)
    return value


def _int_list(value: Any, name: str) -> list[int]:
    if type(value) is not list:
        raise DecodeError(f"field {name!r} must be an array, got {type(value).__name__}")
    for item in value:  # the array's length is bounded by the unpacker (MAX_CONTAINER_ITEMS)
        if type(item) is not int or not 0 <= item < 2**63:
            raise DecodeError(f"field {name!r} must hold non-negative 64-bit integers, got {item!r:.40}")
    return value


_BATCHED_KINDS = ("BYTES", "STDERR")  # data kinds without kind fields: a member is its payload


def _batched_kind(value: Any, name: str) -> str:
    if value not in _BATCHED_KINDS or type(value) is not str:
        raise DecodeError(f"field {name!r} must be one of {', '.join(_BATCHED_KINDS)}, got {value!r:.40}")
    return str(value)


_CHECKERS: dict[Any, Callable[[Any, str], Any]] = {str: _str, int: _int, bool: _bool, dict: _map, list: _int_list}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Message:
    """Common fields of every bus message; one subclass per kind."""

    src: str = ""
    dst: str = ""
    sid: int = 0
    seq: int = 0

    KIND: ClassVar[str] = ""
    HAS_PAYLOAD: ClassVar[bool] = False
    PAYLOAD_FRAMES: ClassVar[tuple[int, int]] = (0, 0)  # fewest and most payload frames of this kind
    _SPEC: ClassVar[tuple[tuple[str, Callable[[Any, str], Any], Any], ...]] = ()
    # _SPEC with each field's slot setter: what ``from_header`` sets a decoded field with
    _DECODE: ClassVar[tuple[tuple[str, Callable[[Any, str], Any], Any, Callable[[Any, Any], None]], ...]] = ()
    _FIELDS: ClassVar[tuple[str, ...]] = ()

    @property
    def payload_bytes(self) -> int:
        """Bytes carried in payload frames (what stream credit counts)."""
        return 0

    # One __eq__, __hash__ and __repr__ for every kind, rather than ones that ``dataclasses``
    # generates (and compiles) per class: 22 kinds made that a third of what importing the codec
    # costs, paid by every ``dpipes`` command.

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._FIELDS)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((self.__class__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._FIELDS)
        return f"{self.__class__.__qualname__}({fields})"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class _Payload(Message):
    """A message whose payload frames follow its header."""

    frames: tuple[Any, ...] = ()

    HAS_PAYLOAD: ClassVar[bool] = True
    PAYLOAD_FRAMES: ClassVar[tuple[int, int]] = (0, MAX_FRAMES - 1)

    @property
    def payload_bytes(self) -> int:
        frames = self.frames
        if len(frames) == 1:  # the common case, read once per message: no generator
            frame = frames[0]
            # A reader's frames are memoryviews already (a BATCH's members, received frames):
            # no second view to make.
            return frame.nbytes if type(frame) is memoryview else memoryview(frame).nbytes
        return sum(memoryview(f).nbytes for f in frames)


KINDS: dict[str, type[Message]] = {}
_COMMON = ("src", "dst", "sid", "seq")


def _slot_setter(cls: type[Message], name: str) -> Callable[[Any, Any], None]:
    """What sets field ``name`` of a ``cls`` (its slot's own ``__set__``), frozen or not."""
    setter: Callable[[Any, Any], None] = getattr(cls, name).__set__
    return setter


def _kind(name: str) -> Callable[[type[Message]], type[Message]]:
    """Register a message class under its wire kind name and derive its field spec."""

    def register(cls: type[Message]) -> type[Message]:
        spec = []
        for field in dataclasses.fields(cls):
            if field.name in _COMMON or field.name == "frames":
                continue
            base = {
                "str": str,
                "int": int,
                "bool": bool,
                "dict[str, Any]": dict,
                "list[int]": list,
                "list[dict[str, Any]]": list,
            }[str(field.type)]
            spec.append((field.name, field.metadata.get("check", _CHECKERS[base]), field.default))
        cls.KIND = name
        cls._SPEC = tuple(spec)
        cls._DECODE = tuple((name, check, default, _slot_setter(cls, name)) for name, check, default in spec)
        cls._FIELDS = tuple(field.name for field in dataclasses.fields(cls))
        KINDS[name] = cls
        return cls

    return register


@_kind("HELLO")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Hello(Message):
    """Opens a link (or attachment) of a peer hub: who it is and where it listens."""

    node: str = dataclasses.field(default="", metadata={"check": _node_name})
    instance: str = ""
    endpoints: dict[str, Any] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@_kind("WELCOME")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Welcome(Message):
    """The answer to an acceptable HELLO."""

    node: str = dataclasses.field(default="", metadata={"check": _node_name})
    instance: str = ""
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@_kind("PING")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Ping(Message):
    """Liveness, every HEARTBEAT_INTERVAL_S on every link and from every client."""


@_kind("PONG")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Pong(Message):
    """A hub's answer to a client's PING."""


@_kind("BYE")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Bye(Message):
    """An orderly goodbye, or the refusal of a HELLO, with the reason."""

    reason: str = ""


@_kind("ATTACH")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Attach(Message):
    """A client asks to become endpoint ``node/name``; ``host`` says where it runs."""

    name: str = dataclasses.field(default="", metadata={"check": _endpoint_name})
    host: str = ""
    shm_batch: bool = False


@_kind("ATTACHED")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Attached(Message):
    """The hub's answer to ATTACH: the client's address, and whether they share memory."""

    addr: str = ""
    shm: bool = False
    shm_batch: bool = False


@_kind("LINK")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Link(Message):
    """A hub tells its endpoints that a peer node came up or was lost."""

    node: str = dataclasses.field(default="", metadata={"check": _node_name})
    up: bool = False
    reason: str = ""


@_kind("REQUEST")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Request(Message):
    """A request; ``seq`` is its id."""

    method: str = ""
    body: dict[str, Any] = dataclasses.field(default_factory=dict)


@_kind("REPLY")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Reply(Message):
    """The answer to the REQUEST with the same ``seq``."""

    ok: bool = True
    body: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""


@_kind("CREDIT")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Credit(Message):
    """The receiver of stream ``sid`` lets its sender send ``bytes`` more."""

    bytes: int = 0


@_kind("EOF")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Eof(Message):
    """The sender of stream ``sid`` has sent everything: ``total`` payload bytes."""

    total: int = 0


@_kind("EOF_ACK")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class EofAck(Message):
    """The receiver has taken every byte up to EOF."""

    total: int = 0


@_kind("CANCEL")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Cancel(Message):
    """Either end abandons stream ``sid``."""

    reason: str = ""


@_kind("ERROR")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Error(Message):
    """A message sent to ``to`` could not be delivered or done, at ``node``."""

    code: str = ""
    message: str = ""
    node: str = ""
    to: str = ""


@_kind("BYTES")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Bytes(_Payload):
    """Raw byte chunks."""


@_kind("OBJECTS")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Objects(_Payload):
    """One msgpack batch of ``count`` objects, with their producer's metadata."""

    count: int = 0
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    PAYLOAD_FRAMES: ClassVar[tuple[int, int]] = (1, 1)


@_kind("ARROW")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Arrow(_Payload):
    """One part of an Arrow record batch (see dpipes.bus.arrow)."""

    arrow: dict[str, Any] = dataclasses.field(default_factory=dict)


@_kind("STDERR")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Stderr(_Payload):
    """A program's standard error bytes."""


@_kind("PIPES")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Pipes(_Payload):
    """Dagster Pipes messages of stage ``stage``, one JSON payload frame each."""

    stage: int = 0

    PAYLOAD_FRAMES: ClassVar[tuple[int, int]] = (1, MAX_FRAMES - 1)


@_kind("BATCH")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Batch(_Payload):
    """Consecutive one-frame messages of kind ``of`` of stream ``sid``, from ``seq`` on, in one frame."""

    of: str = dataclasses.field(default="BYTES", metadata={"check": _batched_kind})
    sizes: list[int] = dataclasses.field(default_factory=list)

    PAYLOAD_FRAMES: ClassVar[tuple[int, int]] = (1, 1)

    def members(self) -> list[Message]:
        """The messages this batch stands for, in order; payloads are views of its frame."""
        cls, src, dst, sid, seq = KINDS[self.of], self.src, self.dst, self.sid, self.seq
        view, at, out = self.frames[0], 0, []
        for i, size in enumerate(self.sizes):
            out.append(stream_message(cls, src, dst, sid, seq + i, (view[at : at + size],)))
            at += size
        return out


SHM_KINDS = ("BYTES", "OBJECTS", "ARROW", "STDERR", "PIPES")  # what an SHM may stand for


def _shm_kind(value: Any, name: str) -> str:
    if value not in SHM_KINDS or type(value) is not str:
        raise DecodeError(f"field {name!r} must be one of {', '.join(SHM_KINDS)}, got {value!r:.40}")
    return str(value)


@_kind("SHM")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Shm(Message):
    """A data message of kind ``of`` whose payload frames lie in the sender's shared memory."""

    of: str = dataclasses.field(default="BYTES", metadata={"check": _shm_kind})
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)
    handle: str = ""
    lease: int = 0
    sizes: list[int] = dataclasses.field(default_factory=list)
    offset: int = 0

    @property
    def payload_bytes(self) -> int:
        return sum(self.sizes)

    def inner_header(self) -> dict[str, Any]:
        """The header of the message this stands for (its kind fields still to be checked)."""
        return _inner_header(self.of, self.fields, self.src, self.dst, self.sid, self.seq)

    def inner(self, views: Sequence[memoryview]) -> Message:
        """The message this stands for, its payload frames ``views`` (``sizes`` bytes each).

        Raises:
            DecodeError: as ``from_header`` for the message's own header and payload.
        """
        return _inner(self.of, self.fields, self.src, self.dst, self.sid, self.seq, self.sizes, views)


def _inner_header(of: str, fields: dict[str, Any], src: str, dst: str, sid: int, seq: int) -> dict[str, Any]:
    header = {k: v for k, v in fields.items() if k not in _COMMON_KEYS}
    header.update(v=PROTOCOL_VERSION, kind=of, src=src, dst=dst, sid=sid, seq=seq)
    return header


def _inner(
    of: str,
    fields: dict[str, Any],
    src: str,
    dst: str,
    sid: int,
    seq: int,
    sizes: list[int],
    views: Sequence[memoryview],
) -> Message:
    """The message of kind ``of`` an ``SHM`` (or a ``SHM_BATCH`` member) stands for, over ``views``."""
    cls = KINDS[of]
    if not fields and not cls._SPEC:  # BYTES, STDERR: only the frames to check, once per 1 MiB chunk
        low, high = cls.PAYLOAD_FRAMES
        if low <= len(views) <= high and all(size <= MAX_PAYLOAD_FRAME_BYTES for size in sizes):
            return stream_message(cls, src, dst, sid, seq, tuple(views))
    elif cls is Arrow and len(fields) == 1 and type(arrow := fields.get("arrow")) is dict:
        # An Arrow batch written in place, once per batch: its map's nesting was bounded with the
        # fields that hold it (the SHM's, or the SHM_BATCH's members as a whole), and the decoder
        # checks what the map says; only the frames to check here, as from_header would.
        low, high = cls.PAYLOAD_FRAMES
        if low <= len(views) <= high and all(size <= MAX_PAYLOAD_FRAME_BYTES for size in sizes):
            return arrow_message(src, dst, sid, seq, arrow, tuple(views))
    return from_header(_inner_header(of, fields, src, dst, sid, seq), views)


_COMMON_KEYS = frozenset({"v", "kind", "src", "dst", "sid", "seq"})
_NO_SIZES: list[int] = []  # a member's sizes when it says none (read only)
_SHM_MEMBER_KEYS = ("fields", "handle", "lease", "sizes", "offset")  # an SHM's keys a SHM_BATCH member has


def _shm_members(value: Any, name: str) -> list[dict[str, Any]]:
    """A ``SHM_BATCH``'s members: at least one, each a map of ``SHM`` keys of their types."""
    if type(value) is not list:
        raise DecodeError(f"field {name!r} must be an array, got {type(value).__name__}")
    if not value:
        raise DecodeError(f"field {name!r} has no member")
    nested = False
    for member in value:  # the array's length is bounded by the unpacker (MAX_CONTAINER_ITEMS)
        # A member passes one test; the checks that name what is wrong run only when it fails.
        # Kind fields (an Arrow batch's map) are a map here, their nesting bounded by the walk of
        # the whole array below, which counts the array's and the member's levels too: checked
        # besides, key by key and walked on their own, they were a quarter of decoding a
        # SHM_BATCH of 10k-row Arrow batches (2.7 us a member, now 2.0).
        if type(member) is dict:
            handle, lease = member.get("handle", ""), member.get("lease", 0)
            sizes, offset = member.get("sizes", _NO_SIZES), member.get("offset", 0)
            fields = member.get("fields", _NO_FIELDS)
            if (
                type(fields) is dict
                and type(handle) is str
                and len(handle) <= MAX_STRING_CHARS
                and type(lease) is int
                and 0 <= lease < 2**63
                and type(offset) is int
                and 0 <= offset < 2**63
                and type(sizes) is list
                and all(type(size) is int and 0 <= size < 2**63 for size in sizes)
            ):
                if fields:
                    nested = True
                continue
        if type(member) is not dict:
            raise DecodeError(f"field {name!r} must hold maps, got {type(member).__name__}")
        for key, check in _SHM_MEMBER_CHECKS:
            if key in member:
                check(member[key], f"{name}.{key}")
        nested = True
    if nested:  # kind fields: the members' nesting as a whole within MAX_DEPTH
        _check_depth(value, name)
    return value


@_kind("SHM_BATCH")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class ShmBatch(Message):
    """Consecutive ``SHM`` messages of kind ``of`` of stream ``sid``, from ``seq`` on, in one transfer."""

    of: str = dataclasses.field(default="BYTES", metadata={"check": _shm_kind})
    members: list[dict[str, Any]] = dataclasses.field(default_factory=list, metadata={"check": _shm_members})

    @property
    def payload_bytes(self) -> int:
        return sum(sum(member.get("sizes", ())) for member in self.members)

    def inner(self, views: Callable[[str, str, int, list[int], int], Sequence[memoryview]]) -> list[Message]:
        """The messages this stands for, in order, their payload frames what ``views`` gives for
        (``src``, ``handle``, ``lease``, ``sizes``, ``offset``) of each member: as ``Shm.inner``
        for each of ``shms()``, without making those.

        Raises:
            DecodeError: as ``Shm.inner``, or as ``views`` raises it.
        """
        src, dst, sid, seq, of = self.src, self.dst, self.sid, self.seq, self.of
        out = []
        for i, member in enumerate(self.members):
            sizes = member.get("sizes", [])
            frames = views(src, member.get("handle", ""), member.get("lease", 0), sizes, member.get("offset", 0))
            out.append(_inner(of, member.get("fields", _NO_FIELDS), src, dst, sid, seq + i, sizes, frames))
        return out

    def shms(self) -> list[Shm]:
        """The ``SHM`` messages this stands for, in order (their keys checked by ``from_header``)."""
        out = []
        src, dst, sid, seq, of = self.src, self.dst, self.sid, self.seq, self.of
        for i, member in enumerate(self.members):
            msg = _new_message(Shm)
            _set_field(msg, "src", src)
            _set_field(msg, "dst", dst)
            _set_field(msg, "sid", sid)
            _set_field(msg, "seq", seq + i)
            _set_field(msg, "of", of)
            _set_field(msg, "fields", member.get("fields", {}))
            _set_field(msg, "handle", member.get("handle", ""))
            _set_field(msg, "lease", member.get("lease", 0))
            _set_field(msg, "sizes", member.get("sizes", []))
            _set_field(msg, "offset", member.get("offset", 0))
            out.append(msg)
        return out


_NO_FIELDS: dict[str, Any] = {}  # a member's fields when it has none (read only)
_SHM_MEMBER_CHECKS = tuple((name, check) for name, check, _default in Shm._SPEC if name in _SHM_MEMBER_KEYS)


@_kind("SHM_FREE")
@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class ShmFree(Message):
    """The receiver of SHM messages has done with these leases."""

    leases: list[int] = dataclasses.field(default_factory=list)


_new_message = object.__new__
_set_field = object.__setattr__  # how a frozen dataclass's own __init__ sets its fields
# The slots' own setters, for the fields every message has: ``object.__setattr__`` looks the slot
# up in the class each time first (a REPLY's seven fields took 0.5 us of its 1.2 us decode).
_set_src = _slot_setter(Message, "src")
_set_dst = _slot_setter(Message, "dst")
_set_sid = _slot_setter(Message, "sid")
_set_seq = _slot_setter(Message, "seq")
_set_frames = _slot_setter(_Payload, "frames")


def _unfrozen(cls: type[Message]) -> type[Any]:
    """A class of ``cls``'s layout whose fields plain assignment sets: a message under construction
    (see ``stream_message``), which then becomes a ``cls``, frozen."""
    # Both hooks, or the class keeps the frozen classes' Python-level hook and every assignment calls it.
    namespace = {"__slots__": (), "__setattr__": object.__setattr__, "__delattr__": object.__delattr__}
    return type(f"_Unfrozen{cls.__name__}", (cls,), namespace)


_Unfrozen = _unfrozen(_Payload)  # the layout of every kind without kind fields (BYTES, STDERR, ...)


def stream_message(cls: type[Message], src: str, dst: str, sid: int, seq: int, frames: tuple[Any, ...]) -> Message:
    """A payload message of a kind without kind fields (``BYTES``, ``STDERR``), built without
    ``__init__``'s keyword parsing: the same object ``cls(src=..., ...)`` makes, for a fraction of
    the cost. A reader takes one per member of a ``BATCH``.

    The fields are set on an ``_Unfrozen``, which has the same layout, and the object then becomes
    a ``cls`` (a ``__class__`` assignment, which Python allows between classes of one layout), frozen
    from then on: five ``object.__setattr__`` calls cost 3-4x that (a 64-byte member took about
    380 ns, now 110).
    """
    msg: Any = _new_message(_Unfrozen)  # Any: mypy takes the fields for the frozen classes' own
    msg.src = src
    msg.dst = dst
    msg.sid = sid
    msg.seq = seq
    msg.frames = frames
    msg.__class__ = cls
    return msg


_UnfrozenArrow = _unfrozen(Arrow)


def arrow_message(src: str, dst: str, sid: int, seq: int, arrow: dict[str, Any], frames: tuple[Any, ...]) -> Arrow:
    """An ``ARROW`` of checked fields, built as ``stream_message`` builds its kinds: a 10k-row
    batch from shared memory took 1.85 us in ``ShmBatch.inner`` through ``from_header``, now 0.7."""
    msg: Any = _new_message(_UnfrozenArrow)
    msg.src = src
    msg.dst = dst
    msg.sid = sid
    msg.seq = seq
    msg.arrow = arrow
    msg.frames = frames
    msg.__class__ = Arrow
    return msg


_UnfrozenShm = _unfrozen(Shm)


def shm_message(
    src: str,
    dst: str,
    sid: int,
    seq: int,
    of: str,
    *,
    fields: dict[str, Any],
    handle: str,
    lease: int,
    sizes: list[int],
    offset: int,
) -> Shm:
    """The ``SHM`` of a payload its sender wrote in place into shared memory, built as
    ``stream_message`` builds its kinds: once per Arrow batch sent to a hub on this host, where
    ``Shm(...)``'s keyword parsing took 1.1 us, this 0.5."""
    msg: Any = _new_message(_UnfrozenShm)
    msg.src = src
    msg.dst = dst
    msg.sid = sid
    msg.seq = seq
    msg.of = of
    msg.fields = fields
    msg.handle = handle
    msg.lease = lease
    msg.sizes = sizes
    msg.offset = offset
    msg.__class__ = Shm
    return msg


DATA_KINDS = frozenset({"BYTES", "OBJECTS", "ARROW", "STDERR", "PIPES", "BATCH", "SHM", "SHM_BATCH"})


def header_of(msg: Message) -> dict[str, Any]:
    """The header map of ``msg``, as it goes on the wire."""
    header: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": msg.KIND,
        "src": msg.src,
        "dst": msg.dst,
        "sid": msg.sid,
        "seq": msg.seq,
    }
    for name, _check, _default in msg._SPEC:
        header[name] = getattr(msg, name)
    return header


def encode(msg: Message) -> Frames:
    """Encode ``msg`` as ``[header, *payload]``; payload buffers are passed through uncopied."""
    header = _packb(header_of(msg))
    if msg.HAS_PAYLOAD:
        return [header, *msg.frames]  # type: ignore[attr-defined]
    return [header]


def packb_header(msg: Message) -> bytes:
    """The header frame of ``msg``: ``encode(msg)[0]``."""
    return _packb(header_of(msg))


def packb_request(src: str, dst: str, rid: int, method: str, body: dict[str, Any]) -> bytes:
    """The header frame of ``Request(src=src, dst=dst, seq=rid, method=method, body=body)``.

    The same bytes as ``packb_header`` of that message (the keys in its order), for a third of the
    cost: no message object is made and read back field by field. A request to another node is
    encoded anyway; this is one side of every round trip.
    """
    return _packb(
        {
            "v": PROTOCOL_VERSION,
            "kind": "REQUEST",
            "src": src,
            "dst": dst,
            "sid": 0,
            "seq": rid,
            "method": method,
            "body": body,
        }
    )


def packb_reply(src: str, dst: str, seq: int, ok: bool, body: dict[str, Any], error: str) -> bytes:
    """The header frame of ``Reply(src=src, dst=dst, seq=seq, ok=ok, body=body, error=error)``, as
    ``packb_request`` makes a request's: the other side of every round trip."""
    return _packb(
        {
            "v": PROTOCOL_VERSION,
            "kind": "REPLY",
            "src": src,
            "dst": dst,
            "sid": 0,
            "seq": seq,
            "ok": ok,
            "body": body,
            "error": error,
        }
    )


def packb_shms(src: str, dst: str, sid: int, seq: int, of: str, members: Sequence[Mapping[str, Any]]) -> bytes:
    """The header frame of the ``SHM`` (one member) or ``SHM_BATCH`` (several) standing for the
    consecutive messages of kind ``of`` from ``seq`` on, each member the keys ``fields``,
    ``handle``, ``lease``, ``sizes`` and ``offset`` of one of them (absent: their defaults)."""
    if len(members) == 1:
        return _packb(
            {
                "v": PROTOCOL_VERSION,
                "kind": "SHM",
                "src": src,
                "dst": dst,
                "sid": sid,
                "seq": seq,
                "of": of,
                **members[0],
            }
        )
    return _packb(
        {
            "v": PROTOCOL_VERSION,
            "kind": "SHM_BATCH",
            "src": src,
            "dst": dst,
            "sid": sid,
            "seq": seq,
            "of": of,
            "members": members,
        }
    )


def stream_header_prefix(kind: str, src: str, dst: str, sid: int) -> bytes:
    """The constant part of the headers of one stream's messages of ``kind`` with no kind fields.

    ``prefix + packb_int(seq)`` is then the whole header, the same bytes ``encode`` makes, for a
    fraction of the cost: the hot path of small stream messages.
    """
    assert not KINDS[kind]._SPEC, f"{kind} has kind fields"
    header = {"v": PROTOCOL_VERSION, "kind": kind, "src": src, "dst": dst, "sid": sid, "seq": 0}
    packed = _packb(header)
    return packed[: -len(_packb(0))]


packb_int: Callable[[int], bytes] = _packb
"""Pack one integer as msgpack (the ``seq`` that ends a header made by ``stream_header_prefix``)."""


_NO_KEY = object()


def decode_header(frame: Buffer, payload_frames: int | None = None) -> dict[str, Any]:
    """Decode and check the common part of a header frame; kind fields are checked later.

    Args:
        frame: the header frame.
        payload_frames: how many payload frames follow it, to check against the kind; None
            leaves that to ``from_header``.

    Raises:
        VersionMismatch: a header map with an integer ``v`` other than ``PROTOCOL_VERSION``.
        DecodeError: the frame is not a version-``PROTOCOL_VERSION`` header within the limits.
    """
    if len(frame) > MAX_HEADER_BYTES:
        raise DecodeError(f"header frame is {len(frame)} bytes (limit {MAX_HEADER_BYTES})")
    try:
        header = _unpack_header(frame)
    except Exception as exc:  # msgpack raises several types for bad input; all mean the same
        raise DecodeError(f"header frame is not valid msgpack: {exc!s:.100}") from None
    if type(header) is not dict:
        raise DecodeError(f"header must be a msgpack map, got {type(header).__name__}")
    version = header.get("v", _NO_KEY)
    if type(version) is not int:  # True == 1 in Python: a boolean must not pass for a version
        what = "is missing" if version is _NO_KEY else f"must be an integer, got {type(version).__name__}"
        raise DecodeError(f"header key 'v' {what}", header=header)
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(header)
    try:
        kind, src, dst, sid, seq = header["kind"], header["src"], header["dst"], header["sid"], header["seq"]
    except KeyError as exc:
        raise DecodeError(f"header key {exc.args[0]!r} is missing", header=header) from None
    cls = KINDS.get(kind) if type(kind) is str else None  # a list is not hashable: test the type first
    if cls is None:
        raise DecodeError(f"unknown message kind {kind!r:.40}", header=header)
    # Every message a hub routes passes here: one test of the common case, and the checks that
    # name what is wrong only when it fails.
    if not (
        type(src) is str
        and type(dst) is str
        and len(src) <= MAX_STRING_CHARS
        and len(dst) <= MAX_STRING_CHARS
        and type(sid) is int
        and type(seq) is int
        and 0 <= sid < 2**63
        and 0 <= seq < 2**63
    ):
        try:
            _str(src, "src")
            _str(dst, "dst")
            _int(sid, "sid")
            _int(seq, "seq")
        except DecodeError as exc:
            exc.header = header
            raise
    if payload_frames is not None:
        low, high = cls.PAYLOAD_FRAMES
        if not low <= payload_frames <= high:
            raise DecodeError(_payload_count_error(cls, payload_frames), header=header)
    return header


def _payload_count_error(cls: type[Message], count: int) -> str:
    low, high = cls.PAYLOAD_FRAMES
    if not high:
        return f"{cls.KIND} carries no payload, got {count} extra frames"
    if low == high:
        return f"{cls.KIND} carries exactly {low} payload frame(s), got {count}"
    if count < low:
        return f"{cls.KIND} carries at least {low} payload frame(s), got {count}"
    return f"{cls.KIND} has {count} payload frames (limit {high})"


def from_header(header: Mapping[str, Any], payload: Sequence[Any] = ()) -> Message:
    """Build the message for a header already passed through ``decode_header``.

    Fields are set on a bare instance, as the dataclass's own ``__init__`` sets them, without its
    keyword parsing: this runs for every message a hub delivers to an endpoint.

    Raises:
        DecodeError: a kind field has the wrong type or breaks a limit, or the payload does not
            fit the kind.
    """
    cls = KINDS[header["kind"]]
    # A round trip's two halves first, each in one test of its fields.
    if cls is Reply:
        if (msg := _reply_message(header, payload)) is not None:
            return msg
    elif cls is Request and (msg := _request_message(header, payload)) is not None:
        return msg
    msg = _new_message(cls)
    _set_src(msg, header["src"])
    _set_dst(msg, header["dst"])
    _set_sid(msg, header["sid"])
    _set_seq(msg, header["seq"])
    try:
        for name, check, default, set_value in cls._DECODE:
            value = header.get(name, dataclasses.MISSING)
            if value is dataclasses.MISSING:
                if default is dataclasses.MISSING:  # a default_factory field: an empty map or array
                    value = [] if check is _int_list or check is _shm_members else {}
                else:
                    value = default
            set_value(msg, check(value, name))
        if isinstance(msg, Shm) and len(msg.sizes) > MAX_FRAMES - 1:
            raise DecodeError(f"SHM has {len(msg.sizes)} sizes (limit {MAX_FRAMES - 1})")
        if isinstance(msg, ShmBatch):
            _check_shm_batch(msg)
        low, high = cls.PAYLOAD_FRAMES
        if not low <= len(payload) <= high:
            raise DecodeError(_payload_count_error(cls, len(payload)))
        if cls.HAS_PAYLOAD:
            frames = []
            for frame in payload:
                view = frame if isinstance(frame, memoryview) else memoryview(frame)
                if view.nbytes > MAX_PAYLOAD_FRAME_BYTES:
                    raise DecodeError(
                        f"{cls.KIND} payload frame is {view.nbytes} bytes (limit {MAX_PAYLOAD_FRAME_BYTES})"
                    )
                frames.append(view)
            if isinstance(msg, Batch):
                _check_batch(msg, frames[0].nbytes)
            elif isinstance(msg, Objects) and msg.count > frames[0].nbytes:
                raise DecodeError(
                    f"OBJECTS count {msg.count} cannot fit a {frames[0].nbytes}-byte batch"
                    " (every object takes at least one byte)"
                )
            _set_frames(msg, tuple(frames))
    except DecodeError as exc:
        exc.header = dict(header)
        raise
    return msg


_set_request_method = _slot_setter(Request, "method")
_set_request_body = _slot_setter(Request, "body")
_set_reply_ok = _slot_setter(Reply, "ok")
_set_reply_body = _slot_setter(Reply, "body")
_set_reply_error = _slot_setter(Reply, "error")


def _reply_message(header: Mapping[str, Any], payload: Sequence[Any]) -> Message | None:
    """The REPLY of ``header`` when all its fields are sound, found in one test of them rather
    than a checker call per field (a REPLY took 1.2 us, now 0.7-0.8; a REQUEST 1.1, now 0.6); None when
    any is not: then ``from_header``'s own checks name what is wrong."""
    ok, body, error = header.get("ok", True), header.get("body", _NO_KEY), header.get("error", "")
    if body is _NO_KEY:
        body = {}
    if type(ok) is not bool or type(body) is not dict or type(error) is not str or len(error) > MAX_STRING_CHARS:
        return None
    if payload or not _sound_depth(body):
        return None
    msg = _new_message(Reply)
    _set_src(msg, header["src"])
    _set_dst(msg, header["dst"])
    _set_sid(msg, header["sid"])
    _set_seq(msg, header["seq"])
    _set_reply_ok(msg, ok)
    _set_reply_body(msg, body)
    _set_reply_error(msg, error)
    return msg


def _request_message(header: Mapping[str, Any], payload: Sequence[Any]) -> Message | None:
    """The REQUEST of ``header`` when all its fields are sound (as ``_reply_message``)."""
    method, body = header.get("method", ""), header.get("body", _NO_KEY)
    if body is _NO_KEY:
        body = {}
    if type(method) is not str or len(method) > MAX_STRING_CHARS or type(body) is not dict:
        return None
    if payload or not _sound_depth(body):
        return None
    msg = _new_message(Request)
    _set_src(msg, header["src"])
    _set_dst(msg, header["dst"])
    _set_sid(msg, header["sid"])
    _set_seq(msg, header["seq"])
    _set_request_method(msg, method)
    _set_request_body(msg, body)
    return msg


def _sound_depth(body: dict[str, Any]) -> bool:
    """Whether a body map nests within ``MAX_DEPTH``; a map of leaves (most bodies) in one look."""
    for value in body.values():
        if type(value) in _CONTAINERS:
            try:
                _check_depth(body, "body")
            except DecodeError:
                return False
            return True
    return True


def _check_batch(batch: Batch, nbytes: int) -> None:
    sizes = batch.sizes
    if not batch.sid:
        raise DecodeError("BATCH outside a stream (sid 0): batches carry a stream's messages")
    if not sizes:
        raise DecodeError("BATCH with no member (sizes is empty)")
    if batch.seq + len(sizes) > 2**63:
        raise DecodeError(f"BATCH of {len(sizes)} members from seq {batch.seq} runs past 2**63 - 1")
    if sum(sizes) != nbytes:
        raise DecodeError(f"BATCH sizes add up to {sum(sizes)} bytes, its payload frame has {nbytes}")


def _check_shm_batch(batch: ShmBatch) -> None:
    if not batch.sid:
        raise DecodeError("SHM_BATCH outside a stream (sid 0): batches carry a stream's messages")
    if batch.seq + len(batch.members) > 2**63:
        raise DecodeError(f"SHM_BATCH of {len(batch.members)} members from seq {batch.seq} runs past 2**63 - 1")
    for member in batch.members:
        if len(member.get("sizes", ())) > MAX_FRAMES - 1:
            raise DecodeError(f"SHM_BATCH member has {len(member['sizes'])} sizes (limit {MAX_FRAMES - 1})")


def decode(frames: Sequence[Any]) -> Message:
    """Decode ``[header, *payload]`` (bytes, memoryviews or zmq.Frame buffers) into a message.

    Raises:
        DecodeError: anything about the message is malformed or over a limit.
    """
    if not frames:
        raise DecodeError("empty message: no header frame")
    if len(frames) > MAX_FRAMES:
        raise DecodeError(f"message has {len(frames)} frames (limit {MAX_FRAMES})")
    return from_header(decode_header(frames[0], len(frames) - 1), frames[1:])


_SCHEMA_TYPES: dict[Callable[[Any, str], Any], dict[str, Any]] = {
    _str: {"type": "string", "maxLength": MAX_STRING_CHARS},
    _node_name: {"type": "string", "maxLength": MAX_NODE_NAME_CHARS},
    _endpoint_name: {"type": "string", "maxLength": MAX_ENDPOINT_NAME_CHARS},
    _int: {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    _bool: {"type": "boolean"},
    _map: {"type": "object"},
    _int_list: {
        "type": "array",
        "maxItems": MAX_CONTAINER_ITEMS,
        "items": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    },
    _batched_kind: {"enum": list(_BATCHED_KINDS)},
    _shm_kind: {"enum": list(SHM_KINDS)},
}
_SCHEMA_TYPES[_shm_members] = {
    "type": "array",
    "minItems": 1,
    "maxItems": MAX_CONTAINER_ITEMS,
    "items": {
        "type": "object",
        "properties": {name: _SCHEMA_TYPES[check] for name, check in _SHM_MEMBER_CHECKS},
    },
}


def header_schema() -> dict[str, Any]:
    """The JSON schema of a decoded header map, for implementers in other languages.

    The repository keeps it as ``bus/header_schema.json``; a test checks that the file equals this.
    """
    common = {
        "v": {"type": "integer", "const": PROTOCOL_VERSION},
        "src": _SCHEMA_TYPES[_str],
        "dst": _SCHEMA_TYPES[_str],
        "sid": _SCHEMA_TYPES[_int],
        "seq": _SCHEMA_TYPES[_int],
    }
    variants = []
    for name, cls in sorted(KINDS.items()):
        props: dict[str, Any] = {"kind": {"const": name}}
        props.update({field: _SCHEMA_TYPES[check] for field, check, _default in cls._SPEC})
        variants.append({"title": cls.__name__, "properties": props})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "dpipes-bus-header",
        "title": f"dpipes bus message header, protocol version {PROTOCOL_VERSION}",
        "description": "A msgpack map; payload frames follow it. See dpipes.bus.codec for the spec.",
        "type": "object",
        "required": ["v", "kind", *_COMMON],
        "properties": {**common, "kind": {"enum": sorted(KINDS)}},
        "oneOf": variants,
    }


def split_addr(addr: str) -> tuple[str, str]:
    """``"node/endpoint"`` -> ``("node", "endpoint")``; a bare ``"node"`` names the hub."""
    node, _, endpoint = addr.partition("/")
    return node, endpoint
