"""The live progress view: unit tests on a rich console, and one run in a real terminal (tmux)."""

from __future__ import annotations

import asyncio
import io
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from dpipes.nodes.progress import ProgressView
from dpipes.nodes.run import StageResult
from tests.nodes.daemons import daemons, environment

WAIT_S = 60.0  # a real run in a real terminal, on a busy machine


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100, color_system=None), out


def text_of(view: ProgressView) -> str:
    console, out = terminal()
    console.print(view.render())
    return out.getvalue()


def test_the_table_shows_each_stage_bytes_and_state() -> None:
    view = ProgressView(terminal()[0], show_after_s=0)
    stages = [StageResult(0, "alpha", ["seq", "9"]), StageResult(1, "beta", ["sort"])]
    view.start(stages)
    view.update(0, -1, 1_500_000)  # its input is a kernel pipe: not seen
    view.update(1, 1_500_000, 20)
    shown = text_of(view)
    assert "seq@alpha" in shown and "sort@beta" in shown
    seq_row = next(line for line in shown.splitlines() if "seq@alpha" in line)
    assert "·" in seq_row and "1.5 MB" in seq_row and "running" in seq_row
    stages[0].status, stages[0].bytes_in, stages[0].bytes_out = "exit 0", -1, 2_000_000
    view.exited(stages[0])
    seq_row = next(line for line in text_of(view).splitlines() if "seq@alpha" in line)
    assert "exit 0" in seq_row and "2.0 MB" in seq_row
    view.stop()


def test_text_goes_above_the_live_table_and_the_table_goes_at_the_end() -> None:
    console, out = terminal()
    view = ProgressView(console, show_after_s=0)
    view.start([StageResult(0, "alpha", ["cat"])])
    view.write(b"a line from a stage\n")
    view.stop()
    drawn = out.getvalue()
    assert "a line from a stage" in drawn and "cat@alpha" in drawn  # the table was drawn live


def test_no_table_where_the_console_is_not_a_terminal() -> None:
    out = io.StringIO()
    view = ProgressView(Console(file=out, force_terminal=False), show_after_s=0)
    view.start([StageResult(0, "alpha", ["cat"])])
    view.write(b"plain\n")
    view.stop()
    assert out.getvalue() == "plain\n"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (the CI installs it)")
async def test_a_long_run_shows_progress_in_a_real_terminal(tmp_path: Path) -> None:
    rt = tmp_path / "run"
    rt.mkdir(mode=0o700)
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    server = ["tmux", "-L", f"dpipes-test-{uuid.uuid4().hex[:8]}"]  # our own tmux server, nobody else's

    def tmux(*args: str) -> str:
        return subprocess.run([*server, *args], capture_output=True, text=True, check=False).stdout

    def pane() -> str:
        return tmux("capture-pane", "-p")

    async def until_pane(condition: object) -> str:
        async def poll() -> str:
            while not condition(text := pane()):  # type: ignore[operator]
                await asyncio.sleep(0.1)
            return text

        return await asyncio.wait_for(poll(), WAIT_S)

    async with daemons(rt, ["alpha", "beta"]):
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in environment(rt).items() if k.startswith(("DPIPES_", "PATH")))
        pipeline = f"seq 1 300000 | sh -c 'cat; read x < {fifo}' | cat@beta | wc -c"
        command = f"env {env} {shlex.quote(sys.executable)} -m dpipes.tools.dpipes {shlex.quote(pipeline)} > {out}"
        tmux("new-session", "-d", "-x", "120", "-y", "30", f"{command}; echo exit=$?; exec cat")
        try:
            # stdout is a file, stderr the terminal: progress is on by default.
            shown = await until_pane(lambda t: "sh@alpha" in t and "cat@beta" in t and "2.0 MB" in t)
            sh_row = next(line for line in shown.splitlines() if "sh@alpha" in line)
            assert "2.0 MB" in sh_row and "running" in sh_row
            await asyncio.wait_for(asyncio.to_thread(fifo.write_text, "go\n"), WAIT_S)
            final = await until_pane(lambda t: "exit=" in t)
            assert "exit=0" in final
            assert "sh@alpha" not in final  # the table is transient: gone when the run ended
            assert out.read_text() == "1988895\n"
        finally:
            tmux("kill-server")
