"""Pipes message channels' lines: the records a channel yields and the bounded line splitter.

A channel splits what a program writes into lines with a bounded buffer: a line longer than the
limit is reported as a :class:`PipesBadLine` and skipped, and reading goes on with the next line.
Every record carries its 1-based line number in the channel (blank lines count).
:class:`PipesStdioSplitter` is the ``stderr``/``stdout`` channel: fed a stream's bytes, it tells
message lines (a JSON object naming ``__dagster_pipes_version``) from plain text, which passes on.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

from dpipes.bus.errors import DpipesError
from dpipes.bus.pipes import (
    MAX_LINE_BYTES,
    PIPES_VERSION_FIELD,
    PipesMessage,
    PipesMessageError,
    parse_message,
)

__all__ = [
    "PipesBadLine",
    "PipesBootstrapError",
    "PipesLine",
    "PipesLineSplitter",
    "PipesMessageChannel",
    "PipesRecord",
    "PipesStdioRecord",
    "PipesStdioSplitter",
    "PipesTextLine",
]


log = logging.getLogger(__name__)

BAD_LINE_HEAD_BYTES: Final = 200
_MESSAGE_MARKER: Final = json.dumps(PIPES_VERSION_FIELD).encode()


# ------------------------------------------------------------------------------------------ records


class PipesBootstrapError(DpipesError, ValueError):
    """A Pipes bootstrap cannot be built as asked (unknown injector or channel, context too big)."""


@dataclass(frozen=True, slots=True)
class PipesLine:
    """A valid Pipes message, with its line number in the channel."""

    line_no: int
    message: PipesMessage
    size: int = 0  # bytes of the line, without its newline
    text: bytes = b""  # the line as the program wrote it: what a node forwards, not a re-encoding


@dataclass(frozen=True, slots=True)
class PipesBadLine:
    """A line that is not a valid Pipes message (malformed or over-long); reading went on after it."""

    line_no: int
    error: PipesMessageError
    head: bytes  # the line's first bytes, for the operator
    size: int = 0  # bytes of the line seen when it was reported
    source: str = ""  # where it came from when not a line of a file (``the bus writer <addr>``)

    def __str__(self) -> str:
        if self.source:
            return f"Pipes message {self.line_no} from {self.source}: {self.error}"
        return f"Pipes message line {self.line_no}: {self.error}"


@dataclass(frozen=True, slots=True)
class PipesTextLine:
    """Plain text among the messages of a stdio channel (without its newline)."""

    line_no: int
    text: bytes
    partial: bool = False  # the line was longer than the limit; its next piece follows with the same number


PipesRecord: TypeAlias = PipesLine | PipesBadLine
PipesStdioRecord: TypeAlias = PipesLine | PipesBadLine | PipesTextLine


# ----------------------------------------------------------------------------------------- splitting


class PipesLineSplitter:
    """Turns a byte stream into Pipes records, line by line, with a bounded line buffer (sans-IO).

    With ``stdio=True`` a line is a message only if it is a JSON object naming
    ``__dagster_pipes_version``; any other line is :class:`PipesTextLine`, and an over-long text
    line is passed on in pieces instead of being dropped. Otherwise every non-blank line must be a
    message, and blank lines are skipped.
    """

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES, stdio: bool = False) -> None:
        if max_line_bytes < 1:
            raise ValueError(f"max_line_bytes must be positive, got {max_line_bytes}")
        self._max = max_line_bytes
        self._stdio = stdio
        self._buf = bytearray()
        self._line_no = 1  # number of the line being accumulated
        self._discarding = False  # inside an over-long line already reported
        self._continuing_text = False  # inside an over-long text line already partly passed on

    @property
    def lines_seen(self) -> int:
        """How many complete lines have been consumed."""
        return self._line_no - 1

    def feed(self, data: bytes) -> list[PipesStdioRecord]:
        """Consume a chunk; return the records of the lines it completed."""
        out: list[PipesStdioRecord] = []
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return out
            self._discarding = False
            self._line_no += 1
            data = data[nl + 1 :]
        buf = self._buf
        scan = len(buf)  # what is already buffered holds no newline: search only the new bytes
        buf += data
        pos = 0
        while (nl := buf.find(b"\n", scan)) >= 0:
            if nl - pos > self._max and not (self._stdio and self._is_text(buf, pos, nl)):
                self._overlong(bytes(buf[pos : pos + BAD_LINE_HEAD_BYTES]), nl - pos, out, complete=True)
            else:
                self._line(bytes(buf[pos:nl]), out)
            self._line_no += 1
            self._continuing_text = False
            pos = scan = nl + 1
        if pos:
            del buf[:pos]
        if len(buf) > self._max:
            if self._stdio and (self._continuing_text or _MESSAGE_MARKER not in buf):
                out.append(PipesTextLine(self._line_no, bytes(buf), partial=True))
                self._continuing_text = True
            else:
                self._overlong(bytes(buf[:BAD_LINE_HEAD_BYTES]), len(buf), out, complete=False)
                self._discarding = True
            buf.clear()
        return out

    def end(self) -> list[PipesStdioRecord]:
        """The stream ended: return the record of a last line that had no newline, if any."""
        out: list[PipesStdioRecord] = []
        if self._buf and not self._discarding:
            self._line(bytes(self._buf), out)
            self._line_no += 1
        self._buf.clear()
        self._discarding = self._continuing_text = False
        return out

    def _is_text(self, buf: bytearray, start: int, end: int) -> bool:
        return self._continuing_text or not _looks_like_message(buf[start:end])

    def _overlong(self, head: bytes, size: int, out: list[PipesStdioRecord], *, complete: bool) -> None:
        seen = f"{size}" if complete else f"more than {size}"
        reason = f"line of {seen} bytes exceeds the {self._max}-byte limit; skipped"
        out.append(PipesBadLine(self._line_no, PipesMessageError(reason), head, size))

    def _line(self, line: bytes, out: list[PipesStdioRecord]) -> None:
        if self._stdio:
            if self._continuing_text or not _looks_like_message(line):
                out.append(PipesTextLine(self._line_no, line))
                return
        elif not line.strip():
            return
        try:
            message = parse_message(line, max_line_bytes=self._max)
            out.append(PipesLine(self._line_no, message, len(line), bytes(line)))
        except PipesMessageError as e:
            out.append(PipesBadLine(self._line_no, e, line[:BAD_LINE_HEAD_BYTES], len(line)))


def _looks_like_message(line: bytes | bytearray) -> bool:
    return line.lstrip()[:1] == b"{" and _MESSAGE_MARKER in line


# ------------------------------------------------------------------------------------------ channels


class PipesMessageChannel(ABC):
    """Where an external process's messages arrive: its bootstrap params, and cleanup."""

    @property
    @abstractmethod
    def params(self) -> dict[str, Any]:
        """The messages params to hand the external process (``DAGSTER_PIPES_MESSAGES``)."""

    @abstractmethod
    def close(self) -> None:
        """Release what the channel holds; idempotent."""


