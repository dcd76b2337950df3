"""Plugin progress on a person's terminal: ``io.update_progress`` as one ``rich`` bar per stage.

A plugin's ``provider.io.update_progress(fraction)`` reaches the client as a Pipes
``report_custom_message`` whose payload is ``{"type": "dpipes.progress", "fraction": F}``
(:mod:`dpipes.nodes.plugins.provider`). ``dpipes`` shows it only when its stderr is a terminal:
:func:`progress_of` picks those messages out of the PIPES frames as they arrive, and
:class:`ProgressView` keeps one bar per stage, redrawn in place on stderr and removed at the end
(the stages' own stderr keeps its place above it). A newer fraction replaces an older one: the
view draws the latest state at its own rate, never a queue of updates.
"""

from __future__ import annotations

import json
import logging
import math
from typing import IO, Any, Final

log = logging.getLogger(__name__)

__all__ = ["PROGRESS_TYPE", "REFRESH_PER_S", "ProgressView", "progress_of"]

PROGRESS_TYPE: Final = "dpipes.progress"  # the custom message's payload type (the provider's PROGRESS_MESSAGE_TYPE)
REFRESH_PER_S: Final = 8.0  # redraws per second: smooth for a person, nothing for the terminal


def progress_of(frame: bytes) -> float | None:
    """The fraction a PIPES frame (``{"message": ...}``) reports, or None if it is no progress message."""
    try:
        item = json.loads(frame)
    except ValueError:
        return None
    message = item.get("message") if isinstance(item, dict) else None
    if not isinstance(message, dict) or message.get("method") != "report_custom_message":
        return None
    params = message.get("params")
    payload = params.get("payload") if isinstance(params, dict) else None
    if not isinstance(payload, dict) or payload.get("type") != PROGRESS_TYPE:
        return None
    fraction = payload.get("fraction")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not math.isfinite(fraction):
        return None
    return min(max(float(fraction), 0.0), 1.0)


class ProgressView:
    """One bar per stage that reports progress, drawn on ``file`` (a terminal) with ``rich``.

    Use as a context manager; :meth:`update` from the loop as messages arrive.
    """

    def __init__(self, file: IO[str], *, force_terminal: bool | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        self._console = Console(file=file, force_terminal=force_terminal)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            console=self._console,
            transient=True,
            refresh_per_second=REFRESH_PER_S,
        )
        self._tasks: dict[int, Any] = {}

    def __enter__(self) -> ProgressView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, stage: int, label: str, fraction: float) -> None:
        """Stage ``stage`` (shown as ``label``) is ``fraction`` done."""
        task = self._tasks.get(stage)
        if task is None:
            task = self._tasks[stage] = self._progress.add_task(label, total=1.0)
        self._progress.update(task, completed=fraction)

    def render(self) -> str:
        """The bars as text, as they are now (for tests and logs)."""
        with self._console.capture() as capture:
            self._console.print(self._progress.get_renderable())
        return capture.get()
