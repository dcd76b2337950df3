"""A node's keys and trust, as its hub needs them (the bus side is :mod:`dpipes.bus.auth`).

A node has keys unless its configuration says ``insecure = true``: its key pair lives in its key
directory (``key_dir`` in the configuration, else :func:`dpipes.bus.keys.key_dir`), created on its
first start; whom it trusts is that directory's ``authorized_keys`` and ``known_nodes``
(:mod:`dpipes.bus.trust`), looked at again for each new connection and each request (read again
when one of them changed), so that
``dpipes keys trust`` and ``dpipes keys pin`` take effect without a restart.

**The owner's own keys.** Whoever can read the key directory is the node's owner, and two more
keys are trusted without a line in a file, both found in that directory:

* the node's own key, as a node under any name: the daemons of one user share the key directory
  (two on one host, or hosts that share a home directory), hence the key pair; a peer presenting
  it holds the secret and is one of them. A static peer on loopback with no pinned key is linked
  with this key;
* the client key ``client.key`` beside it (the one ``dpipes`` of this user makes), as an
  authorized client with ``any``: the user who may run anything over the node's Unix socket may
  do so on the other nodes of the same key directory too. It is also the key an entry node
  names when it asks a peer node on behalf of its local user. A line in ``authorized_keys`` for
  that key takes precedence (to restrict it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dpipes.bus import keys
from dpipes.bus.auth import HubSecurity
from dpipes.bus.errors import KeyFileError
from dpipes.bus.keyring import Keyring
from dpipes.bus.keys import KeyPair, PublicKey
from dpipes.bus.trust import AUTHORIZED_KEYS, KNOWN_NODES, AuthorizedKey, KnownNode, KnownNodes, TrustStore
from dpipes.nodes.config import NodeConfig

__all__ = [
    "OwnKnownNodes",
    "TrustLoader",
    "node_key_dir",
    "node_keypair",
    "node_security",
    "owner_client_fingerprint",
    "owner_client_key",
    "trust_loader",
]

log = logging.getLogger(__name__)

OWN_KEY_NODE = "(this node's own key)"  # where an implicit pin of the own key comes from, for messages
OWN_CLIENT_COMMENT = "the node owner's client key (client.key in its key directory)"


def node_key_dir(config: NodeConfig) -> Path:
    """Where node ``config.name`` keeps its key pair and trust files."""
    return Path(config.key_dir) if config.key_dir else keys.key_dir()


def node_keypair(config: NodeConfig) -> tuple[KeyPair, bool]:
    """The node's key pair in its key directory, created on its first start; and whether it was.

    Raises:
        KeyFileError: the key directory or an existing pair cannot be used.
    """
    where = node_key_dir(config)
    pair, created = keys.load_or_create_keypair(where, keys.NODE_KEY)
    if created:
        log.info("node %s: created its key pair %s in %s", config.name, pair.fingerprint, where)
    return pair, created


def trust_loader(config: NodeConfig, own: PublicKey) -> TrustLoader:
    """A function returning the node's current trust store (its files as they are now)."""
    return TrustLoader(node_key_dir(config), own=own, tofu=config.trust_on_first_use)


@dataclass
class OwnKnownNodes(KnownNodes):
    """known_nodes, and the node's own key, trusted as a node under any name (module docstring)."""

    own: PublicKey | None = None

    def node_of(self, fingerprint: str) -> str | None:
        found = super().node_of(fingerprint)
        if found is None and self.own is not None and fingerprint == self.own.fingerprint:
            return OWN_KEY_NODE
        return found

    def check(self, node: str, key: PublicKey) -> KnownNode:
        if self.own is not None and key.fingerprint == self.own.fingerprint and node not in self.entries:
            return KnownNode(node, key.fingerprint, key, where=OWN_KEY_NODE)
        return super().check(node, key)


class TrustLoader:
    """Reads ``authorized_keys`` and ``known_nodes`` from a key directory each time it is called,
    and adds the owner's own keys (module docstring)."""

    def __init__(self, directory: Path, *, own: PublicKey, tofu: bool) -> None:
        self.directory = directory
        self.own = own
        self.tofu = tofu
        self._files = [directory / AUTHORIZED_KEYS, directory / KNOWN_NODES, directory / f"{keys.CLIENT_KEY}.key"]
        self._read: tuple[tuple[int, int, int, int] | None, ...] | None = None  # the files' state when read
        self._store: TrustStore | None = None

    def __call__(self) -> TrustStore:
        # Called for every connection and request: parse the files again only when one changed
        # (a stat each is all an unchanged call costs).
        state = tuple(_state(path) for path in self._files)
        if self._store is None or state != self._read:
            self._store, self._read = self._load(), state
        return self._store

    def _load(self) -> TrustStore:
        store = TrustStore.load(self.directory, tofu=self.tofu)
        nodes = OwnKnownNodes(store.nodes.entries, tofu=store.nodes.tofu, path=store.nodes.path, own=self.own)
        clients = store.clients
        user = owner_client_key(self.directory)
        if user is not None and clients.get(user.fingerprint) is None:
            clients = clients.with_entry(AuthorizedKey(user, OWN_CLIENT_COMMENT, any=True))
        return TrustStore(clients, nodes)


def _state(path: Path) -> tuple[int, int, int, int] | None:
    """What tells a rewritten file from the one read before: inode, size, change and modify times."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_ctime_ns, st.st_mtime_ns)


def owner_client_key(directory: Path) -> PublicKey | None:
    """The client key of the key directory's owner (``client.key``), if it has one."""
    path = directory / f"{keys.CLIENT_KEY}.key"
    if not path.exists():
        return None
    try:
        return keys.load_public_key(path)
    except KeyFileError as exc:
        log.warning("%s", exc)
        return None


def owner_client_fingerprint(config: NodeConfig) -> str:
    """The fingerprint of the node owner's client key, made now if it has none (whom an entry
    node names when it asks a peer on behalf of its local user).

    Raises:
        KeyFileError: the key directory or an existing pair cannot be used.
    """
    return Keyring(node_key_dir(config)).client()[0].fingerprint


def node_security(config: NodeConfig) -> HubSecurity | None:
    """The hub security of node ``config.name``: its key pair and trust; None with ``insecure``.

    Raises:
        KeyFileError: the key directory or an existing pair cannot be used.
        TrustFileError: a trust file is malformed (named with its line).
    """
    if config.insecure:
        return None
    pair, _ = node_keypair(config)
    load = trust_loader(config, pair.public)
    load()  # a malformed trust file fails the start, naming its line, not each connection later
    return HubSecurity(pair, load)
