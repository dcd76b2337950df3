"""Pipeline benchmarks (``dpipes-bench pipe``): dpipes against a plain shell pipe, in one run.

* ``pipe.throughput_1GiB``: ``cat FILE | cat`` with the two stages on two local daemons and the
  output to /dev/null, against ``sh -c 'cat FILE | cat > /dev/null'``.
* ``pipe.throughput_1GiB_cpu``: the CPU seconds per GB of the same runs, user + system: for dpipes
  the client, both daemons and their stages; for the shell ``sh`` and its two ``cat``. On a machine
  shared with other work this varies less than the wall time. It includes the start of the run,
  which dominates it at ``--quick``'s 64 MiB.
* ``pipe.direct_read_1GiB``, ``pipe.direct_read_1GiB_cpu`` and ``pipe.direct_read_1GiB_entry_cpu``:
  the same two-node runs (the client reads the last stage's output at ``bench-b``) against the
  same with ``DPIPES_DIRECT_READ=0`` (that output through the entry daemon's hub), alternating in
  one pair of daemons: MB/s, CPU s/GB of everything, and of the entry daemon alone (with its stage).
* ``pipe.direct_read_short_1GiB``, ``pipe.direct_read_short_1GiB_cpu``,
  ``pipe.direct_read_short_1GiB_entry_cpu``: the same run on the short path (no ``--node``: the
  first daemon is this host's, over ipc, and the client reads ``bench-b``'s output at its Unix
  socket), against the same with ``DPIPES_DIRECT_READ=0``. ``pipe.direct_read_short_start``: the
  wall time of ``echo x | cat@bench-b`` on the short path, against ``DPIPES_DIRECT_READ=0``: what
  attaching to the last node and claiming its output there adds to a run's start;
  ``pipe.direct_read_short_start_cpu``: the client's CPU time of those runs (user + system).
* ``pipe.one_node_throughput_1GiB``: ``cat FILE | cat | cat`` on the local daemon (no ``--node``:
  over ipc), against the same pipeline in ``sh``. Neighbours on one node share a kernel pipe and
  dpipes hands its stdout to the last stage, so this measures what dpipes adds around a
  pipeline that stays on one host (start-up included).
* ``pipe.start_to_finish``: wall time of ``dpipes 'echo x | cat'`` against a running daemon,
  against ``sh -c 'echo x | cat'``; also reported as the time dpipes adds, and beside
  ``python -c pass`` (``pipe.python_floor``), the interpreter's own start that no Python client
  can go below, and beside the same command on the full client path (``pipe.start_full_path``:
  ``DPIPES_SHORT_PATH=0``, asyncio and the bus client, as every run took before the short path).
* ``pipe.client_cpu``: the CPU time (user + system) of the ``dpipes`` process of those runs,
  against that of ``python -c pass``: what the client itself costs, which a busy machine does not
  blur as it blurs wall times (the daemon's and the stages' CPU are not in it).

Commands run as an installed package runs them: with their byte code cached. The benchmark removes
``PYTHONDONTWRITEBYTECODE`` from their environment (a warm-up run writes the cache of a source
checkout); with it set, every start compiles every dpipes module again, which measures the
environment, not dpipes.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from dpipes.tools.bench.result import Result, against_target, result

DAEMON_START_TIMEOUT_S = 30.0
ADDED_TARGET_MS = 80.0  # what dpipes may add to `echo x | cat` from start to finish (issue 16's bar)


@contextlib.contextmanager
def local_daemons(
    names: list[str], runtime_dir: Path, *, env: dict[str, str] | None = None, pids: list[int] | None = None
) -> Iterator[list[str]]:
    """Start ``dpipesd --foreground`` per name (each a peer of the first); yield their HOST:PORTs.

    ``env``: the daemons' environment (default: ours, with ``runtime_dir`` and no system config).
    ``pids``: a list to append each daemon's process id to.
    """
    env = env or dict(os.environ, DPIPES_RUNTIME_DIR=str(runtime_dir), DPIPES_CONFIG_PATHS="")
    procs: list[subprocess.Popen[str]] = []
    addrs: list[str] = []
    try:
        for name in names:
            argv = [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", name]
            argv += ["--listen", "127.0.0.1:0", "--insecure"] + (["--peer", addrs[0]] if addrs else [])
            proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(proc)
            if pids is not None:
                pids.append(proc.pid)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"tcp://(\S+)", line)
            if not match:
                raise RuntimeError(f"dpipesd {name} did not start: {line!r}")
            addrs.append(match[1])
        yield addrs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(DAEMON_START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _timed(argv: list[str], env: dict[str, str] | None = None, *, cpu: list[float] | None = None) -> float:
    """The wall time of running ``argv``, in seconds; with ``cpu``, its CPU time (user + system,
    in ms) is appended there."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if cpu is not None:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
    return wall


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far of our children that have exited and of processes ``pids``
    with theirs (a daemon's stages, reaped by it when their run ends); Linux ``/proc``."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime + sum(_daemon_cpu_seconds(pid) for pid in pids)


def _daemon_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of process ``pid`` and its reaped children; Linux ``/proc``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def _timed_cpu(argv: list[str], pids: list[int], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds of ``argv``, and the CPU seconds it and processes ``pids`` spent meanwhile."""
    cpu = _cpu_seconds(pids)
    wall = _timed(argv, env)
    return wall, _cpu_seconds(pids) - cpu


def _short_direct_read(
    dpipes: list[str],
    data: Path,
    size: int,
    env: dict[str, str],
    entry_env: dict[str, str],
    daemons: list[int],
    repeat: int,
    progress: Callable[[str], None],
) -> list[Result]:
    """The ``pipe.direct_read_short_*`` rows: the short path (this host's daemon, over ipc) reading
    the last stage at ``bench-b``, against the same through the entry daemon."""
    two_nodes, start = [*dpipes, f"cat {data} | cat@bench-b"], [*dpipes, "echo x | cat@bench-b"]
    ours: list[float] = []
    theirs: list[float] = []
    our_cpu: list[float] = []
    their_cpu: list[float] = []
    our_entry: list[float] = []
    their_entry: list[float] = []
    starts: list[float] = []
    via_entry_starts: list[float] = []
    start_cpu: list[float] = []
    via_entry_start_cpu: list[float] = []
    _timed(start, env)  # warm up: the byte code cache
    for _ in range(repeat):
        for run_env, mbs, cpus, entry in ((env, ours, our_cpu, our_entry), (entry_env, theirs, their_cpu, their_entry)):
            entry_before = _daemon_cpu_seconds(daemons[0])
            wall, cpu = _timed_cpu(two_nodes, daemons, run_env)
            entry.append((_daemon_cpu_seconds(daemons[0]) - entry_before) / size * 1e9)
            mbs.append(size / wall / 1e6)
            cpus.append(cpu / size * 1e9)
        for _ in range(4):  # a start is short: more of them, for a wall time on a shared machine
            starts.append(_timed(start, env, cpu=start_cpu) * 1000)
            via_entry_starts.append(_timed(start, entry_env, cpu=via_entry_start_cpu) * 1000)
        progress(".")
    mib, baseline = size >> 20, "DPIPES_DIRECT_READ=0"
    return [
        result(f"pipe.direct_read_short_{mib}MiB_cpu", "CPU s/GB, client, daemons and stages", our_cpu, baseline,
               their_cpu, higher_is_better=False),
        result(f"pipe.direct_read_short_{mib}MiB_entry_cpu", "CPU s/GB, the entry daemon and its stage", our_entry,
               baseline, their_entry, higher_is_better=False),
        result(f"pipe.direct_read_short_{mib}MiB", "MB/s", ours, baseline, theirs),
        result("pipe.direct_read_short_start", "ms", starts, baseline, via_entry_starts, higher_is_better=False),
        result("pipe.direct_read_short_start_cpu", "ms, the client's CPU", start_cpu, baseline, via_entry_start_cpu,
               higher_is_better=False),
    ]  # fmt: skip


def pipe_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None
) -> list[Result]:
    size = (64 if quick else 1024) << 20
    results = []
    with tempfile.TemporaryDirectory(prefix="dpipes-bench-") as tmp:
        data = Path(tmp) / "data.bin"
        with open(data, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        runtime = Path(tmp) / "run"
        runtime.mkdir(mode=0o700)
        env = dict(os.environ, DPIPES_RUNTIME_DIR=str(runtime), DPIPES_CONFIG_PATHS="")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        dpipes = [sys.executable, "-m", "dpipes.tools.dpipes", "--insecure"]  # the daemons run --insecure
        daemons: list[int] = []
        with local_daemons(["bench-a", "bench-b"], runtime, pids=daemons) as (a, _b):
            ours, theirs, our_cpu, their_cpu = [], [], [], []
            via_entry, via_entry_cpu, entry_cpu, entry_cpu_via_entry = [], [], [], []
            two_nodes = [*dpipes, "--node", a, f"cat {data} | cat@bench-b"]
            entry_env = dict(env, DPIPES_DIRECT_READ="0")  # the last stage's output through the entry node
            _timed(two_nodes, env)  # warm the page cache
            for _ in range(repeat):
                wall, cpu = _timed_cpu(["sh", "-c", f"cat {data} | cat > /dev/null"], [])
                theirs.append(size / wall / 1e6)
                their_cpu.append(cpu / size * 1e9)
                entry_before = _daemon_cpu_seconds(daemons[0])
                wall, cpu = _timed_cpu(two_nodes, daemons, env)
                entry_cpu.append((_daemon_cpu_seconds(daemons[0]) - entry_before) / size * 1e9)
                ours.append(size / wall / 1e6)
                our_cpu.append(cpu / size * 1e9)
                entry_before = _daemon_cpu_seconds(daemons[0])
                wall, cpu = _timed_cpu(two_nodes, daemons, entry_env)
                entry_cpu_via_entry.append((_daemon_cpu_seconds(daemons[0]) - entry_before) / size * 1e9)
                via_entry.append(size / wall / 1e6)
                via_entry_cpu.append(cpu / size * 1e9)
                progress(".")
            results.append(
                result(
                    f"pipe.throughput_{size >> 20}MiB",
                    "MB/s",
                    ours,
                    "sh -c 'cat FILE | cat'",
                    theirs,
                    target=0.5,  # the first bar (aim 0.8x)
                )
            )
            results.append(
                result(
                    f"pipe.throughput_{size >> 20}MiB_cpu",
                    "CPU s/GB, client, daemons and stages",
                    our_cpu,
                    "sh -c 'cat FILE | cat'",
                    their_cpu,
                    higher_is_better=False,
                )
            )
            results.append(
                result(
                    f"pipe.direct_read_{size >> 20}MiB_cpu",
                    "CPU s/GB, client, daemons and stages",
                    our_cpu,
                    "DPIPES_DIRECT_READ=0",
                    via_entry_cpu,
                    higher_is_better=False,
                )
            )
            results.append(
                result(
                    f"pipe.direct_read_{size >> 20}MiB_entry_cpu",
                    "CPU s/GB, the entry daemon and its stage",
                    entry_cpu,
                    "DPIPES_DIRECT_READ=0",
                    entry_cpu_via_entry,
                    higher_is_better=False,
                )
            )
            results.append(
                result(f"pipe.direct_read_{size >> 20}MiB", "MB/s", ours, "DPIPES_DIRECT_READ=0", via_entry)
            )
            results += _short_direct_read(dpipes, data, size, env, entry_env, daemons, repeat, progress)
            local, theirs = [], []  # one node: neighbours share a kernel pipe, dpipes hands over its stdout
            for _ in range(repeat):
                theirs.append(size / _timed(["sh", "-c", f"cat {data} | cat | cat > /dev/null"]) / 1e6)
                local.append(size / _timed([*dpipes, f"cat {data} | cat | cat"], env) / 1e6)
                progress(".")
            results.append(
                result(
                    f"pipe.one_node_throughput_{size >> 20}MiB", "MB/s", local, "sh -c 'cat FILE | cat | cat'", theirs
                )
            )
            walls, shells, floors, fulls = [], [], [], []
            client_cpu: list[float] = []
            floor_cpu: list[float] = []
            full_env = dict(env, DPIPES_SHORT_PATH="0")
            _timed([*dpipes, "echo x | cat"], env)  # warm up: the byte code cache
            _timed([*dpipes, "echo x | cat"], full_env)
            for _ in range(repeat * 2):
                shells.append(_timed(["sh", "-c", "echo x | cat"]) * 1000)
                floors.append(_timed([sys.executable, "-c", "pass"], env, cpu=floor_cpu) * 1000)
                walls.append(_timed([*dpipes, "echo x | cat"], env, cpu=client_cpu) * 1000)  # the local daemon
                fulls.append(_timed([*dpipes, "echo x | cat"], full_env) * 1000)
                progress(".")
            results.append(
                result("pipe.start_to_finish", "ms", walls, "sh -c 'echo x | cat'", shells, higher_is_better=False)
            )
            results.append(
                result("pipe.python_floor", "ms", walls, "python -c pass", floors, higher_is_better=False)
            )
            results.append(
                result("pipe.start_full_path", "ms", walls, "DPIPES_SHORT_PATH=0", fulls, higher_is_better=False)
            )
            added = [w - s for w, s in zip(walls, shells, strict=True)]
            results.append(against_target("pipe.added_start_to_finish", "ms", added, ADDED_TARGET_MS))
            results.append(
                result("pipe.client_cpu", "ms", client_cpu, "python -c pass", floor_cpu, higher_is_better=False)
            )
    return results
