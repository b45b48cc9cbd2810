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
the same, and the sockets are still the shell's alone.

:class:`UdpSocket` is a listening socket read and written here, in C: a wakeup drains the
ready datagrams (``recvmmsg`` on Linux, else ``recvfrom``) into one buffer, names each source
from a small cache (no ``inet_ntop`` and new string per datagram), and holds what the handlers
send until the drain ends, then sends it together (``sendmmsg`` on Linux, else ``sendto``) to
addresses ``inet_pton`` made -- where the loop's datagram transport (uvloop's included)
converts addresses through Python tuples and caches both ways, calls back into Python per
datagram, and makes a system call per datagram each way.  The loop's datagram transport
(:func:`datagram_received`, :func:`datagram_send`) stands in where the loop cannot watch a
socket (Windows' proactor).
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeASCII
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from fastsip.rtp._net cimport (
    AF_INET,
    AF_INET6,
    FS_ERR_AGAIN,
    FS_ERR_INTR,
    fs_errno,
    fs_error_class,
    fs_sockaddr_from_text,
    fs_source_name,
    ntohs,
    same_host,
    sockaddr_in,
    sockaddr_in6,
    sockaddr_storage,
)
from fastsip.timers._wheel cimport TimerWheel
from fastsip.transport._address cimport Address, HostMemo, memo_get
from fastsip.transport._base cimport TransportBase, admit_c, direct_callee
from fastsip.transport._intake cimport receive_datagram_c

import ipaddress
import logging
import os
import socket

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


def _address_kind(str host) -> int:
    # Both facts the shell needs of a destination host, from one parse: its family times two
    # (AF_INET/AF_INET6; 0 for a name), plus one for a loopback address.
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return 0
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET) * 2 + ip.is_loopback


# Remembered per host (bounded: a flood of distinct hosts starts it over).
cdef HostMemo _KIND = HostMemo(_address_kind)


cdef bint _is_loopback(str host) except -1:
    return <int>memo_get(_KIND, host) & 1


cdef int _family_of(str host) except -1:
    return <int>memo_get(_KIND, host) >> 1


def is_loopback(str host) -> bool:
    """Is ``host`` a loopback IP literal (a zone after ``%`` ignored)?"""
    return _is_loopback(host)


def family_of(str host) -> int:
    """AF_INET/AF_INET6 for an IP literal, 0 for a name (needs resolving)."""
    return _family_of(host)


# -- the layer's state, as C fields --------------------------------------------------------------

#: The counters of TransportStats, in the order its repr and its keyword arguments take them.
_STATS_FIELDS = ("datagrams", "datagrams_denied", "connections_denied", "connections_refused",
                 "connections_refused_per_source", "messages_denied", "connects_refused",
                 "closed_idle", "closed_read_timeout", "tls_handshakes_failed", "sends_dropped",
                 "kernel_filtered", "malformed")


@cython.final
cdef class TransportStats:
    """What the transport took in and turned away, counted since it was made (plain ints:
    read them, or reset them, from the loop's thread).  Compiled: every wakeup of a UDP
    socket adds to ``datagrams``, which as a Python object's attribute cost a lookup and a
    store through the generic attribute protocol each time.

    - ``datagrams``, ``datagrams_denied``: UDP datagrams read, and those of them ``admit``
      dropped before parsing;
    - ``connections_denied`` / ``connections_refused`` / ``connections_refused_per_source``:
      accepted connections closed at once: ``admit`` said no / over ``max_connections`` /
      over ``max_connections_per_source``;
    - ``messages_denied``: connections closed because ``admit`` refused a message on them;
    - ``connects_refused``: outgoing connects not made because ``max_connections`` were open
      (reported to on_error);
    - ``closed_idle``, ``closed_read_timeout``: connections closed by the sweeper: idle, or an
      incomplete message held too long;
    - ``tls_handshakes_failed``: accepted TLS connections whose handshake failed or outlasted
      tls_handshake_timeout;
    - ``sends_dropped``: UDP sends dropped because the socket could not take them (EAGAIN,
      ENOBUFS);
    - ``kernel_filtered``: banned sources the kernel currently drops for us (drop_sources);
    - ``malformed``: messages (datagrams, or messages framed on a stream) that did not parse.
    """

    cdef public long long datagrams
    cdef public long long datagrams_denied
    cdef public long long connections_denied
    cdef public long long connections_refused
    cdef public long long connections_refused_per_source
    cdef public long long messages_denied
    cdef public long long connects_refused
    cdef public long long closed_idle
    cdef public long long closed_read_timeout
    cdef public long long tls_handshakes_failed
    cdef public long long sends_dropped
    cdef public long long kernel_filtered
    cdef public long long malformed

    def __init__(self, *, long long datagrams=0, long long datagrams_denied=0,
                 long long connections_denied=0, long long connections_refused=0,
                 long long connections_refused_per_source=0, long long messages_denied=0,
                 long long connects_refused=0, long long closed_idle=0,
                 long long closed_read_timeout=0, long long tls_handshakes_failed=0,
                 long long sends_dropped=0, long long kernel_filtered=0,
                 long long malformed=0):
        self.datagrams = datagrams
        self.datagrams_denied = datagrams_denied
        self.connections_denied = connections_denied
        self.connections_refused = connections_refused
        self.connections_refused_per_source = connections_refused_per_source
        self.messages_denied = messages_denied
        self.connects_refused = connects_refused
        self.closed_idle = closed_idle
        self.closed_read_timeout = closed_read_timeout
        self.tls_handshakes_failed = tls_handshakes_failed
        self.sends_dropped = sends_dropped
        self.kernel_filtered = kernel_filtered
        self.malformed = malformed

    def as_dict(self):
        """The counters by name."""
        return {name: getattr(self, name) for name in _STATS_FIELDS}

    def __eq__(self, other):
        if type(other) is not TransportStats:
            return NotImplemented
        return self.as_dict() == (<TransportStats>other).as_dict()

    __hash__ = None

    def __repr__(self):
        fields = ", ".join(f"{name}={getattr(self, name)}" for name in _STATS_FIELDS)
        return f"TransportStats({fields})"


