# cython: language_level=3
"""RFC 3261 §17 transactions (with RFC 6026's Accepted state), compiled: the transaction
table, its matching rules and the four state machines.  :mod:`fastsip.transaction.layer`
documents them and is where users import them from.

Every message of a call passes through here (seven at a stateful proxy), and the machines
are small and fixed: with typed fields and C calls between them, matching, state changes and
timer bookkeeping run without the interpreter.  A TU or handler that inherits the compiled
bases below (the proxy core does) is called by C calls, a WheelDriver's wheel gets its
timers by C calls, and a transport with a compiled stand-in (fastsip.transport._base: the
asyncio TransportLayer's) gets its sends by C calls; any other TU, handler, clock or
transport is a Python object, called as before.
"""

import logging

from fastsip.sip._message cimport Request, Response, Via, wire
from fastsip.timers._wheel cimport TimerWheel
from fastsip.transport._base cimport compiled_transport
from fastsip.transport._rules cimport response_destination

from fastsip.errors import ParseError
from fastsip.transaction import base as _base
from fastsip.transaction.base import Refusals, TimerConfig, hop_by_hop_request
from fastsip.transport.rules import local_tag

log = logging.getLogger("fastsip.transaction")

# The names ``state`` reads, by S_* value.
cdef tuple _STATE_NAMES = (_base.CALLING, _base.TRYING, _base.PROCEEDING, _base.COMPLETED,
                           _base.ACCEPTED, _base.CONFIRMED, _base.TERMINATED)


cdef class _Lingering:
    """What either kind of transaction does with its messages once it lingers (Completed or
    Accepted): for a TU that ``sheds_messages`` the parsed request and response go, and only
    the bytes a retransmission needs stay (a client's ACK, a server's final response)."""

    @property
    def request(self):
        """The request this transaction sent or received (gone once it lingers, for a TU that
        ``sheds_messages``)."""
        if self._request is None:
            raise ValueError(f"{self!r} has shed its request (its TU sheds_messages)")
        return self._request

    @property
    def state(self):
        """The state's name: ``calling``, ``trying``, ``proceeding``, ``completed``,
        ``accepted``, ``confirmed`` or ``terminated`` (the constants of this package)."""
        return _STATE_NAMES[self._state]

    cdef void _shed(self) noexcept:
        if self.layer.shed:
            self._request = None
            self.last_response = None

    cdef int _cancel_timers(self) except -1:
        # Both of a transaction's wheel nodes: the retransmit or linger timer and the timeout.
        if self._timer is not None:
            cancel_timer(self._timer)
            self._timer = None
        if self._timeout is not None:
            cancel_timer(self._timeout)
            self._timeout = None
        return 0


# A client transaction's handler: a compiled one's callbacks by C calls.
cdef inline int _on_response(ClientTransaction txn, Response response) except -1:
    h = txn.handler
    if isinstance(h, ClientHandlerBase):
        (<ClientHandlerBase>h).on_response(txn, response)
    else:
        h.on_response(txn, response)
    return 0


cdef inline int _on_timeout(ClientTransaction txn) except -1:
    h = txn.handler
    if isinstance(h, ClientHandlerBase):
        (<ClientHandlerBase>h).on_timeout(txn)
    else:
        h.on_timeout(txn)
    return 0


cdef inline int _on_transport_error(ClientTransaction txn) except -1:
    h = txn.handler
    if isinstance(h, ClientHandlerBase):
        (<ClientHandlerBase>h).on_transport_error(txn)
    else:
        h.on_transport_error(txn)
    return 0


cdef class ClientHandlerBase:
    """The :class:`~fastsip.transaction.layer.ClientHandler` protocol as a compiled base
    class: the layer calls a handler that inherits it by C calls (a Python subclass may still
    override each method).  Any other object with the three methods serves as before."""

    cpdef on_response(self, txn, Response response):
        """Each provisional and final response once; for INVITE, every 2xx (RFC 6026)."""

    cpdef on_timeout(self, txn):
        """Timer B or F: no final response."""

    cpdef on_transport_error(self, txn):
        """The request could not be sent."""


