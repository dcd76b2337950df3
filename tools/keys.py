"""``dpipes keys``: show your keys and manage whom your node trusts, over :mod:`dpipes.bus.keyring`."""

from __future__ import annotations

import shlex
import sys
from typing import TYPE_CHECKING

from dpipes.bus.errors import DpipesError

if TYPE_CHECKING:
    import argparse


KEYS_EPILOG = """\
files, in the key directory (--key-dir, else $DPIPES_KEY_DIR, else $XDG_CONFIG_HOME/dpipes,
default ~/.config/dpipes; mode 0700):
  client.key_secret, client.key   your client key pair (created the first time dpipes needs it)
  node.key_secret, node.key       the pair of a dpipesd run by you (created when it first starts)
  authorized_keys                 the clients your node admits, and what each may run
  known_nodes                     the nodes you trust: NODE FINGERPRINT [KEY]

rights (trust): with none, a key may connect and run nothing.
  --run 'PROG [PATTERN...]'   PROG (a bare name, compared exactly) with arguments that each match
                              one of the fnmatch PATTERNs; no pattern: no arguments at all
  --exact 'PROG ARG...'       exactly this command line
  --plugin 'NAME [PATTERN...]'  plugin NAME, arguments as for --run
  --tap                       may watch the node's traffic with dpipes-tap
  --any                       anything: run every program and plugin, tap (your own keys only)
  Allowing a program allows everything that program can do with the arguments you let through:
  --run 'sort *' lets the caller run 'sort --compress-program=evil.sh' (runs evil.sh) and
  'sort -o FILE' (writes any file your node can); sh, env, python3, find or xargs with '*' give
  a shell. Name each option you allow.

examples:
  dpipes keys                                show your keys' fingerprints
  dpipes keys trust rq:5Vk...KEY... --comment alice@laptop --run "sort -r -n '-k[0-9]*'" --run 'uniq -c'
  dpipes keys trust ~/alice-client.key --any  your own client key from another host
  dpipes keys pin beta SHA256:Kq3...          trust node beta: the fingerprint 'dpipes keys' shows on beta
  dpipes keys pin beta 'KEY'                  the same with its key (what beta's dpipesd printed), which a
                                              client needs to reach beta over TCP: dpipes --node beta@HOST:PORT
  dpipes keys untrust alice@laptop
"""


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="dpipes keys",
        description="Show your keys and manage whom your node trusts (as ssh's authorized_keys and known_hosts).",
        epilog=KEYS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--key-dir", metavar="DIR", help="the key directory (see below)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.add_parser("show", help="your keys: fingerprint, public key, file (the default)")
    verbs.add_parser("list", help="the clients your node trusts, and the nodes you trust")
    trust = verbs.add_parser("trust", help="admit a client key, with rights (see below)")
    trust.add_argument("key", metavar="KEY|FILE", help="the client's public key (Z85) or its .key file")
    trust.add_argument("--comment", default="", help="who it is (shown in logs and refusals)")
    trust.add_argument("--run", action="append", default=[], metavar="'PROG [PATTERN...]'")
    trust.add_argument("--exact", action="append", default=[], metavar="'PROG ARG...'")
    trust.add_argument("--plugin", action="append", default=[], metavar="'NAME [PATTERN...]'")
    trust.add_argument("--tap", action="store_true")
    trust.add_argument("--any", action="store_true")
    untrust = verbs.add_parser("untrust", help="remove a client key or a node")
    untrust.add_argument("match", metavar="FINGERPRINT|KEY|COMMENT|NODE")
    pin = verbs.add_parser("pin", help="trust node NODE with the key of this fingerprint (or key)")
    pin.add_argument("node", metavar="NODE")
    pin.add_argument("fingerprint", metavar="FINGERPRINT|KEY")
    return parser


def _parse_with_keys(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, where a public key that starts with ``-`` (Z85 has that
    character) is a key, not an option: ``dpipes keys pin beta '-2hk...'`` as the daemon printed it.
    """
    from dpipes.bus.keys import PublicKey

    hidden: dict[str, str] = {}
    given = []
    for word in argv:
        if word.startswith("-"):
            try:
                PublicKey.parse(word)
            except ValueError:
                pass
            else:
                stand_in = f"\0key{len(hidden)}"
                hidden[stand_in] = word
                word = stand_in
        given.append(word)
    args = parser.parse_args(given)
    for name, value in vars(args).items():  # no command line holds a NUL: the stand-ins are only ours
        if isinstance(value, str) and value in hidden:
            setattr(args, name, hidden[value])
    return args


def main(argv: list[str]) -> int:
    """``dpipes keys ...``: the keyring's functions, printed; its exit code."""
    from pathlib import Path

    from dpipes.bus.keyring import Keyring, parse_key_argument

    parser = _parser()
    args = _parse_with_keys(parser, argv)
    ring = Keyring(Path(args.key_dir) if args.key_dir else None)
    verb = args.verb or "show"
    try:
        if verb == "show":
            client, created = ring.client()
            if created:
                print(f"created your client key pair in {ring.dir}", file=sys.stderr)
            node_pair = ring.node()
            for label, pair in (("client", client), ("node", node_pair)):
                if pair is not None:
                    print(f"{label}  {pair.fingerprint}\n        key {pair.public}\n        file {pair.public_path}")
            quoted = shlex.quote(client.public.z85)
            print(f"a node admits this client with: dpipes keys trust {quoted} --comment NAME --run 'PROG ...'")
            if node_pair is not None:
                print(f"other hosts trust this node with: dpipes keys pin NAME {shlex.quote(node_pair.public.z85)}")
            return 0
        if verb == "list":
            clients = ring.authorized().entries
            print(f"clients your node trusts ({ring.authorized_keys_path}):" + ("" if clients else " none"))
            for entry in clients:
                print(f"  {entry.fingerprint}  {entry.comment or '-'}  {entry.options() or '(no rights)'}")
            nodes = ring.known().entries
            print(f"nodes you trust ({ring.known_nodes_path}):" + ("" if nodes else " none"))
            for node in nodes.values():
                print(f"  {node.node}  {node.fingerprint}" + ("" if node.key else "  (key not seen yet)"))
            return 0
        if verb == "trust":
            try:
                key = parse_key_argument(args.key)
            except ValueError as exc:
                parser.error(str(exc))
            entry = ring.trust(
                key,
                comment=args.comment,
                run=args.run,
                exact=args.exact,
                plugins=args.plugin,
                tap=args.tap,
                unrestricted=args.any,
            )
            print(f"trusted {entry.describe()}: {entry.format()}")
            if not (entry.rules or entry.tap or entry.any):
                print("dpipes: note: no rights given: this key may connect and run nothing", file=sys.stderr)
            return 0
        if verb == "untrust":
            removed = ring.untrust(args.match)
            for line in removed:
                print(f"removed {line}")
            if not removed:
                print(f"dpipes: no client key or node matches {args.match!r}", file=sys.stderr)
                return 1
            return 0
        try:
            pinned = ring.pin(args.node, args.fingerprint)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"pinned node {pinned.node} to {pinned.fingerprint} in {ring.known_nodes_path}")
        return 0
    except DpipesError as exc:
        print(f"dpipes: {exc}", file=sys.stderr)
        return 1
