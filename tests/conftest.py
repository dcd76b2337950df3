"""Shared test guards (a test must leave no descendant process behind) and shared fixtures."""

from __future__ import annotations

import compileall
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.procs import descendants

# No timing thresholds in tests: hypothesis's per-example deadline (200 ms) fails a property on a
# loaded two-core machine, which says nothing about the property.
settings.register_profile("dpipes", deadline=None)
settings.load_profile("dpipes")



def pytest_sessionstart(session: pytest.Session) -> None:
    """Byte-compile dpipes where it is imported from, and the tests, before any test starts a process.

    The suite starts thousands of Python processes (daemons, clients, plugin workers, programs).
    An editable install under ``PYTHONDONTWRITEBYTECODE`` (set on some CI machines) never writes
    ``__pycache__``, so each of them compiled every dpipes module it imported from source: about a
    third of the suite's CPU. ``pip install .`` compiles an installed package the same way; this
    only does it for a checkout. A directory we cannot write is left as it is.
    """
    import dpipes.bus

    root = Path(dpipes.bus.__file__).resolve().parent.parent
    for name in ("bus", "nodes", "discovery", "tools", "tests"):
        if (root / name).is_dir() and os.access(root / name, os.W_OK):
            compileall.compile_dir(root / name, quiet=2, workers=1)


LEAK_GRACE_S = 5.0  # a just-killed child may take a moment to be reaped by its parent


def _private_dir_in(variable: str, where: Path) -> Iterator[None]:
    """``$variable`` set to ``where`` (made 0700) while the session runs."""
    where.chmod(0o700)
    before = os.environ.get(variable)
    os.environ[variable] = str(where)
    yield
    if before is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = before


@pytest.fixture(autouse=True, scope="session")
def private_key_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Daemons and clients started by tests make their key pairs here, never in the user's home."""
    yield from _private_dir_in("DPIPES_KEY_DIR", tmp_path_factory.mktemp("keys"))


@pytest.fixture(autouse=True, scope="session")
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Daemons started by tests cache their plugin list here (``dpipes.nodes.plugin_cache``), never
    in the user's ``~/.cache``."""
    yield from _private_dir_in("XDG_CACHE_HOME", tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Fail the test if it leaves a descendant process running."""
    before = descendants()
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        leaked = descendants() - before
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling a condition under a deadline, not waiting for the network
    if leaked:
        cmdlines = []
        for pid in sorted(leaked):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().replace(b"\0", b" ").decode(errors="replace")
                cmdlines.append(f"{pid}: {argv}")
            except OSError:
                pass
        pytest.fail("test leaked processes:\n" + "\n".join(cmdlines))


@pytest.fixture
def rt(tmp_path: Path) -> Path:
    """A private runtime directory for the test's daemons (``DPIPES_RUNTIME_DIR``)."""
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse, for a test's other uid (pytest's tmp_path is private to root)."""
    where = Path(tempfile.mkdtemp(prefix="dpipes-test-"))
    where.chmod(0o711)
    yield where
    shutil.rmtree(where)
