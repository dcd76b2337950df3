"""mDNS discovery between real hosts: probe processes in network namespaces on one bridge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import pytest

CONVERGE_TIMEOUT_S = 20.0  # tuned discovery converges in well under a second; CI machines are noisy
GOODBYE_BOUND_S = 5.0  # far below the 120 s host-record TTL: a removal this fast is the goodbye
STOP_TIMEOUT_S = 5.0  # SIGTERM -> exit, goodbye burst (~0.25 s) included
ISOLATION_WINDOW_S = 1.5  # how long a multicast-blocked host must stay unseen (convergence: ~0.1 s)


class Probe:
    """One ``python -m dpipes.discovery.probe`` process and what it has printed so far."""

    def __init__(self, host: Any, name: str, proc: asyncio.subprocess.Process) -> None:
        self.host = host
        self.name = name
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.table: dict[str, dict[str, Any]] = {}  # node name -> latest added/updated line
        self.offers: dict[tuple[str, str], dict[str, Any]] = {}  # (program, node) -> offer line
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls,
        host: Any,
        name: str,
        *,
        programs: Sequence[str] = (),
        plugins: Sequence[str] = (),
        find: Sequence[str] = (),
        interface: str | None = None,
    ) -> Probe:
        argv = [sys.executable, "-m", "dpipes.discovery.probe", "--name", name]
        argv += ["--interface", interface or host.addr, "--endpoint", f"bus=tcp://{host.addr}:5555"]
        for flag, values in (("--program", programs), ("--plugin", plugins), ("--find", find)):
            for value in values:
                argv += [flag, value]
        return cls(host, name, await host.run(argv))

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            event = json.loads(raw)
            async with self._changed:
                self.events.append(event)
                kind = event["event"]
                if kind in ("added", "updated"):
                    self.table[event["name"]] = event
                elif kind == "removed":
                    self.table.pop(event["name"], None)
                elif kind == "offer":
                    self.offers[(event["program"], event["name"])] = event
                elif kind == "offer_gone":
                    self.offers.pop((event["program"], event["name"]), None)
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    def has(self, kind: str) -> bool:
        """True once the probe printed an event of this kind."""
        return any(e["event"] == kind for e in self.events)

    async def until(self, predicate: Callable[[Probe], bool], what: str, within_s: float) -> None:
        """Wait until ``predicate(self)`` holds; fail with the probe's output after ``within_s``."""

        async def check() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: predicate(self) or self._reader.done())
            if not predicate(self):
                raise AssertionError(f"probe {self.name} exited before: {what}")

        try:
            await asyncio.wait_for(check(), within_s)
        except TimeoutError:
            raise AssertionError(f"probe {self.name}: not within {within_s} s: {what}\n{self.describe()}") from None

    async def stop(self) -> int:
        """SIGTERM, then the exit status; the output is read to the end."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        await asyncio.wait_for(self._reader, STOP_TIMEOUT_S)
        return code

    def describe(self) -> str:
        lines = "\n".join(json.dumps(e) for e in self.events[-30:])
        return f"events:\n{lines}"

    async def stderr(self) -> str:
        if self.proc.stderr is None or self.proc.returncode is None:
            return ""
        return (await self.proc.stderr.read()).decode(errors="replace")


def sees(*names: str, programs: dict[str, list[str]] | None = None) -> Callable[[Probe], bool]:
    """Predicate: the probe's table holds every one of ``names`` (with these programs, if given)."""

    def predicate(p: Probe) -> bool:
        if not all(n in p.table for n in names):
            return False
        return all(sorted(p.table[n]["programs"]) == sorted(progs) for n, progs in (programs or {}).items())

    return predicate


@contextlib.asynccontextmanager
async def probes_stopped(probes: list[Probe]) -> Any:
    """Stop every probe at the end (the LAN would kill them anyway; this checks clean exits)."""
    try:
        yield probes
    finally:
        for p in probes:
            with contextlib.suppress(Exception):
                await p.stop()


