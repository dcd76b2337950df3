"""The mDNS actor's boundary, without sockets: argument checks and hostile records."""

from __future__ import annotations

import logging

import pytest
from zeroconf import DNSText, RecordUpdate, ServiceStateChange
from zeroconf.const import _CLASS_IN, _TYPE_TXT

from dpipes.bus.errors import ConfigError
from dpipes.discovery.mdns import MdnsDiscovery, MdnsEvent, NodeGone, NodeSeen, _bus_port, apply_event
from dpipes.discovery.table import NodeRecord, NodeTable
from dpipes.discovery.txt import build_txt, encode_node_txt

IID = "0190f3a2b4c5d6e7f8a9"
ME = NodeRecord("alpha", IID, 1, endpoints={"bus": "tcp://10.77.0.2:5555"})


def discovery(events: list[MdnsEvent] | None = None) -> MdnsDiscovery:
    return MdnsDiscovery(ME, interfaces=["10.77.0.2"], on_event=None if events is None else events.append)


@pytest.mark.parametrize(
    ("record", "interfaces", "match"),
    [
        (NodeRecord("bad.name", IID, 1), ["10.77.0.2"], "cannot be advertised"),
        (ME, [], "at least one interface"),
        (ME, ["fe80::1"], "not an IPv4 address"),
        (ME, ["eth0"], "not an IPv4 address"),
    ],
)
def test_constructor_rejects_bad_arguments(record: NodeRecord, interfaces: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MdnsDiscovery(record, interfaces=interfaces)


def test_srv_port_comes_from_the_bus_endpoint() -> None:
    assert _bus_port(ME) == 5555
    assert _bus_port(NodeRecord("a", IID, 1, endpoints={"bus": "ipc:///x"})) == 0
    assert _bus_port(NodeRecord("a", IID, 1, endpoints={"bus": "tcp://h:99999"})) == 0
    assert _bus_port(NodeRecord("a", IID, 1)) == 0


def test_malformed_service_names_are_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    d = discovery()
    with caplog.at_level(logging.DEBUG, logger="dpipes.discovery.mdns"):
        for _ in range(3):
            d._on_node_service(None, "_dpipes._tcp.local.", "junk.local.", ServiceStateChange.Added)
    assert d.stats.malformed == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "junk.local." in warnings[0].getMessage()


def goodbye(name: str, text: bytes) -> RecordUpdate:
    return RecordUpdate(DNSText(name, _TYPE_TXT, _CLASS_IN, 0, text), None)


def test_malformed_goodbye_txt_is_counted_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    events: list[MdnsEvent] = []
    d = discovery(events)
    with caplog.at_level(logging.WARNING, logger="dpipes.discovery.mdns"):
        d._goodbye_records([goodbye("beta._dpipes._tcp.local.", b"\x40truncated")])
        d._goodbye_records([goodbye("beta._dpipes._tcp.local.", b"\x40truncated")])
    assert events == [] and d.stats.malformed == 2
    assert len(caplog.records) == 1


def test_goodbye_txt_names_the_incarnation_that_left() -> None:
    events: list[MdnsEvent] = []
    d = discovery(events)
    beta = NodeRecord("beta", "0190aaaaaaaaaaaaaaaa", 1)
    d._goodbye_records([goodbye("beta._dpipes._tcp.local.", encode_node_txt(beta).text)])
    # Our own looped-back goodbye and offer instances are not reported.
    d._goodbye_records([goodbye("alpha._dpipes._tcp.local.", encode_node_txt(ME).text)])
    d._goodbye_records([goodbye("sort@beta._dpipes._tcp.local.", build_txt([("txtvers", "1")]))])
    assert events == [NodeGone("beta", "0190aaaaaaaaaaaaaaaa")]


def test_callback_errors_never_reach_zeroconf(caplog: pytest.LogCaptureFixture) -> None:
    def explode(event: MdnsEvent) -> None:
        raise RuntimeError("consumer bug")

    d = MdnsDiscovery(ME, interfaces=["10.77.0.2"], on_event=explode)
    beta = NodeRecord("beta", "0190aaaaaaaaaaaaaaaa", 1)
    with caplog.at_level(logging.ERROR, logger="dpipes.discovery.mdns"):
        for _ in range(2):
            d._goodbye_records([goodbye("beta._dpipes._tcp.local.", encode_node_txt(beta).text)])
    assert d.stats.callback_errors == 2
    assert len(caplog.records) == 1 and "consumer bug" in caplog.text


def test_apply_event_feeds_the_table() -> None:
    table = NodeTable()
    beta = NodeRecord("beta", "0190aaaaaaaaaaaaaaaa", 1, source="mdns")
    assert [c.kind for c in apply_event(table, NodeSeen(beta), 1.0)] == ["added"]
    assert apply_event(table, NodeGone("beta", "0190000000000000000a"), 2.0) == []  # older incarnation
    assert [c.reason for c in apply_event(table, NodeGone("beta", beta.instance_id), 3.0)] == ["goodbye"]
