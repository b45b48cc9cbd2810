"""CPU per relayed RTP packet of ``fastsip media`` against rtpengine, the same load in one run.

What is measured: the media relay's CPU time (user and system apart) per RTP packet it relays,
for N concurrent G.711 calls (20 ms packets, 50 packets/s per direction: 100 calls are
10,000 packets/s through the relay, 500 calls 50,000), the loss at that load, and (with
``--max-rate``) the highest packet rate relayed with less than 0.1 % loss.

Why: the relay's whole job is moving packets socket to socket; its CPU per packet decides how
many calls a core carries.  rtpengine (Debian's rtpengine-daemon, userspace forwarding, no
kernel module) is the reference issue 13 names: about 12 us per packet on the reference
machine (user 4-5 us, system 7-8 us: two syscalls per packet are most of it), where a naive
asyncio relay (a ``DatagramProtocol`` per port, ``sendto`` per packet) costs 26-32 us.  The
issue's goal for fastsip is at most 0.5x rtpengine's CPU per packet (``GOAL``); the guard
asserts ``MAX_RATIO``, which the lead sets from measured runs (on a shared 2-core machine the
ratio of one run moves by tens of percent).

How, for each relay in turn (rtpengine, then ``python -m fastsip.cli media`` as the README
installs it, default options; both started here in a temp dir, on 127.0.0.1, stopped at the
end whatever happens):

1. the relay starts in the foreground on a free ng port and a private RTP port range
   (rtpengine: ``--table=-1`` userspace only, ``--num-threads=2``, no config file);
2. both are driven identically over the ng control protocol (UDP, ``COOKIE SP bencode``):
   per call an ``offer`` (caller's SDP, PCMU on the caller's socket's port) and an
   ``answer`` (callee's SDP), flag ``trust-address``; the rewritten SDPs give the relay
   ports each side must send to; at the end a ``delete`` per call;
3. the load generator (``benchmarks/media_load.py``, a separate process that inherits the
   bound sockets) sends for each of the 2N streams one 172-byte RTP packet every 20 ms
   (its own SSRC, sequence and timestamp advancing) to the relay port its peer's SDP
   names, spread over 20 send instants per 20 ms, reads everything that arrives and
   counts per stream (by SSRC, checking it came out on the right socket).  The callers'
   streams leave from ``--load-sockets`` sockets (default 8) and the callees' from as
   many, with sendmmsg/recvmmsg: with two Python sockets per call (``--load-sockets 0``,
   still there) the generator cost ~9 us a packet and could not keep 500 calls' pace on
   the shared 2 cores, and its loss was counted against the relay.  The relay's work is
   the same either way: it receives on its own ports, one pair per call and side, and
   sends to an address (at 100 calls rtpengine measured 13.1 us/packet with 8 shared
   sockets, 14.2 with two per call: within run-to-run noise).  After a warm-up (default 2 s) it
   reads the relay's CPU (``/proc/PID/task/*/schedstat``: ns of all threads; user and
   system from ``/proc/PID/stat`` ticks) at the start and end of the steady window
   (default 10 s), and packets sent in that window are counted wherever they arrive
   (a phase byte in the payload), so loss = sent - received per stream;
4. reported per relay and N: packets relayed per second, loss %, the relay's CPU us per
   relayed packet (total, user, system), its CPU use (% of a core), the generator's, and
   whether the generator kept its pace (late send instants).  Datagrams the kernel dropped
   at a full socket buffer are read from ``/proc/net/udp`` and attributed: on the relay's
   ports (the relay was too slow) or the generator's (the generator was).

The generator shares the 2 cores with the relay: at high rates a loss may be the
generator's (its drops, an offered rate it did not send, ``gave_up``), and the report says
so rather than blaming the relay.  ``--syscalls`` (needs strace) attaches
``strace -c -f -p PID`` for a few seconds after the steady window (strace slows the relay,
so never inside it) and reports syscalls per relayed packet, the packets estimated from the
rate relayed in that phase.  Read it at a load the relay keeps up with under strace (100
calls): past that the figure is flagged UNRELIABLE, and a batching relay (recvmmsg) batches
more under strace than without, so its count is a lower bound.  ``--max-rate`` ramps the
call count (100, 200, 400, 600, 800 ...) per relay, a fresh relay per step, until loss >=
0.1 % or the generator cannot keep pace; on two shared cores the generator (and whoever
else uses the machine) usually sets the limit first, which the report says.

    PYTHONPATH=. python benchmarks/bench_media.py [--calls 100,500] [--warmup 2] [--seconds 10]
        [--relays rtpengine,fastsip] [--rounds 1] [--syscalls] [--json FILE]
    PYTHONPATH=. python benchmarks/bench_media.py --max-rate [--max-rate-calls 100,200,400,800]
        [--max-rate-seconds 5] [--load-sockets 8]

Under pytest (``guard.py`` runs it): 100 calls, both relays, two interleaved rounds of 8 s
windows, each relay's best round counting (about 50 s; ``FASTSIP_BENCH_MEDIA_ROUNDS``,
``FASTSIP_BENCH_MEDIA_SECONDS``); asserts fastsip's CPU per packet at most ``MAX_RATIO`` x
rtpengine's (``FASTSIP_BENCH_MEDIA_MAX_RATIO``) and loss under 0.1 % for both.  A plain
pytest (another process's CPU, not pytest-benchmark's), so ``GUARDS`` is empty as in
``bench_proxy.py``.  Skipped without rtpengine (Debian: ``apt-get install rtpengine-daemon``;
it is never run as a service here); without ``fastsip media`` in this build the rtpengine
figures are printed and the comparison skipped.  Linux only (procfs, epoll).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from benchproc import fastsip_env, free_port, stop

from fastsip.relay.bencode import decode, encode

HERE = Path(__file__).resolve().parent
LOAD = HERE / "media_load.py"
HOST = "127.0.0.1"
RTPENGINE = shutil.which("rtpengine") or next(
    (p for p in ("/usr/bin/rtpengine", "/usr/sbin/rtpengine") if os.access(p, os.X_OK)), None)
STRACE = shutil.which("strace")
RELAYS = ("rtpengine", "fastsip")
#: Also measurable (``--relays``): fastsip with its packet path forced onto recvmmsg/sendmmsg
#: (``FASTSIP_RELAY_BACKEND=mmsg``), where the default is io_uring when the kernel allows it.
VARIANTS = {"fastsip-mmsg": {"FASTSIP_RELAY_BACKEND": "mmsg"},
            # io_uring on the asyncio loop (poll() per wake-up) instead of the relay's thread
            "fastsip-loop": {"FASTSIP_RELAY_THREAD": "0"},
            # sends to a latched source from the leg's own socket with the address, not from
            # its connected twin
            "fastsip-untwinned": {"FASTSIP_RELAY_TWINS": "0"}}
CALLS = (100, 500)
WARMUP = float(os.environ.get("FASTSIP_BENCH_MEDIA_WARMUP", "2"))
SECONDS = 10.0
PTIME = 0.02
#: The guard: fastsip's CPU per relayed packet at 100 calls at most this many times
#: rtpengine's.  Measured 0.63-0.65x here with the relay's epoll set (0.77-0.83x before it,
#: one loop callback per socket), 0.50-0.58x (best of a run) with the io_uring path; 0.9
#: leaves room for this machine's run-to-run noise and still fails if the packet path lost
#: its batching.  Issue 13's goal is ``GOAL``.  With the packet loop in the relay's own thread
#: (no asyncio wake-up per batch): per-round ratios 0.45-0.64, median 0.50-0.51 over three
#: runs of 3-6 rounds, against 0.51-0.67 (median 0.54-0.56) for the same ring driven by the
#: loop (``--relays rtpengine,fastsip,fastsip-loop``, interleaved in one run).
MAX_RATIO = float(os.environ.get("FASTSIP_BENCH_MEDIA_MAX_RATIO", "0.9"))
#: Under pytest: interleaved rounds (R F, F R) and their steady window, each relay's best
#: round counting.  At 10,000 packets/s one relay's CPU per packet moved by up to 1.6x from
#: run to run on the shared 2-core machine (rtpengine 13-21 us), so best of two.
PYTEST_ROUNDS = int(os.environ.get("FASTSIP_BENCH_MEDIA_ROUNDS", "2"))
PYTEST_SECONDS = float(os.environ.get("FASTSIP_BENCH_MEDIA_SECONDS", "8"))
GOAL = 0.5
#: Loss above this fraction is a failed step (and fails the pytest at 100 calls).
MAX_LOSS = 0.001
MAX_RATE_CALLS = (100, 200, 400, 600, 800, 1200, 1600)
SYSCALL_SECONDS = 3.0
#: The relay's RTP ports: 4 per call (RTP and RTCP, two sides), below the ephemeral range
#: the generator's sockets come from.
PORTS_PER_CALL = 4
PORT_SPAN = 8000
#: The generator's sockets per side (callers, callees); 0: two per call.  A few shared
#: sockets let it batch (sendmmsg/recvmmsg) and keep up with 500 calls on a shared 2-core
#: machine, where two Python sockets per call cost it ~9 us a packet; the relay's work is
#: the same either way (it receives on its own ports per call and sends to an address).
LOAD_SOCKETS = int(os.environ.get("FASTSIP_BENCH_MEDIA_LOAD_SOCKETS", "8"))
SSRC_BASE = 0x10000
#: More than this share of the steady window's send instants over 5 ms late shows as "late"
#: (the generator caught up, but sent in bursts: the machine is busy).
LATE_SHARE = 0.05

# No GUARDS entry: another process's CPU, not a pytest-benchmark timing (see the docstring).
GUARDS: list[tuple[str, str, float, str]] = []


class BenchError(RuntimeError):
    """The benchmark could not run its load (a relay did not start or refused a call)."""


# -- ng control ----------------------------------------------------------------------------------


class NgClient:
    """rtpengine's ng protocol over UDP: ``COOKIE SP bencoded-dict``, one request at a time,
    retransmitted (same cookie) when no answer comes, every wait bounded."""

    def __init__(self, port: int, timeout: float = 1.0, tries: int = 3) -> None:
        self.addr = (HOST, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((HOST, 0))
        self.timeout = timeout
        self.tries = tries
        self.serial = 0

    def close(self) -> None:
        self.sock.close()

    def command(self, msg: dict[bytes | str, Any], timeout: float | None = None,
                tries: int | None = None) -> dict[bytes, Any]:
        self.serial += 1
        cookie = f"{os.getpid()}_{self.serial}".encode()
        data = cookie + b" " + encode(msg)
        wait = self.timeout if timeout is None else timeout
        for _ in range(self.tries if tries is None else tries):
            self.sock.sendto(data, self.addr)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([self.sock], [], [], left)
                if not ready:
                    break
                try:
                    reply = self.sock.recv(65535)
                except ConnectionRefusedError:
                    break                  # nothing listens yet: the ICMP of our last send
                got, _, body = reply.partition(b" ")
                if got == cookie:
                    answer = decode(body)
                    if not isinstance(answer, dict):
                        raise BenchError(f"ng: not a dictionary: {reply[:200]!r}")
                    return answer
        raise BenchError(f"ng: no answer to {msg.get('command')} from udp:{HOST}:{self.addr[1]}")

    def ok(self, msg: dict[bytes | str, Any]) -> dict[bytes, Any]:
        answer = self.command(msg)
        if answer.get(b"result") != b"ok":
            raise BenchError(f"ng {msg.get('command')}: {answer!r:.300}")
        return answer


def sdp(port: int, session: int) -> str:
    """A G.711 (PCMU) SDP for one audio stream on HOST:port, 20 ms packets."""
    return (f"v=0\r\no=- {session} 1 IN IP4 {HOST}\r\ns=-\r\nc=IN IP4 {HOST}\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n"
            "a=sendrecv\r\n")


_MEDIA = re.compile(rb"^m=audio (\d+) ", re.MULTILINE)
_CONN = re.compile(rb"^c=IN IP4 (\S+)", re.MULTILINE)


def media_address(answer: dict[bytes, Any]) -> tuple[str, int]:
    """Where the rewritten SDP says to send: the audio stream's c= (media-level if any) and
    m= port."""
    body = answer.get(b"sdp")
    if not isinstance(body, bytes):
        raise BenchError(f"ng answer without sdp: {answer!r:.300}")
    m = _MEDIA.search(body)
    if m is None:
        raise BenchError(f"no m=audio in {body!r:.300}")
    conns = _CONN.findall(body[: m.start()]) + _CONN.findall(body[m.start():])
    host = conns[-1].decode() if conns else HOST
    return host, int(m.group(1))


FLAGS = ["trust-address"]


def load_socket(rcvbuf: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((HOST, 0))
    return s


def open_calls(ng: NgClient, n: int, tag: str, per_side: int = 0
               ) -> tuple[list[socket.socket], list[list[Any]]]:
    """N calls through the relay, an offer and an answer each.  The callers' RTP comes from
    ``per_side`` sockets and the callees' from as many (call i on socket i mod per_side), or
    with ``per_side`` 0 from two sockets per call.  Returns the sockets and the generator's
    streams, the caller's and the callee's per call: (source fd, relay host, relay port,
    fd it must come out on); stream i's SSRC is SSRC_BASE + i."""
    socks: list[socket.socket] = []
    streams: list[list[Any]] = []
    # Shared sockets carry many streams: room for a second of them when the generator is late.
    rcvbuf = 0 if per_side <= 0 else min(4 << 20, max(1 << 18, n // per_side * 50 * 1024))
    try:
        callers = [load_socket(rcvbuf) for _ in range(per_side)]
        socks += callers
        callees = [load_socket(rcvbuf) for _ in range(per_side)]
        socks += callees
        for i in range(n):
            if per_side > 0:
                caller, callee = callers[i % per_side], callees[i % per_side]
            else:
                caller = load_socket(0)
                socks.append(caller)
                callee = load_socket(0)
                socks.append(callee)
            call_id = f"{tag}-{i}"
            offered = ng.ok({"command": "offer", "call-id": call_id, "from-tag": f"a{i}",
                             "sdp": sdp(caller.getsockname()[1], 1000 + i), "flags": FLAGS})
            answered = ng.ok({"command": "answer", "call-id": call_id, "from-tag": f"a{i}",
                              "to-tag": f"b{i}", "sdp": sdp(callee.getsockname()[1], 5000 + i),
                              "flags": FLAGS})
            to_callee = media_address(offered)      # the callee sends here
            to_caller = media_address(answered)     # the caller sends here
            streams.append([caller.fileno(), *to_caller, callee.fileno()])
            streams.append([callee.fileno(), *to_callee, caller.fileno()])
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks, streams


def close_calls(ng: NgClient, n: int, tag: str, budget: float = 10.0) -> None:
    """``delete`` every call (within ``budget`` seconds: a dead relay is not waited for)."""
    deadline = time.monotonic() + budget
    for i in range(n):
        if time.monotonic() > deadline:
            return
        try:
            ng.command({"command": "delete", "call-id": f"{tag}-{i}", "from-tag": f"a{i}"},
                       timeout=0.5, tries=1)
        except BenchError:
            return


# -- the relays ----------------------------------------------------------------------------------


def fastsip_media_available() -> bool:
    """Whether this build has ``fastsip media`` (it lands with issue 13)."""
    try:
        return subprocess.run([sys.executable, "-m", "fastsip.cli", "media", "--help"],
                              check=False, env=fastsip_env(), cwd=tempfile.gettempdir(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def port_range(calls: int) -> tuple[int, int]:
    """A private RTP port range for one relay run, below the ephemeral ports."""
    span = max(PORT_SPAN, calls * PORTS_PER_CALL + 200)
    low = random.randrange(10000, max(10001, 32000 - span)) & ~1
    return low, min(low + span, 32767)


def relay_argv(name: str, workdir: Path, ng_port: int, low: int, high: int) -> list[str]:
    if name == "rtpengine":
        assert RTPENGINE is not None
        return [RTPENGINE, "--config-file=none", "--foreground", "--log-stderr",
                "--table=-1", f"--interface={HOST}", f"--listen-ng={HOST}:{ng_port}",
                f"--port-min={low}", f"--port-max={high}", f"--pidfile={workdir / 'pid'}",
                "--num-threads=2"]
    return [sys.executable, "-m", "fastsip.cli", "media", "--interface", HOST,
            "--ng", f"{HOST}:{ng_port}", "--port-min", str(low), "--port-max", str(high)]


def start_relay(name: str, workdir: Path, calls: int
                ) -> tuple[subprocess.Popen[bytes], NgClient, tuple[int, int]]:
    """The relay in the foreground, its output in ``NAME.log``; returns once it answers an
    ng ``ping`` (within 20 s)."""
    ng_port = free_port()
    low, high = port_range(calls)
    log = open(workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
    env = None if name == "rtpengine" else {**fastsip_env(), **VARIANTS.get(name, {})}
    proc = subprocess.Popen(relay_argv(name, workdir, ng_port, low, high), cwd=workdir,
                            env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    ng = NgClient(ng_port, timeout=0.25, tries=1)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}: "
                                 f"{tail(workdir / f'{name}.log')}")
            try:
                if ng.command({"command": "ping"}).get(b"result") == b"pong":
                    break
            except BenchError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{name} does not answer ng ping on udp:{HOST}:{ng_port}: "
                                 f"{tail(workdir / f'{name}.log')}")
        ng.timeout, ng.tries = 2.0, 3
    except BaseException:
        ng.close()
        stop(proc)
        raise
    return proc, ng, (low, high)


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def udp_drops(ports: set[int], low: int, high: int) -> tuple[int, int]:
    """Datagrams the kernel dropped so far (full receive buffer) on 127.0.0.1 sockets:
    (on ``ports``, the generator's; on ports in [low, high], the relay's), /proc/net/udp."""
    mine = relay = 0
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            host, _, port_hex = fields[1].partition(":")
            if host not in ("0100007F", "00000000"):
                continue
            port = int(port_hex, 16)
            drops = int(fields[-1])
            if port in ports:
                mine += drops
            elif low <= port <= high:
                relay += drops
    return mine, relay


# -- one measurement -----------------------------------------------------------------------------


def strace_counts(pid: int, seconds: float, workdir: Path) -> dict[str, int]:
    """``strace -c -f -p PID`` for ``seconds``: calls per syscall name (all threads)."""
    assert STRACE is not None
    out = workdir / f"strace-{pid}.txt"
    tracer = subprocess.Popen([STRACE, "-c", "-f", "-p", str(pid), "-o", str(out)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(seconds)
    finally:
        if tracer.poll() is None:
            tracer.send_signal(signal.SIGINT)
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait()
    counts: dict[str, int] = {}
    for line in out.read_text(errors="replace").splitlines() if out.exists() else []:
        fields = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(fields) >= 5 and fields[3].isdigit() and not fields[-1].startswith("total"):
            counts[fields[-1]] = int(fields[3])
    return counts


def measure(name: str, calls: int, warmup: float = WARMUP, seconds: float = SECONDS,
            syscalls: bool = False, load_sockets: int = LOAD_SOCKETS,
            workdir: Path | None = None) -> dict[str, Any]:
    """One relay, ``calls`` calls: a fresh relay, the calls opened over ng, the load, the
    calls deleted, the relay stopped (in every case)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = workdir or Path(tmp)
        proc, ng, (low, high) = start_relay(name, work, calls)
        tag = f"bench-{name}-{calls}-{os.getpid()}-{random.randrange(1 << 30)}"
        socks: list[socket.socket] = []
        load: subprocess.Popen[str] | None = None
        try:
            setup_started = time.monotonic()
            socks, streams = open_calls(ng, calls, tag, load_sockets)
            setup = time.monotonic() - setup_started
            extra = SYSCALL_SECONDS + 1.0 if syscalls and STRACE else 0.0
            plan = {"relay_pid": proc.pid, "warmup": warmup, "steady": seconds,
                    "extra": extra, "drain": 0.3, "ptime": PTIME, "slots": 20,
                    "ssrc_base": SSRC_BASE, "streams": streams}
            plan_file = work / f"plan-{name}-{calls}.json"
            plan_file.write_text(json.dumps(plan))
            load = subprocess.Popen([sys.executable, str(LOAD), str(plan_file)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                                    cwd=work, pass_fds=[s.fileno() for s in socks])
            deadline = time.monotonic() + warmup + seconds + extra + 30
            strace: dict[str, int] = {}
            strace_s = 0.0
            lines: list[str] = []
            if extra:
                lines = _lines_until_event(load, deadline)
                began = time.monotonic()
                strace = strace_counts(proc.pid, SYSCALL_SECONDS, work)
                strace_s = time.monotonic() - began
            try:
                rest, _ = load.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise BenchError("load generator overran its time") from None
            lines += rest.splitlines()
            if load.returncode != 0 or not lines:
                raise BenchError(f"load generator failed ({load.returncode})")
            result = json.loads(lines[-1])
            gen_drops, relay_drops = udp_drops({s.getsockname()[1] for s in socks}, low, high)
            if proc.poll() is not None:
                raise BenchError(f"{name} died during the load ({proc.returncode}): "
                                 f"{tail(work / f'{name}.log')}")
            close_calls(ng, calls, tag)
        finally:
            if load is not None and load.poll() is None:
                load.kill()
                load.wait()
            for s in socks:
                s.close()
            ng.close()
            stop(proc)
    return summarize(name, calls, result, setup, gen_drops, relay_drops, strace, strace_s,
                     extra, load_sockets)


def _lines_until_event(proc: subprocess.Popen[str], deadline: float) -> list[str]:
    """The generator's lines up to its ``steady_end`` event (nothing follows it until the
    generator ends, so no line waits in the reader's buffer when select looks)."""
    assert proc.stdout is not None
    out: list[str] = []
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], deadline - time.monotonic())
        if not ready:
            break
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if '"steady_end"' in line:
            return out
    raise BenchError("load generator never reached the end of its steady window")


def summarize(name: str, calls: int, r: dict[str, Any], setup: float, gen_drops: int,
              relay_drops: int, strace: dict[str, int], strace_s: float,
              extra: float, load_sockets: int) -> dict[str, Any]:
    w = r["window"]
    wall = max(w["wall"], 1e-9)
    sent = r["sent"]["1"]
    got = r["received"]["1"]
    relayed = max(got, 1)
    lossy = [(s, g) for s, g in r["steady_per_stream"] if g < s]
    row: dict[str, Any] = {
        "relay": name, "calls": calls, "seconds": wall, "setup_s": setup,
        # the generator gave up before the steady window: CPU figures are the whole run's
        "window_is_run": r["window_is_run"],
        "offered_pps": calls * 2 / PTIME, "sent_pps": sent / wall, "relayed_pps": got / wall,
        "sent": sent, "received": got, "loss": (sent - got) / sent if sent else 1.0,
        "warmup_loss": ((r["sent"]["0"] - r["received"]["0"]) / r["sent"]["0"]
                        if r["sent"]["0"] else 0.0),
        "streams_with_loss": len(lossy), "worst_stream_loss": max(
            ((s - g) / s for s, g in lossy if s), default=0.0),
        "us_per_packet": w["relay_cpu"] / relayed * 1e6,
        "user_us": w["relay_user"] / relayed * 1e6, "sys_us": w["relay_sys"] / relayed * 1e6,
        "relay_util": w["relay_cpu"] / wall, "load_util": w["load_cpu"] / wall,
        "machine_util": w["machine_busy"] / wall / (os.cpu_count() or 1),
        # the steady window's send instants handled late (the extra phase's are strace's)
        "late_fraction": r["late_instants"]["1"] / max(r["instants"]["1"], 1),
        "max_lag_ms": r["max_lag"] * 1e3, "gave_up": r["gave_up"],
        "misrouted": r["misrouted"], "send_errors": r["send_errors"],
        "generator_drops": gen_drops, "relay_drops": relay_drops,
        "load_sockets": load_sockets,
    }
    # The generator kept its pace: it never gave up, sent the offered rate over the window
    # (a late send instant is caught up, so lateness alone is jitter, not lost load), lost
    # nothing at its own sockets and had CPU to spare.
    row["generator_ok"] = (not r["gave_up"] and row["sent_pps"] >= 0.99 * row["offered_pps"]
                           and gen_drops == 0 and row["load_util"] < 0.9)
    if strace and extra:
        # strace stops the relay at every syscall: the packets it relayed while traced are
        # estimated from the extra phase's rate, which holds only if it kept up under strace.
        extra_pps = r["received"]["3"] / extra
        packets = max(extra_pps * strace_s, 1.0)
        extra_sent = max(r["sent"]["3"], 1)
        row["strace_kept_up"] = (r["received"]["3"] >= 0.99 * extra_sent
                                 and r["late_instants"]["3"] <= 0.01 * r["instants"]["3"])
        row["syscalls"] = strace
        row["syscalls_per_packet"] = sum(strace.values()) / packets
        row["syscalls_top"] = {k: v / packets for k, v in
                               sorted(strace.items(), key=lambda kv: -kv[1])[:6]}
    return row


# -- runs and reports ----------------------------------------------------------------------------


def raise_fd_limit(need: int) -> None:
    """Each call holds two generator sockets (and the relay four ports)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, need)) if hard != resource.RLIM_INFINITY else max(soft, need)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def compare(calls: Sequence[int] = CALLS, relays: Sequence[str] = RELAYS, rounds: int = 1,
            warmup: float = WARMUP, seconds: float = SECONDS,
            syscalls: bool = False, load_sockets: int = LOAD_SOCKETS) -> list[dict[str, Any]]:
    """Each N, each relay, interleaved (A B, B A ...) over ``rounds``; every row kept (the
    report shows each relay's best round per N)."""
    raise_fd_limit(2 * max(calls) + 256)
    rows = []
    for n in calls:
        for k in range(rounds):
            order = list(relays) if k % 2 == 0 else list(reversed(relays))
            for name in order:
                row = measure(name, n, warmup, seconds, syscalls, load_sockets)
                row["round"] = k + 1
                rows.append(row)
    return rows


def best(rows: Sequence[dict[str, Any]], relay: str, calls: int) -> dict[str, Any] | None:
    mine = [r for r in rows if r["relay"] == relay and r["calls"] == calls]
    return min(mine, key=lambda r: r["us_per_packet"]) if mine else None


HEADER = (f"  {'relay':10} {'calls':>5} {'offered':>8} {'relayed':>8} {'loss %':>7} "
          f"{'us/pkt':>7} {'user':>6} {'sys':>6} {'relay':>6} {'load':>5} {'pace':>5} "
          f"{'drops r/g':>10}")


def row_line(r: dict[str, Any]) -> str:
    pace = "BEHIND" if not r["generator_ok"] else "late" if r["late_fraction"] > LATE_SHARE \
        else "ok"
    line = (f"  {r['relay']:10} {r['calls']:>5} {r['offered_pps']:>8.0f} {r['relayed_pps']:>8.0f} "
            f"{r['loss'] * 100:>7.3f} {r['us_per_packet']:>7.2f} {r['user_us']:>6.2f} "
            f"{r['sys_us']:>6.2f} {r['relay_util']:>6.0%} {r['load_util']:>5.0%} {pace:>5} "
            f"{r['relay_drops']:>5}/{r['generator_drops']:<4}")
    if "syscalls_per_packet" in r:
        top = ", ".join(f"{k} {v:.2f}" for k, v in r["syscalls_top"].items())
        line += f"\n  {'':10} syscalls/packet {r['syscalls_per_packet']:.2f} ({top})"
        if not r["strace_kept_up"]:
            line += (f"\n  {'':10} (UNRELIABLE: under strace the relay did not keep up; "
                     "the count per packet is estimated from the rate it relayed)")
    return line


def report(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "media relay CPU per relayed RTP packet (G.711, 20 ms, 172-byte packets, 127.0.0.1; "
        f"steady window {rows[0]['seconds']:.1f} s)" if rows else "no rows",
        HEADER,
    ]
    lines += [row_line(r) for r in rows]
    lines.append("  offered/relayed: packets/s through the relay; us/pkt: the relay's CPU "
                 "(schedstat, all threads) per relayed packet, user/sys from /proc/PID/stat "
                 "ticks;")
    lines.append("  relay/load: CPU use of the relay and of the load generator (100% = one "
                 "core); pace: ok, late (over 5% of send instants >5 ms late, caught up),")
    lines.append("  BEHIND (the generator did not send the offered rate, or dropped at its own "
                 "sockets: then a loss is not the relay's); drops r/g: datagrams")
    lines.append("  dropped at full receive buffers on the relay's / the generator's sockets.")
    for n in sorted({r["calls"] for r in rows}):
        ref = best(rows, "rtpengine", n)
        for name in ("fastsip", *VARIANTS):
            ours = best(rows, name, n)
            if ref and ours:
                ratio = ours["us_per_packet"] / ref["us_per_packet"]
                lines.append(f"  {n} calls: ratio {name}/rtpengine {ratio:.2f}x CPU per packet "
                             f"(goal <= {GOAL}x; guard <= {MAX_RATIO}x at 100 calls)")
    return "\n".join(lines)


def max_rate(relays: Sequence[str] = RELAYS, steps: Sequence[int] = MAX_RATE_CALLS,
             warmup: float = WARMUP, seconds: float = 5.0,
             budget: float = 600.0, load_sockets: int = LOAD_SOCKETS) -> list[dict[str, Any]]:
    """Per relay, the call count ramped (a fresh relay per step) until loss >= MAX_LOSS or
    the generator cannot keep pace; no step starts after ``budget`` seconds."""
    raise_fd_limit(2 * max(steps) + 256)
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    done: set[str] = set()
    for n in steps:
        for name in relays:
            if name in done or time.monotonic() - started > budget:
                continue
            row = measure(name, n, warmup, seconds, load_sockets=load_sockets)
            rows.append(row)
            if row["loss"] >= MAX_LOSS or not row["generator_ok"]:
                done.add(name)
    return rows


def max_rate_report(rows: Sequence[dict[str, Any]]) -> str:
    lines = [("media relay max rate: calls ramped, a fresh relay per step, until loss >= "
              f"{MAX_LOSS:.1%} or the generator falls behind"), HEADER]
    lines += [row_line(r) for r in rows]
    for name in RELAYS:
        mine = [r for r in rows if r["relay"] == name]
        if not mine:
            continue
        good = [r for r in mine if r["loss"] < MAX_LOSS and r["generator_ok"]]
        last = mine[-1]
        top = max(good, key=lambda r: r["relayed_pps"]) if good else None
        if last["loss"] < MAX_LOSS and last["generator_ok"]:
            why = "every step passed: not reached"
        elif not last["generator_ok"]:
            when = " (it gave up in the warm-up)" if last["window_is_run"] else ""
            why = (f"then the GENERATOR could not keep pace at {last['calls']} calls{when} "
                   f"(load CPU {last['load_util']:.0%}, relay CPU {last['relay_util']:.0%}, "
                   f"machine {last['machine_util']:.0%} busy, max lag "
                   f"{last['max_lag_ms']:.0f} ms, its drops {last['generator_drops']}): the "
                   "limit found is the generator's or the machine's, not the relay's alone")
        else:
            why = (f"then {last['loss']:.2%} loss at {last['calls']} calls "
                   f"({last['relayed_pps']:.0f} pkt/s, relay CPU {last['relay_util']:.0%})")
        where = (f"{top['relayed_pps']:.0f} pkt/s at {top['calls']} calls "
                 f"({top['us_per_packet']:.2f} us/pkt, relay CPU {top['relay_util']:.0%})"
                 if top else "none (the first step failed)")
        lines.append(f"  {name}: highest rate with < {MAX_LOSS:.1%} loss: {where}; {why}")
    lines.append(f"  NOTE: {os.cpu_count()} CPU(s) shared by the relay and the generator: "
                 "a limit is the machine's, relay and generator together.")
    return "\n".join(lines)


# -- pytest --------------------------------------------------------------------------------------


@pytest.mark.skipif(RTPENGINE is None or not os.path.isdir("/proc/self/task"),
                    reason="needs rtpengine (Debian: rtpengine-daemon) and Linux procfs")
def test_media_cpu_per_packet_vs_rtpengine() -> None:
    have_fastsip = fastsip_media_available()
    relays = RELAYS if have_fastsip else ("rtpengine",)
    rows = compare((100,), relays, PYTEST_ROUNDS, seconds=PYTEST_SECONDS)
    print("\n" + report(rows))
    for r in rows:
        assert r["misrouted"] == 0 and r["send_errors"] == 0, r
        assert r["loss"] < MAX_LOSS, row_line(r)
    if not have_fastsip:
        pytest.skip("fastsip media is not in this build: rtpengine measured alone")
    ref, ours = best(rows, "rtpengine", 100), best(rows, "fastsip", 100)
    assert ref is not None and ours is not None
    ratio = ours["us_per_packet"] / ref["us_per_packet"]
    assert ratio <= MAX_RATIO, report(rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", default=",".join(map(str, CALLS)), metavar="N,N",
                    help="concurrent calls per measurement (default %(default)s)")
    ap.add_argument("--relays", default=",".join(RELAYS), metavar="R,R",
                    help="rtpengine, fastsip, " + ", ".join(VARIANTS)
                         + " (default rtpengine,fastsip)")
    ap.add_argument("--warmup", type=float, default=WARMUP, metavar="S")
    ap.add_argument("--seconds", type=float, default=SECONDS, metavar="S",
                    help="steady window (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; best counts")
    ap.add_argument("--syscalls", action="store_true",
                    help=f"strace -c the relay for {SYSCALL_SECONDS:g} s after each window")
    ap.add_argument("--max-rate", action="store_true",
                    help="ramp the calls per relay until loss >= 0.1 %% or the generator "
                         "falls behind")
    ap.add_argument("--max-rate-calls", default=",".join(map(str, MAX_RATE_CALLS)),
                    metavar="N,N", help="the ramp's steps (default %(default)s)")
    ap.add_argument("--max-rate-seconds", type=float, default=5.0, metavar="S")
    ap.add_argument("--load-sockets", type=int, default=LOAD_SOCKETS, metavar="K",
                    help="the generator's sockets per side, shared by the calls; 0: two "
                         "per call (default %(default)s)")
    ap.add_argument("--json", metavar="FILE", help="save every row as JSON")
    a = ap.parse_args(argv)
    if RTPENGINE is None:
        print("bench_media: rtpengine is not installed (Debian: rtpengine-daemon); skipped")
        return 0
    relays = [r for r in a.relays.split(",") if r]
    if bad := [r for r in relays if r not in RELAYS and r not in VARIANTS]:
        ap.error(f"unknown relay {bad[0]!r}")
    if any(r != "rtpengine" for r in relays) and not fastsip_media_available():
        print("bench_media: fastsip media is not in this build; measuring rtpengine alone")
        relays = [r for r in relays if r == "rtpengine"]
    if a.syscalls and STRACE is None:
        print("bench_media: strace not found; --syscalls ignored")
    if a.max_rate:
        steps = sorted({int(n) for n in a.max_rate_calls.split(",") if n})
        rows = max_rate(relays, steps, a.warmup, a.max_rate_seconds,
                        load_sockets=a.load_sockets)
        print(max_rate_report(rows))
    else:
        calls = [int(n) for n in a.calls.split(",") if n]
        rows = compare(calls, relays, a.rounds, a.warmup, a.seconds, a.syscalls,
                       a.load_sockets)
        print(report(rows))
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
