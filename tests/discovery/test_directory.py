"""NodeDirectory: every source into one table, and the links it asks for, without sockets."""

from __future__ import annotations

import logging
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpipes.bus.errors import ConfigError
from dpipes.discovery import directory as directory_module
from dpipes.discovery.directory import (
    DEPARTED_S,
    GOSSIP_MIN_INTERVAL_S,
    GOSSIP_TTL_S,
    MAX_GOSSIP_PEERS,
    MAX_KNOWN_NODES,
    UNREACHABLE_EXPIRY_S,
    Action,
    GossipRejected,
    Link,
    NodeDirectory,
    Unlink,
    parse_endpoint,
    parse_gossip,
)
from dpipes.discovery.table import NodeRecord

ME = "alpha"
ME_ENDPOINT = "tcp://10.0.0.1:5555"
IID = "000000000001aaaaaaaa"
IID2 = "000000000002bbbbbbbb"


def directory(**kw: Any) -> NodeDirectory:
    d = NodeDirectory(ME, **kw)
    d.set_self(NodeRecord(ME, IID, 1, {"bus": ME_ENDPOINT}, programs=("cat", "sort")), 0.0)
    return d


def mdns_record(name: str, endpoint: str, programs: tuple[str, ...] = ("uniq",), **kw: Any) -> NodeRecord:
    return NodeRecord(name, kw.pop("iid", IID), 1, {"bus": endpoint}, kw.pop("addresses", ()), programs, **kw)


def links(actions: list[Action]) -> list[str]:
    return [a.endpoint for a in actions if isinstance(a, Link)]


def unlinks(actions: list[Action]) -> list[str]:
    return [a.endpoint for a in actions if isinstance(a, Unlink)]


def fake_peers(count: int) -> dict[str, str]:
    """Made-up peers, as the flood that exhausted a node's descriptors sent them."""
    return {f"fake{i:05d}": f"tcp://10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}:7000" for i in range(count)}


def linked_peer(d: NodeDirectory, name: str, endpoint: str, now: float, programs: tuple[str, ...] = ()) -> None:
    """A peer that dialled us: its link is up, as the hub reports it."""
    d.link_up(name, IID, endpoint, {"programs": list(programs)}, now)


# -- the gossip validator ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "endpoint",
    ["tcp://127.0.0.1:5555", "tcp://10.1.2.3:1", "tcp://[::1]:65535", "tcp://host-b.lan:5555", "tcp://beta:7"],
)
def test_endpoints_a_link_can_be_opened_to_are_accepted(endpoint: str) -> None:
    assert parse_endpoint(endpoint) == endpoint


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://*:5555",  # a wildcard: where would we connect?
        "tcp://0.0.0.0:5555",
        "tcp://[::]:5555",
        "tcp://224.0.0.251:5353",
        "tcp://10.0.0.1:0",
        "tcp://10.0.0.1:65536",
        "tcp://10.0.0.1",
        "tcp://10.0.0.1:55a",
        "tcp://[zz::1]:5",
        "tcp://-bad-.lan:5",
        "tcp://:5",
        "ipc:///tmp/x",
        "tcp://" + "a" * 300 + ":5",
        5555,
        None,
        b"tcp://10.0.0.1:5555",
    ],
)
def test_endpoints_that_name_no_one_host_are_refused(endpoint: object) -> None:
    with pytest.raises(GossipRejected) as info:
        parse_endpoint(endpoint)
    assert info.value.code == "bad-endpoint"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ([], "not-a-map"),
        ({"peers": ["beta"]}, "not-a-map"),
        ({}, "not-a-map"),
        ({"peers": {"beta": "tcp://10.0.0.2:5555", "bad name": "tcp://10.0.0.3:5555"}}, "bad-name"),
        ({"peers": {b"beta": "tcp://10.0.0.2:5555"}}, "bad-name"),
        ({"peers": {"x" * 49: "tcp://10.0.0.2:5555"}}, "bad-name"),
        ({"peers": {"beta": "tcp://*:5555"}}, "bad-endpoint"),
        ({"peers": {"beta": ["tcp://10.0.0.2:5555"]}}, "bad-endpoint"),
        ({"peers": fake_peers(MAX_GOSSIP_PEERS + 1)}, "too-many-peers"),
    ],
)
def test_a_malformed_gossip_body_is_refused_whole_with_its_code(body: object, code: str) -> None:
    with pytest.raises(GossipRejected) as info:
        parse_gossip(body)
    assert info.value.code == code


