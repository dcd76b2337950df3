"""Handing a local client's stdin and stdout to its node, so that stages there use them directly.

When ``dpipes`` runs on the host of its entry node, the first stage can read this command's stdin
and the last one write its stdout as a shell's would, without the data passing through the
client and the bus. The client hands the descriptors over before it asks for the run: it connects
to the node's *descriptor drop*, a Unix socket beside the node's ``ipc://`` socket (``X.sock`` ->
``X-fds.sock``), and sends one message carrying the descriptors (``SCM_RIGHTS``) and a JSON line
``{"token": T, "names": ["stdin", "stdout"]}``. The ``run`` request then names ``T``; the entry
node takes the descriptors it uses and closes the others.

The drop accepts descriptors only from a process of its own user (``SO_PEERCRED``), keeps each
hand-over at most ``KEEP_S`` unclaimed, and bounds what it reads. Anything unexpected is logged
and closed; a client whose hand-over failed simply gets its data over the bus, as from another host.
"""

from __future__ import annotations

import contextlib
import os
import struct

from dpipes.bus.logs import LazyLogger

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
    import asyncio
    import socket
    from typing import Final

log = LazyLogger(__name__)  # logging is imported only if something is logged (dpipes.bus.logs)

KEEP_S: Final = 30.0  # an unclaimed hand-over is closed after this long
TAKE_WAIT_S: Final = 2.0  # the run request may overtake its hand-over: wait this long for it
MAX_MESSAGE_BYTES: Final = 1024
MAX_FDS: Final = 2
NAMES: Final = ("stdin", "stdout")
_UCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


def drop_path(ipc_endpoint: str) -> str:
    """The descriptor drop of the node whose ``ipc://`` endpoint is given."""
    return ipc_endpoint.removeprefix("ipc://").removesuffix(".sock") + "-fds.sock"


def hand_over(ipc_endpoint: str, fds: dict[str, int]) -> str | None:
    """Send ``fds`` (by name: ``stdin``, ``stdout``) to the node at ``ipc_endpoint``; the token.

    Returns None, quietly, where the node has no drop (it is not on this host, or predates it):
    the run then moves the data over the bus.
    """
    path = drop_path(ipc_endpoint)
    if not fds or not os.path.exists(path):
        return None
    import _socket  # the socket module's core: its enums cost the short path of dpipes 2 ms to import

    token = os.urandom(16).hex()  # what secrets.token_hex does, without importing hashlib and random
    names = [name for name in NAMES if name in fds]
    # The JSON line json.dumps makes of {"token": token, "names": names}: hex and NAMES need no escapes.
    quoted = ", ".join(f'"{name}"' for name in names)
    data = f'{{"token": "{token}", "names": [{quoted}]}}\n'.encode()
    rights = struct.pack(f"{len(names)}i", *(fds[name] for name in names))
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(path)
        sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, rights)])  # socket.send_fds
    except OSError as exc:
        log.debug("no descriptor hand-over to %s: %s", path, exc)
        return None
    finally:
        sock.close()
    return token


class FdDrop:
    """A node's descriptor drop: receives hand-overs and gives them out by token, once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kept: dict[str, dict[str, int]] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._uid = os.getuid()

    def start(self) -> None:
        """Listen at :attr:`path` (replacing a stale socket file); on the running loop."""
        import asyncio  # here, not at the top: a client that only hands over must not pay for it
        import socket

        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            os.chmod(self.path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop listening, remove the socket file, close every descriptor still kept. Idempotent."""
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for token in list(self._kept):
            self._discard(token)
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    async def take(self, token: str, *, timeout: float = TAKE_WAIT_S) -> dict[str, int]:
        """The descriptors handed over under ``token`` (by name), now the caller's to close; ``{}``
        if none arrive within ``timeout``."""
        if token not in self._kept and self._sock is not None:
            import asyncio

            assert self._loop is not None
            waiter = self._waiters.setdefault(token, self._loop.create_future())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            self._waiters.pop(token, None)
        handle = self._expiry.pop(token, None)
        if handle is not None:
            handle.cancel()
        return self._kept.pop(token, {})

    # -- receiving ---------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._sock is not None and self._loop is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("descriptor drop %s: accept failed: %s", self.path, exc)
                return
            conn.setblocking(False)
            self._loop.add_reader(conn.fileno(), self._receive, conn)

    def _receive(self, conn: socket.socket) -> None:
        import json
        import socket

        assert self._loop is not None
        fds: list[int] = []
        try:
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, MAX_MESSAGE_BYTES, MAX_FDS)
            except BlockingIOError:
                return  # not there yet: called again when it is
            self._loop.remove_reader(conn.fileno())
            uid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[1]
            if uid != self._uid:
                raise ValueError(f"from uid {uid}, not this node's user")
            message = json.loads(data)
            token, names = str(message["token"]), [str(n) for n in message["names"]]
            if len(names) != len(fds) or not set(names) <= set(NAMES) or token in self._kept:
                raise ValueError(f"{len(fds)} descriptor(s) for names {names}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("descriptor drop %s: refused a hand-over: %s", self.path, exc)
            for fd in fds:
                os.close(fd)
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(conn.fileno())
            conn.close()
            return
        conn.close()
        self._kept[token] = dict(zip(names, fds, strict=True))
        self._expiry[token] = self._loop.call_later(KEEP_S, self._discard, token)
        waiter = self._waiters.get(token)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _discard(self, token: str) -> None:
        handle = self._expiry.pop(token, None)
        if handle is not None:
            handle.cancel()
        for fd in self._kept.pop(token, {}).values():
            os.close(fd)
