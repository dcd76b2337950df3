"""NodeTable: the discovery state machine, without sockets."""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import pytest

from dpipes.discovery import table as table_module
from dpipes.discovery.table import NodeChange, NodeRecord, NodeTable, new_instance_id

OLD = "000000000001aaaaaaaa"
NEW = "000000000002bbbbbbbb"
NEWER = "000000000003cccccccc"


def rec(name: str = "beta", iid: str = OLD, programs: tuple[str, ...] = ("sort",), **kw: Any) -> NodeRecord:
    base = NodeRecord(name, iid, 1, {"bus": "tcp://10.77.0.9:5555"}, ("10.77.0.9",), programs)
    return dataclasses.replace(base, **kw)


def kinds(changes: list[NodeChange]) -> list[tuple[str, str, str]]:
    return [(c.kind, c.name, c.reason) for c in changes]


def test_added_then_refresh_is_silent_then_content_change_is_an_update() -> None:
    t = NodeTable()
    assert kinds(t.seen(rec(), "mdns", 1.0)) == [("added", "beta", "mdns")]
    assert t.seen(rec(), "mdns", 2.0) == []
    got = t.get("beta")
    assert got is not None and got.last_seen == 2.0 and got.source == "mdns"
    changes = t.seen(rec(programs=("sort", "uniq")), "mdns", 3.0)
    assert kinds(changes) == [("updated", "beta", "changed")]
    assert changes[0].previous is not None and changes[0].previous.programs == ("sort",)
    assert t.offering("uniq") == [changes[0].record]


def test_newer_instance_replaces_older_is_ignored() -> None:
    t = NodeTable()
    t.seen(rec(iid=NEW), "mdns", 1.0)
    assert t.seen(rec(iid=OLD, programs=("stale",)), "mdns", 2.0) == []
    assert t.stale_ignored == 1
    changes = t.seen(rec(iid=NEWER), "mdns", 3.0)
    assert kinds(changes) == [("updated", "beta", "restarted")]
    assert changes[0].previous is not None and changes[0].previous.instance_id == NEW
    assert changes[0].record.instance_id == NEWER


def test_mdns_beats_gossip_for_source_and_content() -> None:
    t = NodeTable()
    assert kinds(t.seen(rec(programs=("rumour",), via="gamma"), "gossip", 1.0)) == [("added", "beta", "gossip")]
    got = t.get("beta")
    assert got is not None and got.via == "gamma"
    changes = t.seen(rec(), "mdns", 2.0)
    assert kinds(changes) == [("updated", "beta", "changed")]
    assert changes[0].record.source == "mdns" and changes[0].record.via == ""
    # Gossip about the same incarnation neither overrides mDNS content nor the source.
    assert t.merge_gossip([rec(programs=("rumour",))], via="gamma", now=3.0) == []
    got = t.get("beta")
    assert got is not None and got.programs == ("sort",) and got.source == "mdns"
    assert t.sources("beta") == {"mdns", "gossip"}


def test_same_content_from_a_better_source_is_a_source_update() -> None:
    t = NodeTable()
    t.seen(rec(), "gossip", 1.0)
    assert kinds(t.seen(rec(), "mdns", 2.0)) == [("updated", "beta", "source")]


def test_static_entry_survives_goodbye_and_is_removed_only_when_lost() -> None:
    t = NodeTable()
    t.seen(rec(iid="", programs=()), "static", 1.0)
    changes = t.seen(rec(), "mdns", 2.0)  # mDNS identifies the static seed
    assert kinds(changes) == [("updated", "beta", "changed")]
    assert changes[0].record.instance_id == OLD and changes[0].record.source == "mdns"
    assert kinds(t.goodbye("beta", OLD)) == [("updated", "beta", "goodbye")]
    got = t.get("beta")
    assert got is not None and got.source == "static" and got.programs == ("sort",)
    assert t.goodbye("beta") == []
    assert t.expire(1e9, 10.0) == []
    assert "beta" in t
    assert kinds(t.lost("beta")) == [("removed", "beta", "lost")]
    assert "beta" not in t


def test_static_seen_without_instance_keeps_the_known_instance() -> None:
    t = NodeTable()
    t.seen(rec(), "mdns", 1.0)
    assert t.seen(rec(iid="", programs=()), "static", 2.0) == []
    got = t.get("beta")
    assert got is not None and got.instance_id == OLD and got.programs == ("sort",)


def test_restart_keeps_static_claim_but_drops_gossip() -> None:
    t = NodeTable()
    t.seen(rec(), "static", 1.0)
    t.seen(rec(), "gossip", 1.0)
    t.seen(rec(iid=NEW), "mdns", 2.0)
    assert t.sources("beta") == {"mdns", "static"}


def test_goodbye_removes_mdns_entry_but_not_for_an_older_instance() -> None:
    t = NodeTable()
    t.seen(rec(iid=NEW), "mdns", 1.0)
    assert t.goodbye("beta", OLD) == []  # the previous incarnation's late goodbye
    assert kinds(t.goodbye("beta", NEW)) == [("removed", "beta", "goodbye")]
    assert t.goodbye("beta", NEW) == []
    assert t.goodbye("nobody") == []


