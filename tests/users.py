"""Another local user in a forked child, for the tests that check a node refuses other uids.

The child drops to the user's uid and gid without exec (``nobody`` may not be able to run this
interpreter), does one thing, writes what came of it to a pipe and exits; the parent reads that
and reaps it. Needs root (:data:`needs_root`).
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import zmq

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")

SEND_LINGER_MS = 2000  # the child's one message must leave before its context closes


def nobody() -> int:
    """The uid of user ``nobody``."""
    return pwd.getpwnam("nobody").pw_uid


@dataclass(frozen=True)
class Child:
    """A forked child and the read end of the pipe it reports on."""

    pid: int
    out_fd: int

    def wait(self) -> str:
        """What the child wrote, once it exited (blocking); its exit status must be 0."""
        with os.fdopen(self.out_fd, "rb") as f:
            out = f.read().decode()
        _, status = os.waitpid(self.pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"the child as another user failed: {out!r}"
        return out


def fork_as(uid: int | None, work: Callable[[], str]) -> Child:
    """Fork a child that becomes ``uid`` (None: stays us), runs ``work`` and reports what it returns."""
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(read_fd)
            if uid is not None:
                user = pwd.getpwuid(uid)
                os.setgroups([])
                os.setgid(user.pw_gid)
                os.setuid(user.pw_uid)
            os.write(write_fd, work().encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    return Child(child, read_fd)


def send_as(uid: int, endpoint: str, frames: list[Any]) -> Child:
    """Fork a child that becomes ``uid`` and sends one message from a plain DEALER to ``endpoint``."""

    def send() -> str:  # pragma: no cover - the child
        ctx = zmq.Context()  # a new context: nothing of the parent's is touched after fork
        sock = ctx.socket(zmq.DEALER)
        sock.linger = SEND_LINGER_MS
        sock.connect(endpoint)
        sock.send_multipart(frames)
        sock.close()
        ctx.term()
        return "sent"

    return fork_as(uid, send)
