# cython: language_level=3, annotation_typing=False
"""The server's wrapper of the Router, compiled: :class:`ServeRouter` refuses new initial
requests while the server drains, and logs each initial request with its outcome (the line
``fastsip serve`` documents: ``request method=... status=... outcome=...``).  It runs twice for
every initial request (on arrival, and on its first final response), so it is a ``cdef`` class;
:mod:`fastsip.app.serve` imports it from here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fastsip.app._logline cimport QueueEmitter
from fastsip.sip._message cimport Message, NameAddr

from fastsip.app import logqueue
from fastsip.app.logqueue import direct_emitter

#: The per-request lines go out on serve's logger (operators filter on its name).
log = logging.getLogger("fastsip.app.serve")


cdef str _outcome(str method, int status, bint cancelled=False):
    """A word for the log: what became of the request, as an operator reads it.

    ``cancelled``: the caller's CANCEL reached us (the response context knows, §16.10), so a
    failure that went up -- normally 487 -- is the caller hanging up before an answer, not a
    rejection.  A 487 from downstream without a CANCEL of the caller's is *not* "cancelled":
    something past us ended the request (a B2BUA's other leg, a device's own policy), and the
    caller did not ask for it; it stays "rejected" with its status in the line."""
    if cancelled and status >= 300:
        return "cancelled"
    if status < 300:
        return "registered" if method == "REGISTER" else (
            "answered" if method == "INVITE" else "accepted")
    if status < 400:
        return "redirected"
    if status == 401 or status == 407:
        return "challenged"
    if status == 503:
        return "unavailable"
    if status == 408 or status == 480:
        return "unanswered"
    return "rejected"


cdef bint _needs_quotes(str value):
    """Whether a log field value must be quoted: it has a space, a quote, an equals sign or a
    backslash.  (A loop over the str's code points in C: a regex search cost more than the
    rest of the line's fields together.)"""
    cdef Py_UCS4 c
    for c in value:
        if c == u' ' or c == u'"' or c == u'=' or c == u'\\':
            return True
    return False


cdef str _quote(str value):
    """A log field value: bare when it has no space, quote, equals sign or backslash, else
    quoted."""
    if value and not _needs_quotes(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


#: The per-request line; its arguments are all immutable (str, int, float), as the log
#: writer thread formats it later.
cdef str _REQUEST_LINE = "request method=%s status=%d outcome=%s duration_ms=%.1f %s"


cdef str _text_fields(tuple fields):
    call_id, frm, to, source = fields
    if call_id and frm and to and not (_needs_quotes(call_id) or _needs_quotes(frm)
                                       or _needs_quotes(to)):
        # The usual line: no value needs quotes (a scan each, no quoting call per field).
        return f"call_id={call_id} from={frm} to={to} source={source}"
    return f"call_id={_quote(call_id)} from={_quote(frm)} to={_quote(to)} source={source}"


cdef class ServeRouter:
    """Wraps the :class:`~fastsip.app.Router` for the server: refuses new initial requests
    while draining, and logs each initial request with its outcome (the proxy core's
    ``on_final`` hook: the first final response that went upstream, local or forwarded)."""

    cdef public object inner
    cdef public object clock
    cdef public int retry_after
    cdef public bint draining
    cdef public bint in_dialog
    cdef public bint wants_responses
    #: Initial requests whose final response has not gone upstream yet, by id(context):
    #: (method, fields, started, call_id); ``fields``: its Call-ID, From and To URIs and
    #: source, as logged (None when no line is logged).
    cdef public dict pending
    cdef bint _metrics
    cdef bint _lines
    cdef bint _track
    cdef bint _json
    cdef QueueEmitter _emit
    cdef public dict outcomes
    cdef public object on_answered

    def __init__(self, inner: Any, *, clock: Callable[[], float] = time.monotonic,
                 retry_after: int = 5, track: bool = False) -> None:
        self.inner = inner
        self.clock = clock
        self.retry_after = retry_after
        self.draining = False
        #: The routes' choice: see in-dialog requests too, or leave them to the core.
        self.in_dialog = bool(getattr(inner, "in_dialog", False))
        #: Only what the routes ask for: the outcome comes from on_final, not from here.
        self.wants_responses = bool(getattr(inner, "wants_responses", False))
        self.pending = {}
        #: A line per request at INFO; outcomes counted then, or when metrics ask (``track``).
        self._metrics = track
        self._lines = log.isEnabledFor(logging.INFO)
        self._track = self._lines or track
        #: JSON lines: the fields go as ``extra=`` (the text line is not built at all).
        self._json = logqueue.structured(log)
        #: Under ``fastsip serve`` the line is queued as a tuple for the log writer thread.
        self._emit = direct_emitter(log, logging.INFO)
        #: Counts by outcome word, for the summary at stop and the metrics (one source).
        self.outcomes = {}
        #: Called with the Call-ID of each initial INVITE answered (the metrics' calls).
        self.on_answered = None

    # RequestRouter -------------------------------------------------------------------------

    def attach(self, proxy: Proxy) -> None:
        attach = getattr(self.inner, "attach", None)
        if attach is not None:
            attach(proxy)

    def on_request(self, ctx: ProxyContext) -> None:
        request = ctx.request
        if self.draining:
            to = request.to
            if to is None or to.tag is None:  # in-dialog requests (routes with in_dialog) pass
                started = self.clock()
                ctx.respond(503, "Shutting Down",
                            headers=[("Retry-After", str(self.retry_after))])
                if self._track:
                    self._log(request.method, _fields(ctx) if self._lines else None,
                              started, 503, False)
                return
        if self._track and not ctx.stateless:
            # Before the router runs: a local answer (registrar, 404) reaches on_final at once.
            self.pending[id(ctx)] = (request.method, _fields(ctx) if self._lines else None,
                                     self.clock(), request.call_id or "")
        self.inner.on_request(ctx)

    def on_failure(self, ctx: ResponseContext, best: Response) -> bool:
        return bool(self._owner(ctx).on_failure(ctx, best))

    def on_response(self, ctx: ResponseContext, response: Response) -> None:
        self._owner(ctx).on_response(ctx, response)

    def _owner(self, ctx: ResponseContext) -> Any:
        """The Router that took the request: after a reload (SIGHUP) a request in flight keeps
        the routes and authenticator it started with."""
        owner = getattr(ctx.data, "router", None)
        return owner if owner is not None else self.inner

    def use(self, inner: Any) -> None:
        """Route new requests with ``inner`` (a reload); the log level may have changed too.
        (A response hook that appears or goes with the reload takes a restart: the proxy
        asked ``wants_responses`` once.)"""
        if bool(getattr(inner, "wants_responses", False)) != self.wants_responses:
            log.warning("reload: the routes %s a response hook: that takes a restart",
                        "add" if not self.wants_responses else "remove")
        self.inner = inner
        self.in_dialog = bool(getattr(inner, "in_dialog", False))
        self._lines = log.isEnabledFor(logging.INFO)
        self._track = self._lines or self._metrics
        self._emit = direct_emitter(log, logging.INFO)

    def on_final(self, ctx: ResponseContext, response: Response) -> None:
        entry = self.pending.pop(id(ctx), None)
        if entry is not None:
            method, fields, started, call_id = entry
            outcome = self._log(method, fields, started, response.status_code,
                                ctx.cancelled)
            if outcome == "answered" and self.on_answered is not None:
                self.on_answered(call_id, self.clock())

    # outcome tracking ----------------------------------------------------------------------

    cdef str _log(self, str method, fields, double started, int status, bint cancelled):
        """Count the request's outcome, and log its line when ``fields`` are given."""
        outcome = _outcome(method, status, cancelled)
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if fields is None:           # counted for the metrics; no line at this log level
            return outcome
        duration = (self.clock() - started) * 1000.0
        if self._json:
            # The fields as they are: the JSON formatter (the writer thread) escapes them.
            extra = _request_extra(method, status, outcome, duration, fields)
            if self._emit is not None:
                self._emit.emit("request", (), extra)
            else:
                log.info("request", extra=extra)
            return outcome
        args = (method, status, outcome, duration, _text_fields(fields))
        if self._emit is not None:   # straight onto the writer's queue: no LogRecord
            self._emit.emit(_REQUEST_LINE, args, None)
        else:
            log.info(_REQUEST_LINE, *args,
                     extra=_request_extra(method, status, outcome, duration, fields))
        return outcome

    def flush(self) -> None:
        """At stop: log what never got a final response."""
        for method, fields, started, _ in self.pending.values():
            self.outcomes["abandoned"] = self.outcomes.get("abandoned", 0) + 1
            if fields is None:
                continue
            duration = (self.clock() - started) * 1000.0
            extra = _request_extra(method, None, "abandoned", duration, fields)
            if self._json:
                log.info("request", extra=extra)
            else:
                log.info("request method=%s status=- outcome=abandoned duration_ms=%.1f %s",
                         method, duration, _text_fields(fields), extra=extra)
        self.pending.clear()


cdef tuple _fields(ctx):
    # What the line names: the Call-ID, the From and To URIs (their text, as the core checked
    # it: no URI is built for the line) and the source.
    cdef Message request = ctx.request
    cdef NameAddr frm = request._from()
    cdef NameAddr to = request._to()
    return (request._call_id() or "", (frm._uri_text() or "") if frm is not None else "",
            (to._uri_text() or "") if to is not None else "", str(ctx.source))


cdef dict _request_extra(str method, status, str outcome, double duration_ms, tuple fields):
    """The request line's fields, for ``extra=`` (a JSON line's keys)."""
    call_id, frm, to, source = fields
    return {"method": method, "status": status, "outcome": outcome,
            "duration_ms": round(duration_ms, 1), "call_id": call_id, "from": frm, "to": to,
            "source": source}
