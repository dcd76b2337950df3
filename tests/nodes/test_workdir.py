"""Where stages start: the caller's directory on its host, the node's workdir elsewhere, --cwd."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from tests.nodes.daemons import daemons, dpipes


async def test_relative_paths_are_the_callers_with_a_daemon_running(rt: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "f.txt").write_text("b\na\n")
    (work / "sub" / "g.txt").write_text("in sub\n")
    async with daemons(rt, ["alpha", "beta"]):
        # No --node: this host's daemon (alpha, over ipc) is the entry node, as for a user.
        done = await dpipes(rt, "cat f.txt | sort@beta", cwd=work)
        assert (done.code, done.stdout) == (0, b"a\nb\n"), done.stderr
        pinned = await dpipes(rt, "cat@beta f.txt", cwd=work)  # another node, but this host
        assert (pinned.code, pinned.stdout) == (0, b"b\na\n"), pinned.stderr
        relative = await dpipes(rt, "--cwd", "sub", "cat g.txt", cwd=work)
        assert (relative.code, relative.stdout) == (0, b"in sub\n"), relative.stderr


async def test_a_remote_caller_gets_the_nodes_workdir_and_may_choose(rt: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    config = tmp_path / "alpha.toml"
    config.write_text(f'workdir = "{home}"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    async with daemons(rt, ["alpha"], extra={"alpha": ["--config", str(config)]}) as (alpha,):
        # Over TCP the node cannot tell the caller's host: its stages start in its workdir.
        node = ("--node", alpha.host_port)
        remote = await dpipes(rt, *node, "pwd", cwd=elsewhere)
        assert (remote.code, remote.stdout) == (0, f"{home}\n".encode()), remote.stderr
        chosen = await dpipes(rt, *node, "--cwd", "data", "pwd", cwd=elsewhere)
        assert chosen.stdout == f"{home / 'data'}\n".encode(), chosen.stderr
        absolute = await dpipes(rt, *node, "--cwd", str(elsewhere), "pwd")
        assert absolute.stdout == f"{elsewhere}\n".encode(), absolute.stderr
        missing = await dpipes(rt, *node, "--cwd", str(tmp_path / "nope"), "seq 3 | pwd")
        assert missing.code == 125
        assert "stage 1 (pwd@alpha): cannot start" in missing.stderr
        assert f"no working directory {tmp_path / 'nope'}" in missing.stderr
        assert not alpha.children()


REPO = Path(__file__).resolve().parents[2]
LOAD_PY = """\
import json, sys
rows = sum(1 for _ in sys.stdin)
log = {"__dagster_pipes_version": "0.1", "method": "log", "params": {"message": f"loaded {rows}", "level": "INFO"}}
print(json.dumps(log))
print(rows)
"""


def readme_command(starting: str) -> list[str]:
    """The README's example command that starts with ``starting``, as words (without ``dpipes``)."""
    for line in (REPO / "README.md").read_text().splitlines():
        if line.strip().startswith(starting):
            return shlex.split(line.strip())[1:]
    raise AssertionError(f"README.md has no example starting {starting!r}")


async def test_the_readme_pipes_examples_run_as_printed_with_a_daemon(rt: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "orders.csv").write_text("id,amount\n1,10\n2,20\n")
    (work / "load.py").write_text(LOAD_PY)
    # The daemons run elsewhere, as a detached one does (in /): relative paths must be the caller's.
    async with daemons(rt, ["alpha", "beta"], cwd=tmp_path):
        pipes = await dpipes(rt, *readme_command("dpipes --asset 1:orders"), cwd=work)
        assert (pipes.code, pipes.stdout) == (0, b"3\n"), pipes.stderr
        assert "loaded 3" in pipes.stderr
        if shutil.which("node") is None:
            pytest.skip("no node (Node.js) here for examples/pipes_node")
        js = await dpipes(rt, *shlex.split("'node examples/pipes_node/pipes_example.js'"), cwd=REPO)
        assert js.code == 0, js.stderr
        assert "materialized node_example" in js.stderr
