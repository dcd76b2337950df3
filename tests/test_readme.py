"""Every command example the README prints runs as printed, section by section, with daemons running.

The README's indented (or shell-fenced) blocks whose first line is a command are read here, so a new
example is picked up and run. Each section's commands run in order in one `bash -e` shell, as a
reader would type them, inside a network namespace of its own (the README prints fixed ports,
127.0.0.1:5757 and 5758) with HOME, XDG_* and the runtime directory in a temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dpipes.tools.bench import netns

README = Path(__file__).resolve().parent.parent / "README.md"
SECTION_TIMEOUT_S = 300.0  # a bound on a hung section, not a measurement: a section takes seconds
STOP_TIMEOUT_S = 30.0  # `dpipesd --stop` of the daemons a section left running
FIRST_OUTPUT_WAIT_S = 10  # a Ctrl-C example is interrupted once it printed, or after this long

# The first word of a command example (after VAR=value assignments), or a `| dpipes` in it.
COMMAND_RE = re.compile(
    r"^(?:[A-Z_][A-Z0-9_]*=\S+\s+)*(?:dpipes|dpipesd|dpipes-tap|dpipes-bench|dagster|pip|python3?|printf|seq)\b"
    r"|\|\s*dpipes\b"
)

# Commands that cannot run here, each with where it is covered instead. A pattern matches the
# start of the command as printed (comment stripped).
SKIPS: dict[str, str] = {
    r"pip install": "changes the environment the tests run in; the quick start's install is .ci/run's, "
    "the plugin's is tests/nodes/plugins/test_scaffold.py's",
    r"python -m pytest": "the test command itself (.ci/run runs it); a plugin's tests: "
    "tests/nodes/plugins/test_scaffold.py",
    r"dpipes plugin": "writes and installs a plugin package: tests/nodes/plugins/test_scaffold.py",
    r"DPIPES_NODE=\S+ dagster asset materialize": "needs the dagster extra: tests/nodes/dagster/test_example.py",
    r"dpipes --asset": "needs the reader's orders.csv and load.py: tests/nodes/test_workdir.py",
    r"dpipes-tap .*\btop\b": "a full-screen live view until q: tests/nodes/test_tap.py (in tmux)",
    r"dpipes-tap replay \S+ --(?:publish|to) ipc://": "serves until Ctrl-C for a second terminal's `top`: "
    "tests/nodes/test_tap.py::test_a_replay_served_as_a_tap_reads_as_the_recording",
    r"dpipes-bench": "suites take minutes on a shared machine: tests/tools/test_bench_*.py run them quick",
    r".*dpipes '[^']*%\w+@beta": "a plugin installed on a second node, beta: tests/nodes/plugins/test_worker.py"
    "::test_the_readme_walkthrough_runs_a_new_plugin_from_another_node",
}
# `pip install . && dpipes '...'`: the install is skipped (above), the pipeline after it runs.
INSTALL_PREFIX_RE = re.compile(r"^pip install \S+ && ")

# The tap examples run "in a second terminal, or while a pipeline runs": this is that pipeline,
# started before a section's first `dpipes-tap` and stopped when the section ends.
TRAFFIC = "while :; do seq 1 20000 | dpipes 'cat | sort@beta -rn | head -3' >/dev/null; done"

PRELUDE = f"""
set -e -m  # -m: a background job keeps SIGINT, so Ctrl-C can be sent to it
set -x
traffic=
trap 'if [ -n "$traffic" ]; then kill -- -"$traffic" 2>/dev/null || true; fi' EXIT
until_ctrl_c() {{  # run "$1" as a reader does, then press Ctrl-C once it printed something
    bash -c "$1" > ctrl-c.out 2>&1 &
    local job=$! i
    for i in $(seq {FIRST_OUTPUT_WAIT_S * 10}); do [ -s ctrl-c.out ] && break; sleep 0.1; done
    kill -INT -- -"$job"
    local rc=0; wait "$job" || rc=$?
    cat ctrl-c.out
    [ "$rc" = 0 ] || [ "$rc" = 130 ]
}}
"""


@dataclass(frozen=True)
class Example:
    """One command line of the README, comment stripped."""

    command: str
    comment: str


def strip_comment(line: str) -> tuple[str, str]:
    """Split a shell line at its first unquoted `#` that starts a word: (command, comment)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip(), line[i + 1 :].strip()
    return line.rstrip(), ""


def _blocks(lines: list[str]) -> list[list[str]]:
    """The code blocks of a README section: indented ones, and fenced ones that are not Python."""
    blocks: list[list[str]] = []
    current: list[str] | None = None
    fenced = False
    previous_blank = True
    for line in lines:
        if line.startswith("```"):
            if fenced:
                fenced = False
                if current is not None:
                    blocks.append(current)
                current = None
            else:
                fenced = True
                current = [] if line[3:].strip() in ("", "sh", "bash", "shell", "console") else None
            continue
        if fenced:
            if current is not None:
                current.append(line)
            continue
        if line.startswith("    ") and (current is not None or previous_blank):
            if current is None:
                current = []
            current.append(line[4:])
        elif line.strip() and current is not None:
            blocks.append(current)
            current = None
        previous_blank = not line.strip()
    if current is not None:
        blocks.append(current)
    return blocks


