"""Node policy: may this caller run this program here, and which program is that.

A node runs a stage only if its policy agrees, and it decides during negotiation, before anything
starts anywhere. The checks, in order, each with the :class:`Refusal` code it answers with:

``protocol``
    the coordinator speaks another version of the run conversation (``PIPELINE_PROTOCOL``);
``mode``
    the data mode is not one this node knows;
``unauthorized``
    the node has keys and the caller may not run this command line here: its
    :class:`~dpipes.bus.trust.Identity`, established by the transport (:func:`caller_of` says
    whose it is when a node asks on behalf of a client), is checked with
    :meth:`KeyPolicy.may_run <dpipes.bus.trust.KeyPolicy.may_run>` against ``authorized_keys``:
    the program by its bare name (``/bin/sh`` is not ``sh``), every argument against the key's
    patterns. The daemon's own user (over its Unix socket) and everyone on a node without keys
    pass; the node's own ``allow`` list and ``dpipesd -- PROG`` still apply to them. Checked
    before ``not-allowed`` and ``not-found``, so that a caller learns nothing of what the node
    has; an exclusive node checks the command line it would run (its fixed arguments first);
``not-allowed``
    the node is exclusive (``dpipesd -- PROG``) and this is another program, or the configuration
    has an ``allow`` list without it, or with it only for other arguments (``"PROG PATTERN..."``:
    every argument must match a pattern; a bare ``"PROG"`` allows any arguments, so everything
    the program can do: :mod:`dpipes.nodes.config`); or the node is exclusive with fixed arguments
    (``dpipesd -- sort -r``), the stage does not start with them (``sort``) and was not pinned
    here: running it would change what it means (placement sends no such stage here; a
    coordinator that falls back to its own node would);
``not-found``
    the program is neither in ``[apps]`` with an executable ``path`` nor in the node's ``PATH``;
    the message says what is there instead when something is (a directory, a file without
    execute permission, a broken link: :func:`~dpipes.nodes.programs.describe_missing`);
``bad-requirement`` / ``version``
    a ``--require`` constraint is not ``PROG OP VERSION``, or the program's version (declared in
    ``[apps.PROG] version``, else the first number ``PROG --version`` prints, probed once and
    cached) does not satisfy it, or cannot be known.

A plugin stage (``%NAME``, :mod:`dpipes.nodes.pipeline`) passes the same checks, with plugins in
place of programs: an exclusive node runs no plugin; an ``allow`` list covers a plugin when it
lists ``%NAME``; ``not-found`` when no installed distribution has the entry point ``NAME`` in the
group ``dpipes.plugins``; a ``%NAME>=1.2`` requirement is checked against the version of the
distribution that provides it.

A refusal is a value, never an exception: the caller turns it into an answer. The caller's identity
is an argument of :meth:`Policy.refusal`, never a name the client sent. Everything but the version
probe and the reading of the trust files is pure.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from dpipes.bus.keys import FINGERPRINT_PREFIX
from dpipes.bus.trust import INSECURE, Identity, IdentityKind, KeyPolicy, ProgramRule, TrustStore
from dpipes.nodes import config as config_module
from dpipes.nodes.config import NodeConfig, allow_rule
from dpipes.nodes.programs import describe_missing
from dpipes.nodes.protocol import MODES, PIPELINE_PROTOCOL

log = logging.getLogger(__name__)

VERSION_PROBE_TIMEOUT_S = 2.0  # `prog --version` when the config declares no version: a hung one is "unknown"

PROTOCOL: Final = "protocol"
MODE: Final = "mode"
NOT_ALLOWED: Final = "not-allowed"
NOT_FOUND: Final = "not-found"
BAD_REQUIREMENT: Final = "bad-requirement"
VERSION: Final = "version"
UNAUTHORIZED: Final = "unauthorized"
LOCAL_CALLER_PREFIX: Final = "uid:"  # negotiate.caller from a node's own coordinator for its local user

PLUGIN_SIGIL: Final = config_module.PLUGIN_SIGIL  # a stage whose first word starts with it names a plugin

_REQUIRE_RE = re.compile(r"^\s*([^<>=!\s]+)\s*(>=|<=|==|!=|>|<)\s*([0-9][0-9A-Za-z.+-]*)\s*$")
_VERSION_RE = re.compile(r"(\d+(?:\.\d+)+|\d+)")


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a node will not run a stage: a code a program can test, a message a user can read."""

    code: str
    message: str

    def __str__(self) -> str:
        return self.message


