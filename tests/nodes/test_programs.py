"""describe_missing: a program that cannot run is named for what it is, not only "not found"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dpipes.nodes.programs import describe_missing


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    (d / "plain").write_text("#!/bin/sh\n")
    (d / "plain").chmod(0o644)
    (d / "adir").mkdir()
    (d / "dangling").symlink_to(d / "gone")
    (d / "runs").write_text("#!/bin/sh\n")
    (d / "runs").chmod(0o755)
    return d




def test_directory_given_as_a_path(bin_dir: Path) -> None:
    text = describe_missing(str(bin_dir / "adir"), None, node="alpha")
    assert text == f"program '{bin_dir / 'adir'}' on node alpha is a directory, not a program"


def test_file_without_execute_permission(bin_dir: Path) -> None:
    text = describe_missing(str(bin_dir / "plain"), None, node="alpha")
    assert "is not executable (-rw-r--r--)" in text
    assert f"chmod +x {bin_dir / 'plain'}" in text


def test_broken_symlink_and_missing_path(bin_dir: Path) -> None:
    assert "is a broken symbolic link" in describe_missing(str(bin_dir / "dangling"), None, node="alpha")
    assert describe_missing(str(bin_dir / "nope"), None, node="alpha").endswith("does not exist")


def test_entries_found_in_path_are_named(bin_dir: Path) -> None:
    search = os.pathsep.join([str(bin_dir / "empty"), str(bin_dir)])
    text = describe_missing("adir", None, node="beta", search_path=search)
    assert text == f"program 'adir' on node beta: {bin_dir / 'adir'} (found in PATH) is a directory, not a program"
    assert "is not executable" in describe_missing("plain", None, node="beta", search_path=search)


def test_really_missing_keeps_the_plain_message(bin_dir: Path) -> None:
    text = describe_missing("no-such-program", None, node="beta", search_path=str(bin_dir))
    assert text == "program 'no-such-program' not found on node beta (not in its PATH, nor in [apps])"


def test_apps_path_is_named_as_configured(bin_dir: Path) -> None:
    text = describe_missing("sort", str(bin_dir / "plain"), node="gamma")
    assert text.startswith(f"program 'sort' on node gamma: {bin_dir / 'plain'} (its [apps] path) is not executable")
