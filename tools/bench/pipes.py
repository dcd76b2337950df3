"""Dagster Pipes benchmarks (``dpipes-bench pipes``): dpipes against Dagster's own Pipes path, in one run.

An external Python process, an unmodified ``dagster_pipes.open_dagster_pipes()`` program, emits
messages; each is timestamped (``time.time()``, the same clock on this machine) when the client
receives it:

* dpipes: the program is a one-stage pipeline on a local daemon (``dpipesd``), run in-process with
  ``run_pipeline``; a message is received when the client's run handles it (its ``_on_pipes``).
* Dagster: ``dagster.open_pipes_session`` with ``PipesTempFileContextInjector`` and
  ``PipesTempFileMessageReader`` (a thread tailing a file, 10 ms poll) around ``subprocess.Popen``
  of the same program; a message is received when the reader hands it to Dagster's
  ``PipesMessageHandler``. Its log messages go to the context's logger, dpipes' to the client's
  stderr; both to /dev/null here.

Figures:

* ``pipes.burst_rate``: the program sends a start marker (carrying its send time), then N log +
  N custom messages as fast as it can, then an end marker. Rate = 2N / (time the client received
  the end marker - send time of the start marker): the message path from first send to last
  receipt, without interpreter start-up (the same for both) or teardown.
* ``pipes.burst_wall``: the same run from launch (``run_pipeline`` / ``open_pipes_session``) to
  completion (every stage reported / the session closed, every message handled).
* ``pipes.latency_p50`` / ``pipes.latency_p99``: M custom messages paced ~1 ms apart, each
  carrying its send time; latency = client receive time - send time.

Our bus writer, against the same Dagster runs: the same program, but
``open_dagster_pipes(message_writer=PipesBusMessageWriter())``, which sends straight onto the bus
that the bootstrap offers:

* ``pipes.bus_writer_*``: as a one-stage pipeline on the daemon, as for ``pipes.burst_rate``; the
  node offers its hub, and forwards what arrives to the client.
* ``pipes.session_bus_writer_*``: under dpipes' ``open_pipes_session`` with
  ``PipesBusMessageReader`` (no daemon: the session's own hub) around
  ``asyncio.create_subprocess_exec``; a message is received when the session's handler takes it.

Through Dagster end to end (:mod:`dpipes.nodes.dagster.bench`): an asset whose program sends the
same N log + N custom messages, materialized in-process by Dagster with its own
``PipesSubprocessClient`` (the baseline) and with ``DpipesPipesClient`` (the program as a
one-stage pipeline on the daemon):

* ``pipes.dagster_asset_rate``: 2N / (the client's ``run`` returned - the start marker's send
  time), every message handled by Dagster's own ``PipesMessageHandler`` (logs into its event log);
* ``pipes.dagster_asset_wall``: the whole ``materialize`` call.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

from dpipes.nodes import run as run_mod
from dpipes.nodes.pipeline import format_stage
from dpipes.nodes.pipes import PipesLine, PipesRecord, make_context_data
from dpipes.nodes.pipes_session import (
    PipesBusMessageReader,
    PipesMessageHandler,
    PipesMessageReader,
    open_pipes_session,
)
from dpipes.tools.bench.pipe import local_daemons
from dpipes.tools.bench.result import Result, SuiteUnavailable, result

BURST_MESSAGES = 10_000  # of each kind: log and custom
PACED_MESSAGES = 1_000
PACED_INTERVAL_S = 0.001
LATENCY_P50_TARGET_MS = 1.0
# dpipes-bus is not on a package index: the extra installs from a checkout, or dagster alone will do.
DAGSTER_NEEDED = (
    "needs the dagster package (the baseline is Dagster's own Pipes path): "
    "pip install dagster, or pip install -e '.[bench]' in a dpipes checkout"
)

EMITTER = """\
import sys, time
from dagster_pipes import open_dagster_pipes

mode, n = sys.argv[1], int(sys.argv[2])
writer = None
if mode.endswith("-bus"):  # our writer, straight onto the bus the session offers
    from dpipes.bus.pipes_writer import PipesBusMessageWriter

    writer = PipesBusMessageWriter()
