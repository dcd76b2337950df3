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
  converge target one daemon may spend on this machine's cores (``TARGET_S * cores / N``).

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

from dpipes.tools.bench import netns
from dpipes.tools.bench.result import Result, SuiteUnavailable, against_target

PORT = 7171
ROUND_TIMEOUT_S = 60.0
TARGET_S = 1.0  # for N = 8, on a 2-core machine (the figure)
_LINK_UP = re.compile(r"node (\S+): link to (\S+) \(")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of process ``pid`` (Linux ``/proc``, as network namespaces are)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


async def _round(n: int, tmp: Path) -> tuple[float, float, float]:
    async with netns.lan(n) as hosts:
        loop = asyncio.get_running_loop()
        linked: dict[str, set[str]] = {h.name: set() for h in hosts}
        ready_at: dict[str, float] = {}
        cpu_at_ready: list[float] = []
        done = loop.create_future()
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
            watchers.append(asyncio.create_task(watch(host.name, proc)))
        try:
            finished = await asyncio.wait_for(done, ROUND_TIMEOUT_S)
        finally:
            for task in watchers:
                task.cancel()
        cpu = sum(cpu_at_ready) / len(cpu_at_ready) if cpu_at_ready else 0.0
        return finished - start, finished - max(ready_at.values(), default=start), cpu


def discovery_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None, nodes: int = 8
) -> list[Result]:
    """Convergence of ``nodes`` daemons, ``repeat`` rounds (root and iproute2 needed)."""
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        raise SuiteUnavailable(f"the discovery suite needs network namespaces: {reason}")
    n = min(nodes, 3) if quick else nodes
    totals, afters, cpus = [], [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="dpipes-bench-disc-") as tmp:
            total, after, cpu = asyncio.run(_round(n, Path(tmp)))
        totals.append(total)
        afters.append(after)
        cpus.append(cpu)
        progress(".")
    cores = os.cpu_count() or 1
    return [
        against_target(f"discovery.converge_{n}", "s", totals, TARGET_S),
        against_target(f"discovery.after_ready_{n}", "s", afters, TARGET_S),
        against_target(f"discovery.cpu_to_ready_{n}", "s", cpus, TARGET_S * cores / n),
    ]
