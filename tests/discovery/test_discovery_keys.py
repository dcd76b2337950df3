"""Node keys in discovery: TXT records and gossip carry public keys; known_nodes decides what is linked."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import zmq

from dpipes.bus.keys import PublicKey
from dpipes.bus.trust import KnownNodes
from dpipes.discovery import directory as directory_module
from dpipes.discovery.directory import REJECTION_LOG_INTERVAL_S, Link, NodeDirectory, parse_gossip_keys, vet_by
from dpipes.discovery.table import NodeRecord
from dpipes.discovery.txt import TxtError, decode_node_txt, encode_node_txt, parse_txt

ME = "alpha"
IID = "000000000001aaaaaaaa"


def new_key() -> tuple[PublicKey, bytes]:
    public, secret = zmq.curve_keypair()
    return PublicKey.parse(public), secret


def record(name: str, endpoint: str, key: PublicKey | None, **kw: Any) -> NodeRecord:
    return NodeRecord(name, kw.pop("iid", IID), 1, {"bus": endpoint}, programs=("sort",), key=key, **kw)


def directory(known: KnownNodes) -> NodeDirectory:
    d = NodeDirectory(ME, vet=vet_by(lambda: known))
    d.set_self(NodeRecord(ME, IID, 1, {"bus": "tcp://10.0.0.1:5555"}), 0.0)
    return d


def linked_with(actions: list[Any]) -> dict[str, PublicKey | None]:
    return {a.endpoint: a.key for a in actions if isinstance(a, Link)}


# -- TXT ---------------------------------------------------------------------------------------


def test_the_txt_record_carries_the_public_key_and_nothing_secret() -> None:
    key, secret = new_key()
    text = encode_node_txt(record("beta", "tcp://10.0.0.2:5555", key)).text
    assert parse_txt(text)["pk"] == key.z85
    assert secret not in text and secret.decode() not in text.decode()
    assert decode_node_txt(text).key == key


def test_a_record_without_a_key_is_read_with_none() -> None:
    text = encode_node_txt(record("beta", "tcp://10.0.0.2:5555", None)).text
    assert "pk" not in parse_txt(text)
    assert decode_node_txt(text).key is None


@pytest.mark.parametrize("value", [b"pk=short", b"pk=" + b"~" * 40, b"pk", b"pk=" + b"a" * 41])
def test_a_malformed_key_is_a_txt_error(value: bytes) -> None:
    good = encode_node_txt(record("beta", "tcp://10.0.0.2:5555", None)).text
    with pytest.raises(TxtError):
        decode_node_txt(good + bytes([len(value)]) + value)


# -- mDNS and gossip, through known_nodes -------------------------------------------------------


def test_an_unknown_node_is_not_linked_and_is_logged_once_by_name(caplog: pytest.LogCaptureFixture) -> None:
    d = directory(KnownNodes())
    key, _ = new_key()
    with caplog.at_level(logging.DEBUG, logger=directory_module.__name__):
        first = d.mdns_seen(record("beta", "tcp://10.0.0.2:5555", key), 1.0)
        again = d.mdns_seen(record("beta", "tcp://10.0.0.2:5555", key, iid="000000000002aaaaaaaa"), 2.0)
    assert linked_with(first + again) == {}
    assert d.rejected["untrusted-key"] == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "beta" in errors[0] and key.fingerprint in errors[0] and "dpipes keys pin beta" in errors[0]


def test_a_changed_key_is_refused_naming_both_fingerprints(caplog: pytest.LogCaptureFixture) -> None:
    known = KnownNodes()
    pinned, _ = new_key()
    known.pin("beta", pinned.z85)
    d = directory(known)
    other, _ = new_key()
    with caplog.at_level(logging.ERROR, logger=directory_module.__name__):
        actions = d.mdns_seen(record("beta", "tcp://10.0.0.2:5555", other), 1.0)
    assert linked_with(actions) == {}
    (error,) = [r.getMessage() for r in caplog.records]
    assert "beta" in error and pinned.fingerprint in error and other.fingerprint in error
    # once per node per interval: the next refusal is not an error until the interval has passed
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger=directory_module.__name__):
        d.expire(2.0)
        assert not caplog.records
        d.expire(2.0 + REJECTION_LOG_INTERVAL_S)
        assert len(caplog.records) == 1


def test_an_unknown_node_then_pinned_to_another_key_is_two_errors(caplog: pytest.LogCaptureFixture) -> None:
    known = KnownNodes()
    d = directory(known)
    key, _ = new_key()
    with caplog.at_level(logging.ERROR, logger=directory_module.__name__):
        d.mdns_seen(record("beta", "tcp://10.0.0.2:5555", key), 1.0)
        wrong, _ = new_key()
        known.pin("beta", wrong.z85)  # the operator pinned beta, to a key beta does not hold
        assert linked_with(d.expire(2.0)) == {}
    unknown, changed = [r.getMessage() for r in caplog.records]
    assert "not a known node" in unknown
    assert wrong.fingerprint in changed and key.fingerprint in changed


def test_a_pinned_node_is_linked_with_its_key_and_a_fingerprint_pin_learns_the_key() -> None:
    known = KnownNodes()
    key, _ = new_key()
    known.pin("beta", key.fingerprint)  # what a user reads on beta; the key arrives by mDNS
    d = directory(known)
    assert linked_with(d.mdns_seen(record("beta", "tcp://10.0.0.2:5555", key), 1.0)) == {"tcp://10.0.0.2:5555": key}
    assert known.key_for("beta") == key


def test_pinning_after_a_refusal_links_at_the_next_tick() -> None:
    known = KnownNodes()
    d = directory(known)
    key, _ = new_key()
    assert linked_with(d.mdns_seen(record("beta", "tcp://10.0.0.2:5555", key), 1.0)) == {}
    known.pin("beta", key.fingerprint)
    assert linked_with(d.expire(2.0)) == {"tcp://10.0.0.2:5555": key}
    assert linked_with(d.expire(3.0)) == {}  # asked for once


def test_trust_on_first_use_records_the_key_then_refuses_another(tmp_path: Path) -> None:
    known = KnownNodes.load(tmp_path / "known_nodes", tofu=True)
    d = directory(known)
    first, _ = new_key()
    assert linked_with(d.mdns_seen(record("beta", "tcp://10.0.0.2:5555", first), 1.0)) == {"tcp://10.0.0.2:5555": first}
    assert KnownNodes.load(tmp_path / "known_nodes").key_for("beta") == first  # recorded on disk
    impostor, _ = new_key()
    d2 = directory(KnownNodes.load(tmp_path / "known_nodes", tofu=True))
    assert linked_with(d2.mdns_seen(record("beta", "tcp://10.0.0.3:5555", impostor), 1.0)) == {}


def linked_peer(d: NodeDirectory, name: str, endpoint: str, key: PublicKey) -> None:
    d.link_up(name, IID, endpoint, {}, 0.0, key=key)


def test_gossip_carries_the_keys_of_linked_nodes_and_the_receiver_vets_them() -> None:
    beta, _ = new_key()
    gamma, _ = new_key()
    sender = directory(KnownNodes())
    linked_peer(sender, "beta", "tcp://10.0.0.2:5555", beta)
    linked_peer(sender, "gamma", "tcp://10.0.0.3:5555", gamma)
    body = sender.gossip_body()
    assert body["keys"] == {"beta": beta.z85, "gamma": gamma.z85}

    known = KnownNodes()
    known.pin("beta", beta.fingerprint)
    receiver = NodeDirectory("delta", vet=vet_by(lambda: known))
    receiver.link_up("beta", IID, "tcp://10.0.0.2:5555", {}, 0.0, key=beta)
    actions = receiver.gossip("beta", body, 1.0)
    assert linked_with(actions) == {}  # beta is linked already; gamma is not pinned here
    assert receiver.rejected["untrusted-key"] == 1


def test_gossip_with_a_forged_key_for_a_pinned_node_does_not_link_it() -> None:
    gamma, _ = new_key()
    forged, _ = new_key()
    known = KnownNodes()
    known.pin("gamma", gamma.fingerprint)
    beta, _ = new_key()
    d = directory(known)
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", beta)
    body = {"peers": {"gamma": "tcp://10.0.0.66:5555"}, "keys": {"gamma": forged.z85}}
    assert linked_with(d.gossip("beta", body, 1.0)) == {}
    body = {"peers": {"gamma": "tcp://10.0.0.3:5555"}, "keys": {"gamma": gamma.z85}}
    assert linked_with(d.gossip("beta", body, 2.0)) == {"tcp://10.0.0.3:5555": gamma}


@pytest.mark.parametrize(
    "keys",
    [
        "not a map",
        {"nobody": "x" * 40},  # a name that is not among the peers
        {"gamma": "short"},
        {"gamma": 42},
    ],
)
def test_a_malformed_gossip_key_rejects_the_whole_body(keys: object) -> None:
    peers = {"gamma": "tcp://10.0.0.3:5555"}
    with pytest.raises(directory_module.GossipRejected) as caught:
        parse_gossip_keys({"peers": peers, "keys": keys}, peers)
    assert caught.value.code == "bad-key"
    d = directory(KnownNodes(tofu=True))
    beta, _ = new_key()
    linked_peer(d, "beta", "tcp://10.0.0.2:5555", beta)
    assert d.gossip("beta", {"peers": peers, "keys": keys}, 1.0) == []
    assert d.rejected["bad-key"] == 1


def test_a_node_without_a_key_is_linked_with_its_pinned_key_or_not_at_all() -> None:
    known = KnownNodes()
    key, _ = new_key()
    known.pin("beta", key.z85)
    d = directory(known)
    actions = d.mdns_seen(record("beta", "tcp://10.0.0.2:5555", None), 1.0)
    actions += d.mdns_seen(record("gamma", "tcp://10.0.0.3:5555", None), 1.0)
    assert linked_with(actions) == {"tcp://10.0.0.2:5555": key}


def test_without_keys_every_node_is_linked_as_advertised() -> None:
    d = NodeDirectory(ME)
    key, _ = new_key()
    actions = d.mdns_seen(record("beta", "tcp://10.0.0.2:5555", key), 1.0)
    actions += d.mdns_seen(record("gamma", "tcp://10.0.0.3:5555", None), 1.0)
    assert linked_with(actions) == {"tcp://10.0.0.2:5555": key, "tcp://10.0.0.3:5555": None}
