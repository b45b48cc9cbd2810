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
:class:`~fastsip.transport.Address` for a keep-alive, no result object, no Via view for the
request's Via test.  The three functions are compiled (:mod:`fastsip.transport._intake`,
where their docstrings give each one's contract).
"""

from __future__ import annotations

from collections.abc import Callable

from fastsip.errors import ParseError
from fastsip.sip import Request, Response
from fastsip.transport import Address
from fastsip.transport._intake import answer_malformed, deliver_message, receive_datagram

__all__ = ["Deliver", "Malformed", "Steer", "answer_malformed", "deliver_message", "receive_datagram"]

#: Where an accepted message goes: ``deliver(msg, source)``, the transaction layer's ``receive``.
Deliver = Callable[[Request | Response, Address], object]
#: ``steer(msg, data, source)``: a shell running several workers takes a parsed datagram that
#: another worker owns (and hands ``data`` to it); True: taken, not ours to deliver.
Steer = Callable[[Request | Response, bytes, Address], bool]
#: ``malformed(data, error, source)``: what becomes of a datagram that did not parse.
Malformed = Callable[[bytes, ParseError, Address], object]
