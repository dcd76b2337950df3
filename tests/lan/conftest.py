"""Fixtures for multi-host tests: skip without root/iproute2, provide ``lan``, guard namespace leaks."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest


def _load_netns() -> ModuleType:
    # Test directories are not packages (pytest runs with --import-mode=importlib), so the helper
    # module is loaded by path, once, under a name of its own.
    name = "dpipes_tests_lan_netns"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("netns.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


netns = _load_netns()


@pytest.fixture(scope="session")
def _netns_reason() -> str | None:
    return netns.netns_unavailable_reason()


@pytest.fixture(autouse=True)
def _netns_required(_netns_reason: str | None) -> None:
    """Skip, saying why, where namespaces, veth pairs and bridges cannot be made."""
    if _netns_reason is not None:
        pytest.skip(_netns_reason)


@pytest.fixture(autouse=True)
def no_leaked_namespaces(_netns_required: None) -> Iterator[None]:
    """Fail a test that leaves one of this run's namespaces behind (and remove them)."""
    yield
    # Only this run's prefix: another test run on the machine may have namespaces of its own.
    leaked = netns.list_netns(netns.RUN_PREFIX)
    for name in leaked:
        netns.force_delete_netns(name)
    assert not leaked, f"test leaked network namespaces: {leaked}"


@pytest.fixture
def lan() -> object:
    """``async with lan(n) as hosts:`` -- n hosts on a bridged /24; see tests/lan/netns.py."""
    return netns.lan


@pytest.fixture
def netns_module() -> ModuleType:
    """The helper module itself (Lan, Host, constants)."""
    return netns