@cython.final
cdef class Listener:
    """A bound listening socket: ``address`` has the real port (after port 0), ``sent_by`` what
    we advertise in Via for it (the ``advertise`` address, else the bound one);
    ``receive_buffer`` is the SO_RCVBUF a UDP socket got (the kernel may cap what was asked).
    (Compiled: the UDP path reads its fields for every message it sends.)"""

    cdef readonly Address address
    cdef readonly int family
    cdef readonly tuple sent_by
    #: The socket's id: the ``connection`` of every Address a datagram arrived on it from
    #: (1, 2, ... in the order of listen(), so the same --listen list gives the same ids).
    cdef readonly int id
    #: Our end as a message names it (local_for): the transport, sent-by host and port, id.
    cdef readonly Address local
    #: How a Via naming this socket's sent-by reads (" HOST:PORT;"), for telling which socket
    #: a request names (an own socket's; see send_udp).
    cdef readonly bytes via_mark
    cdef public int receive_buffer
    cdef public object _server
    cdef public object _acceptor
    cdef public object _udp
    cdef public object _udp_sock        # for its kernel filter (banned sources)
    #: A worker's own UDP socket beside this shared one (TransportLayer.own_sockets): the
    #: requests it starts leave from there, so their responses come back to it.
    cdef public object own

    def __init__(self, Address address, int family, tuple sent_by, int lid=0):
        self.address = address
        self.family = family
        self.sent_by = sent_by
        self.id = lid
        self.local = Address(address.transport, sent_by[0], sent_by[1], lid)
        self.receive_buffer = 0
        host = f"[{sent_by[0]}]" if ":" in sent_by[0] else sent_by[0]
        self.via_mark = f" {host}:{sent_by[1]};".encode("ascii", "replace")

    def __repr__(self):
        return f"<Listener {self.address} sent-by {self.sent_by[0]}:{self.sent_by[1]}>"


#: The TransportLayer attributes the UDP path reads for every datagram: setting one of them
#: refreshes the layer's IntakeState (TransportLayer.__setattr__).
INTAKE_ATTRIBUTES = frozenset({"limits", "on_message", "check_via", "_local", "steer",
                               "_answer_malformed", "admit", "stats", "listeners", "_own",
                               "_nearest_cache", "_closed", "wheel"})


