# cython: language_level=3
"""The UDP path of the asyncio shell, compiled: the methods of
:class:`~fastsip.asyncio.transport.TransportLayer` (and of its datagram protocol) that run for
every datagram received or sent.  ``transport.py`` documents the layer and binds these as its
methods (``TransportLayer.send = send`` ...): Cython functions bind like Python ones, so the
class, its API and its subclasses are unchanged.

Why compiled: the shell is plain Python around a compiled core, and a proxied call (13
datagrams) ran ~60 Python frames of it -- receiving, choosing the socket a message leaves
from, naming our end for Via and Record-Route -- about as many as the routes layer and its
log line.  Here they are C calls that read the layer's attributes; the policy they apply is
the same, and the sockets are still the shell's alone (the loop's datagram transport, or
``_UdpSocket``'s).
"""

from fastsip.transport._address cimport Address

import ipaddress
import logging
import socket
from functools import lru_cache

from fastsip.transport.intake import receive_datagram as _receive_datagram

log = logging.getLogger("fastsip.asyncio.transport")

STREAM = ("TCP", "TLS")
WILDCARDS = ("0.0.0.0", "::", "")
#: The largest UDP payload over IPv4 (65535 - 8 - 20); bigger sends fail at once.
MAX_DATAGRAM = 65507
#: What a transport may hold unsent: past it a datagram is dropped (the socket cannot keep
#: up), and a connection whose peer stops reading is closed (transport.py's streams).
MAX_WRITE_BUFFER = 4 * 1024 * 1024
#: A worker's own UDP socket beside listener L (see TransportLayer.own_sockets) has id
#: OWN_ID + L: UDP ids travel in one byte between workers (workers._HEADER), so up to 127
#: listeners have one.
OWN_ID = 128
#: Where a request's top Via is looked for (see send_udp): the request line and the first
#: header, ours, fit in it.
VIA_WINDOW = 512

cdef int _OWN_ID = OWN_ID
cdef Py_ssize_t _MAX_DATAGRAM = MAX_DATAGRAM
cdef Py_ssize_t _MAX_WRITE_BUFFER = MAX_WRITE_BUFFER
cdef Py_ssize_t _VIA_WINDOW = VIA_WINDOW


@lru_cache(maxsize=4096)
def is_loopback(str host) -> bool:
    try:
        return ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=4096)
def family_of(str host) -> int:
    """AF_INET/AF_INET6 for an IP literal, 0 for a name (needs resolving)."""
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return 0
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


# -- choosing the socket ------------------------------------------------------------------------

cdef object _listener(layer, Py_ssize_t lid):
    if lid > _OWN_ID:
        return layer._own.get(lid)
    listeners = layer.listeners
    if 0 < lid <= len(listeners):
        listener = listeners[lid - 1]
        if listener.id == lid:
            return listener
    return None


cdef object _nearest(list candidates, str host):
    """Of the listeners that can carry a message to ``host``, the one to use: the first bound
    to a wildcard or on the same side of loopback as ``host`` (a socket bound to 127.0.0.1
    cannot reach the world, one bound to a public address should not talk to 127.0.0.1),
    else the first; None without any."""
    loopback = is_loopback(host)
    for candidate in candidates:
        bound = candidate.address.host
        if bound in WILDCARDS or is_loopback(bound) == loopback:
            return candidate
    return candidates[0] if candidates else None


cdef object _nearest_of(layer, str transport, int family, str host, bint udp):
    """:func:`_nearest` of the listeners of ``transport`` and ``family`` (any family for 0, a
    name), or with ``udp`` of the UDP sockets of ``family``.  The choice depends on the host
    only through which side of loopback it is on, and on the listeners, which change only
    when the layer listens or closes (both clear the cache): so it is made once per kind of
    destination, not per message (a call asks ~8 times)."""
    cdef dict cache = layer._nearest_cache
    cdef bint loopback = is_loopback(host)
    key = (transport, family, loopback, udp)
    found = cache.get(key, cache)
    if found is not cache:
        return found
    if udp:
        found = _nearest([c for c in layer.listeners if c._udp is not None
                          and c.family == family], host)
    else:
        found = _nearest([c for c in layer.listeners if c.address.transport == transport
                          and (not family or c.family == family)], host)
    cache[key] = found
    return found


cdef object _listener_for(layer, Address dest):
    # The listener a message to (or from) ``dest`` uses: the one ``dest.connection`` names (a
    # socket, or a connection's listener), else the nearest of its transport and family.
    transport = dest.transport
    cdef Py_ssize_t connection = dest.connection
    if connection:
        if transport == "UDP":
            found = _listener(layer, connection)
            if found is not None and found.address.transport == "UDP":
                return found
        else:
            conn = layer._connections.get(connection)
            if conn is not None and conn.lid:
                return _listener(layer, conn.lid)
    host = dest.host
    return _nearest_of(layer, transport, family_of(host), host, False)


cdef object _local_for(layer, Address dest):
    found = _listener_for(layer, dest)
    if found is None:
        host, port = layer.sent_by(dest.transport)
        return Address(dest.transport, host, port)
    host, port = found.sent_by
    return Address(found.address.transport, host, port, found.id)


def local_for(self, dest):
    """Our end of a message to (or one that came from) ``dest``: the transport, the
    advertised host and port of the listener it leaves from (or arrived on), and that
    listener's id as ``connection`` -- what our Via and Record-Route must name so the
    peer's answers come back to the same socket.

    A ``dest`` that names a socket or connection (``connection``, as a source Address
    does) gives the listener it is on; otherwise the one :meth:`send` would pick: same
    transport and address family, on the same side of loopback.  With no listener of that
    transport, the first listener's address stands in (as :meth:`sent_by`), id 0."""
    return _local_for(self, dest)


