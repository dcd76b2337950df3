"""One user's keys and trust files, as ``dpipes keys`` manages them.

A :class:`Keyring` is a key directory (:func:`dpipes.bus.keys.key_dir`) seen as a whole: this
user's client pair (created on first use), the node pair if a daemon of this user made one,
``authorized_keys`` and ``known_nodes`` (:mod:`dpipes.bus.trust`). Each change is written at once,
atomically, with mode 0600.
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from dpipes.bus.errors import KeyFileError, TrustFileError
from dpipes.bus.keys import (
    CLIENT_KEY,
    NODE_KEY,
    KeyPair,
    PublicKey,
    ensure_key_dir,
    key_dir,
    load_keypair,
    load_or_create_keypair,
    load_public_key,
)
from dpipes.bus.trust import (
    AUTHORIZED_KEYS,
    KNOWN_NODES,
    AuthorizedKey,
    AuthorizedKeys,
    KnownNode,
    KnownNodes,
    ProgramRule,
    program_rule,
)

__all__ = ["Keyring", "parse_key_argument"]

log = logging.getLogger(__name__)


def parse_key_argument(text: str) -> PublicKey:
    """A public key given on a command line: its Z85 text, or a certificate file holding it.

    Raises:
        ValueError: neither, with why.
    """
    try:
        return PublicKey.parse(text)
    except ValueError as not_text:
        if os.path.exists(text):
            try:
                return load_public_key(Path(text))
            except KeyFileError as e:
                raise ValueError(str(e)) from None
        raise ValueError(f"{text!r} is neither a public key nor a key file: {not_text}") from None


class Keyring:
    """The key directory of one user (see the module docstring)."""

    def __init__(self, directory: Path | None = None, *, environ: Mapping[str, str] = os.environ) -> None:
        self.dir = Path(directory) if directory is not None else key_dir(environ)

    @property
    def authorized_keys_path(self) -> Path:
        return self.dir / AUTHORIZED_KEYS

    @property
    def known_nodes_path(self) -> Path:
        return self.dir / KNOWN_NODES

    def client(self) -> tuple[KeyPair, bool]:
        """This user's client pair, created on first use; and whether it was just created."""
        return load_or_create_keypair(self.dir, CLIENT_KEY)

    def node(self) -> KeyPair | None:
        """The node pair of a daemon run by this user, if one was made; never creates it."""
        if not (self.dir / f"{NODE_KEY}.key_secret").exists():
            return None
        return load_keypair(self.dir, NODE_KEY)

    def authorized(self) -> AuthorizedKeys:
        return AuthorizedKeys.load(self.authorized_keys_path)

    def known(self) -> KnownNodes:
        return KnownNodes.load(self.known_nodes_path)

    def trust(
        self,
        key: PublicKey,
        *,
        comment: str = "",
        run: Sequence[str] = (),
        exact: Sequence[str] = (),
        plugins: Sequence[str] = (),
        tap: bool = False,
        unrestricted: bool = False,
    ) -> AuthorizedKey:
        """Add ``key`` to authorized_keys (or replace its line) with these rights.

        ``run``, ``exact`` and ``plugins`` hold option values as in the file (``"sort -r '-k*'"``).

        Raises:
            TrustFileError: a malformed rule, or the existing file is malformed.
        """
        rules: list[ProgramRule] = []
        for name, values in (("run", run), ("exact", exact), ("plugin", plugins)):
            rules += [program_rule(name, value, f"--{name} {shlex.quote(value)}") for value in values]
        if "\n" in comment or "\r" in comment:
            raise TrustFileError("--comment: one line only")
        entry = AuthorizedKey(key=key, comment=comment.strip(), rules=tuple(rules), tap=tap, any=unrestricted)
        ensure_key_dir(self.dir)
        self.authorized().with_entry(entry).save(self.authorized_keys_path)
        log.info("trusted %s", entry.describe())
        return entry

    def untrust(self, match: str) -> list[str]:
        """Remove the client keys whose fingerprint, key or comment is ``match``, and the node
        named ``match`` or pinned to that fingerprint; what was removed, one description each."""
        removed: list[str] = []
        keys, gone = self.authorized().without(match)
        if gone:
            keys.save(self.authorized_keys_path)
            removed += [f"client {e.describe()}" for e in gone]
        known = self.known()
        nodes = [n for n, e in known.entries.items() if match in (n, e.fingerprint, e.key.z85 if e.key else None)]
        for node in nodes:
            removed.append(f"node {node} {known.entries[node].fingerprint}")
            known.forget(node)
        if nodes:
            known.save(self.known_nodes_path)
        return removed

    def pin(self, node: str, fingerprint_or_key: str) -> KnownNode:
        """Pin ``node`` to a fingerprint or key in known_nodes (replacing an earlier pin).

        Raises:
            ValueError: a bad node name, fingerprint or key.
        """
        ensure_key_dir(self.dir)
        known = self.known()
        entry = known.pin(node, fingerprint_or_key)
        known.save(self.known_nodes_path)
        return entry
