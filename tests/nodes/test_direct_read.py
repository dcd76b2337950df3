"""The client reads the last stage's output at that stage's node (protocol: ``claim``), or, when it
cannot, through its entry node: real nodes, real programs, the entry hub's tap as the witness."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dpipes.bus import codec
from dpipes.bus.keyring import Keyring
from dpipes.bus.keys import KEY_DIR_ENV, KeyPair
from dpipes.bus.tap import TapEvent
from dpipes.nodes.node import Node
from dpipes.nodes.protocol import (
    CTL,
    NOT_FOUND,
    PIPELINE_PROTOCOL,
    UNAUTHORIZED,
    ClaimRequest,
    ControlError,
    RunReply,
    RunRequest,
    call,
)
from dpipes.nodes.run import RunOptions, known_nodes, run_pipeline
from dpipes.nodes.tap.source import TapSource, Target
from tests.nodes.daemons import Daemon, daemons, dpipes, environment
from tests.nodes.test_security import authorize, client_key, keyed_client, two_nodes

WAIT_S = 30.0
DATA_BYTES = 3 << 20  # several chunks of a stage's output


@contextlib.asynccontextmanager
async def tapped(node: Node) -> AsyncIterator[list[TapEvent]]:
    """Every event ``node``'s hub routes while the block runs (its tap, subscribed before it)."""
    async with tapped_at(node.name, node.hub.tap_endpoint, node.ipc_endpoint) as events:
        yield events


@contextlib.asynccontextmanager
async def tapped_at(name: str, tap: str, ipc: str) -> AsyncIterator[list[TapEvent]]:
    """Every event the hub of node ``name`` (its tap at ``tap``, its ipc socket at ``ipc``) routes
    while the block runs."""
    events: list[TapEvent] = []
    async with TapSource([Target(name, tap)]) as source:

        async def subscribed() -> None:
            while source.received == 0:  # XPUB publishes once it has seen our subscription
                await known_nodes(ipc)
                await source.next(0.2)

        await asyncio.wait_for(subscribed(), WAIT_S)

        async def collect() -> None:
            while True:
                event = await source.next(None)
                if event is not None:
                    events.append(event)

        task = asyncio.create_task(collect())
        try:
            yield events
            seen = len(events)
            await known_nodes(ipc)  # events behind the run's, in one ordered feed: all of it is in
            await asyncio.wait_for(_until(lambda: len(events) > seen), WAIT_S)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert source.dropped == 0


async def _until(condition: object) -> None:
    while not condition():  # type: ignore[operator]
        await asyncio.sleep(0.02)


async def run_at(node: Node, pipeline: str, *, direct_read: bool = True) -> tuple[bytes, RunReply]:
    """Run ``pipeline`` with the real client over ``node``'s ipc socket; its output and run reply."""
    replies: list[RunReply] = []
    with tempfile.TemporaryFile() as out, open(os.devnull, "wb") as err:
        result = await asyncio.wait_for(
            run_pipeline(
                node.ipc_endpoint,
                RunOptions(pipeline, direct_read=direct_read),
                stdin_fd=-1,
                stdout_fd=out.fileno(),
                stderr_fd=err.fileno(),
                handle_sigint=False,
                on_started=replies.append,
            ),
            WAIT_S,
        )
        assert result.exit_code == 0, result
        out.seek(0)
        return out.read(), replies[0]


def output_through(events: list[TapEvent], reply: RunReply) -> int:
    """Bytes of the last stage's output the tapped hub routed."""
    last = reply.stages[-1].addr
    return sum(e.size for e in events if e.src == last and e.kind == "BYTES")


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, bytes]:
    """A file of random bytes, and what it holds."""
    path, content = tmp_path / "data.bin", os.urandom(DATA_BYTES)
    path.write_bytes(content)
    return path, content


def owner_key(where: Path) -> KeyPair:
    """The client key a node with key directory ``where`` names for its own local user."""
    return Keyring(where).client()[0]


async def test_the_output_is_read_at_the_last_stages_node_and_not_through_the_entry_hub(
    tmp_path: Path, data: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "alpha"))  # the client is alpha's own user
    path, content = data
    async with two_nodes(tmp_path) as (alpha, beta):
        authorize(tmp_path / "beta", owner_key(tmp_path / "alpha"), 'run="cat"')
        async with tapped(alpha) as through_entry:
            direct, reply = await run_at(alpha, f"cat {path} | cat@beta")
        assert direct == content
        assert reply.read_token and reply.read_endpoint == beta.tcp_endpoint
        assert output_through(through_entry, reply) == 0  # it never passed alpha's hub
        async with tapped(alpha) as through_entry:
            old, reply = await run_at(alpha, f"cat {path} | cat@beta", direct_read=False)
        assert old == content and not reply.read_token
        assert output_through(through_entry, reply) == DATA_BYTES


async def test_the_output_comes_through_the_entry_node_when_the_last_node_refuses_our_key(
    tmp_path: Path, data: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our own client key is not the one alpha names for its user: beta refuses it at the handshake.
    monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "elsewhere"))
    client_key(tmp_path, "elsewhere")
    path, content = data
    async with two_nodes(tmp_path) as (alpha, _beta):
        authorize(tmp_path / "beta", owner_key(tmp_path / "alpha"), 'run="cat"')
        async with tapped(alpha) as through_entry:
            out, reply = await run_at(alpha, f"cat {path} | cat@beta")
        assert reply.read_token  # offered, and not taken
        assert out == content
        assert output_through(through_entry, reply) == DATA_BYTES


