"""mDNS advertise and browse for dpipes nodes, over python-zeroconf's asyncio API.

:class:`MdnsDiscovery` is one actor per node: ``start()`` opens zeroconf on the chosen IPv4
interfaces, starts browsing ``_dpipes._tcp.local.``, registers the node instance and one offer
instance per program/plugin (names and TXT layout: :mod:`dpipes.discovery.txt`) and returns when
they are registered; ``aclose()`` sends goodbyes and closes. What it sees arrives through a
callback as :class:`NodeSeen`/:class:`NodeGone`, which :func:`apply_event` feeds to a
:class:`~dpipes.discovery.table.NodeTable`. ``watch_program()`` browses ``dp.<prog>``.

Speed. With python-zeroconf's defaults a registration is invisible for ~1.2-1.6 s: it waits a
random 150-250 ms, then sends three probes 500 ms apart (``_CHECK_TIME``) and only then adds the
service to its registry and announces it (three announcements ``_REGISTER_TIME`` = 225 ms apart);
a browser waits a random 20-120 ms before its first query. Here, by default:

* Registration passes ``cooperating_responders=True``, which skips the random wait and the
  probes: the service is registered and its first announcement sent at once. Probing (RFC 6762
  section 8.1) exists to find another host already using the same name. It is safe to skip here
  because every name we register is unique by construction or detected otherwise: the SRV target
  ``dp-<instance id>.local.`` contains a fresh random instance id; offer names contain the node
  name; and the node name is an operator-chosen identity that must be unique anyway (the bus
  routes by it). If two hosts are misconfigured with one name, the browser sees our name with a
  foreign instance id, counts it in ``stats.conflicts`` and logs a warning, and every node table
  deterministically keeps the newer incarnation (instance ids order incarnations) instead of
  flapping. Pass ``probe_names=True`` to get RFC probing back (then a clash is a ConfigError).
* The three announcements are kept (they cover a lost packet) and so is the 250 ms goodbye burst.
* Right after the browser starts, one QU PTR query is sent without the random 20-120 ms delay
  (``query_at_start``). The delay exists so that hosts woken by one common event do not query in
  lock-step; a burst of a handful of small queries on a LAN is harmless, and the browser's own
  schedule (first query 20-120 ms later, then 1 s, 4 s, 9 s, ...) still follows for recovery. QU
  (unicast-response) is chosen because a responder answers it at once, while a multicast
  answer to a QM query is delayed 20-120 ms, or by a whole second if the record was multicast in
  the last second (RFC 6762 section 6), as it is when every node has just announced.
* Measured with 8 probe processes in network namespaces on one bridge, 2 cores (medians of 5-7
  runs): from the last node's start of discovery to every node holding every other, 0.01-0.06 s
  tuned against 1.22-1.24 s with zeroconf's defaults.
* Nothing is patched: zeroconf's timing constants are module globals of compiled modules, and a
  process-wide patch would also change other zeroconf users in the process.

Goodbyes. The node's PTR record is shared by all incarnations of a name, so a PTR removal does not
say *which* incarnation left (after a quick restart the old one's goodbye may arrive after the new
one's announcement). The TXT record does: a goodbye TXT (TTL 0) that matched the cache is decoded
and reported as ``NodeGone(name, instance_id)``, which the table ignores when it already holds a
newer incarnation. A PTR removal without such a goodbye reports the incarnation last seen as gone,
unless a TXT record for the name is still live in the cache (the leaver's TXT had been flushed by
another incarnation's, e.g. two hosts misconfigured with one name).

Interfaces. zeroconf is always given explicit IPv4 addresses (``InterfaceChoice.All`` would also
pick up interfaces the operator did not choose). It binds one socket per address to
``<addr>:5353`` plus a ``0.0.0.0:5353`` listener, all with SO_REUSEPORT, so several responders
can share a host; but then a unicast reply (to our QU query) is delivered to only one of the
sockets bound to that address, possibly another process's. The browser's later multicast queries
and everyone's announcements make up for it, at the cost of the speed-up.

Hostile input: a malformed TXT record or service name is counted in ``stats.malformed``, logged
once per service name as a warning (debug afterwards) and otherwise ignored; nothing raised by
decoding, or by the callback, reaches zeroconf's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from zeroconf import (
    DNSOutgoing,
    DNSQuestion,
    IPVersion,
    NonUniqueNameException,
    RecordUpdate,
    RecordUpdateListener,
    ServiceStateChange,
    Zeroconf,
    current_time_millis,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _CLASS_UNIQUE, _FLAGS_QR_QUERY, _TYPE_PTR, _TYPE_TXT

from dpipes.bus.errors import ConfigError
from dpipes.bus.keys import PublicKey
from dpipes.discovery.interfaces import resolve_interfaces
from dpipes.discovery.table import NodeChange, NodeRecord, NodeTable
from dpipes.discovery.txt import (
    MAX_OFFERS,
    SERVICE_TYPE,
    OfferKind,
    ProgramOffer,
    TxtError,
    check_node_name,
    decode_node_txt,
    decode_offer_txt,
    encode_node_txt,
    encode_offer_txt,
    instance_from_service_name,
    offer_instance,
    program_subtype,
    valid_program_name,
)

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000  # records missing from an announcement: ask this long (zeroconf default)
# A client asking what key a node advertises, to explain a refused handshake: a responder on the
# LAN answers a QU query within milliseconds; past this the node is not advertising (or not here).
KEY_LOOKUP_TIMEOUT_S = 1.5
GOODBYE_MARK_S = 1.0  # a TXT goodbye explains a PTR removal reported within this time
GOODBYE_TIMEOUT_S = 2.0  # aclose(): the goodbye burst takes ~0.25 s; never hang shutdown on it
START_TIMEOUT_S = 5.0  # zeroconf's socket setup; it normally takes milliseconds

_BUS_PORT_RE = re.compile(r"tcp://.+:(\d{1,5})")


@dataclass(frozen=True, slots=True)
class NodeSeen:
    """mDNS holds this (possibly updated) record for a node."""

    record: NodeRecord


@dataclass(frozen=True, slots=True)
class NodeGone:
    """A node said goodbye over mDNS, or its records expired from the cache."""

    name: str
    instance_id: str


MdnsEvent = NodeSeen | NodeGone


def apply_event(table: NodeTable, event: MdnsEvent, now: float) -> list[NodeChange]:
    """Feed one mDNS event to ``table``; return the changes it caused."""
    if isinstance(event, NodeSeen):
        return table.seen(event.record, "mdns", now)
    return table.goodbye(event.name, event.instance_id)


@dataclass(frozen=True, slots=True)
class OfferSeen:
    """A node offers a program (found through its ``dp.<prog>`` subtype)."""

    offer: ProgramOffer


@dataclass(frozen=True, slots=True)
class OfferGone:
    """A node withdrew its offer of ``program``."""

    program: str
    node: str
    instance_id: str


OfferEvent = OfferSeen | OfferGone


@dataclass(slots=True)
class MdnsStats:
    """Counters of what went wrong at the mDNS boundary."""

    malformed: int = 0  # undecodable TXT records or service names from the network
    conflicts: int = 0  # our node name advertised by another instance
    callback_errors: int = 0  # exceptions raised by our own callbacks


async def advertised_key(
    node: str, *, interfaces: Sequence[str] | None = None, timeout_s: float = KEY_LOOKUP_TIMEOUT_S
) -> PublicKey | None:
    """The public key node ``node`` advertises in its TXT record, or None (no answer in time, no
    key, a malformed record, or no mDNS socket here).

    Unauthenticated, as everything mDNS says: a caller may show it (what to pin, what a changed key
    now is) or check it against a pinned fingerprint, never trust it by itself.
    """
    try:
        check_node_name(node)
        chosen = list(interfaces) if interfaces else resolve_interfaces(())
        if not chosen:
            return None
        aiozc = AsyncZeroconf(interfaces=chosen, ip_version=IPVersion.V4Only)
    except (OSError, ConfigError) as exc:
        log.debug("no mDNS lookup of node %s: %s", node, exc)
        return None
    try:
        info = AsyncServiceInfo(SERVICE_TYPE, f"{node}.{SERVICE_TYPE}")
        if not await info.async_request(aiozc.zeroconf, int(timeout_s * 1000)) or info.text is None:
            return None
        return decode_node_txt(info.text, instance=node).key
    except (TxtError, OSError) as exc:
        log.debug("mDNS lookup of node %s: %s", node, exc)
        return None
    finally:
        await aiozc.async_close()


def _bus_port(record: NodeRecord) -> int:
    match = _BUS_PORT_RE.fullmatch(record.endpoints.get("bus", ""))
    port = int(match.group(1)) if match else 0
    return port if port < 65536 else 0


class _GoodbyeListener(RecordUpdateListener):
    """Hands every batch of record updates to the owner's goodbye detection (in zeroconf's loop)."""

    def __init__(self, owner: MdnsDiscovery) -> None:
        super().__init__()
        self._owner = owner

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        self._owner._guarded(self._owner._goodbye_records, records)

    def async_update_records_complete(self) -> None:
        pass


class MdnsDiscovery:
    """Advertise this node over mDNS and browse for the others; see the module docstring."""

    def __init__(
        self,
        record: NodeRecord,
        *,
        interfaces: Sequence[str],
        on_event: Callable[[MdnsEvent], None] | None = None,
        probe_names: bool = False,
        query_at_start: bool = True,
    ) -> None:
        """Prepare (nothing is opened until ``start()``).

        Args:
            record: this node; its ``addresses`` are advertised, or ``interfaces`` when empty.
            interfaces: IPv4 addresses of the interfaces to run on (see
                :func:`dpipes.discovery.interfaces.resolve_interfaces`).
            on_event: called in the loop with every NodeSeen/NodeGone about *other* nodes.
            probe_names: probe for name conflicts before registering (RFC 6762 section 8.1):
                correct but ~1.2 s slower; see the module docstring.
            query_at_start: send the first browse query at once instead of after 20-120 ms.

        Raises:
            ConfigError: an invalid node name or interface address.
        """
        check_node_name(record.name)
        if not interfaces:
            raise ConfigError(f"node {record.name}: mDNS needs at least one interface address")
        for addr in interfaces:
            try:
                ok = ipaddress.ip_address(addr).version == 4
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(f"node {record.name}: mDNS interface {addr!r} is not an IPv4 address")
        self.record = record
        self.interfaces = tuple(interfaces)
        self.stats = MdnsStats()
        self._on_event = on_event
        self._probe_names = probe_names
        self._query_at_start = query_at_start
        self._aiozc: AsyncZeroconf | None = None
        self._browsers: list[AsyncServiceBrowser] = []
        self._infos: dict[str, AsyncServiceInfo] = {}  # registered, by lower-cased service name
        self._announcing: set[asyncio.Future[Any]] = set()
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._nodes: dict[str, NodeRecord] = {}  # last record delivered, by node name
        self._offers: dict[str, ProgramOffer] = {}  # last offer delivered, by service name
        self._goodbyes: dict[str, float] = {}  # service name -> when its TXT goodbye arrived
        self._warned: set[str] = set()
        self._started = False
        self._closed = False

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Open zeroconf, browse, register; return once this node's services are registered.

        Raises:
            ConfigError: no mDNS socket could be opened on the interfaces, or (with
                ``probe_names``) the node name is taken.
        """
        if self._started:
            raise RuntimeError("MdnsDiscovery.start() called twice")
        self._started = True
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise

    async def _start(self) -> None:
        name = self.record.name
        try:
            self._aiozc = AsyncZeroconf(interfaces=list(self.interfaces), ip_version=IPVersion.V4Only)
        except OSError as exc:
            raise ConfigError(f"node {name}: cannot open mDNS sockets on {', '.join(self.interfaces)}: {exc}") from exc
        zc = self._aiozc.zeroconf
        await zc.async_wait_for_start(timeout=START_TIMEOUT_S)
        if not zc.engine.senders:
            raise ConfigError(
                f"node {name}: no mDNS socket could be opened on {', '.join(self.interfaces)} "
                "(address not on this host, or multicast not permitted)"
            )
        # zeroconf hands a packet's records to every listener before any browser callback fires,
        # so a goodbye's TXT is seen before the PTR removal it explains.
        zc.async_add_listener(_GoodbyeListener(self), None)
        self._browsers.append(AsyncServiceBrowser(zc, [SERVICE_TYPE], handlers=[self._on_node_service]))
        if self._query_at_start:
            self._query_now(SERVICE_TYPE)
        # Concurrently: with probe_names each registration probes for ~1.2 s.
        await asyncio.gather(*(self._register(info) for info in self._build_infos(self.record)))

    async def update(self, record: NodeRecord) -> None:
        """Re-advertise after this node's endpoints, programs or plugins changed."""
        if self._aiozc is None or self._closed:
            raise RuntimeError("MdnsDiscovery.update() needs a started, open instance")
        if record.name != self.record.name or record.instance_id != self.record.instance_id:
            raise ConfigError("MdnsDiscovery.update() cannot change the node name or instance id")
        self.record = record
        wanted = {info.key: info for info in self._build_infos(record)}
        for key in [k for k in self._infos if k not in wanted]:
            self._track(await self._aiozc.async_unregister_service(self._infos.pop(key)))
        for key, info in wanted.items():
            if key not in self._infos:
                await self._register(info)
            elif info.text != self._infos[key].text or info.port != self._infos[key].port:
                self._infos[key] = info
                self._track(await self._aiozc.async_update_service(info))

    async def watch_program(self, program: str, on_offer: Callable[[OfferEvent], None]) -> None:
        """Browse ``dp.<program>``: ``on_offer`` gets every node's offer of it, and withdrawals."""
        if self._aiozc is None or self._closed:
            raise RuntimeError("MdnsDiscovery.watch_program() needs a started, open instance")
        subtype = program_subtype(program)

        def handler(zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
            self._guarded(self._on_offer_service, program, subtype, name, state_change, on_offer)

        self._browsers.append(AsyncServiceBrowser(self._aiozc.zeroconf, [subtype], handlers=[handler]))
        if self._query_at_start:
            self._query_now(subtype)

    async def aclose(self) -> None:
        """Say goodbye (bounded by ``GOODBYE_TIMEOUT_S``) and close; idempotent."""
        if self._closed:
            return
        self._closed = True
        for future in self._announcing:
            future.cancel()  # an announcement after our goodbye would resurrect us in caches
        for task in self._resolving.values():
            task.cancel()
        await asyncio.gather(*self._announcing, *self._resolving.values(), return_exceptions=True)
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        for browser in self._browsers:
            with contextlib.suppress(Exception):
                await browser.async_cancel()
        self._browsers.clear()
        try:
            if self._infos:
                await asyncio.wait_for(aiozc.async_unregister_all_services(), GOODBYE_TIMEOUT_S)
        except TimeoutError:
            log.warning("node %s: mDNS goodbye did not finish in %.1f s", self.record.name, GOODBYE_TIMEOUT_S)
        finally:
            self._infos.clear()
            await aiozc.async_close()

    async def __aenter__(self) -> MdnsDiscovery:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- advertising ------------------------------------------------------------------------

    def _build_infos(self, record: NodeRecord) -> list[AsyncServiceInfo]:
        encoded = encode_node_txt(record)
        if encoded.omitted and "omitted" not in self._warned:
            self._warned.add("omitted")
            log.warning(
                "node %s: %d program/plugin names did not fit the mDNS TXT budget and are not "
                "advertised there (first: %s)",
                record.name,
                len(encoded.omitted),
                ", ".join(encoded.omitted[:5]),
            )
        if encoded.invalid and "invalid" not in self._warned:
            self._warned.add("invalid")
            log.warning("node %s: cannot advertise program names %r", record.name, encoded.invalid[:5])
        addresses = list(record.addresses or self.interfaces)
        common: dict[str, Any] = {
            "port": _bus_port(record),
            "server": f"dp-{record.instance_id.lower()}.local.",
            "addresses": [socket.inet_aton(a) for a in addresses if ipaddress.ip_address(a).version == 4],
        }
        infos = [AsyncServiceInfo(SERVICE_TYPE, f"{record.name}.{SERVICE_TYPE}", properties=encoded.text, **common)]
        offers: list[tuple[OfferKind, str]] = [("program", p) for p in sorted(set(record.programs))]
        offers += [("plugin", p) for p in sorted(set(record.plugins))]
        offers = [(k, p) for k, p in offers if valid_program_name(p)]
        if len(offers) > MAX_OFFERS and "offers" not in self._warned:
            self._warned.add("offers")
            log.warning(
                "node %s: %d programs/plugins; only the first %d are findable as dp.<prog> subtypes",
                record.name,
                len(offers),
                MAX_OFFERS,
            )
        taken = {infos[0].key}
        for kind, program in offers[:MAX_OFFERS]:
            service = f"{offer_instance(program, kind, record.name)}.{SERVICE_TYPE}"
            if service.lower() in taken:
                log.warning(
                    "node %s: %s %r clashes with another offer's DNS name; not advertised",
                    record.name,
                    kind,
                    program,
                )
                continue
            taken.add(service.lower())
            txt = encode_offer_txt(ProgramOffer(program, kind, record.name, record.instance_id))
            infos.append(AsyncServiceInfo(program_subtype(program), service, properties=txt, **common))
        return infos

    async def _register(self, info: AsyncServiceInfo) -> None:
        assert self._aiozc is not None
        try:
            announcing = await self._aiozc.async_register_service(info, cooperating_responders=not self._probe_names)
        except NonUniqueNameException as exc:
            raise ConfigError(
                f"node {self.record.name}: the mDNS name {info.name!r} is already in use on the LAN; "
                "node names must be unique"
            ) from exc
        self._infos[info.key] = info
        self._track(announcing)

    def _track(self, awaitable: Awaitable[Any]) -> None:
        future = asyncio.ensure_future(awaitable)
        self._announcing.add(future)
        future.add_done_callback(self._announcing.discard)

    def _query_now(self, type_: str) -> None:
        assert self._aiozc is not None
        out = DNSOutgoing(_FLAGS_QR_QUERY)
        out.add_question(DNSQuestion(type_, _TYPE_PTR, _CLASS_IN | _CLASS_UNIQUE))  # QU
        self._aiozc.zeroconf.async_send(out)

    # -- browsing ---------------------------------------------------------------------------

    def _guarded(self, fn: Callable[..., None], *args: Any) -> None:
        """Run a browse handler; nothing it raises may reach zeroconf's loop."""
        try:
            fn(*args)
        except Exception:
            self.stats.callback_errors += 1
            if self.stats.callback_errors == 1:
                log.exception("node %s: error handling an mDNS event (logged once)", self.record.name)
            else:
                log.debug("node %s: error handling an mDNS event", self.record.name, exc_info=True)

    def _malformed(self, name: str, exc: Exception) -> None:
        self.stats.malformed += 1
        key = f"malformed:{name.lower()}"
        if key in self._warned:
            log.debug("node %s: malformed mDNS data for %r: %s", self.record.name, name, exc)
            return
        self._warned.add(key)
        log.warning("node %s: ignoring malformed mDNS data for %r: %s", self.record.name, name, exc)

    def _emit(self, event: MdnsEvent) -> None:
        if self._on_event is not None and not self._closed:
            self._guarded(self._on_event, event)

    def _on_node_service(self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        self._guarded(self._node_service_changed, name, state_change)

    def _node_service_changed(self, name: str, state_change: ServiceStateChange) -> None:
        try:
            instance = instance_from_service_name(name)
        except TxtError as exc:
            self._malformed(name, exc)
            return
        if "@" in instance:
            return  # an offer instance: zeroconf reports subtype PTRs to the base-type browser too
        if state_change is ServiceStateChange.Removed:
            self._node_removed(name, instance)
        else:
            self._resolve(name, lambda info: self._node_resolved(info, instance))

    def _resolve(self, name: str, done: Callable[[AsyncServiceInfo], None], type_: str = SERVICE_TYPE) -> None:
        """Call ``done`` with the service's info, from the cache if complete, else after asking."""
        assert self._aiozc is not None
        zc = self._aiozc.zeroconf
        info = AsyncServiceInfo(type_, name)
        if info.load_from_cache(zc):
            done(info)
            return
        key = name.lower()
        if key in self._resolving:
            return  # a request is under way; it reads the cache again when it ends

        async def ask() -> None:
            try:
                await info.async_request(zc, RESOLVE_TIMEOUT_MS)
                if info.text:
                    self._guarded(done, info)
            finally:
                self._resolving.pop(key, None)

        self._resolving[key] = asyncio.ensure_future(ask())

    def _node_resolved(self, info: AsyncServiceInfo, instance: str) -> None:
        if not info.text:
            return
        try:
            record = decode_node_txt(
                info.text,
                instance=instance,
                addresses=sorted(info.parsed_addresses(IPVersion.V4Only)),
                now=time.monotonic(),
            )
        except TxtError as exc:
            self._malformed(info.name, exc)
            return
        if record.name == self.record.name:
            self._own_name_seen(record)
            return
        last = self._nodes.get(record.name)
        if last is not None and last.same_content(record):
            return
        self._nodes[record.name] = record
        self._emit(NodeSeen(record))

    def _own_name_seen(self, record: NodeRecord) -> None:
        if record.instance_id == self.record.instance_id:
            return  # our own announcement, looped back
        self.stats.conflicts += 1
        key = f"conflict:{record.instance_id}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "node %s: another instance (%s at %s) advertises this node name; node names must be "
                "unique on the LAN: a node already linked to one of the two refuses the other while the"
                " first stays alive (the first keeps the name); give one of them another name (--name)",
                self.record.name,
                record.instance_id,
                ", ".join(record.addresses) or "?",
            )

    def _goodbye_records(self, records: list[RecordUpdate]) -> None:
        """A TXT record with TTL 0 that matched our cache is a goodbye: it names the incarnation."""
        for update in records:
            record = update.new
            if record.type != _TYPE_TXT or record.ttl != 0:
                continue
            try:
                instance = instance_from_service_name(record.name)
            except TxtError:
                continue
            if "@" in instance:
                continue
            try:
                gone = decode_node_txt(getattr(record, "text", b""), instance=instance)
            except TxtError as exc:
                self._malformed(record.name, exc)
                continue
            if gone.name == self.record.name:
                continue
            self._goodbyes[record.name.lower()] = time.monotonic()
            last = self._nodes.get(gone.name)
            if last is not None and last.instance_id == gone.instance_id:
                del self._nodes[gone.name]
            self._emit(NodeGone(gone.name, gone.instance_id))

    def _node_removed(self, name: str, instance: str) -> None:
        marked = self._goodbyes.pop(name.lower(), None)
        if marked is not None and time.monotonic() - marked < GOODBYE_MARK_S:
            # Already reported by _goodbye_records, with the incarnation that left. The PTR is
            # shared by all incarnations of a name, so this removal must not be pinned on the
            # incarnation we hold (a quick restart: the old one's goodbye comes after the new
            # one's announcement).
            return
        last = next((r for n, r in self._nodes.items() if n.lower() == instance.lower()), None)
        if last is None:
            return
        # No goodbye TXT matched: either the records expired, or the goodbye came from an
        # incarnation whose TXT another one had already flushed from our cache. In the second
        # case a TXT for the name is still live, and the node has not gone.
        assert self._aiozc is not None
        now_ms = current_time_millis()
        for txt in self._aiozc.zeroconf.cache.async_all_by_details(name, _TYPE_TXT, _CLASS_IN):
            if not txt.is_expired(now_ms):
                return
        del self._nodes[last.name]
        self._emit(NodeGone(last.name, last.instance_id))

    def _on_offer_service(
        self,
        program: str,
        subtype: str,
        name: str,
        state_change: ServiceStateChange,
        on_offer: Callable[[OfferEvent], None],
    ) -> None:
        key = name.lower()
        if state_change is ServiceStateChange.Removed:
            offer = self._offers.pop(key, None)
            if offer is not None and not self._closed:
                self._guarded(on_offer, OfferGone(offer.program, offer.node, offer.instance_id))
            return

        def resolved(info: AsyncServiceInfo) -> None:
            try:
                offer = decode_offer_txt(info.text, addresses=sorted(info.parsed_addresses(IPVersion.V4Only)))
            except TxtError as exc:
                self._malformed(name, exc)
                return
            if offer.program != program or self._offers.get(key) == offer:
                return  # another program with the same DNS label, or nothing new
            self._offers[key] = offer
            if not self._closed:
                self._guarded(on_offer, OfferSeen(offer))

        self._resolve(name, resolved, type_=subtype)
