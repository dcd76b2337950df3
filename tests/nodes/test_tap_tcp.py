"""Taps over TCP: a node of another host is read at its advertised TCP tap, with CURVE when keyed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from dpipes.bus import codec
from dpipes.bus.auth import ClientCurve, HubSecurity
from dpipes.bus.hub import Hub
from dpipes.bus.keyring import Keyring
from dpipes.bus.keys import KEY_DIR_ENV, KeyPair, load_or_create_keypair
from dpipes.bus.trust import AuthorizedKey, AuthorizedKeys, KnownNodes, TrustStore
from dpipes.nodes.run import known_nodes
from dpipes.nodes.tap.source import TapSource, Target, client_curve
from tests.nodes.daemons import Daemon, daemons, dpipes, environment

WAIT_S = 60.0  # a generous bound for a loaded machine; every wait ends as soon as its condition holds


async def until(condition: Any) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)  # polling a condition under a deadline

    await asyncio.wait_for(poll(), WAIT_S)


def pair(where: Path, name: str) -> KeyPair:
    return load_or_create_keypair(where, name)[0]


async def test_a_keyed_hub_serves_its_tcp_tap_only_to_keys_with_the_tap_right(tmp_path: Path) -> None:
    alpha, alice, eve = (
        pair(tmp_path / "alpha", "node"),
        pair(tmp_path / "alice", "client"),
        pair(tmp_path / "eve", "client"),
    )
    store = TrustStore(
        AuthorizedKeys((AuthorizedKey(alice.public, "alice", tap=True), AuthorizedKey(eve.public, "eve"))), KnownNodes()
    )
    async with Hub("alpha", security=HubSecurity(alpha, store)) as hub:
        assert hub.tcp_tap_endpoint.startswith("tcp://127.0.0.1:") and hub.info["tap"] == hub.tcp_tap_endpoint
        src, _dst = hub.endpoint("src"), hub.endpoint("dst")
        assert hub._gate is not None
        async with TapSource([Target("alpha", hub.tcp_tap_endpoint, ClientCurve(eve, alpha.public))]):
            await until(lambda: hub._gate is not None and hub._gate.refused >= 1)  # eve may run, not tap
            assert not hub.tapped
        async with TapSource([Target("alpha", hub.tcp_tap_endpoint, ClientCurve(alice, alpha.public))]) as source:
            await until(lambda: hub.tapped)
            src.send(codec.Request(dst="alpha/dst", method="seen"))
            event = await source.next(WAIT_S)
            assert event is not None and (event.node, event.kind, event.fields["method"]) == (
                "alpha",
                "REQUEST",
                "seen",
            )


def test_a_tcp_tap_is_read_with_curve_once_the_node_is_pinned(tmp_path: Path) -> None:
    ring = Keyring(tmp_path / "keys")
    assert client_curve("beta", ring) is None  # not pinned: plain, as its bus is reached
    beta = pair(tmp_path / "beta", "node")
    ring.pin("beta", beta.public.z85)
    curve = client_curve("beta", ring)
    assert curve is not None and curve.server_key == beta.public and curve.keypair == ring.client()[0]


@contextlib.asynccontextmanager
async def two_hosts(tmp_path: Path) -> AsyncIterator[tuple[Path, Daemon, Daemon]]:
    """alpha and beta as on two hosts: each daemon in a runtime directory of its own, so that a
    tap started beside alpha finds no ``ipc://`` tap of beta and must read beta over TCP."""
    here, there = tmp_path / "here", tmp_path / "there"
    for rt in (here, there):
        rt.mkdir(mode=0o700)
    async with daemons(here, ["alpha"]) as (alpha,):
        async with daemons(there, ["beta"], extra={"beta": ["--peer", alpha.host_port]}) as (beta,):

            async def alpha_knows_beta_and_its_tap() -> None:
                while not any(n.name == "beta" and n.up and n.tap for n in await known_nodes(alpha.tcp)):
                    await asyncio.sleep(0.05)

            await asyncio.wait_for(alpha_knows_beta_and_its_tap(), WAIT_S)
            yield here, alpha, beta


def tap_environment(rt: Path, keys: Path) -> dict[str, str]:
    env = environment(rt)
    env[KEY_DIR_ENV] = str(keys)  # this user's keys: none pinned, so beta's tap is read plain as its bus
    return env


async def test_all_reads_a_node_of_another_host_at_its_tcp_tap(tmp_path: Path) -> None:
    async with two_hosts(tmp_path) as (here, alpha, beta):
        env = tap_environment(here, tmp_path / "keys")
        listed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dpipes.tools.tap", "nodes", "--json", env=env, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(listed.communicate(), WAIT_S)
        rows = {r["name"]: r for r in map(json.loads, out.decode().splitlines())}
        assert rows["alpha"]["tap"] == f"ipc://{here}/alpha-tap.sock" and rows["alpha"]["tcp_tap"].startswith("tcp://")
        assert rows["beta"]["tap"] == rows["beta"]["tcp_tap"] and rows["beta"]["tap"].startswith("tcp://127.0.0.1:")

        tap = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dpipes.tools.tap",
            "--all",
            "echo",
            "--json",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            events: list[dict[str, Any]] = []

            async def read_until(condition: Any, poke: Daemon | None = None) -> None:
                assert tap.stdout is not None
                while not condition():
                    if poke is not None:  # a request to the node's control endpoint: an event on its tap
                        await known_nodes(poke.tcp)
                    try:
                        raw = await asyncio.wait_for(tap.stdout.readline(), 0.5)
                    except TimeoutError:
                        continue
                    assert raw, f"dpipes-tap ended early: {(await tap.stderr.read()).decode()}"  # type: ignore[union-attr]
                    events.append(json.loads(raw))

            def seen_on(node: str) -> bool:
                return any(e["node"] == node for e in events)

            # Both taps are subscribed once each has shown an event (none is replayed from before).
            await asyncio.wait_for(read_until(lambda: seen_on("alpha"), poke=alpha), WAIT_S)
            await asyncio.wait_for(read_until(lambda: seen_on("beta"), poke=beta), WAIT_S)
            events.clear()
            ran = await dpipes(here, "--node", alpha.host_port, "cat | sort@beta | cat", input=b"b\na\n")
            assert ran.stdout == b"a\nb\n", ran.stderr

            def data_from(node: str) -> bool:
                return any(e["node"] == node and e["kind"] in ("BYTES", "EOF") for e in events)

            await asyncio.wait_for(read_until(lambda: data_from("alpha") and data_from("beta")), WAIT_S)
            sorted_here = [e for e in events if e["node"] == "beta" and e["src"].startswith("beta/")]
            assert any(e["kind"] == "BYTES" and e["dst"].startswith("alpha/") for e in sorted_here), events
        finally:
            tap.kill()
            await tap.wait()
