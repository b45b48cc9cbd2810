"""Helpers for the benchmarks that measure another process's CPU time (bench_answer,
bench_proxy, bench_media): free ports, /proc CPU accounting, the environment for fastsip
subprocesses, and stopping what a benchmark started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
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
