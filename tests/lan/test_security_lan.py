"""Nodes with keys on a LAN of network namespaces: trusted, encrypted, and refusing what they should.

Each host has its own key directory (``DPIPES_KEY_DIR``), as two machines would; the first contact
is made by pasting the lines each ``dpipesd`` prints when it is ready. The traffic tests capture
every frame on the bridge with a raw socket (``capture.py``) while a pipeline streams a random
marker: with keys the marker never crosses the bridge in clear; between ``--insecure`` nodes it
does (the control that proves the capture sees the pipeline's traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shlex
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from dpipes.bus.keys import KeyPair, PublicKey, load_keypair
from tests.lan.lifetime import reap, stop
from tests.procs import children_of

PORT = 7070
START_TIMEOUT_S = 30.0  # a daemon prints its ready lines once it listens; Python start-up on 2 busy cores
LINK_TIMEOUT_S = 30.0  # a pin is re-read on the next directory tick (2 s); mDNS and links take well under that
STOP_TIMEOUT_S = 15.0
RUN_TIMEOUT_S = 60.0
READY_LINES = 5  # ready, node key, client key, pid, stop
CAPTURE = Path(__file__).with_name("capture.py")


@dataclass
class Started:
    """A running dpipesd in one host, with what it printed when it was ready."""

    host: Any
    proc: asyncio.subprocess.Process
    lines: list[str]
    log: Path

    def pasted(self, prefix: str) -> list[str]:
        """The command a ready line tells the user to run on another host (``prefix``: its start)."""
        line = next(ln for ln in self.lines if ln.startswith(prefix))
        return shlex.split(line.partition("with: ")[2])

    @property
    def pin(self) -> list[str]:
        return self.pasted("node key ")

    def trust(self, *run: str) -> list[str]:
        """The pasted trust line, with the rights the other node's owner chooses."""
        words = self.pasted("your client key ")
        at = words.index("--run")
        return words[:at] + [w for prog in run for w in ("--run", prog)]

    def fingerprint(self) -> str:
        return self.lines[1].split()[2].rstrip(";")


def host_env(tmp_path: Path, host: Any) -> dict[str, str]:
    """The host's own runtime and key directories, and no system configuration."""
    base = tmp_path / host.name
    base.mkdir(mode=0o700, exist_ok=True)
    (base / "run").mkdir(mode=0o700, exist_ok=True)
    env = dict(os.environ, DPIPES_RUNTIME_DIR=str(base / "run"), DPIPES_CONFIG_PATHS="")
    env["DPIPES_KEY_DIR"] = str(base / "keys")
    env.pop("DPIPES_NODE", None)
    return env


def key_dir(tmp_path: Path, host: Any) -> Path:
    return tmp_path / host.name / "keys"


@contextlib.asynccontextmanager
async def dpipesd(tmp_path: Path, host: Any, *args: str) -> AsyncIterator[Started]:
    """``dpipesd --foreground`` in ``host`` on its LAN address (with keys unless ``--insecure``)."""
    log = tmp_path / f"{host.name}-{secrets.token_hex(3)}.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        argv = [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", host.name]
        argv += ["--listen", f"{host.addr}:{PORT}", "--allow", "cat", "--allow", "touch", "--log-level", "DEBUG", *args]
        proc = await host.run(argv, env=host_env(tmp_path, host), stderr=fd)
    finally:
        os.close(fd)
    try:
        assert proc.stdout is not None
        lines = []
        for _ in range(READY_LINES):
            line = (await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)).decode().rstrip("\n")
            assert line, f"dpipesd on {host.name} did not start: {log.read_text()[-2000:]}"
            lines.append(line)
        assert lines[0].startswith(f"node {host.name} ready: tcp://"), lines
        yield Started(host, proc, lines, log)
    finally:
        await stop(proc, STOP_TIMEOUT_S)


async def run_in(tmp_path: Path, host: Any, argv: list[str], *, input: bytes | None = None) -> tuple[int, bytes, str]:
    """A ``dpipes ...`` command line (as pasted: ``argv[0]`` is ``dpipes``) run inside ``host``."""
    assert argv[0] == "dpipes", argv
    proc = await host.run(
        [sys.executable, "-m", "dpipes.tools.dpipes", *argv[1:]],
        env=host_env(tmp_path, host),
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
    )
    out, err = await asyncio.wait_for(proc.communicate(input), RUN_TIMEOUT_S)
    return proc.returncode or 0, out, err.decode(errors="replace")


async def ok(tmp_path: Path, host: Any, argv: list[str]) -> None:
    code, _, err = await run_in(tmp_path, host, argv)
    assert code == 0, err


async def until_linked(tmp_path: Path, host: Any, other: str) -> None:
    """Poll ``dpipes --nodes`` on ``host`` (over its Unix socket) until ``other`` is up."""

    async def poll() -> None:
        while True:
            code, out, err = await run_in(tmp_path, host, ["dpipes", "--nodes", "--json"])
            assert code == 0, err
            if any(n["name"] == other and n["up"] for n in map(json.loads, out.splitlines())):
                return
            await asyncio.sleep(0.2)  # polling a condition under a deadline

    await asyncio.wait_for(poll(), LINK_TIMEOUT_S)


