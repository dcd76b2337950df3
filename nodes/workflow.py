"""Runs as graphs: a workflow file's stages and connections, and a linear pipeline as the simple case.

The coordinator runs a :class:`Graph`: stages (programs or plugins), connections from an output
anchor of one stage to an input anchor of another, where the client's stdin goes in and where
the client's stdout comes from. ``dpipes 'a | %b | c'`` is :meth:`Graph.linear`: each stage's
``Output`` to the next one's ``Input``. A program has one input and one output (its stdin and
stdout); a plugin has the named anchors its connections use.

The workflow document
    ``dpipes --workflow flow.yaml`` (YAML, or TOML for ``*.toml``) sends the file's content, as a
    map, in ``run.workflow``; the entry node checks it here. Keys::

        stages:                       # a map: stage name -> stage, in the order they run
          gen:
            plugin: generate          # a plugin (entry point name) ...
            node: beta                # optional: pin it, as STAGE@NODE does
            config: {rows: 100}       # optional: its provider.tool_config, any JSON values
          split:
            plugin: split
            config: {expr: "n > 50"}
            outputs: [True, False]    # optional: anchors it writes that may stay unconnected
          join:
            plugin: join
            config: {on: n}
            inputs: [Right]           # optional: input anchors that may stay unconnected
          count:
            program: [wc, -l]         # ... or a program: argv as a list, or one string of shell words
        connections:                  # from STAGE.ANCHOR to STAGE.ANCHOR
          - {from: gen, to: split}    # the anchor may be left out: Output / Input
          - {from: split.True, to: count}
          - {from: split.False, to: join.Left}
        output: count                 # optional: whose output is dpipes' stdout (STAGE or STAGE.ANCHOR)
        input: gen                    # optional: where dpipes' stdin goes (STAGE or STAGE.ANCHOR)

    Stage names: 1-64 of ``[A-Za-z0-9_-]``. A program takes at most one connection in and sends
    its stdout to at most one place. ``output`` defaults to the one stage whose output is not
    connected (a program whose stdout is not connected, or a plugin with no outgoing
    connection); when there are several, name one: the stdout of the others is shown on dpipes'
    stderr, and a plugin's unconnected anchors are discarded. A plugin's ``True``/``False`` anchors
    may go to different stages; one anchor may go to several. An input anchor named in ``inputs``
    that no connection feeds is still the plugin's: it gets ``on_incoming_connection_complete``
    for it, with no data (an optional input, as Alteryx calls it). Connections may not form a cycle.
    Every error is a :class:`WorkflowError` naming the key at fault.

Stages are numbered in the document's order, except that the output stage is numbered last and
the input stage (with stdin) first: a client takes the last stage's output as its stdout and
feeds its stdin to the first, as in a pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import Any, Final

from dpipes.bus.errors import DpipesError
from dpipes.nodes.pipeline import PLUGIN_NAME_RE, PLUGIN_SIGIL, StageSpec, check_node_name
from dpipes.nodes.protocol import PluginInput, PluginOutput

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_INPUT",
    "DEFAULT_OUTPUT",
    "Connection",
    "Graph",
    "WorkflowError",
    "load_workflow",
    "parse_workflow",
]

DEFAULT_INPUT: Final = "Input"  # the anchor of a linear pipeline's input, and of a connection that names none
DEFAULT_OUTPUT: Final = "Output"
MAX_WORKFLOW_FILE_BYTES: Final = 1024 * 1024  # a workflow is a page of YAML; the run request is 64 KiB anyway
MAX_WORKFLOW_STAGES: Final = 1024  # the protocol's list bound; the node's max_stages applies as well
_STAGE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_ANCHOR_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .-]{0,63}")


class WorkflowError(DpipesError, ValueError):
    """A workflow document that cannot run; the message names the key and what to write."""


@dataclasses.dataclass(frozen=True, slots=True)
class Connection:
    """Output anchor ``src_anchor`` of stage ``src`` to input anchor ``dst_anchor`` of stage ``dst``."""

    src: int
    src_anchor: str
    dst: int
    dst_anchor: str


@dataclasses.dataclass(frozen=True)
class Graph:
    """What the coordinator runs: stages, connections, and the client's ends.

    ``stdin_to`` is the (stage, input anchor) the client's stdin feeds, if any; ``stdout_from``
    the (stage, output anchor) whose data is the client's stdout; ``extra_outputs`` and
    ``extra_inputs`` a plugin stage's declared anchors that may stay unconnected; ``configs`` each stage's plugin
    configuration (empty for a program).
    """

    stages: list[StageSpec]
    connections: list[Connection]
    configs: list[dict[str, Any]]
    stdin_to: tuple[int, str] | None
    stdout_from: tuple[int, str] | None
    extra_outputs: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    extra_inputs: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    linear: bool = False

    @classmethod
    def from_pipeline(cls, stages: Sequence[StageSpec], *, stdin: bool) -> Graph:
        """A linear pipeline: stage ``i``'s ``Output`` to stage ``i + 1``'s ``Input``."""
        last = len(stages) - 1
        return cls(
            stages=list(stages),
            connections=[Connection(i, DEFAULT_OUTPUT, i + 1, DEFAULT_INPUT) for i in range(last)],
            configs=[s.config for s in stages],
            stdin_to=(0, DEFAULT_INPUT) if stdin else None,
            stdout_from=(last, DEFAULT_OUTPUT),
            linear=True,
        )

    def is_plugin(self, i: int) -> bool:
        return self.stages[i].program.startswith(PLUGIN_SIGIL)

    def neighbours(self, i: int) -> list[int]:
        """The stages that exchange data with stage ``i``, and ``i`` itself."""
        out = {i}
        for c in self.connections:
            if c.src == i:
                out.add(c.dst)
            elif c.dst == i:
                out.add(c.src)
        return sorted(out)

    def program_edges(self, i: int, addrs: Sequence[str], client: str) -> tuple[str, str]:
        """A program stage's ``(stdin_from, stdout_to)``: a stage address, the client's, or "" (no input)."""
        into = [c for c in self.connections if c.dst == i]
        out = [c for c in self.connections if c.src == i]
        stdin_from = addrs[into[0].src] if into else (client if self.stdin_to and self.stdin_to[0] == i else "")
        stdout_to = addrs[out[0].dst] if out else client  # the output, or shown on the client's stderr
        return stdin_from, stdout_to

    def plugin_edges(
        self, i: int, addrs: Sequence[str], client: str, *, edge_format: str
    ) -> tuple[tuple[PluginInput, ...], tuple[PluginOutput, ...]]:
        """A plugin stage's input connections and output destinations.

        ``edge_format`` is what a program's bytes are at an edge with a plugin (``csv``,
        ``ndjson``, ``arrow``); between two plugins, ``batches``.
        """
        inputs: list[PluginInput] = []
        numbers: dict[str, int] = {}

        def connection(anchor: str) -> str:
            numbers[anchor] = numbers.get(anchor, 0) + 1
            return f"#{numbers[anchor]}"

        if self.stdin_to is not None and self.stdin_to[0] == i:
            anchor = self.stdin_to[1]
            inputs.append(PluginInput(anchor=anchor, connection=connection(anchor), src=client, format=edge_format))
        for c in self.connections:
            if c.dst == i:
                plugin = self.is_plugin(c.src)
                inputs.append(
                    PluginInput(
                        anchor=c.dst_anchor,
                        connection=connection(c.dst_anchor),
                        src=addrs[c.src],
                        src_anchor=c.src_anchor if plugin else "",
                        format="batches" if plugin else edge_format,
                    )
                )
        fed = {i.anchor for i in inputs}
        for anchor in self.extra_inputs.get(i, ()):
            if anchor not in fed:  # optional and unconnected: complete at once, without data
                inputs.append(PluginInput(anchor=anchor, connection=connection(anchor), src="", format="batches"))
        outputs: list[PluginOutput] = []
        for c in self.connections:
            if c.src == i:
                plugin = self.is_plugin(c.dst)
                fmt = "batches" if plugin else edge_format
                outputs.append(PluginOutput(anchor=c.src_anchor, dst=addrs[c.dst], dst_anchor=c.dst_anchor, format=fmt))
        if self.stdout_from is not None and self.stdout_from[0] == i:
            outputs.append(PluginOutput(anchor=self.stdout_from[1], dst=client, format=edge_format))
        connected = {o.anchor for o in outputs}
        for anchor in self.extra_outputs.get(i, ()):
            if anchor not in connected:
                outputs.append(PluginOutput(anchor=anchor, dst="", format="batches"))
        return tuple(inputs), tuple(outputs)


# -- the workflow document -------------------------------------------------------------------------


def _fail(key: str, problem: str) -> WorkflowError:
    return WorkflowError(f"workflow: {key}: {problem}")


def _endpoint(text: Any, key: str, names: Mapping[str, int], default_anchor: str) -> tuple[int, str]:
    """``STAGE`` or ``STAGE.ANCHOR`` to (stage index in document order, anchor)."""
    if not isinstance(text, str) or not text:
        raise _fail(key, f"must be STAGE or STAGE.ANCHOR, got {text!r:.60}")
    stage, dot, anchor = text.partition(".")
    if stage not in names:
        known = ", ".join(names) or "none"
        raise _fail(key, f"no stage named {stage!r:.60} (stages: {known})")
    anchor = anchor if dot else default_anchor
    if not _ANCHOR_RE.fullmatch(anchor):
        raise _fail(key, f"bad anchor name {anchor!r:.60}")
    return names[stage], anchor


def _argv(stage: Mapping[str, Any], key: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    has_program, has_plugin = "program" in stage, "plugin" in stage
    if has_program == has_plugin:
        raise _fail(key, "give either program (argv) or plugin (a name)")
    if has_plugin:
        name = stage["plugin"]
        if not isinstance(name, str) or not PLUGIN_NAME_RE.fullmatch(name):
            raise _fail(f"{key}.plugin", f"must be a plugin name (letters, digits, _ . -), got {name!r:.60}")
        config = stage.get("config", {})
        if not isinstance(config, dict) or any(not isinstance(k, str) for k in config):
            raise _fail(f"{key}.config", "must be a map with string keys")
        return (PLUGIN_SIGIL + name,), dict(config)
    if "config" in stage:
        raise _fail(f"{key}.config", "only a plugin takes config; give a program its arguments in program")
    program = stage["program"]
    if isinstance(program, str):
        try:
            argv = tuple(shlex.split(program))
        except ValueError as exc:
            raise _fail(f"{key}.program", f"does not split into words: {exc}") from None
    elif isinstance(program, list) and all(isinstance(w, str) for w in program):
        argv = tuple(program)
    else:
        raise _fail(f"{key}.program", "must be a list of words or one string of shell words")
    if not argv or not argv[0]:
        raise _fail(f"{key}.program", "names no program")
    if argv[0].startswith(PLUGIN_SIGIL):
        raise _fail(f"{key}.program", f"{argv[0]!r:.60} starts with {PLUGIN_SIGIL!r}: use plugin: NAME for a plugin")
    return argv, {}


def parse_workflow(doc: Any, *, stdin: bool) -> Graph:
    """The graph a workflow document describes (see the module docstring).

    Args:
        doc: the parsed document (a map).
        stdin: the client streams its stdin (it goes to ``input``, when the document names one).

    Raises:
        WorkflowError: naming the key at fault.
    """
    if not isinstance(doc, dict):
        raise _fail("(document)", "must be a map with stages and connections")
    if unknown := sorted(set(doc) - {"stages", "connections", "output", "input", "name"}):
        raise _fail(unknown[0], "unknown key (known: stages, connections, output, input, name)")
    raw_stages = doc.get("stages")
    if not isinstance(raw_stages, dict) or not raw_stages:
        raise _fail("stages", "must be a map of stage name -> stage, with at least one stage")
    if len(raw_stages) > MAX_WORKFLOW_STAGES:
        raise _fail("stages", f"has {len(raw_stages)} stages (limit {MAX_WORKFLOW_STAGES})")
    names: dict[str, int] = {}
    argvs: list[tuple[str, ...]] = []
    configs: list[dict[str, Any]] = []
    pins: list[str | None] = []
    extra: dict[int, tuple[str, ...]] = {}
    extra_in: dict[int, tuple[str, ...]] = {}
    for name, stage in raw_stages.items():
        key = f"stages.{name}"
        if not isinstance(name, str) or not _STAGE_NAME_RE.fullmatch(name):
            raise _fail(key, "a stage name is 1-64 letters, digits, _ and -")
        if not isinstance(stage, dict):
            raise _fail(key, "must be a map (program or plugin, node, config)")
        if unknown := sorted(set(stage) - {"program", "plugin", "node", "config", "inputs", "outputs"}):
            raise _fail(f"{key}.{unknown[0]}", "unknown key (known: program, plugin, node, config, inputs, outputs)")
        argv, config = _argv(stage, key)
        node = stage.get("node")
        if node is not None:
            problem = check_node_name(node) if isinstance(node, str) else "must be a node name"
            if problem is not None:
                raise _fail(f"{key}.node", problem)
        outputs = _anchor_list(stage, "outputs", key, plugin=argv[0].startswith(PLUGIN_SIGIL))
        inputs = _anchor_list(stage, "inputs", key, plugin=argv[0].startswith(PLUGIN_SIGIL))
        index = len(argvs)
        names[name] = index
        argvs.append(argv)
        configs.append(config)
        pins.append(node)
        if outputs:
            extra[index] = outputs
        if inputs:
            extra_in[index] = inputs
    connections = _connections(doc.get("connections", []), names)
    _check_programs(connections, argvs, list(names))
    _check_acyclic(connections, list(names))
    unconnected = [i for i in range(len(argvs)) if not any(c.src == i for c in connections)]
    if "output" in doc:
        out = _endpoint(doc["output"], "output", names, DEFAULT_OUTPUT)
        if not argvs[out[0]][0].startswith(PLUGIN_SIGIL) and any(c.src == out[0] for c in connections):
            raise _fail("output", f"stage {list(names)[out[0]]}'s stdout is connected already")
    elif len(unconnected) == 1:
        out = (unconnected[0], DEFAULT_OUTPUT)
    else:
        listed = ", ".join(list(names)[i] for i in unconnected) or "none"
        raise _fail("output", f"say which stage's output is dpipes' stdout (unconnected outputs: {listed})")
    stdin_to = None
    if "input" in doc:
        stdin_to = _endpoint(doc["input"], "input", names, DEFAULT_INPUT)
        if not argvs[stdin_to[0]][0].startswith(PLUGIN_SIGIL) and any(c.dst == stdin_to[0] for c in connections):
            raise _fail("input", f"stage {list(names)[stdin_to[0]]}'s stdin is connected already")
    # Number the output stage last and the input stage first: a client reads the last stage's
    # output as its stdout and feeds its stdin to the first, as in a pipeline.
    first = [stdin_to[0]] if stdin_to is not None and stdin and stdin_to[0] != out[0] else []
    order = first + [i for i in range(len(argvs)) if i != out[0] and i not in first] + [out[0]]
    index_of = {old: new for new, old in enumerate(order)}
    stage_names = list(names)
    stages = [StageSpec(index_of[old], argvs[old], pins[old], stage_names[old]) for old in order]
    return Graph(
        stages=stages,
        connections=[Connection(index_of[c.src], c.src_anchor, index_of[c.dst], c.dst_anchor) for c in connections],
        configs=[configs[old] for old in order],
        stdin_to=(index_of[stdin_to[0]], stdin_to[1]) if stdin_to is not None and stdin else None,
        stdout_from=(index_of[out[0]], out[1]),
        extra_outputs={index_of[i]: anchors for i, anchors in extra.items()},
        extra_inputs={index_of[i]: anchors for i, anchors in extra_in.items()},
    )


def load_workflow(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A workflow file's document as JSON values (YAML, or TOML when the name ends in ``.toml``).

    Raises:
        OSError: the file cannot be read.
        WorkflowError: it does not parse, or holds more than ``MAX_WORKFLOW_FILE_BYTES``.
    """
    with open(path, "rb") as f:
        data = f.read(MAX_WORKFLOW_FILE_BYTES + 1)
    if len(data) > MAX_WORKFLOW_FILE_BYTES:
        raise WorkflowError(f"workflow {path}: larger than {MAX_WORKFLOW_FILE_BYTES} bytes")
    import tomllib

    import yaml

    try:
        doc: Any = tomllib.loads(data.decode()) if str(path).endswith(".toml") else yaml.safe_load(data)
    except (tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"workflow {path}: does not parse: {exc}") from None
    # Dates and other YAML/TOML values become text: the document travels as msgpack.
    result: dict[str, Any] = json.loads(json.dumps(doc, default=str))
    if not isinstance(result, dict):
        raise WorkflowError(f"workflow {path}: must be a map with stages and connections")
    return result


