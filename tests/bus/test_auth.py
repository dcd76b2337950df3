"""The ZAP gatekeeper on real sockets: CURVE keys against the trust store, ipc peers by uid."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from dpipes.bus.auth import TAP_ZAP_DOMAIN, ZAP_DOMAIN, Gatekeeper, HubSecurity, identity_from_user_id
from dpipes.bus.keys import KeyPair, PublicKey, load_or_create_keypair
from dpipes.bus.trust import AuthorizedKey, AuthorizedKeys, IdentityKind, KnownNodes, TrustStore
from tests.users import needs_root, nobody, send_as

DEADLINE_S = 10.0


def pair(where: Path, name: str) -> KeyPair:
    return load_or_create_keypair(where, name)[0]


class Server:
    """A ROUTER as a hub binds it: CURVE on TCP, NULL with ZAP on ipc, behind a Gatekeeper."""

    def __init__(self, security: HubSecurity, ipc_path: Path) -> None:
        self.ctx = zmq.asyncio.Context()
        self.gate = Gatekeeper(self.ctx, security, node="alpha")
        self.gate.start()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.zap_domain = ZAP_DOMAIN
        self.sock.curve_secretkey = security.keypair.secret_z85.encode()
        self.sock.curve_publickey = security.keypair.public.z85.encode()
        self.sock.curve_server = True
        self.sock.bind("tcp://127.0.0.1:0")
        self.tcp = self.sock.last_endpoint.decode()
        self.sock.curve_server = False  # back to NULL for the ipc bind
        self.ipc = f"ipc://{ipc_path}"
        self.sock.bind(self.ipc)

    async def recv(self) -> tuple[bytes, str | None]:
        frames = await asyncio.wait_for(self.sock.recv_multipart(copy=False), DEADLINE_S)
        return frames[1].bytes, frames[1].get("User-Id")

    def close(self) -> None:
        self.sock.close(0)
        self.gate.stop()
        self.ctx.term()


@pytest.fixture
async def keys_and_server(tmp_path: Path) -> AsyncIterator[tuple[dict[str, KeyPair], Server]]:
    made = {name: pair(tmp_path / name, "node" if name == "alpha" else "client") for name in ("alpha", "alice", "eve")}
    store = TrustStore(AuthorizedKeys((AuthorizedKey(made["alice"].public, "alice"),)), KnownNodes())
    server = Server(HubSecurity(made["alpha"], store), tmp_path / "alpha.sock")
    try:
        yield made, server
    finally:
        server.close()


def curve_client(ctx: zmq.asyncio.Context, me: KeyPair, server: PublicKey, endpoint: str) -> Any:
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_secretkey = me.secret_z85.encode()
    sock.curve_publickey = me.public.z85.encode()
    sock.curve_serverkey = server.z85.encode()
    sock.connect(endpoint)
    return sock


async def until(condition: Any, what: str) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)  # polling a condition under a deadline

    try:
        await asyncio.wait_for(poll(), DEADLINE_S)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_trusted_key_gets_through_with_its_fingerprint(keys_and_server: Any) -> None:
    made, server = keys_and_server
    ctx = zmq.asyncio.Context()
    try:
        alice = curve_client(ctx, made["alice"], made["alpha"].public, server.tcp)
        await alice.send(b"hello")
        body, user_id = await server.recv()
        assert body == b"hello" and user_id == made["alice"].fingerprint
        identity = identity_from_user_id(user_id)
        assert identity is not None and identity.kind is IdentityKind.KEY
        assert identity.fingerprint == made["alice"].fingerprint
        alice.close()
    finally:
        ctx.term()


async def test_unknown_key_and_plain_connections_are_refused(keys_and_server: Any) -> None:
    made, server = keys_and_server
    ctx = zmq.asyncio.Context()
    try:
        eve = curve_client(ctx, made["eve"], made["alpha"].public, server.tcp)
        await eve.send(b"let me in")
        await until(lambda: server.gate.refused >= 1, "the gatekeeper to refuse eve")
        plain = ctx.socket(zmq.DEALER)  # no CURVE at all: the handshake itself fails
        plain.linger = 0
        plain.connect(server.tcp)
        await plain.send(b"plain")
        alice = curve_client(ctx, made["alice"], made["alpha"].public, server.tcp)
        await alice.send(b"after")
        body, user_id = await server.recv()  # the first and only message that arrives is alice's
        assert (body, user_id) == (b"after", made["alice"].fingerprint)
        for sock in (eve, plain, alice):
            sock.close()
    finally:
        ctx.term()


async def test_own_uid_over_ipc_is_admitted_as_local_user(keys_and_server: Any) -> None:
    _, server = keys_and_server
    ctx = zmq.asyncio.Context()
    try:
        local = ctx.socket(zmq.DEALER)
        local.linger = 0
        local.connect(server.ipc)
        await local.send(b"local")
        body, user_id = await server.recv()
        assert body == b"local" and user_id == f"uid:{os.getuid()}"
        identity = identity_from_user_id(user_id)
        assert identity is not None and identity.kind is IdentityKind.LOCAL_USER and identity.uid == os.getuid()
        local.close()
    finally:
        ctx.term()


@needs_root
async def test_another_uid_is_refused_on_the_unix_socket(shared_dir: Path) -> None:
    made = pair(shared_dir / "keys", "node")
    server = Server(HubSecurity(made, TrustStore()), shared_dir / "alpha.sock")
    try:
        (shared_dir / "alpha.sock").chmod(0o777)  # the file mode lets anyone in: only the uid check stands
        child = send_as(nobody(), server.ipc, [b"from another user"])
        await until(lambda: server.gate.refused >= 1, "the gatekeeper to refuse nobody")
        await asyncio.to_thread(child.wait)
        assert server.gate.admitted == 0
        ctx = zmq.asyncio.Context()
        try:
            mine = ctx.socket(zmq.DEALER)
            mine.linger = 0
            mine.connect(server.ipc)
            await mine.send(b"mine")
            assert await server.recv() == (b"mine", f"uid:{os.getuid()}")  # the first to arrive: nobody's never did
            mine.close()
        finally:
            ctx.term()
    finally:
        server.close()


def test_identity_from_user_id() -> None:
    assert identity_from_user_id(None) is None
    assert identity_from_user_id("") is None
    assert identity_from_user_id("anonymous") is None
    assert identity_from_user_id("uid:x") is None
    local = identity_from_user_id("uid:1000")
    assert local is not None and local.uid == 1000


async def test_tap_domain_admits_only_keys_with_the_tap_right(tmp_path: Path) -> None:
    alpha, alice, watcher = (pair(tmp_path / n, "client") for n in ("alpha", "alice", "watcher"))
    store = TrustStore(
        AuthorizedKeys((AuthorizedKey(alice.public, "alice"), AuthorizedKey(watcher.public, "watcher", tap=True))),
        KnownNodes(),
    )
    ctx = zmq.asyncio.Context()
    gate = Gatekeeper(ctx, HubSecurity(alpha, store), node="alpha")
    gate.start()
    tap = ctx.socket(zmq.XPUB)
    tap.linger = 0
    tap.zap_domain = TAP_ZAP_DOMAIN
    tap.curve_secretkey = alpha.secret_z85.encode()
    tap.curve_publickey = alpha.public.z85.encode()
    tap.curve_server = True
    tap.bind("tcp://127.0.0.1:0")
    try:
        subscribers = []
        for me in (alice, watcher):  # alice first: a subscription that arrives is the watcher's
            sub = ctx.socket(zmq.SUB)
            sub.linger = 0
            sub.curve_secretkey = me.secret_z85.encode()
            sub.curve_publickey = me.public.z85.encode()
            sub.curve_serverkey = alpha.public.z85.encode()
            sub.connect(tap.last_endpoint.decode())
            sub.subscribe(me.fingerprint.encode())
            subscribers.append(sub)
            if me is alice:
                await until(lambda: gate.refused >= 1, "alice to be refused the tap")
        first = await asyncio.wait_for(tap.recv(), DEADLINE_S)
        assert first == b"\x01" + watcher.fingerprint.encode()
        assert gate.key_of(watcher.fingerprint) == watcher.public and gate.key_of(alice.fingerprint) is None
        for sub in subscribers:
            sub.close()
    finally:
        tap.close(0)
        gate.stop()
        ctx.term()