with open_dagster_pipes(message_writer=writer) as pipes:
    if mode.startswith("burst"):
        pipes.report_custom_message({"start": time.time()})
        for i in range(n):
            pipes.log.info(f"log {i}")
            pipes.report_custom_message(i)
        pipes.report_custom_message({"end": time.time()})
    else:
        interval = float(sys.argv[3])
        due = time.perf_counter()
        for i in range(n):
            due += interval
            while (left := due - time.perf_counter()) > 0:
                if left > 0.0002:
                    time.sleep(left - 0.0001)
            pipes.report_custom_message({"i": i, "t": time.time()})
"""

Arrival = tuple[float, Mapping[str, Any]]  # (receive time, the Pipes message)


def _payload(message: Mapping[str, Any]) -> Any:
    if message.get("method") != "report_custom_message":
        return None
    return (message.get("params") or {}).get("payload")


def burst_rate(arrivals: list[Arrival], n: int) -> float:
    """Messages/s from the start marker's send time to the end marker's receipt (2n messages between)."""
    start = end = None
    for received, message in arrivals:
        payload = _payload(message)
        if isinstance(payload, dict):
            if "start" in payload:
                start = float(payload["start"])
            elif "end" in payload:
                end = received
    if start is None or end is None or end <= start:
        raise RuntimeError("the burst's start or end marker did not arrive")
    return 2 * n / (end - start)


def latencies_ms(arrivals: list[Arrival]) -> list[float]:
    """Receive time - send time of every paced message, in ms."""
    out = []
    for received, message in arrivals:
        payload = _payload(message)
        if isinstance(payload, dict) and "t" in payload:
            out.append((received - float(payload["t"])) * 1000)
    return out


def percentiles(values: list[float]) -> tuple[float, float]:
    """(p50, p99) of ``values``."""
    if len(values) < 2:
        raise RuntimeError(f"only {len(values)} paced message(s) arrived")
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[98]


# -- dpipes ------------------------------------------------------------------------------------


def _dpipes_run(entry: str, argv: list[str]) -> tuple[list[Arrival], float]:
    """Run ``argv`` as a one-stage pipeline; its Pipes messages with receive times, and the wall time (s)."""
    arrivals: list[Arrival] = []
    null = os.open(os.devnull, os.O_RDWR)

    def stamp(stage: int, message: Mapping[str, Any]) -> None:
        arrivals.append((time.time(), message))  # as the client hands it over: decoded once

    try:
        options = run_mod.RunOptions(pipeline=format_stage(argv))
        start = time.perf_counter()
        res = asyncio.run(
            run_mod.run_pipeline(
                entry, options, stdin_fd=null, stdout_fd=null, stderr_fd=null, on_pipes=stamp, handle_sigint=False
            )
        )
        wall = time.perf_counter() - start
    finally:
        os.close(null)
    if res.exit_code != 0:
        raise RuntimeError(f"dpipes run failed ({res.exit_code}): {[s.describe() for s in res.stages]}")
    return arrivals, wall


# -- dpipes' session API with the bus writer ---------------------------------------------------------


class _StampingHandler(PipesMessageHandler):
    """Stamps each message with its receive time, then hands it to the session's handler."""

    def __init__(self, inner: PipesMessageHandler, arrivals: list[tuple[float, PipesRecord]]) -> None:
        super().__init__()
        self._inner = inner
        self._arrivals = arrivals

    def handle_record(self, record: PipesRecord) -> None:
        self._arrivals.append((time.time(), record))
        self._inner.handle_record(record)


class _StampingReader(PipesMessageReader):
    def __init__(self, inner: PipesMessageReader, arrivals: list[tuple[float, PipesRecord]]) -> None:
        self._inner = inner
        self._arrivals = arrivals

    def read_messages(self, handler: PipesMessageHandler) -> contextlib.AbstractAsyncContextManager[dict[str, Any]]:
        return self._inner.read_messages(_StampingHandler(handler, self._arrivals))


