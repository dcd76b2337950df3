"""Shared test guards: a test must leave no descendant process behind."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

LEAK_GRACE_S = 5.0  # a just-killed child may take a moment to be reaped by its parent


def descendants(root: int | None = None) -> set[int]:
    """Pids of every live (non-zombie) descendant of ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] == b"Z":
            continue
        parents.setdefault(int(fields[1]), []).append(int(name))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail the test if it leaves a descendant process running."""
    before = descendants()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        leaked = descendants() - before
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling a condition under a deadline, not waiting for the network
    if leaked:
        cmdlines = []
        for pid in sorted(leaked):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().replace(b"\0", b" ").decode(errors="replace")
                cmdlines.append(f"{pid}: {argv}")
            except OSError:
                pass
        pytest.fail("test leaked processes:\n" + "\n".join(cmdlines))
