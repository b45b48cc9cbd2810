"""RTP load generator for ``bench_media.py``: G.711 streams through a media relay, counted.

Run by ``bench_media.py`` as a separate process, so its CPU is never mixed with the relay's or
the controller's.  It inherits the already bound UDP sockets (``pass_fds``: their ports are
in the SDP the relay was given) and reads a JSON plan from the file its argument names::

    {"relay_pid": 1234, "warmup": 2.0, "steady": 10.0, "extra": 0.0, "drain": 0.3,
     "ptime": 0.02, "slots": 20, "ssrc_base": 65536,
     "streams": [[src_fd, relay_host, relay_port, dst_fd], ...]}

Stream ``i`` has SSRC ``ssrc_base + i``; every ``ptime`` it sends one RTP packet (12-byte
header, 160 bytes of PCMU payload, sequence and timestamp advancing) from ``src_fd`` to the
relay port its peer's rewritten SDP names, and must come back out of the relay on
``dst_fd`` (anything else counts as misrouted).  The streams are spread over ``slots`` send
instants per ``ptime``, as independent calls would be, not one burst per 20 ms.  The first
payload byte carries the phase the packet was sent in (0 warm-up, 1 steady, 3 extra), so a
packet counts in the window it was *sent* in whenever it arrives.

Cheap enough to leave the relay the CPU: sockets may carry many streams (the controller
decides), packets leave with ``sendmmsg`` (one call per socket per send instant; the
header's sequence and timestamp, shared by every stream of an instant, sit in one buffer
that all the messages' first iovec points at, so no Python runs per packet) and come in
with ``recvmmsg`` (batches of up to 256 per socket, epoll over the sockets), counted per
stream by SSRC.  Python's socket module has neither call, so they are reached through
ctypes (Linux, glibc).

The relay's CPU (``/proc``: schedstat nanoseconds of all its threads, and utime/stime ticks
of /proc/PID/stat), this process's CPU and the machine's busy time are read when the first
steady packet is due and when the steady window ends, so the relay's CPU is taken over
exactly the window whose packets are counted.  When the steady window ends the line
``{"event": "steady_end"}`` goes to stdout (``bench_media --syscalls`` attaches strace in
the ``extra`` phase that follows); the result is the last line, one JSON object.

Pace: a send instant handled more than ``LATE`` seconds after it was due counts as late; if
the generator falls more than ``GIVE_UP`` seconds behind it stops sending and says so
(``gave_up``).  Either means the generator, not the relay, set the limit.
"""

from __future__ import annotations

import ctypes
import errno
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
from benchproc import cpu_seconds, machine_busy_seconds

PAYLOAD = 160                  # 20 ms of G.711 at 8 kHz
PACKET = 12 + PAYLOAD
#: A send instant later than this (s) counts as late: the generator missed its pace.
LATE = 0.005
#: More than this far behind (s), the generator stops sending: it cannot keep the pace.
GIVE_UP = 1.0
PHASES = 4                     # 0 warm-up, 1 steady, 2 unused, 3 extra
#: recvmmsg batch and the room per datagram (larger ones are truncated: not ours).
RX_BATCH = 256
RX_ROOM = 256
MSG_DONTWAIT = 0x40


class IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class MsgHdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class MMsgHdr(ctypes.Structure):
    _fields_ = [("msg_hdr", MsgHdr), ("msg_len", ctypes.c_uint)]


_libc = ctypes.CDLL(None, use_errno=True)
_sendmmsg = _libc.sendmmsg
_sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
_sendmmsg.restype = ctypes.c_int
_recvmmsg = _libc.recvmmsg
_recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int,
                      ctypes.c_void_p]
_recvmmsg.restype = ctypes.c_int


def stat_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of every thread of ``pid``, living or exited, so far:
    /proc/PID/stat utime and stime (clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def snapshot(relay_pid: int) -> dict[str, float]:
    user, system = stat_seconds(relay_pid)
    return {"wall": time.monotonic(), "relay_cpu": cpu_seconds(relay_pid),
            "relay_user": user, "relay_sys": system, "load_cpu": time.process_time(),
            "machine_busy": machine_busy_seconds()}


def _sockaddr(host: str, port: int) -> bytes:
    """A struct sockaddr_in (family in host order, port and address in network order)."""
    return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + \
        socket.inet_aton(host) + bytes(8)


def _address(buf: bytearray) -> int:
    """Where a bytearray's bytes are (it must never be resized while in use)."""
    return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))


