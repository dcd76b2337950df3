"""A node with keys decides who may run what, before anything starts (issue 12, the node side).

Real nodes with their own key directories, clients with CURVE keys over loopback TCP, the local
user over ``ipc://``; the trust files are written as a user would (``authorized_keys`` lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from dpipes.bus.auth import ClientCurve
from dpipes.bus.client import Client
from dpipes.bus.keyring import Keyring
from dpipes.bus.keys import KeyPair, load_or_create_keypair
from dpipes.nodes.config import HostPort, NodeConfig
from dpipes.nodes.node import Node
from dpipes.nodes.protocol import (
    CTL,
    PIPELINE_PROTOCOL,
    REFUSED,
    UNAUTHORIZED,
    CancelRequest,
    ControlError,
    InfoRequest,
    RunRequest,
    call,
)
from dpipes.nodes.results import RunFailed
from dpipes.nodes.run import RunOptions, run_pipeline
from tests.users import fork_as, needs_root, nobody

WAIT_S = 20.0


async def until(condition: Callable[[], object], timeout: float = WAIT_S) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)  # polling a condition under a deadline

    await asyncio.wait_for(poll(), timeout)


def key_dir(tmp_path: Path, name: str) -> Path:
    where = tmp_path / name
    where.mkdir(mode=0o700)
    return where


def client_key(tmp_path: Path, name: str) -> KeyPair:
    """User ``name``'s client key pair, in a key directory of its own."""
    return load_or_create_keypair(key_dir(tmp_path, name), "client")[0]


def authorize(where: Path, pair: KeyPair, options: str, comment: str = "test") -> None:
    """Add an ``authorized_keys`` line, as ``dpipes keys trust`` or an editor would."""
    with open(where / "authorized_keys", "a", encoding="utf-8") as f:
        f.write(f"{options + ' ' if options else ''}curve {pair.public.z85} {comment}\n")


def pin(where: Path, node: str, pair: KeyPair) -> None:
    with open(where / "known_nodes", "a", encoding="utf-8") as f:
        f.write(f"{node} {pair.fingerprint} {pair.public.z85}\n")


def node_pair(where: Path) -> KeyPair:
    return load_or_create_keypair(where, "node")[0]


@contextlib.asynccontextmanager
async def secure_node(
    name: str,
    where: Path,
    *,
    peers: Mapping[str, HostPort] | None = None,
    tofu: bool = False,
    allow: frozenset[str] | None = None,
    pass_env: tuple[str, ...] = (),
) -> AsyncIterator[Node]:
    config = NodeConfig(
        name=name,
        key_dir=str(where),
        trust_on_first_use=tofu,
        nodes=MappingProxyType(dict(peers or {})),
        allow=allow,
        pass_env=pass_env,
    )
    async with Node(config, listen="tcp://127.0.0.1:0") as node:
        assert node.hub.secure
        yield node


@contextlib.asynccontextmanager
async def keyed_client(node: Node, pair: KeyPair) -> AsyncIterator[Client]:
    assert node.hub.public_key is not None
    async with Client(node.tcp_endpoint, curve=ClientCurve(pair, node.hub.public_key)) as client:
        yield client


async def run_as(client: Client, pipeline: str) -> None:
    request = RunRequest(pipeline=pipeline, protocol=PIPELINE_PROTOCOL)
    await call(client.endpoint, f"{client.endpoint.node}/{CTL}", request)


def started(node: Node) -> int:
    return node.supervisor.started


async def test_a_key_trusted_for_cat_runs_cat_and_nothing_else(tmp_path: Path) -> None:
    where = key_dir(tmp_path, "alpha")
    alice = client_key(tmp_path, "alice")
    authorize(where, alice, 'run="cat"', "alice@laptop")
    async with secure_node("alpha", where) as alpha, keyed_client(alpha, alice) as client:
        for pipeline in ["sh -c id", "/bin/sh -c id", "/usr/bin/../bin/sh -c id", "env", "cat | env", "cat -u"]:
            with pytest.raises(ControlError) as refused:
                await run_as(client, pipeline)
            assert refused.value.code == UNAUTHORIZED, pipeline
            assert alice.fingerprint in str(refused.value) and "alice@laptop" in str(refused.value)
        assert started(alpha) == 0  # nothing started, not even the stages that were allowed
        await run_as(client, "cat")
        await until(lambda: started(alpha) == 1)


