"""A run's output written in order to one file descriptor, so that a slow reader never stalls a loop.

A file or a device (``/dev/null``, a terminal) takes a write at once (:func:`writes_at_once`); a
pipe or a socket may block for as long as its reader likes. :class:`Output` writes to the first
kind at once and to the second through a thread of its own, and says which writes the thread
finished, so that the short path of ``dpipes`` (:mod:`dpipes.nodes.local_run`) gives credit back
only for data that left and keeps its heartbeats meanwhile. The full path
(:mod:`dpipes.nodes.run`) makes the same choice with ``asyncio.to_thread`` over
:func:`write_all`.

Imports nothing of asyncio: the short path stays short.
"""

from __future__ import annotations

import os
import stat

from dpipes.bus.logs import LazyLogger

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
    import threading
    from typing import Any

log = LazyLogger(__name__)  # logging is imported only if something is logged (dpipes.bus.logs)


def writes_at_once(fd: int) -> bool:
    """Whether ``fd`` is a file or a device, which takes a write at once; pipes and sockets may not."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        mode = 0
    return stat.S_ISREG(mode) or stat.S_ISCHR(mode)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (blocking), however many writes it takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class Output:
    """Writes one descriptor's data in order: at once to a file or device; through a thread to a pipe
    or socket, whose reader may be slow, so that the caller's loop keeps its heartbeats meanwhile.

    ``broken`` is set when the reader went away (EPIPE). The thread writes a byte to ``wake_fd``
    after each write it finished; :meth:`taken` then says which."""

    def __init__(self, fd: int, wake_fd: int) -> None:
        self.fd = fd
        self.wake_fd = wake_fd
        self.broken = False
        self.inline = writes_at_once(fd)
        self._queue: list[tuple[bytes | memoryview, Any, int]] = []
        self._written: list[tuple[Any, int]] = []
        self._cond: threading.Condition | None = None  # with the thread, made for the first write it takes
        self._thread: threading.Thread | None = None
        self._closing = False

    def write(self, data: bytes | memoryview, token: Any = None, units: int = 0) -> bool:
        """Write ``data``, now or through the thread; whether it was written now. A later write
        comes back from :meth:`taken` as ``(token, units)``."""
        if self.broken:
            return True
        if self.inline:
            try:
                write_all(self.fd, data)
            except BrokenPipeError:
                self.broken = True
            return True
        if self._cond is None:
            import threading  # here: a file, a device, or output that never comes needs no thread

            self._cond = threading.Condition()
            self._thread = threading.Thread(target=self._drain, name=f"dpipes output fd {self.fd}", daemon=True)
            self._thread.start()
        with self._cond:
            self._queue.append((data, token, units))
            self._cond.notify()
        return False

    def taken(self) -> list[tuple[Any, int]]:
        """(token, units) for each write the thread finished since the last call."""
        if self._cond is None:
            return []
        with self._cond:
            done, self._written = self._written, []
        return done

    def flush(self) -> None:
        """Wait until everything queued was written (or the reader went away)."""
        if self._cond is None or self._thread is None:
            return
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _drain(self) -> None:
        assert self._cond is not None
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                data, token, units = self._queue.pop(0)
            try:
                if not self.broken:
                    write_all(self.fd, data)
            except BrokenPipeError:
                self.broken = True
            except OSError as exc:
                log.debug("writing to fd %d failed: %s", self.fd, exc)
                self.broken = True
            with self._cond:
                self._written.append((token, units))
            try:
                os.write(self.wake_fd, b"w")
            except BlockingIOError:  # the loop has a wake-up pending already
                pass


__all__ = ["Output", "write_all", "writes_at_once"]
