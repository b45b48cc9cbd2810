"""CPU per call-second of media: ``fastsip call``/``fastsip answer`` against sipp's own RTP,
measured in the same run.

Both pairs carry the same load on 127.0.0.1: ``CALLS`` concurrent calls (started at ``RATE``
per second), each sending ``SECONDS`` of 20 ms PCMU to an answerer that echoes it back.

- fastsip: ``fastsip call --play X.wav --record DIR`` (pacing, sending, receiving the echo
  through the jitter buffer into a recording, quality meters) to ``fastsip answer --echo``.
- sipp: a sipp UAC playing the same audio as a pcap (``play_pcap_audio``: a thread per call
  sending from a raw socket) to a sipp UAS with ``-rtp_echo`` (one echo thread for all calls).
  sipp does less -- its UAC has no socket on its media port, so the kernel refuses the echo
  (the "UDP in" column: half fastsip's) -- so this is the cost of a full media endpoint next
  to a packet player, not a like-for-like race.

CPU is read from ``/proc/PID/stat`` (utime and stime apart, every thread, exited ones too):
the answerers' just before the load and after the callers ended; the callers' from ``wait4``'s
rusage, less a one-call run of the same command (process start-up and imports are not
per call-second).  The sum of caller and answerer over ``CALLS * SECONDS`` is the figure;
the ratio is fastsip / sipp (how many times sipp's CPU fastsip needs).

    PYTHONPATH=. python benchmarks/bench_cli_media.py [--calls 100] [--seconds 10] [--rounds 3]

``--pacing N`` measures instead the media clock of one process under load: N streams of 20 ms
PCMU on one MediaEngine (one loop timer), sending to N sockets of this process that time each
arrival by the kernel's receive stamp (SO_TIMESTAMPNS; on loopback, when it left) against its
frame's due time (epoch + k * 20 ms).  The engine's process reports its own CPU (user and
system apart, start-up excluded).  The reference in the same run is the session's Python send
path (each packet a ``bytes`` and a ``sendto`` from Python), interleaved round by round with
the compiled one (``fastsip.rtp._sender``: granted frames built and sent from C):

    PYTHONPATH=. python benchmarks/bench_cli_media.py --pacing 200 [--seconds 10] [--rounds 3]

Linux only (procfs); skipped without sipp.  ``benchmarks/guard.py`` runs it as a plain pytest
(no pytest-benchmark timing, so no ``GUARDS`` entry): a ratio over ``CEILING`` fails.

Measured on the shared 2-core machine (Dec 2026, 100 calls x 10 s, two runs of three rounds):
fastsip 4.0-4.4 ms CPU per call-second (caller 2.2-2.4, answer 1.8-2.0), sipp 1.23-1.46;
ratios 3.03, 3.49, 3.10 and 2.89, 3.41, 3.49.  The ceiling is 6: far enough above the spread
not to fail on noise, low enough to catch a per-packet cost doubling.

With the compiled send path and the batched receive (fastsip.rtp._sender, ._receiver),
interleaved round by round with the Python paths before them (four rounds each, the machine
under other load; totals in ms per call-second): before 5.88, 4.67, 4.48, 6.92 (caller
2.40-3.51, answer 2.08-3.41; ratios 3.56, 3.04, 3.55, 4.76), after 4.52, 4.44, 4.35, 5.52
(caller 2.20-2.82, answer 2.16-2.70; ratios 2.79, 3.04, 2.77, 3.62).  The caller gains (its
audio is sent from C, its RTP read in batches: fewer system calls); the answer's ``--echo``
still answers each received packet from Python.  Again, three rounds with echo sessions
granted too (no Python tick per frame): before 7.47, 5.06, 5.06 (ratios 4.19, 3.56, 3.54),
after 5.73, 4.09, 4.76 (ratios 3.11, 2.94, 3.15; answer user 1.48-1.88 against 1.86-2.72).
After was below before in each of the seven interleaved pairs.  The media clock alone (``--pacing 200``,
5 s, three rounds): Python path 1000-1014 us CPU per stream-second (user 606-678), compiled
372-394 (user 80-105); arrival - due p99 26.7-28.1 ms before, 9.1-14.7 ms after.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from benchproc import fastsip_env, free_port, stop

SIPP = shutil.which("sipp")
HOST = "127.0.0.1"
CALLS = int(os.environ.get("FASTSIP_BENCH_MEDIA_CALLS", "100"))
SECONDS = float(os.environ.get("FASTSIP_BENCH_MEDIA_SECONDS", "10"))
RATE = 50
#: fastsip may use at most this many times sipp's CPU per call-second before the guard fails.
CEILING = float(os.environ.get("FASTSIP_BENCH_MEDIA_CEILING", "6"))   # 0: report only

# Not a pytest-benchmark timing (see the module docstring).
GUARDS: list[tuple[str, str, float, str]] = []

_UAC = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="UAC playing a pcap">
  <send retrans="500"><![CDATA[

      INVITE sip:echo@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:echo@[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 INVITE
      Contact: <sip:sipp@[local_ip]:[local_port]>
      Max-Forwards: 70
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000

  ]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="200" rtd="true"/>
  <send><![CDATA[

      ACK sip:echo@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:echo@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 1 ACK
      Max-Forwards: 70
      Content-Length: 0

  ]]></send>
  <nop><action><exec play_pcap_audio="@PCAP@"/></action></nop>
  <pause milliseconds="@HOLD_MS@"/>
  <send retrans="500"><![CDATA[

      BYE sip:echo@[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
      From: sipp <sip:sipp@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
      To: <sip:echo@[remote_ip]:[remote_port]>[peer_tag_param]
      Call-ID: [call_id]
      CSeq: 2 BYE
      Max-Forwards: 70
      Content-Length: 0

  ]]></send>
  <recv response="200" crlf="true"/>
</scenario>
"""

