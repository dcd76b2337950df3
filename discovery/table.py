"""The node table: who is on the LAN, learned from where, and how fresh.

A plain state machine with no I/O. Discovery sources (mDNS, the static seed list, gossip, the node
itself) feed it events; every method returns the :class:`NodeChange` list that event caused, so the
daemon can open or close hub links and ``dpipes --nodes`` can show the table.

Rules:

* One entry per node name. Instance ids order incarnations of a name: a record with a *newer*
  instance id replaces the entry (``updated``, reason ``restarted``); an *older* one is stale and
  ignored. An empty instance id means "not known yet" (a static seed before its first HELLO) and
  matches any id.
* An entry remembers every source that vouches for it. Content (endpoints, programs, ...) comes
  from the highest-ranked source: ``self`` > ``linked`` > ``mdns`` > ``static`` > ``gossip``; so
  mDNS beats gossip when both know a node, and a lower-ranked source only adds itself to the set.
  ``linked`` is the hub's live link to the node: what the node said of itself in its HELLO, over
  a link whose heartbeats prove it is there, outranks what its mDNS records said.
* ``goodbye`` (mDNS goodbye or removal) withdraws the ``mdns`` and ``gossip`` claims: an entry that
  is also static or linked stays (static entries are never removed by mDNS absence; a live link
  outlasts a lossy multicast cache); only the hub's heartbeat verdict, ``lost``, removes a static
  entry.
* ``expire`` ages out gossip claims not refreshed within ``ttl_s``. mDNS entries are not aged
  here: zeroconf reports their absence (goodbye or cache expiry) as a removal, which the mDNS layer
  turns into ``goodbye``.
* After ``goodbye``/``lost`` the instance id is tombstoned for ``ttl_s`` (purged by ``expire``), so
  gossip still carrying that incarnation cannot resurrect it; first-hand sources (mDNS, static)
  can.
* ``withdraw`` takes back one source's claim (a link went down, a rumour was dropped); the entry
  goes when no claim is left. It leaves no tombstone: it says nothing about an incarnation.
* The ``self`` entry is never removed or overwritten by other sources.
* Ordering is stable: ``records()`` is sorted by name, and batch events (``merge_gossip``,
  ``expire``) are processed in name order.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal

from dpipes.bus.keys import PublicKey

Source = Literal["self", "linked", "mdns", "static", "gossip"]
ChangeKind = Literal["added", "updated", "removed"]

SOURCES: tuple[Source, ...] = ("self", "linked", "mdns", "static", "gossip")
# Higher rank wins as the displayed source and as the origin of an entry's content.
SOURCE_RANK: Mapping[str, int] = MappingProxyType({"self": 4, "linked": 3, "mdns": 2, "static": 1, "gossip": 0})


def new_instance_id() -> str:
    """A fresh instance id: 12 hex digits of milliseconds since the epoch, then 8 random hex digits.

    Ids of later incarnations compare greater as strings (until the year 10889), which is what the
    table's "newer instance replaces older" rule relies on; the random part separates two starts in
    the same millisecond.
    """
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(4)}"


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What is known about one node. Not hashable (``endpoints`` is a read-only mapping)."""

    name: str
    instance_id: str
    protocol_version: int
    endpoints: Mapping[str, str] = field(default_factory=dict)
    addresses: tuple[str, ...] = ()
    programs: tuple[str, ...] = ()
    plugins: tuple[str, ...] = ()
    source: Source = "self"
    last_seen: float = 0.0
    via: str = ""  # for gossip: the node that told us
    key: PublicKey | None = None  # its CURVE public key, as advertised (None: a node without keys)

    def __post_init__(self) -> None:
        # Frozen means frozen: keep a private read-only copy of the caller's mapping.
        object.__setattr__(self, "endpoints", MappingProxyType(dict(self.endpoints)))
        object.__setattr__(self, "addresses", tuple(self.addresses))
        object.__setattr__(self, "programs", tuple(self.programs))
        object.__setattr__(self, "plugins", tuple(self.plugins))

    def offers(self, program: str) -> bool:
        """True when this node advertises ``program`` as a program or a plugin."""
        return program in self.programs or program in self.plugins

    def same_content(self, other: NodeRecord) -> bool:
        """True when everything but source, freshness and ``via`` is equal."""
        return (
            self.name == other.name
            and self.instance_id == other.instance_id
            and self.protocol_version == other.protocol_version
            and dict(self.endpoints) == dict(other.endpoints)
            and self.addresses == other.addresses
            and self.programs == other.programs
            and self.plugins == other.plugins
            and self.key == other.key
        )


