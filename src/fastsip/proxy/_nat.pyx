# cython: language_level=3
"""The NAT rules of :mod:`fastsip.proxy.nat` that run for forwarded messages, compiled: that
module documents them and is where users import them from.

The proxy core asks them for every dialog-creating request, its 1xx/2xx and every request it
routes (is it from behind a NAT, does its Contact need an alias, does its Request-URI carry
one), so they are C functions the compiled core calls directly, and they read a message's
Contact and top Via through the parser's views, typed (no attribute look-ups).
"""

from fastsip.sip._message cimport (
    SIP_SCAN_MADDR, SIP_SCAN_OTHER, SIP_SCAN_PLAIN, URI, Message, NameAddr, Request, Via,
    ViaParts, lowered, same_host,
)
from fastsip.transport._address cimport Address, HostMemo, make_address, memo_get

import ipaddress
from functools import lru_cache

from fastsip.transport import DEFAULT_PORTS as _DEFAULT_PORTS
from fastsip.transport import Address as _Address
from fastsip.transport._address import RELIABLE as _RELIABLE_TRANSPORTS
from fastsip.transport.rules import connection_holder as _connection_holder

#: The Contact / Request-URI parameter that carries a flow through a dialog.
ALIAS = "alias"

# Kamailio's protocol numbers in an alias (ip~port~proto).
cdef dict _PROTO_NUMBER = {"UDP": "1", "TCP": "2", "TLS": "3", "SCTP": "4", "WS": "5",
                           "WSS": "6"}
cdef dict _PROTO_NAME = {v: k for k, v in _PROTO_NUMBER.items()}
cdef frozenset _RELIABLE = _RELIABLE_TRANSPORTS

cdef tuple _PRIVATE = tuple(ipaddress.ip_network(n) for n in (
    "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",   # RFC 1918
    "100.64.0.0/10",                                    # RFC 6598 carrier-grade NAT
    "169.254.0.0/16",                                   # link-local
    "192.0.0.0/29",                                     # RFC 6333 DS-Lite
    "fc00::/7", "fe80::/10",                            # ULA, link-local
))


@lru_cache(maxsize=4096)
def is_private(str host):
    """Is ``host`` an address that cannot be reached from the public Internet (RFC 1918,
    RFC 6598, DS-Lite, ULA, link-local)?  Names and loopback are not."""
    try:
        ip = ipaddress.ip_address(host.strip("[]").partition("%")[0])
    except ValueError:
        return False
    return any(ip in net for net in _PRIVATE if net.version == ip.version)


# Asked for a message's Contact and its source on each request and response (compiled callers).
cdef HostMemo _IS_PRIVATE = HostMemo(is_private)


cdef inline str _host(str host):
    return lowered(host.strip("[]"))


cpdef bint request_behind_nat(Request request, Address source) except -1:
    """Did ``request`` come from behind a NAT?  Its top Via's sent-by is not the source
    address (host, or port over UDP -- rport says where the answer really goes), or its Contact
    is private while the source is not."""
    if source is None:
        return False            # (no source to compare with: nothing says NAT)
    cdef ViaParts parts
    cdef const char* p
    if request._top_via_parts(&parts, &p):
        # The sent-by as parse() found it, compared in place (asked of every INVITE).
        if not same_host(p, parts.host_s, parts.host_e, source.host):
            return True
        if source.transport == "UDP":
            if parts.port > 0:
                port = parts.port
            else:
                port = _DEFAULT_PORTS.get((<Via>request.top_via)._transport(), 5060)
            if port != source.port:
                return True
    return _private_contact(request, source)


cpdef bint contact_behind_nat(Message message, Address peer) except -1:
    """Is the Contact of ``message`` (a response from ``peer``, or a request) not where the
    message came from -- another host, or over UDP another port -- or private while the peer
    is not?"""
    if peer is None:
        return False
    # Asked of every 1xx/2xx a proxy relays: read in place where the Contact allows it (no
    # host string, no tuple), else as _contact_sip reads it.
    cdef NameAddr single = _single_contact(message)
    cdef int kind
    if single is None:
        return False
    try:
        kind = single._sip_scan()
    except ValueError:
        return False
    if kind == SIP_SCAN_OTHER or kind == SIP_SCAN_MADDR:
        return False
    if kind == SIP_SCAN_PLAIN:
        if not same_host(single._p, single._u.host_s, single._u.host_e, peer.host):
            return True
        if peer.transport == "UDP":
            return (single._u.port if single._u.port > 0
                    else _DEFAULT_PORTS.get("UDP", 5060)) != peer.port
        return False
    contact = _contact_sip(message)
    if contact is None:
        return False
    host, port, maddr = <tuple>contact
    if maddr:
        return False
    if _host(host) != _host(peer.host):
        return True
    if peer.transport == "UDP":
        port = port or _DEFAULT_PORTS.get("UDP", 5060)
        return port != peer.port
    return False


cdef bint _private_contact(Message message, Address source) except -1:
    contact = _contact_sip(message)
    if contact is None:
        return False
    host = (<tuple>contact)[0]
    return memo_get(_IS_PRIVATE, host) and not memo_get(_IS_PRIVATE, source.host) \
        and _host(host) != _host(source.host)


