"""The wire as the short path of ``dpipes`` speaks it: one blocking DEALER attached to this host's hub.

:mod:`dpipes.nodes.local_run` runs a pipeline without asyncio, the bus client or the typed control
protocol, which cost more to import than a short run takes. This module is its side of the two
specs, spoken from their docstrings as the minimal client of ``examples/`` does:

* the bus (:mod:`dpipes.bus.codec`): a header frame (msgpack map) then payload frames; ``ATTACH``
  and ``ATTACHED``, ``PING``, ``BYE``; a ``BATCH`` of several members in one payload frame. The
  constants below are the codec's, and ``tests/nodes/test_local_run.py`` holds them equal;
* the control protocol (:mod:`dpipes.nodes.protocol`): its version, the node's control endpoint,
  and the shape of the ``exit`` and ``failed`` reports a client takes.

:func:`find_local_daemon` says whether a daemon listens at the host's local socket at all, with one
plain connect, before anything is sent.

Hostile input: a header frame over ``MAX_HEADER_BYTES``, not msgpack, or without the common keys
of their types is dropped and counted (:attr:`BlockingClient.dropped`, logged once per client);
:func:`batch_sizes` refuses a ``BATCH`` whose sizes do not add up; :func:`report_ok` refuses a
report whose fields are not of their types.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from typing import Any

import msgpack
import zmq

from dpipes.bus.logs import LazyLogger
from dpipes.nodes.results import RunFailed

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
LINGER_MS = 2000  # on close: let our last REPLYs, CREDITs and EOF_ACKs reach the hub

DATA_KINDS = frozenset({"BYTES", "STDERR", "PIPES", "OBJECTS", "ARROW"})
STREAM_KINDS = DATA_KINDS | {"BATCH", "EOF", "CANCEL"}


def find_local_daemon() -> str | None:
    """The ``ipc://`` endpoint of this host's running daemon, or None when none answers there."""
    from dpipes.bus.errors import DpipesError
    from dpipes.nodes import paths

    try:
        endpoint = paths.local_endpoint(paths.runtime_dir())
    except (OSError, DpipesError):
        return None
    return endpoint if answers(endpoint) else None


def answers(endpoint: str) -> bool:
    """Whether something listens at the ``ipc://`` endpoint.

    A plain connect says it (a dead daemon leaves its socket file behind: ECONNREFUSED) in a
    fraction of a millisecond instead of a whole bus attachment.
    """
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
    """One blocking DEALER attached to the hub: (header, payload) in and out."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx = zmq.Context()  # ours alone: closed with the socket, nothing else runs on it
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, LINGER_MS)  # our last REPLYs and CREDITs leave on close
        self.sock.setsockopt(zmq.RCVHWM, 0)  # flow control is credit; a dropped frame would lose data
        self.sock.setsockopt(zmq.SNDHWM, 0)  # ... and so is ours towards the hub
        self.sock.connect(endpoint)
        self.addr = ""
        self.node = ""
        self.last_sent = 0.0
        self.last_heard = time.monotonic()
        self.dropped = 0  # malformed messages from the hub: counted, logged once

    def send(self, kind: str, dst: str, *payload: Any, sid: int = 0, seq: int = 0, **fields: Any) -> None:
        header = {"v": PROTOCOL_VERSION, "kind": kind, "src": self.addr, "dst": dst, "sid": sid, "seq": seq, **fields}
        self.sock.send_multipart([msgpack.packb(header), *payload], copy=False)
        self.last_sent = time.monotonic()

    def recv(self) -> tuple[dict[str, Any], list[zmq.Frame]] | None:
        """The next message if one is queued, else None; a malformed one is counted and comes as ``({}, [])``."""
        try:
            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        self.last_heard = time.monotonic()
        header: Any = None
        first = frames[0].buffer
        if len(first) <= MAX_HEADER_BYTES:  # msgpack then bounds every length by the frame's size
            try:
                header = msgpack.unpackb(first, raw=False)
            except Exception:  # msgpack raises several types for bad input; all mean the same here
                header = None
        if not (isinstance(header, dict) and header.get("v") == PROTOCOL_VERSION and well_formed(header)):
            self.drop("message")
            return {}, []
        return header, frames[1:]

    def drop(self, what: str) -> None:
        """Count a malformed message from the hub: logged as a warning the first time, then at debug."""
        self.dropped += 1
        say = log.warning if self.dropped == 1 else log.debug
        say("dropped a malformed %s from the hub at %s (%d so far)", what, self.endpoint, self.dropped)

    def attach(self) -> bool:
        """ATTACH and wait for ATTACHED; False when the hub does not answer (then nothing ran)."""
        self.send("ATTACH", "", name="", host="")  # no host: no shared memory, payloads come inline
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                break
            got = self.recv()
            if got is None or not got[0]:
                continue
            header = got[0]
            if header["kind"] == "ATTACHED" and isinstance(header.get("addr"), str) and "/" in header["addr"]:
                self.addr = header["addr"]
                self.node = self.addr.split("/", 1)[0]
                return True
            if header["kind"] in ("ERROR", "BYE"):
                why = header.get("message") or header.get("reason") or "refused"
                raise RunFailed(f"cannot reach a dpipes node at {self.endpoint}: {why}")
        log.debug("no ATTACHED from %s within %s s", self.endpoint, ATTACH_TIMEOUT_S)
        return False

    def ping_when_due(self) -> None:
        """PING the hub when we sent nothing for a heartbeat interval."""
        if time.monotonic() - self.last_sent >= HEARTBEAT_INTERVAL_S:
            self.send("PING", f"{self.node}/")

    def close(self) -> None:
        """Say BYE when attached, then close the socket and its context."""
        if self.addr:
            self.send("BYE", f"{self.node}/", reason="the run is over")
        self.sock.close()
        self.ctx.term()


def well_formed(h: Mapping[str, Any]) -> bool:
    """The common header keys have their spec's types (codec: HEADER)."""
    return (
        isinstance(h.get("kind"), str)
        and isinstance(h.get("src"), str)
        and isinstance(h.get("dst"), str)
        and type(h.get("sid")) is int
        and type(h.get("seq")) is int
    )


def batch_sizes(h: Mapping[str, Any], payload: list[zmq.Frame]) -> list[int] | None:
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
