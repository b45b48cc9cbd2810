# cython: language_level=3
"""The receiving rules of :mod:`fastsip.transport.intake`, compiled: that module documents them
and is where users import them from.

They run once per datagram, before the transaction layer, so they are C: a request's Via is
found in the parser's index (no Via view is built for the test), and the rules that have a
home elsewhere (the STUN answer, the sent-by check, the received/rport stamp, the error
response) are called there as before.  The STUN test itself lives here (``stun`` re-exports
it): it runs for every datagram, and a Python call cost more than the test.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

from fastsip.sip._message cimport H_VIA, Message, Request, parse_c
from fastsip.transport._address cimport make_address
from fastsip.transport._base cimport deliver_c
from fastsip.transport._rules cimport check_sent_by

import logging

from fastsip.errors import ParseError
from fastsip.transport.rules import error_response

log = logging.getLogger("fastsip.transport")


cpdef bint is_stun(data) except -1:
    """Could ``data`` be a STUN request or response rather than SIP?  Their first byte is 0
    or 1 (the class and method bits of Binding), a byte no SIP message starts with."""
    if type(data) is bytes:
        return PyBytes_GET_SIZE(data) > 0 and <unsigned char>PyBytes_AS_STRING(data)[0] < 2
    return len(data) > 0 and data[0] < 2


def receive_datagram(data, str host, int port, int connection, limits, transport, deliver,
                     local=None, steer=None, malformed=None):
    """One UDP datagram from ``host``:``port`` that arrived on socket ``connection`` (0: the
    only one): answered here when it is STUN or a malformed request (through ``transport``),
    ignored when it is a keep-alive or fails the §18 checks, else handed to ``deliver(msg,
    source)``.  ``limits`` bound the parse; ``local`` are our sent-by (host, port) pairs: a
    response whose top Via names none of them is dropped (None: no such check).  ``steer``:
    asked first for every message that parsed, when several workers share the socket (it
    takes the ones another worker owns; keep-alives, STUN and malformed requests are answered
    by whoever received them).  ``malformed(data, error, source)``: called for a datagram
    that does not parse, instead of :func:`answer_malformed` (a shell that counts them, then
    answers).  True when a message was delivered.  (Positional arguments:
    this is the per-datagram path.)"""
    return receive_datagram_c(data, host, port, connection, limits, transport, deliver, local,
                              steer, malformed)


cdef bint receive_datagram_c(data, str host, int port, int connection, limits, transport,
                             deliver, local, steer, malformed) except -1:
    # receive_datagram for the compiled shell (_intake.pxd): no Python call, no int objects
    # for the port and the socket per datagram but the Address's own.
    cdef Py_ssize_t n = len(data)
    if n <= 4 and not data.strip():
        return False
    if is_stun(data):
        # Never SIP (no SIP message starts with byte 0 or 1); only a well-formed Binding
        # request gets an answer.  (Imported here: stun imports is_stun from this module.)
        from fastsip.transport.stun import binding_response
        answer = binding_response(data, host, port)
        if answer is not None:
            transport.send(answer, make_address("UDP", host, port, connection))
        return False
    source = make_address("UDP", host, port, connection)
    try:
        msg = parse_c(data, limits)
    except ParseError as exc:
        log.debug("malformed datagram from %s: %s", source, exc)
        if malformed is not None:
            malformed(data, exc, source)
        else:
            answer_malformed(data, exc, source, transport)
        return False
    if steer is not None and steer(msg, data, source):
        return False
    return _deliver(<Message?>msg, source, host, port, deliver, local)


def deliver_message(msg, source, deliver, local=None):
    """§18.2.1 and §18.1.2 for a parsed message from ``source`` (one framed on a stream, or
    a datagram from :func:`receive_datagram`), then ``deliver(msg, source)``: a request needs
    a Via, and gets ``received``/``rport`` stamped in it; a response's top Via must name one
    of our ``local`` sent-bys (None: not checked).  An exception from ``deliver`` is logged.
    True when delivered."""
    return _deliver(<Message?>msg, source, source.host, source.port, deliver, local)


cdef bint _deliver(Message msg, source, str host, int port, deliver, local) except -1:
    if isinstance(msg, Request):
        if msg._first[H_VIA] < 0:
            log.debug("dropping %s from %s: no Via", (<Request>msg).method, source)
            return False
        # §18.2.1, RFC 3581 §4: received/rport, one edit of the Via value in the core.
        msg.stamp_received(host, port)
    elif local is not None and not check_sent_by(msg, local):
        log.debug("dropping response from %s: top Via is not ours", source)
        return False
    # §18.3: a datagram may leave Content-Length out (its body is the rest); whatever we pass
    # on may go out over TCP, where only the header frames it (otherwise the body would be
    # read as the next message on the connection).
    msg.ensure_content_length()
    if deliver is None:
        return False
    try:
        deliver_c(deliver, msg, source)
    except Exception:
        log.exception("error handling a message from %s", source)
    return True


def answer_malformed(data, error, source, transport):
    """A request that failed to parse gets the RFC's answer (400 naming the problem, 505,
    513) straight back to ``source``, statelessly; responses and hopeless input (no Via,
    From, To, Call-ID or CSeq to answer with; an ACK) get nothing.  True when answered."""
    answer = error_response(data, error)
    if answer is None:
        return False
    transport.send(answer, source)
    return True
