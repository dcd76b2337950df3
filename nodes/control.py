"""What a client and a node agree on to run a pipeline: kept apart so ``dpipes`` imports little."""

from __future__ import annotations

import getpass
import os

CTL = "ctl"
"""The name of every node's control endpoint: ``<node>/ctl``."""

PIPELINE_PROTOCOL = 1
"""Version of the run/negotiate/start/exit conversation (``dpipes.nodes.node``); bumped by hand."""

MODES = ("bytes", "json", "yaml")


def current_user() -> str:
    """Who is asking, for the stages' ``DPIPES_USER``."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())
