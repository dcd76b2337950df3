"""Pipelines of real programs across real dpipesd daemons on loopback, through the real dpipes command."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from dpipes.nodes.config import NodeConfig
from tests.nodes.daemons import daemons, dpipes, environment, shell, start_dpipes

WAIT_S = 30.0


async def until(condition: object, timeout: float = WAIT_S) -> None:
    async def poll() -> None:
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize(
    "pipeline",
    [
        "seq 1 20000 | sort@beta -r | uniq -c",
        "printf 'b\\na\\nb\\n' | sort@beta | uniq@gamma -c",
        "seq 100 | grep@gamma 7 | wc@beta -l",
        "true | cat@beta",  # empty input
        "cat /dev/null | tr@gamma a b",  # a program that writes nothing
        "echo 'a|b c' | cat@beta",  # quoting as in sh
    ],
)
async def test_output_is_identical_to_sh(rt: Path, pipeline: str) -> None:
    async with daemons(rt, ["alpha", "beta", "gamma"]) as (alpha, _b, _g):
        ours = await dpipes(rt, "--node", alpha.host_port, pipeline)
        reference = await shell(re.sub(r"@(alpha|beta|gamma)", "", pipeline))
        assert ours.stdout == reference.stdout
        assert ours.code == reference.code == 0, ours.stderr


async def test_hundreds_of_megabytes_of_binary_data_arrive_intact(rt: Path, tmp_path: Path) -> None:
    source, result = tmp_path / "random.bin", tmp_path / "out.bin"
    with open(source, "wb") as f:
        for _ in range(200):
            f.write(os.urandom(1 << 20))
    async with daemons(rt, ["alpha", "beta", "gamma"]) as (alpha, _b, _g):
        ours = await dpipes(
            rt, "--node", alpha.host_port, "cat | cat@beta | cat@gamma", stdin_file=str(source), stdout_file=str(result)
        )
        assert ours.code == 0, ours.stderr
        assert sha256_file(result) == sha256_file(source)


async def test_a_single_huge_line(rt: Path) -> None:
    line = b"x" * (20 << 20) + b"\n"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ours = await dpipes(rt, "--node", alpha.host_port, "cat@beta | wc -c", input=line)
        assert ours.stdout.strip() == str(len(line)).encode()


async def test_stdin_feeds_the_first_stage_and_output_streams(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ours = await dpipes(rt, "--node", alpha.host_port, "sort@beta | head -2", input=b"c\nb\na\n")
        assert ours.stdout == b"a\nb\n"


async def test_exit_status_pipefail_and_status_vector(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        node = ("--node", alpha.host_port)
        assert (await dpipes(rt, *node, "sh -c 'exit 3' | cat@beta")).code == 0
        assert (await dpipes(rt, *node, "cat | sh@beta -c 'exit 5'")).code == 5
        failing = await dpipes(rt, *node, "--pipefail", "--status", "sh -c 'exit 3' | cat@beta")
        assert failing.code == 3
        assert "stage 0 sh@alpha: exit 3" in failing.stderr
        assert "stage 1 cat@beta: exit 0" in failing.stderr
        killed = await dpipes(rt, *node, "sh@beta -c 'kill -TERM $$'")
        assert killed.code == 128 + signal.SIGTERM


async def test_pipefail_counts_a_stage_that_failed_on_its_own_whatever_ended_first(rt: Path, tmp_path: Path) -> None:
    done = tmp_path / "reader-done"
    # The order is forced: the first stage exits 1 only once the last one has finished (and so
    # cancelled its input); bash says 1 for `false | true` under pipefail in every order.
    writer = f"sh -c 'while [ ! -e {done} ]; do sleep 0.01; done; exit 1'"
    reader = f"sh@beta -c 'touch {done}'"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        for _ in range(3):
            done.unlink(missing_ok=True)
            ran = await dpipes(rt, "--node", alpha.host_port, "--pipefail", "--status", f"{writer} | {reader}")
            assert ran.code == 1, ran.stderr
            assert "stage 0 sh@alpha: exit 1" in ran.stderr
            done.unlink()
            plain = await dpipes(rt, "--node", alpha.host_port, f"{writer} | {reader}")
            assert plain.code == 0, plain.stderr


def test_pipefail_leaves_out_only_stages_their_reader_killed() -> None:
    from dpipes.nodes.run import StageResult, exit_code_of

    def stage(index: int, code: int, sig: int = 0, sigpipe: bool = False) -> StageResult:
        return StageResult(index, "a", ["p"], code=code, signal=sig, sigpipe=sigpipe, reported=True)

    killed = stage(0, -1, signal.SIGPIPE, sigpipe=True)
    failed_while_reader_left = stage(0, 1, sigpipe=True)
    assert exit_code_of([killed, stage(1, 0)], pipefail=True) == 0
    assert exit_code_of([failed_while_reader_left, stage(1, 0)], pipefail=True) == 1
    assert exit_code_of([failed_while_reader_left, stage(1, 0)], pipefail=False) == 0
    last_killed = stage(1, -1, signal.SIGPIPE, sigpipe=True)  # the last stage has no reader to blame
    assert exit_code_of([stage(0, 0), last_killed], pipefail=True) == 128 + signal.SIGPIPE


async def test_stderr_of_every_stage_reaches_the_client_tagged(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ours = await dpipes(
            rt,
            "--node",
            alpha.host_port,
            "--tag",
            "sh -c 'echo first >&2; echo out' | sh@beta -c 'cat; echo second >&2'",
        )
        assert ours.stdout == b"out\n"
        assert "[stage 0 sh@alpha] first" in ours.stderr
        assert "[stage 1 sh@beta] second" in ours.stderr


async def test_early_exit_downstream_stops_upstream_without_error(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        ours = await dpipes(rt, "--node", alpha.host_port, "--pipefail", "--status", "yes | head@beta -1")
        assert ours.stdout == b"y\n"
        assert ours.code == 0
        assert "stage 0 yes@alpha: killed by SIGPIPE (its reader finished early)" in ours.stderr
        await until(lambda: not alpha.children() and not beta.children())


INTERRUPTED_WAIT_S = 45.0  # dpipes waits at most 2 x CANCEL_WAIT_S (15 s) for reports after Ctrl-C


async def interrupted(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """Ctrl-C ``proc``; its exit code and stderr (read meanwhile, so it can never block on it)."""
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), INTERRUPTED_WAIT_S)
    return proc.returncode or 0, err.decode(errors="replace")


async def test_sigint_cancels_every_stage_on_every_node(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        proc = await start_dpipes(rt, "--node", alpha.host_port, "sleep 300 | sleep@beta 300")
        await until(lambda: alpha.children() and beta.children())
        code, err = await interrupted(proc)
        assert code == 130, err
        await until(lambda: not alpha.children() and not beta.children())


SLOW_VERSION = """#!/bin/sh
if [ "$1" = --version ]; then sleep 1; echo "slowstart 1.0"; exit 0; fi
exec sleep 300
"""


async def test_sigint_while_the_stages_start_cancels_them_once_started(
    rt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "slowstart").write_text(SLOW_VERSION)
    (bin_dir / "slowstart").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    async with daemons(rt, ["alpha"]) as (alpha,):
        proc = await start_dpipes(rt, "--node", alpha.host_port, "--status", "--require", "slowstart>=1", "slowstart")
        await until(lambda: alpha.children())  # the version probe: negotiation is under way
        code, err = await interrupted(proc)
        assert code == 130, err
        assert "stage 0 slowstart@alpha: killed by SIGTERM" in err  # it started, was cancelled, and reported
        await until(lambda: not alpha.children())  # the stage started after Ctrl-C, and was cancelled


async def test_a_node_killed_mid_pipeline_fails_the_run_naming_it(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        proc = await start_dpipes(rt, "--node", alpha.host_port, "sleep 300 | sleep@beta 300")
        await until(lambda: alpha.children() and beta.children())
        for pid in beta.children():
            os.kill(pid, signal.SIGKILL)  # the daemon dies hard; its stage goes with it
        beta.proc.kill()
        killed_at = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(proc.wait(), WAIT_S) == 125
        assert asyncio.get_running_loop().time() - killed_at < 15
        assert proc.stderr is not None
        err = (await proc.stderr.read()).decode()
        # Killed before or after beta answered `start`: either way the error names node and stage.
        assert "node 'beta' lost" in err and "sleep" in err
        await until(lambda: not alpha.children())


async def test_negotiation_refusals_start_nothing(rt: Path) -> None:
    extra = {"beta": ["--allow", "cat", "--allow", "sort"]}
    async with daemons(rt, ["alpha", "beta"], extra=extra) as (alpha, beta):
        node = ("--node", alpha.host_port)
        unknown = await dpipes(rt, *node, "sleep 300 | no-such-program@beta")
        assert unknown.code == 125
        assert "stage 1 (no-such-program@beta)" in unknown.stderr and "not allowed on node beta" in unknown.stderr
        missing = await dpipes(rt, *node, "sleep 300 | no-such-program")
        assert "program 'no-such-program' not found on node alpha" in missing.stderr
        refused = await dpipes(rt, *node, "sleep 300 | wc@beta")
        assert "program 'wc' is not allowed on node beta (allowed: cat, sort)" in refused.stderr
        version = await dpipes(rt, *node, "--require", "sort>=999", "sleep 300 | sort@beta")
        assert version.code == 125 and "does not satisfy 'sort>=999'" in version.stderr
        assert not alpha.children() and not beta.children()  # `sleep 300` never started anywhere


async def test_a_program_that_is_not_runnable_is_named_for_what_it_is(rt: Path, tmp_path: Path) -> None:
    plain = tmp_path / "script.sh"
    plain.write_text("#!/bin/sh\necho hi\n")
    plain.chmod(0o644)
    async with daemons(rt, ["alpha"]) as (alpha,):
        node = ("--node", alpha.host_port)
        directory = await dpipes(rt, *node, f"seq 3 | {tmp_path}")
        assert directory.code == 125
        assert f"program '{tmp_path}' on node alpha is a directory, not a program" in directory.stderr
        not_executable = await dpipes(rt, *node, f"seq 3 | {plain}")
        assert not_executable.code == 125
        assert "is not executable (-rw-r--r--): make it so with chmod +x" in not_executable.stderr
        assert not alpha.children()


async def test_a_refusal_names_the_nodes_that_offer_the_program(rt: Path) -> None:
    extra = {"alpha": ["--allow", "cat"], "beta": ["--allow", "sort"]}
    async with daemons(rt, ["alpha", "beta"], extra=extra) as (alpha, _b):
        ran = await dpipes(rt, "--node", alpha.host_port, "cat | sort@alpha")
    assert ran.code == 125
    assert "program 'sort' is not allowed on node alpha (allowed: cat) (offered by beta: pin it with sort@beta)" in (
        ran.stderr
    )


async def test_placement_never_changes_what_a_stage_means(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"], extra={"beta": ["--", "sort", "-r"]}) as (alpha, _b):
        node = ("--node", alpha.host_port, "--status")
        plain = await dpipes(rt, *node, "printf 'a\\nb\\n' | sort")
        assert (plain.code, plain.stdout) == (0, b"a\nb\n"), plain.stderr  # not `sort -r` on beta
        assert "stage 1 sort@alpha: exit 0 [local: no node offers 'sort']" in plain.stderr
        matching = await dpipes(rt, *node, "printf 'a\\nb\\n' | sort -r")
        assert (matching.code, matching.stdout) == (0, b"b\na\n"), matching.stderr
        assert "stage 1 sort@beta: exit 0 [offered by beta as 'sort -r']" in matching.stderr
        pinned = await dpipes(rt, *node, "printf 'a\\nb\\n' | sort@beta")
        assert (pinned.code, pinned.stdout) == (0, b"b\na\n"), pinned.stderr
        assert "stage 1 sort@beta: exit 0 [pinned]" in pinned.stderr
        verbose = await dpipes(rt, "--node", alpha.host_port, "-v", "true | sort -r")
        assert "stage 1 sort@beta: offered by beta as 'sort -r'" in verbose.stderr
        assert "stage 0 true@alpha: local: no node offers 'true'" in verbose.stderr


async def test_joblog_records_each_stage_as_gnu_parallel_does(rt: Path, tmp_path: Path) -> None:
    joblog = tmp_path / "run.log"
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        before = time.time()
        ran = await dpipes(rt, "--node", alpha.host_port, "--joblog", str(joblog), "seq 1000 | sort@beta -n | wc -c")
        after = time.time()
        assert (ran.code, ran.stdout) == (0, b"3893\n"), ran.stderr
        header, *rows = [line.split("\t") for line in joblog.read_text().splitlines()]
        assert header == ["Stage", "Node", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal", "Command"]
        assert [r[:2] for r in rows] == [["0", "alpha"], ["1", "beta"], ["2", "alpha"]]
        assert [r[4:] for r in rows] == [  # every edge crosses the bus here: each node counted its bytes
            ["0", "3893", "0", "0", "seq 1000"],
            ["3893", "3893", "0", "0", "sort -n"],
            ["3893", "5", "0", "0", "wc -c"],
        ]
        for row in rows:  # one host, so one clock: each stage ran within the command's life
            assert before <= float(row[2]) <= float(row[2]) + float(row[3]) <= after

        # A kernel pipe between neighbours on one node passes by it: those bytes are not known.
        killed = await dpipes(
            rt, "--node", alpha.host_port, "--joblog", str(joblog), "seq 3 | sh -c 'cat; kill -TERM $$'"
        )
        rows = [line.split("\t") for line in joblog.read_text().splitlines()[1:]]
        assert killed.code == 128 + signal.SIGTERM
        assert [r[4:8] for r in rows] == [["0", "-", "0", "0"], ["-", "6", "-1", str(int(signal.SIGTERM))]]
        assert rows[1][8] == "sh -c 'cat; kill -TERM $$'"


async def test_a_coordinator_of_another_pipeline_protocol_is_refused(rt: Path) -> None:
    from dpipes.bus.client import Client
    from dpipes.bus.errors import BusError

    async with daemons(rt, ["alpha"]) as (alpha,):
        async with Client(alpha.tcp) as client:
            with pytest.raises(BusError, match="pipeline protocol 99 is not node alpha's 2"):
                await client.endpoint.request(
                    "alpha/ctl", "negotiate", {"pipeline": "p", "stage": 0, "argv": ["cat"], "protocol": 99}
                )


async def test_exclusive_node_runs_only_its_program(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"], extra={"beta": ["--", "tr", "a-z", "A-Z"]}) as (alpha, _b):
        node = ("--node", alpha.host_port)
        ours = await dpipes(rt, *node, "echo hello | tr@beta")
        assert ours.stdout == b"HELLO\n"
        refused = await dpipes(rt, *node, "echo hello | cat@beta")
        assert "node beta runs only 'tr'" in refused.stderr


async def test_embedded_node_when_no_daemon_runs(rt: Path) -> None:
    ours = await dpipes(rt, "seq 3 | sort -r")
    assert (ours.code, ours.stdout) == (0, b"3\n2\n1\n")


async def test_the_local_daemon_is_found_without_node(rt: Path) -> None:
    async with daemons(rt, ["alpha"]):
        ours = await dpipes(rt, "--status", "echo hi | cat")
        assert ours.stdout == b"hi\n"
        assert "cat@alpha" in ours.stderr


def test_help_explains_the_command() -> None:
    from dpipes.tools.dpipes import _parser

    text = _parser().format_help()
    for needed in ("@NODE", "--pipefail", "--status", "--json", "exit status", "125", "examples"):
        assert needed in text


async def test_json_mode_objects_carry_where_they_came_from(rt: Path) -> None:
    import json

    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        ours = await dpipes(
            rt, "--node", alpha.host_port, "--json", "cat | cat@beta", input=b'{"n": 1}\n{"n": 2, "s": "x"}\n'
        )
        assert ours.code == 0, ours.stderr
        objects = [json.loads(line) for line in ours.stdout.splitlines()]
        assert [{k: v for k, v in o.items() if k != "__dpipes"} for o in objects] == [{"n": 1}, {"n": 2, "s": "x"}]
        meta = objects[0]["__dpipes"]
        host, port = beta.host_port.rsplit(":", 1)
        assert meta == {"dp.addr": host, "dp.port": int(port), "dp.service": "cat", "dp.node": "beta", "dp.stage": 1}


async def test_a_program_reads_the_metadata_of_its_input(rt: Path) -> None:
    import json

    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        show = "import json,sys; [print(json.dumps({'from': json.loads(l)['__dpipes']['dp.node']})) for l in sys.stdin]"
        ours = await dpipes(
            rt, "--node", alpha.host_port, "--json", f'cat@beta | python3 -c "{show}"', input=b'{"x": 1}\n'
        )
        assert ours.code == 0, ours.stderr
        assert json.loads(ours.stdout.splitlines()[0])["from"] == "beta"


async def test_yaml_mode_round_trip(rt: Path) -> None:
    import yaml

    docs = [{"name": "a", "tags": ["x", "y"]}, {"name": "b", "nested": {"k": 1.5, "ok": True}}]
    text = "".join("---\n" + yaml.safe_dump(d) for d in docs).encode()
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ours = await dpipes(rt, "--node", alpha.host_port, "--yaml", "cat@beta | cat", input=text)
        assert ours.code == 0, ours.stderr
        back = [{k: v for k, v in d.items() if k != "__dpipes"} for d in yaml.safe_load_all(ours.stdout)]
        assert back == docs


async def test_a_line_that_is_not_an_object_is_an_error_naming_stage_and_line(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        node = ("--node", alpha.host_port)
        produced = await dpipes(rt, *node, "--json", "cat | sh@beta -c 'cat; echo 42'", input=b'{"a": 1}\n')
        assert produced.code == 125
        assert "stage 1 (sh@beta): line 2 is a number, not a JSON object: '42'" in produced.stderr
        given = await dpipes(rt, *node, "--json", "cat | cat@beta", input=b'{"a": 1}\n[1, 2]\n')
        assert given.code == 125
        assert "the input of dpipes (stdin): line 2 is a list" in given.stderr


async def test_a_stage_that_reads_nothing_stops_its_producer_like_sigpipe(rt: Path) -> None:
    async with daemons(rt, ["alpha", "beta"]) as (alpha, beta):
        ours = await dpipes(rt, "--node", alpha.host_port, "--pipefail", "--status", "seq 100000000 | true@beta")
        assert ours.code == 0, ours.stderr
        assert "stage 0 seq@alpha: killed by SIGPIPE" in ours.stderr
        await until(lambda: not alpha.children() and not beta.children())


async def test_a_node_without_keys_refuses_to_listen_beyond_loopback_unless_insecure(rt: Path) -> None:
    from dpipes.bus.errors import ConfigError
    from dpipes.nodes.node import Node, check_exposure

    check_exposure("n", "tcp://127.0.0.1:5757", insecure=False)
    check_exposure("n", "tcp://[::1]:5757", insecure=False)
    with pytest.raises(ConfigError, match="--insecure"):
        check_exposure("n", "tcp://*:5757", insecure=False)
    with pytest.raises(ConfigError, match=r"would listen on 10\.1\.2\.3 without keys"):
        check_exposure("n", "tcp://10.1.2.3:5757", insecure=False)
    check_exposure("n", "tcp://10.1.2.3:5757", insecure=False, keys=True)  # keys: every peer needs one
    # A node has keys unless it is told to be insecure: a LAN address needs no flag.
    node = Node(NodeConfig(name="open", key_dir=str(rt / "keys")), listen="tcp://0.0.0.0:0")
    assert node.hub.secure and (rt / "keys" / "node.key_secret").exists()


async def test_metadata_carries_argv_and_chosen_environment_when_configured(rt: Path, tmp_path: Path) -> None:
    import json

    config = tmp_path / "beta.toml"
    config.write_text(
        'metadata_argv = true\nmetadata_environ = ["DPIPES_NODE", "NOT_SET_ANYWHERE"]\nmetadata_credential = true\n'
    )
    async with daemons(rt, ["alpha", "beta"], extra={"beta": ["--config", str(config)]}) as (alpha, _b):
        ours = await dpipes(rt, "--node", alpha.host_port, "--json", "cat | cat@beta -u", input=b'{"n": 1}\n')
        assert ours.code == 0, ours.stderr
        meta = json.loads(ours.stdout)["__dpipes"]
        assert meta["dp.argv"] == ["cat", "-u"]
        assert meta["dp.environ"] == {"DPIPES_NODE": "beta"}  # only what was named, only what is set
        assert "dp.credential" not in meta  # an --insecure node authenticated nobody: nothing to vouch for


INODE_OF = 'import os; os.write(2, b"{tag} %d\\n" % os.fstat({fd}).st_ino)'  # one write: lines of stages never mix


def inodes_in(stderr: str) -> dict[str, int]:
    """``TAG INODE`` lines of the stages' stderr (other lines, should any appear, are not ours)."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^(out\d*|in\d*) (\d+)$", stderr, re.MULTILINE)}


