"""Node configuration: TOML files, then command-line overrides, later winning.

Sources, in order (each may set any key; a later one replaces a value, and merges into tables):

1. The system files ``/etc/dpipesd.conf``, then ``$XDG_CONFIG_HOME/dpipes/dpipesd.toml``
   (``~/.config/dpipes/dpipesd.toml`` when ``XDG_CONFIG_HOME`` is unset, empty or relative, as the
   XDG base directory specification says), then ``~/.dpipesdrc``, each skipped if missing. This
   list is replaced by the ``search_paths`` argument of :func:`load_config` or, when that is not
   given, by the environment variable ``DPIPES_CONFIG_PATHS``: file names separated by ``:``
   (``os.pathsep``); set but empty means "no system files". Tests and packagers use it.
2. ``config_file``, the daemon's ``--config FILE``, which must exist.
3. ``overrides`` from the command line: the same keys, nested mappings or dotted names
   (``{"limits.max_stages": 8}``); :func:`parse_override` turns ``KEY=VALUE`` text into one.

Keys::

    name = "alpha"                  # node name (default: this host's name and 4 hex digits of its
                                    # machine id, e.g. raspberrypi-3fa2: same-named hosts differ)
    listen = "127.0.0.1:5757"       # HOST:PORT the hub's ROUTER binds; [v6addr]:PORT for IPv6;
                                    # peers and remote clients need a key the node trusts
    allow = ["sort -r -n '-k[0-9]*'", "uniq -c"]
                                    # what this node runs; absent = any program it has (see below)
    metadata_key = "__dpipes"       # root key of per-object metadata in json/yaml mode
    metadata_argv = false           # ... with the producing program's argv as dp.argv
    metadata_environ = ["LANG"]     # ... with these variables of its environment as dp.environ
    metadata_credential = false     # ... with whom it ran for as dp.credential: the caller's key
                                    # fingerprint or local user, as the transport authenticated it
                                    # (DPIPES_USER); left out on a node without keys
    pass_env = ["http_proxy"]       # variables of the daemon's environment stages also get; by
                                    # default a stage gets PATH, HOME, USER, LOGNAME, LANG, LC_*,
                                    # TZ, TMPDIR and dpipes' own, never the rest (its secrets):
                                    # see dpipes.nodes.stage_env
    insecure = false                # run without keys: anyone who reaches the port runs programs
                                    # as this user (loudly logged); for a trusted lab only
    key_dir = "/etc/dpipes"         # the node's key pair and trust files (default: $DPIPES_KEY_DIR,
                                    # else $XDG_CONFIG_HOME/dpipes; see dpipes.bus.keys)
    trust_on_first_use = false      # record an unknown peer node's key when first seen, instead of
                                    # refusing it; a changed key is refused either way
    interfaces = ["eth0"]           # interfaces for discovery and listening; empty = all
    workdir = "~"                   # where stages of callers on other hosts start (~: the node
                                    # user's home, as ssh); a caller on this host gives its own

    [nodes]                         # static peers, for networks where mDNS does not reach
    beta = "10.0.0.2:5757"

    [apps.sort]                     # per-program settings
    version = "9.1"                 # the version negotiation checks constraints against
    path = "/opt/coreutils/bin/sort"

    [limits]
    max_stages = 64                 # stages one pipeline may have
    credit_bytes = 16777216         # window of each stream into a stage here (at least 8 MiB)
    plugin_callback_s = 300         # a plugin callback running longer fails its stage (seconds)
    plugin_workers_ready = 2        # plugin workers kept started ahead of need (0: fork one per stage)
    max_clients = 512               # clients (dpipes commands, plugin workers, remote clients)
                                    # attached at once; one more is refused
    max_clients_per_address = 128   # of those, from one remote address or one local user
    client_backlog_bytes = 67108864 # held for one client that does not read (64 MiB); past it
                                    # the client is detached
    max_held_bytes = 1073741824     # held for all senders together (1 GiB): the streams queued
                                    # into this node's stages and endpoints, and every client's
                                    # backlog; data past it is refused (ERROR over-limit). At
                                    # least credit_bytes, so that one stream always fits; each
                                    # stalled stream into a stage may hold its whole window, so
                                    # keep it at least credit_bytes x the stalled streams you
                                    # expect at once (the default fits 64 of 16 MiB)

``allow``: each entry is ``"PROG"`` or ``"PROG PATTERN..."`` (``"%PLUGIN ..."`` for a plugin), in
shell words. ``PROG`` is a bare name, compared exactly (``/bin/sh``, ``../sh``, ``c?t`` never
match ``sh`` or ``cat``). **A bare ``"PROG"`` allows any arguments, so everything that program
can do**: ``"sort"`` lets a caller run ``sort --compress-program=evil.sh`` (which runs
``evil.sh``) and ``sort -o FILE`` (which writes any file this node's user can); ``"sh"``,
``"env"``, ``"python3"``, ``"find"`` or ``"awk"`` give the caller a shell. With patterns, every
argument must match one of them (:func:`fnmatch.fnmatchcase`, the rule of ``run=`` in
``authorized_keys``, :mod:`dpipes.bus.trust`): ``"sort -r -n '-k[0-9]*'"`` allows ``sort -r -k2``
and refuses ``sort -o out`` and ``sort --compress-program=x``. Name each option you allow; a
pattern such as ``*`` or ``-*`` lets them all through again. The list applies to everyone,
the node's owner too; ``authorized_keys`` restricts each key further.

:attr:`NodeConfig.origins` says which source set each key; :func:`format_config` shows the
effective configuration as TOML, each value with where it came from (``dpipesd --print-config``).

A bad source is a :class:`~dpipes.bus.errors.ConfigError` naming the file (or "command line"), the
key and the problem: unknown keys (with a did-you-mean), wrong types, bad ``HOST:PORT`` values, and
invalid TOML (with its line and column).
"""

