"""dpipes: run a pipeline of ordinary programs across the nodes of a LAN."""

from __future__ import annotations

import gc
import os
import sys
from types import SimpleNamespace

from dpipes.bus import logs
from dpipes.bus.errors import DpipesError

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
    import argparse
    from typing import Any, NoReturn

EXIT_USAGE = 2  # a bad command line, as argparse answers
EXIT_FAILED = 125  # dpipes itself failed (the code of env(1) and docker for "the tool, not the program")

DESCRIPTION = """\
Run each stage of PIPELINE as an ordinary program on a dpipes node and stream stdin/stdout
between them across the network, like a Unix shell pipeline spread over a LAN.
"""

EPILOG = """\
pipeline syntax:
  '|' separates stages, numbered from 0 (errors, --status, --tag and N: options say "stage 0"
  for the first). Quote the whole pipeline as one argument; inside it, quoting is as in sh
  ('a|b' is one word). PROG@NODE pins a stage to NODE; an unpinned stage goes to a node that
  offers PROG (dp.PROG), else to the entry node. A node started as 'dpipesd -- sort -r' offers
  'sort -r': it gets unpinned stages that start with those words, never a plain 'sort'.
  -v and --status say where each stage went and why (pinned, offered by NODE, local).
  No shell runs unless you write one: use sh -c '...' for redirections, globs and variables.

the entry node (which coordinates the run):
  --node HOST:PORT, else $DPIPES_NODE, else this host's running dpipesd, else an embedded node
  started inside this command for its duration (so dpipes works with nothing else running).
  A --node that cannot be reached fails at once, saying why (cannot resolve, connection refused,
  no reply); a local dpipesd that crashed is named on stderr before the embedded node runs.
  A plain bytes-mode run on this host's dpipesd takes a short path that starts faster (no
  asyncio); DPIPES_SHORT_PATH=0 in the environment takes the full one (same results).
  A last stage on another node is read from that node directly (either path; the entry node's
  path when that node cannot be reached); DPIPES_DIRECT_READ=0 reads it through the entry node.

keys (a node over TCP, as ssh does it):
  Over TCP dpipes speaks CurveZMQ: encrypted, and both ends authenticated. It uses your client
  key (created on first use, in the key directory: see dpipes keys --help) and expects the node's
  key pinned in known_nodes under the node's name. --node NAME@HOST:PORT names the node
  (beta@10.0.0.2:5757); --node HOST:PORT works when HOST is itself the node's name (beta:5757,
  or beta.lan:5757 for node beta), and otherwise expects one of your own daemons (they share your
  node key). First contact, once per node:
      dpipes keys pin beta 'KEY'    KEY as beta's dpipesd printed it when it started
  and the node's owner admits your key (dpipes keys prints the command to give them).
  A node whose key is not the pinned one is refused, naming both fingerprints; nothing is sent.
  --insecure attaches without keys, to a node started with --insecure (nothing is encrypted).
  Over ipc (this host's dpipesd) no key is used: the node checks your uid.

working directory:
  A stage on this host starts in this command's working directory, as in a shell (when the
  entry node is this host's dpipesd or an embedded node); a stage on another host starts in its
  node's workdir (config; default: the home directory of the node's user, as ssh does).
  --cwd DIR starts every stage in DIR; a relative DIR is taken from each stage's place above.

data:
  This command's stdin feeds the first stage when it is not a terminal; the last stage's stdout
  is written to stdout as it arrives; every stage's stderr reaches stderr (--tag prefixes it).
  Neighbouring stages on one node share a kernel pipe, as in a shell, and a first (last) stage on
  the entry node of this host reads (writes) this command's stdin (stdout) itself; in bytes mode.
  Data between nodes travels on the bus.
  --json / --yaml: programs read and write newline-delimited JSON objects or YAML documents;
  each object a program reads carries a "__dpipes" map saying where it came from.

exit status:
  the last stage's status (exit code, or 128+signal); with --pipefail the last non-zero one,
  leaving out stages stopped by SIGPIPE because a later stage finished early (| head).
  125  dpipes itself failed: no node reachable, a stage refused before anything started,
       a node lost mid-run
  130  interrupted (Ctrl-C cancels every stage on every node)
  2    bad command line: unknown flags, a pipeline syntax error (named by stage and column,
       found before any node is contacted), a malformed --node or $DPIPES_NODE

progress:
  On a terminal (stderr), a run that lasts more than a second shows a live table on stderr: per
  stage its node, the bytes its node has written to its stdin and read from its stdout, the
  output rate, its state and how long it has run, and the run's elapsed time; it is removed when
  the run ends. An edge that is one kernel pipe passes by every node and shows '·'. --progress
  shows it on whatever stderr is; --no-progress never does.

joblog:
  --joblog FILE writes, when the run ends, a header and one tab-separated line per stage with
  GNU parallel's joblog columns (Stage and Node stand for its Seq and Host):
    Stage Node Starttime JobRuntime Send Receive Exitval Signal Command
  Stage counts from 0; Starttime is Unix seconds (the node's clock) and JobRuntime seconds, both
  with milliseconds; Send and Receive are bytes the stage's node wrote to its stdin and read from
  its stdout, '-' for an edge that is a kernel pipe (no node sees those bytes); Exitval is the
  exit code (-1 when killed by a signal, then named by number in Signal; '-' when the stage never
  reported, as on a lost node); Command is the stage's words, shell-quoted.

pipes:
  Every stage gets DAGSTER_PIPES_CONTEXT and DAGSTER_PIPES_MESSAGES; a program using dagster-pipes
  (or any language writing its JSON lines) reports logs, materializations and checks as it runs.
  Logs appear on stderr at once, tagged with the stage; a summary of materializations and checks
  follows at the end. A stage whose Pipes session closes with an exception fails the run (exit
  1 if nothing else failed). A stage that never opens Pipes is an ordinary program.
  --pipes-json FILE records, per stage, the context it got, then every message as received.

plugins:
  A stage whose first word is %NAME runs the plugin NAME (a Python class over Arrow tables,
  installed on a node under the entry point group dpipes.plugins) in a worker process on the node
  placement chooses (%NAME@NODE pins it); its other words are its configuration, KEY=VALUE each:
    dpipes 'cat sales.csv | %filter@beta expr="amount > 100" | %summarize by=region'
  Between two plugins, Arrow record batches travel as they are. Between a program and a plugin
  the bytes are CSV (a header line, then rows); --arrow makes them an Arrow IPC stream, and in
  --json mode the plugin takes and gives the objects. dpipes --nodes lists each node's plugins
  as %NAME. A failed plugin (an exception, a callback over the node's [limits]
  plugin_callback_s, a CSV that does not parse) is named with its stage, node and plugin.
  --workflow FILE runs a graph instead of a line: stages (program or plugin, node, config) and
  connections from STAGE.ANCHOR to STAGE.ANCHOR, in YAML (or TOML for *.toml); a splitter's
  True and False outputs may go to different stages, a join takes two inputs. See the README.
  dpipes plugin new NAME writes a plugin package (a Python class over Arrow tables, its entry
  point, a test with the harness); dpipes plugin list lists the installed ones.

keys:
  dpipes keys [show|list|trust|untrust|pin] shows your key's fingerprint and manages whom your
  node trusts; see dpipes keys --help.

examples:
  dpipes 'seq 10 | sort -r'
  dpipes --nodes                  every node known: where it listens, what it offers, learned from
  dpipes --nodes --json           the same, one JSON object per node (--yaml: one YAML document)
  dpipes 'cat /data/input.txt | sort@beta | uniq -c'
  dpipes --status --pipefail 'producer | consumer@gamma'
  dpipes --require 'sort>=9' 'cat big.txt | sort@beta'
  printf '{"a":1}\\n' | dpipes --json 'cat | jq -c .'
  dpipes 'cat sales.csv | %filter@beta expr="amount > 100" | %summarize by=region agg=amount:sum'
  dpipes --workflow split.yaml
  dpipes --asset 1:orders --extra 1:limit=10 --pipes-json run.jsonl 'cat orders.csv | python3@beta load.py'
"""


