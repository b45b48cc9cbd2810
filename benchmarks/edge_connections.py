"""Connection abuse against ``fastsip serve`` with its default options, measured: how many
TCP connections one address can hold, how fast the rest are refused, when slowloris and idle
connections are closed, and whether another address is served meanwhile.

    python benchmarks/edge_connections.py [--idle 5000] [--slowloris 300] [--sources 5]

1. ``--idle`` connections from 127.0.0.1 (the issue's attack: 5,000 idle connections): the
   per-source cap (64) holds, the rest are closed at once.
2. ``--slowloris`` connections spread over ``--sources`` addresses (127.0.0.10...), each
   sending a header line every 2 s and never finishing: all must be closed by the read
   timeout (10 s), although none is ever idle for long.
3. Meanwhile an OPTIONS over TCP from 127.0.0.2 gets 200 every second.
4. The idle connections that were accepted are closed after the idle timeout (120 s) when
   ``--wait-idle`` is given (it takes two minutes).

Loopback only; every loop is bounded; the report is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from procutil import fastsip_env, free_port


def options(port: int, host: str = "127.0.0.2") -> int | None:
    with socket.create_connection(("127.0.0.1", port), timeout=3,
                                  source_address=(host, 0)) as s:
        me = f"{host}:{s.getsockname()[1]}"
        s.sendall((f"OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/TCP {me};branch=z9hG4bK"
                   f"-c{time.monotonic_ns()}\r\nMax-Forwards: 70\r\nFrom: <sip:p@example.com>"
                   f";tag=p\r\nTo: <sip:example.com>\r\nCall-ID: c{time.monotonic_ns()}@x\r\n"
                   "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode())
        data = s.recv(65535)
    return int(data.split(b" ", 2)[1]) if data.startswith(b"SIP/2.0 ") else None


def closed(sock: socket.socket) -> bool:
    """Has the server closed ``sock`` (EOF or reset), without blocking?"""
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idle", type=int, default=5000)
    ap.add_argument("--slowloris", type=int, default=300)
    ap.add_argument("--sources", type=int, default=5)
    ap.add_argument("--wait-idle", action="store_true")
    args = ap.parse_args()
    port = free_port()
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as workdir:
        serve = subprocess.Popen(
            [sys.executable, "-m", "fastsip.cli", "serve", "--listen", f"tcp:127.0.0.1:{port}",
             "--domain", "example.com", "--log-level", "warning"],
            cwd=workdir, env=fastsip_env(), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True)
        idle: list[socket.socket] = []
        slow: list[socket.socket] = []
        try:
            assert serve.stdout is not None and serve.stdout.readline().startswith("listening")
            started = time.monotonic()
            for _ in range(args.idle):
                try:
                    idle.append(socket.create_connection(("127.0.0.1", port), timeout=3,
                                                         source_address=("127.0.0.1", 0)))
                except OSError:
                    break
            time.sleep(1.0)
            held = [s for s in idle if not closed(s)]
            report["idle_attempted"] = len(idle)
            report["idle_held"] = len(held)
            report["idle_refused"] = len(idle) - len(held)
            report["idle_seconds_to_open_all"] = round(time.monotonic() - started, 2)
            for s in idle:
                if s not in held:
                    s.close()
            idle = held
            for i in range(args.slowloris):
                src = f"127.0.0.{10 + i % args.sources}"
                s = socket.create_connection(("127.0.0.1", port), timeout=3,
                                             source_address=(src, 0))
                s.sendall(b"OPTIONS sip:example.com SIP/2.0\r\n")
                slow.append(s)
            opened = time.monotonic()
            open_slow = list(slow)
            closed_at: list[float] = []
            probes: list[int | None] = []
            while open_slow and time.monotonic() - opened < 30:
                time.sleep(1.0)
                probes.append(options(port))
                still = []
                for s in open_slow:
                    if closed(s):
                        closed_at.append(time.monotonic() - opened)
                        continue
                    try:
                        s.setblocking(True)
                        s.sendall(b"X-Slow: 1\r\n")    # a line every second: never idle
                    except OSError:
                        closed_at.append(time.monotonic() - opened)
                        continue
                    still.append(s)
                open_slow = still
            report["slowloris"] = len(slow)
            report["slowloris_closed"] = len(closed_at)
            report["slowloris_closed_after_s"] = [round(min(closed_at), 1),
                                                   round(max(closed_at), 1)] if closed_at else []
            report["probes_200"] = sum(p == 200 for p in probes)
            report["probes"] = len(probes)
            if args.wait_idle:
                deadline = time.monotonic() + 150
                while time.monotonic() < deadline and not all(closed(s) for s in idle):
                    time.sleep(2)
                report["idle_closed_after_s"] = round(time.monotonic() - started, 1)
        finally:
            for s in idle + slow:
                s.close()
            serve.terminate()
            serve.wait(10)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
