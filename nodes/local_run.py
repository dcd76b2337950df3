"""A run on this host's daemon, without asyncio: the short path of the ``dpipes`` command.

``dpipes 'echo x | cat'`` against a running daemon used to spend most of its time importing what
the run never used: asyncio, the bus client and its codec classes, the typed control protocol.
:func:`run_local` does the same run with one Unix socket that speaks ZMTP itself (pyzmq alone took
longer to import than the rest of the client) and msgpack, and with nothing of dpipes but what a
run on this host needs:

* the daemon's ``ipc://`` socket in the runtime directory (:mod:`dpipes.nodes.runtime_dir`), and its
  descriptor drop (:mod:`dpipes.nodes.fdpass`), which hands our stdin and stdout to the stages
  that run there, so that their bytes never pass through us;
* the bus and the control protocol's ``run``, ``cancel`` and reports, spoken from their specs on
  one socket (:mod:`dpipes.nodes.local_wire`, over :mod:`dpipes.bus.zmtp`);
* our stdout and stderr, written in order through a thread where their reader may be slow
  (:mod:`dpipes.nodes.fd_output`);
* what a run comes to, :mod:`dpipes.nodes.results`, shared with the full path, so that exit
  codes, each stage's status and the messages a user reads are the same.
* a last stage on another node, read at that node (:mod:`dpipes.nodes.local_direct`, protocol:
  *Direct read*): its output comes on a second connection, polled in the same loop, and the
  credit and acknowledgements of a stream go back on the connection it came on.

This module is the run itself: the request, the loop, the streams a run opens and their credit.
It takes a run in bytes mode with no live view and no Pipes JSON file; :func:`run_local` returns
None, having sent nothing, when no daemon answers on this host, and the caller then uses
:func:`dpipes.nodes.run.run_pipeline` (which also starts an embedded node or says why the local
daemon is gone). What the run may still need in flight (stdin fed over the bus when the first
stage is on another node, stdout read from the bus when the last is, stderr, Pipes messages,
Ctrl-C) it does in one loop over one ``select.poll``: the hub's socket (for writing too while
what we sent waits for it), our stdin when it may be fed, and a wake-up pipe for signals and for
the writer threads of output that may block (a pipe or socket), so that a slow reader of our
stdout never stops our heartbeats.

Hostile input: a malformed header is dropped and counted by :mod:`dpipes.nodes.local_wire`
(logged once per run), and so is a ``BATCH`` whose sizes do not add up; a report whose body is not
of its method's shape is answered ``bad-request``.
"""

from __future__ import annotations

import os
import select
import signal
import time

from dpipes.bus import logs
from dpipes.bus.logs import LazyLogger
from dpipes.nodes.fd_output import Output
from dpipes.nodes.local_wire import (
    CTL,
    DATA_KINDS,
    EXIT_FIELDS,
    HEARTBEAT_INTERVAL_S,
    INITIAL_CREDIT_BYTES,
    MESSAGE_CREDIT_BYTES,
    PEER_TIMEOUT_S,
    PIPELINE_PROTOCOL,
    RUN_TIMEOUT_S,
    STREAM_KINDS,
    BlockingClient,
    batch_sizes,
    local_endpoint,
    report_ok,
)
from dpipes.nodes.results import EXIT_INTERRUPTED, RunFailed, RunResult, StageResult, run_exit_code

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from dpipes.nodes.local_direct import DirectClaim

log = LazyLogger(__name__)  # logging is imported only if something is logged (dpipes.bus.logs)

# The full client's (dpipes.nodes.run; tests/nodes/test_local_run.py holds them equal).
CANCEL_WAIT_S = 15.0  # after Ctrl-C or a failure: how long we wait for the stages' exit reports
STDIN_CHUNK_BYTES = 256 * 1024

