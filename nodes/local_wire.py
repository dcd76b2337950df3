"""The wire as the short path of ``dpipes`` speaks it: one DEALER attached to this host's hub.

:mod:`dpipes.nodes.local_run` runs a pipeline without asyncio, the bus client or the typed control
protocol, which cost more to import than a short run takes. This module is its side of the two
specs, spoken from their docstrings as the minimal client of ``examples/`` does:

* the bus (:mod:`dpipes.bus.codec`): a header frame (msgpack map) then payload frames; ``ATTACH``
  and ``ATTACHED``, ``PING``, ``BYE``; a ``BATCH`` of several members in one payload frame. The
  constants below are the codec's, and ``tests/nodes/test_local_run.py`` holds them equal;
* the control protocol (:mod:`dpipes.nodes.protocol`): its version, the node's control endpoint,
  and the shape of the ``exit`` and ``failed`` reports a client takes.

The socket is :class:`dpipes.bus.zmtp.Dealer`, ZMTP spoken without libzmq: importing pyzmq took
longer than the rest of a short run's client. :func:`find_local_daemon` says whether a daemon
listens at the host's local socket at all, with one plain connect, before anything is sent.

Hostile input: a header frame over ``MAX_HEADER_BYTES``, not msgpack, or without the common keys
of their types is dropped and counted (:attr:`BlockingClient.dropped`, logged once per client);
:func:`batch_sizes` refuses a ``BATCH`` whose sizes do not add up; :func:`report_ok` refuses a
report whose fields are not of their types.
"""

from __future__ import annotations

import time

import msgpack

from dpipes.bus.logs import LazyLogger
from dpipes.bus.zmtp import Dealer, ZmtpError
from dpipes.nodes.results import RunFailed

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

log = LazyLogger(__name__)  # logging is imported only if something is logged (dpipes.bus.logs)

# The bus's constants (dpipes.bus.codec; tests/nodes/test_local_run.py holds them equal).
PROTOCOL_VERSION = 3
MAX_HEADER_BYTES = 64 * 1024
MAX_BATCH_MESSAGES = 4096
INITIAL_CREDIT_BYTES = 8 * 1024 * 1024
MESSAGE_CREDIT_BYTES = 256
HEARTBEAT_INTERVAL_S = 0.5  # we PING the hub this often, as every attached client must
PEER_TIMEOUT_S = 3.0  # a hub silent this long is gone (it answers each PING with PONG)
# The control protocol's (dpipes.nodes.protocol).
PIPELINE_PROTOCOL = 2
CTL = "ctl"
RUN_TIMEOUT_S = 60.0  # how long the entry node may take to answer `run`

ATTACH_TIMEOUT_S = 5.0  # a live local hub answers ATTACH at once (the bus client waits as long)
LOCAL_PROBE_TIMEOUT_S = 1.0  # a live local daemon accepts a connection at once
LINGER_S = 2.0  # on close: let our last REPLYs, CREDITs and EOF_ACKs reach the hub

DATA_KINDS = frozenset({"BYTES", "STDERR", "PIPES", "OBJECTS", "ARROW"})
STREAM_KINDS = DATA_KINDS | {"BATCH", "EOF", "CANCEL"}


def local_endpoint() -> str | None:
    """The ``ipc://`` endpoint of this host's local socket, whether a daemon answers there or not;
    None when the runtime directory cannot be used."""
    from dpipes.bus.errors import DpipesError
    from dpipes.nodes.runtime_dir import local_socket, runtime_dir

    try:
        return f"ipc://{local_socket(runtime_dir())}"
    except (OSError, DpipesError):
        return None


def find_local_daemon() -> str | None:
    """The ``ipc://`` endpoint of this host's running daemon, or None when none answers there."""
    endpoint = local_endpoint()
    return endpoint if endpoint is not None and answers(endpoint) else None


def answers(endpoint: str) -> bool:
    """Whether something listens at the ``ipc://`` endpoint.

    A plain connect says it (a dead daemon leaves its socket file behind: ECONNREFUSED) in a
    fraction of a millisecond instead of a whole bus attachment.
    """
    import socket

    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(LOCAL_PROBE_TIMEOUT_S)
        probe.connect(endpoint.removeprefix("ipc://"))
    except OSError:
        return False
    finally:
        probe.close()
    return True


