"""A hub that trusts no header: bad messages get coded answers, limits drop senders, BYE is said.

Everything here runs against a real hub over real sockets; the peers and clients that misbehave
are raw ZeroMQ sockets, since the library's own never send such messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgpack
import pytest
import zmq
import zmq.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpipes.bus import codec
from dpipes.bus.client import Client
from dpipes.bus.errors import BusError, DecodeError, PeerLost
from dpipes.bus.hub import Hub
from dpipes.bus.hub import boundary as hub_boundary
from dpipes.bus.hub import clients as hub_clients

WAIT_S = 10.0  # the bound on every wait for the network in these tests


async def until(condition: Any, timeout: float = WAIT_S) -> None:
    """Poll ``condition()`` until true, failing the test after ``timeout``."""

    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


def tracebacks(records: list[logging.LogRecord]) -> list[str]:
    """Log records that carry a traceback, or say a handler failed."""
    return [r.getMessage() for r in records if r.exc_info or "handler failed" in r.getMessage()]


def pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def request_header(src: str, dst: str, /, **changes: Any) -> dict[str, Any]:
    header = codec.header_of(codec.Request(src=src, dst=dst, seq=41, method="m"))
    header.update(changes)
    return header


def corpus(src: str, dst: str) -> list[tuple[str, list[bytes]]]:
    """Malformed messages from ``src`` to ``dst``, each with what is wrong with it."""

    def without(key: str) -> list[bytes]:
        header = request_header(src, dst)
        del header[key]
        return [pack(header)]

    return [
        ("not msgpack", [b"\xc1"]),
        ("truncated msgpack", [pack(request_header(src, dst))[:-3]]),
        ("an array, not a map", [pack([1, 2, 3])]),  # type: ignore[arg-type]
        ("no v", without("v")),
        ("no kind", without("kind")),
        ("no src", without("src")),
        ("no dst", without("dst")),
        ("no sid", without("sid")),
        ("no seq", without("seq")),
        ("v is a bool", [pack(request_header(src, dst, v=True))]),
        ("sid is a bool", [pack(request_header(src, dst, sid=True))]),
        ("seq is negative", [pack(request_header(src, dst, seq=-1))]),
        ("kind is a list", [pack(request_header(src, dst, kind=["REQUEST"]))]),
        ("kind is unknown", [pack(request_header(src, dst, kind="SHOUT"))]),
        ("src is a map", [pack(request_header(src, dst, src={"a": 1}))]),
        ("huge dst", [pack(request_header(src, "x" * (codec.MAX_STRING_CHARS + 1)))]),
        ("method is an int", [pack(request_header(src, dst, method=5))]),
        ("body is a list", [pack(request_header(src, dst, body=[1]))]),
        ("payload on a REQUEST", [pack(request_header(src, dst)), b"payload"]),
        ("payload on a CREDIT", [pack(codec.header_of(codec.Credit(src=src, dst=dst, sid=3))), b"x"]),
        ("OBJECTS without its batch", [pack(codec.header_of(codec.Objects(src=src, dst=dst, sid=3, count=1)))]),
        ("OBJECTS over-counted", [pack(codec.header_of(codec.Objects(src=src, dst=dst, sid=3, count=9))), b"\x91\x80"]),
        ("too many frames", [pack(codec.header_of(codec.Bytes(src=src, dst=dst, sid=3)))] + [b""] * codec.MAX_FRAMES),
        ("a header over the limit", [b"\x80" * (codec.MAX_HEADER_BYTES + 1)]),
    ]


@contextlib.asynccontextmanager
async def raw_socket(ctx: zmq.asyncio.Context, endpoint: str) -> AsyncIterator[zmq.asyncio.Socket]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(0)


async def answer(sock: zmq.asyncio.Socket) -> codec.Message:
    return codec.decode(await asyncio.wait_for(sock.recv_multipart(), WAIT_S))


async def attach(sock: zmq.asyncio.Socket, name: str) -> str:
    await sock.send_multipart(codec.encode(codec.Attach(name=name)))
    attached = await answer(sock)
    assert isinstance(attached, codec.Attached), attached
    return attached.addr


async def say_hello(sock: zmq.asyncio.Socket, node: str) -> None:
    await sock.send_multipart(codec.encode(codec.Hello(src=f"{node}/", node=node, instance="i1")))
    assert isinstance(await answer(sock), codec.Welcome)


@pytest.fixture
def answer_every_bad_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """No rate limit on answers, no dropping: every bad message gets its own answer."""
    monkeypatch.setattr(hub_boundary, "BAD_MESSAGE_INTERVAL_S", 0.0)
    monkeypatch.setattr(hub_boundary, "MAX_BAD_MESSAGES", 10**9)


@pytest.mark.usefixtures("answer_every_bad_message")
async def test_every_malformed_message_gets_a_coded_answer_and_the_hub_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dpipes")
    ctx = zmq.asyncio.Context()
    try:
        async with (
            Hub("alpha") as a,
            raw_socket(ctx, a.ipc_endpoint) as client,
            raw_socket(ctx, a.tcp_endpoint) as peer,
        ):
            sink = a.endpoint("sink")
            addr = await attach(client, "fuzzed")
            await say_hello(peer, "beta")
            for who, sock, src in [("client", client, addr), ("peer", peer, "beta/ep")]:
                for what, frames in corpus(src, "alpha/sink"):
                    key = addr if who == "client" else "beta"
                    before = a.stats[key].bad
                    await sock.send_multipart(frames)
                    error = await answer(sock)
                    assert isinstance(error, codec.Error), (who, what, error)
                    assert error.code == "bad-message", (who, what, error)
                    assert error.node == "alpha" and error.message, (who, what)
                    assert a.stats[key].bad == before + 1, (who, what)
                # (b) honest messages still go through, from both
                await sock.send_multipart(codec.encode(codec.Request(src=src, dst="alpha/sink", method=f"hi {who}")))
                got = await sink.recv(timeout=WAIT_S)
                assert isinstance(got, codec.Request) and got.method == f"hi {who}"
            assert "fuzzed" in a._local and ("beta", "i1") in a._peer_idents.values()  # nobody was dropped
    finally:
        ctx.term()
    assert tracebacks(caplog.records) == []


@pytest.mark.usefixtures("answer_every_bad_message")
async def test_an_answer_names_the_field_and_points_at_the_bad_message() -> None:
    async with Hub("alpha") as a:
        a.endpoint("sink")
        async with Client(a.ipc_endpoint, name="sloppy") as client:
            # A request whose body the hub cannot decode fails at once, naming the field, instead
            # of running into its timeout.
            with pytest.raises(BusError, match="node alpha dropped a bad message: field 'body' must be a map"):
                await client.endpoint.request("alpha/sink", "m", "not a map", timeout=60)  # type: ignore[arg-type]


async def test_answers_and_log_lines_are_rate_limited_per_sender(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dpipes.bus.hub")
    ctx = zmq.asyncio.Context()
    try:
        async with Hub("alpha") as a, raw_socket(ctx, a.ipc_endpoint) as client:
            addr = await attach(client, "noisy")
            for _ in range(20):
                await client.send_multipart([pack(request_header(addr, "alpha/x", sid=True))])
            await client.send_multipart(codec.encode(codec.Ping(src=addr, dst="alpha/")))
            replies = []
            while not replies or not isinstance(replies[-1], codec.Pong):
                replies.append(await answer(client))
            assert [type(r) for r in replies] == [codec.Error, codec.Pong]  # one answer for twenty
            assert a.stats[addr].bad == 20
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "noisy" in r.getMessage()]
            assert len(warnings) == 1 and "1 in all" in warnings[0].getMessage()
    finally:
        ctx.term()


async def test_a_flood_of_hellos_of_another_version_is_refused_each_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 14: 100k wrong-version HELLOs with fresh names wrote a log line each (+25 MB of log)."""
    caplog.set_level(logging.DEBUG, logger="dpipes.bus.hub")
    flood = 200
    ctx = zmq.asyncio.Context()
    try:
        async with Hub("alpha") as a, raw_socket(ctx, a.tcp_endpoint) as peer:
            for i in range(flood):
                hello = dict(codec.header_of(codec.Hello(node=f"future{i}\nforged", instance="i")), v=99)
                await peer.send(pack(hello))
            byes = [await answer(peer) for _ in range(flood)]  # answered, every one: it learns why
            assert all(isinstance(b, codec.Bye) and "protocol version" in b.reason for b in byes)
            assert a.stats[hub_boundary.UNLINKED].bad == flood
            loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(loud) == 1, loud
            assert "'future0\\nforged'" in loud[0] and "\n" not in loud[0]  # escaped: no forged line
    finally:
        ctx.term()


