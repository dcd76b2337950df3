"""dpipes over DNS-SD: service names and TXT records. This docstring is the spec.

Service type ``_dpipes._tcp.local.`` (RFC 6763). Every node registers two kinds of instances:

**The node instance** ``<node>._dpipes._tcp.local.`` -- instance name = node name. Node names
match ``NODE_NAME_RE``: 1-48 bytes of ``[A-Za-z0-9_-]``, starting with a letter or digit (no dots:
python-zeroconf splits names on dots; no ``@``: reserved for offer instances; 48 so that offer
instance names stay within one 63-byte DNS label). SRV target is ``dp-<instance id>.local.`` (one
host name per incarnation, so it never collides with the machine's own ``.local`` name or with a
previous incarnation), SRV port is the port of the ``bus`` endpoint (0 if it has none), A records
carry the interface addresses. TXT entries, each ``key=value`` with value in UTF-8:

====================  ===========================================================================
``txtvers=1``         format version (RFC 6763 section 6.7); a decoder rejects any other value
``n=<node>``          node name; must equal the instance name (case-insensitively)
``id=<instance id>``  1-64 of ``[0-9A-Za-z_-]``; later incarnations compare greater as strings
``pv=<int>``          the node's bus protocol version
``pk=<key>``          the node's CURVE public key: 40 characters of Z85 (its fingerprint, what
                      ``dpipes keys`` shows, is derived from it). Public by design; nothing secret
                      is ever advertised. Absent for a node without keys (``--insecure``): such a
                      record is still read, with no key
``ep.<key>=<url>``    one per endpoint, e.g. ``ep.bus=tcp://10.77.0.2:5555``; key ``[a-z0-9_-]``
                      1-32, at most 16 endpoints; advertised verbatim
``pr0=a,b,..``        offered programs, comma-separated, in chunks ``pr0``, ``pr1``, ... each
                      entry at most 255 bytes (the DNS character-string limit); names never span
                      two chunks
``pl0=a,b,..``        offered plugins, same chunking
``more=pr,pl``        present when the lists were cut to fit the budget (see below)
====================  ===========================================================================

Program and plugin names: 1-128 bytes, no ``,`` and no ASCII control characters. Keys are
case-insensitive and the first occurrence wins (RFC 6763 section 6.4); unknown keys are ignored.

**Size.** One entry is at most 255 bytes. The whole TXT record is kept within ``TXT_BUDGET_BYTES``
(1300, RFC 6763 section 6.2: the announcement then fits one Ethernet frame, no IP fragmentation;
python-zeroconf silently drops a packet over 8966 bytes). Mandatory entries that do not fit are a
``ConfigError``; programs, then plugins, are added in sorted order until the budget is reached and
the rest are omitted, flagged by ``more`` -- the full list is for the bus (negotiation) to tell.
A decoder accepts up to ``TXT_MAX_BYTES`` (8900) and ``TXT_MAX_ENTRIES`` entries and raises
:class:`TxtError` on anything malformed.

**Offers: each program or plugin is findable as** ``dp.<prog>``, i.e. as the DNS-SD subtype
``_dp-<label>._sub._dpipes._tcp.local.`` (RFC 6763 section 7.1). ``<label>`` is the program name
lower-cased, with every byte outside ``[a-z0-9-]`` written as ``_xx`` (hex), so ``python3.11``
becomes ``_dp-python3_2e11`` (a DNS label cannot hold the dot); over 63 bytes it is cut and ends in
a hash. Labels may collide (case, hashing): the offer's TXT carries the exact name and a browser
compares it. python-zeroconf registers one type per instance name, so each offer is its own small
instance ``<label>@<node>._dpipes._tcp.local.`` (``<hash>@<node>`` when too long) sharing the
node's SRV target and addresses, with TXT ``txtvers=1``, ``n=<node>``, ``id=<instance id>``,
``prog=<exact name>``, ``kind=program|plugin``. Browsers of the node type skip instance names
containing ``@``. At most ``MAX_OFFERS`` offers per node are registered (each costs a few records
per announcement); the rest are only in the node TXT.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from dpipes.bus.errors import ConfigError, DecodeError
from dpipes.bus.keys import PublicKey
from dpipes.discovery.table import NodeRecord

SERVICE_TYPE = "_dpipes._tcp.local."
TXT_VERSION = "1"
TXT_ENTRY_MAX_BYTES = 255  # RFC 1035 character-string: one length byte
TXT_BUDGET_BYTES = 1300  # RFC 6763 section 6.2: fits one Ethernet frame with the other records
TXT_MAX_BYTES = 8900  # RFC 6763 section 6.2 upper bound; decode limit
TXT_MAX_ENTRIES = 256
MAX_ENDPOINTS = 16
MAX_LIST_ITEMS = 4096
MAX_OFFERS = 64
MAX_PROGRAM_BYTES = 128
MAX_NODE_NAME_BYTES = 48
MAX_LABEL_BYTES = 63  # RFC 1035 label limit

NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,47}")
INSTANCE_ID_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
ENDPOINT_KEY_RE = re.compile(r"[a-z0-9_-]{1,32}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_LABEL_KEEP = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_SUFFIX = "." + SERVICE_TYPE

OfferKind = Literal["program", "plugin"]


class TxtError(DecodeError):
    """A TXT record (or service name) from the network is malformed or exceeds a limit."""


# -- names ---------------------------------------------------------------------------------------


def node_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a node name, or None if it is fine (for a user's input: a
    flag, a config key, a pin in a pipeline)."""
    if not name:
        return "a node name cannot be empty"
    if not NODE_NAME_RE.fullmatch(name):
        return (
            f"{name!r} is not a valid node name: use 1-48 letters, digits, '_' and '-', starting with a letter or digit"
        )
    return None


