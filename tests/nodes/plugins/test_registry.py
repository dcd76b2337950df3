"""Finding plugins: entry points of installed distributions, module:Class and file.py:Class references."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest

from dpipes.nodes.plugins.errors import BadReference, NotAPlugin, PluginImportFailed, PluginNotFound
from dpipes.nodes.plugins.registry import ENTRY_POINT_GROUP, PluginInfo, installed_plugins, load_plugin

PLUGIN_SOURCE = """\
import pyarrow as pa
from dpipes.nodes.plugins import Plugin

class Upper(Plugin):
    def on_record_batch(self, batch, anchor):
        self.provider.write_to_anchor("Output", batch)
    def on_incoming_connection_complete(self, anchor):
        pass
    def on_complete(self):
        pass

class Half(Plugin):
    def on_complete(self):
        pass

class Duck:
    def __init__(self, provider):
        self.provider = provider
    def on_record_batch(self, batch, anchor):
        pass
    def on_incoming_connection_complete(self, anchor):
        pass
    def on_complete(self):
        pass

not_a_class = 3
"""


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A site directory on sys.path holding the module ``ptest_mod``, a broken module and a distribution."""
    root = tmp_path / "site"
    root.mkdir()
    (root / "ptest_mod.py").write_text(PLUGIN_SOURCE)
    (root / "ptest_broken.py").write_text("import pyarrow\nraise RuntimeError('broken at import')\n")
    (root / "ptest_needs.py").write_text("import ptest_absent_dependency\n")
    dist = root / "ptest_plugins-1.2.3.dist-info"  # what pip writes for an installed distribution
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ptest-plugins\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""\
            [{ENTRY_POINT_GROUP}]
            upper = ptest_mod:Upper
            broken = ptest_broken:Thing
            gone = ptest_mod:Gone
            [console_scripts]
            not-a-plugin = ptest_mod:Upper
            """)
    )
    monkeypatch.syspath_prepend(str(root))
    return root


def test_installed_plugins_lists_name_reference_and_version_without_importing(site: Path) -> None:
    plugins = installed_plugins()
    assert plugins["upper"] == PluginInfo("ptest_mod:Upper", "1.2.3")
    assert plugins["broken"].reference == "ptest_broken:Thing"  # listed; only loading imports
    assert "not-a-plugin" not in plugins


def test_a_plugin_installed_after_a_listing_is_found_and_one_removed_is_gone(site: Path) -> None:
    assert "later" not in installed_plugins()  # the table is kept from here on while nothing changes
    dist = site / "ptest_later-0.1.dist-info"  # as pip installs a distribution while the node runs
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ptest-later\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nlater = ptest_mod:Upper\n")
    assert installed_plugins()["later"] == PluginInfo("ptest_mod:Upper", "0.1")
    assert load_plugin("later").__name__ == "Upper"
    shutil.rmtree(dist)  # pip uninstall
    assert "later" not in installed_plugins()
    with pytest.raises(PluginNotFound, match="later"):
        load_plugin("later")


def test_load_by_entry_point_name(site: Path) -> None:
    assert load_plugin("upper").__name__ == "Upper"


def test_a_missing_entry_point_is_named_with_what_is_installed(site: Path) -> None:
    with pytest.raises(PluginNotFound, match=r"plugin nope: no installed plugin .*installed: .*upper"):
        load_plugin("nope")


def test_an_entry_point_whose_module_fails_to_import_names_the_distribution(site: Path) -> None:
    with pytest.raises(PluginImportFailed, match=r"ptest-plugins 1.2.3.*RuntimeError: broken at import") as info:
        load_plugin("broken")
    assert isinstance(info.value.__cause__, RuntimeError)
    with pytest.raises(PluginNotFound, match="has no 'Gone'"):
        load_plugin("gone")


def test_module_class_references(site: Path) -> None:
    assert load_plugin("ptest_mod:Upper").__name__ == "Upper"
    assert load_plugin("ptest_mod:Duck").__name__ == "Duck"  # the three callbacks are enough
    with pytest.raises(PluginNotFound, match="no module named 'ptest_nothing'"):
        load_plugin("ptest_nothing:X")
    with pytest.raises(PluginImportFailed, match="ptest_absent_dependency"):  # found, but its import fails
        load_plugin("ptest_needs:X")


def test_not_a_plugin_says_what_is_missing(site: Path) -> None:
    with pytest.raises(NotAPlugin, match="is not a class"):
        load_plugin("ptest_mod:not_a_class")
    with pytest.raises(NotAPlugin, match="does not implement on_incoming_connection_complete, on_record_batch"):
        load_plugin("ptest_mod:Half")
    with pytest.raises(NotAPlugin, match="has no on_record_batch"):
        load_plugin("textwrap:TextWrapper")


def test_file_references(tmp_path: Path) -> None:
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN_SOURCE)
    cls = load_plugin(f"{path}:Upper")
    assert cls.__name__ == "Upper"
    assert load_plugin(f"{path}:Upper") is cls  # loaded once per process
    with pytest.raises(PluginNotFound, match="no file"):
        load_plugin(f"{tmp_path / 'absent.py'}:Upper")
    broken = tmp_path / "broken.py"
    broken.write_text("1/0\n")
    with pytest.raises(PluginImportFailed, match="ZeroDivisionError"):
        load_plugin(f"{broken}:X")


@pytest.mark.parametrize("reference", ["", "  ", ":Upper", "ptest_mod:", 7])
def test_bad_references(reference: object) -> None:
    with pytest.raises(BadReference):
        load_plugin(reference)  # type: ignore[arg-type]