async def test_a_client_past_the_limit_is_detached_with_bye(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_boundary, "MAX_BAD_MESSAGES", 3)
    async with Hub("alpha") as a:
        a.endpoint("sink")
        async with Client(a.ipc_endpoint, name="broken") as client:
            pending = asyncio.create_task(client.endpoint.request("alpha/sink", "never answered", timeout=60))
            for _ in range(4):
                client.send_frames("alpha/sink", [pack(request_header("alpha/broken", "alpha/sink", method=5))])
            with pytest.raises(PeerLost, match=r"node 'alpha' .* detached client alpha/broken: .*4 bad messages"):
                await asyncio.wait_for(pending, WAIT_S)
            await until(lambda: "broken" not in a._local)
            with pytest.raises(PeerLost, match="bad messages"):  # and it says so to whoever tries again
                await client.endpoint.request("alpha/sink", "again")


async def test_a_peer_past_the_limit_is_dropped_with_bye(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_boundary, "MAX_BAD_MESSAGES", 3)
    ctx = zmq.asyncio.Context()
    try:
        async with Hub("alpha") as a, raw_socket(ctx, a.tcp_endpoint) as peer:
            await say_hello(peer, "beta")
            for _ in range(4):
                await peer.send_multipart([pack(request_header("gamma/spoof", "alpha/x"))])  # not on its node
            replies = [await answer(peer), await answer(peer)]
            assert isinstance(replies[0], codec.Error) and replies[0].code == "bad-message"
            assert "not on node 'beta'" in replies[0].message
            assert isinstance(replies[1], codec.Bye) and "4 bad messages" in replies[1].reason
            assert a.stats["beta"].bad == 4
            await peer.send_multipart(codec.encode(codec.Request(src="beta/x", dst="alpha/x")))
            refused = await answer(peer)  # the hub forgot the link: it must say HELLO again
            assert isinstance(refused, codec.Error) and refused.code == "not-linked"
    finally:
        ctx.term()


