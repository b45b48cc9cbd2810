"""SIP over UDP, TCP and TLS on an asyncio (or uvloop) event loop: the :class:`TransportLayer`.

It implements :class:`fastsip.transport.Transport` (what the sans-IO layers send through) and
feeds what arrives, parsed, to one receive callback (the transaction layer's ``receive``).

- UDP: one socket per listener, read and written in C (``_udp.UdpSocket``) on the loop's
  ``add_reader``, asyncio's or uvloop's: a wakeup drains up to 256 ready datagrams with
  ``recvfrom`` into one preallocated buffer and reads the clock once, and a send is one
  ``sendto`` (asyncio's datagram transport costs a wakeup and a fresh 256 KiB buffer per
  datagram; uvloop's converts every address through Python objects).  The loop's datagram
  transport stands in where the loop cannot watch a socket.  Responses and requests leave from a
  listening socket, so a NAT sees the same port both ways; a datagram the socket cannot take
  now (EAGAIN, ENOBUFS, a full send queue) is dropped, as UDP may.  A datagram that does not
  parse is answered statelessly when it can be (400/505/513), else dropped.
- TCP/TLS: listening sockets are ours too, so every accepted socket meets ``admit`` and the
  connection limits before a transport, a read or a TLS handshake exists for it.  Every
  connection, accepted or opened by us, is in one table keyed by its id and by its peer
  (transport, host, port), and is reused for anything sent to that peer (RFC 5923 style).
  Streams are framed with :func:`fastsip.message_length`; CRLFCRLF keep-alives get a CRLF pong
  (RFC 5626 §3.5.1); a stream that cannot be resynchronized is closed.  Buffers are bounded by
  the message size limit.  Under ``serve --workers`` a connection stays in the worker that
  accepted it: ``stream_steer`` hands a message whose call another worker owns to it, and
  ``hand_send`` gives the bytes for a connection another worker holds back to that one
  (:mod:`fastsip.asyncio.workers`).
- Limits at the edge (Kamailio's ``tcp_max_connections``, ``tcp_connection_lifetime`` as the
  model): ``max_connections`` in all and ``max_connections_per_source`` accepted from one IP
  (over either, an accepted connection is closed at once); ``idle_timeout``; ``read_timeout``
  for a connection holding an incomplete message (slowloris: a header line every few seconds
  is not idle, but never finishes); ``tls_handshake_timeout``.  One loop timer sweeps them all.
- ``admit(host, now)``: the hook of an edge policy (rate limits, bans), asked for each datagram
  before it is parsed, each accepted connection and each message on a connection.  False drops
  the datagram silently, or closes the connection at once.  :attr:`TransportLayer.stats`
  counts what was turned away.
- Where the loop has no ``add_reader`` (Windows' proactor loop), asyncio's datagram endpoints
  and servers stand in, with the same limits and hook (a TLS connection then counts from the
  end of its handshake, which ``tls_handshake_timeout`` still bounds).
- ``send()`` never blocks and never raises for network trouble: a failed connect (or a peer we
  cannot reach at all) is reported through the ``on_error`` callback, which the
  :class:`~fastsip.asyncio.endpoint.Endpoint` wires to the transaction layer's
  ``transport_error(dest)``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import random
import socket
import ssl
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from fastsip.asyncio import _udp, kernelban
from fastsip.asyncio._udp import MAX_WRITE_BUFFER as _MAX_WRITE_BUFFER
from fastsip.asyncio._udp import OWN_ID as _OWN_ID
from fastsip.asyncio._udp import WILDCARDS as _WILDCARDS
from fastsip.asyncio._udp import family_of as _family
from fastsip.asyncio.dns import DnsFailure, Rfc3263Resolver
from fastsip.asyncio.netif import interface_addresses, routed_address
from fastsip.errors import FastSIPError, ParseError
from fastsip.sip import Limits, Message, Request, Response, message_length, parse
from fastsip.timers import TimerWheel
from fastsip.transport import DEFAULT_PORTS, Address
from fastsip.transport.intake import Steer, answer_malformed, deliver_message
from fastsip.transport.rules import (
    held_connection_id,
    parse_hostport,
    parse_listen,
    strip_brackets,
)

__all__ = ["AdmitCallback", "Listener", "TransportLayer", "TransportStats", "parse_listen"]

log = logging.getLogger("fastsip.asyncio.transport")

MessageCallback = Callable[[Message, Address], None]
ErrorCallback = Callable[[Address], None]
#: ``hand_send(data, dest)``: bytes for a connection another worker holds (``dest.connection``
#: names it); True when they were handed to that worker (False: send as if it were closed).
HandSend = Callable[[bytes, Address], bool]
#: ``admit(host, now)``: may this source IP (no brackets) be heard at loop time ``now``?
AdmitCallback = Callable[[str, float], bool]

_PONG = b"\r\n"
# Connections accepted per wakeup (asyncio's servers take up to their backlog).
_ACCEPT_BATCH = 64
_BACKLOG = 1024                       # Kamailio's tcp_listen_backlog; the kernel may cap it
_ACCEPT_RETRY = 1.0                   # out of descriptors: pause accepting this long
_ACCEPT_PAUSE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_MAX_SWEEP_PERIOD = 30.0
# Peers whose connection another worker holds, remembered from the messages it handed us (so
# what we send to such a peer reuses that connection, as _by_peer does for our own): at most
# this many, the oldest forgotten first.
_MAX_REMOTE_PEERS = 4096


def _host_key(host: str) -> str:
    """A host as :meth:`TransportLayer.local_addresses` gives it: no brackets or scope, an IP
    literal in its compressed form, a name in lower case."""
    host = strip_brackets(host).partition("%")[0]
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower()


def _same_host(a: str, b: str) -> bool:
    """Do two hosts (a connection's peer, where a Via or stored flow says it is) name the
    same IP?  (A Via may write an IPv6 address in another form.)"""
    return a == b or _host_key(a) == _host_key(b)


#: What the transport took in and turned away (compiled: a UDP wakeup counts its datagrams
#: in C; the counters are documented there).
TransportStats = _udp.TransportStats


#: A bound listening socket (compiled: the UDP path reads its fields per message).
Listener = _udp.Listener


# -- UDP -----------------------------------------------------------------------------------------

#: A UDP listening socket read and written in C (``_udp.pyx``), on the loop's ``add_reader``.
_UdpSocket = _udp.UdpSocket
_INTAKE_ATTRIBUTES = _udp.INTAKE_ATTRIBUTES
#: The methods the layers above call through ``TransportLayer.compiled``.
_COMPILED_METHODS = ("send", "local_for", "via_for")


class _Datagram(asyncio.DatagramProtocol):
    """A UDP listening socket on the loop's datagram transport: the stand-in where the loop has
    no ``add_reader`` (Windows' proactor loop), or where a test asks for it (``_lean_udp``)."""

    def __init__(self, layer: TransportLayer, lid: int) -> None:
        self.layer = layer
        self.lid = lid
        self.transport: asyncio.DatagramTransport | None = None
        #: No transport yet, or closing: a plain attribute (a property was a Python call per
        #: datagram sent), set with the transport's life: connection_made, close() and
        #: connection_lost (which follows every close, ours or the loop's on an error).
        self.closed = True
        # The loop's clock, bound once: admit's ``now`` for every datagram (made inside
        # listen(), on the running loop).
        self._time = layer.loop.time

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.closed = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    # Every datagram in and out: compiled (fastsip.asyncio._udp).
    datagram_received = _udp.datagram_received
    send = _udp.datagram_send

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on an unconnected socket cannot be tied to one destination reliably.
        log.debug("UDP socket error: %s", exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


# -- TCP / TLS -----------------------------------------------------------------------------------

class _Acceptor:
    """A TCP or TLS listening socket we own, read with ``loop.add_reader``: each accepted
    socket meets ``admit`` and the connection limits before a transport, a read or a TLS
    handshake exists for it, so refusing one costs an accept() and a close()."""

    __slots__ = ("_retry", "closed", "layer", "lid", "loop", "name", "sock")

    def __init__(self, layer: TransportLayer, sock: socket.socket, name: str,
                 loop: asyncio.AbstractEventLoop, lid: int) -> None:
        self.layer = layer
        self.sock = sock
        self.name = name
        self.lid = lid
        self.loop = loop
        self.closed = False
        self._retry: asyncio.TimerHandle | None = None
        loop.add_reader(sock.fileno(), self._accept_ready)   # NotImplementedError: proactor

    def _accept_ready(self) -> None:
        accept = self.sock.accept
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSE:
                    # Out of descriptors or memory: the listening socket stays readable, so
                    # pause rather than spin (as asyncio's own servers do).
                    log.warning("cannot accept %s connections: %s; pausing %.0f s",
                                self.name, exc, _ACCEPT_RETRY)
                    self.loop.remove_reader(self.sock.fileno())
                    self._retry = self.loop.call_later(_ACCEPT_RETRY, self._resume)
                    return
                log.debug("accept failed: %s", exc)     # e.g. ECONNABORTED: on to the next
                continue
            self.layer._accepted(sock, addr, self.name, self.lid)

    def _resume(self) -> None:
        self._retry = None
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept_ready)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        try:
            self.loop.remove_reader(self.sock.fileno())
        except RuntimeError:        # the loop is closed already
            pass
        self.sock.close()


class _Connection(asyncio.Protocol):
    """One TCP or TLS connection, accepted or opened by us, framed per RFC 3261 §18.3."""

    def __init__(self, layer: TransportLayer, transport_name: str, cid: int,
                 peer: Address | None = None, *, accepted: bool = False, lid: int = 0
                 ) -> None:
        self.layer = layer
        self.name = transport_name
        self.id = cid
        self.peer = peer                       # known up front, but for the stand-in servers
        self.accepted = accepted
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None  # accepted, not yet handed to the loop
        self.buffer = bytearray()
        # Loop time of the first byte of the incomplete message in ``buffer`` (None: empty).
        self.partial_since: float | None = None
        self.pending: list[bytes] = []         # written once connected
        self.pending_size = 0
        self.last_active = layer._loop.time() if layer._loop is not None else 0.0
        self.closed = False
        self.aliases: list[tuple[str, str, int]] = []
        #: The id of the listener that accepted it (0: opened by us).
        self.lid = lid

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.closed:                        # closed while its TLS handshake ran
            transport.abort()
            return
        if self.peer is None:                  # accepted by a stand-in asyncio server
            remote = transport.get_extra_info("peername")
            if not remote or not self.layer._admit_connection(str(remote[0])):
                self.closed = True
                transport.abort()
                return
            self.peer = Address(self.name, remote[0], remote[1], self.id)
            self.layer._register(self)
        self.transport = transport
        for data in self.pending:
            transport.write(data)
        self.pending.clear()
        self.pending_size = 0
        self.last_active = self.layer._now()

    def data_received(self, data: bytes) -> None:
        now = self.last_active = self.layer._now()
        buf = self.buffer
        held = len(buf)
        buf += data
        total = len(buf)
        limits = self.layer.limits
        while buf:
            try:
                n = message_length(buf, limits)
            except ParseError as exc:
                log.debug("closing %s: unframeable stream: %s", self.peer, exc)
                self.close()
                return
            if n > 0:
                chunk = bytes(buf[:n])
                del buf[:n]                    # O(1) from the front of a bytearray
                self._dispatch(chunk)
                if self.closed:
                    return
            elif n == 0:
                break
            elif n == -4:
                del buf[:4]
                if self.transport is not None:
                    self.transport.write(_PONG)  # RFC 5626 §3.5.1 pong
            else:
                if n == -2 and len(buf) == 3:
                    break                      # maybe the first half of a CRLFCRLF ping
                del buf[:-n]
        # read_timeout runs from the first byte of the message still incomplete: a message
        # that began in this chunk (the buffer was empty, or what it held was consumed) starts
        # the clock; more bytes of the same message do not reset it.
        if not buf:
            self.partial_since = None
        elif held == 0 or len(buf) < total:
            self.partial_since = now
        if len(buf) > limits.max_message_size:  # message_length raises first; belt and braces
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.layer._unregister(self)

    # -- ours ------------------------------------------------------------------------------

    def _dispatch(self, chunk: bytes) -> None:
        assert self.peer is not None
        layer = self.layer
        if layer.admit is not None and not layer._ask_admit(self.peer.host, self.last_active):
            log.debug("closing %s: source not admitted", self.peer)
            layer.stats.messages_denied += 1
            self.close(abort=True)
            return
        try:
            msg = parse(chunk, layer.limits)
        except ParseError as exc:
            # Framing held, so the stream stays in sync: answer (or drop) just this message.
            log.debug("malformed message from %s: %s", self.peer, exc)
            layer._answer_malformed(chunk, exc, self.peer)
            return
        layer._deliver(msg, self.peer, chunk)

    def write(self, data: bytes) -> bool:
        """Write now, or queue until connected; False when the connection cannot take it."""
        if self.closed:
            return False
        self.last_active = self.layer._now()
        if self.transport is None:
            self.pending_size += len(data)
            if self.pending_size > _MAX_WRITE_BUFFER:
                return False
            self.pending.append(data)
            return True
        if self.transport.is_closing():
            return False
        if self.transport.get_write_buffer_size() > _MAX_WRITE_BUFFER:
            log.debug("closing %s: peer does not read", self.peer)
            self.close(abort=True)             # close() would wait for it to read, forever
            return False
        self.transport.write(data)
        return True

    def close(self, abort: bool = False) -> None:
        """Close (``abort``: at once, discarding what is not written yet) and forget it."""
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        elif self.sock is not None:
            self.sock.close()
            self.sock = None
        self.closed = True
        self.layer._unregister(self)


# -- the layer -----------------------------------------------------------------------------------

class TransportLayer:
    """The asyncio implementation of :class:`fastsip.transport.Transport` (RFC 3261 §18).

    ``on_message(msg, source)`` receives every parsed request and response (a request's top Via
    already carries ``received``/``rport``, §18.2.1); ``on_error(dest)`` hears of sends that
    failed (wire it to ``TransactionLayer.transport_error``).  Both may be set after
    construction.  ``check_via`` drops responses whose top Via is not ours (§18.1.2).
    ``tls_context`` is the server context (certificate) for ``tls:`` listeners;
    ``tls_client_context`` verifies servers we connect to (default: the system trust store).

    Edge limits (seconds; 0 turns a timeout off, None a cap):

    - ``max_connections``: TCP/TLS connections open at once, accepted and outgoing (Kamailio's
      tcp_max_connections); ``max_connections_per_source``: accepted ones from one IP.  Over
      either, an accepted connection is closed at once and an outgoing connect fails through
      ``on_error``.
    - ``idle_timeout``: a connection with no traffic either way is closed (Kamailio's
      tcp_connection_lifetime); ``read_timeout``: one holding an incomplete message this long
      since its first byte is closed (slowloris); ``tls_handshake_timeout``: an accepted TLS
      connection that has not finished its handshake is closed.
    - ``admit(host, now)``: asked for each datagram before it is parsed, each accepted
      connection and each message on a connection, with the source IP (no brackets) and the
      loop's time; False drops the datagram silently or closes the connection.  It runs for
      every datagram of a flood: keep it cheap, never block.  May be set after construction.
    - ``udp_receive_buffer``: SO_RCVBUF asked for each UDP socket (bursts wait there instead of
      being dropped by the kernel; it may grant less, see ``Listener.receive_buffer``).
    - ``reuse_port``: bind every listener with SO_REUSEPORT (Linux), so several worker
      processes share each address; :attr:`steer` then hands each datagram to its owner,
      :attr:`stream_steer` each message framed on a connection, and :attr:`hand_send` the
      bytes for a connection another worker holds (:mod:`fastsip.asyncio.workers`).
    - ``own_sockets`` (with ``reuse_port``, as a worker): beside each shared UDP listener
      without an advertised address, a socket of this worker's alone on the same host (an
      ephemeral port).  :meth:`via_for` gives it for the Via of a request towards a peer
      that did not name a socket (the proxy's branches), and a request whose top Via names
      it leaves from it: the responses then reach this worker, which owns their call,
      instead of whichever worker the kernel picks for the shared address (and a hand-off
      from there).  Record-Route and Contact still name the shared address, and so do the
      requests built with :meth:`local_for` (a trunk's REGISTER), which leave from there.
      An advertised address (NAT) has no such socket: the mapping of an ephemeral port is
      unknown.
    """

    # Own the listening sockets and read them with loop.add_reader where the loop can; False
    # uses the loop's datagram endpoints and servers everywhere (tests compare the two).
    _lean_io = True
    # UDP through _UdpSocket (True) or the loop's datagram transport (False); None: as
    # _lean_io says (the compiled socket costs less than the transport, uvloop's included:
    # benchmarks/bench_udp_intake.py).
    _lean_udp: bool | None = None
    # Set at the end of __init__: from then on, setting one of _udp.INTAKE_ATTRIBUTES makes
    # the UDP path's snapshot of them again (__setattr__), in place: the sockets and the
    # compiled stand-in hold this one object.
    _intake: _udp.IntakeState | None = None
    #: The timers' wheel (its owner sets it: :class:`~fastsip.asyncio.Endpoint`). A wakeup of
    #: a UDP socket reads the clock once and holds the wheel's clock at that reading while
    #: its datagrams are handled, so the timers they schedule read no clock of their own.
    wheel: TimerWheel | None = None

    #: ``send``, ``local_for`` and ``via_for`` as C methods (set in __init__, see there).
    compiled: _udp.LayerTransport | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if name in _INTAKE_ATTRIBUTES and self._intake is not None:
            self._intake.refresh(self)
        elif name in _COMPILED_METHODS and self.compiled is not None:
            # A method of our own on this instance (serve's metrics wrap send): the layers
            # above, which call the compiled stand-in, must reach it.
            self.compiled.replaced(name)

    def __init__(
        self,
        on_message: MessageCallback | None = None,
        on_error: ErrorCallback | None = None,
        *,
        tls_context: ssl.SSLContext | None = None,
        tls_client_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        idle_timeout: float = 120.0,
        read_timeout: float = 10.0,
        tls_handshake_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        max_connections: int | None = 2048,
        max_connections_per_source: int | None = 64,
        admit: AdmitCallback | None = None,
        udp_receive_buffer: int = 4 * 1024 * 1024,
        check_via: bool = True,
        reuse_port: bool = False,
        own_sockets: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.on_message = on_message
        self.on_error = on_error
        self.tls_context = tls_context
        self.tls_client_context = tls_client_context
        self.limits = limits if limits is not None else Limits()
        self.idle_timeout = idle_timeout
        self.read_timeout = read_timeout
        self.tls_handshake_timeout = tls_handshake_timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self.max_connections_per_source = max_connections_per_source
        self.admit = admit
        self.udp_receive_buffer = udp_receive_buffer
        self.check_via = check_via
        self.reuse_port = reuse_port
        self.own_sockets = own_sockets
        #: The worker's own UDP sockets by id (_OWN_ID + the shared listener's id).
        self._own: dict[int, Listener] = {}
        #: ``steer(msg, data, source)`` of the intake (several workers on one socket): takes
        #: the datagrams another worker owns.  None: every datagram is ours.
        self.steer: Steer | None = None
        #: The same for a message framed on a connection this worker holds (``source`` names
        #: the connection): another worker may own its call.
        self.stream_steer: Steer | None = None
        #: Bytes for a connection another worker holds (see :data:`HandSend`).
        self.hand_send: HandSend | None = None
        #: Which worker this is (``serve --workers``; set before listening): every connection
        #: id then names it (:func:`~fastsip.transport.rules.held_connection_id`), so any
        #: worker -- reading a flow from the shared location store, or a response's
        #: destination -- knows where the connection lives.  None: ids 1, 2, 3, ...
        self.worker: int | None = None
        #: Counters of what came in and what the limits and ``admit`` turned away.
        self.stats = TransportStats()
        self._loop = loop
        self.listeners: list[Listener] = []
        # The listener each kind of destination leaves from (_udp.pyx's _nearest_of); cleared
        # whenever the listeners change.
        self._nearest_cache: dict[str, dict[int, Listener | None]] = {}
        self._connections: dict[int, _Connection] = {}
        self._by_peer: dict[tuple[str, str, int], _Connection] = {}
        self._per_source: dict[str, int] = {}      # accepted connections open per source IP
        # (transport, host, port) -> id of a connection to that peer another worker holds.
        self._remote_peers: dict[tuple[str, str, int], int] = {}
        self._next_id = 1
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._local: list[tuple[str, int]] = []
        self._closed = False
        #: Resolves host names of datagram destinations (``await dns.addresses(host)``: its
        #: cache, the hosts file, DNS A/AAAA, then getaddrinfo); None: getaddrinfo alone.
        #: (Requests a proxy forwards arrive resolved already, by RFC 3263.)
        self.dns: Rfc3263Resolver | None = None
        #: What the UDP path reads for every datagram, as C fields (see __setattr__).
        self._intake = _udp.IntakeState(self)
        # ``send``, ``local_for`` and ``via_for`` as C methods, for the compiled layers that
        # send through this transport (fastsip.transport._base); None when a subclass
        # replaced one of them, so that its own runs.  (One set on the instance later is
        # called through the stand-in: __setattr__.)
        self.compiled = (
            _udp.LayerTransport(self) if all(
                getattr(type(self), name) is getattr(TransportLayer, name)
                for name in _COMPILED_METHODS) else None)

    # -- set-up ----------------------------------------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def listen(self, spec: str, advertise: str | None = None) -> Listener:
        """Bind a listener from a spec (see :func:`parse_listen`); returns it with the real
        port.  ``advertise`` ("host" or "host:port") is what goes into our Via for this
        transport instead of the bound address (behind NAT, or on a wildcard address).
        Raises ValueError for a bad spec, OSError when the address cannot be bound, and
        FastSIPError for ``tls:`` without a ``tls_context``."""
        transport, host, port = parse_listen(spec)
        if transport == "TLS" and self.tls_context is None:
            raise FastSIPError(f"{spec}: a tls: listener needs a tls_context")
        loop = self.loop
        family = _family(host)
        lid = len(self.listeners) + 1
        server: asyncio.AbstractServer | None = None
        acceptor: _Acceptor | None = None
        udp: _UdpSocket | _Datagram | None = None
        receive_buffer = 0
        if transport == "UDP":
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                receive_buffer = self._set_receive_buffer(sock)
                sock.bind((host, port))
                sock.setblocking(False)
                bound = sock.getsockname()
                udp = self._udp_reader(sock, lid)
                if udp is None:
                    _, udp = await loop.create_datagram_endpoint(
                        lambda: _Datagram(self, lid), sock=sock)
            except BaseException:
                sock.close()
                raise
        else:
            sock = _bind_stream(host, port, family, self.reuse_port)
            try:
                bound = sock.getsockname()
                acceptor = self._acceptor(sock, transport, lid)
                if acceptor is None:
                    server = await self._stand_in_server(sock, transport, lid)
            except BaseException:
                sock.close()
                raise
        address = Address(transport, bound[0], bound[1])
        sent_by = self._advertised(address, advertise)
        listener = Listener(address, family, sent_by, lid)
        listener._server = server
        listener._acceptor = acceptor
        listener._udp = udp
        listener._udp_sock = sock if transport == "UDP" else None
        listener.receive_buffer = receive_buffer
        self.listeners.append(listener)
        self._nearest_cache.clear()
        self._local.append(sent_by)
        if sent_by[0] != address.host or sent_by[1] != address.port:
            self._local.append((address.host, address.port))
        if udp is not None and self.reuse_port and self.own_sockets and \
                self.worker is not None and not advertise and lid < _OWN_ID:
            await self._open_own(listener)
        if udp is not None:
            log.info("listening on %s (sent-by %s:%d; receive buffer %d bytes%s)", address,
                     *sent_by, receive_buffer,
                     "" if receive_buffer >= self.udp_receive_buffer else
                     f", {self.udp_receive_buffer} asked: the kernel caps it "
                     "(Linux: net.core.rmem_max)")
        else:
            log.info("listening on %s (sent-by %s:%d)", address, *sent_by)
        return listener

    async def _open_own(self, shared: Listener) -> None:
        """The worker's own socket beside UDP listener ``shared`` (see ``own_sockets``), read
        as the shared one is; a failure to bind one leaves the shared socket to send from, as
        with one worker."""
        sock = socket.socket(shared.family, socket.SOCK_DGRAM)
        lid = _OWN_ID + shared.id
        try:
            receive_buffer = self._set_receive_buffer(sock)
            sock.bind((shared.address.host, 0))
            sock.setblocking(False)
            udp: _UdpSocket | _Datagram | None = self._udp_reader(sock, lid)
            if udp is None:
                _, udp = await self.loop.create_datagram_endpoint(
                    lambda: _Datagram(self, lid), sock=sock)
        except OSError as exc:
            sock.close()
            log.warning("worker %s: no own socket beside %s (%s): its requests leave from the "
                        "shared one", self.worker, shared.address, exc)
            return
        port = sock.getsockname()[1]
        own = Listener(Address("UDP", shared.address.host, port), shared.family,
                       (shared.sent_by[0], port), lid)
        own._udp, own._udp_sock, own.receive_buffer = udp, sock, receive_buffer
        shared.own = self._own[lid] = own
        self._local.append(own.sent_by)
        log.info("worker %s sends its requests from %s (beside %s)", self.worker, own.address,
                 shared.address)

    def _set_receive_buffer(self, sock: socket.socket) -> int:
        """Ask for ``udp_receive_buffer`` bytes of SO_RCVBUF; returns what the kernel granted
        (Linux reports twice the usable size, and caps a request at net.core.rmem_max)."""
        if self.udp_receive_buffer > 0:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.udp_receive_buffer)
            except OSError as exc:
                log.debug("cannot set SO_RCVBUF to %d: %s", self.udp_receive_buffer, exc)
        return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def _udp_reader(self, sock: socket.socket, lid: int) -> _UdpSocket | None:
        lean = self._lean_udp
        if lean is None:
            lean = self._lean_io
        if not lean:
            return None
        try:
            return _UdpSocket(self, sock, self.loop, lid)
        except NotImplementedError:         # no add_reader: the datagram endpoint stands in
            return None

    def _acceptor(self, sock: socket.socket, transport: str, lid: int) -> _Acceptor | None:
        if not self._lean_io:
            return None
        try:
            return _Acceptor(self, sock, transport, self.loop, lid)
        except NotImplementedError:         # no add_reader: an asyncio server stands in
            return None

    async def _stand_in_server(self, sock: socket.socket, transport: str, lid: int
                               ) -> asyncio.AbstractServer:
        """asyncio's own server on ``sock``: limits and ``admit`` apply in connection_made,
        which for TLS comes after the handshake (still bounded by tls_handshake_timeout)."""
        ctx = self.tls_context if transport == "TLS" else None
        return await self.loop.create_server(
            lambda: _Connection(self, transport, self._new_id(), accepted=True, lid=lid),
            sock=sock,
            ssl=ctx, ssl_handshake_timeout=self._handshake_timeout(ctx), backlog=_BACKLOG)

    def _handshake_timeout(self, ctx: ssl.SSLContext | None) -> float | None:
        if ctx is None or self.tls_handshake_timeout <= 0:
            return None                     # asyncio's default (60 s) when turned off
        return self.tls_handshake_timeout

    def _advertised(self, address: Address, advertise: str | None) -> tuple[str, int]:
        if advertise:
            return parse_hostport(advertise, address.port)
        if address.host in _WILDCARDS:
            return (routed_address(address.host == "::"), address.port)
        return (address.host, address.port)

    def drop_sources(self, hosts: Iterable[str]) -> int:
        """Have the kernel drop datagrams from ``hosts`` (the banned sources) on every IPv4
        UDP listener, replacing the previous set: a flood from them then never wakes us nor
        fills the receive buffer that legitimate datagrams need (:mod:`kernelban`, Linux).
        Returns how many addresses the kernel filters (0 where it cannot; ``admit`` still
        drops them in Python)."""
        if not kernelban.available():
            return 0
        hosts = list(hosts)
        code = kernelban.program(hosts)
        filtered = 0
        for listener in [*self.listeners, *self._own.values()]:
            sock = listener._udp_sock
            if sock is None or listener.family != socket.AF_INET or sock.fileno() < 0:
                continue
            try:
                if code is None:
                    kernelban.detach(sock)
                else:
                    kernelban.attach(sock, code)
                    filtered = min(len(hosts), kernelban.MAX_ADDRESSES)
            except OSError as exc:
                log.warning("cannot filter banned sources in the kernel on %s: %s",
                            listener.address, exc)
        self.stats.kernel_filtered = filtered
        return filtered

    def local_addresses(self) -> tuple[set[str], set[int]]:
        """The hosts and ports that are us, for telling whether a Request-URI or Route names
        this node: each listener's bound host and its advertised (sent-by) host, and for a
        wildcard listener every interface address of its family; each listener's port and
        advertised port.  Hosts have no brackets or scope (IP literals compressed, names lower
        case).  Interfaces are read afresh on each call: callers cache the answer."""
        hosts: set[str] = set()
        ports: set[int] = set()
        interfaces: list[str] | None = None
        for listener in self.listeners:
            bound = listener.address.host
            if bound in _WILDCARDS:
                if interfaces is None:
                    interfaces = interface_addresses()
                v6 = listener.family == socket.AF_INET6
                hosts.update(_host_key(a) for a in interfaces if (":" in a) == v6)
            else:
                hosts.add(_host_key(bound))
            hosts.add(_host_key(listener.sent_by[0]))
            ports.add(listener.address.port)
            ports.add(listener.sent_by[1])
            if listener.own is not None:
                ports.add(listener.own.address.port)
        return hosts, ports

    # -- the Transport protocol ------------------------------------------------------------

    def sent_by(self, transport: str) -> tuple[str, int]:
        """Host and port for our Via for ``transport``: its first listener's advertised
        address; without a listener for it, the first listener's host with that listener's
        port (where we can receive).  Raises FastSIPError with no listener at all."""
        for listener in self.listeners:
            if listener.address.transport == transport:
                return listener.sent_by
        if not self.listeners:
            raise FastSIPError("no listeners: call listen() first")
        return self.listeners[0].sent_by

    # The per-message path -- our end of a message, the listener it uses, the send, the
    # receive -- is compiled (fastsip.asyncio._udp, where each is documented): it runs for
    # every datagram.
    local_for = _udp.local_for
    via_for = _udp.via_for
    send = _udp.send
    _udp_listener = _udp.udp_listener
    _send_udp = _udp.send_udp
    _receive_datagram = _udp.receive

    # -- UDP -------------------------------------------------------------------------------

    async def _resolve_then_send(self, data: bytes, dest: Address) -> None:
        try:
            if self.dns is not None:
                ips = await self.dns.addresses(dest.host)
            else:
                infos = await self.loop.getaddrinfo(dest.host, dest.port,
                                                    type=socket.SOCK_DGRAM)
                ips = [str(sockaddr[0]) for *_, sockaddr in infos]
        # ValueError: UnicodeError from IDNA, a bad name; DnsFailure: the DNS server failed
        except (OSError, ValueError, DnsFailure) as exc:
            log.debug("cannot resolve %s: %s", dest.host, exc)
            self._fail(dest)
            return
        for ip in ips:
            if self._udp_listener(_family(ip), ip) is not None:
                self._send_udp(data, Address(dest.transport, ip, dest.port, dest.connection))
                return
        self._fail(dest)

    # -- TCP / TLS -------------------------------------------------------------------------

    def _send_stream(self, data: bytes, dest: Address) -> None:
        conn = None
        if dest.connection:
            conn = self._connections.get(dest.connection)
            if conn is None:
                hand = self.hand_send
                if hand is not None and hand(data, dest):
                    return          # another worker holds it, and writes it
            elif (self.worker is not None and conn.peer is not None
                  and not _same_host(conn.peer.host, dest.host)):
                conn = None         # an id from a stored flow of another process: not this one
        if conn is None or conn.closed:
            conn = self._by_peer.get(dest.peer)
            if (conn is None or conn.closed) and self._remote_peers:
                # The peer's connection is in another worker (RFC 5923 reuse across them).
                cid = self._remote_peers.get(dest.peer)
                hand = self.hand_send
                if cid is not None and hand is not None and hand(
                        data, Address(dest.transport, dest.host, dest.port, cid)):
                    return
        if conn is not None and not conn.closed and conn.write(data):
            return
        if conn is not None and not conn.closed:
            self._fail_soon(dest)      # open but refusing (write buffer full)
            return
        cap = self.max_connections
        if cap is not None and len(self._connections) >= cap:
            log.debug("no new connection to %s: %d open (max_connections)",
                      dest, len(self._connections))
            self.stats.connects_refused += 1
            self._fail_soon(dest)
            return
        conn = _Connection(self, dest.transport, self._new_id(),
                           Address(dest.transport, dest.host, dest.port))
        conn.peer = Address(dest.transport, dest.host, dest.port, conn.id)
        conn.write(data)
        self._register(conn)
        self._spawn(self._connect(conn, dest))

    async def _connect(self, conn: _Connection, dest: Address) -> None:
        ctx: ssl.SSLContext | None = None
        server_hostname: str | None = None
        if dest.transport == "TLS":
            if self.tls_client_context is None:
                self.tls_client_context = ssl.create_default_context()
            ctx = self.tls_client_context
            # The next hop's host: a name is sent as SNI and must be in the certificate's DNS
            # SANs; an IP literal must be in its IP SANs, and ssl sends no SNI for it (RFC 6066).
            server_hostname = dest.host
        try:
            await asyncio.wait_for(
                self.loop.create_connection(lambda: conn, dest.host, dest.port, ssl=ctx,
                                            server_hostname=server_hostname),
                self.connect_timeout)
        # (ValueError: a name that cannot even be encoded, IDNA's UnicodeError)
        except (OSError, ValueError, asyncio.TimeoutError, ssl.SSLError) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                # Our own choice of next hop failed its identity check: the operator must
                # hear of it (a wrong --tls-ca, an expired certificate, a spoofed peer).
                log.warning("TLS to %s refused: its certificate does not verify: %s",
                            dest, exc.verify_message or exc)
            else:
                log.debug("cannot connect to %s: %s", dest, exc)
            conn.closed = True
            self._unregister(conn)
            self._fail(dest)

    def _ask_admit(self, host: str, now: float) -> bool:
        """``admit(host, now)`` for a connection or a message on one; a hook that raises is a
        bug, logged, and counts as a no (a broken policy must not open the gate)."""
        admit = self.admit
        if admit is None:
            return True
        try:
            return admit(host, now)
        except Exception:
            log.exception("error in the admit hook for %s", host)
            return False

    def _admit_connection(self, host: str) -> bool:
        """May a connection just accepted from ``host`` stay?  ``admit``, then the limits;
        a refusal is logged at DEBUG (a flood must not flood the log) and counted."""
        if not self._ask_admit(host, self._now()):
            self.stats.connections_denied += 1
            log.debug("closing a connection from %s: not admitted", host)
            return False
        cap = self.max_connections
        if cap is not None and len(self._connections) >= cap:
            self.stats.connections_refused += 1
            log.debug("refusing a connection from %s: %d open (max_connections)",
                      host, len(self._connections))
            return False
        cap = self.max_connections_per_source
        if cap is not None and self._per_source.get(host, 0) >= cap:
            self.stats.connections_refused_per_source += 1
            log.debug("refusing a connection from %s: %d open from there "
                      "(max_connections_per_source)", host, cap)
            return False
        return True

    def _accepted(self, sock: socket.socket, addr: Any, name: str, lid: int) -> None:
        """A socket from an :class:`_Acceptor`: closed at once if refused, else counted and
        handed to the loop (TLS: after its handshake)."""
        host = str(addr[0])
        if not self._admit_connection(host):
            sock.close()
            return
        conn = _Connection(self, name, self._new_id(), accepted=True, lid=lid)
        conn.peer = Address(name, host, int(addr[1]), conn.id)
        conn.sock = sock
        self._register(conn)
        self._spawn(self._attach(conn))

    async def _attach(self, conn: _Connection) -> None:
        sock, conn.sock = conn.sock, None
        if sock is None:                    # closed before this task ran
            return
        ctx = self.tls_context if conn.name == "TLS" else None
        failure: object = None
        try:
            await self.loop.connect_accepted_socket(
                lambda: conn, sock, ssl=ctx, ssl_handshake_timeout=self._handshake_timeout(ctx))
        except Exception as exc:  # noqa: BLE001 - a failed or timed-out handshake, a reset...
            failure = exc
        else:
            if conn.transport is None and not conn.closed:
                failure = "closed during the handshake"
        if failure is not None:
            if ctx is not None:
                self.stats.tls_handshakes_failed += 1
            log.debug("%s connection from %s not established: %s", conn.name, conn.peer, failure)
            conn.closed = True
            self._unregister(conn)

    def be_worker(self, index: int) -> None:
        """Number connections as worker ``index`` of several (before any is open).  The
        count starts at a random point: a restarted worker does not hand out the ids its
        predecessor wrote into stored bindings (a stale flow would reach another phone)."""
        if self.worker == index:
            return
        self.worker = index
        self._next_id = random.randrange(1, 1 << 22)

    def _new_id(self) -> int:
        cid = self._next_id
        self._next_id += 1
        worker = self.worker
        if worker is None:
            return cid
        while (held := held_connection_id(cid, worker)) in self._connections:
            cid += 1                        # (after 4 million, the count wraps)
        self._next_id = cid + 1
        return held

    def send_on_connection(self, data: bytes, dest: Address) -> bool:
        """Write ``data`` on connection ``dest.connection`` of this worker, for the worker
        that owns the call (it handed the bytes here); False when that connection is gone
        (closed, never ours, or to another host) or cannot take them."""
        conn = self._connections.get(dest.connection)
        if conn is None or conn.closed or conn.peer is None or \
                not _same_host(conn.peer.host, dest.host):
            return False
        return conn.write(data)

    def send_without_connection(self, data: bytes, dest: Address) -> None:
        """Send as to a connection that has closed (the worker holding ``dest.connection``
        says it is gone): an open connection to the peer, else a new one (§18.2.2, §18.4: a
        failure reaches ``on_error`` as any transport error)."""
        remote = self._remote_peers
        for key in (dest.peer, *(k for k, v in remote.items() if v == dest.connection)):
            if remote.get(key) == dest.connection:
                del remote[key]
        self._send_stream(data, Address(dest.transport, dest.host, dest.port))

    def receive_handed(self, data: bytes, source: Address) -> None:
        """A message another worker framed on its connection ``source`` and handed here (this
        worker owns its call): the §18 checks and up, as if it had arrived here."""
        self._remember_remote(source.peer, source.connection)
        try:
            msg = parse(data, self.limits)
        except ParseError as exc:           # it parsed there: a bug, not the peer's
            log.debug("handed-over message from %s does not parse: %s", source, exc)
            return
        if isinstance(msg, Request):
            via = msg.top_via
            if via is not None and "alias" in via.params:
                # RFC 5923: requests to its sent-by reuse that connection (as _deliver does
                # for one of ours).
                port = via.port or DEFAULT_PORTS.get(source.transport, 5060)
                self._remember_remote((source.transport, strip_brackets(via.host), port),
                                      source.connection)
        deliver_message(msg, source, self.on_message, self._local if self.check_via else None)

    def _remember_remote(self, key: tuple[str, str, int], cid: int) -> None:
        """Requests to peer ``key`` go over connection ``cid`` of another worker (bounded:
        the oldest entry goes first)."""
        remote = self._remote_peers
        if remote.get(key) != cid:
            remote.pop(key, None)
            if len(remote) >= _MAX_REMOTE_PEERS:
                del remote[next(iter(remote))]
            remote[key] = cid

    def _register(self, conn: _Connection) -> None:
        assert conn.peer is not None
        self._connections[conn.id] = conn
        self._by_peer[conn.peer.peer] = conn
        if conn.accepted:
            host = conn.peer.host
            self._per_source[host] = self._per_source.get(host, 0) + 1
        if self._sweeper is None:
            self._arm_sweeper()

    def _unregister(self, conn: _Connection) -> None:
        if self._connections.pop(conn.id, None) is None:
            return
        if conn.accepted and conn.peer is not None:
            host = conn.peer.host
            left = self._per_source.get(host, 0) - 1
            if left > 0:
                self._per_source[host] = left
            else:
                self._per_source.pop(host, None)
        keys = list(conn.aliases)
        if conn.peer is not None:
            keys.append(conn.peer.peer)
        for key in keys:
            if self._by_peer.get(key) is conn:
                del self._by_peer[key]

    def _alias(self, conn: _Connection, key: tuple[str, str, int]) -> None:
        """RFC 5923: requests to ``key`` (the sent-by of a Via with ``alias``) reuse ``conn``."""
        current = self._by_peer.get(key)
        if current is None or current.closed:
            self._by_peer[key] = conn
            conn.aliases.append(key)

    def _arm_sweeper(self) -> None:
        # A quarter of the shortest timeout: a connection is closed at most 25 % late.
        timeouts = [t for t in (self.idle_timeout, self.read_timeout) if t > 0]
        if not timeouts or self._closed:
            return
        period = max(min(min(timeouts) / 4, _MAX_SWEEP_PERIOD), 0.01)
        self._sweeper = self.loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout``, or holding an incomplete message for
        ``read_timeout`` (one loop timer for all of them)."""
        self._sweeper = None
        now = self._now()
        idle = self.idle_timeout
        read = self.read_timeout
        for conn in list(self._connections.values()):
            transport = conn.transport
            if transport is None:           # connecting, or its TLS handshake is running
                continue
            if read > 0 and conn.partial_since is not None and now - conn.partial_since >= read:
                log.debug("closing %s: an incomplete message for %.1f s (read_timeout)",
                          conn.peer, now - conn.partial_since)
                self.stats.closed_read_timeout += 1
                conn.close(abort=True)
            elif idle > 0 and now - conn.last_active >= idle:
                log.debug("closing idle connection to %s", conn.peer)
                self.stats.closed_idle += 1
                # Data still unwritten after that long will not be read: do not wait for it.
                conn.close(abort=transport.get_write_buffer_size() > 0)
        if self._connections:
            self._arm_sweeper()

    # -- receiving -------------------------------------------------------------------------

    def _answer_malformed(self, data: bytes, exc: ParseError, source: Address) -> None:
        self.stats.malformed += 1
        answer_malformed(data, exc, source, self)

    def _deliver(self, msg: Request | Response, source: Address, data: bytes = b"") -> None:
        """A message framed on a connection (``data``: its bytes): RFC 5923 aliases, then --
        when another worker owns its call, ``stream_steer`` hands it there -- the intake's
        §18 checks and up."""
        if isinstance(msg, Request) and source.reliable and source.connection:
            # Requests to the sent-by of a Via with ``alias`` reuse this connection (a
            # stream's only: a datagram's ``connection`` is a socket id, not a connection).
            via = msg.top_via
            if via is not None and "alias" in via.params:
                conn = self._connections.get(source.connection)
                if conn is not None:
                    port = via.port or DEFAULT_PORTS.get(source.transport, 5060)
                    self._alias(conn, (source.transport, strip_brackets(via.host), port))
        steer = self.stream_steer
        if steer is not None and data and steer(msg, data, source):
            return
        deliver_message(msg, source, self.on_message, self._local if self.check_via else None)

    # -- errors, tasks, shutdown -----------------------------------------------------------

    def _fail(self, dest: Address) -> None:
        callback = self.on_error
        if callback is None:
            return
        try:
            callback(dest)
        except Exception:
            log.exception("error in the transport error callback for %s", dest)

    def _fail_soon(self, dest: Address) -> None:
        # Never call back into the sender from inside its own send() (the Transport contract).
        self.loop.call_soon(self._fail, dest)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _now(self) -> float:
        return self.loop.time()

    def connections(self) -> Iterator[Address]:
        """The peers of the open TCP/TLS connections (``connection`` set to their ids)."""
        for conn in self._connections.values():
            if conn.peer is not None and not conn.closed:
                yield conn.peer

    async def close(self) -> None:
        """Close every listener and connection; pending connects are abandoned."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self._connections.values()):
            conn.close()
        servers = []
        for listener in [*self.listeners, *self._own.values()]:
            if listener._udp is not None:
                listener._udp.close()
            if listener._acceptor is not None:
                listener._acceptor.close()
            if listener._server is not None:
                listener._server.close()
                servers.append(listener._server)
        for server in servers:
            await server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.listeners.clear()
        self._nearest_cache.clear()
        self._own.clear()
        self._local.clear()


def _bind_stream(host: str, port: int, family: int, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on (host, port), set up as asyncio's create_server would: address
    reuse on POSIX (a restart need not wait out TIME_WAIT), IPv6 only on an IPv6 address.
    ``reuse_port``: SO_REUSEPORT, so several workers listen on it (the kernel spreads the
    connections over them)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if sys.platform != "win32":     # on Windows it would let another socket steal the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