# About 750 lines, one job: the key table above (the first 90 lines, what users read), its
# checkers, and where each value came from. Showing it (format_config) is its last 80 lines.

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from dpipes.bus.codec import (
    CLIENT_BACKLOG_BYTES,
    INITIAL_CREDIT_BYTES,
    MAX_CLIENTS,
    MAX_CLIENTS_PER_ADDRESS,
    MAX_HELD_BYTES,
)
from dpipes.bus.errors import ConfigError, TrustFileError
from dpipes.bus.trust import ProgramRule, program_rule
from dpipes.discovery.txt import node_name_problem as check_node_name

__all__ = [
    "CONFIG_PATHS_ENV",
    "DEFAULT_PORT",
    "SYSTEM_CONFIG_PATHS",
    "AppConfig",
    "HostPort",
    "Limits",
    "NodeConfig",
    "default_node_name",
    "format_config",
    "load_config",
    "parse_override",
]

SYSTEM_CONFIG_PATHS: tuple[str, ...] = ("/etc/dpipesd.conf", "$XDG_CONFIG_HOME/dpipes/dpipesd.toml", "~/.dpipesdrc")
XDG_CONFIG_HOME = "$XDG_CONFIG_HOME"
XDG_CONFIG_DEFAULT = "~/.config"  # the XDG base directory specification's default
CONFIG_PATHS_ENV = "DPIPES_CONFIG_PATHS"
DEFAULT_PORT = 5757
# Every bus stream opens with the protocol's initial credit, which a receiver cannot take back: a
# smaller window could not be enforced, so it is refused rather than silently raised.
MIN_CREDIT_BYTES = INITIAL_CREDIT_BYTES
# A client's backlog must take the data path's largest chunks (1 MiB), or a client whose pipe is
# full for a moment would be detached for one message.
MIN_CLIENT_BACKLOG_BYTES = 1 << 20
COMMAND_LINE = "command line"
_VARIABLE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PLUGIN_SIGIL = "%"  # an allow entry (and a stage) whose first word starts with it names a plugin

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")  # also matches IPv4