cdef NameAddr _single_contact(Message message):
    """The one Contact of ``message``; None when there is none, several, "*" or a malformed
    header."""
    cdef list contacts
    try:
        contacts = message._contacts()
    except ValueError:
        return None
    if len(contacts) != 1:
        return None
    cdef NameAddr contact = contacts[0]
    return None if contact._n.wildcard else contact


cdef tuple _contact_sip(Message message):
    """(host, port, maddr) of the one Contact's URI when it is sip or sips (see
    ``NameAddr._sip_host_port``: no URI is built); None otherwise or when it is malformed."""
    cdef NameAddr contact = _single_contact(message)
    if contact is None:
        return None
    try:
        return contact._sip_host_port()
    except ValueError:
        return None


cdef URI _contact_uri(Message message):
    cdef NameAddr contact = _single_contact(message)
    if contact is None:
        return None
    try:
        return contact._uri()
    except ValueError:
        return None


cpdef Address binding_flow(binding):
    """Where a binding is reached when not at its Contact: the flow its REGISTER came over
    (address, and for UDP the id of our socket it arrived on) for a client behind NAT, an
    RFC 5626 outbound client, or any TCP/TLS client (it cannot accept connections: its
    Contact port is not listening) -- over the connection the REGISTER came on, whose id
    names the worker holding it (``serve --workers``: any worker can reach it through that
    one; a connection gone, or its worker dead, is a closed flow).  None: reach it at its
    Contact (or its Path).  (Compiled: every call to a registered user asks.)"""
    source = binding.source
    if not source or binding.path:
        return None
    cdef Address addr = memo_get(_ADDRESS_OF, <str?>source)
    if addr is None:
        return None
    if addr.transport in _RELIABLE:
        # (A server of one process finds the connection by the peer's address, as ever.)
        if _connection_holder(binding.socket) is None:
            return addr
        return make_address(addr.transport, addr.host, addr.port, binding.socket)
    if not binding.flow:
        return None
    return make_address(addr.transport, addr.host, addr.port, binding.socket)


def _address_of(str text):
    try:
        transport, rest = text.split(":", 1)
        host, port = rest.rsplit(":", 1)
        return make_address(transport.upper(), host.strip("[]"), int(port), 0)
    except ValueError:
        return None


# A binding's source, read back for every call to it (an Address is an immutable value).
cdef HostMemo _ADDRESS_OF = HostMemo(_address_of)


def parse_address(str text not None):
    """``"tcp:198.51.100.7:5060"`` / ``"udp:[2001:db8::1]:5060"`` (``str(Address)``) back to
    an Address; None for anything else.  Remembered (4,096 texts at most): every call to a
    registered user reads its binding's source."""
    return memo_get(_ADDRESS_OF, text)


cpdef bint add_alias(Message message, flow) except -1:
    """Add ``;alias=HOST~PORT~PROTO`` for ``flow`` to the one Contact of ``message`` (a copy
    being forwarded, or a response on its way upstream).  Returns False when there is no single
    SIP Contact to mark or it already carries an alias."""
    cdef URI uri = _contact_uri(message)
    # (A URI's parameter names are in lower case: the message core lowers them.)
    if uri is None or not uri._is_sip() or ALIAS in uri.params:
        return False
    contact = message.contact[0]
    host = f"[{flow.host}]" if ":" in flow.host else flow.host
    alias = f"{host}~{flow.port}~{_PROTO_NUMBER.get(flow.transport, '1')}"
    if flow.reliable and _connection_holder(flow.connection) is not None:
        # A connection held by one of several workers (``serve --workers``): its id, so the
        # worker that relays an in-dialog request reaches the phone through that worker.
        alias += f"~{flow.connection}"
    display = contact.display_name
    text = f"<{uri};{ALIAS}={alias}>"
    if display:
        text = f"{display} {text}"
    params = "".join([f";{k}" if v is None else f";{k}={v}"
                      for k, v in contact.params.items()])
    message.set_header("Contact", text + params)
    return True


cpdef pop_alias(Request request):
    """If the Request-URI carries our ``alias``, remove it and return the flow it names (the
    address to send the request to); else None.  A malformed alias is removed and ignored."""
    cdef URI uri = request._uri()
    # (A URI's parameter names are in lower case: the message core lowers them.)
    if ALIAS not in uri.params:
        return None
    value = uri.params[ALIAS]
    text = str(uri)
    # Rebuild the URI without the parameter (URI params are ;name=value up to '?' or the end).
    head, sep, headers = text.partition("?")
    kept = [p for p in head.split(";")[1:] if p.split("=", 1)[0].lower() != ALIAS]
    request.uri = ";".join([head.split(";", 1)[0], *kept]) + (sep + headers if sep else "")
    if not value:
        return None
    parts = value.split("~")
    connection = 0
    if len(parts) == 4 and parts[3].isdigit() and int(parts[3]) < 1 << 31:
        connection = int(parts.pop())
    if len(parts) != 3:
        return None
    host, port_text, proto = parts
    transport = _PROTO_NAME.get(proto)
    if transport is None or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return None
    if transport not in ("TCP", "TLS") or _connection_holder(connection) is None:
        connection = 0
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return _Address(transport, host, int(port_text), connection)