async def test_five_hosts_converge_with_programs(lan: Any) -> None:
    async with lan(5) as hosts:
        probes = [
            await Probe.start(
                h,
                f"node{i}",
                programs=[f"prog{i}", "sort"],
                plugins=["topk"] if i == 0 else [],
                interface=h.iface if i % 2 else h.addr,  # by name and by address
            )
            for i, h in enumerate(hosts)
        ]
        async with probes_stopped(probes):
            names = [p.name for p in probes]
            for p in probes:
                others = [n for n in names if n != p.name]
                expected = {n: [f"prog{names.index(n)}", "sort"] for n in others}
                await p.until(sees(*others, programs=expected), f"sees {others}", CONVERGE_TIMEOUT_S)
            line = probes[1].table["node0"]
            assert line["addresses"] == [hosts[0].addr]
            assert line["endpoints"] == {"bus": f"tcp://{hosts[0].addr}:5555"}
            assert line["plugins"] == ["topk"]
            assert line["source"] == "mdns"
        for p in probes:
            assert p.proc.returncode == 0, await p.stderr()
            closed = next(e for e in p.events if e["event"] == "closed")
            assert closed["malformed"] == 0 and closed["conflicts"] == 0


async def test_late_joiner_is_seen_and_sees_everyone(lan: Any) -> None:
    async with lan(2) as hosts:
        probes = [await Probe.start(h, f"early{i}") for i, h in enumerate(hosts)]
        async with probes_stopped(probes):
            await probes[0].until(sees("early1"), "sees early1", CONVERGE_TIMEOUT_S)
            await probes[1].until(sees("early0"), "sees early0", CONVERGE_TIMEOUT_S)
            late_host = await hosts.add_host()
            late = await Probe.start(late_host, "late", programs=["uniq"])
            probes.append(late)
            await late.until(sees("early0", "early1"), "sees both early nodes", CONVERGE_TIMEOUT_S)
            for p in probes[:2]:
                await p.until(sees("late", programs={"late": ["uniq"]}), "sees the late joiner", CONVERGE_TIMEOUT_S)


async def test_sigterm_sends_goodbye_and_others_remove_it(lan: Any) -> None:
    async with lan(3) as hosts:
        probes = [await Probe.start(h, f"n{i}") for i, h in enumerate(hosts)]
        async with probes_stopped(probes):
            for p in probes:
                others = [q.name for q in probes if q is not p]
                await p.until(sees(*others), f"sees {others}", CONVERGE_TIMEOUT_S)
            leaving = probes[2]
            assert await leaving.stop() == 0, await leaving.stderr()
            assert leaving.has("closed")
            for p in probes[:2]:
                await p.until(lambda q: "n2" not in q.table, "removes n2", GOODBYE_BOUND_S)
                removed = [e for e in p.events if e["event"] == "removed" and e["name"] == "n2"]
                assert [e["reason"] for e in removed] == ["goodbye"]
            assert "n1" in probes[0].table and "n0" in probes[1].table


async def test_program_is_findable_as_dp_subtype(lan: Any) -> None:
    async with lan(2) as hosts:
        offerer = await Probe.start(hosts[0], "offerer", programs=["sort", "python3.11"], plugins=["topk"])
        seeker = await Probe.start(hosts[1], "seeker", find=["sort", "python3.11", "topk", "absent"])
        async with probes_stopped([offerer, seeker]):
            wanted = {("sort", "offerer"), ("python3.11", "offerer"), ("topk", "offerer")}
            await seeker.until(
                lambda p: wanted <= set(p.offers), "finds dp.sort, dp.python3.11, dp.topk", CONVERGE_TIMEOUT_S
            )
            assert seeker.offers[("sort", "offerer")]["kind"] == "program"
            assert seeker.offers[("topk", "offerer")]["kind"] == "plugin"
            assert seeker.offers[("sort", "offerer")]["addresses"] == [hosts[0].addr]
            assert not any(program == "absent" for program, _ in seeker.offers)
            assert await offerer.stop() == 0
            await seeker.until(lambda p: not p.offers, "sees the offers withdrawn", GOODBYE_BOUND_S)


async def test_multicast_blocked_host_stays_isolated(lan: Any) -> None:
    async with lan(3) as hosts:
        await hosts[2].block_multicast()
        probes = [await Probe.start(h, f"n{i}") for i, h in enumerate(hosts)]
        async with probes_stopped(probes):
            await probes[0].until(sees("n1"), "sees n1", CONVERGE_TIMEOUT_S)
            await probes[1].until(sees("n0"), "sees n0", CONVERGE_TIMEOUT_S)
            await probes[2].until(lambda p: p.has("ready"), "is ready", CONVERGE_TIMEOUT_S)
            # A bounded window for something that must not happen (tuned convergence is ~0.1 s).
            with pytest.raises(AssertionError, match="not within"):
                await probes[0].until(sees("n2"), "sees the isolated n2", ISOLATION_WINDOW_S)
            assert "n2" not in probes[1].table
            assert probes[2].table == {}
            # Unblocked, a node started on that host takes part again (the isolated probe would
            # only notice at its browser's next scheduled query, seconds away).
            assert await probes[2].stop() == 0
            await hosts[2].unblock_multicast()
            rejoined = await Probe.start(hosts[2], "n2b")
            probes.append(rejoined)
            await rejoined.until(sees("n0", "n1"), "sees the others once unblocked", CONVERGE_TIMEOUT_S)
            await probes[0].until(sees("n2b"), "sees the host once unblocked", CONVERGE_TIMEOUT_S)