def test_a_well_formed_body_is_taken_and_unknown_keys_ignored() -> None:
    body = {"peers": {"beta": "tcp://10.0.0.2:5555", "gamma_1": "tcp://[fe80::1]:6000"}, "later": 1}
    assert parse_gossip(body) == body["peers"]


wire_ints = st.integers(-(2**63), 2**64 - 1)
msgpackable = st.recursive(
    st.none() | st.booleans() | wire_ints | st.floats() | st.text(max_size=40) | st.binary(max_size=40),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=10) | wire_ints, kids, max_size=5),
    max_leaves=30,
)
peer_names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}", fullmatch=True)
map_keys = peer_names | st.text(max_size=60) | wire_ints | st.binary(max_size=20) | st.booleans() | st.none()
endpoints = st.builds(
    "tcp://{}.{}.{}.{}:{}".format,
    st.integers(1, 223),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(1, 254),
    st.integers(1, 65535),
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        msgpackable,
        st.dictionaries(st.just("peers"), msgpackable, max_size=1),
        st.builds(lambda p: {"peers": p}, st.dictionaries(map_keys, endpoints | msgpackable, max_size=8)),
    )
)
def test_any_msgpack_body_is_taken_or_refused_with_a_code_never_a_crash(body: Any) -> None:
    body = msgpack.unpackb(msgpack.packb(body), strict_map_key=False)  # as it comes off the wire
    try:
        peers = parse_gossip(body)
    except GossipRejected as exc:
        assert exc.code in {"not-a-map", "too-many-peers", "bad-name", "bad-endpoint"}
    else:
        assert all(parse_endpoint(e) == e for e in peers.values())
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    actions = d.gossip("beta", body, 1.0)  # never raises either
    assert all(parse_endpoint(e) == e for e in links(actions))
    assert len(links(actions)) <= MAX_KNOWN_NODES


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(peer_names, endpoints, max_size=MAX_GOSSIP_PEERS))
def test_every_well_formed_body_is_taken_as_sent(peers: dict[str, str]) -> None:
    body = msgpack.unpackb(msgpack.packb({"peers": peers}))
    assert parse_gossip(body) == peers


# -- gossip: from whom, how often, how much ------------------------------------------------


def test_gossip_only_from_a_linked_peer_and_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    d = directory()
    body = {"peers": {"gamma": "tcp://10.0.0.3:5555"}}
    assert d.gossip("beta", body, 1.0) == [] and d.rejected["not-linked"] == 1
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 1.0)
    assert links(d.gossip("beta", body, 1.0)) == ["tcp://10.0.0.3:5555"]
    body2 = {"peers": {"delta": "tcp://10.0.0.4:5555"}}
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger=directory_module.__name__):
        for i in range(5):
            assert d.gossip("beta", body2, 1.0 + i * GOSSIP_MIN_INTERVAL_S / 10) == []
    assert d.rejected["rate-limited"] == 5
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "rate-limited" in warnings[0].getMessage()  # logged once, counted always
    assert links(d.gossip("beta", body2, 1.0 + GOSSIP_MIN_INTERVAL_S)) == ["tcp://10.0.0.4:5555"]
    # A body that is refused still uses the peer's turn: a malformed flood is rate-limited too.
    assert d.gossip("beta", {"peers": 7}, 5.0) == [] and d.rejected["not-a-map"] == 1
    assert d.gossip("beta", body, 5.0) == [] and d.rejected["rate-limited"] == 6