async def test_a_claim_needs_the_token_and_the_runs_caller_and_works_once(tmp_path: Path) -> None:
    user, stranger = client_key(tmp_path, "user"), client_key(tmp_path, "stranger")
    async with two_nodes(tmp_path) as (alpha, beta):
        authorize(tmp_path / "alpha", user, "any")
        authorize(tmp_path / "beta", user, 'run="cat"')
        authorize(tmp_path / "beta", stranger, 'run="cat"')
        async with keyed_client(alpha, user) as entry:
            request = RunRequest(pipeline="echo hi | cat@beta", protocol=PIPELINE_PROTOCOL, direct_read=True)
            reply: RunReply = await call(entry.endpoint, f"alpha/{CTL}", request, timeout=WAIT_S)
            assert reply.read_endpoint == beta.tcp_endpoint and reply.read_key == str(beta.hub.public_key)
            claim = ClaimRequest(pipeline=reply.pipeline, stage=1, token=reply.read_token)
            forged = ClaimRequest(pipeline=reply.pipeline, stage=1, token="x" + reply.read_token[1:])
            with pytest.raises(ControlError) as refused:
                await call(entry.endpoint, f"beta/{CTL}", forged, timeout=WAIT_S)
            assert refused.value.code == UNAUTHORIZED and "wrong token" in str(refused.value)
            async with keyed_client(beta, stranger) as other:  # the right token, but not the run's caller
                with pytest.raises(ControlError) as refused:
                    await call(other.endpoint, f"beta/{CTL}", claim, timeout=WAIT_S)
                assert refused.value.code == UNAUTHORIZED and "not" in str(refused.value)
            async with keyed_client(beta, user) as reader:
                await call(reader.endpoint, f"beta/{CTL}", claim, timeout=WAIT_S)
                stream = await asyncio.wait_for(reader.endpoint.accept(), WAIT_S)
                assert stream.src == reply.stages[1].addr
                got = b""
                while (msg := await asyncio.wait_for(stream.read(), WAIT_S)) is not None:
                    got += b"".join(bytes(f) for f in msg.frames)  # type: ignore[attr-defined]
                assert got == b"hi\n"
                with pytest.raises(ControlError) as refused:  # used: whoever asks again
                    await call(entry.endpoint, f"beta/{CTL}", claim, timeout=WAIT_S)
                assert refused.value.code == NOT_FOUND


async def test_the_last_node_killed_while_its_output_is_read_directly_is_reported(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dpipes.tools.dpipes",
            "--insecure",
            "--node",
            alpha.host_port,
            "-v",
            "yes | cat@beta",
            env=environment(rt),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        said = await kill_once_read_there(proc, beta)
        killed_at = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(proc.wait(), WAIT_S) == 125
        assert asyncio.get_running_loop().time() - killed_at < 15
        err = (said + await proc.stderr.read()).decode()
        assert "node 'beta' lost" in err and "cat" in err
        await asyncio.wait_for(_until(lambda: not alpha.children()), WAIT_S)


async def test_an_output_nobody_claims_fails_its_stage_after_the_claim_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dpipes.nodes.stage

    monkeypatch.setattr(dpipes.nodes.stage, "CLAIM_TIMEOUT_S", 0.5)  # the node's bound, shortened for the test
    user = client_key(tmp_path, "user")
    async with two_nodes(tmp_path) as (alpha, _beta):
        authorize(tmp_path / "alpha", user, "any")
        authorize(tmp_path / "beta", user, 'run="cat"')
        async with keyed_client(alpha, user) as entry:
            request = RunRequest(pipeline="echo hi | cat@beta", protocol=PIPELINE_PROTOCOL, direct_read=True)
            reply: RunReply = await call(entry.endpoint, f"alpha/{CTL}", request, timeout=WAIT_S)
            assert reply.read_token
            reports: dict[int, dict[str, object]] = {}
            while len(reports) < 2:  # never claimed: each stage reports, the last one failed
                msg = await asyncio.wait_for(entry.endpoint.recv(), WAIT_S)
                if isinstance(msg, codec.Request) and msg.method == "exit":
                    entry.endpoint.reply(msg, {})
                    reports[msg.body["stage"]] = msg.body
            assert "nobody claimed the output of stage 1" in str(reports[1]["error"])


async def test_cat_into_cat_at_beta_gives_the_same_output_read_directly_or_through_the_entry_node(rt: Path) -> None:
    data = os.urandom(1 << 20) + b"no newline at the end"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        direct = await dpipes(rt, "--node", alpha.host_port, "-v", "cat | cat@beta", input=data)
        through = await dpipes(
            rt, "--node", alpha.host_port, "-v", "cat | cat@beta", input=data, env={"DPIPES_DIRECT_READ": "0"}
        )
    assert direct.code == through.code == 0, (direct.stderr, through.stderr)
    assert direct.stdout == through.stdout == data
    assert "read at node beta (ipc://" in direct.stderr  # a daemon of ours on this host: its Unix socket
    assert "read at node beta" not in through.stderr


async def kill_once_read_there(proc: asyncio.subprocess.Process, node: Daemon) -> bytes:
    """Await ``proc`` saying (on stderr) that it reads at ``node``, then kill ``node`` and its stages
    with SIGKILL; what ``proc`` said so far."""
    assert proc.stderr is not None
    said = b""
    while f"read at node {node.name}".encode() not in said:  # the output flows, straight from there
        line = await asyncio.wait_for(proc.stderr.readline(), WAIT_S)
        assert line, said
        said += line
    for pid in node.children():
        os.kill(pid, signal.SIGKILL)
    node.proc.kill()
    return said
