# cython: language_level=3, annotation_typing=False
"""The routing API's classes, compiled: :mod:`fastsip.app.router` documents them (the default
routing, the relay policy) and is where users import them from.

They run for every initial request -- the Request a handler gets, the Decision it returns, the
Router applying it, the location lookup, the relay policy -- so they are ``cdef`` classes whose
common path calls itself in C; what a handler calls (the properties, ``relay()``, ``reply()``)
stays a Python method, and the cold paths (async hooks, gateway failover, identity) stay as they
were.  (Annotations document; the typed fields and ``cdef`` methods below are what is typed.)
"""

from __future__ import annotations

from fastsip.proxy._nat cimport binding_flow

import inspect
import logging
import time
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any

from fastsip.app import numbers
from fastsip.app.gateways import GatewaySet, gateway_failed
from fastsip.app.numbers import normalize_e164
from fastsip.app.routes import Routes
from fastsip.errors import FastSIPError, ParseError
from fastsip.proxy.core import Proxy, ProxyContext, ResponseContext, Target
from fastsip.proxy.edge import SourceGuard
from fastsip.proxy.location import run_immediately
from fastsip.proxy.registrar import SUPPORTED as _REGISTRAR_SUPPORTED
from fastsip.sip import URI, Headers, NameAddr, Response
from fastsip.sip import Request as SipRequest
from fastsip.transaction import Refusals
from fastsip.transport import Address

log = logging.getLogger("fastsip.app")

#: What the default routing answers OPTIONS with (RFC 3261 §11.2).
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS, REGISTER, SUBSCRIBE, NOTIFY, REFER, MESSAGE, " \
        "UPDATE, INFO, PRACK"
#: The extensions we support, for that answer: the registrar's (Path, RFC 3327).
SUPPORTED = ", ".join(sorted(_REGISTRAR_SUPPORTED))


cdef class Router
cdef class Request


cdef class Decision:
    """What a handler returns: forward to targets, or answer.  Made by :class:`Request`'s
    methods (``relay``, ``fork``, ``reply``, ``redirect``, ``challenge``, ``register``).

    Two kinds wait for the location store and are resolved by the :class:`Router` after the
    handler returns, so a plain ``def`` handler never has to await a store: ``"register"``
    (the registrar handles the REGISTER; its answer is the decision) and ``"lookup"`` (the
    Request-URI's registered contacts, 404 when there are none; ``targets[0].route`` is pushed
    in front of each)."""

    cdef public str kind
    cdef public list targets
    cdef public bint parallel
    cdef public list groups
    cdef public int status
    cdef public object reason
    cdef public list headers
    cdef public object response
    cdef public object stateless
    cdef public object ring_timeout

    def __init__(self, kind: str, *, targets: Sequence[Target] = (), parallel: bool = True,
                 status: int = 0, reason: str | None = None,
                 headers: Iterable[tuple[str, str]] = (), response: Response | None = None,
                 groups: Sequence[Sequence[Target]] = (),
                 stateless: bool | None = None, ring_timeout: float | None = None) -> None:
        self.kind = kind              # "forward", "reply", "response"; "register", "lookup"
        self.targets = list(targets)
        self.parallel = parallel
        # Serial groups, each forked in parallel (most decisions have none).
        self.groups = [list(g) for g in groups] if groups else []
        self.status = status
        self.reason = reason
        self.headers = list(headers)
        self.response = response
        self.stateless = stateless    # None: the proxy core's rule (negative answers: yes)
        #: Seconds the branches of this decision may ring unanswered (None: Timer C only).
        self.ring_timeout = ring_timeout

    cpdef list all_targets(self):
        """Every target of a forward decision (the serial groups' too), in a new list."""
        if not self.groups:
            return list(self.targets)
        return self.targets + [t for g in self.groups for t in g]

    def __repr__(self) -> str:
        if self.kind == "forward":
            return f"<Decision forward {self.targets} parallel={self.parallel}>"
        if self.kind == "response" and self.response is not None:
            return f"<Decision response {self.response.status_code}>"
        if self.kind in ("register", "lookup"):
            return f"<Decision {self.kind}>"
        return f"<Decision reply {self.status}>"


