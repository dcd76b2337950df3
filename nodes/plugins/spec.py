"""What a plugin worker runs, as its node hands it over: :class:`WorkerSpec`, JSON on the worker's stdin.

Kept apart from :mod:`dpipes.nodes.plugins.worker` so that the node builds it without importing
pyarrow.

Direct edges
    A plugin stage of a linear pipeline whose neighbour runs on the same node (a program or another
    plugin), or whose node holds the local client's own stdin or stdout, exchanges its data through
    a kernel pipe (or that descriptor) rather than the hub: ``start``'s ``direct_in`` /
    ``direct_out``. The node gives the worker its end of it: a worker forked for the stage gets it
    at fork under the same number (``input_fd`` / ``output_fd`` name it); a worker started ahead
    of need gets it over its *descriptor socket* (``--fd-socket=N`` on its command line: a Unix
    socket the node keeps the other end of), as ``SCM_RIGHTS`` in one message sent before the
    spec, the input's first, and the spec says ``FD_SENT`` for each. The worker reads and writes
    such an edge with pyarrow's own readers and writers in the edge's format (``batches``
    between two plugins: an Arrow IPC stream), see :mod:`dpipes.nodes.plugins.direct`.
    The node keeps a copy of a direct output's write end until the worker has exited: when the
    worker failed, the stage reading that pipe on the node is cancelled before it can see the
    end of its input and take a partial one for the whole.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any, Final

from dpipes.nodes.protocol import PluginInput, PluginOutput

log = logging.getLogger(__name__)

__all__ = ["FD_BUS", "FD_SENT", "FD_SOCKET_FLAG", "MAX_SPEC_BYTES", "POOLED_FLAG", "WorkerSpec"]

MAX_SPEC_BYTES: Final = 16 * 1024 * 1024  # the spec on stdin: a stage's config is small; this bounds a bad one
POOLED_FLAG: Final = "--pooled"  # a worker started ahead of need (dpipes.nodes.worker_pool): named dpipes-ready
FD_SOCKET_FLAG: Final = "--fd-socket"  # =N: a pooled worker's descriptor socket (see *Direct edges*)
FD_BUS: Final = -1  # input_fd/output_fd: the edge is a bus stream
FD_SENT: Final = -2  # input_fd/output_fd: the descriptor comes over the descriptor socket


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
    input_fd: int = FD_BUS  # a direct input edge (see *Direct edges*): its descriptor, or FD_SENT
    output_fd: int = FD_BUS  # a direct output edge, as input_fd
    temp_dir: str = ""  # the plugin's temp_dir, made and removed by the node (a killed worker leaves none)

    @property
    def direct_input(self) -> PluginInput | None:
        """The input connection read from ``input_fd`` (a direct edge's one connection); None when
        every input comes on the bus."""
        if self.input_fd < 0:
            return None
        return next((i for i in self.inputs if i.src), None)

    @property
    def direct(self) -> bool:
        """Whether an edge of this stage is direct (a descriptor, not a bus stream)."""
        return self.input_fd != FD_BUS or self.output_fd != FD_BUS

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
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        if missing := sorted(required - set(body)):
            raise ValueError(f"the worker spec lacks {', '.join(missing)}")
        body = {k: v for k, v in body.items() if k in fields}
        body["inputs"] = tuple(PluginInput.parse(i, what="worker spec") for i in body["inputs"])
        body["outputs"] = tuple(PluginOutput.parse(o, what="worker spec") for o in body["outputs"])
        for key in ("input_fd", "output_fd"):
            if not isinstance(body.get(key, FD_BUS), int) or body.get(key, FD_BUS) < FD_SENT:
                raise ValueError(f"the worker spec's {key} is not a descriptor")
        return cls(**body)
