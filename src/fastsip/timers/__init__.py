"""Timers: the hierarchical timer wheel that carries every SIP transaction timer (RFC 3261 §17).

:class:`TimerWheel` is sans-IO - its clock moves only when ``advance(now)`` is called; the
event-loop driver lives in :mod:`fastsip.asyncio.timers`.
"""

from __future__ import annotations

from fastsip.timers._wheel import TimerError, TimerHandle, TimerWheel

__all__ = ["TimerError", "TimerHandle", "TimerWheel"]
