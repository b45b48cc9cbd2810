"""fastsip's I/O layer: the only package that touches the event loop and sockets.

Everything below it is sans-IO; this layer feeds it bytes and the loop's time.  It holds the timer
wheel's loop driver (:class:`WheelDriver`), the UDP/TCP/TLS transports (:class:`TransportLayer`,
with its edge limits and ``admit`` hook), the :class:`Endpoint` that assembles them with a
transaction layer, :func:`interface_addresses` (the host's own IP addresses), and the running
of a program: :func:`run` on uvloop or asyncio's loop, :class:`StopSignals` (SIGINT/SIGTERM as
a stop event) and :func:`loop_name`; and the location stores that wait for a disk or a
network, opened from a ``--db`` URL by :func:`open_store`.
"""

from __future__ import annotations

from fastsip.asyncio.endpoint import Endpoint, ListenError
from fastsip.asyncio.netif import interface_addresses
from fastsip.asyncio.runner import (
    LOOPS,
    STOP_SIGNALS,
    LoopUnavailableError,
    StopSignals,
    loop_name,
    run,
)
from fastsip.asyncio.stores import SqliteLocationStore, open_store
from fastsip.asyncio.timers import WheelDriver
from fastsip.asyncio.transport import (
    AdmitCallback,
    Listener,
    TransportLayer,
    TransportStats,
    parse_listen,
)

__all__ = [
    "LOOPS",
    "STOP_SIGNALS",
    "AdmitCallback",
    "Endpoint",
    "ListenError",
    "Listener",
    "LoopUnavailableError",
    "SqliteLocationStore",
    "StopSignals",
    "TransportLayer",
    "TransportStats",
    "WheelDriver",
    "interface_addresses",
    "loop_name",
    "open_store",
    "parse_listen",
    "run",
]
