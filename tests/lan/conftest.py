"""Fixtures for multi-host tests: skip without root/iproute2, provide ``lan``, guard namespace leaks."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest

from dpipes.tools.bench import netns


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
    """``async with lan(n) as hosts:`` -- n hosts on a bridged /24; see dpipes.tools.bench.netns."""
    return netns.lan


@pytest.fixture
def netns_module() -> ModuleType:
    """The helper module itself (Lan, Host, constants)."""
    return netns