async def until_logged(log: Path, pattern: str) -> str:
    """Poll a daemon's log until a line matches ``pattern``; that line."""

    async def poll() -> str:
        while True:
            for line in (await asyncio.to_thread(log.read_text, errors="replace")).splitlines():
                if re.search(pattern, line):
                    return line
            await asyncio.sleep(0.1)  # polling a file under a deadline

    try:
        return await asyncio.wait_for(poll(), LINK_TIMEOUT_S)
    except TimeoutError:
        text = await asyncio.to_thread(log.read_text)
        raise AssertionError(f"no line matching {pattern!r} in {log}:\n{text[-3000:]}") from None


async def first_contact(tmp_path: Path, a: Started, b: Started, *, run: tuple[str, ...] = ("cat",)) -> None:
    """Each host pins the other's node key and admits the other user's client key, as pasted."""
    for here, there in ((a, b), (b, a)):
        await ok(tmp_path, here.host, there.pin)
        await ok(tmp_path, here.host, there.trust(*run))


@contextlib.asynccontextmanager
async def capture(net: Any, tmp_path: Path) -> AsyncIterator[list[bytes]]:
    """Every frame crossing the bridge while the body runs (the list is filled at exit)."""
    out = tmp_path / f"capture-{secrets.token_hex(3)}"
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", net.switch, sys.executable, str(CAPTURE), str(out),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    frames: list[bytes] = []
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S) == b"ready\n"
        yield frames
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # the capture's end: it writes what it saw, then exits
        await reap(proc, STOP_TIMEOUT_S)
    frames.extend(_frames(out.read_bytes()))


def _frames(data: bytes) -> Iterator[bytes]:
    at = 0
    while at + 4 <= len(data):
        size = int.from_bytes(data[at : at + 4], "big")
        yield data[at + 4 : at + 4 + size]
        at += 4 + size


def secret_forms(*pairs: KeyPair) -> list[bytes]:
    """Each pair's secret key as it could cross the wire: its z85 text and its raw bytes."""
    return [form for p in pairs for form in (p.secret_z85.encode(), zmq.utils.z85.decode(p.secret_z85.encode()))]


def marked_input() -> tuple[bytes, bytes]:
    marker = f"dpipes-marker-{secrets.token_hex(12)}".encode()
    return marker, b"".join(marker + f" {i}\n".encode() for i in range(3000))


async def marked_run(tmp_path: Path, hosts: Any, options: list[str]) -> tuple[bytes, bytes, str, list[bytes]]:
    """``dpipes OPTIONS 'cat | cat@HOST0'`` in hosts[0] on a marked input, once hosts[1] is linked,
    while the bridge is captured; it must give its input back. The marker, the input, stderr and
    the frames the bridge saw."""
    await until_linked(tmp_path, hosts[0], hosts[1].name)
    marker, data = marked_input()
    argv = ["dpipes", *options, f"cat | cat@{hosts[0].name}"]
    async with capture(hosts, tmp_path) as frames:
        code, out, err = await run_in(tmp_path, hosts[0], argv, input=data)
    assert code == 0, err
    assert out == data
    return marker, data, err, frames


# -- a trusted, encrypted two-node pipeline ---------------------------------------------------------


async def test_two_hosts_with_keys_run_a_pipeline_and_the_bridge_never_sees_its_data(lan: Any, tmp_path: Path) -> None:
    async with lan(2) as hosts, dpipesd(tmp_path, hosts[0]) as alpha, dpipesd(tmp_path, hosts[1]) as beta:
        await first_contact(tmp_path, alpha, beta)
        # alpha's user, over TCP to beta, encrypted: stdin -> beta's cat -> alpha's cat -> back
        entry = f"{hosts[1].name}@{hosts[1].addr}:{PORT}"
        marker, data, err, frames = await marked_run(tmp_path, hosts, ["--node", entry, "--status"])
        assert f"stage 1 cat@{hosts[0].name}" in err
        crossed = sum(len(f) for f in frames)
        assert crossed > 3 * len(data), f"the capture saw {crossed} bytes: it did not see the pipeline"
        assert not [f for f in frames if marker in f], "pipeline data crossed the bridge in clear"
        # Nor did any secret: not the nodes' keys, not the client's (z85 text or raw bytes).
        pairs = [load_keypair(key_dir(tmp_path, s.host), name) for s in (alpha, beta) for name in ("node", "client")]
        assert not [f for f in frames for s in secret_forms(*pairs) if s in f]
        # dpipes-tap asks beta over TCP, with the same keys, which nodes it knows
        tap = await hosts[0].run(
            [
                sys.executable,
                "-m",
                "dpipes.tools.tap",
                "nodes",
                "--json",
                "--node",
                f"{hosts[1].name}@{hosts[1].addr}:{PORT}",
            ],
            env=host_env(tmp_path, hosts[0]),
        )
        listed, said = await asyncio.wait_for(tap.communicate(), RUN_TIMEOUT_S)
        assert tap.returncode == 0, said.decode()
        assert {json.loads(line)["name"] for line in listed.splitlines()} >= {hosts[0].name, hosts[1].name}


