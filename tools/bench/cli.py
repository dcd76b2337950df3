"""dpipes-bench: measure dpipes against its baselines, in one run, on this machine.

Imports only the chosen suite, and only when it runs: ``--help`` needs neither pyarrow nor dagster.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from dpipes.tools.bench.result import Result, SuiteUnavailable, format_table

EPILOG = """\
suites:
  bus     (a) 1 MiB messages hub A -> hub B over TCP loopback, against raw pyzmq DEALER->ROUTER
          (b) 64-byte messages on the same path, against the same raw pyzmq pair
          (c) Arrow record batches between two processes (one ~1M x 8 batch; a stream of
              10k-row batches), against pyarrow.flight do_get over loopback
          (d) 64-byte round trip p50/p99, REQUEST/REPLY between two hubs, against a raw pyzmq echo
          --tap: instead, (a) and (b) with a tap reader (dpipes-tap's reading and decoding, in
          its own process) subscribed to the sending hub, against the same without one; and the
          events the reader got against those the hub published (the tap is lossy by design)
  curve   the bus with CurveZMQ keys against the same bus without, in one run: 1 MiB throughput
          and 64-byte rate hub A -> hub B over TCP loopback, a client's attach time, and a
          two-node pipeline's run time ('true | true@B', two real nodes with keys and without)
  pipe    1 GiB of `cat FILE | cat` with the stages on two local daemons, output to /dev/null,
          against sh -c 'cat FILE | cat > /dev/null', in MB/s and in CPU s/GB of every process;
          and the wall time of `dpipes 'echo x | cat'` with a running daemon, against
          sh -c 'echo x | cat', and its client's CPU time against python -c pass
  discovery  N daemons (--nodes, default 8) in network namespaces on one bridge: time from
          starting them to every node linked to every other, the CPU seconds one daemon
          spends from exec to ready and to the full mesh, and the CPU the rest of the machine
          used meanwhile (on a shared machine, converge is that load too) (root only)
  pipes   10k log + 10k custom Dagster Pipes messages from an external Python process, end to end
          to the client (rate), and 1000 paced messages (latency p50/p99), against Dagster's own
          path; also the same program with dpipes' bus message writer under open_pipes_session
          (pipes.bus_writer_*), and as a Dagster asset materialized with DpipesPipesClient against
          PipesSubprocessClient (pipes.dagster_asset_*) (needs dagster: pip install dagster, or
          pip install -e '.[bench]' in a dpipes checkout)
  faults  the fault matrix: real daemons on loopback, one fault each (kill -9 of each node of a
          3-node pipeline, a stage killed, a slow consumer, a sender ignoring credit, a gossip
          flood, a forged HELLO, a duplicate name, --runs N of each outcome kind and all of
          them against one baseline; as root, a link cut (veth down) and restored, and a short
          one, between daemons in network namespaces, rows marked skip otherwise); for each,
          what the client reports, its exit status, bytes delivered/sent, how soon a lost node
          was named, and whether the daemons' fds, threads, children and RSS came back (exit 1
          if any row is not ok)
  plugins plugin stages: an Arrow IPC stream through `cat FILE | %pass@b | cat` across two
          daemons, against pyarrow.flight do_put + do_get; `cat FILE | %sink` on one daemon,
          against a Unix pipe into a second Python process reading the IPC stream; 10k batches
          of 100 rows through a pass-through plugin (batches/s), against the same over a pipe
  peers   dpipes beside the peers a user would pick instead, two processes on loopback:
          Zenoh (1 MiB with shared memory off and on, 64 B rate and CPU per message, 64 B round
          trip) and dora-rs via `dora run` (one 64 MB Arrow batch, 100 x 10k-row batches, with its
          default and a large shared-memory pool, dpipes beside the large one with the same
          shm_reserve made at attach); each row shows arrived/sent for both sides
          (needs eclipse-zenoh, dora-rs, dora-rs-cli: pip install -e '.[peers]' in a checkout)

Every figure is the median of --repeat runs, beside its baseline measured in the same run;
ratio = dpipes / baseline (higher is better). The machine is shared and noisy: compare ratios
from one run, not figures across runs.

examples:
  dpipes-bench bus                 a table
  dpipes-bench bus --json          one JSON object per line: name, value, unit, baseline_value, ratio
  dpipes-bench bus --quick         smaller sizes, for a smoke test
  dpipes-bench bus --tap           what a tap reader attached to the bus costs it