cdef class TransactionUserBase:
    """The :class:`~fastsip.transaction.layer.TransactionUser` protocol as a compiled base
    class: the layer calls a TU that inherits it (the proxy core) by C calls.  Its methods do
    nothing; a TU overrides the ones it needs."""

    cpdef on_request(self, txn, Request request):
        """A new request (never a retransmission; never an ACK)."""

    cpdef on_ack(self, Request request, source):
        """An ACK that belongs to no INVITE server transaction in Completed state."""

    cpdef on_stray_response(self, Response response, source):
        """A response that matches no client transaction."""

    cpdef on_server_timeout(self, txn):
        """Timer H: the ACK for a non-2xx final response never came."""


cdef class ClientTransaction(_Lingering):
    """A client transaction (§17.1): INVITE (figure 5 + RFC 6026) or non-INVITE (figure 6)."""

    def __init__(self, TransactionLayer layer not None, request, dest, handler, key):
        self.layer = layer
        self._request = request
        self.dest = dest
        self._reliable = dest.reliable
        self.handler = handler
        self.key = key
        self.method = (<Request?>request)._method()
        self.is_invite = self.method == "INVITE"
        self._state = S_CALLING if self.is_invite else S_TRYING
        self.last_response = None
        self._data = wire(request)
        self._timer = None       # A or E (retransmit) and then B or F, or D or K (linger)
        self._timeout = None     # B or F over a reliable transport, then M (Accepted)
        self._interval = layer._t1
        self._deadline = 0.0     # Timer B or F, when the retransmissions carry it
        self._ack = None

    @property
    def branch(self):
        return self.key[0]

    cdef int _start(self) except -1:
        cdef TransactionLayer layer = self.layer
        if self._reliable:
            self._timeout = layer._later_lax(layer._timeout, self._on_timeout)
        else:
            # Over UDP Timer B (or F) is not a wheel node of its own: Timer A (or E) keeps
            # firing until B is due, so its chain carries B's deadline and its last link is
            # armed for B itself.  A final response (almost every transaction gets one) then
            # cancels one node, and the start schedules one, instead of two each.
            self._deadline = layer._now() + layer._timeout
            self._timer = layer._later(layer._t1, self._retransmit)
        layer._send(self._data, self.dest)
        return 0

    def _retransmit(self):
        # Timer A (INVITE: doubles without bound while Calling) or E (non-INVITE: doubles up to
        # T2, and runs at T2 once a provisional response has come).
        cdef TransactionLayer layer = self.layer
        cdef int state = self._state
        cdef double left
        if state not in (S_CALLING, S_TRYING, S_PROCEEDING) \
                or (self.is_invite and state != S_CALLING):
            return
        if self.is_invite:
            self._interval *= 2
        elif state == S_PROCEEDING:
            self._interval = layer._t2
        else:
            self._interval = min(self._interval * 2, layer._t2)
        left = self._deadline - layer._now()
        if left <= self._interval:
            # Timer B / F comes before the next retransmission (or with it: it wins, as a
            # separate B armed at the start would have fired first).
            self._timer = layer._later(max(left, 0.0), self._on_deadline)
        else:
            self._timer = layer._later(self._interval, self._retransmit)
        layer._send(self._data, self.dest)

    def _on_deadline(self):
        # Timer B / F at the end of the retransmission chain (over UDP).
        self._timer = None
        self._on_timeout()

    def _on_timeout(self):
        self._timeout = None
        cdef int state = self._state
        if state == S_ACCEPTED:                          # Timer M
            self._end()
            return
        if state in (S_CALLING, S_TRYING, S_PROCEEDING) \
                and not (self.is_invite and state == S_PROCEEDING):
            self._end()                                  # Timer B / F
            _on_timeout(self)

    cdef int _linger(self, double delay) except -1:
        # Timer D / K: absorb retransmitted final responses, then go.
        if delay <= 0:
            self._end()
        else:
            self._timer = self.layer._later_lax(delay, self._terminate)
            self.layer._client_lingering[self.key] = self
        return 0

    cdef int _receive(self, Response response) except -1:
        cdef TransactionLayer layer = self.layer
        cdef int status = response._status
        cdef int state = self._state
        if state == S_TERMINATED:
            return 0
        if status < 200:
            if state == S_CALLING or state == S_TRYING:
                self._state = S_PROCEEDING
                if self.is_invite:
                    self._stop_retransmitting()          # Timer A stops; B stops too
                    self._cancel_timeout()
            if state == S_CALLING or state == S_TRYING or state == S_PROCEEDING:
                self.last_response = response
                _on_response(self, response)
            return 0
        if self.is_invite:
            if 200 <= status < 300:
                if state == S_CALLING or state == S_PROCEEDING:
                    self._state = S_ACCEPTED             # RFC 6026: absorb nothing, pass every 2xx
                    self._stop_retransmitting()
                    self._cancel_timeout()
                    self._timeout = layer._later_lax(layer._timeout, self._on_timeout)
                    layer._client_lingering[self.key] = self
                    self._shed()
                if self._state == S_ACCEPTED:
                    if not layer.shed:
                        self.last_response = response
                    _on_response(self, response)
                return 0
            if state == S_CALLING or state == S_PROCEEDING:
                self._state = S_COMPLETED
                self._stop_retransmitting()
                self._cancel_timeout()
                self.last_response = response
                self._ack = wire(self._build_ack(response))
                layer._send(self._ack, self.dest)
                _on_response(self, response)
                self._shed()
                self._linger(0 if self._reliable else 32.0)
            elif state == S_COMPLETED and self._ack is not None:
                layer._send(self._ack, self.dest)  # final retransmitted: ACK again
            return 0
        if state == S_TRYING or state == S_PROCEEDING:
            self._state = S_COMPLETED
            self._stop_retransmitting()
            self._cancel_timeout()
            self.last_response = response
            _on_response(self, response)
            self._shed()
            self._linger(0 if self._reliable else layer._t4)
        return 0

    def _build_ack(self, response):
        """The ACK for a non-2xx final response (§17.1.1.3): To from the response, the rest
        from the INVITE."""
        return hop_by_hop_request(self.request, "ACK", to=response.headers.get("To") or "")

    def transport_error(self):
        if self._state == S_TERMINATED:
            return
        self._end()
        _on_transport_error(self)

    cdef int _stop_retransmitting(self) except -1:
        # Timer A/E (or D/K, the linger) is stopped; the request's bytes are never sent again
        # from here, so they go: a finished transaction lingers for up to 32 s (Timer D/M),
        # and at carrier rates every byte it keeps is multiplied by tens of thousands.
        if self._timer is not None:
            cancel_timer(self._timer)
            self._timer = None
        self._data = b""
        return 0

    cdef int _cancel_timeout(self) except -1:
        if self._timeout is not None:
            cancel_timer(self._timeout)
            self._timeout = None
        return 0

    def _terminate(self):
        self._end()

    cdef int _end(self) except -1:
        if self._state == S_TERMINATED:
            return 0
        self._state = S_TERMINATED
        self._stop_retransmitting()
        self._cancel_timeout()
        self.layer._client.pop(self.key, None)
        self.layer._client_lingering.pop(self.key, None)
        return 0

    def __repr__(self):
        return f"<ClientTransaction {self.method} {self.branch} {self.state}>"


