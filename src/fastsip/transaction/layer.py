"""RFC 3261 §17 transactions (with RFC 6026's Accepted state), sans-IO.

The layer takes parsed messages with their source address (:meth:`TransactionLayer.receive`) and
requests to send (:meth:`TransactionLayer.request`); it sends through a
:class:`~fastsip.transport.Transport` and keeps its timers on a clock with ``call_later`` and
``time`` (a :class:`~fastsip.TimerWheel`, or the asyncio ``WheelDriver`` over one).  It never
reads a clock or touches a socket itself, so every timer can be tested at exact times.

Retransmissions of requests and responses, and the ACK of a non-2xx final response, are handled
here: the transaction user (UA core, proxy) sees each request once, each response once (2xx
retransmissions excepted: RFC 6026 hands those to the TU, which owns the 2xx/ACK exchange).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fastsip.errors import ParseError
from fastsip.sip import Message, Request, Response
from fastsip.transport import Address, Transport
from fastsip.transport.rules import local_tag, response_destination

__all__ = [
    "ClientHandler",
    "ClientTransaction",
    "Refusals",
    "ServerTransaction",
    "TimerConfig",
    "TransactionLayer",
    "TransactionUser",
    "new_branch",
]

log = logging.getLogger("fastsip.transaction")

MAGIC_COOKIE = "z9hG4bK"


def new_branch() -> str:
    """A fresh RFC 3261 branch: the magic cookie and 64 random bits (§8.1.1.7)."""
    return MAGIC_COOKIE + os.urandom(8).hex()


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """T1 (RTT estimate), T2 (maximum retransmit interval for non-INVITE requests and INVITE
    responses) and T4 (maximum duration a message stays in the network), §17.1.1.1."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0

    @property
    def timeout(self) -> float:
        """64*T1: Timers B, F, H, J (unreliable), L, M."""
        return 64 * self.t1


class Clock(Protocol):
    """What the layer schedules on.  A clock may also offer ``call_later_lax`` (the wheel and
    its loop driver do): the same, for a timer whose exact moment does not matter, which it may
    fire a little late so that many share a wakeup; without it, ``call_later`` is used."""

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Any: ...
    def time(self) -> float: ...


class ClientHandler(Protocol):
    """The transaction user's side of a client transaction."""

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        """Each provisional and final response once; for INVITE, every 2xx (RFC 6026)."""

    def on_timeout(self, txn: ClientTransaction) -> None:
        """Timer B or F: no final response (the TU acts as if a 408 had come, §8.1.3.1)."""

    def on_transport_error(self, txn: ClientTransaction) -> None:
        """The request could not be sent (the TU acts as if a 503 had come, §8.1.3.1)."""


class TransactionUser(Protocol):
    """The transaction user above the server side (UA core or proxy core)."""

    def on_request(self, txn: ServerTransaction, request: Request) -> None:
        """A new request (never a retransmission; never an ACK)."""

    def on_ack(self, request: Request, source: Address) -> None:
        """An ACK that belongs to no INVITE server transaction in Completed state: the ACK
        for a 2xx, which the UA core (or a proxy, end to end) handles (§13.3.1.4, §16.7)."""

    def on_stray_response(self, response: Response, source: Address) -> None:
        """A response that matches no client transaction: a proxy forwards it statelessly
        (§16.7), a UAC ACKs a retransmitted 2xx (§13.2.2.4)."""

    def on_server_timeout(self, txn: ServerTransaction) -> None:
        """Timer H: the ACK for a non-2xx final response never came (§17.2.1)."""

    # Optional: ``sheds_messages = True`` says the TU never reads a transaction's ``request``
    # or ``last_response`` once it has its final response (the proxy core).  The layer then
    # drops both when the transaction starts to linger (Timers D, J, K, L, M: up to 32 s, and
    # at carrier rates every byte a lingering transaction keeps is multiplied by tens of
    # thousands); ``request`` then raises, ``last_response`` is None.


# States (RFC 3261 figures 5-8, RFC 6026 figures 5 and 7).
CALLING = "calling"
TRYING = "trying"
PROCEEDING = "proceeding"
COMPLETED = "completed"
ACCEPTED = "accepted"
CONFIRMED = "confirmed"
TERMINATED = "terminated"


