"""RTP load generator for ``bench_media.py``: G.711 streams through a media relay, counted.

Run by ``bench_media.py`` as a separate process, so its CPU is never mixed with the relay's or
the controller's.  It inherits the already bound UDP sockets (``pass_fds``: their ports are
in the SDP the relay was given) and reads a JSON plan from the file its argument names::

    {"relay_pid": 1234, "warmup": 2.0, "steady": 10.0, "extra": 0.0, "drain": 0.3,
     "ptime": 0.02, "slots": 20,
     "streams": [[fd, dest_host, dest_port, ssrc, peer_fd], ...]}

Every ``ptime`` each stream sends one RTP packet (12-byte header, 160 bytes of PCMU payload,
sequence and timestamp advancing) from its socket to ``dest``: the relay port its peer's
rewritten SDP names.  The streams are spread over ``slots`` send instants per ``ptime`` (as
independent calls would be, not one burst per 20 ms).  The first payload byte carries the
phase the packet was sent in (0 warm-up, 1 steady, 3 extra), so a packet is counted in the
window it was *sent* in whenever it arrives; only the stream of ``peer_fd`` (the other end
of the call) may arrive on a socket: anything else counts as misrouted.

The relay's CPU (``/proc``: schedstat nanoseconds of all its threads, and utime/stime
ticks of /proc/PID/stat), this process's CPU and the machine's busy time are read when the
first steady packet is due and when the steady window ends, so the relay's CPU is taken
over exactly the window whose packets are counted.  When the steady window ends the line
``{"event": "steady_end"}`` goes to stdout (``bench_media --syscalls`` attaches strace in the
``extra`` phase that follows); the result is the last line, one JSON object.

Pace: a send instant handled more than ``LATE`` seconds after it was due counts as late; if
the generator falls more than ``GIVE_UP`` seconds behind it stops sending and says so
(``gave_up``).  Either means the generator, not the relay, set the limit.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from benchproc import cpu_seconds

PAYLOAD = 160                  # 20 ms of G.711 at 8 kHz
#: A send instant later than this (s) counts as late: the generator missed its pace.
LATE = 0.005
#: More than this far behind (s), the generator stops sending: it cannot keep the pace.
GIVE_UP = 1.0
PHASES = 4                     # 0 warm-up, 1 steady, 2 unused, 3 extra


def stat_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every thread of ``pid``, living or exited, so far:
    /proc/PID/stat utime and stime (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine have spent not idle so far (/proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def snapshot(relay_pid: int) -> dict[str, float]:
    user, system = stat_seconds(relay_pid)
    return {"wall": time.monotonic(), "relay_cpu": cpu_seconds(relay_pid),
            "relay_user": user, "relay_sys": system, "load_cpu": time.process_time(),
            "machine_busy": machine_busy_seconds()}


def run(plan: dict[str, Any]) -> dict[str, Any]:
    """Send and count as ``plan`` says; returns the counts and the window's readings."""
    relay_pid = int(plan["relay_pid"])
    ptime = float(plan.get("ptime", 0.02))
    slots = max(1, int(plan.get("slots", 20)))
    slot_len = ptime / slots
    streams = plan["streams"]
    fds = [int(s[0]) for s in streams]
    top = max(fds) + 1

    socks: dict[int, socket.socket] = {}
    recv: dict[int, Any] = {}
    want: list[bytes] = [b""] * top
    ep = select.epoll()
    # Per slot: (buffer, sendto, destination) of the streams sending at that instant.
    by_slot: list[list[tuple[bytearray, Any, tuple[str, int]]]] = [[] for _ in range(slots)]
    slot_of = [0] * top
    payload = bytes([0]) + b"\xff" * (PAYLOAD - 1)      # PCMU silence after the phase byte
    ssrc_of = {int(st[0]): int(st[3]) for st in streams}
    peer_of = {int(st[0]): int(st[4]) for st in streams}
    for i, (fd, host, port, ssrc, peer_fd) in enumerate(streams):
        s = socket.socket(fileno=int(fd))
        s.setblocking(False)
        socks[fd] = s
        recv[fd] = s.recv
        want[fd] = struct.pack("!I", ssrc_of[peer_fd])
        ep.register(fd, select.EPOLLIN)
        buf = bytearray(struct.pack("!BBHII", 0x80, 0, 0, 0, ssrc) + payload)
        slot = i % slots
        slot_of[fd] = slot
        by_slot[slot].append((buf, s.sendto, (str(host), int(port))))

    # sent[phase][slot]: packets each stream of that slot sent in that phase
    sent = [[0] * slots for _ in range(PHASES)]
    rx = [[0] * top for _ in range(PHASES)]
    misrouted = 0
    send_errors = 0
    late = 0
    ticks_done = 0
    max_lag = 0.0
    gave_up = False

    warmup = float(plan.get("warmup", 2.0))
    steady = float(plan.get("steady", 10.0))
    extra = float(plan.get("extra", 0.0))
    drain = float(plan.get("drain", 0.3))
    mono = time.monotonic
    t0 = mono() + 0.05
    steady_at = t0 + warmup
    extra_at = steady_at + steady
    stop_at = extra_at + extra
    begin: dict[str, float] | None = None
    end: dict[str, float] | None = None
    tick = 0
    due = t0
    poll = ep.poll

    def read(timeout: float) -> None:
        nonlocal misrouted
        for fd, _ in poll(timeout):
            try:
                data = recv[fd](2048)
            except BlockingIOError:
                continue
            except OSError:              # ICMP port unreachable reported on the socket
                continue
            if len(data) <= 12 or data[8:12] != want[fd]:
                misrouted += 1
                continue
            rx[data[12] & 3][fd] += 1

    while True:
        now = mono()
        # Every send instant that is due, the late ones too (counted), so each stream sends
        # exactly its packets whatever the scheduling hiccups.
        while due <= now:
            if due >= stop_at:
                break
            lag = now - due
            max_lag = max(max_lag, lag)
            if lag > LATE:
                late += 1
            if lag > GIVE_UP:
                gave_up = True
                break
            phase = 0 if due < steady_at else 1 if due < extra_at else 3
            if phase == 1 and begin is None:
                begin = snapshot(relay_pid)
            elif phase == 3 and end is None:
                end = snapshot(relay_pid)
                print(json.dumps({"event": "steady_end"}), flush=True)
            k = tick // slots
            slot = tick % slots
            head = struct.pack("!HI", (k + 1000) & 0xFFFF, (k * PAYLOAD) & 0xFFFFFFFF)
            for buf, sendto, dest in by_slot[slot]:
                buf[2:8] = head
                buf[12] = phase
                try:
                    sendto(buf, dest)
                except OSError:
                    send_errors += 1
            sent[phase][slot] += 1
            ticks_done += 1
            tick += 1
            due = t0 + tick * slot_len
        if gave_up or due >= stop_at:
            break
        read(max(0.0, due - mono()))
    if end is None:
        end = snapshot(relay_pid)
        if extra <= 0:
            print(json.dumps({"event": "steady_end"}), flush=True)
    if begin is None:
        begin = end
    finish = mono() + drain
    while (left := finish - mono()) > 0:
        read(left)

    # Per receiving socket: (packets its peer sent in the steady window, packets that came).
    per_stream = [[sent[1][slot_of[peer_of[fd]]], rx[1][fd]] for fd in fds]
    result = {
        "streams": len(streams),
        "window": {k: end[k] - begin[k] for k in begin},
        "sent": {str(p): sum(sent[p][slot_of[fd]] for fd in fds) for p in (0, 1, 3)},
        "received": {str(p): sum(rx[p][fd] for fd in fds) for p in (0, 1, 3)},
        "steady_per_stream": per_stream,
        "misrouted": misrouted, "send_errors": send_errors,
        "late_instants": late, "instants": ticks_done, "max_lag": max_lag,
        "gave_up": gave_up,
    }
    ep.close()
    for s in socks.values():
        s.detach()                       # the controller owns and closes them
    return result


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(run(plan)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
