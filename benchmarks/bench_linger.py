"""What the loop pays to wake for lingering transactions: exact timers against lax ones, the
same load in one run.

A proxied call leaves timers that only free its transactions once they have absorbed
retransmissions (RFC 3261 Timers J, K, L, M, ...).  Exact, each is a wakeup of the event loop
of its own, since calls end milliseconds apart; lax (``TimerWheel.call_later_lax``, what the
transaction layer uses for them), they are rounded up onto a 128 ms grid and share a few
wakeups a second.  Here a uvloop loop (asyncio where uvloop is missing) stands for serve: 150
"calls" a second, each a wake-up of the loop (its datagrams) that leaves three such timers
(2 s, 3.2 s, 3.202 s: Timer K and the 64*T1 ones, compressed), with ``WheelDriver`` scheduling
them exactly (``call_later``) or laxly (``call_later_lax``).  Each variant runs in a process of
its own, in interleaved rounds; after 4 s (the timers of earlier calls then expire as fast as
new ones are set) the process's user and system CPU, its voluntary context switches and the
wheel's wakeups are counted for ``SECONDS`` seconds, per call.  The reference is the exact
variant: the guard asserts that lax costs less (``exact / lax >= FLOOR``) and wakes at most a
few dozen times a second.

    python benchmarks/bench_linger.py [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any

import pytest

ROUNDS = int(os.environ.get("FASTSIP_BENCH_LINGER_ROUNDS", "3"))
SECONDS = float(os.environ.get("FASTSIP_BENCH_LINGER_SECONDS", "4"))
RATE = 150
DELAYS = (2.0, 3.2, 3.202)
#: exact / lax CPU per call at least this.  Measured 1.4-2.3x on a 2-core VM (~25-30 us per
#: avoided wakeup, 2.2 avoided per call), but one CI attempt of two rounds read 1.14x: the
#: wakeup counts below are the exact part of the guard, this one catches a saving that is gone.
FLOOR = 1.1
#: Lax wakeups a second at most: a 128 ms grid is ~8 a second (and the cascades share them).
MAX_LAX_WAKEUPS = 30.0

GUARDS: list[tuple[str, str, float, str]] = []   # a plain test: process CPU, see above


def child(method: str, seconds: float) -> dict[str, float]:
    """The load in this process: returns per-call CPU (us), switches and wakeups a second."""
    import asyncio

    from fastsip.asyncio import WheelDriver
    try:
        import uvloop
        new_loop: Any = uvloop.new_event_loop
    except ImportError:     # pragma: no cover - uvloop is a dependency where it builds
        new_loop = asyncio.new_event_loop
    out: dict[str, float] = {}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        driver = WheelDriver()
        schedule = getattr(driver, method)

        def nop() -> None:
            pass

        start = loop.time()
        measure_at, end = start + 4.0, start + 4.0 + seconds
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        w0, t0 = driver.wakeups, time.monotonic()
        measuring = False
        while loop.time() < end:
            if not measuring and loop.time() >= measure_at:
                measuring = True
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                w0, t0 = driver.wakeups, time.monotonic()
            for delay in DELAYS:
                schedule(delay, nop)
            await asyncio.sleep(1 / RATE)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        elapsed = time.monotonic() - t0
        calls = elapsed * RATE
        out.update(user_us=(r1.ru_utime - r0.ru_utime) / calls * 1e6,
                   sys_us=(r1.ru_stime - r0.ru_stime) / calls * 1e6,
                   switches=(r1.ru_nvcsw - r0.ru_nvcsw) / calls,
                   wakeups_per_s=(driver.wakeups - w0) / elapsed)
        driver.close()

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    return out


def run_variant(method: str, seconds: float) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, "--child", method, "--seconds", str(seconds)],
                          capture_output=True, text=True, timeout=seconds + 60, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(rounds: int = ROUNDS, seconds: float = SECONDS) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"call_later": [], "call_later_lax": []}
    for i in range(rounds):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for method in order:
            runs[method].append(run_variant(method, seconds))
    best = {m: min(r, key=lambda x: x["user_us"] + x["sys_us"]) for m, r in runs.items()}
    cpu = {m: b["user_us"] + b["sys_us"] for m, b in best.items()}
    return {"runs": runs, "best": best,
            "ratio": cpu["call_later"] / cpu["call_later_lax"] if cpu["call_later_lax"] else 0.0}


def report(r: dict[str, Any]) -> str:
    rounds = len(r["runs"]["call_later"])
    title = (f"loop CPU per call for its linger timers ({RATE} calls/s, 3 timers a call; "
             f"best of {rounds} rounds):")
    lines = [title]
    for method, b in r["best"].items():
        name = "exact (call_later)" if method == "call_later" else "lax (call_later_lax)"
        lines.append(f"  {name:22s} {b['user_us'] + b['sys_us']:7.1f} us/call (user "
                     f"{b['user_us']:.1f}, sys {b['sys_us']:.1f}); {b['switches']:.2f} "
                     f"context switches a call; {b['wakeups_per_s']:.0f} wheel wakeups a second")
    lines.append(f"  exact / lax {r['ratio']:.2f}x (floor {FLOOR}x)")
    return "\n".join(lines)


@pytest.mark.skipif(sys.platform == "win32", reason="resource.getrusage: POSIX")
def test_lax_linger_timers_cost_the_loop_less() -> None:
    r = compare()
    print("\n" + report(r))
    lax = r["best"]["call_later_lax"]
    assert lax["wakeups_per_s"] <= MAX_LAX_WAKEUPS, report(r)
    assert r["best"]["call_later"]["wakeups_per_s"] >= 10 * lax["wakeups_per_s"], report(r)
    assert r["ratio"] >= FLOOR, report(r)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--seconds", type=float, default=SECONDS)
    ap.add_argument("--child", choices=("call_later", "call_later_lax"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.seconds)))
    else:
        print(report(compare(a.rounds, a.seconds)))
