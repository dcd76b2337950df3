"""A daemon under a hostile sender: its memory stays bounded and comes back when the sender leaves."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest
import zmq

from dpipes.bus import codec
from dpipes.bus.client import Client
from dpipes.bus.errors import BusError
from dpipes.bus.hub import Hub
from dpipes.discovery.directory import MAX_GOSSIP_PEERS, MAX_KNOWN_NODES, UNREACHABLE_EXPIRY_S
from dpipes.nodes.protocol import GOSSIP_INTERVAL_S, PIPELINE_PROTOCOL, NegotiateReply, NegotiateRequest, call
from dpipes.nodes.run import known_nodes
from tests.nodes.daemons import daemons, environment
from tests.procs import Resources, resources

FLOOD_BYTES = 256 << 20  # what the hostile sender sent: 256 MiB
CHUNK_BYTES = 1 << 20
# What the daemon may hold while flooded: one stage window (8 MiB by default) and one message beyond
# it, plus what libzmq and the allocator keep in flight; far below the 256 MiB it would hold unbounded.
RSS_BOUND_KIB = 96 * 1024
RSS_SETTLED_SLACK_KIB = 24 * 1024  # after the sender left: allocator noise only
WAIT_S = 30.0


def _flood(tcp: str, targets: list[str], stop: threading.Event) -> tuple[int, list[str]]:
    """A raw DEALER that attaches and sends FLOOD_BYTES to each target, ignoring credit; the bytes
    it sent and the ERROR codes it heard."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
    sock.setsockopt(zmq.SNDHWM, 2)  # a send returns once the daemon's side takes it, not into our own queue
    sock.setsockopt(zmq.SNDTIMEO, int(WAIT_S * 1000))
    sent, codes = 0, []
    try:
        sock.connect(tcp)
        sock.send_multipart(codec.encode(codec.Attach(src="", dst="")))
        attached = codec.decode(sock.recv_multipart())
        assert isinstance(attached, codec.Attached), attached
        me = attached.addr
        chunk = b"\xa5" * CHUNK_BYTES
        for target in targets:
            for sid in (1, 2, 3, 4):  # several streams: each is refused on its own
                for seq in range(1, FLOOD_BYTES // CHUNK_BYTES // 4 + 1):
                    if stop.is_set():
                        return sent, codes
                    header = codec.encode(codec.Bytes(src=me, dst=target, sid=sid, seq=seq, frames=(b"",)))[0]
                    sock.send_multipart([header, chunk], copy=False)
                    sent += CHUNK_BYTES
                    while sock.poll(0):
                        msg = codec.decode(sock.recv_multipart())
                        if isinstance(msg, codec.Error):
                            codes.append(msg.code)
        while not {"over-limit", "credit-exceeded"} <= set(codes):  # the answers may come after the flood
            msg = codec.decode(sock.recv_multipart())  # zmq.Again after WAIT_S: the test fails
            if isinstance(msg, codec.Error):
                codes.append(msg.code)
        sock.send_multipart(codec.encode(codec.Bye(src=me, dst="")))
        return sent, codes
    finally:
        sock.close(0)
        ctx.term()


async def test_a_credit_ignoring_sender_cannot_grow_the_daemon(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        pid = alpha.proc.pid
        client = Client(alpha.tcp)
        await client.start()
        try:  # a stage endpoint, negotiated and never started: nobody reads it, no credit is granted
            reply: NegotiateReply = await call(
                client.endpoint,
                "alpha",
                NegotiateRequest(pipeline="flooded", stage=0, argv=("cat",), protocol=PIPELINE_PROTOCOL),
            )
        finally:
            await client.aclose()
        baseline = resources(pid)
        stop = threading.Event()
        flood = asyncio.create_task(asyncio.to_thread(_flood, alpha.tcp, ["alpha/ctl", reply.addr], stop))
        peak = baseline.rss_kib
        try:
            while not flood.done():
                peak = max(peak, resources(pid).rss_kib)
                await asyncio.sleep(0.01)  # sampling the daemon's memory while the flood runs
        finally:
            stop.set()
        sent, codes = await flood
        assert sent == 2 * FLOOD_BYTES
        assert "over-limit" in codes and "credit-exceeded" in codes, set(codes)
        assert peak - baseline.rss_kib < RSS_BOUND_KIB, f"RSS {baseline.rss_kib >> 10} -> {peak >> 10} MiB"

        async def settled() -> int:
            while (rss := resources(pid).rss_kib) > baseline.rss_kib + RSS_SETTLED_SLACK_KIB:
                await asyncio.sleep(0.1)  # polling a condition under a deadline
            return rss

        await asyncio.wait_for(settled(), WAIT_S)
        print(f"daemon RSS {baseline.rss_kib >> 10} MiB, peak {peak >> 10} MiB under {sent >> 20} MiB")
        assert alpha.proc.returncode is None  # and the daemon is still serving


async def test_a_daemon_takes_its_client_limits_from_its_configuration(rt: Path, tmp_path: Path) -> None:
    conf = tmp_path / "limits.toml"
    conf.write_text("[limits]\nmax_clients_per_address = 2\n")
    async with daemons(rt, ["alpha"], extra={"alpha": ["--config", str(conf)]}) as (alpha,):
        clients = [Client(alpha.tcp) for _ in range(3)]
        try:
            for client in clients[:2]:
                await client.start()
            with pytest.raises(BusError, match=r"node alpha has 2 clients attached from 127\.0\.0\.1, its limit"):
                await clients[2].start()
        finally:
            for client in clients:
                await client.aclose()


async def test_a_gossip_flood_keeps_a_daemons_links_bounded_and_a_real_node_joins(rt: Path, tmp_path: Path) -> None:
    # 1,124 made-up peers on closed loopback ports, in bodies the validator takes, from a linked liar.
    flood = {f"fake{i:04d}": f"tcp://127.1.{i // 250}.{i % 250 + 1}:1" for i in range(1124)}
    names = sorted(flood)
    bodies = [
        {"peers": {n: flood[n] for n in names[i : i + MAX_GOSSIP_PEERS]}} for i in range(0, 1124, MAX_GOSSIP_PEERS)
    ]
    async with daemons(rt, ["alpha"]) as (alpha,), Hub("liar") as liar:
        pid = alpha.proc.pid
        await liar.connect_peer(alpha.tcp)

        async def linked_back() -> None:  # alpha's own link to the liar: its sockets belong in the baseline
            while not any(e.name == "liar" and e.up for e in await known_nodes(alpha.tcp)):
                await asyncio.sleep(0.05)  # polling a condition under a deadline

        await asyncio.wait_for(linked_back(), WAIT_S)
        baseline = resources(pid)
        ep = liar.endpoint("ctl")

        async def known() -> int:
            return len(await known_nodes(alpha.tcp))

        rounds = 0
        while await known() < 1 + MAX_KNOWN_NODES:  # the gossip rate limit lets one body through at a time
            ep.send(codec.Request(dst="alpha/ctl", method="gossip", body=bodies[rounds % len(bodies)]))
            rounds += 1
            assert rounds < 1000, "the daemon never admitted the bound of made-up peers"
            await asyncio.sleep(0.05)  # paced so that bodies pass the rate limit; not a wait for the network
        for body in bodies:  # and the rest of the flood, refused
            ep.send(codec.Request(dst="alpha/ctl", method="gossip", body=body))
        flooded = resources(pid)
        assert flooded.fds - baseline.fds < 4 * MAX_KNOWN_NODES < len(flood), f"{baseline} -> {flooded}"
        (tmp_path / "late").mkdir(mode=0o700)
        argv = [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", "late"]
        argv += ["--listen", "127.0.0.1:0", "--insecure", "--peer", alpha.host_port]
        late = await asyncio.create_subprocess_exec(
            *argv,
            env=environment(tmp_path / "late"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:

            async def joined() -> None:
                while not any(e.name == "late" and e.up for e in await known_nodes(alpha.tcp)):
                    await asyncio.sleep(0.05)  # polling a condition under a deadline

            await asyncio.wait_for(joined(), WAIT_S)

            async def unlinked() -> Resources:  # the made-up links expire as unreachable and are closed
                while (now := resources(pid)).fds > baseline.fds + 4:
                    await asyncio.sleep(0.2)  # polling a condition under a deadline
                return now

            after = await asyncio.wait_for(unlinked(), UNREACHABLE_EXPIRY_S + 3 * GOSSIP_INTERVAL_S + WAIT_S)
        finally:
            late.terminate()
            await late.wait()
        print(f"gossip flood: {baseline} -> {flooded} -> {after}")