async def test_an_unknown_key_admitted_for_trust_on_first_use_runs_nothing(tmp_path: Path) -> None:
    where = key_dir(tmp_path, "alpha")
    stranger = client_key(tmp_path, "stranger")
    async with secure_node("alpha", where, tofu=True) as alpha, keyed_client(alpha, stranger) as client:
        with pytest.raises(ControlError) as refused:
            await run_as(client, "true")
        assert refused.value.code == UNAUTHORIZED
        assert f"key {stranger.fingerprint} may not run anything here: it is not in authorized_keys" in str(
            refused.value
        )
        assert started(alpha) == 0


async def test_a_client_may_not_negotiate_on_behalf_of_another_key(tmp_path: Path) -> None:
    where = key_dir(tmp_path, "alpha")
    mallory = client_key(tmp_path, "mallory")
    owner = client_key(tmp_path, "owner")
    authorize(where, mallory, 'run="cat"')
    authorize(where, owner, "any")
    async with secure_node("alpha", where) as alpha, keyed_client(alpha, mallory) as client:
        body = {"pipeline": "p1", "stage": 0, "argv": ["sh"], "protocol": PIPELINE_PROTOCOL}
        for caller in (owner.fingerprint, f"uid:{os.getuid()}"):
            with pytest.raises(Exception) as refused:
                await client.endpoint.request(f"alpha/{CTL}", "negotiate", {**body, "caller": caller}, timeout=WAIT_S)
            assert getattr(refused.value, "body", {}).get("code") == UNAUTHORIZED, caller
        assert started(alpha) == 0


@contextlib.asynccontextmanager
async def two_nodes(tmp_path: Path, *, pass_env: tuple[str, ...] = ()) -> AsyncIterator[tuple[Node, Node]]:
    """alpha and beta, each pinning the other's key; alpha has beta as a static peer (and ``pass_env``)."""
    alpha_dir, beta_dir = key_dir(tmp_path, "alpha"), key_dir(tmp_path, "beta")
    pin(alpha_dir, "beta", node_pair(beta_dir))
    pin(beta_dir, "alpha", node_pair(alpha_dir))
    async with secure_node("beta", beta_dir) as beta:
        port = int(beta.tcp_endpoint.rpartition(":")[2])
        peers = {"beta": HostPort("127.0.0.1", port)}
        async with secure_node("alpha", alpha_dir, peers=peers, pass_env=pass_env) as alpha:
            await until(lambda: "beta" in alpha.hub.peers and "alpha" in beta.hub.peers)
            yield alpha, beta


async def run_local(node: Node, pipeline: str) -> bytes:
    """Run ``pipeline`` with the real client, as the node's own user over its ipc socket."""
    with tempfile.TemporaryFile() as out, open(os.devnull, "wb") as err:
        result = await asyncio.wait_for(
            run_pipeline(
                node.ipc_endpoint,
                RunOptions(pipeline),
                stdin_fd=-1,
                stdout_fd=out.fileno(),
                stderr_fd=err.fileno(),
                handle_sigint=False,
            ),
            WAIT_S,
        )
        assert result.exit_code == 0, result
        out.seek(0)
        return out.read()


