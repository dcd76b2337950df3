"""Exercise mDNS discovery from the command line, one JSON line per event on stdout.

    python -m dpipes.discovery.probe --name alpha --interface eth0 --program sort --find uniq

Advertises a node (and its programs/plugins as ``dp.<prog>``), browses for the others, feeds what
it sees to a :class:`~dpipes.discovery.table.NodeTable` and prints, flushed, one JSON object per
line: ``{"event": "ready", ...}`` once registered, then one per table change
(``"added"``/``"updated"``/``"removed"`` with ``name``, ``instance_id``, ``programs``,
``plugins``, ``addresses``, ``endpoints``, ``source``, ``reason``), ``"offer"``/``"offer_gone"``
for ``--find`` programs, and ``"closed"`` after SIGTERM or SIGINT, on which it says goodbye and
exits 0. Every event carries ``"t"``: ``time.monotonic()``, comparable across processes and
network namespaces of one machine. A tool for tests and for poking at a LAN, not a daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from dpipes.bus.errors import ConfigError
from dpipes.discovery.interfaces import resolve_interfaces
from dpipes.discovery.mdns import MdnsDiscovery, MdnsEvent, OfferEvent, OfferSeen, apply_event
from dpipes.discovery.table import NodeChange, NodeRecord, NodeTable, new_instance_id

PROTOCOL_VERSION = 1  # what the probe claims; it speaks no bus protocol


def _write(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def _change_line(change: NodeChange) -> dict[str, Any]:
    r = change.record
    return {
        "event": change.kind,
        "reason": change.reason,
        "name": r.name,
        "instance_id": r.instance_id,
        "protocol_version": r.protocol_version,
        "programs": list(r.programs),
        "plugins": list(r.plugins),
        "addresses": list(r.addresses),
        "endpoints": dict(r.endpoints),
        "source": r.source,
        "t": time.monotonic(),
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dpipes.discovery.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="node name to advertise")
    p.add_argument("--interface", action="append", default=[], help="interface name or IPv4 address (repeatable)")
    p.add_argument("--program", action="append", default=[], help="program to offer as dp.<prog> (repeatable)")
    p.add_argument("--plugin", action="append", default=[], help="plugin to offer (repeatable)")
    p.add_argument("--endpoint", action="append", default=[], metavar="KEY=URL", help="endpoint to advertise")
    p.add_argument("--find", action="append", default=[], metavar="PROG", help="browse dp.<PROG> (repeatable)")
    p.add_argument(
        "--zeroconf-defaults",
        action="store_true",
        help="use python-zeroconf's default timing (probe names, delayed first query), for comparison",
    )
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    """Advertise, browse and print until SIGTERM/SIGINT."""
    addrs = resolve_interfaces(args.interface)
    endpoints = dict(e.split("=", 1) for e in args.endpoint if "=" in e)
    me = NodeRecord(
        name=args.name,
        instance_id=new_instance_id(),
        protocol_version=PROTOCOL_VERSION,
        endpoints=endpoints,
        addresses=tuple(addrs),
        programs=tuple(args.program),
        plugins=tuple(args.plugin),
    )
    table = NodeTable()
    table.seen(me, "self", time.monotonic())

    def on_event(event: MdnsEvent) -> None:
        for change in apply_event(table, event, time.monotonic()):
            _write(_change_line(change))

    def on_offer(event: OfferEvent) -> None:
        line: dict[str, Any]
        if isinstance(event, OfferSeen):
            o = event.offer
            line = {"event": "offer", "program": o.program, "kind": o.kind, "name": o.node}
            line.update(instance_id=o.instance_id, addresses=list(o.addresses))
        else:
            line = {"event": "offer_gone", "program": event.program, "name": event.node}
            line.update(instance_id=event.instance_id)
        _write({**line, "t": time.monotonic()})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    t_start = time.monotonic()
    discovery = MdnsDiscovery(
        me,
        interfaces=addrs,
        on_event=on_event,
        probe_names=args.zeroconf_defaults,
        query_at_start=not args.zeroconf_defaults,
    )
    try:
        await discovery.start()
        for prog in args.find:
            await discovery.watch_program(prog, on_offer)
        _write(
            {
                "event": "ready",
                "name": me.name,
                "instance_id": me.instance_id,
                "interfaces": addrs,
                "t_start": t_start,
                "t": time.monotonic(),
            }
        )
        await stop.wait()
    finally:
        await discovery.aclose()
    _write(
        {
            "event": "closed",
            "name": me.name,
            "malformed": discovery.stats.malformed,
            "conflicts": discovery.stats.conflicts,
            "t": time.monotonic(),
        }
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 0 after a clean stop, 2 on a configuration error."""
    args = _parse(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
    try:
        return asyncio.run(run(args))
    except ConfigError as exc:
        sys.stderr.write(f"probe: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
