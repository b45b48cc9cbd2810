"""The relay path of ``fastsip serve`` in one process, without sockets: the CPU of the sans-IO
layers per call, where ``bench_proxy.py`` measures the whole server (kernel and loop included).

One call is what ``bench_proxy.py``'s load makes of it (sipp ``uac_rr`` -> proxy -> a
registered ``uas_rr``): the proxy receives INVITE, 180, 200, ACK, BYE and 200, and sends
INVITE, 100, 180, 200, ACK, BYE and 200.  The stack is serve's: the intake's rules
(:func:`fastsip.transport.intake.receive_datagram`, with the edge guard's ``admit``), the
transaction layer on a timer wheel, the stateful :class:`~fastsip.proxy.core.Proxy`, and
``ServeRouter(Router(routes))`` running ``bench_proxy.ROUTES`` with the registrar and the memory
location store, logging at INFO through the queue (to /dev/null).  Sends are appended to a list.

The reference, measured in the same run through the same driver, is a naive floor: a
stateless pure-Python relay of the same messages (split the header lines, push a Via and a
Record-Route or pop them, a dict for the location service), the least any Python proxy does
per message.  fastsip does much more per call (transactions and their timers, validation,
loop detection, routing, a log line), so the guard's ratio is below 1; it catches a relay
path that got slower.  Each round's driver (building the UAS's answers from what the proxy
sent) costs a few microseconds per call, the same for both.

    PYTHONPATH=. python benchmarks/bench_relay.py [--calls 3000] [--rounds 5] [--cold]

prints microseconds per call (thread CPU) for both; under pytest it is a guard (``GUARDS``).
``--retained --calls 1000`` prints instead the bytes a call leaves allocated while its
transactions linger (tracemalloc); ``--untimed`` runs calls for an instruction count.

``--cold`` evicts the CPU caches before every message (it writes 16 MiB between them, outside
the timed part): the state a proxy's code and data are in when each datagram arrives alone,
after sipp and the kernel have run -- as under bench_proxy's 250 calls/s on two cores.  The
same path costs several times as much cold as warm (see issue 11's note), which is why
serve's CPU per call in bench_proxy is about three times this benchmark's warm figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bench_proxy import ROUTES
from naive_proxy import NaiveRelay

from fastsip import TimerWheel
from fastsip.app import Router, load_routes, logqueue
from fastsip.app.serve import ServeRouter
from fastsip.proxy import MemoryLocationStore, Registrar
from fastsip.proxy.core import Proxy
from fastsip.proxy.edge import SourceGuard, TrustedNetworks
from fastsip.sip import Limits
from fastsip.transaction import TransactionLayer
from fastsip.transport import Address
from fastsip.transport.intake import receive_datagram

GUARDS = [
    ("test_relay_fastsip", "test_relay_naive_floor", 0.1,
     "relay path per call vs a naive stateless Python relay"),
]

HOST = "127.0.0.1"
PROXY = (HOST, 5060)
UAC = (HOST, 5070)
UAS = (HOST, 5080)

INVITE = (
    "INVITE sip:service@example.com SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{n}-1\r\n"
    "From: sipp <sip:caller@example.com>;tag={n}SIPpTag00{n}\r\n"
    "To: <sip:service@example.com>\r\n"
    "Call-ID: {n}-4242@127.0.0.1\r\n"
    "CSeq: 1 INVITE\r\n"
    "Contact: <sip:caller@127.0.0.1:5070>\r\n"
    "Max-Forwards: 70\r\n"
    "Subject: Performance Test\r\n"
    "Content-Type: application/sdp\r\n"
    "Content-Length: 129\r\n\r\n"
    "v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\n"
    "t=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n"
)

IN_DIALOG = (
    "{method} sip:service@127.0.0.1:5080;transport=UDP SIP/2.0\r\n"
    "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-{n}-{cseq}{method}\r\n"
    "{route}"
    "From: sipp <sip:caller@example.com>;tag={n}SIPpTag00{n}\r\n"
    "To: <sip:service@example.com>;tag=uas{n}\r\n"
    "Call-ID: {n}-4242@127.0.0.1\r\n"
    "CSeq: {cseq} {method}\r\n"
    "Max-Forwards: 70\r\n"
    "Content-Length: 0\r\n\r\n"
)

REGISTER = (
    b"REGISTER sip:example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5080;branch=z9hG4bK-reg1\r\n"
    b"From: <sip:service@example.com>;tag=r1\r\n"
    b"To: <sip:service@example.com>\r\n"
    b"Call-ID: reg-1@127.0.0.1\r\n"
    b"CSeq: 1 REGISTER\r\n"
    b"Contact: <sip:service@127.0.0.1:5080>\r\n"
    b"Expires: 3600\r\n"
    b"Max-Forwards: 70\r\n"
    b"Content-Length: 0\r\n\r\n"
)

Receive = Callable[[bytes, tuple[str, int]], None]
Wire = list[tuple[bytes, int]]  # (datagram, destination port)


# -- the driver: sipp's two sides, answering what the relay sent ------------------------------


def _uas_answers(request: bytes, tag: str, *statuses: bytes) -> list[bytes]:
    """The UAS's responses: Vias, Record-Routes, From, Call-ID and CSeq copied (uas_rr), its
    tag added to To.  One pass over the request's header lines."""
    copied = []
    to = b""
    for line in request.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name = line[: line.find(b":")]
        if name in _COPIED:
            copied.append(line)
        elif name == b"To":
            to = line if b";tag=" in line else line + b";tag=" + tag.encode()
    tail = [to, b"Contact: <sip:service@127.0.0.1:5080;transport=UDP>", b"Content-Length: 0",
            b"", b""]
    return [b"\r\n".join([b"SIP/2.0 " + status, *copied, *tail]) for status in statuses]