async def test_a_peer_node_runs_stages_for_the_entry_nodes_user_only_as_its_key_allows(tmp_path: Path) -> None:
    async with two_nodes(tmp_path) as (alpha, beta):
        # alpha's own user asks; beta hears alpha ask on behalf of that user's client key.
        user = Keyring(tmp_path / "alpha").client()[0]
        with pytest.raises(RunFailed) as refused:
            await run_local(alpha, "seq 3 | cat@beta")
        assert refused.value.code == UNAUTHORIZED
        assert f"key {user.fingerprint} may not run anything here" in str(refused.value)
        assert started(alpha) == started(beta) == 0
        authorize(tmp_path / "beta", user, 'run="cat"')  # taken without a restart
        assert await run_local(alpha, "seq 3 | cat@beta") == b"1\n2\n3\n"
        with pytest.raises(RunFailed) as refused:
            await run_local(alpha, "seq 3 | sh@beta -c id")
        assert refused.value.code == UNAUTHORIZED and "'sh'" in str(refused.value)
        assert started(alpha) == started(beta) == 1


async def test_plugin_stages_are_authorized_as_plugins_before_anything_else_is_checked(tmp_path: Path) -> None:
    where = key_dir(tmp_path, "alpha")
    cat_only = client_key(tmp_path, "cat-only")
    plugins = client_key(tmp_path, "plugins")
    authorize(where, cat_only, 'run="cat"')
    authorize(where, plugins, 'plugin="no-such-plugin-here *"')
    async with secure_node("alpha", where) as alpha:
        async with keyed_client(alpha, cat_only) as client:
            with pytest.raises(ControlError) as refused:
                await run_as(client, "cat | %no-such-plugin-here")
            assert refused.value.code == UNAUTHORIZED
            assert "may not run plugin 'no-such-plugin-here' (allowed: none)" in str(refused.value)
        async with keyed_client(alpha, plugins) as client:
            with pytest.raises(ControlError) as refused:
                await run_as(client, "%no-such-plugin-here a=1")
            assert refused.value.code == REFUSED and "is not installed" in str(refused.value)  # authorized: checked on
        assert started(alpha) == 0


async def test_the_allow_list_restricts_arguments_for_everyone(tmp_path: Path) -> None:
    written = tmp_path / "written"
    allow = frozenset({"seq", "sort -r -n '-k[0-9]*'"})
    async with secure_node("alpha", key_dir(tmp_path, "alpha"), allow=allow) as alpha:
        for pipeline in (f"seq 3 | sort -o {written}", "seq 3 | sort --compress-program=sh", "seq 3 | /usr/bin/sort"):
            with pytest.raises(RunFailed) as refused:
                await run_local(alpha, pipeline)  # the node's own user: the allow list holds all the same
            assert refused.value.code == REFUSED and "is not allowed on node alpha" in str(refused.value)
        assert started(alpha) == 0 and not written.exists()
        assert await run_local(alpha, "seq 3 | sort -r -n -k1") == b"3\n2\n1\n"


async def test_every_stage_started_is_logged_with_who_what_and_where(tmp_path: Path) -> None:
    from tests.nodes.daemons import daemons, dpipes

    rt, logs = key_dir(tmp_path, "rt"), key_dir(tmp_path, "logs")
    owner = Keyring().client()[0]  # the tests' key directory, which these daemons share as one user's would
    async with daemons(rt, ["alpha", "beta"], secure=True, log_dir=logs):
        done = await dpipes(rt, "seq 2 | cat@beta")
        assert done.code == 0 and done.stdout == b"1\n2\n", done.stderr
        forged = await dpipes(rt, "echo 'x\nnode alpha: started stage 7 of pipeline forged'")
        assert forged.code == 0, forged.stderr
    alpha, beta = (logs / "alpha.log").read_text(), (logs / "beta.log").read_text()
    me = f"local uid {os.getuid()}"
    here = re.search(rf"node alpha: started stage 0 of pipeline (\w+) for {me}: program 'seq 2', pid", alpha)
    assert here, alpha
    there = f"node beta: started stage 1 of pipeline {here[1]} for key {owner.fingerprint}, asked by node alpha (key "
    assert there in beta and "program 'cat', pid" in beta, beta
    assert "node alpha: started stage 0 of pipeline" in alpha and "\\nnode alpha: started stage 7" in alpha
    assert not any(line.startswith("node alpha: started stage 7") for line in alpha.splitlines())


