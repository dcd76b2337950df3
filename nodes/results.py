"""What a pipeline run comes to, on the client's side: each stage's result, the exit code, the joblog.

Exit codes (the ``dpipes`` command documents them):

* the last stage's status (its exit code, or 128 + signal), or with ``pipefail`` the last non-zero
  one, leaving out stages their reader killed because it finished early (as ``head``);
* ``EXIT_DPIPES_FAILED`` (125) when dpipes itself failed: a refusal, a lost node, a bus error,
  a stage whose data could not be moved (output that is not objects in an object mode);
* ``EXIT_INTERRUPTED`` (130) after Ctrl-C cancelled every stage.
"""

from __future__ import annotations

import dataclasses
import shlex

from dpipes.bus.errors import DpipesError
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


@dataclasses.dataclass
class StageResult:
    index: int
    node: str
    argv: list[str]
    code: int = -1
    signal: int = 0
    status: str = "did not report"
    sigpipe: bool = False
    error: str = ""  # what went wrong moving its data (the output is then incomplete)
    cancelled: str = ""  # why it was cancelled (Ctrl-C, a failed neighbour, a lost node, ...)
    stderr_tail: str = ""
    reported: bool = False
    pipes: PipesMessageHandler = dataclasses.field(default_factory=PipesMessageHandler)  # what it reported
    started: float = 0.0  # wall clock on its node when its program started; 0: unknown
    ended: float = 0.0  # ... and when it exited
    bytes_in: int = -1  # bytes its node wrote to its stdin; -1: not seen (a kernel pipe), or unknown
    bytes_out: int = -1  # bytes its node read from its stdout
    placed: str = ""  # why it went to its node: pinned, offered, local ("" from an older node)
    offer: str = ""  # the node's offer it matched, when offered

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
        return [str(m.get("asset_key") or "(default asset)") for m in self.pipes.materializations]

    @property
    def checks(self) -> list[str]:
        """The asset checks it reported, as ``name: passed`` / ``name: failed (SEVERITY)``."""
        return [
            f"{c.get('check_name')}: " + ("passed" if c.get("passed") else f"failed ({c.get('severity', 'ERROR')})")
            for c in self.pipes.checks
        ]

    @property
    def pipes_exception(self) -> str:
        """The exception its Pipes session closed with, or ""."""
        exc = self.pipes.exception
        return str(exc) if exc is not None else ""

    @property
    def pipes_errors(self) -> int:
        """Lines it wrote that were not valid Pipes messages."""
        return len(self.pipes.frame_errors)

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


@dataclasses.dataclass
class RunResult:
    pipeline: str
    stages: list[StageResult]
    exit_code: int
    error: str = ""


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