@cython.final
cdef class IntakeState:
    """What the UDP path reads of its layer for every datagram, as C fields: a snapshot that
    the layer refreshes whenever one of :data:`INTAKE_ATTRIBUTES` is set (its lists and
    dicts are the layer's own, so appending a listener needs no refresh).  Refreshed in
    place, never replaced: the layer's sockets and its ``compiled`` stand-in hold it."""

    cdef readonly object limits
    # The layer's on_message and admit, or the compiled objects whose bound methods they are
    # (the transaction layer, the source guard: called in C, see _base.direct_callee).
    cdef readonly object on_message
    cdef readonly object local          # our sent-bys for the Via check; None: no check
    cdef readonly object steer
    cdef readonly object answer_malformed
    cdef readonly object admit
    cdef readonly TransportStats stats
    cdef readonly list listeners
    cdef readonly dict own
    cdef readonly dict nearest
    cdef readonly bint closed
    # The timers' wheel, whose clock a wakeup holds at its one reading (None: not held).
    cdef readonly TimerWheel wheel

    def __init__(self, layer):
        self.refresh(layer)

    def refresh(self, layer):
        """Read the layer's attributes again (one of them was set): in place, so that those
        holding this object (the layer's sockets and ``compiled``) see the new values."""
        self.limits = layer.limits
        self.on_message = direct_callee(layer.on_message)
        self.local = layer._local if layer.check_via else None
        self.steer = layer.steer
        self.answer_malformed = layer._answer_malformed
        self.admit = direct_callee(layer.admit)
        self.stats = layer.stats
        self.listeners = layer.listeners
        self.own = layer._own
        self.nearest = layer._nearest_cache
        self.closed = layer._closed
        self.wheel = getattr(layer, "wheel", None)


# -- choosing the socket ------------------------------------------------------------------------

cdef inline IntakeState _state(layer):
    return <IntakeState?>layer._intake


cdef Listener _listener(IntakeState st, Py_ssize_t lid):
    cdef Listener listener
    if lid > _OWN_ID:
        return st.own.get(lid)
    if 0 < lid <= len(st.listeners):
        listener = st.listeners[lid - 1]
        if listener.id == lid:
            return listener
    return None


cdef Listener _nearest(list candidates, str host):
    """Of the listeners that can carry a message to ``host``, the one to use: the first bound
    to a wildcard or on the same side of loopback as ``host`` (a socket bound to 127.0.0.1
    cannot reach the world, one bound to a public address should not talk to 127.0.0.1),
    else the first; None without any."""
    cdef Listener candidate
    cdef bint loopback = _is_loopback(host)
    for candidate in candidates:
        bound = candidate.address.host
        if bound in WILDCARDS or _is_loopback(bound) == loopback:
            return candidate
    return candidates[0] if candidates else None


cdef Listener _nearest_of(IntakeState st, str transport, int family, str host, bint udp):
    """:func:`_nearest` of the listeners of ``transport`` and ``family`` (any family for 0, a
    name), or with ``udp`` of the UDP sockets of ``family``.  The choice depends on the host
    only through which side of loopback it is on, and on the listeners, which change only
    when the layer listens or closes (both clear the cache): so it is made once per kind of
    destination, not per message (a call asks ~8 times).  The cache is keyed by transport,
    then by a small number for the rest (no tuple made per message)."""
    cdef Listener c
    cdef dict by_kind = st.nearest.get(transport)
    cdef int kind = (family * 2 + _is_loopback(host)) * 2 + udp
    if by_kind is None:
        by_kind = st.nearest[transport] = {}
    found = by_kind.get(kind, by_kind)
    if found is not by_kind:
        return found
    if udp:
        found = _nearest([c for c in st.listeners if c._udp is not None
                          and c.family == family], host)
    else:
        found = _nearest([c for c in st.listeners if c.address.transport == transport
                          and (not family or c.family == family)], host)
    by_kind[kind] = found
    return found


cdef Listener _listener_for(layer, IntakeState st, Address dest):
    # The listener a message to (or from) ``dest`` uses: the one ``dest.connection`` names (a
    # socket, or a connection's listener), else the nearest of its transport and family.
    cdef Listener found
    transport = dest.transport
    cdef Py_ssize_t connection = dest.connection
    if connection:
        if transport == "UDP":
            found = _listener(st, connection)
            if found is not None and found.address.transport == "UDP":
                return found
        else:
            conn = layer._connections.get(connection)
            if conn is not None and conn.lid:
                return _listener(st, conn.lid)
    host = dest.host
    return _nearest_of(st, transport, _family_of(host), host, False)


cdef Address _local_for(layer, IntakeState st, Address dest):
    cdef Listener found = _listener_for(layer, st, dest)
    if found is None:
        host, port = layer.sent_by(dest.transport)
        return Address(dest.transport, host, port)
    return found.local


def local_for(self, dest):
    """Our end of a message to (or one that came from) ``dest``: the transport, the
    advertised host and port of the listener it leaves from (or arrived on), and that
    listener's id as ``connection`` -- what our Via and Record-Route must name so the
    peer's answers come back to the same socket.

    A ``dest`` that names a socket or connection (``connection``, as a source Address
    does) gives the listener it is on; otherwise the one :meth:`send` would pick: same
    transport and address family, on the same side of loopback.  With no listener of that
    transport, the first listener's address stands in (as :meth:`sent_by`), id 0."""
    return _local_for(self, _state(self), dest)