async def test_an_over_long_attach_name_is_refused_with_a_coded_error() -> None:
    ctx = zmq.asyncio.Context()
    try:
        async with Hub("alpha") as a:
            a.endpoint("svc")
            async with raw_socket(ctx, a.ipc_endpoint) as sock:
                await sock.send_multipart(codec.encode(codec.Attach(name="n" * 4096)))
                error = await answer(sock)
                assert isinstance(error, codec.Error) and error.code == "bad-message"
                assert "'name' is 4096 characters long" in error.message
                assert await attach(sock, "short") == "alpha/short"  # the same socket, a valid name
            with pytest.raises(BusError, match=r"refused to attach \(bad-message\).*'name' is 4096 characters"):
                async with Client(a.ipc_endpoint, name="n" * 4096):
                    pass
            longest = "e" * codec.MAX_ENDPOINT_NAME_CHARS
            async with Client(a.ipc_endpoint, name=longest) as client:  # the longest name still works
                assert client.endpoint.addr == f"alpha/{longest}"
                with pytest.raises(BusError, match="no endpoint"):
                    await client.endpoint.request("alpha/nobody", "m")
    finally:
        ctx.term()


async def test_clients_get_bye_when_the_hub_stops() -> None:
    a = Hub("alpha")
    await a.start()
    try:
        a.endpoint("silent")
        async with Client(a.ipc_endpoint, name="waiting") as client:
            pending = asyncio.create_task(client.endpoint.request("alpha/silent", "m", timeout=60))
            await until(lambda: bool(client.endpoint._requests))
            await a.aclose()
            with pytest.raises(PeerLost, match=r"node 'alpha' .*detached client alpha/waiting: node alpha is stopping"):
                await asyncio.wait_for(pending, WAIT_S)
    finally:
        await a.aclose()