class PipesStdioSplitter(PipesMessageChannel):
    """The ``stdio`` channel: feed it a child's stderr (or stdout) bytes to get messages and text."""

    def __init__(self, *, stream: Literal["stderr", "stdout"] = "stderr", max_line_bytes: int = MAX_LINE_BYTES) -> None:
        if stream not in ("stderr", "stdout"):
            raise PipesBootstrapError(f"Pipes stdio stream must be 'stderr' or 'stdout', got {stream!r}")
        self.stream = stream
        self._splitter = PipesLineSplitter(max_line_bytes=max_line_bytes, stdio=True)

    @property
    def params(self) -> dict[str, Any]:
        return {"stdio": self.stream}

    def feed(self, data: bytes) -> list[PipesStdioRecord]:
        """Consume a chunk of the stream; return the records of the lines it completed."""
        return self._splitter.feed(data)

    def end(self) -> list[PipesStdioRecord]:
        """The stream ended: return the record of its unterminated last line, if any."""
        return self._splitter.end()

    def split_lines(self, lines: Iterable[bytes]) -> list[PipesStdioRecord]:
        """Classify whole lines (with or without their newlines), then end the stream."""
        out: list[PipesStdioRecord] = []
        for line in lines:
            out += self.feed(line if line.endswith(b"\n") else line + b"\n")
        return out + self.end()

    def close(self) -> None:
        pass
