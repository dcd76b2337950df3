"""The short path of ``dpipes`` (dpipes.nodes.local_run) against real daemons: the same results,
exit codes and messages as the full path, run side by side; and a fake hub's hostile input."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from dpipes.nodes import local_run, local_wire
from tests.nodes.daemons import Completed, daemons, dpipes, environment, shell

WAIT_S = 30.0
FULL = {"DPIPES_SHORT_PATH": "0"}


async def until(condition: Any, timeout: float = WAIT_S) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)  # polling a condition under a deadline

    await asyncio.wait_for(poll(), timeout)


def test_the_constants_are_the_specs() -> None:
    from dpipes.bus import codec
    from dpipes.nodes import protocol, run

    for name in (
        "PROTOCOL_VERSION",
        "MAX_HEADER_BYTES",
        "MAX_BATCH_MESSAGES",
        "INITIAL_CREDIT_BYTES",
        "MESSAGE_CREDIT_BYTES",
        "HEARTBEAT_INTERVAL_S",
        "PEER_TIMEOUT_S",
    ):
        assert getattr(local_wire, name) == getattr(codec, name), name
    assert local_wire.PIPELINE_PROTOCOL == protocol.PIPELINE_PROTOCOL
    assert local_wire.CTL == protocol.CTL
    assert local_wire.RUN_TIMEOUT_S == protocol.RUN_TIMEOUT_S
    assert local_run.CANCEL_WAIT_S == run.CANCEL_WAIT_S
    assert local_run.STDIN_CHUNK_BYTES == run.STDIN_CHUNK_BYTES


def same(short: Completed, full: Completed) -> None:
    assert (short.code, short.stdout) == (full.code, full.stdout), (short.stderr, full.stderr)
    assert short.stderr.splitlines() == full.stderr.splitlines()


# Each case: the arguments, then stdin (None: no input).
CASES: list[tuple[tuple[str, ...], bytes | None]] = [
    (("seq 3 | sort -r",), None),
    (("echo x | false",), None),
    (("--pipefail", "--status", "sh -c 'exit 3' | cat@beta"), None),
    (("--status", "sh@beta -c 'kill -TERM $$'"), None),
    (("cat@beta | sort",), b"b\na\nc\n"),  # our stdin fed over the bus to beta
    (("cat | cat@beta",), b"b\na\n"),  # the last stage's stdout read from the bus
    (("seq 200000 | cat@beta",), None),  # past the initial credit: credit goes back as we write
    (("sh@beta -c 'echo oops >&2; exit 2'",), None),  # stderr of a stage elsewhere
    (("echo x |",), None),  # a syntax error: the node's, coded; the full path's, found here
    (("no-such-program",), None),  # refused before anything started
    (("--pipefail", "--status", "yes | head@beta -2"), None),  # a producer stopped as by SIGPIPE
]


@pytest.mark.parametrize(("args", "stdin"), CASES, ids=[" ".join(a) for a, _ in CASES])
async def test_both_paths_give_the_same_run(rt: Path, args: tuple[str, ...], stdin: bytes | None) -> None:
    async with daemons(rt, ["alpha", "beta"]):  # alpha is the local daemon: no --node
        short = await dpipes(rt, *args, input=stdin)
        full = await dpipes(rt, *args, input=stdin, env=FULL)
    same(short, full)
    pipeline = args[-1]
    if len(args) == 1 and "|" in pipeline and not pipeline.rstrip().endswith("|"):  # and sh agrees
        reference = await shell(pipeline.replace("@beta", ""), input=stdin)
        assert (short.code, short.stdout) == (reference.code, reference.stdout)


async def test_the_short_path_is_taken_and_imports_no_asyncio(rt: Path) -> None:
    probe = (
        "import sys; from dpipes.tools.dpipes import main; code = main(['echo x | cat']); "
        "print('asyncio' in sys.modules, 'dpipes.nodes.local_run' in sys.modules, code, file=sys.stderr)"
    )
    async with daemons(rt, ["alpha"]):
        for extra, expected in (({}, "False True 0"), (FULL, "True False 0")):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", probe, env={**environment(rt), **extra},
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
            assert out == b"x\n"
            assert err.decode().strip().splitlines()[-1] == expected


async def test_output_is_whole_to_a_pipe_and_to_a_file_on_either_path(rt: Path) -> None:
    """All of ``dpipes``' stdout and stderr arrive, to a pipe and to a file, on either path, and what is
    printed through Python's own buffered stdout (``--completion``, ``--nodes``) too."""
    pipeline = "seq 200000 | sh -c 'cat; seq 3 >&2; exit 3'"
    expected = "".join(f"{i}\n" for i in range(1, 200001)).encode()
    async with daemons(rt, ["alpha"]):
        for extra in ({}, FULL):
            for args, code in (([pipeline], 3), (["--completion", "bash"], 0), (["--nodes"], 0)):
                argv = [sys.executable, "-m", "dpipes.tools.dpipes", *args]
                env = {**environment(rt), **extra}
                env.pop("PYTHONUNBUFFERED", None)  # Python's stdout buffered, as a user's is
                piped = await asyncio.create_subprocess_exec(
                    *argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
                )
                out, err = await asyncio.wait_for(piped.communicate(), WAIT_S)
                assert piped.returncode == code, err
                out_path, err_path = rt.parent / "out", rt.parent / "err"
                with open(out_path, "wb") as out_file, open(err_path, "wb") as err_file:
                    to_file = await asyncio.create_subprocess_exec(
                        *argv, env=env, stdin=subprocess.DEVNULL, stdout=out_file, stderr=err_file
                    )
                    assert await asyncio.wait_for(to_file.wait(), WAIT_S) == code
                assert out_path.read_bytes() == out
                if code:
                    assert out == expected
                    assert err.splitlines()[:3] == err_path.read_bytes().splitlines()[:3] == [b"1", b"2", b"3"]
                elif args == ["--nodes"]:
                    assert b"alpha" in out, err
                else:
                    assert out.rstrip().endswith(b"complete -F _dpipes_complete dpipes"), out[-200:]  # the whole of it


