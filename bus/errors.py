"""The dpipes error tree: one root, a short flat tree, leaves that also inherit the stdlib type."""

from __future__ import annotations

TYPE_CHECKING = False  # typing's, without importing it on the short path (dpipes.bus.logs)
if TYPE_CHECKING:
    from typing import Any


class DpipesError(Exception):
    """Root of every error dpipes raises on purpose."""


class BusError(DpipesError):
    """Something went wrong on the bus: a link, a route, a stream."""


class DecodeError(BusError, ValueError):
    """A message off the wire is malformed or exceeds a limit; it is dropped and counted.

    ``header`` is the header map when the frame was one (unchecked: whoever answers the sender
    must check each value it takes from it), else None.
    """

    def __init__(self, message: str, *, header: dict[Any, Any] | None = None) -> None:
        super().__init__(message)
        self.header = header


class ProtocolMismatch(BusError):
    """A peer speaks another protocol version, or refused our HELLO."""


class NoRoute(BusError, ConnectionError):
    """No hub knows the destination node or endpoint."""


class PeerLost(BusError, ConnectionError):
    """A peer hub stopped answering heartbeats, or said BYE, while something depended on it."""


class RequestTimeout(BusError, TimeoutError):
    """A request got no reply within its timeout."""


class RequestFailed(BusError):
    """The other side answered a REQUEST with a failed REPLY; ``body`` is that reply's body."""

    def __init__(self, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.body: dict[str, Any] = body if isinstance(body, dict) else {}


class StreamError(BusError):
    """A stream was reset, cancelled, or failed on the far side."""


class ConfigError(DpipesError, ValueError):
    """A configuration file, key or command-line value is wrong; the message names it."""


class StageError(DpipesError):
    """A pipeline stage could not be placed, negotiated or started."""


class SecurityError(DpipesError, PermissionError):
    """A key, a trust file or an identity refused: unsafe permissions, an unknown or changed key."""


class KeyFileError(SecurityError):
    """A key file or key directory cannot be used (missing, malformed, readable or writable by others)."""


class TrustFileError(SecurityError, ValueError):
    """A line of an authorized-keys or known-nodes file is malformed; the message names file:line."""


class KeyChanged(SecurityError):
    """A node presented another key than the one pinned for it; the message names both fingerprints."""


class ClientRefused(SecurityError):
    """A node refused a client's key (or uid) at the handshake: it does not trust it."""


class WrongServerKey(SecurityError):
    """A node did not prove it holds the key a client expected of it (CurveZMQ): changed, or another node."""
