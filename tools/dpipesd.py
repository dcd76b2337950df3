"""dpipesd: run this host's dpipes node, in the background or attached; stop it; show its status."""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dpipes.tools.completion import SHELLS, completion_script
from dpipes.tools.version import VersionAction

# The node's modules are imported by main(), once the collector is off (see there).
if TYPE_CHECKING:
    from dpipes.nodes.config import NodeConfig
    from dpipes.nodes.daemon import NodeFactory, ServingNode

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FLAG_OF_KEY = {  # the flag behind each configuration key it sets, for --print-config
    "name": "--name",
    "listen": "--listen",
    "allow": "--allow",
    "insecure": "--insecure",
    "interfaces": "--interface",
    "nodes": "--peer",
    "key_dir": "--key-dir",
    "trust_on_first_use": "--trust-on-first-use",
}
EXIT_NOT_RUNNING = 3  # --status of a stopped node, as LSB init scripts answer

EPILOG = """\
examples:
  dpipesd                                  start this host's node in the background, named after
                                           the host, listening on 127.0.0.1:5757
  dpipesd --foreground --log-level DEBUG   run attached, logging to stderr; Ctrl-C stops it
  dpipesd --name beta --listen 0.0.0.0:5758 --peer alpha=alpha.lan:5757
                                           a second node on the LAN with a static peer (for
                                           networks where mDNS does not reach), linked once its
                                           key is pinned: dpipes keys pin alpha KEY; unnamed
                                           peers are keyed peer1, peer2, ... in the [nodes] table
  dpipesd --peer alpha=10.0.0.1:5757       a static peer under a name of your choice
  dpipesd --allow "sort -r -n '-k[0-9]*'" "uniq -c"
                                           run only these programs, each only with arguments that
                                           match one of its patterns: 'sort -r -k2' runs, 'sort -o
                                           FILE' and 'sort --compress-program=PROG' do not. A bare
                                           name (--allow sort) allows ANY arguments, so everything
                                           the program can do: sort -o overwrites any file this
                                           user can; sh, env, python3, find, awk are a shell
  dpipesd --name sorter -- sort -r         a node that runs only 'sort -r', offered as such: an
                                           unpinned 'sort -r ...' goes there, a plain 'sort' does
                                           not; a pinned stage's arguments are appended
  dpipesd --exit -- python top.py          serve one stage of 'python top.py', then exit
  dpipesd --status --name beta             is node beta running? (exit 0 yes, {exit_not_running} no)
  dpipesd --stop --name beta               stop it: SIGTERM, then wait up to {stop_wait_s:.0f} s

files, in the runtime directory: --runtime-dir DIR, else ${runtime_dir_env}, else
$XDG_RUNTIME_DIR/dpipes, else /tmp/dpipes-UID (created with mode 0700; refused if another user
owns it or others can write to it; every file in it is owner-only whatever the umask):
  NAME.pid        the daemon's pid, written once the node listens
  NAME.log        the log of a background daemon (a foreground one logs to stderr)
  NAME.sock       the node's ipc endpoint for local clients; NAME-tap.sock is its tap
  local.sock      the first daemon on a host binds here instead (NAME.sock is then a link to it);
                  'dpipes' connects to it. The name 'local' is reserved.
  NAME.lock       held while the daemon runs; it decides whether NAME is taken

stopping: dpipesd --stop [--name NAME], or kill $(cat RUNTIME_DIR/NAME.pid); --stop signals the pid
only if it is the process holding NAME.lock (a rewritten pid file is refused). SIGTERM or Ctrl-C
stops the node gracefully (running stages are cancelled) within {stop_timeout_s:.0f} s; a
second Ctrl-C exits at once. A daemon killed with SIGKILL leaves files; the next start cleans them.

configuration (TOML): /etc/dpipesd.conf, then $XDG_CONFIG_HOME/dpipes/dpipesd.toml (default
~/.config/dpipes/dpipesd.toml), then ~/.dpipesdrc (the list can be replaced by
$DPIPES_CONFIG_PATHS, ':'-separated), then --config FILE, then these flags; later wins.
dpipesd --print-config shows every key with its value and where it came from.

exit status: 0 ok; 1 runtime error (already running, cannot listen, did not stop, ...);
2 usage or configuration error; {exit_not_running} (--status only) not running.
"""


