"""The node directory: every node this node knows, from every source, and which hub links it wants.

A plain state machine with no I/O, built on :class:`~dpipes.discovery.table.NodeTable`. The node
feeds it events and carries out the :data:`Action` list each event returns: :class:`Link` (open
a hub link to an endpoint) and :class:`Unlink` (drop one). Time is always passed in (monotonic
seconds), so tests drive it with explicit clocks.

Sources, and what each one may do (ranks as in the table: ``self`` > ``linked`` > ``mdns`` >
``static`` > ``gossip``; a higher rank supplies an entry's content):

``self`` (:meth:`NodeDirectory.set_self`)
    This node's own record. Never removed or overwritten; a claim on its name from elsewhere is
    counted in ``table.conflicts``.
``static`` (:meth:`~NodeDirectory.add_static`)
    A configured peer endpoint (``[nodes]``, ``--peer``). Always linked, with ``Link(static=True)``
    (the hub retries it for ever); never unlinked. Its node's name is learned when the link comes
    up; until then, and while the link is down, it is listed by endpoint (name ``""`` if never
    seen), down.
``mdns`` (:meth:`~NodeDirectory.mdns_seen`, :meth:`~NodeDirectory.mdns_gone`)
    A node's own advertisement on the LAN. Linked at once unless its name is already linked; a
    wildcard ``tcp://*:PORT`` endpoint takes the record's first address. Replaces a gossip-learned
    link to the same name that is not up. A link to an advertised node that is *lost* (heartbeats;
    a cable pulled, a veth set down) is asked for again at once, and the hub says ``HELLO`` on it
    every heartbeat until the node answers: a cut link comes back by itself when the cable does.
    mDNS says nothing when a path returns (the records are still cached, nothing changed), so
    nothing else would bring it back. The retry ends when mDNS says the node is gone (a goodbye,
    or its records expired, which for a node that died takes the records' TTL).
``gossip`` (:meth:`~NodeDirectory.gossip`)
    A body from a *linked* peer: second-hand, so bounded and checked. It is validated in full
    (:mod:`dpipes.discovery.gossip`: its shape and bounds), and any fault rejects the whole body: a
    dpipes node only gossips what it has itself linked to, so a malformed entry means the sender is
    not one.
``linked`` (:meth:`~NodeDirectory.link_up`, :meth:`~NodeDirectory.link_info`,
:meth:`~NodeDirectory.link_down`)
    The hub's link to a node is up: the node's name, instance, endpoint and HELLO ``info``
    (``programs``) become its content (``link_info`` updates the programs when the peer's HELLO
    arrives after the link is up). This covers links the peer opened to us. When the link goes
    down in order (BYE) the node left: its mDNS and gossip claims go too, and its incarnation is
    tombstoned, and gossip may not link it again for ``DEPARTED_S`` (first-hand sources may); when
    it is lost (heartbeats) the table's ``lost`` rule applies, gossip may bring it back (a lost
    node may be back; a dead one expires as unreachable), and a node mDNS advertised is linked
    again (above). A static peer stays listed either way, down. A link going down yields no
    ``Unlink``: the hub retries a static link and drops any other one itself.

Keys. mDNS records and gossip carry each node's CURVE public key (never anything secret). Before
a discovered or gossiped node is linked, the directory asks its ``vet`` function (the node's
known_nodes: :meth:`KnownNodes.check <dpipes.bus.trust.KnownNodes.check>`) whether that name may
present that key, and links with the key it returns. A refusal (:class:`~dpipes.bus.errors.KeyChanged`:
the name is pinned to another key; :class:`~dpipes.bus.trust.UnknownNode`: not pinned, and trust
on first use is off) is counted as ``untrusted-key``, logged as an error once per node per
``REJECTION_LOG_INTERVAL_S`` with the reason (a changed key names both fingerprints), and the node
is not linked; each ``expire`` tick asks again, so that ``dpipes keys pin`` takes effect without a
restart. Without ``vet`` (a node without keys) every node is linked as it is advertised.

Rules and bounds:

* Rejections are coded (:data:`RejectCode`), counted in ``rejected[code]`` and logged as a warning
  once per ``REJECTION_LOG_INTERVAL_S`` per code (at debug otherwise); they never raise. Codes for
  a whole gossip body: ``not-linked`` (the sender has no link up), ``rate-limited`` (more than one
  body per ``GOSSIP_MIN_INTERVAL_S`` from one peer; the first after a link comes up always
  passes), ``not-a-map``, ``too-many-peers``, ``bad-name``, ``bad-endpoint``. Codes for one entry
  of an accepted body (counted once per entry): ``full`` (the bound below), ``unreachable`` (the
  endpoint recently failed, see expiry), ``endpoint-taken`` (another node is linked there),
  ``untrusted-key`` (see *Keys*; also for a node seen by mDNS).
* At most ``max_known`` nodes besides this one (default ``MAX_KNOWN_NODES``) are admitted from
  gossip; gossip never evicts anything. First-hand sources (static, mDNS, a link that came up)
  are always admitted: over the bound, they evict the unlinked gossip-only entries that gossip
  refreshed least recently, and ``Unlink`` their endpoints. So a flood of made-up peers fills at
  most ``max_known`` slots and a real peer can always still join.
* A gossip-learned link that is not up ``UNREACHABLE_EXPIRY_S`` after it was asked for (or after
  it went down) is unlinked, its gossip claim dropped, and its endpoint refused from gossip for
  another ``UNREACHABLE_EXPIRY_S``. Static and mDNS links are not expired: the operator or the
  node itself vouches for them.
* Gossip claims not refreshed within ``GOSSIP_TTL_S`` are dropped (the table's ``expire``); an
  entry left with no claim is removed and a link to it that is not up is unlinked.
* One link per node: when a node's link comes up, every other non-static link wanted for that
  name and not up is unlinked, and gossip-only names that pointed at that endpoint are dropped.
* Only what this node has itself linked to is gossiped on (:meth:`~NodeDirectory.gossip_body`):
  a made-up peer is never spread beyond the first node it was told to.

Queries: :meth:`~NodeDirectory.entries` (what ``dpipes --nodes`` shows),
:meth:`~NodeDirectory.programs_by_node` (placement: this node and the nodes linked and up),
:meth:`~NodeDirectory.gossip_body`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from dpipes.bus.codec import PROTOCOL_VERSION
from dpipes.bus.errors import ConfigError, SecurityError
from dpipes.bus.keys import PublicKey
from dpipes.bus.trust import KnownNodes, UnknownNode
from dpipes.discovery.gossip import MAX_GOSSIP_PEERS, GossipRejected, parse_endpoint, parse_gossip, parse_gossip_keys
from dpipes.discovery.gossip import show as _show
from dpipes.discovery.table import SOURCE_RANK, NodeChange, NodeRecord, NodeTable, Source
from dpipes.discovery.txt import MAX_LIST_ITEMS, valid_program_name

log = logging.getLogger(__name__)

PLUGIN_SIGIL = "%"  # a plugin stage's first word is %NAME (dpipes.nodes.pipeline): offers say plugins so

# A full mesh of N nodes costs each node about 2(N-1) descriptors (its DEALER to every peer and
# every peer's connection to its ROUTER) and heartbeats every HEARTBEAT_INTERVAL_S on each link.
# 64 keeps that near 130 of the usual 1024 soft limit, leaving the rest for stages' pipes; dpipes
# is meant for the machines of one LAN. A larger cluster passes its own bound.
MAX_KNOWN_NODES = 64
# Peers gossip every 2 s (the node's GOSSIP_INTERVAL_S) and once per new link; a quarter of that
# lets every periodic round through and bounds a hostile peer to 2 bodies (512 entries) a second.
GOSSIP_MIN_INTERVAL_S = 0.5
# A reachable peer answers HELLO within milliseconds; five peer timeouts (PEER_TIMEOUT_S = 3 s)
# give one that is still starting several reconnect rounds, and a made-up one holds its socket
# no longer than this.
UNREACHABLE_EXPIRY_S = 15.0
# Fifteen gossip rounds: a node that every peer stopped mentioning is forgotten within this.
GOSSIP_TTL_S = 30.0
# A node that said goodbye is not linked again from gossip for this long: peers that have not yet
# seen its BYE may mention it for one more round (2 s). Gossip bodies carry no instance ids, so
# the table's tombstones cannot tell its next incarnation from this one; first-hand sources can.
DEPARTED_S = 10.0
# A flood of bad gossip logs one warning per code per minute, the rest at debug.
REJECTION_LOG_INTERVAL_S = 60.0
MAX_PROGRAMS = MAX_LIST_ITEMS  # the programs a peer's HELLO may list; as many as a TXT record

RejectCode = Literal[
    "not-linked",
    "rate-limited",
    "not-a-map",
    "too-many-peers",
    "bad-name",
    "bad-endpoint",
    "full",
    "unreachable",
    "endpoint-taken",
    "bad-key",
    "untrusted-key",
]

KeyVet = Callable[[str, PublicKey | None], PublicKey | None]
"""``vet(name, key)``: may node ``name``, advertising ``key`` (None: none), be linked? The key to link
with (None for a node without keys); raises :class:`~dpipes.bus.errors.SecurityError` to refuse."""


def vet_by(known: Callable[[], KnownNodes]) -> KeyVet:
    """The vet of a node with keys: ``known()`` (re-read each time, so a pin takes effect at once)
    must have ``name`` pinned to ``key`` (or, with trust on first use, records it). A node that
    advertises no key is linked with its pinned key, if it has one."""

    def vet(name: str, key: PublicKey | None) -> PublicKey | None:
        nodes = known()
        if key is None:
            key = nodes.key_for(name)
            if key is None:
                raise UnknownNode(
                    f"node {name} advertises no key (an --insecure node?) and none is pinned for it; "
                    f"pin its key with: dpipes keys pin {name} KEY"
                )
        return nodes.check(name, key).key or key

    return vet


def _no_keys(name: str, key: PublicKey | None) -> PublicKey | None:
    """The vet of a node without keys: link every node as it is advertised."""
    return key


@dataclass(frozen=True, slots=True)
class Link:
    """Open a hub link to ``endpoint``; ``static``: keep retrying while it is away (``add_peer``)."""

    endpoint: str
    static: bool = False
    key: PublicKey | None = None  # the node key to link with (CURVE), as vetted


@dataclass(frozen=True, slots=True)
class Unlink:
    """Drop the hub link to ``endpoint``: it is unreachable, redundant, over the bound or forgotten."""

    endpoint: str
    reason: str


Action = Link | Unlink


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """One node as ``dpipes --nodes`` shows it.

    ``source`` is where the node was learned from: the best of self, mdns, static, gossip that
    vouches for it, or ``linked`` when only its own link does (it connected to us).
    ``last_seen_s`` is seconds since anything was heard of it.
    """

    name: str
    endpoint: str
    programs: tuple[str, ...]
    source: Source
    last_seen_s: float
    up: bool

    def as_dict(self) -> dict[str, Any]:
        """The JSON-able shape of one node in the ``info`` reply."""
        return {
            "name": self.name,
            "endpoint": self.endpoint,
            "programs": list(self.programs),
            "source": self.source,
            "last_seen_s": self.last_seen_s,
            "up": self.up,
        }


@dataclass(slots=True)
class _Want:
    """A link this directory asked for (or that came up by itself)."""

    endpoint: str
    source: Literal["static", "mdns", "gossip", "inbound"]
    name: str  # expected (mdns, gossip) or known once up; "" for a static peer never linked
    since: float  # when it was asked for, or went down
    up: bool = False


@dataclass(frozen=True, slots=True)
class _Untrusted:
    """A node not linked because its key was refused; asked about again on each ``expire``."""

    endpoint: str
    key: PublicKey | None
    source: Literal["mdns", "gossip"]


class NodeDirectory:
    """Every node this node knows and the links it wants; see the module docstring.

    Args:
        name: this node's name.
        max_known: how many nodes besides this one gossip may fill the directory with.
        vet: whether a node may present a key, and the key to link with (see *Keys*); default:
            no keys, every node linked as advertised.
    """

    def __init__(self, name: str, *, max_known: int = MAX_KNOWN_NODES, vet: KeyVet | None = None) -> None:
        self.name = name
        self.max_known = max_known
        self._vet: KeyVet = vet or _no_keys
        self._keys: dict[str, PublicKey] = {}  # node name -> the key it was vetted or linked with
        self._untrusted: dict[str, _Untrusted] = {}  # refused keys, asked about again on expire
        self._key_logged: dict[str, float] = {}  # "node refusal" -> when it was last logged
        self.table = NodeTable()
        self.rejected: collections.Counter[str] = collections.Counter()
        self._wanted: dict[str, _Want] = {}  # endpoint -> the link asked for
        self._up: dict[str, str] = {}  # node name -> endpoint of its link that is up
        self._static: dict[str, str] = {}  # configured endpoint -> its node's name once known
        self._barred: dict[str, float] = {}  # endpoint -> until when gossip may not link it
        self._last_gossip: dict[str, float] = {}  # linked peer -> when its last body was taken
        self._departed: dict[str, float] = {}  # node that said goodbye -> until when gossip is ignored
        self._logged: dict[str, float] = {}  # reject code -> when it was last logged as a warning

    # -- events -----------------------------------------------------------------------------

    def set_self(self, record: NodeRecord, now: float) -> list[Action]:
        """This node's own record (name, endpoints, programs)."""
        self.table.seen(record, "self", now)
        return []

    def add_static(self, endpoint: str, now: float) -> list[Action]:
        """A configured peer endpoint: linked, and kept linked.

        Raises:
            ConfigError: ``endpoint`` is not a ``tcp://HOST:PORT`` a link can be opened to.
        """
        try:
            parse_endpoint(endpoint)
        except GossipRejected as exc:
            raise ConfigError(f"static peer: {exc}") from None
        self._static.setdefault(endpoint, "")
        want = self._wanted.get(endpoint)
        if want is None:
            self._wanted[endpoint] = _Want(endpoint, "static", "", now)
        else:
            want.source = "static"
        return [Link(endpoint, static=True)]

    def mdns_seen(self, record: NodeRecord, now: float) -> list[Action]:
        """mDNS holds ``record`` for a node (new, refreshed or updated)."""
        endpoint = record.endpoints.get("bus", "")
        if endpoint.startswith("tcp://*:") and record.addresses:
            endpoint = f"tcp://{record.addresses[0]}:{endpoint.rpartition(':')[2]}"
            record = replace(record, endpoints={**record.endpoints, "bus": endpoint})
        self.table.seen(record, "mdns", now)
        if record.name == self.name:
            return []
        self._departed.pop(record.name, None)
        actions: list[Action] = []
        try:
            parse_endpoint(endpoint)
        except GossipRejected:
            log.debug("node %s: mDNS record of %s has no usable bus endpoint %r", self.name, record.name, endpoint)
        else:
            if record.name not in self._up and (vetted := self._vetted(record.name, record.key, endpoint, "mdns", now)):
                actions += self._drop_wants(record.name, "replaced by its mDNS endpoint", keep=endpoint, only="gossip")
                want = self._wanted.get(endpoint)
                if want is None:
                    self._wanted[endpoint] = _Want(endpoint, "mdns", record.name, now)
                    actions.append(Link(endpoint, key=vetted[0]))
                elif want.source == "gossip":
                    want.source = "mdns"  # first-hand now: no longer expires as a rumour
        return actions + self._evict_over_bound()

    def mdns_gone(self, name: str, instance_id: str, now: float) -> list[Action]:
        """mDNS says ``name`` (incarnation ``instance_id``) left, or its records expired."""
        actions = self._forget_unlinked(self.table.goodbye(name, instance_id), "gone from mDNS")
        if name not in self._up:  # a lost node's link, asked for again (link_down): no longer
            actions += self._drop_wants(name, "gone from mDNS", keep="", only="mdns")
        return actions

    def gossip(self, via: str, body: object, now: float) -> list[Action]:
        """A gossip body from the linked peer ``via``. Never raises: rejections are counted.

        Returns:
            ``Link`` for each node newly admitted whose endpoint is not linked yet, ``Unlink``
            for the rumour a new endpoint of the same node replaces.
        """
        if via not in self._up:
            return self._reject("not-linked", via, f"gossip from {_show(via)}, which has no link up", now)
        last = self._last_gossip.get(via)
        if last is not None and now - last < GOSSIP_MIN_INTERVAL_S:
            return self._reject("rate-limited", via, f"gossip from {via} {now - last:.3f} s after the last", now)
        self._last_gossip[via] = now
        try:
            peers = parse_gossip(body)
            keys = parse_gossip_keys(body, peers)
        except GossipRejected as exc:
            return self._reject(exc.code, via, str(exc), now)
        actions: list[Action] = []
        linked_at = {endpoint: name for name, endpoint in self._up.items()}
        me = self.table.get(self.name)
        if me is not None and "bus" in me.endpoints:
            linked_at[me.endpoints["bus"]] = self.name  # a link to ourselves would only be refused
        for name in sorted(peers):
            endpoint = peers[name]
            if name == self.name:
                continue  # peers we are linked to tell us about ourselves: not an error
            owner = linked_at.get(endpoint)
            if owner is not None and owner != name:
                self._reject("endpoint-taken", via, f"gossip from {via}: {name} at {endpoint}, where {owner} is", now)
                continue
            if name in self._up:
                self.table.seen(self._rumour(name, endpoint, via), "gossip", now)  # refreshes the claim
                continue
            if self._departed.get(name, now) > now:
                continue  # gossip lagging behind its goodbye: not an error
            if self._barred.get(endpoint, now) > now:
                self._reject("unreachable", via, f"gossip from {via}: {name} at {endpoint} was unreachable", now)
                continue
            known = self.table.get(name)
            if known is None and self._known_count() >= self.max_known:
                self._reject("full", via, f"gossip from {via}: {name} not admitted, {self.max_known} nodes known", now)
                continue
            if not self.table.seen(self._rumour(name, endpoint, via), "gossip", now) and known is None:
                continue  # a departed incarnation
            if self.table.sources(name) - {"gossip"}:
                continue  # a first-hand source already says where it is
            vetted = self._vetted(name, keys.get(name), endpoint, "gossip", now)
            if not vetted:
                continue
            actions += self._drop_wants(name, "its gossiped endpoint changed", keep=endpoint, only="gossip")
            if endpoint not in self._wanted:
                self._wanted[endpoint] = _Want(endpoint, "gossip", name, now)
                actions.append(Link(endpoint, key=vetted[0]))
        return actions

    def link_up(
        self,
        name: str,
        instance: str,
        endpoint: str,
        info: Mapping[str, Any],
        now: float,
        *,
        key: PublicKey | None = None,
    ) -> list[Action]:
        """The hub's link to ``name`` is up (we opened it, or the peer did): ``info`` is its HELLO's,
        ``key`` the node key the link was authenticated with, if any."""
        if name == self.name:
            return []
        self._untrusted.pop(name, None)
        if key is not None:
            self._keys[name] = key
        actions: list[Action] = []
        previous = self._up.get(name)
        if previous is not None and previous != endpoint:
            self._link_gone(name, previous, now)
        record = NodeRecord(
            name,
            instance,
            PROTOCOL_VERSION,
            {"bus": endpoint},
            programs=_programs(info),
            plugins=_programs(info, "plugins"),
        )
        want = self._wanted.get(endpoint)
        if want is None:
            want = self._wanted[endpoint] = _Want(endpoint, "inbound", name, now)
        want.name, want.up, want.since = name, True, now
        self._up[name] = endpoint
        self._barred.pop(endpoint, None)
        self._departed.pop(name, None)
        if endpoint in self._static:
            self._static[endpoint] = name
            self.table.seen(record, "static", now)
        self.table.seen(record, "linked", now)
        actions += self._drop_wants(name, f"{name} is linked at {endpoint}", keep=endpoint)
        for other in self.table.records():
            if (
                other.name != name
                and other.name not in self._up
                and other.endpoints.get("bus") == endpoint
                and self.table.sources(other.name) == {"gossip"}
            ):
                self.table.withdraw(other.name, "gossip", "endpoint-taken")
        return actions + self._evict_over_bound()

    def link_info(self, name: str, info: Mapping[str, Any], now: float) -> list[Action]:
        """``name``'s HELLO ``info`` as the hub holds it now, for a link already up.

        The hub learns a peer's ``info`` from the HELLO the peer sends on its own link to us, which
        may come after our link to it is up (our WELCOME carries none) and is not announced; the
        node passes it on each gossip tick. Returns no action.
        """
        endpoint = self._up.get(name)
        record = self.table.get(name)
        if endpoint is None or record is None:
            return []
        programs, plugins = _programs(info), _programs(info, "plugins")
        if programs != record.programs or plugins != record.plugins:
            self.table.seen(
                NodeRecord(
                    name, record.instance_id, PROTOCOL_VERSION, {"bus": endpoint}, programs=programs, plugins=plugins
                ),
                "linked",
                now,
            )
        return []

    def link_down(self, name: str, *, orderly: bool, reason: str, now: float) -> list[Action]:
        """The hub's link to ``name`` went down: it said goodbye (``orderly``) or was lost.

        Returns ``Link`` to the same endpoint when a node mDNS advertises was lost (see the
        module docstring), to be carried out after the hub has dropped its old link there;
        nothing otherwise (the hub retries static links and drops the others itself).
        """
        endpoint = self._up.get(name)
        if endpoint is None:
            return []
        record = self.table.get(name)
        instance = record.instance_id if record is not None else ""
        want = self._wanted.get(endpoint)
        relink = (
            not orderly
            and endpoint not in self._static
            and ((want is not None and want.source == "mdns") or "mdns" in self.table.sources(name))
        )
        self._link_gone(name, endpoint, now, keep=relink)
        self._last_gossip.pop(name, None)
        if orderly:
            self.table.goodbye(name, instance)
            self.table.withdraw(name, "linked", "unlinked")
            self._departed[name] = now + DEPARTED_S
        else:
            self.table.lost(name, instance)
        log.debug("node %s: link to %s down (%s): %s", self.name, name, "left" if orderly else "lost", reason)
        return [Link(endpoint)] if relink else []

    def expire(self, now: float) -> list[Action]:
        """The clock: age out rumours, unreachable gossip-learned links and old bars."""
        actions = self._forget_unlinked(self.table.expire(now, GOSSIP_TTL_S), "no source mentions it any more")
        actions += self._vet_again(now)
        for endpoint, want in list(self._wanted.items()):
            if want.source != "gossip" or want.up or now - want.since <= UNREACHABLE_EXPIRY_S:
                continue
            del self._wanted[endpoint]
            actions.append(Unlink(endpoint, f"unreachable for {UNREACHABLE_EXPIRY_S:g} s"))
            self._barred[endpoint] = now + UNREACHABLE_EXPIRY_S
            if want.name not in self._up:
                self.table.withdraw(want.name, "gossip", "unreachable")
        for endpoint, until in list(self._barred.items()):
            if until <= now:
                del self._barred[endpoint]
        for name, until in list(self._departed.items()):
            if until <= now:
                del self._departed[name]
        return actions

    # -- queries ----------------------------------------------------------------------------

    def entries(self, now: float, *, heard_s: Mapping[str, float] | None = None) -> list[DirectoryEntry]:
        """Every known node: this one first, then by name, then static peers not known by name.

        Args:
            now: the clock ``last_seen_s`` is counted from.
            heard_s: seconds since the hub last heard each linked node (its heartbeats), which is
                fresher than anything this directory sees.
        """
        heard_s = heard_s or {}
        out: list[DirectoryEntry] = []
        for record in self.table.records():
            sources = self.table.sources(record.name)
            if "self" in sources:
                endpoint = record.endpoints.get("bus", "")
                out.insert(0, DirectoryEntry(record.name, endpoint, _offers(record), "self", 0.0, True))
                continue
            learned: Source = max(sources - {"linked"}, key=SOURCE_RANK.__getitem__, default="linked")
            seen_s = heard_s.get(record.name, now - record.last_seen)
            endpoint = self._up.get(record.name) or record.endpoints.get("bus", "")
            up = record.name in self._up
            out.append(DirectoryEntry(record.name, endpoint, _offers(record), learned, round(seen_s, 3), up))
        for endpoint, name in sorted(self._static.items()):
            if name in self.table:
                continue
            want = self._wanted.get(endpoint)
            since = want.since if want is not None else now
            out.append(DirectoryEntry(name, endpoint, (), "static", round(now - since, 3), False))
        return out

    def programs_by_node(self) -> dict[str, frozenset[str]]:
        """What each node offers, for placement: this node and every node linked and up."""
        out: dict[str, frozenset[str]] = {}
        for record in self.table.records():
            if record.name == self.name or record.name in self._up:
                out[record.name] = frozenset(_offers(record))
        out.setdefault(self.name, frozenset())
        return out

    def gossip_body(self) -> dict[str, dict[str, str]]:
        """What to tell linked peers: every node linked and up, where its link goes (never a
        wildcard), and its public key where one is known."""
        peers: dict[str, str] = {}
        for name, endpoint in sorted(self._up.items()):
            if len(peers) >= MAX_GOSSIP_PEERS:
                break
            try:
                peers[name] = parse_endpoint(endpoint)
            except GossipRejected:
                continue
        keys = {name: self._keys[name].z85 for name in peers if name in self._keys}
        return {"peers": peers, "keys": keys}

    def linked(self) -> dict[str, str]:
        """Node name -> endpoint of every link that is up."""
        return dict(self._up)

    # -- internals --------------------------------------------------------------------------

    def _vetted(
        self, name: str, key: PublicKey | None, endpoint: str, source: Literal["mdns", "gossip"], now: float
    ) -> tuple[PublicKey | None] | None:
        """``(the key to link with,)`` if node ``name`` may be linked presenting ``key``, else None
        (refused: counted, logged once per node per interval, asked about again on ``expire``)."""
        try:
            use = self._vet(name, key)
        except SecurityError as exc:
            self.rejected["untrusted-key"] += 1
            if name in self._untrusted or len(self._untrusted) < self.max_known:
                self._untrusted[name] = _Untrusted(endpoint, key, source)
            why = f"{name} {type(exc).__name__}"  # a node unknown, then pinned to another key: both said
            last = self._key_logged.get(why)
            if last is None or now - last >= REJECTION_LOG_INTERVAL_S:
                if len(self._key_logged) >= 4 * self.max_known:  # bounded: names are free to make up
                    self._key_logged.clear()
                self._key_logged[why] = now
                log.error("node %s: not linking node %s at %s (from %s): %s", self.name, name, endpoint, source, exc)
            else:
                log.debug("node %s: not linking node %s again: %s", self.name, name, exc)
            return None
        self._untrusted.pop(name, None)
        if use is not None:
            self._keys[name] = use
        return (use,)

    def _vet_again(self, now: float) -> list[Action]:
        """Link the refused nodes whose key is now trusted (pinned since), if still known."""
        actions: list[Action] = []
        for name, refused in list(self._untrusted.items()):
            if name in self._up or name not in self.table or not self.table.sources(name) & {"mdns", "gossip"}:
                del self._untrusted[name]
                continue
            vetted = self._vetted(name, refused.key, refused.endpoint, refused.source, now)
            if vetted and refused.endpoint not in self._wanted:
                self._wanted[refused.endpoint] = _Want(refused.endpoint, refused.source, name, now)
                actions.append(Link(refused.endpoint, key=vetted[0]))
        return actions

    def _known_count(self) -> int:
        return len(self.table) - (1 if self.name in self.table else 0)

    def _rumour(self, name: str, endpoint: str, via: str) -> NodeRecord:
        return NodeRecord(name, "", PROTOCOL_VERSION, {"bus": endpoint}, source="gossip", via=via)

    def _link_gone(self, name: str, endpoint: str, now: float, *, keep: bool = False) -> None:
        """``name``'s link at ``endpoint`` is no longer up; ``keep``: still wanted, from mDNS.

        No ``Unlink``: the hub itself retries a static link and drops any other one when it goes
        down, and the listener runs before the hub may open a new link to the same endpoint (a
        restarted peer), which a late ``Unlink`` would close.
        """
        if self._up.get(name) == endpoint:
            del self._up[name]
        want = self._wanted.get(endpoint)
        if keep:
            if want is None:
                want = self._wanted[endpoint] = _Want(endpoint, "mdns", name, now)
            want.source, want.name = "mdns", name
        if want is None:
            return
        want.up, want.since = False, now
        if endpoint not in self._static and not keep:
            del self._wanted[endpoint]

    def _drop_wants(self, name: str, reason: str, *, keep: str, only: str = "") -> list[Action]:
        """Unlink every non-static link wanted for ``name`` that is not up, except ``keep``."""
        actions: list[Action] = []
        for endpoint, want in list(self._wanted.items()):
            if (
                want.name == name
                and endpoint != keep
                and not want.up
                and want.source != "static"
                and (not only or want.source == only)
            ):
                del self._wanted[endpoint]
                actions.append(Unlink(endpoint, reason))
        return actions

    def _forget_unlinked(self, changes: list[NodeChange], reason: str) -> list[Action]:
        """Unlink the links wanted for nodes the table just removed."""
        actions: list[Action] = []
        for change in changes:
            if change.kind == "removed" and change.name not in self._up:
                actions += self._drop_wants(change.name, reason, keep="")
        return actions

    def _evict_over_bound(self) -> list[Action]:
        """Make room for first-hand entries: drop the stalest unlinked gossip-only entries."""
        excess = self._known_count() - self.max_known
        if excess <= 0:
            return []
        rumours = sorted(
            (self.table.seen_at(r.name, "gossip") or 0.0, r.name)
            for r in self.table.records()
            if r.name not in self._up and self.table.sources(r.name) == {"gossip"}
        )
        actions: list[Action] = []
        for _, name in rumours[:excess]:
            self.table.withdraw(name, "gossip", "evicted")
            actions += self._drop_wants(name, "evicted for a first-hand peer", keep="")
        return actions

    def _reject(self, code: RejectCode, via: str, detail: str, now: float) -> list[Action]:
        self.rejected[code] += 1
        last = self._logged.get(code)
        if last is None or now - last >= REJECTION_LOG_INTERVAL_S:
            self._logged[code] = now
            log.warning(
                "node %s: %s (%s; %d so far; more at debug level)", self.name, detail, code, self.rejected[code]
            )
        else:
            log.debug("node %s: %s (%s)", self.name, detail, code)
        return []


