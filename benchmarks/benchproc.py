"""Helpers for the benchmarks that measure another process's CPU time (bench_answer,
bench_proxy, bench_media): free ports, /proc CPU accounting, the environment for fastsip
subprocesses, and stopping what a benchmark started."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fastsip

HOST = "127.0.0.1"


def free_port(host: str = HOST) -> int:
    """A port free for both UDP and TCP on ``host``."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((host, 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no free port")


def machine_busy_seconds() -> float:
    """CPU seconds every CPU of the machine has spent not idle so far, whoever spent them: the
    proxy, sipp, other users of the machine.  (Only differences of two readings mean anything.)

    Counted as the time elapsed on every CPU less the idle (and iowait) time of /proc/stat.  A
    tickless kernel measures idle time exactly, but its user and system columns are sampled at
    each tick, and they miss work that wakes and sleeps again between two ticks -- a timer-paced
    load such as a proxy's and sipp's: summed, they read 0.14 cores on this VM while serve and
    sipp were using 0.55 (which the idle time gave)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = (ticks[3] + (ticks[4] if len(ticks) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
    return (os.cpu_count() or 1) * time.clock_gettime(time.CLOCK_BOOTTIME) - idle


def paired_ratio(measured: Sequence[float], reference: Sequence[float]) -> float:
    """The median over rounds of ``measured[i] / reference[i]``, for two variants measured in
    interleaved rounds (round i runs both, back to back).  On this kind of VM a slow spell
    lasts minutes and moves every figure taken in it by tens of percent; it moves both
    figures of a round alike, so their ratio keeps still where the ratio of each variant's
    best round compares figures taken minutes apart (one best may come from a fast spell,
    the other not).  The median leaves out a round that a spell began or ended inside."""
    if not measured or len(measured) != len(reference):
        raise ValueError("paired_ratio needs as many rounds of each variant, at least one")
    return statistics.median(m / max(r, 1e-9) for m, r in zip(measured, reference))


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of every thread of ``pid`` so far: schedstat nanoseconds, or
    /proc/pid/stat clock ticks where schedstat is missing."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (FileNotFoundError, ProcessLookupError, ValueError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fastsip_env() -> dict[str, str]:
    """Subprocesses run the fastsip this process imported (put first on PYTHONPATH), never a
    checkout's uncompiled one picked up from their working directory."""
    env = dict(os.environ)
    parent = str(Path(fastsip.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([parent, *filter(None, [env.get("PYTHONPATH")])])
    return env


def stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``: only the process we started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
