"""The short path of ``dpipes`` (no asyncio) reads a last stage on another node at that node
(dpipes.nodes.local_direct): at its Unix socket, or over TCP with CURVE, or through the entry node
when it cannot; real nodes, real programs, the entry hub's tap as the witness."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

from dpipes.bus.keys import KEY_DIR_ENV
from dpipes.bus.tap import TapEvent
from dpipes.nodes import direct_read, local_direct, protocol
from dpipes.nodes.local_run import run_local
from dpipes.nodes.node import Node
from dpipes.nodes.paths import node_files
from tests.nodes.daemons import Completed, daemons, environment
from tests.nodes.test_direct_read import kill_once_read_there, owner_key, tapped, tapped_at
from tests.nodes.test_security import authorize, client_key, two_nodes

WAIT_S = 30.0
DATA_BYTES = 3 << 20  # several chunks of a stage's output

# The real command, its INFO log on stderr (the short path logs where it read the output), and
# whether it imported asyncio (the full path does).
PROBE = (
    "import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
    "from dpipes.tools.dpipes import main; code = main(sys.argv[1:]); "
    "print('asyncio imported:', 'asyncio' in sys.modules, file=sys.stderr); sys.exit(code)"
)


async def until(condition: Callable[[], object]) -> None:
    while not condition():
        await asyncio.sleep(0.02)  # polling a condition under the caller's deadline


def test_the_constants_are_the_full_clients() -> None:
    assert local_direct.DIRECT_ATTACH_TIMEOUT_S == direct_read.DIRECT_ATTACH_TIMEOUT_S
    assert local_direct.CONTROL_TIMEOUT_S == protocol.CONTROL_TIMEOUT_S
    assert local_direct.NOT_FOUND == protocol.NOT_FOUND


async def short_dpipes(rt: Path, pipeline: str, env: dict[str, str] | None = None) -> Completed:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PROBE, pipeline, env={**environment(rt), **(env or {})},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    return Completed(proc.returncode or 0, out, err.decode(errors="replace"))


def from_beta(events: list[TapEvent]) -> int:
    """Bytes of beta's stages' output the tapped hub routed."""
    return sum(e.size for e in events if e.src.startswith("beta/") and e.kind == "BYTES")


async def test_the_short_path_reads_the_last_stage_at_its_nodes_unix_socket(rt: Path, tmp_path: Path) -> None:
    path, content = tmp_path / "data.bin", os.urandom(DATA_BYTES) + b"no newline at the end"
    path.write_bytes(content)
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):  # alpha is this host's daemon: no --node
        tap = node_files(rt, "alpha").tap_endpoint
        async with tapped_at("alpha", tap, alpha.ipc) as through_entry:
            direct = await short_dpipes(rt, f"cat {path} | cat@beta")
        async with tapped_at("alpha", tap, alpha.ipc) as through_entry_old:
            old = await short_dpipes(rt, f"cat {path} | cat@beta", env={"DPIPES_DIRECT_READ": "0"})
    assert direct.code == old.code == 0, (direct.stderr, old.stderr)
    assert direct.stdout == old.stdout == content
    assert "read at node beta (ipc://" in direct.stderr and "asyncio imported: False" in direct.stderr
    assert "read at node beta" not in old.stderr and "asyncio imported: False" in old.stderr
    assert from_beta(through_entry) == 0  # it never passed alpha's hub
    assert from_beta(through_entry_old) == len(content)


async def test_the_last_node_killed_while_the_short_path_reads_there_is_named(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PROBE, "yes | cat@beta", env=environment(rt),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        said = await kill_once_read_there(proc, beta)
        assert await asyncio.wait_for(proc.wait(), WAIT_S) == 125
        err = (said + await proc.stderr.read()).decode()
        assert "node 'beta' lost" in err and "cat" in err
        assert "asyncio imported: False" in err
        await asyncio.wait_for(until(lambda: not alpha.children()), WAIT_S)  # its `yes` is stopped


async def run_short_at(node: Node, pipeline: str) -> bytes:
    """Run ``pipeline`` on the short path over ``node``'s ipc socket (in a thread: it blocks); its output."""
    with tempfile.TemporaryFile() as out, open(os.devnull, "wb") as err:
        result = await asyncio.wait_for(
            asyncio.to_thread(
                run_local,
                pipeline,
                stdin=False,
                entry=node.ipc_endpoint,
                stdout_fd=out.fileno(),
                stderr_fd=err.fileno(),
                handle_sigint=False,
            ),
            WAIT_S,
        )
        assert result is not None and result.exit_code == 0, result
        out.seek(0)
        return out.read()


async def test_the_short_path_reads_over_tcp_with_our_key_or_through_the_entry_node_when_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DPIPES_RUNTIME_DIR", str(tmp_path))  # no daemon of ours by beta's name here: TCP
    path, content = tmp_path / "data.bin", os.urandom(DATA_BYTES)
    path.write_bytes(content)
    client_key(tmp_path, "elsewhere")
    async with two_nodes(tmp_path) as (alpha, _beta):
        authorize(tmp_path / "beta", owner_key(tmp_path / "alpha"), 'run="cat"')
        monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "alpha"))  # the client is alpha's own user: admitted
        async with tapped(alpha) as through_entry:
            direct = await run_short_at(alpha, f"cat {path} | cat@beta")
        # Our own client key is not the one alpha names for its user: beta refuses it at the handshake.
        monkeypatch.setenv(KEY_DIR_ENV, str(tmp_path / "elsewhere"))
        async with tapped(alpha) as through_entry_refused:
            refused = await run_short_at(alpha, f"cat {path} | cat@beta")
    assert direct == refused == content
    assert from_beta(through_entry) == 0  # read over TCP at beta, with CURVE
    assert from_beta(through_entry_refused) == DATA_BYTES


async def test_reading_at_a_daemon_of_ours_imports_no_pyzmq_asyncio_or_logging(rt: Path) -> None:
    unneeded = ("asyncio", "zmq", "logging", "dpipes.bus.zmq_dealer", "dpipes.bus.keyring")
    probe = (
        "import sys; from dpipes.tools.dpipes import main; code = main(['echo x | cat@beta']); "
        f"print(code, [m for m in {unneeded!r} if m in sys.modules], file=sys.stderr)"
    )
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        tap = node_files(rt, "alpha").tap_endpoint
        async with tapped_at("alpha", tap, alpha.ipc) as through_entry:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", probe, env=environment(rt),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert out == b"x\n"
    assert err.decode().strip().splitlines()[-1] == "0 []"
    assert from_beta(through_entry) == 0  # and it was read at beta