def via_for(self, Address dest, local=None):
    """Our end of a request we start towards ``dest``, for its Via: :meth:`local_for`'s
    (``local``, when the caller has it already), but a worker's own socket
    (``own_sockets``) where the request will leave from it -- the port its responses
    must come back to."""
    return _via_for(self, _state(self), dest, local)


cdef Address _via_for(layer, IntakeState st, Address dest, local):
    cdef Listener found, own
    if st.own and not dest.connection and dest.transport == "UDP":
        found = _listener_for(layer, st, dest)
        if found is not None and found.own is not None:
            own = found.own
            return own.local
    return local if local is not None else _local_for(layer, st, dest)


def udp_listener(self, int family, str host=""):
    """The UDP listener to send from: one of ``family``, preferring one on the same side
    of loopback as ``host`` (a socket bound to 127.0.0.1 cannot reach the world, one
    bound to a public address should not talk to 127.0.0.1), else the first."""
    return _nearest_of(_state(self), "UDP", family, host, True)


# -- sending ------------------------------------------------------------------------------------

def send(self, data, Address dest):
    """Send one message to ``dest``; never blocks or raises for network trouble (failures
    go to ``on_error(dest)``).  Stream transports: ``dest.connection`` while open, else
    an open connection to ``dest.peer``, else a new one (data queued until it is up).
    A host name (not an IP literal) is resolved first (A/AAAA, RFC 3263 §4.2)."""
    _send(self, _state(self), data, dest)


cdef _send(layer, IntakeState st, data, Address dest):
    if st.closed:
        return
    transport = dest.transport
    if transport == "UDP":
        _send_udp(layer, st, data, dest)
    elif transport in STREAM:
        layer._send_stream(data, dest)
    else:
        log.debug("no %s transport for %s", transport, dest)
        layer._fail_soon(dest)


@cython.final
cdef class LayerTransport(TransportBase):
    """A TransportLayer's ``send``, ``local_for`` and ``via_for`` as C methods (its
    ``compiled`` attribute, :mod:`fastsip.transport._base`): the transaction layer and the
    proxy core call them without a Python call, about a dozen a proxied call.

    A method set on the layer itself later (serve's metrics wrap ``send`` to count the
    responses) is called instead of the compiled one: the layer tells this object
    (:meth:`replaced`), as those above it looked the object up once."""

    cdef readonly object layer
    # The layer's IntakeState (refreshed in place, never replaced): no attribute lookup on
    # the layer per call.
    cdef IntakeState _st
    cdef bint _send_replaced, _local_for_replaced, _via_for_replaced

    def __init__(self, layer):
        self.layer = layer
        self._st = _state(layer)

    def replaced(self, str name):
        """The layer's ``name`` (send, local_for or via_for) is its own now: call that."""
        if name == "send":
            self._send_replaced = True
        elif name == "local_for":
            self._local_for_replaced = True
        elif name == "via_for":
            self._via_for_replaced = True

    cpdef send(self, data, dest):
        if self._send_replaced:
            self.layer.send(data, dest)
        else:
            _send(self.layer, self._st, data, <Address?>dest)

    cpdef local_for(self, dest):
        if self._local_for_replaced:
            return self.layer.local_for(dest)
        return _local_for(self.layer, self._st, <Address?>dest)

    cpdef via_for(self, dest, local=None):
        if self._via_for_replaced:
            return self.layer.via_for(dest, local)
        return _via_for(self.layer, self._st, <Address?>dest, local)


cdef object _open(sock):
    # sock, unless it is None or closed.
    if sock is None:
        return None
    if type(sock) is UdpSocket:
        return None if (<UdpSocket>sock).closed else sock
    return None if sock.closed else sock


cdef _send_udp(layer, IntakeState st, data, Address dest):
    cdef Listener found, own
    host = dest.host
    cdef int family = _family_of(host)
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
        found = _listener(st, connection)
        if found is not None and found.family == family:
            sock = _open(found._udp)
    if sock is None:
        found = _nearest_of(st, "UDP", family, host, True)
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
            sock = _open(sock)
    if sock is None:
        log.debug("no UDP listener for the address family of %s", dest)
        layer._fail_soon(dest)
        return
    if type(sock) is UdpSocket:
        (<UdpSocket>sock)._send(data, dest)
    else:
        sock.send(data, dest)