class Sender:
    """Every stream's packet, ready for sendmmsg: per (send instant, source socket) one
    mmsghdr array whose messages are [shared 8-byte header, the stream's SSRC, the shared
    payload]; only the two shared buffers change between instants."""

    def __init__(self, streams: list[list[Any]], slots: int, ssrc_base: int) -> None:
        # bytearrays (struct and item assignment work on them) under ctypes views (addresses)
        self.head = bytearray(struct.pack("!BBHI", 0x80, 0, 0, 0))
        self.payload = bytearray(b"\xff" * PAYLOAD)
        n = len(streams)
        self.ssrcs = ctypes.create_string_buffer(
            b"".join(struct.pack("!I", ssrc_base + i) for i in range(n)), 4 * n)
        self.names = ctypes.create_string_buffer(
            b"".join(_sockaddr(str(s[1]), int(s[2])) for s in streams), 16 * n)
        self.iovs = (IoVec * (3 * n))()
        head, payload = _address(self.head), _address(self.payload)
        ssrcs, names = ctypes.addressof(self.ssrcs), ctypes.addressof(self.names)
        for i in range(n):
            self.iovs[3 * i] = IoVec(head, 8)
            self.iovs[3 * i + 1] = IoVec(ssrcs + 4 * i, 4)
            self.iovs[3 * i + 2] = IoVec(payload, PAYLOAD)
        iovs = ctypes.addressof(self.iovs)
        groups: list[dict[int, list[int]]] = [{} for _ in range(slots)]
        for i, s in enumerate(streams):
            groups[i % slots].setdefault(int(s[0]), []).append(i)
        #: per slot: [(fd, mmsghdr array, count)]
        self.slots: list[list[tuple[int, Any, int]]] = []
        self.keep: list[Any] = []
        for group in groups:
            batch = []
            for fd, members in group.items():
                msgs = (MMsgHdr * len(members))()
                for j, i in enumerate(members):
                    h = msgs[j].msg_hdr
                    h.msg_name = names + 16 * i
                    h.msg_namelen = 16
                    h.msg_iov = iovs + 3 * i * ctypes.sizeof(IoVec)
                    h.msg_iovlen = 3
                batch.append((fd, msgs, len(members)))
            self.slots.append(batch)

    def send(self, slot: int, seq: int, timestamp: int, phase: int) -> int:
        """The slot's packets with this sequence number, timestamp and phase byte; returns
        how many could not be sent."""
        struct.pack_into("!HI", self.head, 2, seq & 0xFFFF, timestamp & 0xFFFFFFFF)
        self.payload[0] = phase
        failed = 0
        for fd, msgs, count in self.slots[slot]:
            done = 0
            size = ctypes.sizeof(MMsgHdr)
            base = ctypes.addressof(msgs)
            while done < count:
                sent = _sendmmsg(fd, base + done * size, count - done, 0)
                if sent <= 0:
                    if ctypes.get_errno() in (errno.EINTR, errno.EAGAIN):
                        continue
                    failed += count - done
                    break
                done += sent
        return failed


class Receiver:
    """recvmmsg batches into one buffer, counted per stream and phase by SSRC."""

    def __init__(self, streams: list[list[Any]], ssrc_base: int) -> None:
        self.base = ssrc_base
        self.n = len(streams)
        self.dst = [int(s[3]) for s in streams]
        self.counts = [0] * (self.n * PHASES)
        self.misrouted = 0
        self.buf = bytearray(RX_BATCH * RX_ROOM)
        self.iovs = (IoVec * RX_BATCH)()
        self.msgs = (MMsgHdr * RX_BATCH)()
        start = _address(self.buf)
        for i in range(RX_BATCH):
            self.iovs[i] = IoVec(start + i * RX_ROOM, RX_ROOM)
            self.msgs[i].msg_hdr.msg_iov = ctypes.addressof(self.iovs) + i * ctypes.sizeof(IoVec)
            self.msgs[i].msg_hdr.msg_iovlen = 1
        self.view = self.buf
        self.unpack = struct.Struct("!IB").unpack_from

    def drain(self, fd: int) -> None:
        """Everything queued on ``fd`` now."""
        msgs, view, unpack, counts = self.msgs, self.view, self.unpack, self.counts
        base, n, dst = self.base, self.n, self.dst
        while True:
            got = _recvmmsg(fd, ctypes.addressof(msgs), RX_BATCH, MSG_DONTWAIT, None)
            if got <= 0:
                return
            for i in range(got):
                ssrc, phase = unpack(view, i * RX_ROOM + 8)
                idx = ssrc - base
                if msgs[i].msg_len != PACKET or not 0 <= idx < n or dst[idx] != fd:
                    self.misrouted += 1
                    continue
                counts[idx * PHASES + (phase & 3)] += 1
            if got < RX_BATCH:
                return


