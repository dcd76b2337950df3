"""The fault matrix (``dpipes-bench faults``): real daemons on loopback, one fault each, and what follows.

For each scenario: what the client reported (its last stderr line), its exit status, the bytes it
delivered against those it sent, how long a lost node took to be reported, and whether every
resource count of the daemons that stayed up (descriptors, threads, children; RSS within
``RSS_SLACK_KIB``) came back to its baseline. Scenarios:

* ``kill -9 <node>``: each node of ``cat | cat@b | cat@c`` killed at a random point of a transfer
  (the entry node ``a`` included); the client must name the node within ``LOST_NODE_BOUND_S``.
* ``stage SIGKILL``: the middle stage's program killed.
* ``slow consumer``: the last stage reads slowly; nothing may be lost, memory stays flat.
* ``credit ignored``: ``FLOOD_SENDERS`` raw DEALERs at once send 256 MiB in all to ``b/ctl`` and
  each to a negotiated stage of its own, with no credit granted; ``b``'s ``[limits]
  max_held_bytes`` is ``FLOOD_CAP_WINDOWS`` windows, less than the senders' windows together. The
  RSS peak is reported against that cap and the window.
* ``gossip flood``: 1,124 made-up peers from a linked liar; peak fds, then a real node joins.
* ``forged HELLO``: a HELLO naming ``b`` during a transfer through ``b``; the transfer completes.
* ``duplicate name``: a second node named ``b`` joins; it is refused, ``b`` keeps working.
* ``N x <outcome>``: runs of each outcome kind (success, refusal, cancel, early exit, exit before
  input) against one daemon.
* ``link cut``/``short link cut``: three daemons in network namespaces
  (:mod:`dpipes.tools.bench.netns`; root only: the rows say why they were skipped otherwise),
  ``cat@h0 | cat@h1 | cat@h2``; the switch end of ``h1``'s veth is set down mid-transfer. Cut for
  ``LINK_CUT_S`` (past the loss timeout), the client must name ``h1`` as a killed node is named,
  what arrived must be a prefix of what was sent, ``h0`` and ``h2`` must come back to their
  baselines; with the veth up again, ``h1`` must be linked again within ``RELINK_TIMEOUT_S`` and a
  new run across it must deliver every byte. Cut for ``SHORT_CUT_S`` (well under the loss timeout),
  the run must go on and deliver every byte: see :mod:`dpipes.bus.hub`, *Link loss*.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

DAEMON_START_TIMEOUT_S = 30.0
RUN_TIMEOUT_S = 120.0
SETTLE_TIMEOUT_S = 30.0  # after a fault: stages reaped, links dropped, lingering endpoints closed
# A lost node must be reported this soon: the 3.5 s (PEER_TIMEOUT_S, then the next
# heartbeat check), plus the client process's own exit, which the measurement includes.
LOST_NODE_BOUND_S = 3.5 + 0.25
RSS_SLACK_KIB = 24 * 1024  # allocator noise; what counts as "back at baseline" for memory
TRANSFER_BYTES = 256 << 20  # big enough that a fault lands in the middle of it
FLOOD_BYTES = 256 << 20
FLOOD_SENDERS = 4  # credit-ignoring senders at once, each to a stage of its own
FLOOD_CAP_WINDOWS = 2  # the flooded node's max_held_bytes, in stream windows: fewer than FLOOD_SENDERS
OUTCOME_RUNS = 300
# Past PEER_TIMEOUT_S (3 s) plus a heartbeat check and the client's exit: the link is lost for sure,
# and the client has answered before the cable is back.
LINK_CUT_S = 6.0
# Well under PEER_TIMEOUT_S, retransmission backoff included: TCP resends the first segment lost
# 0.2 s after it, then 0.4 s later, so what queued during a 0.5 s cut moves within about 1.1 s.
SHORT_CUT_S = 0.5
RELINK_TIMEOUT_S = 30.0  # the hub says HELLO every heartbeat; Python on 2 busy cores is the slack
LINK_CUT_ROWS = (f"link cut {LINK_CUT_S:g} s", f"short link cut {SHORT_CUT_S:g} s")
NETNS_PORT = 7070  # each daemon alone in its namespace on its own address: no port to collide with


@dataclasses.dataclass(frozen=True)
class Usage:
    """What one process holds, from /proc."""

    fds: int
    threads: int
    children: int
    rss_kib: int


def usage(pid: int) -> Usage:
    status: dict[str, str] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            status[key] = value.strip()
    children = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            children += fields[0] != b"Z" and int(fields[1]) == pid
    return Usage(len(os.listdir(f"/proc/{pid}/fd")), int(status["Threads"]), children, int(status["VmRSS"].split()[0]))


@dataclasses.dataclass
class FaultRow:
    """One line of the matrix."""

    scenario: str
    report: str  # what the client (or the node) said
    exit: str  # the client's exit status, or "-"
    delivered: str  # "delivered/sent" bytes, or a figure of the scenario
    detect_s: str  # how long a lost node took to be reported, or "-"
    resources: str  # "back" or what stayed
    ok: bool
    skipped: bool = False  # not run here (``report`` says why); not a failure

    def as_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def _verdict(row: FaultRow) -> str:
    return "skip" if row.skipped else "yes" if row.ok else "NO"


def format_matrix(rows: list[FaultRow]) -> str:
    header = ("scenario", "ok", "exit", "delivered/sent", "detect", "resources", "client reports")
    table = [header] + [
        (r.scenario, _verdict(r), r.exit, r.delivered, r.detect_s, r.resources, r.report[:90]) for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1] for row in table
    )


class Daemon:
    """A ``dpipesd --foreground`` on loopback."""

    def __init__(self, name: str, runtime_dir: Path, peer: str | None = None, config: Path | None = None) -> None:
        self.name = name
        self.runtime_dir = runtime_dir
        runtime_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log = runtime_dir / "stderr.log"
        argv = [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", name]
        argv += ["--listen", "127.0.0.1:0", "--insecure"] + (["--peer", peer] if peer else [])
        argv += ["--config", str(config)] if config else []
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, env=env_for(runtime_dir), stdout=subprocess.PIPE, stderr=log)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode(errors="replace")
        match = re.search(r"tcp://(\S+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"dpipesd {name} did not start: {line!r}")
        self.host_port = match[1]

    @property
    def tcp(self) -> str:
        return f"tcp://{self.host_port}"

    def usage(self) -> Usage:
        return usage(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(DAEMON_START_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def env_for(runtime_dir: Path) -> dict[str, str]:
    env = dict(os.environ, DPIPES_RUNTIME_DIR=str(runtime_dir), DPIPES_CONFIG_PATHS="")
    env.pop("DPIPES_NODE", None)
    return env


def _known_up(entry: str) -> set[str]:
    from dpipes.nodes.run import known_nodes

    try:
        return {n.name for n in asyncio.run(known_nodes(entry)) if n.up}
    except Exception:  # a node still starting, or gone: not up, whatever the reason
        return set()


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)  # polling a condition under a deadline


def _knows(daemon: Daemon, names: set[str]) -> bool:
    return _known_up(daemon.tcp) >= names


@contextlib.contextmanager
def lan(names: list[str], root: Path, config: Path | None = None) -> Iterator[list[Daemon]]:
    """Daemons, each a static peer of the first, all linked to each other (each with ``--config config``)."""
    started: list[Daemon] = []
    try:
        for name in names:
            started.append(Daemon(name, root / name, started[0].host_port if started else None, config))
        wanted = set(names)
        for d in started:
            _until(functools.partial(_knows, d, wanted), DAEMON_START_TIMEOUT_S, f"{d.name} to link to all")
        yield started
    finally:
        for d in started:
            d.stop()


def _warm(entry: Daemon, nodes: list[Daemon]) -> list[Usage]:
    """Run one pipeline through every node, then read their baselines: a node's first run grows
    what it keeps for later ones (lazily imported modules, and pyzmq's garbage-collector thread
    with its own context, started at the first large zero-copy send)."""
    stages = " | ".join(f"cat@{d.name}" for d in nodes)
    with tempfile.NamedTemporaryFile() as out:
        client = _client(entry, f"head -c {4 << 20} /dev/zero | {stages}", None, Path(out.name))
        _wait(client)
    return [d.usage() for d in nodes]


def _stayed(name: str, now: Usage, base: Usage) -> list[str]:
    """What ``name`` holds beyond its baseline: nothing when it is back."""
    stayed = []
    if now.fds > base.fds:
        stayed.append(f"{name} +{now.fds - base.fds} fds")
    if now.threads > base.threads:
        stayed.append(f"{name} +{now.threads - base.threads} threads")
    if now.children:
        stayed.append(f"{name} {now.children} children")
    if now.rss_kib > base.rss_kib + RSS_SLACK_KIB:
        stayed.append(f"{name} +{(now.rss_kib - base.rss_kib) >> 10} MiB")
    return stayed


def _settled(daemons: list[Daemon], baselines: list[Usage]) -> str:
    """Wait until each live daemon is back at its baseline; "back", or what stayed."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        stayed = []
        for d, base in zip(daemons, baselines, strict=True):
            if d.proc.poll() is None:
                stayed += _stayed(d.name, d.usage(), base)
        if not stayed:
            return "back"
        if time.monotonic() > deadline:
            return ", ".join(stayed)
        time.sleep(0.1)  # polling a condition under a deadline