cdef class ServerTransaction(_Lingering):
    """A server transaction (§17.2): INVITE (figure 7 + RFC 6026) or non-INVITE (figure 8)."""

    def __init__(self, TransactionLayer layer not None, request, source, key):
        self.layer = layer
        self._request = request
        self.source = source
        self.key = key
        self.method = (<Request?>request)._method()
        self.is_invite = self.method == "INVITE"
        self._state = S_PROCEEDING if self.is_invite else S_TRYING
        self.last_response = None
        top = request.top_via
        self.dest = response_destination(top, source) if top is not None else source
        self._reliable = self.dest.reliable
        self._data = None
        self._timer = None
        self._timeout = None
        self._interval = layer._t1
        self.data = None  # for the transaction user

    cpdef respond(self, Response response):
        """Send a response through the transaction (§17.2.1, §17.2.2)."""
        cdef TransactionLayer layer = self.layer
        cdef int status = response._status
        cdef int state = self._state
        if state == S_COMPLETED or state == S_CONFIRMED or state == S_TERMINATED:
            raise ValueError(f"{self!r} already sent a final response")
        if state == S_ACCEPTED:
            if 200 <= status < 300:                      # the TU retransmits its 2xx (§13.3.1.4)
                layer._send(wire(response), self.dest)
                return
            raise ValueError("a final response was already sent")
        self.last_response = response
        self._data = wire(response)
        layer._send(self._data, self.dest)
        if status < 200:
            if state == S_TRYING:
                self._state = S_PROCEEDING
            return
        if self._timeout is not None:                    # the abandon guard, if armed
            cancel_timer(self._timeout)
            self._timeout = None
        self._shed()
        if self.is_invite and status < 300:
            self._state = S_ACCEPTED                     # RFC 6026: Timer L
            self._data = None          # never resent by us: the TU retransmits its 2xx
            self._timeout = layer._later_lax(layer._timeout, self._terminate)
            layer._server_lingering[self.key] = self
            return
        self._state = S_COMPLETED
        if self.is_invite:
            if not self._reliable:                       # Timer G
                self._timer = layer._later(layer._t1, self._retransmit)
            self._timeout = layer._later_lax(layer._timeout, self._on_timer_h)
        elif self._reliable:
            self._end()                                  # Timer J = 0
        else:
            self._timeout = layer._later_lax(layer._timeout, self._terminate)
            layer._server_lingering[self.key] = self

    cpdef respond_statelessly(self, Response response):
        """Send a final response outside the state machine and forget the transaction, as a
        stateless proxy would (§16.11; Kamailio's ``sl_send_reply``): no Timer G
        retransmissions, no Timer H/J linger, nothing kept.  A retransmitted request is then
        processed anew (the TU gives the same answer), and the ACK for a non-2xx matches
        nothing and reaches the TU's ``on_ack``.

        For local negative answers to requests from sources that may be forged or flooding:
        neither memory nor traffic then grows with their rate (one response per request)."""
        cdef int state = self._state
        if state == S_COMPLETED or state == S_CONFIRMED or state == S_ACCEPTED \
                or state == S_TERMINATED:
            raise ValueError(f"{self!r} already sent a final response")
        if response._status < 200:
            raise ValueError("a provisional response is never sent statelessly")
        self.last_response = response
        self.layer._send(wire(response), self.dest)
        self._end()

    def reply(self, status, reason=None, **kwargs):
        """Build a response with ``request.reply()`` and send it; returns it."""
        response = self.request.reply(status, reason, **kwargs)
        self.respond(response)
        return response

    def _retransmit(self):
        if self._state != S_COMPLETED or self._data is None:
            return
        cdef TransactionLayer layer = self.layer
        self._interval = min(self._interval * 2, layer._t2)
        self._timer = layer._later(self._interval, self._retransmit)
        layer._send(self._data, self.dest)

    def _abandon(self):
        # No timer of §17.2.2 ends a non-INVITE server transaction whose TU never answers; the
        # client gave up at Timer F (64*T1) long before this fires, so free the entry.
        self._timeout = None
        if self._state == S_TRYING or self._state == S_PROCEEDING:
            log.warning("%r: no final response from the transaction user; dropped", self)
            self._end()

    def _on_timer_h(self):
        self._timeout = None
        if self._state == S_COMPLETED:
            self._end()
            self.layer._on_server_timeout(self)

    cdef int _receive_retransmission(self, object request, object source) except -1:
        cdef TransactionLayer layer = self.layer
        cdef int state = self._state
        if request.method == "ACK":
            if self.is_invite and state == S_COMPLETED:
                self._state = S_CONFIRMED                # Timer I
                self._cancel_timers()
                if self._reliable:
                    self._end()
                else:
                    self._timeout = layer._later_lax(layer._t4, self._terminate)
                    layer._server_lingering[self.key] = self
            elif state == S_ACCEPTED:
                layer._on_ack(request, source)         # RFC 6026: the 2xx's ACK goes up
            return 0
        if (state == S_PROCEEDING or state == S_COMPLETED) and self._data is not None:
            layer._send(self._data, self.dest)  # last response again
        return 0

    def _terminate(self):
        self._end()

    cdef int _end(self) except -1:
        if self._state == S_TERMINATED:
            return 0
        self._state = S_TERMINATED
        self._cancel_timers()
        self.layer._server.pop(self.key, None)
        self.layer._server_lingering.pop(self.key, None)
        return 0

    def __repr__(self):
        return f"<ServerTransaction {self.method} {self.key[0]} {self.state}>"


