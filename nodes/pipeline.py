"""Pipeline text and placement: ``'cat f | sort@beta -r | uniq -c'`` to stages, stages to nodes.

Syntax
    A pipeline is one or more *stages* separated by ``|``. A stage is words, quoted as in a POSIX
    shell: ``'...'`` is literal, ``"..."`` is literal except that ``\\`` escapes ``$ ` " \\`` and
    newline, and an unquoted ``\\`` escapes the next character (``\\`` before a newline joins
    lines). Quoted text is never special: ``grep 'a|b'`` is one stage.

    The first word of a stage is its program. An unquoted ``@NODE`` at its end pins the stage to
    node ``NODE`` (``sort@beta -r``); ``@`` in later words is plain text (``ssh user@host``), and so
    is a quoted one (``'odd@name'``).

    There is no shell behind this: no variables, command substitution, redirections, lists,
    subshells or comments. Their unquoted characters (``$ ` ; & < > ( )``, ``#`` starting a word, a
    ``NAME=value`` environment prefix, a newline inside a stage) are errors that say how to quote
    them or to run ``sh -c '...'`` as a stage, rather than meaning something else silently. Globs
    (``* ? [``) and ``~`` are not expanded: the program receives them as written.

    A first word starting with ``%`` names a *plugin* instead of a program (``%filter@beta
    expr="amount > 100"``): a Python class installed on a node under the entry point group
    ``dpipes.plugins`` (:mod:`dpipes.nodes.plugins`), run there by a plugin worker. Its other
    words are its configuration, each ``KEY=VALUE`` (the plugin's ``provider.tool_config``, values
    as text); a word without ``=`` is an error. No program is named with a leading ``%``, so the
    two cannot be confused; a program whose name does start with one runs by its path (``./%odd``)
    or through ``env`` (``env %odd``).

    Stages are numbered from 0, here as everywhere else (errors, placement, ``--status``,
    ``--tag``, the ``N:`` options and Pipes): the first stage is stage 0.

Placement
    :func:`place` is a pure function of the stages and the node table: a pinned stage goes to its
    node; otherwise to a node with an offer that matches the stage, spreading repeated programs
    round-robin over the nodes offering them (the local node first, then the others by name);
    otherwise to the local node. :func:`placements` says, for each stage, why (``pinned``,
    ``offered``, ``local``).

    An *offer* is a program name (``sort``), or a program with fixed arguments (``sort -r``, in
    shell words) for a node started as ``dpipesd -- sort -r``, which runs its program with those
    arguments only. A stage matches an offer when its words start with the offer's: ``sort -r``
    and ``sort -r -n`` match ``sort -r``; ``sort`` does not, so placement never sends it there
    (that would reverse its output). Only a pin puts a stage on such a node regardless.
"""

from __future__ import annotations

import difflib
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dpipes.bus.errors import DpipesError, StageError
from dpipes.discovery.txt import NODE_NAME_RE
from dpipes.discovery.txt import node_name_problem as check_node_name  # also in nodes/config.py

__all__ = [
    "LOCAL",
    "NODE_NAME_PATTERN",
    "OFFERED",
    "PINNED",
    "NodeInfo",
    "PipelineSyntaxError",
    "Placement",
    "PlacementError",
    "StageSpec",
    "check_node_name",
    "format_pipeline",
    "format_stage",
    "offer_matches",
    "parse_pipeline",
    "place",
    "placements",
    "plugin_config",
    "plugin_name",
]

NODE_NAME_PATTERN = NODE_NAME_RE
"""A node name, as discovery advertises it: 1-48 of ``[A-Za-z0-9_-]``, starting with a letter or
digit; so never ``@`` (pins), ``/`` (bus addresses), ``.``, ``:`` or whitespace."""

