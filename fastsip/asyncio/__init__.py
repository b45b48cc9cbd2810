"""fastsip's I/O layer: the only package that touches the event loop and sockets.

Everything below it is sans-IO; this layer feeds it bytes and the loop's time.  So far it holds
the timer wheel's loop driver (:class:`WheelDriver`).
"""

from __future__ import annotations

from fastsip.asyncio.timers import WheelDriver

__all__ = ["WheelDriver"]
