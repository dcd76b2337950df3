"""Module loggers that import :mod:`logging` when something is first logged, not at import.

``dpipes 'echo x | cat'`` on its short path (:mod:`dpipes.nodes.local_run`) logs nothing when all
goes well, and :mod:`logging` with what it imports (traceback, linecache, tokenize, string) was
about half of what that start still imported besides pyzmq and msgpack. The modules on that path
take their logger from :class:`LazyLogger`; the command defers its logging set-up with
:func:`on_first_use` (run before the first message of any lazy logger) and runs it with
:func:`set_up` when it takes a path whose modules use :mod:`logging` directly.

Those modules keep :mod:`typing` out too (about 2 ms of that start): each says
``TYPE_CHECKING = False`` and imports what its annotations name under ``if TYPE_CHECKING:``,
which type checkers read as :data:`typing.TYPE_CHECKING`; with postponed annotations nothing
else needs the names at run time.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing it (see above)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["LazyLogger", "on_first_use", "set_up"]

_pending: list[Callable[[], None]] = []


def on_first_use(setup: Callable[[], None]) -> None:
    """Run ``setup`` (a command's logging configuration) before the first lazy logger is used."""
    _pending.append(setup)


def set_up() -> None:
    """Run the deferred set-up now (once)."""
    while _pending:
        _pending.pop(0)()


class LazyLogger:
    """``logging.getLogger(name)``, looked up (and :mod:`logging` imported) on first use."""

    __slots__ = ("_logger", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._logger: Any = None

    def info_if_configured(self, msg: str, *args: Any) -> None:
        """``info(msg, *args)`` when :mod:`logging` is in use already (a program that embeds the
        short path set it up); else nothing: the command shows no INFO on its short path, and
        importing :mod:`logging` for a message nobody sees cost a run ~10 ms of CPU."""
        import sys

        if "logging" in sys.modules:
            self.info(msg, *args)

    def __getattr__(self, attr: str) -> Any:
        if self._logger is None:
            import logging

            set_up()
            self._logger = logging.getLogger(self.name)
        return getattr(self._logger, attr)
