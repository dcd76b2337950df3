"""Clients attached to a hub: ATTACH, reserved names, the idle rule, BYE, and what is held for a
client that does not read (see *Sessions* in :mod:`dpipes.bus.codec`).

A client under a reserved name (a node's plugin worker) may go at any point of a stream it sends:
killed by a cancel, by SIGKILL, failed by its own bug. Its readers would then wait for an end that
never comes, so the hub keeps the streams such a client opened and did not end with ``EOF``; when
the node releases the name (:meth:`Clients.release`: its worker has exited and its exit is
reported), the hub cancels each in the client's name, with the reason the node gives. A reader
sees the stream fail, never a clean end of a partial output, and what the client sent before
the ``CANCEL`` reaches it first (the ``CANCEL`` goes the same way, behind it).
"""

from __future__ import annotations

import collections
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import zmq

from dpipes.bus import codec
from dpipes.bus.codec import (
    CLIENT_BACKLOG_BYTES,
    CLIENT_BACKLOG_MESSAGES,
    CLIENT_TIMEOUT_S,
    HEARTBEAT_INTERVAL_S,
    MAX_CLIENTS,
    MAX_CLIENTS_PER_ADDRESS,
    MAX_STRING_CHARS,
)
from dpipes.bus.endpoint import Endpoint, StreamCancelled
from dpipes.bus.errors import BusError, DecodeError, PeerLost
from dpipes.bus.hub.state import (
    UNLINKED,
    _Client,
    _over_ipc,
    _peer_address,
    _Sender,
)
from dpipes.bus.pump import send_frames

if TYPE_CHECKING:
    from dpipes.bus.hub import Hub

log = logging.getLogger(__name__)

MAX_OPEN_STREAMS_KEPT = 1024  # per reserved client: a worker has a few outputs and one Pipes stream

__all__ = ["CLIENT_BACKLOG_BYTES", "CLIENT_BACKLOG_MESSAGES", "MAX_CLIENTS", "MAX_CLIENTS_PER_ADDRESS", "Clients"]


