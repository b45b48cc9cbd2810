"""fastsip's stateful proxy and registrar on a plain ``selectors`` loop: no asyncio at all.

    python examples/selectors_proxy.py --listen 127.0.0.1:5060 --domain example.com

The protocol layers are sans-IO: they take bytes, a source address and the time, and send
through a small Transport object.  So they run in any event loop -- yours.  This script is the
whole shell, over ONE non-blocking UDP socket:

- a Transport (``send``, ``sent_by``, ``local_for``) over ``sock.sendto``;
- the clock: fastsip's timer wheel, advanced with the time read once per wakeup, and the loop
  sleeping until its next wakeup (``wheel.next_wakeup()``);
- the datagram intake, :func:`fastsip.transport.intake.receive_datagram` -- the same function
  fastsip's asyncio shell calls: CRLF keep-alives ignored, STUN answered, parse within
  Limits, 400/505/513 to a malformed request, received/rport stamped, responses whose top
  Via is not ours dropped -- handing messages to the transaction layer;
- the layers ``fastsip serve`` assembles: TransactionLayer -> Proxy (RFC 3261 §16) -> Router
  with the default routing (REGISTER to the Registrar over an in-memory location store; a
  request for a registered user forked to its contacts; 404 otherwise);
- SIGINT/SIGTERM set a flag, and a self-pipe (``signal.set_wakeup_fd``) wakes the select; the
  loop then stops (transactions in flight are abandoned) and prints a one-line summary.

It is an example, kept small: UDP only, IP literals only (resolving a host name would block this
loop: sends to one fail, so the proxy answers 503 for that branch), no authentication, no rate
limits.  ``fastsip serve`` is the full server; this shows how little a host program needs to
embed the core.  Compare with ``fastsip serve --listen udp:127.0.0.1:5060 --domain example.com``.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import selectors
import signal
import socket
import sys
import time
from functools import lru_cache
from types import FrameType

from fastsip import TimerWheel
from fastsip.app import Router
from fastsip.proxy import MemoryLocationStore, Proxy, Registrar
from fastsip.sip import Limits
from fastsip.transaction import TransactionLayer
from fastsip.transport import Address
from fastsip.transport.intake import receive_datagram
from fastsip.transport.rules import parse_hostport, parse_listen

log = logging.getLogger("selectors_proxy")

#: Datagrams read per wakeup: amortizes the wakeup under load, and bounded so that timers
#: and signals are not starved by a flood.
BATCH = 256
#: How often expired bindings leave the in-memory store (lookups ignore them before that).
PURGE_INTERVAL = 60.0
WILDCARDS = ("0.0.0.0", "::")


@lru_cache(maxsize=4096)
def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


class UdpTransport:
    """:class:`fastsip.transport.Transport` over one non-blocking UDP socket.

    ``send`` never blocks and never raises: a datagram the socket cannot take now is dropped
    (as UDP may; the transaction layer retransmits), and a destination we cannot send to
    (a host name, another transport, another address family, too big) is queued in
    ``failed`` for the loop to report to the transaction layer after the current callback
    -- never from inside ``send`` (the Transport contract)."""

    def __init__(self, sock: socket.socket, sent_by: tuple[str, int]) -> None:
        self.sock = sock
        bound = sock.getsockname()
        self.address = Address("UDP", bound[0], bound[1])
        self._sent_by = sent_by
        #: Our sent-bys, for the §18.1.2 check of responses' top Via.
        self.local = [sent_by, (self.address.host, self.address.port)]
        self.failed: list[Address] = []
        self.sent = self.dropped = 0

    def send(self, data: bytes, dest: Address) -> None:
        if dest.transport != "UDP" or not is_ip_literal(dest.host):
            self.failed.append(dest)
            return
        try:
            self.sock.sendto(data, (dest.host, dest.port))
        except (BlockingIOError, InterruptedError):
            self.dropped += 1
        except OSError as exc:
            if exc.errno == getattr(socket, "ENOBUFS", None):
                self.dropped += 1
                return
            log.debug("send to %s failed: %s", dest, exc)
            self.failed.append(dest)
        else:
            self.sent += 1

    def sent_by(self, transport: str) -> tuple[str, int]:
        """Our Via (and Record-Route) host and port: the only socket's, for any transport."""
        return self._sent_by

    def local_for(self, dest: Address) -> Address:
        """Our end of a message to or from ``dest``: always the one socket (id 0)."""
        return Address("UDP", *self._sent_by)