def _session_run(argv: list[str]) -> tuple[list[Arrival], float]:
    """Run ``argv`` under dpipes' ``open_pipes_session`` + ``PipesBusMessageReader``; arrivals and wall time (s)."""
    stamped: list[tuple[float, PipesRecord]] = []

    async def run() -> tuple[int, float]:
        start = time.perf_counter()
        reader = _StampingReader(PipesBusMessageReader(), stamped)
        async with open_pipes_session(context_data=make_context_data(run_id="bench"), message_reader=reader) as session:
            proc = await asyncio.create_subprocess_exec(
                *argv, env={**os.environ, **session.get_bootstrap_env_vars()}, stdin=subprocess.DEVNULL
            )
            code = await proc.wait()
        return code, time.perf_counter() - start

    code, wall = asyncio.run(run())
    if code != 0:
        raise RuntimeError(f"the Pipes program with the bus writer exited {code}")
    arrivals: list[Arrival] = [(received, r.message.raw) for received, r in stamped if isinstance(r, PipesLine)]
    return arrivals, wall


# -- Dagster -----------------------------------------------------------------------------------


def dagster_available() -> bool:
    try:
        import dagster  # noqa: F401
    except ImportError:
        return False
    return True


def _dagster_run(argv: list[str]) -> tuple[list[Arrival], float]:
    """Run ``argv`` under ``dagster.open_pipes_session``; its messages with receive times, and the wall time (s)."""
    import dagster

    arrivals: list[Arrival] = []

    class Stamped:
        def __init__(self, handler: Any) -> None:
            self._handler = handler

        def handle_message(self, message: Any) -> None:
            arrivals.append((time.time(), message))
            self._handler.handle_message(message)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._handler, name)

    class StampedReader(dagster.PipesTempFileMessageReader):
        @contextlib.contextmanager
        def read_messages(self, handler: Any) -> Iterator[Any]:
            with super().read_messages(cast(Any, Stamped(handler))) as params:
                yield params

    timing: dict[str, float] = {}

    @dagster.op
    # unannotated: dagster rejects an Any-typed context and resolves string annotations itself
    def external(context) -> None:  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        with dagster.open_pipes_session(
            context=context,
            context_injector=dagster.PipesTempFileContextInjector(),
            message_reader=StampedReader(),
        ) as session:
            proc = subprocess.Popen(
                argv, env={**os.environ, **session.get_bootstrap_env_vars()}, stdin=subprocess.DEVNULL
            )
            timing["code"] = proc.wait()
        timing["wall"] = time.perf_counter() - start

    @dagster.job(name="pipes_bench")
    def job() -> None:
        external()

    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null):
        job.execute_in_process(instance=dagster.DagsterInstance.ephemeral())
    code, wall = int(timing["code"]), timing["wall"]
    if code != 0:
        raise RuntimeError(f"the Pipes program under Dagster exited {code}")
    return arrivals, wall


# -- the suite ---------------------------------------------------------------------------------


