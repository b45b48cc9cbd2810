"""UDP intake of the asyncio shell: the lean receive path (own socket, ``loop.add_reader``, a
batch of datagrams per wakeup into one preallocated buffer) against the loop's own
datagram transport (``create_datagram_endpoint``), in one run, on asyncio and on uvloop.

asyncio's transport costs a wakeup and a fresh 256 KiB buffer (mmap, then mremap) per datagram;
uvloop's drains the socket in C into one buffer, but converts every address through Python
objects and calls a Python protocol method per datagram.  fastsip's lean path is compiled
(``fastsip.asyncio._udp.UdpSocket``: ``recvmmsg``, and ``sendmmsg`` for what a wakeup's
handlers sent, from C; ``recvfrom`` and ``sendto`` off Linux) and is the default on
both loops; the loop's transport stands in where the loop has no ``add_reader``.

Two loads, each from a sender process on 127.0.0.1 while this process is the server:

- ``banned``: a flood of one datagram from one source, with an ``admit`` hook that rejects
  everything (the path a banned source's packets take); how many datagrams per second the
  server drains, and its CPU per datagram.
- ``options``: distinct OPTIONS requests to an :class:`~fastsip.asyncio.Endpoint` whose TU
  answers 200; the sender keeps a window of requests outstanding (one new request per
  response), so the server runs flat out without dropping; OPTIONS answered per second and CPU
  per request.

The server's user and system CPU (``getrusage``) are reported apart.  Each server round runs in
a fresh process (a long-lived one would carry earlier rounds' retained transactions and
garbage); paths run in interleaved rounds and each one's best round counts (a shared machine
disturbs some rounds).  Read the ratios ``lean / legacy``, not the absolute figures.  Not a
guard: this file has no tests and no ``GUARDS``.

    PYTHONPATH=. python benchmarks/bench_udp_intake.py [--count 200000] [--requests 20000]
                                                       [--rounds 2] [--loop asyncio uvloop]

For ``strace -f -c`` (syscalls per datagram), run the server and the sender apart, so that only
the server is traced:

    strace -f -c -o trace.txt python benchmarks/bench_udp_intake.py serve --port 5099 \\
        --scenario options --loop asyncio --count 20000 &
    python benchmarks/bench_udp_intake.py send --port 5099 --scenario options --count 20000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from benchproc import fastsip_env, free_port

from fastsip import Request, Response
from fastsip.asyncio import Endpoint, TransportLayer
from fastsip.transaction import ServerTransaction
from fastsip.transport import Address

HOST = "127.0.0.1"
PATHS = ("legacy", "lean")


# -- the server --------------------------------------------------------------------------------

class Answerer:
    """A transaction user that answers every request with 200 and counts them."""

    def __init__(self, on_count: Callable[[], None]) -> None:
        self._on_count = on_count

    def on_request(self, txn: ServerTransaction, request: Request) -> None:
        txn.reply(200, to_tag="srv")
        self._on_count()

    def on_ack(self, request: Request, source: Address) -> None: ...
    def on_stray_response(self, response: Response, source: Address) -> None: ...
    def on_server_timeout(self, txn: ServerTransaction) -> None: ...


def _set_path(transport: TransportLayer, path: str) -> None:
    # A private switch (the loop's transport is what runs on uvloop, and where there is no
    # loop.add_reader); "default" leaves fastsip's choice for the loop.
    if path != "default":
        transport._lean_udp = path == "lean"


async def serve(scenario: str, path: str, port: int, count: int, ready: Callable[[], None],
                quiet: float = 0.5, limit: float = 60.0) -> dict[str, float]:
    """Serve until ``count`` datagrams were handled, or ``quiet`` seconds pass without one
    after the first; returns handled, wall seconds (first to last), user and system CPU."""
    loop = asyncio.get_running_loop()
    handled = 0
    first = last = 0.0

    def tick() -> None:
        nonlocal handled, first, last
        handled += 1
        last = loop.time()
        if handled == 1:
            first = last

    def deny(host: str, now: float) -> bool:
        tick()
        return False

    closer: Callable[[], Any]
    if scenario == "banned":
        transport = TransportLayer(admit=deny)
        _set_path(transport, path)
        await transport.listen(f"udp:{HOST}:{port}")
        closer = transport.close
    else:
        endpoint = Endpoint(Answerer(tick), [f"udp:{HOST}:{port}"])
        _set_path(endpoint.transport, path)
        await endpoint.start()
        closer = endpoint.close
    before = resource.getrusage(resource.RUSAGE_SELF)
    ready()
    deadline = loop.time() + limit
    while handled < count and loop.time() < deadline:
        await asyncio.sleep(0.05)
        if handled and loop.time() - last > quiet:
            break
    after = resource.getrusage(resource.RUSAGE_SELF)
    await closer()
    return {"handled": handled, "wall": last - first,
            "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime}


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_round(scenario: str, path: str, loop_name: str, count: int, window: int
              ) -> dict[str, float]:
    """One server run in a fresh process (earlier rounds' garbage and retained transactions
    must not slow later ones), with a sender process started once it listens."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "serve", "--scenario", scenario, "--path", path,
         "--loop", loop_name, "--port", str(port), "--count", str(count), "--json"],
        env=fastsip_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    sender = None
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("ready"), f"server did not start: {line!r}"
        sender = subprocess.Popen(
            [sys.executable, __file__, "send", "--scenario", scenario, "--port", str(port),
             "--count", str(count), "--window", str(window)],
            env=fastsip_env(), stdin=subprocess.DEVNULL)
        out, _ = server.communicate(timeout=120)
        return dict(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in (server, sender):
            if proc is not None and proc.poll() is None:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# -- the sender --------------------------------------------------------------------------------

def _options(port: int, local_port: int, n: int) -> bytes:
    return (f"OPTIONS sip:bench@{HOST}:{port} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP {HOST}:{local_port};branch=z9hG4bK-bench-{n};rport\r\n"
            "Max-Forwards: 70\r\n"
            f"From: <sip:sender@{HOST}>;tag=s{n}\r\n"
            f"To: <sip:bench@{HOST}>\r\n"
            f"Call-ID: bench-{n}@{HOST}\r\n"
            "CSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode()


def send(scenario: str, port: int, count: int, window: int, rate: float = 0.0) -> int:
    """Send ``count`` datagrams to ``port``; returns the responses seen.  ``banned``: one
    datagram, as fast as the socket takes it.  ``options``: distinct requests, ``window`` of
    them outstanding (a response, or a 50 ms lull, releases the next), or paced at ``rate``
    per second when ``rate`` is set (no window)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((HOST, 0))
    local_port = sock.getsockname()[1]
    dest = (HOST, port)
    sent = answered = 0
    if scenario == "banned":
        data = _options(port, local_port, 0)
        sendto = sock.sendto
        for _ in range(count):
            try:
                sendto(data, dest)
            except OSError:        # ENOBUFS under a flood: the datagram is lost, as UDP may
                pass
        return 0
    datagrams = [_options(port, local_port, n) for n in range(count)]
    if rate > 0:
        start = time.monotonic()
        for n, data in enumerate(datagrams):
            lag = start + n / rate - time.monotonic()
            if lag > 0:
                time.sleep(lag)
            sock.sendto(data, dest)
        return 0
    sock.settimeout(0.05)
    deadline = time.monotonic() + 120
    while sent < min(window, count):
        sock.sendto(datagrams[sent], dest)
        sent += 1
    while answered < count and time.monotonic() < deadline:
        try:
            sock.recv(65535)
            answered += 1
            release = 1
        except TimeoutError:
            release = window              # lost somewhere: top the window up again
        for _ in range(release):
            if sent < count:
                sock.sendto(datagrams[sent], dest)
                sent += 1
        if sent >= count and release == window:
            break                         # everything sent and a lull: the rest is lost
    sock.close()
    return answered


# -- report ------------------------------------------------------------------------------------

def compare(count: int, requests: int, rounds: int, loops: list[str], window: int
            ) -> list[str]:
    lines = []
    for scenario, n in (("banned", count), ("options", requests)):
        for loop_name in loops:
            best: dict[str, dict[str, float]] = {}
            for _ in range(rounds):
                for path in PATHS:
                    r = run_round(scenario, path, loop_name, n, window)
                    cpu = (r["user"] + r["sys"]) / max(r["handled"], 1)
                    r["cpu_per"] = cpu
                    r["rate"] = r["handled"] / r["wall"] if r["wall"] > 0 else 0.0
                    if path not in best or cpu < best[path]["cpu_per"]:
                        best[path] = r
            what = "datagrams drained" if scenario == "banned" else "OPTIONS answered"
            lines.append(f"{scenario} ({what}), {loop_name}, {n} sent, best of {rounds}:")
            for path in PATHS:
                r = best[path]
                lines.append(
                    f"  {path:6}  {r['rate']:9.0f}/s  {r['handled']:7.0f} handled  "
                    f"CPU {r['cpu_per'] * 1e6:6.2f} us each "
                    f"(user {r['user'] / max(r['handled'], 1) * 1e6:5.2f}, "
                    f"sys {r['sys'] / max(r['handled'], 1) * 1e6:5.2f})")
            lean, legacy = best["lean"], best["legacy"]
            lines.append(
                f"  lean/legacy: rate x{lean['rate'] / max(legacy['rate'], 1e-9):.2f}, "
                f"CPU per datagram x{lean['cpu_per'] / max(legacy['cpu_per'], 1e-12):.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    ap.add_argument("--count", type=int, default=200_000, help="banned-flood datagrams")
    ap.add_argument("--requests", type=int, default=20_000, help="OPTIONS requests")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--window", type=int, default=32, help="OPTIONS outstanding")
    ap.add_argument("--loop", nargs="+", default=["asyncio", "uvloop"])
    s = sub.add_parser("serve", help="only the server (for strace)")
    s.add_argument("--scenario", choices=("banned", "options"), default="options")
    s.add_argument("--path", choices=(*PATHS, "default"), default="default")
    s.add_argument("--loop", default="asyncio")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--count", type=int, default=20_000)
    s.add_argument("--quiet", type=float, default=0.5, help="stop this long after the last")
    s.add_argument("--json", action="store_true", help="the result as one JSON line")
    t = sub.add_parser("send", help="only the sender")
    t.add_argument("--scenario", choices=("banned", "options"), default="options")
    t.add_argument("--port", type=int, required=True)
    t.add_argument("--count", type=int, default=20_000)
    t.add_argument("--window", type=int, default=32)
    t.add_argument("--rate", type=float, default=0.0, help="pace OPTIONS (no window)")
    a = ap.parse_args(argv)
    if a.cmd == "send":
        send(a.scenario, a.port, a.count, a.window, a.rate)
        return 0
    if a.cmd == "serve":
        loop = _loop_factory(a.loop)()
        try:
            r = loop.run_until_complete(serve(
                a.scenario, a.path, a.port, a.count, lambda: print("ready", flush=True),
                quiet=a.quiet))
        finally:
            loop.close()
        if a.json:
            print(json.dumps(r), flush=True)
        else:
            print(f"handled {r['handled']:.0f} in {r['wall']:.2f} s; "
                  f"user {r['user']:.3f} s, sys {r['sys']:.3f} s", flush=True)
        return 0
    print("\n".join(compare(a.count, a.requests, a.rounds, a.loop, a.window)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