def _client(entry: Daemon, pipeline: str, stdin: Path | None, out: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "dpipes.tools.dpipes", "--insecure", "--node", entry.host_port, pipeline]
    with open(stdin if stdin else os.devnull, "rb") as fin, open(out, "wb") as fout:
        return subprocess.Popen(argv, env=env_for(entry.runtime_dir), stdin=fin, stdout=fout, stderr=subprocess.PIPE)


def _wait(client: subprocess.Popen[bytes]) -> bytes:
    """The client's stderr once it exited; a client still running after RUN_TIMEOUT_S is killed
    (its row then shows exit -9 and says it hung)."""
    try:
        return client.communicate(timeout=RUN_TIMEOUT_S)[1]
    except subprocess.TimeoutExpired:
        client.kill()
        err = client.communicate()[1]
        return err + f"\nthe client hung: killed after {RUN_TIMEOUT_S:g} s".encode()


def _last_line(stderr: bytes) -> str:
    lines = [line for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _input(root: Path, nbytes: int) -> Path:
    path = root / f"input-{nbytes}"
    if not path.exists():
        with open(path, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(nbytes >> 20):
                f.write(block)
    return path


def kill_node(victim: str, root: Path, nbytes: int, rng: random.Random) -> FaultRow:
    data = _input(root, nbytes)
    out = root / "out"
    with lan(["a", "b", "c"], root / f"kill-{victim}") as nodes:
        by_name = {d.name: d for d in nodes}
        survivors = [d for d in nodes if d.name != victim]
        _warm(by_name["a"], nodes)
        baselines = [d.usage() for d in survivors]
        entry_address = by_name["a"].tcp
        # The first stage holds its output open after the data (`sleep`), so the run is still going
        # whenever the kill lands, however fast the bytes went: the fault always meets a live run.
        client = _client(by_name["a"], f"sh -c 'cat; exec sleep {RUN_TIMEOUT_S:g}' | cat@b | cat@c", data, out)
        # A random point of the transfer: after some bytes came out, or at once.
        target = rng.randrange(0, nbytes // 2)
        _until(lambda: out.stat().st_size >= target or client.poll() is not None, RUN_TIMEOUT_S, "output")
        by_name[victim].proc.kill()
        killed_at = time.monotonic()
        err = _wait(client)
        detect = time.monotonic() - killed_at
        report = _last_line(err)
        resources = _settled(survivors, baselines)
    # The client names a lost node; its entry node it knows by address only.
    named = f"{victim!r}" in report or (victim == "a" and entry_address in report)
    ok = client.returncode != 0 and detect <= LOST_NODE_BOUND_S and named and resources == "back"
    delivered = f"{out.stat().st_size}/{nbytes}"
    return FaultRow(f"kill -9 {victim}", report, str(client.returncode), delivered, f"{detect:.2f} s", resources, ok)


def stage_killed(root: Path) -> FaultRow:
    out = root / "out"
    with lan(["a", "b"], root / "stage-kill") as (a, b):
        baselines = _warm(a, [a, b])
        client = _client(a, "sleep@b 30", None, out)
        _until(lambda: b.usage().children > 0 or client.poll() is not None, RUN_TIMEOUT_S, "the stage to start")
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == b.proc.pid]
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        err = _wait(client)
        resources = _settled([a, b], baselines)
    ok = client.returncode == 128 + signal.SIGKILL and resources == "back"
    return FaultRow("stage SIGKILL", _last_line(err) or "(nothing)", str(client.returncode), "-", "-", resources, ok)


def _parent(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return -1
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


SLOW_READER = (
    "import sys, time\n"
    "for chunk in iter(lambda: sys.stdin.buffer.read(1 << 16), b''):\n"
    "    time.sleep(0.002)\n"
    "    sys.stdout.buffer.write(chunk)\n"
)


def slow_consumer(root: Path, nbytes: int) -> FaultRow:
    data = _input(root, nbytes)
    out = root / "out"
    script = root / "slow.py"
    script.write_text(SLOW_READER)
    with lan(["a", "b"], root / "slow") as (a, b):
        baselines = _warm(a, [a, b])
        peak = [0, 0]
        client = _client(a, f"cat | python3@b {script}", data, out)
        while client.poll() is None:
            now = [d.usage().rss_kib - base.rss_kib for d, base in zip((a, b), baselines, strict=True)]
            peak = [max(p, n) for p, n in zip(peak, now, strict=True)]
            time.sleep(0.05)  # sampling memory while it runs
        err = client.stderr.read() if client.stderr else b""
        resources = _settled([a, b], baselines)
    got = out.stat().st_size
    ok = client.returncode == 0 and got == nbytes and resources == "back"
    report = _last_line(err) or f"ok; RSS peak +{max(peak) >> 10} MiB"
    return FaultRow("slow consumer", report, str(client.returncode), f"{got}/{nbytes}", "-", resources, ok)


def credit_ignored(root: Path, nbytes: int) -> FaultRow:
    """``nbytes``: what each sender sends to each of its targets."""
    from dpipes.bus import codec
    from dpipes.bus.client import Client
    from dpipes.nodes.protocol import PIPELINE_PROTOCOL, NegotiateRequest, call

    window = codec.INITIAL_CREDIT_BYTES
    cap = FLOOD_CAP_WINDOWS * window
    root.mkdir(parents=True, exist_ok=True)
    config = root / "credit.toml"
    config.write_text(f"[limits]\nmax_held_bytes = {cap}\n")
    with lan(["b"], root / "credit", config) as (b,):

        async def negotiate() -> list[str]:
            stages = []
            async with Client(b.tcp) as client:
                for i in range(FLOOD_SENDERS):
                    request = NegotiateRequest(
                        pipeline=f"flooded{i}", stage=0, argv=("cat",), protocol=PIPELINE_PROTOCOL
                    )
                    stages.append(str((await call(client.endpoint, "b", request)).addr))
            return stages

        stages = asyncio.run(negotiate())
        baseline = b.usage()
        peak = [baseline.rss_kib]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], b.usage().rss_kib)
                time.sleep(0.01)  # sampling memory while the flood runs

        sampler = threading.Thread(target=sample)
        sampler.start()
        floods: list[tuple[int, list[str]]] = []
        try:
            senders = [
                threading.Thread(target=lambda s=stage: floods.append(flood_credit(b.tcp, ["b/ctl", s], nbytes)))
                for stage in stages
            ]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join()
        finally:
            done.set()
            sampler.join()
        resources = _settled([b], [baseline])
    sent = sum(n for n, _codes in floods)
    codes = {code for _n, got in floods for code in got}
    grown = (peak[0] - baseline.rss_kib) >> 10
    # What the node holds for the senders stays under the cap (tests/bus/test_limits.py checks the
    # hub's own count); RSS adds libzmq's and the allocator's buffers for as many senders, which
    # the bound allows a window each. Unbounded, the 256 MiB would be held.
    ok = (
        len(floods) == FLOOD_SENDERS
        and resources == "back"
        and grown < (cap + FLOOD_SENDERS * window) >> 20
        and {"over-limit", "credit-exceeded"} <= codes
    )
    report = (
        f"refused: {', '.join(sorted(codes))}; RSS peak +{grown} MiB under {FLOOD_SENDERS} senders"
        f" (held cap {cap >> 20} MiB, window {window >> 20} MiB)"
    )
    return FaultRow("credit ignored", report, "-", f"{sent >> 20} MiB sent", "-", resources, ok)


def flood_credit(tcp: str, targets: list[str], nbytes: int) -> tuple[int, list[str]]:
    """Attach a raw DEALER and send ``nbytes`` to each target on four streams, ignoring credit."""
    import zmq

    from dpipes.bus import codec

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 2)  # a send returns once the daemon's side takes it
    sock.setsockopt(zmq.RCVTIMEO, int(RUN_TIMEOUT_S * 1000))
    sent, codes = 0, []
    try:
        sock.connect(tcp)
        sock.send_multipart(codec.encode(codec.Attach(src="", dst="")))
        attached = codec.decode(sock.recv_multipart())
        assert isinstance(attached, codec.Attached)
        chunk = b"\xa5" * (1 << 20)
        for target in targets:
            for sid in (1, 2, 3, 4):
                for seq in range(1, nbytes // len(chunk) // 4 + 1):
                    header = codec.encode(codec.Bytes(src=attached.addr, dst=target, sid=sid, seq=seq, frames=(b"",)))
                    sock.send_multipart([header[0], chunk], copy=False)
                    sent += len(chunk)
                    while sock.poll(0):
                        if isinstance(msg := codec.decode(sock.recv_multipart()), codec.Error):
                            codes.append(msg.code)
        with contextlib.suppress(zmq.Again):
            while not {"over-limit", "credit-exceeded"} <= set(codes):
                if isinstance(msg := codec.decode(sock.recv_multipart()), codec.Error):
                    codes.append(msg.code)
        sock.send_multipart(codec.encode(codec.Bye(src=attached.addr, dst="")))
    finally:
        sock.close(0)
        ctx.term()
    return sent, codes


def gossip_flood(root: Path) -> FaultRow:
    from dpipes.bus import codec
    from dpipes.bus.hub import Hub
    from dpipes.discovery.directory import MAX_GOSSIP_PEERS, MAX_KNOWN_NODES
    from dpipes.nodes.run import known_nodes

    flood = {f"fake{i:04d}": f"tcp://127.1.{i // 250}.{i % 250 + 1}:1" for i in range(1124)}
    names = sorted(flood)
    step = MAX_GOSSIP_PEERS
    bodies = [{"peers": {n: flood[n] for n in names[i : i + step]}} for i in range(0, len(names), step)]
    with lan(["a"], root / "gossip") as (a,):
        baseline = a.usage()

        async def liar() -> int:
            async with Hub("liar") as hub:
                await hub.connect_peer(a.tcp)
                ep = hub.endpoint("ctl")
                rounds = 0
                while len(await known_nodes(a.tcp)) < 1 + MAX_KNOWN_NODES and rounds < 1000:
                    ep.send(codec.Request(dst="a/ctl", method="gossip", body=bodies[rounds % len(bodies)]))
                    rounds += 1
                    await asyncio.sleep(0.05)  # paced for the gossip rate limit
                return a.usage().fds

        peak = asyncio.run(liar())
        late = Daemon("late", root / "gossip-late", a.host_port)
        try:
            _until(lambda: "late" in _known_up(a.tcp), DAEMON_START_TIMEOUT_S, "a real node to join")
            joined = "a real node joined"
        except RuntimeError:
            joined = "a real node could NOT join"
        finally:
            late.stop()
        resources = _settled([a], [baseline])
    ok = peak - baseline.fds < 4 * MAX_KNOWN_NODES and joined.endswith("joined") and resources == "back"
    report = f"1124 made-up peers; {joined}"
    return FaultRow("gossip flood", report, "-", f"fds {baseline.fds}->{peak}", "-", resources, ok)


def forged_hello(root: Path, nbytes: int) -> FaultRow:
    import uuid

    import zmq

    from dpipes.bus import codec

    data = _input(root, nbytes)
    out = root / "out"
    with lan(["a", "b"], root / "forged") as (a, b):
        baselines = _warm(a, [a, b])
        client = _client(a, "cat | cat@b", data, out)
        _until(lambda: out.stat().st_size > 0 or client.poll() is not None, RUN_TIMEOUT_S, "output")
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        try:
            sock.connect(a.tcp)
            hello = codec.Hello(src="b/", node="b", instance=uuid.uuid4().hex, endpoints={"bus": "tcp://127.0.0.1:9"})
            sock.send_multipart(codec.encode(hello))
            answer = codec.decode(sock.recv_multipart())
        finally:
            sock.close(0)
            ctx.term()
        err = _wait(client)
        resources = _settled([a, b], baselines)
    refused = isinstance(answer, codec.Bye) and "unique name" in answer.reason
    got = out.stat().st_size
    ok = refused and client.returncode == 0 and got == nbytes and resources == "back"
    report = ("forger refused; " if refused else "forger NOT refused; ") + (_last_line(err) or "transfer completed")
    return FaultRow("forged HELLO", report, str(client.returncode), f"{got}/{nbytes}", "-", resources, ok)


def duplicate_name(root: Path) -> FaultRow:
    out = root / "out"
    with lan(["a", "b"], root / "dup") as (a, b):
        baselines = _warm(a, [a, b])
        twin = Daemon("b", root / "dup-twin", a.host_port)
        try:
            _until(lambda: b"refused the link" in twin.log.read_bytes(), DAEMON_START_TIMEOUT_S, "the twin's refusal")
            refusal = next(line for line in twin.log.read_text().splitlines() if "refused the link" in line)
            client = _client(a, "echo fine | cat@b", None, out)
            err = _wait(client)
        finally:
            twin.stop()
        resources = _settled([a, b], baselines)
    ok = client.returncode == 0 and out.read_bytes() == b"fine\n" and resources == "back"
    report = "twin told: " + refusal.split("refused the link: ", 1)[-1] if ok else _last_line(err)
    return FaultRow("duplicate name", report, str(client.returncode), "-", "-", resources, ok)


def outcomes(root: Path, runs: int) -> list[FaultRow]:
    from dpipes.nodes.run import RunFailed, RunOptions, run_pipeline

    rows = []
    with (
        lan(["a"], root / "outcomes") as (a,),
        open(os.devnull, "wb") as sink,
        open(_input(root, 4 << 20), "rb") as big,
    ):

        async def one(options: RunOptions, *, stdin: int = -1, cancel: bool = False, late: bool = False) -> int:
            started = asyncio.Event()
            r, w = os.pipe() if late else (stdin, -1)
            if stdin >= 0:
                os.lseek(stdin, 0, os.SEEK_SET)
            task = asyncio.ensure_future(
                run_pipeline(
                    a.tcp, options, stdin_fd=r, stdout_fd=sink.fileno(), stderr_fd=sink.fileno(),
                    on_started=lambda _reply: started.set(), handle_sigint=False,
                )
            )  # fmt: skip
            try:
                if cancel:  # the client goes away while its stage runs
                    await started.wait()
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return 0
                if late:  # the input comes after the stage exited
                    await started.wait()
                    while a.usage().children:  # noqa: ASYNC110 (a condition of another process)
                        await asyncio.sleep(0.01)
                    os.write(w, b"x\n")
                return (await task).exit_code
            except RunFailed:
                return 125
            finally:
                if late:
                    os.close(r)
                    os.close(w)

        kinds: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
            "success": lambda: one(RunOptions("cat | wc -l", stdin=True), stdin=big.fileno()),
            "refusal": lambda: one(RunOptions("dpipes-no-such-program")),
            "cancel": lambda: one(RunOptions("sleep 30"), cancel=True),
            "early exit": lambda: one(RunOptions("head -c 1", stdin=True), stdin=big.fileno()),
            "exit before input": lambda: one(RunOptions("true", stdin=True), late=True),
        }

        async def repeat(kind: Callable[[], Coroutine[Any, Any, int]], n: int) -> list[int]:
            return [await kind() for _ in range(n)]

        for kind in kinds.values():  # warm up: lazy imports and caches reach their size first
            asyncio.run(repeat(kind, 2))
        baseline = a.usage()
        for name, kind in kinds.items():
            codes = asyncio.run(repeat(kind, runs))
            resources = _settled([a], [baseline])
            statuses = ",".join(str(c) for c in sorted(set(codes)))
            ok = resources == "back"
            delta = _delta(a.usage(), baseline)
            rows.append(FaultRow(f"{runs} x {name}", f"exit statuses {statuses}", statuses, delta, "-", resources, ok))
        # The measure: what one daemon kept after all of them, every kind, one baseline.
        total = runs * len(kinds)
        resources = _settled([a], [baseline])
        report = f"{total} runs of {len(kinds)} kinds, against the baseline taken before the first"
        rows.append(
            FaultRow(
                f"{total} x mixed", report, "-", _delta(a.usage(), baseline), "-", resources, ok=resources == "back"
            )
        )
    return rows