def pipes_benchmarks(
    *, repeat: int = 5, quick: bool = False, progress: Callable[[str], None] = lambda s: None
) -> list[Result]:
    burst = 1_000 if quick else BURST_MESSAGES
    paced = 200 if quick else PACED_MESSAGES
    if not dagster_available():
        raise SuiteUnavailable(DAGSTER_NEEDED)
    with tempfile.TemporaryDirectory(prefix="dpipes-bench-pipes-") as tmp:
        emitter = Path(tmp) / "emit.py"
        emitter.write_text(EMITTER)
        burst_argv = [sys.executable, str(emitter), "burst", str(burst)]
        paced_argv = [sys.executable, str(emitter), "paced", str(paced), str(PACED_INTERVAL_S)]
        runtime = Path(tmp) / "run"
        runtime.mkdir(mode=0o700)
        with local_daemons(["bench-pipes"], runtime) as (addr,):
            entry = run_mod.entry_from(addr)
            _dpipes_run(entry, [sys.executable, str(emitter), "burst", "10"])  # warm up: imports, page cache
            _dagster_run([sys.executable, str(emitter), "burst", "10"])
            _session_run([sys.executable, str(emitter), "burst-bus", "10"])
            # Both sides receive in this process, whose heap holds all of dagster: keep those
            # long-lived objects out of the collector's full passes (100+ ms each here), which
            # would otherwise land at random in either side's latencies.
            gc.collect()
            gc.freeze()
            runs: dict[str, Callable[[list[str]], tuple[list[Arrival], float]]] = {
                "dagster": _dagster_run,
                "dpipes": lambda argv: _dpipes_run(entry, argv),
                "bus_writer": lambda argv: _dpipes_run(entry, argv),
                "session_bus_writer": _session_run,
            }
            rates: dict[str, list[float]] = {who: [] for who in runs}
            walls: dict[str, list[float]] = {who: [] for who in runs}
            p50s: dict[str, list[float]] = {who: [] for who in runs}
            p99s: dict[str, list[float]] = {who: [] for who in runs}
            for _ in range(repeat):
                for who, run in runs.items():
                    bus = who.endswith("bus_writer")
                    argv = [*burst_argv[:2], "burst-bus", *burst_argv[3:]] if bus else burst_argv
                    arrivals, wall = run(argv)
                    rates[who].append(burst_rate(arrivals, burst))
                    walls[who].append(wall * 1000)
                    argv = [*paced_argv[:2], "paced-bus", *paced_argv[3:]] if bus else paced_argv
                    arrivals, _ = run(argv)
                    p50, p99 = percentiles(latencies_ms(arrivals))
                    p50s[who].append(p50)
                    p99s[who].append(p99)
                progress(".")
            assets = _dagster_asset_runs(addr, burst, repeat)
    baseline = "dagster open_pipes_session (temp file reader)"
    target_p50 = [LATENCY_P50_TARGET_MS]
    figures = [
        result("pipes.burst_rate", "msg/s", rates["dpipes"], baseline, rates["dagster"], target=5.0),
        result("pipes.burst_wall", "ms", walls["dpipes"], baseline, walls["dagster"], higher_is_better=False),
        result("pipes.latency_p50", "ms", p50s["dpipes"], baseline, p50s["dagster"], higher_is_better=False),
        result("pipes.latency_p99", "ms", p99s["dpipes"], baseline, p99s["dagster"], higher_is_better=False),
        result(
            "pipes.latency_p50_target",
            "ms",
            p50s["dpipes"],
            f"target: p50 at most {LATENCY_P50_TARGET_MS:g} ms",
            target_p50,
            target=1.0,
            higher_is_better=False,
        ),
    ]
    for who in ("bus_writer", "session_bus_writer"):
        figures += [
            result(f"pipes.{who}_rate", "msg/s", rates[who], baseline, rates["dagster"], target=5.0),
            result(f"pipes.{who}_wall", "ms", walls[who], baseline, walls["dagster"], higher_is_better=False),
            result(f"pipes.{who}_latency_p50", "ms", p50s[who], baseline, p50s["dagster"], higher_is_better=False),
            result(f"pipes.{who}_latency_p99", "ms", p99s[who], baseline, p99s["dagster"], higher_is_better=False),
        ]
    ours, theirs = assets["dpipes"], assets["subprocess"]
    asset_baseline = "dagster PipesSubprocessClient, the same asset"
    figures += [
        result("pipes.dagster_asset_rate", "msg/s", [r.rate for r in ours], asset_baseline, [r.rate for r in theirs]),
        result(
            "pipes.dagster_asset_wall",
            "ms",
            [r.wall_s * 1000 for r in ours],
            asset_baseline,
            [r.wall_s * 1000 for r in theirs],
            higher_is_better=False,
        ),
    ]
    return figures


def _dagster_asset_runs(node: str, messages: int, repeat: int) -> dict[str, list[Any]]:
    """The same asset through Dagster's subprocess client and dpipes' (on ``node``), alternately."""
    from dpipes.nodes.dagster.bench import asset_bursts

    runs = asset_bursts(messages=messages, repeat=repeat, node=node, insecure=True, warm_up=gc.freeze)  # local_daemons
    for run in (r for client_runs in runs.values() for r in client_runs):
        if run.delivered != messages + 2:
            raise RuntimeError(f"the {run.client} client delivered {run.delivered} of {messages + 2} custom messages")
    return runs