_UAS = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="UAS answering with its echoing RTP port">
  <recv request="INVITE" crlf="true"/>
  <send retrans="500"><![CDATA[

      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:];tag=[pid]SIPpTag01[call_number]
      [last_Call-ID:]
      [last_CSeq:]
      Contact: <sip:[local_ip]:[local_port];transport=[transport]>
      Content-Type: application/sdp
      Content-Length: [len]

      v=0
      o=sipp 53655765 2353687637 IN IP[local_ip_type] [local_ip]
      s=-
      c=IN IP[media_ip_type] [media_ip]
      t=0 0
      m=audio [media_port] RTP/AVP 0
      a=rtpmap:0 PCMU/8000
      a=ptime:20

  ]]></send>
  <recv request="ACK" crlf="true"/>
  <recv request="BYE" timeout="120000"/>
  <send><![CDATA[

      SIP/2.0 200 OK
      [last_Via:]
      [last_From:]
      [last_To:]
      [last_Call-ID:]
      [last_CSeq:]
      Content-Length: 0

  ]]></send>
</scenario>
"""


def stat_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every thread of ``pid``, living or exited, so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def udp_in_datagrams() -> int:
    """The machine's UDP InDatagrams so far (/proc/net/snmp): that the RTP really flowed
    (other processes' traffic counts too)."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1]))["InDatagrams"])


def sound(seconds: float) -> list[int]:
    """A deterministic non-silent 16-bit signal (a tone with a slow swell), 8 kHz."""
    import math

    return [int(8000 * math.sin(2 * math.pi * 440 * i / 8000)
                * (0.5 + 0.5 * math.sin(2 * math.pi * 0.3 * i / 8000)))
            for i in range(int(8000 * seconds))]


def write_inputs(workdir: Path, seconds: float) -> tuple[Path, Path]:
    """The same audio as a WAV (for fastsip) and as a pcap of 20 ms PCMU packets (for sipp:
    Ethernet/IPv4/UDP, which its play_pcap_audio reads; it rewrites addresses and ports)."""
    import numpy as np

    from fastsip.rtp import ulaw_encode
    from fastsip.rtp.wav import write_wav

    pcm = np.array(sound(seconds), dtype=np.int16)
    wav = workdir / "play.wav"
    write_wav(wav, pcm)
    payload = bytes(ulaw_encode(pcm))
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    for k in range(len(payload) // 160):
        rtp = struct.pack("!BBHII", 0x80, 0x80 if k == 0 else 0, k, 160 * k, 0x1234) + \
            payload[160 * k:160 * (k + 1)]
        udp = struct.pack("!HHHH", 6000, 7000, 8 + len(rtp), 0) + rtp
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), k & 0xFFFF, 0, 64, 17, 0,
                         bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])) + udp
        frame = b"\x00" * 12 + b"\x08\x00" + ip
        t = k * 0.02
        out += struct.pack("<IIII", int(t), round((t - int(t)) * 1e6), len(frame), len(frame))
        out += frame
    pcap = workdir / "play.pcap"
    pcap.write_bytes(bytes(out))
    return wav, pcap


class Side:
    """CPU seconds of one pair's caller and answerer under the load.  (A plain class:
    guard.py loads this file without registering it as a module, which dataclasses need.)"""

    def __init__(self, name: str) -> None:
        self.name = name
        self.caller_user = self.caller_sys = 0.0
        self.answer_user = self.answer_sys = 0.0
        self.calls_ok = 0
        self.udp_in = 0      # UDP datagrams the machine received meanwhile (SIP and RTP)

    @property
    def total(self) -> float:
        return self.caller_user + self.caller_sys + self.answer_user + self.answer_sys