@dataclass(frozen=True, slots=True)
class HostPort:
    """A ``HOST:PORT`` address; ``str()`` gives it back, with IPv6 hosts in brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, allow_port_zero: bool = False) -> HostPort:
        """Parse ``HOST:PORT`` or ``[IPV6]:PORT``.

        Raises:
            ValueError: with what is wrong and an example.
        """
        example = "e.g. '0.0.0.0:5757', 'beta.lan:5757' or '[::1]:5757'"
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"{text!r} is not [IPV6]:PORT ({example})")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"{host!r} in {text!r} is not an IPv6 address") from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise ValueError(f"{text!r} is not HOST:PORT ({example})")
            if ":" in host:
                raise ValueError(f"{text!r}: put an IPv6 address in brackets ({example})")
            if host != "*" and not _HOSTNAME_RE.fullmatch(host):
                raise ValueError(f"{host!r} in {text!r} is not a host name or IP address")
            if host.replace(".", "").isdigit():
                try:
                    ipaddress.IPv4Address(host)
                except ValueError:
                    raise ValueError(f"{host!r} in {text!r} is not an IPv4 address") from None
        if not port_text.isascii() or not port_text.isdigit():
            raise ValueError(f"port {port_text!r} in {text!r} is not a number ({example})")
        port = int(port_text)
        low = 0 if allow_port_zero else 1
        if not low <= port <= 65535:
            raise ValueError(f"port {port} in {text!r} is out of range {low}-65535")
        return cls(host, port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AppConfig:
    """Settings of one program this node offers."""

    version: str | None = None
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-node limits."""

    max_stages: int = 64
    credit_bytes: int = INITIAL_CREDIT_BYTES  # the window of each stream into a stage on this node
    plugin_callback_s: int = 300  # the longest one plugin callback may run before its stage fails
    plugin_workers_ready: int = 2  # idle plugin workers kept, imports done (dpipes.nodes.worker_pool)
    max_clients: int = MAX_CLIENTS  # clients attached to the hub at once
    max_clients_per_address: int = MAX_CLIENTS_PER_ADDRESS  # of those, from one address or local user
    client_backlog_bytes: int = CLIENT_BACKLOG_BYTES  # held for one client that does not read
    max_held_bytes: int = MAX_HELD_BYTES  # held by the hub for all its senders together


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """A node's whole configuration. Not hashable (it holds read-only mappings)."""

    name: str
    listen: HostPort = HostPort("127.0.0.1", DEFAULT_PORT)
    nodes: Mapping[str, HostPort] = field(default_factory=lambda: MappingProxyType({}))
    allow: frozenset[str] | None = None
    """What this node may run (``PROG [PATTERN...]`` entries, :func:`allow_rule`); None: no allow-list."""
    apps: Mapping[str, AppConfig] = field(default_factory=lambda: MappingProxyType({}))
    metadata_key: str = "__dpipes"
    metadata_argv: bool = False
    """Object modes: put the producing program's argv in each object's metadata (``dp.argv``)."""
    metadata_environ: tuple[str, ...] = ()
    """Object modes: these environment variables of the producing stage go in ``dp.environ``."""
    metadata_credential: bool = False
    """Object modes: whom the producing stage ran for (``DPIPES_USER``) goes in ``dp.credential``."""
    pass_env: tuple[str, ...] = ()
    """Variables of the daemon's environment that stages get besides the clean set (:mod:`dpipes.nodes.stage_env`)."""
    limits: Limits = Limits()
    insecure: bool = False
    key_dir: str | None = None
    """The key directory (None: :func:`dpipes.bus.keys.key_dir`)."""
    trust_on_first_use: bool = False
    interfaces: tuple[str, ...] = ()
    workdir: str = "~"
    """Where a stage starts unless it runs on its caller's host (then: the caller's directory)."""
    sources: tuple[str, ...] = ()
    """The files that were read, in order, then "command line" if there were overrides."""
    origins: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False)
    """The source (a file, or "command line") that set each key, by dotted key (``nodes.beta``,
    ``apps.sort.path``, ``limits.max_stages``); a key missing here has its default."""


MACHINE_ID_PATHS = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def default_node_name() -> str:
    """This host's name, made into a valid node name (first DNS label, other characters as '-'),
    and a suffix of four hex digits from this machine's identity.

    Hosts are often named alike (every Raspberry Pi is ``raspberrypi``); the bus routes by node
    name, so the suffix keeps two such hosts apart, and stays the same across restarts. It comes
    from ``/etc/machine-id`` (systemd's, unique per installation), else from a MAC address.
    """
    label = socket.gethostname().split(".", 1)[0]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", label).lstrip("-_")[:48] or "node"
    return f"{name}-{_machine_suffix()}"


