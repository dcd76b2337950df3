"""Links to peer hubs: HELLO/WELCOME, the takeover rule for a node name, reconnects and heartbeats.

A hub sends to a peer through its own DEALER (a *link*: :mod:`dpipes.bus.zmtp_tcp` on a hub
without keys, libzmq's with CURVE); see *Node identity* in
:mod:`dpipes.bus.hub` for who may hold a name.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any

import zmq

from dpipes.bus import codec
from dpipes.bus.auth import identity_from_user_id
from dpipes.bus.codec import (
    BAD_MESSAGE_INTERVAL_S,
    HEARTBEAT_INTERVAL_S,
    MAX_NODE_NAME_CHARS,
    MAX_STRING_CHARS,
    PEER_TIMEOUT_S,
    Message,
)
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, DecodeError, ProtocolMismatch, RequestTimeout, SecurityError
from dpipes.bus.hub.state import (
    UNLINKED,
    PeerInfo,
    _Link,
    _peer_address,
    _set_common,
    _valid_node_name,
    advertised,
)
from dpipes.bus.keys import PublicKey
from dpipes.bus.pump import Pump
from dpipes.bus.zmtp import ZmtpError
from dpipes.bus.zmtp_tcp import TcpDealer, tcp_address

if TYPE_CHECKING:
    from dpipes.bus.hub import Hub

log = logging.getLogger(__name__)

# A HELLO (or WELCOME) naming a linked node with another instance replaces that link only if the
# linked instance has been silent this long: a live node PINGs every HEARTBEAT_INTERVAL_S, so this
# is four missed heartbeats; it is under PEER_TIMEOUT_S, so a restarted node takes over before
# its old incarnation is even declared lost.
TAKEOVER_SILENCE_S = 4 * HEARTBEAT_INTERVAL_S
REFUSED_RETRY_S = 2 * PEER_TIMEOUT_S  # a static link that was refused says HELLO again this often


class Links:
    """A hub's links to its peer hubs (a part of :class:`~dpipes.bus.hub.Hub`)."""

    @property
    def peers(self: Hub) -> dict[str, PeerInfo]:
        """Every peer hub currently linked, by node name."""
        now = time.monotonic()
        return {
            link.node: PeerInfo(link.node, link.instance, link.endpoint, link.up, now - link.last_heard, link.info)
            for link in self._by_node.values()
        }

    def peer_key(self: Hub, node: str) -> PublicKey | None:
        """The key the link to ``node`` authenticated (secure hubs, linked peers only), else None."""
        link = self._by_node.get(node)
        return link.key if link is not None and link.up else None

    def add_peer(self: Hub, endpoint: str, *, key: PublicKey | None = None) -> None:
        """Link to the hub at ``endpoint`` (``tcp://host:port``) and keep retrying while it is away.

        A hub with keys needs the peer's public ``key`` (from known_nodes or discovery).
        """
        self._ensure_link(endpoint, static=True, key=key)

    def learn_peer(self: Hub, endpoint: str, *, key: PublicKey | None = None) -> None:
        """Link to a hub we heard of (from gossip); forgotten again if it is lost."""
        self._ensure_link(endpoint, static=False, key=key)

    def drop_peer(self: Hub, endpoint: str, reason: str = "dropped on request") -> bool:
        """Close our link to ``endpoint``: one that is not up, or a learned one that is (its node is
        then lost to our endpoints, as on a missed heartbeat). A static link that is up stays: the
        operator asked for it. Whether a link was closed."""
        link = self._links.get(endpoint)
        if link is None or (link.up and link.static):
            return False
        if link.up:
            self._link_send(link, codec.Bye(src=f"{self.node}/", dst=f"{link.node}/", reason=reason[:MAX_STRING_CHARS]))
            self._link_down(link, reason)
        error = BusError(f"node {self.node}: link to {endpoint} dropped: {reason}")
        for waiter in link.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        link.waiters.clear()
        self._drop_link(link)
        log.debug("node %s: dropped the link to %s: %s", self.node, endpoint, reason)
        return True

    async def connect_peer(self: Hub, endpoint: str, *, timeout: float = 10.0, key: PublicKey | None = None) -> str:
        """Link to the hub at ``endpoint`` and return its node name once the link is up.

        Raises:
            ProtocolMismatch: the peer refused our HELLO (another protocol version, a name clash),
                or (with keys) it is not the node its key is pinned to.
            RequestTimeout: the peer did not answer within ``timeout`` (with keys: also a peer
                whose key is not ``key``, or that does not trust ours: CURVE fails silently).
            SecurityError: this hub has keys and ``key`` is None.
        """
        link = self._ensure_link(endpoint, static=True, key=key)
        if link.up:
            return link.node
        waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        link.waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise RequestTimeout(f"node {self.node}: no answer from {endpoint} within {timeout:g} s") from None

    def _ensure_link(self: Hub, endpoint: str, *, static: bool, key: PublicKey | None = None) -> _Link:
        link = self._links.get(endpoint)
        if link is not None:
            link.static = link.static or static
            if link.refused:
                link.refused = ""
                self._hello(link)
            return link
        assert self._ctx is not None, "hub not started"
        if self._security is not None and key is None:
            raise SecurityError(
                f"node {self.node}: cannot link to {endpoint} securely: its node key is unknown; "
                "pin it with: dpipes keys pin NODE KEY"
            )
        routing_id = b"hub:" + self.instance.encode() + b":" + os.urandom(4).hex().encode()
        if self._security is None and tcp_address(endpoint) is not None:  # no I/O thread: see dpipes.bus.zmtp_tcp
            dealer = TcpDealer(
                endpoint, lambda frames: None, routing_id=routing_id, max_frame_bytes=codec.MAX_FRAME_BYTES
            )
            link = _Link(endpoint=endpoint, pump=dealer, static=static, key=key)
            dealer.on_message = functools.partial(self._on_link_reply, link)
            dealer.on_error = functools.partial(self._on_link_wire_error, link)
            self._links[endpoint] = link
            self._hello(link)
            return link
        sock = self._ctx.socket(zmq.DEALER)
        _set_common(sock)
        if self._security is not None and key is not None:
            pair = self._security.keypair  # our node key: the peer's gatekeeper knows it from its known_nodes
            sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret_z85.encode("ascii"))
            sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.z85.encode("ascii"))
            sock.setsockopt(zmq.CURVE_SERVERKEY, key.z85.encode("ascii"))
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue only on a live connection: a HELLO to a dead peer fails fast
        sock.setsockopt(zmq.RECONNECT_IVL, 100)  # a restarted peer is back within a heartbeat
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.ROUTING_ID, routing_id)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError:
            sock.close(0)
            raise
        link = _Link(endpoint=endpoint, pump=Pump(sock, lambda frames: None), static=static, key=key)
        link.pump.on_message = functools.partial(self._on_link_reply, link)
        self._links[endpoint] = link
        self._hello(link)
        return link

    def _hello(self: Hub, link: _Link) -> None:
        endpoints = {"bus": self.advertised_endpoint, "tap": self.tap_endpoint}
        self._link_send(
            link,
            codec.Hello(
                src=f"{self.node}/", dst="", node=self.node, instance=self.instance, endpoints=endpoints, info=self.info
            ),
        )

    @property
    def advertised_endpoint(self: Hub) -> str:
        """The tcp endpoint peers are told to reach this hub at (the ``advertise`` host if given)."""
        return advertised(self.tcp_endpoint, self._advertise)

    def _link_send(self: Hub, link: _Link, msg: Message) -> None:
        try:
            link.pump.send(codec.encode(msg))
        except zmq.ZMQError as exc:
            log.debug("node %s: send to %s failed: %s", self.node, link.endpoint, exc)

    def _on_link_wire_error(self: Hub, link: _Link, exc: ZmtpError) -> None:
        """The peer broke ZMTP on our link (it reconnects): counted and logged as a bad message."""
        self._note_bad(self.stats[link.node or link.endpoint], link.node or link.endpoint, exc)

    def _on_link_reply(self: Hub, link: _Link, frames: list[Any]) -> None:
        """Messages on our DEALER: the peer's answers to HELLO, its goodbyes, its errors."""
        try:
            msg = codec.decode([f if isinstance(f, memoryview) else f.buffer for f in frames])
        except codec.VersionMismatch as exc:
            reason = exc.header.get("reason") if isinstance(exc.header.get("reason"), str) else ""
            self._refused(
                link,
                f"it speaks protocol version {exc.version!r:.20}, we speak {codec.PROTOCOL_VERSION}"
                + (f" ({reason:.200})" if reason else ""),
            )
            return
        except DecodeError as exc:
            # Nobody to answer: this is the peer answering us. Counted, logged, dropped.
            self._note_bad(self.stats[link.node or link.endpoint], link.node or link.endpoint, exc)
            return
        if isinstance(msg, codec.Welcome):
            if not _valid_node_name(msg.node):
                self._refused(link, f"it calls itself {msg.node!r:.80}, which is not a node name")
            elif (problem := self._key_problem(msg.node, link.key)) is not None:
                self._refused(link, problem)
            else:
                if msg.info:  # what it offers, known before the link counts as up
                    link.info = msg.info
                self._link_up(link, msg.node, msg.instance)
        elif isinstance(msg, codec.Bye):
            if link.up:
                self._link_down(link, f"said goodbye: {msg.reason:.200}", orderly=True)
            else:
                self._refused(link, msg.reason)
        elif isinstance(msg, codec.Error) and msg.code == "not-linked":
            if link.up:
                self._link_down(link, "it no longer knows this link (restarted, or it had declared us lost)")
            self._hello(link)
        elif isinstance(msg, codec.Error):
            self._on_peer_error(link.node or link.endpoint, msg)

    def _on_peer_error(self: Hub, peer: str, error: codec.Error) -> None:
        """An ERROR a peer hub sent about something we sent it: to the endpoint it names, or the log."""
        node, name = codec.split_addr(error.dst)
        if node == self.node and name in self._local:
            self._send_local(error)
            return
        stats = self.stats[peer]
        stats.errors_heard += 1
        now = time.monotonic()
        if now - stats.errors_logged_at >= BAD_MESSAGE_INTERVAL_S:
            stats.errors_logged_at = now
            log.warning(
                "node %s: peer %.64r reports %.32r: %.300r (%d such reports in all)",
                self.node,
                peer,
                error.code,
                error.message,
                stats.errors_heard,
            )

    def _refused(self: Hub, link: _Link, reason: str) -> None:
        (log.debug if link.refused == reason else log.error)(
            "node %s: peer at %s refused the link: %.600r", self.node, link.endpoint, reason
        )  # a static link retries: the same refusal again is not news
        link.refused, link.refused_at = reason, time.monotonic()
        error = ProtocolMismatch(f"node {self.node}: peer at {link.endpoint} refused the link: {reason}")
        for waiter in link.waiters:
            if not waiter.done():
                waiter.set_exception(error)
        link.waiters.clear()

    def _on_hello(self: Hub, ident: bytes, frames: list[Any]) -> None:
        try:
            hello = codec.decode([f.buffer for f in frames[1:]])
        except DecodeError as exc:
            sender = self._sender(ident)
            if sender.key != UNLINKED:
                self._bad(sender, exc)
                return
            self._note_bad(self.stats[UNLINKED], UNLINKED, exc)  # it waits for an answer: always give one
            reason = f"node {self.node} refused a malformed HELLO: {exc}"[:MAX_STRING_CHARS]
            self._router_send(ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=reason)))
            return
        assert isinstance(hello, codec.Hello)
        user_id: str | None = None
        peer_key: PublicKey | None = None
        if self._security is not None:
            user_id = frames[1].get("User-Id")
            identity = identity_from_user_id(user_id)
            if identity is not None and identity.fingerprint and self._gate is not None:
                peer_key = self._gate.key_of(identity.fingerprint)
            problem = None
            if identity is None or (identity.uid is None and peer_key is None):
                problem = f"node {self.node} cannot tell who is saying HELLO as {hello.node!r:.80}"
            elif peer_key is not None:
                problem = self._key_problem(hello.node, peer_key)
            if problem is not None:
                log.error("node %s: refused a link from %.80r: %s", self.node, hello.node, problem)
                bye = codec.Bye(src=f"{self.node}/", reason=problem[:MAX_STRING_CHARS])
                self._router_send(ident, codec.encode(bye))
                return
            if peer_key is None:  # a local daemon of our own user, over ipc: its key, if pinned
                peer_key = self._security.store().nodes.key_for(hello.node)
        if hello.node == self.node or not _valid_node_name(hello.node):
            if hello.node == self.node:
                reason = f"node name {hello.node!r} is this node's own name: give every node a unique name"
            else:
                reason = f"{hello.node!r:.80} is not a node name: use 1-{MAX_NODE_NAME_CHARS} characters without '/'"
            log.error("node %s: refused a link from instance %.8r: %s", self.node, hello.instance, reason)
            self._router_send(ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=reason)))
            return
        taken = self._name_taken(hello.node, hello.instance, self._hello_origin(hello, frames[1]))
        if taken:
            self.stats[hello.node].dropped += 1
            self._router_send(ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=taken[:MAX_STRING_CHARS])))
            return
        self._peer_idents[ident] = (hello.node, hello.instance)
        self._peer_user_ids[ident] = user_id
        self._router_send(
            ident,
            codec.encode(
                codec.Welcome(
                    src=f"{self.node}/", dst=f"{hello.node}/", node=self.node, instance=self.instance, info=self.info
                )
            ),
        )
        link = self._by_node.get(hello.node)
        if link is not None and link.instance == hello.instance:
            link.info, link.endpoints = hello.info, hello.endpoints
            return
        if link is not None:
            self._link_down(link, "restarted as a new instance")
        bus = hello.endpoints.get("bus")
        if not isinstance(bus, str) or not bus.startswith("tcp://"):
            return  # a peer without TCP can reach us but we cannot reach it
        if self._security is not None and peer_key is None:
            log.warning("node %s: cannot link back to %r: its key is not pinned", self.node, hello.node)
            return
        try:
            if bus.startswith("tcp://*:"):
                peer_addr = frames[1].get("Peer-Address")
                bus = f"tcp://{peer_addr}:{bus.rsplit(':', 1)[1]}"
            stale = self._links.get(bus)
            if self._security is not None and stale is not None and not stale.up:
                # Ours was refused at the CURVE handshake (opened before the peer trusted us), and
                # libzmq never reconnects after a ZAP refusal: its HELLO says it trusts us now.
                self._drop_link(stale)
            new = self._ensure_link(bus, static=stale is not None and stale.static, key=peer_key)
            if stale is not None and new is not stale:
                new.waiters += stale.waiters
        except zmq.ZMQError as exc:  # an endpoint libzmq cannot connect to
            self._note_bad(self.stats[hello.node], hello.node, DecodeError(f"cannot link back to {bus!r:.100}: {exc}"))
            return
        new.info, new.endpoints = hello.info, hello.endpoints
        self._link_up(new, hello.node, hello.instance)

    @staticmethod
    def _hello_origin(hello: codec.Hello, frame: Any) -> str:
        """Where a HELLO says its hub listens, and the address it came from, for messages."""
        bus = hello.endpoints.get("bus")
        source = _peer_address(frame)
        return f"{bus if isinstance(bus, str) else '(no endpoint)'!r:.120} from {source or 'an unknown address'}"

    def _name_taken(self: Hub, node: str, instance: str, origin: str) -> str:
        """Why ``instance`` may not use the name ``node`` (another live instance is linked under it), or ""."""
        existing = self._by_node.get(node)
        if existing is None or not existing.up or existing.instance == instance:
            return ""
        silent = time.monotonic() - existing.last_heard
        if silent >= TAKEOVER_SILENCE_S:
            return ""  # the linked instance is gone (restarted, or died): the new one takes over
        reason = (
            f"node name {node!r} is linked with instance {existing.instance:.16} at {existing.endpoint}"
            f" on node {self.node}; instance {instance:.16} at {origin} is refused: give every node a unique name"
        )
        now = time.monotonic()
        if now - self._clash_logged_at.get(node, -math.inf) >= BAD_MESSAGE_INTERVAL_S:
            self._clash_logged_at[node] = now
            log.error("node %s: %.600r", self.node, reason)
        else:
            log.debug("node %s: %.600r", self.node, reason)
        return reason

    def _link_up(self: Hub, link: _Link, node: str, instance: str) -> None:
        """Make ``link`` the route to ``node``: on its WELCOME, or at once when the peer said HELLO.

        A link learned from a peer's HELLO is routable before our own HELLO is answered: our
        DEALER delivers in order, so whatever we send follows our HELLO. Waiting for WELCOME
        instead would bounce what we owe the peer meanwhile (the CREDIT for its first data).
        """
        existing = self._by_node.get(node)
        if existing is not None and existing is not link:
            taken = self._name_taken(node, instance, link.endpoint)
            if taken:  # it answered our HELLO: tell it we do not take it, and why
                self._link_send(link, codec.Bye(src=f"{self.node}/", dst=f"{node}/", reason=taken[:MAX_STRING_CHARS]))
                self._refused(link, taken)
                if not link.static:
                    self._drop_link(link)
                return
            if existing.instance == instance and existing.up:
                # Two addresses of one peer (127.0.0.1 and localhost, say): keep the first.
                self._drop_link(link)
                for waiter in link.waiters:
                    if not waiter.done():
                        waiter.set_result(node)
                return
            self._link_down(existing, "restarted as a new instance")
            self._drop_link(existing)
        was_up = link.up and link.instance == instance
        link.node, link.instance, link.up, link.last_heard = node, instance, True, time.monotonic()
        self._by_node[node] = link
        for waiter in link.waiters:
            if not waiter.done():
                waiter.set_result(node)
        link.waiters.clear()
        if not was_up:
            log.info("node %s: link to %r (%s) up", self.node, node, link.endpoint)
            self._announce_link(node, True, "linked")

    def _link_down(self: Hub, link: _Link, reason: str, *, orderly: bool = False) -> None:
        """The link to ``link.node`` is gone: ``orderly`` when the peer said BYE, lost otherwise."""
        if not link.up:
            return
        link.up = False
        if self._by_node.get(link.node) is link:
            del self._by_node[link.node]
        for ident, peer in list(self._peer_idents.items()):
            if peer == (link.node, link.instance):
                del self._peer_idents[ident]
                self._peer_user_ids.pop(ident, None)
        (log.info if orderly else log.warning)(
            "node %s: peer %r %s: %.300r", self.node, link.node, "left" if orderly else "lost", reason
        )
        self._announce_link(link.node, False, reason)
        if not link.static:
            self._drop_link(link)

    def _drop_link(self: Hub, link: _Link) -> None:
        if self._links.get(link.endpoint) is link:
            del self._links[link.endpoint]
        if self._by_node.get(link.node) is link:
            del self._by_node[link.node]
        link.pump.close()

    def _announce_link(self: Hub, node: str, up: bool, reason: str) -> None:
        for listener in self.link_listeners:
            listener(node, up, reason)
        for name, party in list(self._local.items()):
            msg = codec.Link(src=f"{self.node}/", dst=f"{self.node}/{name}", node=node, up=up, reason=reason)
            if isinstance(party, Endpoint):
                party._deliver(msg)
            else:
                self._to_client(party, codec.encode(msg))

    def _beat_links(self: Hub, now: float) -> None:
        """A heartbeat for every link: PING the live ones, declare the silent ones lost, HELLO the rest."""
        for link in list(self._links.values()):
            if link.up:
                if now - link.last_heard > PEER_TIMEOUT_S:
                    self._link_down(link, f"no heartbeat for {now - link.last_heard:.1f} s")
                    if link.static:
                        self._hello(link)
                else:
                    self._link_send(link, codec.Ping(src=f"{self.node}/", dst=f"{link.node}/"))
            elif not link.refused:
                self._hello(link)
            elif link.static and now - link.refused_at >= REFUSED_RETRY_S:
                self._hello(link)  # the name it clashed with may be gone, its version upgraded
