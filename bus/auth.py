"""Who may connect to a hub: pyzmq's asyncio ZAP authenticator, consulting the trust store.

A hub with security (:class:`HubSecurity`) binds its ROUTER twice with different mechanisms:

* on TCP as a **CURVE server** with the node's key pair. libzmq runs the CurveZMQ handshake and
  then asks the ZAP handler (:class:`Gatekeeper`, a :class:`zmq.auth.asyncio.AsyncioAuthenticator`)
  about the client's public key; the handler admits it when :meth:`TrustStore.admits
  <dpipes.bus.trust.TrustStore.admits>` does (an authorized client, or a known node) and answers
  with the key's fingerprint as ZAP ``User-Id``.
* on ``ipc://`` with the **NULL** mechanism and a ZAP domain, so that ZAP is still consulted. For
  an ``ipc://`` connection libzmq puts the peer's credentials, read by the kernel
  (``SO_PEERCRED``), in the ZAP request's address: ``localhost:UID:GID:PID`` (found by probing
  libzmq 4.3 with a handler that printed the request). The handler admits the uids it is given
  (by default only the daemon's own) and answers with ``User-Id`` ``uid:UID``. Any other local
  user is refused before a single message is read; such a user reaches the node only over TCP,
  with a trusted key, like anyone else.

libzmq attaches the ``User-Id`` to every message of that connection: the hub reads it with
``frame.get("User-Id")`` and :func:`identity_from_user_id` turns it into an
:class:`~dpipes.bus.trust.Identity`. Nothing the peer sends can change it.

Refusals are counted (:attr:`Gatekeeper.refused`) and logged once per key or uid per
:data:`REFUSAL_LOG_INTERVAL_S`: a peer retrying in a loop does not flood the log.

**Wiring a node** (what ``nodes/`` calls; the bus side is done):

1. Keys and trust: ``pair, _ = dpipes.nodes.daemon.node_keypair(config)`` (the daemon already
   made it); ``trust = lambda: TrustStore.load(dir, tofu=config.trust_on_first_use)`` with
   ``dir = config.key_dir or key_dir()``; ``Hub(..., security=HubSecurity(pair, trust))``, or
   ``security=None`` for ``--insecure`` (logged loudly). With keys, a LAN listen address needs no
   insecure flag.
2. Peers: a static ``[nodes]`` entry links with ``hub.add_peer(endpoint, key=known.key_for(name))``;
   discovery and gossip carry ``hub.public_key`` (never the secret), and the receiver calls
   ``KnownNodes.check(name, key)`` before ``learn_peer(endpoint, key=key)``: ``KeyChanged`` and
   ``UnknownNode`` are logged as errors, and the node is not linked.
3. Policy, before anything starts: ``identity = hub.identity_of(request.src)``; then
   ``KeyPolicy(store.clients, store.nodes).may_run(identity, argv, plugin=...)``; a refusal's
   ``reason`` goes into the node's ``Refusal("unauthorized", ...)``. A request from a peer node
   (``identity.node`` set) on behalf of a client names that client's fingerprint in its body; the
   policy takes it only from a known node and checks ``Identity.key(fingerprint)``.
4. Every run is logged with ``str(identity)``, the argv and the pipeline; the stage's environment
   gets the caller from ``identity`` (never from what the client wrote in its request).
5. The ``dpipes`` client: over ``ipc://`` nothing (the uid is the credential); over TCP,
   ``Client(endpoint, curve=ClientCurve(Keyring().client()[0], node_key))`` with the node's key
   from known_nodes.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import zmq
from zmq.auth.asyncio import AsyncioAuthenticator

from dpipes.bus.keys import KeyPair, PublicKey, fingerprint
from dpipes.bus.trust import Identity, TrustStore

__all__ = [
    "REFUSAL_LOG_INTERVAL_S",
    "TAP_ZAP_DOMAIN",
    "ZAP_DOMAIN",
    "ClientCurve",
    "Gatekeeper",
    "HubSecurity",
    "identity_from_user_id",
]

log = logging.getLogger(__name__)

ZAP_DOMAIN = b"dpipes"
TAP_ZAP_DOMAIN = b"dpipes-tap"  # the tap XPUB: a CURVE key needs the 'tap' right, not only to be known
MAX_SEEN_KEYS = 10_000  # admitted keys remembered by fingerprint; keys are free to make, so bounded
REFUSAL_LOG_INTERVAL_S = 60.0  # a refused peer retries every reconnect interval; say so once a minute
LOCAL_USER_PREFIX = "uid:"
ZAP_VERSION = b"1.0"


@dataclasses.dataclass
class HubSecurity:
    """What a hub needs to speak CURVE: its key pair and whom it trusts.

    Args:
        keypair: the node's key pair (server key on its ROUTER, client key on its links).
        trust: the trust store, or a function returning the current one (re-read on each
            connection, so that ``dpipes keys trust`` takes effect without a restart).
        local_uids: the uids served over ``ipc://`` (default: this process's own).
    """

    keypair: KeyPair
    trust: TrustStore | Callable[[], TrustStore]
    local_uids: frozenset[int] = dataclasses.field(default_factory=lambda: frozenset({os.getuid()}))

    def store(self) -> TrustStore:
        return self.trust() if callable(self.trust) else self.trust


@dataclasses.dataclass(frozen=True)
class ClientCurve:
    """What a client needs to attach to a hub over TCP with CURVE: its own pair, the node's key."""

    keypair: KeyPair
    server_key: PublicKey