cdef class Request:
    """A request as a routing handler sees it: the parsed message (``request``), where it came
    from (``source``), who sent it once authenticated (``user``), and the decisions.

    ``data`` is a dict for the handler's own notes (kept across the failure hook);
    ``failures`` lists the best responses that reached the failure hook so far; ``media``
    chooses whether this call's media goes through the relay (``serve --media``).
    """

    cdef public object ctx
    cdef public object user
    cdef public dict data
    cdef public list failures
    cdef public object media
    cdef Router _router
    cdef bint _stale
    cdef bint _checked
    cdef bint _blocked
    cdef object _trusted
    cdef object _gateways
    cdef object _ring_timer

    def __init__(self, router: Router, ctx: ProxyContext) -> None:
        self._router = router
        self.ctx = ctx
        self.user = None
        self._stale = False
        self._checked = False         # the credentials were verified (once: nonce-counts)
        self._blocked = False         # this user failed too often from this source: 403
        self._trusted = None
        self._gateways = None   # relay_to_set: the gateways left
        self._ring_timer = None
        self.data = {}
        self.failures = []
        #: Anchor this call's media in the relay (``serve --media``): None follows the
        #: server's default; a handler sets False to let a call's media go end to end.
        self.media = None

    @property
    def router(self) -> Router:
        """The Router that took this request (``fastsip serve`` sends its failure and response
        hooks there: a reload does not change the routes of a request in flight)."""
        return self._router

    # -- who is asking -----------------------------------------------------------------------

    @property
    def trusted(self) -> bool:
        """The source is trusted (``--trusted`` networks: gateways, SBCs, peer proxies), so the
        relay policy lets the request go anywhere.  A handler may set it (True: "I vouch for
        this request", e.g. after checking something the policy cannot know; False: treat a
        trusted source like any other)."""
        return self._is_trusted()

    cdef bint _is_trusted(self) except -1:
        if self._trusted is None:
            self._trusted = self._router.is_trusted(self.ctx.source.host)
        return self._trusted

    @trusted.setter
    def trusted(self, value: bool) -> None:
        self._trusted = bool(value)

    @property
    def authenticated(self) -> bool:
        """Digest credentials were checked and are good (``user`` is set).  False with no
        authenticator on the Router: nobody is authenticated then."""
        return self._authenticated()

    cdef bint _authenticated(self) noexcept:
        return self.user is not None
    # -- the message -------------------------------------------------------------------------

    @property
    def request(self) -> SipRequest:
        return self.ctx.request

    @property
    def source(self) -> Address:
        return self.ctx.source

    @property
    def method(self) -> str:
        return self.ctx.request.method

    @property
    def uri(self) -> URI:
        return self.ctx.request.uri

    @property
    def headers(self) -> Headers:
        return self.ctx.request.headers

    @property
    def from_(self) -> NameAddr | None:
        return self.ctx.request.from_

    @property
    def to(self) -> NameAddr | None:
        return self.ctx.request.to

    @property
    def call_id(self) -> str | None:
        return self.ctx.request.call_id

    @property
    def in_dialog(self) -> bool:
        return self._in_dialog()

    cdef bint _in_dialog(self) except -1:
        to = self.ctx.request.to
        return to is not None and to.tag is not None

    @property
    def trunk(self) -> str | None:
        """The name of the trunk (``serve --trunk``) this request came from: its source is the
        trunk's address, or its Request-URI is the Contact we registered there.  None: not
        from a trunk (or no trunks).  Routes use it to send a provider's calls to a user::

            if req.trunk == "provider":
                req.trusted = True                   # our provider: let it reach anyone
                return req.relay(to="sip:alice@example.com")
        """
        trunks = self._router.trunks
        if trunks is None:
            return None
        name: str | None = trunks.match(self.ctx.source, self.ctx.request)
        return name

    @property
    def for_us(self) -> bool:
        """Is the Request-URI in one of our domains (or naming this proxy)?"""
        return self._router.is_ours(self.ctx.request.uri)

    @property
    def from_us(self) -> bool:
        """Is the From URI in one of our domains?"""
        frm = self.ctx.request.from_
        return frm is not None and frm.uri is not None and self._router.is_ours(frm.uri)

    def number(self, country_code: str | None = None, national_prefix: str | None = None
               ) -> str | None:
        """The Request-URI as an E.164 number (``+`` and digits) -- a ``tel:`` URI, or a SIP
        URI's user part (``user=phone`` or not) -- or None when it is not a telephone number
        (a user name, a short code).  :func:`~fastsip.app.numbers.normalize_e164` says how;
        ``country_code`` and ``national_prefix`` give the national rule."""
        try:
            return normalize_e164(self.ctx.request.uri, country_code, national_prefix)
        except ValueError:
            return None

    # -- decisions ---------------------------------------------------------------------------

    def relay(self, to: str | URI | None = None, *, route: Sequence[str] = (),
              ring_timeout: float | None = None, trunk: str | None = None) -> Decision:
        """Forward the request.  Without ``to``: along its Route headers, else to the
        Request-URI -- for one of our domains, to the registered contacts (404 when none).
        With ``to``: to that URI, which becomes the Request-URI; a ``to`` without a user part
        keeps the Request-URI's user (``relay(to="sip:gw.example.net")`` sends
        ``sip:+4420...@gw.example.net``).  ``route``: Route values to push first (an
        outbound proxy: ``["<sip:edge.example.net;lr>"]``).  ``ring_timeout``: seconds the
        INVITE may ring unanswered before its branches are CANCELled; the failure hook then
        sees a 408 (call forwarding on no answer).  Without it, ``--ring-timeout`` (Timer C).

        For one of our users the contacts come from the location store, which may have to be
        waited for: the decision is then a ``"lookup"`` that the Router completes (and that
        becomes a 404 when the user has no binding).

        ``trunk``: the request goes to that trunk (``serve --trunk NAME=...``), to ``to`` or,
        without it, to the trunk's host with the Request-URI's user; the provider's 401/407
        are answered with the trunk's credentials and never reach the caller (the proxy
        stays in the dialog's path: docs/trunking.md).  The relay policy still applies."""
        req = self.ctx.request
        if trunk is not None:
            trunks = self._router.trunks
            if trunks is None or trunk not in trunks.specs:
                raise FastSIPError(f"relay(trunk={trunk!r}): no such trunk (serve --trunk)")
            uri = self._retarget(to if to is not None else trunks.uri(trunk))
            return Decision("forward", targets=[Target(uri, route=route, trunk=trunk)],
                            ring_timeout=ring_timeout)
        if to is None:
            if req.route or not self.for_us:
                return Decision("forward", targets=[Target(route=route)],
                                ring_timeout=ring_timeout)
            if self._router.registrar is None:
                return self.reply(404)
            return Decision("lookup", targets=[Target(route=route)], ring_timeout=ring_timeout)
        return Decision("forward", targets=[Target(self._retarget(to), route=route)],
                        ring_timeout=ring_timeout)

    def relay_to_set(self, gateway_set: str | GatewaySet, *, route: Sequence[str] = (),
                     ring_timeout: float | None = None) -> Decision:
        """Forward to a gateway set (``serve --gateway-set NAME=...``, or a
        :class:`~fastsip.app.gateways.GatewaySet` the routes module built): to its first
        active gateway by priority, then weight (a hash of the Call-ID: the same call always
        picks the same), and on a 5xx, a 408 or a transport error to the next active one,
        in that order, before the failure hook sees anything.  The dialled user part is kept
        for a gateway URI without one.  No active gateway: 503 with a Reason header."""
        gs = self._router.gateway_set(gateway_set)
        order = gs.select(self.call_id or "")
        if not order:
            gs.unavailable += 1
            log.warning("gateway set %s: no active gateway: 503 for %s %s", gs.name,
                        self.method, self.uri)
            return self.reply(503, "No Gateway Available", headers=[
                ("Reason", f'SIP;cause=503;text="no active gateway in set {gs.name}"')])
        self._gateways = _SetFailover(gs, [g.uri for g in order[1:]], route, ring_timeout)
        return self.relay(to=order[0].uri, route=route, ring_timeout=ring_timeout)

    def fork(self, targets: Iterable[TargetLike], *, parallel: bool = True,
             ring_timeout: float | None = None) -> Decision:
        """Fork to ``targets`` (URIs, :class:`~fastsip.proxy.Target` or location bindings):
        all at once, or one after another (``parallel=False``: the next is tried when the
        previous one failed).  The best response wins (§16.7); the first 2xx ends the search.
        ``ring_timeout``: as for :meth:`relay`, counted from now for all the targets."""
        return Decision("forward", targets=[self._target(t) for t in targets], parallel=parallel,
                        ring_timeout=ring_timeout)

    def reply(self, status: int, reason: str | None = None, *,
              headers: Iterable[tuple[str, str]] = (), stateless: bool | None = None) -> Decision:
        """Answer with ``status`` (a To tag is added for us).  ``stateless``: keep no server
        transaction for it (a retransmitted request is simply answered again); by default a
        negative answer is stateless and a 2xx is not (see
        :meth:`~fastsip.proxy.ResponseContext.respond`)."""
        return Decision("reply", status=status, reason=reason, headers=headers,
                        stateless=stateless)

    def redirect(self, targets: Iterable[str | URI], status: int = 302) -> Decision:
        """Answer with a 3xx listing ``targets`` as Contacts (§8.3, §21.3)."""
        return self.reply(status, headers=[("Contact", f"<{t}>") for t in targets])

    def challenge(self) -> Decision:
        """Ask for credentials: 401 for a REGISTER, 407 for anything else (§22).  A user who
        failed too often from this source gets 403 instead: no more guesses from there."""
        auth = self._router.authenticator
        if auth is None:
            raise FastSIPError("challenge() needs an authenticator on the Router")
        if self._blocked:
            return self.reply(403, "Forbidden (too many failed attempts)")
        response = auth.challenge(self.ctx.request, self._router.wallclock(),
                                  proxy=self.method != "REGISTER", stale=self._stale)
        return Decision("response", response=response)

    def authenticate(self) -> bool:
        """Check the request's credentials (Authorization for REGISTER, Proxy-Authorization
        otherwise).  True (and ``user`` set) when they are good.  With no authenticator on the
        Router, everything is accepted anonymously (``authenticated`` stays False).  The
        credentials are verified once per request; later calls return the same verdict.

        A failure whose password was checked (or whose user does not exist) is a guess: it is
        logged at WARNING and counted by the Router's guard, which answers a user's attempts
        from a source that keeps failing with 403 (:meth:`challenge`) and bans the source."""
        router = self._router
        auth = router.authenticator
        if auth is None:
            return True
        if self._checked:
            return self.user is not None
        self._checked = True
        request = self.ctx.request
        result = auth.authenticate(request, router.wallclock(),
                                   proxy=self.method != "REGISTER")
        host = self.ctx.source.host
        guard = router.guard
        now = router.monotonic()
        if result.user is not None and guard.auth_blocked(host, result.user, now):
            self._blocked = True
            guard.auth_failed(host, result.user, "blocked after repeated failures", now,
                              method=self.method, guess=True)
            return False
        if result.ok:
            self.user = result.user
            return True
        self._stale = bool(result.stale)  # the next challenge says stale=TRUE (RFC 2617 3.2.1)
        if not result.stale and _has_credentials(request, self.method):
            guard.auth_failed(host, result.user, result.reason, now, method=self.method,
                              guess=result.guess)
            self._blocked = result.user is not None and guard.auth_blocked(
                host, result.user, now)
        return False

    def register(self) -> Decision:
        """Hand a REGISTER to the registrar (call :meth:`authenticate` first if you want it
        authenticated: the registrar then binds only the authenticated user's AOR).  The
        Router runs the registrar once the handler has returned; its answer goes back."""
        if self._router.registrar is None:
            raise FastSIPError("register() needs a registrar on the Router")
        return Decision("register")

    async def lookup(self, aor: str | URI | None = None) -> list[Any]:
        """The registered bindings of ``aor`` (default: the Request-URI), best first.  A
        coroutine (the store may be on a disk or across the network): ``await req.lookup()``
        in an ``async def`` handler.  ``req.relay()`` needs no await: it looks up for you."""
        registrar = self._router.registrar
        if registrar is None:
            return []
        return await registrar.lookup(aor if aor is not None else self.ctx.request.uri,
                                      self._router.wallclock())

    def default(self) -> Decision:
        """What the default routing would do with this request (module docstring)."""
        return self._router.default_decision(self)

    # -- helpers -----------------------------------------------------------------------------

    def _retarget(self, to: str | URI) -> URI | str:
        uri = to if isinstance(to, URI) else URI(to)
        user = self.ctx.request.uri.user
        if uri.user is None and user is not None and uri.is_sip:
            text = str(uri)
            colon = text.index(":")
            return f"{text[:colon + 1]}{user}@{text[colon + 1:]}"
        return uri

    def _target(self, t: TargetLike) -> Target:
        if isinstance(t, Target):
            return t
        if isinstance(t, (str, URI)):
            return Target(t)
        return self._router.binding_target(t)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri} from {self.source}>"


