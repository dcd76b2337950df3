"""The tap mirror: one small event per routed transfer (a message, or a ``BATCH`` of them) on the
hub's XPUB while, and only while, someone subscribes (the events are specified in
:mod:`dpipes.bus.tap`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dpipes.bus.hub.state import advertised
from dpipes.bus.tap import Mirror

if TYPE_CHECKING:
    from dpipes.bus.hub import Hub

log = logging.getLogger(__name__)


class TapMirror:
    """A hub's tap mirror (a part of :class:`~dpipes.bus.hub.Hub`)."""

    _tap_mirror: Mirror | None = None  # made at the first subscription

    def _on_tap_subscription(self: Hub, frames: list[Any]) -> None:
        """What a tap client sent up: a (un)subscription, or an event of a replay (see *Replays*
        in :mod:`dpipes.bus.tap`)."""
        data = frames[0].bytes
        if self._tap_mirror is None:
            self._tap_mirror = Mirror(self.node)
        if data[:1] == b"\x01" and len(frames) == 1:
            self._tap_topics.add(data[1:])
            self._tap_mirror.on_subscription(data[1:], True)
        elif data[:1] == b"\x00" and len(frames) == 1:
            self._tap_topics.discard(data[1:])
            self._tap_mirror.on_subscription(data[1:], False)
        elif self._tap is not None:
            self._tap_mirror.replay(self._tap.sock, frames)

    def _publish_tap(self: Hub, header: dict[str, Any], payload: Any) -> None:
        assert self._tap is not None and self._tap_mirror is not None
        self._tap_mirror.publish(self._tap.sock, header, payload)

    @property
    def advertised_tap_endpoint(self: Hub) -> str:
        """The TCP tap endpoint peers are told (as ``advertised_endpoint`` is made), or ""."""
        return advertised(self.tcp_tap_endpoint, self._advertise) if self.tcp_tap_endpoint else ""

    @property
    def tapped(self: Hub) -> bool:
        """Whether anyone subscribes to the tap: the hub mirrors what it routes only then."""
        return bool(self._tap_topics)

    @property
    def tap_refused(self: Hub) -> int:
        """Tap events the XPUB refused to send (each is a gap in the events' ``n``)."""
        return self._tap_mirror.refused if self._tap_mirror is not None else 0