_BLANKS = " \t"
_SHELL_ONLY = {
    ";": "a command list",
    "&": "a background job or '&&'",
    "<": "a redirection",
    ">": "a redirection",
    "(": "a subshell",
    ")": "a subshell",
    "$": "a variable or command substitution",
    "`": "a command substitution",
}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
PLUGIN_SIGIL = "%"
"""The first character of a stage's first word that makes it a plugin stage (``%filter``)."""
PLUGIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""A plugin's name as a stage gives it: an entry point name (1-128 letters, digits, ``_ . -``)."""
CONFIG_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,127}")
"""A ``KEY`` of a plugin stage's ``KEY=VALUE`` words."""
_SNIPPET_MAX = 200


class PipelineSyntaxError(DpipesError, ValueError):
    """The pipeline text cannot be parsed; the message names the position, the stage and the fix."""

    def __init__(self, message: str, *, position: int, stage: int) -> None:
        super().__init__(message)
        self.position = position
        """0-based character offset of the problem in the pipeline text."""
        self.stage = stage
        """0-based index of the stage in which it was found."""


class PlacementError(StageError, LookupError):
    """A stage cannot be placed: its pin names a node nobody knows."""


@dataclass(frozen=True, slots=True)
class StageSpec:
    """One parsed stage: its position, its argv, its pinned node (or None) and its source text."""

    index: int
    argv: tuple[str, ...]
    node: str | None = None
    text: str = ""

    @property
    def program(self) -> str:
        """The program word, without any ``@NODE`` pin (``%NAME`` for a plugin stage)."""
        return self.argv[0]

    @property
    def plugin(self) -> str:
        """The plugin's name for a plugin stage (``%filter`` -> ``filter``), else ""."""
        return plugin_name(self.argv)

    @property
    def config(self) -> dict[str, str]:
        """A plugin stage's ``KEY=VALUE`` words as a map (empty for a program)."""
        return plugin_config(self.argv) if self.plugin else {}


def plugin_name(argv: Sequence[str]) -> str:
    """The plugin ``argv`` names (``["%filter", ...]`` -> ``"filter"``), or "" for a program."""
    return argv[0][1:] if argv and argv[0].startswith(PLUGIN_SIGIL) else ""


