"""A LAN of hosts in network namespaces, for multi-host tests and ``dpipes-bench discovery`` (root only).

``lan(n)`` builds::

    switch namespace  dpt-<run><k>-sw:   bridge br0  +  ports p0 .. p<n-1>
    host namespaces   dpt-<run><k>-h<i>:  lo (up), eth0 = 10.77.<x>.<i+2>/24, route 224.0.0.0/4 dev eth0

Each veth pair is created inside the switch namespace with its host end moved straight into the
host namespace, so nothing is ever created in, or routed through, the caller's namespace, and no
packet can leave the machine. The bridge does no multicast snooping (every 224.0.0.251 frame is
flooded) and no STP (ports forward at once).

On exit, even when the body raised: every process started through ``Host.run`` gets SIGTERM,
then SIGKILL after ``KILL_GRACE_S``; anything else still living in one of the namespaces is
killed; the namespaces are deleted, which destroys their links. Namespace names carry a per-run
prefix (``RUN_PREFIX``) so that parallel test runs never touch each other's namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import overload

NETNS_PREFIX = "dpt-"
RUN_PREFIX = f"{NETNS_PREFIX}{secrets.token_hex(3)}"  # this test process's namespaces
KILL_GRACE_S = 3.0  # SIGTERM -> SIGKILL for processes still running at teardown
EXIT_POLL_S = 0.02  # teardown polls for process exit under the KILL_GRACE_S deadline
IP_TIMEOUT_S = 10.0  # one `ip` invocation; they normally take milliseconds
HOST_IFACE = "eth0"
MDNS_GROUP = "224.0.0.251"

_counter = itertools.count()


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed while building or changing the test LAN."""


def netns_unavailable_reason() -> str | None:
    """Why network-namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "network-namespace tests need root (ip netns, veth, bridge)"
    if shutil.which("ip") is None:
        return "network-namespace tests need iproute2's `ip` command"
    probe = f"{RUN_PREFIX}-probe{secrets.token_hex(2)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def list_netns(prefix: str = NETNS_PREFIX) -> list[str]:
    """Names of the existing network namespaces that start with ``prefix``."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


async def _ip(*args: str, stdin: str | None = None) -> str:
    """Run ``ip ARGS`` (or ``tc`` when args start with "tc"); NetnsError on failure."""
    argv = list(args) if args[0] == "tc" else ["ip", *args]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin is not None else None), IP_TIMEOUT_S)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        detail = err.decode(errors="replace").strip()
        raise NetnsError(f"{' '.join(argv)} failed ({proc.returncode}): {detail}\n{stdin or ''}")
    return out.decode(errors="replace")


@dataclass(eq=False)
class Host:
    """One machine of the test LAN."""

    name: str  # short name, e.g. "h0"
    netns: str  # namespace name
    addr: str  # IPv4 address on eth0
    port: str  # its bridge port in the switch namespace
    switch: str
    iface: str = HOST_IFACE
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    multicast_blocked: bool = False

    async def run(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = asyncio.subprocess.DEVNULL,
        stdout: int | None = asyncio.subprocess.PIPE,
        stderr: int | None = asyncio.subprocess.PIPE,
        env: Mapping[str, str] | None = None,
    ) -> asyncio.subprocess.Process:
        """Start ``argv`` inside this host's namespace; the LAN kills it at teardown if needed.

        ``ip netns exec`` execs the program in place, so the returned process *is* the program:
        signals sent to it reach it directly.
        """
        proc = await asyncio.create_subprocess_exec(
            "ip",
            "netns",
            "exec",
            self.netns,
            *argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            limit=1 << 20,
        )
        self.procs.append(proc)
        return proc

    async def ip(self, *args: str) -> str:
        """Run ``ip -n <this namespace> ARGS``."""
        return await _ip("-n", self.netns, *args)

    async def block_multicast(self) -> None:
        """Drop mDNS multicast (to 224.0.0.251) sent by this host or flooded to it; unicast flows.

        Neither nftables nor tc's drop action is available everywhere, so this uses only the
        basics: an HTB qdisc whose u32 filter steers mDNS into a class whose queue holds nothing
        (``pfifo limit 0``), on the host's eth0 (what it sends) and on its switch port (what it
        receives).
        """
        await _drop_mdns_egress(self.netns, self.iface)
        await _drop_mdns_egress(self.switch, self.port)
        self.multicast_blocked = True

    async def unblock_multicast(self) -> None:
        """Undo :meth:`block_multicast`."""
        await _ip("tc", "-n", self.netns, "qdisc", "del", "dev", self.iface, "root")
        await _ip("tc", "-n", self.switch, "qdisc", "del", "dev", self.port, "root")
        self.multicast_blocked = False


