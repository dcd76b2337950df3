"""One node in this process, driven through its control endpoint: start and its undoing, the stage
window from ``[limits] credit_bytes``, and a cancel reported as a typed status."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from dpipes.bus import codec
from dpipes.bus.client import Client
from dpipes.bus.endpoint import Endpoint
from dpipes.bus.errors import BusError, ConfigError, RequestFailed
from dpipes.nodes.config import Limits, NodeConfig
from dpipes.nodes.node import Node
from dpipes.nodes.protocol import (
    BAD_REQUEST,
    CTL,
    LIMIT,
    PIPELINE_PROTOCOL,
    PLACEMENT,
    REFUSED,
    SYNTAX,
    UNKNOWN_METHOD,
    ControlError,
    InfoReply,
    InfoRequest,
    RunRequest,
    call,
)
from tests.nodes.daemons import daemons, start_dpipes

WAIT_S = 30.0


async def until(condition: Callable[[], object], timeout: float = WAIT_S) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)  # polling a condition under a deadline

    await asyncio.wait_for(poll(), timeout)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


async def test_a_start_that_fails_late_leaves_nothing_open(tmp_path: Path) -> None:
    # mDNS is the last step of a start: an interface that does not exist fails it after the hub,
    # the supervisor, the descriptor drop and the control tasks have started.
    config = NodeConfig(name="alpha", insecure=True, interfaces=("no-such-if0",))
    ipc = f"ipc://{tmp_path}/alpha.sock"
    tasks, fds, threads = asyncio.all_tasks(), open_fds(), threading.active_count()
    node = Node(config, listen="tcp://0.0.0.0:0", ipc=ipc)
    with pytest.raises(ConfigError, match="no-such-if0"):
        await node.start()
    assert asyncio.all_tasks() == tasks
    assert open_fds() <= fds
    assert threading.active_count() == threads  # the zmq context's I/O threads are gone
    assert "alpha-fds.sock" not in os.listdir(tmp_path)  # the descriptor drop too
    await node.aclose()  # harmless after a failed start
    # The same ipc path serves a node that starts (nothing of the first still holds it).
    async with Node(NodeConfig(name="alpha"), listen="tcp://127.0.0.1:0", ipc=ipc) as again:
        async with Client(again.ipc_endpoint) as client:
            reply = await client.endpoint.request(f"alpha/{CTL}", "info", timeout=WAIT_S)
            assert reply["node"] == "alpha"


ClientOf = Callable[[Limits], Awaitable[tuple[Node, Client]]]


@pytest.fixture
async def client_of() -> AsyncIterator[ClientOf]:
    """Start a node with the given limits and attach a client; both closed at the end."""
    opened: list[Node | Client] = []

    async def make(limits: Limits) -> tuple[Node, Client]:
        node = Node(NodeConfig(name="alpha", limits=limits), listen="tcp://127.0.0.1:0")
        await node.start()
        opened.append(node)
        client = Client(node.ipc_endpoint)
        await client.start()
        opened.append(client)
        return node, client

    yield make
    for party in reversed(opened):
        await party.aclose()


async def drain_streams(ep: Endpoint) -> None:
    """Read every stream to ``ep`` to its end (a stage's stdout ends when its EOF is read)."""
    while True:
        stream = await ep.accept()
        while await stream.read() is not None:
            pass


def negotiate_body(pipeline: str, argv: list[str]) -> dict[str, object]:
    return {"pipeline": pipeline, "stage": 0, "argv": argv, "mode": "bytes", "protocol": PIPELINE_PROTOCOL}


async def test_a_stage_grants_its_producer_the_configured_window(client_of: ClientOf) -> None:
    window = 2 * codec.INITIAL_CREDIT_BYTES
    _node, client = await client_of(Limits(credit_bytes=window))
    ep = client.endpoint
    reply = await ep.request(f"alpha/{CTL}", "negotiate", negotiate_body("p1", ["cat"]), timeout=WAIT_S)
    out = ep.open_stream(reply["addr"])
    await out.send_bytes(b"x")  # the stream opens at the stage's endpoint, which grants the rest at once
    await until(lambda: out.limit == window)
    reply = await ep.request(f"alpha/{CTL}", "cancel", {"pipeline": "p1", "reason": "test over"}, timeout=WAIT_S)
    assert reply == {"stages": 1}


async def test_a_cancelled_stage_reports_why_apart_from_errors(client_of: ClientOf) -> None:
    _node, client = await client_of(Limits())
    ep = client.endpoint
    await ep.request(f"alpha/{CTL}", "negotiate", negotiate_body("p2", ["sleep", "300"]), timeout=WAIT_S)
    wiring = {"stdin_from": "", "stdout_to": ep.addr, "stderr_to": ep.addr, "report_to": [ep.addr]}
    started = await ep.request(f"alpha/{CTL}", "start", {"pipeline": "p2", "stage": 0, **wiring}, timeout=WAIT_S)
    assert started["pid"] > 0

    drain = asyncio.create_task(drain_streams(ep))
    await ep.request(f"alpha/{CTL}", "cancel", {"pipeline": "p2", "reason": "enough"}, timeout=WAIT_S)
    while not isinstance(report := await ep.recv(timeout=WAIT_S), codec.Request):
        pass
    drain.cancel()
    ep.reply(report, {})
    assert report.method == "exit"
    assert report.body["cancelled"] == "enough"
    assert report.body["error"] == ""  # nothing went wrong moving its data
    assert report.body["signal"] == signal.SIGTERM


async def test_status_after_ctrl_c_says_each_stage_was_cancelled_and_why(tmp_path: Path) -> None:
    rt = tmp_path / "run"
    rt.mkdir(mode=0o700)
    async with daemons(rt, ["alpha"]) as (alpha,):
        proc = await start_dpipes(rt, "--node", alpha.host_port, "--status", "sleep 300 | sleep 300")
        await until(lambda: len(alpha.children()) == 2)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
        assert proc.returncode == 130
        text = err.decode()
        for index in (0, 1):
            assert f"stage {index} sleep@alpha: killed by SIGTERM (cancelled: interrupted by the user" in text


async def test_malformed_requests_are_refused_by_code_and_field_and_logged_once(
    client_of: ClientOf, caplog: pytest.LogCaptureFixture
) -> None:
    node, client = await client_of(Limits())
    ep = client.endpoint
    bad = {"pipeline": "p", "stage": "zero", "argv": ["cat"], "protocol": PIPELINE_PROTOCOL}
    for _ in range(3):
        with pytest.raises(RequestFailed) as refused:
            await ep.request(f"alpha/{CTL}", "negotiate", bad, timeout=WAIT_S)
        assert refused.value.body == {"code": BAD_REQUEST, "field": "stage"}
    with pytest.raises(RequestFailed) as refused:
        await ep.request(f"alpha/{CTL}", "exit", {"pipeline": "p"}, timeout=WAIT_S)  # a report is checked too
    assert refused.value.body["field"] == "stage"
    for method in ("teleport", "beam", "x" * 4000):  # any number of made-up methods: one counter
        with pytest.raises(RequestFailed) as refused:
            await ep.request(f"alpha/{CTL}", method, {}, timeout=WAIT_S)
        assert refused.value.body["code"] == UNKNOWN_METHOD
    assert node.control is not None and node.control.malformed["negotiate"] == 3
    assert node.control.malformed["(unknown method)"] == 3 and len(node.control.malformed) == 3
    logged = [r for r in caplog.records if r.levelno == logging.WARNING and "refused negotiate" in r.getMessage()]
    assert len(logged) == 1
    reply = await call(ep, "alpha", InfoRequest())  # the node still answers
    assert isinstance(reply, InfoReply) and reply.node == "alpha" and reply.nodes[0].source == "self"


@pytest.mark.parametrize(
    ("pipeline", "code"),
    [
        ("cat |", SYNTAX),
        ("cat@nowhere", PLACEMENT),
        ("no-such-program-anywhere", REFUSED),
        (" | ".join(["cat"] * 3), LIMIT),
    ],
)
async def test_a_refused_run_says_why_by_code(client_of: ClientOf, pipeline: str, code: str) -> None:
    _node, client = await client_of(Limits(max_stages=2))
    with pytest.raises(ControlError) as refused:
        await call(client.endpoint, "alpha", RunRequest(pipeline=pipeline, protocol=PIPELINE_PROTOCOL))
    assert refused.value.code == code


async def test_the_first_stage_removes_bootstrap_dirs_of_dead_nodes(client_of: ClientOf) -> None:
    import tempfile

    from dpipes.nodes.pipes import BOOTSTRAP_DIR_PREFIX

    dead = await asyncio.create_subprocess_exec("true")  # a pid that has exited and been reaped
    await dead.wait()
    stale = Path(tempfile.gettempdir()) / f"{BOOTSTRAP_DIR_PREFIX}{dead.pid}-test-node"
    stale.mkdir()
    _node, client = await client_of(Limits())
    ep = client.endpoint
    await ep.request(f"alpha/{CTL}", "negotiate", negotiate_body("p3", ["true"]), timeout=WAIT_S)
    wiring = {"stdout_to": ep.addr, "stderr_to": ep.addr, "report_to": []}
    drain = asyncio.create_task(drain_streams(ep))
    await ep.request(f"alpha/{CTL}", "start", {"pipeline": "p3", "stage": 0, **wiring}, timeout=WAIT_S)
    await until(lambda: not stale.exists())
    drain.cancel()


async def test_a_stages_bootstrap_dir_is_removed_when_it_ends(client_of: ClientOf) -> None:
    """The node removes a stage's Pipes bootstrap directory (its FIFO) after the stage, in a thread."""
    import tempfile

    from dpipes.nodes.pipes import BOOTSTRAP_DIR_PREFIX

    def ours() -> set[Path]:  # the node runs in this process: its directories carry our pid
        return set(Path(tempfile.gettempdir()).glob(f"{BOOTSTRAP_DIR_PREFIX}{os.getpid()}-*"))

    before = ours()
    _node, client = await client_of(Limits())
    ep = client.endpoint
    await ep.request(f"alpha/{CTL}", "negotiate", negotiate_body("p9", ["sleep", "300"]), timeout=WAIT_S)
    wiring = {"stdout_to": ep.addr, "stderr_to": ep.addr, "report_to": []}
    drain = asyncio.create_task(drain_streams(ep))
    await ep.request(f"alpha/{CTL}", "start", {"pipeline": "p9", "stage": 0, **wiring}, timeout=WAIT_S)
    assert len(ours() - before) == 1  # the running stage's
    await ep.request(f"alpha/{CTL}", "cancel", {"pipeline": "p9", "reason": "test"}, timeout=WAIT_S)
    await until(lambda: not ours() - before)
    drain.cancel()


async def test_info_lists_a_static_peer_that_never_answered_by_its_endpoint_and_down() -> None:
    import socket
    from types import MappingProxyType

    from dpipes.nodes.config import HostPort

    with socket.socket() as probe:  # a port nothing listens on once closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = NodeConfig(name="alpha", nodes=MappingProxyType({"ghost": HostPort("127.0.0.1", port)}))
    async with Node(config, listen="tcp://127.0.0.1:0") as node, Client(node.ipc_endpoint) as client:
        reply = await call(client.endpoint, "alpha", InfoRequest())
        assert isinstance(reply, InfoReply)
        me, ghost = reply.nodes
        assert (me.name, me.source, me.up) == ("alpha", "self", True)
        assert (ghost.endpoint, ghost.source, ghost.up) == (f"tcp://127.0.0.1:{port}", "static", False)
        assert set(node.table()) == {"alpha"}  # placement sees only nodes that are linked


async def test_a_stage_negotiated_and_never_started_expires(
    client_of: ClientOf, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dpipes.nodes import stages as stages_module

    monkeypatch.setattr(stages_module, "UNSTARTED_EXPIRY_S", 0.2)
    node, client = await client_of(Limits())
    ep = client.endpoint
    reply = await ep.request(f"alpha/{CTL}", "negotiate", negotiate_body("gone", ["cat"]), timeout=WAIT_S)
    out = ep.open_stream(reply["addr"])
    await out.send_bytes(b"x")  # input that nobody will read: it fails with the stage, it is not kept
    assert node.stages is not None
    await until(lambda: len(node.stages) == 0)  # type: ignore[arg-type]
    with pytest.raises(BusError):
        await out.close(timeout=WAIT_S)
    start = {"pipeline": "gone", "stage": 0, "stdout_to": ep.addr, "stderr_to": ep.addr, "report_to": [ep.addr]}
    with pytest.raises(RequestFailed, match="not negotiated"):
        await ep.request(f"alpha/{CTL}", "start", start, timeout=WAIT_S)
    # One that starts in time is not touched by its timer.
    reply = await ep.request(f"alpha/{CTL}", "negotiate", negotiate_body("kept", ["true"]), timeout=WAIT_S)
    drain = asyncio.create_task(drain_streams(ep))
    try:
        await ep.request(f"alpha/{CTL}", "start", {**start, "pipeline": "kept"}, timeout=WAIT_S)
        report = await ep.recv(timeout=WAIT_S)
    finally:
        drain.cancel()
    assert isinstance(report, codec.Request) and report.method == "exit" and report.body["code"] == 0