cdef class TransactionLayer(MessageSink):
    """The transaction table and the matching rules of §17.1.3 and §17.2.3.

    ``max_server_transactions`` / ``max_client_transactions`` bound the tables (memory under
    any load).  A full table first ends its oldest *lingering* transaction (finished, kept only
    to absorb retransmissions: counted in ``reclaimed``); only when every one is at work is a
    new request beyond the server cap answered ``503`` with ``Retry-After: retry_after``
    statelessly (an ACK is dropped), and :meth:`request` beyond the client cap raises
    ValueError (a proxy's branch then fails as with a 503).  ``None``: no cap.
    """

    def __init__(self, transport, clock, tu, config=None, *,
                 max_server_transactions=None, max_client_transactions=None,
                 retry_after=5):
        self.transport = transport
        self._compiled = compiled_transport(transport)
        self.clock = clock
        # For the timers that only free state or give up after 64*T1 (B and F over reliable
        # transports, D, H, I, J, K, L, M, the abandon guard): they may fire a little late
        # (``TimerWheel.call_later_lax``: at most 128 ms, at most an eighth of the delay), so
        # the lingering transactions of every call share a few wakeups a second instead of a
        # wakeup each -- 1.6 more per call than the call's own datagrams, measured in serve at
        # 150 calls/s.  Retransmissions (A, E, G) and the end of a UDP chain stay exact.
        self.call_later_lax = getattr(clock, "call_later_lax", clock.call_later)
        # A WheelDriver's clock is its wheel's own methods (call_later_now, call_later_lax,
        # clock_time): then the timers go on the wheel by C calls, the same calls without a
        # Python one each (about ten a proxied call).  Any other clock is called as given.
        wheel = getattr(clock, "wheel", None)
        if isinstance(wheel, TimerWheel) and clock.call_later == wheel.call_later_now \
                and clock.time == wheel.clock_time:
            self._wheel = wheel
            self._wheel_lax = self.call_later_lax if self.call_later_lax == \
                wheel.call_later_lax else None
        else:
            self._wheel = None
            self._wheel_lax = None
        self.tu = tu
        self._ctu = tu if isinstance(tu, TransactionUserBase) else None
        # Drop a transaction's messages when it starts to linger (the TU's ``sheds_messages``).
        self.shed = bool(getattr(tu, "sheds_messages", False))
        self.config = config if config is not None else TimerConfig()
        self._t1 = self.config.t1
        self._t2 = self.config.t2
        self._t4 = self.config.t4
        self._timeout = self.config.timeout
        self.max_server_transactions = max_server_transactions
        self.max_client_transactions = max_client_transactions
        self.retry_after = retry_after
        # Requests refused because a table was full (for logs and metrics).
        self.refusals = Refusals()
        self._client = {}
        self._server = {}
        self._client_lingering = {}
        self._server_lingering = {}
        self.reclaimed = 0

    # -- sending ---------------------------------------------------------------------------

    cpdef request(self, request, dest, handler):
        """Start a client transaction for ``request`` (whose top Via, with a fresh branch, the
        caller has added: see :func:`new_branch`) towards ``dest``.  Not for ACK (§17.1)."""
        cdef str method = (<Request?>request)._method()
        if method == "ACK":
            raise ValueError("ACK is not sent in a client transaction")
        cdef Via top = request.top_via
        branch = top._branch() if top is not None else None
        if not branch:
            raise ValueError("the request needs a top Via with a branch")
        key = (branch, method)
        if key in self._client:
            raise ValueError(f"a client transaction for branch {branch} exists")
        cap = self.max_client_transactions
        if cap is not None and len(self._client) >= cap \
                and not self._reclaim(self._client_lingering):
            self._overload("client", cap)
            raise ValueError(f"{cap} client transactions in progress (the cap)")
        cdef ClientTransaction txn = ClientTransaction(self, request, dest, handler, key)
        self._client[key] = txn
        txn._start()
        return txn

    def client_transaction(self, key):
        """The client transaction of ``key`` (its top Via branch and method), if it exists."""
        return self._client.get(key)

    def transport_error(self, dest):
        """Sending to ``dest`` failed: its client transactions end with on_transport_error."""
        for txn in [t for t in self._client.values() if t.dest.peer == dest.peer]:
            txn.transport_error()

    # -- receiving -------------------------------------------------------------------------

    cpdef receive(self, msg, source):
        """Hand a parsed message from ``source`` to its transaction, or up to the TU.  (A
        C method of :class:`~fastsip.transport._base.MessageSink`: the compiled UDP shell
        calls it without a Python call.)"""
        if isinstance(msg, Response):
            self._receive_response(msg, source)
        else:
            self._receive_request(msg, source)

    cdef int _receive_response(self, Response response, object source) except -1:
        key = response.transaction_key()    # (branch, CSeq method), read from the index
        if key is None:
            return 0
        cdef object found = self._client.get(key)
        try:
            if found is None:
                self._on_stray_response(response, source)
            else:
                (<ClientTransaction>found)._receive(response)
        except ParseError as exc:
            # A response is never answered (§18.1.2): a malformed one is dropped.
            log.debug("dropping a %d from %s: %s", response.status_code, source, exc)
        return 0

    # The TU's callbacks: a compiled TU's by C calls.
    cdef int _on_request(self, txn, Request request) except -1:
        if self._ctu is not None:
            self._ctu.on_request(txn, request)
        else:
            self.tu.on_request(txn, request)
        return 0

    cdef int _on_ack(self, Request request, source) except -1:
        if self._ctu is not None:
            self._ctu.on_ack(request, source)
        else:
            self.tu.on_ack(request, source)
        return 0

    cdef int _on_stray_response(self, Response response, source) except -1:
        if self._ctu is not None:
            self._ctu.on_stray_response(response, source)
        else:
            self.tu.on_stray_response(response, source)
        return 0

    cdef int _on_server_timeout(self, txn) except -1:
        if self._ctu is not None:
            self._ctu.on_server_timeout(txn)
        else:
            self.tu.on_server_timeout(txn)
        return 0

    cdef object _later(self, double delay, callback, tuple args=()):
        # The clock's call_later(delay, callback, *args): Timers A, E, G, the end of a UDP
        # chain, and the proxy's Timer C and CANCEL guard.
        if self._wheel is not None:
            return self._wheel.later_c(delay, callback, args)
        return self.clock.call_later(delay, callback, *args)

    cdef object _later_lax(self, double delay, callback):
        # call_later_lax(delay, callback): the timers that may fire a little late (__init__).
        lax = self.call_later_lax
        if lax is self._wheel_lax and lax is not None:
            return self._wheel.later_lax_c(delay, callback, ())
        return lax(delay, callback)

    cdef double _now(self) except? -1.0:
        # The clock's time().
        if self._wheel is not None:
            return self._wheel._owner_now()
        return self.clock.time()

    cdef int _send(self, data, dest) except -1:
        # Through the transport's compiled stand-in when it has one (a C call), else its
        # ``send``: every message a transaction sends.
        if self._compiled is not None:
            self._compiled.send(data, dest)
        else:
            self.transport.send(data, dest)
        return 0

    cpdef tuple server_key(self, Request request):
        """§17.2.3: branch + sent-by + method (ACK matches INVITE), or for a request without
        the magic cookie (RFC 2543) Request-URI, From tag, Call-ID, CSeq number, top Via."""
        key = request.transaction_key()     # the §17.2.3 key, read from the parser's index
        if key is not None:
            return key
        top = request.top_via
        method = request.method
        if method == "ACK":
            method = "INVITE"
        cseq = request.cseq
        frm = request.from_
        return ("2543", str(request.uri), frm.tag if frm is not None else None, request.call_id,
                cseq.seq if cseq is not None else None, str(top) if top is not None else None,
                method)

    cdef int _receive_request(self, Request request, object source) except -1:
        cdef tuple key
        try:
            key = self.server_key(request)
        except ParseError as exc:           # an RFC 2543 key over a From that does not parse
            self._answer_statelessly(request, source, 400, f"Bad Request ({exc.reason})"[:120])
            return 0
        cdef object found = self._server.get(key)
        if found is not None:
            (<ServerTransaction>found)._receive_retransmission(request, source)
            return 0
        if request._method() == "ACK":
            try:
                self._on_ack(request, source)
            except ParseError as exc:
                log.debug("dropping ACK from %s: %s", source, exc)
            return 0
        cap = self.max_server_transactions
        if cap is not None and len(self._server) >= cap \
                and not self._reclaim(self._server_lingering):
            self._overload("server", cap)
            self._answer_statelessly(request, source, 503, None,
                                     [("Retry-After", str(self.retry_after))])
            return 0
        cdef ServerTransaction txn = ServerTransaction(self, request, source, key)
        self._server[key] = txn
        try:
            self._on_request(txn, request)
        except ParseError as exc:
            # Malformed content the TU met while handling the request (a header parsed
            # lazily): the RFC's answer is 400 with the problem, never silence.
            log.debug("400 for %s from %s: %s", request.method, source, exc)
            if txn._state == S_TRYING or txn._state == S_PROCEEDING:
                txn.respond_statelessly(request.reply(
                    400, f"Bad Request ({exc.reason})"[:120], to_tag=local_tag()))
        except Exception:
            log.exception("the transaction user failed on %s from %s", request.method, source)
            if txn._state == S_TRYING or txn._state == S_PROCEEDING:
                txn.respond_statelessly(request.reply(500, to_tag=local_tag()))
        if txn.is_invite:
            if txn._state == S_PROCEEDING and txn.last_response is None:
                # §17.2.1: a 100 unless the TU answers within 200 ms; it did not answer at once.
                txn.respond(request._reply(100, None, None, None, None, None, False))
        elif txn._state == S_TRYING or txn._state == S_PROCEEDING:
            txn._timeout = self._later_lax(2 * self._timeout, txn._abandon)
        return 0

    cdef int _answer_statelessly(self, object request, object source, int status,
                                 object reason, object headers=None) except -1:
        """A response outside any transaction (none could be made): never to an ACK."""
        if request.method == "ACK":
            return 0
        top = request.top_via
        if top is None:
            return 0
        response = request.reply(status, reason, to_tag=local_tag(), headers=headers)
        self._send(wire(response), response_destination(top, source))
        return 0

    cdef bint _reclaim(self, dict lingering) except -1:
        """A table is full: end its oldest lingering transaction early, if it has one (True).
        A finished transaction lingers up to 32 s only to absorb retransmissions (Timers D, I,
        J, K, L, M), so at a steady 1,000 calls/s a proxy holds some 64,000 that do no work;
        they must not make it refuse new calls.  The oldest is the least likely to meet a
        retransmission still.  Refused (False): every transaction in the table is at work."""
        if not lingering:
            return False
        oldest = lingering[next(iter(lingering))]
        if type(oldest) is ServerTransaction:
            (<ServerTransaction>oldest)._end()
        else:
            (<ClientTransaction>oldest)._end()
        self.reclaimed += 1
        return True

    cdef int _overload(self, str side, object cap) except -1:
        if self.refusals.refused(self._now()):
            log.warning("overload: %d %s transactions (the cap): refusing new work with 503 "
                        "(%d refused so far)", cap, side, self.refusals.count)
        return 0

    def find_invite(self, cancel):
        """The INVITE server transaction a CANCEL refers to (§9.2): same key but the method."""
        key = self.server_key(cancel)
        # (No negative index: this module is compiled with wraparound off.)
        return self._server.get(key[:len(key) - 1] + ("INVITE",))

    # -- introspection ---------------------------------------------------------------------

    @property
    def client_transactions(self):
        return len(self._client)

    @property
    def server_transactions(self):
        return len(self._server)

    def __len__(self):
        return len(self._client) + len(self._server)
