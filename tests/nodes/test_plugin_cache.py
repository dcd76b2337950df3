"""The plugin list a node offers at start: cached while the installation is unchanged, never wrong.

Each check runs a fresh interpreter, as a daemon start does, with a site directory of its own on
``PYTHONPATH`` and the cache under a temporary ``XDG_CACHE_HOME``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpipes.nodes.plugin_cache import MAX_CACHE_BYTES, MAX_CACHE_FILES, cache_file, installed_plugin_versions

LIST = (
    "import json, sys\n"
    "from dpipes.nodes.plugin_cache import installed_plugin_versions\n"
    "print(json.dumps([installed_plugin_versions(), 'importlib.metadata' in sys.modules]))\n"
)


def add_distribution(site: Path, name: str, version: str, plugins: dict[str, str]) -> None:
    """What ``pip install`` leaves in a site directory for a distribution with plugin entry points."""
    dist = site / f"{name}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{plugin} = {ref}\n" for plugin, ref in plugins.items())
    (dist / "entry_points.txt").write_text(f"[dpipes.plugins]\n{lines}")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    add_distribution(root, "ptest_upper", "1.2.3", {"upper": "ptest_upper:Upper"})
    monkeypatch.setenv("PYTHONPATH", str(root))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return root


def listed(site: Path) -> tuple[dict[str, str], bool]:
    """The plugins a fresh interpreter lists, and whether it had to import importlib.metadata."""
    out = subprocess.run([sys.executable, "-c", LIST], cwd=site, capture_output=True, text=True, check=True, timeout=60)
    plugins, scanned = json.loads(out.stdout)
    return plugins, scanned


def cache(site: Path) -> Path:
    """The one cache file the fresh interpreters of ``site`` write."""
    return site.parent / "cache" / "dpipes" / f"plugins-{installation_key(site)}.json"


def installation_key(site: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", "from dpipes.nodes.plugin_cache import cache_file; print(cache_file().name)"],
        cwd=site,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip().removeprefix("plugins-").removesuffix(".json")


def test_the_second_start_lists_the_same_plugins_without_scanning_distributions(site: Path) -> None:
    assert listed(site) == ({"upper": "1.2.3"}, True)
    assert listed(site) == ({"upper": "1.2.3"}, False)
    assert cache(site).stat().st_mode & 0o077 == 0
    assert cache(site).parent.stat().st_mode & 0o077 == 0


def test_installing_upgrading_and_removing_a_distribution_is_seen_at_the_next_start(site: Path) -> None:
    listed(site)
    add_distribution(site, "ptest_lower", "0.1", {"lower": "ptest_lower:Lower"})
    assert listed(site) == ({"lower": "0.1", "upper": "1.2.3"}, True)
    shutil.rmtree(site / "ptest_upper-1.2.3.dist-info")  # an upgrade: the old one goes, the new one comes
    add_distribution(site, "ptest_upper", "2.0", {"upper": "ptest_upper:Upper"})
    assert listed(site) == ({"lower": "0.1", "upper": "2.0"}, True)
    shutil.rmtree(site / "ptest_lower-0.1.dist-info")
    assert listed(site) == ({"upper": "2.0"}, True)
    assert listed(site) == ({"upper": "2.0"}, False)


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"\x00" * (MAX_CACHE_BYTES + 1),
        b"[]",
        json.dumps({"format": 1, "installation": [], "plugins": {"x": 1}}).encode(),
    ],
    ids=["garbage", "oversized", "not-an-object", "wrong-types"],
)
def test_a_damaged_cache_file_is_ignored_and_replaced(site: Path, content: bytes) -> None:
    listed(site)
    cache(site).write_bytes(content)
    assert listed(site) == ({"upper": "1.2.3"}, True)
    assert listed(site) == ({"upper": "1.2.3"}, False)


def test_a_forged_entry_for_another_installation_is_not_used(site: Path) -> None:
    listed(site)
    entry = json.loads(cache(site).read_text())
    entry["plugins"] = {"evil": "6.6.6"}
    entry["installation"][0][1] = 1  # the same paths, one with another time: another installation
    cache(site).write_text(json.dumps(entry))
    assert listed(site) == ({"upper": "1.2.3"}, True)


def test_without_a_usable_cache_directory_the_plugins_are_still_listed(site: Path, tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("a file where the cache directory would be")
    assert listed(site) == ({"upper": "1.2.3"}, True)
    os.unlink(tmp_path / "cache")
    shared = tmp_path / "cache" / "dpipes"
    shared.mkdir(parents=True)
    shared.chmod(0o777)  # others could plant a list: not used, not written
    assert listed(site) == ({"upper": "1.2.3"}, True)
    assert listed(site) == ({"upper": "1.2.3"}, True)
    assert not cache(site).exists()


def test_two_installations_started_in_turn_each_keep_their_list(site: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-site"
    other.mkdir()
    add_distribution(other, "ptest_lower", "0.1", {"lower": "ptest_lower:Lower"})
    env = {**os.environ, "PYTHONPATH": str(other)}

    def listed_by_other() -> tuple[dict[str, str], bool]:
        out = subprocess.run(
            [sys.executable, "-c", LIST], cwd=other, env=env, capture_output=True, text=True, check=True, timeout=60
        )
        plugins, scanned = json.loads(out.stdout)
        return plugins, scanned

    assert listed(site) == ({"upper": "1.2.3"}, True)
    assert listed_by_other() == ({"lower": "0.1"}, True)
    assert listed(site) == ({"upper": "1.2.3"}, False)
    assert listed_by_other() == ({"lower": "0.1"}, False)
    assert len(list(cache(site).parent.glob("plugins-*.json"))) == 2


def test_only_the_most_recent_installations_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Throwaway virtual environments each leave a file: a write keeps the newest MAX_CACHE_FILES.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory = tmp_path / "dpipes"
    directory.mkdir(mode=0o700)
    for i in range(MAX_CACHE_FILES + 5):
        old = directory / f"plugins-{i:08x}.json"
        old.write_text("{}")
        os.utime(old, ns=(i * 10**9, i * 10**9))
    (directory / "dataclass-code-x.marshal").write_bytes(b"")  # not a plugin list: left alone
    installed_plugin_versions()
    left = sorted(p.name for p in directory.glob("plugins-*.json"))
    assert len(left) == MAX_CACHE_FILES and cache_file().name in left
    assert "plugins-00000000.json" not in left and f"plugins-{MAX_CACHE_FILES + 4:08x}.json" in left
    assert (directory / "dataclass-code-x.marshal").exists()
