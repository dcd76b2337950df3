"""dpipes-tap: see the whole bus live, record it, replay it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

USAGE_EPILOG = """\
verbs:
  nodes                     the nodes the entry node knows, their taps and programs
  list [-v]                 pipelines, their stages and edges with rates and credit, every second
  echo [WHAT...]            decoded traffic (WHAT: NODE/ENDPOINT, NODE/, a pipeline id, PIPELINE.N, a kind)
  pipes                     Pipes messages of every stage (--pipeline ID --stage N --level L)
  hz WHAT... / bw WHAT...   message rate / bandwidth over a window (--window N)
  record FILE               record to Arrow IPC (FILE.arrow) or Parquet (FILE.parquet); Ctrl-C stops
  replay FILE               print a recording with its timing (--rate X; 0: at once); --to NODE:
                            play it onto that node's bus, for `dpipes-tap --node NODE top` (events
                            marked replay); --to ENDPOINT (or --publish): serve it as a tap there,
                            for `dpipes-tap --endpoint ENDPOINT top`
  info FILE                 what a recording holds
  top                       a live full-screen view (plain lines when stdout is not a terminal)

The tap is lossy by design: what it missed is counted and shown ("dropped N events").
Exit status: 0; 1 when no tap could be read or a file could not; 2 for a wrong command line.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpipes-tap",
        description="Watch the dpipes bus: decode, measure, record and replay what the hubs route.",
        epilog=USAGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    def common(p: argparse.ArgumentParser, default: Any) -> None:
        # Accepted before the verb and after it: `dpipes-tap --all echo` and `dpipes-tap echo --all`.
        def d(value: Any) -> Any:
            return value if default is None else default

        p.add_argument(
            "--node", default=d(None), help="the node to tap: NAME, [NAME@]HOST:PORT (with keys) or a tap endpoint"
        )
        p.add_argument(
            "--insecure", action="store_true", default=d(False), help="--node HOST:PORT is an --insecure node: no keys"
        )
        p.add_argument("--all", action="store_true", default=d(False), help="tap every node the entry node knows")
        p.add_argument("--endpoint", default=d(None), metavar="TAP", help="read this tap endpoint (ipc:// or tcp://)")
        p.add_argument("--sample", type=int, default=d(None), metavar="BYTES", help="payload sample size to ask for")
        p.add_argument("--json", action="store_true", default=d(False), help="one JSON object per line")
        p.add_argument("-v", "--verbose", action="store_true", default=d(False), help="more detail")

    common(parser, None)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    parent = argparse.ArgumentParser(add_help=False)
    common(parent, argparse.SUPPRESS)

    def selective(p: argparse.ArgumentParser) -> None:
        p.add_argument("--filter", metavar="EXPR", help="a condition: kind == 'BYTES' and size > 1000")

    sub.add_parser("nodes", parents=[parent], help="nodes, their taps and programs")
    sub.add_parser("list", parents=[parent], help="pipelines, stages, edges")
    echo = sub.add_parser("echo", parents=[parent], help="decoded traffic")
    echo.add_argument("what", nargs="*", metavar="WHAT")
    echo.add_argument("--once", action="store_true", help="one event, then exit")
    echo.add_argument("--count", type=int, metavar="N", help="N events, then exit")
    echo.add_argument("--field", action="append", default=[], metavar="PATH", help="print this field (repeatable)")
    echo.add_argument("--raw", action="store_true", help="the events as the hub sent them")
    selective(echo)
    pipes = sub.add_parser("pipes", parents=[parent], help="Pipes messages")
    pipes.add_argument("--pipeline", metavar="ID")
    pipes.add_argument("--stage", type=int, metavar="N")
    pipes.add_argument("--level", choices=("debug", "info", "warning", "error", "critical"), help="logs at least this")
    pipes.add_argument("--count", type=int, metavar="N", help="N messages, then exit")
    for verb in ("hz", "bw"):
        rate = sub.add_parser(verb, parents=[parent], help="rate" if verb == "hz" else "bandwidth")
        rate.add_argument("what", nargs="+", metavar="WHAT")
        rate.add_argument("--window", type=int, default=10_000, metavar="N", help="messages per window")
        rate.add_argument("--reports", type=int, metavar="N", help="N reports, then exit")
        selective(rate)
    rec = sub.add_parser("record", parents=[parent], help="record to a file")
    rec.add_argument("file", type=Path)
    rec.add_argument("what", nargs="*", metavar="WHAT")
    rec.add_argument("--count", type=int, metavar="N", help="N events, then stop")
    selective(rec)
    replay = sub.add_parser("replay", parents=[parent], help="play a recording back")
    replay.add_argument("file", type=Path)
    replay.add_argument("what", nargs="*", metavar="WHAT")
    replay.add_argument("--rate", type=float, default=1.0, help="speed factor (0: as fast as possible)")
    replay.add_argument("--field", action="append", default=[], metavar="PATH")
    replay.add_argument("--raw", action="store_true")
    replay.add_argument(
        "--to",
        metavar="NODE",
        help="play it onto NODE's bus (NAME or HOST:PORT), read by its taps; an ipc:// or tcp:// ENDPOINT:"
        " serve it as a tap there, for --endpoint readers",
    )
    replay.add_argument("--publish", dest="to", metavar="ENDPOINT", help="the same as --to ENDPOINT")
    selective(replay)
    info = sub.add_parser("info", parents=[parent], help="summarize a recording")
    info.add_argument("file", type=Path)
    top = sub.add_parser("top", parents=[parent], help="live full-screen view")
    top.add_argument("--reports", type=int, metavar="N", help="(not a terminal) N reports, then exit")
    lst = sub.choices["list"]
    lst.add_argument("--reports", type=int, metavar="N", help="N reports, then exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from dpipes.nodes.tap.view import Filter

    try:
        args.filter = Filter(args.filter) if getattr(args, "filter", None) else None
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return asyncio.run(_main(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # a reader such as `head` has enough: as quiet as a Unix filter
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


async def _main(args: argparse.Namespace) -> int:
    from dpipes.bus.errors import DpipesError
    from dpipes.nodes.tap import verbs

    try:
        if args.verb == "info":
            for text in verbs.info_lines(args.file, as_json=args.json):
                print(text)
            return 0
        if args.verb == "nodes":
            for text in await verbs.nodes_lines(args.node, as_json=args.json, insecure=args.insecure):
                print(text)
            return 0
        if args.verb == "replay" and args.to and args.to.startswith(("ipc://", "tcp://")):
            return await _print(verbs.publish(args.file, args.to, rate=args.rate))
        if args.verb == "replay" and args.to:
            from dpipes.nodes.tap.source import resolve

            (target,) = await resolve(args.to)
            return await _print(verbs.replay_to(args.file, target, rate=args.rate))
        if args.verb == "replay":
            select = verbs.Selection(args.what, args.filter)
            return await _print(
                verbs.replay(args.file, select, rate=args.rate, fields=args.field, raw=args.raw, as_json=args.json)
            )
        return await _tap(args)
    except BrokenPipeError:
        raise
    except (DpipesError, ValueError, OSError) as exc:
        print(f"dpipes-tap: {exc}", file=sys.stderr)
        return 1


async def _tap(args: argparse.Namespace) -> int:
    from dpipes.bus.tap import DEFAULT_SAMPLE_BYTES
    from dpipes.nodes.tap import verbs
    from dpipes.nodes.tap.source import TapSource, resolve

    targets = await resolve(args.node, all=args.all, endpoint=args.endpoint, insecure=args.insecure)
    sample = args.sample if args.sample is not None else DEFAULT_SAMPLE_BYTES
    async with TapSource(targets, sample_bytes=sample) as source:
        gen: AsyncIterator[Any]
        if args.verb == "echo":
            count = 1 if args.once else args.count
            select = verbs.Selection(args.what, args.filter)
            gen = verbs.echo(source, select, fields=args.field, raw=args.raw, as_json=args.json, count=count)
        elif args.verb == "pipes":
            gen = verbs.pipes(
                source, pipeline=args.pipeline, stage=args.stage, level=args.level, as_json=args.json, count=args.count
            )
        elif args.verb in ("hz", "bw"):
            gen = verbs.rates(
                source,
                args.what,
                bandwidth=args.verb == "bw",
                window=args.window,
                select=args.filter,
                as_json=args.json,
                reports=args.reports,
            )
        elif args.verb == "list":
            gen = verbs.listing(source, verbose=args.verbose, as_json=args.json, reports=args.reports)
        elif args.verb == "record":
            gen = verbs.record(source, args.file, verbs.Selection(args.what, args.filter), count=args.count)
        elif args.verb == "top":
            if sys.stdout.isatty() and not args.json:
                from dpipes.nodes.tap.top import run_top

                await _until_signal(run_top(source))
                return 0
            gen = verbs.top_plain(source, as_json=args.json, reports=args.reports)
        else:
            raise AssertionError(args.verb)
        return await _print(gen)


async def _print(gen: AsyncIterator[Any]) -> int:
    """Print what a verb yields until it ends, or a signal (SIGINT, SIGTERM) stops it cleanly."""

    async def consume() -> None:
        async for out in gen:
            print(out.text, file=sys.stderr if out.notice else sys.stdout, flush=True)

    await _until_signal(consume())
    with contextlib.suppress(RuntimeError):
        await gen.aclose()  # type: ignore[attr-defined]  # a recording closes its file here
    return 0


async def _until_signal(work: Any) -> None:
    """Run ``work``; SIGINT or SIGTERM cancels it, so that its ``finally`` clauses run."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(work)
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


if __name__ == "__main__":
    sys.exit(main())
