"""dpipes-bench: measure dpipes against its baselines, in one run, on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from dpipes.bus.bench import Result

EPILOG = """\
suites:
  bus     (a) 1 MiB messages hub A -> hub B over TCP loopback, against raw pyzmq DEALER->ROUTER
          (b) 64-byte messages on the same path, against the same raw pyzmq pair
          (c) Arrow record batches between two processes (one ~1M x 8 batch; a stream of
              10k-row batches), against pyarrow.flight do_get over loopback
  pipe    1 GiB of `cat FILE | cat` with the stages on two local daemons, output to /dev/null,
          against sh -c 'cat FILE | cat > /dev/null'; and the wall time of
          `dpipes 'echo x | cat'` with a running daemon, against sh -c 'echo x | cat'
  discovery  N daemons (--nodes, default 8) in network namespaces on one bridge: time from
          starting them to every node linked to every other (root only)
  pipes   10k log + 10k custom Dagster Pipes messages from an external Python process, end to end
          to the client (rate), and 1000 paced messages (latency p50/p99), against Dagster's own
          path; also the same program with dpipes' bus message writer under open_pipes_session
          (pipes.bus_writer_*) (needs the optional `bench` extra: pip install 'dpipes-bus[bench]')

Every figure is the median of --repeat runs, beside its baseline measured in the same run;
ratio = dpipes / baseline (higher is better). The machine is shared and noisy: compare ratios
from one run, not figures across runs.

examples:
  dpipes-bench bus                 a table
  dpipes-bench bus --json          one JSON object per line: name, value, unit, baseline_value, ratio
  dpipes-bench bus --quick         smaller sizes, for a smoke test
"""


def _table(results: list[Result]) -> str:
    header = (
        f"{'benchmark':<26} {'dpipes':>12} {'min':>10} {'max':>10} {'baseline':>12} {'ratio':>7} {'target':>7}"
        "  unit / baseline"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        target = f"{r.target:.2f}x" if r.target is not None else ""
        flag = "" if r.target is None or r.ratio >= r.target else "  (below target)"
        lines.append(
            f"{r.name:<26} {r.value:>12.4g} {min(r.samples):>10.4g} {max(r.samples):>10.4g} "
            f"{r.baseline_value:>12.4g} {r.ratio:>6.2f}x {target:>7}  {r.unit} / {r.baseline}{flag}"
        )
    return "\n".join(lines)


def _suite(name: str) -> Callable[..., list[Result]]:
    if name == "bus":
        from dpipes.bus.bench import bus_benchmarks

        return bus_benchmarks
    if name == "pipe":
        from dpipes.nodes.bench import pipe_benchmarks

        return pipe_benchmarks
    if name == "discovery":
        from dpipes.discovery.bench import discovery_benchmarks

        return discovery_benchmarks
    if name == "pipes":
        from dpipes.nodes.pipes_bench import pipes_benchmarks

        return pipes_benchmarks
    raise AssertionError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dpipes-bench",
        description="Measure dpipes against its baselines (raw pyzmq, pyarrow.flight, ...) in one run.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("suite", choices=["bus", "pipe", "pipes", "discovery"], help="what to measure")
    parser.add_argument(
        "--nodes", type=int, default=8, metavar="N", help="discovery: daemons on the LAN (default 8; root only)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per result line")
    parser.add_argument("--repeat", type=int, default=5, metavar="N", help="runs per figure (default 5)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: a smoke test, not a measurement")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    def progress(mark: str) -> None:
        if not args.json:
            print(mark, end="", file=sys.stderr, flush=True)

    try:
        suite = _suite(args.suite)
        if args.suite == "discovery":
            results = suite(repeat=args.repeat, quick=args.quick, progress=progress, nodes=args.nodes)
        else:
            results = suite(repeat=args.repeat, quick=args.quick, progress=progress)
    except KeyboardInterrupt:
        print("dpipes-bench: interrupted", file=sys.stderr)
        return 130
    if args.json:
        for r in results:
            print(json.dumps(r.as_json()), flush=True)
    else:
        print(file=sys.stderr)
        print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
