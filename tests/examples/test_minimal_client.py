"""The minimal client of examples/ (pyzmq + msgpack, written from the two spec docstrings) against
real dpipesd daemons: the test that a client needs nothing of dpipes but its specs."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import sys
from pathlib import Path

import pytest

from tests.nodes.daemons import Completed, Daemon, daemons

CLIENT = Path(__file__).resolve().parents[2] / "examples" / "minimal_client" / "dpipes_client.py"
RUN_WAIT_S = 60.0  # a bound on a whole run on a busy machine; `sleep 300` outlives it by far
CHILD_WAIT_S = 30.0
DUMP_WAIT_S = 1.0  # a hung client's faulthandler writes its stacks at once; this only bounds the wait

# Runs the client as `python -I` (no PYTHONPATH, no user site) with imports of `dpipes` refused,
# so that the example cannot lean on the package it documents, even lazily.
LAUNCHER = """
import faulthandler, runpy, signal, sys

faulthandler.register(signal.SIGUSR1)  # where it hangs, should a test time out

class RefuseDpipes:
    def find_spec(self, name, path=None, target=None):
        if name == "dpipes" or name.startswith("dpipes."):
            raise ImportError(f"the minimal client imported {name}")
        return None

sys.meta_path.insert(0, RefuseDpipes())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ipc(rt: Path, daemon: Daemon) -> str:
    """The daemon's own ``ipc://`` endpoint in its runtime directory."""
    return f"ipc://{rt / daemon.name}.sock"


async def start_client(*args: str, stdin: int | None = asyncio.subprocess.DEVNULL) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-c",
        LAUNCHER,
        str(CLIENT),
        *args,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def client(*args: str, input: bytes | None = None) -> Completed:
    proc = await start_client(*args, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    err = bytearray()  # ours, not communicate()'s: a timeout must still show what the client said

    async def feed() -> None:
        if proc.stdin is not None:
            proc.stdin.write(input or b"")
            await proc.stdin.drain()
            proc.stdin.close()

    async def read_err() -> None:
        while chunk := await proc.stderr.read(1 << 16):  # type: ignore[union-attr]
            err.extend(chunk)

    reading = asyncio.gather(proc.stdout.read(), read_err(), feed(), proc.wait())
    try:
        out, *_ = await asyncio.wait_for(asyncio.shield(reading), RUN_WAIT_S)
    except TimeoutError:
        proc.send_signal(signal.SIGUSR1)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), DUMP_WAIT_S)  # the dump goes out; the client still hangs
        proc.kill()
        await asyncio.gather(reading, return_exceptions=True)
        pytest.fail(f"the client did not finish within {RUN_WAIT_S} s; its stderr:\n{err.decode(errors='replace')}")
    stderr = err.decode(errors="replace")
    assert "imported dpipes" not in stderr
    assert "Traceback" not in stderr, stderr
    return Completed(proc.returncode if proc.returncode is not None else -1, out, stderr)


async def until(condition: object, timeout: float = CHILD_WAIT_S) -> None:
    async def poll() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


def programs(daemon: Daemon) -> list[str]:
    """The program names of the daemon's running children (its stages)."""
    names = []
    for pid in daemon.children():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                names.append(os.path.basename(f.read().split(b"\0")[0].decode()))
        except OSError:
            pass  # it ended while we looked
    return names


async def test_seq_sort_prints_5_to_1_and_every_stage_reports_exit_0(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        done = await client("--node", alpha.tcp, "seq 5 | sort -r")
    assert done.stdout == b"5\n4\n3\n2\n1\n"
    assert done.code == 0, done.stderr
    assert "stage 0 on alpha: exit 0" in done.stderr
    assert "stage 1 on alpha: exit 0" in done.stderr


async def test_stdin_is_streamed_into_the_first_stage_over_ipc(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        done = await client("--node", ipc(rt, alpha), "--stdin", "sort", input=b"b\na\n")
    assert done.stdout == b"a\nb\n"
    assert done.code == 0, done.stderr


async def test_a_stage_s_stderr_and_exit_status_reach_the_client(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        done = await client("--node", alpha.tcp, "sh -c 'echo oops >&2; exit 3'")
    assert "oops\n" in done.stderr
    assert done.code == 3


async def test_cancel_after_ends_the_run_and_leaves_no_stage_running(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        done = await client("--node", alpha.tcp, "--cancel-after", "1", "sleep 300 | cat")
        # Each stage reported `exit` before the client ended, so the daemon has reaped them.
        assert "sleep" not in programs(alpha)
        assert "cat" not in programs(alpha)
    assert done.code != 0
    assert "stage 0 on alpha: killed by SIGTERM" in done.stderr
    assert "(cancelled: " in done.stderr  # the exit report's typed `cancelled` field, not error text


async def test_ctrl_c_cancels_the_run(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        proc = await start_client("--node", alpha.tcp, "sleep 300")
        await until(lambda: "sleep" in programs(alpha))
        proc.send_signal(signal.SIGINT)
        _out, err = await asyncio.wait_for(proc.communicate(), RUN_WAIT_S)
        assert "sleep" not in programs(alpha)
    assert proc.returncode == 130, err.decode()  # as dpipes after Ctrl-C: the output is not whole


async def test_a_refused_run_exits_non_zero_and_says_why(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        done = await client("--node", alpha.tcp, "no-such-program")
    assert done.code != 0
    assert "no-such-program" in done.stderr
    assert "stage 0 on" not in done.stderr  # nothing started
    assert "[refused]" in done.stderr  # the failed REPLY's body.code


async def test_output_beyond_the_initial_credit_arrives_whole(rt: Path) -> None:
    """The client must grant credit as it writes: 20 MB is more than a stream's first 8 MiB."""
    expected = b"".join(b"%d\n" % i for i in range(1, 3_000_001))
    async with daemons(rt, ["alpha"]) as (alpha,):
        done = await client("--node", alpha.tcp, "seq 1 3000000")
    assert done.code == 0, done.stderr
    assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(expected).digest()


async def test_input_beyond_the_initial_credit_arrives_whole(rt: Path) -> None:
    """The client must take the node's CREDIT grants: 20 MB is more than a stream's first 8 MiB.

    (That it never sends beyond its credit cannot be seen from here: the node does not enforce it.)
    """
    data = os.urandom(20 << 20)
    async with daemons(rt, ["alpha"]) as (alpha,):
        done = await client("--node", ipc(rt, alpha), "--stdin", "cat | cat", input=data)
    assert done.code == 0, done.stderr
    assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(data).digest()


async def test_a_reader_that_exits_early_stops_the_pipeline_as_sigpipe(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        read, write = os.pipe()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-c", LAUNCHER, str(CLIENT), "--node", alpha.tcp, "yes",
            stdin=asyncio.subprocess.DEVNULL, stdout=write, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        os.close(write)
        assert os.read(read, 2) == b"y\n"
        os.close(read)  # as `| head -1` does
        _out, err = await asyncio.wait_for(proc.communicate(), RUN_WAIT_S)
        assert "yes" not in programs(alpha)
    assert "stage 0 on alpha: killed by SIGPIPE" in err.decode()


async def test_two_nodes(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _beta):
        # --trace: this case hung twice under load and did not reproduce since; should it again, the
        # failure shows the conversation up to the hang.
        done = await client("--trace", "--node", alpha.tcp, "seq 5 | sort@beta -r")
    assert done.stdout == b"5\n4\n3\n2\n1\n"
    assert done.code == 0, done.stderr
    assert "stage 1 on beta: exit 0" in done.stderr
