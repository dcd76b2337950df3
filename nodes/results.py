"""What a pipeline run comes to, on the client's side: each stage's result, the exit code, the joblog.

Exit codes (the ``dpipes`` command documents them):

* the last stage's status (its exit code, or 128 + signal), or with ``pipefail`` the last non-zero
  one, leaving out stages their reader killed because it finished early (as ``head``);
* ``EXIT_DPIPES_FAILED`` (125) when dpipes itself failed: a refusal, a lost node, a bus error,
  a stage whose data could not be moved (output that is not objects in an object mode);
* ``EXIT_INTERRUPTED`` (130) after Ctrl-C cancelled every stage.
"""

from __future__ import annotations

import shlex

from dpipes.bus.errors import DpipesError

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
    from typing import Any

    from dpipes.nodes.pipes_frames import PipesMessageHandler

EXIT_DPIPES_FAILED = 125
EXIT_INTERRUPTED = 130


class RunFailed(DpipesError):
    """The pipeline could not run, or failed as a whole (refusal, lost node); the message says why.

    ``code`` is the entry node's error code (:mod:`dpipes.nodes.protocol`, *Errors*) when it
    answered with one, else "".
    """

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class _Record:
    """Equality and a repr over ``__slots__``, as a dataclass has them.

    The results are plain classes: the short client path (:mod:`dpipes.nodes.local_run`) imports
    this module, and :mod:`dataclasses` brings :mod:`inspect` and :mod:`ast` with it, a good part
    of what a start of ``dpipes`` spent importing.
    """

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq

    def __repr__(self) -> str:
        fields = ", ".join(f"{name.lstrip('_')}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{self.__class__.__qualname__}({fields})"


class StageResult(_Record):
    """What one stage came to, filled in as its node reports it.

    ``pipes`` holds what it reported over Dagster Pipes; it is made (and the Pipes frame decoder
    imported) only when a message arrives or someone asks for it.
    """

    __slots__ = (
        "_pipes",
        "argv",
        "bytes_in",
        "bytes_out",
        "cancelled",
        "code",
        "ended",
        "error",
        "index",
        "node",
        "offer",
        "placed",
        "reported",
        "signal",
        "sigpipe",
        "started",
        "status",
        "stderr_tail",
    )

    def __init__(
        self,
        index: int,
        node: str,
        argv: list[str],
        *,
        code: int = -1,
        signal: int = 0,
        status: str = "did not report",
        sigpipe: bool = False,
        error: str = "",
        cancelled: str = "",
        stderr_tail: str = "",
        reported: bool = False,
        started: float = 0.0,
        ended: float = 0.0,
        bytes_in: int = -1,
        bytes_out: int = -1,
        placed: str = "",
        offer: str = "",
    ) -> None:
        self.index = index
        self.node = node
        self.argv = argv
        self.code = code
        self.signal = signal
        self.status = status
        self.sigpipe = sigpipe
        self.error = error  # what went wrong moving its data (the output is then incomplete)
        self.cancelled = cancelled  # why it was cancelled (Ctrl-C, a failed neighbour, a lost node, ...)
        self.stderr_tail = stderr_tail
        self.reported = reported
        self._pipes: PipesMessageHandler | None = None  # what it reported over Pipes, once it did
        self.started = started  # wall clock on its node when its program started; 0: unknown
        self.ended = ended  # ... and when it exited
        self.bytes_in = bytes_in  # bytes its node wrote to its stdin; -1: not seen (a kernel pipe), or unknown
        self.bytes_out = bytes_out  # bytes its node read from its stdout
        self.placed = placed  # why it went to its node: pinned, offered, local ("" from an older node)
        self.offer = offer  # the node's offer it matched, when offered

    @property
    def pipes(self) -> PipesMessageHandler:
        """What this stage reported over Dagster Pipes (made on first use)."""
        if self._pipes is None:
            from dpipes.nodes.pipes_frames import PipesMessageHandler

            self._pipes = PipesMessageHandler()
        return self._pipes

    def placement(self) -> str:
        """Why this stage ran on its node, for a person ("" when the node did not say)."""
        program = self.argv[0] if self.argv else "?"
        if self.placed == "pinned":
            return "pinned"
        if self.placed == "offered":
            shown = f" as {self.offer!r}" if self.offer and self.offer != program else ""
            return f"offered by {self.node}{shown}"
        if self.placed == "local":
            return f"local: no node offers {program!r}" if "/" not in program else "local: a path here"
        return ""

    @property
    def shell_code(self) -> int:
        if not self.reported:
            return EXIT_DPIPES_FAILED
        return 128 + self.signal if self.signal else self.code

    def describe(self) -> str:
        text = f"stage {self.index} {self.argv[0] if self.argv else '?'}@{self.node}: {self.status}"
        if self.sigpipe and self.signal:
            text += " (its reader finished early)"
        if self.error and not self.sigpipe:
            text += f" ({self.error})"
        elif self.cancelled and not self.sigpipe:
            text += f" (cancelled: {self.cancelled})"
        if self.pipes_exception:
            text += f" (Pipes closed with {self.pipes_exception})"
        return text

    @property
    def materializations(self) -> list[str]:
        """The asset keys this stage reported materialized, in order."""
        if self._pipes is None:
            return []
        return [str(m.get("asset_key") or "(default asset)") for m in self._pipes.materializations]

    @property
    def checks(self) -> list[str]:
        """The asset checks it reported, as ``name: passed`` / ``name: failed (SEVERITY)``."""
        if self._pipes is None:
            return []
        return [
            f"{c.get('check_name')}: " + ("passed" if c.get("passed") else f"failed ({c.get('severity', 'ERROR')})")
            for c in self._pipes.checks
        ]

    @property
    def pipes_exception(self) -> str:
        """The exception its Pipes session closed with, or ""."""
        exc = self._pipes.exception if self._pipes is not None else None
        return str(exc) if exc is not None else ""

    @property
    def pipes_errors(self) -> int:
        """Lines it wrote that were not valid Pipes messages."""
        return len(self._pipes.frame_errors) if self._pipes is not None else 0

    def pipes_summary(self) -> str:
        """Materializations and checks this stage reported, or "" when none."""
        parts = []
        if self.materializations:
            parts.append(f"materialized {', '.join(self.materializations)}")
        if self.checks:
            parts.append(f"checks {', '.join(self.checks)}")
        if self.pipes_errors:
            parts.append(f"{self.pipes_errors} invalid Pipes line(s)")
        return "; ".join(parts)


class RunResult(_Record):
    """What a run came to: its pipeline as the entry node parsed it, each stage, the exit code."""

    __slots__ = ("error", "exit_code", "pipeline", "stages")

    def __init__(self, pipeline: str, stages: list[StageResult], exit_code: int, error: str = "") -> None:
        self.pipeline = pipeline
        self.stages = stages
        self.exit_code = exit_code
        self.error = error


def exit_code_of(stages: list[StageResult], *, pipefail: bool) -> int:
    """The pipeline's exit code from its stages, as a shell computes it.

    With ``pipefail``, a stage left out is only one its reader's early end *killed* (SIGPIPE, or
    our cancel of it): a stage that exited with a code of its own failed, whichever stage
    finished first (``false | true`` is 1, as in bash, even when ``true`` ended before ``false``
    had its EOF acknowledged).
    """
    if not stages:
        return 0
    if pipefail:
        for stage in reversed(stages):
            stopped_by_reader = stage.sigpipe and stage.signal != 0 and stage is not stages[-1]
            if stage.shell_code != 0 and not stopped_by_reader:
                return stage.shell_code
        return 0
    return stages[-1].shell_code


def run_exit_code(stages: list[StageResult], *, interrupted: bool, error: str, pipefail: bool) -> int:
    """The exit code of a run that started: Ctrl-C's, dpipes' own failure's, else its stages'.

    A stage whose data could not be moved (an ``error`` not caused by its reader's early end)
    fails the run as a lost node does: its output is not complete. A stage whose Pipes session
    failed fails the run whatever its exit code.
    """
    broken = [s for s in stages if s.error and not s.sigpipe]
    if interrupted:
        return EXIT_INTERRUPTED
    if error or broken:
        return EXIT_DPIPES_FAILED
    code = exit_code_of(stages, pipefail=pipefail)
    if code == 0 and any(s.pipes_exception for s in stages):
        return 1
    return code


JOBLOG_COLUMNS = ("Stage", "Node", "Starttime", "JobRuntime", "Send", "Receive", "Exitval", "Signal", "Command")
"""The joblog's header: GNU parallel's ``--joblog`` columns, with the stage (from 0) and its node
for parallel's ``Seq`` and ``Host``."""


def format_joblog(stages: list[StageResult]) -> str:
    """The run as a joblog: a header, then one tab-separated line per stage (``-`` where unknown).

    ``Starttime``: Unix seconds on the stage's node when its program started; ``JobRuntime``:
    seconds it ran; ``Send`` / ``Receive``: bytes its node wrote to its stdin / read from its
    stdout (``-`` for an edge that is a kernel pipe, which no node sees); ``Exitval``: its exit
    code (``-`` when it did not report, as a stage of a lost node); ``Signal``: what killed it, or
    0; ``Command``: its argv in shell words.
    """
    lines = ["\t".join(JOBLOG_COLUMNS)]
    for s in stages:
        known = s.reported and s.started > 0
        lines.append(
            "\t".join(
                (
                    str(s.index),
                    s.node,
                    f"{s.started:.3f}" if known else "-",
                    f"{max(0.0, s.ended - s.started):.3f}" if known and s.ended else "-",
                    str(s.bytes_in) if s.bytes_in >= 0 else "-",
                    str(s.bytes_out) if s.bytes_out >= 0 else "-",
                    str(s.code) if s.reported else "-",
                    str(s.signal),
                    shlex.join(s.argv).replace("\t", " ").replace("\n", " "),
                )
            )
        )
    return "\n".join(lines) + "\n"
