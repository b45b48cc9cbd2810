"""CPU cost per completed call of ``fastsip answer`` against ``sipp -sn uas``, in the same run.

Both answerers take the same steady load from ``sipp -sn uac`` (INVITE, 200, ACK, BYE, 200 per
call) on 127.0.0.1; we read the answering process's CPU time (every thread's
``/proc/<pid>/task/*/schedstat``, nanoseconds; ``/proc/<pid>/stat`` utime+stime as a fallback)
just before the load starts and again when sipp's UAC has finished its last call, and divide by
the calls sipp counts as successful.  sipp is C++, so the ratio ``sipp / fastsip`` is below 1;
the floor below only catches a large regression (a Python object per header, a coroutine per
message ...).

This is a plain pytest (no ``benchmark`` fixture): pytest-benchmark times the pytest process,
and what matters here is another process's CPU time.  ``benchmarks/guard.py`` runs it with the
others; a ratio under the floor fails the test and so the guard run.  Standalone:

    PYTHONPATH=. python benchmarks/bench_answer.py [--calls 2000] [--rate 200]

Linux only (procfs); skipped without sipp.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from benchproc import cpu_seconds, fastsip_env, free_port

SIPP = shutil.which("sipp")
HOST = "127.0.0.1"
CALLS = int(os.environ.get("FASTSIP_BENCH_CALLS", "2000"))
RATE = int(os.environ.get("FASTSIP_BENCH_RATE", "200"))
WARMUP_CALLS = 200
#: fastsip may cost at most 1/FLOOR times sipp's CPU per call before the guard fails.
FLOOR = 0.2

# No GUARDS entry: this is not a pytest-benchmark timing (see the module docstring).
GUARDS: list[tuple[str, str, float, str]] = []


def run_uac(port: int, calls: int, rate: int, workdir: Path, name: str) -> int:
    """sipp's UAC load against ``port``; returns the calls it counted as successful."""
    assert SIPP is not None
    stat = workdir / f"{name}.csv"
    subprocess.run(
        [SIPP, "-sn", "uac", f"{HOST}:{port}", "-i", HOST, "-p", str(free_port()),
         "-m", str(calls), "-r", str(rate), "-timeout", str(calls // rate + 60), "-nostdin",
         "-trace_stat", "-stf", str(stat), "-fd", "1"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    rows = list(csv.reader(stat.read_text().splitlines(), delimiter=";"))
    return int(dict(zip(rows[0], rows[-1]))["SuccessfulCall(C)"])


def measure(argv: Sequence[str], env: dict[str, str] | None, calls: int, rate: int,
            workdir: Path, name: str, ready: str | None) -> tuple[float, int]:
    """Start an answerer, warm it up, then (CPU seconds, successful calls) under the load."""
    port = free_port()
    cmd = [a.replace("{port}", str(port)) for a in argv]
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
    try:
        if ready is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert ready in line, f"{name} did not start: {line!r}"
        else:
            time.sleep(0.5)
        run_uac(port, WARMUP_CALLS, rate, workdir, f"{name}_warmup")
        time.sleep(0.5)
        before = cpu_seconds(proc.pid)
        ok = run_uac(port, calls, rate, workdir, name)
        after = cpu_seconds(proc.pid)
        return after - before, ok
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def compare(calls: int = CALLS, rate: int = RATE) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ours_cpu, ours_ok = measure(
            [sys.executable, "-m", "fastsip.cli", "answer", "--listen", f"udp:{HOST}:{{port}}"],
            fastsip_env(), calls, rate, workdir, "fastsip", ready="listening on")
        assert SIPP is not None
        ref_cpu, ref_ok = measure(
            [SIPP, "-sn", "uas", "-i", HOST, "-p", "{port}", "-nostdin"], None, calls, rate,
            workdir, "sipp", ready=None)
    ours = ours_cpu / max(ours_ok, 1)
    ref = ref_cpu / max(ref_ok, 1)
    return {"calls": calls, "rate": rate, "fastsip_ok": ours_ok, "sipp_ok": ref_ok,
            "fastsip_cpu_s": ours_cpu, "sipp_cpu_s": ref_cpu,
            "fastsip_us_per_call": ours * 1e6, "sipp_us_per_call": ref * 1e6,
            "ratio": ref / ours if ours > 0 else float("inf")}


def report(r: dict[str, float]) -> str:
    return (f"CPU per completed call, sipp uac at {r['rate']:.0f} cps x {r['calls']:.0f} calls:\n"
            f"  fastsip answer  {r['fastsip_us_per_call']:8.1f} us/call  "
            f"({r['fastsip_cpu_s']:.3f} s CPU, {r['fastsip_ok']:.0f} calls ok)\n"
            f"  sipp -sn uas    {r['sipp_us_per_call']:8.1f} us/call  "
            f"({r['sipp_cpu_s']:.3f} s CPU, {r['sipp_ok']:.0f} calls ok)\n"
            f"  ratio sipp/fastsip {r['ratio']:.3f}  (floor {FLOOR})")


@pytest.mark.skipif(SIPP is None or not os.path.isdir("/proc/self/task"),
                    reason="needs sipp and Linux procfs")
def test_answer_cpu_per_call() -> None:
    r = compare()
    print("\n" + report(r))
    assert r["fastsip_ok"] >= 0.99 * r["calls"], r
    assert r["ratio"] >= FLOOR, report(r)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="CPU per call: fastsip answer vs sipp -sn uas")
    ap.add_argument("--calls", type=int, default=CALLS)
    ap.add_argument("--rate", type=int, default=RATE)
    a = ap.parse_args()
    if SIPP is None:
        sys.exit("sipp is not installed")
    print(report(compare(a.calls, a.rate)))
