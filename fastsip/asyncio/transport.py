"""SIP over UDP, TCP and TLS on an asyncio (or uvloop) event loop: the :class:`TransportLayer`.

It implements :class:`fastsip.transport.Transport` (what the sans-IO layers send through) and
feeds what arrives, parsed, to one receive callback (the transaction layer's ``receive``).

- UDP: one socket per listener; responses and requests leave from a listening socket, so a NAT
  sees the same port both ways.  A datagram that does not parse is logged and dropped.
- TCP/TLS: every connection, accepted or opened by us, is in one table keyed by its id and by its
  peer (transport, host, port), and is reused for anything sent to that peer (RFC 5923 style).
  Streams are framed with :func:`fastsip.message_length`; CRLFCRLF keep-alives get a CRLF pong
  (RFC 5626 §3.5.1); a stream that cannot be resynchronized is closed; idle connections are
  closed after ``idle_timeout``.  Buffers are bounded by the message size limit.
- ``send()`` never blocks and never raises for network trouble: a failed connect (or a peer we
  cannot reach at all) is reported through the ``on_error`` callback, which the
  :class:`~fastsip.asyncio.endpoint.Endpoint` wires to the transaction layer's
  ``transport_error(dest)``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from functools import lru_cache
from typing import Any, cast

from fastsip.errors import FastSIPError, ParseError
from fastsip.sip import Limits, Message, Request, message_length, parse
from fastsip.transport import DEFAULT_PORTS, Address
from fastsip.transport.rules import (
    check_sent_by,
    error_response,
    stamp_received,
    strip_brackets,
)

__all__ = ["Listener", "TransportLayer", "parse_listen"]

log = logging.getLogger("fastsip.asyncio.transport")

MessageCallback = Callable[[Message, Address], None]
ErrorCallback = Callable[[Address], None]

_STREAM = ("TCP", "TLS")
_WILDCARDS = ("0.0.0.0", "::", "")
_PONG = b"\r\n"
# A peer that stops reading cannot make us hold more than this per connection.
_MAX_WRITE_BUFFER = 4 * 1024 * 1024
# The largest UDP payload over IPv4 (65535 - 8 - 20); bigger sends fail at once.
_MAX_DATAGRAM = 65507


def parse_listen(spec: str) -> tuple[str, str, int]:
    """``"udp:127.0.0.1:5060"``, ``"tcp:[::1]:5060"``, ``"tls:0.0.0.0:5061"`` →
    ``("UDP", "127.0.0.1", 5060)``.  The port may be omitted (the transport's default) or 0
    (any free port).  Raises ValueError with the reason for anything else."""
    transport, sep, rest = spec.partition(":")
    transport = transport.upper()
    if not sep or transport not in ("UDP", "TCP", "TLS"):
        raise ValueError(f"listen spec {spec!r}: expected udp:, tcp: or tls: then host[:port]")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise ValueError(f"listen spec {spec!r}: unclosed '[' in IPv6 host")
        host, tail = rest[1:end], rest[end + 1:]
        if tail and not tail.startswith(":"):
            raise ValueError(f"listen spec {spec!r}: expected ':port' after ']'")
        port_text = tail[1:]
    elif rest.count(":") > 1:
        raise ValueError(f"listen spec {spec!r}: write an IPv6 host in brackets, [::1]:5060")
    else:
        host, _, port_text = rest.partition(":")
    if not host:
        raise ValueError(f"listen spec {spec!r}: missing host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"listen spec {spec!r}: host must be an IP address, not {host!r}") \
            from None
    if port_text:
        if not port_text.isdigit() or int(port_text) > 65535:
            raise ValueError(f"listen spec {spec!r}: bad port {port_text!r}")
        port = int(port_text)
    else:
        port = DEFAULT_PORTS[transport]
    return transport, host, port


@lru_cache(maxsize=4096)
def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=4096)
def _family(host: str) -> int:
    """AF_INET/AF_INET6 for an IP literal, 0 for a name (needs resolving)."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return 0
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


class Listener:
    """A bound listening socket: ``address`` has the real port (after port 0), ``sent_by`` what
    we advertise in Via for it (the ``advertise`` address, else the bound one)."""

    __slots__ = ("_server", "_udp", "address", "family", "sent_by")

    def __init__(self, address: Address, family: int, sent_by: tuple[str, int]) -> None:
        self.address = address
        self.family = family
        self.sent_by = sent_by
        self._server: asyncio.AbstractServer | None = None
        self._udp: asyncio.DatagramTransport | None = None

    def __repr__(self) -> str:
        return f"<Listener {self.address} sent-by {self.sent_by[0]}:{self.sent_by[1]}>"


class _Datagram(asyncio.DatagramProtocol):
    """One UDP listening socket."""

    def __init__(self, layer: TransportLayer) -> None:
        self.layer = layer
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        layer = self.layer
        if len(data) <= 4 and not data.strip():
            return  # RFC 5626 §4.4.1 STUN-less keep-alive (CRLF) over UDP: nothing to do
        try:
            msg = parse(data, layer.limits)
        except ParseError as exc:
            log.debug("malformed datagram from %s:%s: %s", addr[0], addr[1], exc)
            layer._answer_malformed(data, exc, Address("UDP", addr[0], addr[1]))
            return
        layer._deliver(msg, Address("UDP", addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        # ICMP errors on an unconnected socket cannot be tied to one destination reliably.
        log.debug("UDP socket error: %s", exc)


class _Connection(asyncio.Protocol):
    """One TCP or TLS connection, accepted or opened by us, framed per RFC 3261 §18.3."""

    def __init__(self, layer: TransportLayer, transport_name: str, cid: int,
                 peer: Address | None = None) -> None:
        self.layer = layer
        self.name = transport_name
        self.id = cid
        self.peer = peer                       # known up front for outgoing connections
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.pending: list[bytes] = []         # written once connected
        self.pending_size = 0
        self.last_active = layer._loop.time() if layer._loop is not None else 0.0
        self.closed = False
        self.aliases: list[tuple[str, str, int]] = []

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        if self.peer is None:                  # accepted: the peer is the remote socket
            remote = transport.get_extra_info("peername")
            self.peer = Address(self.name, remote[0], remote[1], self.id)
            self.layer._register(self)
        for data in self.pending:
            transport.write(data)
        self.pending.clear()
        self.pending_size = 0
        self.last_active = self.layer._now()

    def data_received(self, data: bytes) -> None:
        self.last_active = self.layer._now()
        buf = self.buffer
        buf += data
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
        if len(buf) > limits.max_message_size:  # message_length raises first; belt and braces
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.layer._unregister(self)

    # -- ours ------------------------------------------------------------------------------

    def _dispatch(self, chunk: bytes) -> None:
        assert self.peer is not None
        try:
            msg = parse(chunk, self.layer.limits)
        except ParseError as exc:
            # Framing held, so the stream stays in sync: answer (or drop) just this message.
            log.debug("malformed message from %s: %s", self.peer, exc)
            self.layer._answer_malformed(chunk, exc, self.peer)
            return
        self.layer._deliver(msg, self.peer)

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
            self.close()
            return False
        self.transport.write(data)
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True
        self.layer._unregister(self)


class TransportLayer:
    """The asyncio implementation of :class:`fastsip.transport.Transport` (RFC 3261 §18).

    ``on_message(msg, source)`` receives every parsed request and response (a request's top Via
    already carries ``received``/``rport``, §18.2.1); ``on_error(dest)`` hears of sends that
    failed (wire it to ``TransactionLayer.transport_error``).  Both may be set after
    construction.  ``check_via`` drops responses whose top Via is not ours (§18.1.2).
    ``tls_context`` is the server context (certificate) for ``tls:`` listeners;
    ``tls_client_context`` verifies servers we connect to (default: the system trust store).
    """

    def __init__(
        self,
        on_message: MessageCallback | None = None,
        on_error: ErrorCallback | None = None,
        *,
        tls_context: ssl.SSLContext | None = None,
        tls_client_context: ssl.SSLContext | None = None,
        limits: Limits | None = None,
        idle_timeout: float = 300.0,
        connect_timeout: float = 10.0,
        check_via: bool = True,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.on_message = on_message
        self.on_error = on_error
        self.tls_context = tls_context
        self.tls_client_context = tls_client_context
        self.limits = limits if limits is not None else Limits()
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.check_via = check_via
        self._loop = loop
        self.listeners: list[Listener] = []
        self._connections: dict[int, _Connection] = {}
        self._by_peer: dict[tuple[str, str, int], _Connection] = {}
        self._next_id = 1
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._local: list[tuple[str, int]] = []
        self._closed = False

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
        loop = self.loop
        family = _family(host)
        if transport == "UDP":
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _Datagram(self), local_addr=(host, port), family=family)
            bound = udp.get_extra_info("sockname")
            server = None
        else:
            ctx = None
            if transport == "TLS":
                if self.tls_context is None:
                    raise FastSIPError(f"{spec}: a tls: listener needs a tls_context")
                ctx = self.tls_context
            name = transport
            server = await loop.create_server(
                lambda: _Connection(self, name, self._new_id()), host, port,
                family=family, ssl=ctx, reuse_address=True)
            bound = server.sockets[0].getsockname()
            udp = None
        address = Address(transport, bound[0], bound[1])
        sent_by = self._advertised(address, advertise)
        listener = Listener(address, family, sent_by)
        listener._server = server
        listener._udp = udp
        self.listeners.append(listener)
        self._local.append(sent_by)
        if sent_by[0] != address.host or sent_by[1] != address.port:
            self._local.append((address.host, address.port))
        log.info("listening on %s (sent-by %s:%d)", address, *sent_by)
        return listener

    def _advertised(self, address: Address, advertise: str | None) -> tuple[str, int]:
        if advertise:
            if advertise.startswith("["):
                host, _, port = advertise[1:].partition("]")
                port = port[1:]
            elif advertise.count(":") == 1:
                host, _, port = advertise.partition(":")
            else:
                host, port = advertise, ""
            return (host, int(port) if port else address.port)
        if address.host in _WILDCARDS:
            return (_guess_local_ip(address.host == "::"), address.port)
        return (address.host, address.port)

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

    def send(self, data: bytes, dest: Address) -> None:
        """Send one message to ``dest``; never blocks or raises for network trouble (failures
        go to ``on_error(dest)``).  Stream transports: ``dest.connection`` while open, else
        an open connection to ``dest.peer``, else a new one (data queued until it is up).
        A host name (not an IP literal) is resolved first (A/AAAA, RFC 3263 §4.2)."""
        if self._closed:
            return
        if dest.transport == "UDP":
            self._send_udp(data, dest)
        elif dest.transport in _STREAM:
            self._send_stream(data, dest)
        else:
            log.debug("no %s transport for %s", dest.transport, dest)
            self._fail_soon(dest)

    # -- UDP -------------------------------------------------------------------------------

    def _udp_socket(self, family: int, host: str = "") -> asyncio.DatagramTransport | None:
        """The listening socket to send from: one of ``family``, preferring one on the same
        side of loopback as ``host`` (a socket bound to 127.0.0.1 cannot reach the world, one
        bound to a public address should not talk to 127.0.0.1), else the first."""
        fallback = None
        loopback = _is_loopback(host)
        for listener in self.listeners:
            if listener._udp is None or listener.family != family:
                continue
            bound = listener.address.host
            if bound in _WILDCARDS or _is_loopback(bound) == loopback:
                return listener._udp
            if fallback is None:
                fallback = listener._udp
        return fallback

    def _send_udp(self, data: bytes, dest: Address) -> None:
        family = _family(dest.host)
        if family == 0:
            self._spawn(self._resolve_then_send(data, dest))
            return
        if len(data) > _MAX_DATAGRAM:
            log.debug("%d bytes do not fit in a UDP datagram to %s", len(data), dest)
            self._fail_soon(dest)
            return
        sock = self._udp_socket(family, dest.host)
        if sock is None or sock.is_closing():
            log.debug("no UDP listener for the address family of %s", dest)
            self._fail_soon(dest)
            return
        try:
            sock.sendto(data, (dest.host, dest.port))
        except OSError as exc:      # e.g. an unreachable network, reported synchronously
            log.debug("UDP send to %s failed: %s", dest, exc)
            self._fail_soon(dest)

    async def _resolve_then_send(self, data: bytes, dest: Address) -> None:
        try:
            infos = await self.loop.getaddrinfo(dest.host, dest.port, type=socket.SOCK_DGRAM)
        except OSError as exc:
            log.debug("cannot resolve %s: %s", dest.host, exc)
            self._fail(dest)
            return
        for family, *_, sockaddr in infos:
            if self._udp_socket(family, str(sockaddr[0])) is not None:
                self._send_udp(data, Address(dest.transport, str(sockaddr[0]), dest.port))
                return
        self._fail(dest)

    # -- TCP / TLS -------------------------------------------------------------------------

    def _send_stream(self, data: bytes, dest: Address) -> None:
        conn = None
        if dest.connection:
            conn = self._connections.get(dest.connection)
        if conn is None or conn.closed:
            conn = self._by_peer.get(dest.peer)
        if conn is not None and not conn.closed and conn.write(data):
            return
        if conn is not None and not conn.closed:
            self._fail_soon(dest)      # open but refusing (write buffer full)
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
            server_hostname = dest.host
        try:
            await asyncio.wait_for(
                self.loop.create_connection(lambda: conn, dest.host, dest.port, ssl=ctx,
                                            server_hostname=server_hostname),
                self.connect_timeout)
        except (OSError, asyncio.TimeoutError, ssl.SSLError) as exc:
            log.debug("cannot connect to %s: %s", dest, exc)
            conn.closed = True
            self._unregister(conn)
            self._fail(dest)

    def _new_id(self) -> int:
        cid = self._next_id
        self._next_id += 1
        return cid

    def _register(self, conn: _Connection) -> None:
        assert conn.peer is not None
        self._connections[conn.id] = conn
        self._by_peer[conn.peer.peer] = conn
        if self._sweeper is None and self.idle_timeout > 0:
            self._arm_sweeper()

    def _unregister(self, conn: _Connection) -> None:
        if self._connections.pop(conn.id, None) is None:
            return
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
        period = max(min(self.idle_timeout / 4, 30.0), 0.01)
        self._sweeper = self.loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for ``idle_timeout`` (one loop timer for all of them)."""
        self._sweeper = None
        deadline = self._now() - self.idle_timeout
        for conn in list(self._connections.values()):
            if conn.last_active <= deadline and conn.transport is not None:
                log.debug("closing idle connection to %s", conn.peer)
                conn.close()
        if self._connections and not self._closed:
            self._arm_sweeper()

    # -- receiving -------------------------------------------------------------------------

    def _answer_malformed(self, data: bytes, exc: ParseError, source: Address) -> None:
        # A request that fails to parse gets the RFC's answer (400/505/513) straight back to
        # where it came from, statelessly; responses and hopeless input are dropped.
        answer = error_response(data, exc)
        if answer is not None:
            self.send(answer, source)

    def _deliver(self, msg: Message, source: Address) -> None:
        if isinstance(msg, Request):
            via = msg.top_via
            if via is None:
                log.debug("dropping %s from %s: no Via", msg.method, source)
                return
            if source.connection and "alias" in via.params:
                conn = self._connections.get(source.connection)
                if conn is not None:
                    port = via.port or DEFAULT_PORTS.get(source.transport, 5060)
                    self._alias(conn, (source.transport, strip_brackets(via.host), port))
            stamp_received(msg, source)
        elif self.check_via and not check_sent_by(msg, self._local):  # type: ignore[arg-type]
            log.debug("dropping response from %s: top Via is not ours", source)
            return
        callback = self.on_message
        if callback is None:
            return
        try:
            callback(msg, source)
        except Exception:
            # One bad message (or a bug above us) must not take the listener down.
            log.exception("error handling a message from %s", source)

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
        for listener in self.listeners:
            if listener._udp is not None:
                listener._udp.close()
            if listener._server is not None:
                listener._server.close()
                servers.append(listener._server)
        for server in servers:
            await server.wait_closed()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.listeners.clear()
        self._local.clear()


def _guess_local_ip(v6: bool) -> str:
    """The address the routing table would use to reach the outside world (a connected UDP
    socket sends nothing); the loopback address when there is no route."""
    family = socket.AF_INET6 if v6 else socket.AF_INET
    probe = "2001:db8::1" if v6 else "192.0.2.1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            return str(s.getsockname()[0])
    except OSError:
        return "::1" if v6 else "127.0.0.1"
