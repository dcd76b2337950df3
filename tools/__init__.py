"""dpipes.tools: the command-line front ends (``dpipes``, ``dpipesd``, ``dpipes-bench``).

``dpipes.tools.__version__`` is the installed distribution's version (``dpipes-bus``), read from
its metadata when first asked for, so that starting a command does not pay for
:mod:`importlib.metadata`. The import package ``dpipes`` is a namespace of mapped folders and has
no module of its own to carry it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

DISTRIBUTION = "dpipes-bus"
UNKNOWN_VERSION = "0+unknown"  # a source tree used without being installed


def distribution_version() -> str:
    """The installed version of dpipes-bus, or ``0+unknown`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return UNKNOWN_VERSION


def __getattr__(name: str) -> Any:
    if name == "__version__":
        return distribution_version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class VersionAction(argparse.Action):
    """``--version``: print ``PROG VERSION`` and exit 0; the version is looked up only then."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.setdefault("help", "print the version and exit")
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        sys.stdout.write(f"{parser.prog} {distribution_version()}\n")  # on stdout, as argparse's own
        parser.exit()