exit status: 0 ok; 2 the suite cannot run here (it says what it needs); 130 interrupted.
"""


def _suite(name: str) -> Callable[..., list[Result]]:
    if name == "bus":
        from dpipes.tools.bench.bus import bus_benchmarks

        return bus_benchmarks
    if name == "pipe":
        from dpipes.tools.bench.pipe import pipe_benchmarks

        return pipe_benchmarks
    if name == "discovery":
        from dpipes.tools.bench.discovery import discovery_benchmarks

        return discovery_benchmarks
    if name == "pipes":
        from dpipes.tools.bench.pipes import pipes_benchmarks

        return pipes_benchmarks
    if name == "curve":
        from dpipes.tools.bench.curve import curve_benchmarks

        return curve_benchmarks
    if name == "faults":
        from dpipes.tools.bench.faults import fault_matrix

        return fault_matrix  # type: ignore[return-value]  # rows of its own, printed by main
    if name == "plugins":
        from dpipes.tools.bench.plugins import plugins_benchmarks

        return plugins_benchmarks
    if name == "peers":
        from dpipes.tools.bench.peers import peers_benchmarks

        return peers_benchmarks
    raise AssertionError(name)


def _compile_sources() -> None:
    """Byte-compile the dpipes packages where they are imported from, as ``pip install`` does.

    A checkout installed with ``pip install -e`` and run under ``PYTHONDONTWRITEBYTECODE`` never
    writes ``__pycache__``: every daemon, client and worker a suite starts would compile each
    module it imports from source (half the CPU of a daemon's start), which an installed node never does.
    """
    import compileall

    import dpipes.bus
    import dpipes.discovery
    import dpipes.nodes
    import dpipes.tools

    for package in (dpipes.bus, dpipes.discovery, dpipes.nodes, dpipes.tools):
        for directory in package.__path__:
            compileall.compile_dir(directory, quiet=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dpipes-bench",
        description="Measure dpipes against its baselines (raw pyzmq, pyarrow.flight, ...) in one run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "suite",
        choices=["bus", "curve", "pipe", "pipes", "plugins", "peers", "discovery", "faults"],
        help="what to measure",
    )
    parser.add_argument(
        "--runs", type=int, default=None, metavar="N", help="faults: runs of each outcome kind (default 300)"
    )
    parser.add_argument(
        "--nodes", type=int, default=8, metavar="N", help="discovery: daemons on the LAN (default 8; root only)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per result line")
    parser.add_argument("--repeat", type=int, default=5, metavar="N", help="runs per figure (default 5)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke test, not a measurement")
    parser.add_argument(
        "--tap", action="store_true", help="bus: (a) and (b) with a dpipes-tap reader attached, against without"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    def progress(mark: str) -> None:
        if not args.json:
            print(mark, end="", file=sys.stderr, flush=True)

    _compile_sources()
    if args.suite == "faults":
        return _faults(args.quick, args.runs, args.json, progress)
    try:
        suite = _suite(args.suite)
        if args.tap and args.suite != "bus":
            parser.error("--tap applies to the bus suite only")
        if args.suite == "bus":
            results = suite(repeat=args.repeat, quick=args.quick, progress=progress, tap=args.tap)
        elif args.suite == "discovery":
            results = suite(repeat=args.repeat, quick=args.quick, progress=progress, nodes=args.nodes)
        else:
            results = suite(repeat=args.repeat, quick=args.quick, progress=progress)
    except SuiteUnavailable as e:
        if not args.json:
            print(file=sys.stderr)  # end the line of progress marks, if any
        print(f"dpipes-bench {args.suite}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpipes-bench: interrupted", file=sys.stderr)
        return 130
    if args.json:
        for r in results:
            print(json.dumps(r.as_json()), flush=True)
    else:
        print(file=sys.stderr)
        print(format_table(results))
    return 0


def _faults(quick: bool, runs: int | None, as_json: bool, progress: Callable[[str], None]) -> int:
    from dpipes.tools.bench.faults import fault_matrix, format_matrix

    try:
        rows = fault_matrix(quick=quick, runs=runs, progress=progress)
    except KeyboardInterrupt:
        print("dpipes-bench: interrupted", file=sys.stderr)
        return 130
    if as_json:
        for row in rows:
            print(json.dumps(row.as_json()), flush=True)
    else:
        print(file=sys.stderr)
        print(format_matrix(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
