"""Plugin progress for a person: the provider's progress messages picked out of PIPES frames and shown."""

from __future__ import annotations

import io
import json
from typing import Any

from rich.console import Console

from dpipes.nodes.pipes_frames import PipesFrameError, decode_frame
from dpipes.nodes.plugins.provider import log_message, progress_message
from dpipes.nodes.progress import ProgressView, progress_of
from dpipes.nodes.run import StageResult


def frame(message: object) -> Any:
    item = decode_frame(json.dumps(message).encode())  # as a node (or a plugin worker) sends it
    return {} if isinstance(item, PipesFrameError) else item  # what the client hands on: messages only


def test_progress_is_read_from_the_providers_own_message() -> None:
    assert progress_of(frame(progress_message(0.25))) == 0.25
    assert progress_of(frame(progress_message(1.0))) == 1.0


def test_other_messages_and_malformed_frames_are_not_progress() -> None:
    assert progress_of(frame(log_message("INFO", "hello"))) is None
    custom = {"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": 0.5}}
    assert progress_of(frame(custom)) is None
    assert progress_of({}) is None
    wild = progress_message(0.5)
    wild["params"]["payload"]["fraction"] = float("nan")
    assert progress_of(frame(wild)) is None


def test_a_plugin_stage_shows_its_latest_fraction_in_the_live_table() -> None:
    view = ProgressView(Console(file=io.StringIO(), force_terminal=True, width=100), show_after_s=0)
    view.start([StageResult(0, "alpha", ["%generate"]), StageResult(1, "beta", ["%passthrough"])])
    view.fraction(1, 0.1)
    view.fraction(1, 0.5)
    view.fraction(7, 0.9)  # no such stage: ignored
    out = io.StringIO()
    Console(file=out, force_terminal=True, width=100, color_system=None).print(view.render())
    view.stop()
    rows = out.getvalue().splitlines()
    assert any("%passthrough@beta" in row and "running 50%" in row for row in rows)
    assert any("%generate@alpha" in row and "%" not in row.replace("%generate", "") for row in rows)
