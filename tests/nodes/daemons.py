"""Real dpipesd daemons on loopback for tests, and the real dpipes command against them."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from tests.procs import children_of, runs

START_TIMEOUT_S = 20.0  # a daemon prints its endpoint once it listens; Python start-up on a busy machine
STOP_TIMEOUT_S = 15.0
RUN_TIMEOUT_S = 120.0


@dataclasses.dataclass
class Daemon:
    name: str
    proc: asyncio.subprocess.Process
    tcp: str
    ipc: str = ""

    @property
    def host_port(self) -> str:
        return self.tcp.removeprefix("tcp://")

    def children(self) -> list[int]:
        """Pids of the daemon's live child processes (its running stages)."""
        return children_of(self.proc.pid)

    def running(self, program: str) -> list[int]:
        """Pids of the daemon's child processes that have exec'd ``program``. A stage is first its
        launcher (``setpriv``, or a fork), which sets its death signal; once it runs its program it
        dies with the daemon (``PR_SET_PDEATHSIG``), which a daemon killed before then cannot promise."""
        return [pid for pid in self.children() if runs(pid, program)]


def environment(runtime_dir: Path) -> dict[str, str]:
    """An environment where dpipes reads no system config and finds only this test's daemons."""
    env = dict(os.environ)
    env["DPIPES_RUNTIME_DIR"] = str(runtime_dir)
    env["DPIPES_CONFIG_PATHS"] = ""
    env.pop("DPIPES_NODE", None)
    # Stages that run `python3` mean this interpreter (its pyarrow, dagster-pipes), activated or not.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", os.defpath)])
    return env


@contextlib.asynccontextmanager
async def daemons(
    runtime_dir: Path,
    names: Sequence[str],
    *,
    extra: dict[str, list[str]] | None = None,
    peer_of: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    secure: bool = False,
    log_dir: Path | None = None,
) -> AsyncIterator[list[Daemon]]:
    """Start one ``dpipesd --foreground`` per name, each a static peer of the first (or of
    ``peer_of[name]``, started before it), in ``cwd`` (default ours); stop them all.

    Without ``secure`` the daemons run ``--insecure`` (no keys); with it, with the keys and trust
    of their key directories (the tests' own by default, shared like one user's; ``extra`` may
    give each its ``--key-dir``). With ``log_dir``, each daemon's log goes to ``NAME.log`` there."""
    env = environment(runtime_dir)
    started: list[Daemon] = []
    try:
        for name in names:
            argv = [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", name]
            argv += ["--listen", "127.0.0.1:0"]
            if not secure:
                # No keys: these tests reach daemons over loopback TCP with plain clients and link
                # them by address alone. Keys, trust and refusals: tests/nodes/test_security.py.
                argv += ["--insecure"]
            if started:
                target = (peer_of or {}).get(name)
                peer = next(d for d in started if d.name == target) if target else started[0]
                argv += ["--peer", peer.host_port]
            argv += (extra or {}).get(name, [])
            with open(log_dir / f"{name}.log", "wb") if log_dir else contextlib.nullcontext() as log:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log if log is not None else asyncio.subprocess.DEVNULL,
                    cwd=cwd,
                )
            assert proc.stdout is not None
            line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)).decode()
            match, ipc = re.search(r"tcp://\S+", line), re.search(r"ipc://\S+", line)
            assert match and ipc, f"dpipesd {name} did not say where it listens: {line!r}"
            started.append(Daemon(name, proc, match[0], ipc[0]))
        await _until_first_knows_all(started, via_ipc=secure)
        yield started
    finally:
        for daemon in started:
            if daemon.proc.returncode is None:
                daemon.proc.send_signal(signal.SIGTERM)
        for daemon in started:
            try:
                await asyncio.wait_for(daemon.proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                daemon.proc.kill()
                await daemon.proc.wait()


async def start_dpipes(runtime_dir: Path, *args: str, insecure: bool = True) -> asyncio.subprocess.Process:
    """Start the real ``dpipes`` command with no input, its stderr captured; the caller waits.
    ``insecure`` as for :func:`dpipes`."""
    if insecure and _tcp_node(args):
        args = ("--insecure", *args)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "dpipes.tools.dpipes",
        *args,
        env=environment(runtime_dir),
        stdin=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _until_first_knows_all(started: list[Daemon], *, via_ipc: bool = False) -> None:
    """Wait until the first daemon has a link to every other (directly, or learned by gossip);
    ``via_ipc``: ask it over its Unix socket (with keys, its TCP port wants a key)."""
    from dpipes.nodes.run import known_nodes

    wanted = {d.name for d in started}
    entry = started[0].ipc if via_ipc else started[0].tcp

    async def poll() -> None:
        while not wanted <= {n.name for n in await known_nodes(entry) if n.up}:  # it may know more
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), START_TIMEOUT_S)


@dataclasses.dataclass
class Completed:
    code: int
    stdout: bytes
    stderr: str


async def dpipes(
    runtime_dir: Path,
    *args: str,
    input: bytes | None = None,
    stdin_file: str | None = None,
    stdout_file: str | None = None,
    timeout: float = RUN_TIMEOUT_S,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    insecure: bool = True,
) -> Completed:
    """Run the real ``dpipes`` command (in ``cwd``, default ours; ``env`` added to its environment)
    and wait for it.

    ``insecure``: a ``--node`` over TCP is one of the harness's ``--insecure`` daemons, attached
    without keys (``dpipes --insecure``); pass False for ``daemons(secure=True)``."""
    if insecure and _tcp_node(args):
        args = ("--insecure", *args)
    stdin: int | None = asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL
    opened = []
    if stdin_file is not None:
        stdin = os.open(stdin_file, os.O_RDONLY)
        opened.append(stdin)
    stdout: int = asyncio.subprocess.PIPE
    if stdout_file is not None:
        stdout = os.open(stdout_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        opened.append(stdout)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dpipes.tools.dpipes",
            *args,
            env={**environment(runtime_dir), **(env or {})},
            stdin=stdin,
            stdout=stdout,
            stderr=asyncio.subprocess.PIPE,
            cwd=cwd,
        )
    finally:
        for fd in opened:
            os.close(fd)
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return Completed(proc.returncode or 0, out or b"", (err or b"").decode(errors="replace"))


def _tcp_node(args: Sequence[str]) -> bool:
    """Whether ``args`` give ``--node`` an address that is not ``ipc://``."""
    for flag, value in itertools.pairwise(args):
        if flag == "--node":
            return not value.startswith("ipc://")
    return any(a.startswith("--node=") and not a.startswith("--node=ipc://") for a in args)


async def shell(command: str, *, input: bytes | None = None) -> Completed:
    """The same pipeline run by ``sh -c``: the reference output."""
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        command,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(input)
    return Completed(proc.returncode or 0, out, err.decode(errors="replace"))