def run_caller(argv: Sequence[str], workdir: Path, env: dict[str, str] | None,
               timeout: float) -> tuple[float, float, int, str]:
    """Run a caller to its end: (user, system) CPU seconds from wait4's rusage, exit status,
    stdout."""
    out_path = workdir / "caller.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(list(argv), cwd=workdir, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = -9
                break
            time.sleep(0.05)
    return usage.ru_utime, usage.ru_stime, proc.returncode, out_path.read_text()


def measure(side: str, calls: int, seconds: float, workdir: Path) -> Side:
    wav, pcap = write_inputs(workdir, seconds)
    hold = seconds + 0.5
    sip_port = free_port()
    result = Side(side)
    if side == "fastsip":
        answer_argv = [sys.executable, "-m", "fastsip.cli", "answer", "--listen",
                       f"udp:{HOST}:{sip_port}", "--media-port", "0", "--echo"]

        def caller(n: int, duration: float) -> list[str]:
            return [sys.executable, "-m", "fastsip.cli", "call", f"sip:echo@{HOST}:{sip_port}",
                    "--calls", str(n), "--rate", str(RATE), "--duration", str(duration),
                    "--play", str(wav), "--record", str(workdir / f"rec{n}"),
                    "--media-port", "0"]
        env: dict[str, str] | None = fastsip_env()
    else:
        assert SIPP is not None
        uas = workdir / "uas.xml"
        uas.write_text(_UAS)
        answer_argv = [SIPP, "-sf", str(uas), "-i", HOST, "-p", str(sip_port), "-mp",
                       str(free_port()), "-rtp_echo", "-nostdin"]

        def caller(n: int, duration: float) -> list[str]:
            uac = workdir / f"uac{n}.xml"
            uac.write_text(_UAC.replace("@PCAP@", str(pcap))
                           .replace("@HOLD_MS@", str(round(duration * 1000))))
            return [SIPP, "-sf", str(uac), f"{HOST}:{sip_port}", "-i", HOST,
                    "-p", str(free_port()), "-mp", str(free_port()), "-m", str(n),
                    "-r", str(RATE), "-l", str(n), "-nostdin", "-timeout",
                    str(int(duration + 60)), "-trace_stat", "-stf", str(workdir / f"uac{n}.csv")]
        env = None
    answer = subprocess.Popen(answer_argv, cwd=workdir, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        # start-up and tear-down of a caller, not per call-second: one short call
        base_user, base_sys, _, _ = run_caller(caller(1, 0.1), workdir, env, 60)
        time.sleep(1.0)
        a_user0, a_sys0 = stat_seconds(answer.pid)
        udp0 = udp_in_datagrams()
        user, system, rc, out = run_caller(caller(calls, hold), workdir, env, hold + 120)
        time.sleep(1.0)                     # the last BYEs' echo sockets close
        a_user1, a_sys1 = stat_seconds(answer.pid)
        result.udp_in = udp_in_datagrams() - udp0
    finally:
        stop(answer)
    result.caller_user = max(0.0, user - base_user)
    result.caller_sys = max(0.0, system - base_sys)
    result.answer_user = a_user1 - a_user0
    result.answer_sys = a_sys1 - a_sys0
    if side == "fastsip":
        result.calls_ok = sum(1 for _ in (workdir / f"rec{calls}").glob("*.wav"))
        if rc != 0:
            raise AssertionError(f"fastsip call exited {rc}:\n{out}")
    else:
        rows = list(csv.reader((workdir / f"uac{calls}.csv").read_text().splitlines(),
                               delimiter=";"))
        result.calls_ok = int(dict(zip(rows[0], rows[-1]))["SuccessfulCall(C)"])
    return result


def compare(calls: int = CALLS, seconds: float = SECONDS) -> dict[str, Side]:
    # two sockets per call in the callers and answerers, and a thread per call in sipp's UAC
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8 * calls + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * calls + 256), hard))
    sides = {}
    for side in ("fastsip", "sipp"):
        with tempfile.TemporaryDirectory() as tmp:
            sides[side] = measure(side, calls, seconds, Path(tmp))
    return sides


