"""The dpipes command line, run as the real command: numbering, exit codes, failing fast, basics."""

from __future__ import annotations

import contextlib
import importlib.metadata
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import dpipes.tools as dpipes_tools
from dpipes.nodes.entry import EntryUnreachable, probe_entry
from tests.nodes.daemons import environment

RUN_TIMEOUT_S = 60.0  # a whole dpipes run with an embedded node, on a busy machine
QUEUE_FILL = 4  # more connections than a listen(0) queue takes before it drops SYNs (Linux: 1)


def dpipes(runtime_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``dpipes`` with no input and no daemon to find (unless the test starts one)."""
    return subprocess.run(
        [sys.executable, "-m", "dpipes.tools.dpipes", *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        env={**environment(runtime_dir), **(env or {})},
        timeout=RUN_TIMEOUT_S,
    )


def test_help_says_stages_count_from_0(tmp_path: Path) -> None:
    done = dpipes(tmp_path, "--help")
    assert done.returncode == 0
    assert "numbered from 0" in done.stdout
    assert '"stage 0"' in done.stdout


def test_unknown_pin_counts_stages_from_0(tmp_path: Path) -> None:
    done = dpipes(tmp_path, "seq 3 | sort@nowhere")
    assert done.returncode != 0
    assert "stage 1 (sort@nowhere): no known node is named 'nowhere'" in done.stderr


@pytest.mark.parametrize(
    ("pipeline", "where"),
    [
        ("seq 3 | sort > out", "in stage 1 at column 14"),
        ("seq 3 || sort", "in stage 0 at column 7"),
        ("seq 3 | sort@ -r", "in stage 1 at column 13"),
    ],
)
def test_pipeline_syntax_error_exits_2_before_contacting_a_node(tmp_path: Path, pipeline: str, where: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # an entry node that must not be contacted
        port = listener.getsockname()[1]
        done = dpipes(tmp_path, "--node", f"127.0.0.1:{port}", pipeline)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    assert done.returncode == 2, done.stderr
    assert f"dpipes: pipeline syntax error {where}" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        (["--node", "nowhere"], {}, "--node 'nowhere': 'nowhere' is not HOST:PORT"),
        (["--node", "beta:99999"], {}, "port 99999 in 'beta:99999' is out of range"),
        (["--node", "tcp://be ta:5757"], {}, "is not a host name or IP address"),
        (["--node", "ipc://"], {}, "names no socket path"),
        ([], {"DPIPES_NODE": "beta"}, "$DPIPES_NODE 'beta': 'beta' is not HOST:PORT"),
        (["--nodes", "--node", "beta:"], {}, "--node 'beta:'"),
    ],
)
def test_malformed_entry_node_exits_2(tmp_path: Path, flags: list[str], env: dict[str, str], expected: str) -> None:
    done = dpipes(tmp_path, *flags, "seq 3", env=env)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr
    assert "ipc://PATH" in done.stderr  # says how to write it


def _free_port() -> int:
    """A port nothing listens on: bound, then closed (connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_refused_entry_node_is_named_as_refused(tmp_path: Path) -> None:
    port = _free_port()
    done = dpipes(tmp_path, "--node", f"127.0.0.1:{port}", "seq 3")
    assert done.returncode == 125
    assert f"dpipes: no dpipes node at 127.0.0.1:{port}: connection refused" in done.stderr
    assert "resolve" not in done.stderr


def test_unresolvable_entry_node_is_named_as_such(tmp_path: Path) -> None:
    done = dpipes(tmp_path, "--node", "no-such-host.invalid:5757", "--nodes")  # .invalid never resolves (RFC 6761)
    assert done.returncode == 125
    assert "dpipes: no dpipes node at no-such-host.invalid:5757: cannot resolve 'no-such-host.invalid'" in done.stderr
    assert "refused" not in done.stderr


def test_probe_names_a_silent_host_after_its_timeout() -> None:
    # A listener whose accept queue is full drops further SYNs: the client sees no answer at all,
    # as from a host behind a firewall that drops packets.
    with socket.socket() as listener, contextlib.ExitStack() as held:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(QUEUE_FILL):
            s = held.enter_context(socket.socket())
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        with pytest.raises(EntryUnreachable) as caught:
            probe_entry(f"tcp://127.0.0.1:{port}", timeout=0.5)
    assert isinstance(caught.value, ConnectionError)
    assert f"no dpipes node answers at 127.0.0.1:{port}: no reply within 0.5 s" in str(caught.value)


def test_crashed_local_daemon_is_reported_before_falling_back(tmp_path: Path) -> None:
    rt = tmp_path / "rt"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "dpipes.tools.dpipesd", "--foreground", "--name", "alpha", "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=environment(rt),
    )
    try:
        assert daemon.stdout is not None
        assert daemon.stdout.readline().startswith("node alpha ready: ")
    finally:
        daemon.kill()  # a crash: no clean-up, local.sock stays behind
        daemon.wait()
    assert (rt / "local.sock").is_socket()
    done = dpipes(rt, "seq 2")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "1\n2\n"
    assert f"dpipes: node alpha (pid {daemon.pid}) at ipc://{rt}/local.sock does not answer" in done.stderr
    assert f"its log: {rt}/alpha.log; running this command on an embedded node instead" in done.stderr


@pytest.mark.parametrize("tool", ["dpipes", "dpipesd"])
def test_version_is_the_installed_distributions(tmp_path: Path, tool: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"dpipes.tools.{tool}", "--version"],
        capture_output=True,
        text=True,
        env=environment(tmp_path),
        timeout=RUN_TIMEOUT_S,
    )
    installed = importlib.metadata.version("dpipes-bus")
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{tool} {installed}\n", "")
    assert dpipes_tools.__version__ == installed


