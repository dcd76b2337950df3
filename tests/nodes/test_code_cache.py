"""The code ``@dataclass`` generates, cached between starts: the same classes, fewer compilations.

Each start is a fresh interpreter, as a daemon start is, with the cache under a temporary
``XDG_CACHE_HOME``; it defines dataclasses of every kind dpipes uses and reports how they behave
and how many sources it compiled.
"""

from __future__ import annotations

import json
import marshal
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpipes.nodes import code_cache
from dpipes.nodes.code_cache import MAX_CACHE_BYTES, CodeCache

START = """
import json, dataclasses
from dpipes.nodes import code_cache
cache = code_cache.install()

@dataclasses.dataclass(frozen=True, slots=True, kw_only=True, eq=False, repr=False)
class Frame:
    kind: str
    seq: int = 0

@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    name: str
    tags: tuple[str, ...] = ()
    extra: dict = dataclasses.field(default_factory=dict, hash=False)

@dataclasses.dataclass(order=True)
class Mutable:
    n: int

f = Frame(kind="HELLO", seq=3)
r = Record("a", ("x",))
try:
    r.name = "b"
    frozen = False
except dataclasses.FrozenInstanceError:
    frozen = True
m = Mutable(1)
m.n = 2
print(json.dumps({
    "frame": [f.kind, f.seq, f == Frame(kind="HELLO", seq=3)],
    "record": [repr(r), r == Record("a", ("x",)), hash(r) == hash(Record("a", ("x",))), frozen, r.extra],
    "order": [Mutable(1) < m, repr(m)],
    "annotation": repr(Record.__init__.__annotations__["name"]),
    "compiled": cache.compiled,
}))
code_cache.save()
"""


def start(tmp_path: Path) -> dict[str, object]:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = subprocess.run(
        [sys.executable, "-c", START], env=env, cwd=tmp_path, capture_output=True, text=True, check=True, timeout=60
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def cache_path(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "dpipes" / code_cache.cache_file().name


def test_the_second_start_compiles_nothing_and_its_classes_behave_the_same(tmp_path: Path) -> None:
    first = start(tmp_path)
    assert first["compiled"] != 0
    second = start(tmp_path)
    assert second["compiled"] == 0
    assert {**first, "compiled": 0} == second
    assert second["frame"] == ["HELLO", 3, False]  # eq=False: identity
    assert second["record"] == ["Record(name='a', tags=('x',), extra={})", True, True, True, {}]
    assert second["order"] == [True, "Mutable(n=2)"]
    # compiled without the cache module's `from __future__ import annotations`: a type, not a name
    assert second["annotation"] == "<class 'str'>"
    assert cache_path(tmp_path).stat().st_mode & 0o077 == 0
    assert cache_path(tmp_path).parent.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    "content",
    [
        b"garbage",
        b"\x00" * (MAX_CACHE_BYTES + 1),
        marshal.dumps([1, 2, 3]),
        marshal.dumps((code_cache.CACHE_FORMAT, "another-interpreter", {})),
        marshal.dumps((code_cache.CACHE_FORMAT, code_cache._INTERPRETER, {"def f(): pass": "not code"})),
    ],
    ids=["garbage", "oversized", "not-a-tuple", "another-interpreter", "wrong-types"],
)
def test_a_damaged_cache_file_is_ignored_and_replaced(tmp_path: Path, content: bytes) -> None:
    start(tmp_path)
    cache_path(tmp_path).write_bytes(content)
    assert start(tmp_path)["compiled"] != 0
    assert start(tmp_path)["compiled"] == 0


def test_a_cache_others_could_write_is_not_read(tmp_path: Path) -> None:
    start(tmp_path)
    cache_path(tmp_path).chmod(0o666)
    assert start(tmp_path)["compiled"] != 0  # not read; replaced by a private file
    assert cache_path(tmp_path).stat().st_mode & 0o077 == 0
    assert start(tmp_path)["compiled"] == 0
    cache_path(tmp_path).parent.chmod(0o777)
    assert start(tmp_path)["compiled"] != 0  # a directory others can write to: neither read nor written
    assert start(tmp_path)["compiled"] != 0


def test_a_source_is_run_as_exec_runs_it(tmp_path: Path) -> None:
    cache = CodeCache(tmp_path / "code.marshal")
    namespace: dict[str, object] = {}
    cache.exec("def f(x):\n    return x + y\n", {"y": 1}, namespace)
    f = namespace["f"]
    assert callable(f) and f(1) == 2
    assert cache.compiled == 1
    cache.save()
    again = CodeCache(tmp_path / "code.marshal")
    again.load()
    namespace = {}
    again.exec("def f(x):\n    return x + y\n", {"y": 2}, namespace)
    g = namespace["f"]
    assert callable(g) and g(1) == 3  # the globals of this call, not of the first
    assert again.compiled == 0


def test_without_a_usable_cache_directory_the_classes_are_still_made(tmp_path: Path) -> None:
    (tmp_path / "cache").write_text("a file where the cache directory would be")
    assert start(tmp_path)["compiled"] != 0
    assert start(tmp_path)["compiled"] != 0
