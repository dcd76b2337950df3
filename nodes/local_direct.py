"""The short path's direct read: the last stage's output, claimed and read at that stage's node.

What :mod:`dpipes.nodes.direct_read` does for the full client, without asyncio, driven by the loop
of :mod:`dpipes.nodes.local_run` (protocol: *Direct read*). The ``run`` reply of a run that asked
(``direct_read``) holds ``read_token``, ``read_endpoint`` and ``read_key``; :class:`DirectClaim`
then tries, in order:

1. a daemon of ours on this host by the last node's name: its Unix socket in our runtime
   directory, with the hand-written ZMTP dealer (:mod:`dpipes.bus.zmtp`; the node checks our uid,
   no crypto);
2. ``read_endpoint`` over TCP with pyzmq (:mod:`dpipes.bus.zmq_dealer`), imported only now, with
   CURVE and this user's client key when ``read_key`` is set (no key pair: this way is skipped);
3. the same ``claim`` through the entry node: the output takes the old path.

Each way attaches (``ATTACH``, within ``DIRECT_ATTACH_TIMEOUT_S``) and sends ``claim`` to the
node's control endpoint. A refusal (the key, the claim) or silence before ``ATTACHED`` moves on to
the next way. A claim sent and not answered may still have been taken: then only the entry node
is asked, and its ``not-found`` means the first claim stood. The stage reads none of its output
before one claim is taken, so this is decided before the first byte, and nothing is lost or
doubled. Meanwhile the loop goes on serving the entry node (reports, heartbeats, Ctrl-C).
"""

from __future__ import annotations

import os
import time

from dpipes.bus.logs import LazyLogger
from dpipes.nodes.local_wire import CTL, BlockingClient
from dpipes.nodes.results import RunFailed

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

log = LazyLogger(__name__)
note = log.info_if_configured  # where the output is read: shown by a program that set up logging

# The full client's (dpipes.nodes.direct_read, dpipes.nodes.protocol; tests hold them equal).
DIRECT_ATTACH_TIMEOUT_S = 3.0  # a hub answers ATTACH at once; the output waits meanwhile, so give up soon
CONTROL_TIMEOUT_S = 10.0  # how long a node may take to answer `claim`
NOT_FOUND = "not-found"
HANDSHAKE_TIMEOUT_S = 1.0  # a daemon's libzmq answers the ZMTP handshake on its socket at once

ATTACHING, CLAIMING, THROUGH_ENTRY, DONE, FAILED = "attaching", "claiming", "through entry", "done", "failed"


