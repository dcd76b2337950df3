"""``dpipes-bench discovery``: how long N daemons on a LAN take to find and link to each other.

Each round builds a LAN of N network namespaces (``dpipes.tools.bench.netns``; root only), starts
``dpipesd`` in every one at once, listening on its LAN address, and waits until every daemon has
logged a link up to every other (stronger than "has seen": the link is what routes data). Two
figures, medians over the rounds:

* ``discovery.converge_N``: from starting the N daemons to the full mesh; this includes N Python
  start-ups sharing the machine's cores;
* ``discovery.after_ready_N``: from the moment the last daemon was listening to the full mesh:
  what mDNS, HELLO/WELCOME and gossip themselves take;
* ``discovery.cpu_to_ready_N``: CPU seconds (user + system) one daemon spent from its exec to
  "ready", the mean over the N; with N daemons sharing C cores, converge_N cannot be shorter than
  N x this / C, so this is the figure start-up work moves. Its target is the share of the
  converge target one daemon may spend on this machine's cores (``TARGET_S * cores / N``);
* ``discovery.cpu_to_mesh_N``: the same to the full mesh, with the children a daemon waited for
  (a dependency runs ``ldconfig`` at import): all the CPU the N daemons need to converge, so
  N x this / C is converge_N on an otherwise idle machine; same target;
* ``discovery.others_cpu_N``: CPU seconds the rest of the machine (other processes, this bench
  included) used during the round, beside the N daemons' own: on a shared machine, converge_N
  minus N x cpu_to_mesh_N / C is mostly this load, not discovery's waits (after_ready_N).

The daemons run byte-compiled code, as an installed node does (``dpipes-bench`` compiles a
checkout first: see :mod:`dpipes.tools.bench.cli`); compiling every module from source in every
daemon doubled the CPU of a start.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from dpipes.tools.bench import netns
from dpipes.tools.bench.result import Result, SuiteUnavailable, against_target, result

PORT = 7171
ROUND_TIMEOUT_S = 60.0
TARGET_S = 1.0  # for N = 8, on a 2-core machine (the figure)
_LINK_UP = re.compile(r"node (\S+): link to (\S+) \(")


def _cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User + system CPU time so far of process ``pid`` (Linux ``/proc``, as network namespaces are),
    with that of the children it has waited for if ``children``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = sum(int(x) for x in fields[11 : 15 if children else 13])  # utime, stime[, cutime, cstime]
    return ticks / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy since boot (``/proc/stat``)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class _Round(NamedTuple):
    converge: float
    after_ready: float
    cpu_to_ready: float  # mean per daemon
    cpu_to_mesh: float  # mean per daemon, children included
    others_cpu: float  # the rest of the machine, during the round


async def _round(n: int, tmp: Path) -> _Round:
    async with netns.lan(n) as hosts:
        loop = asyncio.get_running_loop()
        linked: dict[str, set[str]] = {h.name: set() for h in hosts}
        ready_at: dict[str, float] = {}
        cpu_at_ready: list[float] = []
        done = loop.create_future()
        pids: list[int] = []
        busy_at_start = _machine_busy_seconds()
        start = loop.time()

        async def watch(name: str, proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None and proc.stderr is not None
            if b"ready:" in await proc.stdout.readline():
                ready_at[name] = loop.time()
                cpu_at_ready.append(_cpu_seconds(proc.pid))  # `ip netns exec` execs the daemon in place
            async for raw in proc.stderr:
                match = _LINK_UP.search(raw.decode(errors="replace"))
                if match and match[1] == name:
                    linked[name].add(match[2])
                    if all(len(peers) == n - 1 for peers in linked.values()) and not done.done():
                        done.set_result(loop.time())

        watchers = []
        for host in hosts:
            runtime = tmp / host.name
            runtime.mkdir(mode=0o700)
            env = dict(os.environ, DPIPES_RUNTIME_DIR=str(runtime), DPIPES_CONFIG_PATHS="")
            argv = [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", host.name]
            argv += ["--listen", f"{host.addr}:{PORT}", "--insecure", "--log-level", "INFO"]
            proc = await host.run(argv, env=env)
            pids.append(proc.pid)
            watchers.append(asyncio.create_task(watch(host.name, proc)))
        try:
            finished = await asyncio.wait_for(done, ROUND_TIMEOUT_S)
            daemons = sum(_cpu_seconds(pid, children=True) for pid in pids)
            others = max(0.0, _machine_busy_seconds() - busy_at_start - daemons)
        finally:
            for task in watchers:
                task.cancel()
        return _Round(
            converge=finished - start,
            after_ready=finished - max(ready_at.values(), default=start),
            cpu_to_ready=sum(cpu_at_ready) / len(cpu_at_ready) if cpu_at_ready else 0.0,
            cpu_to_mesh=daemons / n,
            others_cpu=others,
        )


def discovery_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None, nodes: int = 8
) -> list[Result]:
    """Convergence of ``nodes`` daemons, ``repeat`` rounds (root and iproute2 needed)."""
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        raise SuiteUnavailable(f"the discovery suite needs network namespaces: {reason}")
    n = min(nodes, 3) if quick else nodes
    rounds: list[_Round] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="dpipes-bench-disc-") as tmp:
            rounds.append(asyncio.run(_round(n, Path(tmp))))
        progress(".")
    cores = os.cpu_count() or 1
    return [
        against_target(f"discovery.converge_{n}", "s", [r.converge for r in rounds], TARGET_S),
        against_target(f"discovery.after_ready_{n}", "s", [r.after_ready for r in rounds], TARGET_S),
        against_target(f"discovery.cpu_to_ready_{n}", "s", [r.cpu_to_ready for r in rounds], TARGET_S * cores / n),
        against_target(f"discovery.cpu_to_mesh_{n}", "s", [r.cpu_to_mesh for r in rounds], TARGET_S * cores / n),
        result(
            f"discovery.others_cpu_{n}",
            "s",
            [r.others_cpu for r in rounds],
            f"the {n} daemons' own CPU in the round",
            [r.cpu_to_mesh * n for r in rounds],
            higher_is_better=False,
        ),
    ]
