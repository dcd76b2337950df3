"""A client's keys for a node over TCP: which node it expects, its pinned key, and each refusal."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dpipes.bus.auth import HubSecurity
from dpipes.bus.errors import ClientRefused, KeyChanged, SecurityError, WrongServerKey
from dpipes.bus.hub import Hub
from dpipes.bus.keyring import Keyring
from dpipes.bus.keys import KeyPair, PublicKey, load_or_create_keypair
from dpipes.bus.trust import AuthorizedKey, AuthorizedKeys, KnownNodes, TrustStore, UnknownNode
from dpipes.nodes.entry import EntryAddressError, KeyLookup, attach, entry_keys, parse_entry, split_entry


def node_pair(where: Path) -> KeyPair:
    return load_or_create_keypair(where, "node")[0]


def lookup_of(key: PublicKey | None) -> KeyLookup:
    """What mDNS would say a node advertises (a stand-in: the lookup itself is the LAN tests')."""

    async def lookup(node: str) -> PublicKey | None:
        return key

    return lookup


@contextlib.asynccontextmanager
async def secure_hub(tmp_path: Path, trusted: KeyPair | None) -> AsyncIterator[tuple[Hub, KeyPair]]:
    pair = node_pair(tmp_path / "beta")
    clients = AuthorizedKeys((AuthorizedKey(trusted.public, "alice"),)) if trusted else AuthorizedKeys()
    async with Hub(
        "beta", tcp="tcp://127.0.0.1:0", security=HubSecurity(pair, TrustStore(clients, KnownNodes()))
    ) as hub:
        yield hub, pair


def test_the_node_is_named_before_the_address() -> None:
    assert split_entry("beta@10.0.0.2:5757") == ("beta", "10.0.0.2:5757")
    assert split_entry("ipc:///run/x@y.sock") == ("", "ipc:///run/x@y.sock")
    assert parse_entry("beta@10.0.0.2:5757") == "tcp://10.0.0.2:5757"
    with pytest.raises(EntryAddressError):
        parse_entry("be/ta@10.0.0.2:5757")


async def test_an_address_without_a_known_name_says_how_to_name_it(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "me")
    with pytest.raises(UnknownNode) as caught:
        await entry_keys("10.0.0.2:5757", "tcp://10.0.0.2:5757", keyring=ring, lookup=lookup_of(None))
    assert "--node NAME@10.0.0.2:5757" in str(caught.value)


async def test_an_address_without_a_name_is_expected_to_be_one_of_this_users_daemons(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "me")
    own = node_pair(ring.dir)  # a daemon of this user made it; its other daemons share it
    keys, _ = await entry_keys("10.0.0.2:5757", "tcp://10.0.0.2:5757", keyring=ring, lookup=lookup_of(None))
    assert keys.curve.server_key == own.public
    async with secure_hub(tmp_path, ring.client()[0]) as (hub, _pair):  # another user's node
        keys, _ = await entry_keys(hub.tcp_endpoint[6:], hub.tcp_endpoint, keyring=ring, lookup=lookup_of(None))
        with pytest.raises(UnknownNode, match="not one of your own daemons"):
            await attach(hub.tcp_endpoint, keys, lookup=lookup_of(None))


async def test_the_host_or_its_first_label_names_a_pinned_node(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "me")
    beta = node_pair(tmp_path / "beta").public
    ring.pin("beta", beta.z85)
    for text in ("beta:5757", "beta.lan:5757", "beta@10.0.0.2:5757"):
        keys, _ = await entry_keys(text, parse_entry(text), keyring=ring, lookup=lookup_of(None))
        assert (keys.node, keys.curve.server_key) == ("beta", beta)


async def test_an_unknown_node_names_the_exact_pin_command(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "me")
    advertised = node_pair(tmp_path / "beta").public
    with pytest.raises(UnknownNode) as caught:
        await entry_keys("beta@10.0.0.2:5757", "tcp://10.0.0.2:5757", keyring=ring, lookup=lookup_of(advertised))
    assert f"dpipes keys pin beta '{advertised.z85}'" in str(caught.value)
    assert advertised.fingerprint in str(caught.value)
    with pytest.raises(UnknownNode) as caught:
        await entry_keys("beta@10.0.0.2:5757", "tcp://10.0.0.2:5757", keyring=ring, lookup=lookup_of(None))
    assert "dpipes keys pin beta KEY" in str(caught.value)


async def test_a_pin_by_fingerprint_takes_the_advertised_key_only_if_it_matches(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "me")
    beta = node_pair(tmp_path / "beta").public
    ring.pin("beta", beta.fingerprint)
    other = node_pair(tmp_path / "other").public
    with pytest.raises(KeyChanged) as caught:
        await entry_keys("beta@10.0.0.2:5757", "tcp://10.0.0.2:5757", keyring=ring, lookup=lookup_of(other))
    assert beta.fingerprint in str(caught.value) and other.fingerprint in str(caught.value)
    keys, created = await entry_keys("beta@10.0.0.2:5757", "tcp://10.0.0.2:5757", keyring=ring, lookup=lookup_of(beta))
    assert keys.curve.server_key == beta and created
    assert ring.known().key_for("beta") == beta  # recorded: the next run needs no lookup


async def test_a_trusted_client_attaches_with_the_pinned_key(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "me")
    alice, _ = ring.client()
    async with secure_hub(tmp_path, alice) as (hub, pair):
        ring.pin("beta", pair.public.z85)
        keys, _ = await entry_keys(f"beta@{hub.tcp_endpoint[6:]}", hub.tcp_endpoint, keyring=ring)
        client = await attach(hub.tcp_endpoint, keys)
        try:
            assert client.endpoint.node == "beta"
        finally:
            await client.aclose()


async def test_a_node_without_its_pinned_key_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "me")
    alice, _ = ring.client()
    async with secure_hub(tmp_path, alice) as (hub, pair):
        old = node_pair(tmp_path / "old").public
        ring.pin("beta", old.z85)
        keys, _ = await entry_keys(f"beta@{hub.tcp_endpoint[6:]}", hub.tcp_endpoint, keyring=ring)
        with pytest.raises(KeyChanged) as caught:
            await attach(hub.tcp_endpoint, keys, lookup=lookup_of(pair.public))
        assert old.fingerprint in str(caught.value) and pair.public.fingerprint in str(caught.value)
        with pytest.raises(WrongServerKey) as unexplained:  # it advertises nothing: the pin is named
            await attach(hub.tcp_endpoint, keys, lookup=lookup_of(None))
        assert old.fingerprint in str(unexplained.value)


async def test_an_unknown_client_key_is_told_the_trust_command_of_its_key(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "me")
    async with secure_hub(tmp_path, None) as (hub, pair):
        ring.pin("beta", pair.public.z85)
        keys, _ = await entry_keys(f"beta@{hub.tcp_endpoint[6:]}", hub.tcp_endpoint, keyring=ring)
        with pytest.raises(ClientRefused) as caught:
            await attach(hub.tcp_endpoint, keys)
        assert f"dpipes keys trust '{ring.client()[0].public.z85}'" in str(caught.value)


async def test_keys_against_a_node_without_keys_say_insecure(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "me")
    async with Hub("beta", tcp="tcp://127.0.0.1:0") as hub:
        ring.pin("beta", node_pair(tmp_path / "beta").public.z85)
        keys, _ = await entry_keys(f"beta@{hub.tcp_endpoint[6:]}", hub.tcp_endpoint, keyring=ring)
        with pytest.raises(SecurityError, match="--insecure"):
            await attach(hub.tcp_endpoint, keys)