def show_inodes(*tags: tuple[str, int]) -> str:
    """Python code printing, on stderr, ``TAG INODE`` of each given descriptor."""
    return "; ".join(INODE_OF.format(tag=tag, fd=fd) for tag, fd in tags)


async def test_neighbours_on_one_node_share_one_kernel_pipe_and_others_use_the_bus(rt: Path) -> None:
    show = show_inodes
    first, middle, last = show(("out0", 1)), show(("in1", 0), ("out1", 1)), show(("in2", 0))
    async with daemons(rt, ["alpha", "beta"]) as (alpha, _b):
        ran = await dpipes(
            rt,
            "--node",
            alpha.host_port,
            f"python3@alpha -c '{first}' | python3@alpha -c '{middle}' | python3@beta -c '{last}'",
        )
    assert ran.code == 0, ran.stderr
    inode = inodes_in(ran.stderr)
    assert set(inode) == {"out0", "in1", "out1", "in2"}, ran.stderr
    assert inode["out0"] == inode["in1"]  # one pipe, as in a shell: nothing passes through the node
    assert inode["out1"] != inode["in2"]  # across nodes: the bus


async def test_a_one_node_pipeline_stops_its_producer_as_a_shell_does(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        ran = await dpipes(rt, "--node", alpha.host_port, "--status", "--pipefail", "yes | head -2 | cat")
    assert ran.code == 0, ran.stderr
    assert ran.stdout == b"y\ny\n"
    assert "stage 0 yes@alpha: killed by SIGPIPE" in ran.stderr


async def test_a_local_dpipes_hands_its_stdin_and_stdout_to_stages_on_its_node(rt: Path, tmp_path: Path) -> None:
    source, sink = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("b\na\n")
    report = show_inodes(("in", 0), ("out", 1))
    async with daemons(rt, ["alpha", "beta"]):
        local = await dpipes(
            rt, f"python3 -c '{report}'", stdin_file=str(source), stdout_file=str(sink)
        )  # no --node: the local daemon, over ipc
        remote = await dpipes(rt, "cat | cat@beta", stdin_file=str(source))
    assert local.code == 0, local.stderr
    inode = inodes_in(local.stderr)
    assert inode["in"] == source.stat().st_ino  # the stage read our stdin itself...
    assert inode["out"] == sink.stat().st_ino  # ...and wrote to our stdout itself
    assert remote.code == 0 and remote.stdout == b"b\na\n"  # a last stage elsewhere: through the bus


async def test_a_local_last_stage_writing_to_a_closed_reader_stops_as_in_a_shell(rt: Path) -> None:
    async with daemons(rt, ["alpha"]):
        env = environment(rt)
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", f"{sys.executable} -m dpipes.tools.dpipes --status 'yes' | head -2; echo done",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), WAIT_S)
    assert out == b"y\ny\ndone\n"
    assert b"stage 0 yes@alpha: killed by SIGPIPE" in err


async def test_a_stage_never_outlives_its_node(rt: Path) -> None:
    async with daemons(rt, ["alpha"]) as (alpha,):
        proc = await start_dpipes(rt, "--node", alpha.host_port, "sleep 45")
        await until(lambda: alpha.running("sleep"))  # not its launcher yet: it dies with alpha from now on
        stages = alpha.children()
        alpha.proc.kill()  # kill -9: no chance to terminate its stages itself
        await until(lambda: not any(os.path.exists(f"/proc/{pid}") and not _zombie(pid) for pid in stages))
        assert await asyncio.wait_for(proc.wait(), WAIT_S) != 0


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
