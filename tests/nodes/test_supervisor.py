"""Stage supervision with real programs: pipes, exit statuses, signals, process groups, limits."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import hashlib
import os
import signal
import stat
import sys
import types
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from dpipes.bus.errors import DpipesError, StageError
from dpipes.nodes import supervisor as sv
from dpipes.nodes.supervisor import (
    PIPE_BUFFER_BYTES,
    STDERR_TAIL_BYTES,
    ExitStatus,
    ProgramNotFound,
    StageProcess,
    StageStartError,
    StdinClosed,
    Supervisor,
    set_pipe_size,
    start_stage,
)

pytestmark = pytest.mark.timeout(60)

ENV = {"PATH": os.environ.get("PATH", os.defpath), "LC_ALL": "C"}
WAIT_S = 10.0  # bound on any single awaited condition
POLL_S = 0.005  # polling period for kernel state that has no event (process states, pipe fill)


def proc_state(pid: int) -> str | None:
    """The /proc state letter of ``pid``, or None if it no longer exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()[0].decode()


def proc_file(path: str) -> str:
    """Text of a small /proc (or /sys) file."""
    with open(path) as f:
        return f.read()


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    return proc_state(pid) not in (None, "Z", "X")


def children(pid: int) -> set[int]:
    """Live descendants of ``pid``."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in os.listdir(f"/proc/{parent}/task") if os.path.isdir(f"/proc/{parent}/task") else []:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid not in found and alive(kid):
                    found.add(kid)
                    todo.append(kid)
    return found


async def until(cond: Callable[[], object], what: str) -> None:
    """Poll ``cond`` until it holds, under ``WAIT_S``."""
    try:
        async with asyncio.timeout(WAIT_S):
            while True:
                if cond():
                    return
                await asyncio.sleep(POLL_S)
    except TimeoutError:
        pytest.fail(f"timed out after {WAIT_S}s waiting for {what}")


async def read_all(stage: StageProcess) -> bytes:
    out = bytearray()
    while chunk := await stage.read_stdout():
        out += chunk
    return bytes(out)


@pytest.fixture
async def stages() -> AsyncIterator[Supervisor]:
    async with Supervisor(grace_s=1.0) as sup:
        yield sup


# -- data path -----------------------------------------------------------------------------------


async def test_cat_50mb_byte_exact_with_concurrent_write_and_read(stages: Supervisor) -> None:
    data = os.urandom(50 << 20)
    stage = await stages.start(["cat"], env=ENV)

    async def feed() -> None:
        view = memoryview(data)
        for i in range(0, len(data), 700_001):  # odd size: chunk boundaries never line up
            await stage.write_stdin(view[i : i + 700_001])
        stage.close_stdin()

    async def drain() -> tuple[int, bytes]:
        digest = hashlib.sha256()
        total = 0
        while chunk := await stage.read_stdout():
            assert len(chunk) <= sv.READ_CHUNK_BYTES
            digest.update(chunk)
            total += len(chunk)
        return total, digest.digest()

    async with asyncio.timeout(30):
        _, (total, digest) = await asyncio.gather(feed(), drain())
        assert (await stage.wait()).ok
    assert total == len(data)
    assert digest == hashlib.sha256(data).digest()


async def test_coalesced_reads_keep_a_streaming_producers_bytes_exact(stages: Supervisor, tmp_path: Path) -> None:
    data = os.urandom(32 << 20)
    path = tmp_path / "data"
    path.write_bytes(data)
    stage = await stages.start(["cat", str(path)], env=ENV)  # cat writes 128 KiB at a time
    chunks = []
    async with asyncio.timeout(30):
        while chunk := await stage.read_stdout(coalesce=True):
            chunks.append(chunk)
        assert (await stage.wait()).ok
    assert b"".join(chunks) == data
    assert all(len(c) <= sv.READ_CHUNK_BYTES for c in chunks)


async def test_coalesced_reads_do_not_hold_back_a_producer_that_waits_for_an_answer(stages: Supervisor) -> None:
    """A bulk write, then a wait for input: what was written arrives without more coming."""
    script = "import sys; sys.stdout.buffer.write(b'x' * 200_000); sys.stdout.flush(); input(); print('bye')"
    stage = await stages.start([sys.executable, "-c", script], env=ENV)
    got = bytearray()
    async with asyncio.timeout(WAIT_S):
        while len(got) < 200_000:
            got += await stage.read_stdout(coalesce=True)
        await stage.write_stdin(b"go\n")
        assert await read_all(stage) == b"bye\n"
        assert (await stage.wait()).ok
    assert got == b"x" * 200_000


async def test_two_stages_joined_by_a_given_pipe_pass_data_without_us(stages: Supervisor) -> None:
    r, w = os.pipe()
    producer = await stages.start(["seq", "100000"], env=ENV, stdout_fd=w)
    consumer = await stages.start(["wc", "-l"], env=ENV, stdin_fd=r)  # ends only if we hold no copy of w
    assert await producer.read_stdout() == b""  # not ours to read
    with pytest.raises(StdinClosed):
        await consumer.write_stdin(b"x")  # not ours to write
    async with asyncio.timeout(WAIT_S):
        assert await read_all(consumer) == b"100000\n"
        assert (await producer.wait()).ok and (await consumer.wait()).ok


async def test_a_given_descriptor_is_closed_even_when_the_program_does_not_exist(stages: Supervisor) -> None:
    r, w = os.pipe()
    with pytest.raises(ProgramNotFound):
        await stages.start(["no-such-program-dpipes"], env=ENV, stdin_fd=r)
    try:
        with pytest.raises(BrokenPipeError):  # the only read end is gone
            os.write(w, b"x")
    finally:
        os.close(w)


async def test_pipes_get_a_one_mib_buffer(stages: Supervisor) -> None:
    stage = await stages.start(["cat"], env=ENV)
    limit = int(proc_file("/proc/sys/fs/pipe-max-size"))
    assert stage.pipe_size == PIPE_BUFFER_BYTES or stage.pipe_size == limit
    stage.close_stdin()
    assert await read_all(stage) == b""


def test_set_pipe_size_falls_back_to_what_the_kernel_allows(monkeypatch: pytest.MonkeyPatch) -> None:
    # Mock: as root (CI) the kernel never refuses; stand in an unprivileged kernel's EPERM over limit.
    limit = int(proc_file("/proc/sys/fs/pipe-max-size"))
    real = fcntl.fcntl

    def unprivileged(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == sv._F_SETPIPE_SZ and arg > limit:
            raise OSError(errno.EPERM, "Operation not permitted")
        return real(fd, cmd, arg)

    monkeypatch.setattr(sv, "fcntl", types.SimpleNamespace(fcntl=unprivileged))
    r, w = os.pipe()
    try:
        assert set_pipe_size(w, limit * 4) == limit == real(r, sv._F_GETPIPE_SZ)
    finally:
        os.close(r)
        os.close(w)


def test_set_pipe_size_on_a_non_pipe_does_not_raise(tmp_path: Path) -> None:
    with open(tmp_path / "file", "wb") as f:
        assert set_pipe_size(f.fileno()) == 0


async def test_write_returns_only_once_the_pipe_took_the_bytes(stages: Supervisor) -> None:
    stage = await stages.start(["sleep", "100"], env=ENV)  # never reads its stdin
    await asyncio.wait_for(stage.write_stdin(b"x" * stage.pipe_size), WAIT_S)  # fits in the pipe
    blocked = asyncio.create_task(stage.write_stdin(b"y"))
    for _ in range(20):
        await asyncio.sleep(0)  # let the loop run the write; nothing will ever drain the pipe
    assert not blocked.done()
    await stage.terminate()
    with pytest.raises(StdinClosed):
        await blocked


async def test_write_now_takes_what_the_pipe_holds_and_never_waits(stages: Supervisor) -> None:
    stage = await stages.start(["sleep", "100"], env=ENV)  # never reads its stdin
    data = b"x" * (stage.pipe_size * 2)
    sent = stage.write_stdin_now(data)
    assert 0 < sent <= stage.pipe_size
    assert stage.write_stdin_now(data[sent:]) == 0  # full: nothing more, and no wait
    await stage.terminate()
    assert stage.write_stdin_now(b"more") == 0  # closed


async def test_write_now_then_write_stdin_deliver_every_byte_in_order(stages: Supervisor) -> None:
    stage = await stages.start(["cat"], env=ENV)
    data = os.urandom(stage.pipe_size * 3 + 12345)
    sent = stage.write_stdin_now(data)
    assert sent > 0

    async def rest() -> None:
        await stage.write_stdin(memoryview(data)[sent:])
        stage.close_stdin()

    async with asyncio.timeout(WAIT_S):
        _, out = await asyncio.gather(rest(), read_all(stage))
    assert out == data


async def test_unread_stdout_blocks_the_producer(stages: Supervisor) -> None:
    stage = await stages.start(["yes"], env=ENV)
    await until(lambda: stage.stdout_buffered() >= stage.pipe_size - 8192, "yes to fill its stdout pipe")
    await until(lambda: proc_state(stage.pid) == "S", "yes to block in write()")
    wchan = proc_file(f"/proc/{stage.pid}/wchan")
    assert wchan in ("0", "", "pipe_write") or "pipe" in wchan
    assert stage.stdout_buffered() <= stage.pipe_size  # the kernel holds at most one pipe's worth
    status = proc_file(f"/proc/{stage.pid}/status")
    rss_kib = int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("VmRSS:")))
    assert rss_kib < 16 << 10  # and the program is not buffering on its own either
    chunk = await stage.read_stdout()  # reading unblocks it
    assert chunk.startswith(b"y\ny\n")
    assert (await stage.terminate()).signal == signal.SIGTERM


async def test_stdin_closed_when_the_program_exits_early(stages: Supervisor) -> None:
    stage = await stages.start(["head", "-c", "10"], env=ENV)
    with pytest.raises(StdinClosed) as caught:
        await asyncio.wait_for(stage.write_stdin(b"0123456789" * (800 << 10)), WAIT_S)  # 8 MB
    assert isinstance(caught.value, BrokenPipeError)
    assert isinstance(caught.value, DpipesError)
    assert await read_all(stage) == b"0123456789"
    assert (await stage.wait()).ok
    with pytest.raises(StdinClosed):
        await stage.write_stdin(b"more")


async def test_write_after_close_stdin_raises(stages: Supervisor) -> None:
    stage = await stages.start(["cat"], env=ENV)
    await stage.write_stdin(b"abc")
    stage.close_stdin()
    stage.close_stdin()  # idempotent
    with pytest.raises(StdinClosed):
        await stage.write_stdin(b"def")
    assert await read_all(stage) == b"abc"


async def test_sigpipe_is_default_in_the_child_like_yes_into_head(stages: Supervisor) -> None:
    stage = await stages.start(["yes"], env=ENV)
    assert (await stage.read_stdout(4)) == b"y\ny\n"
    stage.close_stdout()  # the consumer went away
    status = await asyncio.wait_for(stage.wait(), WAIT_S)
    assert status == ExitStatus(signal=signal.SIGPIPE)
    assert status.describe() == "killed by SIGPIPE"
    assert await stage.read_stdout() == b""


async def test_two_readers_of_one_pipe_is_a_bug(stages: Supervisor) -> None:
    stage = await stages.start(["sleep", "100"], env=ENV)
    first = asyncio.create_task(stage.read_stdout())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already"):
        await stage.read_stdout()
    await stage.terminate()
    assert await first == b""


# -- exit status, stderr, environment ------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 255])
async def test_exit_codes(stages: Supervisor, code: int) -> None:
    stage = await stages.start(["sh", "-c", f"exit {code}"], env=ENV)
    status = await asyncio.wait_for(stage.wait(), WAIT_S)
    assert status == ExitStatus(code=code) == stage.status
    assert status.describe() == f"exit {code}"
    assert status.ok == (code == 0)
    assert status.shell_code == code


async def test_killed_by_a_signal(stages: Supervisor) -> None:
    stage = await stages.start(["sh", "-c", "kill -USR1 $$; sleep 100"], env=ENV)
    status = await asyncio.wait_for(stage.wait(), WAIT_S)
    assert status.signal == signal.SIGUSR1
    assert str(status) == "killed by SIGUSR1"
    assert status.shell_code == 128 + signal.SIGUSR1


def test_exit_status_from_returncode() -> None:
    assert ExitStatus.from_returncode(-9).describe() == "killed by SIGKILL"
    assert ExitStatus.from_returncode(2) == ExitStatus(code=2)
    assert ExitStatus(signal=200).describe() == "killed by signal 200"


async def test_stderr_tail_keeps_the_last_64_kib(stages: Supervisor) -> None:
    stage = await stages.start(["seq", "100000"], env=ENV)
    stage_err = await stages.start(["sh", "-c", "seq 100000 >&2"], env=ENV)
    expected = await read_all(stage)
    assert len(expected) > 4 * STDERR_TAIL_BYTES
    assert (await asyncio.wait_for(stage_err.wait(), WAIT_S)).ok  # stderr drained internally
    assert await read_all(stage_err) == b""
    await stage_err.terminate()  # joins the drain
    assert stage_err.stderr_tail == expected[-STDERR_TAIL_BYTES:]
    with pytest.raises(RuntimeError, match="forward_stderr"):
        await stage_err.read_stderr()


async def test_read_stderr_when_forwarded(stages: Supervisor) -> None:
    stage = await stages.start(["sh", "-c", "echo out; seq 30000 >&2; echo done >&2"], env=ENV, forward_stderr=True)
    err = bytearray()
    while chunk := await asyncio.wait_for(stage.read_stderr(), WAIT_S):
        err += chunk
    expected = "".join(f"{i}\n" for i in range(1, 30001)).encode() + b"done\n"
    assert bytes(err) == expected
    assert stage.stderr_tail == expected[-STDERR_TAIL_BYTES:]
    assert await read_all(stage) == b"out\n"
    assert (await stage.wait()).ok


async def test_environment_is_exactly_what_was_given(stages: Supervisor, tmp_path: Path) -> None:
    env = {**ENV, "DPIPES_NODE": "alpha", "ODD": "a b=c"}
    stage = await stages.start(["env"], env=env, cwd=tmp_path)
    lines = set((await read_all(stage)).decode().splitlines())
    assert lines == {f"{k}={v}" for k, v in env.items()}
    stage = await stages.start(["pwd"], env=ENV, cwd=tmp_path)
    assert (await read_all(stage)).decode().strip() == str(tmp_path)


async def test_child_inherits_no_other_descriptors(stages: Supervisor) -> None:
    leaky_r, leaky_w = os.pipe()
    os.set_inheritable(leaky_r, True)
    os.set_inheritable(leaky_w, True)
    try:
        stage = await stages.start(["ls", "/proc/self/fd"], env=ENV)
        fds = {int(x) for x in (await read_all(stage)).split()}
    finally:
        os.close(leaky_r)
        os.close(leaky_w)
    assert fds == {0, 1, 2, 3}  # 3 is ls's own handle on the directory


async def test_stage_is_its_own_process_group(stages: Supervisor) -> None:
    stage = await stages.start(["sleep", "100"], env=ENV)
    assert os.getpgid(stage.pid) == stage.pid == stage.pgid
    assert os.getpgid(stage.pid) != os.getpgid(0)


# -- start errors --------------------------------------------------------------------------------


async def test_missing_program_is_named(stages: Supervisor) -> None:
    with pytest.raises(ProgramNotFound, match="no-such-program-dp") as caught:
        await stages.start(["no-such-program-dp", "-x"], env=ENV)
    assert isinstance(caught.value, StageError)
    assert isinstance(caught.value, FileNotFoundError)
    assert not stages.stages


async def test_missing_working_directory(stages: Supervisor, tmp_path: Path) -> None:
    with pytest.raises(StageStartError, match="working directory") as caught:
        await stages.start(["cat"], env=ENV, cwd=tmp_path / "gone")
    assert not isinstance(caught.value, ProgramNotFound)


async def test_not_executable(stages: Supervisor, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    if os.access(script, os.X_OK):
        pytest.skip("running as a user for whom every file is executable")
    with pytest.raises(StageStartError, match="script"):
        await stages.start([str(script)], env=ENV)


async def test_empty_argv(stages: Supervisor) -> None:
    with pytest.raises(StageStartError, match="no program"):
        await stages.start([], env=ENV)


async def test_no_fd_leak_on_start_errors(stages: Supervisor) -> None:
    before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(ProgramNotFound):
            await start_stage(["no-such-program-dp"], env=ENV)
    assert set(os.listdir("/proc/self/fd")) == before


# -- terminate, kill, supervisor ------------------------------------------------------------------


async def test_terminate_kills_grandchildren(stages: Supervisor) -> None:
    stage = await stages.start(["sh", "-c", "sleep 100 & sleep 100"], env=ENV)
    await until(lambda: children(stage.pid), "the stage to fork its grandchild")
    kids = children(stage.pid)
    status = await stage.terminate()
    assert status.signal == signal.SIGTERM or status.code == 128 + signal.SIGTERM
    await until(lambda: not any(alive(k) for k in kids), "grandchildren to die")
    assert not alive(stage.pid)


async def test_terminate_sweeps_a_group_whose_leader_already_exited(stages: Supervisor) -> None:
    stage = await stages.start(["sh", "-c", "sleep 100 & echo started"], env=ENV)
    assert await stage.read_stdout() == b"started\n"
    assert (await asyncio.wait_for(stage.wait(), WAIT_S)).ok
    kids = [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _pgid(pid) == stage.pid]
    kids = [pid for pid in kids if alive(pid)]
    assert kids  # the background sleep outlived the shell, holding stdout open
    assert (await stage.terminate()).ok
    await until(lambda: not any(alive(k) for k in kids), "the orphaned sleep to die")
    assert await stage.read_stdout() == b""


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


async def test_sigkill_after_grace_when_sigterm_is_ignored(stages: Supervisor) -> None:
    stage = await stages.start(["sh", "-c", "trap '' TERM; sleep 100 & echo ready; wait"], env=ENV)
    assert await stage.read_stdout() == b"ready\n"
    kids = children(stage.pid)
    status = await asyncio.wait_for(stage.terminate(grace_s=0.3), WAIT_S)
    assert status == ExitStatus(signal=signal.SIGKILL)
    await until(lambda: not any(alive(k) for k in kids), "the TERM-immune grandchild to die")


async def test_terminate_is_idempotent_and_kill_is_immediate(stages: Supervisor) -> None:
    stage = await stages.start(["sleep", "100"], env=ENV)
    first, second = await asyncio.gather(stage.terminate(), stage.terminate())
    assert first == second == await stage.terminate() == ExitStatus(signal=signal.SIGTERM)
    other = await stages.start(["sh", "-c", "trap '' TERM; echo ready; exec sleep 100"], env=ENV)
    assert await other.read_stdout() == b"ready\n"
    assert await asyncio.wait_for(other.kill(), WAIT_S) == ExitStatus(signal=signal.SIGKILL)


async def test_cancelled_terminate_still_kills(stages: Supervisor) -> None:
    stage = await stages.start(["sh", "-c", "trap '' TERM; echo ready; exec sleep 100"], env=ENV)
    assert await stage.read_stdout() == b"ready\n"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(stage.terminate(grace_s=60), 0.2)
    assert await asyncio.wait_for(stage.wait(), WAIT_S) == ExitStatus(signal=signal.SIGKILL)


async def test_supervisor_terminates_everything_on_exit() -> None:
    async with Supervisor(grace_s=0.5) as sup:
        started = [await sup.start(["sleep", "100"], env=ENV) for _ in range(3)]
        done = await sup.start(["true"], env=ENV)
        assert (await done.wait()).ok
        await done.terminate()
        assert sup.stages == frozenset(started)  # a terminated stage is forgotten
    assert not sup.stages
    assert all(s.status == ExitStatus(signal=signal.SIGTERM) for s in started)
    with pytest.raises(StageError, match="shutting down"):
        await sup.start(["true"], env=ENV)


async def test_kill_cuts_a_terminate_grace_short(stages: Supervisor) -> None:
    stage = await stages.start(["sh", "-c", "trap '' TERM; echo ready; exec sleep 100"], env=ENV)
    assert await stage.read_stdout() == b"ready\n"
    patient = asyncio.create_task(stage.terminate(grace_s=60))
    await until(lambda: stage._terminating is not None, "terminate to start")
    assert await asyncio.wait_for(stage.kill(), WAIT_S) == ExitStatus(signal=signal.SIGKILL)
    assert await asyncio.wait_for(patient, WAIT_S) == ExitStatus(signal=signal.SIGKILL)


async def test_nul_in_environment_is_a_start_error(stages: Supervisor) -> None:
    with pytest.raises(StageStartError, match="null"):
        await stages.start(["true"], env={**ENV, "X": "a\0b"})


async def test_a_pipe_that_never_runs_dry_does_not_starve_the_loop(
    stages: Supervisor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sv, "YIELD_EVERY_BYTES", 64 << 10)
    stage = await stages.start(["yes"], env=ENV)
    await until(lambda: stage.stdout_buffered() >= stage.pipe_size - 8192, "yes to fill its stdout pipe")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    for _ in range(3):  # data is there every time: none of these reads has to wait
        assert len(await stage.read_stdout(128 << 10)) == 128 << 10
    assert ticks >= 1  # yet the loop got to run other tasks
    task.cancel()
    await stage.terminate()
