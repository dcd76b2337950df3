"""Who is whose child, read from /proc: the tests' process leak guards."""

from __future__ import annotations

import dataclasses
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


def runs(pid: int, program: str) -> bool:
    """Whether process ``pid`` has exec'd ``program`` (its name as the kernel keeps it, at most 15
    characters): past a launcher such as ``setpriv``, or the fork before ``exec``."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == program[:15]
    except OSError:
        return False


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


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one process holds, read from /proc: the tests' leak guards for a daemon."""

    fds: int
    threads: int
    children: int
    rss_kib: int

    def __str__(self) -> str:
        return f"{self.fds} fds, {self.threads} threads, {self.children} children, {self.rss_kib // 1024} MiB RSS"


def resources(pid: int) -> Resources:
    """The descriptors, threads, live children and resident memory of process ``pid``."""
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    return Resources(
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        threads=int(status["Threads"]),
        children=len(children_of(pid)),
        rss_kib=int(status["VmRSS"].split()[0]),
    )