def _delta(now: Usage, base: Usage) -> str:
    """The issue's figure: descriptors and resident memory against the baseline (target: 0)."""
    return f"fds {now.fds - base.fds:+d}, RSS {(now.rss_kib - base.rss_kib) / 1024:+.1f} MiB"


@dataclasses.dataclass
class LinkCutResult:
    """What a link cut and its restoration did (:func:`link_cut`)."""

    sent: int  # bytes of input, for each run
    # The long cut, through the lost node.
    report: str  # the client's last stderr line
    exit_code: int
    delivered: int
    prefix: bool  # what arrived is the start of what was sent, byte for byte
    detect_s: float  # from the cut to the client's exit
    resources: str  # the daemons that stayed linked (h0, h2) after the run: "back", or what stayed
    # The veth up again.
    relinked_s: float  # from the veth up to h0 and h2 both linked to h1 again; inf if never
    rerun_exit: int
    rerun_equal: bool  # sha256 of what came out == sha256 of what went in
    resources_after: str  # all three daemons after the new run
    # The short cut.
    short_report: str
    short_exit: int
    short_delivered: int
    short_equal: bool


class _NsDaemon:
    """``dpipesd --foreground`` inside one namespaced host, found by the others through mDNS."""

    def __init__(self, host: Any, proc: asyncio.subprocess.Process, env: dict[str, str]) -> None:
        self.host = host
        self.proc = proc
        self.env = env
        self.name: str = host.name

    @property
    def host_port(self) -> str:
        return f"{self.host.addr}:{NETNS_PORT}"

    def usage(self) -> Usage:
        return usage(self.proc.pid)  # `ip netns exec` execs in place: this pid is the daemon's


