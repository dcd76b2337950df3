"""Gossip and the node table: a node that knows one peer learns the rest; placement uses it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.nodes.daemons import daemons, dpipes

WAIT_S = 30.0


async def known_by(rt: Path, host_port: str) -> dict[str, dict]:
    listed = await dpipes(rt, "--node", host_port, "--nodes", "--json")
    assert listed.code == 0, listed.stderr
    return {n["name"]: n for n in map(json.loads, listed.stdout.splitlines())}


async def test_a_chain_of_static_peers_becomes_a_mesh_and_places_by_advertisement(rt: Path) -> None:
    extra = {"gamma": ["--allow", "sort"]}
    async with daemons(rt, ["alpha", "beta", "gamma"], extra=extra, peer_of={"gamma": "beta"}) as (alpha, _b, _g):

        async def alpha_knows_gamma() -> dict[str, dict]:
            # Gossip names gamma first; its programs come with the link alpha then makes to it.
            while (table := await known_by(rt, alpha.host_port)).get("gamma", {}).get("programs") != ["sort"]:
                await asyncio.sleep(0.1)
            return table

        table = await asyncio.wait_for(alpha_knows_gamma(), WAIT_S)
        # alpha learns of gamma from beta's gossip, or because gamma (told of alpha by beta) links to
        # it first: either is how a node that knows one peer learns the rest.
        assert table["gamma"]["source"] in ("gossip", "linked")
        assert table["alpha"]["source"] == "self"
        ran = await dpipes(rt, "--node", alpha.host_port, "--status", "cat | sort", input=b"b\nc\na\n")
        assert ran.stdout == b"a\nb\nc\n"
        assert "stage 1 sort@gamma: exit 0" in ran.stderr  # unpinned: placed where dp.sort is offered


async def test_nodes_table_for_people(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        listed = await dpipes(rt, "--node", alpha.host_port, "--nodes")
        assert listed.code == 0
        lines = listed.stdout.decode().splitlines()
        assert lines[0].split() == ["NODE", "ENDPOINT", "PROGRAMS", "LEARNED", "FROM", "LAST", "SEEN"]
        assert any(line.startswith("beta") and beta.tcp in line for line in lines)
