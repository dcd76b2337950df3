"""A minimal dpipes client: pyzmq and msgpack only, written from the two spec docstrings.

It shows everything a client in any language needs to run a pipeline on a dpipes node:

* attach to the node's hub with a DEALER socket (``ATTACH``/``ATTACHED``), and ``PING`` it
  every ``HEARTBEAT_INTERVAL_S`` so the hub knows the client is alive;
* call ``run`` on ``<node>/ctl`` (control protocol 2) and act on a failed ``REPLY``'s ``code``;
* stream its own stdin into stage 0 under credit, then ``EOF``, and wait for ``EOF_ACK``;
* read the stages' stdout, stderr and Pipes streams, granting credit as it writes them out, and
  answer each stream's ``EOF`` with ``EOF_ACK``;
* acknowledge the ``exit``/``failed`` reports with empty ``REPLY``s, and stop once every stage
  reported;
* ``cancel`` the run on Ctrl-C or after ``--cancel-after`` seconds;
* exit with the last stage's status (128 + N when a signal N killed it, as a shell does), or 130
  when it cancelled the run (Ctrl-C, `--cancel-after`), as `dpipes` does.

The specs: the module docstrings of ``dpipes.bus.codec`` (frames) and ``dpipes.nodes.protocol``
(the conversation). Run it against a running ``dpipesd``::

    python dpipes_client.py --node tcp://127.0.0.1:5555 'seq 5 | sort -r'
    printf 'b\\na\\n' | python dpipes_client.py --node tcp://127.0.0.1:5555 --stdin sort
    python dpipes_client.py --node tcp://127.0.0.1:5555 --cancel-after 1 'sleep 300 | cat'

``--node`` takes a ZeroMQ endpoint (``tcp://host:port`` or ``ipc:///path``); a bare
``host:port`` means ``tcp://``. ``--pipes`` prints the stages' Dagster Pipes messages to stderr.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import msgpack
import zmq

# From the codec module (its constants; the docstring names them).
BUS_VERSION = 3  # header key "v"
INITIAL_CREDIT_BYTES = 8 * 1024 * 1024  # every stream starts with this much credit
MESSAGE_CREDIT_BYTES = 256  # what a data message costs beyond its payload bytes
HEARTBEAT_INTERVAL_S = 0.5  # clients PING this often
MAX_HEADER_BYTES = 64 * 1024  # a bigger header frame is malformed
# From the protocol module.
PIPELINE_PROTOCOL = 2
RUN_TIMEOUT_S = 60.0  # how long the node may take to answer `run`
# Our own choices.
ATTACH_TIMEOUT_S = 5.0  # a hub that does not answer ATTACH by then is not there
CHUNK_BYTES = 256 * 1024  # how much of our stdin goes into one BYTES message
GRANT_BYTES = 1024 * 1024  # credit owed is granted at this size, or before we wait for more
MAX_EARLY_REPORTS = 4096  # reports kept while `run` is unanswered (one per stage, and a failed)
# The specs do not promise that a stage's `exit` comes after the end of its streams to us: once
# every stage reported, wait this long for streams still open, then give up on them.
STREAM_DRAIN_S = 5.0

STDOUT_KINDS = {"BYTES", "OBJECTS"}


class Client:
    """One attachment to one node's hub: send and receive bus messages as (header, payload)."""

    def __init__(self, endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)  # let the last REPLYs and CREDITs leave on close
        self.sock.connect(endpoint)
        self.addr = ""  # our own "node/name", from ATTACHED
        self.node = ""
        self.last_ping = 0.0
        self.dropped = 0  # malformed messages from the hub: counted, reported once, never raised
        self.trace = False  # print every header sent (>) and received (<) on stderr

    def send(self, kind: str, dst: str, *payload: bytes, sid: int = 0, seq: int = 0, **keys: object) -> None:
        header = {"v": BUS_VERSION, "kind": kind, "src": self.addr, "dst": dst, "sid": sid, "seq": seq, **keys}
        if self.trace and kind != "PING":
            print(f"> {header}", file=sys.stderr)
        self.sock.send_multipart([msgpack.packb(header), *payload], copy=False)

    def recv(self, timeout_s: float) -> tuple[dict, list[bytes]] | None:
        """The next message, None when there is none; a malformed one comes back as ({}, [])."""
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frame, *payload = self.sock.recv_multipart()
        header = None
        if len(frame) <= MAX_HEADER_BYTES:  # msgpack then bounds every length by the frame's size
            try:
                header = msgpack.unpackb(frame, raw=False)
            except Exception:  # msgpack raises several types for bad input; all mean the same here
                pass
        if not (isinstance(header, dict) and header.get("v") == BUS_VERSION and well_formed(header)):
            self.dropped += 1
            if self.dropped == 1:
                print("dpipes_client: dropped a malformed message from the hub", file=sys.stderr)
            return {}, []
        if self.trace and header.get("kind") != "PONG":
            print(f"< {header} + {len(payload)} frame(s)", file=sys.stderr)
        return header, payload

    def attach(self, name: str) -> None:
        self.send("ATTACH", "", name=name)
        deadline = time.monotonic() + ATTACH_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            h = (self.recv(left) or ({}, []))[0]
            if h.get("kind") == "ATTACHED":
                self.addr = h["addr"]
                self.node = self.addr.split("/", 1)[0]
                return
            if h.get("kind") in ("ERROR", "BYE"):  # the name is taken, or another bus version
                raise SystemExit(f"dpipes_client: not attached: {h.get('message') or h.get('reason')}")
        raise SystemExit(f"dpipes_client: no ATTACHED from the hub within {ATTACH_TIMEOUT_S} s")

    def ping_when_due(self) -> None:
        if time.monotonic() - self.last_ping >= HEARTBEAT_INTERVAL_S:
            self.send("PING", f"{self.node}/")  # "node/" is the hub itself
            self.last_ping = time.monotonic()


