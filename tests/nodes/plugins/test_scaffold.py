"""`dpipes plugin new`: the package it writes installs with pip, passes its own test, and is found.

Each install goes into a throwaway venv that sees this environment's packages (dpipes, pyarrow,
pytest, setuptools) through a .pth line, with --no-deps --no-build-isolation --no-index: offline
and quick.
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from dpipes.nodes.plugins.errors import ScaffoldError
from dpipes.nodes.plugins.scaffold import new_plugin, plugin_names

REPO = Path(__file__).parents[3]
EXAMPLES = REPO / "examples" / "plugins"
STEP_TIMEOUT_S = 120.0  # one pip install or pytest run on a loaded two-core machine


def run(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=STEP_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    """A fresh venv's python; this environment's site-packages are visible to it, nothing is installed in it."""
    root = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", root)
    python = root / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    outer = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "_outer_env.pth").write_text(f"import site; site.addsitedir({outer!r})\n")
    return python


def pip_install(python: Path, package: Path) -> None:
    run(
        sys.executable,
        "-m",
        "pip",
        "--python",
        python,
        "install",
        "-q",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        package,
    )


def plugins_in(python: Path) -> dict[str, dict[str, str]]:
    out = run(python, "-m", "dpipes.tools.dpipes", "plugin", "list", "--json").stdout
    return {p["name"]: p for p in map(json.loads, out.splitlines())}


def readme_python_block() -> str:
    """The Python example of the README's "Writing a plugin" section."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Writing a plugin\n") :]
    section = section[: section.index("\n## ", 1)]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_steps_work_as_written(tmp_path: Path, venv: Path) -> None:
    run(venv, "-m", "dpipes.tools.dpipes", "plugin", "new", "upper", cwd=tmp_path)
    pip_install(venv, tmp_path / "dpipes-plugin-upper")
    listed = run(venv, "-m", "dpipes.tools.dpipes", "plugin", "list").stdout.splitlines()
    assert listed[1].split() == ["upper", "0.1.0", "dpipes_plugin_upper.plugin:Upper"]
    out = run(venv, "-c", readme_python_block(), cwd=tmp_path).stdout
    assert "['INFO:upper: 2 rows']" in out and "tag" in out


def test_new_does_not_import_pyarrow(tmp_path: Path) -> None:
    script = (
        "import sys\nfrom dpipes.tools.dpipes import main\n"
        f"assert main(['plugin', 'new', 'x', '--dir', {str(tmp_path / 'x')!r}]) == 0\n"
        "assert 'pyarrow' not in sys.modules, 'pyarrow was imported'\n"
    )
    run(sys.executable, "-c", script)


def test_new_plugin_installs_passes_its_test_and_is_listed(tmp_path: Path, venv: Path) -> None:
    done = run(venv, "-m", "dpipes.tools.dpipes", "plugin", "new", "clean-names", cwd=tmp_path)
    package = tmp_path / "dpipes-plugin-clean-names"
    assert str(package.name) in done.stdout and "pip install -e" in done.stdout
    assert plugins_in(venv) == {}
    pip_install(venv, package)
    assert plugins_in(venv) == {
        "clean-names": {
            "name": "clean-names",
            "reference": "dpipes_plugin_clean_names.plugin:CleanNames",
            "version": "0.1.0",
        }
    }
    # the package's own test, run from elsewhere so that it imports the installed package
    run(venv, "-m", "pytest", "-q", "-p", "no:cacheprovider", package / "tests", cwd=tmp_path)
    loaded = run(
        venv, "-c", "from dpipes.nodes.plugins import load_plugin; print(load_plugin('clean-names').__module__)"
    )
    assert loaded.stdout.strip() == "dpipes_plugin_clean_names.plugin"


def test_the_examples_install_as_one_package_with_an_entry_point_each(venv: Path, tmp_path: Path) -> None:
    import shutil

    source = tmp_path / "examples"
    shutil.copytree(EXAMPLES, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip_install(venv, source)
    plugins = plugins_in(venv)
    assert set(plugins) == {"filter", "summarize", "generate", "split", "join", "passthrough"}
    assert {p["version"] for p in plugins.values()} == {"0.1.0"}
    check = (
        "from dpipes.nodes.plugins import installed_plugins, load_plugin\nfor n in installed_plugins(): load_plugin(n)"
    )
    run(venv, "-c", check)


def test_names_and_refusals(tmp_path: Path) -> None:
    assert plugin_names("upper") == ("dpipes-plugin-upper", "dpipes_plugin_upper", "Upper")
    assert plugin_names("a_b-c2") == ("dpipes-plugin-a_b-c2", "dpipes_plugin_a_b_c2", "ABC2")
    for bad in ["", "Upper", "2x", "a--b", "a-", "a b", "../x", "x" * 65]:
        with pytest.raises(ScaffoldError):
            plugin_names(bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ScaffoldError, match="not an empty directory"):
        new_plugin("upper", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert new_plugin("upper", tmp_path / "empty") == tmp_path / "empty"  # a missing directory is created


def test_cli_bad_name_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dpipes.tools.dpipes", "plugin", "new", "Bad Name"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=STEP_TIMEOUT_S,
    )
    assert done.returncode == 2 and "plugin name 'Bad Name'" in done.stderr
    assert list(tmp_path.iterdir()) == []