async def _ns_daemon(host: Any, root: Path) -> _NsDaemon:
    runtime = root / host.name
    runtime.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = env_for(runtime)
    argv = [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", host.name, "--insecure"]
    argv += ["--listen", f"{host.addr}:{NETNS_PORT}"]
    log = os.open(runtime / "stderr.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        proc = await host.run(argv, env=env, stderr=log)
    finally:
        os.close(log)
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), DAEMON_START_TIMEOUT_S)).decode(errors="replace")
    if "tcp://" not in line:
        raise RuntimeError(f"dpipesd {host.name} did not start: {line!r}")
    return _NsDaemon(host, proc, env)


async def _ns_dpipes(
    entry: _NsDaemon, *args: str, stdin: int | None = asyncio.subprocess.DEVNULL, stdout: int | None = None
) -> asyncio.subprocess.Process:
    """The real ``dpipes`` inside the entry node's namespace."""
    argv = [sys.executable, "-m", "dpipes.tools.dpipes", "--insecure", "--node", entry.host_port, *args]
    return await entry.host.run(
        argv, env=entry.env, stdin=stdin, stdout=stdout if stdout is not None else asyncio.subprocess.PIPE
    )


async def _ns_links_up(d: _NsDaemon) -> set[str]:
    """The nodes ``d`` is linked to and hears from, itself included (``dpipes --nodes --json``)."""
    import json

    proc = await _ns_dpipes(d, "--nodes", "--json")
    out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    if proc.returncode != 0:
        return set()
    return {n["name"] for n in map(json.loads, out.splitlines()) if n.get("up")}