def send_udp(self, data, dest):
    """One datagram to ``dest`` (an IP literal, or a name resolved first), from the socket
    it must leave from: the one ``dest.connection`` names, else a listener of its family
    on its side of loopback (a worker's own socket when the request's Via names it)."""
    _send_udp(self, _state(self), data, dest)


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

cdef _receive(layer, IntakeState st, data, str host, int port, int lid, bint steer):
    receive_datagram_c(data, host, port, lid, st.limits, layer, st.on_message, st.local,
                       st.steer if steer else None, st.answer_malformed)


def receive(self, data, str host, int port, int lid=0, bint steer=True):
    """One datagram ``admit`` let through on listener ``lid``, to the sans-IO intake
    (:func:`~fastsip.transport.intake.receive_datagram`: keep-alives, STUN, malformed
    requests, the §18 checks).  The source Address it hands up names the socket as
    ``connection``, so whatever answers it leaves from the same socket.  ``steer``
    False: a datagram another worker handed us, ours by definition."""
    _receive(self, _state(self), data, host, port, lid, steer)


def datagram_received(self, data, addr):
    """The datagram protocol's receive: counted, asked to ``admit`` (with the loop's time),
    then to the intake; an error below is logged, never raised into the loop."""
    layer = self.layer
    cdef IntakeState st = _state(layer)
    cdef TransportStats stats = st.stats
    stats.datagrams += 1
    try:
        host = addr[0]
        admit = st.admit
        if admit is not None and not admit_c(admit, host, self._time()):
            stats.datagrams_denied += 1
            return
        _receive(layer, st, data, host, addr[1], self.lid, True)
    except Exception:
        log.exception("error receiving a UDP datagram")


# -- the socket ---------------------------------------------------------------------------------

cdef extern from *:
    """
    #define FSU_SEND_BATCH 64
    #define FSU_RECV_SLOTS 16
    #define FSU_RECV_SLOT 65536
    /* One datagram from the non-blocking socket fd: its length, or -1 (fs_errno() says why). */
    static Py_ssize_t fsu_recvfrom(Py_ssize_t fd, char *buf, size_t len,
                                   struct sockaddr_storage *addr, unsigned int *alen) {
    #if defined(_WIN32)
        int n = (int)sizeof(struct sockaddr_storage);
        int r = recvfrom((SOCKET)fd, buf, (int)len, 0, (struct sockaddr *)addr, &n);
        *alen = (unsigned int)n;
        return r == SOCKET_ERROR ? -1 : (Py_ssize_t)r;
    #else
        socklen_t n = sizeof(struct sockaddr_storage);
        ssize_t r = recvfrom((int)fd, buf, len, MSG_DONTWAIT, (struct sockaddr *)addr, &n);
        *alen = (unsigned int)n;
        return (Py_ssize_t)r;
    #endif
    }

    /* One datagram to addr: 0, or -1 (fs_errno() says why). */
    static int fsu_sendto(Py_ssize_t fd, const char *buf, size_t len,
                          const struct sockaddr_storage *addr, unsigned int alen) {
    #if defined(_WIN32)
        int r = sendto((SOCKET)fd, buf, (int)len, 0, (const struct sockaddr *)addr, (int)alen);
        return r == SOCKET_ERROR ? -1 : 0;
    #else
        ssize_t r = sendto((int)fd, buf, len, MSG_DONTWAIT, (const struct sockaddr *)addr,
                           (socklen_t)alen);
        return r < 0 ? -1 : 0;
    #endif
    }

    /* Up to n (<= FSU_RECV_SLOTS) datagrams from the non-blocking socket fd, the i-th into
     * buf + i * FSU_RECV_SLOT, its length into lens[i], its source into addrs[i] (alens[i]
     * long): how many (>= 1), or -1 (fs_errno() says why; EAGAIN: none waiting).  Linux takes
     * them in one system call (recvmmsg), and fewer than n means none was left waiting;
     * elsewhere one at a time (FSU_RECV_BATCHED 0: only EAGAIN says the queue is empty). */
    #if defined(__linux__)
    #define FSU_RECV_BATCHED 1
    #else
    #define FSU_RECV_BATCHED 0
    #endif
    static int fsu_recv_batch(Py_ssize_t fd, char *buf, size_t *lens,
                              struct sockaddr_storage *addrs, unsigned int *alens,
                              unsigned int n) {
    #if defined(__linux__)
        struct mmsghdr msgs[FSU_RECV_SLOTS];
        struct iovec iov[FSU_RECV_SLOTS];
        unsigned int i;
        int r;
        if (n > FSU_RECV_SLOTS) n = FSU_RECV_SLOTS;
        fs_mmsg_slots(msgs, iov, n, buf, FSU_RECV_SLOT, addrs);
        r = recvmmsg((int)fd, msgs, n, MSG_DONTWAIT, NULL);
        for (i = 0; r > 0 && i < (unsigned int)r; i++) {
            lens[i] = msgs[i].msg_len;
            alens[i] = (unsigned int)msgs[i].msg_hdr.msg_namelen;
        }
        return r;
    #else
        Py_ssize_t r = fsu_recvfrom(fd, buf, FSU_RECV_SLOT, &addrs[0], &alens[0]);
        if (r < 0) return -1;
        lens[0] = (size_t)r;
        return 1;
    #endif
    }

    /* Datagrams bufs[i] (lens[i] long) to addrs[i] (alens[i] long), in order, from fd: how many
     * went before the first that failed (0..n), or -1 when the first failed (fs_errno() says
     * why).  Linux moves the batch in one system call (sendmmsg); elsewhere, sendto each. */
    static int fsu_send_batch(Py_ssize_t fd, char **bufs, const size_t *lens,
                              const struct sockaddr_storage *addrs, const unsigned int *alens,
                              unsigned int n) {
    #if defined(__linux__)
        struct mmsghdr msgs[FSU_SEND_BATCH];
        struct iovec iov[FSU_SEND_BATCH];
        unsigned int i;
        if (n > FSU_SEND_BATCH) n = FSU_SEND_BATCH;
        memset(msgs, 0, sizeof(struct mmsghdr) * n);
        for (i = 0; i < n; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = lens[i];
            msgs[i].msg_hdr.msg_name = (void *)&addrs[i];
            msgs[i].msg_hdr.msg_namelen = (socklen_t)alens[i];
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        return sendmmsg((int)fd, msgs, n, MSG_DONTWAIT);
    #else
        unsigned int i;
        for (i = 0; i < n; i++) {
            if (fsu_sendto(fd, bufs[i], lens[i], &addrs[i], alens[i]) < 0)
                return i == 0 ? -1 : (int)i;
        }
        return (int)n;
    #endif
    }

    """
    Py_ssize_t fsu_recvfrom(Py_ssize_t fd, char *buf, size_t len, sockaddr_storage *addr,
                            unsigned int *alen) noexcept nogil
    int fsu_sendto(Py_ssize_t fd, const char *buf, size_t len, const sockaddr_storage *addr,
                   unsigned int alen) noexcept nogil
    int FSU_RECV_BATCHED
    int fsu_recv_batch(Py_ssize_t fd, char *buf, size_t *lens, sockaddr_storage *addrs,
                       unsigned int *alens, unsigned int n) noexcept nogil
    int fsu_send_batch(Py_ssize_t fd, char **bufs, const size_t *lens,
                       const sockaddr_storage *addrs, const unsigned int *alens,
                       unsigned int n) noexcept nogil

