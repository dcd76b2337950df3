"""Interface listing and ``--interface`` resolution."""

from __future__ import annotations

import pytest

from dpipes.bus.errors import ConfigError
from dpipes.discovery.interfaces import Interface, list_interfaces, resolve_interfaces

LO = Interface("lo", 1, ("127.0.0.1",), up=True, loopback=True, multicast=False)
ETH0 = Interface("eth0", 2, ("10.77.0.2", "10.77.1.2"), up=True, loopback=False, multicast=True)
ETH1 = Interface("eth1", 3, ("10.78.0.2",), up=True, loopback=False, multicast=True)
DOWN = Interface("eth2", 4, ("10.79.0.2",), up=False, loopback=False, multicast=True)
NOMC = Interface("tun0", 5, ("10.80.0.2",), up=True, loopback=False, multicast=False)
ALL = [LO, ETH0, ETH1, DOWN, NOMC]


def test_default_is_every_usable_interface() -> None:
    assert resolve_interfaces([], available=ALL) == ["10.77.0.2", "10.77.1.2", "10.78.0.2"]


def test_choices_by_name_and_address_in_order_without_duplicates() -> None:
    got = resolve_interfaces(["eth1", "10.77.1.2", "eth0"], available=ALL)
    assert got == ["10.78.0.2", "10.77.1.2", "10.77.0.2"]


@pytest.mark.parametrize(
    ("choice", "match"),
    [
        ("wlan9", r"--interface wlan9: no such interface .* usable: eth0 \(10.77.0.2, 10.77.1.2\), eth1"),
        ("10.99.0.1", "--interface 10.99.0.1: no interface has this address"),
        ("lo", "--interface lo: interface lo is a loopback interface"),
        ("127.0.0.1", "interface lo is a loopback interface"),
        ("eth2", "interface eth2 is down"),
        ("tun0", "interface tun0 does not do multicast"),
        ("fe80::1", "IPv4 only"),
    ],
)
def test_bad_choices_are_config_errors_naming_the_interface(choice: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        resolve_interfaces([choice], available=ALL)


def test_no_usable_interface_at_all() -> None:
    with pytest.raises(ConfigError, match="no up, non-loopback, multicast-capable"):
        resolve_interfaces([], available=[LO, DOWN])


def test_listing_this_machine_finds_a_loopback() -> None:
    # Reads interface state only; sends nothing.
    found = list_interfaces()
    assert any(i.loopback and not i.usable for i in found)
    assert all(i.addresses and all(a.count(".") == 3 for a in i.addresses) for i in found)
