"""CPU per relayed RTP packet: fastsip's compiled relay path against a naive Python loop.

The relay runs in a child process that does nothing else (two leg sockets on 127.0.0.1 and an
epoll loop, as the shell would), so its ``getrusage`` is the relay's own cost, user and
system apart.  (Linux measures the total precisely but splits it between user and system by
sampling at the tick rate: the split of a short run is rough, the total is not.)  This process is the caller and the callee: it sends paced RTP to leg A and
reads what leg B sends on.  Both relays are measured in the same run, on the same traffic:

- ``fastsip``: :meth:`fastsip.rtp.Relay.drain` (recvmmsg/sendmmsg where available);
- ``python``:  ``data, addr = sock.recvfrom(2048); out.sendto(data, peer)`` until EAGAIN, the
  least a relay written in Python does per packet.

Two arrival patterns: ``burst 1`` (a datagram at a time, as one call's media arrives) and
``burst 32`` (datagrams queue up between wake-ups, as on a busy relay), where batching pays.
With ``strace`` installed, each case is run once more under ``strace -c`` to count the relay's
system calls per packet.  Tracing makes every system call slow, so that run is paced ten
times slower (else packets would pile up between wake-ups and the counts would describe
another arrival pattern), and its CPU figures are not used.

    python benchmarks/bench_relay_path.py [--packets 30000] [--rate 20000] [--no-strace]
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HEADER = struct.Struct("!BBHII")
PAYLOAD = bytes(160)            # 20 ms of G.711: the common case
IDLE_END = 0.5                  # the child stops after this long without a datagram
# The relay's own system calls, as strace names them (select is pselect6 on some arches).
RELAY_SYSCALLS = "recvmmsg,sendmmsg,recvfrom,sendto,recvmsg,sendmsg,epoll_wait,epoll_pwait"


# -- child: the relay under test ------------------------------------------------------------

def serve(mode: str, callee_port: int) -> None:
    """Relay leg A -> leg B -> callee until idle; print the figures as JSON."""
    leg_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    leg_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (leg_a, leg_b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
    peer = ("127.0.0.1", callee_port)
    sel = selectors.DefaultSelector()
    sel.register(leg_a, selectors.EVENT_READ)
    relayed = wakeups = 0

    if mode == "fastsip":
        from fastsip.rtp import Relay

        relay = Relay()
        relay.add_leg(1, leg_a.fileno())
        relay.add_leg(2, leg_b.fileno())
        relay.bridge(1, 2)
        relay.set_peer(2, *peer)
        drain = relay.drain
    else:
        recvfrom, sendto = leg_a.recvfrom, leg_b.sendto

    print(json.dumps({"port": leg_a.getsockname()[1]}), flush=True)
    select = sel.select
    started = False
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    while select(IDLE_END if started else 10.0):
        if not started:
            started = True
            before = resource.getrusage(resource.RUSAGE_SELF)
            t0 = time.perf_counter()
        wakeups += 1
        if mode == "fastsip":
            relayed += drain(1, time.time())
        else:
            while True:
                try:
                    data, _source = recvfrom(2048)
                except BlockingIOError:
                    break
                sendto(data, peer)
                relayed += 1
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "relayed": relayed,
        "wakeups": wakeups,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "wall": time.perf_counter() - t0 - IDLE_END,
    }), flush=True)


# -- parent: caller and callee --------------------------------------------------------------

def run_case(mode: str, packets: int, rate: float, burst: int,
             strace_out: Path | None = None) -> dict[str, Any]:
    callee = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    callee.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    callee.bind(("127.0.0.1", 0))
    callee.setblocking(False)
    caller = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    caller.bind(("127.0.0.1", 0))
    cmd = [sys.executable, __file__, "--serve", mode, "--callee-port",
           str(callee.getsockname()[1])]
    if strace_out is not None:
        cmd = ["strace", "-f", "-c", "-o", str(strace_out), "-e", f"trace={RELAY_SYSCALLS}",
               *cmd]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    received = 0
    try:
        assert child.stdout is not None
        leg_a = ("127.0.0.1", json.loads(child.stdout.readline())["port"])
        interval = burst / rate
        next_at = time.perf_counter()
        seq = 0
        while seq < packets:
            now = time.perf_counter()
            if now < next_at:
                time.sleep(next_at - now)
            next_at += interval
            for _ in range(min(burst, packets - seq)):
                caller.sendto(HEADER.pack(0x80, 0, seq & 0xFFFF, seq * 160, 0x1234) + PAYLOAD,
                              leg_a)
                seq += 1
            while True:
                try:
                    callee.recv(2048)
                    received += 1
                except BlockingIOError:
                    break
        deadline = time.monotonic() + 3 * IDLE_END
        while time.monotonic() < deadline:
            try:
                callee.recv(2048)
                received += 1
            except BlockingIOError:
                time.sleep(0.01)
        result: dict[str, Any] = json.loads(child.stdout.readline())
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        caller.close()
        callee.close()
    result["received"] = received
    return result


def strace_calls(path: Path) -> dict[str, int]:
    """Calls per syscall from an ``strace -c`` summary."""
    calls: dict[str, int] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(parts) >= 5 and parts[-1] in RELAY_SYSCALLS.split(","):
            calls[parts[-1]] = int(parts[3])
    return calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=30000, help="per case (default 30000)")
    ap.add_argument("--rate", type=float, default=20000.0, help="packets/s sent (default 20000)")
    ap.add_argument("--no-strace", action="store_true", help="skip the syscall counts")
    ap.add_argument("--serve", choices=("fastsip", "python"), help=argparse.SUPPRESS)
    ap.add_argument("--callee-port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.serve, args.callee_port)
        return 0

    use_strace = not args.no_strace and shutil.which("strace") is not None
    rows = []
    for burst in (1, 32):
        for mode in ("fastsip", "python"):
            r = run_case(mode, args.packets, args.rate, burst)
            n = max(r["relayed"], 1)
            row = {
                "case": f"{mode:8} burst {burst:2}",
                "relayed": r["relayed"],
                "received": r["received"],
                "user_us": r["user"] / n * 1e6,
                "sys_us": r["sys"] / n * 1e6,
                "per_wakeup": r["relayed"] / max(r["wakeups"], 1),
                "syscalls": None,
            }
            if use_strace:
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "strace.txt"
                    traced = run_case(mode, max(args.packets // 15, 100), args.rate / 10,
                                      burst, out)
                    calls = strace_calls(out)
                row["syscalls"] = sum(calls.values()) / max(traced["relayed"], 1)
                row["calls"] = calls
                row["traced_per_wakeup"] = traced["relayed"] / max(traced["wakeups"], 1)
            rows.append(row)

    print(f"\n{args.packets} RTP packets (172 bytes) per case at {args.rate:.0f}/s on loopback; "
          f"relay CPU per packet relayed (getrusage of the relay process)")
    print(f"{'case':18} {'relayed':>8} {'recv':>8} {'user us':>8} {'sys us':>8} {'total us':>9} "
          f"{'pkt/wake':>8} {'syscalls/pkt':>12}")
    for row in rows:
        sc = f"{row['syscalls']:.2f}" if row["syscalls"] is not None else "-"
        print(f"{row['case']:18} {row['relayed']:8d} {row['received']:8d} {row['user_us']:8.2f} "
              f"{row['sys_us']:8.2f} {row['user_us'] + row['sys_us']:9.2f} "
              f"{row['per_wakeup']:8.1f} {sc:>12}")
    for burst in (1, 32):
        fast, slow = (next(r for r in rows if r["case"] == f"{m:8} burst {burst:2}")
                      for m in ("fastsip", "python"))
        ratio = (slow["user_us"] + slow["sys_us"]) / max(fast["user_us"] + fast["sys_us"], 1e-9)
        print(f"burst {burst:2}: the naive loop costs {ratio:.2f}x fastsip's CPU per packet")
    if use_strace:
        for row in rows:
            print(f"  {row['case']}: {row['calls']} "
                  f"({row['traced_per_wakeup']:.1f} packets per wake-up under strace)")
    elif not args.no_strace:
        print("(strace not found: no syscall counts)")
    from fastsip.rtp._relay import batched

    print(f"fastsip.rtp._relay.batched (recvmmsg/sendmmsg): {batched}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