def test_gossip_cannot_resurrect_a_departed_instance_but_first_hand_sources_can() -> None:
    t = NodeTable()
    t.seen(rec(), "mdns", 1.0)
    t.goodbye("beta", OLD)
    assert t.merge_gossip([rec()], via="gamma", now=2.0) == []
    assert kinds(t.seen(rec(), "mdns", 3.0)) == [("added", "beta", "mdns")]
    t.lost("beta")
    assert t.merge_gossip([rec()], via="gamma", now=4.0) == []
    assert kinds(t.merge_gossip([rec(iid=NEW)], via="gamma", now=5.0)) == [("added", "beta", "gossip")]


def test_expire_ages_out_gossip_only_and_purges_tombstones() -> None:
    t = NodeTable()
    t.seen(rec("only-gossip"), "gossip", 0.0)
    t.seen(rec("mdns-node"), "mdns", 0.0)
    t.seen(rec("both"), "mdns", 0.0)
    t.seen(rec("both"), "gossip", 0.0)
    assert t.expire(5.0, ttl_s=10.0) == []
    assert kinds(t.expire(11.0, ttl_s=10.0)) == [("removed", "only-gossip", "expired")]
    assert [r.name for r in t.records()] == ["both", "mdns-node"]
    assert t.sources("both") == {"mdns"}
    # The expired gossip is tombstoned for ttl_s, then forgotten.
    assert t.merge_gossip([rec("only-gossip")], via="x", now=12.0) == []
    t.expire(30.0, ttl_s=10.0)
    assert kinds(t.merge_gossip([rec("only-gossip")], via="x", now=31.0)) == [("added", "only-gossip", "gossip")]


def test_self_entry_is_never_removed_or_overwritten() -> None:
    t = NodeTable()
    me = rec("alpha", iid=NEW)
    assert kinds(t.seen(me, "self", 0.0)) == [("added", "alpha", "self")]
    assert t.seen(rec("alpha", iid=NEWER, programs=("evil",)), "mdns", 1.0) == []
    assert t.conflicts == 1
    assert t.merge_gossip([rec("alpha", iid=NEWER)], via="x", now=1.0) == []
    assert t.goodbye("alpha") == [] and t.lost("alpha") == [] and t.expire(1e9, 1.0) == []
    assert t.get("alpha") == dataclasses.replace(me, source="self", last_seen=0.0)


def test_ordering_is_stable() -> None:
    t = NodeTable()
    changes = t.merge_gossip([rec("delta"), rec("alpha"), rec("charlie")], via="bravo", now=0.0)
    assert [c.name for c in changes] == ["alpha", "charlie", "delta"]
    t.seen(rec("bravo"), "mdns", 0.0)
    assert [r.name for r in t.records()] == ["alpha", "bravo", "charlie", "delta"]
    assert [r.name for r in t] == ["alpha", "bravo", "charlie", "delta"]
    assert len(t) == 4
    assert all(r.via == "bravo" for r in t.records() if r.source == "gossip")


def test_unknown_source_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown discovery source"):
        NodeTable().seen(rec(), cast(Any, "carrier-pigeon"), 0.0)


def test_record_is_immutable_and_owns_its_endpoints() -> None:
    endpoints = {"bus": "tcp://10.77.0.2:5555"}
    r = NodeRecord("alpha", OLD, 1, endpoints=endpoints, programs=cast(Any, ["sort"]))
    endpoints["bus"] = "tcp://evil:1"
    assert r.endpoints["bus"] == "tcp://10.77.0.2:5555"
    assert r.programs == ("sort",)
    with pytest.raises(TypeError):
        cast(Any, r.endpoints)["tap"] = "x"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cast(Any, r).name = "other"
    assert r.offers("sort") and not r.offers("uniq")


def test_instance_ids_of_later_starts_compare_greater(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(table_module.time, "time_ns", lambda: 1_700_000_000_000_000_000)
    first = new_instance_id()
    monkeypatch.setattr(table_module.time, "time_ns", lambda: 1_700_000_000_001_000_000)
    second = new_instance_id()
    assert len(first) == 20 and first.isalnum()
    assert second > first


def test_linked_outranks_mdns_and_survives_an_mdns_goodbye() -> None:
    t = NodeTable()
    t.seen(rec(programs=("old",)), "mdns", 1.0)
    changes = t.seen(rec(programs=("sort", "uniq")), "linked", 2.0)
    assert kinds(changes) == [("updated", "beta", "changed")]
    assert changes[0].record.source == "linked"
    # mDNS cache expiry while the link is up: the link still vouches, its content stays.
    assert kinds(t.goodbye("beta", OLD)) == []
    got = t.get("beta")
    assert got is not None and got.programs == ("sort", "uniq") and t.sources("beta") == {"linked"}


def test_withdraw_takes_back_one_claim_and_removes_the_last_without_a_tombstone() -> None:
    t = NodeTable()
    t.seen(rec(), "static", 1.0)
    t.seen(rec(), "linked", 2.0)
    assert t.seen_at("beta", "linked") == 2.0 and t.seen_at("beta", "mdns") is None
    assert kinds(t.withdraw("beta", "linked", "unlinked")) == [("updated", "beta", "unlinked")]
    got = t.get("beta")
    assert got is not None and got.source == "static"
    assert t.withdraw("beta", "linked", "unlinked") == []  # no such claim
    assert kinds(t.withdraw("beta", "static", "dropped")) == [("removed", "beta", "dropped")]
    assert kinds(t.merge_gossip([rec()], via="gamma", now=3.0)) == [("added", "beta", "gossip")]
    t.seen(rec("alpha"), "self", 0.0)
    assert t.withdraw("alpha", "self", "x") == [] and "alpha" in t