_COPIED = {b"Via", b"Record-Route", b"From", b"Call-ID", b"CSeq"}


def one_call(n: int, receive: Receive, wire: Wire) -> None:
    """INVITE / 180 / 200 / ACK / BYE / 200 through the relay; checks what comes out."""
    receive(INVITE.format(n=n).encode(), UAC)
    forwarded = [d for d, port in wire if port == UAS[1]]
    assert len(forwarded) == 1, wire
    wire.clear()
    ringing, ok = _uas_answers(forwarded[0], f"uas{n}", b"180 Ringing", b"200 OK")
    receive(ringing, UAS)
    receive(ok, UAS)
    upstream = [d for d, port in wire if port == UAC[1]]
    assert upstream and upstream[-1].startswith(b"SIP/2.0 200"), wire
    # The caller's route set: the 200's Record-Route values, reversed (§12.1.2).
    record_route = [line[13:].strip().decode()
                    for line in upstream[-1].partition(b"\r\n\r\n")[0].split(b"\r\n")
                    if line.startswith(b"Record-Route:")]
    route = "".join(f"Route: {value}\r\n" for value in reversed(record_route))
    wire.clear()
    receive(IN_DIALOG.format(method="ACK", n=n, cseq=1, route=route).encode(), UAC)
    receive(IN_DIALOG.format(method="BYE", n=n, cseq=2, route=route).encode(), UAC)
    forwarded = [d for d, port in wire if port == UAS[1]]
    assert len(forwarded) == 2 and forwarded[1].startswith(b"BYE"), wire
    wire.clear()
    receive(_uas_answers(forwarded[1], f"uas{n}", b"200 OK")[0], UAS)
    assert len(wire) == 1 and wire[0][0].startswith(b"SIP/2.0 200"), wire
    wire.clear()


# -- fastsip serve's stack ----------------------------------------------------------------------