def caller_of(transport: Identity | None, claimed: str, *, own_coordinator: bool) -> Identity | Refusal:
    """Who a ``negotiate`` is for (protocol: *Who asks*), or why that cannot be taken.

    Args:
        transport: who sent it, as the hub established it (None: nobody holds that address).
        claimed: its ``caller`` field.
        own_coordinator: it came from this node's own control endpoint.
    """
    if transport is None:
        return Refusal(UNAUTHORIZED, "the request came from an address this node cannot attribute to anyone")
    if not claimed or transport.kind is IdentityKind.INSECURE:
        return transport  # without keys nobody is authenticated, and nobody is checked
    if own_coordinator and claimed.startswith(LOCAL_CALLER_PREFIX) and claimed[len(LOCAL_CALLER_PREFIX) :].isdigit():
        return Identity.local_user(int(claimed[len(LOCAL_CALLER_PREFIX) :]))
    if not (own_coordinator or (transport.kind is IdentityKind.KEY and transport.node)):
        return Refusal(
            UNAUTHORIZED, f"{transport} is not a node: it may not ask on behalf of {claimed[:80]!r}, only for itself"
        )
    if not claimed.startswith(FINGERPRINT_PREFIX) or len(claimed) > 2 * len(FINGERPRINT_PREFIX) + 64:
        return Refusal(UNAUTHORIZED, f"{transport} asked on behalf of {claimed[:80]!r}, which is not a key fingerprint")
    return Identity.key(claimed)


def parse_requirement(text: str) -> tuple[str, str, tuple[int, ...]]:
    """``"sort>=9.1"`` -> ``("sort", ">=", (9, 1))``.

    Raises:
        ValueError: the text is not ``PROG OP VERSION``.
    """
    match = _REQUIRE_RE.match(text)
    if not match:
        raise ValueError(f"bad requirement {text!r}: write PROG OP VERSION, e.g. 'sort>=9' (OP: >= <= == != > <)")
    return match[1], match[2], version_tuple(match[3])


def version_tuple(text: str) -> tuple[int, ...]:
    """The leading dotted number of a version string as a tuple: ``"9.1-rc"`` -> ``(9, 1)``."""
    match = _VERSION_RE.search(text)
    return tuple(int(p) for p in match[1].split(".")) if match else ()


def version_satisfies(have: tuple[int, ...], op: str, want: tuple[int, ...]) -> bool:
    """Whether version ``have`` satisfies ``OP want``; missing trailing parts count as 0."""
    width = max(len(have), len(want))
    a, b = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
    return {">=": a >= b, "<=": a <= b, "==": a == b, "!=": a != b, ">": a > b, "<": a < b}[op]


def probe_version(path: str) -> tuple[int, ...]:
    """The version a program prints for ``--version`` (first number on its first line); () if none."""
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, timeout=VERSION_PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired):
        return ()
    first = (out.stdout or out.stderr).decode(errors="replace").splitlines()[:1]
    return version_tuple(first[0]) if first else ()


