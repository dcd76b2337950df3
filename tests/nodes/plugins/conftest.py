"""The runtime directory of the plugin tests: daemons started in it find the test plugins installed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.nodes.plugins.workers import SALES, install_plugins


@pytest.fixture
def rt(rt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runtime directory (the suite's), for daemons that find the test plugins installed, and sales.csv."""
    install_plugins(tmp_path / "site", monkeypatch)
    (tmp_path / "sales.csv").write_text(SALES)
    return rt