class _Lingering:
    """What either kind of transaction does with its messages once it lingers (Completed or
    Accepted): for a TU that ``sheds_messages`` the parsed request and response go, and only
    the bytes a retransmission needs stay (a client's ACK, a server's final response)."""

    __slots__ = ("_request", "last_response")
    _request: Request | None
    last_response: Response | None
    layer: TransactionLayer

    @property
    def request(self) -> Request:
        """The request this transaction sent or received (gone once it lingers, for a TU that
        ``sheds_messages``)."""
        if self._request is None:
            raise ValueError(f"{self!r} has shed its request (its TU sheds_messages)")
        return self._request

    def _shed(self) -> None:
        if self.layer.shed:
            self._request = None
            self.last_response = None


class ClientTransaction(_Lingering):
    """A client transaction (§17.1): INVITE (figure 5 + RFC 6026) or non-INVITE (figure 6)."""

    __slots__ = (
        "_ack",
        "_data",
        "_deadline",
        "_interval",
        "_timeout",
        "_timer",
        "dest",
        "handler",
        "is_invite",
        "key",
        "layer",
        "method",
        "state",
    )

    def __init__(self, layer: TransactionLayer, request: Request, dest: Address,
                 handler: ClientHandler, key: tuple[str, str]) -> None:
        self.layer = layer
        self._request: Request | None = request
        self.dest = dest
        self.handler = handler
        self.key = key
        self.method = request.method
        self.is_invite = self.method == "INVITE"
        self.state = CALLING if self.is_invite else TRYING
        self.last_response: Response | None = None
        self._data = bytes(request)
        self._timer: Any = None       # A or E (retransmit) and then B or F, or D or K (linger)
        self._timeout: Any = None     # B or F over a reliable transport, then M (Accepted)
        self._interval = layer.config.t1
        self._deadline = 0.0          # Timer B or F, when the retransmissions carry it
        self._ack: bytes | None = None

    @property
    def branch(self) -> str:
        return self.key[0]

    def _start(self) -> None:
        cfg = self.layer.config
        clock = self.layer.clock
        if self.dest.reliable:
            self._timeout = self.layer.call_later_lax(cfg.timeout, self._on_timeout)
        else:
            # Over UDP Timer B (or F) is not a wheel node of its own: Timer A (or E) keeps
            # firing until B is due, so its chain carries B's deadline and its last link is
            # armed for B itself.  A final response (almost every transaction gets one) then
            # cancels one node, and the start schedules one, instead of two each.
            self._deadline = clock.time() + cfg.timeout
            self._timer = clock.call_later(cfg.t1, self._retransmit)
        self.layer.transport.send(self._data, self.dest)

    def _retransmit(self) -> None:
        # Timer A (INVITE: doubles without bound while Calling) or E (non-INVITE: doubles up to
        # T2, and runs at T2 once a provisional response has come).
        if self.state not in (CALLING, TRYING, PROCEEDING) or (self.is_invite and self.state != CALLING):
            return
        cfg = self.layer.config
        if self.is_invite:
            self._interval *= 2
        elif self.state == PROCEEDING:
            self._interval = cfg.t2
        else:
            self._interval = min(self._interval * 2, cfg.t2)
        clock = self.layer.clock
        left = self._deadline - clock.time()
        if left <= self._interval:
            # Timer B / F comes before the next retransmission (or with it: it wins, as a
            # separate B armed at the start would have fired first).
            self._timer = clock.call_later(max(left, 0.0), self._on_deadline)
        else:
            self._timer = clock.call_later(self._interval, self._retransmit)
        self.layer.transport.send(self._data, self.dest)

    def _on_deadline(self) -> None:
        # Timer B / F at the end of the retransmission chain (over UDP).
        self._timer = None
        self._on_timeout()

    def _on_timeout(self) -> None:
        self._timeout = None
        if self.state == ACCEPTED:                       # Timer M
            self._terminate()
            return
        if self.state in (CALLING, TRYING, PROCEEDING) and not (self.is_invite and self.state == PROCEEDING):
            self._terminate()                            # Timer B / F
            self.handler.on_timeout(self)

    def _linger(self, delay: float) -> None:
        # Timer D / K: absorb retransmitted final responses, then go.
        if delay <= 0:
            self._terminate()
        else:
            self._timer = self.layer.call_later_lax(delay, self._terminate)

    def _receive(self, response: Response) -> None:
        status = response.status_code
        state = self.state
        cfg = self.layer.config
        if state == TERMINATED:
            return
        if status < 200:
            if state in (CALLING, TRYING):
                self.state = PROCEEDING
                if self.is_invite:
                    self._stop_retransmitting()          # Timer A stops; B stops too
                    self._cancel_timeout()
            if state in (CALLING, TRYING, PROCEEDING):
                self.last_response = response
                self.handler.on_response(self, response)
            return
        if self.is_invite:
            if 200 <= status < 300:
                if state in (CALLING, PROCEEDING):
                    self.state = ACCEPTED                # RFC 6026: absorb nothing, pass every 2xx
                    self._stop_retransmitting()
                    self._cancel_timeout()
                    self._timeout = self.layer.call_later_lax(cfg.timeout, self._on_timeout)
                    self._shed()
                if self.state == ACCEPTED:
                    if not self.layer.shed:
                        self.last_response = response
                    self.handler.on_response(self, response)
                return
            if state in (CALLING, PROCEEDING):
                self.state = COMPLETED
                self._stop_retransmitting()
                self._cancel_timeout()
                self.last_response = response
                self._ack = bytes(self._build_ack(response))
                self.layer.transport.send(self._ack, self.dest)
                self.handler.on_response(self, response)
                self._shed()
                self._linger(0 if self.dest.reliable else 32.0)
            elif state == COMPLETED and self._ack is not None:
                self.layer.transport.send(self._ack, self.dest)  # final retransmitted: ACK again
            return
        if state in (TRYING, PROCEEDING):
            self.state = COMPLETED
            self._stop_retransmitting()
            self._cancel_timeout()
            self.last_response = response
            self.handler.on_response(self, response)
            self._shed()
            self._linger(0 if self.dest.reliable else cfg.t4)

    def _build_ack(self, response: Response) -> Request:
        """The ACK for a non-2xx final response (§17.1.1.3): same Request-URI, Call-ID, From,
        CSeq number and top Via as the INVITE, To from the response, the INVITE's Route set."""
        req = self.request
        headers: list[tuple[str, str]] = [("Via", str(req.via[0]))]
        headers += [("Route", str(r)) for r in req.route]
        headers += [
            ("Max-Forwards", "70"),
            ("From", req.headers.get("From") or ""),
            ("To", response.headers.get("To") or ""),
            ("Call-ID", req.call_id or ""),
            ("CSeq", f"{req.cseq.seq if req.cseq else 0} ACK"),
        ]
        return Request.create("ACK", str(req.uri), headers)

    def transport_error(self) -> None:
        if self.state == TERMINATED:
            return
        self._terminate()
        self.handler.on_transport_error(self)

    def _stop_retransmitting(self) -> None:
        # Timer A/E (or D/K, the linger) is stopped; the request's bytes are never sent again
        # from here, so they go: a finished transaction lingers for up to 32 s (Timer D/M),
        # and at carrier rates every byte it keeps is multiplied by tens of thousands.
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._data = b""

    def _cancel_timeout(self) -> None:
        if self._timeout is not None:
            self._timeout.cancel()
            self._timeout = None

    def _terminate(self) -> None:
        if self.state == TERMINATED:
            return
        self.state = TERMINATED
        self._stop_retransmitting()
        self._cancel_timeout()
        self.layer._client.pop(self.key, None)

    def __repr__(self) -> str:
        return f"<ClientTransaction {self.method} {self.branch} {self.state}>"