async def _ns_until_linked(daemons: list[_NsDaemon], names: set[str], timeout: float) -> None:
    async def poll() -> None:
        for d in daemons:
            while not await _ns_links_up(d) >= names:  # noqa: ASYNC110 (another process's table)
                await asyncio.sleep(0.1)

    await asyncio.wait_for(poll(), timeout)


async def _ns_settled(daemons: list[_NsDaemon], baselines: list[Usage]) -> str:
    """As :func:`_settled`, for namespaced daemons, without blocking the loop."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        stayed = []
        for d, base in zip(daemons, baselines, strict=True):
            if d.proc.returncode is None:
                stayed += _stayed(d.name, d.usage(), base)
        if not stayed or time.monotonic() > deadline:
            return ", ".join(stayed) or "back"
        await asyncio.sleep(0.1)  # polling /proc under a deadline


async def _ns_run(
    entry: _NsDaemon, pipeline: str, data: bytes, out: Path, fault: Callable[[], Coroutine[Any, Any, None]]
) -> tuple[int, str, float]:
    """Run ``pipeline`` with ``data`` as its input; ``fault`` strikes once a quarter of it came out.

    The second half of the input is written only as the fault strikes, so the cut always meets a
    live run with bytes still to cross it. Returns the exit status, the client's last stderr
    line, and the seconds from the fault's return to the client's exit.
    """
    half = len(data) // 2
    fout = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        client = await _ns_dpipes(entry, pipeline, stdin=asyncio.subprocess.PIPE, stdout=fout)
    finally:
        os.close(fout)
    assert client.stdin is not None and client.stderr is not None
    err = asyncio.ensure_future(client.stderr.read())

    async def feed() -> None:
        assert client.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            client.stdin.write(data[:half])
            await client.stdin.drain()
            await struck.wait()
            client.stdin.write(data[half:])
            await client.stdin.drain()
            client.stdin.close()

    struck = asyncio.Event()
    feeding = asyncio.ensure_future(feed())
    try:

        async def quarter_out() -> None:
            while os.stat(out).st_size < len(data) // 4 and client.returncode is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)  # (a file another process writes)

        await asyncio.wait_for(quarter_out(), RUN_TIMEOUT_S)
        struck.set()
        await fault()
        struck_at = time.monotonic()
        await asyncio.wait_for(client.wait(), RUN_TIMEOUT_S)
        exited_at = time.monotonic()
        await asyncio.wait_for(feeding, RUN_TIMEOUT_S)
        text = await asyncio.wait_for(err, RUN_TIMEOUT_S)
    finally:
        feeding.cancel()
        err.cancel()
        if client.returncode is None:
            client.kill()
            await client.wait()
    return client.returncode or 0, _last_line(text), exited_at - struck_at


async def link_cut(root: Path, nbytes: int) -> LinkCutResult:
    """Three namespaced daemons; ``h1``'s veth cut long, restored, then cut short. Needs root."""
    import hashlib

    from dpipes.tools.bench import netns

    data = _input(root, nbytes).read_bytes()
    out = root / "out"
    pipeline = "cat@h0 | cat@h1 | cat@h2"
    daemons: list[_NsDaemon] = []
    async with netns.lan(3) as hosts:
        try:
            for host in hosts:
                daemons.append(await _ns_daemon(host, root / "link-cut"))
            names = {d.name for d in daemons}
            await _ns_until_linked(daemons, names, DAEMON_START_TIMEOUT_S)
            h0, _, h2 = daemons
            cable = hosts[1]  # h1's veth, cut at its switch end: h1's cable pulled

            async def set_link(state: str) -> None:
                await netns._ip("-n", cable.switch, "link", "set", cable.port, state)

            warm = await _ns_dpipes(h0, f"head -c {4 << 20} /dev/zero | cat@h1 | cat@h2")
            await asyncio.wait_for(warm.communicate(), RUN_TIMEOUT_S)
            baselines = [d.usage() for d in daemons]

            # A long cut: h1 is lost, mid-run.
            cut_at = math.inf

            async def cut() -> None:
                nonlocal cut_at
                await set_link("down")
                cut_at = time.monotonic()

            code, report, detect = await _ns_run(h0, pipeline, data, out, cut)
            got = out.read_bytes()
            resources = await _ns_settled([h0, h2], [baselines[0], baselines[2]])
            # The fault itself: the cable stays out LINK_CUT_S in all.
            await asyncio.sleep(max(0.0, cut_at + LINK_CUT_S - time.monotonic()))
            await set_link("up")
            restored = time.monotonic()
            try:
                await _ns_until_linked([h0, h2], names, RELINK_TIMEOUT_S)
                relinked = time.monotonic() - restored
            except TimeoutError:
                relinked = math.inf
            rerun_code, _, _ = await _ns_run(h0, pipeline, data, out, _no_fault)
            rerun_equal = hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
            resources_after = await _ns_settled(daemons, baselines)

            # A short cut: the run goes on.
            async def short_cut() -> None:
                await set_link("down")
                await asyncio.sleep(SHORT_CUT_S)  # the fault itself: the cable out this long
                await set_link("up")

            short_code, short_report, _ = await _ns_run(h0, pipeline, data, out, short_cut)
            short_got = out.read_bytes()
        finally:
            for d in daemons:
                if d.proc.returncode is None:
                    d.proc.send_signal(signal.SIGTERM)
            for d in daemons:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(d.proc.wait(), DAEMON_START_TIMEOUT_S)
    return LinkCutResult(
        sent=nbytes,
        report=report,
        exit_code=code,
        delivered=len(got),
        prefix=data.startswith(got),
        detect_s=detect,
        resources=resources,
        relinked_s=relinked,
        rerun_exit=rerun_code,
        rerun_equal=rerun_equal,
        resources_after=resources_after,
        short_report=short_report,
        short_exit=short_code,
        short_delivered=len(short_got),
        short_equal=short_got == data,
    )