def _node_factory(
    config: NodeConfig, /, *, exclusive: list[str] | None, ipc: str, tap: str, exit_after_one: bool
) -> ServingNode:
    from dpipes.nodes.node import Node  # imported in the daemon, after it has forked

    return Node(config, exclusive=exclusive, ipc=ipc, tap=tap, exit_after_one=exit_after_one)


def _epilog() -> str:
    from dpipes.nodes import daemon, paths

    return EPILOG.format(
        exit_not_running=EXIT_NOT_RUNNING,
        stop_wait_s=daemon.STOP_WAIT_S,
        stop_timeout_s=daemon.STOP_TIMEOUT_S,
        runtime_dir_env=paths.RUNTIME_DIR_ENV,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpipesd",
        usage="%(prog)s [options] [-- PROG [ARGS...]]",
        description="Run this host's dpipes node: it joins the LAN's bus and runs pipeline stages for "
        "'dpipes'. Without --foreground it detaches and returns once the node listens.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument(
        "--completion", metavar="SHELL", choices=SHELLS, help="print a bash or zsh completion script and exit"
    )
    run = parser.add_argument_group("running")
    run.add_argument("--foreground", action="store_true", help="stay attached and log to stderr")
    run.add_argument("--exit", action="store_true", help="exit after one stage has run on this node")
    run.add_argument("--config", metavar="FILE", help="read this TOML file after the system ones")
    run.add_argument("--name", metavar="NAME", help="node name (default: config, else HOST-XXXX, XXXX from machine id)")
    run.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="where peers and remote clients connect, with a key the node trusts (default 127.0.0.1:5757)",
    )
    run.add_argument(
        "--peer",
        metavar="[NAME=]HOST:PORT",
        nargs="+",
        action="extend",
        default=[],
        help="a static peer node (repeatable); added to the config's [nodes]",
    )
    run.add_argument(
        "--allow",
        metavar="'PROG [PATTERN...]'",
        nargs="+",
        action="extend",
        default=[],
        help="what this node runs (repeatable): a program with arguments each matching a pattern (fnmatch), or "
        "a bare PROG with any arguments (everything it can do); %%PLUGIN for a plugin",
    )
    run.add_argument(
        "--interface",
        metavar="NAME|ADDR",
        action="append",
        default=[],
        help="an interface for mDNS discovery (repeatable); default: the one of --listen's address, or every "
        "multicast-capable one when listening on 0.0.0.0. A node listening on loopback does no mDNS",
    )
    run.add_argument(
        "--insecure",
        action="store_true",
        help="run without keys: no encryption, no authentication; anyone who reaches the port (on loopback: "
        "every local user) can run programs as this user. Logged as a warning; for a trusted lab only",
    )
    run.add_argument(
        "--trust-on-first-use",
        action="store_true",
        help="first contact: record the key of a peer node the first time it is seen (mDNS, gossip, a link), "
        "instead of refusing it until pinned; a changed key is refused either way. Opt-in, as ssh's "
        "StrictHostKeyChecking=accept-new",
    )
    run.add_argument(
        "--log-level",
        metavar="LEVEL",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help=f"one of {', '.join(LOG_LEVELS)} (default INFO)",
    )
    run.add_argument("--runtime-dir", metavar="DIR", help="where pid, log and socket files go (see below)")
    run.add_argument(
        "--key-dir",
        metavar="DIR",
        help="the node's key pair and trust files (default: $DPIPES_KEY_DIR, else $XDG_CONFIG_HOME/dpipes); "
        "the pair is created on the first start",
    )
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--stop", action="store_true", help="stop the running daemon of --name (or the default name)")
    control.add_argument("--status", action="store_true", help="say whether the daemon of --name is running")
    control.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective configuration as TOML, each value with where it came from, and exit",
    )
    return parser


def _peers(specs: list[str]) -> dict[str, str]:
    """``[NAME=]HOST:PORT`` texts to a ``[nodes]`` table; unnamed ones are ``peer1``, ``peer2``, ...

    Raises:
        ConfigError: a bad name or address, or a name given twice.
    """
    from dpipes.bus.errors import ConfigError
    from dpipes.discovery.txt import node_name_problem as check_node_name
    from dpipes.nodes.config import HostPort

    table: dict[str, str] = {}
    unnamed = 0
    for spec in specs:
        name, sep, address = spec.rpartition("=")
        if not sep:
            unnamed += 1
            name = f"peer{unnamed}"
        else:
            problem = check_node_name(name)
            if problem is not None:
                raise ConfigError(f"--peer {spec!r}: {problem}")
        try:
            HostPort.parse(address)
        except ValueError as e:
            raise ConfigError(f"--peer {spec!r}: {e}") from None
        if name in table:
            raise ConfigError(f"--peer {spec!r}: peer name {name!r} given twice")
        table[name] = address
    return table


