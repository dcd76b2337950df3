"""Handing a local client's stdin/stdout to its node over the descriptor drop (real Unix sockets)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dpipes.nodes import fdpass
from dpipes.nodes.fdpass import FdDrop, drop_path, hand_over

WAIT_S = 10.0


@pytest.fixture
async def drop(tmp_path: Path) -> AsyncIterator[FdDrop]:
    d = FdDrop(drop_path(f"ipc://{tmp_path}/node.sock"))
    d.start()
    try:
        yield d
    finally:
        d.close()


def test_the_drop_sits_beside_the_ipc_socket() -> None:
    assert drop_path("ipc:///run/dpipes/local.sock") == "/run/dpipes/local-fds.sock"


async def test_handed_descriptors_are_the_same_pipe_and_given_out_once(tmp_path: Path, drop: FdDrop) -> None:
    r, w = os.pipe()
    token = hand_over(f"ipc://{tmp_path}/node.sock", {"stdout": w, "stdin": r})
    assert token
    os.close(w)  # the node's copy is now the only write end
    got = await drop.take(token)
    assert set(got) == {"stdin", "stdout"}
    os.write(got["stdout"], b"through the node's copy\n")
    assert os.read(r, 100) == b"through the node's copy\n"
    assert os.fstat(got["stdin"]).st_ino == os.fstat(r).st_ino
    for fd in got.values():
        os.close(fd)
    assert os.read(r, 100) == b""  # every write end closed: nothing kept a copy
    assert await drop.take(token, timeout=0.01) == {}  # once only
    os.close(r)


async def test_an_unclaimed_hand_over_is_closed(tmp_path: Path, drop: FdDrop, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fdpass, "KEEP_S", 0.05)
    r, w = os.pipe()
    assert hand_over(f"ipc://{tmp_path}/node.sock", {"stdout": w})
    os.close(w)
    loop = asyncio.get_running_loop()
    eof = loop.create_future()
    loop.add_reader(r, lambda: eof.done() or eof.set_result(os.read(r, 10)))
    try:
        assert await asyncio.wait_for(eof, WAIT_S) == b""  # the drop let go of its copy
    finally:
        loop.remove_reader(r)
        os.close(r)


async def test_a_malformed_hand_over_is_refused_and_its_descriptors_closed(
    tmp_path: Path, drop: FdDrop, caplog: pytest.LogCaptureFixture
) -> None:
    r, w = os.pipe()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(drop.path)
        socket.send_fds(sock, [b'{"token": "t", "names": ["stdout", "stdin"]}\n'], [w])  # two names, one fd
    os.close(w)
    assert await drop.take("t", timeout=0.5) == {}
    assert os.read(r, 10) == b""  # refused and closed
    assert "refused a hand-over" in caplog.text
    os.close(r)


def test_no_drop_means_no_hand_over(tmp_path: Path) -> None:
    assert hand_over(f"ipc://{tmp_path}/nobody.sock", {"stdout": 1}) is None
