"""A client endpoint: a process outside the hub attached to it over ``ipc://`` or ``tcp://``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from dpipes.bus import codec, shm
from dpipes.bus.auth import ClientCurve
from dpipes.bus.codec import (
    BYE_LINGER_MS,
    CLOSE_DRAIN_S,
    HEARTBEAT_INTERVAL_S,
    MAX_FRAME_BYTES,
    PEER_TIMEOUT_S,
    Message,
)
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import (
    BusError,
    ClientRefused,
    DecodeError,
    PeerLost,
    RequestTimeout,
    SecurityError,
    WrongServerKey,
)
from dpipes.bus.pump import Pump

log = logging.getLogger(__name__)

CLIENT_MAX_IN_STREAMS = 1024  # a run's client receives stdout, stderr and Pipes of up to 64 stages at once
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
ATTACH_TIMEOUT_S = 5.0  # a hub answers ATTACH at once; longer means nothing listens there
# A node with keys ends the handshake of a client without keys (a mechanism mismatch), at times
# (about half of them, measured on loopback) before the client has read its greeting: the client
# sees no detail, and libzmq tries again. This many of those while attaching mean a node with keys.
SILENT_REFUSALS_WITHOUT_KEYS = 3
# A closing client waits this long at most for the leases its hub still reads: a reader done with
# them gives them back within shm.FREE_DELAY_S, and a segment given back goes to the process's
# stash for its next client instead of being made again (0.7 ms per MiB; a stream of 10k-row
# Arrow batches lost one 8 MiB segment per client, a third of a 64 MB run). A reader that keeps
# its views costs one close this much.
LEASES_BACK_ON_CLOSE_S = 0.05


class Client:
    """Owns one DEALER attached to a hub, and the endpoint that speaks through it.

    Use ``async with Client(hub_endpoint, name=...) as client`` and talk through
    ``client.endpoint``.

    Args:
        hub: the hub's endpoint (``ipc://`` on this host, ``tcp://`` elsewhere).
        name: the endpoint name to ask for ("" lets the hub choose).
        attach_timeout: seconds to wait for the hub to answer.
        curve: keys for a TCP hub that has them.
        window: credit kept open per incoming stream (at least the default).
        shm_reserve: bytes of shared memory made and pre-faulted at attach, when the hub shares
            memory with us, so that a stream with up to that much in flight makes no segment while
            it runs (``dpipes.bus.shm``, *A reserve made at attach*); at most the pool's cap
            (``shm.POOL_BYTES``), else ``ConfigError`` here.
    """

    def __init__(
        self,
        hub: str,
        *,
        name: str = "",
        attach_timeout: float = ATTACH_TIMEOUT_S,
        curve: ClientCurve | None = None,
        window: int = 0,
        shm_reserve: int = 0,
    ) -> None:
        self.hub = hub
        shm.check_reserve(shm_reserve)  # refused here, before anything is attached
        self._shm_reserve = shm_reserve
        self._curve = curve  # keys for a TCP hub that has them; ipc:// is checked by uid instead
        self._name = name
        self._window = max(window, codec.INITIAL_CREDIT_BYTES)  # credit kept open per incoming stream
        self._attach_timeout = attach_timeout
        self._ctx: zmq.Context[Any] | None = None
        self._pump: Pump | None = None
        self._endpoint: Endpoint | None = None
        self._attached: asyncio.Future[str] | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._last_heard = 0.0
        self._silent_refusals = 0  # handshakes ended without a word while attaching without keys
        self._pinged_at: float | None = None  # our first PING since we last heard from the hub
        self._gone: BusError | None = None  # set when the hub said BYE: nothing more can be sent
        self.dropped = 0
        # Shared memory with the hub, when ATTACHED says we may (dpipes.bus.shm).
        self._pool: shm.Pool | None = None
        self._reader: shm.Reader | None = None
        self._frees = shm.Frees(self._send_frees)  # leases our reader has done with
        self._leases_back: asyncio.Future[None] | None = None  # set when the pool has none out (aclose)
        # SHM messages made in this loop pass (each its message's header and the SHM keys of its
        # lease), sent together at its end (or before anything else we send), a stream's run of
        # them as one SHM_BATCH when the hub takes those: a burst of handles is one transfer, which
        # wakes each side's I/O thread and the hub's loop once and is routed once.
        self._handles: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._shm_batch = False  # the hub takes SHM_BATCH
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def endpoint(self) -> Endpoint:
        if self._endpoint is None:
            raise BusError("client not attached: use 'async with Client(...)'")
        return self._endpoint

    @property
    def shm_pool(self) -> shm.Pool | None:
        """The shared memory our large payloads to the hub are leased from (its ``made`` and
        ``from_stash`` count the segments it added); None when the hub shares none with us."""
        return self._pool

    async def __aenter__(self) -> Client:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Attach to the hub; returns once the hub named our endpoint.

        Raises:
            RequestTimeout: nothing answered at ``hub`` in time.
            BusError: the hub refused the name.
        """
        loop = self._loop = self._frees.loop = asyncio.get_running_loop()
        self._ctx = zmq.Context()
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # stream ends are acknowledged; nothing may hang at exit
        sock.setsockopt(zmq.SNDHWM, 100_000)  # a safety net only: credit bounds stream data
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)  # a frame over the limit is never allocated
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        if self._curve is not None:
            sock.setsockopt(zmq.CURVE_SECRETKEY, self._curve.keypair.secret_z85.encode("ascii"))
            sock.setsockopt(zmq.CURVE_PUBLICKEY, self._curve.keypair.public.z85.encode("ascii"))
            sock.setsockopt(zmq.CURVE_SERVERKEY, self._curve.server_key.z85.encode("ascii"))
        self._attached = loop.create_future()
        # A refused handshake is silent on the socket itself: the monitor says why, at once.
        monitor = Pump(sock.get_monitor_socket(HANDSHAKE_FAILURES), self._on_monitor)
        sock.connect(self.hub)
        self._pump = Pump(sock, self._on_frames)
        self._pump.send(codec.encode(codec.Attach(name=self._name, host=shm.host_id(), shm_batch=True)))
        try:
            addr = await asyncio.wait_for(self._attached, self._attach_timeout)
        except TimeoutError:
            self._stop_monitor(monitor)
            await self._close_sockets()
            raise RequestTimeout(f"no dpipes hub answered at {self.hub} within {self._attach_timeout:g} s") from None
        except BaseException:
            self._stop_monitor(monitor)
            await self._close_sockets()
            raise
        self._stop_monitor(monitor)
        assert self._endpoint is not None and self._endpoint.addr == addr
        if self._pool is not None and self._pool.reserve:
            # Before anything is sent: about 0.7 ms per MiB not already in the process's stash.
            added = self._pool.fill_reserve()
            log.debug(
                "client %s: a shared-memory reserve of %d bytes, %d segments added", addr, self._pool.reserve, added
            )
        self._last_heard = time.monotonic()
        self._heartbeat_task = asyncio.create_task(self._heartbeats(), name=f"client {addr} heartbeats")

    def _on_monitor(self, frames: list[Any]) -> None:
        event = parse_monitor_message([f.bytes for f in frames])
        if self._attached is None or self._attached.done():
            return
        curve = self._curve
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            mine = f" (key {curve.keypair.fingerprint})" if curve is not None else ""
            key = curve.keypair.public.z85 if curve is not None else "KEY"
            self._attached.set_exception(
                ClientRefused(
                    f"the node at {self.hub} refused this client{mine}: it does not trust this key or uid; "
                    f"its owner admits it with: dpipes keys trust '{key}' --comment NAME --run 'PROG ...'"
                )
            )
        elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and curve is None:
            self._attached.set_exception(
                SecurityError(f"the node at {self.hub} speaks CURVE: connect with keys (its public key is needed)")
            )
        elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and curve is None:
            self._silent_refusals += 1
            if self._silent_refusals >= SILENT_REFUSALS_WITHOUT_KEYS:
                self._attached.set_exception(
                    SecurityError(
                        f"the node at {self.hub} speaks CURVE, it seems: it ended {self._silent_refusals} handshakes "
                        "without a word, as a node with keys does with a client without: connect with keys "
                        "(its public key is needed)"
                    )
                )
        elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:  # we speak CURVE, it does not
            self._attached.set_exception(
                SecurityError(
                    f"the node at {self.hub} does not speak CURVE (a node started with --insecure?): "
                    "nothing would be encrypted; if you trust the network, connect with --insecure"
                )
            )
        elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and curve is not None:
            # A CURVE server that cannot open our HELLO box drops the connection without a word:
            # it does not hold the secret of the key we expect (found by probing libzmq 4.3). A
            # server without CURVE that closes before we read its greeting looks the same.
            self._attached.set_exception(
                WrongServerKey(
                    f"the node at {self.hub} does not hold the key {curve.server_key.fingerprint} this client "
                    "expects: its key changed, another node listens there, or it runs without keys (--insecure)"
                )
            )

    def _stop_monitor(self, monitor: Pump) -> None:
        if self._pump is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._pump.sock.disable_monitor()
        monitor.close()

    def send(self, msg: Message) -> None:
        """Transport: encode ``msg`` and send it to the hub.

        Raises:
            PeerLost: the hub detached this client (it said BYE).
        """
        if self._gone is not None:
            raise self._gone
        assert self._pump is not None
        if self._pool is not None and msg.HAS_PAYLOAD and msg.payload_bytes >= shm.MIN_PAYLOAD_BYTES:
            header = codec.header_of(msg)
            member = shm.shared_member(self._pool, header, msg.frames)  # type: ignore[attr-defined]
            if member is not None:
                self._send_handle(header, member)
                return
        if isinstance(msg, codec.Shm):  # a payload written in place (OutStream.send_in_place)
            member = {"handle": msg.handle, "lease": msg.lease, "sizes": msg.sizes, "offset": msg.offset}
            if msg.fields:
                member["fields"] = msg.fields
            self._send_handle({"kind": msg.of, "src": msg.src, "dst": msg.dst, "sid": msg.sid, "seq": msg.seq}, member)
            return
        self._send_now(codec.encode(msg))

    def send_frames(self, dst: str, frames: list[Any]) -> None:
        """Transport: send an encoded message to the hub.

        Raises:
            PeerLost: the hub detached this client (it said BYE).
        """
        if self._gone is not None:
            raise self._gone
        assert self._pump is not None
        if self._pool is not None and len(frames) > 1 and _payload_bytes(frames) >= shm.MIN_PAYLOAD_BYTES:
            header = codec.decode_header(frames[0])  # our endpoint's own header
            member = shm.shared_member(self._pool, header, frames[1:])
            if member is not None:
                self._send_handle(header, member)
                return
        self._send_now(frames)

    def _send_handle(self, header: dict[str, Any], member: dict[str, Any]) -> None:
        """Send the SHM standing for the message ``header`` (its lease ``member``: ``shm.shared_member``)
        at the end of this loop pass, with the others made in it."""
        if not self._handles and self._loop is not None:
            self._loop.call_soon(self._end_of_pass)
        self._handles.append((header, member))

    def _end_of_pass(self) -> None:
        """Send this pass's SHM messages, then take in what the hub sent meanwhile, before the
        sender's next pass.

        The loop would run the sender's next pass before the reading of the socket that epoll
        found meanwhile (ready callbacks first, then those of the I/O events): the SHM_FREE of
        the pass before would be taken in a whole pass late, with a pass more of segments leased
        in between. Each segment leased anew is one written longer ago, colder in the CPU's
        cache: 1 MiB chunks circulated in 33 MiB of segments, 25 with this, and a copy of 1 MiB
        into a ring of segments of 32 MiB took 33 us, of 24 MiB 27, of 16 MiB 22.
        """
        self._flush_handles()
        if self._pump is not None:
            self._pump.poll_now()

    def _flush_handles(self) -> None:
        handles, self._handles = self._handles, []
        if self._pump is not None and handles:
            for frame in shm.handle_frames(handles, batch=self._shm_batch):
                self._pump.send([frame])

    def _send_now(self, frames: list[Any]) -> None:
        """Send ``frames`` behind the SHM messages waiting for the end of the pass."""
        assert self._pump is not None
        if self._handles:
            self._flush_handles()
        self._pump.send(frames)

    def lease_filled(self, dst: str, nbytes: int, fill: Callable[[memoryview], Sequence[int]]) -> shm.Lease | None:
        """Transport: room in our pool for a payload to ``dst`` that ``fill`` writes in place; None
        when the hub shares no memory with us, or the pool is full."""
        if self._pool is None or self._gone is not None or nbytes < shm.MIN_PAYLOAD_BYTES:
            return None
        return self._pool.lease_filled(nbytes, dst, fill)

    def _on_frames(self, frames: list[Any]) -> None:
        self._last_heard = time.monotonic()
        self._pinged_at = None
        try:
            msg = codec.decode([f.buffer for f in frames])
        except DecodeError as exc:
            self.dropped += 1
            log_fn = log.warning if self.dropped == 1 else log.debug
            log_fn("client of %s: dropped a malformed message: %s", self.hub, exc)
            return
        if self._endpoint is not None:
            if isinstance(msg, codec.Bye) and msg.src == f"{self._endpoint.node}/":  # from the hub itself
                self._on_bye(msg)
            elif isinstance(msg, codec.Shm):
                self._on_shm(msg)
            elif isinstance(msg, codec.ShmBatch):
                for member in msg.shms():
                    self._on_shm(member)
            elif isinstance(msg, codec.ShmFree):
                if self._pool is not None:
                    self._pool.release(msg.leases, msg.src, trusted=f"{self._endpoint.node}/")
                    if not self._pool.leased and self._leases_back is not None and not self._leases_back.done():
                        self._leases_back.set_result(None)
            elif msg.KIND != "PONG":
                self._endpoint._deliver(msg)
            return
        assert self._attached is not None
        if self._attached.done():
            return
        if isinstance(msg, codec.Attached):
            if msg.shm:
                self._pool = shm.Pool(reserve=self._shm_reserve)
                self._shm_batch = msg.shm_batch
            # Made here, not after start() resumes: what the hub held for us (``Hub.reserve``)
            # follows ATTACHED at once, possibly in this same pass of the pump.
            self._endpoint = Endpoint(msg.addr, self, window=self._window, max_streams=CLIENT_MAX_IN_STREAMS)
            self._attached.set_result(msg.addr)
        elif isinstance(msg, codec.Error):
            self._attached.set_exception(BusError(f"hub at {self.hub} refused to attach ({msg.code}): {msg.message}"))
        elif isinstance(msg, codec.Bye):
            self._attached.set_exception(BusError(f"hub at {self.hub} refused to attach: {msg.reason}"))

    def _on_shm(self, msg: codec.Shm) -> None:
        """A data message whose payload lies in the sender's shared memory: deliver it over views of it."""
        assert self._endpoint is not None
        if self._reader is None:
            self._reader = shm.Reader(self._free_later)
        try:
            inner = msg.inner(self._reader.views(msg.src, msg.handle, msg.lease, msg.sizes, msg.offset))
        except DecodeError as exc:
            self.dropped += 1
            log_fn = log.warning if self.dropped == 1 else log.debug
            log_fn("client of %s: dropped an SHM message from %s: %s", self.hub, msg.src, exc)
            self._free_later(msg.src, msg.lease)  # whatever it was, we will not read it
            return
        self._endpoint._deliver_shared(inner)

    def _free_later(self, sender: str, lease: int, nbytes: int = 0) -> None:
        """The reader dropped a lease's views (maybe inside a garbage collection): tell its sender soon."""
        self._frees.add(sender, lease, nbytes)

    def _send_frees(self, frees: dict[str, list[int]]) -> None:
        if self._endpoint is None or self._gone is not None or self._pump is None:
            return
        for sender, leases in frees.items():
            self._send_now(codec.encode(codec.ShmFree(src=self._endpoint.addr, dst=sender, leases=leases)))

    def _on_bye(self, bye: codec.Bye) -> None:
        """The hub detached us (it stops, we were silent, or we sent it bad messages): fail everything now."""
        if self._gone is not None or self._endpoint is None:
            return
        node = self.endpoint.node
        log.info("client %s: node %r said goodbye: %.300r", self.endpoint.addr, node, bye.reason)
        self._gone = PeerLost(f"node {node!r} at {self.hub} detached client {self.endpoint.addr}: {bye.reason}")
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self.endpoint.fail_all(self._gone)
        self._hub_gone()

    def _hub_gone(self) -> None:
        """Nobody reads our leases any more: the pool may reuse all of them; keep no mapping of its."""
        if self._pool is not None:
            self._pool.reclaim_all()
        if self._reader is not None:
            self._reader.close()

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            if self._pump is not None:
                self._pump.poll_now()  # what waits on the socket was said: heard before it is judged
            now = time.monotonic()
            # Counted from our first PING it left unanswered (it answers each with PONG), not from
            # what we last heard: a process that did not run for a while (stopped, or starved of
            # CPU) did not PING meanwhile, and a hub it did not ask is not silent.
            if self._pinged_at is not None and now - self._pinged_at > PEER_TIMEOUT_S:
                silent = now - self._last_heard
                log.warning("client: hub at %s silent for %.1f s", self.hub, silent)
                self.endpoint.fail_all(PeerLost(f"the node at {self.hub} stopped answering ({silent:.1f} s)"))
                self._hub_gone()
                return
            self.send(codec.Ping(src=self.endpoint.addr, dst=codec.split_addr(self.endpoint.addr)[0] + "/"))
            if self._pinged_at is None:
                self._pinged_at = now

    async def aclose(self) -> None:
        """Say BYE, wait (bounded) for queued messages to leave, close. Idempotent."""
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            try:
                await self._heartbeat_task
            except asyncio.CancelledError:
                pass
            self._heartbeat_task = None
        if self._endpoint is not None and self._pump is not None:
            await self._await_leases()
            ep, self._endpoint = self._endpoint, None
            ep.fail_all(BusError(f"client {ep.addr} closed"))
            if self._gone is None:  # a hub that said BYE has forgotten us already
                self._send_now(codec.encode(codec.Bye(src=ep.addr, dst=codec.split_addr(ep.addr)[0] + "/")))
        await self._close_sockets()

    async def _await_leases(self) -> None:
        """Give the hub ``LEASES_BACK_ON_CLOSE_S`` at most to give back what it still reads, so that
        the pool's segments go to the stash for the process's next client (``shm.Pool.close``)."""
        pool = self._pool
        if pool is None or not pool.leased or self._gone is not None or self._loop is None:
            return
        self._leases_back = self._loop.create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._leases_back, LEASES_BACK_ON_CLOSE_S)
        self._leases_back = None

    async def _close_sockets(self) -> None:
        self._flush_handles()  # before the pool closes: they name its segments
        if self._pool is not None:
            self._pool.close()  # the hub keeps its own mapping of what it still reads
        if self._reader is not None:
            self._reader.close()
        if self._pump is not None:
            try:
                await asyncio.wait_for(self._pump.drained(), CLOSE_DRAIN_S)
            except TimeoutError:
                log.warning("client of %s: closing with %d unsent messages", self.hub, self._pump.backlog)
            self._pump.close(linger_ms=BYE_LINGER_MS)
            self._pump = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


def _payload_bytes(frames: list[Any]) -> int:
    if len(frames) == 2:  # a stream's chunk: no generator
        frame = frames[1]
        return frame.nbytes if isinstance(frame, memoryview) else len(frame)
    return sum(f.nbytes if isinstance(f, memoryview) else len(f) for f in frames[1:])