def _parser() -> argparse.ArgumentParser:
    import argparse

    from dpipes.tools.completion import SHELLS
    from dpipes.tools.version import VersionAction

    parser = argparse.ArgumentParser(
        prog="dpipes", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipeline", nargs="?", help="the pipeline, one quoted argument: 'PROG ARGS | PROG@NODE ARGS'")
    parser.add_argument(
        "--nodes", action="store_true", help="list the nodes the entry node knows (where learned, last seen) and exit"
    )
    parser.add_argument(
        "--node", metavar="[NAME@]HOST:PORT", help="the entry node (default: $DPIPES_NODE, local, embedded); see keys"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="attach to a --node started with --insecure: no keys, nothing encrypted"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--json", action="store_const", const="json", dest="mode", help="JSON-lines object mode")
    mode.add_argument("--yaml", action="store_const", const="yaml", dest="mode", help="YAML documents object mode")
    parser.add_argument(
        "--workflow", metavar="FILE", help="run the workflow FILE (YAML, or TOML for *.toml) instead of a pipeline"
    )
    edges = parser.add_mutually_exclusive_group()
    edges.add_argument(
        "--arrow",
        action="store_const",
        const="arrow",
        dest="edge_format",
        help="programs next to a plugin read and write Arrow IPC streams (default: CSV)",
    )
    edges.add_argument(
        "--edge-format",
        choices=("csv", "ndjson", "arrow"),
        dest="edge_format",
        help="what a program's bytes are at an edge with a plugin (default csv)",
    )
    parser.add_argument("--pipefail", action="store_true", help="exit with the last non-zero stage status")
    parser.add_argument(
        "--status",
        action="store_true",
        help="print every stage's node, why it went there (pinned, offered by, local) and exit status at the end",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show each stage's bytes in/out, rate, state and time, live on stderr"
        " (default: on when stderr is a terminal)",
    )
    parser.add_argument(
        "--joblog",
        metavar="FILE",
        help="write a record of every stage to FILE when the run ends (GNU parallel's joblog: see below)",
    )
    parser.add_argument(
        "--tag", action="store_true", help="prefix each line the stages write to stderr with [stage N prog@node]"
    )
    parser.add_argument(
        "--cwd",
        metavar="DIR",
        default="",
        help="start every stage in DIR (default: this directory for stages on this host, the node's"
        " workdir, its user's home, elsewhere; a relative DIR is taken from there)",
    )
    parser.add_argument(
        "--require", action="append", default=[], metavar="'PROG>=VER'", help="refuse to run unless PROG's version fits"
    )
    pipes = parser.add_argument_group(
        "Dagster Pipes (every stage may speak it; see 'pipes' below)",
        "Each of these applies to every stage, or with an N: prefix to stage N only (0-based).",
    )
    pipes.add_argument(
        "--extra", action="append", default=[], metavar="[N:]KEY=JSON", help="an extra in the stages' context"
    )
    pipes.add_argument("--asset", action="append", default=[], metavar="[N:]KEY", help="an asset key of the context")
    pipes.add_argument("--partition", action="append", default=[], metavar="[N:]KEY", help="the partition key")
    pipes.add_argument(
        "--pipes-context",
        action="append",
        default=[],
        metavar="[N:]{env,file}",
        help="how the context reaches a stage: inline in the environment (env, the default) or a file",
    )
    pipes.add_argument(
        "--pipes-messages",
        action="append",
        default=[],
        metavar="[N:]{file,stderr,stdout}",
        help="the channel a stage writes messages to: a FIFO read as written (file, the default), or"
        " message lines taken out of its stderr or stdout (the rest of the stream flows on)",
    )
    pipes.add_argument(
        "--pipes-stdio",
        action="store_true",
        help="every stage's stderr, and the last stage's stdout, also as Pipes log_external_stream messages",
    )
    pipes.add_argument(
        "--pipes-json", metavar="FILE", help="write each stage's context, then every message, as JSON lines"
    )
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument(
        "--completion", metavar="SHELL", choices=SHELLS, help="print a bash or zsh completion script and exit"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log what dpipes does (twice: debug)")
    return parser


PLAIN_SWITCHES = {"--insecure": "insecure", "--pipefail": "pipefail", "--status": "status"}
"""The switches :func:`_plain_args` reads itself; any other flag goes to argparse."""

PLAIN_DEFAULTS: dict[str, Any] = {
    "pipeline": None,
    "nodes": False,
    "node": None,
    "insecure": False,
    "mode": None,
    "workflow": None,
    "edge_format": None,
    "pipefail": False,
    "status": False,
    "progress": None,
    "joblog": None,
    "tag": False,
    "cwd": "",
    "require": [],
    "extra": [],
    "asset": [],
    "partition": [],
    "pipes_context": [],
    "pipes_messages": [],
    "pipes_stdio": False,
    "pipes_json": None,
    "completion": None,
    "verbose": 0,
}
"""What :func:`_parser` gives for a command line with no flags (tests hold the two equal)."""


def _plain_args(argv: list[str]) -> SimpleNamespace | None:
    """The arguments of the everyday command line, ``dpipes [--insecure] [--pipefail] [--status]
    'PIPELINE'``, as :func:`_parser` would parse them; None for any other (argparse then reads it,
    and answers its errors and --help).

    Building the parser (and importing argparse, gettext and shutil for it) cost a short run more
    than its own work on the client did.
    """
    words = [word for word in argv if word not in PLAIN_SWITCHES]
    if len(words) != 1 or words[0].startswith("-") or not words[0].strip():
        return None
    args = SimpleNamespace(
        **{key: list(value) if isinstance(value, list) else value for key, value in PLAIN_DEFAULTS.items()}
    )
    args.pipeline = words[0]
    for word in argv:
        if word in PLAIN_SWITCHES:
            setattr(args, PLAIN_SWITCHES[word], True)
    return args


def _usage_error(parser: argparse.ArgumentParser | None, message: str) -> NoReturn:
    """Exit 2 with argparse's usage and ``message``, from ``parser`` or, when :func:`_plain_args`
    read the command line, from the parser made now."""
    (parser or _parser()).error(message)


def _pipes_options(args: argparse.Namespace, given: argparse.ArgumentParser | None, count: int) -> dict[str, Any]:
    """The Pipes flags -> the run's ``pipes`` map; a malformed one exits 2 with ``given``'s usage
    (None: :func:`_plain_args` read the command line, which has no Pipes flags)."""
    from dpipes.nodes.pipes_options import PipesFlagError, from_flags

    try:
        return from_flags(args, count)
    except PipesFlagError as exc:
        _usage_error(given, str(exc))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plugin"]:  # a subcommand; a program named plugin runs as dpipes 'plugin ARGS'
        from dpipes.tools.plugin import main as plugin_main

        return plugin_main(argv[1:])
    if argv[:1] == ["keys"]:  # a subcommand; a program named keys runs as dpipes 'keys ' or './keys'
        from dpipes.tools.keys import main as keys_main

        try:
            return keys_main(argv[1:])
        except SystemExit as e:  # argparse's usage errors (2) and --help (0)
            return e.code if isinstance(e.code, int) else EXIT_USAGE
    args: Any = _plain_args(argv)
    parser = None
    if args is None:
        parser = _parser()
        args, extra = parser.parse_known_args(argv)
        if args.completion:
            from dpipes.tools.completion import completion_script

            print(completion_script(parser, args.completion), end="")
            return 0
        if extra:
            import shlex

            # `dpipes seq 3`: the shell split an unquoted pipeline; its first word became the pipeline
            if args.pipeline and " " not in args.pipeline.strip() and any(not w.startswith("-") for w in extra):
                parser.error(
                    f"unrecognized arguments: {' '.join(extra)}; the pipeline is one argument: quote it, "
                    f"e.g. dpipes {shlex.quote(' '.join([args.pipeline, *extra]))}"
                )
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.entry = _entry_endpoint(args)
    except DpipesError as exc:
        print(f"dpipes: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.nodes:
        import asyncio

        try:
            return asyncio.run(_nodes(args))
        except DpipesError as exc:
            print(f"dpipes: {exc}", file=sys.stderr)
            return EXIT_FAILED
    logs.on_first_use(lambda: _set_up_logging(args.verbose))  # the short path may log nothing at all
    args.workflow_doc = {}
    if args.workflow:
        logs.set_up()
        if args.pipeline:
            _usage_error(parser, "give a pipeline or --workflow FILE, not both")
        try:
            args.workflow_doc, count = _workflow(args.workflow)
        except DpipesError as exc:
            print(f"dpipes: {exc}", file=sys.stderr)
            return EXIT_USAGE
        args.pipeline = f"workflow {args.workflow}"
    else:
        if not args.pipeline or not args.pipeline.strip():
            _usage_error(parser, "give a pipeline, e.g. dpipes 'seq 10 | sort -r'")
        try:
            code = _short_run(args, parser)
        except KeyboardInterrupt:  # before the run installed its own Ctrl-C handling
            return 130
        if code is not None:
            return code
        from dpipes.nodes.pipeline import PipelineSyntaxError, parse_pipeline

        try:  # the parser is pure: a malformed pipeline is refused here, before any node is contacted
            count = len(parse_pipeline(args.pipeline))
        except PipelineSyntaxError as exc:
            print(f"dpipes: {exc}", file=sys.stderr)
            return EXIT_USAGE
    logs.set_up()  # the full path's modules log through logging itself
    if args.mode is None:
        args.mode = "bytes"
    args.pipes = _pipes_options(args, parser, count)
    import asyncio

    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130
    except DpipesError as exc:
        print(f"dpipes: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _set_up_logging(verbose: int) -> None:
    import logging

    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="dpipes: %(levelname)s %(name)s: %(message)s")


def _workflow(path: str) -> tuple[dict[str, Any], int]:
    """The workflow document in ``path`` (as JSON values) and its number of stages, checked here
    before any node is contacted.

    Raises:
        DpipesError: the file cannot be read or parsed, or the workflow is malformed.
    """
    from dpipes.nodes.workflow import WorkflowError, load_workflow, parse_workflow

    try:
        doc = load_workflow(path)
    except OSError as exc:
        raise WorkflowError(f"workflow {path}: {exc.strerror or exc}") from None
    graph = parse_workflow(doc, stdin=False)
    return doc, len(graph.stages)


def _entry_endpoint(args: argparse.Namespace) -> str | None:
    """The endpoint of --node, else of $DPIPES_NODE, else None.

    Raises:
        EntryAddressError: the address is malformed (naming where it came from).
    """
    given, source = (args.node, "--node") if args.node else (os.environ.get("DPIPES_NODE"), "$DPIPES_NODE")
    if not given:
        return None  # the local daemon's socket: no address to check, nor its parser (and config) to import
    from dpipes.nodes.entry import EntryAddressError, parse_entry

    try:
        return parse_entry(given)
    except EntryAddressError as exc:
        raise EntryAddressError(f"{source} {given!r}: {exc}") from None


def _short_run(args: argparse.Namespace, parser: argparse.ArgumentParser | None) -> int | None:
    """A plain bytes run on this host's daemon, on the short path (:mod:`dpipes.nodes.local_run`):
    its exit code; None when the run needs the full path (or no daemon runs here).

    The node parses the pipeline: a syntax error comes back coded and reads as the one found here.
    ``DPIPES_SHORT_PATH=0`` in the environment takes the full path always (to compare the two).
    """
    if (
        os.environ.get("DPIPES_SHORT_PATH") == "0"
        or (args.entry and not args.entry.startswith("ipc://"))
        or args.mode not in (None, "bytes")
        or args.verbose
        or args.tag
        or args.pipes_json
        or args.extra
        or args.asset
        or args.partition
        or args.pipes_context
        or args.pipes_messages
        or args.pipes_stdio
        or (_stderr_is_terminal() if args.progress is None else args.progress)
    ):
        return None
    from dpipes.nodes.local_run import run_local
    from dpipes.nodes.results import RunFailed

    gc.freeze()  # what the imports made lives until exit: keep the collector's full passes short
    try:
        result = run_local(
            args.pipeline,
            stdin=_stdin_attached(),
            pipefail=args.pipefail,
            workdir=args.cwd,
            pipes=_pipes_options(args, parser, 0),  # no Pipes flags: the defaults, for every stage
            require=tuple(args.require),
            entry=args.entry,
            edge_format=args.edge_format or "csv",
            direct_read=os.environ.get("DPIPES_DIRECT_READ") != "0",  # 0: through the entry node (to compare)
        )
    except RunFailed as exc:
        print(f"dpipes: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.code == "syntax" else EXIT_FAILED
    if result is None:
        return None
    return _report(args, result)


async def _entry_and_run(args: argparse.Namespace, work: Any) -> Any:
    """Call ``work(entry, keys)`` with the entry node: --node, $DPIPES_NODE, the local daemon, or embedded
    (``keys`` for a --node over TCP, else None)."""
    import asyncio

    from dpipes.nodes import run

    if args.entry:
        from dpipes.nodes.entry import entry_keys, probe_entry

        await asyncio.to_thread(probe_entry, args.entry)  # fails at once, naming the cause
        keys = None
        if args.entry.startswith("tcp://") and not args.insecure:
            keys, created = await entry_keys(args.node or os.environ.get("DPIPES_NODE", ""), args.entry)
            if created:
                print(
                    f"dpipes: created your client key pair {keys.curve.keypair.fingerprint} in "
                    f"{keys.curve.keypair.path.parent}",
                    file=sys.stderr,
                )
        return await work(args.entry, keys)
    if (local := await run.local_daemon()) is not None:
        return await work(local, None)
    from dpipes.nodes.entry import abandoned_local_daemon

    if (why := abandoned_local_daemon()) is not None:
        print(f"dpipes: {why}; running this command on an embedded node instead", file=sys.stderr)
    async with run.embedded_node() as embedded:
        return await work(embedded.ipc_endpoint, None)


async def _nodes(args: argparse.Namespace) -> int:
    import json

    from dpipes.nodes import run

    nodes = await _entry_and_run(args, run.known_nodes)
    if args.mode == "json":
        for node in nodes:
            print(json.dumps(node.to_body()))
        return 0
    if args.mode == "yaml":
        import yaml

        print(yaml.safe_dump_all([n.to_body() for n in nodes], sort_keys=False), end="")
        return 0
    rows = [("NODE", "ENDPOINT", "PROGRAMS", "LEARNED FROM", "LAST SEEN", "")]
    for n in nodes:
        seen = "now" if n.source == "self" else f"{n.last_seen_s:.1f} s ago"
        versions = n.plugin_versions  # a plugin shows its version: %filter=0.1.0
        programs = ",".join(f"{p}={versions[p[1:]]}" if p[1:] in versions else p for p in n.programs) or "-"
        rows.append((n.name, n.endpoint, programs, n.source, seen, "" if n.up else "down"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


async def _run(args: argparse.Namespace) -> int:
    from dpipes.nodes import run

    gc.freeze()  # what the imports made lives until exit: keep the collector's full passes short
    options = run.RunOptions(
        pipeline=args.pipeline,
        mode=args.mode,
        stdin=_stdin_attached(),
        pipefail=args.pipefail,
        tag=args.tag,
        require=tuple(args.require),
        pipes=args.pipes,
        pipes_json=args.pipes_json,
        workdir=args.cwd,
        workflow=args.workflow_doc,
        edge_format=args.edge_format or "csv",
        direct_read=os.environ.get("DPIPES_DIRECT_READ") != "0",  # 0: through the entry node (to compare)
    )
    if args.workflow_doc and "input" not in args.workflow_doc:
        import dataclasses

        options = dataclasses.replace(options, stdin=False)  # a workflow reads stdin only into its input
    progress = _stderr_is_terminal() if args.progress is None else args.progress
    view = None
    if progress:
        from dpipes.nodes.progress import ProgressView

        view = ProgressView.on(sys.stderr)
    result = await _entry_and_run(args, lambda entry, keys: run.run_pipeline(entry, options, progress=view, keys=keys))
    return _report(args, result)


def _report(args: argparse.Namespace, result: Any) -> int:
    """Print what a run came to (joblog, error, status lines, Pipes summaries); its exit code."""
    from dpipes.nodes.results import format_joblog

    if args.joblog:
        try:
            with open(args.joblog, "w", encoding="utf-8") as log_file:
                log_file.write(format_joblog(result.stages))
        except OSError as exc:
            print(f"dpipes: cannot write the joblog {args.joblog}: {exc.strerror or exc}", file=sys.stderr)
    if result.error:
        print(f"dpipes: {result.error}", file=sys.stderr)
    for stage in result.stages:
        if args.status:
            placement = f" [{stage.placement()}]" if stage.placement() else ""
            print(f"dpipes: {stage.describe()}{placement}", file=sys.stderr)
        elif stage.error and not stage.sigpipe and not result.error:
            print(f"dpipes: {stage.describe()}", file=sys.stderr)
        if summary := stage.pipes_summary():
            print(f"dpipes: stage {stage.index} {stage.argv[0]}@{stage.node}: {summary}", file=sys.stderr)
    return result.exit_code


def _stderr_is_terminal() -> bool:
    try:
        return os.isatty(2)
    except OSError:
        return False


def _stdin_attached() -> bool:
    try:
        return not os.isatty(0) and os.fstat(0) is not None
    except OSError:  # no stdin at all
        return False


if __name__ == "__main__":
    sys.exit(main())
