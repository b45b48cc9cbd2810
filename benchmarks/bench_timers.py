"""Timer benchmarks: the fastsip wheel against asyncio's and uvloop's timers, in the same run.

The transaction layer's common case is a timer scheduled and cancelled before it fires (a final
response stops Timer B), so the headline is schedule+cancel; then how fast expired key timers
come back.  Every round does a batch (1000 pairs, or a whole expiry sweep) so that per-round
overhead does not dominate.  The guard compares minimum round times, so each benchmark runs
enough rounds (~50-100 ms in all) for its minimum to be an undisturbed one on a busy machine.
"""

from __future__ import annotations

import asyncio
import heapq
import random

import pytest

from fastsip.timers import TimerWheel
from fastsip.timers._wheel import _bench_key_cycles

N = 1000            # schedule+cancel pairs per round
ROUNDS = 200        # for the ~1 ms asyncio rounds; the wheel's ~50 us rounds run 1000
FAST_ROUNDS = 1000
DELAYS = [0.5 + (i % 64) * 0.5 for i in range(N)]     # T1 .. 64*T1, as Timers A..K are


def _noop() -> None:
    pass


def _pedantic(benchmark, run, setup=None, rounds=ROUNDS):
    benchmark.pedantic(run, setup=setup, rounds=rounds, iterations=1, warmup_rounds=2)


# -- schedule + cancel, callback mode ------------------------------------------------------------


def test_schedule_cancel_wheel(benchmark):
    wheel = TimerWheel(tick=0.001)
    call_later = wheel.call_later

    def run():
        for d in DELAYS:
            call_later(d, _noop).cancel()

    _pedantic(benchmark, run, rounds=FAST_ROUNDS)
    assert len(wheel) == 0


def _loop_schedule_cancel(benchmark, loop):
    call_later = loop.call_later

    def run():
        for d in DELAYS:
            call_later(d, _noop).cancel()

    def settle():
        # One loop pass between rounds lets the loop drop cancelled handles, as a running
        # loop would; otherwise its heap grows by N per round.
        loop.run_until_complete(asyncio.sleep(0))

    try:
        _pedantic(benchmark, run, setup=settle)
    finally:
        loop.close()


def test_schedule_cancel_asyncio(benchmark):
    _loop_schedule_cancel(benchmark, asyncio.new_event_loop())


def test_schedule_cancel_uvloop(benchmark):
    uvloop = pytest.importorskip("uvloop")
    _loop_schedule_cancel(benchmark, uvloop.new_event_loop())


# -- schedule + cancel, key mode -----------------------------------------------------------------


def test_key_schedule_cancel_wheel(benchmark):
    """From Python: two method calls per pair (the same loop shape as the callback benchmark:
    one key for all, as that one passes one callback for all)."""
    wheel = TimerWheel(tick=0.001)
    schedule, cancel = wheel.schedule_key, wheel.cancel_key

    def run():
        for d in DELAYS:
            cancel(schedule(d, 7))

    _pedantic(benchmark, run, rounds=FAST_ROUNDS)
    assert len(wheel) == 0


def test_key_schedule_cancel_wheel_c(benchmark):
    """Through the C API (``cimport``), as the compiled transaction layer calls it."""
    wheel = TimerWheel(tick=0.001)
    _pedantic(benchmark, lambda: _bench_key_cycles(wheel, N, 0.5), rounds=4 * FAST_ROUNDS)
    assert len(wheel) == 0


# -- expiry in key mode --------------------------------------------------------------------------

EXPIRE_N = 100_000
STEP = 0.004        # an advance every 4 ms across one second of deadlines
_rng = random.Random(3)
EXPIRE_WHENS = [_rng.uniform(0.0, 1.0) for _ in range(EXPIRE_N)]
EXPIRE_STEPS = [STEP * (i + 1) for i in range(int(1.0 / STEP) + 1)]


def test_key_expiry_wheel(benchmark):
    """100k key timers spread over 1 s (some already cascaded from level 1), advanced in 4 ms
    steps; each step returns its expired keys as one array."""
    state = {}

    def setup():
        wheel = TimerWheel(tick=0.001)
        schedule_at = wheel.schedule_key_at
        for k, when in enumerate(EXPIRE_WHENS):
            schedule_at(when, k)
        state["wheel"] = wheel

    def run():
        advance_keys = state["wheel"].advance_keys
        for now in EXPIRE_STEPS:
            advance_keys(now)

    _pedantic(benchmark, run, setup=setup, rounds=30)
    assert len(state["wheel"]) == 0


def _expiry_bench(benchmark, whens, rounds):
    steps = [STEP * (i + 1) for i in range(int(max(whens) / STEP) + 2)]
    state = {}

    def setup():
        wheel = TimerWheel(tick=0.001)
        schedule_at = wheel.schedule_key_at
        for k, when in enumerate(whens):
            schedule_at(when, k)
        state["wheel"] = wheel

    def run():
        advance_keys = state["wheel"].advance_keys
        for now in steps:
            advance_keys(now)

    _pedantic(benchmark, run, setup=setup, rounds=rounds)
    assert len(state["wheel"]) == 0


def test_key_expiry_wheel_1m(benchmark):
    """A million random deadlines over 1 s (40 MB of nodes, scattered in time order): the
    worst case for memory locality.  Reported, not guarded."""
    rng = random.Random(11)
    _expiry_bench(benchmark, [rng.uniform(0.0, 1.0) for _ in range(1_000_000)], rounds=5)


def test_key_expiry_wheel_transactions(benchmark):
    """100k transactions arriving over 1 s, each with a retransmit-style timer (50..800 ms,
    doubling like Timer A): deadlines follow arrival, as on a proxy.  Reported, not guarded."""
    rng = random.Random(12)
    arrivals = sorted(rng.uniform(0.0, 1.0) for _ in range(EXPIRE_N))
    _expiry_bench(benchmark, [t + rng.choice((0.05, 0.1, 0.2, 0.4, 0.8)) for t in arrivals], 30)


def test_key_expiry_heapq(benchmark):
    """Reference: asyncio's algorithm (a heap of (when, seq, key), pop while due), keys only."""
    state = {}

    def setup():
        heap = [(when, k, k) for k, when in enumerate(EXPIRE_WHENS)]
        heapq.heapify(heap)
        state["heap"] = heap

    def run():
        heap = state["heap"]
        pop = heapq.heappop
        for now in EXPIRE_STEPS:
            out = []
            while heap and heap[0][0] <= now:
                out.append(pop(heap)[2])

    _pedantic(benchmark, run, setup=setup, rounds=30)
    assert not state["heap"]


GUARDS = [
    ("test_schedule_cancel_wheel", "test_schedule_cancel_asyncio", 10.0,
     "call_later+cancel vs asyncio (>= 10x)"),
    ("test_schedule_cancel_wheel", "test_schedule_cancel_uvloop", 3.0,
     "call_later+cancel vs uvloop (>= 3x)"),
    ("test_key_schedule_cancel_wheel", "test_schedule_cancel_asyncio", 10.0,
     "key schedule+cancel (Python calls) vs asyncio"),
    ("test_key_schedule_cancel_wheel_c", "test_schedule_cancel_asyncio", 30.0,
     "key schedule+cancel (C API) vs asyncio"),
    ("test_key_expiry_wheel", "test_key_expiry_heapq", 8.0,
     "key expiry, 100k timers vs a heapq sweep"),
]
