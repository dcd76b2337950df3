"""Message rates and bandwidth over a window, as ``ros2 topic hz``/``bw`` report them.

A :class:`Window` keeps the times and sizes of the last N messages it was shown (their hub's
clock, from the tap events) and says, for ``hz``, the average rate with the min, max and standard
deviation of the intervals between messages, and for ``bw`` the average bytes per second with the
mean, min and max message size. Plain arithmetic, no clock of its own: testable without sockets.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 10_000  # messages a rate is computed over (ros2 topic hz's default)
RATE_KINDS = frozenset({"BYTES", "OBJECTS", "ARROW", "STDERR", "PIPES", "REQUEST"})
"""What ``hz``/``bw`` count: data messages and requests (not credits, acks or replies)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Hz:
    """Rate of the messages in a window: per second, and the intervals between them in seconds."""

    messages: int
    rate: float
    min_s: float
    max_s: float
    std_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class Bw:
    """Bandwidth of the messages in a window: bytes per second, and message sizes in bytes."""

    messages: int
    bytes_per_s: float
    mean: float
    min: int
    max: int


class Window:
    """The last ``size`` messages: their times and payload sizes."""

    def __init__(self, size: int = DEFAULT_WINDOW) -> None:
        if size < 2:
            raise ValueError(f"a window of {size} messages has no interval: use at least 2")
        self._times: collections.deque[float] = collections.deque(maxlen=size)
        self._sizes: collections.deque[int] = collections.deque(maxlen=size)
        self.total = 0

    def add(self, t: float, size: int) -> None:
        """One message, at time ``t`` (seconds), of ``size`` payload bytes."""
        self._times.append(t)
        self._sizes.append(size)
        self.total += 1

    def hz(self) -> Hz | None:
        """The rate over the window; None with fewer than two messages."""
        times = self._times
        if len(times) < 2:
            return None
        intervals = [b - a for a, b in zip(times, list(times)[1:], strict=False)]
        span = times[-1] - times[0]
        mean = span / len(intervals)
        std = math.sqrt(sum((i - mean) ** 2 for i in intervals) / len(intervals))
        return Hz(len(times), len(intervals) / span if span > 0 else math.inf, min(intervals), max(intervals), std)

    def bw(self) -> Bw | None:
        """The bandwidth over the window; None with fewer than two messages."""
        times, sizes = self._times, self._sizes
        if len(times) < 2:
            return None
        span = times[-1] - times[0]
        carried = sum(sizes) - sizes[0]  # bytes that arrived within the span
        return Bw(len(sizes), carried / span if span > 0 else math.inf, sum(sizes) / len(sizes), min(sizes), max(sizes))


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def hz_text(what: str, hz: Hz | None) -> str:
    """One ``hz`` report line."""
    if hz is None:
        return f"{what}: no messages yet"
    return (
        f"{what}: average rate: {hz.rate:.3f} msgs/s  min: {hz.min_s:.6f} s  max: {hz.max_s:.6f} s  "
        f"std dev: {hz.std_s:.6f} s  window: {hz.messages}"
    )


def bw_text(what: str, bw: Bw | None) -> str:
    """One ``bw`` report line."""
    if bw is None:
        return f"{what}: no messages yet"
    return (
        f"{what}: average: {human_bytes(bw.bytes_per_s)}/s  mean: {human_bytes(bw.mean)}  "
        f"min: {human_bytes(bw.min)}  max: {human_bytes(bw.max)}  window: {bw.messages}"
    )
