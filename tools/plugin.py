"""``dpipes plugin new|list``: thin over :mod:`dpipes.nodes.plugins.scaffold` and ``.registry``."""

from __future__ import annotations

import json
import shlex
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

EXIT_USAGE = 2  # as dpipes: a bad command line


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="dpipes plugin",
        description="Write and list dpipes plugins: Python classes that process Arrow tables.",
        epilog="An installed plugin is a pipeline stage on its node: dpipes 'cat f.csv | %NAME@NODE KEY=VALUE'.",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{new,list}")
    new = verbs.add_parser(
        "new",
        help="write a pip-installable plugin package (class, entry point, a test with the harness)",
        description="Write a small plugin package: pyproject.toml with the dpipes.plugins entry point, "
        "the plugin class, and a test using the harness. Then: pip install -e DIR; python -m pytest DIR.",
    )
    new.add_argument("name", metavar="NAME", help="the plugin's name: lower-case letters, digits, - or _ (e.g. upper)")
    new.add_argument("--dir", metavar="DIR", help="where to write it (default: ./dpipes-plugin-NAME); must be empty")
    listing = verbs.add_parser("list", help="list the plugins installed here (entry point group dpipes.plugins)")
    listing.add_argument("--json", action="store_true", help="one JSON object per plugin")
    return parser


def main(argv: list[str]) -> int:
    """``dpipes plugin new|list``; its exit code."""
    args = _parser().parse_args(argv)
    if args.verb == "new":
        from dpipes.nodes.plugins.scaffold import ScaffoldError, new_plugin

        try:
            root = new_plugin(args.name, args.dir)
        except ScaffoldError as exc:
            print(f"dpipes: {exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"wrote plugin {args.name} in {root}/; next:")
        print(f"  pip install -e {shlex.quote(str(root) + '[test]')}    # then 'dpipes plugin list' shows it")
        print(f"  python -m pytest {shlex.quote(str(root))}  # its test, with the harness")
        return 0
    from dpipes.nodes.plugins.registry import installed_plugins

    plugins = installed_plugins()
    if not plugins and not args.json:
        print(  # stderr: stdout stays a table a script can read
            "dpipes: no plugins installed here (entry point group dpipes.plugins); see: dpipes plugin new",
            file=sys.stderr,
        )
        return 0
    if args.json:
        for name, info in plugins.items():
            print(json.dumps({"name": name, "reference": info.reference, "version": info.version}))
        return 0
    rows = [("PLUGIN", "VERSION", "REFERENCE"), *((n, i.version, i.reference) for n, i in plugins.items())]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0