async def test_the_short_path_imports_only_what_a_run_needs(rt: Path) -> None:
    unneeded = (
        *("asyncio", "argparse", "dataclasses", "logging", "dpipes.nodes.pipes_frames", "yaml", "pyarrow", "rich"),
        *("zmq", "typing", "json", "socket", "getpass", "threading", "dpipes.nodes.paths"),  # a few ms each
    )
    probe = (
        "import sys; from dpipes.tools.dpipes import main; code = main(['--insecure', 'echo x | cat']); "
        f"print(code, [m for m in {unneeded!r} if m in sys.modules], file=sys.stderr)"
    )
    async with daemons(rt, ["alpha"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", probe, env=environment(rt),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert out == b"x\n"
    assert err.decode().strip().splitlines()[-1] == "0 []"


async def test_a_closed_reader_stops_a_last_stage_elsewhere(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]):
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", f"{sys.executable} -m dpipes.tools.dpipes --status 'yes@beta' | head -2; echo done",
            env=environment(rt), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert out == b"y\ny\ndone\n"
    assert b"stage 0 yes@beta: " in err


async def test_a_reader_slower_than_the_hubs_patience_loses_nothing(rt: Path, tmp_path: Path) -> None:
    """Our stdout blocks longer than CLIENT_TIMEOUT_S: the heartbeats go on meanwhile (the writes
    wait in a thread), so the hub keeps us and every byte arrives."""
    from dpipes.bus.codec import CLIENT_TIMEOUT_S

    source = tmp_path / "in.bin"
    source.write_bytes(os.urandom(3 << 20))  # past the first credit window and the pipe's buffer
    stall_s = CLIENT_TIMEOUT_S + 2  # the scenario: a reader that does not read for that long
    async with daemons(rt, ["alpha", "beta"]):
        proc = await asyncio.create_subprocess_exec(
            "bash", "-o", "pipefail", "-c",  # dpipes' own exit status counts too
            f"{sys.executable} -m dpipes.tools.dpipes 'cat@beta' < {source} | (sleep {stall_s}; wc -c)",
            env=environment(rt), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), WAIT_S + stall_s)
    assert (proc.returncode, out.strip()) == (0, str(3 << 20).encode()), err