def test_the_flood_of_1124_made_up_peers_cannot_exhaust_the_node() -> None:
    d = directory()
    senders = [f"liar{i}" for i in range(8)]
    for i, sender in enumerate(senders):
        linked_peer(d, sender, f"tcp://10.9.0.{i + 1}:5555", 0.0)
    flood = fake_peers(1124)
    # In one body, as it was sent: refused whole.
    assert d.gossip("liar0", {"peers": flood}, 1.0) == []
    assert d.rejected["too-many-peers"] == 1
    # In bodies small enough to pass, from every linked peer, round after round.
    total: list[Action] = []
    names = sorted(flood)
    chunks = [names[i : i + MAX_GOSSIP_PEERS] for i in range(0, len(names), MAX_GOSSIP_PEERS)]
    now = 2.0
    for _ in range(3):
        for sender, chunk in zip(senders, chunks, strict=False):
            total += d.gossip(sender, {"peers": {n: flood[n] for n in chunk}}, now)
        now += GOSSIP_MIN_INTERVAL_S
    admitted = links(total)
    assert len(admitted) == len(set(admitted)) == MAX_KNOWN_NODES - len(senders)
    assert d.rejected["full"] == 3 * (len(flood) - len(admitted))  # the admitted are refreshed, not refused
    assert len(d.entries(now)) == 1 + MAX_KNOWN_NODES  # this node and the bound
    # A real peer still gets in, by every first-hand source, each evicting one rumour.
    static = d.add_static("tcp://10.0.0.2:5555", now)
    assert static == [Link("tcp://10.0.0.2:5555", static=True)]
    seen = d.mdns_seen(mdns_record("gamma", "tcp://10.0.0.3:5555"), now)
    assert links(seen) == ["tcp://10.0.0.3:5555"] and len(unlinks(seen)) == 1
    up = d.link_up("beta", IID, "tcp://10.0.0.2:5555", {"programs": ["sort"]}, now)
    assert len(unlinks(up)) == 1
    assert {"beta", "gamma"} <= {e.name for e in d.entries(now)}
    assert set(unlinks(seen + up)) <= set(admitted)
    assert d.programs_by_node()["beta"] == {"sort"}


def test_links_to_unreachable_gossip_learned_peers_expire_and_stay_dropped_a_while() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    body = {"peers": {"ghost": "tcp://10.0.0.66:5555", "gamma": "tcp://10.0.0.3:5555"}}
    assert links(d.gossip("beta", body, 0.0)) == ["tcp://10.0.0.3:5555", "tcp://10.0.0.66:5555"]
    linked_peer(d, "gamma", "tcp://10.0.0.3:5555", 1.0)  # gamma answers; the ghost never does
    assert d.expire(UNREACHABLE_EXPIRY_S) == []
    expired = d.expire(UNREACHABLE_EXPIRY_S + 0.1)
    assert expired == [Unlink("tcp://10.0.0.66:5555", f"unreachable for {UNREACHABLE_EXPIRY_S:g} s")]
    assert "ghost" not in {e.name for e in d.entries(UNREACHABLE_EXPIRY_S + 0.1)}
    # Still gossiped: refused until its bar runs out, then tried once more.
    now = UNREACHABLE_EXPIRY_S + 1.0
    assert d.gossip("beta", body, now) == [] and d.rejected["unreachable"] == 1
    d.expire(2 * UNREACHABLE_EXPIRY_S + 0.2)
    assert links(d.gossip("beta", body, 2 * UNREACHABLE_EXPIRY_S + 0.2)) == ["tcp://10.0.0.66:5555"]


def test_the_expiry_is_a_patchable_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_module, "UNREACHABLE_EXPIRY_S", 1.0)
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    d.gossip("beta", {"peers": {"ghost": "tcp://10.0.0.66:5555"}}, 0.0)
    assert unlinks(d.expire(1.5)) == ["tcp://10.0.0.66:5555"]


def test_static_and_mdns_links_are_never_expired_as_unreachable() -> None:
    d = directory()
    d.add_static("tcp://10.0.0.2:5555", 0.0)
    d.mdns_seen(mdns_record("gamma", "tcp://10.0.0.3:5555"), 0.0)
    assert d.expire(10 * GOSSIP_TTL_S) == []
    entries = d.entries(10 * GOSSIP_TTL_S)
    assert [(e.name, e.source, e.up) for e in entries] == [
        (ME, "self", True),
        ("gamma", "mdns", False),
        ("", "static", False),  # not linked yet: known by its endpoint only
    ]