def well_formed(h: dict) -> bool:
    """The common header keys have their spec's types (codec: HEADER)."""
    return all(isinstance(h.get(k), str) for k in ("kind", "src", "dst")) and all(
        type(h.get(k)) is int for k in ("sid", "seq")
    )


class Inbound:
    """A stream some stage opened to us: where its bytes go and the credit we owe it."""

    def __init__(self, src: str, sid: int) -> None:
        self.src, self.sid = src, sid
        self.received = 0  # payload bytes, for EOF_ACK
        self.owed = 0  # credit consumed and not yet granted back
        self.done = False


class Run:
    """One pipeline run seen from the client: the calls, the streams, the reports."""

    def __init__(self, client: Client, args: argparse.Namespace) -> None:
        self.c, self.args = client, args
        self.ctl = f"{client.node}/ctl"
        self.next_seq = 1
        self.run_seq = 0
        self.pipeline = ""  # the run's id, from the run REPLY
        self.early: list[tuple[str, dict]] = []  # reports that came before it
        self.stages: list[dict] = []
        self.reports: dict[int, dict] = {}  # stage index -> its exit report body
        self.lost: set[int] = set()
        self.failed = ""
        self.inbound: dict[tuple[str, int], Inbound] = {}
        self.cancel_wanted = ""
        self.cancel_sent = False
        # Our stdin stream to stage 0 (codec: Flow control).
        self.feeding = False
        self.stdin_sid, self.stdin_seq = 1, 0
        self.sent_bytes = self.sent_cost = 0
        self.credit = INITIAL_CREDIT_BYTES
        self.stdin_eof = False
        self.stdin_acked = False

    def call(self, method: str, body: dict) -> int:
        seq, self.next_seq = self.next_seq, self.next_seq + 1
        self.c.send("REQUEST", self.ctl, seq=seq, method=method, body=body)
        return seq

    def start(self) -> None:
        body = {"pipeline": self.args.pipeline, "protocol": PIPELINE_PROTOCOL, "stdin": self.args.stdin}
        self.run_seq = self.call("run", body)

    def reported(self) -> bool:
        """Every stage reported `exit` or was listed `lost`: the run is over (protocol, step 3)."""
        return bool(self.stages) and all(i in self.reports or i in self.lost for i in range(len(self.stages)))

    def streams_done(self) -> bool:
        return self.stdin_acked and all(s.done for s in self.inbound.values())

    # -- what arrives --------------------------------------------------------------------------

    def about_stdin(self, h: dict) -> bool:
        """Whether a control message is about our stream into stage 0."""
        return bool(self.stages) and h["src"] == self.stages[0]["addr"] and h["sid"] == self.stdin_sid

    def on_message(self, h: dict, payload: list[bytes]) -> None:
        kind = h.get("kind")
        if kind == "REPLY" and h.get("seq") == self.run_seq:
            self.on_run_reply(h)
        elif kind == "REQUEST":
            self.on_report(h)
        elif kind in STDOUT_KINDS or kind in ("STDERR", "PIPES"):
            self.on_data(h, payload)
        elif kind == "BATCH" and len(payload) == 1:  # small messages of one stream in one frame
            start = 0
            for i, size in enumerate(h.get("sizes") or []):
                member = {**h, "kind": h.get("of") or "BYTES", "seq": h["seq"] + i}
                self.on_data(member, [payload[0][start : start + size]])  # each as if it came alone
                start += size
        elif kind == "EOF":
            stream = self.stream(h)
            stream.done = True
            self.grant(stream)
            self.c.send("EOF_ACK", h["src"], sid=h["sid"], total=stream.received)
        elif kind == "CANCEL" and self.about_stdin(h) and not self.stdin_acked:
            # CANCEL travels both ways: (stage 0, sid 1) may also name stage 0's own stream to us.
            # As an endpoint does, take it for the stream we send: a sender must stop at once.
            self.feeding, self.stdin_acked = False, True  # stage 0 stopped reading, as SIGPIPE
        elif kind == "CANCEL":
            self.stream(h).done = True
        elif kind == "CREDIT" and self.about_stdin(h):
            self.credit += h.get("bytes", 0)
        elif kind == "EOF_ACK" and self.about_stdin(h):
            self.stdin_acked = True
        elif kind == "ERROR":
            print(f"dpipes_client: bus error {h.get('code')} at {h.get('node')}: {h.get('message')}", file=sys.stderr)
            if h.get("sid") == 0 and h.get("seq") == self.run_seq:  # our `run` never arrived
                self.failed = f"{h.get('code')}: {h.get('message')}"
            elif self.stages and h["sid"] == self.stdin_sid and h.get("to") == self.stages[0]["addr"]:
                self.feeding, self.stdin_acked = False, True  # our stdin cannot be delivered
        # PONG, LINK and REPLYs to cancel need nothing from us.

    def on_run_reply(self, h: dict) -> None:
        body = h.get("body") or {}
        if not h.get("ok"):
            code = body.get("code") or "no code"  # act on the code, never on the wording
            field = f" ({body['field']})" if body.get("field") else ""
            print(f"dpipes_client: run refused [{code}]{field}: {h.get('error')}", file=sys.stderr)
            raise SystemExit(2 if code in ("syntax", "bad-request") else 1)
        self.pipeline, self.stages = body["pipeline"], body["stages"]
        self.feeding = self.args.stdin and not body.get("stdin_direct", False)
        self.stdin_acked = not self.feeding
        for method, early in self.early:  # reports that came before this reply (the spec's step 3)
            self.take_report(method, early)
        self.early.clear()

    def on_report(self, h: dict) -> None:
        method, body = h.get("method"), h.get("body") or {}
        self.c.send("REPLY", h["src"], seq=h["seq"], ok=True, body={}, error="")
        if method not in ("exit", "failed"):
            return
        if not self.pipeline:  # a stage may end before `run` is answered: keep its report until then
            if len(self.early) < MAX_EARLY_REPORTS:
                self.early.append((method, body))
            return
        self.take_report(method, body)

    def take_report(self, method: str, body: dict) -> None:
        if body.get("pipeline") != self.pipeline:
            return  # not ours: acknowledged and ignored
        if method == "exit":
            self.reports[body["stage"]] = body
        else:
            self.failed = body.get("error", "failed")
            self.lost.update(body.get("lost", []))
            print(f"dpipes_client: run failed: {self.failed}", file=sys.stderr)

    def stream(self, h: dict) -> Inbound:
        key = (h["src"], h["sid"])
        if key not in self.inbound:
            self.inbound[key] = Inbound(*key)
        return self.inbound[key]

    def on_data(self, h: dict, payload: list[bytes]) -> None:
        stream = self.stream(h)
        kind = h["kind"]
        if stream.done:
            return  # we cancelled it; what was already under way still arrives
        try:
            for frame in payload:
                if kind in STDOUT_KINDS:
                    sys.stdout.buffer.write(frame)
                elif kind == "STDERR":
                    sys.stderr.buffer.write(frame)
                elif self.args.pipes:
                    print(f"pipes[{h.get('stage')}]: {bytes(frame).decode(errors='replace')}", file=sys.stderr)
            (sys.stdout if kind in STDOUT_KINDS else sys.stderr).flush()
        except BrokenPipeError:  # our reader exited (`| head`): stop the pipeline as SIGPIPE would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.c.send("CANCEL", stream.src, sid=stream.sid, reason="the reader closed its end")
            stream.done = True
            return
        size = sum(len(f) for f in payload)
        stream.received += size
        stream.owed += size + MESSAGE_CREDIT_BYTES  # consumed: now we may grant it back
        if stream.owed >= GRANT_BYTES:
            self.grant(stream)

    def grant(self, stream: Inbound) -> None:
        if stream.owed and not stream.done:
            self.c.send("CREDIT", stream.src, sid=stream.sid, bytes=stream.owed)
        stream.owed = 0

    def grant_all(self) -> None:
        """Before we wait: give back every byte we already wrote out."""
        for stream in self.inbound.values():
            self.grant(stream)

    # -- what we send --------------------------------------------------------------------------

    def may_feed(self) -> bool:
        return self.feeding and not self.stdin_eof and self.sent_cost < self.credit

    def feed(self) -> None:
        """Send one chunk of our stdin to stage 0, or EOF when it ends."""
        chunk = os.read(sys.stdin.fileno(), CHUNK_BYTES)
        dst = self.stages[0]["addr"]
        self.stdin_seq += 1
        if not chunk:
            self.stdin_eof = True
            self.c.send("EOF", dst, sid=self.stdin_sid, seq=self.stdin_seq, total=self.sent_bytes)
            return
        self.c.send("BYTES", dst, chunk, sid=self.stdin_sid, seq=self.stdin_seq)
        self.sent_bytes += len(chunk)
        self.sent_cost += len(chunk) + MESSAGE_CREDIT_BYTES

    def cancel(self) -> None:
        if self.pipeline and not self.cancel_sent:
            self.cancel_sent = True
            self.call("cancel", {"pipeline": self.pipeline, "reason": self.cancel_wanted})

    def status(self) -> int:
        if self.cancel_wanted:  # we stopped it: its output is not whole, whatever the stages said
            return 130
        last = self.reports.get(len(self.stages) - 1)
        if last is None:
            return 1
        if last.get("signal"):
            return 128 + last["signal"]
        return last["code"] if last.get("code") else (1 if self.failed or last.get("error") else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", required=True, help="the entry node's hub: tcp://HOST:PORT or ipc://PATH")
    parser.add_argument("--stdin", action="store_true", help="stream our stdin into the first stage")
    parser.add_argument("--cancel-after", type=float, metavar="SECONDS", help="cancel the run after this long")
    parser.add_argument("--pipes", action="store_true", help="print the stages' Pipes messages on stderr")
    parser.add_argument("--trace", action="store_true", help="print every header on stderr (not PING/PONG)")
    parser.add_argument("pipeline")
    args = parser.parse_args()
    endpoint = args.node if "://" in args.node else f"tcp://{args.node}"

    client = Client(endpoint)
    client.trace = args.trace
    client.attach(f"example-{os.getpid()}")
    run = Run(client, args)

    def on_sigint(_signum: int, _frame: object) -> None:
        run.cancel_wanted = "interrupted"
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C stops us at once

    signal.signal(signal.SIGINT, on_sigint)
    started = time.monotonic()
    run.start()
    poller = zmq.Poller()
    poller.register(client.sock, zmq.POLLIN)
    stdin = sys.stdin.fileno()
    reported_at = None
    while not (run.reported() and run.streams_done()):
        if run.reported():
            reported_at = reported_at or time.monotonic()
            if time.monotonic() - reported_at > STREAM_DRAIN_S:
                print("dpipes_client: a stream did not end; its output may be incomplete", file=sys.stderr)
                break
        if args.cancel_after is not None and time.monotonic() - started >= args.cancel_after:
            run.cancel_wanted = run.cancel_wanted or "cancelled"
        if run.cancel_wanted:
            run.cancel()
        if not run.stages and time.monotonic() - started > RUN_TIMEOUT_S:
            raise SystemExit("dpipes_client: the node did not answer `run`")
        if run.failed and not run.stages:
            break
        poller.register(stdin, zmq.POLLIN if run.may_feed() else 0)  # 0: do not watch it now
        client.ping_when_due()
        run.grant_all()
        ready = dict(poller.poll(int(HEARTBEAT_INTERVAL_S * 1000)))
        while (got := client.recv(0)) is not None:  # drain the socket, then wait again
            run.on_message(*got)
        if ready.get(stdin) and run.may_feed():
            run.feed()
    for i in sorted(run.reports):  # the per-stage status vector
        r = run.reports[i]
        why = f" (cancelled: {r['cancelled']})" if r.get("cancelled") else ""
        print(f"dpipes_client: stage {i} on {r.get('node')}: {r.get('status')}{why}", file=sys.stderr)
    client.sock.close()
    sys.exit(run.status())


if __name__ == "__main__":
    main()
