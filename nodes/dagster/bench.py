"""The Dagster end-to-end workload of ``dpipes-bench pipes``: one asset, two Pipes clients, one run.

The same external program (an unmodified ``dagster_pipes`` program) sends a start marker carrying
its send time, N logs and N custom messages as fast as it can, then an end marker. An asset runs
it, materialized in-process by Dagster (``dagster.materialize``, an ephemeral instance), once with
Dagster's own ``PipesSubprocessClient`` (its default temp-file context and message reader) and
once with :class:`~dpipes.nodes.dagster.client.DpipesPipesClient` (the program as a one-stage
pipeline on a node). For each run:

* ``wall_s``: the whole ``materialize`` call, Dagster's start-up of the run included;
* ``rate``: 2N / (the time the client's ``run`` returned - the start marker's send time):
  messages handed to Dagster per second, from the first send to the end of the invocation
  (the program's exit and the session's close included, as a user waits for them);
* ``delivered``: the custom messages Dagster received (N + 2 when nothing was lost).

Both receive in this process, whose heap then holds all of dagster; the caller may ``gc.freeze()``
after a warm-up, as ``dpipes-bench pipes`` does, so that full collections land in neither figure.
"""

# No `from __future__ import annotations`: Dagster reads the asset's annotations as objects.
import contextlib
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import dagster as dg

from dpipes.nodes.dagster.client import DpipesPipesClient

__all__ = ["BURST_MESSAGES", "CLIENTS", "AssetBurst", "asset_burst", "asset_bursts"]

BURST_MESSAGES: Final = 10_000  # of each kind, log and custom: the figure of issue 13
CLIENTS: Final = ("subprocess", "dpipes")  # the baseline first

EMITTER: Final = """\
import sys, time
from dagster_pipes import open_dagster_pipes

n = int(sys.argv[1])
with open_dagster_pipes() as pipes:
    pipes.report_custom_message({"start": time.time()})
    for i in range(n):
        pipes.log.info(f"log {i}")
        pipes.report_custom_message(i)
    pipes.report_custom_message({"end": time.time()})
"""


@dataclass(frozen=True)
class AssetBurst:
    """One materialization of the burst asset."""

    client: str  # "subprocess" (Dagster's PipesSubprocessClient) or "dpipes"
    messages: int  # N: logs, and as many custom messages
    wall_s: float
    rate: float  # msg/s, see the module docstring
    delivered: int  # custom messages Dagster received, markers included (N + 2 when none was lost)


def asset_burst(
    client: str,
    *,
    messages: int = BURST_MESSAGES,
    node: str | None = None,
    insecure: bool = False,
    emitter: str | os.PathLike[str],
) -> AssetBurst:
    """Materialize the burst asset once through ``client`` (one of :data:`CLIENTS`).

    Args:
        client: ``"subprocess"`` or ``"dpipes"``.
        messages: N, logs and as many custom messages.
        node: the dpipes entry node (``HOST:PORT`` or an endpoint); None: the client's default.
        insecure: ``node`` is an ``--insecure`` daemon reached over TCP (no keys).
        emitter: the program's file (:data:`EMITTER`, written by :func:`asset_bursts`).

    Raises:
        RuntimeError: the run failed, or a marker did not arrive.
    """
    argv = [sys.executable, os.fspath(emitter), str(messages)]
    seen: dict[str, Any] = {}

    def run_subprocess(context: dg.AssetExecutionContext) -> dg.PipesClientCompletedInvocation:
        return dg.PipesSubprocessClient().run(context=context, command=argv)

    def run_dpipes(context: dg.AssetExecutionContext) -> dg.PipesClientCompletedInvocation:
        return DpipesPipesClient(node=node, insecure=insecure).run(context=context, command=shlex.join(argv))

    runs: dict[str, Callable[[dg.AssetExecutionContext], dg.PipesClientCompletedInvocation]] = {
        "subprocess": run_subprocess,
        "dpipes": run_dpipes,
    }
    if client not in runs:
        raise ValueError(f"client {client!r}: use one of {', '.join(CLIENTS)}")

    @dg.asset(name="pipes_burst")
    def burst(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        invocation = runs[client](context)
        seen["returned"] = time.time()
        seen["custom"] = invocation.get_custom_messages()
        return invocation.get_materialize_result()

    start = time.perf_counter()
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null):
        result = dg.materialize([burst], instance=dg.DagsterInstance.ephemeral(), raise_on_error=False)
    wall = time.perf_counter() - start
    if not result.success:
        raise RuntimeError(f"the burst asset failed through the {client} client")
    custom = list(seen.get("custom", ()))
    sent = next((float(c["start"]) for c in custom if isinstance(c, dict) and "start" in c), None)
    if sent is None or not any(isinstance(c, dict) and "end" in c for c in custom):
        raise RuntimeError(f"the burst's start or end marker did not reach Dagster through the {client} client")
    return AssetBurst(client, messages, wall, 2 * messages / (seen["returned"] - sent), len(custom))


def asset_bursts(
    *,
    messages: int = BURST_MESSAGES,
    repeat: int = 3,
    node: str | None = None,
    insecure: bool = False,
    warm: bool = True,
    warm_up: Callable[[], None] = lambda: None,
) -> dict[str, list[AssetBurst]]:
    """Both clients, alternately, ``repeat`` times each, after one small warm-up run of each.

    Args:
        messages: N of each run.
        repeat: measured runs per client.
        node: the dpipes entry node; None: the client's default (``$DPIPES_NODE``, the local
            daemon, else a node embedded in this process).
        insecure: ``node`` is an ``--insecure`` daemon reached over TCP (no keys).
        warm: make the warm-up runs (a test leaves them out).
        warm_up: called after the warm-up runs (``gc.freeze`` there keeps dagster's long-lived
            objects out of the measured runs' collections).

    Returns:
        The runs of each client, by client name.
    """
    with tempfile.TemporaryDirectory(prefix="dpipes-bench-dagster-") as tmp:
        emitter = Path(tmp) / "emit.py"
        emitter.write_text(EMITTER)
        for client in CLIENTS if warm else ():  # imports, page cache, dagster's first-run costs
            asset_burst(client, messages=10, node=node, insecure=insecure, emitter=emitter)
        warm_up()
        runs: dict[str, list[AssetBurst]] = {client: [] for client in CLIENTS}
        for _ in range(repeat):
            for client in CLIENTS:
                run = asset_burst(client, messages=messages, node=node, insecure=insecure, emitter=emitter)
                runs[client].append(run)
    return runs