def report(sides: dict[str, Side], calls: int, seconds: float) -> str:
    media = calls * seconds
    title = (f"CPU per call-second of media, {calls} concurrent calls x {seconds:g} s "
             "(ms CPU / call-second; user + system):")
    header = (f"  {'':8} {'caller usr':>10} {'caller sys':>10} {'answer usr':>10} "
              f"{'answer sys':>10} {'total':>8}  calls ok  UDP in")
    lines = [title, header]
    for s in sides.values():
        lines.append(f"  {s.name:8} {s.caller_user / media * 1e3:10.3f} "
                     f"{s.caller_sys / media * 1e3:10.3f} {s.answer_user / media * 1e3:10.3f} "
                     f"{s.answer_sys / media * 1e3:10.3f} {s.total / media * 1e3:8.3f}  "
                     f"{s.calls_ok:8}  {s.udp_in}")
    ratio = sides["fastsip"].total / sides["sipp"].total if sides["sipp"].total else float("inf")
    lines.append(f"  ratio fastsip/sipp {ratio:.2f}" + (f"  (ceiling {CEILING:g})"
                                                         if CEILING else ""))
    return "\n".join(lines)


def ratio_of(sides: dict[str, Side]) -> float:
    return sides["fastsip"].total / sides["sipp"].total if sides["sipp"].total else float("inf")


@pytest.mark.skipif(SIPP is None or not os.path.isdir("/proc/self/task"),
                    reason="needs sipp and Linux procfs")
def test_cli_media_cpu_per_call_second_vs_sipp() -> None:
    pytest.importorskip("numpy")
    sides = compare()
    text = report(sides, CALLS, SECONDS)
    print("\n" + text)
    for s in sides.values():
        assert s.calls_ok >= 0.98 * CALLS, text
    if CEILING:
        assert ratio_of(sides) <= CEILING, text


# -- the media clock under load (--pacing) -----------------------------------------------------

_PACING_CHILD = r"""
import asyncio, json, resource, sys, time
import numpy as np
from fastsip.asyncio.rtp import MediaEngine
from fastsip.rtp.session import MediaSession

ports, seconds, path, loop_name = json.loads(sys.argv[1])

class PythonPath:
    # the reference: no state attached, so every session gets a tick each time and builds and
    # sends its own packets
    sent = errors = 0
    def __init__(self): self.owners = {}
    def attach(self, state, fd, owner=None): self.owners[id(state)] = owner
    def detach(self, state): self.owners.pop(id(state), None)
    def due(self, now): return list(self.owners.values())
    def flush(self, now): return 0

async def run():
    engine = MediaEngine("127.0.0.1", 0)
    if path == "python":
        engine._sender = PythonPath()
    t = np.arange(8000) / 8000
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    sessions = []
    for port in ports:
        stream = engine.open()
        session = MediaSession(remote=("127.0.0.1", port), source=pcm, loop=True)
        stream.start(session)
        sessions.append(session)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    await asyncio.sleep(seconds)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out = {"user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
           "wakeups": engine.wakeups, "batched": engine._sender.sent,
           "errors": engine.send_errors,
           "sessions": [[port, s._ts0, s.epoch, s.samples_per_frame, s.ptime, s.tx.packets]
                        for port, s in zip(ports, sessions)]}
    engine.close()
    return out

if loop_name == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
else:
    loop = asyncio.new_event_loop()
print(json.dumps(loop.run_until_complete(run())))
"""


class Pacing:
    """One run of ``--pacing``: the engine process's CPU and the arrivals' lateness."""

    def __init__(self, path: str, streams: int, seconds: float, user: float, system: float,
                 sent: int, received: int, batched: int, wakeups: int,
                 lateness: list[float]) -> None:
        self.path, self.streams, self.seconds = path, streams, seconds
        self.user, self.system = user, system
        self.sent, self.received, self.batched, self.wakeups = sent, received, batched, wakeups
        self.lateness = sorted(lateness)

    def percentile(self, q: float) -> float:
        if not self.lateness:
            return float("nan")
        return self.lateness[min(len(self.lateness) - 1, int(q / 100 * len(self.lateness)))]

    def line(self) -> str:
        per = self.streams * self.seconds
        return (f"  {self.path:8} {self.user / per * 1e6:9.1f} {self.system / per * 1e6:9.1f} "
                f"{(self.user + self.system) / per * 1e6:9.1f}   "
                f"{self.percentile(50) * 1e3:6.2f} {self.percentile(99) * 1e3:6.2f} "
                f"{self.percentile(99.9) * 1e3:6.2f} {self.lateness[-1] * 1e3:6.2f}  "
                f"{self.sent:8} {self.received:8} {self.batched:8} {self.wakeups:6}")


