"""fastsip's I/O layer: the only package that touches the event loop and sockets.

Everything below it is sans-IO; this layer feeds it bytes and the loop's time.  It holds the timer
wheel's loop driver (:class:`WheelDriver`), the UDP/TCP/TLS transports (:class:`TransportLayer`,
with its edge limits and ``admit`` hook), the :class:`Endpoint` that assembles them with a
transaction layer, and :func:`interface_addresses` (the host's own IP addresses).
"""

from __future__ import annotations

from fastsip.asyncio.endpoint import Endpoint, ListenError
from fastsip.asyncio.netif import interface_addresses
from fastsip.asyncio.timers import WheelDriver
from fastsip.asyncio.transport import (
    AdmitCallback,
    Listener,
    TransportLayer,
    TransportStats,
    parse_listen,
)

__all__ = [
    "AdmitCallback",
    "Endpoint",
    "ListenError",
    "Listener",
    "TransportLayer",
    "TransportStats",
    "WheelDriver",
    "interface_addresses",
    "parse_listen",
]