class BlockingClient:
    """One DEALER attached to the hub: (header, payload) in and out, without blocking after :meth:`attach`.

    ``gone`` says why the connection ended (the hub closed it, or broke the protocol); nothing
    more comes then, and what is sent is dropped.
    """

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.dealer: Any = None  # a Dealer, or a transport with its methods (dpipes.bus.zmq_dealer)
        self.addr = ""
        self.node = ""
        self.last_sent = 0.0
        self.last_heard = time.monotonic()
        self.pinged_at: float | None = None  # our first PING since we last heard from the hub
        self.dropped = 0  # malformed messages from the hub: counted, logged once
        self.gone = ""

    def fileno(self) -> int:
        assert self.dealer is not None
        return int(self.dealer.fileno())

    def wants_write(self) -> bool:
        """Whether sent messages wait for the socket to be writable (poll for it, then :meth:`flush`)."""
        return self.dealer is not None and not self.gone and self.dealer.wants_write()

    def flush(self) -> None:
        if self.dealer is not None and not self.gone:
            try:
                self.dealer.flush()
            except ZmtpError as exc:
                self._lose(exc)

    def send(self, kind: str, dst: str, *payload: Any, sid: int = 0, seq: int = 0, **fields: Any) -> None:
        header = {"v": PROTOCOL_VERSION, "kind": kind, "src": self.addr, "dst": dst, "sid": sid, "seq": seq, **fields}
        self.last_sent = time.monotonic()
        if self.dealer is None or self.gone:
            return
        try:
            self.dealer.send([msgpack.packb(header), *payload])
        except ZmtpError as exc:
            self._lose(exc)

    def recv(self) -> tuple[dict[str, Any], list[memoryview]] | None:
        """The next message if one is queued, else None; a malformed one is counted and comes as ``({}, [])``."""
        if self.dealer is None or self.gone:
            return None
        try:
            frames = self.dealer.recv()
        except ZmtpError as exc:
            self._lose(exc)
            return None
        if frames is None:
            return None
        self.last_heard = time.monotonic()
        self.pinged_at = None
        header: Any = None
        first = frames[0]
        if len(first) <= MAX_HEADER_BYTES:  # msgpack then bounds every length by the frame's size
            try:
                header = msgpack.unpackb(first, raw=False)
            except Exception:  # msgpack raises several types for bad input; all mean the same here
                header = None
        if not (isinstance(header, dict) and header.get("v") == PROTOCOL_VERSION and well_formed(header)):
            self.drop("message")
            return {}, []
        return header, frames[1:]

    def _lose(self, exc: ZmtpError) -> None:
        self.gone = str(exc) or "the connection ended"
        log.debug("lost the hub at %s: %s", self.endpoint, self.gone)

    def drop(self, what: str) -> None:
        """Count a malformed message from the hub: logged as a warning the first time, then at debug."""
        self.dropped += 1
        say = log.warning if self.dropped == 1 else log.debug
        say("dropped a malformed %s from the hub at %s (%d so far)", what, self.endpoint, self.dropped)

    def attach(self) -> bool:
        """Connect, ATTACH and wait for ATTACHED; False when the hub does not answer (then nothing ran)."""
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        if not self.connect(ATTACH_TIMEOUT_S):
            return False
        assert self.dealer is not None
        while (left := deadline - time.monotonic()) > 0 and not self.gone:
            got = self.recv()
            if got is None:
                if not self.gone:
                    _wait_readable(self.dealer.fileno(), left, write=self.wants_write())
                    self.flush()
                continue
            header = got[0]
            if header and self.take_attached(header):
                return True
        log.debug("no ATTACHED from %s within %s s (%s)", self.endpoint, ATTACH_TIMEOUT_S, self.gone or "silence")
        return False

    def connect(self, timeout_s: float, dealer: Any = None) -> bool:
        """Connect (the ZMTP handshake, within ``timeout_s``) and send ATTACH; False when nothing
        answers at an ``ipc://`` endpoint. ``dealer``: a connected one to use instead (another
        transport with :class:`~dpipes.bus.zmtp.Dealer`'s methods)."""
        if dealer is None:
            try:
                dealer = Dealer(self.endpoint.removeprefix("ipc://"), timeout_s=timeout_s)
            except (OSError, ZmtpError) as exc:  # TimeoutError is an OSError
                log.debug("no ZMTP handshake with %s: %s", self.endpoint, exc)
                return False
        self.dealer = dealer
        self.last_heard = time.monotonic()
        self.send("ATTACH", "", name="", host="")  # no host: no shared memory, payloads come inline
        return True

    def take_attached(self, header: Mapping[str, Any]) -> bool:
        """Whether ``header`` is the hub's ATTACHED (then we are attached, at ``addr``).

        Raises:
            RunFailed: the hub refused us (``ERROR`` or ``BYE``).
        """
        if header["kind"] == "ATTACHED" and isinstance(header.get("addr"), str) and "/" in header["addr"]:
            self.addr = header["addr"]
            self.node = self.addr.split("/", 1)[0]
            return True
        if header["kind"] in ("ERROR", "BYE"):
            why = header.get("message") or header.get("reason") or "refused"
            raise RunFailed(f"cannot reach a dpipes node at {self.endpoint}: {why}")
        return False

    def pending(self) -> bool:
        """Whether a message waits although the descriptor may not signal it (a libzmq socket's)."""
        return self.dealer is not None and not self.gone and bool(self.dealer.pending())

    def ping_when_due(self) -> None:
        """PING the hub when we sent nothing for a heartbeat interval."""
        now = time.monotonic()
        if now - self.last_sent >= HEARTBEAT_INTERVAL_S:
            self.send("PING", f"{self.node}/")
            if self.pinged_at is None:
                self.pinged_at = now

    def silent_for(self, now: float) -> float:
        """How long the hub has left a PING of ours unanswered (it answers each with PONG). Counted
        from the PING, not from what we last heard: a client that did not run for a while (stopped,
        or starved of CPU) did not PING meanwhile, and a hub it did not ask is not silent."""
        return 0.0 if self.pinged_at is None else now - self.pinged_at

    def close(self) -> None:
        """Say BYE when attached, then close the socket once what we sent has left (or ``LINGER_S``)."""
        if self.addr:
            self.send("BYE", f"{self.node}/", reason="the run is over")
        if self.dealer is not None:
            self.dealer.close(0.0 if self.gone else LINGER_S)
            self.dealer = None
        self.gone = self.gone or "closed"


