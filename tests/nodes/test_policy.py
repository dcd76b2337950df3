"""Node policy: what may run here, answered with a typed refusal; no sockets."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import MappingProxyType

import pytest

from dpipes.nodes import policy
from dpipes.nodes.config import AppConfig, NodeConfig
from dpipes.nodes.policy import Policy, Refusal, parse_requirement, version_satisfies, version_tuple
from dpipes.nodes.protocol import PIPELINE_PROTOCOL


def config(*, allow: frozenset[str] | None = None, apps: dict[str, AppConfig] | None = None) -> NodeConfig:
    return NodeConfig(name="alpha", allow=allow, apps=MappingProxyType(apps or {}))


async def refusal(
    pol: Policy,
    argv: list[str],
    *,
    mode: str = "bytes",
    protocol: object = PIPELINE_PROTOCOL,
    require: tuple[str, ...] = (),
    pinned: bool = False,
) -> Refusal | None:
    return await pol.refusal(argv, mode=mode, protocol=protocol, require=require, pinned=pinned)


def test_requirements_parse_and_compare() -> None:
    assert parse_requirement(" sort >= 9.1 ") == ("sort", ">=", (9, 1))
    assert version_tuple("sort (GNU coreutils) 9.4-rc1") == (9, 4)
    assert version_satisfies((9, 1), ">=", (9,))  # missing parts count as 0
    assert not version_satisfies((9,), ">", (9, 0))
    assert version_satisfies((10, 0), "!=", (9, 9))
    with pytest.raises(ValueError, match="PROG OP VERSION"):
        parse_requirement("sort 9")


async def test_a_program_in_path_runs_for_anyone() -> None:
    pol = Policy("alpha", config())
    assert await refusal(pol, ["sh", "-c", "true"]) is None
    assert pol.command(["sh", "-c", "true"])[1:] == ["-c", "true"]
    assert os.path.isabs(pol.command(["sh"])[0])  # resolved here, not by the child's PATH


@pytest.mark.parametrize(
    ("kw", "argv", "code", "words"),
    [
        ({"protocol": PIPELINE_PROTOCOL + 1}, ["sh"], policy.PROTOCOL, "upgrade one side"),
        ({"mode": "xml"}, ["sh"], policy.MODE, "'xml'"),
        ({}, ["no-such-program-here"], policy.NOT_FOUND, "not found on node alpha"),
        ({"require": ("sh=>1",)}, ["sh"], policy.BAD_REQUIREMENT, "'sh=>1'"),
    ],
)
async def test_refusals_are_coded(kw: dict[str, object], argv: list[str], code: str, words: str) -> None:
    found = await refusal(Policy("alpha", config()), argv, **kw)  # type: ignore[arg-type]
    assert found is not None and found.code == code and words in found.message


async def test_an_allow_list_refuses_others_and_names_what_it_allows() -> None:
    pol = Policy("alpha", config(allow=frozenset({"sort", "cat"})))
    assert pol.offered() == {"sort", "cat"}
    assert await refusal(pol, ["cat"]) is None
    found = await refusal(pol, ["sh"])
    assert found == Refusal(policy.NOT_ALLOWED, "program 'sh' is not allowed on node alpha (allowed: cat, sort)")


SAFE_SORT = "sort -r -n '-k[0-9]*'"


@pytest.mark.parametrize(
    "argv",
    [
        ["sort", "--compress-program=x"],  # runs x
        ["sort", "-o", "/etc/passwd"],  # writes any file the node's user can
        ["sort", "-r", "-o/tmp/f"],
        ["sort", "-k2", "--files0-from=/etc/shadow"],
        ["sort", "-kx"],
        ["/usr/bin/sort", "-r"],  # name tricks: still refused
        ["/usr/bin/../bin/sort"],
        ["s?rt", "-r"],
        ["sort$(id)"],
        ["sh", "-c", "sort -r"],
    ],
)
async def test_an_allow_entry_with_patterns_refuses_other_arguments(argv: list[str]) -> None:
    pol = Policy("alpha", config(allow=frozenset({SAFE_SORT, "uniq -c"})))
    found = await refusal(pol, argv)
    assert found is not None and found.code == policy.NOT_ALLOWED, argv


async def test_an_allow_entry_with_patterns_runs_what_they_match_and_says_what_is_wrong() -> None:
    pol = Policy("alpha", config(allow=frozenset({SAFE_SORT, "uniq -c"})))
    assert pol.offered() == {"sort", "uniq"}  # offered by name: placement sends any sort; negotiation decides
    for argv in (["sort"], ["sort", "-r", "-n", "-k2", "-k10"], ["uniq", "-c"], ["uniq"]):
        assert await refusal(pol, argv) is None, argv
    found = await refusal(pol, ["sort", "-r", "-o", "out"])
    assert found == Refusal(
        policy.NOT_ALLOWED,
        "'sort -r -o out' is not allowed on node alpha: argument '-o' matches none of the allowed patterns "
        "('-r', '-n', '-k[0-9]*') (allow: \"sort -r -n '-k[0-9]*'\")",
    )


async def test_a_bare_allow_entry_allows_any_arguments() -> None:
    pol = Policy("alpha", config(allow=frozenset({"sort"})))
    assert await refusal(pol, ["sort", "--compress-program=x", "-o", "out"]) is None  # as the docs warn


async def test_an_exclusive_node_runs_only_its_program_with_its_arguments_first() -> None:
    pol = Policy("alpha", config(), exclusive=["cat", "-u"])
    assert pol.offered() == {"cat -u"}  # advertised with its arguments
    assert await refusal(pol, ["cat", "-n"], pinned=True) is None
    assert pol.command(["cat", "-n"])[1:] == ["-u", "-n"]
    found = await refusal(pol, ["sort"])
    assert found is not None and found.code == policy.NOT_ALLOWED


async def test_a_declared_version_is_checked_without_running_the_program() -> None:
    pol = Policy("alpha", config(apps={"sh": AppConfig(version="5.2")}))
    assert await refusal(pol, ["sh"], require=("sh>=5", "other>=99")) is None  # other programs' constraints pass
    found = await refusal(pol, ["sh"], require=("sh>=6",))
    assert found is not None and found.code == policy.VERSION and "5.2 on node alpha" in found.message


async def test_an_app_path_that_is_not_executable_is_not_found(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_text("#!/bin/sh\n")
    pol = Policy("alpha", config(apps={"tool": AppConfig(path=str(script))}))
    found = await refusal(pol, ["tool"])
    assert found is not None and found.code == policy.NOT_FOUND
    script.chmod(0o755)
    assert await refusal(pol, ["tool"]) is None


async def test_an_undeclared_version_is_probed_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    script = tmp_path / "tool"
    script.write_text(f'#!/bin/sh\necho x >> "{runs}"\necho "tool version 2.5.1"\n')
    script.chmod(0o755)
    mute = tmp_path / "mute"
    mute.write_text("#!/bin/sh\n")
    mute.chmod(0o755)
    apps = {"tool": AppConfig(path=str(script)), "mute": AppConfig(path=str(mute))}
    pol = Policy("alpha", config(apps=apps))
    assert await refusal(pol, ["tool"], require=("tool>=2.5",)) is None
    found = await refusal(pol, ["tool"], require=("tool<2",))
    assert found is not None and found.code == policy.VERSION
    assert runs.read_text().count("x") == 1  # the answer is kept
    found = await refusal(pol, ["mute"], require=("mute>=1",))
    assert found is not None and found.code == policy.VERSION and "unknown" in found.message


def test_the_probe_reads_the_first_line_of_either_stream(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_text(f"#!{sys.executable}\nimport sys\nprint('tool 3.1', file=sys.stderr)\n")
    script.chmod(0o755)
    assert policy.probe_version(str(script)) == (3, 1)
    assert policy.probe_version(str(tmp_path / "absent")) == ()


async def test_an_apps_path_that_is_a_directory_is_refused_as_one(tmp_path: Path) -> None:
    pol = Policy("alpha", config(apps={"tool": AppConfig(path=str(tmp_path))}))
    found = await refusal(pol, ["tool"])
    assert found is not None and found.code == policy.NOT_FOUND
    assert found.message == f"program 'tool' on node alpha: {tmp_path} (its [apps] path) is a directory, not a program"


async def test_an_exclusive_node_with_fixed_arguments_runs_other_stages_only_when_pinned() -> None:
    pol = Policy("alpha", config(), exclusive=["sort", "-r"])
    assert pol.offered() == {"sort -r"}
    found = await refusal(pol, ["sort"])
    assert found is not None and found.code == policy.NOT_ALLOWED
    assert "pin the stage (sort@alpha)" in found.message
    assert await refusal(pol, ["sort"], pinned=True) is None
    assert pol.command(["sort", "-n"])[1:] == ["-r", "-n"]  # pinned: its arguments come first
    assert await refusal(pol, ["sort", "-r", "-n"]) is None  # it matches the offer: as it is
    assert pol.command(["sort", "-r", "-n"])[1:] == ["-r", "-n"]