@dataclass(frozen=True, slots=True)
class NodeChange:
    """One change to the table.

    ``record`` is the entry after the change (for ``removed``: the entry as it was). ``reason``:
    for ``added`` the source that taught us the node; for ``updated`` one of ``restarted`` (newer
    instance id), ``changed`` (content), ``source`` (only the best source changed), ``goodbye``
    (a static entry lost its mDNS claim); for ``removed``
    one of ``goodbye``, ``lost``, ``expired``; after :meth:`NodeTable.withdraw`, the reason given.
    """

    kind: ChangeKind
    record: NodeRecord
    reason: str
    previous: NodeRecord | None = None

    @property
    def name(self) -> str:
        """The node's name."""
        return self.record.name


@dataclass(slots=True)
class _Entry:
    record: NodeRecord
    content_rank: int
    last_seen: dict[Source, float]  # per vouching source


def _order(new: str, old: str) -> int:
    """Compare instance ids: 1 newer, -1 older, 0 same incarnation (or one of them unknown)."""
    if new == old or not new or not old:
        return 0
    return 1 if new > old else -1


class NodeTable:
    """Node names to records, merged from every discovery source. See the module docstring."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._tombstones: dict[str, tuple[str, float]] = {}  # name -> (instance id, since)
        self.stale_ignored = 0  # records of an older incarnation than the one we hold
        self.conflicts = 0  # records claiming our own name with another instance id

    # -- queries ----------------------------------------------------------------------------

    def get(self, name: str) -> NodeRecord | None:
        """The record for ``name``, or None."""
        entry = self._entries.get(name)
        return entry.record if entry else None

    def records(self) -> list[NodeRecord]:
        """Every record, sorted by name."""
        return [self._entries[name].record for name in sorted(self._entries)]

    def offering(self, program: str) -> list[NodeRecord]:
        """Records of the nodes that offer ``program``, sorted by name."""
        return [r for r in self.records() if r.offers(program)]

    def sources(self, name: str) -> frozenset[Source]:
        """Every source currently vouching for ``name`` (empty if unknown)."""
        entry = self._entries.get(name)
        return frozenset(entry.last_seen) if entry else frozenset()

    def seen_at(self, name: str, source: Source) -> float | None:
        """When ``source`` last vouched for ``name``, or None if it does not."""
        entry = self._entries.get(name)
        return entry.last_seen.get(source) if entry else None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[NodeRecord]:
        return iter(self.records())

    # -- events -----------------------------------------------------------------------------

    def seen(self, record: NodeRecord, source: Source, now: float) -> list[NodeChange]:
        """A source vouches for ``record`` at ``now`` (monotonic seconds).

        Args:
            record: what the source says; its own ``source``/``last_seen`` are ignored.
            source: who says it.
            now: monotonic time of the observation.

        Returns:
            The changes caused, possibly none (a refresh, a stale or conflicting record).
        """
        if source not in SOURCE_RANK:
            raise ValueError(f"unknown discovery source {source!r}; expected one of {SOURCES}")
        name = record.name
        entry = self._entries.get(name)
        if entry is None:
            if source == "gossip" and self._tombstoned(record):
                return []
            stored = replace(record, source=source, last_seen=now, via=record.via if source == "gossip" else "")
            self._entries[name] = _Entry(stored, SOURCE_RANK[source], {source: now})
            self._tombstones.pop(name, None)
            return [NodeChange("added", stored, source)]

        old = entry.record
        if "self" in entry.last_seen and source != "self":
            if record.instance_id and record.instance_id != old.instance_id:
                self.conflicts += 1
            return []
        order = _order(record.instance_id, old.instance_id)
        if order < 0:
            self.stale_ignored += 1
            return []
        if order > 0:
            if source == "gossip" and self._tombstoned(record):
                return []
            # A new incarnation: earlier claims were about the old one, except the static seed,
            # which names the node, not an incarnation.
            seen_by: dict[Source, float] = {source: now}
            if "static" in entry.last_seen and source != "static":
                seen_by["static"] = entry.last_seen["static"]
            entry.last_seen = seen_by
            entry.content_rank = SOURCE_RANK[source]
            entry.record = replace(
                record, source=self._best(entry), last_seen=now, via=record.via if source == "gossip" else ""
            )
            self._tombstones.pop(name, None)
            return [NodeChange("updated", entry.record, "restarted", old)]

        entry.last_seen[source] = now
        best = self._best(entry)
        rank = SOURCE_RANK[source]
        if rank >= entry.content_rank:
            entry.content_rank = rank
            content = replace(
                record,
                instance_id=record.instance_id or old.instance_id,
                via=record.via if source == "gossip" else "",
            )
        else:
            content = old
        entry.record = replace(content, source=best, last_seen=now)
        if not content.same_content(old):
            return [NodeChange("updated", entry.record, "changed", old)]
        if best != old.source:
            return [NodeChange("updated", entry.record, "source", old)]
        return []

    def goodbye(self, name: str, instance_id: str = "") -> list[NodeChange]:
        """``name`` said goodbye over mDNS (or vanished from the mDNS cache).

        A goodbye naming an older instance than the one held is ignored; a static entry stays.
        """
        entry = self._entries.get(name)
        if entry is None or "self" in entry.last_seen:
            return []
        old = entry.record
        if _order(instance_id, old.instance_id) != 0:
            return []
        if old.instance_id:
            self._tombstones[name] = (old.instance_id, max(entry.last_seen.values()))
        entry.last_seen.pop("mdns", None)
        entry.last_seen.pop("gossip", None)
        if not entry.last_seen:
            del self._entries[name]
            return [NodeChange("removed", old, "goodbye")]
        entry.content_rank = min(entry.content_rank, SOURCE_RANK[self._best(entry)])
        entry.record = replace(old, source=self._best(entry))
        if entry.record.source == old.source:
            return []
        return [NodeChange("updated", entry.record, "goodbye", old)]

    def lost(self, name: str, instance_id: str = "") -> list[NodeChange]:
        """The hub declared ``name`` gone (heartbeats stopped): remove it, static or not."""
        entry = self._entries.get(name)
        if entry is None or "self" in entry.last_seen:
            return []
        old = entry.record
        if _order(instance_id, old.instance_id) != 0:
            return []
        if old.instance_id:
            self._tombstones[name] = (old.instance_id, max(entry.last_seen.values()))
        del self._entries[name]
        return [NodeChange("removed", old, "lost")]

    def withdraw(self, name: str, source: Source, reason: str) -> list[NodeChange]:
        """``source`` no longer vouches for ``name``; the entry goes when no source is left.

        ``reason`` is the change's reason. The ``self`` entry is never withdrawn.
        """
        entry = self._entries.get(name)
        if entry is None or "self" in entry.last_seen or source not in entry.last_seen:
            return []
        old = entry.record
        del entry.last_seen[source]
        if not entry.last_seen:
            del self._entries[name]
            return [NodeChange("removed", old, reason)]
        entry.content_rank = min(entry.content_rank, SOURCE_RANK[self._best(entry)])
        entry.record = replace(old, source=self._best(entry))
        if entry.record.source == old.source:
            return []
        return [NodeChange("updated", entry.record, reason, old)]

    def expire(self, now: float, ttl_s: float) -> list[NodeChange]:
        """Drop gossip claims older than ``ttl_s`` and tombstones older than ``ttl_s``."""
        changes: list[NodeChange] = []
        for name in sorted(self._entries):
            entry = self._entries[name]
            seen_at = entry.last_seen.get("gossip")
            if seen_at is None or now - seen_at <= ttl_s:
                continue
            del entry.last_seen["gossip"]
            if entry.last_seen:
                continue  # gossip ranks lowest: the entry's best source is unchanged
            del self._entries[name]
            if entry.record.instance_id:
                self._tombstones[name] = (entry.record.instance_id, now)
            changes.append(NodeChange("removed", entry.record, "expired"))
        for name, (_, since) in list(self._tombstones.items()):
            if now - since > ttl_s:
                del self._tombstones[name]
        return changes

    def merge_gossip(self, records: Iterable[NodeRecord], via: str, now: float) -> list[NodeChange]:
        """Records another node (``via``) says it knows; processed in name order."""
        changes: list[NodeChange] = []
        for record in sorted(records, key=lambda r: r.name):
            changes.extend(self.seen(replace(record, via=via), "gossip", now))
        return changes

    # -- internals --------------------------------------------------------------------------

    @staticmethod
    def _best(entry: _Entry) -> Source:
        return max(entry.last_seen, key=lambda s: SOURCE_RANK[s])

    def _tombstoned(self, record: NodeRecord) -> bool:
        tomb = self._tombstones.get(record.name)
        return tomb is not None and bool(record.instance_id) and record.instance_id <= tomb[0]
