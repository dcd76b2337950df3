"""The Pipes options of a run, per pipeline and per stage: plain data, cheap to import.

``dpipes`` sends them in the ``run`` request's ``pipes`` map (``extras``, ``assets``,
``partition``, ``context``, ``messages``, and under ``stages`` a stage number's own); the entry
node checks them and gives each stage its merged options in the ``start`` request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dpipes.bus.errors import StageError

CONTEXT_INJECTORS = ("env", "file")
MESSAGE_CHANNELS = ("file", "stderr", "stdout")
STAGE_KEYS = ("extras", "assets", "partition", "context", "messages")


def options_for_stage(options: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The Pipes options of stage ``index``: the pipeline's, with that stage's own on top.

    ``options["stages"]`` maps a stage number (as a string: it travels as a map key) to options of
    the same keys. A stage's ``extras`` are merged key by key over the pipeline's; its ``assets``,
    ``partition``, ``context`` and ``messages`` replace the pipeline's.
    """
    merged = {k: v for k, v in options.items() if k != "stages"}
    own = (options.get("stages") or {}).get(str(index)) or {}
    for key, value in own.items():
        if key == "extras":
            merged["extras"] = {**(merged.get("extras") or {}), **value}
        elif value is not None and value != []:
            merged[key] = value
    return merged


def split_stage_selector(text: str) -> tuple[int | None, str]:
    """``"2:orders"`` -> ``(2, "orders")``; ``"*:12:30"`` or ``"orders"`` -> ``(None, ...)`` (every stage).

    The ``N:`` prefix of the ``dpipes`` Pipes flags: N is a stage number, 0-based as ``--status``
    shows them. ``*:`` says "every stage" explicitly, for a value that itself starts with digits
    and a colon.
    """
    head, sep, rest = text.partition(":")
    if sep and head == "*":
        return None, rest
    if sep and head.isdigit():
        return int(head), rest
    return None, text


def check_stage_options(options: Mapping[str, Any], stage_count: int) -> None:
    """Refuse per-stage Pipes options that name no stage of the pipeline, or an unknown key.

    Raises:
        StageError: naming the stage number and how many stages there are.
    """
    stages = options.get("stages") or {}
    if not isinstance(stages, Mapping):
        raise StageError("per-stage Pipes options must be a map of stage number -> options")
    for key, own in stages.items():
        if not str(key).isdigit() or int(key) >= stage_count:
            raise StageError(
                f"Pipes options for stage {key}: the pipeline has {stage_count} stage(s), numbered 0-{stage_count - 1}"
            )
        unknown = set(own or {}) - set(STAGE_KEYS)
        if unknown:
            raise StageError(f"Pipes options for stage {key}: unknown {', '.join(sorted(unknown))}")