GRANT_BYTES = INITIAL_CREDIT_BYTES // 4  # credit goes back once a quarter of the window was taken
MAX_EARLY_REPORTS = 4096  # reports kept while `run` is unanswered (one per stage, and a failed)
MAX_EARLY_MESSAGES = 65536  # stream messages kept meanwhile (each stream's are bounded by its credit)
# The last stage's node, where its output was read, went away: the entry node, linked to it, says
# so within its peer timeout (naming the node and the stages lost); past this, we say it ourselves.
DIRECT_LOST_WAIT_S = 2 * PEER_TIMEOUT_S
# How long one pass drains one connection: the output read at the last node may come faster than
# we take it, and the entry node's reports and heartbeats must not wait behind it.
DRAIN_BUDGET_S = 0.05


def run_local(
    pipeline: str,
    *,
    stdin: bool,
    pipefail: bool = False,
    workdir: str = "",
    pipes: Mapping[str, Any] | None = None,
    require: tuple[str, ...] = (),
    entry: str | None = None,
    stdin_fd: int = 0,
    stdout_fd: int = 1,
    stderr_fd: int = 2,
    handle_sigint: bool = True,
    edge_format: str = "csv",
    direct_read: bool = True,
) -> RunResult | None:
    """Run ``pipeline`` (bytes mode) through this host's daemon, or through ``entry`` (``ipc://``).

    Args:
        stdin: stream ``stdin_fd`` into the first stage (else it reads nothing).
        pipes: the run's Pipes options, as :class:`dpipes.nodes.run.RunOptions` has them.
        edge_format: a program's bytes at an edge with a plugin (``csv``, ``ndjson``, ``arrow``).
        direct_read: read a last stage on another node at that node (:mod:`dpipes.nodes.local_direct`).

    Returns:
        What the run came to, as :func:`dpipes.nodes.run.run_pipeline` returns it; None when no
        daemon answers (nothing was sent: the caller takes the full path).

    Raises:
        RunFailed: the node refused the pipeline before it started (``code`` says why:
            ``syntax`` for a pipeline that does not parse), or did not answer.
    """
    endpoint = local_endpoint() if entry is None else entry
    if endpoint is None:
        return None
    from dpipes.nodes.fdpass import hand_over

    client = BlockingClient(endpoint)
    try:
        if not client.attach():
            return None
        fds = {"stdout": stdout_fd, **({"stdin": stdin_fd} if stdin else {})}
        token = hand_over(endpoint, fds) or ""
        run = _Run(client, pipeline, stdin, stdin_fd, stdout_fd, stderr_fd)
        body = {
            "pipeline": pipeline,
            "protocol": PIPELINE_PROTOCOL,
            "mode": "bytes",
            "stdin": stdin,
            "require": list(require),
            "user": _current_user(),
            "pipes": dict(pipes or {}),
            "local_fds": token,
            "cwd": _cwd(),
            "workdir": workdir,
            "progress": False,
            "workflow": {},
            "edge_format": edge_format,
            "direct_read": direct_read,
        }
        return run.run(body, pipefail=pipefail, handle_sigint=handle_sigint)
    finally:
        client.close()


class _Inbound:
    """A stream a stage opened to us: where its data goes and the credit we owe it back."""

    __slots__ = ("conn", "done", "kind", "owed", "received", "sid", "src", "stage")

    def __init__(self, src: str, sid: int, stage: StageResult | None, conn: BlockingClient) -> None:
        self.src, self.sid, self.stage = src, sid, stage
        self.conn = conn  # the hub it came through, where its credit and acknowledgements go
        self.received = 0  # payload bytes, for EOF_ACK
        self.owed = 0  # credit units consumed and not yet granted back
        self.done = False
        self.kind = ""


