"""A stand-in node for daemon tests, and ``dpipesd`` running it.

Usage: python fake_node.py DPIPESD-ARGS...  (the ``dpipesd`` command line, with FakeNode as the node)

The fake binds no TCP port: it binds a Unix socket at the ipc path it is given (so that the
runtime directory looks as it does under a real node), logs what it was built with, and serves
until closed. Environment variables make it misbehave on purpose:

  FAKE_NODE_FAIL_START=MESSAGE   starting raises RuntimeError(MESSAGE), as a node that cannot listen
  FAKE_NODE_HANG_CLOSE=1         aclose() never finishes, as a node stuck in shutdown
  FAKE_STOP_TIMEOUT_S=SECONDS    replaces the daemon's STOP_TIMEOUT_S (tests of the bound)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys

from dpipes.nodes import daemon
from dpipes.nodes.config import NodeConfig
from dpipes.tools import dpipesd

log = logging.getLogger("fake_node")


class FakeNode:
    """Behaves like ``dpipes.nodes.node.Node`` towards the daemon, and does nothing else."""

    def __init__(
        self,
        config: NodeConfig,
        *,
        exclusive: list[str] | None = None,
        ipc: str | None = None,
        tap: str | None = None,
        exit_after_one: bool = False,
    ) -> None:
        self.config = config
        self.name = config.name
        self.exclusive = exclusive
        self.ipc = ipc
        self.tap = tap
        self.exit_after_one = exit_after_one
        self.tcp_endpoint = f"tcp://{config.listen}"
        self._sock: socket.socket | None = None
        self._stopped = asyncio.Event()

    async def __aenter__(self) -> FakeNode:
        failure = os.environ.get("FAKE_NODE_FAIL_START")
        if failure:
            raise RuntimeError(failure)
        if self.ipc is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.bind(self.ipc.removeprefix("ipc://"))
        described = {
            "name": self.name,
            "listen": str(self.config.listen),
            "nodes": {k: str(v) for k, v in self.config.nodes.items()},
            "allow": sorted(self.config.allow) if self.config.allow is not None else None,
            "exclusive": self.exclusive,
            "ipc": self.ipc,
            "tap": self.tap,
            "exit_after_one": self.exit_after_one,
        }
        log.info("fake node %s", json.dumps(described))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def serve(self) -> None:
        if not self.exit_after_one:
            await self._stopped.wait()

    async def aclose(self) -> None:
        self._stopped.set()
        if os.environ.get("FAKE_NODE_HANG_CLOSE"):
            log.info("fake node %s: hanging in aclose", self.name)
            await asyncio.Event().wait()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            if self.ipc is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.ipc.removeprefix("ipc://"))


if __name__ == "__main__":
    if os.environ.get("FAKE_STOP_TIMEOUT_S"):
        daemon.STOP_TIMEOUT_S = float(os.environ["FAKE_STOP_TIMEOUT_S"])
    sys.exit(dpipesd.main(sys.argv[1:], node_factory=FakeNode))
