"""Hubs with keys: CURVE links and clients checked against the trust store, identities on messages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from dpipes.bus import codec
from dpipes.bus.auth import ClientCurve, HubSecurity
from dpipes.bus.client import Client
from dpipes.bus.errors import ProtocolMismatch, SecurityError
from dpipes.bus.hub import Hub
from dpipes.bus.keys import KeyPair, load_or_create_keypair
from dpipes.bus.pump import Pump
from dpipes.bus.trust import AuthorizedKey, AuthorizedKeys, Identity, IdentityKind, KnownNodes, TrustStore
from tests.users import needs_root, nobody, send_as

WAIT_S = 10.0


async def until(condition: Any) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)  # polling a condition under a deadline

    await asyncio.wait_for(poll(), WAIT_S)


def pair(where: Path, name: str = "node") -> KeyPair:
    return load_or_create_keypair(where, name)[0]


class Net:
    """Key pairs for nodes alpha, beta and clients alice, eve; trust stores built per test."""

    def __init__(self, tmp: Path) -> None:
        self.alpha, self.beta, self.mallory = pair(tmp / "alpha"), pair(tmp / "beta"), pair(tmp / "mallory")
        self.alice, self.eve = pair(tmp / "alice", "client"), pair(tmp / "eve", "client")

    def store(self, nodes: dict[str, KeyPair], clients: tuple[KeyPair, ...] = ()) -> TrustStore:
        known = KnownNodes()
        for name, node_pair in nodes.items():
            known.pin(name, node_pair.public.z85)
        return TrustStore(AuthorizedKeys(tuple(AuthorizedKey(c.public, "client") for c in clients)), known)


@contextlib.asynccontextmanager
async def secure_hub(name: str, keypair: KeyPair, store: TrustStore) -> AsyncIterator[Hub]:
    async with Hub(name, security=HubSecurity(keypair, store)) as hub:
        yield hub


async def stream_bytes(src_hub: Hub, dst_hub: Hub, data: bytes) -> bytes:
    src, dst = src_hub.endpoint("src"), dst_hub.endpoint("dst")
    stream = src.open_stream(f"{dst_hub.node}/dst")
    await stream.send_bytes(data)
    reader = await dst.accept()
    closing = asyncio.create_task(stream.close())
    got = b""
    while (msg := await reader.read()) is not None:
        got += b"".join(bytes(f) for f in msg.frames)
    await closing
    return got


async def test_pinned_nodes_link_over_curve_and_know_who_is_who(tmp_path: Path) -> None:
    net = Net(tmp_path)
    async with (
        secure_hub("alpha", net.alpha, net.store({"beta": net.beta})) as a,
        secure_hub("beta", net.beta, net.store({"alpha": net.alpha})) as b,
    ):
        assert await a.connect_peer(b.tcp_endpoint, key=net.beta.public) == "beta"
        await until(lambda: "alpha" in b.peers)
        assert await stream_bytes(a, b, b"hello over curve") == b"hello over curve"
        assert isinstance(a._links[b.tcp_endpoint].pump, Pump)  # CURVE links stay libzmq's, not zmtp_tcp's
        assert b.identity_of("alpha/src") == Identity.peer_node("alpha", net.alpha.fingerprint)
        assert a.identity_of("beta/dst") == Identity.peer_node("beta", net.beta.fingerprint)
        assert a.identity_of("alpha/src") == Identity.local_user(os.getuid())  # in-process: the node itself


async def test_a_peer_with_another_key_is_refused_by_name_with_both_fingerprints(tmp_path: Path) -> None:
    net = Net(tmp_path)
    # beta believes alpha's key is mallory's: alpha's real key is then a changed key
    async with (
        secure_hub("alpha", net.alpha, net.store({"beta": net.beta})) as a,
        secure_hub("beta", net.beta, net.store({"alpha": net.mallory, "gamma": net.alpha})) as b,
    ):
        with pytest.raises(ProtocolMismatch) as caught:
            await a.connect_peer(b.tcp_endpoint, key=net.beta.public)
        message = str(caught.value)
        assert "node alpha presented key" in message
        assert net.alpha.fingerprint in message and net.mallory.fingerprint in message
        assert "alpha" not in b.peers


async def test_a_trusted_node_cannot_call_itself_another_node(tmp_path: Path) -> None:
    net = Net(tmp_path)
    # beta trusts mallory's key, as node mallory; mallory connects calling itself alpha
    async with (
        secure_hub("alpha", net.mallory, net.store({"beta": net.beta})) as fake,
        secure_hub("beta", net.beta, net.store({"mallory": net.mallory})) as b,
    ):
        with pytest.raises(ProtocolMismatch, match=r"node alpha \(key SHA256:\S+\) is not a known node"):
            await fake.connect_peer(b.tcp_endpoint, key=net.beta.public)


async def test_secure_hub_needs_the_peer_key_to_link(tmp_path: Path) -> None:
    net = Net(tmp_path)
    async with secure_hub("alpha", net.alpha, net.store({})) as a:
        with pytest.raises(SecurityError, match="its node key is unknown"):
            a.add_peer("tcp://127.0.0.1:9")


async def test_clients_by_key_over_tcp_and_by_uid_over_ipc(tmp_path: Path) -> None:
    net = Net(tmp_path)
    async with secure_hub("alpha", net.alpha, net.store({}, clients=(net.alice,))) as a:
        curve = ClientCurve(net.alice, net.alpha.public)
        async with Client(a.tcp_endpoint, name="alice", curve=curve) as alice:
            assert a.identity_of(alice.endpoint.addr) == Identity.key(net.alice.fingerprint)
        async with Client(a.ipc_endpoint, name="me") as me:
            identity = a.identity_of(me.endpoint.addr)
            assert identity is not None and identity.kind is IdentityKind.LOCAL_USER and identity.uid == os.getuid()
        with pytest.raises(SecurityError, match=re.escape(f"refused this client (key {net.eve.fingerprint})")):
            async with Client(a.tcp_endpoint, name="eve", curve=ClientCurve(net.eve, net.alpha.public)):
                pass
        with pytest.raises(SecurityError, match="speaks CURVE"):
            async with Client(a.tcp_endpoint, name="plain"):
                pass
        assert a.identity_of("alpha/eve") is None


async def test_a_client_without_keys_takes_handshakes_ended_without_a_word_for_a_node_with_keys() -> None:
    """A node with keys ends the handshake of a client without, at times before the client has read
    its greeting (no detail: about half the time on loopback, so "speaks CURVE" above may come
    either way). A listener that closes every connection at once stands in for that, every time."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def close_each() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                conn, _ = listener.accept()
                conn.close()

    thread = threading.Thread(target=close_each, daemon=True)
    thread.start()
    try:
        with pytest.raises(SecurityError, match="speaks CURVE, it seems: it ended 3 handshakes without a word"):
            async with Client(f"tcp://127.0.0.1:{port}", name="plain", attach_timeout=60):  # not the timeout
                pass
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join()


