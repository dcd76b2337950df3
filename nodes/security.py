"""A node's keys and trust, as its hub needs them (the bus side is :mod:`dpipes.bus.auth`).

A node has keys unless its configuration says ``insecure = true``: its key pair lives in its key
directory (``key_dir`` in the configuration, else :func:`dpipes.bus.keys.key_dir`), created on its
first start; whom it trusts is that directory's ``authorized_keys`` and ``known_nodes``
(:mod:`dpipes.bus.trust`), read again for each new connection and each request, so that
``dpipes keys trust`` and ``dpipes keys pin`` take effect without a restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dpipes.bus import keys
from dpipes.bus.auth import HubSecurity
from dpipes.bus.keys import KeyPair
from dpipes.bus.trust import TrustStore
from dpipes.nodes.config import NodeConfig

__all__ = ["node_key_dir", "node_keypair", "node_security", "trust_loader"]

log = logging.getLogger(__name__)


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


def trust_loader(config: NodeConfig) -> TrustLoader:
    """A function returning the node's current trust store (its files as they are now)."""
    return TrustLoader(node_key_dir(config), tofu=config.trust_on_first_use)


class TrustLoader:
    """Reads ``authorized_keys`` and ``known_nodes`` from a key directory each time it is called."""

    def __init__(self, directory: Path, *, tofu: bool) -> None:
        self.directory = directory
        self.tofu = tofu

    def __call__(self) -> TrustStore:
        return TrustStore.load(self.directory, tofu=self.tofu)


def node_security(config: NodeConfig) -> HubSecurity | None:
    """The hub security of node ``config.name``: its key pair and trust; None with ``insecure``.

    Raises:
        KeyFileError: the key directory or an existing pair cannot be used.
        TrustFileError: a trust file is malformed (named with its line).
    """
    if config.insecure:
        return None
    pair, _ = node_keypair(config)
    load = trust_loader(config)
    load()  # a malformed trust file fails the start, naming its line, not each connection later
    return HubSecurity(pair, load)
