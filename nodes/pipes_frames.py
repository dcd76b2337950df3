"""Pipes messages on the client's side: a ``PIPES`` frame decoded once, and one interpreter of them.

A node sends each message a stage's program wrote as one payload frame of a ``PIPES`` bus message:
the message's JSON text as the program wrote it, or ``{"error": "...", "line": N}`` for a line that
was not a valid message (see :mod:`dpipes.nodes.stage_pipes`). :func:`decode_frame` reads a frame
once; :class:`PipesMessageHandler` keeps what one stage (or one external process) reported, sorted
by kind, and is what every consumer reads: ``dpipes``'s log lines and summary, ``--pipes-json``,
:func:`dpipes.nodes.pipes_session.run_pipes` and the Dagster client. Cheap to import: ``dpipes``
loads it for every run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dpipes.bus.pipes import PIPES_VERSION_FIELD
from dpipes.nodes.pipes_lines import PipesBadLine, PipesLine, PipesRecord

__all__ = ["PipesExceptionInfo", "PipesFrameError", "PipesMessageHandler", "decode_frame"]


@dataclass(frozen=True, slots=True)
class PipesFrameError:
    """A node's report of a line a stage wrote that was not a valid Pipes message."""

    error: str
    line: int = 0

    def __str__(self) -> str:
        return self.error


def decode_frame(frame: bytes | bytearray | memoryview) -> Mapping[str, Any] | PipesFrameError:
    """One ``PIPES`` payload frame: the Pipes message (a map), or the node's report of a bad line.

    The node checked the message before sending it; a frame that is neither is reported as a
    :class:`PipesFrameError` too, never raised: it came off the wire.
    """
    try:
        item = json.loads(bytes(frame))
    except ValueError as exc:
        return PipesFrameError(f"a Pipes frame that is not JSON ({exc})")
    if isinstance(item, dict) and PIPES_VERSION_FIELD in item:
        return item
    if isinstance(item, dict) and isinstance(item.get("error"), str):
        line = item.get("line")
        return PipesFrameError(item["error"], line if isinstance(line, int) else 0)
    return PipesFrameError("a Pipes frame that is neither a message nor a report of a bad line")


@dataclass(frozen=True, slots=True)
class PipesExceptionInfo:
    """The exception a Pipes session closed with (``closed`` params ``exception``)."""

    name: str
    message: str
    stack: tuple[str, ...] = ()

    @classmethod
    def from_params(cls, exc: Mapping[str, Any]) -> PipesExceptionInfo:
        """Build it from the ``exception`` object of a ``closed`` message."""
        stack = exc.get("stack") or ()
        return cls(
            name=str(exc.get("name") or "Exception"),
            message=str(exc.get("message") or ""),
            stack=tuple(str(s) for s in stack) if isinstance(stack, list | tuple) else (),
        )

    def __str__(self) -> str:
        # dagster-pipes' message is already "Name: text" (traceback.format_exception_only)
        text = self.message.strip()
        return text if text.startswith(self.name) else f"{self.name}: {text}".rstrip(": ")


class PipesMessageHandler:
    """Collects the messages of one external process, in arrival order, sorted by kind."""

    def __init__(self) -> None:
        self._messages: list[Mapping[str, Any]] = []
        self._bad_lines: list[PipesBadLine] = []
        self._frame_errors: list[PipesFrameError] = []  # bad lines a node reported

    def handle_message(self, message: Mapping[str, Any]) -> None:
        """Take one validated Pipes message (the whole JSON object)."""
        self._messages.append(message)

    def handle_record(self, record: PipesRecord) -> None:
        """Take one record of a channel: a message, or a line that was not one."""
        if isinstance(record, PipesLine):
            self.handle_message(record.message.raw)
        elif isinstance(record, PipesBadLine):
            self._bad_lines.append(record)

    def handle_frame_error(self, error: PipesFrameError) -> None:
        """Take a node's report of a line that was not a valid message."""
        self._frame_errors.append(error)

    def _params(self, method: str) -> list[Mapping[str, Any]]:
        return [m.get("params") or {} for m in self._messages if m.get("method") == method]

    @property
    def messages(self) -> list[Mapping[str, Any]]:
        """Every message, in order."""
        return list(self._messages)

    @property
    def bad_lines(self) -> list[PipesBadLine]:
        """Lines of the channel that were not valid Pipes messages."""
        return list(self._bad_lines)

    @property
    def frame_errors(self) -> list[PipesFrameError]:
        """Lines a node reported as not valid Pipes messages (what ``bad_lines`` is over the bus)."""
        return list(self._frame_errors)

    @property
    def received_opened(self) -> bool:
        return any(m.get("method") == "opened" for m in self._messages)

    @property
    def received_closed(self) -> bool:
        return any(m.get("method") == "closed" for m in self._messages)

    @property
    def logs(self) -> list[Mapping[str, Any]]:
        """``log`` params: ``{"message", "level"}``."""
        return self._params("log")

    @property
    def materializations(self) -> list[Mapping[str, Any]]:
        """``report_asset_materialization`` params: ``{"asset_key", "metadata", "data_version"}``."""
        return self._params("report_asset_materialization")

    @property
    def checks(self) -> list[Mapping[str, Any]]:
        """``report_asset_check`` params: ``{"asset_key", "check_name", "passed", "severity", "metadata"}``."""
        return self._params("report_asset_check")

    @property
    def custom_messages(self) -> list[Any]:
        """The payloads of ``report_custom_message``."""
        return [p.get("payload") for p in self._params("report_custom_message")]

    @property
    def exception(self) -> PipesExceptionInfo | None:
        """The exception of the ``closed`` message, if the session closed with one."""
        for params in self._params("closed"):
            if exc := params.get("exception"):
                return PipesExceptionInfo.from_params(exc)
        return None