class _SetFailover:
    """What :meth:`Request.relay_to_set` leaves for the failover: the gateways not tried yet,
    in order, and how to relay to them."""

    __slots__ = ("gateway_set", "rest", "ring_timeout", "route")

    def __init__(self, gateway_set: GatewaySet, rest: list[URI], route: Sequence[str],
                 ring_timeout: float | None) -> None:
        self.gateway_set = gateway_set
        self.rest = rest
        self.route = tuple(route)
        self.ring_timeout = ring_timeout


cdef class Router:
    """Runs :class:`Routes` (or the default routing) for a :class:`~fastsip.proxy.Proxy`.

    - ``routes``: the user's hooks (:func:`~fastsip.app.load_routes`); None: default routing.
    - ``registrar``: a :class:`fastsip.proxy.Registrar` (REGISTER, location lookups).
    - ``authenticator``: a :class:`fastsip.proxy.auth.DigestAuthenticator` (optional).
    - ``domains``: the domains we serve (default: the registrar's; none: any host naming us).
    - ``open_relay``: relay requests for other domains from anyone (default: our users only).
    - ``spawn``: runs a coroutine as a task (``loop.create_task``); needed for async hooks.
    - ``max_concurrency`` / ``max_per_source``: async hooks running at once, in all and per
      source host; beyond either, 503 with ``Retry-After: retry_after``.
    - ``handler_timeout``: an async hook still running after this many seconds gets its
      request a 500 (0: no limit); its result, when it comes, is ignored.
    - ``serial_by_q``: registered contacts are tried in groups of equal q, highest first
      (RFC 3261 §16.6 allows it); default: all in parallel.
    - ``wallclock``: the time for the registrar and nonces (wall clock: expiries persist).
    - ``guard``: the :class:`~fastsip.proxy.edge.SourceGuard` that counts failed logins (a
      default one, without rate limiting, when None); ``fastsip serve`` shares one with the
      transport, which drops what banned sources send.

    - ``monotonic``: the clock of the guard's windows and bans (default: the proxy's); it
      must be the clock of whoever else feeds the guard (``fastsip serve``: the loop's time,
      which the transport's admission check passes too).
    - ``trusted``: source hosts whose requests the relay policy lets go anywhere (``host in
      trusted``; a :class:`~fastsip.proxy.edge.TrustedNetworks`); default: the proxy's
      (``Proxy(trusted=...)``), so the core and the routing share one set.
    """

    cdef public object routes
    cdef public object registrar
    cdef public object authenticator
    cdef public frozenset domains
    cdef public bint open_relay
    cdef public object spawn
    cdef public int max_concurrency
    cdef public int max_per_source
    cdef public int retry_after
    cdef public bint serial_by_q
    cdef public double handler_timeout
    cdef public object wallclock
    cdef public object guard
    cdef public object trusted
    cdef object _monotonic
    cdef public object refusals
    cdef public object trunks
    cdef public object proxy
    cdef public int running
    cdef dict _per_source
    cdef set _tasks
    cdef bint _request_async
    cdef bint _failure_async
    cdef public dict gateway_sets
    cdef public bint identity_policy

    def __init__(self, routes: Routes | None = None, *, registrar: Any = None,
                 authenticator: Any = None, domains: Iterable[str] | None = None,
                 open_relay: bool = False, spawn: Any = None,
                 max_concurrency: int = 1000, max_per_source: int | None = None,
                 retry_after: int = 5, serial_by_q: bool = False,
                 handler_timeout: float = 30.0,
                 wallclock: Callable[[], float] = time.time,
                 guard: SourceGuard | None = None,
                 trusted: Container[str] | None = None,
                 monotonic: Callable[[], float] | None = None) -> None:
        self.routes = routes if routes is not None else Routes()
        self.registrar = registrar
        self.authenticator = authenticator
        if domains is None:
            domains = getattr(registrar, "domains", ())
        self.domains = frozenset(d.lower() for d in domains)
        self.open_relay = open_relay
        self.spawn = spawn
        self.max_concurrency = max_concurrency
        self.max_per_source = max_per_source if max_per_source is not None else \
            max(1, max_concurrency // 2)
        self.retry_after = retry_after
        self.serial_by_q = serial_by_q
        self.handler_timeout = handler_timeout
        self.wallclock = wallclock
        self.guard = guard if guard is not None else SourceGuard(rate=0)
        self.trusted = trusted
        self._monotonic = monotonic
        #: Requests refused with 503 because too many handlers were running (logs, metrics).
        self.refusals = Refusals()
        #: The server's trunks (:class:`fastsip.app.trunks.Trunks`: ``relay(trunk=...)``,
        #: ``req.trunk``); None without any.
        self.trunks = None
        self.proxy = None
        self.running = 0
        self._per_source = {}
        self._tasks = set()
        r = self.routes
        self._request_async = r.request is not None and inspect.iscoroutinefunction(r.request)
        self._failure_async = r.failure is not None and inspect.iscoroutinefunction(r.failure)
        #: Gateway sets by name (``serve --gateway-set``; a set a routes module passes to
        #: ``relay_to_set`` is added on first use, and probed from then on).
        self.gateway_sets = {}
        #: RFC 3325: P-Asserted-Identity believed only from trusted sources, an authenticated
        #: user's P-Preferred-Identity asserted, and withheld from untrusted next hops under
        #: ``Privacy: id``.  False leaves those headers to the routes.
        self.identity_policy = True

    # -- RequestRouter (what the proxy core calls) -------------------------------------------

    @property
    def in_dialog(self) -> bool:
        return self.routes.in_dialog

    @property
    def wants_responses(self) -> bool:
        return self.routes.response is not None

    def attach(self, proxy: Proxy) -> None:
        """Called by :meth:`Proxy.attach`: we ask the proxy whether a host is us."""
        self.proxy = proxy

    cpdef bint is_trusted(self, host) except -1:
        """Is ``host`` a trusted source (ours, else the proxy's trusted networks)?"""
        trusted = self.trusted
        if trusted is None:
            proxy = self.proxy
            return proxy is not None and host in proxy.trusted
        return host in trusted

    def monotonic(self) -> float:
        """The time of the guard's windows and bans (``monotonic``, else the proxy's clock)."""
        if self._monotonic is not None:
            return self._monotonic()
        proxy = self.proxy
        return proxy.clock.time() if proxy is not None else time.monotonic()

    def gateway_set(self, gateway_set: str | GatewaySet) -> GatewaySet:
        """The set called ``gateway_set`` (FastSIPError when there is none), or the set
        given, which is remembered (and so probed) from its first use."""
        if isinstance(gateway_set, GatewaySet):
            known = self.gateway_sets.setdefault(gateway_set.name, gateway_set)
            if known is not gateway_set:
                raise FastSIPError(f"two gateway sets are called {gateway_set.name!r}")
            return gateway_set
        found = self.gateway_sets.get(gateway_set)
        if found is None:
            raise FastSIPError(f"no gateway set {gateway_set!r} (serve --gateway-set "
                               f"{gateway_set}=URI,...)")
        return found

    def on_request(self, ctx: ProxyContext) -> None:
        cdef Request req = Request(self, ctx)
        ctx.data = req
        if self.identity_policy and "P-Asserted-Identity" in ctx.request.headers and \
                numbers.strip_untrusted_identity(ctx.request, req.trusted):
            log.debug("P-Asserted-Identity removed: %s is not trusted", ctx.source)
        fn = self.routes.request
        if fn is None:
            self._finish(req, self.default_decision(req), False)
            return
        self._call(req, fn, (req,), self._request_async, False)

    def on_failure(self, ctx: ResponseContext, best: Response) -> bool:
        fn = self.routes.failure
        data = ctx.data
        if not isinstance(data, Request):
            return False
        cdef Request req = <Request>data
        if req._gateways is not None and self._next_gateway(req, best):
            return True
        if fn is None:
            return False
        req.failures.append(best)
        if self._failure_async and not self._admit(req.source):
            return False  # overloaded: the best response goes back as it is
        self._call(req, fn, (req, best), self._failure_async, True)
        return True

    cdef bint _next_gateway(self, Request req, best) except -1:
        """relay_to_set's failover: the next gateway of the set after a gateway failure
        (5xx, 408, transport error); False when the response is the callee's answer or
        no gateway is left (the failure hook, if any, sees it then)."""
        failover = req._gateways
        assert failover is not None
        status = best.status_code
        if not failover.rest or not gateway_failed(status) or req.ctx.done:
            req._gateways = None
            return False
        uri = failover.rest.pop(0)
        log.info("gateway set %s: %d for %s %s: trying %s", failover.gateway_set.name,
                 status, req.method, req.uri, uri)
        self._apply(req, req.relay(to=uri, route=failover.route,
                                   ring_timeout=failover.ring_timeout), True)
        return True

    def on_response(self, ctx: ResponseContext, response: Response) -> None:
        fn = self.routes.response
        if fn is not None and isinstance(ctx.data, Request):  # (None once the context settled)
            fn(ctx.data, response)

    # -- running hooks -----------------------------------------------------------------------

    cdef bint _admit(self, source) except -1:
        return self.running < self.max_concurrency and \
            self._per_source.get(source.host, 0) < self.max_per_source

    cdef _call(self, Request req, fn, tuple args, bint is_async, bint failure):
        if is_async and not failure and not self._admit(req.source):
            self._overloaded(req)
            return
        try:
            result = fn(*args)
        except Exception:
            log.exception("%s raised for %s %s", getattr(fn, "__name__", fn), req.method,
                          req.uri)
            req.ctx.respond(500)
            return
        # A plain handler's Decision (or None) is the common case: isawaitable's ABC check
        # costs more than the rest of this call, so it runs only for anything else.
        if result is not None and result.__class__ is not Decision and inspect.isawaitable(result):
            if not is_async and not self._admit(req.source):  # a sync def returning a coroutine
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                self._overloaded(req) if not failure else self._give_up(req)
                return
            self._start_task(req, result, failure)
            return
        self._finish(req, result, failure)

    def _overloaded(self, req: Request) -> None:
        if self.refusals.refused(self.monotonic()):
            log.warning("overload: %d handlers running (%d from %s): 503 for %s %s "
                        "(%d refused so far)", self.running,
                        self._per_source.get(req.source.host, 0), req.source.host, req.method,
                        req.uri, self.refusals.count)
        req.ctx.respond(503, headers=[("Retry-After", str(self.retry_after))])

    @staticmethod
    def _give_up(req: Request) -> None:
        ctx = req.ctx
        if isinstance(ctx, ResponseContext):
            ctx.send_best()

    def _start_task(self, req: Request, awaitable: Any, failure: bool) -> None:
        spawn = self.spawn
        if spawn is None:
            log.error("an async hook needs Router(spawn=...): 500 for %s %s", req.method, req.uri)
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()
            req.ctx.respond(500)
            return
        host = req.source.host
        self.running += 1
        self._per_source[host] = self._per_source.get(host, 0) + 1
        holder: list[object] = []
        timer: Any = None
        proxy = self.proxy
        if self.handler_timeout > 0 and proxy is not None:
            timer = proxy.clock.call_later(self.handler_timeout, self._timed_out, req)
        task = spawn(self._run(req, awaitable, failure, holder, timer))
        if task is not None:
            holder.append(task)
            self._tasks.add(task)  # a task nobody references can be collected mid-flight

    @staticmethod
    def _timed_out(req: Request) -> None:
        # The request must not wait forever on a hung handler (its slot stays taken until
        # the handler really ends, so the bound still holds).
        if not req.ctx.done:
            log.error("async hook still running for %s %s: 500", req.method, req.uri)
            req.ctx.respond(500, "Server Internal Error (routing timeout)")

    async def _run(self, req: Request, awaitable: Any, failure: bool,
                   holder: list[object], timer: Any) -> None:
        host = req.source.host
        try:
            try:
                result = await awaitable
            finally:
                if timer is not None:
                    timer.cancel()
                self.running -= 1
                n = self._per_source.get(host, 1) - 1
                if n:
                    self._per_source[host] = n
                else:
                    self._per_source.pop(host, None)
                if holder:
                    self._tasks.discard(holder[0])
        except Exception:
            log.exception("async hook raised for %s %s", req.method, req.uri)
            req.ctx.respond(500)
            return
        self._finish(req, result, failure)

    cdef _finish(self, Request req, result, bint failure):
        try:
            if result is None:
                if failure:
                    self._give_up(req)
                    return
                result = self.default_decision(req)
            self._apply(req, result, failure)
        except Exception:
            log.exception("routing %s %s failed", req.method, req.uri)
            req.ctx.respond(500)

    # -- decisions that wait for the location store ------------------------------------------

    cdef _resolve(self, Request req, Decision decision, bint failure):
        """Complete a "register" or "lookup" decision.  Over a store that answers from memory
        it runs in place (no task: the lookup on every INVITE stays cheap); otherwise as a
        task under the same bounds as an async handler (concurrency, timeout)."""
        registrar = self.registrar
        assert registrar is not None  # (Request.register / relay made it only with one)
        if decision.kind == "register":
            immediate = registrar.immediate
            work = self._register(req, registrar)
        else:
            # The in-memory store reads in place: no coroutine at all on every INVITE (what
            # Registrar.lookup_now does, without its frame and the AOR function's).
            memory = getattr(registrar, "memory_store", None)
            if memory is not None:
                bindings = memory.lookup_now(req.ctx.request.uri.aor(), self.wallclock())
                self._apply(req, self._found(req, bindings, decision.targets[0].route,
                                             decision.ring_timeout), failure)
                return
            immediate = registrar.store.immediate_reads
            work = self._lookup(req, registrar, decision.targets[0].route,
                                decision.ring_timeout)
        if immediate:
            self._apply(req, run_immediately(work), failure)
            return
        if not self._admit(req.source):
            work.close()
            self._give_up(req) if failure else self._overloaded(req)
            return
        self._start_task(req, work, failure)

    async def _register(self, req: Request, registrar: Any) -> Decision:
        request = req.ctx.request
        response = await registrar.handle(
            request, req.ctx.source, self.wallclock(), user=req.user,
            addressed_to_us=self.proxy_is_local_host(request.uri))
        return Decision("response", response=response)

    async def _lookup(self, req: Request, registrar: Any, route: Sequence[str],
                      ring_timeout: float | None = None) -> Decision:
        bindings = await registrar.lookup(req.ctx.request.uri, self.wallclock())
        return self._found(req, bindings, route, ring_timeout)

    cdef Decision _found(self, Request req, bindings, route, ring_timeout):
        """A lookup's decision: the bindings' targets, or 404 when there are none."""
        if not bindings:
            return req.reply(404)
        cdef Decision decision = self.fork_bindings(bindings, route)
        decision.ring_timeout = ring_timeout
        return decision

    cdef _apply(self, Request req, result, bint failure=False):
        ctx = req.ctx
        if ctx.done:
            return
        if not isinstance(result, Decision):
            raise TypeError(f"a handler returned {result!r}, not a decision "
                            f"(req.relay(), req.reply(...), ...) or None")
        cdef Decision decision = <Decision>result
        if decision.kind in ("register", "lookup"):
            self._resolve(req, decision, failure)
            return
        if decision.kind == "forward" and not self._may_forward(req, decision):
            refusal = self._refuse_relay(req)
            if refusal is not None:
                decision = refusal
        if decision.kind == "forward":
            if self.identity_policy and (req.user is not None or
                                         "P-Asserted-Identity" in ctx.request.headers):
                self._identity_out(req, decision)
            if req._ring_timer is not None:     # a new decision: the last one's ring is over
                req._ring_timer.cancel()
                req._ring_timer = None
            started = len(ctx.branches) if isinstance(ctx, ResponseContext) else 0
            if decision.groups and isinstance(ctx, ResponseContext):
                ctx.forward_groups(decision.groups)
            elif decision.groups:
                ctx.forward(decision.groups[0])
            else:
                ctx.forward(decision.targets, parallel=decision.parallel)
            if decision.ring_timeout is not None and isinstance(ctx, ResponseContext) \
                    and self.proxy is not None and not ctx.done:
                req._ring_timer = self.proxy.clock.call_later(
                    decision.ring_timeout, self._ring_timed_out, req, started)
        elif decision.kind == "response" and decision.response is not None:
            ctx.respond(decision.response, stateless=decision.stateless)
        else:
            ctx.respond(decision.status, decision.reason, headers=decision.headers,
                        stateless=decision.stateless)

    @staticmethod
    def _ring_timed_out(Request req not None, started: int) -> None:
        """A decision's ring timeout: each of its branches still without a final response is
        treated as Timer C would (§16.8) -- CANCELled once it rang (its 487 counts as 408),
        a 408 at once if it never answered at all -- so the failure hook can forward."""
        req._ring_timer = None
        ctx = req.ctx
        if ctx.done or not isinstance(ctx, ResponseContext):
            return
        for branch in ctx.branches[started:]:
            if branch.final is None:
                ctx.expire_timer_c(branch)   # Timer C's own expiry, early, for this branch

    def _identity_out(self, req: Request, decision: Decision) -> None:
        """RFC 3325 on the way out: an authenticated user's P-Preferred-Identity becomes the
        P-Asserted-Identity; under ``Privacy: id`` the PAI does not go to a next hop outside
        the trust domain (every branch copies the request: one untrusted hop removes it)."""
        request = req.ctx.request
        if req.authenticated:
            numbers.assert_preferred_identity(request, req.user)
        if "P-Asserted-Identity" not in request.headers or not numbers.privacy_id(request):
            return
        for target in decision.all_targets():
            if not self._next_hop_trusted(request, target):
                numbers.withhold_identity(request, False)
                return

    def _next_hop_trusted(self, request: SipRequest, target: Target) -> bool:
        host: str | None = None
        if target.dest is not None:
            host = target.dest.host
        else:
            try:
                if target.route:
                    first = target.route[0]
                    inner = first[first.find("<") + 1:first.rfind(">")] if "<" in first \
                        else first
                    host = URI(inner).host_address
                elif request.route and request.route[0].uri is not None:
                    host = request.route[0].uri.host_address
                else:
                    uri = target.uri if target.uri is not None else request.uri
                    host = (uri if isinstance(uri, URI) else URI(uri)).host_address
            except (ParseError, ValueError):
                return False
        return host is not None and self.is_trusted(host.strip("[]"))

    # -- the relay policy --------------------------------------------------------------------

    cdef bint _may_forward(self, Request req, Decision decision) except -1:
        """The relay policy (module docstring): may this request go where ``decision`` sends
        it?  Anything goes for a trusted or authenticated request; otherwise an initial request
        may only reach our users' registered contacts (or come back to us), and an in-dialog
        one must have come through our Record-Route."""
        if self.open_relay or req._authenticated():
            return True
        ctx = req.ctx
        if req._in_dialog():
            proxy = self.proxy
            return req._is_trusted() or proxy is None or proxy.dialog_allowed(ctx)
        # Where it goes is asked before who sent it: the usual INVITE, to a user's registered
        # contacts, then needs no look-up of the source in the trusted networks.
        return self._reaches_only_us(ctx.request, decision) or req._is_trusted()

    cdef bint _reaches_only_us(self, request, Decision decision) except -1:
        """Does an initial request go only where anyone may send it: our users' registered
        contacts, or (its Request-URI, or a target's) one of our domains or this proxy?"""
        if request.route:
            return False                         # a preloaded Route that is not ours
        for target in decision.all_targets():
            if target.binding is not None:
                continue                         # a registered contact of one of our users
            if target.route or target.dest is not None:
                return False
            uri = target.uri if target.uri is not None else request.uri
            try:
                ours = self.is_ours(uri if isinstance(uri, URI) else URI(uri))
            except (ParseError, ValueError):
                return False
            if not ours:
                return False
        return True

    cdef _refuse_relay(self, Request req):
        """What a request the relay policy stops gets: its credentials are checked if it
        brought some (None: they are good, it may go after all), else a 407 challenge when we
        authenticate, else 403."""
        if self.authenticator is not None and not req._checked and req.authenticate():
            return None
        if self.authenticator is not None and not req.in_dialog:
            return req.challenge()
        log.debug("relay refused: %s %s from %s", req.method, req.uri, req.source)
        return req.reply(403, "Relaying Forbidden")

    # -- default routing ---------------------------------------------------------------------

    cpdef bint is_ours(self, uri) except -1:
        """A URI in one of our domains, or naming this proxy's host."""
        if not uri.is_sip:
            return False
        if self.domains and uri.host.lower() in self.domains:
            return True
        return self.proxy_is_local_host(uri)

    cpdef bint proxy_is_local_host(self, uri) except -1:
        proxy = self.proxy
        return proxy is not None and proxy.is_local(uri)

    cpdef Decision default_decision(self, Request req):
        method = req.method
        request = req.request
        if method == "REGISTER":
            if not req.for_us:
                if self.open_relay:
                    return req.relay()
                return req.reply(403, "Forbidden (domain not served here)")
            if self.registrar is None:
                return req.reply(405, headers=[("Allow", ALLOW.replace(" REGISTER,", ""))])
            if not req.authenticate():
                return req.challenge()
            return req.register()
        if req.in_dialog:
            return req.relay()  # loose routing (§16.4): the route set decides
        if method not in ("ACK", "CANCEL") and self.authenticator is not None and req.from_us \
                and not req.authenticate():
            return req.challenge()
        if req.for_us and not request.route:
            if request.uri.user is None:
                if method == "OPTIONS":
                    # Keep-alives and monitoring: answered without keeping a transaction.
                    return req.reply(200, headers=[("Allow", ALLOW), ("Accept", "application/sdp"),
                                                   ("Supported", SUPPORTED)], stateless=True)
                return req.reply(404)
            return req.relay()
        # Another domain, or a preloaded Route: where the request asks to go, if the relay
        # policy lets it (_apply: trusted or authenticated, else 407 or 403).
        return req.relay()

    cpdef Decision fork_bindings(self, bindings, route=()):
        """Targets for registered contacts: in parallel, or by q groups (``serial_by_q``)."""
        cdef list targets = []
        for b in bindings:
            targets.append(_binding_target(b, route))
        if not self.serial_by_q or len(bindings) < 2:
            return Decision("forward", targets=targets)
        # Equal q in parallel, decreasing q in series (bindings come highest q first).
        groups: list[list[Target]] = []
        last_q: float | None = None
        for b, t in zip(bindings, targets):
            if b.q != last_q:
                groups.append([])
                last_q = b.q
            groups[-1].append(t)
        return Decision("forward", groups=groups)

    @staticmethod
    def binding_target(binding: Any, route: Sequence[str] = ()) -> Target:
        """A registered contact as a target: its Path goes in front (RFC 3327); a binding of a
        client behind NAT, an outbound client or a TCP/TLS one is reached over its flow (the
        address and socket its REGISTER came from, :func:`~fastsip.proxy.nat.binding_flow`),
        with the Contact as Request-URI."""
        return _binding_target(binding, route)


cdef _binding_target(binding, route):
    # Router.binding_target's body (there, documented).
    path = tuple(getattr(binding, "path", ()) or ())
    dest = binding_flow(binding) if hasattr(binding, "source") else None
    return Target(binding.contact, route=(*route, *path), dest=dest, binding=binding)


cdef bint _has_credentials(request, str method) except -1:
    """Did the request bring credentials (for any realm)?  A request without any is a first
    attempt that gets a challenge, not a failed login."""
    name = "Authorization" if method == "REGISTER" else "Proxy-Authorization"
    return name in request.headers