class _Run:
    """One run, from the ``run`` request to the last report."""

    def __init__(
        self, client: BlockingClient, pipeline: str, stdin: bool, stdin_fd: int, stdout_fd: int, stderr_fd: int
    ) -> None:
        self.c = client
        self.ctl = f"{client.node}/{CTL}"
        self.text = pipeline
        self.stdin, self.stdin_fd = stdin, stdin_fd
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stdout = Output(stdout_fd, self.wake_w)
        self.stderr = Output(stderr_fd, self.wake_w)
        self.next_id = 1  # request ids and our stream ids, from one counter as an endpoint draws them
        self.run_seq = 0
        self.pipeline = ""
        self.stages: list[StageResult] = []
        self.last_addr = ""
        self.early: list[tuple[str, dict[str, Any]]] = []
        self.early_messages: list[tuple[dict[str, Any], list[memoryview]]] = []
        self.error = ""
        self.refused_before = ""  # the run was refused or never answered: RunFailed with this
        self.refused_code = ""
        self.inbound: dict[tuple[str, int], _Inbound] = {}
        self.interrupts = 0
        self.cancel_sent = False
        self.done_at: float | None = None  # when to stop waiting for reports that may never come
        self.refused_reports = 0
        # Our stdin stream to stage 0, when the node did not take our stdin itself.
        self.feeding = False
        self.feed_addr = ""
        self.feed_sid = 0
        self.feed_seq = 0
        self.fed_bytes = 0
        self.spent = 0
        self.credit = INITIAL_CREDIT_BYTES
        # The last stage's output, claimed at its node (dpipes.nodes.local_direct), when offered.
        self.direct: DirectClaim | None = None
        self.direct_lost_at: float | None = None  # its connection ended before the run did

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    # -- the loop ------------------------------------------------------------------------------

    def run(self, body: dict[str, Any], *, pipefail: bool, handle_sigint: bool) -> RunResult:
        previous_handler: Any = None
        previous_wakeup = -1
        if handle_sigint:  # before asking: a Ctrl-C while the nodes start the stages is not lost
            previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
            previous_wakeup = signal.set_wakeup_fd(self.wake_w)
        try:
            self.run_seq = self._id()
            self.c.send("REQUEST", self.ctl, seq=self.run_seq, method="run", body=body)
            started = time.monotonic()
            self._loop(started)
        finally:
            if handle_sigint:
                signal.set_wakeup_fd(previous_wakeup)
                signal.signal(signal.SIGINT, previous_handler)
            if self.direct is not None:
                self.direct.close()
            self.stdout.flush()
            self.stderr.flush()
            os.close(self.wake_r)
            os.close(self.wake_w)
        if self.refused_before:
            raise RunFailed(self.refused_before, code=self.refused_code)
        if not self.pipeline:  # interrupted twice before the reply
            return RunResult("", [], EXIT_INTERRUPTED, "interrupted before the pipeline started")
        code = run_exit_code(self.stages, interrupted=bool(self.interrupts), error=self.error, pipefail=pipefail)
        return RunResult(self.pipeline, self.stages, code, self.error)

    def _loop(self, started: float) -> None:
        poller = select.poll()
        poller.register(self.wake_r, select.POLLIN)
        polled: dict[int, BlockingClient] = {}
        cut: set[BlockingClient] = set()  # drained in part last pass: more may wait in its buffer
        watching_stdin = False
        while not self._over():
            now = time.monotonic()
            if self.done_at is not None and now >= self.done_at:
                return
            if not self.pipeline and now - started > RUN_TIMEOUT_S:
                self.refused_before = f"run at {self.ctl} got no reply within {RUN_TIMEOUT_S:g} s"
                return
            if self.c.gone:
                self._lost(f"lost the node at {self.c.endpoint}: {self.c.gone}")
                return
            if self.direct is not None:
                self._tend_direct(now)
            if self._may_feed() != watching_stdin:  # stdin is watched only while it may be fed
                watching_stdin = not watching_stdin
                if watching_stdin:
                    poller.register(self.stdin_fd, select.POLLIN)
                else:
                    poller.unregister(self.stdin_fd)
            conns = [self.c, *(self.direct.conns() if self.direct is not None else ())]
            for conn in conns:
                conn.ping_when_due()
            self._grant_all()
            live = {conn.fileno(): conn for conn in conns if not conn.gone}
            for fd in polled.keys() - live.keys():
                poller.unregister(fd)
            for fd, conn in live.items():  # register() of a registered fd modifies it
                poller.register(fd, select.POLLIN | (select.POLLOUT if conn.wants_write() else 0))
            polled = live
            wait_s = HEARTBEAT_INTERVAL_S if self.done_at is None else min(HEARTBEAT_INTERVAL_S, self.done_at - now)
            if cut or any(conn.pending() for conn in live.values()):  # more waits, unsignalled: no wait
                wait_s = 0.0
            ready = dict(poller.poll(max(0 if wait_s <= 0 else 1, int(wait_s * 1000))))
            if ready.get(self.wake_r):
                self._woken()
            cut.clear()
            for fd, conn in live.items():
                if ready.get(fd, 0) & select.POLLOUT:
                    conn.flush()
                drain_until = time.monotonic() + DRAIN_BUDGET_S
                while (got := conn.recv()) is not None:  # drain the socket, then wait again
                    if got[0]:
                        self._on_message(got[0], got[1], conn)
                    if self.refused_before or self.c.addr == "":
                        return
                    if time.monotonic() > drain_until:  # the other connection's turn (its heartbeats)
                        cut.add(conn)
                        break
            if watching_stdin and ready.get(self.stdin_fd) and self._may_feed():
                self._feed()
            # Silence is judged after the sockets were drained: what waits there was said.
            now = time.monotonic()
            for conn in live.values():
                if conn is not self.c and not conn.gone and conn.silent_for(now) > PEER_TIMEOUT_S:
                    conn.gone = f"no word from the node for {PEER_TIMEOUT_S:g} s"
            if self.c.silent_for(now) > PEER_TIMEOUT_S:
                self._lost(f"no word from the node at {self.c.endpoint} for {PEER_TIMEOUT_S:g} s")
                return

    def _tend_direct(self, now: float) -> None:
        """The claim's timeouts; a connection to the last node lost while its output is read there."""
        direct = self.direct
        assert direct is not None
        if not direct.settled():
            direct.tick(now)
            if direct.error and not self.error:  # nobody will read the output: the run cannot end well
                self.error = direct.error
                self._cancel(direct.error)
            return
        reading = direct.conn
        if reading is None or not reading.gone or self.stages[-1].reported:
            return
        if self.direct_lost_at is None:  # the entry node, which links to it, says which node was lost
            self.direct_lost_at = now
        elif now - self.direct_lost_at > DIRECT_LOST_WAIT_S and not self.error:
            last = self.stages[-1]
            self.error = f"lost node '{direct.node}' while reading stage {last.index}'s output there: {reading.gone}"
            self._cancel(self.error)

    def _over(self) -> bool:
        if self.refused_before:
            return True
        if self.interrupts > 1:  # a second Ctrl-C: stop waiting
            return True
        if self.direct is not None and not self.direct.settled():
            return False
        return bool(self.stages) and all(s.reported for s in self.stages)

    def _woken(self) -> None:
        try:
            while os.read(self.wake_r, 512):
                pass
        except BlockingIOError:
            pass
        for output in (self.stdout, self.stderr):
            for stream, units in output.taken():
                if stream is not None:
                    stream.owed += units
        if self.stdout.broken:
            self._stdout_closed()
        if self.interrupts and not self.cancel_sent and self.pipeline:
            self._cancel("interrupted by the user (Ctrl-C)")

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        self.interrupts += 1  # the wake-up fd got the signal's byte: the loop acts on it

    def _lost(self, why: str) -> None:
        if not self.pipeline:
            self.refused_before = f"cannot reach a dpipes node at {self.c.endpoint}: {why}"
        elif not self.error:
            self.error = why

    # -- what arrives --------------------------------------------------------------------------

    def _on_message(self, h: dict[str, Any], payload: list[memoryview], conn: BlockingClient) -> None:
        kind = h["kind"]
        if self.direct is not None and not self.direct.settled() and self.direct.on_message(conn, h):
            return
        if not self.pipeline and kind in STREAM_KINDS:
            # Stages start before `run` is answered: whose stream this is (the last stage's stdout,
            # or not) is known from the reply. Kept until then, each stream bounded by its credit.
            if len(self.early_messages) < MAX_EARLY_MESSAGES:
                self.early_messages.append((h, payload))  # from the entry node: no other is attached yet
            else:
                log.warning("dropped a %s from %s that came before the run reply: too many", kind, h["src"])
            return
        if kind == "REPLY":
            if h["seq"] == self.run_seq and not self.pipeline:
                self._on_run_reply(h)
        elif kind == "REQUEST":
            self._on_report(h, conn)
        elif kind in DATA_KINDS:
            self._on_data(h, kind, payload, conn)
        elif kind == "BATCH":
            self._on_batch(h, payload, conn)
        elif kind == "EOF":
            stream = self._stream(h, conn)
            stream.done = True
            conn.send("EOF_ACK", h["src"], sid=h["sid"], total=stream.received)
        elif kind == "CANCEL" and self._about_feed(h):
            self.feeding = False  # stage 0 stopped reading, as SIGPIPE
        elif kind == "CANCEL":
            self._stream(h, conn).done = True
        elif kind == "CREDIT" and self._about_feed(h):
            units = h.get("bytes")
            if type(units) is int and units > 0:
                self.credit += units
        elif kind == "ERROR":
            self._on_error(h)
        elif kind == "BYE" and conn is not self.c:  # the last stage's node: what it means, _tend_direct says
            why = h.get("reason") if isinstance(h.get("reason"), str) else ""
            conn.gone = f"the node detached this client: {why or 'it stopped'}"
        elif kind == "BYE":
            why = h.get("reason") if isinstance(h.get("reason"), str) else ""
            self._lost(f"the node at {self.c.endpoint} detached this client: {why or 'it stopped'}")
            self.c.addr = ""  # nothing more will come, and we may not send
        # PONG, LINK, EOF_ACK of our stdin and the REPLY to cancel need nothing from us.

    def _on_run_reply(self, h: dict[str, Any]) -> None:
        body: dict[str, Any] = h["body"] if isinstance(h.get("body"), dict) else {}
        if h.get("ok", True) is not True:
            code = body.get("code") if isinstance(body.get("code"), str) else ""
            error = h.get("error") if isinstance(h.get("error"), str) else ""
            self.refused_before, self.refused_code = error or f"run at {self.ctl} failed", code or "internal"
            return
        stages = body.get("stages")
        if not (isinstance(body.get("pipeline"), str) and isinstance(stages, list) and stages):
            self.refused_before, self.refused_code = f"malformed reply of run at {self.ctl}", "bad-request"
            return
        results = []
        for i, s in enumerate(stages):
            if not (isinstance(s, dict) and isinstance(s.get("node"), str) and isinstance(s.get("argv"), list)):
                self.refused_before, self.refused_code = f"malformed reply of run: stages.{i}", "bad-request"
                return
            placed, offer = s.get("placed", ""), s.get("offer", "")
            results.append(
                StageResult(
                    i,
                    s["node"],
                    [str(a) for a in s["argv"]],
                    placed=placed if isinstance(placed, str) else "",
                    offer=offer if isinstance(offer, str) else "",
                )
            )
        self.pipeline, self.stages = body["pipeline"], results
        self.last_addr = f"{results[-1].node}/{self.pipeline}.{len(results) - 1}"
        if self.stdin and not body.get("stdin_direct"):
            addr = stages[0].get("addr")
            if isinstance(addr, str):
                self.feeding, self.feed_sid, self.feed_addr = True, self._id(), addr
        for h_early, payload in self.early_messages:  # stages' streams that came before this reply
            self._on_message(h_early, payload, self.c)
        self.early_messages.clear()
        for method, early in self.early:  # reports that came before this reply (protocol, step 3)
            self._take_report(method, early)
        self.early.clear()
        token = body.get("read_token")
        if isinstance(token, str) and token:  # the last stage holds its output until we claim it
            from dpipes.nodes.local_direct import DirectClaim

            self.direct = DirectClaim(self.c, body, len(results) - 1, results[-1].node, self._id)
            self.direct.start()
        if self.interrupts:  # Ctrl-C came while the stages were starting: cancel them now
            self._cancel("interrupted by the user (Ctrl-C)")

    def _on_report(self, h: dict[str, Any], conn: BlockingClient) -> None:
        method, body = h.get("method"), h.get("body")
        if method == "progress":  # one-way, and we asked for none
            return
        if method not in ("exit", "failed") or not isinstance(body, dict) or not report_ok(method, body):
            code = "unknown-method" if method not in ("exit", "failed") else "bad-request"
            error = f"a dpipes client takes no {method!r} request" if code == "unknown-method" else "malformed report"
            conn.send("REPLY", h["src"], seq=h["seq"], ok=False, body={"code": code, "field": ""}, error=error)
            self.refused_reports += 1
            say = log.warning if self.refused_reports == 1 else log.debug
            say("refused a %s report from %s: %s", str(method)[:64], h["src"], error)
            return
        conn.send("REPLY", h["src"], seq=h["seq"], ok=True, body={}, error="")
        if not self.pipeline:  # a stage may end before `run` is answered: keep its report until then
            if len(self.early) < MAX_EARLY_REPORTS:
                self.early.append((method, body))
            return
        self._take_report(method, body)

    def _take_report(self, method: str, body: dict[str, Any]) -> None:
        if body.get("pipeline") != self.pipeline:
            return  # not ours: acknowledged and ignored
        if method == "exit":
            index = body["stage"]
            if not 0 <= index < len(self.stages):
                return
            stage = self.stages[index]
            for name in EXIT_FIELDS:
                if name in body:
                    setattr(stage, name, body[name])
            stage.reported = True
            return
        if not self.error:
            self.error = body.get("error") or "the pipeline failed"
            for index in body.get("lost", []):
                if type(index) is int and 0 <= index < len(self.stages) and not self.stages[index].reported:
                    lost = self.stages[index]
                    lost.status, lost.reported = f"lost with node {lost.node}", True
            self.done_at = time.monotonic() + CANCEL_WAIT_S

    def _stream(self, h: dict[str, Any], conn: BlockingClient) -> _Inbound:
        key = (h["src"], h["sid"])
        stream = self.inbound.get(key)
        if stream is None:
            stream = self.inbound[key] = _Inbound(h["src"], h["sid"], self._stage_of(h["src"]), conn)
        return stream

    def _stage_of(self, addr: str) -> StageResult | None:
        name = addr.split("/", 1)[-1]
        head, _, index = name.rpartition(".")
        if head != self.pipeline or not index.isdigit() or int(index) >= len(self.stages):
            return None
        return self.stages[int(index)]

    def _on_batch(self, h: dict[str, Any], payload: list[memoryview], conn: BlockingClient) -> None:
        sizes, of = batch_sizes(h, payload), h.get("of") or "BYTES"
        if sizes is None:
            conn.drop("BATCH")
            return
        view, start = payload[0], 0
        for size in sizes:  # each member as if it came alone
            self._on_data(h, of, [view[start : start + size]], conn)
            start += size

    def _on_data(self, h: dict[str, Any], kind: str, frames: list[memoryview], conn: BlockingClient) -> None:
        stream = self._stream(h, conn)
        if stream.done:
            return  # we cancelled it; what was already under way still arrives
        stream.kind = stream.kind or kind
        size = sum(len(f) for f in frames)
        stream.received += size
        if kind == "PIPES":
            for frame in frames:
                self._on_pipes(stream.stage, frame)
            stream.owed += size + MESSAGE_CREDIT_BYTES
            return
        if kind == "BYTES" and h["src"] == self.last_addr:
            output, token = self.stdout, stream
            if output.broken:
                self._stdout_closed()
                return
        else:  # STDERR, and anything a stage other than the last sends us
            output, token = self.stderr, stream
        units = size + MESSAGE_CREDIT_BYTES
        for i, frame in enumerate(frames):  # the message's credit comes back with its last frame
            last = i == len(frames) - 1
            if output.write(frame, token if last else None, units if last else 0) and last:
                stream.owed += units
        if not frames:
            stream.owed += units
        if stream.owed >= GRANT_BYTES:
            self._grant(stream)
        if self.stdout.broken:
            self._stdout_closed()

    def _on_pipes(self, stage: StageResult | None, frame: memoryview) -> None:
        """One Pipes frame from a stage: kept by the stage's handler, its logs written now."""
        from dpipes.nodes.pipes_frames import PipesFrameError, decode_frame

        logs.set_up()  # the Pipes decoder logs through logging itself

        item = decode_frame(frame)
        if stage is None:
            return
        tag = f"[stage {stage.index} {stage.argv[0]}@{stage.node}] ".encode()
        if isinstance(item, PipesFrameError):
            stage.pipes.handle_frame_error(item)
            self.stderr.write(tag + f"Pipes: {item}\n".encode())
            return
        stage.pipes.handle_message(item)
        method, params = item.get("method"), item.get("params") or {}
        if method == "log":
            self.stderr.write(tag + f"{params.get('level', 'INFO')} {params.get('message', '')}\n".encode())
        elif method == "closed" and params.get("exception"):
            self.stderr.write(tag + f"Pipes closed with {stage.pipes_exception}\n".encode())

    def _stdout_closed(self) -> None:
        """Our reader went away (``| head``): stop the last stage's output, as SIGPIPE would."""
        for stream in self.inbound.values():
            if stream.src == self.last_addr and stream.kind == "BYTES" and not stream.done:
                stream.conn.send("CANCEL", stream.src, sid=stream.sid, reason="the output of dpipes was closed")
                stream.done = True

    def _on_error(self, h: dict[str, Any]) -> None:
        message = h.get("message") if isinstance(h.get("message"), str) else ""
        code = h.get("code") if isinstance(h.get("code"), str) else ""
        if h["sid"] == 0 and h["seq"] == self.run_seq and not self.pipeline:  # our `run` never arrived
            self.refused_before = f"run at {self.ctl} failed: {message or code}"
            return
        if self.feeding and h["sid"] == self.feed_sid and h.get("to") == self.feed_addr:
            self.feeding = False  # our stdin cannot be delivered: as a closed pipe
            return
        log.debug("bus error %s: %s", code, message)

    # -- what we send --------------------------------------------------------------------------

    def _grant(self, stream: _Inbound) -> None:
        if stream.owed and not stream.done:
            stream.conn.send("CREDIT", stream.src, sid=stream.sid, bytes=stream.owed)
        stream.owed = 0

    def _grant_all(self) -> None:
        """Before we wait: give back every unit whose data we already wrote out."""
        for stream in self.inbound.values():
            if stream.owed:
                self._grant(stream)

    def _about_feed(self, h: dict[str, Any]) -> bool:
        return self.feed_sid != 0 and h["sid"] == self.feed_sid and h["src"] == self.feed_addr

    def _may_feed(self) -> bool:
        return self.feeding and self.spent < self.credit

    def _feed(self) -> None:
        """One chunk of our stdin to stage 0, or EOF when it ends."""
        try:
            chunk = os.read(self.stdin_fd, STDIN_CHUNK_BYTES)
        except OSError:
            chunk = b""
        self.feed_seq += 1
        if not chunk:
            self.feeding = False
            self.c.send("EOF", self.feed_addr, sid=self.feed_sid, seq=self.feed_seq, total=self.fed_bytes)
            return
        self.c.send("BYTES", self.feed_addr, chunk, sid=self.feed_sid, seq=self.feed_seq)
        self.fed_bytes += len(chunk)
        self.spent += len(chunk) + MESSAGE_CREDIT_BYTES

    def _cancel(self, reason: str) -> None:
        self.cancel_sent = True
        seq = self._id()
        self.c.send("REQUEST", self.ctl, seq=seq, method="cancel", body={"pipeline": self.pipeline, "reason": reason})
        self.done_at = time.monotonic() + CANCEL_WAIT_S


def _current_user() -> str:
    """Who is asking, as this process's user sees it (``run.user``; not authenticated): what
    :func:`getpass.getuser` says, without importing :mod:`getpass` (and :mod:`termios`)."""
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        if user := os.environ.get(name):
            return user
    import pwd

    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, OSError):
        return str(os.getuid())


def _cwd() -> str:
    """Our working directory, where stages on our host start; "" when it is gone (deleted)."""
    try:
        return os.getcwd()
    except OSError:
        return ""


__all__ = ["run_local"]
