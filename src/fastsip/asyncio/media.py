"""The media relay's shell: RTP/RTCP sockets on the loop, the compiled packet path, the ng
control socket.

:class:`SocketMediaPlane` is the :class:`~fastsip.relay.calls.MediaPlane` the ng core drives:
it binds RTP/RTCP port pairs on the relay's interfaces and hands their descriptors to the
compiled :class:`~fastsip.rtp._relay.Relay`.  On Linux the loop watches the Relay's one
descriptor (its io_uring, or an epoll set of every leg where io_uring is unavailable) and
calls :meth:`Relay.poll <fastsip.rtp._relay.Relay.poll>` once per wake-up; elsewhere it
watches each socket and calls ``drain`` for it.  Datagrams go socket to socket in C (one
``io_uring_enter`` per wake-up, or ``recvmmsg``/``sendmmsg``); Python runs once per wake-up,
never per packet.  :class:`NgServer` answers the ng control protocol on UDP.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastsip.errors import FastSIPError
from fastsip.relay.calls import LegPair, MediaPlaneFull
from fastsip.rtp._relay import LATCH_FIRST, LATCH_OFF, LATCH_STRICT, Relay

__all__ = ["MediaInterface", "NgServer", "SocketMediaPlane", "parse_interface"]

log = logging.getLogger("fastsip.asyncio.media")

#: The ng core's latching modes as the packet path's.
_LATCHING = {"first": LATCH_FIRST, "strict": LATCH_STRICT, "off": LATCH_OFF}


@dataclass(frozen=True)
class MediaInterface:
    """One ``--interface``: ``[NAME/]ADDRESS[!ADVERTISED]`` (rtpengine's syntax).  Media
    sockets bind ``address``; the SDP names ``advertised`` (a relay behind 1:1 NAT binds
    its private address and advertises the public one)."""

    name: str
    address: str
    advertised: str

    @property
    def family(self) -> str:
        return "IP6" if ":" in self.address else "IP4"

    @property
    def socket_family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self.address else socket.AF_INET


def parse_interface(spec: str) -> MediaInterface:
    """``[NAME/]ADDRESS[!ADVERTISED]`` → :class:`MediaInterface`; ValueError says what is
    wrong.  Without a name the interface is called ``default``."""
    name, sep, rest = spec.partition("/")
    if not sep:
        name, rest = "default", spec
    address, _, advertised = rest.partition("!")
    address = address.strip("[]")
    advertised = (advertised or address).strip("[]")
    for value in (address, advertised):
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"--interface {spec!r}: {value!r} is not an IP address") from None
    if not name or any(c in name for c in " !/"):
        raise ValueError(f"--interface {spec!r}: bad interface name {name!r}")
    if (":" in address) != (":" in advertised):
        raise ValueError(f"--interface {spec!r}: the advertised address must be of the bound "
                         "address's family")
    return MediaInterface(name, address, advertised)


# What SocketMediaPlane._pollset holds besides the one descriptor the loop watches for the
# whole relay: each socket watched on its own (drain per fd), or nothing to watch (the packet
# loop runs in the Relay's own thread).
_PER_SOCKET = -1
_OWN_THREAD = -2


class SocketMediaPlane:
    """RTP/RTCP port pairs on real sockets, relayed by the compiled :class:`Relay`.

    Ports come from ``[port_min, port_max]``: the RTP port even, RTCP on the next one
    (RFC 3550 §11).  A freed pair goes to the back of the queue, so a late packet of an ended
    call does not land in the next call that would get the same ports at once.
    """

    def __init__(self, interfaces: list[MediaInterface], port_min: int = 30000,
                 port_max: int = 40000, *, loop: asyncio.AbstractEventLoop | None = None,
                 relay: Relay | None = None, threaded: bool = False) -> None:
        if not interfaces:
            raise ValueError("the media plane needs at least one interface")
        if port_min < 1 or port_max > 65535 or port_max - port_min < 1:
            raise ValueError(f"bad port range {port_min}-{port_max}")
        self.interfaces = interfaces
        self.loop = loop or asyncio.get_running_loop()
        # threaded: the packet loop in a thread of its own where io_uring allows it, no
        # asyncio wake-up per packet batch (FASTSIP_RELAY_THREAD=0 keeps it on this loop).
        # It takes the GIL per batch: for a process whose loop is otherwise idle (fastsip
        # media), not one whose loop keeps the GIL busy (it would wait for it).
        self.relay = relay if relay is not None else Relay(threaded=threaded)
        first = port_min + (port_min & 1)
        self._free: dict[str, deque[int]] = {
            i.name: deque(range(first, port_max, 2)) for i in interfaces}
        self._sockets: dict[int, socket.socket] = {}
        self._port: dict[int, tuple[str, int]] = {}    # leg -> (interface name, port)
        self._next_leg = 1
        # Linux: the Relay's io_uring (or its own epoll set) holds every leg; the loop watches
        # that one descriptor and one poll() relays whatever is ready.  Elsewhere each socket
        # is watched (drain per fd).
        self._threaded = self.relay.threaded
        if self._threaded:
            self.relay.start()
        self._pollset = _OWN_THREAD if self._threaded else self.relay.fileno()
        if self._pollset >= 0:
            poll = self.relay.poll
            self.loop.add_reader(self._pollset, lambda: poll(time.time()))

    def interface(self, name: str | None, family: str | None = None) -> MediaInterface:
        """The interface called ``name`` (a name chooses the family too: rtpengine's
        ``direction`` is how a proxy bridges IPv4 and IPv6); without one, or for a name we do
        not have (such as rtpengine's legacy "internal"/"external"), the first of ``family``
        (None: any), as rtpengine falls back to its default interface."""
        for i in self.interfaces:
            if i.name == name:
                return i
        for i in self.interfaces:
            if family is None or i.family == family:
                return i
        raise MediaPlaneFull(f"no {family} media interface")

    # -- MediaPlane ---------------------------------------------------------------------

    def open_pair(self, interface: str | None, family: str | None = None) -> LegPair:
        iface = self.interface(interface, family)
        free = self._free[iface.name]
        for _ in range(len(free)):
            port = free.popleft()
            try:
                rtp = self._bind(iface, port)
            except OSError as exc:
                free.append(port)
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise MediaPlaneFull(f"cannot bind {iface.address}:{port}: {exc}") from exc
            try:
                rtcp = self._bind(iface, port + 1)
            except OSError:
                rtp.close()
                free.append(port)
                continue
            rtp_leg = self._add(rtp, iface, port, rtcp=False)
            rtcp_leg = self._add(rtcp, iface, port + 1, rtcp=True)
            return LegPair(rtp=rtp_leg, rtcp=rtcp_leg, address=iface.advertised,
                           family=iface.family, port=port)
        raise MediaPlaneFull(f"no free port pair on interface {iface.name!r}")

    def set_peer(self, leg: int, host: str, port: int) -> None:
        self.relay.set_peer(leg, host, port)

    def bridge(self, leg_a: int, leg_b: int) -> None:
        self.relay.bridge(leg_a, leg_b)

    def set_clock_rate(self, leg: int, rate: int) -> None:
        self.relay.set_clock_rate(leg, rate)

    def set_latching(self, leg: int, mode: str) -> None:
        self.relay.set_latching(leg, _LATCHING[mode])

    def leg_stats(self, leg: int) -> dict[str, Any]:
        return dict(self.relay.stats(leg))

    def local_port(self, leg: int) -> int:
        return self._port[leg][1]

    def close(self, leg: int) -> None:
        sock = self._sockets.pop(leg, None)
        if sock is None:
            return
        if self._pollset == _PER_SOCKET:
            self.loop.remove_reader(sock.fileno())
        self.relay.remove_leg(leg)
        sock.close()
        name, port = self._port.pop(leg)
        if port % 2 == 0:
            self._free[name].append(port)

    def close_all(self) -> None:
        for leg in list(self._sockets):
            self.close(leg)
        if self._threaded:
            self.relay.stop()
        elif self._pollset >= 0:
            self.loop.remove_reader(self._pollset)
            self._pollset = _PER_SOCKET

    @property
    def legs(self) -> int:
        return len(self._sockets)

    # -- sockets -------------------------------------------------------------------------

    def _bind(self, iface: MediaInterface, port: int) -> socket.socket:
        sock = socket.socket(iface.socket_family, socket.SOCK_DGRAM)
        try:
            if iface.socket_family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((iface.address, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _add(self, sock: socket.socket, iface: MediaInterface, port: int, *, rtcp: bool) -> int:
        leg = self._next_leg
        self._next_leg += 1
        self._sockets[leg] = sock
        self._port[leg] = (iface.name, port)
        self.relay.add_leg(leg, sock.fileno(), rtcp=rtcp)
        if self._pollset == _PER_SOCKET:
            drain = self.relay.drain
            # One Python call per readable socket: drain() reads and forwards a batch in C.
            self.loop.add_reader(sock.fileno(), lambda: drain(leg, time.time()))
        return leg


class NgServer(asyncio.DatagramProtocol):
    """The ng control socket: each datagram goes to ``receive(data, source, now)`` (the sans-IO
    :class:`~fastsip.relay.ng.NgControl`), whose reply, if any, goes back to the sender."""

    def __init__(self, receive: Callable[[bytes, tuple[str, int], float], bytes | None]) -> None:
        self.receive = receive
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = self.receive(data, (addr[0], addr[1]), time.time())
        except Exception:
            # The core answers bad input with an error reply; an exception is our bug, and
            # one bad command must not stop the control socket.
            log.exception("ng command from %s:%s failed", addr[0], addr[1])
            return
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("ng socket: %s", exc)


class MediaRelayError(FastSIPError):
    """The relay cannot start: the message says why (a port taken, a bad address)."""