class ServerTransaction(_Lingering):
    """A server transaction (§17.2): INVITE (figure 7 + RFC 6026) or non-INVITE (figure 8)."""

    __slots__ = (
        "_data",
        "_interval",
        "_timeout",
        "_timer",
        "data",
        "dest",
        "is_invite",
        "key",
        "layer",
        "method",
        "source",
        "state",
    )

    def __init__(self, layer: TransactionLayer, request: Request, source: Address,
                 key: tuple[Any, ...]) -> None:
        self.layer = layer
        self._request: Request | None = request
        self.source = source
        self.key = key
        self.method = request.method
        self.is_invite = self.method == "INVITE"
        self.state = PROCEEDING if self.is_invite else TRYING
        self.last_response: Response | None = None
        top = request.top_via
        self.dest = response_destination(top, source) if top is not None else source
        self._data: bytes | None = None
        self._timer: Any = None
        self._timeout: Any = None
        self._interval = layer.config.t1
        self.data: Any = None  # for the transaction user

    def respond(self, response: Response) -> None:
        """Send a response through the transaction (§17.2.1, §17.2.2)."""
        status = response.status_code
        state = self.state
        if state in (COMPLETED, CONFIRMED, TERMINATED):
            raise ValueError(f"{self!r} already sent a final response")
        cfg = self.layer.config
        if state == ACCEPTED:
            if 200 <= status < 300:                      # the TU retransmits its 2xx (§13.3.1.4)
                self.layer.transport.send(bytes(response), self.dest)
                return
            raise ValueError("a final response was already sent")
        self.last_response = response
        self._data = bytes(response)
        self.layer.transport.send(self._data, self.dest)
        if status < 200:
            if state == TRYING:
                self.state = PROCEEDING
            return
        if self._timeout is not None:                    # the abandon guard, if armed
            self._timeout.cancel()
            self._timeout = None
        self._shed()
        if self.is_invite and status < 300:
            self.state = ACCEPTED                        # RFC 6026: Timer L
            self._data = None          # never resent by us: the TU retransmits its 2xx
            self._timeout = self.layer.call_later_lax(cfg.timeout, self._terminate)
            return
        self.state = COMPLETED
        if self.is_invite:
            if not self.dest.reliable:                   # Timer G
                self._timer = self.layer.clock.call_later(cfg.t1, self._retransmit)
            self._timeout = self.layer.call_later_lax(cfg.timeout, self._on_timer_h)
        elif self.dest.reliable:
            self._terminate()                            # Timer J = 0
        else:
            self._timeout = self.layer.call_later_lax(cfg.timeout, self._terminate)

    def respond_statelessly(self, response: Response) -> None:
        """Send a final response outside the state machine and forget the transaction, as a
        stateless proxy would (§16.11; Kamailio's ``sl_send_reply``): no Timer G
        retransmissions, no Timer H/J linger, nothing kept.  A retransmitted request is then
        processed anew (the TU gives the same answer), and the ACK for a non-2xx matches
        nothing and reaches the TU's ``on_ack``.

        For local negative answers to requests from sources that may be forged or flooding:
        neither memory nor traffic then grows with their rate (one response per request)."""
        if self.state in (COMPLETED, CONFIRMED, ACCEPTED, TERMINATED):
            raise ValueError(f"{self!r} already sent a final response")
        if response.status_code < 200:
            raise ValueError("a provisional response is never sent statelessly")
        self.last_response = response
        self.layer.transport.send(bytes(response), self.dest)
        self._terminate()

    def reply(self, status: int, reason: str | None = None, **kwargs: Any) -> Response:
        """Build a response with ``request.reply()`` and send it; returns it."""
        response = self.request.reply(status, reason, **kwargs)
        self.respond(response)
        return response

    def _retransmit(self) -> None:
        if self.state != COMPLETED or self._data is None:
            return
        self._interval = min(self._interval * 2, self.layer.config.t2)
        self._timer = self.layer.clock.call_later(self._interval, self._retransmit)
        self.layer.transport.send(self._data, self.dest)

    def _abandon(self) -> None:
        # No timer of §17.2.2 ends a non-INVITE server transaction whose TU never answers; the
        # client gave up at Timer F (64*T1) long before this fires, so free the entry.
        self._timeout = None
        if self.state in (TRYING, PROCEEDING):
            log.warning("%r: no final response from the transaction user; dropped", self)
            self._terminate()

    def _on_timer_h(self) -> None:
        self._timeout = None
        if self.state == COMPLETED:
            self._terminate()
            self.layer.tu.on_server_timeout(self)

    def _receive_retransmission(self, request: Request, source: Address) -> None:
        state = self.state
        if request.method == "ACK":
            if self.is_invite and state == COMPLETED:
                self.state = CONFIRMED                   # Timer I
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if self._timeout is not None:
                    self._timeout.cancel()
                    self._timeout = None
                if self.dest.reliable:
                    self._terminate()
                else:
                    self._timeout = self.layer.call_later_lax(self.layer.config.t4, self._terminate)
            elif state == ACCEPTED:
                self.layer.tu.on_ack(request, source)    # RFC 6026: the 2xx's ACK goes up
            return
        if state in (PROCEEDING, COMPLETED) and self._data is not None:
            self.layer.transport.send(self._data, self.dest)  # last response again

    def _terminate(self) -> None:
        if self.state == TERMINATED:
            return
        self.state = TERMINATED
        for t in (self._timer, self._timeout):
            if t is not None:
                t.cancel()
        self._timer = self._timeout = None
        self.layer._server.pop(self.key, None)

    def __repr__(self) -> str:
        return f"<ServerTransaction {self.method} {self.key[0]} {self.state}>"


