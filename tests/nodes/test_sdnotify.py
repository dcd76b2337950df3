"""sd_notify: datagrams a service manager would receive, on a real Unix datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dpipes.nodes.sdnotify import NOTIFY_SOCKET_ENV, notify

RECV_TIMEOUT_S = 5.0  # the datagram is already queued when notify() returns; this only bounds a failure


def _receiver(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT_S)
    return sock


def test_ready_reaches_a_path_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with _receiver(path) as sock:
        assert notify({NOTIFY_SOCKET_ENV: path}, READY=1, STATUS="node a\nlistening")
        assert sock.recv(4096) == b"READY=1\nSTATUS=node a listening"  # a newline in a value would split it


def test_abstract_socket_name(tmp_path: Path) -> None:
    name = f"dpipes-test-{os.getpid()}-{tmp_path.name}"
    with _receiver("\0" + name) as sock:
        assert notify({NOTIFY_SOCKET_ENV: "@" + name}, STOPPING=1)
        assert sock.recv(4096) == b"STOPPING=1"


@pytest.mark.parametrize("value", [None, "", "relative.sock"])
def test_nothing_is_sent_without_a_usable_socket(value: str | None) -> None:
    environ = {} if value is None else {NOTIFY_SOCKET_ENV: value}
    assert notify(environ, READY=1) is False


def test_a_gone_manager_is_not_an_error(tmp_path: Path) -> None:
    assert notify({NOTIFY_SOCKET_ENV: str(tmp_path / "nobody.sock")}, READY=1) is False