class Policy:
    """What one node runs, and for whom.

    Args:
        node: the node's name, for messages.
        config: its configuration (``allow``, ``[apps]``).
        exclusive: ``dpipesd -- PROG ARGS``: the only program this node runs, ARGS put before
            each stage's own arguments.
        trust: the node's current trust store (``authorized_keys``), read at each check; None
            for a node without keys, which checks nobody.
    """

    def __init__(
        self,
        node: str,
        config: NodeConfig,
        *,
        exclusive: Sequence[str] | None = None,
        trust: Callable[[], TrustStore] | None = None,
    ) -> None:
        self.node = node
        self.config = config
        self.exclusive = list(exclusive) if exclusive else None
        self.trust = trust
        self._versions: dict[str, tuple[int, ...]] = {}
        # The allow list as rules, by the word a stage starts with (PROG, or %PLUGIN).
        self._allowed: dict[str, list[ProgramRule]] = {}
        for entry in sorted(config.allow or ()):
            rule = allow_rule(entry)
            self._allowed.setdefault((PLUGIN_SIGIL if rule.plugin else "") + rule.program, []).append(rule)

    def offered(self) -> set[str]:
        """What this node offers: its exclusive program with its fixed arguments (``sort -r``, in
        shell words: :func:`~dpipes.nodes.pipeline.offer_matches`), else allow list and [apps]."""
        if self.exclusive:
            return {shlex.join([os.path.basename(self.exclusive[0]), *self.exclusive[1:]])}
        return {name for name in self._allowed if not name.startswith(PLUGIN_SIGIL)} | set(self.config.apps)

    def offered_plugins(self) -> dict[str, str]:
        """Plugins this node offers, name -> version: those installed that its allow list admits
        (listed through the cache of :mod:`dpipes.nodes.plugin_cache`: a node start is on the clock)."""
        if self.exclusive:
            return {}
        from dpipes.nodes.plugin_cache import installed_plugin_versions

        return {
            name: version
            for name, version in installed_plugin_versions().items()
            if self.config.allow is None or PLUGIN_SIGIL + name in self._allowed
        }

    def resolve(self, program: str) -> str | None:
        """The executable ``program`` names here: its ``[apps]`` path, else a ``PATH`` lookup."""
        app = self.config.apps.get(program)
        if app is not None and app.path:
            return app.path if os.path.isfile(app.path) and os.access(app.path, os.X_OK) else None
        return shutil.which(program)

    def command_line(self, argv: Sequence[str]) -> list[str]:
        """The command line this node runs for a stage asking for ``argv``, its program not yet
        resolved: the exclusive program's fixed arguments come first, unless the stage starts with them."""
        if not self.exclusive:
            return list(argv)
        fixed = self.exclusive[1:]
        given = list(argv[1 : 1 + len(fixed)])
        return [self.exclusive[0], *(argv[1:] if given == fixed else [*fixed, *argv[1:]])]

    def command(self, argv: Sequence[str]) -> list[str]:
        """What this node forks for a stage asking for ``argv``: :meth:`command_line`, its program resolved."""
        full = self.command_line(argv)
        return [self.resolve(full[0]) or full[0], *full[1:]]

    def unauthorized(self, caller: Identity, argv: Sequence[str]) -> Refusal | None:
        """Why ``caller`` may not run ``argv`` here (``authorized_keys``), or None when it may."""
        if self.trust is None or not argv:
            return None
        store = self.trust()
        plugin = argv[0].startswith(PLUGIN_SIGIL)
        if plugin:
            words = [argv[0][len(PLUGIN_SIGIL) :], *argv[1:]]
        else:
            words = self.command_line(argv)
            words[0] = os.path.basename(words[0]) if self.exclusive else words[0]
        decision = KeyPolicy(store.clients, store.nodes).may_run(caller, words, plugin=plugin)
        if decision:
            return None
        return Refusal(UNAUTHORIZED, f"node {self.node}: {decision.reason}")

    def refusal_static(
        self, argv: Sequence[str], *, mode: str, protocol: object, caller: Identity = INSECURE, pinned: bool = False
    ) -> Refusal | None:
        """The checks that need no probing: protocol, mode, authorized, allowed, found (see the
        module). ``pinned``: the user put the stage on this node (``PROG@NODE``)."""
        program = argv[0] if argv else ""
        if protocol != PIPELINE_PROTOCOL:
            return Refusal(
                PROTOCOL,
                f"pipeline protocol {protocol!r} is not node {self.node}'s {PIPELINE_PROTOCOL}: upgrade one side",
            )
        if mode not in MODES:
            return Refusal(MODE, f"data mode {mode!r} is not one of {', '.join(MODES)}")
        if found := self.unauthorized(caller, argv):
            return found
        if program.startswith(PLUGIN_SIGIL):
            return self._plugin_refusal(argv)
        if self.exclusive is not None:
            only = os.path.basename(self.exclusive[0])
            if os.path.basename(program) != only:
                return Refusal(NOT_ALLOWED, f"program {program!r} is not allowed: node {self.node} runs only {only!r}")
            fixed = self.exclusive[1:]
            if fixed and not pinned and list(argv[1 : 1 + len(fixed)]) != fixed:
                offer = shlex.join([only, *fixed])
                return Refusal(
                    NOT_ALLOWED,
                    f"node {self.node} runs {only!r} only as {offer!r}, which would change what"
                    f" {shlex.join(argv)!r} does; pin the stage ({only}@{self.node}) to run it so",
                )
        elif self.config.allow is not None and (found := self._not_allowed(argv, "program")):
            return found
        wanted = self.exclusive[0] if self.exclusive else program
        if self.resolve(wanted) is None:
            app = self.config.apps.get(wanted)
            configured = app.path if app is not None and app.path else None
            return Refusal(NOT_FOUND, describe_missing(wanted, configured, node=self.node))
        return None

    def _not_allowed(self, argv: Sequence[str], what: str) -> Refusal | None:
        """Why the ``allow`` list refuses ``argv`` (its program or plugin, or an argument), or None."""
        word = argv[0]
        rules = self._allowed.get(word)
        name = word[len(PLUGIN_SIGIL) :] if what == "plugin" else word
        if not rules:
            allowed = ", ".join(sorted(self._allowed)) or "nothing"
            hint = f"; add {word!r}" if what == "plugin" else ""
            message = f"{what} {name!r} is not allowed on node {self.node} (allowed: {allowed}{hint})"
            return Refusal(NOT_ALLOWED, message)
        problems = [problem for rule in rules if (problem := rule.check(argv[1:])) is not None]
        if len(problems) < len(rules):
            return None
        entries = ", ".join(repr(shlex.join([word, *r.patterns])) for r in rules)
        return Refusal(
            NOT_ALLOWED,
            f"{shlex.join(argv)!r} is not allowed on node {self.node}: {'; '.join(problems)} (allow: {entries})",
        )

    def _plugin_refusal(self, argv: Sequence[str]) -> Refusal | None:
        word = argv[0]
        name = word[len(PLUGIN_SIGIL) :]
        if self.exclusive is not None:
            only = os.path.basename(self.exclusive[0])
            return Refusal(NOT_ALLOWED, f"plugin {name!r} is not allowed: node {self.node} runs only {only!r}")
        if self.config.allow is not None and (found := self._not_allowed(argv, "plugin")):
            return found
        from dpipes.nodes.plugins.registry import ENTRY_POINT_GROUP, installed_plugins

        installed = installed_plugins()
        if name not in installed:
            known = ", ".join(installed) or "none"
            return Refusal(
                NOT_FOUND,
                f"plugin {name!r} is not installed on node {self.node} (no entry point {name!r} in the group "
                f"{ENTRY_POINT_GROUP!r}; installed: {known}): pip install it there",
            )
        return None

    async def refusal(
        self,
        argv: Sequence[str],
        *,
        mode: str,
        protocol: object,
        require: Iterable[str],
        caller: Identity = INSECURE,
        pinned: bool = False,
    ) -> Refusal | None:
        """Why this node will not run ``argv`` for ``caller``, or None when it will."""
        if found := self.refusal_static(argv, mode=mode, protocol=protocol, caller=caller, pinned=pinned):
            return found
        program = argv[0]
        if program.startswith(PLUGIN_SIGIL):
            return self._plugin_version_refusal(program, require)
        path = self.resolve(self.exclusive[0] if self.exclusive else program)
        assert path is not None  # refusal_static found it
        for text in require:
            try:
                name, op, want = parse_requirement(text)
            except ValueError as exc:
                return Refusal(BAD_REQUIREMENT, str(exc))
            if name != program:
                continue
            have = await self.version_of(program, path)
            if not have:
                hint = f"declare it in [apps.{program}]"
                return Refusal(VERSION, f"version of {program!r} unknown here, cannot check {text!r} ({hint})")
            if not version_satisfies(have, op, want):
                shown = ".".join(map(str, have))
                return Refusal(VERSION, f"{program} version {shown} on node {self.node} does not satisfy {text!r}")
        return None

    def _plugin_version_refusal(self, word: str, require: Iterable[str]) -> Refusal | None:
        from dpipes.nodes.plugins.registry import installed_plugins

        for text in require:
            try:
                name, op, want = parse_requirement(text)
            except ValueError as exc:
                return Refusal(BAD_REQUIREMENT, str(exc))
            if name != word:
                continue
            info = installed_plugins().get(word[len(PLUGIN_SIGIL) :])
            have = version_tuple(info.version) if info is not None else ()
            if not have:
                return Refusal(
                    VERSION, f"version of plugin {word!r} unknown on node {self.node}, cannot check {text!r}"
                )
            if not version_satisfies(have, op, want):
                shown = ".".join(map(str, have))
                return Refusal(VERSION, f"plugin {word} version {shown} on node {self.node} does not satisfy {text!r}")
        return None

    async def version_of(self, program: str, path: str) -> tuple[int, ...]:
        """``program``'s version: declared in ``[apps]``, else probed once (in a thread) and kept."""
        app = self.config.apps.get(program)
        if app is not None and app.version:
            return version_tuple(app.version)
        if program not in self._versions:
            self._versions[program] = await asyncio.to_thread(probe_version, path)
        return self._versions[program]


__all__ = [
    "UNAUTHORIZED",
    "Policy",
    "Refusal",
    "caller_of",
    "parse_requirement",
    "probe_version",
    "version_satisfies",
    "version_tuple",
]