def plugin_config(argv: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` words after a plugin stage's first word as a map (later keys win).

    Raises:
        ValueError: a word is not ``KEY=VALUE``.
    """
    config: dict[str, str] = {}
    for word in argv[1:]:
        key, eq, value = word.partition("=")
        if not eq or not CONFIG_KEY_RE.fullmatch(key):
            raise ValueError(f"plugin stage argument {word!r:.60} is not KEY=VALUE")
        config[key] = value
    return config


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What placement needs to know about a node: its name and the programs it offers.

    ``programs`` holds bare program names (``"sort"``), without discovery's ``dp.`` prefix.
    """

    name: str
    programs: frozenset[str] = field(default_factory=frozenset)


# -- parsing ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Word:
    start: int
    parts: list[str] = field(default_factory=list)
    size: int = 0
    bare_prefix: int = 0  # how many leading characters were neither quoted nor escaped
    at: int | None = None  # offset in the word of its last unquoted '@'
    at_pos: int = 0  # and its offset in the pipeline text

    def add(self, text: str, *, quoted: bool, pos: int = 0) -> None:
        if not quoted:
            if self.bare_prefix == self.size:
                self.bare_prefix += len(text)
            if text == "@":
                self.at, self.at_pos = self.size, pos
        self.parts.append(text)
        self.size += len(text)

    def text(self) -> str:
        return "".join(self.parts)


@dataclass(slots=True)
class _RawStage:
    start: int
    end: int
    words: list[_Word]


class _Parser:
    """A character-level tokenizer for the sh subset described in the module docstring."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.stages: list[_RawStage] = []
        self.words: list[_Word] = []
        self.word: _Word | None = None
        self.stage_start = 0
        self.last_bar: int | None = None

    def fail(self, position: int, problem: str, hint: str, *, stage: int | None = None) -> PipelineSyntaxError:
        stage = len(self.stages) if stage is None else stage
        message = f"pipeline syntax error in stage {stage} at column {position + 1}: {problem}"
        if "\n" not in self.text and len(self.text) <= _SNIPPET_MAX:
            message += f"\n  {self.text}\n  {' ' * position}^"
        message += f"\n{hint}"
        return PipelineSyntaxError(message, position=position, stage=stage)

    def start_word(self, at: int) -> _Word:
        if self.word is None:
            self.word = _Word(start=at)
        return self.word

    def end_word(self) -> None:
        if self.word is not None:
            self.words.append(self.word)
            self.word = None

    def end_stage(self, end: int) -> None:
        self.end_word()
        self.stages.append(_RawStage(self.stage_start, end, self.words))
        self.words = []

    def parse(self) -> list[_RawStage]:
        text = self.text
        n = len(text)
        i = 0
        while i < n:
            c = text[i]
            if c in _BLANKS:
                self.end_word()
                i += 1
            elif c == "\n":
                self.newline(i)
                i += 1
            elif c == "|":
                self.bar(i)
                i += 1
            elif c == "'":
                end = text.find("'", i + 1)
                if end < 0:
                    raise self.fail(i, "unterminated single quote", "Add the closing ' .")
                self.check_nul(i + 1, end)
                self.start_word(i).add(text[i + 1 : end], quoted=True)
                i = end + 1
            elif c == '"':
                i = self.double_quoted(i)
            elif c == "\\":
                if i + 1 >= n:
                    raise self.fail(i, "a trailing backslash escapes nothing", "Remove it, or quote it: '\\'")
                if text[i + 1] != "\n":  # backslash-newline joins lines and is dropped
                    self.check_nul(i + 1, i + 2)
                    self.start_word(i).add(text[i + 1], quoted=True)
                i += 2
            else:
                self.bare(i, c)
                i += 1
        self.end_word()
        if not self.words:
            if not self.stages:
                raise self.fail(0, "the pipeline is empty", "Give at least one command, e.g. 'seq 10 | sort -r'.")
            assert self.last_bar is not None
            raise self.fail(self.last_bar, "the pipeline ends with '|'", "Add the last stage after it.")
        self.end_stage(n)
        return self.stages

    def bare(self, i: int, c: str) -> None:
        if c == "\0":
            raise self.fail(i, "a NUL character cannot be passed to a program", "Remove it.")
        what = _SHELL_ONLY.get(c)
        if what is not None:
            raise self.fail(
                i,
                f"unquoted {c!r} would be {what} in sh, and dpipes runs no shell",
                f"Quote it ('{c}') to pass it to the program, or run a shell as a stage: sh -c '...'.",
            )
        if c == "#" and self.word is None:
            raise self.fail(i, "a word starting with '#' would be a comment in sh", "Quote it ('#...') to pass it on.")
        self.start_word(i).add(c, quoted=False, pos=i)

    def bar(self, i: int) -> None:
        if i + 1 < len(self.text) and self.text[i + 1] == "|":
            raise self.fail(i, "'||' is not supported", "Separate stages with a single '|'.")
        self.end_word()
        if not self.words:
            if self.last_bar is None:
                raise self.fail(i, "the pipeline starts with '|'", "Put a command before it.")
            raise self.fail(i, "empty stage between two '|'", "Remove one '|' or put a command between them.")
        self.end_stage(i)
        self.stage_start = i + 1
        self.last_bar = i

    def newline(self, i: int) -> None:
        self.end_word()
        if self.words and self.text[i:].strip():
            raise self.fail(
                i,
                "a newline inside a stage would end the command in sh",
                "Join the lines, or end the line with '|' or '\\'.",
            )

    def double_quoted(self, i: int) -> int:
        text = self.text
        n = len(text)
        word = self.start_word(i)
        word.add("", quoted=True)  # "" is an empty word, as in sh
        j = i + 1
        while True:
            if j >= n:
                raise self.fail(i, "unterminated double quote", 'Add the closing " .')
            c = text[j]
            if c == '"':
                return j + 1
            if c == "\\" and j + 1 < n and text[j + 1] in '$`"\\\n':
                if text[j + 1] != "\n":
                    word.add(text[j + 1], quoted=True)
                j += 2
                continue
            if c in "$`":
                raise self.fail(
                    j,
                    f"{c!r} inside double quotes would be expanded by sh, and dpipes runs no shell",
                    f"Use single quotes, or escape it: \\{c}.",
                )
            if c == "\0":
                raise self.fail(j, "a NUL character cannot be passed to a program", "Remove it.")
            word.add(c, quoted=True)
            j += 1

    def check_nul(self, start: int, end: int) -> None:
        nul = self.text.find("\0", start, end)
        if nul >= 0:
            raise self.fail(nul, "a NUL character cannot be passed to a program", "Remove it.")


def parse_pipeline(text: str) -> list[StageSpec]:
    """Parse pipeline text into stages (see the module docstring for the syntax).

    Returns:
        One :class:`StageSpec` per stage, in order, ``index`` from 0.

    Raises:
        PipelineSyntaxError: with the column, the stage and what to do.
    """
    parser = _Parser(text)
    specs: list[StageSpec] = []
    for index, raw in enumerate(parser.parse()):
        first = raw.words[0]
        program = first.text()
        node: str | None = None
        if first.at is not None:
            program, node = program[: first.at], program[first.at + 1 :]
            if not program:
                raise parser.fail(first.start, "a pin '@NODE' without a program", "Write PROGRAM@NODE.", stage=index)
            problem = check_node_name(node)
            if problem is not None:
                raise parser.fail(
                    first.at_pos,
                    f"bad pin '@{node}': {problem}",
                    "Write PROGRAM@NODE, or quote an '@' that is part of the program name.",
                    stage=index,
                )
        if not program:
            raise parser.fail(first.start, "the program name is empty", "Give a program to run.", stage=index)
        assignment = _ASSIGNMENT.match(program)
        if assignment and assignment.end() <= first.bare_prefix:
            raise parser.fail(
                first.start,
                f"{assignment.group()}... would set an environment variable in sh",
                "Use the env program (env NAME=value PROGRAM ...), or quote the word if it is the program.",
                stage=index,
            )
        argv = (program, *(w.text() for w in raw.words[1:]))
        if program.startswith(PLUGIN_SIGIL):
            name = program[len(PLUGIN_SIGIL) :]
            if not PLUGIN_NAME_RE.fullmatch(name):
                raise parser.fail(
                    first.start,
                    f"bad plugin name {name!r:.60}: use 1-128 letters, digits, '_', '.' and '-'",
                    "Write %NAME KEY=VALUE ...; run a program named %... by its path (./%...) or as env %....",
                    stage=index,
                )
            for word in raw.words[1:]:
                try:
                    plugin_config((program, word.text()))
                except ValueError as exc:
                    raise parser.fail(
                        word.start,
                        str(exc),
                        'A plugin stage takes its configuration as KEY=VALUE words (quote spaces: expr="a > 1").',
                        stage=index,
                    ) from None
        specs.append(StageSpec(index, argv, node, text[raw.start : raw.end].strip()))
    return specs


def format_stage(argv: Sequence[str], node: str | None = None) -> str:
    """Quote ``argv`` (and a pin) as stage text that :func:`parse_pipeline` reads back exactly."""
    if not argv:
        raise ValueError("a stage needs at least a program")
    program = shlex.quote(argv[0])
    if program == argv[0] and ("@" in program or _ASSIGNMENT.match(program)):
        program = f"'{program}'"  # shlex leaves '@' and '=' bare; here they would mean a pin or env
    if node is not None:
        problem = check_node_name(node)
        if problem is not None:
            raise ValueError(problem)
        program += f"@{node}"
    return " ".join([program, *map(shlex.quote, argv[1:])])


def format_pipeline(stages: Iterable[StageSpec]) -> str:
    """The inverse of :func:`parse_pipeline` (up to spacing and quoting)."""
    return " | ".join(format_stage(s.argv, s.node) for s in stages)


# -- placement -------------------------------------------------------------------------------------


PINNED = "pinned"  # the stage named its node: PROG@NODE
OFFERED = "offered"  # a node offers the stage's program (Placement.offer says as what)
LOCAL = "local"  # nobody offers it (or it is a path): the local node
PLACED = (PINNED, OFFERED, LOCAL)


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one stage goes and why: ``why`` is one of ``PLACED``; ``offer`` the matched offer."""

    node: str
    why: str
    offer: str = ""


def offer_matches(offer: str, argv: Sequence[str]) -> bool:
    """Whether a stage of ``argv`` matches ``offer`` (a program, or a program with fixed arguments
    in shell words): the stage's words start with the offer's."""
    if " " not in offer and "'" not in offer and '"' not in offer and "\\" not in offer:
        return bool(argv) and argv[0] == offer  # the common case, without a tokenizer
    try:
        words = shlex.split(offer)
    except ValueError:
        return False
    return bool(words) and list(argv[: len(words)]) == words


def place(stages: Sequence[StageSpec], table: Mapping[str, NodeInfo], *, local: str) -> list[str]:
    """The node of each stage, as :func:`placements` chooses it."""
    return [p.node for p in placements(stages, table, local=local)]


def placements(stages: Sequence[StageSpec], table: Mapping[str, NodeInfo], *, local: str) -> list[Placement]:
    """Choose a node for each stage, and say why; a pure function of its arguments.

    Args:
        stages: the parsed pipeline.
        table: the known nodes by name (the local node may or may not be in it).
        local: the name of the node doing the placement.

    Returns:
        One :class:`Placement` per stage: the pinned node; else a node with an offer the stage
        matches (:func:`offer_matches`), round-robin over those (local node first, then by name)
        so that repeated programs spread out; else ``local``. A program given as a path (``./x``,
        ``/bin/x``) names a file of the local node and stays there unless pinned.

    Raises:
        PlacementError: a pin names a node that is neither ``local`` nor in ``table``.
    """
    known = sorted(set(table) | {local})
    turns: dict[str, int] = {}
    chosen: list[Placement] = []
    for stage in stages:
        if stage.node is not None:
            if stage.node not in known:
                raise PlacementError(_unknown_node(stage, known, local))
            chosen.append(Placement(stage.node, PINNED))
            continue
        program = stage.program
        offering: list[tuple[str, str]] = []  # (node, its matching offer)
        if "/" not in program:
            for name in sorted(table):
                matched = [o for o in table[name].programs if offer_matches(o, stage.argv)]
                if matched:
                    offering.append((name, max(matched, key=len)))  # the most specific offer
        if not offering:
            chosen.append(Placement(local, LOCAL))
            continue
        offering.sort(key=lambda item: item[0] != local)  # local first: no network hop when it makes no difference
        turn = turns.get(program, 0)
        turns[program] = turn + 1
        node, offer = offering[turn % len(offering)]
        chosen.append(Placement(node, OFFERED, offer))
    return chosen


def _unknown_node(stage: StageSpec, known: list[str], local: str) -> str:
    node = stage.node or ""
    message = f"stage {stage.index} ({stage.text or stage.program}): no known node is named {node!r}"
    close = difflib.get_close_matches(node, known, n=1)
    if close:
        message += f"; did you mean {close[0]!r}?"
    listing = ", ".join(f"{n} (local)" if n == local else n for n in known)
    return f"{message}\nKnown nodes: {listing}. See `dpipes --nodes`, or fix the pin."
