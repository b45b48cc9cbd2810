"""Requests answered per second by one proxy process at saturation: ``fastsip serve`` against
Kamailio's one UDP child, in the same run (issue 11: within 2x of Kamailio).

Both run as bench_proxy.py starts them (serve as installed, with its defaults -- INFO logging,
one line a request, to a file -- and the bench's routes module; Kamailio with
``benchmarks/kamailio/kamailio.cfg`` and ``-n 1``).  serve lists the sender in ``--trusted``,
as a carrier lists the SBC in front of it: untrusted, one source at this rate is the flood the
default ``--rate-limit`` bans (the edge checks still run on every request).  The load is distinct OPTIONS requests for
a user nobody registered, so both answer each with 404 Not Found: Kamailio's config through
``t_check_trans`` and ``sl_send_reply``, serve through its edge checks, a server transaction
and the routes module.  The sender (bench_udp_intake's, one Python process on the other core)
keeps ``WINDOW`` requests outstanding -- a new one per answer -- so the proxy never idles and
nothing is dropped: the proxy is the bottleneck (the report gives its CPU utilisation, ~100 %
of a core for both).  A flood that overflows the socket would measure the sender's receive
loop instead.

Per proxy, in interleaved rounds (each proxy's best round counts): answers per second, and the
proxy's CPU per answer, user and system apart.

    PYTHONPATH=. python benchmarks/bench_saturation.py [--requests 40000] [--window 32]
                                                       [--rounds 2] [--kamailio-mem tlsf]

``--kamailio-mem`` (or ``FASTSIP_BENCH_KAMAILIO_MEM``) gives Kamailio a faster memory manager
than Debian's default qm, as in bench_proxy.py.

The test asserts fastsip's rate at least ``BAR`` times Kamailio's (a regression catch; the
issue's goal, ``GOAL``, is printed beside it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bench_proxy import (
    KAMAILIO,
    KAMAILIO_MEM,
    _wait_udp_answers,
    cpu_seconds,
    fastsip_argv,
    kamailio_argv,
)
from bench_udp_intake import send
from benchproc import fastsip_env, free_port, stop

REQUESTS = int(os.environ.get("FASTSIP_BENCH_SATURATION_REQUESTS", "40000"))
WINDOW = 32
ROUNDS = int(os.environ.get("FASTSIP_BENCH_SATURATION_ROUNDS", "2"))
WARMUP = 2000
#: Issue 11's goal: fastsip answers at least half as many requests a second as Kamailio's one
#: child.  Measured here against Debian's Kamailio (qm): 0.64x, 0.65x and 0.77x (22.0k against
#: 34.2k, 19.3k against 29.5k, 24.0k against 31.3k a second).  Kamailio with ``tlsf`` answered
#: 128k a second (7.1 us of CPU each, against qm's 31 us): fastsip 0.21x of that.  Since the
#: UDP socket holds a wakeup's answers and sends them with one sendmmsg (553bb11): 1.20x,
#: 1.21x and 1.26x (18.7k against 15.6k, 17.5k against 14.4k, 17.8k against 14.1k); in CI
#: 1.20x, and 0.80x then 1.05x in a slow run (12.9k against 16.2k).
GOAL = 0.5
#: The test's floor: a regression catch with room for this VM's rounds, which moved from
#: 0.80x to 1.26x within a day (0.4 before 553bb11, when they read 0.64-0.77x).  It catches
#: a step back of a third; losing the batched sends alone (~0.7x) may pass it.
BAR = float(os.environ.get("FASTSIP_BENCH_SATURATION_BAR", "0.6"))

GUARDS: list[tuple[str, str, float, str]] = []   # a plain test: see the docstring


def answer_round(proxy: str, requests: int, window: int, workdir: Path,
                 kamailio_mem: str = KAMAILIO_MEM) -> dict[str, Any]:
    """One fresh proxy, a warm-up, then ``requests`` OPTIONS with ``window`` outstanding."""
    port = free_port()
    if proxy == "fastsip":
        argv, env = fastsip_argv(workdir), fastsip_env()
    else:
        argv, env = kamailio_argv(workdir, kamailio_mem) + ["-n", "1"], None
    argv = [a.replace("{port}", str(port)) for a in argv]
    log = (workdir / f"{proxy}.log").open("wb")
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    try:
        _wait_udp_answers(port)
        send("options", port, WARMUP, window)
        before = cpu_seconds(proc.pid)
        start = time.monotonic()
        answered = send("options", port, requests, window)
        wall = time.monotonic() - start
        after = cpu_seconds(proc.pid)
    finally:
        stop(proc)
        log.close()
    cpu, user, system = (a - b for a, b in zip(after, before))
    n = max(answered, 1)
    return {"proxy": proxy, "answered": answered, "requests": requests, "wall": wall,
            "rate": answered / wall, "util": cpu / wall, "us": cpu / n * 1e6,
            "user_us": user / n * 1e6, "sys_us": system / n * 1e6}


def compare(requests: int = REQUESTS, window: int = WINDOW, rounds: int = ROUNDS,
            kamailio_mem: str = KAMAILIO_MEM) -> dict[str, Any]:
    """Interleaved rounds (K F, F K, ...); each proxy's best round (highest rate) counts."""
    best: dict[str, dict[str, Any]] = {}
    every: dict[str, list[float]] = {"kamailio": [], "fastsip": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for proxy in (("kamailio", "fastsip") if i % 2 == 0 else ("fastsip", "kamailio")):
                workdir = Path(tmp) / f"{proxy}{i}"
                workdir.mkdir()
                r = answer_round(proxy, requests, window, workdir, kamailio_mem)
                every[proxy].append(r["rate"])
                if proxy not in best or r["rate"] > best[proxy]["rate"]:
                    best[proxy] = r
    return {"best": best, "rounds": every, "kamailio_mem": kamailio_mem,
            "ratio": best["fastsip"]["rate"] / best["kamailio"]["rate"]}


def report(r: dict[str, Any]) -> str:
    lines = []
    for proxy in ("kamailio", "fastsip"):
        b = r["best"][proxy]
        name = (f"kamailio 5.6, one child ({r['kamailio_mem'] or 'qm'})" if proxy == "kamailio"
                else "fastsip serve (info)")
        lines.append(f"  {name:24} {b['rate']:8.0f} answers/s ({b['answered']} of "
                     f"{b['requests']}; {b['util']:.0%} of a core; {b['us']:.1f} us CPU an "
                     f"answer: user {b['user_us']:.1f}, sys {b['sys_us']:.1f})")
    rounds = ", ".join(f"{p} [{', '.join(f'{x:.0f}' for x in r['rounds'][p])}]"
                       for p in ("kamailio", "fastsip"))
    lines.append(f"  fastsip/kamailio answers a second: {r['ratio']:.2f}x (issue 11's goal "
                 f"{GOAL}x, asserted >= {BAR}x); rounds: {rounds}")
    return "\n".join(lines)


@pytest.mark.skipif(KAMAILIO is None or not os.path.isdir("/proc/self/task"),
                    reason="needs kamailio and Linux procfs")
def test_requests_answered_at_saturation_vs_kamailio() -> None:
    r = compare()
    print("\n" + report(r))
    for proxy, b in r["best"].items():
        assert b["answered"] == b["requests"], f"{proxy}: {b['answered']} of {b['requests']}"
    assert r["ratio"] >= BAR, report(r)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="requests answered a second at saturation: "
                                 "fastsip serve vs Kamailio's one child")
    ap.add_argument("--requests", type=int, default=REQUESTS)
    ap.add_argument("--window", type=int, default=WINDOW)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--kamailio-mem", choices=["", "qm", "fm", "tlsf"], default=KAMAILIO_MEM,
                    help="Kamailio's memory manager (default: the packaged default, qm)")
    a = ap.parse_args()
    if KAMAILIO is None:
        sys.exit("needs kamailio")
    print(report(compare(a.requests, a.window, a.rounds, a.kamailio_mem)))