def test_rumours_nobody_repeats_are_forgotten_and_their_links_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(directory_module, "UNREACHABLE_EXPIRY_S", 1e9)  # this test is about the rumour's age
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    d.gossip("beta", {"peers": {"gamma": "tcp://10.0.0.3:5555"}}, 0.0)
    linked_peer(d, "gamma", "tcp://10.0.0.3:5555", 0.5)
    d.gossip("beta", {"peers": {"delta": "tcp://10.0.0.4:5555"}}, 1.0)
    assert d.expire(GOSSIP_TTL_S + 0.9) == []
    # delta was mentioned once and never again; gamma's rumour ages out too, but its link vouches.
    forgotten = d.expire(GOSSIP_TTL_S + 1.1)
    assert forgotten == [Unlink("tcp://10.0.0.4:5555", "no source mentions it any more")]
    assert [e.name for e in d.entries(GOSSIP_TTL_S + 1.1)] == [ME, "beta", "gamma"]


def test_a_gossiped_endpoint_where_another_node_answers_is_not_believed() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    d.gossip("beta", {"peers": {"imposter": "tcp://10.0.0.3:5555"}}, 0.0)
    assert "imposter" in {e.name for e in d.entries(0.0)}
    linked_peer(d, "gamma", "tcp://10.0.0.3:5555", 0.1)  # whoever answers there is gamma
    assert "imposter" not in {e.name for e in d.entries(0.1)}
    assert d.gossip("beta", {"peers": {"imposter": "tcp://10.0.0.3:5555"}}, 1.0) == []
    assert d.rejected["endpoint-taken"] == 1


def test_a_rumour_with_a_new_endpoint_replaces_the_old_link() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    d.gossip("beta", {"peers": {"gamma": "tcp://10.0.0.3:5555"}}, 0.0)
    moved = d.gossip("beta", {"peers": {"gamma": "tcp://10.0.0.33:5555"}}, 1.0)
    assert moved == [Unlink("tcp://10.0.0.3:5555", "its gossiped endpoint changed"), Link("tcp://10.0.0.33:5555")]


# -- first-hand sources and links ---------------------------------------------------------------


def test_a_static_peer_is_linked_named_when_up_and_listed_while_down() -> None:
    d = directory()
    assert d.add_static("tcp://10.0.0.2:5555", 0.0) == [Link("tcp://10.0.0.2:5555", static=True)]
    assert d.link_up("beta", IID, "tcp://10.0.0.2:5555", {"programs": ["sort"]}, 1.0) == []
    [beta] = [e for e in d.entries(1.0) if e.name == "beta"]
    assert (beta.source, beta.up, beta.programs, beta.endpoint) == ("static", True, ("sort",), "tcp://10.0.0.2:5555")
    # Lost: the hub keeps retrying a static peer, so nothing is unlinked, and it stays listed.
    assert d.link_down("beta", orderly=False, reason="silent", now=5.0) == []
    [beta] = [e for e in d.entries(7.0) if e.name == "beta"]
    assert (beta.source, beta.up, beta.last_seen_s) == ("static", False, 2.0)
    assert "beta" not in d.programs_by_node()
    assert d.expire(1e6) == []
    with pytest.raises(ConfigError, match="static peer"):
        d.add_static("tcp://*:5555", 0.0)


def test_mdns_links_a_node_once_and_its_goodbye_drops_a_link_that_never_came_up() -> None:
    d = directory()
    wildcard = mdns_record("gamma", "tcp://*:6000", addresses=("10.0.0.3",))
    assert d.mdns_seen(wildcard, 0.0) == [Link("tcp://10.0.0.3:6000")]
    assert d.mdns_seen(wildcard, 1.0) == []  # a refresh
    assert d.mdns_seen(mdns_record(ME, "tcp://10.0.0.1:5555"), 1.0) == []  # ourselves
    assert d.mdns_gone("gamma", IID, 2.0) == [Unlink("tcp://10.0.0.3:6000", "gone from mDNS")]
    # Once linked, an mDNS goodbye (a lossy multicast cache) does not drop the live link.
    d.mdns_seen(wildcard, 3.0)
    d.link_up("gamma", IID, "tcp://10.0.0.3:6000", {"programs": ["uniq"]}, 3.0)
    assert d.mdns_gone("gamma", IID, 4.0) == []
    assert d.programs_by_node()["gamma"] == {"uniq"}


