"""``--version`` for the dpipes commands: the installed version, looked up only when asked for."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from dpipes.tools import distribution_version

__all__ = ["VersionAction"]


class VersionAction(argparse.Action):
    """``--version``: print ``PROG VERSION`` and exit 0; the version is looked up only then."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the version and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        sys.stdout.write(f"{parser.prog} {distribution_version()}\n")  # on stdout, as argparse's own
        parser.exit()