def via_for(self, Address dest, local=None):
    """Our end of a request we start towards ``dest``, for its Via: :meth:`local_for`'s
    (``local``, when the caller has it already), but a worker's own socket
    (``own_sockets``) where the request will leave from it -- the port its responses
    must come back to."""
    if self._own and not dest.connection and dest.transport == "UDP":
        found = _listener_for(self, dest)
        if found is not None and found.own is not None:
            own = found.own
            return Address("UDP", own.sent_by[0], own.sent_by[1], own.id)
    return local if local is not None else _local_for(self, dest)


cdef object _udp_listener(layer, int family, str host):
    return _nearest_of(layer, "UDP", family, host, True)


def udp_listener(self, int family, str host=""):
    """The UDP listener to send from: one of ``family``, preferring one on the same side
    of loopback as ``host`` (a socket bound to 127.0.0.1 cannot reach the world, one
    bound to a public address should not talk to 127.0.0.1), else the first."""
    return _udp_listener(self, family, host)


# -- sending ------------------------------------------------------------------------------------

def send(self, data, Address dest):
    """Send one message to ``dest``; never blocks or raises for network trouble (failures
    go to ``on_error(dest)``).  Stream transports: ``dest.connection`` while open, else
    an open connection to ``dest.peer``, else a new one (data queued until it is up).
    A host name (not an IP literal) is resolved first (A/AAAA, RFC 3263 §4.2)."""
    if self._closed:
        return
    transport = dest.transport
    if transport == "UDP":
        _send_udp(self, data, dest)
    elif transport in STREAM:
        self._send_stream(data, dest)
    else:
        log.debug("no %s transport for %s", transport, dest)
        self._fail_soon(dest)


cdef _send_udp(layer, data, Address dest):
    host = dest.host
    cdef int family = family_of(host)
    if family == 0:
        layer._spawn(layer._resolve_then_send(data, dest))
        return
    if len(data) > _MAX_DATAGRAM:
        log.debug("%d bytes do not fit in a UDP datagram to %s", len(data), dest)
        layer._fail_soon(dest)
        return
    sock = None
    cdef Py_ssize_t connection = dest.connection
    if connection:
        # The socket the peer's datagram arrived on (a response, a NAT flow): leave from
        # it, so the peer (and its NAT) sees the address it sent to.
        found = _listener(layer, connection)
        if found is not None and found.family == family:
            sock = found._udp
            if sock is not None and sock.closed:
                sock = None
    if sock is None:
        found = _udp_listener(layer, family, host)
        if found is not None:
            sock = found._udp
            own = found.own
            # A request leaves from the socket its top Via names (the peer answers
            # there, §18.2.2, and by rport the source): a worker's own one when the
            # proxy put it in (via_for), the shared one for what names that (a trunk's
            # REGISTER, whose Contact is the shared address too: a provider that takes
            # the source for the Contact behind "NAT" must get the shared port).
            if own is not None and own._udp is not None and \
                    data.find(own.via_mark, 0, _VIA_WINDOW) >= 0:
                sock = own._udp
            if sock is not None and sock.closed:
                sock = None
    if sock is None:
        log.debug("no UDP listener for the address family of %s", dest)
        layer._fail_soon(dest)
        return
    sock.send(data, dest)


def send_udp(self, data, dest):
    """One datagram to ``dest`` (an IP literal, or a name resolved first), from the socket
    it must leave from: the one ``dest.connection`` names, else a listener of its family
    on its side of loopback (a worker's own socket when the request's Via names it)."""
    _send_udp(self, data, dest)


def datagram_send(self, data, Address dest):
    """The datagram protocol's send: through the loop's transport, dropped (and counted)
    past MAX_WRITE_BUFFER queued, a synchronous error reported to the layer."""
    transport = self.transport
    if transport is None:
        self.layer._fail_soon(dest)
        return
    if transport.get_write_buffer_size() > _MAX_WRITE_BUFFER:
        # The transport queues what the socket cannot take now; past this, drop (as
        # _UdpSocket does at once) rather than grow memory under overload.
        self.layer.stats.sends_dropped += 1
        log.debug("UDP send to %s dropped: send queue full", dest)
        return
    try:
        transport.sendto(data, (dest.host, dest.port))
    except OSError as exc:      # e.g. an unreachable network, reported synchronously
        log.debug("UDP send to %s failed: %s", dest, exc)
        self.layer._fail_soon(dest)


# -- receiving ----------------------------------------------------------------------------------

cdef _receive(layer, data, str host, int port, int lid, bint steer):
    _receive_datagram(data, host, port, lid, layer.limits, layer, layer.on_message,
                      layer._local if layer.check_via else None,
                      layer.steer if steer else None, layer._answer_malformed)


def receive(self, data, str host, int port, int lid=0, bint steer=True):
    """One datagram ``admit`` let through on listener ``lid``, to the sans-IO intake
    (:func:`~fastsip.transport.intake.receive_datagram`: keep-alives, STUN, malformed
    requests, the §18 checks).  The source Address it hands up names the socket as
    ``connection``, so whatever answers it leaves from the same socket.  ``steer``
    False: a datagram another worker handed us, ours by definition."""
    _receive(self, data, host, port, lid, steer)


def datagram_received(self, data, addr):
    """The datagram protocol's receive: counted, asked to ``admit`` (with the loop's time),
    then to the intake; an error below is logged, never raised into the loop."""
    layer = self.layer
    stats = layer.stats
    stats.datagrams += 1
    try:
        host = addr[0]
        admit = layer.admit
        if admit is not None and not admit(host, self._time()):
            stats.datagrams_denied += 1
            return
        _receive(layer, data, host, addr[1], self.lid, True)
    except Exception:
        log.exception("error receiving a UDP datagram")
