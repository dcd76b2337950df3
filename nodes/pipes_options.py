"""The Pipes options of a run, per pipeline and per stage: plain data, cheap to import.

``dpipes`` sends them in the ``run`` request's ``pipes`` map (``extras``, ``assets``,
``partition``, ``context``, ``messages``, ``env``, ``stdio``, ``context_data``, and under
``stages`` a stage number's own); the entry node checks them and gives each stage its merged
options in the ``start`` request. :mod:`dpipes.nodes.stage_pipes` says what each one does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from dpipes.bus.errors import DpipesError, StageError

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
    from typing import Any, Final

CONTEXT_INJECTORS = ("env", "file")
MESSAGE_CHANNELS = ("file", "stderr", "stdout")
STAGE_KEYS = ("extras", "assets", "partition", "context", "messages", "env", "stdio")
MERGED_KEYS = ("extras", "env")  # a stage's own merge key by key over the pipeline's
ENV_MAX_VARS: Final = 256  # variables a client may set for one stage
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Variables that decide which code a program runs or loads, and dpipes' own facts: a client that
# set them could make a node started for one program (`dpipesd -- PROG`) run another, or lie to it.
ENV_REFUSED_NAMES: Final = frozenset(
    {"PATH", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "HOME", "NODE_OPTIONS", "NODE_PATH", "PERL5LIB",
     "PERL5OPT", "PERLLIB", "RUBYOPT", "RUBYLIB", "GCONV_PATH"}
)  # fmt: skip
ENV_REFUSED_PREFIXES: Final = ("LD_", "DYLD_", "PYTHON", "DPIPES_", "DAGSTER_PIPES_", "GIT_", "JAVA_TOOL_")


def check_env(given: object) -> dict[str, str]:
    """The ``env`` option, checked: variables a client may set, with string values.

    Raises:
        StageError: naming the variable and why it is refused.
    """
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise StageError("Pipes option env must be a map of NAME -> value")
    if len(given) > ENV_MAX_VARS:
        raise StageError(f"Pipes option env: {len(given)} variables, more than {ENV_MAX_VARS}")
    env = {}
    for name, value in given.items():
        if not isinstance(name, str) or not ENV_NAME.fullmatch(name):
            raise StageError(f"Pipes option env: {str(name)[:80]!r} is not a variable name")
        if name in ENV_REFUSED_NAMES or name.startswith(ENV_REFUSED_PREFIXES):
            raise StageError(f"Pipes option env: {name} may not be set by a client (it changes what runs)")
        if not isinstance(value, str) or "\0" in value:
            raise StageError(f"Pipes option env: the value of {name} must be a string without NUL")
        env[name] = value
    return env


def options_for_stage(options: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The Pipes options of stage ``index``: the pipeline's, with that stage's own on top.

    ``options["stages"]`` maps a stage number (as a string: it travels as a map key) to options of
    the same keys. A stage's ``extras`` and ``env`` are merged key by key over the pipeline's; its
    other options replace the pipeline's.
    """
    merged = {k: v for k, v in options.items() if k != "stages"}
    own = (options.get("stages") or {}).get(str(index)) or {}
    for key, value in own.items():
        if key in MERGED_KEYS:
            merged[key] = {**(merged.get(key) or {}), **value}
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
    check_env(options.get("env"))
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
        check_env((own or {}).get("env"))


class PipesFlagError(DpipesError, ValueError):
    """A Pipes flag of ``dpipes`` is malformed; the message names the flag and shows its form."""


def from_flags(flags: Any, count: int) -> dict[str, Any]:
    """The Pipes flags of a command line -> the ``run`` request's ``pipes`` map.

    ``flags`` has the lists ``extra``, ``asset``, ``partition``, ``pipes_context`` and
    ``pipes_messages`` (each item ``[N:]VALUE``, ``N`` a stage of the ``count``) and the switch
    ``pipes_stdio``, as ``dpipes``' parser gives them. The result is
    ``{"extras", "assets", "partition", "context", "messages", "stages": {N: ...}}``.

    Raises:
        PipesFlagError: naming the flag and item, and the form to write.
    """
    every: dict[str, Any] = {"extras": {}, "assets": [], "partition": None, "context": "env", "messages": "file"}
    stages: dict[str, dict[str, Any]] = {}

    def scope(flag: str, item: str) -> tuple[dict[str, Any], str]:
        index, value = split_stage_selector(item)
        if index is None:
            return every, value
        if index >= count:
            raise PipesFlagError(f"{flag} {item!r}: the pipeline has {count} stage(s), numbered 0-{count - 1}")
        return stages.setdefault(str(index), {}), value

    for item in flags.extra:
        import json  # here: a plain run (dpipes' short path) has no extras to read

        options, text = scope("--extra", item)
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise PipesFlagError(
                f"--extra {item!r}: write [N:]KEY=JSON, e.g. --extra 'limit=10' or --extra '1:tags=[\"a\"]'"
            )
        try:
            options.setdefault("extras", {})[key] = json.loads(value)
        except ValueError as exc:
            raise PipesFlagError(
                f"--extra {key}: the value is not JSON ({exc}); quote strings: --extra '{key}=\"text\"'"
            ) from None
    for item in flags.asset:
        options, key = scope("--asset", item)
        options.setdefault("assets", []).append(key)
    for item in flags.partition:
        options, key = scope("--partition", item)
        options["partition"] = key
    for flag, key, items, choices in (
        ("--pipes-context", "context", flags.pipes_context, CONTEXT_INJECTORS),
        ("--pipes-messages", "messages", flags.pipes_messages, MESSAGE_CHANNELS),
    ):
        for item in items:
            options, value = scope(flag, item)
            if value not in choices:
                raise PipesFlagError(f"{flag} {item!r}: use one of {', '.join(choices)} (optionally after N:)")
            options[key] = value
    if flags.pipes_stdio:
        every["stdio"] = True
    if stages:
        every["stages"] = stages
    return every
