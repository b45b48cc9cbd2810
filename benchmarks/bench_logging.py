"""What ``fastsip serve``'s per-request log line costs: on the serving loop, and per call.

(a) Microseconds per log line on the *calling* thread (what the event loop pays), the line
    ``ServeRouter`` writes for every initial request, to ``/dev/null``:

    - ``sync``: the logging of before, ``logging.basicConfig``'s StreamHandler: the loop builds
      the LogRecord, formats it and writes it;
    - ``record``: ``log.info`` into :class:`~fastsip.app.logqueue.QueueLogHandler`: the loop
      builds the LogRecord and queues it; the writer thread formats and writes;
    - ``direct``: what ``ServeRouter`` does under ``fastsip serve``: a tuple onto the queue
      (:func:`~fastsip.app.logqueue.direct_emitter`), no LogRecord at all.

    Measured with ``time.thread_time`` (CPU of the calling thread alone: the writer's work is
    not the loop's), plus the process CPU per line including the writer's formatting and
    writing.  The pytest-benchmark pair ``sync`` vs ``direct`` (wall time, minimum round) is
    the guard: the queued line must stay several times cheaper than the synchronous one even
    with the writer thread taking the GIL in between.

(b) CPU per call of ``fastsip serve --routes`` at ``--log-level info`` (a line per call: the
    INVITE's; the BYE is in-dialog, not an initial request) against ``--log-level warning`` (none), the load of
    ``bench_proxy.py`` (sipp ``uac_rr`` through serve to a registered sipp UAS), fastsip alone,
    in interleaved rounds, user and system CPU of serve's process (every thread) read from
    ``/proc/PID/stat``.  The ratio asserted is the median of the rounds' INFO / WARNING
    ratios (``benchproc.paired_ratio``: a slow spell of the VM moves both figures of a round
    alike); each level's best round is reported too.  The issue's bar: INFO at most 10%
    over WARNING.

    PYTHONPATH=. python benchmarks/bench_logging.py [--calls 1500] [--rate 150] [--rounds 3]
                                                    [--lines-only]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from benchproc import fastsip_env, paired_ratio

from fastsip.app import logqueue

HERE = Path(__file__).resolve().parent
SIPP = shutil.which("sipp")
HOST = "127.0.0.1"
DOMAIN = "example.com"
CALLS = int(os.environ.get("FASTSIP_BENCH_LOG_CALLS", "1500"))
RATE = int(os.environ.get("FASTSIP_BENCH_LOG_RATE", "150"))
ROUNDS = int(os.environ.get("FASTSIP_BENCH_LOG_ROUNDS", "3"))
#: The issue's bar: INFO's CPU per call at most this much over WARNING's.
TARGET = 1.10
#: What the test asserts: one run's per-call CPU moves by +-10% on a shared 2-core machine,
#: so the assert leaves that margin over the target (the report always prints the target).
BAR = float(os.environ.get("FASTSIP_BENCH_LOG_BAR", "1.25"))

#: (fast, reference, floor): the synchronous line against the queued one, wall time.  The
#: queued line costs ~0.7 us of the caller's CPU against ~20 us (to /dev/null; ~70 us to a
#: file on a loaded machine), but its wall time includes the writer thread's formatting
#: whenever it takes the GIL mid-round (~5 us a line): 3x leaves that margin.
GUARDS = [("test_log_line_direct", "test_log_line_sync", 3.0,
           "log line on the loop: queued tuple vs sync StreamHandler")]

LINE = "request method=%s status=%d outcome=%s duration_ms=%.1f %s"
FIELDS = ("call_id=a84b4c76e66710@pc33.example.com from=sip:alice@example.com "
          "to=sip:bob@example.com source=udp:192.0.2.4:5060")
LOGGER = "fastsip.app.serve"


# -- (a) one log line on the calling thread ------------------------------------------------------


class _Setup:
    """The three ways, each on a fresh root logger writing to /dev/null."""

    def __init__(self) -> None:
        self.devnull = open(os.devnull, "w")  # noqa: SIM115 - closed in close()
        self.root = logging.getLogger()
        self.saved = (self.root.handlers[:], self.root.level)
        self.log = logging.getLogger(LOGGER)
        self.queued: logqueue.QueueLogHandler | None = None

    def _only(self, handler: logging.Handler) -> None:
        for h in self.root.handlers[:]:
            self.root.removeHandler(h)
        self.root.addHandler(handler)
        self.root.setLevel(logging.INFO)

    def sync(self) -> Callable[[], None]:
        handler = logging.StreamHandler(self.devnull)
        handler.setFormatter(logging.Formatter(logqueue.FORMAT))
        self._only(handler)
        info = self.log.info
        return lambda: info(LINE, "INVITE", 200, "answered", 12.3456, FIELDS)

    def _queue(self) -> logqueue.QueueLogHandler:
        if self.queued is None:
            self.queued = logqueue.QueueLogHandler(self.devnull)
        self._only(self.queued)
        return self.queued

    def record(self) -> Callable[[], None]:
        self._queue()
        info = self.log.info
        return lambda: info(LINE, "INVITE", 200, "answered", 12.3456, FIELDS)

    def direct(self) -> Callable[[], None]:
        self._queue()
        emit = logqueue.direct_emitter(self.log, logging.INFO)
        assert emit is not None
        return lambda: emit(LINE, ("INVITE", 200, "answered", 12.3456, FIELDS))

    def flush(self) -> None:
        if self.queued is not None:
            self.queued.flush()

    def close(self) -> None:
        if self.queued is not None:
            self.queued.close()
        handlers, level = self.saved
        for h in self.root.handlers[:]:
            self.root.removeHandler(h)
        for h in handlers:
            self.root.addHandler(h)
        self.root.setLevel(level)
        self.devnull.close()


def line_costs(n: int = 20_000, rounds: int = 7) -> dict[str, tuple[float, float]]:
    """{way: (us of the caller's CPU per line, us of process CPU per line incl. the writer)},
    best round of each."""
    setup = _Setup()
    out = {}
    try:
        for way in ("sync", "record", "direct"):
            call = getattr(setup, way)()
            best_thread = best_process = float("inf")
            for _ in range(rounds):
                setup.flush()
                t0, p0 = time.thread_time(), time.process_time()
                for _ in range(n):
                    call()
                t1 = time.thread_time()
                setup.flush()                  # the writer's share belongs to the line too
                p1 = time.process_time()
                best_thread = min(best_thread, (t1 - t0) / n)
                best_process = min(best_process, (p1 - p0) / n)
            out[way] = (best_thread * 1e6, best_process * 1e6)
    finally:
        setup.close()
    return out


def report_lines(costs: dict[str, tuple[float, float]]) -> str:
    names = {"sync": "sync StreamHandler (before)", "record": "log.info -> QueueLogHandler",
             "direct": "direct tuple (serve's line)"}
    rows = [f"  {names[w]:30} {t:7.2f} us on the caller   {p:7.2f} us process CPU"
            for w, (t, p) in costs.items()]
    return "per-request log line to /dev/null, best round:\n" + "\n".join(rows)


@pytest.fixture
def setup() -> Any:
    s = _Setup()
    yield s
    s.close()


def test_log_line_sync(benchmark: Any, setup: _Setup) -> None:
    call = setup.sync()
    benchmark.pedantic(lambda: [call() for _ in range(100)], rounds=200, warmup_rounds=2)


def test_log_line_direct(benchmark: Any, setup: _Setup) -> None:
    call = setup.direct()
    benchmark.pedantic(lambda: [call() for _ in range(100)], rounds=200, warmup_rounds=2)
    setup.flush()
    assert setup.queued is not None and setup.queued.dropped == 0


def test_caller_pays_at_most_5us_per_line() -> None:
    costs = line_costs(n=5_000, rounds=5)
    print("\n" + report_lines(costs))
    assert costs["direct"][0] <= 5.0, report_lines(costs)


# -- (b) CPU per call of serve, INFO vs WARNING ----------------------------------------------------


def _ticks(path: str) -> tuple[int, int]:
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def _cpu(pid: int) -> tuple[float, float, float]:
    """(user, system) CPU seconds of every thread of ``pid`` so far, and the part of them
    spent by threads other than the main one (the log writer)."""
    tick = os.sysconf("SC_CLK_TCK")
    user, system = _ticks(f"/proc/{pid}/stat")
    others = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        if int(tid) != pid:
            with contextlib.suppress(FileNotFoundError):
                others += sum(_ticks(f"/proc/{pid}/task/{tid}/stat"))
    return user / tick, system / tick, others / tick


def measure_serve(level: str, calls: int, rate: int, workdir: Path, name: str
                  ) -> tuple[float, float, int, int, float]:
    """serve at ``level`` under bench_proxy's load (its ``measure``): (user s, system s,
    calls ok, log lines, CPU s of the log writer thread)."""
    from bench_proxy import fastsip_argv, measure

    (user, system, writer), ok, _ = measure(fastsip_argv(workdir, level), fastsip_env(), calls,
                                            rate, workdir, name, cpu=_cpu)
    lines = (workdir / f"{name}.log").read_text(errors="replace").count("request method=")
    return user, system, ok, lines, writer


def compare_levels(calls: int = CALLS, rate: int = RATE, rounds: int = ROUNDS
                   ) -> dict[str, Any]:
    runs: dict[str, list[tuple[float, float, int, int, float]]] = {"info": [], "warning": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            order = ["info", "warning"] if i % 2 == 0 else ["warning", "info"]
            for level in order:
                runs[level].append(measure_serve(level, calls, rate, Path(tmp), f"{level}{i}"))

    def per_call(r: tuple[float, float, int, int, float]) -> float:
        return (r[0] + r[1]) / max(r[2], 1) * 1e6

    best = {level: min(r, key=per_call) for level, r in runs.items()}
    paired = paired_ratio([per_call(r) for r in runs["info"]],
                          [per_call(r) for r in runs["warning"]])
    return {"calls": calls, "rate": rate, "rounds": rounds,
            "us": {level: per_call(best[level]) for level in runs},
            "user_us": {level: best[level][0] / max(best[level][2], 1) * 1e6 for level in runs},
            "sys_us": {level: best[level][1] / max(best[level][2], 1) * 1e6 for level in runs},
            "writer_us": {level: best[level][4] / max(best[level][2], 1) * 1e6
                          for level in runs},
            "ok": {level: min(r[2] for r in runs[level]) for level in runs},
            "lines": {level: max(r[3] for r in runs[level]) for level in runs},
            "rounds_us": {level: [round(per_call(r), 1) for r in runs[level]] for level in runs},
            "best_ratio": per_call(best["info"]) / max(per_call(best["warning"]), 1e-9),
            "ratio": paired}


def report_levels(r: dict[str, Any]) -> str:
    rows = [f"  --log-level {level:8} {r['us'][level]:7.1f} us/call  (user "
            f"{r['user_us'][level]:6.1f} + sys {r['sys_us'][level]:6.1f}, of which writer thread "
            f"{r['writer_us'][level]:5.1f}; {r['ok'][level]} "
            f"calls ok, {r['lines'][level]} request lines; rounds {r['rounds_us'][level]})"
            for level in ("warning", "info")]
    verdict = "within" if r["ratio"] <= TARGET else "ABOVE"
    return (f"fastsip serve --routes CPU per completed call, sipp uac_rr at {r['rate']} cps x "
            f"{r['calls']} calls, best of {r['rounds']} interleaved rounds:\n" + "\n".join(rows)
            + f"\n  info / warning {r['ratio']:.3f}x, the median of the rounds' ratios "
              f"({verdict} the {TARGET:.2f}x target; asserted <= {BAR:.2f}x); of the best "
              f"rounds {r['best_ratio']:.3f}x")


@pytest.mark.skipif(SIPP is None or not os.path.isdir("/proc/self/task"),
                    reason="needs sipp and Linux procfs")
def test_info_costs_at_most_10_percent_over_warning() -> None:
    r = compare_levels()
    print("\n" + report_levels(r))
    assert min(r["ok"].values()) >= 0.99 * r["calls"], r
    # A line per call (its INVITE; the BYE is in-dialog) for the measured and warm-up calls.
    assert r["lines"]["info"] >= r["ok"]["info"], r
    assert r["lines"]["warning"] == 0, r
    assert r["ratio"] <= BAR, report_levels(r)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=CALLS)
    ap.add_argument("--rate", type=int, default=RATE)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--lines-only", action="store_true", help="only (a): no sipp run")
    a = ap.parse_args()
    print(report_lines(line_costs()))
    if not a.lines_only:
        if SIPP is None:
            sys.exit("(b) needs sipp")
        print(report_levels(compare_levels(a.calls, a.rate, a.rounds)))