def test_a_lost_link_to_an_advertised_node_is_asked_for_again_until_mdns_says_it_is_gone() -> None:
    """A cable pulled and put back: mDNS says nothing new (the records are still cached), so the
    directory itself keeps the link wanted; a link that left in order, or a rumour, is not."""
    d = directory()
    endpoint = "tcp://10.0.0.3:6000"
    assert d.mdns_seen(mdns_record("gamma", endpoint), 0.0) == [Link(endpoint)]
    d.link_up("gamma", IID, endpoint, {"programs": ["uniq"]}, 0.5)
    assert d.link_down("gamma", orderly=False, reason="no heartbeat for 3.0 s", now=4.0) == [Link(endpoint)]
    assert "gamma" not in d.programs_by_node()
    assert d.expire(4.0 + UNREACHABLE_EXPIRY_S + 1) == []  # first-hand: not expired as a rumour is
    d.link_up("gamma", IID, endpoint, {"programs": ["uniq"]}, 30.0)  # the cable is back
    assert d.programs_by_node()["gamma"] == {"uniq"}
    # Lost again, and this time it never comes back: mDNS's goodbye (or expiry) ends the retry.
    assert d.link_down("gamma", orderly=False, reason="no heartbeat for 3.0 s", now=40.0) == [Link(endpoint)]
    assert d.mdns_gone("gamma", IID, 60.0) == [Unlink(endpoint, "gone from mDNS")]
    # A node that said goodbye left: nothing to retry.
    d.mdns_seen(mdns_record("gamma", endpoint), 70.0)
    d.link_up("gamma", IID, endpoint, {}, 70.5)
    assert d.link_down("gamma", orderly=True, reason="said goodbye", now=71.0) == []
    # A gossip-learned node that is lost is not retried by us (gossip may bring it back).
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 80.0)
    d.gossip("beta", {"peers": {"delta": "tcp://10.0.0.4:5555"}}, 80.0)
    d.link_up("delta", IID, "tcp://10.0.0.4:5555", {}, 80.5)
    assert d.link_down("delta", orderly=False, reason="silent", now=84.0) == []


def test_mdns_replaces_a_rumour_that_never_came_up() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    d.gossip("beta", {"peers": {"gamma": "tcp://192.168.9.3:5555"}}, 0.0)
    seen = d.mdns_seen(mdns_record("gamma", "tcp://10.0.0.3:5555"), 1.0)
    assert seen == [Unlink("tcp://192.168.9.3:5555", "replaced by its mDNS endpoint"), Link("tcp://10.0.0.3:5555")]
    assert d.expire(UNREACHABLE_EXPIRY_S + 2) == []  # first-hand now: not expired as a rumour


def test_one_link_per_node_the_redundant_ones_are_dropped() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    d.gossip("beta", {"peers": {"gamma": "tcp://10.0.0.3:5555"}}, 0.0)
    # gamma dials us from another address before our link to the gossiped one is up.
    up = d.link_up("gamma", IID, "tcp://127.0.0.1:6000", {}, 0.5)
    assert up == [Unlink("tcp://10.0.0.3:5555", "gamma is linked at tcp://127.0.0.1:6000")]
    [gamma] = [e for e in d.entries(0.5) if e.name == "gamma"]
    assert (gamma.source, gamma.endpoint, gamma.up) == ("gossip", "tcp://127.0.0.1:6000", True)


def test_a_node_that_said_goodbye_is_not_relinked_from_lagging_gossip() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    linked_peer(d, "gamma", "tcp://10.0.0.3:5555", 0.0)
    assert d.link_down("gamma", orderly=True, reason="said goodbye", now=1.0) == []  # the hub drops it
    assert "gamma" not in {e.name for e in d.entries(1.0)}
    assert d.gossip("beta", {"peers": {"gamma": "tcp://10.0.0.3:5555"}}, 1.1) == []
    d.expire(1.0 + DEPARTED_S + 0.1)
    assert links(d.gossip("beta", {"peers": {"gamma": "tcp://10.0.0.3:5555"}}, 1.0 + DEPARTED_S + 0.2)) == [
        "tcp://10.0.0.3:5555"
    ]


