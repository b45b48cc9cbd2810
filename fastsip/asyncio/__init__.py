"""fastsip's I/O layer: the only package that touches the event loop and sockets.

Everything below it is sans-IO; this layer feeds it bytes and the loop's time.  It holds the timer
wheel's loop driver (:class:`WheelDriver`), the UDP/TCP/TLS transports (:class:`TransportLayer`)
and the :class:`Endpoint` that assembles them with a transaction layer.
"""

from __future__ import annotations

from fastsip.asyncio.endpoint import Endpoint
from fastsip.asyncio.timers import WheelDriver
from fastsip.asyncio.transport import Listener, TransportLayer, parse_listen

__all__ = ["Endpoint", "Listener", "TransportLayer", "WheelDriver", "parse_listen"]