def main(argv: list[str] | None = None, node_factory: NodeFactory | None = None) -> int:
    """The ``dpipesd`` command. ``node_factory`` replaces ``dpipes.nodes.node.Node`` (tests)."""
    # Start-up makes ~10^5 objects that live as long as the daemon (modules, classes, the node) and
    # next to no garbage; the collector's passes over them while they pile up cost ~7 ms of CPU per
    # start (8 daemons starting on 2 cores wait for each other's CPU). It is off until the node is
    # ready, which freezes what start-up made and turns it back on (nodes/daemon.py).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _main(sys.argv[1:] if argv is None else list(argv), node_factory)
    finally:
        if collecting:
            gc.enable()


def _main(argv: list[str], node_factory: NodeFactory | None) -> int:
    from dpipes.nodes import code_cache

    code_cache.install()  # before the first dataclass is made; the daemon saves it once ready
    from dpipes.bus.errors import ConfigError
    from dpipes.nodes import daemon, paths
    from dpipes.nodes.config import format_config, load_config

    command: list[str] | None = None
    if "--" in argv:
        at = argv.index("--")
        argv, command = argv[:at], argv[at + 1 :]
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if command is not None and not command:
            parser.error("'--' must be followed by the program this node runs: -- PROG [ARGS...]")
        if command and (args.stop or args.status or args.print_config):
            parser.error("'-- PROG' starts a node; it cannot go with --stop, --status or --print-config")
    except SystemExit as e:  # argparse's usage errors (2) and --help (0)
        return e.code if isinstance(e.code, int) else 2
    if args.completion:
        print(completion_script(parser, args.completion), end="")
        return 0

    overrides: dict[str, object] = {}
    if args.name is not None:
        overrides["name"] = args.name
    if args.listen is not None:
        overrides["listen"] = args.listen
    if args.allow:
        overrides["allow"] = list(args.allow)
    if args.insecure:
        overrides["insecure"] = True
    if args.interface:
        overrides["interfaces"] = list(args.interface)
    if args.key_dir:
        overrides["key_dir"] = str(Path(args.key_dir).absolute())
    if args.trust_on_first_use:
        overrides["trust_on_first_use"] = True
    try:
        if args.peer:
            overrides["nodes"] = _peers(args.peer)
        config = load_config(config_file=args.config, overrides=overrides or None)
    except ConfigError as e:
        print(f"dpipesd: {e}", file=sys.stderr)
        return 2
    runtime_dir = Path(args.runtime_dir) if args.runtime_dir else None

    if args.print_config:
        print(format_config(config, labels=FLAG_OF_KEY), end="")
        return 0
    if args.stop:
        return daemon.stop_daemon(config.name, runtime_dir)
    if args.status:
        return _status(config.name, runtime_dir)
    problem = paths.check_daemon_name(config.name)
    if problem is not None:
        print(f"dpipesd: {problem} (--name, or 'name' in the configuration)", file=sys.stderr)
        return 2
    try:
        return daemon.run_daemon(
            config,
            exclusive=command,
            foreground=args.foreground,
            exit_after_one=args.exit,
            log_level=args.log_level,
            node_factory=node_factory or _node_factory,
            runtime_dir=runtime_dir,
        )
    except KeyboardInterrupt:  # before the node's own handlers are installed
        print("dpipesd: interrupted", file=sys.stderr)
        return 130


def _status(name: str, runtime_dir: Path | None) -> int:
    from dpipes.nodes import daemon, paths

    try:
        found = daemon.status(name, runtime_dir)
    except paths.RuntimeDirError as e:
        print(f"dpipesd: {e}", file=sys.stderr)
        return 1
    if found is None:
        print(f"node {name} is not running")
        return EXIT_NOT_RUNNING
    also = " (the host's local socket)" if found.local else ""
    print(f"node {name} is running: pid {found.pid}, {found.ipc_endpoint}{also}")
    print(f"pid file {found.pid_file}, log {found.log_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