cdef enum:
    # Datagrams one system call takes (the C block's FSU_RECV_SLOTS), each into a slot that
    # holds any UDP datagram (FSU_RECV_SLOT; a longer one is truncated, then fails to parse).
    # The buffer is 1 MiB of address space, but only the pages datagrams land in are touched.
    RECV_SLOTS = 16
    RECV_SLOT = 65536
    # Datagrams per wakeup: amortizes it, bounded so that one flood cannot starve the loop.
    UDP_BATCH = 256
    # Source names remembered (a proxy's call comes from two or three addresses).
    SOURCES = 8
    NAME_SIZE = 128
    # Sends held during a wakeup, then sent together (the C block's FSU_SEND_BATCH).
    SEND_BATCH = 64


@cython.final
cdef class UdpSocket:
    """A UDP listening socket read and written in C (see the module's documentation), watched
    with ``loop.add_reader``: one wakeup drains up to ``UDP_BATCH`` datagrams into one buffer
    and reads the clock once; what is sent meanwhile leaves when the drain ends, in order, in
    batches of up to ``SEND_BATCH``; a send the socket cannot take now (EAGAIN, ENOBUFS) is
    dropped and counted, as UDP may lose it (retransmission covers it), another failure
    reported through the layer's ``_fail_soon``.  Raises NotImplementedError where the loop cannot
    watch a socket (Windows' proactor): the loop's datagram transport stands in."""

    cdef readonly object layer
    cdef readonly object sock
    cdef readonly object loop
    cdef readonly int lid
    cdef public bint closed
    cdef Py_ssize_t _fd
    cdef object _time
    # The layer's IntakeState (refreshed in place, never replaced).
    cdef IntakeState _st
    cdef char *_buf
    # The names of recent sources: a datagram from one of them reuses its str.
    cdef sockaddr_storage _sources[SOURCES]
    cdef list _names
    cdef int _next_source
    # While a wakeup drains the socket, what it sends waits here (see _read_ready): the
    # payloads and their Addresses (kept alive, and named if a send fails), and the sockaddrs.
    cdef bint _corked
    cdef list _held
    cdef sockaddr_storage _held_addrs[SEND_BATCH]
    cdef unsigned int _held_alens[SEND_BATCH]

    def __cinit__(self):
        self._names = [None] * SOURCES
        self._held = []
        memset(self._sources, 0, sizeof(self._sources))
        self._buf = <char *>malloc(RECV_SLOTS * RECV_SLOT)
        if self._buf == NULL:
            raise MemoryError()

    def __init__(self, layer, sock, loop, int lid):
        self.layer = layer
        self.sock = sock
        self.loop = loop
        self.lid = lid
        self._fd = sock.fileno()
        self._time = loop.time
        self._st = _state(layer)
        self.closed = False
        loop.add_reader(self._fd, self._read_ready)   # NotImplementedError: proactor

    def __dealloc__(self):
        free(self._buf)

    def _read_ready(self):
        """Drain the socket: each datagram to ``admit`` (with this wakeup's time), then to the
        layer's intake; what the handlers send meanwhile leaves when the drain ends."""
        cdef int got, i, count = 0, denied = 0, interrupted = 0, code, port
        cdef size_t lens[RECV_SLOTS]
        cdef sockaddr_storage addrs[RECV_SLOTS]
        cdef unsigned int alens[RECV_SLOTS]
        layer = self.layer
        cdef IntakeState st = self._st
        admit = st.admit
        now = self._time()
        cdef TimerWheel wheel = st.wheel
        if wheel is not None:
            # Every timer this wakeup's messages schedule counts from this one reading.
            wheel.hold_clock(now)
        # Sends wait until the queue is drained, then go together (sendmmsg): one system
        # call and one wakeup of the peers for the lot, where a send per message let the
        # woken peer preempt this process after each (~7 switches a proxied call, against
        # ~5 with the sends held), and at saturation a whole batch of answers goes at once.
        # As nothing we send is answered during the drain, a short recvmmsg batch that left
        # sends held means the queue is empty: no read that finds it so.
        self._corked = True
        try:
            # (A hook below may close the socket: its descriptor is not ours then, nor are
            # the datagrams already read.)
            while count < UDP_BATCH and not self.closed:
                got = fsu_recv_batch(self._fd, self._buf, lens, addrs, alens, RECV_SLOTS)
                if got < 0:
                    code = fs_errno()
                    if fs_error_class(code) == FS_ERR_INTR and interrupted < 8:
                        interrupted += 1
                        continue
                    if fs_error_class(code) != FS_ERR_AGAIN:
                        # An error queued on the socket (or the socket closed under us): the
                        # next wakeup goes on.
                        log.debug("UDP receive error: %s", os.strerror(code))
                    break
                for i in range(got):
                    if self.closed:
                        break
                    count += 1
                    host = self._source(&addrs[i], alens[i], &port)
                    if host is None:
                        continue                     # not IPv4/IPv6: not ours to answer
                    try:
                        if admit is not None and not admit_c(admit, host, now):
                            denied += 1
                            continue
                        _receive(layer, st, PyBytes_FromStringAndSize(
                            self._buf + <size_t>i * RECV_SLOT, <Py_ssize_t>lens[i]), host,
                            port, self.lid, True)
                    except Exception:
                        # A bug in the admit hook (or below): logged; the reader and the
                        # batch's other datagrams go on.
                        log.exception("error receiving a UDP datagram")
                if FSU_RECV_BATCHED and got < RECV_SLOTS and self._held:
                    # None was left waiting, and what they sent is waiting to go: it goes
                    # now.  (With nothing held -- a flood denied, requests absorbed -- the
                    # drain reads on until EAGAIN: a sender faster than one batch would
                    # otherwise cost a wakeup per short batch.)
                    break
        finally:
            if wheel is not None:
                wheel.release_clock()
            self._corked = False
            st.stats.datagrams += count
            st.stats.datagrams_denied += denied
            if self._held:
                try:
                    self._flush()
                except Exception:
                    log.exception("error sending UDP datagrams")

    cdef object _source(self, sockaddr_storage *addr, unsigned int alen, int *port):
        # The host of addr as a str (from the cache while it is a recent source), its port
        # into port; None for a family that is not IPv4/IPv6.
        cdef int i, length
        cdef char name[NAME_SIZE]
        if addr.ss_family == AF_INET:
            port[0] = ntohs((<sockaddr_in *>addr).sin_port)
        elif addr.ss_family == AF_INET6:
            port[0] = ntohs((<sockaddr_in6 *>addr).sin6_port)
        else:
            return None
        for i in range(SOURCES):
            if same_host(addr, &self._sources[i]):
                return self._names[i]
        length = fs_source_name(addr, name, NAME_SIZE)
        if length < 0:
            return None
        host = PyUnicode_DecodeASCII(name, length, NULL)
        i = self._next_source
        self._next_source = (i + 1) % SOURCES
        memcpy(&self._sources[i], addr, alen if alen <= sizeof(sockaddr_storage)
               else sizeof(sockaddr_storage))
        self._names[i] = host
        return host

    def send(self, data, Address dest):
        """One datagram to ``dest`` (an IP literal of this socket's family), now or never."""
        self._send(data, dest)

    cdef int _send(self, data, Address dest) except -1:
        cdef sockaddr_storage addr
        cdef unsigned int alen
        cdef int code, family
        cdef bytes payload = data if type(data) is bytes else bytes(data)
        host = dest.host
        family = AF_INET6 if ":" in host else AF_INET
        alen = 0 if "%" in host else fs_sockaddr_from_text(
            &addr, family, host.encode("ascii"), dest.port)
        if alen == 0:
            # Not a literal inet_pton takes (an IPv6 zone): the socket module resolves it
            # (after what is held, to keep the order).
            if self._held:
                self._flush()
            try:
                self.sock.sendto(payload, (host, dest.port))
            except OSError as exc:
                self._failed(dest, exc.errno or 0)
            return 0
        if self._corked:
            # Held until the wakeup ends (see _read_ready).
            held = self._held
            n = len(held) // 2
            if n == SEND_BATCH:
                self._flush()
                held = self._held
                n = 0
            memcpy(&self._held_addrs[n], &addr, alen)
            self._held_alens[n] = alen
            held.append(payload)
            held.append(dest)
            return 0
        if fsu_sendto(self._fd, PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload), &addr,
                      alen) < 0:
            code = fs_errno()
            self._failed(dest, code)
        return 0

    cdef int _flush(self) except -1:
        # Send what the wakeup held, in order, in as few system calls as the kernel allows;
        # a datagram that fails is dropped or reported (_failed), and the rest still go.
        cdef list held = self._held
        cdef Py_ssize_t n = len(held) // 2, off = 0, i
        cdef int r, code, interrupted = 0
        cdef char *bufs[SEND_BATCH]
        cdef size_t lens[SEND_BATCH]
        self._held = []
        if self.closed:
            return 0             # (a hook closed the socket: its descriptor is not ours now)
        for i in range(n):
            payload = held[2 * i]
            bufs[i] = PyBytes_AS_STRING(payload)
            lens[i] = <size_t>PyBytes_GET_SIZE(payload)
        while off < n:
            r = fsu_send_batch(self._fd, &bufs[off], &lens[off], &self._held_addrs[off],
                               &self._held_alens[off], <unsigned int>(n - off))
            if r > 0:
                off += r
                continue
            code = fs_errno()
            if fs_error_class(code) == FS_ERR_INTR and interrupted < 8:
                interrupted += 1
                continue
            self._failed(<Address>held[2 * off + 1], code)
            off += 1
        return 0

    def send_failed(self, Address dest, int code):
        """What a send to ``dest`` that failed with error number ``code`` does: a full buffer
        (EAGAIN, ENOBUFS) drops the datagram and counts it in the layer's
        ``stats.sends_dropped``; any other error goes to the layer's ``on_error`` (soon, never
        inside the send).  The send path calls it in C; it is public because a full buffer
        cannot be provoked on purpose on loopback (the kernel hands a datagram to the
        receiving socket at once), so tests give the number."""
        self._failed(dest, code)

    cdef int _failed(self, Address dest, int code) except -1:
        if fs_error_class(code) == FS_ERR_AGAIN:
            # The socket's buffer is full: lost, as a datagram may be (retransmission covers
            # it); queueing here would only grow memory under overload.
            self.layer.stats.sends_dropped += 1
            log.debug("UDP send to %s dropped: %s", dest, os.strerror(code))
            return 0
        log.debug("UDP send to %s failed: %s", dest, os.strerror(code))
        self.layer._fail_soon(dest)
        return 0

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            self.loop.remove_reader(self._fd)
        except RuntimeError:        # the loop is closed already
            pass
        self.sock.close()