class SelectorsProxy:
    """The proxy core assembled over :class:`UdpTransport`, driven by :meth:`run`."""

    def __init__(self, sock: socket.socket, sent_by: tuple[str, int],
                 domains: list[str]) -> None:
        self.sock = sock
        self.transport = UdpTransport(sock, sent_by)
        self.limits = Limits()
        # The wheel *is* the transaction layer's clock (call_later + time); its time moves
        # only when the loop advances it, so every timer is exact and the time is read once
        # per wakeup.
        self.wheel = TimerWheel(0.001, start=time.monotonic())
        self.store = MemoryLocationStore()
        registrar = Registrar(self.store, domains=domains)
        # No routes module and no async hooks: nothing needs spawning on a loop.
        self.router = Router(registrar=registrar)
        self.proxy = Proxy(self.router, aliases=domains)
        self.layer = TransactionLayer(self.transport, self.wheel, self.proxy)
        self.proxy.attach(self.layer)
        self.stop_signal: int | None = None
        self.datagrams = self.delivered = self.send_failures = 0
        # One receive buffer, big enough for any datagram (a longer one is truncated, and
        # then fails to parse).
        self._buffer = bytearray(65536)
        self._view = memoryview(self._buffer)
        self.wheel.call_later(PURGE_INTERVAL, self._purge)

    def _purge(self) -> None:
        removed = self.store.purge_now(time.time())
        if removed:
            log.info("purged %d expired binding(s)", removed)
        self.wheel.call_later(PURGE_INTERVAL, self._purge)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def run(self) -> None:
        """Serve until SIGINT or SIGTERM."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        selector = selectors.DefaultSelector()
        previous = signal.set_wakeup_fd(wake_w.fileno())
        handlers = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            selector.register(self.sock, selectors.EVENT_READ, self._read)
            selector.register(wake_r, selectors.EVENT_READ, lambda: wake_r.recv(512))
            self._loop(selector)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            signal.set_wakeup_fd(previous)
            selector.close()
            wake_r.close()
            wake_w.close()

    def _loop(self, selector: selectors.BaseSelector) -> None:
        wheel = self.wheel
        transport = self.transport
        while self.stop_signal is None:
            wake = wheel.next_wakeup()
            if transport.failed:
                timeout: float | None = 0.0
            elif wake is None:
                timeout = None                  # no timer pending: sleep until a datagram
            else:
                timeout = max(0.0, wake - time.monotonic())
            events = selector.select(timeout)
            wheel.advance(time.monotonic())     # fire what is due: retransmits, Timer C...
            for key, _ in events:
                key.data()
            self._report_failures()

    def _read(self) -> None:
        recvfrom_into = self.sock.recvfrom_into
        buffer, view = self._buffer, self._view
        layer_receive = self.layer.receive
        limits, transport, local = self.limits, self.transport, self.transport.local
        try:
            for _ in range(BATCH):
                try:
                    n, addr = recvfrom_into(buffer)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:          # an ICMP error queued on the socket
                    log.debug("receive error: %s", exc)
                    return
                self.datagrams += 1
                # Keep-alive, STUN, malformed, §18 checks, then layer.receive(msg, source):
                # the intake fastsip's asyncio shell runs too.
                if receive_datagram(bytes(view[:n]), addr[0], addr[1], 0, limits, transport,
                                    layer_receive, local):
                    self.delivered += 1
        except Exception:
            # A bug below us must not stop the loop; what is unread waits for the next turn.
            log.exception("error receiving a datagram")

    def _report_failures(self) -> None:
        # Outside any send(): the transaction layer may send again from here (a 503
        # upstream), and what fails then is reported on the next turn of the loop.
        failed, self.transport.failed = self.transport.failed, []
        for dest in failed:
            self.send_failures += 1
            self.layer.transport_error(dest)

    def summary(self) -> str:
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "-"
        return (f"stopped on {name}: datagrams={self.datagrams} delivered={self.delivered} "
                f"sent={self.transport.sent} dropped={self.transport.dropped} "
                f"send_failures={self.send_failures} timers_fired={self.wheel.fired} "
                f"transactions_left={len(self.layer)} aors={len(self.store)} "
                f"asyncio imported: {'asyncio' in sys.modules}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="fastsip's stateful proxy and registrar on a selectors loop (no asyncio)")
    parser.add_argument("--listen", default="127.0.0.1:5060", metavar="HOST:PORT",
                        help="UDP address to listen on (default 127.0.0.1:5060; port 0: any)")
    parser.add_argument("--domain", action="append", default=[], metavar="NAME",
                        help="a domain we are registrar and proxy for (repeatable; default: "
                             "the addresses we listen on)")
    parser.add_argument("--advertise", metavar="HOST[:PORT]",
                        help="address for our Via and Record-Route (needed on 0.0.0.0 / ::)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _, host, port = parse_listen(f"udp:{args.listen}")
        ip = ipaddress.ip_address(host)
    except ValueError as exc:
        parser.error(f"--listen {exc}")
    if str(ip) in WILDCARDS and not args.advertise:
        parser.error(f"--listen {args.listen}: a wildcard address needs --advertise (the "
                     "address peers reach us at, for our Via and Record-Route)")
    sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                         socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ip.version == 6 else f"{host}:{port}"
        print(f"selectors_proxy: cannot listen on udp:{where}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    sock.setblocking(False)
    bound = sock.getsockname()
    sent_by = (str(bound[0]), int(bound[1]))
    if args.advertise:
        try:
            sent_by = parse_hostport(args.advertise, sent_by[1])
        except ValueError as exc:
            sock.close()
            parser.error(f"--advertise {exc}")
    server = SelectorsProxy(sock, sent_by, args.domain)
    shown = f"[{bound[0]}]" if ip.version == 6 else bound[0]
    print(f"listening on udp:{shown}:{bound[1]}", flush=True)
    try:
        server.run()
    finally:
        sock.close()
    print(server.summary(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