class DirectClaim:
    """The claim of the last stage's held output, one way after another (module docstring).

    ``conn`` is the connection the output comes on once :attr:`state` is ``DONE`` (None: through
    the entry node); ``error`` says why it is ``FAILED`` (no claim taken: the run cannot end well).
    """

    def __init__(
        self, entry: BlockingClient, reply: dict[str, Any], stage: int, node: str, next_id: Callable[[], int]
    ) -> None:
        self.entry = entry
        self.node = node
        self.claim = {"pipeline": reply["pipeline"], "stage": stage, "token": reply["read_token"]}
        self.read_endpoint: str = _text(reply.get("read_endpoint"))
        self.read_key: str = _text(reply.get("read_key"))
        self.next_id = next_id
        self.ways = self._ways()
        self.state = ""
        self.conn: BlockingClient | None = None
        self.maybe: BlockingClient | None = None  # a claim whose answer was lost: it may have been taken
        self.seq = 0
        self.deadline = 0.0
        self.error = ""

    def start(self) -> None:
        self._next()

    def conns(self) -> list[BlockingClient]:
        """The connections to the last node open now (the loop polls and heartbeats them)."""
        return [c for c in (self.conn, self.maybe) if c is not None]

    def settled(self) -> bool:
        return self.state in (DONE, FAILED)

    def close(self) -> None:
        for conn in self.conns():
            conn.close()
        self.conn = self.maybe = None

    # -- the ways, in order --------------------------------------------------------------------

    def _ways(self) -> Iterator[BlockingClient]:
        if self.node and "/" not in self.node and not self.node.startswith("."):
            from dpipes.nodes.runtime_dir import runtime_dir_path

            sock = runtime_dir_path() / f"{self.node}.sock"  # dpipes.nodes.paths.NodeFiles.sock
            if os.path.exists(sock):
                conn = BlockingClient(f"ipc://{sock}")
                if conn.connect(HANDSHAKE_TIMEOUT_S):
                    yield conn
        if self.read_endpoint.startswith("tcp://"):
            remote = self._tcp()
            if remote is not None:
                yield remote

    def _tcp(self) -> BlockingClient | None:
        """Attaching to ``read_endpoint`` with pyzmq (and CURVE when the node has a key), or None."""
        keys = None
        if self.read_key:
            keys = _own_keys(self.read_key)
            if keys is None:
                return None
        from dpipes.bus.zmq_dealer import ZmqDealer
        from dpipes.bus.zmtp import ZmtpError

        try:
            dealer = ZmqDealer(self.read_endpoint, keys=keys)
        except ZmtpError as exc:
            note("cannot attach to node %s at %s: %s", self.node, self.read_endpoint, exc)
            return None
        conn = BlockingClient(self.read_endpoint)
        conn.connect(DIRECT_ATTACH_TIMEOUT_S, dealer)
        return conn

    def _next(self) -> None:
        """Attach the next way, or claim through the entry node when none is left."""
        self.conn = next(self.ways, None)
        if self.conn is not None:
            self.state, self.deadline = ATTACHING, time.monotonic() + DIRECT_ATTACH_TIMEOUT_S
            return
        self.seq = self.next_id()
        self.entry.send("REQUEST", f"{self.node}/{CTL}", seq=self.seq, method="claim", body=self.claim)
        self.state, self.deadline = THROUGH_ENTRY, time.monotonic() + CONTROL_TIMEOUT_S

    def _drop(self, why: str) -> None:
        """This way failed before a claim was sent there: the next one."""
        assert self.conn is not None
        where = self.conn.endpoint
        note("stage %s's output: not read at node %s (%s): %s", self.claim["stage"], self.node, where, why)
        self.conn.close()
        self._next()

    # -- events --------------------------------------------------------------------------------

    def on_message(self, conn: BlockingClient, h: dict[str, Any]) -> bool:
        """Take ``h`` if it is part of the claim (ATTACHED, the claim's answer); whether it was."""
        if conn is self.conn and self.state == ATTACHING:
            try:
                attached = conn.take_attached(h)
            except RunFailed as exc:
                self._drop(str(exc))
                return True
            if attached and conn.node != self.node:  # another daemon under that name's socket
                self._drop(f"it is node {conn.node}")
            elif attached:
                self.seq = self.next_id()
                conn.send("REQUEST", f"{self.node}/{CTL}", seq=self.seq, method="claim", body=self.claim)
                self.state, self.deadline = CLAIMING, time.monotonic() + CONTROL_TIMEOUT_S
            return True
        if h["kind"] not in ("REPLY", "ERROR") or h["seq"] != self.seq or h["sid"] != 0 or not self.seq:
            return False
        ok = h["kind"] == "REPLY" and h.get("ok", True) is True
        body: dict[str, Any] = h["body"] if isinstance(h.get("body"), dict) else {}
        why = h.get("error") or h.get("message") or body.get("code") or "refused"
        if conn is self.conn and self.state == CLAIMING:
            if ok:
                self.state = DONE
                note("stage %s's output: read at node %s (%s)", self.claim["stage"], self.node, conn.endpoint)
            else:  # refused (our key is not the caller's), or undeliverable: not taken there
                self._drop(str(why))
            return True
        if conn is self.entry and self.state == THROUGH_ENTRY:
            if ok:
                self._settle(None)
                note("stage %s's output: read through the entry node", self.claim["stage"])
            elif self.maybe is not None and body.get("code") == NOT_FOUND:
                self._settle(self.maybe)  # our direct claim was taken after all: the output comes there
            else:
                self._fail(f"the output of stage {self.claim['stage']} could not be claimed: {why}")
            return True
        return False

    def tick(self, now: float) -> None:
        """Time out what waits too long; a connection lost while attaching or claiming."""
        if self.state == ATTACHING and self.conn is not None and (self.conn.gone or now >= self.deadline):
            self._drop(self.conn.gone or f"no ATTACHED within {DIRECT_ATTACH_TIMEOUT_S:g} s")
        elif self.state == CLAIMING and self.conn is not None and (self.conn.gone or now >= self.deadline):
            # No answer: ask no other way directly, lest two claims be taken.
            note("stage %s's output: node %s did not answer our claim", self.claim["stage"], self.node)
            self.maybe, self.conn = self.conn, None
            self._next_through_entry()
        elif self.state == THROUGH_ENTRY and now >= self.deadline:
            self._fail(f"the output of stage {self.claim['stage']} could not be claimed: the entry node did not answer")

    def _next_through_entry(self) -> None:
        self.ways = iter(())
        self._next()

    def _settle(self, conn: BlockingClient | None) -> None:
        if self.maybe is not None and self.maybe is not conn:
            self.maybe.close()
        self.conn, self.maybe, self.state = conn, None, DONE

    def _fail(self, error: str) -> None:
        self.close()
        self.state, self.error = FAILED, error


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _own_keys(server_key: str) -> tuple[str, str, str] | None:
    """This user's client key pair if it exists (what an entry node on our host names as its local
    user's key) and the node's key, Z85; never made here: a user without one reads through the
    entry node."""
    from dpipes.bus.errors import DpipesError
    from dpipes.bus.keyring import Keyring
    from dpipes.bus.keys import CLIENT_KEY, PublicKey

    ring = Keyring()
    if not (ring.dir / f"{CLIENT_KEY}.key_secret").exists():
        return None
    try:
        pair = ring.client()[0]
        server = PublicKey.parse(server_key)
    except (DpipesError, ValueError):
        return None
    return pair.public.z85, pair.secret_z85, server.z85


__all__ = ["DirectClaim"]