async def _no_fault() -> None:
    return None


def link_cut_rows(root: Path, nbytes: int) -> list[FaultRow]:
    """The link-cut rows of the matrix; skipped, saying why, without root or namespaces."""
    from dpipes.tools.bench import netns

    reason = netns.netns_unavailable_reason()
    if reason is not None:
        return [FaultRow(s, f"skipped: {reason}", "-", "-", "-", "-", ok=True, skipped=True) for s in LINK_CUT_ROWS]
    return link_cut_matrix_rows(asyncio.run(link_cut(root, nbytes)))


def link_cut_matrix_rows(r: LinkCutResult) -> list[FaultRow]:
    """The two rows one :func:`link_cut` makes: the long cut and restoration, the short cut."""
    relinked = f"relinked in {r.relinked_s:.1f} s" if r.relinked_s < math.inf else "NOT relinked"  # after veth up
    rerun = "rerun sha256 equal" if r.rerun_equal and r.rerun_exit == 0 else f"rerun exit {r.rerun_exit}, data differs"
    long_ok = (
        r.exit_code != 0
        and "'h1'" in r.report
        and r.detect_s <= LOST_NODE_BOUND_S
        and r.prefix
        and r.resources == "back"
        and r.relinked_s < math.inf
        and r.rerun_exit == 0
        and r.rerun_equal
        and r.resources_after == "back"
    )
    resources = r.resources if r.resources_after == "back" else f"{r.resources}; after: {r.resources_after}"
    long_row = FaultRow(
        LINK_CUT_ROWS[0],
        f"{relinked}, {rerun}; {r.report}",
        str(r.exit_code),
        f"{r.delivered}/{r.sent}" + ("" if r.prefix else " NOT a prefix"),
        f"{r.detect_s:.2f} s",
        resources,
        long_ok,
    )
    short_ok = r.short_exit == 0 and r.short_equal
    short_row = FaultRow(
        LINK_CUT_ROWS[1],
        r.short_report or "the run went on; sha256 equal" if r.short_equal else "data differs",
        str(r.short_exit),
        f"{r.short_delivered}/{r.sent}",
        "-",
        "-",
        short_ok,
    )
    return [long_row, short_row]


