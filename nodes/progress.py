"""A run's progress for a person at a terminal: per stage, bytes in and out, rate, state, time.

``dpipes --progress`` (on by default when stderr is a terminal) feeds a :class:`ProgressView` from
the run's ``progress`` and ``exit`` reports (:mod:`dpipes.nodes.protocol`); it draws a table with
``rich.live`` on stderr, redrawn a few times a second, and prints what the stages write to stderr
(and this command's output, when stdout is the same terminal) above it, so neither garbles the
other. It appears only once a run has lasted ``SHOW_AFTER_S``: a short command shows nothing to
watch. It is transient: at the end the table is removed, and ``--status`` or ``--joblog`` keep the
final record.

A plugin stage also says how far it is (``io.update_progress``: a Pipes custom message
``{"type": "dpipes.progress", "fraction": F}``, picked out by :func:`progress_of`): its state
shows the latest fraction as a percentage.

Bytes are what a stage's node moved through its stdin and stdout; an edge that is one kernel pipe
(neighbours on one node, a local stage writing straight to this command's stdout) passes by every
node and shows as ``·``, while its stage's state and time still show.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live

    from dpipes.nodes.run import StageResult

log = logging.getLogger(__name__)

SHOW_AFTER_S = 1.0  # a run shorter than this shows no table: it would only flash
REFRESH_PER_S = 4  # redraws per second: the elapsed time moves, reports come every 0.5 s at most
# Nodes report only counts that changed: no report for this long means nothing moved (twice the
# protocol's PROGRESS_INTERVAL_S, so one late report does not blank the rate).
RATE_STALE_S = 1.0

PLUGIN_PROGRESS_TYPE = "dpipes.progress"  # a plugin progress payload's type (the provider's PROGRESS_MESSAGE_TYPE)

__all__ = ["PLUGIN_PROGRESS_TYPE", "ProgressView", "progress_of"]


def progress_of(message: Mapping[str, Any]) -> float | None:
    """The fraction a Pipes message reports (a plugin's ``io.update_progress``), or None if it is no
    progress message."""
    if message.get("method") != "report_custom_message":
        return None
    params = message.get("params")
    payload = params.get("payload") if isinstance(params, dict) else None
    if not isinstance(payload, dict) or payload.get("type") != PLUGIN_PROGRESS_TYPE:
        return None
    fraction = payload.get("fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not math.isfinite(fraction):
        return None
    return min(max(float(fraction), 0.0), 1.0)


class _Row:
    """What the view knows of one stage."""

    def __init__(self, stage: StageResult, now: float) -> None:
        self.stage = stage
        self.bytes_in = -1
        self.bytes_out = -1
        self.rate = 0.0  # bytes out per second, between the last two reports
        self.since = now
        self.last: tuple[float, int] | None = None  # (when, bytes_out) of the last report
        self.ended: float | None = None
        self.fraction: float | None = None  # how far a plugin says it is (io.update_progress)


class ProgressView:
    """A live table of a run's stages on a console (stderr).

    Args:
        console: where to draw (``rich.console.Console(file=sys.stderr)``); a console that is not
            a terminal gets no live table, only the text written through :meth:`write`.
        show_after_s: how long a run goes before the table appears (tests: 0).
    """

    def __init__(self, console: Console, *, show_after_s: float = SHOW_AFTER_S) -> None:
        self.console = console
        self.show_after_s = show_after_s
        self._rows: list[_Row] = []
        self._started = time.monotonic()
        self._live: Live | None = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # the redraw runs in rich's thread; reports come in the loop's
        self._stopped = False

    @classmethod
    def on(cls, file: IO[str], **kwargs: Any) -> ProgressView:
        """A view drawing on ``file`` (a terminal) with rich's defaults for it."""
        from rich.console import Console

        return cls(Console(file=file, stderr=True), **kwargs)

    def start(self, stages: Sequence[StageResult]) -> None:
        """The run has started with these stages: the table appears after ``show_after_s``."""
        now = time.monotonic()
        with self._lock:
            self._rows = [_Row(s, now) for s in stages]
        if not self.console.is_terminal:
            return
        if self.show_after_s <= 0:
            self._show()
            return
        self._timer = threading.Timer(self.show_after_s, self._show)
        self._timer.daemon = True
        self._timer.start()

    def _show(self) -> None:
        from rich.live import Live

        live = Live(
            get_renderable=self.render,
            console=self.console,
            refresh_per_second=REFRESH_PER_S,
            transient=True,
            redirect_stdout=False,  # our data goes by file descriptors, through write() here
            redirect_stderr=False,
        )
        with self._lock:
            if self._live is not None or self._stopped:
                return
            self._live = live
        # Not under the lock: starting draws at once, and drawing (render) takes the lock.
        live.start()

    def update(self, index: int, bytes_in: int, bytes_out: int) -> None:
        """A ``progress`` report of stage ``index``."""
        if not 0 <= index < len(self._rows):
            return
        now = time.monotonic()
        with self._lock:
            row = self._rows[index]
            row.bytes_in, row.bytes_out = bytes_in, bytes_out
            if row.last is not None and bytes_out >= 0 and now > row.last[0]:
                row.rate = (bytes_out - row.last[1]) / (now - row.last[0])
            row.last = (now, bytes_out)

    def fraction(self, index: int, fraction: float) -> None:
        """Plugin stage ``index`` says it is ``fraction`` done (a newer fraction replaces an older one)."""
        if not 0 <= index < len(self._rows):
            return
        with self._lock:
            self._rows[index].fraction = fraction

    def exited(self, stage: StageResult) -> None:
        """Stage ``stage`` reported its exit (its final counts are in it)."""
        if not 0 <= stage.index < len(self._rows):
            return
        with self._lock:
            row = self._rows[stage.index]
            row.ended = time.monotonic()
            row.bytes_in, row.bytes_out, row.rate = stage.bytes_in, stage.bytes_out, 0.0

    def write(self, data: bytes) -> None:
        """Text for the terminal (stages' stderr, output): printed above the table."""
        text = bytes(data).decode(errors="replace")
        live = self._live
        if live is not None:
            live.console.print(text, end="", markup=False, highlight=False, soft_wrap=True)
        else:
            self.console.file.write(text)
            self.console.file.flush()

    def stop(self) -> None:
        """The run is over: remove the table."""
        with self._lock:
            self._stopped = True
            timer, self._timer = self._timer, None
            live, self._live = self._live, None
        if timer is not None:
            timer.cancel()
        if live is not None:
            live.stop()

    def render(self) -> Any:
        """The table as it is now (rich renderable)."""
        from rich.filesize import decimal
        from rich.table import Table

        now = time.monotonic()
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name, justify in (("stage", "right"), ("program", "left"), ("in", "right"), ("out", "right")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        table.add_column("rate", justify="right")
        table.add_column("state", justify="left")
        table.add_column("time", justify="right")
        with self._lock:
            rows = list(self._rows)
            for row in rows:
                s = row.stage
                moving = row.ended is None and row.last is not None and now - row.last[0] < RATE_STALE_S
                rate = f"{decimal(int(row.rate))}/s" if moving and row.rate > 0 else ""
                state = s.status if row.ended is not None else "running"
                if row.ended is None and row.fraction is not None:
                    state += f" {row.fraction:.0%}"
                ran = (row.ended if row.ended is not None else now) - row.since
                table.add_row(
                    str(s.index),
                    f"{s.argv[0] if s.argv else '?'}@{s.node}",
                    decimal(row.bytes_in) if row.bytes_in >= 0 else "·",
                    decimal(row.bytes_out) if row.bytes_out >= 0 else "·",
                    rate,
                    state,
                    _clock(ran),
                )
        table.title = f"dpipes: {len(rows)} stage(s), {_clock(now - self._started)}"
        table.title_justify = "left"
        return table


def _clock(seconds: float) -> str:
    whole = int(max(0.0, seconds))
    return (
        f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"
        if whole >= 3600
        else f"{whole // 60}:{whole % 60:02d}"
    )