def run(plan: dict[str, Any]) -> dict[str, Any]:
    """Send and count as ``plan`` says; returns the counts and the window's readings."""
    relay_pid = int(plan["relay_pid"])
    ptime = float(plan.get("ptime", 0.02))
    slots = max(1, int(plan.get("slots", 20)))
    slot_len = ptime / slots
    ssrc_base = int(plan.get("ssrc_base", 0x10000))
    streams = plan["streams"]
    fds = sorted({int(s[0]) for s in streams} | {int(s[3]) for s in streams})
    sender = Sender(streams, slots, ssrc_base)
    receiver = Receiver(streams, ssrc_base)
    ep = select.epoll()
    for fd in fds:
        ep.register(fd, select.EPOLLIN)

    # sent[phase][slot]: packets each stream of that slot sent in that phase
    sent = [[0] * slots for _ in range(PHASES)]
    send_errors = 0
    late = [0] * PHASES
    max_lag = 0.0
    gave_up = False

    warmup = float(plan.get("warmup", 2.0))
    steady = float(plan.get("steady", 10.0))
    extra = float(plan.get("extra", 0.0))
    drain = float(plan.get("drain", 0.3))
    mono = time.monotonic
    t0 = mono() + 0.05
    started = snapshot(relay_pid)
    steady_at = t0 + warmup
    extra_at = steady_at + steady
    stop_at = extra_at + extra
    begin: dict[str, float] | None = None
    end: dict[str, float] | None = None
    tick = 0
    due = t0
    poll = ep.poll
    take = receiver.drain

    while True:
        now = mono()
        # Every send instant that is due, the late ones too (counted), so each stream sends
        # exactly its packets whatever the scheduling hiccups.
        while due <= now:
            if due >= stop_at:
                break
            lag = now - due
            max_lag = max(max_lag, lag)
            phase = 0 if due < steady_at else 1 if due < extra_at else 3
            if lag > LATE:
                late[phase] += 1
            if lag > GIVE_UP:
                gave_up = True
                break
            if phase == 1 and begin is None:
                begin = snapshot(relay_pid)
            elif phase == 3 and end is None:
                end = snapshot(relay_pid)
                print(json.dumps({"event": "steady_end"}), flush=True)
            k, slot = divmod(tick, slots)
            send_errors += sender.send(slot, k + 1000, k * PAYLOAD, phase)
            sent[phase][slot] += 1
            tick += 1
            due = t0 + tick * slot_len
        if gave_up or due >= stop_at:
            break
        for fd, _ in poll(max(0.0, due - mono())):
            take(fd)
    if end is None:                      # no extra phase, or the generator gave up
        end = snapshot(relay_pid)
        print(json.dumps({"event": "steady_end"}), flush=True)
    # Gave up before the steady window: the figures are the whole run's (the caller sees
    # "window_is_run" and says so), better than none.
    window_is_run = begin is None
    if begin is None:
        begin = started
    finish = mono() + drain
    while (left := finish - mono()) > 0:
        for fd, _ in poll(left):
            take(fd)
    ep.close()

    counts = receiver.counts
    n = len(streams)
    slot_of = [i % slots for i in range(n)]
    return {
        "streams": n,
        "window": {k: end[k] - begin[k] for k in begin}, "window_is_run": window_is_run,
        "sent": {str(p): sum(sent[p][slot_of[i]] for i in range(n)) for p in (0, 1, 3)},
        "received": {str(p): sum(counts[i * PHASES + p] for i in range(n)) for p in (0, 1, 3)},
        # per stream: (packets sent in the steady window, packets of them that came out)
        "steady_per_stream": [[sent[1][slot_of[i]], counts[i * PHASES + 1]] for i in range(n)],
        "misrouted": receiver.misrouted, "send_errors": send_errors,
        # per phase: send instants handled late, and all of them
        "late_instants": {str(p): late[p] for p in (0, 1, 3)},
        "instants": {str(p): sum(sent[p]) for p in (0, 1, 3)}, "max_lag": max_lag,
        "gave_up": gave_up,
    }


def main() -> int:
    plan = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(run(plan)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