async def test_ctrl_c_cancels_every_stage_and_exits_130(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dpipes.tools.dpipes", "--status", "sleep 300 | sleep@beta 300",
            env=environment(rt), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        await until(lambda: alpha.children() and beta.children())
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
        await until(lambda: not alpha.children() and not beta.children())
    assert proc.returncode == 130, err
    assert b"cancelled: interrupted by the user (Ctrl-C)" in err


async def test_a_daemon_killed_mid_run_is_named_at_once(rt: Path) -> None:
    """The hub's socket closes with its daemon: the short path says so and fails the run (125),
    instead of waiting out the heartbeat timeout (its message would say "no word from")."""
    async with daemons(rt, ["alpha"]) as (alpha,):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dpipes.tools.dpipes", "sleep 300",
            env=environment(rt), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        await until(lambda: alpha.running("sleep"))  # not its launcher yet: it dies with alpha from now on
        alpha.proc.kill()  # its stage dies with it (PR_SET_PDEATHSIG)
        _out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert proc.returncode == 125, err
    assert b"lost the node at ipc://" in err and b"closed the connection" in err, err


@pytest.mark.parametrize("extra", [{}, FULL], ids=["short-path", "full-path"])
async def test_a_dpipes_stopped_past_its_heartbeat_timeout_keeps_its_run(rt: Path, extra: dict[str, str]) -> None:
    """Ctrl-Z, then fg (or a process starved of CPU): meanwhile dpipes neither PINGed its hub nor read
    what it said. The hub is not silent for that: what waits is read, and a new PING is answered."""
    from dpipes.bus.codec import CLIENT_TIMEOUT_S, PEER_TIMEOUT_S

    stopped_s = PEER_TIMEOUT_S + 0.5  # the scenario: past our patience, well within the hub's
    assert stopped_s < CLIENT_TIMEOUT_S
    async with daemons(rt, ["alpha"]) as (alpha,):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dpipes.tools.dpipes", "head -c 2",
            env={**environment(rt), **extra}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        await until(lambda: alpha.running("head"))
        proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(stopped_s)
        proc.send_signal(signal.SIGCONT)
        out, err = await asyncio.wait_for(proc.communicate(b"ok"), WAIT_S)
    assert (proc.returncode, out) == (0, b"ok"), err


# -- a fake hub: hostile input that no real node sends --------------------------------------------


def _header(kind: str, dst: str, **fields: Any) -> bytes:
    return msgpack.packb({"v": 3, "kind": kind, "src": "fake/", "dst": dst, "sid": 0, "seq": 0, **fields})


@contextlib.contextmanager
def _fake_router(endpoint: str, handle: Callable[[zmq.Socket[bytes], bytes, dict[str, Any]], None]) -> Iterator[None]:
    """A ROUTER bound at ``endpoint`` whose thread calls ``handle(router, ident, header)`` for each
    message it gets, until the block ends."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    stop = threading.Event()

    def serve() -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        while not stop.is_set():
            if poller.poll(50):
                ident, head, *_ = router.recv_multipart()
                handle(router, ident, msgpack.unpackb(head))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        router.close()
        ctx.term()


def _one_stage_run(router: zmq.Socket[bytes], ident: bytes, h: dict[str, Any], me: str, stage: str) -> bytes | None:
    """Answers ATTACH and ``run`` (one stage at ``stage``) as a node would; the REPLY to ``run`` is
    returned, not sent (None for anything else)."""
    if h["kind"] == "ATTACH":
        router.send_multipart([ident, _header("ATTACHED", me, addr=me)])
    elif h["kind"] == "REQUEST" and h["method"] == "run":
        one = {"index": 0, "node": "fake", "argv": ["cat"], "addr": stage, "context": {}}
        return _header("REPLY", me, seq=h["seq"], ok=True, body={"pipeline": "p", "stages": [one]})
    return None


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A ROUTER that attaches one client, answers its ``run`` with one stage, then sends garbage,
    a malformed report and that stage's ``exit`` (code 4). Yields its endpoint and what it got."""
    endpoint = f"ipc://{tmp_path}/fake.sock"
    seen: list[dict[str, Any]] = []
    me = "fake/c1"

    def handle(router: zmq.Socket[bytes], ident: bytes, h: dict[str, Any]) -> None:
        seen.append(h)
        reply = _one_stage_run(router, ident, h, me, "fake/p.0")
        if reply is None:
            return
        exit_body = {"pipeline": "p", "stage": 0, "node": "fake", "code": 4, "status": "exit 4"}
        for message in (
            [reply],
            [b"\xc1not msgpack"],
            [b"\x92\x01\x02"],  # msgpack, not a map
            [msgpack.packb({"v": 3, "kind": "BYTES", "src": 1, "dst": me, "sid": 1, "seq": 1})],
            [b"\x80" * (local_wire.MAX_HEADER_BYTES + 1)],
            [_header("BATCH", me, sid=3, seq=1, of="BYTES", sizes=[5, 9]), b"short"],  # past the frame
            [_header("REQUEST", me, seq=7, method="exit", body={**exit_body, "stage": "zero"})],
            [_header("REQUEST", me, seq=8, method="exit", body=exit_body)],
        ):
            router.send_multipart([ident, *message])

    with _fake_router(endpoint, handle):
        yield endpoint, seen


def test_hostile_input_is_dropped_counted_and_logged_once(
    fake_hub: tuple[str, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    endpoint, seen = fake_hub
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        with caplog.at_level(logging.DEBUG, logger="dpipes.nodes"):
            result = local_run.run_local(
                "cat", stdin=False, entry=endpoint, stdout_fd=devnull, stderr_fd=devnull, handle_sigint=False
            )
    finally:
        os.close(devnull)
    assert result is not None and result.exit_code == 4  # the run went on past every bad message
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage().split(" from ")[0] for r in warnings] == [  # once, whatever the count
        "dropped a malformed message",
        "refused a exit report",
    ]
    assert any(r.getMessage().startswith("dropped a malformed BATCH") for r in caplog.records)
    # The client's last words reach the fake hub's thread after run_local returns: await its BYE.
    deadline = time.monotonic() + WAIT_S
    while not any(h["kind"] == "BYE" for h in list(seen)):
        assert time.monotonic() < deadline, f"no BYE from the client; the fake hub saw {seen}"
        time.sleep(0.01)  # polling a condition under a deadline
    replies = {h["seq"]: h for h in seen if h["kind"] == "REPLY"}
    assert (replies[7]["ok"], replies[7]["body"]["code"]) == (False, "bad-request")
    assert replies[8]["ok"] is True


def test_a_hub_that_answers_no_ping_is_named_silent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub that stops answering (stopped, or its host gone) while the connection stays open: the
    run fails naming it once a PING of ours went unanswered for PEER_TIMEOUT_S (patched shorter)."""
    monkeypatch.setattr(local_run, "PEER_TIMEOUT_S", 0.5)
    endpoint = f"ipc://{tmp_path}/silent.sock"
    pings = 0

    def handle(router: zmq.Socket[bytes], ident: bytes, h: dict[str, Any]) -> None:  # then nothing
        nonlocal pings
        reply = _one_stage_run(router, ident, h, "fake/c1", "fake/p.0")
        if reply is not None:
            router.send_multipart([ident, reply])
        elif h["kind"] == "PING":
            pings += 1

    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        with _fake_router(endpoint, handle):
            result = local_run.run_local(
                "cat", stdin=False, entry=endpoint, stdout_fd=devnull, stderr_fd=devnull, handle_sigint=False
            )
    finally:
        os.close(devnull)
    assert result is not None and result.exit_code == 125
    assert result.error == f"no word from the node at {endpoint} for 0.5 s"
    assert pings >= 1  # counted from a PING it did not answer


def test_no_daemon_means_the_full_path(tmp_path: Path) -> None:
    assert local_run.run_local("cat", stdin=False, entry=f"ipc://{tmp_path}/none.sock") is None
