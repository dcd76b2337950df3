"""Routing and delivery: a message for ``node/endpoint`` to a local endpoint or client, onto the
link to its node, or back to its sender as an ``ERROR``; shared-memory payloads on the way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import zmq

from dpipes.bus import codec, shm
from dpipes.bus.codec import (
    Message,
)
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, DecodeError
from dpipes.bus.hub.state import (
    _Client,
    _Link,
)

if TYPE_CHECKING:
    from dpipes.bus.hub import Hub

log = logging.getLogger(__name__)

# A same-host client's payload for another node (an SHM message) leaves from the segment it lies
# in, zero-copy, from this size, not copied first into ZeroMQ's own messages as frames up to
# dpipes.bus.pump.COPY_UP_TO_BYTES are: relaying a plugin worker's Arrow batches (frames of
# 0.25-1 MiB) to another node, memmove fell from 28% to 12% of the relaying node's loop thread; a
# PUSH of 512 KiB views of a mapping over TCP took 0.25-0.33 CPU-s/GB in all, against 0.45-0.52.
SHARE_SHM_FROM_BYTES = 64 << 10
_SHARED_KINDS = ("SHM", "SHM_BATCH")  # messages whose payloads lie in their sender's shared memory
_LEASE_KINDS = frozenset({*_SHARED_KINDS, "SHM_FREE"})  # what a hub maps or frees before (or instead of) delivery


class Routing:
    """How a hub delivers what it routes (a part of :class:`~dpipes.bus.hub.Hub`)."""

    _pool: shm.Pool | None  # made when a same-host client first gets a large payload
    _frees: shm.Frees  # leases our endpoints have done with
    _handles_due: list[_Client]  # clients with SHM messages of ours to send at the end of this pass

    def _route(self: Hub, ident: bytes, header: dict[str, Any], frames: list[Any], node: str, name: str) -> None:
        """Deliver a message from ``ident`` whose header is decoded, to ``node/name`` (its ``dst``,
        split by the boundary, which looked at its node already); ``frames`` as the ROUTER gave them."""
        if self._tap_topics:
            self._publish_tap(header, frames[2:])
        if node == self.node:
            party = self._local.get(name)
            if party is None:
                if not name and header["kind"] == "ERROR":  # a peer's ERROR about what this hub sent it
                    if (error := self._header_message(ident, header)) is not None:
                        assert isinstance(error, codec.Error)
                        self._on_peer_error(self._sender(ident).key, error)
                    return
                self._bounce(header, "no-endpoint", f"no endpoint {name!r:.100} on node {self.node}")
            elif isinstance(party, Endpoint):
                try:
                    # no payload (requests, replies, credit): no list to build, and no comprehension to call
                    msg = codec.from_header(header, [f.buffer for f in frames[2:]] if len(frames) > 2 else ())
                    leased = header["kind"] in _LEASE_KINDS  # one test of the common case (requests, replies, data)
                    if not leased:
                        shared = None
                    elif isinstance(msg, codec.Shm):
                        shared = [self._unshared(msg)]
                    elif isinstance(msg, codec.ShmBatch):  # every member mapped before any is delivered
                        shared = msg.inner(self._reader.views)
                    else:
                        shared = None
                except DecodeError as exc:
                    self._bad(self._sender(ident), exc, header)
                    return
                if not leased:
                    party._deliver(msg)
                elif shared is not None:
                    for inner in shared:
                        party._deliver_shared(inner)
                elif isinstance(msg, codec.ShmFree):
                    self._release_leases(msg)
            elif header["kind"] in _SHARED_KINDS and not party.shm:
                self._route_unshared(ident, header, party)
            elif header["kind"] == "SHM_BATCH" and not party.shm_batch:
                self._route_shm_members(ident, header, party)
            elif party.shm and self._from_link(header) and _payload_bytes(frames) >= shm.MIN_PAYLOAD_BYTES:
                if not self._hand(party, header, frames[2:], packed=True):
                    self._to_client(party, frames[1:])
            else:
                self._to_client(party, frames[1:])
            return
        if header["kind"] == "SHM_FREE":  # leases of ours a client read (see _hand): no further
            self._release_own(ident, header)
            return
        link = self._by_node.get(node)
        if link is None:
            self._bounce(header, "no-route", f"node {self.node} has no link to node {node!r:.100}")
            return
        if header["kind"] in _SHARED_KINDS:  # handles mean nothing on another host
            self._route_unshared(ident, header, link)
            return
        link.pump.send(frames[1:])

    def _unshared(self: Hub, msg: codec.Shm) -> Message:
        """The message an SHM stands for, its payload frames views of the sender's segment.

        Raises:
            DecodeError: the handle names no segment we can map, or the message inside is malformed.
        """
        return msg.inner(self._reader.views(msg.src, msg.handle, msg.lease, msg.sizes, msg.offset))

    def _route_unshared(self: Hub, ident: bytes, header: dict[str, Any], to: _Client | _Link) -> None:
        """An SHM (or SHM_BATCH) for a party we share no memory with: the message (each message) it
        stands for, copied out on the way (to a peer's link, its large frames straight from the
        segment into the socket: ``_zero_copy``)."""
        try:
            shm_msg = codec.from_header(header)
            members = shm_msg.shms() if isinstance(shm_msg, codec.ShmBatch) else [shm_msg]
            # zmq holds the views until sent; then they are freed
            messages = [codec.encode(self._unshared(member)) for member in members]  # type: ignore[arg-type]
        except DecodeError as exc:
            self._bad(self._sender(ident), exc, header)
            return
        for frames in messages:
            if isinstance(to, _Client):
                self._to_client(to, frames)
            else:
                to.pump.send(_zero_copy(frames))

    def _route_shm_members(self: Hub, ident: bytes, header: dict[str, Any], client: _Client) -> None:
        """A SHM_BATCH for a same-host client that takes no batches: each member as an SHM."""
        try:
            batch = codec.from_header(header)
        except DecodeError as exc:
            self._bad(self._sender(ident), exc, header)
            return
        assert isinstance(batch, codec.ShmBatch)
        for member in batch.shms():
            self._to_client(client, [codec.packb_header(member)])

    def _from_link(self: Hub, header: dict[str, Any]) -> bool:
        """Whether a message comes from another node (a peer's, checked at the boundary)."""
        return codec.split_addr(header["src"])[0] != self.node

    def _hand(self: Hub, client: _Client, header: dict[str, Any], payload: Sequence[Any], *, packed: bool) -> bool:
        """A large message for a same-host client: its payload copied once into our pool, the
        client sent the handle instead of the bytes through its socket, at the end of this loop
        pass with the others leased for it (a stream's run of them as one ``SHM_BATCH``, when it
        takes those); False, nothing sent, when that kind cannot be or the pool is full.

        For a message from another node, the client tells its ``src`` that it read the lease;
        that ``SHM_FREE`` stops here (:meth:`_release_own`). A byte stream's chunks from another
        node are leased ``packed``, end to end (``shm.PACKED_LEASE_BYTES``): a plugin worker
        reads what spans two of them in one piece.
        """
        if self._pool is None:
            self._pool = shm.Pool()
        member = shm.shared_member(self._pool, header, payload, packed=packed)
        if member is None:
            return False
        if not client.handles:
            if not self._handles_due:
                assert self._loop is not None
                self._loop.call_soon(self._flush_handles)
            self._handles_due.append(client)
        client.handles.append((header, member))
        return True

    def _flush_handles(self: Hub) -> None:
        clients, self._handles_due = self._handles_due, []
        for client in clients:
            if client.handles and not self._closed:
                self._send_handles(client)

    def _send_handles(self: Hub, client: _Client) -> None:
        handles, client.handles = client.handles, []
        for frame in shm.handle_frames(handles, batch=client.shm_batch):
            self._to_client(client, [frame])

    def _release_own(self: Hub, ident: bytes, header: dict[str, Any]) -> None:
        """An ``SHM_FREE`` from a client for another node: the leases are ours (:meth:`_hand`)."""
        if (msg := self._header_message(ident, header)) is not None:
            assert isinstance(msg, codec.ShmFree)
            self._release_leases(msg)

    def _release_leases(self: Hub, msg: codec.ShmFree) -> None:
        """Leases of our pool that ``msg.src`` has read: only those made out to it are given back."""
        if self._pool is not None:
            self._pool.release(msg.leases, msg.src)

    def _header_message(self: Hub, ident: bytes, header: dict[str, Any]) -> codec.Message | None:
        """The message of a payload-less ``header`` from ``ident``; None once answered as malformed."""
        try:
            return codec.from_header(header)
        except DecodeError as exc:
            self._bad(self._sender(ident), exc, header)
            return None

    def _free_later(self: Hub, sender: str, lease: int, nbytes: int = 0) -> None:
        """Our reader dropped a lease's views (maybe inside a garbage collection): tell its sender soon."""
        self._frees.add(sender, lease, nbytes)

    def _send_frees(self: Hub, frees: dict[str, list[int]]) -> None:
        if self._closed:
            return
        for sender, leases in frees.items():
            party = self._local.get(codec.split_addr(sender)[1])
            if isinstance(party, _Client) and party.addr == sender:  # gone: its pool went with it
                self._to_client(party, codec.encode(codec.ShmFree(src=f"{self.node}/", dst=sender, leases=leases)))

    def _send_local(self: Hub, msg: Message) -> None:
        """The transport of in-process endpoints."""
        node, name = codec.split_addr(msg.dst)
        if self._tap_topics:
            self._publish_tap(codec.header_of(msg), getattr(msg, "frames", ()))
        if node == self.node:
            party = self._local.get(name)
            if party is None:
                self._bounce(codec.header_of(msg), "no-endpoint", f"no endpoint {name!r} on node {self.node}")
            elif isinstance(party, Endpoint):
                if isinstance(msg, codec.ShmFree):
                    self._release_leases(msg)
                    return
                party._deliver(msg)
            else:
                shared = party.shm and msg.HAS_PAYLOAD and msg.payload_bytes >= shm.MIN_PAYLOAD_BYTES
                if not (shared and self._hand(party, codec.header_of(msg), msg.frames, packed=False)):  # type: ignore[attr-defined]
                    self._to_client(party, codec.encode(msg))
            return
        link = self._by_node.get(node)
        if link is None:
            self._bounce(codec.header_of(msg), "no-route", f"node {self.node} has no link to node {node!r}")
            return
        link.pump.send(codec.encode(msg))

    def _send_frames_local(self: Hub, dst: str, frames: list[Any]) -> None:
        """The transport of in-process endpoints, for messages they encoded themselves."""
        link = self._by_node.get(dst.partition("/")[0])
        if link is not None:
            if self._tap_topics:  # mirrored as encoded: the header read once, nothing encoded again
                try:
                    header = codec.decode_header(frames[0])
                except DecodeError as exc:  # our own endpoint made it: a bug, not hostile input
                    raise BusError(f"node {self.node}: an endpoint encoded a bad message: {exc}") from exc
                self._publish_tap(header, frames[1:])
            link.pump.send(frames)  # the hot path: straight onto the link
            return
        try:
            msg = codec.decode(frames)
        except DecodeError as exc:  # our own endpoint made it: a bug, not hostile input
            raise BusError(f"node {self.node}: an endpoint encoded a bad message: {exc}") from exc
        self._send_local(msg)

    def _bounce(self: Hub, header: dict[str, Any], code: str, text: str) -> None:
        if header["kind"] in ("ERROR", "CREDIT", "EOF_ACK", "LINK", "PONG", "SHM_FREE"):
            self.stats[header["src"]].dropped += 1
            log.debug("node %s: dropped undeliverable %s to %s", self.node, header["kind"], header["dst"])
            return
        error = codec.Error(
            src=f"{self.node}/",
            dst=header["src"],
            sid=header["sid"],
            seq=header["seq"],
            code=code,
            message=text,
            node=self.node,
            to=header["dst"],
        )
        src_node = codec.split_addr(header["src"])[0]
        if src_node == self.node:
            self._send_local(error)
        elif (link := self._by_node.get(src_node)) is not None:
            self._link_send(link, error)


class _InProcess:
    """The transport of a hub's in-process endpoints."""

    __slots__ = ("send", "send_frames")

    def __init__(self, hub: Hub) -> None:
        self.send = hub._send_local
        self.send_frames = hub._send_frames_local

    def lease_filled(self, dst: str, nbytes: int, fill: Callable[[memoryview], Sequence[int]]) -> shm.Lease | None:
        """In-process endpoints hand their payloads over by reference already (and the hub copies
        what goes to a same-host client into its own pool)."""
        return None


def _payload_bytes(frames: list[Any]) -> int:
    """Payload bytes of a message as the ROUTER gave it (identity, header, payload frames)."""
    return sum(len(f) for f in frames[2:])


def _zero_copy(frames: list[Any]) -> list[Any]:
    """``frames`` with each large payload view of shared memory as a zero-copy ``zmq.Frame``: it
    goes from the segment into the socket, not first copied into a message of ZeroMQ's own (see
    ``SHARE_SHM_FROM_BYTES``)."""
    return [zmq.Frame(f, copy=False) if len(f) >= SHARE_SHM_FROM_BYTES else f for f in frames]