def _anchor_list(stage: Mapping[str, Any], which: str, key: str, *, plugin: bool) -> tuple[str, ...]:
    """A stage's ``inputs`` or ``outputs``: declared anchor names that may stay unconnected."""
    names = stage.get(which, [])
    if not isinstance(names, list) or not all(isinstance(a, str | bool) for a in names):
        raise _fail(f"{key}.{which}", "must be a list of anchor names")
    if names and not plugin:
        raise _fail(f"{key}.{which}", f"only a plugin has named {which[:-1]} anchors")
    out = tuple(str(a) for a in names)  # YAML reads an unquoted True as a boolean: the anchor is still "True"
    for anchor in out:
        if not _ANCHOR_RE.fullmatch(anchor):
            raise _fail(f"{key}.{which}", f"bad anchor name {anchor!r:.60}")
    return out


def _connections(raw: Any, names: Mapping[str, int]) -> list[Connection]:
    if not isinstance(raw, list):
        raise _fail("connections", "must be a list of {from: STAGE.ANCHOR, to: STAGE.ANCHOR}")
    out: list[Connection] = []
    for n, item in enumerate(raw):
        key = f"connections.{n}"
        if not isinstance(item, dict) or set(item) != {"from", "to"}:
            raise _fail(key, "must be {from: STAGE.ANCHOR, to: STAGE.ANCHOR}")
        src, src_anchor = _endpoint(item["from"], f"{key}.from", names, DEFAULT_OUTPUT)
        dst, dst_anchor = _endpoint(item["to"], f"{key}.to", names, DEFAULT_INPUT)
        if src == dst:
            raise _fail(key, "connects a stage to itself")
        connection = Connection(src, src_anchor, dst, dst_anchor)
        if connection in out:
            raise _fail(key, "is given twice")
        out.append(connection)
    return out


def _check_programs(connections: list[Connection], argvs: list[tuple[str, ...]], names: list[str]) -> None:
    for i, argv in enumerate(argvs):
        if argv[0].startswith(PLUGIN_SIGIL):
            continue
        if len([c for c in connections if c.dst == i]) > 1:
            raise _fail(f"stages.{names[i]}", "a program has one stdin: give it one connection in (join with a plugin)")
        if len([c for c in connections if c.src == i]) > 1:
            raise _fail(f"stages.{names[i]}", "a program has one stdout: connect it once (fan out with a plugin)")


def _check_acyclic(connections: list[Connection], names: list[str]) -> None:
    into = {i: {c.src for c in connections if c.dst == i} for i in range(len(names))}
    done: set[int] = set()
    while len(done) < len(names):
        ready = [i for i in range(len(names)) if i not in done and into[i] <= done]
        if not ready:
            cycle = ", ".join(names[i] for i in range(len(names)) if i not in done)
            raise _fail("connections", f"form a cycle through {cycle}")
        done.update(ready)