async def _drop_mdns_egress(ns: str, dev: str) -> None:
    tc = ("tc", "-n", ns)
    await _ip(*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10")
    await _ip(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:10", "htb", "rate", "10gbit")
    await _ip(*tc, "class", "add", "dev", dev, "parent", "1:", "classid", "1:20", "htb", "rate", "8bit")
    await _ip(*tc, "qdisc", "add", "dev", dev, "parent", "1:20", "pfifo", "limit", "0")
    await _ip(
        *tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "pref", "1",
        "u32", "match", "ip", "dst", f"{MDNS_GROUP}/32", "flowid", "1:20",
    )  # fmt: skip


def force_delete_netns(name: str) -> None:
    """Kill whatever runs in namespace ``name`` and delete it (synchronous; for leak guards)."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False).stdout
    for pid in pids.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


class Lan(Sequence[Host]):
    """The hosts of one test LAN, indexable; ``add_host()`` plugs in a late joiner."""

    def __init__(self, prefix: str, subnet: int) -> None:
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.subnet = subnet  # the x of 10.77.x.0/24
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []

    @overload
    def __getitem__(self, index: int) -> Host: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Host]: ...
    def __getitem__(self, index: int | slice) -> Host | Sequence[Host]:
        return self.hosts[index]

    def __len__(self) -> int:
        return len(self.hosts)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    async def _build_switch(self) -> None:
        await _ip("netns", "add", self.switch)
        self.namespaces.append(self.switch)
        await _ip(
            "-n", self.switch, "-batch", "-",
            stdin=(
                "link set lo up\n"
                "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0\n"
                "link set br0 up\n"
            ),
        )  # fmt: skip

    async def add_host(self) -> Host:
        """Create one more host, attached to the bridge, and return it."""
        i = len(self.hosts)
        if i > 250:
            raise NetnsError("a /24 test LAN holds at most 251 hosts")
        host = Host(
            name=f"h{i}",
            netns=f"{self.prefix}-h{i}",
            addr=f"10.77.{self.subnet}.{i + 2}",
            port=f"p{i}",
            switch=self.switch,
        )
        await _ip("netns", "add", host.netns)
        self.namespaces.append(host.netns)
        self.hosts.append(host)
        await _ip(
            "-n", self.switch, "-batch", "-",
            stdin=(
                f"link add {host.port} type veth peer name {host.iface} netns {host.netns}\n"
                f"link set {host.port} master br0\n"
                f"link set {host.port} up\n"
            ),
        )  # fmt: skip
        await _ip(
            "-n", host.netns, "-batch", "-",
            stdin=(
                "link set lo up\n"
                f"addr add {host.addr}/24 dev {host.iface}\n"
                f"link set {host.iface} multicast on\n"
                f"link set {host.iface} up\n"
                f"route add 224.0.0.0/4 dev {host.iface}\n"
            ),
        )  # fmt: skip
        return host

    async def aclose(self) -> None:
        """Stop every process, then delete every namespace (which removes their links)."""
        procs = [p for h in self.hosts for p in h.procs if p.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        # Poll returncode rather than await wait(): wait() also waits for the pipes to close,
        # which an orphan holding them open would delay until it is killed below.
        deadline = asyncio.get_running_loop().time() + KILL_GRACE_S
        # No event exists for "a process exited" that covers these; poll under the deadline.
        while any(p.returncode is None for p in procs) and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(EXIT_POLL_S)
        for ns in reversed(self.namespaces):
            # Whatever still runs in a namespace -- a stubborn process, an orphan -- dies now.
            with contextlib.suppress(NetnsError):
                for pid in (await _ip("netns", "pids", ns)).split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
        for proc in procs:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), KILL_GRACE_S)
        for ns in reversed(self.namespaces):
            with contextlib.suppress(NetnsError):
                await _ip("netns", "del", ns)
        self.namespaces.clear()


@contextlib.asynccontextmanager
async def lan(n: int) -> AsyncIterator[Lan]:
    """``n`` hosts on one bridged /24 with working multicast; torn down on exit, always."""
    net = Lan(f"{RUN_PREFIX}{next(_counter)}", secrets.randbelow(250) + 1)
    try:
        await net._build_switch()
        for _ in range(n):
            await net.add_host()
        yield net
    finally:
        # Shielded so that a cancelled test still cleans up its namespaces.
        await asyncio.shield(net.aclose())