def _programs(info: Mapping[str, Any], key: str = "programs") -> tuple[str, ...]:
    """The valid program (or, ``key="plugins"``, plugin) names a HELLO ``info`` lists, at most
    ``MAX_PROGRAMS``, sorted."""
    programs = info.get(key) if isinstance(info, Mapping) else None
    if not isinstance(programs, list | tuple):
        return ()
    return tuple(sorted({p for p in programs[:MAX_PROGRAMS] if isinstance(p, str) and valid_program_name(p)}))


def _offers(record: NodeRecord) -> tuple[str, ...]:
    """What a node offers, as stages name it: its programs, and its plugins as ``%NAME``."""
    return tuple(sorted(set(record.programs) | {PLUGIN_SIGIL + p for p in record.plugins}))


__all__ = [
    "DEPARTED_S",
    "GOSSIP_MIN_INTERVAL_S",
    "GOSSIP_TTL_S",
    "MAX_GOSSIP_PEERS",
    "MAX_KNOWN_NODES",
    "UNREACHABLE_EXPIRY_S",
    "Action",
    "DirectoryEntry",
    "GossipRejected",
    "KeyVet",
    "Link",
    "NodeDirectory",
    "RejectCode",
    "Unlink",
    "parse_endpoint",
    "parse_gossip",
    "parse_gossip_keys",
    "vet_by",
]
