"""What ``serve --workers 2`` costs and gives, against ``--workers 1``, measured in the same run.

The load is bench_proxy's (sipp ``uac_rr`` -> serve -> a REGISTERed sipp ``uas_rr``, the same
routes module, INFO logs), all of it from one sipp socket: the case SO_REUSEPORT alone would put
on one worker.  Both runs use the same Redis (started here, ``appendfsync always``), the store
workers share; Redis's own CPU is not counted in either.

- **CPU per completed call** of every serve process (the supervisor and its workers), best of
  ``ROUNDS`` interleaved rounds each, serve at its defaults: calls packed, so this light load
  stays in the worker that receives it (``--hashed`` adds ``--spread-above 0``, every call
  where its Call-ID hashes, for comparison).  The target is ``TARGET`` (1.15x); the guard
  fails past ``BAR``, or when packed workers hand datagrams over (``HANDED_BAR``).
- ``--kamailio``: the reference measured in the same rounds -- Kamailio
  (``benchmarks/kamailio/kamailio.cfg``, as bench_proxy starts it) with one UDP child against
  two (``-n 2``), under the same one-socket load: Kamailio's own answer to more cores.  Its
  2/1 ratio is what two processes waking on two cores shared with sipp cost a proxy that
  shares its transactions in shared memory and hands nothing over; fastsip's ratio beside it
  says how much of fastsip's is fastsip's.
- Beside the CPU, every round counts per call the context switches of every serve (or
  Kamailio) thread -- each one a wake-up or a preemption -- and, from the workers' last log
  lines, the datagrams handed between workers.  ``--syscalls perf`` adds a round of each
  variant under ``perf stat`` counting the syscall tracepoints per process (cheap: the
  timing hardly changes), ``--syscalls strace`` under ``strace -c -f`` (slow: its CPU is not
  a measurement, and it changes how many datagrams each wake-up finds; its counts are).
- ``--per-worker``: also ``--workers 2`` at twice the rate and ``--workers 1`` at half of it
  (see ``RATE_FACTOR``): the cost of two workers at the same load per worker, and what the
  load per process alone does to one worker's CPU per call.
- ``--throughput`` (standalone only): calls completed per second at rising offered rates for
  both, with the machine's busy time, so what sipp itself takes of the two cores shows.

    PYTHONPATH=tests python benchmarks/bench_workers.py [--calls 1500] [--rate 150] [--rounds 2]
                                                     [--ports] [--kamailio] [--per-worker]
                                                     [--hashed]
                                                     [--syscalls strace|perf]
                                                     [--throughput [--throughput-rates R,R]]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import pytest
from bench_proxy import (
    DOMAIN,
    HOST,
    KAMAILIO,
    ROUTES,
    SIPP,
    _descendants,
    _sipp,
    _wait_udp_answers,
    cpu_seconds,
    kamailio_argv,
    load_generator_seconds,
    measure,
    sipp_counts,
    successful,
)
from benchproc import fastsip_env, free_port, machine_busy_seconds, stop

CALLS = int(os.environ.get("FASTSIP_BENCH_WORKERS_CALLS", "1500"))
RATE = int(os.environ.get("FASTSIP_BENCH_WORKERS_RATE", "150"))
ROUNDS = int(os.environ.get("FASTSIP_BENCH_WORKERS_ROUNDS", "2"))
#: The issue's target: --workers 2 at most 1.15x --workers 1's CPU per call, at the same total
#: rate.  With calls hashed over both workers (``--spread-above 0``, the only placement before
#: packing) it measured 1.23-2.05x a round, 1.5 hand-offs a call: each worker got half the
#: load, so it idled twice as long between datagrams and paid for cold caches on each (one
#: worker at half the rate costs 1.2-2.5x as much per call itself).  Packed (the default), the
#: worker receiving this load keeps every call: 1.01x best rounds (0.81-1.06x a round, median
#: 0.89x), no hand-off.  ``BAR`` catches a regression with room for this VM's rounds (two runs
#: of one variant have differed by 1.35x); the hand-off count, which is exact, catches packing
#: undone.
TARGET = 1.15
BAR = float(os.environ.get("FASTSIP_BENCH_WORKERS_BAR", "1.5"))
#: Packed, the datagrams handed between workers per call under this load (measured: 0.00).
HANDED_BAR = 0.05
#: The same load per worker (``--per-worker``'s "2 at 2x" against "1"): what the second
#: worker itself costs, as workers are added for load one process cannot carry.  Hashed it
#: measured 1.03-1.46x (best rounds), packed 0.82x (the 300 calls/s stay in one worker too).
#: The bar catches a regression, with room for this VM's rounds.
PER_WORKER_BAR = float(os.environ.get("FASTSIP_BENCH_WORKERS_PER_WORKER_BAR", "1.6"))

GUARDS: list[tuple[str, str, float, str]] = []   # a plain test: see the docstring


def serve_argv(workdir: Path, workers: int, db: str, *extra: str) -> list[str]:
    routes = workdir / "bench_routes.py"
    routes.write_text(ROUTES)
    return [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"udp:{HOST}:{{port}}",
            "--routes", str(routes), "--domain", DOMAIN, "--db", db, "--trusted", HOST,
            "--workers", str(workers), *extra]


#: The variants measured: name -> (workers, extra serve options).  "2 shared" (only with
#: --ports) is the hand-off of every response too, as before workers had sockets of their own.
VARIANTS: dict[str, tuple[int, tuple[str, ...]]] = {
    "1": (1, ()), "2": (2, ()), "2 shared": (2, ("--worker-ports", "shared")),
    "2 at 2x": (2, ()), "1 at half": (1, ()),
    "2 hashed": (2, ("--spread-above", "0")),
    "2 hashed at 2x": (2, ("--spread-above", "0"))}
#: Variants run at another offered rate (and as many more or fewer calls) than ``--rate``
#: (``--per-worker``): "2 at 2x" gives each of two workers the load one worker gets at
#: ``--rate``; "1 at half" is one worker at the load each of two gets at ``--rate``.  At a fixed
#: total rate every worker of two idles twice as long between datagrams, and a proxy whose
#: code and data have left the caches between two datagrams pays for it on each: these two
#: tell that cost (a property of the load per process) from the cost of having two workers.
RATE_FACTOR: dict[str, float] = {"2 at 2x": 2.0, "1 at half": 0.5, "kam 2 at 2x": 2.0,
                                 "2 hashed at 2x": 2.0}
#: The reference (--kamailio): Kamailio's UDP children (``-n``, which overrides the config's
#: ``children=1``), all reading the one socket.
KAMAILIO_VARIANTS: dict[str, int] = {"kam 1": 1, "kam 2": 2, "kam 2 at 2x": 2}


def variant_argv(name: str, workdir: Path, db: str) -> tuple[list[str], dict[str, str] | None]:
    """The command (``{port}`` in it) and environment of variant ``name``."""
    if name in KAMAILIO_VARIANTS:
        return kamailio_argv(workdir) + ["-n", str(KAMAILIO_VARIANTS[name])], None
    workers, extra = VARIANTS[name]
    return serve_argv(workdir, workers, db, *extra), fastsip_env()


def counts(root: int) -> tuple[float, ...]:
    """CPU seconds (total, user, system: bench_proxy's :func:`cpu_seconds`) and context
    switches (voluntary + involuntary, of every thread) of ``root`` and its processes."""
    switches = 0
    for pid in _descendants(root):
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/status") as f:
                    switches += sum(int(line.split()[1]) for line in f
                                    if "ctxt_switches:" in line)
            except (FileNotFoundError, ProcessLookupError):
                continue
    return (*cpu_seconds(root), float(switches))


#: The syscalls ``--syscalls perf`` counts (tracepoints: no HW counters needed), and the
#: scheduler's software events.
PERF_EVENTS = ("raw_syscalls:sys_enter", "syscalls:sys_enter_epoll_pwait",
               "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_recvfrom",
               "syscalls:sys_enter_recvmsg", "syscalls:sys_enter_sendto",
               "syscalls:sys_enter_sendmsg", "syscalls:sys_enter_write",
               "syscalls:sys_enter_read", "syscalls:sys_enter_futex", "context-switches",
               "cpu-migrations")


class SyscallCounter:
    """A ``cpu`` reader for :func:`~bench_proxy.measure` that also counts the syscalls of
    every process of the proxy between its two readings (the measured load): ``strace -c -f``,
    or ``perf stat`` on the syscall tracepoints (``tool`` "perf")."""

    def __init__(self, path: Path, tool: str = "strace") -> None:
        self.path = path
        self.tool = tool
        self.proc: subprocess.Popen[bytes] | None = None

    def __call__(self, root: int) -> tuple[float, ...]:
        if self.proc is None:
            if self.tool == "perf":
                # Per thread, so that syscalls() counts each (thread, event) once.
                cmd = ["perf", "stat", "--per-thread", "-x", ";", "-e", ",".join(PERF_EVENTS),
                       "-p",
                       ",".join(str(pid) for pid in _descendants(root)), "-o", str(self.path)]
            else:
                cmd = ["strace", "-c", "-f", "-o", str(self.path),
                       *(a for pid in _descendants(root) for a in ("-p", str(pid)))]
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            time.sleep(1.0)                 # attached before the load starts
        else:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(30)
        return counts(root)

    def syscalls(self) -> dict[str, int]:
        """Calls per syscall name (and event), and "total"."""
        out: dict[str, int] = {}
        if self.tool == "perf":
            seen: dict[tuple[str, str], int] = {}   # (thread, event): each counted once
            for line in self.path.read_text().splitlines():
                fields = line.split(";")
                if len(fields) > 3 and fields[1].strip().isdigit():
                    name = fields[3].rsplit(":", 1)[-1].replace("sys_enter_", "")
                    seen[(fields[0], "total" if name == "sys_enter" else name)] = \
                        int(fields[1])
            for (_, name), n in seen.items():
                out[name] = out.get(name, 0) + n
            return out
        for line in self.path.read_text().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m:
                out[m.group(2)] = int(m.group(1))
        return out


def retransmissions(workdir: Path, name: str) -> str:
    """sipp's retransmissions in run ``name``, caller's and callee's (a late ACK makes the
    callee resend its 200, which the proxy forwards: CPU that is not the call's own)."""
    uac = sipp_counts(workdir, name).get("Retransmissions(C)", "?")
    try:
        uas = sipp_counts(workdir, f"{name}_uas").get("Retransmissions(C)", "?")
    except FileNotFoundError:
        uas = "?"
    return f"{uac}/{uas}"


def handed_off(log: Path) -> int:
    """Datagrams and stream messages handed between workers, from their last log lines."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(int(n) for n in re.findall(r"\bhanded_off=(\d+)", text)) + \
        sum(int(n) for n in re.findall(r"\bstream_handed=(\d+)", text))


def syscall_round(calls: int, rate: int, names: tuple[str, ...], tool: str = "strace") -> None:
    """One round of each variant under ``tool`` (see :class:`SyscallCounter`): syscalls per call."""
    from redisutil import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis")
        try:
            for name in names:
                tag = name.replace(" ", "-")
                reader = SyscallCounter(workdir / f"{tool}-{tag}.txt", tool)
                redis.flush()           # see compare()
                argv, env = variant_argv(name, workdir, redis.url)
                factor = RATE_FACTOR.get(name, 1.0)
                _, ok, _ = measure(argv, env, round(calls * factor), round(rate * factor),
                                   workdir, f"s{tag}", cpu=reader)
                found = reader.syscalls()
                top = sorted(((n, c) for n, c in found.items() if n != "total"),
                             key=lambda item: -item[1])[:8]
                print(f"{name:8} under {tool}: {found.get('total', 0) / max(ok, 1):6.1f} "
                      f"syscalls/call ({ok} calls, retransmissions caller/callee "
                      f"{retransmissions(workdir, f's{tag}')}): " + ", ".join(
                          f"{n} {c / max(ok, 1):.1f}" for n, c in top), flush=True)
        finally:
            redis.stop()


def compare(calls: int = CALLS, rate: int = RATE, rounds: int = ROUNDS,
            names: tuple[str, ...] = ("1", "2")) -> dict[str, Any]:
    """Rounds of every variant of ``names`` in turn (the order reversed every other round);
    each variant's best round counts."""
    from redisutil import RedisServer

    best: dict[str, tuple[float, float, float]] = {}
    rounds_of: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
    handed_of: dict[str, float] = {}        # the most hand-offs a call of any round
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis")
        try:
            for i in range(rounds):
                for name in (names if i % 2 == 0 else names[::-1]):
                    tag = name.replace(" ", "-")
                    # Every run registers its own UAS (a new port) for the same user: the
                    # last run's binding, kept by the shared Redis, would make each call fork
                    # to a dead contact too (an INVITE, its retransmissions and a CANCEL).
                    redis.flush()
                    argv, env = variant_argv(name, workdir, redis.url)
                    factor = RATE_FACTOR.get(name, 1.0)
                    n = round(calls * factor)
                    cpu, ok, warm = measure(argv, env, n, round(rate * factor), workdir,
                                            f"w{tag}-{i}", cpu=counts)
                    handed = handed_off(workdir / f"w{tag}-{i}.log") / max(ok + warm, 1)
                    handed_of[name] = max(handed, handed_of.get(name, 0.0))
                    label = (f"kamailio -n {KAMAILIO_VARIANTS[name]}"
                             if name in KAMAILIO_VARIANTS else f"--workers {name.split(' at ')[0]}")
                    label += f" {round(rate * factor)}/s"
                    # Kamailio with two children loses a call in a thousand or two here (the
                    # reference is per completed call all the same); fastsip must lose none.
                    assert ok == n or (name in KAMAILIO_VARIANTS and ok >= n * 0.995), \
                        f"{label}: {ok} of {n} calls completed"
                    per_call = (cpu[0] / ok * 1e6, cpu[1] / ok * 1e6, cpu[2] / ok * 1e6)
                    rounds_of[name].append(per_call)
                    print(f"{label:19} round {i}: {per_call[0]:7.1f} us/call "
                          f"(user {per_call[1]:.0f}, sys {per_call[2]:.0f}); "
                          f"{cpu[3] / ok:.1f} context switches, {handed:.2f} hand-offs a call; "
                          f"retransmissions {retransmissions(workdir, f'w{tag}-{i}')}"
                          + (f"; {n - ok} calls failed" if ok < n else ""),
                          flush=True)
                    if name not in best or per_call[0] < best[name][0]:
                        best[name] = per_call
        finally:
            redis.stop()
    rows = ", ".join(f"{name} {b[0]:.0f} us (user {b[1]:.0f}, sys {b[2]:.0f})"
                     for name, b in best.items())
    print(f"best rounds: {rows}")
    result: dict[str, Any] = {"best": best, "rounds": rounds_of, "handed": handed_of}

    def against_one(name: str, key: str, text: str, guard: str, who: str) -> None:
        """Variant ``name``'s best round over --workers 1's, as ``result[key]``, and the
        ratio of each round's pair."""
        if name in best:
            result[key] = ratio = best[name][0] / best["1"][0]
            print(f"{text}: {ratio:.2f}x{guard}")
            _spread(who, rounds_of["1"], rounds_of[name])

    against_one("2", "ratio", "CPU per call, --workers 2 / --workers 1",
                f" (target {TARGET:g}x, guard {BAR:g}x)", "fastsip")
    if "2 shared" in best:
        print(f"  --worker-ports shared / own: {best['2 shared'][0] / best['2'][0]:.2f}x")
    against_one("2 at 2x", "per_worker_ratio", f"The same load per worker, --workers 2 at "
                f"{2 * rate}/s / --workers 1 at {rate}/s",
                f" (guard {PER_WORKER_BAR:g}x; the {TARGET:g}x target is the ratio above)",
                "fastsip, same load per worker,")
    against_one("2 hashed", "hashed_ratio", "Hashed placement (--spread-above 0), --workers 2 "
                "/ --workers 1", "", "fastsip hashed,")
    against_one("2 hashed at 2x", "hashed_per_worker_ratio", f"Hashed, the same load per "
                f"worker, --workers 2 at {2 * rate}/s / --workers 1 at {rate}/s", "",
                "fastsip hashed, same load per worker,")
    against_one("1 at half", "rate_ratio", f"The load per process alone, --workers 1 at "
                f"{round(rate * 0.5)}/s / at {rate}/s", "",
                "fastsip, one worker at half the rate,")
    if "kam 1" in best and "kam 2 at 2x" in best:
        result["kamailio_per_worker_ratio"] = k2 = best["kam 2 at 2x"][0] / best["kam 1"][0]
        print(f"Kamailio children=2 at {2 * rate}/s / children=1 at {rate}/s: {k2:.2f}x")
    if "kam 1" in best and "kam 2" in best:
        result["kamailio_ratio"] = kam = best["kam 2"][0] / best["kam 1"][0]
        print(f"Kamailio children=2 / children=1: {kam:.2f}x" + (
            f"; fastsip's {result['ratio']:.2f}x is {result['ratio'] / kam:.2f}x Kamailio's"
            if "ratio" in result else ""))
        _spread("kamailio", rounds_of["kam 1"], rounds_of["kam 2"])
    return result


def _spread(who: str, one: list[tuple[float, float, float]],
            two: list[tuple[float, float, float]]) -> None:
    """Each round's 2/1 ratio (total, user, system), so the reader sees the noise."""
    per_round = [(b[0] / a[0], b[1] / max(a[1], 1e-9), b[2] / max(a[2], 1e-9))
                 for a, b in zip(one, two)]
    if not per_round:
        return
    rows = "; ".join(f"{t:.2f}x (user {u:.2f}x, sys {s:.2f}x)" for t, u, s in per_round)
    totals = sorted(t for t, _, _ in per_round)
    # Rounds are interleaved, so each round's pair saw the same machine: the median of the
    # pairs' ratios is steadier here than the ratio of two best rounds from different moments.
    mid = len(totals) // 2
    median = totals[mid] if len(totals) % 2 else (totals[mid - 1] + totals[mid]) / 2
    print(f"  {who} 2/1 per round: {rows}; spread {totals[0]:.2f}-{totals[-1]:.2f}x, "
          f"median {median:.2f}x")


def throughput(rates: tuple[int, ...] = (300, 600, 1200, 1800, 2400),
               seconds: float = 4.0) -> None:
    """Completed calls per second at each offered rate, for 1 and 2 workers."""
    from redisutil import RedisServer

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        redis = RedisServer(workdir / "redis")
        try:
            for workers in (1, 2):
                redis.flush()           # see compare()
                port, uas_port = free_port(), free_port()
                argv = [a.replace("{port}", str(port))
                        for a in serve_argv(workdir, workers, redis.url)]
                log = open(workdir / f"t{workers}.log", "wb")  # noqa: SIM115
                proc = subprocess.Popen(argv, cwd=workdir, env=fastsip_env(), stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                try:
                    _wait_udp_answers(port)
                    total = sum(int(r * seconds) for r in rates) + 10
                    uas = _sipp("uas_rr.xml", "-p", str(uas_port), "-m", str(total),
                                workdir=workdir, name=f"t{workers}_uas", timeout=300,
                                background=True)
                    _sipp("register.xml", f"{HOST}:{port}", "-p", str(free_port()), "-m", "1",
                          "-s", "service", "-key", "domain", DOMAIN, "-key", "contact_host",
                          HOST, "-key", "contact_port", str(uas_port), "-key", "expires",
                          "3600", workdir=workdir, name=f"t{workers}_reg", timeout=10)
                    for rate in rates:
                        n = int(rate * seconds)
                        busy0, t0 = machine_busy_seconds(), time.monotonic()
                        serve0 = cpu_seconds(proc.pid)[0]
                        sipp0 = load_generator_seconds(proc.pid)
                        uac = _sipp("uac_rr.xml", f"{HOST}:{port}", "-p", str(free_port()),
                                    "-m", str(n), "-r", str(rate), "-s", "service", "-key",
                                    "domain", DOMAIN, "-key", "caller", "caller",
                                    workdir=workdir, name=f"t{workers}_{rate}",
                                    timeout=seconds + 40, background=True)
                        try:
                            uac.wait(seconds + 40)
                        except subprocess.TimeoutExpired:  # calls stuck past the load's end
                            stop(uac)
                        # Over the step's wall time (the UAC reaped, so its CPU is counted):
                        # serve's processes, sipp's (UAC and UAS), and the whole machine's.
                        wall = time.monotonic() - t0
                        serve = cpu_seconds(proc.pid)[0] - serve0
                        sipp = load_generator_seconds(proc.pid) - sipp0
                        busy = (machine_busy_seconds() - busy0) / wall
                        ok = successful(workdir, f"t{workers}_{rate}")
                        print(f"--workers {workers} offered {rate:5d}/s for {seconds:g} s: "
                              f"{ok}/{n} calls completed ({ok / n:4.0%}) in {wall:.1f} s; "
                              f"serve {serve / wall:.2f} cores ({serve / max(ok, 1) * 1e6:.0f} "
                              f"us a call), sipp {sipp / wall:.2f} cores; machine busy "
                              f"{busy:.2f} of {os.cpu_count()} cores", flush=True)
                    stop(uas)
                finally:
                    stop(proc)
                    log.close()
        finally:
            redis.stop()


@pytest.mark.skipif(SIPP is None, reason="sipp is not installed")
def test_two_workers_cost_little_more_per_call_than_one() -> None:
    from fastsip.asyncio.workers import reuse_port_supported

    if not reuse_port_supported():
        pytest.skip("needs Linux SO_REUSEPORT")
    result = compare(names=("1", "2", "2 at 2x"))
    # Packed (the default), one socket's light load stays in the worker receiving it.
    assert result["handed"]["2"] <= HANDED_BAR, result["handed"]
    assert result["ratio"] <= BAR, f"--workers 2 costs {result['ratio']:.2f}x --workers 1"
    assert result["per_worker_ratio"] <= PER_WORKER_BAR, \
        f"--workers 2 at twice the rate costs {result['per_worker_ratio']:.2f}x --workers 1"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=CALLS)
    ap.add_argument("--rate", type=int, default=RATE)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--throughput-rates", metavar="R,R,...", default="300,600,1200,1800,2400",
                    help="offered calls/s of --throughput's steps (default %(default)s)")
    ap.add_argument("--ports", action="store_true",
                    help="also --workers 2 --worker-ports shared (every response handed off)")
    ap.add_argument("--kamailio", action="store_true",
                    help="also Kamailio with children=1 and =2, the same load (reference)")
    ap.add_argument("--per-worker", action="store_true",
                    help="also --workers 2 at twice --rate and --workers 1 at half of it (the "
                    "same load per worker; with --kamailio, children=2 at twice --rate too)")
    ap.add_argument("--hashed", action="store_true",
                    help="also --workers 2 --spread-above 0 (every call where its Call-ID "
                    "hashes, at any load; with --per-worker, at twice --rate too)")
    ap.add_argument("--syscalls", choices=("strace", "perf"),
                    help="then one round of each counting syscalls per call")
    args = ap.parse_args()
    if args.throughput:
        throughput(tuple(int(r) for r in args.throughput_rates.split(",") if r.strip()))
    else:
        variants: tuple[str, ...] = ("1", "2", "2 shared") if args.ports else ("1", "2")
        if args.per_worker:
            variants += ("2 at 2x", "1 at half")
        if args.hashed:
            variants += ("2 hashed",) + (("2 hashed at 2x",) if args.per_worker else ())
        if args.kamailio:
            if KAMAILIO is None:
                sys.exit("--kamailio: kamailio is not installed")
            variants += ("kam 1", "kam 2") + (("kam 2 at 2x",) if args.per_worker else ())
        if args.rounds > 0:
            compare(args.calls, args.rate, args.rounds, variants)
        if args.syscalls:
            syscall_round(args.calls, args.rate, variants, args.syscalls)
