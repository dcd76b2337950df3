"""Plugin progress for a person: the provider's progress messages picked out of PIPES frames and drawn."""

from __future__ import annotations

import io
import json

from dpipes.nodes.plugins.provider import log_message, progress_message
from dpipes.nodes.progress_view import ProgressView, progress_of


def frame(message: object) -> bytes:
    return json.dumps({"message": message}).encode()  # as a node (or a plugin worker) sends it


def test_progress_is_read_from_the_providers_own_message() -> None:
    assert progress_of(frame(progress_message(0.25))) == 0.25
    assert progress_of(frame(progress_message(1.0))) == 1.0


def test_other_messages_and_malformed_frames_are_not_progress() -> None:
    assert progress_of(frame(log_message("INFO", "hello"))) is None
    custom = {"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": 0.5}}
    assert progress_of(frame(custom)) is None
    assert progress_of(b"not json") is None
    assert progress_of(json.dumps({"error": "bad line", "line": 3}).encode()) is None
    wild = progress_message(0.5)
    wild["params"]["payload"]["fraction"] = float("nan")
    assert progress_of(frame(wild)) is None


def test_one_bar_per_stage_shows_the_latest_fraction() -> None:
    out = io.StringIO()
    with ProgressView(out, force_terminal=True) as view:
        view.update(1, "stage 1 %passthrough@beta", 0.1)
        view.update(1, "stage 1 %passthrough@beta", 0.5)
        view.update(3, "stage 3 %summarize@alpha", 1.0)
        shown = view.render()
    assert "stage 1 %passthrough@beta" in shown and "50%" in shown and "10%" not in shown
    assert "stage 3 %summarize@alpha" in shown and "100%" in shown