def readme_sections(text: str) -> dict[str, list[Example]]:
    """The command examples of each `## ` section, in order; sections without any are left out."""
    sections: dict[str, list[str]] = {}
    title = "(top)"
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].strip()
            continue
        sections.setdefault(title, []).append(line)
    found: dict[str, list[Example]] = {}
    for title, lines in sections.items():
        for block in _blocks(lines):
            first = next((b for b in block if b.strip()), "")
            if not COMMAND_RE.search(first.strip()):
                continue  # Python, or prose set as code
            for line in block:
                command, comment = strip_comment(line.strip())
                if command:  # a line of only a comment continues the comment above it
                    found.setdefault(title, []).append(Example(command, comment))
    return found


def skip_reason(command: str) -> str | None:
    """Why ``command`` is not run here, or None."""
    for pattern, reason in SKIPS.items():
        if re.match(pattern, command):
            return reason
    return None


def section_script(examples: list[Example]) -> str:
    """The bash script that runs a section's examples in order."""
    lines = [PRELUDE]
    for example in examples:
        command = INSTALL_PREFIX_RE.sub("", example.command)
        reason = skip_reason(command)
        if reason is not None:
            lines.append(f"# skipped: {command}  ({reason})")
            continue
        if command.startswith("dpipes-tap") and "traffic=" not in "".join(lines[1:]):
            lines.append(f"( {TRAFFIC} ) & traffic=$!")
        if "Ctrl-C" in example.comment:
            lines.append(f"until_ctrl_c {_quote(command)}")
        else:
            lines.append(command)
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


SECTIONS = readme_sections(README.read_text())


def test_the_extraction_finds_the_examples_a_reader_sees() -> None:
    """Every section with commands is found, and a comment is not taken for part of a command."""
    assert {"Quick start", "Running nodes", "Watching the bus"} <= SECTIONS.keys()
    quick = [e.command for e in SECTIONS["Quick start"]]
    assert quick[0] == "pip install . && dpipes 'seq 10 | sort -rn | head -3'"
    running = SECTIONS["Running nodes"]
    assert running[0] == Example("dpipesd", "this host's node, in the background, on 127.0.0.1:5757")
    assert all("from dagster_pipes" not in e.command for es in SECTIONS.values() for e in es)
    assert strip_comment("""dpipes-tap echo --filter "kind == '#'" --once  # one""") == (
        """dpipes-tap echo --filter "kind == '#'" --once""",
        "one",
    )


@pytest.fixture
def namespace() -> str:
    """A private network namespace for one section, with loopback up; skips without root."""
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return f"{netns.RUN_PREFIX}-readme"