async def test_objects_carry_whom_their_stage_ran_for_as_the_transport_said(tmp_path: Path) -> None:
    import json

    from tests.nodes.daemons import daemons, dpipes

    rt = key_dir(tmp_path, "rt")
    owner = Keyring().client()[0]
    config = tmp_path / "beta.toml"
    config.write_text("metadata_credential = true\n")
    async with daemons(rt, ["alpha", "beta"], secure=True, extra={"beta": ["--config", str(config)]}):
        done = await dpipes(rt, "--json", "cat | cat@beta", input=b'{"n": 1}\n')
        assert done.code == 0, done.stderr
    # beta ran its stage for alpha's owner: the key alpha vouched for, as the link authenticated alpha
    assert json.loads(done.stdout)["__dpipes"]["dp.credential"] == owner.fingerprint


def environ_of(output: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in output.decode().split("\0") if "=" in line)


async def test_a_stage_sees_a_clean_environment_and_whom_it_runs_for_from_the_transport(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dpipes.nodes.run

    monkeypatch.setenv("DPIPES_TEST_SECRET", "hunter2")  # the daemon's (this process's) environment
    monkeypatch.setenv("DPIPES_TEST_PASSED", "on purpose")
    monkeypatch.setenv("LC_TIME", "C")
    monkeypatch.setattr(dpipes.nodes.run, "current_user", lambda: "mallory")  # what the client claims
    me = pwd.getpwuid(os.getuid()).pw_name
    async with two_nodes(tmp_path, pass_env=("DPIPES_TEST_PASSED",)) as (alpha, _beta):
        here = environ_of(await run_local(alpha, "cat /proc/self/environ"))
        user = Keyring(tmp_path / "alpha").client()[0]
        authorize(tmp_path / "beta", user, 'run="cat /proc/self/environ"')
        there = environ_of(await run_local(alpha, "cat@beta /proc/self/environ"))
    assert "DPIPES_TEST_SECRET" not in here and "hunter2" not in str(here) and "hunter2" not in str(there)
    assert here["DPIPES_TEST_PASSED"] == "on purpose" and "DPIPES_TEST_PASSED" not in there  # alpha's pass_env only
    assert here["LC_TIME"] == "C" and here["PATH"] == os.environ["PATH"] and here["USER"] == me
    assert here["DPIPES_USER"] == me  # the local user the kernel named, not "mallory"
    assert there["DPIPES_USER"] == user.fingerprint  # the key alpha asked on behalf of
    assert here["DPIPES_NODE"] == "alpha" and there["DPIPES_NODE"] == "beta"


HANDSHAKE_WAIT_MS = 20_000  # a bound for the child's wait for its handshake's outcome, not a measurement
_OUTCOMES = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "admitted",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "refused",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "refused",
}


def _handshake(endpoint: str) -> str:  # pragma: no cover - in the child
    """Connect a plain DEALER to ``endpoint``, as a client would: how its handshake ended."""
    ctx = zmq.Context()  # a new context: nothing of the parent's is touched after fork
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    monitor = sock.get_monitor_socket(sum(_OUTCOMES))
    sock.connect(endpoint)
    outcome = "no answer"
    if monitor.poll(HANDSHAKE_WAIT_MS):
        outcome = _OUTCOMES.get(recv_monitor_message(monitor)["event"], "other")
    sock.disable_monitor()
    monitor.close()
    sock.close()
    ctx.term()
    return outcome


async def handshake_as(uid: int | None, endpoint: str) -> str:
    """``admitted`` or ``refused``: how the handshake of user ``uid`` (None: us) with ``endpoint`` ended."""
    child = fork_as(uid, lambda: _handshake(endpoint))
    return await asyncio.to_thread(child.wait)  # in a thread: the node's loop goes on answering ZAP


