"""Who a node trusts, as ssh does it: authorized client keys with rights, known node keys.

Pure objects (no sockets): the hub's ZAP handler asks :class:`TrustStore` whether a CURVE key may
connect at all; the node's policy asks :class:`KeyPolicy` what an authenticated caller may do
(:meth:`KeyPolicy.may_run`, :meth:`KeyPolicy.may_tap`).

**authorized_keys** (in the key directory, see :mod:`dpipes.bus.keys`): the clients a node admits,
one key per line, ``#`` comments and blank lines ignored::

    [OPTIONS] curve KEY [COMMENT]

``KEY`` is the 40-character Z85 public key (``dpipes keys`` prints it; the ``.key`` file holds
it). ``OPTIONS`` is a comma-separated list, values in double quotes (``\\"`` for a quote, ``\\\\``
for a backslash); without options a key may connect and do nothing. The options:

``run="PROG [PATTERN...]"``
    may run program ``PROG`` (a bare name, compared exactly: ``/bin/sh``, ``../sh``, ``c?t`` or
    ``cat$(id)`` never match ``sh`` or ``cat``), with arguments each of which matches one of the
    fnmatch ``PATTERN`` s (shell words: quote a pattern with spaces). ``run="sort"`` allows
    ``sort`` with no argument at all; ``run="sort -r -n '-k[0-9]*'"`` allows ``sort -r -k2``.
``exact="PROG ARG..."``
    may run exactly this command line, no more arguments and no fewer.
``plugin="NAME [PATTERN...]"``
    may run plugin ``NAME``, arguments as for ``run``.
``tap``
    may watch the bus with ``dpipes-tap`` (which shows the data of every pipeline on the node).
``any``
    may run any program or plugin with any arguments, and tap: the node owner's own key.

**Allowing a program allows everything that program can do, with any argument a pattern lets
through.** ``run="sort *"`` lets a caller run ``sort --compress-program=evil.sh`` (which runs
``evil.sh``) and ``sort -o FILE`` (which writes any file the node's user can); ``run="sh *"``,
``run="env *"``, ``run="python3 *"`` or ``run="find *"`` give the caller a shell. A safe entry names
each option it allows::

    run="sort -r -n -u '-k[0-9]*' '-t?'",run="uniq -c",run="wc -l" curve rq:5Vk... alice@laptop

**known_nodes**: the peer nodes a node or a client trusts, one line per node::

    NODE FINGERPRINT [KEY]

``FINGERPRINT`` is ``SHA256:...`` (``dpipes keys pin NODE FINGERPRINT`` writes such a line from a
fingerprint read on the node itself); ``KEY``, when known, is the Z85 key, which a link needs to
connect (a pinned node's key arrives by discovery and is checked against the fingerprint).
Trust on first use, when enabled, records a node's key the first time it is seen; afterwards a
node presenting another key is refused with :class:`~dpipes.bus.errors.KeyChanged`, naming the
node and both fingerprints, until the line is removed (``dpipes keys untrust NODE``).

Every parse error is a :class:`~dpipes.bus.errors.TrustFileError` naming ``file:line``.
"""

from __future__ import annotations

import contextlib
import enum
import fnmatch
import logging
import os
import re
import shlex
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from dpipes.bus.errors import KeyChanged, SecurityError, TrustFileError
from dpipes.bus.keys import FINGERPRINT_PREFIX, PublicKey

__all__ = [
    "AUTHORIZED_KEYS",
    "INSECURE",
    "KNOWN_NODES",
    "AuthorizedKey",
    "AuthorizedKeys",
    "Decision",
    "Identity",
    "IdentityKind",
    "KeyPolicy",
    "KnownNode",
    "KnownNodes",
    "ProgramRule",
    "TrustStore",
    "UnknownNode",
    "parse_fingerprint_or_key",
    "program_rule",
]

log = logging.getLogger(__name__)

