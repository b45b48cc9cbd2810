# cython: language_level=3
"""The routing rules of :mod:`fastsip.transport.rules` that run on every message (where a
request or a response goes, whether a response's Via is ours), compiled: that module
documents them, keeps the rest, and is where users import them from.

A proxied call asks these about twenty times; as Python functions their frames cost more than
their work.  They read the message core's views (Via, URI, NameAddr) and the addresses through
their ``.pxd``: struct members and C accessors, no attribute look-ups.
"""

from fastsip.sip._message cimport (
    URI, Message, NameAddr, Request, Via, ViaParts, lowered, same_host,
)
from fastsip.transport._address cimport Address, make_address

import os

from fastsip.sip import parse_uri
from fastsip.transport import DEFAULT_PORTS as _PORTS
from fastsip.transport._address import RELIABLE as _RELIABLE_TRANSPORTS

# URI ``transport=`` values (RFC 3261 §19.1.1, RFC 7118 for ws/wss) to Via transport names.
cdef dict _URI_TRANSPORTS = {"udp": "UDP", "tcp": "TCP", "tls": "TLS", "sctp": "SCTP",
                             "ws": "WS", "wss": "WSS"}
cdef dict _DEFAULT_PORTS = _PORTS
cdef frozenset _RELIABLE = _RELIABLE_TRANSPORTS

#: Every To tag this process puts on a response it makes itself starts with this, so an ACK
#: for one of our local answers -- most go out statelessly, with no transaction to absorb
#: their ACK -- is known as ours and dropped instead of forwarded (Kamailio's ``sl`` does
#: the same with its tag).  (Here, compiled, because every in-dialog request asks.)
LOCAL_TAG_PREFIX = "fs" + os.urandom(3).hex()
cdef str _LOCAL_TAG_PREFIX = LOCAL_TAG_PREFIX


def local_tag(suffix=None):
    """A To tag for a response we make: our prefix, then ``suffix`` (a stateless answer
    derives it from the request, so a retransmission gets the same tag) or random hex."""
    return _LOCAL_TAG_PREFIX + (suffix if suffix is not None else os.urandom(4).hex())


cpdef bint is_local_tag(tag) except -1:
    """Was this To tag made by this process (one of our local answers)?"""
    return tag is not None and (<str?>tag).startswith(_LOCAL_TAG_PREFIX)


cpdef str strip_brackets(str host):
    """An IPv6 reference ("[2001:db8::1]") as the bare address a socket wants."""
    cdef Py_ssize_t n = len(host)
    if n >= 2 and host[0] == u"[" and host[n - 1] == u"]":
        return host[1:n - 1]
    return host


cpdef Address response_destination(via, source=None):
    """Where a response to a request whose top Via is ``via`` goes (§18.2.2, RFC 3581 §4).

    Reliable transport with the connection still known: back over it (``source.connection``),
    with ``received`` and the sent-by port as the address to connect to if it has closed.
    Otherwise ``received`` (or the sent-by host) with the ``rport`` value, else the sent-by port,
    else the transport's default port.  (maddr, for multicast, is honoured as the host.)
    """
    cdef Via v = via
    cdef Address src = source
    cdef str transport = v._transport()
    if src is not None and src.connection and src.transport in _RELIABLE:
        # Over the connection the request came on while it is open (whatever the Via says);
        # should it close first, the address here is where §18.2.2 says to open a new one:
        # the received IP with the sent-by port (not the peer's ephemeral port).
        sent_by_port = v._port()
        if not sent_by_port:
            sent_by_port = _DEFAULT_PORTS.get(src.transport, 5060)
        return Address(src.transport, strip_brackets(v._received() or v._host()),
                       sent_by_port, src.connection)
    maddr = v._maddr()
    host = maddr or v._received() or v._host()
    if maddr:
        given = v._port()
    else:
        given = v._rport()
        if not given:
            given = v._port()
    port = given if given is not None else _DEFAULT_PORTS.get(transport, 5060)
    # A datagram's source names the socket it arrived on: the response leaves from it, so
    # the client (and its NAT) sees it come from the address it sent to (§18.2.2).
    host = strip_brackets(host)
    if src is not None and src.transport == transport:
        if src.port == port and src.host == host:
            return src      # the usual case (rport, or no NAT): the source itself
        return Address(transport, host, port, src.connection)
    return Address(transport, host, port, 0)


cpdef Address next_hop(target):
    """Where a request for ``target`` (a Request-URI or the first Route) is sent: RFC 3263 §4
    without NAPTR/SRV lookups.

    Transport: the URI's ``transport`` parameter, else TLS for ``sips``, else UDP.  ``sips``
    with ``transport=tcp`` means TLS (§26.2.2); with ``transport=udp`` it is an error.  Host: the
    ``maddr`` parameter when present (§19.1.1), else the URI host (a name is returned as is;
    resolving it is the caller's business).  Port: the URI's, else the transport's default.
    Raises ValueError for a URI that is not sip/sips.
    """
    cdef URI uri
    if isinstance(target, NameAddr):
        uri = (<NameAddr>target)._uri()
    elif isinstance(target, str):
        uri = parse_uri(target)
    else:
        uri = target
    if uri is None or not uri._is_sip():
        raise ValueError(f"no SIP next hop for {target!s}")
    cdef bint secure = uri.scheme == "sips"
    param = uri._transport()
    if param is not None:
        transport = _URI_TRANSPORTS.get(lowered(param))
        if transport is None:
            transport = param.upper()
        if secure:
            if transport == "TCP":
                transport = "TLS"
            elif transport == "UDP":
                raise ValueError(f"sips URI with transport=udp: {uri!s}")
    else:
        transport = "TLS" if secure else "UDP"
    host = strip_brackets(uri._maddr() or uri.host)
    port = uri.port
    if not port:
        port = _DEFAULT_PORTS.get(transport, 5060)
    return make_address(transport, host, port, 0)


cpdef Address request_next_hop(request, outbound_proxy=None):
    """The next hop of an outgoing request (§8.1.2): the outbound proxy when configured, else
    the first Route (loose routing; a strict router has already been swapped into the
    Request-URI by §12.2.1.1), else the Request-URI."""
    if outbound_proxy is not None:
        return next_hop(outbound_proxy)
    cdef Request r = request
    cdef list routes = r._routes()
    if routes:
        return next_hop(routes[0])
    return next_hop(r._uri())


cpdef bint check_sent_by(response, local) except -1:
    """§18.1.2: does the top Via's sent-by name one of our ``local`` (host, port) pairs?  A
    client transport silently discards a response for which it does not.

    Hosts compare case-insensitively without IPv6 brackets; a Via without a port means the
    transport's default port.  A ``local`` host of ``0.0.0.0`` or ``::`` (a wildcard listener
    with no advertised address) matches any host on that port.
    """
    cdef Message message = response
    cdef ViaParts v
    cdef const char* p
    if message is None or not message._top_via_parts(&v, &p):
        return False
    # (Asked of every response: the sent-by parse() found, compared in place.)
    if v.port >= 0:
        port = v.port
    else:
        port = _DEFAULT_PORTS.get((<Via>message.top_via)._transport(), 5060)
    for local_host, local_port in local:
        if local_port != port:
            continue
        if same_host(p, v.host_s, v.host_e, local_host):
            return True
        h = lowered(strip_brackets(local_host))
        if h == "0.0.0.0" or h == "::":
            return True
    return False