async def test_a_connection_that_takes_over_a_clients_routing_id_is_not_that_client(tmp_path: Path) -> None:
    net = Net(tmp_path)
    async with secure_hub("alpha", net.alpha, net.store({}, clients=(net.alice, net.eve))) as a:
        a.endpoint("sink")  # a real destination: what stops the message is who sent it, not where it goes
        ctx = zmq.Context()
        socks = []
        try:
            for me in (net.alice, net.eve):  # the same routing id, two keys: eve's connection takes over
                sock = ctx.socket(zmq.DEALER)
                sock.linger = 0
                sock.routing_id = b"victim"
                sock.curve_secretkey = me.secret_z85.encode()
                sock.curve_publickey = me.public.z85.encode()
                sock.curve_serverkey = net.alpha.public.z85.encode()
                sock.connect(a.tcp_endpoint)
                socks.append(sock)
                if me is net.alice:
                    sock.send_multipart(codec.encode(codec.Attach(name="alice")))
                    await until(lambda: a.identity_of("alpha/alice") is not None)
            before = a.stats["(unlinked)"].bad
            stream = codec.Bytes(src="alpha/alice", dst="alpha/sink", sid=1, seq=0, frames=(b"as alice",))
            socks[1].send_multipart(codec.encode(stream))
            await until(lambda: a.stats["(unlinked)"].bad > before)
            assert a.identity_of("alpha/alice") == Identity.key(net.alice.fingerprint)
        finally:
            for sock in socks:
                sock.close(0)
            ctx.term()


@needs_root
async def test_another_uid_is_refused_on_the_hubs_unix_socket(shared_dir: Path) -> None:
    # the socket is made open to all below: only the uid check stands in the way
    net = Net(shared_dir / "keys")
    hub = Hub("alpha", ipc=f"ipc://{shared_dir}/alpha.sock", security=HubSecurity(net.alpha, net.store({})))
    async with hub as a:
        (shared_dir / "alpha.sock").chmod(0o777)
        assert a._gate is not None
        child = send_as(nobody(), a.ipc_endpoint, codec.encode(codec.Attach(name="intruder")))
        await until(lambda: a._gate is not None and a._gate.refused >= 1)
        await asyncio.to_thread(child.wait)
        async with Client(a.ipc_endpoint, name="owner") as owner:  # the daemon's own user still gets in
            assert owner.endpoint.addr == "alpha/owner"
        assert a.identity_of("alpha/intruder") is None
