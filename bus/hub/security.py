"""Security glue: CURVE on a hub's TCP binds, the node key a peer presents checked against its
name, ZAP ``User-Id`` checks, and who is behind a bus address (see *Security* in
:mod:`dpipes.bus.hub`).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import zmq

from dpipes.bus import codec
from dpipes.bus.auth import identity_from_user_id
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import DecodeError, SecurityError
from dpipes.bus.hub.state import (
    UNLINKED,
)
from dpipes.bus.keys import PublicKey
from dpipes.bus.trust import INSECURE, Identity

if TYPE_CHECKING:
    from dpipes.bus.hub import Hub

log = logging.getLogger(__name__)


class Security:
    """A hub's keys and identities (a part of :class:`~dpipes.bus.hub.Hub`)."""

    def _bind(self: Hub, sock: zmq.Socket[Any], endpoint: str) -> None:
        """Bind ``sock``: as a CURVE server on TCP when the hub has keys; ``ipc://`` stays NULL,
        its peers checked by uid in ZAP. libzmq takes the mechanism of each bind from the socket's
        options at bind time, so one socket serves both."""
        if self._security is not None:
            tcp = endpoint.startswith("tcp://")
            if tcp:
                pair = self._security.keypair
                sock.setsockopt(zmq.CURVE_SECRETKEY, pair.secret_z85.encode("ascii"))
                sock.setsockopt(zmq.CURVE_PUBLICKEY, pair.public.z85.encode("ascii"))
            sock.setsockopt(zmq.CURVE_SERVER, 1 if tcp else 0)  # 0: back to the NULL mechanism
        sock.bind(endpoint)

    @property
    def secure(self: Hub) -> bool:
        """Whether this hub has keys (CURVE on TCP, peer uids checked on ``ipc://``)."""
        return self._security is not None

    @property
    def public_key(self: Hub) -> PublicKey | None:
        """This node's CURVE public key (what discovery advertises), or None without keys."""
        return self._security.keypair.public if self._security is not None else None

    def identity_of(self: Hub, addr: str) -> Identity | None:
        """Who is behind bus address ``addr``, as the transport established it.

        For a client attached here: its key (``Identity.key``) or, over ``ipc://``, its uid
        (``Identity.local_user``); for an in-process endpoint: this daemon's own user; for an
        address on a linked peer node: that node's key (``Identity.peer_node``). Without keys
        every caller is :data:`~dpipes.bus.trust.INSECURE`. None for an address nobody holds.
        """
        node, name = codec.split_addr(addr)
        if self._security is None:
            return INSECURE
        if node == self.node:
            party = self._local.get(name)
            if isinstance(party, Endpoint):
                return Identity.local_user(os.getuid())
            return identity_from_user_id(party.user_id) if party is not None else None
        link = self._by_node.get(node)
        if link is None or not link.up:
            return None
        if link.key is not None:
            return Identity.peer_node(node, link.key.fingerprint)
        return None

    def _key_problem(self: Hub, node: str, key: PublicKey | None) -> str | None:
        """Why ``key`` may not speak as node ``node`` (pinned to another key, unknown), or None."""
        if self._security is None:
            return None
        if key is None:
            return f"node {node!r:.80} presented no key"
        try:
            self._security.store().nodes.check(node, key)
        except SecurityError as exc:
            return str(exc)
        return None

    def _impostor(self: Hub, ident: bytes, who: str, user_id: str | None) -> None:
        """A message on ``who``'s routing id from another authenticated party (a connection that
        took the id over, ROUTER_HANDOVER): dropped and counted, never routed as ``who``'s."""
        self._note_bad(
            self.stats[UNLINKED],
            UNLINKED,
            DecodeError(f"a connection of {user_id!r:.80} used the routing id of {who!r:.80}"),
        )