def _wait_readable(fd: int, timeout_s: float, *, write: bool = False) -> None:
    """Wait until ``fd`` is readable (or writable, with ``write``) or ``timeout_s`` has passed."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLIN | (select.POLLOUT if write else 0))
    poller.poll(max(1, int(timeout_s * 1000) + 1))


def well_formed(h: Mapping[str, Any]) -> bool:
    """The common header keys have their spec's types (codec: HEADER)."""
    return (
        isinstance(h.get("kind"), str)
        and isinstance(h.get("src"), str)
        and isinstance(h.get("dst"), str)
        and type(h.get("sid")) is int
        and type(h.get("seq")) is int
    )


def batch_sizes(h: Mapping[str, Any], payload: list[memoryview]) -> list[int] | None:
    """The sizes of a ``BATCH``'s members, or None when they do not fit its one payload frame."""
    sizes, of = h.get("sizes"), h.get("of") or "BYTES"
    if (
        len(payload) != 1
        or of not in ("BYTES", "STDERR")
        or not isinstance(sizes, list)
        or not 0 < len(sizes) <= MAX_BATCH_MESSAGES
        or not all(type(n) is int and n >= 0 for n in sizes)
        or sum(sizes) != len(payload[0])
    ):
        return None
    return sizes


# An exit report's fields, with the types a StageResult keeps (protocol: Reports).
EXIT_FIELDS: dict[str, tuple[type, ...]] = {
    "code": (int,),
    "signal": (int,),
    "status": (str,),
    "sigpipe": (bool,),
    "error": (str,),
    "cancelled": (str,),
    "stderr_tail": (str,),
    "started": (float, int),
    "ended": (float, int),
    "bytes_in": (int,),
    "bytes_out": (int,),
}


def report_ok(method: str, body: Mapping[str, Any]) -> bool:
    """The report's fields we use have their spec's types (an unknown key is ignored)."""
    if not isinstance(body.get("pipeline"), str):
        return False
    if method == "failed":
        lost = body.get("lost", [])
        return isinstance(body.get("error", ""), str) and isinstance(lost, list)
    if type(body.get("stage")) is not int:
        return False
    for name, types in EXIT_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) and bool not in types:
            return False
        if not isinstance(value, types):
            return False
    return True


__all__ = ["BlockingClient", "answers", "batch_sizes", "find_local_daemon", "report_ok", "well_formed"]