AUTHORIZED_KEYS = "authorized_keys"
KNOWN_NODES = "known_nodes"
KEY_TYPE = "curve"
MAX_LINE_CHARS = 16_384  # a trust file is small; a longer line is a mistake, not a key
_NAME_RE = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,254}")  # a bare program name: no path, glob or shell
_FINGERPRINT_RE = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
_NODE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
_OPTION_NAME_RE = re.compile(r"[A-Za-z-]+")


class UnknownNode(SecurityError):
    """A node that is neither pinned nor (with trust on first use off) may be trusted by itself."""


# -- identities and decisions -----------------------------------------------------------------


class IdentityKind(enum.Enum):
    KEY = "key"
    """Authenticated by CURVE: a client or a node key."""
    LOCAL_USER = "local-user"
    """The daemon's own user, over the Unix socket (its uid checked by the kernel)."""
    INSECURE = "insecure"
    """Nothing authenticated: a node started with --insecure, or a no-keys test hub."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is asking, as the transport established it (never as the caller claims)."""

    kind: IdentityKind
    fingerprint: str = ""
    """For KEY: the key's fingerprint (the ZAP ``User-Id``)."""
    uid: int | None = None
    """For LOCAL_USER: the peer's uid."""
    node: str = ""
    """For KEY: the peer node this key is pinned to, when the key is a node's (a hub link)."""

    def __str__(self) -> str:
        if self.kind is IdentityKind.KEY:
            return f"node {self.node} (key {self.fingerprint})" if self.node else f"key {self.fingerprint}"
        if self.kind is IdentityKind.LOCAL_USER:
            return f"local uid {self.uid}"
        return "an unauthenticated caller (insecure)"

    @classmethod
    def key(cls, fingerprint: str) -> Identity:
        return cls(IdentityKind.KEY, fingerprint=fingerprint)

    @classmethod
    def peer_node(cls, node: str, fingerprint: str) -> Identity:
        return cls(IdentityKind.KEY, fingerprint=fingerprint, node=node)

    @classmethod
    def local_user(cls, uid: int) -> Identity:
        return cls(IdentityKind.LOCAL_USER, uid=uid)


INSECURE = Identity(IdentityKind.INSECURE)


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's answer: allowed or not, and why (the reason names what was refused)."""

    allowed: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.allowed


# -- authorized_keys ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProgramRule:
    """What one ``run=``/``exact=``/``plugin=`` option allows."""

    program: str
    patterns: tuple[str, ...] = ()
    exact: bool = False
    """``exact=``: the arguments must equal ``patterns`` (taken literally)."""
    plugin: bool = False

    def check(self, args: Sequence[str]) -> str | None:
        """What is wrong with running ``program`` with ``args`` under this rule, or None."""
        if self.exact:
            if list(args) != list(self.patterns):
                return f"only exactly {shlex.join([self.program, *self.patterns])!r} is allowed"
            return None
        for arg in args:
            if not any(fnmatch.fnmatchcase(arg, p) for p in self.patterns):
                allowed = ", ".join(repr(p) for p in self.patterns) if self.patterns else "none"
                return f"argument {arg!r} matches none of the allowed patterns ({allowed})"
        return None

    def option(self) -> str:
        """The option text that reads back as this rule."""
        name = "exact" if self.exact else "plugin" if self.plugin else "run"
        return f"{name}={_quote(shlex.join([self.program, *self.patterns]))}"


