"""A stage dies with its node, however it was launched (setpriv, or a fork with a preexec_fn)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpipes.nodes import launch
from tests.nodes.test_supervisor import ENV, WAIT_S, alive, proc_file

pytestmark = pytest.mark.timeout(60)

# A node in miniature: a Supervisor in a process of its own that starts `sleep 300`, prints its
# pid once it runs the program, then blocks until it is killed. argv[1] "preexec" takes the
# fork-with-preexec_fn launch even where setpriv is installed.
NODE = """
import asyncio, os, sys
from dpipes.nodes import launch
if sys.argv[1] == "preexec":
    launch._probed, launch._setpriv = True, None
from dpipes.nodes.supervisor import Supervisor

async def main():
    async with Supervisor() as sup:
        stage = await sup.start(["sleep", "300"], env={"PATH": os.environ["PATH"]})
        print(stage.pid, flush=True)
        sys.stdin.read()

asyncio.run(main())
"""


def until(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling kernel state that has no event to await


def runs(pid: int, program: str) -> bool:
    try:
        return proc_file(f"/proc/{pid}/comm").strip() == program
    except OSError:
        return False


@pytest.mark.parametrize("how", ["setpriv", "preexec"])
def test_a_stage_dies_when_its_node_is_killed_hard(how: str) -> None:
    if how == "setpriv" and launch.launcher("sleep", env=ENV, cwd=None) is None:
        pytest.skip("no setpriv with --pdeathsig on this host")
    node = subprocess.Popen([sys.executable, "-c", NODE, how], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        pid = int(node.stdout.readline())
        until(lambda: runs(pid, "sleep"), "the stage to exec sleep")
        assert os.getpgid(pid) == pid  # still its own process group, as with a plain fork
        node.send_signal(signal.SIGKILL)
        node.wait()
        until(lambda: not alive(pid), "the stage to die with its node (PR_SET_PDEATHSIG)")
    finally:
        node.kill()
        node.wait()


def test_a_program_not_visible_here_takes_the_fork_that_names_start_errors(tmp_path: Path) -> None:
    assert launch.launcher("no-such-program-dp", env=ENV, cwd=None) is None
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\necho hi\n")
    assert launch.launcher("./script", env=ENV, cwd=tmp_path) is None  # not executable
    script.chmod(0o755)
    assert launch.launcher("./script", env=ENV, cwd=tmp_path) == launch.launcher("sleep", env=ENV, cwd=None)
    assert launch.launcher(str(tmp_path), env=ENV, cwd=None) is None  # a directory
