"""The README's "Python API" list: every module and name it promises imports as written."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"
_ENTRY = re.compile(r"- `(dpipes(?:\.\w+)+)`: (`\w+`(?:, `\w+`)*)")


def api_list() -> dict[str, list[str]]:
    """Module -> names, from the README's "## Python API" section."""
    text = README.read_text()
    start = text.index("\n## Python API\n")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end != -1 else len(text)]
    entries: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("- "):
            continue
        match = _ENTRY.fullmatch(line.strip())
        assert match, f"a Python API line not in the form - `module`: `Name`, `Name`: {line!r}"
        assert match[1] not in entries, f"{match[1]} is listed twice"
        entries[match[1]] = re.findall(r"`(\w+)`", match[2])
    return entries


def test_the_list_names_the_library_a_user_imports() -> None:
    entries = api_list()
    assert {"dpipes.bus.hub", "dpipes.bus.client", "dpipes.nodes.pipes_session"} <= set(entries)
    # Benchmarks, test beds and command-line front ends are not something a program imports.
    assert not [m for m in entries if m.startswith("dpipes.tools")]


def test_every_listed_name_imports() -> None:
    missing = []
    for module_name, names in api_list().items():
        module = importlib.import_module(module_name)
        missing += [f"{module_name}.{name}" for name in names if not hasattr(module, name)]
    assert not missing, f"README.md names what does not exist: {missing}"
