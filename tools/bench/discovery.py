"""``dpipes-bench discovery``: how long N daemons on a LAN take to find and link to each other.

Each round builds a LAN of N network namespaces (``dpipes.tools.bench.netns``; root only), starts
``dpipesd`` in every one at once, listening on its LAN address, and waits until every daemon has
logged a link up to every other (stronger than "has seen": the link is what routes data). Two
figures, medians over the rounds:

* ``discovery.converge_N``: from starting the N daemons to the full mesh; this includes N Python
  start-ups sharing the machine's cores;
* ``discovery.after_ready_N``: from the moment the last daemon was listening to the full mesh:
  what mDNS, HELLO/WELCOME and gossip themselves take.
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
TARGET_S = 1.5  # for N = 8, on this 2-core machine (the figure)
_LINK_UP = re.compile(r"node (\S+): link to (\S+) \(")


async def _round(n: int, tmp: Path) -> tuple[float, float]:
    async with netns.lan(n) as hosts:
        loop = asyncio.get_running_loop()
        linked: dict[str, set[str]] = {h.name: set() for h in hosts}
        ready_at: dict[str, float] = {}
        done = loop.create_future()
        start = loop.time()

        async def watch(name: str, proc: asyncio.subprocess.Process) -> None:
            assert proc.stdout is not None and proc.stderr is not None
            if b"ready:" in await proc.stdout.readline():
                ready_at[name] = loop.time()
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
        return finished - start, finished - max(ready_at.values(), default=start)


def discovery_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None, nodes: int = 8
) -> list[Result]:
    """Convergence of ``nodes`` daemons, ``repeat`` rounds (root and iproute2 needed)."""
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        raise SuiteUnavailable(f"the discovery suite needs network namespaces: {reason}")
    n = min(nodes, 3) if quick else nodes
    totals, afters = [], []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="dpipes-bench-disc-") as tmp:
            total, after = asyncio.run(_round(n, Path(tmp)))
        totals.append(total)
        afters.append(after)
        progress(".")
    return [
        against_target(f"discovery.converge_{n}", "s", totals, TARGET_S),
        against_target(f"discovery.after_ready_{n}", "s", afters, TARGET_S),
    ]
