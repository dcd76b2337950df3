"""A gossip body: what a linked peer tells this node about the nodes it knows, validated in full.

``{"peers": {name: "tcp://host:port"}, "keys": {name: Z85}}``: a map of at most
``MAX_GOSSIP_PEERS`` entries; names as node names (``NODE_NAME_RE``); endpoints ``tcp://`` with an
IPv4, bracketed IPv6 or DNS host that is not a wildcard, and a port 1-65535; ``keys``, optional, at
most one 40-character Z85 public key per name of ``peers``; other keys of the body are ignored,
for later versions. Any fault rejects the whole body with a coded :class:`GossipRejected`. What
the directory then does with a body is :mod:`dpipes.discovery.directory`'s.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import reprlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dpipes.bus.errors import DpipesError
from dpipes.bus.keys import PublicKey
from dpipes.discovery.txt import NODE_NAME_RE

if TYPE_CHECKING:
    from dpipes.discovery.directory import RejectCode

__all__ = [
    "MAX_ENDPOINT_CHARS",
    "MAX_GOSSIP_PEERS",
    "GossipRejected",
    "parse_endpoint",
    "parse_gossip",
    "parse_gossip_keys",
]

log = logging.getLogger(__name__)

# Decode limit of one gossip body: above the default bound, so that a peer configured with a
# larger bound is still understood; anything longer is refused whole.
MAX_GOSSIP_PEERS = 256
MAX_ENDPOINT_CHARS = 300  # tcp:// + a 253-byte DNS name + :port, with room for brackets

_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT_RE = re.compile(r"[0-9]{1,5}")


class GossipRejected(DpipesError, ValueError):
    """A gossip body (or one entry of it) was refused; ``code`` says why (a :data:`RejectCode`)."""

    def __init__(self, code: RejectCode, message: str) -> None:
        super().__init__(message)
        self.code: RejectCode = code


def parse_endpoint(text: object) -> str:
    """``text`` if it is a ``tcp://HOST:PORT`` a link can be opened to, else raise.

    HOST is an IPv4 address, a bracketed IPv6 address or a DNS name; never a wildcard (``*``,
    ``0.0.0.0``, ``[::]``). PORT is 1-65535.

    Raises:
        GossipRejected: code ``bad-endpoint``.
    """
    if not isinstance(text, str) or len(text) > MAX_ENDPOINT_CHARS or not text.startswith("tcp://"):
        raise GossipRejected("bad-endpoint", f"endpoint {show(text)} is not tcp://HOST:PORT")
    host, sep, port = text.removeprefix("tcp://").rpartition(":")
    if not sep or not _PORT_RE.fullmatch(port) or not 0 < int(port) < 65536:
        raise GossipRejected("bad-endpoint", f"endpoint {show(text)} has no port 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise GossipRejected("bad-endpoint", f"endpoint {show(text)} has a bad IPv6 address") from None
    else:
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            labels = host.removesuffix(".").split(".")
            if len(host) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
                raise GossipRejected("bad-endpoint", f"endpoint {show(text)} has a bad host") from None
            return text
    if address.is_unspecified or address.is_multicast:
        raise GossipRejected("bad-endpoint", f"endpoint {show(text)} is not one host")
    return text


def parse_gossip(body: object) -> dict[str, str]:
    """The ``{name: endpoint}`` map of a gossip body, validated in full (see the module docstring).

    Raises:
        GossipRejected: the body is malformed; ``code`` says how.
    """
    peers = body.get("peers") if isinstance(body, Mapping) else None
    if not isinstance(peers, Mapping):
        raise GossipRejected("not-a-map", "gossip: the body's 'peers' must be a map of node name to endpoint")
    if len(peers) > MAX_GOSSIP_PEERS:
        raise GossipRejected("too-many-peers", f"gossip: {len(peers)} peers, more than {MAX_GOSSIP_PEERS}")
    out: dict[str, str] = {}
    for name, endpoint in peers.items():
        if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
            raise GossipRejected("bad-name", f"gossip: {show(name)} is not a node name")
        out[name] = parse_endpoint(endpoint)
    return out


def parse_gossip_keys(body: object, peers: Mapping[str, str]) -> dict[str, PublicKey]:
    """The ``{name: key}`` map of a gossip body (optional), each name one of ``peers``.

    Raises:
        GossipRejected: code ``bad-key``: not a map, a name not in ``peers``, or a malformed key.
    """
    keys = body.get("keys") if isinstance(body, Mapping) else None
    if keys is None:
        return {}
    if not isinstance(keys, Mapping) or len(keys) > len(peers):
        raise GossipRejected("bad-key", "gossip: 'keys' must map names of 'peers' to public keys")
    out: dict[str, PublicKey] = {}
    for name, text in keys.items():
        if not isinstance(name, str) or name not in peers or not isinstance(text, str):
            raise GossipRejected("bad-key", f"gossip: key entry {show(name)} names no peer of the body")
        try:
            out[name] = PublicKey.parse(text)
        except ValueError:
            raise GossipRejected("bad-key", f"gossip: the key of {name} is not a public key: {show(text)}") from None
    return out


def show(value: object) -> str:
    """A short rendering of a hostile value for a message (``reprlib`` bounds nesting and length)."""
    return reprlib.repr(value)