class Refusals:
    """Counts requests refused for overload and says when a log line is due: at most one
    every ``every`` seconds (under a flood a line per refused request would be a second
    flood, into the log).  ``count`` is the total, for the next line and for metrics."""

    __slots__ = ("_last", "count", "every")

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self.count = 0
        self._last = float("-inf")

    def refused(self, now: float) -> bool:
        """One more refusal at ``now``; True when it should be logged."""
        self.count += 1
        if now - self._last >= self.every:
            self._last = now
            return True
        return False


class TransactionLayer:
    """The transaction table and the matching rules of §17.1.3 and §17.2.3.

    ``max_server_transactions`` / ``max_client_transactions`` bound the tables (memory under
    any load): a new request beyond the server cap is answered ``503`` with ``Retry-After:
    retry_after`` statelessly (an ACK is dropped), and :meth:`request` beyond the client cap
    raises ValueError (a proxy's branch then fails as with a 503).  ``None``: no cap.
    """

    def __init__(self, transport: Transport, clock: Clock, tu: TransactionUser,
                 config: TimerConfig | None = None, *,
                 max_server_transactions: int | None = None,
                 max_client_transactions: int | None = None,
                 retry_after: int = 5) -> None:
        self.transport = transport
        self.clock = clock
        #: For the timers that only free state or give up after 64*T1 (B and F over reliable
        #: transports, D, H, I, J, K, L, M, the abandon guard): they may fire a little late
        #: (``TimerWheel.call_later_lax``: at most 128 ms, at most an eighth of the delay), so
        #: the lingering transactions of every call share a few wakeups a second instead of a
        #: wakeup each -- 1.6 more per call than the call's own datagrams, measured in serve at
        #: 150 calls/s.  Retransmissions (A, E, G) and the end of a UDP chain stay exact.
        self.call_later_lax: Callable[..., Any] = getattr(clock, "call_later_lax",
                                                          clock.call_later)
        self.tu = tu
        #: Drop a transaction's messages when it starts to linger (the TU's ``sheds_messages``).
        self.shed = bool(getattr(tu, "sheds_messages", False))
        self.config = config or TimerConfig()
        self.max_server_transactions = max_server_transactions
        self.max_client_transactions = max_client_transactions
        self.retry_after = retry_after
        #: Requests refused because a table was full (for logs and metrics).
        self.refusals = Refusals()
        self._client: dict[tuple[str, str], ClientTransaction] = {}
        self._server: dict[tuple[Any, ...], ServerTransaction] = {}

    # -- sending ---------------------------------------------------------------------------

    def request(self, request: Request, dest: Address, handler: ClientHandler) -> ClientTransaction:
        """Start a client transaction for ``request`` (whose top Via, with a fresh branch, the
        caller has added: see :func:`new_branch`) towards ``dest``.  Not for ACK (§17.1)."""
        if request.method == "ACK":
            raise ValueError("ACK is not sent in a client transaction")
        top = request.top_via
        if top is None or not top.branch:
            raise ValueError("the request needs a top Via with a branch")
        key = (top.branch, request.method)
        if key in self._client:
            raise ValueError(f"a client transaction for branch {top.branch} exists")
        cap = self.max_client_transactions
        if cap is not None and len(self._client) >= cap:
            self._overload("client", cap)
            raise ValueError(f"{cap} client transactions in progress (the cap)")
        txn = ClientTransaction(self, request, dest, handler, key)
        self._client[key] = txn
        txn._start()
        return txn

    def client_transaction(self, key: tuple[str, str]) -> ClientTransaction | None:
        """The client transaction of ``key`` (its top Via branch and method), if it exists."""
        return self._client.get(key)

    def transport_error(self, dest: Address) -> None:
        """Sending to ``dest`` failed: its client transactions end with on_transport_error."""
        for txn in [t for t in self._client.values() if t.dest.peer == dest.peer]:
            txn.transport_error()

    # -- receiving -------------------------------------------------------------------------

    def receive(self, msg: Message, source: Address) -> None:
        """Hand a parsed message from ``source`` to its transaction, or up to the TU."""
        if isinstance(msg, Response):
            self._receive_response(msg, source)
        else:
            self._receive_request(msg, source)  # type: ignore[arg-type]

    def _receive_response(self, response: Response, source: Address) -> None:
        key = response.transaction_key()    # (branch, CSeq method), read from the index
        if key is None:
            return
        txn = self._client.get(key)
        try:
            if txn is None:
                self.tu.on_stray_response(response, source)
            else:
                txn._receive(response)
        except ParseError as exc:
            # A response is never answered (§18.1.2): a malformed one is dropped.
            log.debug("dropping a %d from %s: %s", response.status_code, source, exc)

    def server_key(self, request: Request) -> tuple[Any, ...]:
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

    def _receive_request(self, request: Request, source: Address) -> None:
        try:
            key = self.server_key(request)
        except ParseError as exc:           # an RFC 2543 key over a From that does not parse
            self._answer_statelessly(request, source, 400, f"Bad Request ({exc.reason})"[:120])
            return
        txn = self._server.get(key)
        if txn is not None:
            txn._receive_retransmission(request, source)
            return
        if request.method == "ACK":
            try:
                self.tu.on_ack(request, source)
            except ParseError as exc:
                log.debug("dropping ACK from %s: %s", source, exc)
            return
        cap = self.max_server_transactions
        if cap is not None and len(self._server) >= cap:
            self._overload("server", cap)
            self._answer_statelessly(request, source, 503, None,
                                     [("Retry-After", str(self.retry_after))])
            return
        txn = ServerTransaction(self, request, source, key)
        self._server[key] = txn
        try:
            self.tu.on_request(txn, request)
        except ParseError as exc:
            # Malformed content the TU met while handling the request (a header parsed
            # lazily): the RFC's answer is 400 with the problem, never silence.
            log.debug("400 for %s from %s: %s", request.method, source, exc)
            if txn.state in (TRYING, PROCEEDING):
                txn.respond_statelessly(request.reply(
                    400, f"Bad Request ({exc.reason})"[:120], to_tag=local_tag()))
        except Exception:
            log.exception("the transaction user failed on %s from %s", request.method, source)
            if txn.state in (TRYING, PROCEEDING):
                txn.respond_statelessly(request.reply(500, to_tag=local_tag()))
        if txn.is_invite:
            if txn.state == PROCEEDING and txn.last_response is None:
                # §17.2.1: a 100 unless the TU answers within 200 ms; it did not answer at once.
                txn.respond(request.reply(100))
        elif txn.state in (TRYING, PROCEEDING):
            txn._timeout = self.call_later_lax(2 * self.config.timeout, txn._abandon)

    def _answer_statelessly(self, request: Request, source: Address, status: int,
                            reason: str | None,
                            headers: list[tuple[str, str]] | None = None) -> None:
        """A response outside any transaction (none could be made): never to an ACK."""
        if request.method == "ACK":
            return
        top = request.top_via
        if top is None:
            return
        response = request.reply(status, reason, to_tag=local_tag(), headers=headers)
        self.transport.send(bytes(response), response_destination(top, source))

    def _overload(self, side: str, cap: int) -> None:
        if self.refusals.refused(self.clock.time()):
            log.warning("overload: %d %s transactions (the cap): refusing new work with 503 "
                        "(%d refused so far)", cap, side, self.refusals.count)

    def find_invite(self, cancel: Request) -> ServerTransaction | None:
        """The INVITE server transaction a CANCEL refers to (§9.2): same key but the method."""
        key = self.server_key(cancel)
        return self._server.get(key[:-1] + ("INVITE",))

    # -- introspection ---------------------------------------------------------------------

    @property
    def client_transactions(self) -> int:
        return len(self._client)

    @property
    def server_transactions(self) -> int:
        return len(self._server)

    def __len__(self) -> int:
        return len(self._client) + len(self._server)