async def test_a_silent_client_is_detached_with_bye(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_clients, "CLIENT_TIMEOUT_S", 2 * codec.HEARTBEAT_INTERVAL_S)
    left: list[str] = []
    ctx = zmq.asyncio.Context()
    try:
        async with Hub("alpha") as a, raw_socket(ctx, a.ipc_endpoint) as sock:
            a.client_listeners.append(left.append)
            addr = await attach(sock, "quiet")  # and then never PINGs
            bye = await answer(sock)
            assert isinstance(bye, codec.Bye) and bye.dst == addr
            assert "silent for" in bye.reason and "must PING" in bye.reason
            assert left == [addr] and "quiet" not in a._local
    finally:
        ctx.term()


async def test_a_peer_error_about_our_message_reaches_the_endpoint_that_sent_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with Hub("alpha") as a, Hub("beta") as b:
        await a.connect_peer(b.tcp_endpoint)
        await until(lambda: "alpha" in b.peers)
        ep = a.endpoint("ep")
        # Beta answers a bad message on the connection it came by: alpha's link to beta.
        ident = next(i for i, (node, _instance) in b._peer_idents.items() if node == "alpha")
        error = codec.Error(src="beta/", dst="alpha/ep", code="bad-message", node="beta", message="bad", to="beta/x")
        b._router_send(ident, codec.encode(error))
        got = await ep.recv(timeout=WAIT_S)
        assert isinstance(got, codec.Error) and got.code == "bad-message" and got.to == "beta/x"
        # One about the hub itself is logged, escaped.
        b._router_send(ident, codec.encode(codec.Error(src="beta/", dst="alpha/", code="bad-message", message="x\ny")))
        await until(lambda: a.stats["beta"].errors_heard == 1)
        assert "peer 'beta' reports 'bad-message': 'x\\ny'" in caplog.text