class _WireTransport:
    """The Transport the layers send through: a list, and one UDP listener as our end."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.local = Address("UDP", *PROXY, 1)

    def send(self, data: bytes, dest: Address) -> None:
        self.wire.append((data, dest.port))

    def sent_by(self, transport: str) -> tuple[str, int]:
        return PROXY

    def local_for(self, dest: Address) -> Address:
        return self.local


def fastsip_relay(routes_path: str) -> tuple[Receive, Wire, TimerWheel]:
    """serve's layers as ``fastsip serve --routes R --domain example.com --trusted 127.0.0.1``
    assembles them, fed datagrams by the intake as the asyncio shell does."""
    wheel = TimerWheel(0.001)
    trusted = TrustedNetworks([HOST])
    guard = SourceGuard(rate=100.0, burst=400.0, ban_time=600.0, source_failures=10,
                        user_failures=5, trusted=trusted)
    registrar = Registrar(MemoryLocationStore(), domains=["example.com"], flow_timer=30)
    router = Router(load_routes(routes_path), registrar=registrar, guard=guard,
                    monotonic=wheel.time)
    proxy = Proxy(ServeRouter(router, clock=wheel.time), aliases=["example.com"],
                  trusted=trusted)
    wire: Wire = []
    transport = _WireTransport(wire)
    layer = TransactionLayer(transport, wheel, proxy)
    proxy.attach(layer)
    local = [PROXY]
    limits = Limits()

    def receive(data: bytes, source: tuple[str, int]) -> None:
        if guard.admit(source[0], wheel.time()):
            receive_datagram(data, source[0], source[1], 1, limits, transport, layer.receive,
                             local)

    receive(REGISTER, UAS)
    assert wire and wire[-1][0].startswith(b"SIP/2.0 200"), wire
    wire.clear()
    return receive, wire, wheel


@contextlib.contextmanager
def serve_gc(restore: bool = True) -> Iterator[None]:
    """The collector as ``fastsip serve`` sets it once started (see serve.py: what start-up
    built is frozen out of every collection, and young collections run every 10,000
    allocations, not 700), so that this benchmark's figure is serve's; both relays run under
    it.  Restored on exit, so that other benchmarks in the same pytest process keep the
    defaults; ``restore=False`` for a process that ends next (an instruction count: unfrozen,
    start-up's objects would be scanned by the collection at exit, per call the more calls
    left transactions lingering)."""
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    try:
        yield
    finally:
        if restore:
            gc.set_threshold(*threshold)
            gc.unfreeze()


# -- the naive floor -----------------------------------------------------------------------------


def naive_relay() -> tuple[Receive, Wire]:
    """A stateless relay in plain Python (``naive_proxy.py``): the least per message (no
    transactions, no timers, no validation), for scale."""
    wire: Wire = []
    relay = NaiveRelay(PROXY, lambda data, dest: wire.append((data, dest[1])))
    relay.receive(REGISTER, UAS)
    wire.clear()
    return relay.receive, wire


# -- measuring ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routes_path() -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_routes.py"
        path.write_text(ROUTES)
        # serve's default: INFO, one line per initial request, through the queue's writer.
        with open(os.devnull, "w") as sink:
            logqueue.install(logging.INFO, sink)
            try:
                yield str(path)
            finally:
                logqueue.stop()


def test_relay_fastsip(benchmark: Any, routes_path: str) -> None:
    receive, wire, wheel = fastsip_relay(routes_path)
    calls = itertools.count()

    def call() -> None:
        n = next(calls)
        wheel.advance(n * 0.004)     # 250 calls/s of wheel time: timers are set and cancelled
        one_call(n, receive, wire)

    with serve_gc():
        benchmark(call)


def test_relay_naive_floor(benchmark: Any) -> None:
    receive, wire = naive_relay()
    calls = itertools.count()
    with serve_gc():
        benchmark(lambda: one_call(next(calls), receive, wire))


_EVICT = bytearray(16 << 20)


def _timed(receive: Receive, spent: list[float], cold: bool) -> Receive:
    """``receive`` with its thread CPU added to ``spent[0]``; ``cold``: caches evicted first."""
    clock = time.thread_time

    def timed(data: bytes, source: tuple[str, int]) -> None:
        if cold:
            _EVICT[::64] = bytes(len(_EVICT) // 64)   # one write per cache line
        started = clock()
        receive(data, source)
        spent[0] += clock() - started

    return timed


def measure(calls: int, rounds: int, cold: bool = False) -> dict[str, float]:
    """Best round's thread CPU per call (the relays' receive calls only, not the driver),
    each relay in fresh state per round; ``cold``: CPU caches evicted before every message."""
    best = {"fastsip": float("inf"), "naive": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_routes.py"
        path.write_text(ROUTES)
        for _ in range(rounds):
            for name in ("fastsip", "naive"):
                if name == "fastsip":
                    receive, wire, wheel = fastsip_relay(str(path))
                else:
                    receive, wire = naive_relay()
                    wheel = None
                spent = [0.0]
                timed = _timed(receive, spent, cold)
                with serve_gc():
                    for n in range(calls):
                        if wheel is not None:
                            wheel.advance(n * 0.004)
                        one_call(n, timed, wire)
                best[name] = min(best[name], spent[0] / calls * 1e6)
    return best


def retained(calls: int) -> float:
    """Bytes per call still allocated (tracemalloc) after ``calls`` calls through fastsip's
    stack: what a finished call leaves behind while its transactions linger (Timers D, J, K,
    L, M; the wheel moves 4 ms per call, so Timer K's 5 s frees BYE transactions from the
    1,250th call on, the 32 s ones never within 8,000).  Twenty calls first, so that caches
    and lazily built state are not counted."""
    import tracemalloc

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_routes.py"
        path.write_text(ROUTES)
        receive, wire, wheel = fastsip_relay(str(path))
        for n in range(20):
            wheel.advance(n * 0.004)
            one_call(n, receive, wire)
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(20, 20 + calls):
                wheel.advance(n * 0.004)
                one_call(n, receive, wire)
            gc.collect()
            return (tracemalloc.get_traced_memory()[0] - before) / calls
        finally:
            tracemalloc.stop()


def untimed(calls: int, cold: bool = False) -> None:
    """Twenty calls, then ``calls`` calls through fastsip's stack, nothing timed: for an
    instruction count, ``valgrind --tool=callgrind`` of ``--untimed --calls 151`` minus that
    of ``--calls 1``, divided by 150 (``PYTHONHASHSEED=0`` makes runs repeatable).

    ``cold``: the CPU caches are evicted before each message of those ``calls`` calls, for a
    count of cache misses that does not depend on the machine's noise (docs/performance.md,
    "Cold cost"): ``--cache-sim=yes --collect-atstart=no --toggle-collect=`` the intake's
    ``receive_datagram``, so that the evictions themselves are not counted."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench_routes.py"
        path.write_text(ROUTES)
        receive, wire, wheel = fastsip_relay(str(path))
        evicting = _timed(receive, [0.0], True) if cold else receive
        with serve_gc(restore=False):
            for n in range(20 + calls):
                wheel.advance(n * 0.004)
                one_call(n, evicting if n >= 20 else receive, wire)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cold", action="store_true",
                    help="evict the CPU caches before every message (as a lone datagram finds them)")
    ap.add_argument("--retained", action="store_true",
                    help="print the bytes a call leaves allocated while its transactions "
                         "linger (tracemalloc over --calls calls) instead of timing")
    ap.add_argument("--untimed", action="store_true",
                    help="run --calls calls (after 20) through fastsip's stack untimed, for "
                         "an instruction count under valgrind (with --cold: caches evicted "
                         "before each of their messages, for a cache-miss count)")
    args = ap.parse_args()
    with open(os.devnull, "w") as devnull:
        logqueue.install(logging.INFO, devnull)
        try:
            if args.untimed:
                untimed(args.calls, args.cold)
                sys.exit(0)
            if args.retained:
                print(f"retained per call after {args.calls} calls: "
                      f"{retained(args.calls):.0f} bytes")
                sys.exit(0)
            r = measure(args.calls, args.rounds, args.cold)
        finally:
            logqueue.stop()
    print(f"relay path, CPU per call{' (caches evicted before each message)' if args.cold else ''} "
          f"(best of {args.rounds} rounds of {args.calls} calls):\n"
          f"  fastsip serve's sans-IO stack  {r['fastsip']:8.1f} us\n"
          f"  naive stateless Python relay   {r['naive']:8.1f} us\n"
          f"  ratio naive/fastsip {r['naive'] / r['fastsip']:.3f} (the relays' receive calls "
          f"only; the guard, floor {GUARDS[0][2]}, times whole calls, driver included)")
