"""CPU cost per completed call of ``fastsip serve`` against Kamailio, the same load in one run.

Each proxy in turn (Kamailio 5.6 with ``benchmarks/kamailio/kamailio.cfg``: usrloc in memory,
``record_route()``, ``lookup("location")``, ``t_relay()``; then ``fastsip serve --routes`` with a
small Python routes module that runs for every call) gets the same thing:

1. a sipp UAS (``tests/data/sipp/uas_rr.xml``: copies Record-Route) is registered as
   ``service@example.com`` with ``tests/data/sipp/register.xml``;
2. a warm-up of sipp calls, then ``sipp -sf uac_rr.xml`` at a steady rate: INVITE, 100, 180,
   200, ACK and BYE, 200 -- the ACK and BYE follow the recorded route set through the proxy, so
   every call is two proxied transactions (INVITE, BYE) plus the ACK: 6 messages received and
   7 sent by the proxy;
3. the proxy's CPU time (user + system of *every* one of its processes: Kamailio forks
   receivers and timers, fastsip is one process) is read before and after the measured load
   and divided by the calls sipp counts as successful.

The two proxies run in interleaved rounds (K F, F K ...) and each one's best round counts:
on a shared machine the CPU cost of the same work varies by tens of percent from run to run,
and the least disturbed round is the best estimate of each (as ``guard.py`` takes minima).

The issue's bar: fastsip at most 1.5x Kamailio's CPU per call with Python routing active.  The
report gives both numbers, every round and the ratio ``fastsip / kamailio``; the test asserts
the bar (a ratio above it fails, it is not hidden).  This is a plain pytest (another process's
CPU time, not pytest-benchmark's), so it has no ``GUARDS`` entry; ``benchmarks/guard.py`` runs
it with the others (about 50 s).  Standalone:

    PYTHONPATH=. python benchmarks/bench_proxy.py [--calls 1500] [--rate 150] [--rounds 2]
                                                  [--quiet] [--kamailio-mem fm] [--steady]
                                                  [--floor] [--against TREE]

``--steady`` warms each proxy up for ``STEADY_SECONDS`` (34 s) of calls first, so that the
measured calls also pay for the transactions of earlier calls ending, 64*T1 after they
began, as on a proxy that has been up for a while (the default 200 warm-up calls leave that
outside the measured window; a round then takes ~45 s instead of ~12).

serve runs as the README installs it (uvloop included, where it builds) with its default
options: ``--log-level info``, one line per initial request, written to a file as an
operator's would be.  ``--quiet`` runs it at ``--log-level warning`` instead, to see what the
log lines cost (Kamailio's config logs nothing per request: ``debug=1``, no xlog).  User and
system CPU are reported apart (from /proc/PID/stat: clock ticks, so +-10 ms per process).
Kamailio runs with its packaged memory manager (qm) unless ``--kamailio-mem`` (or
``FASTSIP_BENCH_KAMAILIO_MEM``) picks ``fm`` or ``tlsf``, which cost it less per call.
Linux only (procfs); skipped without sipp or kamailio (Debian: ``apt-get install kamailio``).

``--floor`` gives each round a third proxy: ``naive_proxy.py``, a stateless relay in plain
Python (split the lines, push a Via, pop a Route; no transactions, timers, validation, routing
or logging) on the loop serve runs.  Its CPU per call is what the asyncio shell, the kernel
and Python's per-datagram callbacks cost before any of fastsip's work, so the report can say
how much of its CPU per call fastsip spends above that floor, and how much a ratio to
Kamailio (issue 11's 0.7x) leaves for it.

``--against TREE`` gives each round one more proxy: serve as another build runs it, from the
source tree ``TREE`` (``TREE/fastsip`` is imported first: a checkout built in place, or a
wheel's files unpacked over its ``src``).  On this kind of VM a build's best round moves by
15-40 % from run to run, which hides a 5 % step between two builds measured in two runs;
interleaved in one run, the report gives the two builds' best and median rounds and each
round's ratio (the paired ratios are the steadiest reading).

Saturation, opt-in (never run by pytest or ``guard.py``; about 1-3 minutes):

    PYTHONPATH=. python benchmarks/bench_proxy.py --saturate [--saturate-rates 250,500,1000]
                    [--saturate-seconds 3] [--saturate-budget 300] [--saturate-tries 2] [--quiet]

steps the offered call rate (default 250, 500, 1000, 1500, 2000, 3000 calls/s): at each rate
each proxy in turn, a fresh one per step through the same ``measure`` (REGISTER, warm-up, then
rate x seconds calls; sipp gives up on a call after 5 s without its next message, so an
overloaded step ends; Kamailio gets 1 GB of shared memory, as 64 MB runs out near 1000
calls/s).  A step in which a call failed is tried again (``--saturate-tries``, default 2: on a
shared machine another user's burst can fail one).  Per step: calls attempted, completed and
failed; the proxy's CPU per completed call, user and system apart; its CPU utilisation (CPU
seconds over the step's wall seconds, the same /proc readers), sipp's (UAC and UAS), and the
rest of the machine's busy time (/proc/stat).  A proxy's steps end at a rate none of whose
tries completed, and no step starts past the budget.  Its saturation point is the highest rate
at which every call completed; "CPU per call at two rates" puts the first rate beside that one,
to show how the cost per call moves as the load grows.  sipp's UAC and UAS run on the same
cores as the proxy (two on the CI machine), so a saturation point is the machine's, proxy and
load generator together; the output says so.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from benchproc import cpu_seconds as _task_seconds
from benchproc import fastsip_env, free_port, machine_busy_seconds, paired_ratio, stop

# ROUTES, the routes module fastsip serve runs (a Python decision on every initial request,
# then the location service), lives with the profile-guided build's training run, so the
# build trains on the routing this benchmark measures.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "build_support"))
from pgo_train import ROUTES

HERE = Path(__file__).resolve().parent
SCENARIOS = HERE.parent / "tests" / "data" / "sipp"
KAMAILIO_CFG = HERE / "kamailio" / "kamailio.cfg"
SIPP = shutil.which("sipp")
KAMAILIO = shutil.which("kamailio") or next(
    (p for p in ("/usr/sbin/kamailio", "/usr/local/sbin/kamailio") if os.access(p, os.X_OK)),
    None)
HOST = "127.0.0.1"
DOMAIN = "example.com"
USER = "service"
CALLS = int(os.environ.get("FASTSIP_BENCH_PROXY_CALLS", "1500"))
RATE = int(os.environ.get("FASTSIP_BENCH_PROXY_RATE", "150"))
ROUNDS = int(os.environ.get("FASTSIP_BENCH_PROXY_ROUNDS", "3"))
#: Kamailio's memory manager for shm and pkg ("-x/-X"): empty keeps the packaged default
#: (qm, which in Debian's build records debugging information per allocation and is
#: Kamailio's largest single cost here); "fm" or "tlsf" are its faster managers.
KAMAILIO_MEM = os.environ.get("FASTSIP_BENCH_KAMAILIO_MEM", "")
WARMUP_CALLS = 200
#: ``--steady``: seconds of warm-up calls before the measured ones: past 64*T1 (32 s), so that
#: the measured window also pays for the transactions of earlier calls ending (RFC 3261's
#: Timers J, L and M; Kamailio's tm frees its own after a 5 s wait timer), as a proxy that has
#: been up for a while does.  The default window (200 calls) sees only Timer K's 5 s ones.
STEADY_SECONDS = 34.0
#: The first bar: fastsip's CPU per call at most this many times Kamailio's.  .ci/run sets
#: FASTSIP_BENCH_PROXY_BAR=1.3: on a shared 2-core machine one run's ratio moves by +-0.2
#: (measured 0.80-0.87 once the shell's UDP sockets went to C), so CI guards against
#: regressions with that margin while every run prints the ratio against issue 11's 0.7x.
TARGET = 1.5
BAR = float(os.environ.get("FASTSIP_BENCH_PROXY_BAR", str(TARGET)))
#: Issue 11's goal, printed beside the ratio until it is met (then it becomes the target).
GOAL = 0.7
#: FASTSIP_BENCH_PROXY_FLOOR=1 (.ci/run sets it): the test runs ``--floor``'s naive relay too,
#: so every CI log shows how far above the shell-and-kernel floor serve is (~15 s a round).
FLOOR = os.environ.get("FASTSIP_BENCH_PROXY_FLOOR", "") == "1"

# No GUARDS entry: this is not a pytest-benchmark timing (see the module docstring).
GUARDS: list[tuple[str, str, float, str]] = []

def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root: int) -> tuple[float, float, float]:
    """CPU time so far of ``root`` and every process under it (Kamailio's forked workers):
    (total from schedstat, user, system from /proc/PID/stat)."""
    total = user = system = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in _descendants(root):
        try:
            total += _task_seconds(pid)
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11]) / tick
            system += int(fields[12]) / tick
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total, user, system


def _sipp(scenario: str, *extra: str, workdir: Path, name: str, timeout: float,
          background: bool = False) -> subprocess.Popen[bytes]:
    assert SIPP is not None
    cmd = [SIPP, "-sf", str(SCENARIOS / scenario), "-i", HOST, "-nostdin", "-trace_stat",
           "-stf", str(workdir / f"{name}.csv"), "-fd", "1", "-timeout", str(int(timeout)),
           *extra]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    if not background:
        try:
            proc.wait(timeout + 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc


def sipp_counts(workdir: Path, name: str) -> dict[str, str]:
    """The last row of sipp's statistics file ``NAME.csv`` (its totals at exit), by column;
    empty if sipp wrote none."""
    rows = list(csv.reader((workdir / f"{name}.csv").read_text().splitlines(), delimiter=";"))
    return dict(zip(rows[0], rows[-1])) if len(rows) > 1 else {}


def successful(workdir: Path, name: str) -> int:
    return int(sipp_counts(workdir, name).get("SuccessfulCall(C)", 0))


def _wait_udp_answers(port: int, timeout: float = 15.0) -> None:
    """Until something on HOST:port answers an OPTIONS (the proxy is up)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        s.settimeout(0.2)
        me = s.getsockname()[1]
        n = 0
        while time.monotonic() < deadline:
            n += 1
            s.sendto((f"OPTIONS sip:{HOST}:{port} SIP/2.0\r\n"
                      f"Via: SIP/2.0/UDP {HOST}:{me};branch=z9hG4bK-ready{n}\r\n"
                      f"From: <sip:probe@{HOST}>;tag=p{n}\r\nTo: <sip:{HOST}:{port}>\r\n"
                      f"Call-ID: ready-{n}@{HOST}\r\nCSeq: {n} OPTIONS\r\nMax-Forwards: 70\r\n"
                      "Content-Length: 0\r\n\r\n").encode(), (HOST, port))
            try:
                if s.recv(65535).startswith(b"SIP/2.0 "):
                    return
            except OSError:
                continue
    raise RuntimeError(f"nothing answers on udp:{HOST}:{port}")


def measure(argv: Sequence[str], env: dict[str, str] | None, calls: int, rate: int,
            workdir: Path, name: str,
            cpu: Callable[[int], tuple[float, ...]] | None = None,
            uac_extra: Sequence[str] = (), warmup: int = WARMUP_CALLS,
            ready_timeout: float = 15.0) -> tuple[tuple[float, ...], int, int]:
    """Start a proxy (``{port}`` in argv; its output goes to ``NAME.log``), register the UAS,
    warm up (``warmup`` calls at ``rate``), then the measured load: (what ``cpu(pid)`` counted
    during it -- by default :func:`cpu_seconds`'s (CPU, user, system seconds) --, successful
    calls, successful warm-up calls).  ``uac_extra``: more options for the measured sipp
    UAC.  ``ready_timeout``: seconds the proxy has to answer its first OPTIONS (start-up)."""
    read_cpu = cpu if cpu is not None else cpu_seconds
    port = free_port()
    uas_port = free_port()
    cmd = [a.replace("{port}", str(port)) for a in argv]
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    uas = None
    try:
        _wait_udp_answers(port, ready_timeout)
        total = warmup + calls
        uas = _sipp("uas_rr.xml", "-p", str(uas_port), "-m", str(total), workdir=workdir,
                    name=f"{name}_uas", timeout=total / rate + 120, background=True)
        reg = _sipp("register.xml", f"{HOST}:{port}", "-p", str(free_port()), "-m", "1",
                    "-s", USER, "-key", "domain", DOMAIN, "-key", "contact_host", HOST,
                    "-key", "contact_port", str(uas_port), "-key", "expires", "3600",
                    workdir=workdir, name=f"{name}_register", timeout=10)
        assert reg.returncode == 0, f"{name}: REGISTER failed (see {name}.log)"
        uac = ["-s", USER, "-key", "domain", DOMAIN, "-key", "caller", "caller", "-r", str(rate)]
        _sipp("uac_rr.xml", f"{HOST}:{port}", "-p", str(free_port()), "-m", str(warmup),
              *uac, workdir=workdir, name=f"{name}_warmup", timeout=warmup / rate + 30)
        warm = successful(workdir, f"{name}_warmup")
        time.sleep(0.5)
        before = read_cpu(proc.pid)
        _sipp("uac_rr.xml", f"{HOST}:{port}", "-p", str(free_port()), "-m", str(calls), *uac,
              *uac_extra, workdir=workdir, name=name, timeout=calls / rate + 60)
        after = read_cpu(proc.pid)
        spent = tuple(a - b for a, b in zip(after, before))
        return spent, successful(workdir, name), warm
    finally:
        if uas is not None:
            stop(uas)
        stop(proc)
        log.close()


def kamailio_argv(workdir: Path, mem: str = "", shm_mb: int = 64) -> list[str]:
    """``shm_mb``: Kamailio's shared memory, where tm keeps its transactions (64 MB holds the
    default run's; at 1000 calls/s its default allocator runs out within seconds)."""
    assert KAMAILIO is not None
    run = workdir / "kamailio-run"
    run.mkdir(exist_ok=True)
    extra = ["-x", mem, "-X", mem] if mem else []
    return [KAMAILIO, "-f", str(KAMAILIO_CFG), "-DD", "-E", "-Y", str(run),
            "-l", f"udp:{HOST}:{{port}}", "-m", str(shm_mb), "-M", "8", *extra]


def floor_argv() -> list[str]:
    """The naive stateless relay (``naive_proxy.py``) on serve's loop: the CPU the shell and
    the kernel take per call before any of fastsip's work (``--floor``)."""
    return [sys.executable, str(HERE / "naive_proxy.py"), "{port}", HOST]


def fastsip_argv(workdir: Path, log_level: str | None = None) -> list[str]:
    """serve as installed, with its defaults but for ``log_level`` when given."""
    routes = workdir / "bench_routes.py"
    routes.write_text(ROUTES)
    # sipp stands for the SBCs in front of a carrier's core proxy, which its deployment lists
    # in --trusted; untrusted, its ~900 messages/s from one address would be a flood past the
    # default --rate-limit (100/s) and banned.  Every edge check still runs per message.
    return [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"udp:{HOST}:{{port}}",
            "--routes", str(routes), "--domain", DOMAIN, "--db", "memory:",
            "--trusted", HOST, *(["--log-level", log_level] if log_level else [])]


def compare(calls: int = CALLS, rate: int = RATE, quiet: bool = False,
            rounds: int = ROUNDS, kamailio_mem: str = KAMAILIO_MEM,
            warmup: int = WARMUP_CALLS, floor: bool = False,
            against: str | None = None) -> dict[str, Any]:
    """Interleaved rounds (K F, F K, K F ...); each proxy's best round counts: the CPU cost
    least disturbed by whatever else the machine runs (CI hosts and dev boxes are shared).
    ``floor``: the naive relay (``naive_proxy.py``) takes a turn in each round too;
    ``against``: serve from that source tree too (another build, see the module docstring)."""
    names = ["kamailio", "fastsip", *(["floor"] if floor else []),
             *(["against"] if against else [])]
    runs: dict[str, list[tuple[float, int, float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for i in range(rounds):
            order = names if i % 2 == 0 else names[::-1]
            for name in order:
                if name == "kamailio":
                    cpu, ok, _ = measure(kamailio_argv(workdir, kamailio_mem), None, calls,
                                         rate, workdir, f"kamailio{i}", warmup=warmup)
                elif name == "floor":
                    cpu, ok, _ = measure(floor_argv(), fastsip_env(), calls, rate, workdir,
                                         f"floor{i}", warmup=warmup)
                elif name == "against":
                    assert against is not None
                    env = dict(os.environ, PYTHONPATH=str(Path(against).resolve()))
                    cpu, ok, _ = measure(fastsip_argv(workdir, "warning" if quiet else None),
                                         env, calls, rate, workdir, f"against{i}",
                                         warmup=warmup)
                else:
                    cpu, ok, _ = measure(fastsip_argv(workdir, "warning" if quiet else None),
                                         fastsip_env(), calls, rate, workdir, f"fastsip{i}",
                                         warmup=warmup)
                runs[name].append((cpu[0], ok, cpu[1], cpu[2]))
    figures: dict[str, Any] = {}
    for name, r in runs.items():
        figures.update(_figures(name, r))
    ref = figures["kamailio_us_per_call"]
    if floor:
        figures["floor_ratio"] = figures["floor_us_per_call"] / ref if ref > 0 else float("inf")
    if against:
        figures["against_tree"] = against
    return {"calls": calls, "rate": rate, "quiet": float(quiet), "rounds": rounds,
            "warmup": warmup, "kamailio_mem": kamailio_mem or "qm (default)", **figures,
            "ratio": figures["fastsip_us_per_call"] / ref if ref > 0 else float("inf")}


def _figures(name: str, runs: list[tuple[float, int, float, float]]) -> dict[str, Any]:
    """One proxy's rounds (CPU, calls ok, user, system seconds) as ``NAME_...`` figures: its
    best round's CPU per call (user and system apart), the fewest calls any round completed,
    and every round's CPU per call."""
    cpu, ok, user, sys_ = min(runs, key=lambda x: x[0] / max(x[1], 1))
    ok = max(ok, 1)
    return {f"{name}_us_per_call": cpu / ok * 1e6, f"{name}_cpu_s": cpu,
            f"{name}_user_us": user / ok * 1e6, f"{name}_sys_us": sys_ / ok * 1e6,
            f"{name}_ok": min(n for _, n, _, _ in runs),
            f"{name}_rounds": [round(c / max(n, 1) * 1e6, 1) for c, n, _, _ in runs]}


def report(r: dict[str, Any]) -> str:
    verdict = "within" if r["ratio"] <= TARGET else "ABOVE"
    return (f"proxy CPU per completed call, sipp uac_rr at {r['rate']:.0f} cps x "
            f"{r['calls']:.0f} calls after {r['warmup']:.0f} warm-up calls (REGISTERed sipp "
            f"uas behind the proxy):\n"
            f"  kamailio 5.6 (t_relay)       {r['kamailio_us_per_call']:8.1f} us/call  "
            f"(user {r['kamailio_user_us']:.0f}, sys {r['kamailio_sys_us']:.0f}) "
            f"[memory manager {r['kamailio_mem']}] "
            f"({r['kamailio_cpu_s']:.3f} s CPU, {r['kamailio_ok']:.0f} calls ok)\n"
            f"  fastsip serve --routes{' (warning)' if r['quiet'] else ' (info)   '}"
            f" {r['fastsip_us_per_call']:8.1f} us/call  "
            f"(user {r['fastsip_user_us']:.0f}, sys {r['fastsip_sys_us']:.0f}) "
            f"({r['fastsip_cpu_s']:.3f} s CPU, {r['fastsip_ok']:.0f} calls ok)\n"
            f"  ratio fastsip/kamailio {r['ratio']:.2f}x  ({verdict} the {TARGET}x target; "
            f"issue 11's goal {GOAL}x; asserted <= {BAR}x); best of "
            f"{r['rounds']} interleaved rounds, us/call per round: kamailio "
            f"{r['kamailio_rounds']}, fastsip {r['fastsip_rounds']}"
            + ("" if "floor_ratio" not in r else _floor_report(r))
            + ("" if "against_tree" not in r else _against_report(r)))


def _floor_report(r: dict[str, Any]) -> str:
    """The floor's line, and what the goal leaves fastsip above it."""
    kam, floor, ours = (r["kamailio_us_per_call"], r["floor_us_per_call"],
                        r["fastsip_us_per_call"])
    return (f"\n  naive stateless relay (floor) {floor:8.1f} us/call  "
            f"(user {r['floor_user_us']:.0f}, sys {r['floor_sys_us']:.0f}) "
            f"({r['floor_ok']:.0f} calls ok), {r['floor_ratio']:.2f}x kamailio; per round "
            f"{r['floor_rounds']}\n"
            f"  above the floor: fastsip {ours - floor:.1f} us/call; issue 11's {GOAL}x goal "
            f"leaves {GOAL * kam - floor:.1f} us/call above it")


def _against_report(r: dict[str, Any]) -> str:
    """The other build's line: best and median rounds against this build's, and each round's
    ratio (this build / the other)."""
    ours, theirs = r["fastsip_rounds"], r["against_rounds"]
    paired = [round(a / b, 3) if b > 0 else float("inf") for a, b in zip(ours, theirs)]
    return (f"\n  serve from {r['against_tree']} {r['against_us_per_call']:8.1f} us/call  "
            f"(user {r['against_user_us']:.0f}, sys {r['against_sys_us']:.0f}) "
            f"({r['against_ok']:.0f} calls ok); per round {theirs}\n"
            f"  this build / that build: best {min(ours) / min(theirs):.3f}x, median "
            f"{statistics.median(ours) / statistics.median(theirs):.3f}x; per round {paired} "
            f"(median {paired_ratio(ours, theirs):.3f}x)")


# -- saturation (--saturate; not run by pytest) ------------------------------------------------

#: The offered call rates (calls/s) of the saturation steps, lowest first.
SATURATE_RATES = (250, 500, 1000, 1500, 2000, 3000)
#: Seconds of calls per step (calls = rate x this), and the whole run's budget: no step starts
#: past it.
SATURATE_SECONDS = 3.0
SATURATE_BUDGET = 300.0
#: Tries of a step before its rate counts as failed: on a shared machine someone else's burst
#: of work can make one try fail below the rate the proxy sustains.
SATURATE_TRIES = 2
#: sipp aborts a call whose next message has not come in this long (ms): an overloaded proxy's
#: calls fail within the step instead of after sipp's 30 s of retransmissions.  Generous, so a
#: call that completes after a retransmission or two (at 0.5, 1.5, 3.5 s) still counts.
SATURATE_RECV_TIMEOUT_MS = 5000
#: Kamailio's shared memory for the steps (MB): tm keeps every transaction there until its
#: wait timer ends, and with 64 MB (the default run's) it answers "out of mem" from about
#: 1000 calls/s -- a configuration limit, not the CPU saturation this mode looks for.
SATURATE_KAMAILIO_SHM_MB = 1024


def load_generator_seconds(proxy: int) -> float:
    """CPU seconds so far of this process's children other than the proxy's tree -- sipp's
    UAS, and the UACs once reaped (in our cutime/cstime) -- from /proc/PID/stat ticks."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[13]) + int(fields[14])          # cutime, cstime: reaped children
    me = os.getpid()
    skip = set(_descendants(proxy)) | {me}
    for pid in _descendants(me):
        if pid in skip:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return ticks / tick


def step_reading(pid: int) -> tuple[float, ...]:
    """:func:`cpu_seconds` of the proxy, then the wall clock, sipp's CPU seconds and the
    machine's busy seconds: ``measure`` subtracts two readings, so a step's utilisations are
    CPU over wall."""
    return (*cpu_seconds(pid), time.monotonic(), load_generator_seconds(pid),
            machine_busy_seconds())


def saturation_step(name: str, rate: int, seconds: float, workdir: Path, attempt: int = 1,
                    quiet: bool = False, kamailio_mem: str = KAMAILIO_MEM) -> dict[str, Any]:
    """One proxy at one offered rate for ``seconds`` of calls, a fresh proxy through
    :func:`measure`: what sipp counted, and the CPU of the proxy, of sipp and of the rest of
    the machine over the step's wall seconds."""
    if name == "kamailio":
        argv = kamailio_argv(workdir, kamailio_mem, SATURATE_KAMAILIO_SHM_MB)
        env = None
    else:
        argv = fastsip_argv(workdir, "warning" if quiet else None)
        env = fastsip_env()
    calls = max(1, round(rate * seconds))
    step = f"{name}_{rate}cps_{attempt}"
    spent, ok, _ = measure(argv, env, calls, rate, workdir, step, cpu=step_reading,
                           uac_extra=["-recv_timeout", str(SATURATE_RECV_TIMEOUT_MS)])
    cpu, user, system, wall, sipp_cpu, busy = spent
    wall = max(wall, 1e-9)
    attempted = int(sipp_counts(workdir, step).get("OutgoingCall(C)", calls))
    return {
        "proxy": name, "rate": rate, "attempt": attempt, "calls": calls,
        "attempted": attempted, "ok": ok, "failed": attempted - ok, "wall_s": wall,
        "achieved_cps": attempted / wall,
        "us_per_call": cpu / max(ok, 1) * 1e6,
        "user_us": user / max(ok, 1) * 1e6, "sys_us": system / max(ok, 1) * 1e6,
        "cpu_util": cpu / wall, "sipp_util": sipp_cpu / wall,
        # the rest of the machine's busy time: whoever else shares it
        "other_util": max(0.0, busy - cpu - sipp_cpu) / wall,
        "machine_util": busy / wall / (os.cpu_count() or 1)}


def saturate(rates: Sequence[int] = SATURATE_RATES, seconds: float = SATURATE_SECONDS,
             budget: float = SATURATE_BUDGET, tries: int = SATURATE_TRIES, quiet: bool = False,
             kamailio_mem: str = KAMAILIO_MEM) -> list[dict[str, Any]]:
    """Each proxy at each offered rate in turn (interleaved per rate, as :func:`compare`'s
    rounds); a step in which a call did not complete is tried again, up to ``tries`` times
    (on a shared machine a burst of someone else's work can fail one), and a proxy's steps
    end at a rate none of whose tries completed: past saturation more load only costs time.
    No step starts once ``budget`` seconds have passed.  One row per step tried."""
    rows: list[dict[str, Any]] = []
    done: set[str] = set()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for i, rate in enumerate(rates):
            order = ["kamailio", "fastsip"] if i % 2 == 0 else ["fastsip", "kamailio"]
            for name in order:
                completed = False
                for attempt in range(1, tries + 1):
                    if name in done or time.monotonic() - started > budget:
                        break
                    row = saturation_step(name, rate, seconds, workdir, attempt, quiet,
                                          kamailio_mem)
                    rows.append(row)
                    if row["ok"] >= row["calls"]:
                        completed = True
                        break
                if not completed:
                    done.add(name)
    return rows


def _completed(rows: Sequence[dict[str, Any]], rate: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["rate"] == rate and r["ok"] >= r["calls"]), None)


def saturation_point(rows: Sequence[dict[str, Any]], proxy: str) -> dict[str, Any] | None:
    """The step at the highest offered rate at which every call completed (in one of its
    tries, and at every lower rate too), or None when the first rate never completed."""
    mine = [r for r in rows if r["proxy"] == proxy]
    best = None
    for rate in sorted({r["rate"] for r in mine}):
        row = _completed(mine, rate)
        if row is None:
            break
        best = row
    return best


def saturation_report(rows: Sequence[dict[str, Any]], seconds: float = SATURATE_SECONDS,
                      quiet: bool = False, kamailio_mem: str = KAMAILIO_MEM) -> str:
    ncpu = os.cpu_count() or 1
    lines = [
        ("proxy saturation: sipp uac_rr through each proxy to a REGISTERed sipp uas, "
         f"{seconds:g} s of calls per step, a fresh proxy per step (kamailio memory manager "
         f"{kamailio_mem or 'qm (default)'}, {SATURATE_KAMAILIO_SHM_MB} MB shm; fastsip serve "
         "--routes at "
         f"{'warning' if quiet else 'info'})"),
        (f"  NOTE: this machine has {ncpu} CPU(s) and sipp's UAC and UAS run on them beside "
         "the proxy: the load generator competes"),
        ("  with the proxy for the cores, so these limits are the machine's (proxy + sipp), "
         "not the proxy's alone; 'machine' is"),
        ("  every CPU's busy share during the step (the proxy, sipp, anything else running; "
         "100% = all cores)."),
        (f"  {'proxy':9} {'offered':>8} {'try':>3} {'achieved':>9} {'attempted':>9} {'ok':>6} "
         f"{'failed':>6} {'us/call':>8} {'(user':>6} {'sys)':>5} {'proxy CPU':>9} "
         f"{'sipp CPU':>8} {'others':>6} {'machine':>7}"),
    ]
    for r in rows:
        tail = "*" if r["failed"] else " "
        lines.append(
            f"  {r['proxy']:9} {r['rate']:>4} cps {r['attempt']:>3} "
            f"{r['achieved_cps']:>5.0f}{tail}cps "
            f"{r['attempted']:>9} {r['ok']:>6} {r['failed']:>6} {r['us_per_call']:>8.1f} "
            f"{r['user_us']:>6.1f} {r['sys_us']:>5.1f} {r['cpu_util']:>8.0%}{tail}"
            f"{r['sipp_util']:>7.0%}{tail}{r['other_util']:>6.0%}{tail}"
            f"{r['machine_util']:>6.0%}{tail}")
    lines.append("  us/call: the proxy's CPU (all its processes) over the calls that completed; "
                 "proxy CPU, sipp CPU (UAC + UAS), others")
    lines.append("  (the machine's busy time left over: other users of the machine): CPU seconds "
                 "over the step's wall seconds, 100% = one core;")
    lines.append("  achieved: calls sipp started over those wall seconds.  * the wall seconds "
                 f"include up to {SATURATE_RECV_TIMEOUT_MS / 1000:g} s of waiting for calls")
    lines.append("  that never completed (sipp's -recv_timeout): rate and utilisations are "
                 "understated.")
    for proxy in ("kamailio", "fastsip"):
        mine = [r for r in rows if r["proxy"] == proxy]
        if not mine:
            continue
        rates = sorted({r["rate"] for r in mine})
        point = saturation_point(mine, proxy)
        if point is None:
            where = f"below {rates[0]} cps (calls failed at the first rate)"
        elif point["rate"] == rates[-1]:
            where = (f">= {point['rate']} cps offered, {point['achieved_cps']:.0f} achieved "
                     "(every rate completed: not reached)")
        else:
            failed_at = rates[rates.index(point["rate"]) + 1]
            where = (f"{point['rate']} cps offered, {point['achieved_cps']:.0f} achieved "
                     f"(calls failed at {failed_at} cps in every try)")
        lines.append(f"  {proxy} saturation point (highest rate with every call completed): "
                     f"{where}")
        low = _completed(mine, rates[0])
        if point is not None and low is not None and point["rate"] > low["rate"]:
            growth = point["us_per_call"] / low["us_per_call"] if low["us_per_call"] else 0.0
            lines.append(
                f"  {proxy} CPU per call at two rates: {low['us_per_call']:.1f} us at "
                f"{low['rate']} cps ({low['cpu_util']:.0%} of a core) -> "
                f"{point['us_per_call']:.1f} us at {point['rate']} cps "
                f"({point['cpu_util']:.0%} of a core): x{growth:.2f}")
    return "\n".join(lines)


@pytest.mark.skipif(SIPP is None or KAMAILIO is None or not os.path.isdir("/proc/self/task"),
                    reason="needs sipp, kamailio and Linux procfs")
def test_proxy_cpu_per_call_vs_kamailio() -> None:
    r = compare(floor=FLOOR)
    print("\n" + report(r))
    assert r["kamailio_ok"] >= 0.99 * r["calls"], r
    assert r["fastsip_ok"] >= 0.99 * r["calls"], r
    if FLOOR:       # the floor relays sipp's calls (else its figure would be no floor at all)
        assert r["floor_ok"] >= 0.99 * r["calls"], r
    assert r["ratio"] <= BAR, report(r)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="CPU per call: fastsip serve vs Kamailio")
    ap.add_argument("--calls", type=int, default=CALLS)
    ap.add_argument("--rate", type=int, default=RATE)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--kamailio-mem", choices=["", "qm", "fm", "tlsf"], default=KAMAILIO_MEM,
                    help="Kamailio's memory manager (default: the packaged default, qm)")
    ap.add_argument("--quiet", action="store_true",
                    help="serve at --log-level warning (default: its default, info)")
    ap.add_argument("--steady", action="store_true",
                    help=f"warm up for {STEADY_SECONDS:.0f} s of calls (past 64*T1) so the "
                    "measured load also pays for earlier calls' transactions ending")
    ap.add_argument("--floor", action="store_true",
                    help="a third proxy in each round: naive_proxy.py, a stateless relay in "
                    "plain Python on serve's loop (what the shell and kernel cost per call)")
    ap.add_argument("--against", metavar="TREE",
                    help="serve from another build's source tree (TREE/fastsip) in each "
                    "round too, to compare two builds in one run")
    sat = ap.add_argument_group("saturation", "step the offered rate instead (see the module "
                                "docstring); --calls, --rate and --rounds do not apply")
    sat.add_argument("--saturate", action="store_true",
                     help="find each proxy's saturation point and its CPU per call per rate")
    sat.add_argument("--saturate-rates", metavar="R,R,...",
                     default=",".join(str(r) for r in SATURATE_RATES),
                     help="offered calls/s per step, lowest first (default %(default)s)")
    sat.add_argument("--saturate-seconds", type=float, default=SATURATE_SECONDS, metavar="S",
                     help="seconds of calls per step (default %(default)s)")
    sat.add_argument("--saturate-budget", type=float, default=SATURATE_BUDGET, metavar="S",
                     help="no step starts after this many seconds (default %(default)s)")
    sat.add_argument("--saturate-tries", type=int, default=SATURATE_TRIES, metavar="N",
                     help="tries of a rate before it counts as failed (default %(default)s)")
    a = ap.parse_args()
    if SIPP is None or KAMAILIO is None:
        sys.exit("needs sipp and kamailio")
    if a.saturate:
        try:
            rates = sorted({int(r) for r in a.saturate_rates.split(",") if r.strip()})
        except ValueError:
            sys.exit(f"--saturate-rates {a.saturate_rates!r}: expected calls/s like 250,500")
        if not rates or rates[0] <= 0 or a.saturate_seconds <= 0 or a.saturate_tries <= 0:
            sys.exit("--saturate-rates, --saturate-seconds and --saturate-tries must be > 0")
        rows = saturate(rates, a.saturate_seconds, a.saturate_budget, a.saturate_tries,
                        a.quiet, a.kamailio_mem)
        print(saturation_report(rows, a.saturate_seconds, a.quiet, a.kamailio_mem))
    else:
        warm = round(STEADY_SECONDS * a.rate) if a.steady else WARMUP_CALLS
        if a.against and not (Path(a.against) / "fastsip").is_dir():
            sys.exit(f"--against {a.against}: no fastsip package there (give a source tree "
                     "whose compiled modules are built in place)")
        print(report(compare(a.calls, a.rate, a.quiet, a.rounds, a.kamailio_mem, warm,
                             a.floor, a.against)))