def pacing(path: str, streams: int, seconds: float, loop_name: str = "asyncio") -> Pacing:
    """``streams`` sessions in a child process sending to sockets of this one, timed here."""
    import json
    import select
    import threading

    so_timestampns = 35
    socks = []
    try:
        for _ in range(streams):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.bind((HOST, 0))
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, so_timestampns, 1)
        arrivals: dict[int, list[tuple[float, int]]] = {s.fileno(): [] for s in socks}
        done = threading.Event()
        ancillary = socket.CMSG_SPACE(16)

        def receive() -> None:
            poller = select.epoll()
            for sock in socks:
                poller.register(sock.fileno(), select.EPOLLIN)
            by_fd = {sock.fileno(): sock for sock in socks}
            while not done.is_set():
                for fd, _ in poller.poll(0.05):
                    sock, got = by_fd[fd], arrivals[fd]
                    while True:
                        try:
                            data, anc, _f, _a = sock.recvmsg(2048, ancillary)
                        except BlockingIOError:
                            break
                        if len(data) < 12 or data[1] >= 200:
                            continue
                        for level, kind, stamp in anc:
                            if level == socket.SOL_SOCKET and kind == so_timestampns:
                                sec, nsec = struct.unpack_from("@ll", stamp)
                                got.append((sec + nsec * 1e-9,
                                            struct.unpack_from("!I", data, 4)[0]))
            poller.close()

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        ports = [s.getsockname()[1] for s in socks]
        realtime_offset = time.time() - time.monotonic()
        child = subprocess.run(
            [sys.executable, "-c", _PACING_CHILD, json.dumps([ports, seconds, path, loop_name])],
            env=fastsip_env(), capture_output=True, text=True, timeout=seconds + 120,
            check=False)
        time.sleep(0.2)
        done.set()
        reader.join()
        if child.returncode:
            raise AssertionError(f"pacing child failed:\n{child.stderr}")
        result = json.loads(child.stdout)
        lateness = []
        received = 0
        for sock, (port, ts0, epoch, spf, ptime, _sent) in zip(socks, result["sessions"]):
            assert sock.getsockname()[1] == port
            for stamp, ts in arrivals[sock.fileno()]:
                received += 1
                k = ((ts - ts0) & 0xFFFFFFFF) // spf
                lateness.append(stamp - realtime_offset - (epoch + k * ptime))
        return Pacing(path, streams, seconds, result["user"], result["sys"],
                      sum(s[5] for s in result["sessions"]), received, result["batched"],
                      result["wakeups"], lateness)
    finally:
        for sock in socks:
            sock.close()


def pacing_report(runs: list[Pacing]) -> str:
    first = runs[0]
    title = (f"media clock: {first.streams} streams x 20 ms PCMU on one engine, "
             f"{first.seconds:g} s per run (CPU in us per stream-second; arrival - due, ms):")
    header = (f"  {'path':8} {'user':>9} {'sys':>9} {'total':>9}   {'p50':>6} {'p99':>6} "
              f"{'p99.9':>6} {'max':>6}  {'sent':>8} {'received':>8} {'from C':>8} {'wakes':>6}")
    lines = [title, header]
    lines += [r.line() for r in runs]
    for path in ("python", "compiled"):
        mine = [r for r in runs if r.path == path]
        if mine:
            totals = [(r.user + r.system) / (r.streams * r.seconds) * 1e6 for r in mine]
            lines.append(f"  {path}: best {min(totals):.1f} us CPU per stream-second "
                         f"(spread {max(totals) / min(totals):.2f}x); worst p99 "
                         f"{max(r.percentile(99) for r in mine) * 1e3:.2f} ms")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="CPU per call-second of media: fastsip call/answer "
                                             "vs sipp play_pcap_audio/-rtp_echo")
    ap.add_argument("--calls", type=int, default=CALLS)
    ap.add_argument("--seconds", type=float, default=SECONDS)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--pacing", type=int, default=0, metavar="N",
                    help="measure the media clock of N streams in one process instead")
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    a = ap.parse_args(argv)
    if a.pacing:
        runs = []
        for _ in range(a.rounds):
            for path in ("python", "compiled"):
                runs.append(pacing(path, a.pacing, a.seconds, a.loop))
                print(runs[-1].line(), flush=True)
        print(pacing_report(runs))
        return 0
    if SIPP is None:
        print("sipp is not installed", file=sys.stderr)
        return 2
    ratios = []
    for _ in range(a.rounds):
        sides = compare(a.calls, a.seconds)
        print(report(sides, a.calls, a.seconds), flush=True)
        ratios.append(ratio_of(sides))
    if len(ratios) > 1:
        print(f"ratios: {', '.join(f'{r:.2f}' for r in ratios)}  "
              f"(spread {max(ratios) / min(ratios):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