def check_node_name(name: str) -> str:
    """Return ``name`` if it can be advertised as a node name, else raise ConfigError."""
    if not isinstance(name, str) or not NODE_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"node name {name!r} cannot be advertised over mDNS: use 1-{MAX_NODE_NAME_BYTES} "
            "letters, digits, '-' or '_', starting with a letter or digit"
        )
    return name


def valid_program_name(program: str) -> bool:
    """True when ``program`` can be carried in a TXT list (1-128 bytes, no ',' or control chars)."""
    return (
        0 < len(program.encode("utf-8", "surrogatepass")) <= MAX_PROGRAM_BYTES
        and "," not in program
        and not _CONTROL_RE.search(program)
    )


def program_label(program: str) -> str:
    """The DNS label (without the ``_dp-`` prefix) that stands for ``program``; see the spec."""
    out: list[str] = []
    for ch in program.lower():
        if ch in _LABEL_KEEP:
            out.append(ch)
        else:
            out.extend(f"_{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
    label = "".join(out)
    room = MAX_LABEL_BYTES - len("_dp-")
    if len(label) > room:
        digest = hashlib.sha256(program.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        label = f"{label[: room - 13]}-{digest}"
    return label


def program_subtype(program: str) -> str:
    """The DNS-SD subtype under which ``dp.<program>`` is findable."""
    return f"_dp-{program_label(program)}._sub.{SERVICE_TYPE}"


def offer_instance(program: str, kind: OfferKind, node: str) -> str:
    """The instance name (no type suffix) of the offer of ``program`` by ``node``."""
    label = program_label(program) if kind == "program" else f"pl-{program_label(program)}"
    name = f"{label}@{node}"
    if len(name.encode()) > MAX_LABEL_BYTES:
        digest = hashlib.sha256(f"{kind}:{program}".encode("utf-8", "surrogatepass")).hexdigest()
        name = f"{digest[: MAX_LABEL_BYTES - 1 - len(node)]}@{node}"
    return name


def instance_from_service_name(service_name: str) -> str:
    """``alpha._dpipes._tcp.local.`` -> ``alpha``; TxtError if it is not of our type."""
    if not service_name.lower().endswith(_SUFFIX) or len(service_name) <= len(_SUFFIX):
        raise TxtError(f"service name {service_name!r} is not an instance of {SERVICE_TYPE}")
    return service_name[: -len(_SUFFIX)]


# -- raw TXT -------------------------------------------------------------------------------------


def parse_txt(data: bytes) -> dict[str, str | None]:
    """Split TXT rdata into ``{key: value}``; keys lower-cased, first occurrence wins.

    A key without ``=`` maps to None (RFC 6763 section 6.4 boolean attribute). Raises TxtError on
    a length byte past the end, more than ``TXT_MAX_BYTES``/``TXT_MAX_ENTRIES``, a non-ASCII or
    empty key, or a value that is not UTF-8.
    """
    if len(data) > TXT_MAX_BYTES:
        raise TxtError(f"TXT record of {len(data)} bytes exceeds the {TXT_MAX_BYTES}-byte limit")
    out: dict[str, str | None] = {}
    pos = 0
    entries = 0
    while pos < len(data):
        length = data[pos]
        start = pos + 1
        end = start + length
        if end > len(data):
            raise TxtError(f"TXT entry at byte {pos} claims {length} bytes, only {len(data) - start} left")
        pos = end
        if length == 0:
            continue  # RFC 6763 section 6.1: an empty TXT record is a single zero byte
        entries += 1
        if entries > TXT_MAX_ENTRIES:
            raise TxtError(f"TXT record has more than {TXT_MAX_ENTRIES} entries")
        raw_key, sep, raw_value = data[start:end].partition(b"=")
        if not raw_key or not raw_key.isascii() or _CONTROL_RE.search(raw_key.decode("ascii")):
            raise TxtError(f"TXT entry at byte {start - 1} has an invalid key {raw_key[:32]!r}")
        key = raw_key.decode("ascii").lower()
        if key in out:
            continue
        if not sep:
            out[key] = None
            continue
        try:
            out[key] = raw_value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TxtError(f"TXT value of {key!r} is not UTF-8") from exc
    return out


def build_txt(entries: Iterable[tuple[str, str | None]]) -> bytes:
    """Join ``(key, value)`` pairs into TXT rdata; ValueError if an entry exceeds 255 bytes."""
    out = bytearray()
    for key, value in entries:
        item = key.encode("ascii") if value is None else f"{key}={value}".encode()
        if len(item) > TXT_ENTRY_MAX_BYTES:
            raise ValueError(f"TXT entry {key!r} is {len(item)} bytes, over the {TXT_ENTRY_MAX_BYTES} limit")
        out.append(len(item))
        out += item
    return bytes(out)


def _entry_size(key: str, value: str) -> int:
    return 1 + len(key) + 1 + len(value.encode())


def _chunk_list(prefix: str, items: Sequence[str], room: int) -> tuple[list[tuple[str, str]], int, int]:
    """Pack ``items`` into ``<prefix><i>=a,b`` entries of at most 255 bytes, within ``room`` bytes.

    Returns the entries, the bytes they use and how many items fit (always a prefix of ``items``).
    """
    entries: list[tuple[str, str]] = []
    current: list[str] = []
    current_bytes = 0  # key, '=' and values of the open entry (the length byte not included)
    used = 0
    fitted = 0
    for item in items:
        size = len(item.encode())
        if current:
            if current_bytes + 1 + size <= TXT_ENTRY_MAX_BYTES and used + 1 + size <= room:
                current.append(item)
                current_bytes += 1 + size
                used += 1 + size
                fitted += 1
                continue
            entries.append((f"{prefix}{len(entries)}", ",".join(current)))
            current = []
        key = f"{prefix}{len(entries)}"
        if used + 1 + len(key) + 1 + size > room:
            break
        current = [item]
        current_bytes = len(key) + 1 + size
        used += 1 + current_bytes
        fitted += 1
    if current:
        entries.append((f"{prefix}{len(entries)}", ",".join(current)))
    return entries, used, fitted


# -- node TXT ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EncodedTxt:
    """A node's TXT rdata and the program/plugin names that were left out of it (and why)."""

    text: bytes
    omitted: tuple[str, ...] = ()
    invalid: tuple[str, ...] = ()


def encode_node_txt(record: NodeRecord, *, budget: int = TXT_BUDGET_BYTES) -> EncodedTxt:
    """Encode ``record`` as the node instance's TXT rdata, within ``budget`` bytes.

    Raises:
        ConfigError: the name, instance id, an endpoint, or the mandatory entries together do not
            fit the format.
    """
    check_node_name(record.name)
    if not INSTANCE_ID_RE.fullmatch(record.instance_id):
        raise ConfigError(f"node {record.name}: instance id {record.instance_id!r} must be 1-64 of [0-9A-Za-z_-]")
    if len(record.endpoints) > MAX_ENDPOINTS:
        raise ConfigError(f"node {record.name}: {len(record.endpoints)} endpoints, at most {MAX_ENDPOINTS}")
    head: list[tuple[str, str | None]] = [
        ("txtvers", TXT_VERSION),
        ("n", record.name),
        ("id", record.instance_id),
        ("pv", str(int(record.protocol_version))),
    ]
    if record.key is not None:
        head.append(("pk", PublicKey.parse(record.key.z85).z85))  # re-checked: only a public key goes out
    for key, url in sorted(record.endpoints.items()):
        if not ENDPOINT_KEY_RE.fullmatch(key):
            raise ConfigError(f"node {record.name}: endpoint key {key!r} must be 1-32 of [a-z0-9_-]")
        if not url or _CONTROL_RE.search(url) or _entry_size(f"ep.{key}", url) - 1 > TXT_ENTRY_MAX_BYTES:
            raise ConfigError(f"node {record.name}: endpoint {key}={url!r} is empty or too long for a TXT entry")
        head.append((f"ep.{key}", url))
    used = len(build_txt(head))
    reserve = _entry_size("more", "pr,pl")
    if used + reserve > budget:
        raise ConfigError(f"node {record.name}: name, id and endpoints need {used} TXT bytes, budget {budget}")
    room = budget - used - reserve
    invalid: list[str] = []
    omitted: list[str] = []
    cut: list[str] = []
    body: list[tuple[str, str | None]] = []
    for prefix, names in (("pr", record.programs), ("pl", record.plugins)):
        good = sorted({n for n in names if valid_program_name(n)})
        invalid.extend(sorted({n for n in names if not valid_program_name(n)}))
        entries, size, fitted = _chunk_list(prefix, good, room)
        body.extend(entries)
        room -= size
        if fitted < len(good):
            omitted.extend(good[fitted:])
            cut.append(prefix)
    if cut:
        body.append(("more", ",".join(cut)))
    return EncodedTxt(build_txt(head + body), tuple(omitted), tuple(invalid))


def _decode_list(props: Mapping[str, str | None], prefix: str) -> tuple[str, ...]:
    items: list[str] = []
    for i in range(TXT_MAX_ENTRIES):
        value = props.get(f"{prefix}{i}")
        if value is None:
            break
        for item in value.split(","):
            if not valid_program_name(item):
                raise TxtError(f"TXT {prefix}{i} holds an invalid name {item[:40]!r}")
            items.append(item)
        if len(items) > MAX_LIST_ITEMS:
            raise TxtError(f"TXT {prefix} list has more than {MAX_LIST_ITEMS} names")
    return tuple(sorted(set(items)))


def _require(props: Mapping[str, str | None], key: str) -> str:
    value = props.get(key)
    if value is None:
        raise TxtError(f"TXT lacks {key!r}")
    return value


def _check_common(props: Mapping[str, str | None]) -> tuple[str, str]:
    version = props.get("txtvers")
    if version != TXT_VERSION:
        raise TxtError(f"TXT txtvers is {version!r}, this node reads {TXT_VERSION!r}")
    name = _require(props, "n")
    if not NODE_NAME_RE.fullmatch(name):
        raise TxtError(f"TXT node name {name[:64]!r} is not a valid node name")
    instance_id = _require(props, "id")
    if not INSTANCE_ID_RE.fullmatch(instance_id):
        raise TxtError(f"TXT instance id {instance_id[:80]!r} is not 1-64 of [0-9A-Za-z_-]")
    return name, instance_id


def decode_node_txt(
    data: bytes,
    *,
    instance: str | None = None,
    addresses: Sequence[str] = (),
    now: float = 0.0,
) -> NodeRecord:
    """Decode a node instance's TXT rdata into a NodeRecord with ``source="mdns"``.

    Args:
        data: the raw TXT rdata.
        instance: the DNS-SD instance name it was found under; must match ``n`` when given.
        addresses: addresses from the A records, stored as they are.
        now: monotonic time of reception.

    Raises:
        TxtError: anything malformed, missing or over a limit.
    """
    props = parse_txt(data)
    name, instance_id = _check_common(props)
    if instance is not None and instance.lower() != name.lower():
        raise TxtError(f"TXT names node {name!r} but was found under instance {instance[:64]!r}")
    pv_text = _require(props, "pv")
    if not pv_text.isascii() or not pv_text.isdigit() or len(pv_text) > 9:
        raise TxtError(f"TXT protocol version {pv_text[:16]!r} is not a small non-negative integer")
    key_text = props.get("pk")
    public_key: PublicKey | None = None
    if key_text is not None:
        try:
            public_key = PublicKey.parse(key_text)
        except ValueError as exc:
            raise TxtError(f"TXT public key {key_text[:48]!r} is malformed: {exc}") from None
    elif "pk" in props:
        raise TxtError("TXT pk has no value")
    endpoints: dict[str, str] = {}
    for key, value in props.items():
        if not key.startswith("ep."):
            continue
        ep = key[3:]
        if not ENDPOINT_KEY_RE.fullmatch(ep) or not value or _CONTROL_RE.search(value):
            raise TxtError(f"TXT endpoint entry {key[:40]!r} is malformed")
        endpoints[ep] = value
        if len(endpoints) > MAX_ENDPOINTS:
            raise TxtError(f"TXT has more than {MAX_ENDPOINTS} endpoints")
    return NodeRecord(
        name=name,
        instance_id=instance_id,
        protocol_version=int(pv_text),
        endpoints=endpoints,
        addresses=tuple(addresses),
        programs=_decode_list(props, "pr"),
        plugins=_decode_list(props, "pl"),
        source="mdns",
        last_seen=now,
        key=public_key,
    )


# -- offer TXT -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProgramOffer:
    """Node ``node`` (incarnation ``instance_id``) offers ``program`` as a program or plugin."""

    program: str
    kind: OfferKind
    node: str
    instance_id: str
    addresses: tuple[str, ...] = ()


def encode_offer_txt(offer: ProgramOffer) -> bytes:
    """TXT rdata of an offer instance; ConfigError if a field cannot be advertised."""
    check_node_name(offer.node)
    if not valid_program_name(offer.program):
        raise ConfigError(f"node {offer.node}: {offer.kind} name {offer.program!r} cannot be advertised")
    if not INSTANCE_ID_RE.fullmatch(offer.instance_id):
        raise ConfigError(f"node {offer.node}: instance id {offer.instance_id!r} must be 1-64 of [0-9A-Za-z_-]")
    return build_txt(
        [
            ("txtvers", TXT_VERSION),
            ("n", offer.node),
            ("id", offer.instance_id),
            ("prog", offer.program),
            ("kind", offer.kind),
        ]
    )


def decode_offer_txt(data: bytes, *, addresses: Sequence[str] = ()) -> ProgramOffer:
    """Decode an offer instance's TXT rdata; TxtError on anything malformed."""
    props = parse_txt(data)
    name, instance_id = _check_common(props)
    program = _require(props, "prog")
    if not valid_program_name(program):
        raise TxtError(f"TXT offers an invalid program name {program[:40]!r}")
    kind = props.get("kind")
    if kind == "program":
        return ProgramOffer(program, "program", name, instance_id, tuple(addresses))
    if kind == "plugin":
        return ProgramOffer(program, "plugin", name, instance_id, tuple(addresses))
    raise TxtError(f"TXT offer kind {kind!r:.40} is neither 'program' nor 'plugin'")