class Clients:
    """The clients attached to a hub's ROUTER (a part of :class:`~dpipes.bus.hub.Hub`)."""

    _client_ids: int  # clients named by the hub so far
    _left_open: dict[str, _Client]  # reserved names whose clients left streams unended, until released

    def reserve(self: Hub, name: str) -> str:
        """Hold the name ``node/name`` for a client that will ATTACH with it (a plugin worker the
        node is about to fork); its address.

        Until that client attaches, messages to the name wait here, in order, within
        ``CLIENT_BACKLOG_MESSAGES`` (what a sender may send before the client grants credit is the
        protocol's initial credit per stream, so this bounds nothing new); then they go to it. The
        first ATTACH naming it over the hub's ``ipc://`` path takes it (a process of this host,
        whose uid the hub checks); one over TCP is refused as for a name that is taken.
        """
        if not name or "/" in name:
            raise ValueError(f"invalid endpoint name {name!r}")
        if name in self._local:
            raise BusError(f"endpoint {self.node}/{name} already exists")
        self._left_open.pop(name, None)
        addr = f"{self.node}/{name}"
        self._local[name] = _Client(ident=b"", addr=addr, last_heard=time.monotonic(), reserved=True, open_streams={})
        return addr

    def release(self: Hub, name: str, reason: str = "") -> None:
        """Drop ``node/name``: a reservation nobody claimed, or the client attached under it (it
        is gone: what it still had queued here is dropped). Every stream that client sent and did
        not end, now or before it left, is cancelled in its name, ``reason`` saying why. Idempotent."""
        party = self._local.get(name)
        if isinstance(party, _Client):
            self.held.release(party.backlog_bytes)
            held, party.backlog, party.backlog_bytes = list(party.backlog), collections.deque(), 0
            if party.reserved:
                del self._local[name]
            else:
                self._detach(party)
            for frames in held:  # never delivered: their senders learn it, as for a name that is gone
                try:
                    header = codec.decode_header(frames[0])
                except DecodeError:
                    continue
                self._bounce(header, "no-endpoint", f"endpoint {name!r} on node {self.node} is gone")
        if (left := self._left_open.pop(name, None)) is not None:
            self._cancel_open_streams(left, reason or f"endpoint {left.addr} is gone")

    def client_is_local(self: Hub, addr: str) -> bool:
        """Whether the client at ``addr`` attached over our ``ipc://`` path, so runs on this host.

        The kernel says so, not the client: only a process of this host can connect to a Unix
        socket, and ZeroMQ reports a TCP peer's address as an IP literal, an IPC peer's otherwise.
        """
        party = self._local.get(codec.split_addr(addr)[1]) if codec.split_addr(addr)[0] == self.node else None
        return isinstance(party, _Client) and party.local

    def _on_attach(self: Hub, ident: bytes, frames: list[Any]) -> None:
        try:
            attach = codec.decode([f.buffer for f in frames[1:]])
        except DecodeError as exc:
            self._note_bad(self.stats[UNLINKED], UNLINKED, exc)  # it waits for an answer: always give one
            error = self._bad_message_error(_Sender(UNLINKED, ident), exc.header, exc)
            self._router_send(ident, codec.encode(error))
            return
        assert isinstance(attach, codec.Attach)
        name = attach.name
        if not name:
            self._client_ids += 1
            name = f"client-{self._client_ids}-{os.urandom(3).hex()}"
        held = self._local.get(name)
        if isinstance(held, _Client) and held.reserved and _over_ipc(frames[1]):  # the worker it was held for
            held.ident, held.reserved, held.last_heard, held.local = ident, False, time.monotonic(), True
            held.shm = bool(self._host_id) and attach.host == self._host_id  # as for any client over ipc://
            held.shm_batch = held.shm and attach.shm_batch
            if self._security is not None:
                held.user_id = frames[1].get("User-Id")
            self._clients[ident] = held
            attached = codec.Attached(
                src=f"{self.node}/", dst=held.addr, addr=held.addr, shm=held.shm, shm_batch=held.shm
            )
            self._router_send(ident, codec.encode(attached))
            if held.backlog:
                self._flush_client(held)
            return
        source = _peer_address(frames[1])
        refusal = ""
        if "/" in name or name in self._local:
            refusal = f"endpoint name {name!r:.100} is taken or invalid on node {self.node}"
        elif len(self._clients) >= self.max_clients:
            refusal = f"node {self.node} has {len(self._clients)} clients attached, its limit"
        elif sum(c.source == source for c in self._clients.values()) >= self.max_clients_per_address:
            where = f"from {source}" if source else "from one address"
            refusal = f"node {self.node} has {self.max_clients_per_address} clients attached {where}, its limit"
        if refusal:
            self.stats[UNLINKED].dropped += 1
            log.debug("node %s: refused ATTACH: %s", self.node, refusal)
            self._router_send(
                ident,
                codec.encode(
                    codec.Error(
                        src=f"{self.node}/",
                        dst=attach.src,
                        code="refused",
                        node=self.node,
                        message=refusal,
                    )
                ),
            )
            return
        local = _over_ipc(frames[1])
        shared = local and bool(self._host_id) and attach.host == self._host_id
        client = _Client(
            ident=ident,
            addr=f"{self.node}/{name}",
            last_heard=time.monotonic(),
            local=local,
            shm=shared,
            shm_batch=shared and attach.shm_batch,
            source=source,
        )
        if self._security is not None:
            client.user_id = frames[1].get("User-Id")
        self._clients[ident] = client
        self._local[name] = client
        self._router_send(
            ident,
            codec.encode(
                codec.Attached(src=f"{self.node}/", dst=client.addr, addr=client.addr, shm=shared, shm_batch=shared)
            ),
        )

    def _detach(self: Hub, client: _Client) -> None:
        if self._pool is not None:
            self._pool.reclaim(client.addr)  # it reads none of our leases any more, dead or alive
        self._reader.forget(client.addr)  # parked while its process holds them, for its next client
        self._clients.pop(client.ident, None)
        client.handles.clear()  # the leases went back with reclaim() above
        self.held.release(client.backlog_bytes)  # what waited for it goes with it
        client.backlog.clear()
        client.backlog_bytes = 0
        name = codec.split_addr(client.addr)[1]
        if self._local.get(name) is client:
            del self._local[name]
        error = PeerLost(f"client {client.addr} detached from node {self.node}")
        kept = client.open_streams is not None  # what it sent and did not end is cancelled when its
        if kept:  # node releases the name, saying why
            self._left_open[name] = client
        for party in list(self._local.values()):  # what it was sending or being sent is gone with it
            if isinstance(party, Endpoint):
                party.fail_party(client.addr, error, incoming=not kept)
        for listener in self.client_listeners:
            listener(client.addr)

    def _note_stream(self: Hub, client: _Client, kind: str, header: dict[str, Any]) -> None:
        """Keep what a reserved client's message says of a stream it sends: opened (its first data
        message, ``seq`` 1) or ended (``EOF``). Its ``CANCEL`` ends nothing here: a ``CANCEL`` may be
        about a stream it receives (codec, *Streams*), and one more for a stream that is over is dropped."""
        streams = client.open_streams
        assert streams is not None
        if kind == "EOF":
            streams.pop((header["dst"], header["sid"]), None)
        elif kind in codec.DATA_KINDS and header["seq"] == 1 and len(streams) < MAX_OPEN_STREAMS_KEPT:
            streams[(header["dst"], header["sid"])] = None

    def _cancel_open_streams(self: Hub, client: _Client, reason: str) -> None:
        """Cancel, in the name of ``client`` (gone), every stream it sent and did not end."""
        assert client.open_streams is not None
        streams, client.open_streams = list(client.open_streams), {}
        if self._closed or not streams:  # stopping: every peer and client is told BYE, which fails its streams
            return
        log.debug("node %s: cancelling %d streams of %r: %s", self.node, len(streams), client.addr, reason[:300])
        reason = reason[:MAX_STRING_CHARS]
        for dst, sid in streams:
            self._send_local(codec.Cancel(src=client.addr, dst=dst, sid=sid, reason=reason))
        error = StreamCancelled(f"streams from {client.addr} cancelled: {reason}")
        for party in list(self._local.values()):  # one to here that we did not keep (past the bound) ends too
            if isinstance(party, Endpoint):
                party.fail_party(client.addr, error)

    def _to_client(self: Hub, client: _Client, frames: list[Any]) -> None:
        if client.handles:  # what we leased for it earlier in this pass goes first
            self._send_handles(client)
        if client.backlog or client.reserved:  # in order, behind what waits; bounded (``_hold``)
            self._hold(client, frames)
            return
        assert self._router is not None
        try:
            send_frames(self._router.sock, [client.ident, *frames])
        except zmq.Again:
            self._hold(client, frames)
            assert self._loop is not None
            self._loop.call_later(0.002, self._flush_client, client)
        except zmq.ZMQError:  # EHOSTUNREACH: the client went away without BYE
            self._detach(client)
        else:
            self._router.after_send()

    def _hold(self: Hub, client: _Client, frames: list[Any]) -> None:
        """Keep ``frames`` for a client whose pipe is full; one that holds too much is detached."""
        nbytes = sum(len(f) for f in frames)
        held = client.backlog_bytes + nbytes
        if (len(client.backlog) >= CLIENT_BACKLOG_MESSAGES or held > self.client_backlog_bytes) and (
            client.ident in self._clients
        ):
            self.stats[client.addr].dropped += len(client.backlog) + 1
            reason = (
                f"not reading: {len(client.backlog)} messages, {client.backlog_bytes} bytes held for it"
                f" (limits {CLIENT_BACKLOG_MESSAGES}, {self.client_backlog_bytes})"
            )
            log.warning("node %s: detached client %r: %s", self.node, client.addr, reason)
            self._router_send(client.ident, self._bye_to(client, f"detached by node {self.node}: {reason}"))
            self._detach(client)
            return
        if not self.held.take(nbytes):  # the hub-wide cap: data is refused, the rest is small and kept
            try:
                header = codec.decode_header(frames[0])
            except DecodeError:
                header = None
            if header is not None and header["kind"] in codec.DATA_KINDS:
                self.stats[client.addr].dropped += 1
                text = self.held.refuse(self.node, f"a {header['kind']} message for client {client.addr!r}")
                self._bounce(header, "over-limit", text)
                return
            self.held.take(nbytes, force=True)
        client.backlog.append(frames)
        client.backlog_bytes += nbytes

    def _flush_client(self: Hub, client: _Client) -> None:
        assert self._router is not None and self._loop is not None
        if self._closed or client.ident not in self._clients:
            return
        sock = self._router.sock
        while client.backlog:
            try:
                send_frames(sock, [client.ident, *client.backlog[0]])
            except zmq.Again:
                self._loop.call_later(0.002, self._flush_client, client)
                return
            except zmq.ZMQError:
                self._detach(client)
                return
            sent = sum(len(f) for f in client.backlog.popleft())
            client.backlog_bytes -= sent
            self.held.release(sent)
        self._router.after_send()

    def _bye_to(self: Hub, client: _Client, reason: str) -> list[Any]:
        return codec.encode(codec.Bye(src=f"{self.node}/", dst=client.addr, reason=reason[:MAX_STRING_CHARS]))

    def _beat_clients(self: Hub, now: float) -> None:
        """A heartbeat for every client: detach the silent ones, retry sending to the ones behind."""
        for client in list(self._clients.values()):
            silent = now - client.last_heard
            if silent > CLIENT_TIMEOUT_S:
                log.info("node %s: client %r silent for %.1f s, detached", self.node, client.addr, silent)
                reason = (
                    f"silent for {silent:.1f} s: a client must PING every {HEARTBEAT_INTERVAL_S:g} s"
                    f" and is detached after {CLIENT_TIMEOUT_S:g} s"
                )
                self._router_send(client.ident, self._bye_to(client, reason))
                self._detach(client)
            elif client.backlog:
                self._flush_client(client)