async def test_duplicate_name_is_detected_and_the_newer_instance_wins(lan: Any) -> None:
    async with lan(3) as hosts:
        observer = await Probe.start(hosts[2], "obs")
        older = await Probe.start(hosts[0], "dup", programs=["old"])
        probes = [observer, older]
        async with probes_stopped(probes):
            await older.until(lambda p: p.has("ready"), "is ready", CONVERGE_TIMEOUT_S)
            newer = await Probe.start(hosts[1], "dup", programs=["new"])
            probes.append(newer)
            await newer.until(lambda p: p.has("ready"), "is ready", CONVERGE_TIMEOUT_S)
            newer_id = next(e["instance_id"] for e in newer.events if e["event"] == "ready")
            await observer.until(
                lambda p: p.table.get("dup", {}).get("instance_id") == newer_id,
                "holds the newer dup",
                CONVERGE_TIMEOUT_S,
            )
            assert observer.table["dup"]["programs"] == ["new"]
            # The older instance leaves: its goodbye must not remove the newer one.
            assert await older.stop() == 0
            closed = next(e for e in older.events if e["event"] == "closed")
            assert closed["conflicts"] >= 1  # it saw its name advertised by another instance
            newer_leaves_at = asyncio.get_running_loop().time()
            assert await newer.stop() == 0
            await observer.until(lambda p: "dup" not in p.table, "removes dup", GOODBYE_BOUND_S)
            removals = [e for e in observer.events if e["event"] == "removed" and e["name"] == "dup"]
            assert len(removals) == 1 and removals[0]["t"] >= newer_leaves_at
            assert observer.table.get("dup") is None


UPDATER = """
import asyncio, dataclasses, sys
from dpipes.discovery.mdns import MdnsDiscovery
from dpipes.discovery.table import NodeRecord, new_instance_id

async def main():
    me = NodeRecord("upd", new_instance_id(), 1, programs=("sort",))
    loop = asyncio.get_running_loop()
    async with MdnsDiscovery(me, interfaces=[sys.argv[1]]) as discovery:
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        await discovery.update(dataclasses.replace(me, programs=("uniq",)))
        print("updated", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)

asyncio.run(main())
"""


async def test_update_readvertises_programs_and_offers(lan: Any) -> None:
    async with lan(2) as hosts:
        observer = await Probe.start(hosts[1], "obs", find=["sort", "uniq"])
        async with probes_stopped([observer]):
            updater = await hosts[0].run([sys.executable, "-c", UPDATER, hosts[0].addr], stdin=asyncio.subprocess.PIPE)
            assert updater.stdin is not None and updater.stdout is not None
            assert await asyncio.wait_for(updater.stdout.readline(), CONVERGE_TIMEOUT_S) == b"ready\n"
            await observer.until(
                lambda p: sees("upd", programs={"upd": ["sort"]})(p) and ("sort", "upd") in p.offers,
                "sees upd offering sort",
                CONVERGE_TIMEOUT_S,
            )
            updater.stdin.write(b"\n")
            assert await asyncio.wait_for(updater.stdout.readline(), CONVERGE_TIMEOUT_S) == b"updated\n"
            await observer.until(
                lambda p: (
                    sees("upd", programs={"upd": ["uniq"]})(p)
                    and ("uniq", "upd") in p.offers
                    and ("sort", "upd") not in p.offers
                ),
                "sees upd now offering uniq instead of sort",
                CONVERGE_TIMEOUT_S,
            )
            assert [e["reason"] for e in observer.events if e.get("name") == "upd" and e["event"] == "updated"] == [
                "changed"
            ]
            updater.stdin.close()
            assert await asyncio.wait_for(updater.wait(), STOP_TIMEOUT_S) == 0
            await observer.until(lambda p: "upd" not in p.table, "removes upd", GOODBYE_BOUND_S)