@needs_root
async def test_another_local_user_is_refused_on_the_unix_socket_and_on_loopback_tcp(
    shared_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = NodeConfig(name="alpha", key_dir=str(key_dir(tmp_path, "alpha")))
    async with Node(config, listen="tcp://127.0.0.1:0", ipc=f"ipc://{shared_dir}/alpha.sock") as alpha:
        (shared_dir / "alpha.sock").chmod(0o777)  # as umask 000 left it: only the kernel's uid check stands
        with caplog.at_level(logging.WARNING, logger="dpipes.bus.auth"):
            assert await handshake_as(nobody(), alpha.ipc_endpoint) == "refused"
            assert await handshake_as(nobody(), alpha.ipc_endpoint) == "refused"  # retried: logged once
            assert await handshake_as(nobody(), alpha.tcp_endpoint) == "refused"  # no key: no CURVE handshake
            assert await handshake_as(None, alpha.ipc_endpoint) == "admitted"  # the daemon's own user
        refusals = [r.getMessage() for r in caplog.records if f"local uid {nobody()}" in r.getMessage()]
        assert len(refusals) == 1 and "node alpha: refused a connection from" in refusals[0], refusals
        assert started(alpha) == 0


async def test_tapping_needs_the_tap_right(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    where = key_dir(tmp_path, "alpha")
    alice, watcher = (client_key(tmp_path, n) for n in ("alice", "watcher"))
    authorize(where, alice, 'run="cat"')
    authorize(where, watcher, "tap")
    config = NodeConfig(name="alpha", key_dir=str(where))
    async with Node(config, listen="tcp://127.0.0.1:0", tap="tcp://127.0.0.1:0") as alpha:
        assert alpha.hub.public_key is not None and alpha.hub.tap_endpoint.startswith("tcp://")
        ctx = zmq.asyncio.Context()
        try:
            subscribers = []
            for me in (alice, watcher):
                sub = ctx.socket(zmq.SUB)
                sub.linger = 0
                sub.curve_secretkey = me.secret_z85.encode()
                sub.curve_publickey = me.public.z85.encode()
                sub.curve_serverkey = alpha.hub.public_key.z85.encode()
                sub.subscribe(b"")
                sub.connect(alpha.hub.tap_endpoint)
                subscribers.append(sub)
            alices, watchers = subscribers
            async with Client(alpha.ipc_endpoint) as client:  # traffic to tap, while both are subscribed
                while not await watchers.poll(100):  # each round trip is an event the tap publishes
                    await call(client.endpoint, "alpha", InfoRequest())
            refused = f"node alpha: refused a connection from {alice.fingerprint}: may not tap this node"
            await until(lambda: any(refused in r.getMessage() for r in caplog.records))
            assert await alices.poll(0) == 0  # refused at the handshake: not one event reached alice
            for sub in subscribers:
                sub.close()
        finally:
            ctx.term()


async def test_only_the_party_that_started_a_run_may_cancel_it(tmp_path: Path) -> None:
    where = key_dir(tmp_path, "alpha")
    alice, mallory = (client_key(tmp_path, n) for n in ("alice", "mallory"))
    authorize(where, alice, 'run="sleep 60"')
    authorize(where, mallory, 'run="cat"')
    async with secure_node("alpha", where) as alpha, keyed_client(alpha, alice) as mine:
        request = RunRequest(pipeline="sleep 60", protocol=PIPELINE_PROTOCOL)
        run = await call(mine.endpoint, f"alpha/{CTL}", request)
        await until(lambda: len(alpha.supervisor.stages) == 1)
        async with keyed_client(alpha, mallory) as theirs:  # knows the id (from a log, a tap, a guess)
            reply = await call(theirs.endpoint, f"alpha/{CTL}", CancelRequest(pipeline=run.pipeline))
        assert reply.stages == 0 and len(alpha.supervisor.stages) == 1  # still running
        await call(mine.endpoint, f"alpha/{CTL}", CancelRequest(pipeline=run.pipeline))
        await until(lambda: not alpha.supervisor.stages)
