"""dpipes.tools: the command-line front ends (``dpipes``, ``dpipesd``, ``dpipes-bench``).

``dpipes.tools.__version__`` is the installed distribution's version (``dpipes-bus``), read from
its metadata when first asked for, so that starting a command does not pay for
:mod:`importlib.metadata` (nor, here, for :mod:`argparse`: ``--version`` is
:class:`dpipes.tools.version.VersionAction`). The import package ``dpipes`` is a namespace of
mapped folders and has no module of its own to carry it.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
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