def identity_from_user_id(user_id: str | None) -> Identity | None:
    """The identity behind a ZAP ``User-Id`` this module's handler gave; None if there was none."""
    if not user_id:
        return None
    if user_id.startswith(LOCAL_USER_PREFIX) and user_id[len(LOCAL_USER_PREFIX) :].isdigit():
        return Identity.local_user(int(user_id[len(LOCAL_USER_PREFIX) :]))
    if user_id.startswith("SHA256:"):
        return Identity.key(user_id)
    return None


def _peer_uid(address: str) -> int | None:
    """The uid in libzmq's ``ipc://`` ZAP address ``localhost:UID:GID:PID``, or None."""
    parts = address.split(":")
    if len(parts) == 4 and parts[1].isdigit():
        return int(parts[1])
    return None


class Gatekeeper(AsyncioAuthenticator):
    """The ZAP handler of one hub (see the module docstring). Start it before binding."""

    def __init__(self, context: zmq.Context[Any], security: HubSecurity, *, node: str = "") -> None:
        super().__init__(context, log=logging.getLogger(f"{__name__}.zap"))
        self.security = security
        self.node = node
        self.admitted = 0
        self.refused = 0
        self._last_logged: dict[str, float] = {}
        self._seen: dict[str, PublicKey] = {}
        for domain in (ZAP_DOMAIN, TAP_ZAP_DOMAIN):
            self.configure_curve_callback(domain.decode(), credentials_provider=self)

    def key_of(self, fingerprint: str) -> PublicKey | None:
        """The full key of an admitted peer, by the fingerprint its messages carry as ``User-Id``."""
        return self._seen.get(fingerprint)

    # pyzmq calls this (as the credentials provider) with the client's Z85 key
    def callback(self, domain: str, key_z85: bytes) -> bool:
        try:
            key = PublicKey.parse(key_z85)
        except ValueError:
            return self._refuse(repr(key_z85[:48]), "malformed key")
        store = self.security.store()
        if domain == TAP_ZAP_DOMAIN.decode():
            entry = store.clients.get(key.fingerprint)
            if entry is None or not (entry.tap or entry.any):
                return self._refuse(key.fingerprint, "may not tap this node (no 'tap' in authorized_keys)")
        else:
            decision = store.admits(key)
            if not decision.allowed:
                return self._refuse(key.fingerprint, decision.reason)
            log.debug("node %s: admitted %s", self.node, decision.reason)
        if len(self._seen) >= MAX_SEEN_KEYS:
            self._seen.clear()
        self._seen[key.fingerprint] = key
        self.admitted += 1
        return True

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The ``User-Id`` of an admitted CURVE peer: its key's fingerprint."""
        return fingerprint(client_public_key)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        """NULL requests (our ``ipc://`` bind) by peer uid; CURVE ones by pyzmq, through ``callback``."""
        if len(msg) >= 6 and msg[0] == ZAP_VERSION and msg[5] == b"NULL":
            request_id, address = msg[1], msg[3].decode("ascii", errors="replace")
            uid = _peer_uid(address)
            if uid is not None and uid in self.security.local_uids:
                self.admitted += 1
                self._send_zap_reply(request_id, b"200", b"OK", f"{LOCAL_USER_PREFIX}{uid}")
                return
            shown = f"local uid {uid}" if uid is not None else f"peer {address!r}"
            self._refuse(shown, "not the daemon's own user: other local users connect over TCP with a trusted key")
            self._send_zap_reply(request_id, b"400", b"local user not allowed")
            return
        await super().handle_zap_message(msg)

    def _refuse(self, who: str, why: str) -> bool:
        self.refused += 1
        now = time.monotonic()
        last = self._last_logged.get(who)
        if last is None or now - last >= REFUSAL_LOG_INTERVAL_S:
            self._last_logged[who] = now
            if len(self._last_logged) > 10_000:  # bounded: keys are free to make
                self._last_logged.clear()
            log.warning("node %s: refused a connection from %s: %s", self.node, who, why)
        else:
            log.debug("node %s: refused %s again: %s", self.node, who, why)
        return False