@dataclass(frozen=True, slots=True)
class AuthorizedKey:
    """One line of authorized_keys: a client key and what it may do."""

    key: PublicKey
    comment: str = ""
    rules: tuple[ProgramRule, ...] = ()
    tap: bool = False
    any: bool = False
    where: str = ""
    """``file:line`` it was read from (for messages)."""

    @property
    def fingerprint(self) -> str:
        return self.key.fingerprint

    def describe(self) -> str:
        who = f"key {self.fingerprint}" + (f" ({self.comment})" if self.comment else "")
        return who + (f" [{self.where}]" if self.where else "")

    def options(self) -> str:
        """The options field of this entry's line ("" for a key with no rights)."""
        options = [r.option() for r in self.rules]
        if self.tap:
            options.append("tap")
        if self.any:
            options.append("any")
        return ",".join(options)

    def format(self) -> str:
        """The line that :meth:`AuthorizedKeys.parse` reads back as this entry."""
        options = self.options()
        words = [options] if options else []
        words += [KEY_TYPE, self.key.z85]
        if self.comment:
            words.append(self.comment)
        return " ".join(words)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _scan_options(line: str, where: str) -> tuple[list[tuple[str, str | None]], str]:
    """Split ``OPTIONS rest`` into ``[(name, value or None)]`` and the rest of the line."""
    options: list[tuple[str, str | None]] = []
    i, n = 0, len(line)
    while True:
        match = _OPTION_NAME_RE.match(line, i)
        if match is None:
            raise TrustFileError(f"{where}: expected an option name at column {i + 1}")
        name, i = match.group(), match.end()
        value: str | None = None
        if i < n and line[i] == "=":
            if i + 1 >= n or line[i + 1] != '"':
                raise TrustFileError(f'{where}: option {name}: write its value in double quotes: {name}="..."')
            i += 2
            chars: list[str] = []
            while True:
                if i >= n:
                    raise TrustFileError(f"{where}: option {name}: missing closing double quote")
                c = line[i]
                if c == "\\" and i + 1 < n and line[i + 1] in '"\\':
                    chars.append(line[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    chars.append(c)
                    i += 1
            value = "".join(chars)
        options.append((name, value))
        if i < n and line[i] == ",":
            i += 1
            continue
        if i < n and not line[i].isspace():
            raise TrustFileError(f"{where}: unexpected {line[i]!r} at column {i + 1} after option {name}")
        return options, line[i:].strip()


def program_rule(name: str, value: str | None, where: str) -> ProgramRule:
    """The rule of option ``name`` (``run``, ``exact``, ``plugin``) with ``value``; ``where`` names it in errors."""
    if value is None:
        raise TrustFileError(f'{where}: option {name} needs a value: {name}="PROG ..."')
    try:
        words = shlex.split(value)
    except ValueError as e:
        raise TrustFileError(f"{where}: option {name}: {e}") from None
    if not words:
        raise TrustFileError(f"{where}: option {name}: empty; give a program name")
    program = words[0]
    if not _NAME_RE.fullmatch(program):
        raise TrustFileError(
            f"{where}: option {name}: {program!r} is not a bare program name "
            "(no '/', no wildcards, no shell characters); the node finds it on its PATH"
        )
    return ProgramRule(program, tuple(words[1:]), exact=name == "exact", plugin=name == "plugin")


def _parse_key_line(line: str, where: str) -> AuthorizedKey:
    if not line.startswith(KEY_TYPE + " ") and f" {KEY_TYPE} " not in line:
        raise TrustFileError(
            f"{where}: expected '[OPTIONS] {KEY_TYPE} KEY [COMMENT]': no '{KEY_TYPE}' before a key "
            "(the line 'dpipes keys' prints for a key)"
        )
    if line.startswith(KEY_TYPE + " "):
        options: list[tuple[str, str | None]] = []
        rest = line
    else:
        options, rest = _scan_options(line, where)
    words = rest.split(None, 2)
    if len(words) < 2 or words[0] != KEY_TYPE:
        raise TrustFileError(f"{where}: expected '[OPTIONS] {KEY_TYPE} KEY [COMMENT]'")
    try:
        key = PublicKey.parse(words[1])
    except ValueError as e:
        raise TrustFileError(f"{where}: {e}") from None
    rules: list[ProgramRule] = []
    flags: set[str] = set()
    for name, value in options:
        if name in ("run", "exact", "plugin"):
            rules.append(program_rule(name, value, where))
        elif name in ("tap", "any"):
            if value is not None:
                raise TrustFileError(f"{where}: option {name} takes no value")
            flags.add(name)
        else:
            raise TrustFileError(f"{where}: unknown option {name!r}; known: run, exact, plugin, tap, any")
    comment = words[2].strip() if len(words) > 2 else ""
    return AuthorizedKey(key, comment, tuple(rules), tap="tap" in flags, any="any" in flags, where=where)


def _lines(text: str, source: str) -> Iterable[tuple[str, str]]:
    """``(where, line)`` for each line that is not blank or a comment."""
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        if len(raw) > MAX_LINE_CHARS:
            raise TrustFileError(f"{where}: line longer than {MAX_LINE_CHARS} characters")
        line = raw.strip()
        if line and not line.startswith("#"):
            yield where, line


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except UnicodeDecodeError as e:
        raise TrustFileError(f"{path}: not UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise TrustFileError(f"{path}: cannot read: {e.strerror or e}") from None


def _write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, mode 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, slots=True)
class AuthorizedKeys:
    """The parsed authorized_keys: client keys and their rights."""

    entries: tuple[AuthorizedKey, ...] = ()

    @classmethod
    def parse(cls, text: str, source: str = AUTHORIZED_KEYS) -> AuthorizedKeys:
        """Parse the file's text; ``source`` names it in errors (``source:line: problem``).

        Raises:
            TrustFileError: a malformed line, or a key listed twice.
        """
        entries: list[AuthorizedKey] = []
        seen: dict[str, str] = {}
        for where, line in _lines(text, source):
            entry = _parse_key_line(line, where)
            if entry.fingerprint in seen:
                raise TrustFileError(f"{where}: key {entry.fingerprint} is already listed at {seen[entry.fingerprint]}")
            seen[entry.fingerprint] = where
            entries.append(entry)
        return cls(tuple(entries))

    @classmethod
    def load(cls, path: Path) -> AuthorizedKeys:
        """The file at ``path``; a missing file trusts nobody."""
        return cls.parse(_read(path), str(path))

    def get(self, fingerprint: str) -> AuthorizedKey | None:
        return next((e for e in self.entries if e.fingerprint == fingerprint), None)

    def with_entry(self, entry: AuthorizedKey) -> AuthorizedKeys:
        """These entries with ``entry`` added, or replacing the entry of the same key."""
        others = tuple(e for e in self.entries if e.fingerprint != entry.fingerprint)
        return AuthorizedKeys((*others, replace(entry, where="")))

    def without(self, match: str) -> tuple[AuthorizedKeys, list[AuthorizedKey]]:
        """These entries less those whose fingerprint, key or comment is ``match``; and those."""
        gone = [e for e in self.entries if match in (e.fingerprint, e.key.z85, e.comment)]
        return AuthorizedKeys(tuple(e for e in self.entries if e not in gone)), gone

    def format(self) -> str:
        head = "# dpipes authorized client keys: [OPTIONS] curve KEY [COMMENT]; see 'dpipes keys --help'\n"
        return head + "".join(e.format() + "\n" for e in self.entries)

    def save(self, path: Path) -> None:
        _write(path, self.format())


# -- known_nodes -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KnownNode:
    """One line of known_nodes: a node's pinned fingerprint, and its key when known."""

    node: str
    fingerprint: str
    key: PublicKey | None = None
    where: str = ""

    def format(self) -> str:
        return " ".join([self.node, self.fingerprint, *([self.key.z85] if self.key else [])])


def parse_fingerprint_or_key(text: str) -> tuple[str, PublicKey | None]:
    """``SHA256:...`` or a Z85 key, as ``(fingerprint, key or None)``.

    Raises:
        ValueError: neither.
    """
    if text.startswith(FINGERPRINT_PREFIX):
        if not _FINGERPRINT_RE.fullmatch(text):
            raise ValueError(f"{text!r} is not a fingerprint (SHA256: and 43 base64 characters)")
        return text, None
    key = PublicKey.parse(text)
    return key.fingerprint, key


@dataclass
class KnownNodes:
    """The parsed known_nodes, with the lookups and updates of trust on first use.

    Mutable: trust on first use records a node as it is first seen; :meth:`save` writes it back.
    """

    entries: dict[str, KnownNode] = field(default_factory=dict)
    tofu: bool = False
    """Trust on first use: record an unknown node's key instead of refusing it."""
    path: Path | None = None
    """Where :meth:`check` saves what trust on first use recorded (None: nowhere)."""

    @classmethod
    def parse(cls, text: str, source: str = KNOWN_NODES, *, tofu: bool = False) -> KnownNodes:
        """Parse the file's text.

        Raises:
            TrustFileError: a malformed line, or a node listed twice.
        """
        entries: dict[str, KnownNode] = {}
        for where, line in _lines(text, source):
            words = line.split()
            if len(words) not in (2, 3):
                raise TrustFileError(f"{where}: expected 'NODE FINGERPRINT [KEY]'")
            node = words[0]
            if not _NODE_RE.fullmatch(node):
                raise TrustFileError(f"{where}: {node!r} is not a node name")
            if node in entries:
                raise TrustFileError(f"{where}: node {node} is already listed at {entries[node].where}")
            try:
                fp, _ = parse_fingerprint_or_key(words[1])
                key = PublicKey.parse(words[2]) if len(words) == 3 else None
            except ValueError as e:
                raise TrustFileError(f"{where}: {e}") from None
            if key is not None and key.fingerprint != fp:
                raise TrustFileError(f"{where}: the key's fingerprint is {key.fingerprint}, not {fp}")
            entries[node] = KnownNode(node, fp, key, where)
        return cls(entries, tofu=tofu)

    @classmethod
    def load(cls, path: Path, *, tofu: bool = False) -> KnownNodes:
        known = cls.parse(_read(path), str(path), tofu=tofu)
        known.path = path
        return known

    def key_for(self, node: str) -> PublicKey | None:
        """The pinned key of ``node`` (what a link to it connects with), if one is recorded."""
        entry = self.entries.get(node)
        return entry.key if entry is not None else None

    def node_of(self, fingerprint: str) -> str | None:
        """The node pinned to ``fingerprint``, if any."""
        return next((n for n, e in self.entries.items() if e.fingerprint == fingerprint), None)

    def pin(self, node: str, fingerprint_or_key: str) -> KnownNode:
        """Pin ``node`` to a fingerprint or a key (replacing an earlier pin).

        Raises:
            ValueError: a bad node name, fingerprint or key.
        """
        if not _NODE_RE.fullmatch(node):
            raise ValueError(f"{node!r} is not a node name")
        fp, key = parse_fingerprint_or_key(fingerprint_or_key)
        entry = KnownNode(node, fp, key)
        self.entries[node] = entry
        return entry

    def forget(self, node: str) -> bool:
        return self.entries.pop(node, None) is not None

    def check(self, node: str, key: PublicKey) -> KnownNode:
        """Whether ``node`` may present ``key``: the pin that says so (recorded now, with TOFU).

        Raises:
            KeyChanged: ``node`` is pinned to another key; the message names both fingerprints.
            UnknownNode: ``node`` is not pinned and trust on first use is off.
        """
        entry = self.entries.get(node)
        if entry is None:
            if not self.tofu:
                raise UnknownNode(
                    f"node {node} (key {key.fingerprint}) is not a known node; if that fingerprint is the one "
                    f"'dpipes keys' shows on {node}, pin it: dpipes keys pin {node} {key.fingerprint}"
                )
            entry = self.entries[node] = KnownNode(node, key.fingerprint, key)
            log.warning("trusting node %s on first use: key %s (recorded in %s)", node, key.fingerprint, self.path)
            if self.path is not None:
                self.save(self.path)
            return entry
        if entry.fingerprint != key.fingerprint:
            where = f" ({entry.where})" if entry.where else ""
            raise KeyChanged(
                f"node {node} presented key {key.fingerprint}, but it is pinned to {entry.fingerprint}{where}: "
                f"REFUSED. Someone may be impersonating {node}, or its key was replaced. If you know it was "
                f"replaced, check the new fingerprint on {node} itself, then: dpipes keys pin {node} {key.fingerprint}"
            )
        if entry.key is None:  # pinned by fingerprint: now we know the key that goes with it
            entry = self.entries[node] = replace(entry, key=key)
            if self.path is not None:
                self.save(self.path)
        return entry

    def format(self) -> str:
        head = "# dpipes known nodes: NODE FINGERPRINT [KEY]; see 'dpipes keys --help'\n"
        return head + "".join(e.format() + "\n" for e in self.entries.values())

    def save(self, path: Path) -> None:
        _write(path, self.format())


# -- the store and the policy ------------------------------------------------------------------


@dataclass
class TrustStore:
    """Which CURVE keys may connect to a node: its authorized clients and its known nodes.

    :meth:`admits` is what the ZAP handler calls for each new connection; it decides only
    whether the key may connect. What the caller may then do is :class:`KeyPolicy`'s to decide.
    """

    clients: AuthorizedKeys = field(default_factory=AuthorizedKeys)
    nodes: KnownNodes = field(default_factory=KnownNodes)

    @classmethod
    def load(cls, directory: Path, *, tofu: bool = False) -> TrustStore:
        """authorized_keys and known_nodes from the key directory (missing files trust nobody)."""
        return cls(
            AuthorizedKeys.load(directory / AUTHORIZED_KEYS), KnownNodes.load(directory / KNOWN_NODES, tofu=tofu)
        )

    def admits(self, key: PublicKey) -> Decision:
        """Whether ``key`` may connect: an authorized client, or a node pinned to it."""
        fp = key.fingerprint
        if (entry := self.clients.get(fp)) is not None:
            return Decision(True, f"authorized client {entry.describe()}")
        if (node := self.nodes.node_of(fp)) is not None:
            return Decision(True, f"known node {node}")
        if self.nodes.tofu:
            return Decision(True, f"unknown key {fp}, admitted for trust on first use as a node")
        return Decision(False, f"key {fp} is neither an authorized client nor a known node")


@dataclass
class KeyPolicy:
    """What an authenticated caller may do on this node, from authorized_keys.

    The node's policy calls :meth:`may_run` before a stage starts and :meth:`may_tap` before a tap
    subscribes; a refusal's reason names the caller, the program or argument, and the line.
    The daemon's own user on the Unix socket, and anyone on an ``--insecure`` node, may do
    everything (the node's own allow-list still applies).
    """

    clients: AuthorizedKeys = field(default_factory=AuthorizedKeys)
    nodes: KnownNodes = field(default_factory=KnownNodes)

    def _entry(self, identity: Identity) -> AuthorizedKey | Decision:
        if identity.kind is not IdentityKind.KEY:
            return Decision(True, str(identity))
        entry = self.clients.get(identity.fingerprint)
        if entry is None:
            node = self.nodes.node_of(identity.fingerprint)
            why = f"it is node {node}'s key, not a client's" if node else "it is not in authorized_keys"
            return Decision(False, f"{identity} may not run anything here: {why}")
        return entry

    def may_run(self, identity: Identity, argv: Sequence[str], *, plugin: bool = False) -> Decision:
        """Whether ``identity`` may run ``argv`` (a program, or with ``plugin`` a plugin) here."""
        found = self._entry(identity)
        if isinstance(found, Decision):
            return found
        if not argv:
            return Decision(False, "empty command line")
        what = "plugin" if plugin else "program"
        if found.any:
            return Decision(True, f"{found.describe()} may run anything")
        rules = [r for r in found.rules if r.program == argv[0] and r.plugin == plugin]
        if not rules:
            allowed = sorted({r.program for r in found.rules if r.plugin == plugin})
            listed = ", ".join(allowed) if allowed else "none"
            return Decision(False, f"{found.describe()} may not run {what} {argv[0]!r} (allowed: {listed})")
        problems = []
        for rule in rules:
            problem = rule.check(argv[1:])
            if problem is None:
                return Decision(True, f"{found.describe()} may run {shlex.join(argv)!r} under {rule.option()}")
            problems.append(problem)
        return Decision(False, f"{found.describe()} may not run {shlex.join(argv)!r}: {'; '.join(problems)}")

    def may_tap(self, identity: Identity) -> Decision:
        """Whether ``identity`` may subscribe to this node's tap (which shows all its traffic)."""
        found = self._entry(identity)
        if isinstance(found, Decision):
            return found
        if found.tap or found.any:
            return Decision(True, f"{found.describe()} may tap")
        return Decision(False, f"{found.describe()} may not tap this node (no 'tap' option)")