def test_license_file_matches_the_declared_license() -> None:
    root = Path(__file__).parents[2]
    assert 'license = "MIT"' in (root / "pyproject.toml").read_text()
    assert (root / "LICENSE").read_text().startswith("MIT License\n")


@pytest.mark.parametrize(
    ("argv", "quoted"),
    [(["seq", "3"], "dpipes 'seq 3'"), (["seq", "-n", "3", "|", "sort"], "dpipes 'seq -n 3 | sort'")],
)
def test_unquoted_pipeline_gets_a_hint_to_quote_it(tmp_path: Path, argv: list[str], quoted: str) -> None:
    done = dpipes(tmp_path, *argv)
    assert done.returncode == 2
    assert f"the pipeline is one argument: quote it, e.g. {quoted}" in done.stderr


def test_unknown_flag_after_a_quoted_pipeline_gets_no_quoting_hint(tmp_path: Path) -> None:
    done = dpipes(tmp_path, "seq 3", "--bogus")
    assert done.returncode == 2
    assert "unrecognized arguments: --bogus" in done.stderr and "quote it" not in done.stderr


def test_help_says_tag_is_about_stderr(tmp_path: Path) -> None:
    out = " ".join(dpipes(tmp_path, "--help").stdout.split())
    assert "--tag prefix each line the stages write to stderr with [stage N prog@node]" in out


def test_nodes_as_yaml(tmp_path: Path) -> None:
    done = dpipes(tmp_path, "--nodes", "--yaml")
    assert done.returncode == 0, done.stderr
    documents = list(yaml.safe_load_all(done.stdout))
    assert len(documents) == 1  # the embedded node knows itself
    assert documents[0]["source"] == "self" and documents[0]["endpoint"].startswith("tcp://127.0.0.1:")


def _complete(script: str, words: list[str]) -> list[str]:
    """What bash offers for the last of ``words`` with ``script`` loaded (a real bash, no terminal)."""
    program = f"{script}\nCOMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\nCOMP_CWORD={len(words) - 1}\n"
    program += f'{script.split("complete -F ", 1)[1].split()[0]}\nprintf "%s\\n" "${{COMPREPLY[@]}}"\n'
    done = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.parametrize("tool", ["dpipes", "dpipesd"])
def test_bash_completion_completes_flags_and_choices(tmp_path: Path, tool: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", f"dpipes.tools.{tool}", "--completion", "bash"],
        capture_output=True,
        text=True,
        env=environment(tmp_path),
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    assert f"complete -F _{tool}_complete {tool}" in done.stdout
    assert _complete(done.stdout, [tool, "--comp"]) == ["--completion"]
    assert _complete(done.stdout, [tool, "--completion", "z"]) == ["zsh"]
    if tool == "dpipes":
        assert _complete(done.stdout, [tool, "--pipef"]) == ["--pipefail"]
        assert "sort" in _complete(done.stdout, [tool, "sor"])  # a program for the first stage
    else:
        assert _complete(done.stdout, [tool, "--log-level", "WA"]) == ["WARNING"]


def test_zsh_completion_is_the_bash_one_behind_bashcompinit(tmp_path: Path) -> None:
    zsh = dpipes(tmp_path, "--completion", "zsh").stdout
    bash = dpipes(tmp_path, "--completion", "bash").stdout
    assert zsh.startswith("# zsh completion for dpipes")
    assert "#compdef dpipes\nautoload -U +X bashcompinit && bashcompinit\n" in zsh
    assert zsh.split("bashcompinit\n", 1)[1] == bash.split("\n", 1)[1]


@pytest.mark.parametrize(
    "argv",
    [
        ["echo x | cat"],
        ["--insecure", "seq 3 | sort"],
        ["--pipefail", "false | true", "--status"],
        ["cat", "--pipefail"],
    ],
)
def test_the_everyday_command_line_reads_as_argparse_reads_it(argv: list[str]) -> None:
    from dpipes.tools.dpipes import _parser, _plain_args

    plain = _plain_args(argv)
    assert plain is not None
    args, extra = _parser().parse_known_args(argv)
    assert not extra
    assert vars(plain) == vars(args)


@pytest.mark.parametrize(
    "argv",
    [[], ["seq", "3"], ["-v", "seq 3"], ["--node", "a:1", "x"], ["--insec", "x"], ["-x"], ["  "], ["--", "x"]],
)
def test_any_other_command_line_is_left_to_argparse(argv: list[str]) -> None:
    from dpipes.tools.dpipes import _plain_args

    assert _plain_args(argv) is None
