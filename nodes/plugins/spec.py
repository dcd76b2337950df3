"""What a plugin worker runs, as its node hands it over: :class:`WorkerSpec`, JSON on the worker's stdin.

Kept apart from :mod:`dpipes.nodes.plugins.worker` so that the node builds it without importing
pyarrow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Final

from dpipes.nodes.protocol import PluginInput, PluginOutput

log = logging.getLogger(__name__)

__all__ = ["MAX_SPEC_BYTES", "POOLED_FLAG", "WorkerSpec"]

MAX_SPEC_BYTES: Final = 16 * 1024 * 1024  # the spec on stdin: a stage's config is small; this bounds a bad one
POOLED_FLAG: Final = "--pooled"  # a worker started ahead of need (dpipes.nodes.worker_pool): named dpipes-ready


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What a worker runs and where its data goes; the node writes it to the worker's stdin as JSON."""

    hub: str
    name: str  # the stage's endpoint name on the hub: <pipeline>.<index>
    pipeline: str
    stage: int
    node: str
    plugin: str
    config: dict[str, Any]
    mode: str
    messages_to: str
    inputs: tuple[PluginInput, ...]
    outputs: tuple[PluginOutput, ...]
    callback_timeout_s: float | None
    window: int
    cwd: str  # where the stage runs: a worker started ahead of need enters it (as a forked one starts there)
    env: dict[str, str]  # the stage's own variables (DPIPES_*), added to the node's environment

    @property
    def describe(self) -> str:
        """``stage 1 (%filter@beta)``: how errors name this stage."""
        return f"stage {self.stage} (%{self.plugin}@{self.node})"

    def to_json(self) -> bytes:
        body = dataclasses.asdict(self)
        body["inputs"] = [i.to_body() for i in self.inputs]
        body["outputs"] = [o.to_body() for o in self.outputs]
        return json.dumps(body).encode()

    @classmethod
    def from_json(cls, data: bytes) -> WorkerSpec:
        """Raises ValueError (or a :class:`~dpipes.nodes.protocol.BadRequest`) on a malformed spec."""
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError("the worker spec is not a JSON object")
        fields = {f.name for f in dataclasses.fields(cls)}
        if missing := sorted(fields - set(body)):
            raise ValueError(f"the worker spec lacks {', '.join(missing)}")
        body = {k: v for k, v in body.items() if k in fields}
        body["inputs"] = tuple(PluginInput.parse(i, what="worker spec") for i in body["inputs"])
        body["outputs"] = tuple(PluginOutput.parse(o, what="worker spec") for o in body["outputs"])
        return cls(**body)