# -- fuzzing: random headers at a real hub over a real socket ------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _HubThread:
    """A hub on its own loop in a thread, so that a synchronous hypothesis test can talk to it."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hub: Hub | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        async with Hub("alpha") as hub:
            self.hub = hub
            hub.endpoint("sink")
            echo = asyncio.create_task(self._echo(hub.endpoint("echo")))
            self.ready.set()
            await self.stop.wait()
            echo.cancel()

    @staticmethod
    async def _echo(ep: Any) -> None:
        while True:
            request = await ep.recv()
            if isinstance(request, codec.Request):
                ep.reply(request, {"seq": request.seq})

    def __enter__(self) -> Hub:
        self.thread.start()
        assert self.ready.wait(WAIT_S), "hub did not start"
        assert self.hub is not None
        return self.hub

    def __exit__(self, *exc_info: object) -> None:
        assert self.loop is not None and self.stop is not None
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(WAIT_S)


@pytest.fixture(scope="module")
def fuzz_target() -> Iterator[tuple[Hub, zmq.Socket[Any], str, _Records]]:
    records = _Records()
    logger = logging.getLogger("dpipes")
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(records)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub_boundary, "BAD_MESSAGE_INTERVAL_S", 0.0)
        patch.setattr(hub_boundary, "MAX_BAD_MESSAGES", 10**9)
        ctx: zmq.Context[Any] = zmq.Context()
        try:
            with _HubThread() as hub:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVTIMEO, int(WAIT_S * 1000))
                sock.connect(hub.ipc_endpoint)
                sock.send_multipart(codec.encode(codec.Attach(name="fuzzer")))
                attached = codec.decode(sock.recv_multipart())
                assert isinstance(attached, codec.Attached)
                try:
                    yield hub, sock, attached.addr, records
                finally:
                    sock.close(0)
        finally:
            ctx.term()
            logger.removeHandler(records)
            logger.setLevel(old_level)


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=10),
    st.just("a\n" * (codec.MAX_STRING_CHARS // 2 + 1)),
    st.binary(max_size=10),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(0, 9), max_size=3),
    st.sampled_from(sorted(codec.KINDS)),
)
_KEYS = st.sampled_from(["v", "kind", "src", "dst", "sid", "seq"]) | st.sampled_from(
    ["method", "body", "bytes", "count", "name", "node", "reason", "code", "stage"]
)
_FUZZ_KINDS = sorted(set(codec.KINDS) - {"BYE"})  # a well-formed BYE ends the session: not what is fuzzed


@st.composite
def hostile_messages(draw: st.DrawFn, src: str) -> list[bytes]:
    """A message from ``src`` to the hub's ``alpha/sink``, mutated or not."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.lists(st.binary(max_size=40), min_size=1, max_size=3))  # raw bytes
    cls = codec.KINDS[draw(st.sampled_from(_FUZZ_KINDS))]
    header = codec.header_of(cls(src=src, dst="alpha/sink", sid=draw(st.integers(0, 9)), seq=1))
    for _ in range(draw(st.integers(0, 3))):
        key = draw(_KEYS)
        if draw(st.booleans()):
            header.pop(key, None)
        else:
            header[key] = draw(_VALUES)
    if header.get("kind") == "BYE":  # a client's BYE detaches it, whatever else the header says
        header["kind"] = "PING"
    payload = draw(st.lists(st.binary(max_size=20), max_size=3))
    return [msgpack.packb(header, use_bin_type=True), *payload]


def _verdict(frames: list[bytes], addr: str) -> tuple[bool, bool]:
    """What the spec makes the hub do with ``frames`` from client ``addr``: (count it bad, answer it)."""
    quiet = ("ERROR", "BYE")  # never answered
    try:
        header = codec.decode_header(frames[0], len(frames) - 1)
    except codec.VersionMismatch:
        return True, False
    except DecodeError as exc:
        return True, not (type(exc.header) is dict and exc.header.get("kind") in quiet)
    if header["kind"] == "PING":
        return False, False
    if header["src"] != addr:
        return True, header["kind"] not in quiet
    if header["dst"] == "alpha/sink" or (header["dst"] == "alpha/" and header["kind"] == "ERROR"):
        try:  # the hub decodes the kind fields of what it hands its own endpoints, or reads itself
            codec.from_header(header, frames[1:])
        except DecodeError:
            return True, header["kind"] not in quiet
        if header["kind"] in ("SHM", "SHM_BATCH"):  # and maps an SHM's segment: a fuzzer's handle names none
            return True, True
    return False, False


_HONEST_IDS = itertools.count(1)


@given(data=st.data())
@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],  # the process guard
)
def test_fuzzed_headers_get_coded_answers_and_never_reach_the_loop(
    fuzz_target: tuple[Hub, zmq.Socket[Any], str, _Records], data: st.DataObject
) -> None:
    hub, sock, addr, records = fuzz_target
    frames = data.draw(hostile_messages(addr))
    bad_before = hub.stats[addr].bad
    sock.send_multipart(frames)
    honest = next(_HONEST_IDS)  # then an honest request, which must still be served
    sock.send_multipart(codec.encode(codec.Request(src=addr, dst="alpha/echo", seq=honest, method="echo")))
    replies = []
    while not replies or not (isinstance(replies[-1], codec.Reply) and replies[-1].body == {"seq": honest}):
        replies.append(codec.decode(sock.recv_multipart()))
    answers = [r for r in replies if isinstance(r, codec.Error) and r.code == "bad-message"]
    counted, answered = _verdict(frames, addr)
    assert len(answers) == int(answered), (frames, replies)
    assert hub.stats[addr].bad == bad_before + int(counted)
    assert tracebacks(records.records) == []