def _machine_suffix() -> str:
    for path in MACHINE_ID_PATHS:
        try:
            with open(path, "rb") as f:
                machine = f.read().strip()
        except OSError:
            continue
        if machine:
            return hashlib.sha256(b"dpipes node name:" + machine).hexdigest()[:4]
    return hashlib.sha256(b"dpipes node name:%d" % uuid.getnode()).hexdigest()[:4]


# -- validation: each function takes a raw TOML value and returns the normalised one, or raises
# _Bad(problem); the caller adds the source and the key.


class _Bad(Exception):
    pass


def _type_name(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    kind = names.get(type(value), type(value).__name__)
    return f"{kind} {value!r}" if isinstance(value, (bool, int, float, str)) else kind


def _string(value: object, hint: str = "") -> str:
    if not isinstance(value, str):
        extra = "; quote it" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        raise _Bad(f"expected a string{hint}, got {_type_name(value)}{extra}")
    if not value:
        raise _Bad("must not be empty")
    return value


def _node_name(value: object) -> str:
    name = _string(value)
    problem = check_node_name(name)
    if problem is not None:
        raise _Bad(problem)
    return name


def _address(value: object, *, allow_port_zero: bool) -> HostPort:
    try:
        return HostPort.parse(_string(value, " 'HOST:PORT'"), allow_port_zero=allow_port_zero)
    except ValueError as e:
        raise _Bad(str(e)) from None


def _listen(value: object) -> HostPort:
    return _address(value, allow_port_zero=True)  # port 0: bind any free port (tests)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_type_name(value)}")
    return value


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Bad(f"expected an array of strings, got {_type_name(value)}")
    out = []
    for i, item in enumerate(value):
        try:
            out.append(_string(item))
        except _Bad as e:
            raise _Bad(f"item {i}: {e}") from None
    return tuple(out)


def _variable_names(value: object) -> tuple[str, ...]:
    names = _strings(value)
    for i, name in enumerate(names):
        if not _VARIABLE_RE.fullmatch(name):
            raise _Bad(f"item {i}: {name!r} is not an environment variable name")
    return names


def _absolute_path(value: object) -> str:
    path = os.path.expanduser(_string(value))
    if not os.path.isabs(path):
        raise _Bad(f"{value!r} is not an absolute path")
    return path


def _allow(value: object) -> frozenset[str]:
    entries = _strings(value)
    for i, entry in enumerate(entries):
        try:
            allow_rule(entry)
        except TrustFileError as e:
            raise _Bad(f"item {i}: {str(e).removeprefix('allow entry: ')}") from None
    return frozenset(entries)


def allow_rule(entry: str) -> ProgramRule:
    """What one ``allow`` entry allows (see the module docstring): ``PROG`` with any arguments,
    ``PROG PATTERN...`` with arguments each matching a pattern, ``%PLUGIN ...`` the same for a plugin.

    Raises:
        TrustFileError: not a bare program name, or not shell words.
    """
    plugin = entry.startswith(PLUGIN_SIGIL)
    text = entry[len(PLUGIN_SIGIL) :] if plugin else entry
    rule = program_rule("plugin" if plugin else "run", text, "allow entry")
    if not rule.patterns:  # a bare name: any arguments (unlike run= in authorized_keys: none)
        rule = replace(rule, patterns=("*",))
    return rule


def _positive_int(minimum: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Bad(f"expected an integer, got {_type_name(value)}")
        if value < minimum:
            raise _Bad(f"must be at least {minimum}, got {value}")
        return value

    return check


_TOP: dict[str, Callable[[object], object]] = {
    "name": _node_name,
    "listen": _listen,
    "allow": _allow,
    "metadata_key": _string,
    "metadata_argv": _bool,
    "metadata_environ": _strings,
    "metadata_credential": _bool,
    "pass_env": _variable_names,
    "insecure": _bool,
    "key_dir": _absolute_path,
    "trust_on_first_use": _bool,
    "interfaces": _strings,
    "workdir": _string,
}
_TABLES = ("nodes", "apps", "limits")
_LIMITS: dict[str, Callable[[object], int]] = {
    "max_stages": _positive_int(1),
    "credit_bytes": _positive_int(MIN_CREDIT_BYTES),
    "plugin_callback_s": _positive_int(1),
    "plugin_workers_ready": _positive_int(0),
    "max_clients": _positive_int(1),
    "max_clients_per_address": _positive_int(1),
    "client_backlog_bytes": _positive_int(MIN_CLIENT_BACKLOG_BYTES),
    "max_held_bytes": _positive_int(MIN_CREDIT_BYTES),
}
_APP_KEYS = ("version", "path")


class _Source:
    """One source being validated: knows its name for error messages."""

    def __init__(self, name: str) -> None:
        self.name = name

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.name}: key {key!r}: {problem}")

    def unknown(self, key: str, known: Sequence[str]) -> ConfigError:
        import difflib  # only for a mistyped key

        last = key.rpartition(".")[2]
        close = difflib.get_close_matches(last, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "known keys: " + ", ".join(sorted(known))
        return ConfigError(f"{self.name}: unknown key {key!r}; {hint}")

    def table(self, key: str, value: object) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_type_name(value)}")
        return value

    def validate(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """Check every key of one source; return the normalised values it sets."""
        out: dict[str, Any] = {}
        for key, value in raw.items():
            if key in _TOP:
                try:
                    out[key] = _TOP[key](value)
                except _Bad as e:
                    raise self.error(key, str(e)) from None
            elif key == "nodes":
                out[key] = self.nodes(self.table(key, value))
            elif key == "apps":
                out[key] = self.apps(self.table(key, value))
            elif key == "limits":
                out[key] = self.limits(self.table(key, value))
            else:
                raise self.unknown(key, [*_TOP, *_TABLES])
        return out

    def nodes(self, raw: Mapping[str, Any]) -> dict[str, HostPort]:
        out = {}
        for name, value in raw.items():
            key = f"nodes.{name}"
            problem = check_node_name(name)
            if problem is not None:
                raise self.error(key, problem)
            try:
                out[name] = _address(value, allow_port_zero=False)
            except _Bad as e:
                raise self.error(key, str(e)) from None
        return out

    def apps(self, raw: Mapping[str, Any]) -> dict[str, dict[str, str]]:
        out = {}
        for program, value in raw.items():
            settings = self.table(f"apps.{program}", value)
            if not program or "/" in program:
                raise self.error(f"apps.{program}", "the table name must be a program name, without '/'")
            checked = {}
            for key, item in settings.items():
                if key not in _APP_KEYS:
                    raise self.unknown(f"apps.{program}.{key}", _APP_KEYS)
                try:
                    checked[key] = _string(item, ' like "9.1"' if key == "version" else "")
                except _Bad as e:
                    raise self.error(f"apps.{program}.{key}", str(e)) from None
            if "path" in checked and not os.path.isabs(checked["path"]):
                raise self.error(f"apps.{program}.path", f"{checked['path']!r} is not an absolute path")
            out[program] = checked
        return out

    def limits(self, raw: Mapping[str, Any]) -> dict[str, int]:
        out = {}
        for key, value in raw.items():
            if key not in _LIMITS:
                raise self.unknown(f"limits.{key}", list(_LIMITS))
            try:
                out[key] = _LIMITS[key](value)
            except _Bad as e:
                raise self.error(f"limits.{key}", str(e)) from None
        return out


def _merge(into: dict[str, Any], layer: Mapping[str, Any]) -> None:
    for key, value in layer.items():
        if key in _TABLES:
            table = into.setdefault(key, {})
            for name, item in value.items():
                if key == "apps":
                    table[name] = {**table.get(name, {}), **item}
                else:
                    table[name] = item
        else:
            into[key] = value


def _nest(overrides: Mapping[str, object]) -> dict[str, Any]:
    """``{"limits.max_stages": 8}`` to ``{"limits": {"max_stages": 8}}``."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, last = key.split(".")
        where = nested
        for part in parents:
            child = where.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{COMMAND_LINE}: key {key!r}: {part!r} is not a table")
            where = child
        if isinstance(value, Mapping) and isinstance(where.get(last), dict):
            where[last].update(value)
        else:
            where[last] = dict(value) if isinstance(value, Mapping) else value
    return nested


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    import tomllib  # only once a file exists: a node started without one never loads the parser

    try:
        return tomllib.loads(data.decode())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 ({e.reason} at byte {e.start})") from None


def _system_paths(search_paths: Sequence[str | os.PathLike[str]] | None, environ: Mapping[str, str]) -> list[Path]:
    if search_paths is None:
        listed = environ.get(CONFIG_PATHS_ENV)
        search_paths = SYSTEM_CONFIG_PATHS if listed is None else [p for p in listed.split(os.pathsep) if p]
    paths = []
    for p in search_paths:
        text = os.fspath(p)
        if text.startswith(XDG_CONFIG_HOME):
            base = environ.get("XDG_CONFIG_HOME", "")
            if not os.path.isabs(base):  # unset, empty or relative: the specification's default
                base = XDG_CONFIG_DEFAULT
            text = base + text[len(XDG_CONFIG_HOME) :]
        try:
            paths.append(Path(text).expanduser())
        except RuntimeError:  # "~" with no home directory: there is no such file to read
            continue
    return paths


def load_config(
    *,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, object] | None = None,
    search_paths: Sequence[str | os.PathLike[str]] | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Read the configuration sources in order (see the module docstring) into a NodeConfig.

    Args:
        config_file: the ``--config FILE``; it must exist.
        overrides: command-line values, by key (nested mappings or dotted keys).
        search_paths: the system files to try instead of ``SYSTEM_CONFIG_PATHS``.
        environ: where to look up ``DPIPES_CONFIG_PATHS`` (default ``os.environ``).

    Raises:
        ConfigError: naming the file, the key and the problem.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    sources: list[str] = []
    origins: dict[str, str] = {}

    def layer(source: str, raw: Mapping[str, Any]) -> None:
        values = _Source(source).validate(raw)
        _merge(merged, values)
        origins.update(dict.fromkeys(_leaf_keys(values), source))
        sources.append(source)

    for path in _system_paths(search_paths, environ):
        try:
            raw = _read(path)
        except FileNotFoundError:
            continue
        layer(str(path), raw)
    if config_file is not None:
        path = Path(config_file)
        try:
            raw = _read(path)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found (given with --config)") from None
        layer(str(path), raw)
    if overrides:
        layer(COMMAND_LINE, _nest(overrides))
    config = replace(_build(merged, tuple(sources)), origins=MappingProxyType(origins))
    _check_limits(config)
    return config


def _leaf_keys(values: Mapping[str, Any]) -> list[str]:
    """The dotted keys one validated source sets: ``name``, ``nodes.beta``, ``apps.sort.path``."""
    keys = []
    for key, value in values.items():
        if key == "apps":
            keys += [f"apps.{program}.{k}" for program, settings in value.items() for k in settings]
        elif key in _TABLES:
            keys += [f"{key}.{k}" for k in value]
        else:
            keys.append(key)
    return keys


def _build(merged: Mapping[str, Any], sources: tuple[str, ...]) -> NodeConfig:
    config = NodeConfig(name=merged.get("name") or default_node_name(), sources=sources)
    changes: dict[str, Any] = {k: v for k, v in merged.items() if k not in _TABLES and k != "name"}
    if "nodes" in merged:
        changes["nodes"] = MappingProxyType(dict(sorted(merged["nodes"].items())))
    if "apps" in merged:
        changes["apps"] = MappingProxyType({k: AppConfig(**v) for k, v in sorted(merged["apps"].items())})
    if "limits" in merged:
        changes["limits"] = replace(config.limits, **merged["limits"])
    return replace(config, **changes)


def _check_limits(config: NodeConfig) -> None:
    """What no one key can check alone: the hub-wide cap holds at least one stream's window."""
    limits = config.limits
    if limits.max_held_bytes < limits.credit_bytes:
        source = config.origins.get("limits.max_held_bytes") or config.origins.get("limits.credit_bytes", "default")
        raise ConfigError(
            f"{source}: key 'limits.max_held_bytes': must be at least limits.credit_bytes ({limits.credit_bytes}),"
            f" got {limits.max_held_bytes}: one stream into a stage may hold that much"
        )


def parse_override(text: str) -> tuple[str, object]:
    """Parse a command-line ``KEY=VALUE``; VALUE is read as a TOML value, else taken as a string.

    ``limits.max_stages=8`` gives ``("limits.max_stages", 8)``, ``insecure=true`` a boolean,
    ``allow=["sort","uniq"]`` a list, and ``listen=0.0.0.0:5757`` the string.

    Raises:
        ConfigError: no ``=``, or an empty key.
    """
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{COMMAND_LINE}: {text!r} is not KEY=VALUE (e.g. limits.max_stages=8)")
    value = value.strip()
    import tomllib

    try:
        parsed: object = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


# -- showing the effective configuration ---------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple, frozenset)):
        items = sorted(value) if isinstance(value, frozenset) else value
        return "[" + ", ".join(_toml_value(v) for v in items) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


def format_config(config: NodeConfig, *, labels: Mapping[str, str] | None = None) -> str:
    """The effective configuration as TOML that :func:`load_config` reads back, each value with
    a comment saying where it came from: ``default``, a file, or the command line.

    Args:
        config: what :func:`load_config` returned.
        labels: names for command-line values, by key or table (``{"listen": "--listen",
            "nodes": "--peer"}``), instead of "command line".
    """
    labels = labels or {}

    def origin(key: str) -> str:
        source = config.origins.get(key)
        if source is None:
            return "default (this host's name and machine id)" if key == "name" else "default"
        if source == COMMAND_LINE:
            return labels.get(key) or labels.get(key.split(".", 1)[0]) or COMMAND_LINE
        return source

    rows: list[tuple[str, str]] = []  # (TOML line, origin); "" origin: a header or blank line
    rows.append((f"name = {_toml_value(config.name)}", origin("name")))
    rows.append((f"listen = {_toml_value(str(config.listen))}", origin("listen")))
    if config.allow is None:
        rows.append(("# allow = [...]", "not set: any program this node has"))
    else:
        rows.append((f"allow = {_toml_value(config.allow)}", origin("allow")))
    for key in (
        "metadata_key",
        "metadata_argv",
        "metadata_environ",
        "metadata_credential",
        "pass_env",
        "insecure",
        "interfaces",
        "workdir",
    ):
        rows.append((f"{key} = {_toml_value(getattr(config, key))}", origin(key)))
    if config.key_dir is None:
        rows.append(("# key_dir = ...", "not set: $DPIPES_KEY_DIR, else $XDG_CONFIG_HOME/dpipes"))
    else:
        rows.append((f"key_dir = {_toml_value(config.key_dir)}", origin("key_dir")))
    rows.append((f"trust_on_first_use = {_toml_value(config.trust_on_first_use)}", origin("trust_on_first_use")))
    rows += [("", ""), ("[limits]", "")]
    for key in _LIMITS:
        rows.append((f"{key} = {getattr(config.limits, key)}", origin(f"limits.{key}")))
    rows += [("", ""), ("[nodes]", "")]
    if not config.nodes:
        rows.append(("# none: peers come from mDNS and gossip", ""))
    for name, address in config.nodes.items():
        rows.append((f"{_toml_key(name)} = {_toml_value(str(address))}", origin(f"nodes.{name}")))
    for program, app in config.apps.items():
        rows += [("", ""), (f"[apps.{_toml_key(program)}]", "")]
        for key in ("version", "path"):
            if getattr(app, key) is not None:
                rows.append((f"{key} = {_toml_value(getattr(app, key))}", origin(f"apps.{program}.{key}")))
    width = max(len(line) for line, why in rows if why)
    read = ", ".join(config.sources) or "none"
    out = [f"# the effective configuration of node {config.name}; sources read, later winning: {read}"]
    out += [f"{line.ljust(width)}  # {why}" if why else line for line, why in rows]
    return "\n".join(out) + "\n"
