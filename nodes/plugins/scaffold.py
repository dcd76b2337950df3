"""``dpipes plugin new NAME``: write a small pip-installable plugin package to start from.

The package (in ``./dpipes-plugin-NAME``, or ``--dir D``)::

    pyproject.toml               the dpipes.plugins entry point NAME -> dpipes_plugin_NAME.plugin:Class
    README.md                    how to test and install it
    dpipes_plugin_NAME/
        __init__.py
        plugin.py                the plugin: copies Input to Output, adding a column from its config
    tests/test_plugin.py         a test of it with the harness (PluginTestService)

Then ``pip install -e './dpipes-plugin-NAME[test]'`` and ``python -m pytest dpipes-plugin-NAME``; the
plugin is listed by ``dpipes plugin list``. NAME is lower-case letters and digits, with single
``-`` or ``_`` between them (``upper``, ``clean-names``); the class is its CamelCase
(``CleanNames``). Nothing is written over: a directory that exists and is not empty is refused.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Final

from dpipes.nodes.plugins.errors import ScaffoldError

log = logging.getLogger(__name__)

__all__ = ["ScaffoldError", "new_plugin", "plugin_names"]

MAX_NAME_CHARS: Final = 64
_NAME = re.compile(r"[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*")

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"
description = "The {name} dpipes plugin"
requires-python = ">=3.11"
dependencies = ["dpipes-bus", "pyarrow>=15"]

[project.optional-dependencies]
test = ["pytest>=8"]

# This makes the plugin known to dpipes as "{name}" once the package is installed.
[project.entry-points."dpipes.plugins"]
{name} = "{package}.plugin:{cls}"

[tool.setuptools]
packages = ["{package}"]
"""

_PLUGIN = '''\
"""The {name} dpipes plugin.

The engine calls the methods below one at a time. Read the guide: python -m pydoc dpipes.nodes.plugins
"""

from __future__ import annotations

import pyarrow as pa

from dpipes.nodes.plugins import Anchor, Plugin, Provider


class {cls}(Plugin):
    """Copies every row of Input to Output, adding a column ``tag`` holding the config's ``tag``."""

    def __init__(self, provider: Provider) -> None:
        super().__init__(provider)  # keeps self.provider
        self.tag = str(provider.tool_config.get("tag", "{name}"))
        self.rows = 0

    def on_record_batch(self, batch: pa.Table, anchor: Anchor) -> None:
        self.rows += batch.num_rows
        tags = pa.array([self.tag] * batch.num_rows, pa.string())
        self.provider.write_to_anchor("Output", batch.append_column("tag", tags))

    def on_incoming_connection_complete(self, anchor: Anchor) -> None:
        pass

    def on_complete(self) -> None:
        self.provider.io.info("{name}: %d rows", self.rows)
'''

_TEST = '''\
"""Tests of the {name} plugin with the dpipes harness: no daemon needed."""

from __future__ import annotations

import pyarrow as pa

from dpipes.nodes.plugins import PluginTestService
from {package}.plugin import {cls}


def test_adds_the_tag_to_every_row() -> None:
    with PluginTestService({cls}, ["Input"], ["Output"], {{"tag": "seen"}}) as service:
        service.run_on_record_batch(pa.table({{"n": [1, 2]}}), "Input")
        service.run_on_record_batch(pa.table({{"n": [3]}}), "Input")
        service.run_on_incoming_connection_complete("Input")
        service.run_on_complete()
        assert service.output("Output").to_pylist() == [
            {{"n": 1, "tag": "seen"}},
            {{"n": 2, "tag": "seen"}},
            {{"n": 3, "tag": "seen"}},
        ]
        assert service.io_stream == ["INFO:{name}: 3 rows"]
'''

_README = """\
# {dist}

The `{name}` plugin for dpipes: a Python class (`{package}/plugin.py`) that processes Arrow tables.

    pip install -e '.[test]'      # installs the plugin: `dpipes plugin list` shows {name}
    python -m pytest              # tests it with the harness, no daemon needed

On a node running dpipesd (restarted after the install), it is a pipeline stage:

    dpipes 'cat data.csv | %{name}@NODE tag=seen'

"""


def plugin_names(name: str) -> tuple[str, str, str]:
    """``(distribution, package, class)`` of plugin ``name``.

    Raises:
        ScaffoldError: ``name`` is not a valid plugin name.
    """
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
        raise ScaffoldError(
            f"plugin name {name!r}: use lower-case letters and digits with single - or _ between them, "
            f"starting with a letter, at most {MAX_NAME_CHARS} characters (e.g. upper, clean-names)"
        )
    words = re.split(r"[-_]", name)
    return f"dpipes-plugin-{name}", "dpipes_plugin_" + "_".join(words), "".join(w.capitalize() for w in words)


def new_plugin(name: str, directory: Path | str | None = None) -> Path:
    """Write the package of plugin ``name`` into ``directory`` (default ``./dpipes-plugin-NAME``).

    Returns:
        The package's directory.

    Raises:
        ScaffoldError: a bad name, or ``directory`` exists and is not an empty directory.
    """
    dist, package, cls = plugin_names(name)
    root = Path(directory) if directory is not None else Path(dist)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise ScaffoldError(f"{root} exists and is not an empty directory; choose another with --dir")
    fields = {"name": name, "dist": dist, "package": package, "cls": cls}
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        f"{package}/__init__.py": '"""The {name} dpipes plugin."""\n',
        f"{package}/plugin.py": _PLUGIN,
        "tests/test_plugin.py": _TEST,
    }
    for relative, template in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.format(**fields))
    log.info("wrote plugin %s in %s", name, root)
    return root