def _run_section(title: str, ns: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run a section's script in namespace ``ns``; stop its daemons and remove the namespace after."""
    home, work, runtime = tmp_path / "home", tmp_path / "work", tmp_path / "run"
    for d in (home, work):
        d.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPIPES_", "XDG_"))}
    env.update(
        HOME=str(home),
        DPIPES_RUNTIME_DIR=str(runtime),
        DPIPES_CONFIG_PATHS="",
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_RUNTIME_DIR=str(tmp_path / "xdg-run"),
        XDG_DATA_HOME=str(home / ".local/share"),
        XDG_CACHE_HOME=str(home / ".cache"),
        XDG_STATE_HOME=str(home / ".local/state"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        NO_COLOR="1",
    )
    inside = ["ip", "netns", "exec", ns]
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        script = section_script(SECTIONS[title])
        done = subprocess.run(
            [*inside, "bash", "-c", script], cwd=work, env=env, capture_output=True, text=True,
            timeout=SECTION_TIMEOUT_S, stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        for pid_file in sorted(runtime.glob("*.pid")) if runtime.is_dir() else []:
            subprocess.run(
                [*inside, "dpipesd", "--stop", "--name", pid_file.stem], env=env, capture_output=True,
                timeout=STOP_TIMEOUT_S, check=False,
            )  # fmt: skip
        left = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout.split()
    finally:
        netns.force_delete_netns(ns)
    assert not left, f"processes left running in the section's namespace: {left}"
    assert done.returncode == 0, (
        f"{title}: exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-5000:]}"
    )
    return done


@pytest.mark.timeout(SECTION_TIMEOUT_S + 60)
def test_quick_start_runs_a_pipeline_with_no_daemon(namespace: str, tmp_path: Path) -> None:
    done = _run_section("Quick start", namespace, tmp_path)
    assert done.stdout == "10\n9\n8\n"


@pytest.mark.timeout(SECTION_TIMEOUT_S + 60)
def test_running_nodes(namespace: str, tmp_path: Path) -> None:
    done = _run_section("Running nodes", namespace, tmp_path)
    assert "y\ny\n" in done.stdout  # yes | head@beta -2
    assert '{"n":1,"__dpipes":{' in done.stdout  # objects carry __dpipes metadata
    joblog = (tmp_path / "work" / "run.log").read_text().splitlines()
    assert joblog[0].split("\t") == "Stage Node Starttime JobRuntime Send Receive Exitval Signal Command".split()
    nodes = [row.split("\t")[1] for row in joblog[1:]]
    assert nodes[1] == "beta" and nodes[0] == nodes[2] != "beta", nodes  # sort@beta; cat and wc here


@pytest.mark.timeout(SECTION_TIMEOUT_S + 60)
def test_watching_the_bus(namespace: str, tmp_path: Path) -> None:
    done = _run_section("Watching the bus", namespace, tmp_path)
    assert "2000000\n1999999\n1999998\n" in done.stdout
    assert '{"body.status": "exit 0"}' in done.stdout  # --json --filter "method == 'exit'" --once
    assert re.search(r"^events:\s+[1-9]", done.stdout, re.MULTILINE), "the recording has events"


LAN_SECTION = "Running nodes on a LAN"
LAN_HOST_RE = re.compile(r"^on (\w+)\b")  # each command of the LAN section says where it runs: "# on beta"
LISTEN_RE = re.compile(r"--listen (\d+\.\d+\.\d+\.\d+):\d+")
TRUST_LINE = "another node admits it with: "  # dpipesd's ready line with the trust command to paste


def _host_env(tmp_path: Path, name: str) -> dict[str, str]:
    """A fresh machine's user: its own home, config (keys) and runtime directories."""
    home = tmp_path / name
    for d in (home, home / "work"):
        d.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPIPES_", "XDG_"))}
    env.update(
        HOME=str(home),
        DPIPES_RUNTIME_DIR=str(home / "run"),
        DPIPES_CONFIG_PATHS="",
        XDG_CONFIG_HOME=str(home / ".config"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        NO_COLOR="1",
    )
    return env


def _pasted(command: str, printed: list[str]) -> str:
    """``dpipes keys trust 'KEY' ...`` as printed in the README, with the KEY another host printed."""
    words = shlex.split(command)
    if words[:3] != ["dpipes", "keys", "trust"]:
        return command
    line = next(line for line in reversed(printed) if TRUST_LINE in line)
    words[3] = shlex.split(line.partition(TRUST_LINE)[2])[3]
    return shlex.join(words)


@pytest.mark.timeout(SECTION_TIMEOUT_S + 60)
async def test_running_nodes_on_a_lan(tmp_path: Path) -> None:
    """The section's commands, each on the host its comment names, on two namespaced hosts with the
    README's addresses; the trust line is the one the other host's dpipesd printed."""
    reason = netns.netns_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    examples = SECTIONS[LAN_SECTION]
    assert len(examples) <= 4, "the README promises at most four commands"
    where = [LAN_HOST_RE.match(e.comment) for e in examples]
    assert all(where), [e.comment for e in examples]
    names = list(dict.fromkeys(m.group(1) for m in where if m))
    addresses = {
        m.group(1): a.group(1) for m, e in zip(where, examples, strict=True) if m and (a := LISTEN_RE.search(e.command))
    }
    printed: dict[str, list[str]] = {name: [] for name in names}
    outputs: list[str] = []
    async with netns.lan(len(names)) as net:
        hosts = dict(zip(names, net, strict=True))
        for name, host in hosts.items():
            await host.ip("addr", "add", f"{addresses[name]}/24", "dev", host.iface)
        try:
            for example, match in zip(examples, where, strict=True):
                assert match is not None
                name = match.group(1)
                others = [line for other, lines in printed.items() if other != name for line in lines]
                command = _pasted(example.command, others)
                work = tmp_path / name / "work"
                proc = await hosts[name].run(
                    ["bash", "-c", f"set -e -o pipefail; cd {shlex.quote(str(work))}; {command}"],
                    env=_host_env(tmp_path, name),
                )
                out, err = await asyncio.wait_for(proc.communicate(), SECTION_TIMEOUT_S)
                assert proc.returncode == 0, (
                    f"on {name}: {command}\n--- stdout\n{out.decode()}\n--- stderr\n{err.decode()}"
                )
                printed[name] += out.decode().splitlines()
                outputs.append(out.decode())
        finally:
            for name, host in hosts.items():
                stop = await host.run(["dpipesd", "--stop", "--name", name], env=_host_env(tmp_path, name))
                await asyncio.wait_for(stop.communicate(), STOP_TIMEOUT_S)
    assert outputs[-1] == "5\n4\n3\n2\n1\n"


CHECKED = {"Quick start", "Running nodes", "Watching the bus", LAN_SECTION}  # run by a test above, outputs checked
OTHERS = sorted(
    title
    for title, examples in SECTIONS.items()
    if title not in CHECKED and any(skip_reason(INSTALL_PREFIX_RE.sub("", e.command)) is None for e in examples)
)


@pytest.mark.timeout(SECTION_TIMEOUT_S + 60)
@pytest.mark.parametrize("title", OTHERS)
def test_every_other_section_runs_as_printed(title: str, namespace: str, tmp_path: Path) -> None:
    """A section added to the README, or one whose main example is covered elsewhere, still runs."""
    _run_section(title, namespace, tmp_path)