async def test_between_insecure_nodes_the_capture_sees_the_data_in_clear(lan: Any, tmp_path: Path) -> None:
    """The control of the test above: the same capture, without keys, sees the marker."""
    async with (
        lan(2) as hosts,
        dpipesd(tmp_path, hosts[0], "--insecure"),
        dpipesd(tmp_path, hosts[1], "--insecure"),
    ):
        marker, _, _, frames = await marked_run(tmp_path, hosts, ["--insecure", "--node", f"{hosts[1].addr}:{PORT}"])
        assert [f for f in frames if marker in f], "the capture did not see the pipeline's data"


async def test_mdns_records_carry_the_node_key_and_nothing_secret(lan: Any, tmp_path: Path) -> None:
    async with lan(2) as hosts, capture(hosts, tmp_path) as frames:
        async with dpipesd(tmp_path, hosts[0]) as alpha:
            await until_logged(alpha.log, "mDNS discovery on")
    pair = load_keypair(key_dir(tmp_path, hosts[0]), "node")
    advertised = {m.group(1) for f in frames if b"_dpipes" in f for m in re.finditer(rb"pk=(.{40})", f, re.S)}
    assert advertised == {pair.public.z85.encode()}
    assert PublicKey.parse(next(iter(advertised))).fingerprint == alpha.fingerprint()
    assert not [f for f in frames for s in secret_forms(pair) if s in f]


# -- refusals ---------------------------------------------------------------------------------------


async def test_a_peer_with_a_wrong_node_key_is_refused_by_name(lan: Any, tmp_path: Path) -> None:
    async with lan(2) as hosts, dpipesd(tmp_path, hosts[0]) as alpha, dpipesd(tmp_path, hosts[1]) as beta:
        wrong = PublicKey.parse(zmq.curve_keypair()[0])
        await ok(tmp_path, hosts[0], ["dpipes", "keys", "pin", hosts[1].name, wrong.z85])
        await ok(tmp_path, hosts[1], alpha.pin)
        line = await until_logged(alpha.log, rf"ERROR .*node {hosts[1].name}\b.*REFUSED")
        assert beta.fingerprint() in line and wrong.fingerprint in line
        code, out, err = await run_in(tmp_path, hosts[0], ["dpipes", "--nodes", "--json"])
        assert code == 0, err
        assert not [n for n in map(json.loads, out.splitlines()) if n["name"] == hosts[1].name and n["up"]]


async def test_a_changed_node_key_is_refused_naming_both_fingerprints(lan: Any, tmp_path: Path) -> None:
    async with lan(2) as hosts, dpipesd(tmp_path, hosts[0], "--trust-on-first-use") as alpha:
        async with dpipesd(tmp_path, hosts[1], "--trust-on-first-use") as beta:
            await until_linked(tmp_path, hosts[0], hosts[1].name)  # first use: each recorded the other
            old = beta.fingerprint()
        for path in key_dir(tmp_path, hosts[1]).iterdir():  # beta reinstalled: a new key
            path.unlink()
        async with dpipesd(tmp_path, hosts[1], "--trust-on-first-use") as beta:
            new = beta.fingerprint()
            assert new != old
            line = await until_logged(alpha.log, rf"ERROR .*{re.escape(new)}")
            assert hosts[1].name in line and old in line
            # alpha's user is refused too, before anything is sent, naming both fingerprints
            code, _, err = await run_in(
                tmp_path, hosts[0], ["dpipes", "--node", f"{hosts[1].name}@{hosts[1].addr}:{PORT}", "cat"], input=b""
            )
            assert code == 125
            assert old in err and new in err and "REFUSED" in err, err
        assert alpha.proc.returncode is None


async def test_an_unknown_client_key_runs_nothing(lan: Any, tmp_path: Path) -> None:
    async with lan(2) as hosts, dpipesd(tmp_path, hosts[1]) as beta:
        await ok(tmp_path, hosts[0], beta.pin)  # the client knows beta; beta does not know the client
        witness = tmp_path / "ran"
        code, _, err = await run_in(
            tmp_path,
            hosts[0],
            ["dpipes", "--node", f"{hosts[1].name}@{hosts[1].addr}:{PORT}", f"touch {witness}"],
        )
        assert code == 125
        client = load_keypair(key_dir(tmp_path, hosts[0]), "client")
        assert "refused this client" in err and f"dpipes keys trust '{client.public.z85}'" in err, err
        await until_logged(beta.log, rf"refused a connection from {re.escape(client.fingerprint)}")
        assert not witness.exists()
        assert children_of(beta.proc.pid) == []  # 0 programs started on the node
