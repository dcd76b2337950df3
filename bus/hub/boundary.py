"""The ROUTER boundary: every message peers and clients send a hub is checked here, bad ones
counted, answered and logged once per interval (see *Bad messages* in :mod:`dpipes.bus.codec`).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import zmq

from dpipes.bus import codec
from dpipes.bus.codec import (
    BAD_MESSAGE_INTERVAL_S,
    MAX_BAD_MESSAGES,
    MAX_STRING_CHARS,
)
from dpipes.bus.errors import DecodeError
from dpipes.bus.hub.state import (
    UNLINKED,
    PeerStats,
    _Sender,
)
from dpipes.bus.pump import send_frames

if TYPE_CHECKING:
    from dpipes.bus.hub import Hub

log = logging.getLogger(__name__)


class Boundary:
    """A hub's ROUTER input and its bad-message rules (a part of :class:`~dpipes.bus.hub.Hub`)."""

    def _on_router(self: Hub, frames: list[Any]) -> None:
        """A message on the ROUTER: its sender's routing id (bytes), then its frames (zmq.Frame)."""
        ident = frames[0]
        count = len(frames)
        if count < 2 or count > codec.MAX_FRAMES + 1:
            what = "no header frame" if count < 2 else f"{count - 1} frames (limit {codec.MAX_FRAMES})"
            self._bad(self._sender(ident), DecodeError(f"message with {what}"))
            return
        try:
            header = codec.decode_header(frames[1], count - 2)
        except codec.VersionMismatch as exc:
            self._refuse_version(ident, exc)
            return
        except DecodeError as exc:
            self._bad(self._sender(ident), exc)
            return
        kind = header["kind"]
        peer = self._peer_idents.get(ident)
        if peer is not None:
            node, instance = peer
            if self._security is not None and frames[1].get("User-Id") != self._peer_user_ids.get(ident):
                self._impostor(ident, node, frames[1].get("User-Id"))
                return
            link = self._by_node.get(node)
            if link is not None:
                if link.instance != instance:  # a connection of an instance that was replaced: stale, not bad
                    if kind not in ("PING", "BYE"):
                        self.stats[node].dropped += 1
                        log.debug("node %s: dropped a %s from a replaced instance of %r", self.node, kind, node)
                    return
                link.last_heard = time.monotonic()
            if kind == "PING":
                return
            if kind == "BYE":
                if link is not None:
                    reason = header.get("reason")
                    self._link_down(link, f"said goodbye: {reason if type(reason) is str else ''}", orderly=True)
                return
            if kind == "HELLO":
                self._on_hello(ident, frames)
                return
            if header["src"].partition("/")[0] != node:
                error = DecodeError(f"source {header['src']!r:.80} is not on node {node!r}")
                self._bad(_Sender(node, ident, peer=node), error, header)
                return
            dst_node, _, name = header["dst"].partition("/")  # split once: _route takes the parts
            if dst_node != self.node:
                error = DecodeError(f"destination {header['dst']!r:.80} is not on node {self.node!r}: no relaying")
                self._bad(_Sender(node, ident, peer=node), error, header)
                return
            self._route(ident, header, frames, dst_node, name)
            return
        client = self._clients.get(ident)
        if client is not None:
            if self._security is not None and frames[1].get("User-Id") != client.user_id:
                self._impostor(ident, client.addr, frames[1].get("User-Id"))
                return
            client.last_heard = time.monotonic()
            if kind == "PING":
                self._to_client(client, codec.encode(codec.Pong(src=f"{self.node}/", dst=client.addr)))
                return
            if kind == "BYE":
                self._detach(client)
                return
            if header["src"] != client.addr:
                error = DecodeError(f"source {header['src']!r:.80} is not this client's address {client.addr!r}")
                self._bad(_Sender(client.addr, ident, client=client), error, header)
                return
            if client.open_streams is not None and (header["seq"] == 1 or kind == "EOF") and header["sid"]:
                self._note_stream(client, kind, header)  # a worker's stream opens or ends (cheap test first)
            dst_node, _, name = header["dst"].partition("/")
            self._route(ident, header, frames, dst_node, name)
            return
        if kind == "HELLO":
            self._on_hello(ident, frames)
        elif kind == "ATTACH":
            self._on_attach(ident, frames)
        elif kind not in ("BYE", "ERROR"):
            self._router_send(
                ident,
                codec.encode(
                    codec.Error(
                        src=f"{self.node}/",
                        dst=header["src"],
                        sid=header["sid"],
                        seq=header["seq"],
                        code="not-linked",
                        node=self.node,
                        to=header["dst"],
                        message=f"node {self.node} does not know this link; say HELLO first",
                    )
                ),
            )

    def _sender(self: Hub, ident: bytes) -> _Sender:
        peer = self._peer_idents.get(ident)
        if peer is not None:
            return _Sender(peer[0], ident, peer=peer[0])
        client = self._clients.get(ident)
        if client is not None:
            return _Sender(client.addr, ident, client=client)
        return _Sender(UNLINKED, ident)

    def _note_bad(self: Hub, stats: PeerStats, who: str, exc: Exception) -> bool:
        """Count a bad message from ``who``; log it when it opens an interval, and then return True."""
        stats.dropped += 1
        stats.bad += 1
        stats.last_error = str(exc)
        now = time.monotonic()
        if now - stats.interval_start >= BAD_MESSAGE_INTERVAL_S:
            stats.interval_start, stats.interval_bad = now, 1
            log.warning(
                "node %s: dropped a bad message from %.80r (%d in all; next report in %g s at the earliest): %s",
                self.node,
                who,
                stats.bad,
                BAD_MESSAGE_INTERVAL_S,
                stats.last_error[:300],
            )
            return True
        stats.interval_bad += 1
        log.debug("node %s: dropped bad message #%d from %.80r: %s", self.node, stats.bad, who, stats.last_error[:300])
        return False

    def _bad(self: Hub, sender: _Sender, exc: DecodeError, header: Any = None) -> None:
        """A bad message from ``sender``: count it, answer it, drop the sender, as the spec says."""
        if header is None:
            header = exc.header
        stats = self.stats[sender.key]
        if self._note_bad(stats, sender.key, exc) and not (
            type(header) is dict and header.get("kind") in ("ERROR", "BYE")  # never answered: no loops
        ):
            error = codec.encode(self._bad_message_error(sender, header, exc))
            if sender.client is not None:
                self._to_client(sender.client, error)
            else:
                self._router_send(sender.ident, error)
        if stats.interval_bad > MAX_BAD_MESSAGES and sender.key != UNLINKED:
            self._drop_sender(
                sender,
                f"{stats.interval_bad} bad messages within {BAD_MESSAGE_INTERVAL_S:g} s (limit {MAX_BAD_MESSAGES});"
                f" the last: {exc}",
            )

    def _bad_message_error(self: Hub, sender: _Sender, header: Any, exc: Exception) -> codec.Error:
        """The ERROR bad-message for ``sender``; the bad message's own fields only where they are sound."""
        fields = header if type(header) is dict else {}

        def text(key: str) -> str:
            value = fields.get(key)
            return value if type(value) is str and len(value) <= MAX_STRING_CHARS else ""

        def number(key: str) -> int:
            value = fields.get(key)
            return value if type(value) is int and 0 <= value < 2**63 else 0

        if sender.client is not None:
            dst = sender.client.addr
        elif sender.peer:  # its hub hands the ERROR on to the endpoint that sent the message
            src = text("src")
            dst = src if codec.split_addr(src)[0] == sender.peer else f"{sender.peer}/"
        else:
            dst = text("src")
        message = f"node {self.node} dropped a bad message: {exc}"
        return codec.Error(
            src=f"{self.node}/",
            dst=dst,
            sid=number("sid"),
            seq=number("seq"),
            code="bad-message",
            message=message[:MAX_STRING_CHARS],
            node=self.node,
            to=text("dst"),
        )

    def _drop_sender(self: Hub, sender: _Sender, reason: str) -> None:
        """Detach a client, or take down the link of a peer, that sent too many bad messages; tell it BYE."""
        reason = f"dropped by node {self.node}: {reason}"[:MAX_STRING_CHARS]
        if sender.client is not None:
            log.warning("node %s: detached client %r: %s", self.node, sender.client.addr, reason[:300])
            self._router_send(sender.ident, self._bye_to(sender.client, reason))
            self._detach(sender.client)
        elif sender.peer:
            log.warning("node %s: dropped peer %r: %s", self.node, sender.peer, reason[:300])
            # On the connection it used, i.e. to its link to us: its hub takes it as a goodbye.
            self._router_send(sender.ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=reason)))
            self._peer_idents.pop(sender.ident, None)
            self._peer_user_ids.pop(sender.ident, None)
            link = self._by_node.get(sender.peer)
            if link is not None:
                self._link_down(link, reason)

    def _router_send(self: Hub, ident: bytes, frames: list[Any]) -> bool:
        assert self._router is not None
        try:
            send_frames(self._router.sock, [ident, *frames])
            self._router.after_send()
            return True
        except zmq.ZMQError as exc:  # EAGAIN: pipe full; EHOSTUNREACH: gone
            log.debug("node %s: cannot answer %r: %s", self.node, ident[:24], exc)
            return False

    def _refuse_version(self: Hub, ident: bytes, exc: codec.VersionMismatch) -> None:
        node = exc.header.get("node", "?")
        stats = self.stats[self._sender(ident).key]
        if exc.header.get("kind") not in ("HELLO", "ATTACH"):
            self._note_bad(stats, self._sender(ident).key, exc)
        else:  # counted here, and logged below as the refusal it is
            stats.dropped += 1
            stats.bad += 1
            stats.last_error = str(exc)
            reason = f"node {self.node} speaks protocol version {codec.PROTOCOL_VERSION}, not {exc.version!r:.20}"
            # Every one is answered (an honest old peer must learn why), but logged once per
            # sender per interval: a flood of them with fresh names is not a log line each.
            now = time.monotonic()
            if now - stats.interval_start >= BAD_MESSAGE_INTERVAL_S:
                stats.interval_start, stats.interval_bad = now, 1
                log.error(
                    "node %s: refused a link from %.80r: it speaks protocol version %.20r, we speak %d"
                    " (%d bad messages from there in all; next report in %g s at the earliest)",
                    self.node,
                    node,
                    exc.version,
                    codec.PROTOCOL_VERSION,
                    stats.bad,
                    BAD_MESSAGE_INTERVAL_S,
                )
            else:
                stats.interval_bad += 1
                log.debug("node %s: refused a link from %.80r: protocol version %.20r", self.node, node, exc.version)
            self._router_send(ident, codec.encode(codec.Bye(src=f"{self.node}/", reason=reason)))
