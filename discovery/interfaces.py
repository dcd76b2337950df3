"""Which IPv4 interfaces mDNS runs on: list them, and resolve ``--interface NAME|ADDR`` choices.

Addresses come from ``ifaddr`` (getifaddrs, already a zeroconf dependency); flags (up, loopback,
multicast) from the ``SIOCGIFFLAGS`` ioctl on Linux, which, unlike ``/sys/class/net``, always
answers for the network namespace of the calling process (``nsenter --net`` does not remount
``/sys``). Elsewhere, or if the ioctl fails, ``/sys/class/net/<name>/flags`` is read, and failing
that an interface is assumed up and multicast-capable.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ifaddr

from dpipes.bus.errors import ConfigError

log = logging.getLogger(__name__)

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_MULTICAST = 0x1000
_SIOCGIFFLAGS = 0x8913  # Linux <linux/sockios.h>
_SYS_CLASS_NET = Path("/sys/class/net")


@dataclass(frozen=True, slots=True)
class Interface:
    """One network interface with its IPv4 addresses."""

    name: str
    index: int
    addresses: tuple[str, ...]
    up: bool
    loopback: bool
    multicast: bool

    @property
    def usable(self) -> bool:
        """Up, not loopback, multicast-capable and holding an IPv4 address: fit for mDNS."""
        return self.up and not self.loopback and self.multicast and bool(self.addresses)


def _flags(name: str) -> int | None:
    if sys.platform.startswith("linux"):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                ifreq = struct.pack("16s24x", name.encode()[:15])
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, ifreq)
            return int(struct.unpack_from("H", reply, 16)[0])
        except OSError as exc:
            log.debug("SIOCGIFFLAGS on %s failed: %s", name, exc)
    try:
        return int((_SYS_CLASS_NET / name / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def list_interfaces() -> list[Interface]:
    """Every interface that has at least one IPv4 address, sorted by index."""
    found: list[Interface] = []
    for adapter in ifaddr.get_adapters():
        addrs = tuple(str(ip.ip) for ip in adapter.ips if isinstance(ip.ip, str) and ip.is_IPv4)
        if not addrs:
            continue
        name = str(adapter.name)
        flags = _flags(name)
        if flags is None:
            up, loopback, multicast = True, addrs[0].startswith("127."), True
        else:
            up, loopback, multicast = (
                bool(flags & IFF_UP),
                bool(flags & IFF_LOOPBACK),
                bool(flags & IFF_MULTICAST),
            )
        found.append(Interface(name, int(adapter.index or 0), addrs, up, loopback, multicast))
    return sorted(found, key=lambda i: (i.index, i.name))


def _describe(interfaces: Sequence[Interface]) -> str:
    usable = [f"{i.name} ({', '.join(i.addresses)})" for i in interfaces if i.usable]
    return ", ".join(usable) if usable else "none"


def _why_unusable(iface: Interface) -> str:
    if not iface.up:
        return "is down"
    if iface.loopback:
        return "is a loopback interface"
    if not iface.multicast:
        return "does not do multicast"
    return "has no IPv4 address"


def resolve_interfaces(choices: Sequence[str] = (), *, available: Sequence[Interface] | None = None) -> list[str]:
    """Turn ``--interface`` choices into the IPv4 addresses mDNS should use.

    Args:
        choices: interface names (``eth0``) or IPv4 addresses (``10.77.0.2``); empty means every
            usable interface.
        available: the interfaces to choose from (default: :func:`list_interfaces`).

    Returns:
        Addresses, without duplicates, in the order chosen.

    Raises:
        ConfigError: naming the choice that is unknown, down, loopback, not multicast-capable or
            without IPv4, or saying that no usable interface exists.
    """
    interfaces = list(list_interfaces() if available is None else available)
    if not choices:
        addrs = [a for i in interfaces if i.usable for a in i.addresses]
        if not addrs:
            raise ConfigError(
                "no up, non-loopback, multicast-capable IPv4 interface for mDNS; bring one up or use static peers"
            )
        return list(dict.fromkeys(addrs))
    by_name = {i.name: i for i in interfaces}
    out: list[str] = []
    for choice in choices:
        try:
            ip = ipaddress.ip_address(choice)
        except ValueError:
            ip = None
        if ip is not None:
            if ip.version != 4:
                raise ConfigError(f"--interface {choice}: mDNS here is IPv4 only; give an IPv4 address or a name")
            owner = next((i for i in interfaces if str(ip) in i.addresses), None)
            if owner is None:
                raise ConfigError(
                    f"--interface {choice}: no interface has this address; usable: {_describe(interfaces)}"
                )
            if not owner.usable:
                raise ConfigError(f"--interface {choice}: interface {owner.name} {_why_unusable(owner)}")
            out.append(str(ip))
            continue
        iface = by_name.get(choice)
        if iface is None:
            raise ConfigError(
                f"--interface {choice}: no such interface with an IPv4 address; usable: {_describe(interfaces)}"
            )
        if not iface.usable:
            raise ConfigError(f"--interface {choice}: interface {iface.name} {_why_unusable(iface)}")
        out.extend(iface.addresses)
    return list(dict.fromkeys(out))