def fault_matrix(
    *,
    quick: bool = False,
    runs: int | None = None,
    progress: Callable[[str], None] = lambda _m: None,
    seed: int | None = None,
) -> list[FaultRow]:
    """Run every scenario; one row each."""
    rng = random.Random(seed)
    nbytes = (32 << 20) if quick else TRANSFER_BYTES
    runs = runs if runs is not None else (20 if quick else OUTCOME_RUNS)
    rows: list[FaultRow] = []
    with tempfile.TemporaryDirectory(prefix="dpipes-faults-") as tmp:
        root = Path(tmp)
        steps: list[Callable[[], list[FaultRow] | FaultRow]] = [
            *(lambda v=v: kill_node(v, root, nbytes, rng) for v in ("a", "b", "c")),
            lambda: stage_killed(root),
            lambda: slow_consumer(root, nbytes // 8),
            # each sender's streams: 12 or 16 MiB, past their credit
            lambda: credit_ignored(root, (48 << 20) if quick else FLOOD_BYTES // FLOOD_SENDERS),
            lambda: gossip_flood(root),
            lambda: forged_hello(root, nbytes),
            lambda: duplicate_name(root),
            lambda: outcomes(root, runs),
            lambda: link_cut_rows(root, nbytes),
        ]
        for step in steps:
            got = step()
            rows.extend(got if isinstance(got, list) else [got])
            progress("." if all(r.ok for r in (got if isinstance(got, list) else [got])) else "!")
    return rows
