"""Drive a :class:`~fastsip.timers.TimerWheel` from an asyncio (or uvloop) event loop.

The whole wheel costs the loop **one** ``loop.call_at`` handle, armed at the wheel's next wakeup
and re-armed after each advance - never one loop handle per SIP timer, and no periodic tick: an
empty wheel leaves nothing armed.  Scheduling straight on the wheel still works while the loop
sleeps, because the wheel calls the driver's hook when a new timer lands before the armed time
(only then: a later timer costs the driver nothing).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

from fastsip.timers import TimerHandle, TimerWheel

__all__ = ["WheelDriver"]


class WheelDriver:
    """Runs ``wheel.advance(loop.time())`` from a single loop timer armed at the next wakeup.

    Without ``wheel``, one is made with ``tick`` whose clock *is* the loop's clock; an existing
    wheel keeps its own clock and the driver converts (``loop time = wheel time + offset``).
    The wheel's clock only moves when it is advanced, so code outside the timer callbacks should
    schedule through :meth:`call_later`/:meth:`schedule_key` here, which read the loop's clock.
    """

    def __init__(
        self,
        wheel: TimerWheel | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        tick: float = 0.001,
    ) -> None:
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        now = self._loop.time()
        self.wheel = wheel if wheel is not None else TimerWheel(tick, start=now)
        self._offset = now - self.wheel.time()
        # Bound once: a proxied call schedules about eight timers, each through call_later.
        self._loop_time = self._loop.time
        # call_later is the wheel's, reading the loop's clock in C: no Python frame per timer.
        self.wheel.set_clock(self._loop_time, self._offset)
        self.call_later = self.wheel.call_later_now  # type: ignore[method-assign]
        self.call_later_lax = self.wheel.call_later_lax  # type: ignore[method-assign]
        self.time = self.wheel.clock_time  # type: ignore[method-assign]
        self._handle: asyncio.TimerHandle | None = None
        self._armed = math.inf
        self.wakeups = 0  # how often the loop woke the wheel (idle costs none)
        self._closed = False
        self.wheel.wakeup_hook = self._rearm
        self._rearm()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def time(self) -> float:
        """The current time in wheel seconds, read from the loop's clock (each instance
        replaces this with the wheel's ``clock_time``, which does the same in C)."""
        return self._loop_time() - self._offset

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> TimerHandle:
        """``callback(*args)`` in ``delay`` seconds of loop time, on the wheel (each instance
        replaces this with the wheel's ``call_later_now``, which does the same in C)."""
        return self.wheel.call_at(self._loop_time() - self._offset + delay, callback, *args)

    def call_later_lax(self, delay: float, callback: Callable[..., object],
                       *args: Any) -> TimerHandle:
        """:meth:`call_later` for a timer whose exact moment does not matter (a transaction's
        linger): its deadline is rounded up so that many share one wakeup of the loop (see
        ``TimerWheel.call_later_lax``; each instance replaces this with the wheel's)."""
        return self.wheel.call_later_lax(delay, callback, *args)

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> TimerHandle:
        """``callback(*args)`` at loop time ``when``, on the wheel."""
        return self.wheel.call_at(when - self._offset, callback, *args)

    def schedule_key(self, delay: float, key: int) -> int:
        """Key mode: ``key`` expires in ``delay`` seconds of loop time; returns a cancel token."""
        return self.wheel.schedule_key_at(self._loop.time() - self._offset + delay, key)

    def cancel_key(self, token: int) -> bool:
        return self.wheel.cancel_key(token)

    def close(self) -> None:
        """Stop driving: disarm the loop timer and unhook (pending timers stay on the wheel)."""
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed = math.inf
        if self.wheel.wakeup_hook == self._rearm:
            self.wheel.wakeup_hook = None
        self.wheel.wakeup_at = math.inf

    def _rearm(self) -> None:
        if self._closed:
            return
        wake = self.wheel.next_wakeup()
        if wake is None:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
            self._armed = math.inf
            self.wheel.wakeup_at = math.inf
            return
        if self._handle is not None:
            if wake == self._armed:
                return
            self._handle.cancel()
        self._armed = wake
        self.wheel.wakeup_at = wake
        # Round up to the next millisecond (plus half of one): uvloop keeps time in whole
        # milliseconds and truncates a timer's delay, so a wakeup armed for the exact instant
        # can fire just before it; the wheel then has nothing due, re-arms for the same instant,
        # and the loop spins until its clock ticks over (seen as hundreds of wakeups).
        at = math.ceil((wake + self._offset) * 1000.0) / 1000.0 + 0.0005
        # And never less than a millisecond ahead: uvloop's clock reads the same millisecond
        # for the whole of it, and a shorter delay truncates to 0 -- the handle fires at once,
        # the clock has not moved, nothing is due, and the same instant is armed again: a
        # busy loop until the millisecond ends (dozens of wakeups; 16 in 40 runs of
        # test_an_earlier_timer_rearms_the_sleeping_driver saw it).
        now = self._loop.time()
        at = max(at, now + 0.001)
        self._handle = self._loop.call_at(at, self._on_wakeup)

    def _on_wakeup(self) -> None:
        self._handle = None
        self._armed = math.inf
        self.wakeups += 1
        try:
            self.wheel.advance(self._loop.time() - self._offset)
        finally:
            self._rearm()
