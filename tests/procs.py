"""Who is whose child, read from /proc: the tests' process leak guards."""

from __future__ import annotations

import os


def _parents() -> dict[int, list[int]]:
    """Live (non-zombie) processes by parent pid."""
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
        if fields[0] != b"Z":
            parents.setdefault(int(fields[1]), []).append(int(name))
    return parents


def children_of(pid: int) -> list[int]:
    """Pids of the live children of ``pid``."""
    return _parents().get(pid, [])


def descendants(root: int | None = None) -> set[int]:
    """Pids of every live descendant of ``root`` (default: this process)."""
    parents = _parents()
    found: set[int] = set()
    todo = [os.getpid() if root is None else root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