def test_a_lost_node_may_come_back_through_gossip() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    linked_peer(d, "gamma", "tcp://10.0.0.3:5555", 0.0)
    assert d.link_down("gamma", orderly=False, reason="silent", now=4.0) == []
    assert "gamma" not in d.programs_by_node()
    assert links(d.gossip("beta", {"peers": {"gamma": "tcp://10.0.0.3:5555"}}, 4.1)) == ["tcp://10.0.0.3:5555"]


def test_a_restarted_node_keeps_one_entry_with_its_new_programs() -> None:
    d = directory()
    d.add_static("tcp://10.0.0.2:5555", 0.0)
    d.link_up("beta", IID, "tcp://10.0.0.2:5555", {"programs": ["sort"]}, 1.0)
    d.link_down("beta", orderly=False, reason="restarted as a new instance", now=2.0)
    d.link_up("beta", IID2, "tcp://10.0.0.2:5555", {"programs": ["sort", "uniq"]}, 2.0)
    assert [e.name for e in d.entries(2.0)] == [ME, "beta"]
    assert d.programs_by_node() == {ME: {"cat", "sort"}, "beta": {"sort", "uniq"}}


# -- what the node reads --------------------------------------------------------------------


def test_entries_have_the_shape_dpipes_nodes_shows() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 1.0, programs=("sort", 7, "bad,name"))  # type: ignore[arg-type]
    d.gossip("beta", {"peers": {"gamma": "tcp://10.0.0.3:5555"}}, 2.0)
    rows = [e.as_dict() for e in d.entries(3.0, heard_s={"beta": 0.25})]
    keys = ["name", "endpoint", "programs", "source", "last_seen_s", "up"]
    assert rows == [
        dict(zip(keys, [ME, ME_ENDPOINT, ["cat", "sort"], "self", 0.0, True], strict=True)),
        dict(zip(keys, ["beta", "tcp://10.0.0.2:5555", ["sort"], "linked", 0.25, True], strict=True)),
        dict(zip(keys, ["gamma", "tcp://10.0.0.3:5555", [], "gossip", 1.0, False], strict=True)),
    ]


def test_placement_sees_this_node_and_the_nodes_linked_and_up_only() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0, programs=("sort",))
    d.gossip("beta", {"peers": {"gamma": "tcp://10.0.0.3:5555"}}, 0.0)
    d.mdns_seen(mdns_record("delta", "tcp://10.0.0.4:5555", programs=("uniq",)), 0.0)
    assert d.programs_by_node() == {ME: {"cat", "sort"}, "beta": {"sort"}}


def test_gossip_spreads_only_what_this_node_is_linked_to() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    linked_peer(d, "gamma", "tcp://*:6000", 0.0)  # a wildcard nobody could connect to
    d.gossip("beta", {"peers": {"rumour": "tcp://10.0.0.66:5555"}}, 0.0)
    body = d.gossip_body()
    assert body == {"peers": {"beta": "tcp://10.0.0.2:5555"}, "keys": {}}
    assert parse_gossip(msgpack.unpackb(msgpack.packb(body))) == body["peers"]


def test_gossip_about_ourselves_is_not_an_error() -> None:
    d = directory()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", 0.0)
    assert d.gossip("beta", {"peers": {ME: ME_ENDPOINT, "beta": "tcp://10.0.0.2:5555"}}, 0.0) == []
    assert sum(d.rejected.values()) == 0
    # ...but a made-up name at our own endpoint would be a link to ourselves.
    assert d.gossip("beta", {"peers": {"mirror": ME_ENDPOINT}}, 1.0) == []
    assert d.rejected["endpoint-taken"] == 1


def test_programs_that_arrive_after_the_link_is_up_are_taken() -> None:
    d = directory()
    d.add_static("tcp://10.0.0.2:5555", 0.0)
    d.link_up("beta", IID, "tcp://10.0.0.2:5555", {}, 1.0)  # our link is up at its WELCOME: no info yet
    assert d.programs_by_node()["beta"] == frozenset()
    assert d.link_info("beta", {"programs": ["sort"]}, 2.0) == []
    assert d.programs_by_node()["beta"] == {"sort"}
    assert d.link_info("nobody", {"programs": ["sort"]}, 2.0) == [] and "nobody" not in d.programs_by_node()
