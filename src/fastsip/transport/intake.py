"""What a SIP transport does with a message that arrives, before any transaction sees it
(RFC 3261 §18.1.2, §18.2.1, §18.3 and RFC 3581; RFC 5626 §4.4 keep-alives), sans-IO.

The one home of these receiving rules for every I/O shell: fastsip's asyncio transport calls
them, and so does an embedder's own loop (``examples/selectors_proxy.py`` runs the proxy core
on a plain ``selectors`` loop with them).  The shell reads the bytes, the source address and
the clock; :func:`receive_datagram` decides, and hands what passes to ``deliver(msg, source)``
(the transaction layer's ``receive``):

- a datagram of nothing but CR/LF (a RFC 5626 §4.4.1 keep-alive) is ignored;
- a STUN Binding request on the SIP port (RFC 5626 §4.4.2) is answered, other STUN dropped;
- what fails to parse is answered statelessly when it is a request (400/505/513, §8.2.6, §21.4:
  :func:`~fastsip.transport.rules.error_response`), dropped otherwise;
- a request without a Via is dropped; any other gets ``received``/``rport`` in its top Via
  (§18.2.1, RFC 3581 §4);
- a message without Content-Length gets one (§18.3: a datagram's body is the rest of it; a
  stream, where it may be forwarded, is framed by the header alone);
- a response whose top Via does not name us is dropped (§18.1.2);
- an exception from ``deliver`` is logged and swallowed: one bad message (or a bug above) must
  not stop the shell's loop.

Framed messages of a stream (TCP, TLS) meet the same rules through :func:`answer_malformed` and
:func:`deliver_message`.  Answers leave through the :class:`~fastsip.transport.Transport`
given, to the source (whose ``connection`` names the socket the datagram arrived on, so the
answer leaves from it).

This runs once per datagram, so it allocates nothing it does not need: no source
:class:`~fastsip.transport.Address` for a keep-alive, no result object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from fastsip.errors import ParseError
from fastsip.sip import Limits, Request, Response, parse
from fastsip.transport import Address, Transport
from fastsip.transport.rules import check_sent_by, error_response, stamp_received
from fastsip.transport.stun import binding_response, is_stun

__all__ = ["Deliver", "Malformed", "Steer", "answer_malformed", "deliver_message", "receive_datagram"]

log = logging.getLogger("fastsip.transport")

#: Where an accepted message goes: ``deliver(msg, source)``, the transaction layer's ``receive``.
Deliver = Callable[[Request | Response, Address], object]
#: ``steer(msg, data, source)``: a shell running several workers takes a parsed datagram that
#: another worker owns (and hands ``data`` to it); True: taken, not ours to deliver.
Steer = Callable[[Request | Response, bytes, Address], bool]
#: ``malformed(data, error, source)``: what becomes of a datagram that did not parse.
Malformed = Callable[[bytes, ParseError, Address], object]


def receive_datagram(data: bytes, host: str, port: int, connection: int, limits: Limits,
                     transport: Transport, deliver: Deliver | None,
                     local: Iterable[tuple[str, int]] | None = None,
                     steer: Steer | None = None,
                     malformed: Malformed | None = None) -> bool:
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
    if len(data) <= 4 and not data.strip():
        return False
    if is_stun(data):
        # Never SIP (no SIP message starts with byte 0 or 1); only a well-formed Binding
        # request gets an answer.
        answer = binding_response(data, host, port)
        if answer is not None:
            transport.send(answer, Address("UDP", host, port, connection))
        return False
    source = Address("UDP", host, port, connection)
    try:
        msg = parse(data, limits)
    except ParseError as exc:
        log.debug("malformed datagram from %s: %s", source, exc)
        if malformed is not None:
            malformed(data, exc, source)
        else:
            answer_malformed(data, exc, source, transport)
        return False
    if steer is not None and steer(msg, data, source):
        return False
    return deliver_message(msg, source, deliver, local)


def deliver_message(msg: Request | Response, source: Address, deliver: Deliver | None,
                    local: Iterable[tuple[str, int]] | None = None) -> bool:
    """§18.2.1 and §18.1.2 for a parsed message from ``source`` (one framed on a stream, or
    a datagram from :func:`receive_datagram`), then ``deliver(msg, source)``: a request needs
    a Via, and gets ``received``/``rport`` stamped in it; a response's top Via must name one
    of our ``local`` sent-bys (None: not checked).  An exception from ``deliver`` is logged.
    True when delivered."""
    if isinstance(msg, Request):
        if msg.top_via is None:
            log.debug("dropping %s from %s: no Via", msg.method, source)
            return False
        stamp_received(msg, source)
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
        deliver(msg, source)
    except Exception:
        log.exception("error handling a message from %s", source)
    return True


def answer_malformed(data: bytes, error: ParseError, source: Address,
                     transport: Transport) -> bool:
    """A request that failed to parse gets the RFC's answer (400 naming the problem, 505,
    513) straight back to ``source``, statelessly; responses and hopeless input (no Via,
    From, To, Call-ID or CSeq to answer with; an ACK) get nothing.  True when answered."""
    answer = error_response(data, error)
    if answer is None:
        return False
    transport.send(answer, source)
    return True
