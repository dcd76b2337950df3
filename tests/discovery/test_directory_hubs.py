"""NodeDirectory driving real hubs: link events in, Link actions out, gossip over the bus.

``Wired`` is the wiring a node needs, in the small: hub link listener -> ``link_up``/``link_down``;
a ``gossip`` request on the control endpoint -> ``gossip``; each ``Link`` -> ``add_peer`` or
``learn_peer``. The directory's clock here is logical (one second per event), so that the rate
limit and expiry never depend on how fast this machine is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable

from dpipes.bus import codec
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.hub import Hub
from dpipes.discovery.directory import MAX_GOSSIP_PEERS, MAX_KNOWN_NODES, Action, Link, NodeDirectory, Unlink
from dpipes.discovery.table import NodeRecord

WAIT_S = 10.0  # the bound on every wait for the network in these tests
CTL = "ctl"


class Wired:
    """One hub and its directory, wired as a node would wire them."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.directory = NodeDirectory(hub.node)
        self.now = 0.0
        self.unlinked: list[Unlink] = []  # recorded; a node also drops them (Hub.drop_peer)
        self._ctl: Endpoint | None = None
        self._task: asyncio.Task[None] | None = None

    def clock(self) -> float:
        self.now += 1.0
        return self.now

    async def __aenter__(self) -> Wired:
        record = NodeRecord(
            self.hub.node, self.hub.instance, codec.PROTOCOL_VERSION, {"bus": self.hub.tcp_endpoint},
            programs=tuple(self.hub.info.get("programs", ())),
        )  # fmt: skip
        self.directory.set_self(record, self.clock())
        self._ctl = self.hub.endpoint(CTL)
        self.hub.link_listeners.append(self._on_link)
        self._task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Link):
                (self.hub.add_peer if action.static else self.hub.learn_peer)(action.endpoint)
            else:
                self.unlinked.append(action)

    def _on_link(self, node: str, up: bool, reason: str) -> None:
        if up:
            peer = self.hub.peers[node]
            self.apply(self.directory.link_up(node, peer.instance, peer.endpoint, peer.info, self.clock()))
            self.gossip()  # a new neighbour: tell it what we know at once
        else:
            orderly = reason.startswith("said goodbye")
            self.apply(self.directory.link_down(node, orderly=orderly, reason=reason, now=self.clock()))

    def tick(self) -> None:
        """The node's gossip timer: refresh what the hub learned of each peer since, then gossip."""
        for name, peer in self.hub.peers.items():
            self.directory.link_info(name, peer.info, self.clock())
        self.gossip()

    def gossip(self) -> None:
        assert self._ctl is not None
        body = self.directory.gossip_body()
        for name in self.directory.linked():
            self._ctl.send(codec.Request(dst=f"{name}/{CTL}", method="gossip", body=body))

    async def _serve(self) -> None:
        assert self._ctl is not None
        while True:
            msg = await self._ctl.recv()
            if isinstance(msg, codec.Request) and msg.method == "gossip":
                self.apply(self.directory.gossip(msg.src.partition("/")[0], msg.body, self.clock()))


async def until(condition: Callable[[], bool], *, tick: Callable[[], None] = lambda: None) -> None:
    """Poll ``condition()`` (calling ``tick`` between polls) until true, failing after WAIT_S."""

    async def poll() -> None:
        while not condition():
            tick()
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), WAIT_S)


@contextlib.asynccontextmanager
async def wired(*names: str, programs: dict[str, list[str]] | None = None) -> AsyncIterator[list[Wired]]:
    programs = programs or {}
    async with contextlib.AsyncExitStack() as stack:
        hubs = [await stack.enter_async_context(Hub(n, info={"programs": programs.get(n, [])})) for n in names]
        yield [await stack.enter_async_context(Wired(h)) for h in hubs]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_static_seed_and_gossip_close_the_mesh_and_placement_sees_every_program() -> None:
    async with wired("alpha", "beta", "gamma", programs={"beta": ["sort"], "gamma": ["uniq"]}) as (a, b, c):
        a.apply(a.directory.add_static(b.hub.tcp_endpoint, a.clock()))
        c.apply(c.directory.add_static(b.hub.tcp_endpoint, c.clock()))
        everyone = {"alpha", "beta", "gamma"}
        await until(
            lambda: (
                all(set(w.directory.programs_by_node()) == everyone for w in (a, b, c))
                and a.directory.programs_by_node()["gamma"] == {"uniq"}
            ),
            tick=lambda: [w.tick() for w in (a, b, c)] and None,
        )
        assert a.directory.programs_by_node()["gamma"] == {"uniq"}
        rows = {e.name: e for e in a.directory.entries(a.now)}
        assert (rows["beta"].source, rows["beta"].up) == ("static", True)
        assert rows["gamma"].source in ("gossip", "linked") and rows["gamma"].up
        assert a.unlinked == []


async def test_a_gossip_flood_links_at_most_the_bound_and_a_real_peer_still_joins() -> None:
    async with wired("alpha", "liar", "late", programs={"late": ["sort"]}) as (a, liar, late):
        a.apply(a.directory.add_static(liar.hub.tcp_endpoint, a.clock()))
        await until(lambda: "liar" in a.directory.linked())
        before = open_fds()
        # 1,124 made-up peers on closed loopback ports, in bodies small enough to pass the validator.
        flood = {f"fake{i:04d}": f"tcp://127.1.{i // 250}.{i % 250 + 1}:1" for i in range(1124)}
        names = sorted(flood)
        assert liar._ctl is not None
        for start in range(0, len(names), MAX_GOSSIP_PEERS):
            body = {"peers": {n: flood[n] for n in names[start : start + MAX_GOSSIP_PEERS]}}
            liar._ctl.send(codec.Request(dst=f"alpha/{CTL}", method="gossip", body=body))
        await until(lambda: a.directory.rejected["full"] >= len(flood) - MAX_KNOWN_NODES)
        assert len(a.directory.entries(a.now)) == 1 + MAX_KNOWN_NODES
        # Each link costs a socket or two, not one per made-up peer.
        assert open_fds() - before < 4 * MAX_KNOWN_NODES < len(flood)
        a.apply(a.directory.add_static(late.hub.tcp_endpoint, a.clock()))
        # Our link to late is up at its WELCOME; its programs come with its HELLO back to us.
        await until(lambda: a.directory.programs_by_node().get("late") == {"sort"}, tick=a.tick)
        assert len(a.unlinked) == 1 and a.unlinked[0].endpoint in flood.values()  # the stalest rumour made room
