"""Type stub for the compiled timer wheel (fastsip/timers/_wheel.pyx)."""

import array
from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar, final

from typing_extensions import TypeVarTuple, Unpack

from fastsip.errors import FastSIPError

_Ts = TypeVarTuple("_Ts")
_R = TypeVar("_R")
_ErrorHandler: TypeAlias = Callable[[Exception, Callable[..., Any]], object]

class TimerError(FastSIPError, ValueError):
    """Bad input to the timer wheel: a NaN deadline or clock value, or a bad tick."""

@final
class TimerHandle:
    """A scheduled callback; made by ``TimerWheel.call_later``/``call_at``."""

    def cancel(self) -> bool:
        """Unschedule the callback; True if it was still pending."""
    @property
    def when(self) -> float:
        """The deadline, in wheel seconds, exactly as scheduled."""
    @property
    def cancelled(self) -> bool:
        """True once ``cancel()`` has been called."""
    @property
    def pending(self) -> bool:
        """True until the callback has fired or been cancelled."""

@final
class TimerWheel:
    """A hierarchical timing wheel: O(1) schedule and cancel, never early, at most a tick late."""

    def __init__(self, tick: float = 0.001, start: float = 0.0) -> None: ...
    # callback mode
    def call_later(
        self, delay: float, callback: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> TimerHandle: ...
    def call_at(
        self, when: float, callback: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> TimerHandle: ...
    def set_clock(self, clock: Callable[[], float] | None, offset: float = 0.0) -> None:
        """Count ``call_later_now`` from ``clock() - offset`` (None: the wheel's clock)."""
    def clock_time(self) -> float:
        """The owner's clock as ``call_later_now`` counts it (the wheel's time without one)."""
    def held_clock(
        self, now: float, callback: Callable[[Unpack[_Ts]], _R], *args: Unpack[_Ts]
    ) -> _R:
        """``callback(*args)`` with the owner's clock held at ``now`` (the shell holds it in
        C for a wakeup's datagrams); returns what it returns."""
    def call_later_now(
        self, delay: float, callback: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> TimerHandle:
        """``call_later`` counted from the owner's clock (``set_clock``)."""
    def call_later_lax(
        self, delay: float, callback: Callable[[Unpack[_Ts]], object], *args: Unpack[_Ts]
    ) -> TimerHandle:
        """``call_later_now`` with the deadline rounded up onto a coarse grid of ticks (at most
        128 ticks, at most delay/8), so that many timers share one wakeup; never early."""
    # key mode: integers in, one array('q') of integers out
    def schedule_key(self, delay: float, key: int) -> int:
        """Schedule int64 ``key``; return a cancel token (an int)."""
    def schedule_key_at(self, when: float, key: int) -> int: ...
    def cancel_key(self, token: int) -> bool: ...
    def advance_keys(self, now: float) -> array.array[int]:
        """``advance(now)``, then every key expired since the last call, in deadline order."""
    @property
    def key_handler(self) -> Callable[[array.array[int]], object] | None: ...
    @key_handler.setter
    def key_handler(self, handler: Callable[[array.array[int]], object] | None) -> None: ...
    # the clock
    def advance(self, now: float) -> int:
        """Move the clock to ``now``, fire what is due in deadline order; return how many."""
    def time(self) -> float: ...
    @property
    def tick(self) -> float: ...
    def next_deadline(self) -> float | None: ...
    def next_wakeup(self) -> float | None: ...
    @property
    def wakeup_at(self) -> float: ...
    @wakeup_at.setter
    def wakeup_at(self, when: float) -> None: ...
    @property
    def wakeup_hook(self) -> Callable[[], object] | None: ...
    @wakeup_hook.setter
    def wakeup_hook(self, hook: Callable[[], object] | None) -> None: ...
    @property
    def on_error(self) -> _ErrorHandler | None: ...
    @on_error.setter
    def on_error(self, handler: _ErrorHandler | None) -> None: ...
    def clear(self) -> int: ...
    def __len__(self) -> int: ...
    # counters
    @property
    def scheduled(self) -> int: ...
    @property
    def fired(self) -> int: ...
    @property
    def cancelled(self) -> int: ...
    @property
    def max_lateness(self) -> float: ...

def _bench_key_cycles(wheel: TimerWheel, n: int, delay: float) -> int:
    """``n`` key-mode schedule+cancel pairs through the C API (for benchmarks)."""
