# cython: language_level=3
"""The stateful proxy's response context (RFC 3261 §16.7) and its branches, compiled:
:mod:`fastsip.proxy.core` documents them and is where users import them from.

Every response of a call, and every branch the proxy starts, runs through here, so these are
``cdef`` classes with typed fields: a branch's flags are C ints, the context calls its own
methods directly, and it reads the transaction machines' states and the messages' status codes
through their ``.pxd`` (no name is looked up, no state string compared).  What stays Python is
called as before: the :class:`~fastsip.proxy.core.Proxy` that owns the context (its routing,
request preparation and hooks), the router, the media hook and the trunks.
"""

cimport cython

from fastsip.proxy._nat cimport (
    add_alias as _add_alias,
    contact_behind_nat as _contact_behind_nat,
    pop_alias as _pop_alias,
    request_behind_nat as _request_behind_nat,
)
from fastsip.sip._message cimport (
    H_PROXY_REQUIRE, H_ROUTE, H_VIA, URI, NameAddr, Request, Response, Via, wire,
)
from fastsip.transport._address cimport Address, HostMemo, memo_get
from fastsip.transport._base cimport TransportBase, compiled_transport
from fastsip.transport._rules cimport next_hop, request_next_hop, response_destination
from fastsip.transaction._layer cimport (
    S_ACCEPTED,
    S_COMPLETED,
    S_CONFIRMED,
    S_PROCEEDING,
    S_TERMINATED,
    S_TRYING,
    ClientHandlerBase,
    ClientTransaction,
    ServerTransaction,
    TransactionLayer,
    TransactionUserBase,
    cancel_timer,
)

import functools
import logging
import os

from fastsip.proxy.base import FINISHED as _FINISHED
from fastsip.proxy.base import FORBIDDEN_NOT_ROUTED as _FORBIDDEN_NOT_ROUTED
from fastsip.proxy.base import MAGIC_COOKIE as _MAGIC_COOKIE
from fastsip.proxy.base import RECORD_ROUTE_METHODS as _RECORD_ROUTE_METHODS
from fastsip.proxy.base import TARGET_METHODS as _TARGET_METHODS
from fastsip.proxy.base import UNREACHABLE as _UNREACHABLE
from fastsip.proxy.base import BadTarget as _BadTarget
from fastsip.proxy.base import NoSecureHop as _NoSecureHop
from fastsip.proxy.base import auth_realm as _auth_realm
from fastsip.proxy.base import bad_request as _bad_request
from fastsip.proxy.base import canonical_host as _canonical_host
from fastsip.proxy.base import is_ours as _is_ours
from fastsip.proxy.base import keep_scheme as _keep_scheme
from fastsip.proxy.base import new_tag as _new_tag
from fastsip.proxy.base import phrase as _phrase
from fastsip.proxy.base import rank as _rank
from fastsip.proxy.base import stateless_tag as _stateless_tag
from fastsip.proxy.base import with_to_tag as _with_to_tag
from fastsip.transaction.base import Refusals as _Refusals
from fastsip.transaction.base import hop_by_hop_request as _hop_by_hop_request
from fastsip.transport import DEFAULT_PORTS as _DEFAULT_PORTS
from fastsip.transport import Address as _Address
from fastsip.transport.rfc3263 import NextHop as _NextHop
from fastsip.transport.rfc3263 import fail_over as _rfc3263_fail_over
from fastsip.transport.rfc3263 import is_ip_literal as _is_ip_literal
from fastsip.transport.rfc3263 import retry_after as _retry_after
from fastsip.transport.rules import is_local_tag as _is_local_tag

_log = logging.getLogger("fastsip.proxy")
# The host questions every message asks ("is this us", "a host name to resolve?"), read from
# compiled code in one dict look-up (HostMemo; the functions stay the one definition).
cdef HostMemo _CANONICAL = HostMemo(_canonical_host)
cdef HostMemo _IP_LITERAL = HostMemo(_is_ip_literal)
# A target's Request-URI as text (a registered contact, retargeted to on every call to it):
# parsed once.  A URI is a value (its fields are read-only), so branches may share one.
cdef HostMemo _TARGET_URI = HostMemo(URI)


cdef URI _as_uri(object uri):
    if isinstance(uri, URI):
        return <URI>uri
    if type(uri) is str:
        return memo_get(_TARGET_URI, <str>uri)
    return URI(uri)


cdef inline bint _is_sips(URI uri) noexcept:
    # A sips: URI asks for TLS on every hop to the end (RFC 5630).  (The parser lowercases
    # the scheme.)
    return uri is not None and uri.scheme == "sips"


cdef inline bint _terminated(ServerTransaction txn) noexcept:
    # Completed, confirmed or terminated: the transaction has sent its final response.
    cdef int s = txn._state
    return s == S_COMPLETED or s == S_CONFIRMED or s == S_TERMINATED


@cython.final
cdef class _Ignore(ClientHandlerBase):
    """Client handler for our CANCELs: their responses change nothing (§16.10 / §9.1): the
    base class's methods, which do nothing."""


cdef _Ignore _IGNORE = _Ignore()


@cython.final
cdef class _Settled(ClientHandlerBase):
    """The handler of a settled context's INVITE branch that got a 2xx, while its client
    transaction lingers in Accepted (RFC 6026 Timer M, 32 s): each retransmitted 2xx goes
    upstream, as the branch would have sent it, and nothing else is kept -- the context, its
    request, the branch's copy and the responses are freed once the call is answered instead
    of 32 s later.  Used only when nothing can look at the context any more (no response
    hook, no media hook, not a trunk branch); see ``ResponseContext._check_done``."""

    cdef Proxy proxy
    cdef ServerTransaction upstream
    cdef object dest
    # The branch went to a registered contact: its Contact may need an alias (NAT).
    cdef bint alias

    def __init__(self, Proxy proxy, ServerTransaction upstream, dest, bint alias):
        self.proxy = proxy
        self.upstream = upstream
        self.dest = dest
        self.alias = alias

    cpdef on_response(self, txn, Response response):
        if not 200 <= response._status < 300:
            return  # the branch has its final response: nothing else goes upstream
        response._drop_first_value(H_VIA)  # §16.7 step 3: our Via
        if self.alias and _contact_behind_nat(response, self.dest):
            _add_alias(response, self.dest)
        _send_upstream(self.proxy, self.upstream, response)


cdef _send_upstream(Proxy proxy, ServerTransaction txn, Response response):
    """A response goes upstream through the server transaction ``txn``."""
    if _terminated(txn):
        # A 2xx after the server transaction is gone (RFC 6026 Timer L ran out): forward
        # it statelessly, as §16.7 step 9 asks.
        if 200 <= response._status < 300:
            proxy._attached()._send(wire(response), txn.dest)
        return
    try:
        txn.respond(response)
    except ValueError as exc:  # the transaction already has a final response
        _log.debug("not forwarding %d: %s", response._status, exc)


@cython.final
cdef class Branch(ClientHandlerBase):
    """One client transaction of a response context (a ClientHandler)."""

    cdef readonly ResponseContext ctx
    cdef public object target
    cdef public Request request
    cdef public object dest
    cdef public Response final
    cdef public bint provisional
    cdef public bint cancel_wanted
    cdef public bint cancel_sent
    # Timer C cancelled this branch (§16.8): its 487 means "no answer" (408 upstream).
    cdef public bint timer_c_fired
    cdef object _timer_c
    # Timer C's deadline once a provisional response restarted it (0: not restarted).
    cdef double _timer_c_due
    cdef object _cancel_guard
    # A branch to a trunk (fastsip.proxy.trunk.TrunkBranch: its challenges answered, its CSeq
    # shift); None for every other branch.
    cdef public object trunk
    # RFC 3263: the next hop to resolve (its URI named a host, and the proxy has a resolver),
    # else None; once resolved, the addresses still to try after ``dest``.
    cdef public object hop
    cdef public list alternates
    # Waiting for the resolver: nothing sent yet, so a CANCEL ends the branch at once.
    cdef public bint resolving
    # The key of its client transaction, once sent (the transaction itself is not kept: it
    # holds the branch as its handler, and the pair would be a cycle).
    cdef public object key

    def __init__(self, ResponseContext ctx not None, target, Request request not None, dest):
        self.ctx = ctx
        self.target = target
        self.request = request
        self.dest = dest
        self.final = None
        self.alternates = []

    @property
    def pending(self):
        return self.final is None

    # ClientHandler, by C calls from the transaction layer (ClientHandlerBase)
    cpdef on_response(self, txn, Response response):
        if response is None:
            raise TypeError("on_response needs a Response")
        self.ctx._on_branch_response(self, response)

    cpdef on_timeout(self, txn):
        self.ctx._branch_failed(self, 408)

    cpdef on_transport_error(self, txn):
        # §16.9: as if a 503 had come -- but one of ours, which send_best passes on as a 503
        # (the next hop could not be reached or resolved), not as a downstream server's.
        self.ctx._branch_failed(self, 503, _UNREACHABLE)

    cdef _stop_timers(self):
        if self._timer_c is not None:
            cancel_timer(self._timer_c)
            self._timer_c = None
        if self._cancel_guard is not None:
            cancel_timer(self._cancel_guard)
            self._cancel_guard = None

    cpdef cancel(self):
        """§9.1 for a branch: a CANCEL once a provisional response has come (before that the
        CANCEL must wait for one), only for INVITE."""
        if self.final is not None or self.cancel_sent or self.request.method != "INVITE":
            return
        if self.resolving:
            # Nothing was sent (RFC 3263 look-up in progress): no CANCEL to send, no DNS
            # answer to wait for; the branch ends now with a 487 (_resolved ignores it).
            self.ctx._branch_failed(self, 487)
            return
        if not self.provisional:
            self.cancel_wanted = True
            return
        self.cancel_sent = True
        cdef TransactionLayer layer = self.ctx.proxy._attached()
        cancel = _hop_by_hop_request(self.request, "CANCEL")
        try:
            layer.request(cancel, self.dest, _IGNORE)
        except ValueError as exc:  # a CANCEL for this branch exists already
            _log.debug("no CANCEL for %s: %s", self.dest, exc)
        # §9.1: a UAS that never answers the CANCEL must not keep the branch alive forever.
        self._cancel_guard = layer._later(
            layer.config.timeout, self.ctx._branch_failed, (self, 408)
        )


@cython.final
cdef class ResponseContext:
    """§16.7's response context: one per server transaction the proxy forwards for.

    Routers call :meth:`forward` (parallel or serial fork) or :meth:`respond`; after a failure
    hook took over, :meth:`send_best` sends the best response after all.  ``data`` is free for
    the router.
    """

    cdef readonly Proxy proxy
    cdef readonly ServerTransaction txn
    cdef public Request request
    cdef public object source
    cdef public list branches
    cdef public int active
    cdef public list serial
    cdef public bint final_sent
    cdef public bint cancelled
    cdef public object data
    cdef Response _best
    cdef list _auth
    cdef bint _counted
    # §16.6 step 8's hash, for our branches' loop detection.
    cdef public str loop
    # It came through us: a Route named us (we record-routed its dialog), see _preprocess.
    cdef public bint routed
    # The media hook's note for this context (None: it has not seen the request yet).
    cdef public object media

    def __init__(self, Proxy proxy not None, ServerTransaction txn not None,
                 Request request not None, source):
        self.proxy = proxy
        self.txn = txn
        self.request = request
        self.source = source
        self.branches = []
        self.serial = []
        self._counted = True
        self.loop = "0"

    @property
    def stateless(self):
        return False

    @property
    def done(self):
        """A final response went upstream: decisions now change nothing."""
        return self.final_sent

    @property
    def best(self):
        """The best final response so far (§16.7 step 6), before any 503 → 500 rewrite."""
        return self._best

    # -- decisions ---------------------------------------------------------------------------

    def forward(self, targets, *, parallel=True):
        """Fork to ``targets``: all at once (``parallel``) or one after another, each tried when
        the previous one failed (serial forking, §16.6).  An empty target set gets 480 (§16.5)."""
        if self.final_sent:
            return
        if self.cancelled:
            self._respond_local(487)
            return
        targets = list(targets)
        if not targets:
            self._respond_local(480)
            return
        if parallel:
            self.serial = []
            self._begin(targets)
        else:
            self.serial = [[t] for t in targets[1:]]
            self._begin(targets[:1])

    def forward_groups(self, groups):
        """Serial forking over parallel groups: each group forks in parallel; the next group
        starts when every branch of the previous one failed (q-ordered contacts, §16.6)."""
        if self.final_sent:
            return
        if self.cancelled:
            self._respond_local(487)
            return
        lists = [list(g) for g in groups]
        lists = [g for g in lists if g]
        if not lists:
            self._respond_local(480)
            return
        self.serial = lists[1:]
        self._begin(lists[0])

    cdef _begin(self, list targets):
        # The media hook sees the request once, before its first branch: it may hold the
        # forwarding while a relay rewrites the SDP (every branch copies the rewritten body).
        media = self.proxy.media
        if media is not None and self.media is None:
            self.media = True
            if media.on_forward(self, functools.partial(self._resume_begin, targets)):
                return
        self._start(targets)

    def _resume_begin(self, list targets):
        if self.final_sent:
            return      # answered while held (a CANCEL, the hook's own answer)
        if self.cancelled:
            self._respond_local(487)
            return
        self._start(targets)

    def respond(self, status, reason=None, *, headers=(), stateless=None):
        """Answer upstream ourselves (a status, or a ready Response such as a registrar's).
        A final response ends the context and cancels any pending branch.

        ``stateless``: send a final response outside the server transaction and forget it
        (:meth:`ServerTransaction.respond_statelessly`).  By default (None) a local *negative*
        final answer (3xx-6xx) goes out statelessly when nothing has been sent upstream yet,
        as Kamailio's default configuration does with ``sl_send_reply``: the source may be
        forged or flooding, and a stateful INVITE answer would be retransmitted by Timer G
        for 32 s, holding memory and amplifying every forged request ~11 times.  A
        retransmitted request simply gets the same answer again.  Once a provisional response
        went up the client stops retransmitting, so the answer then stays stateful."""
        if self.final_sent:
            return
        cdef ServerTransaction txn = self.txn
        cdef int code = (<Response>status)._status if isinstance(status, Response) else status
        if code >= 200 and (txn._state == S_TRYING or txn._state == S_PROCEEDING):
            if stateless is None:
                stateless = code >= 300 and txn.last_response is None
        else:
            stateless = False
        # A stateless answer's To tag is a function of the request, so a retransmitted
        # request gets the very same response.
        tag = functools.partial(_stateless_tag, self.request) if stateless else _new_tag
        cdef Response response
        if isinstance(status, Response):
            response = _with_to_tag(status, tag)
        else:
            response = self._make_response(status, reason, headers, tag)
        cdef Branch b
        if code >= 200:
            self.final_sent = True
            self.serial = []
            for b in self.branches:
                b.cancel()
            if stateless:
                txn.respond_statelessly(response)
            else:
                _send_upstream(self.proxy, txn, response)
            self._release(response)
        else:
            _send_upstream(self.proxy, txn, response)
        self._check_done()

    cpdef send_best(self):
        """Send the best final response gathered so far (after a failure hook declined)."""
        if self.final_sent:
            return
        cdef Response best = self._best
        if best is None:
            self._respond_local(487 if self.cancelled else 408)
            return
        if best._status == 503 and not _is_ours(best):
            # §16.7 step 6: a 503 means *that* server is overloaded, not us: 500 upstream.
            # (A 503 we made because the next hop was unreachable goes up as it is: the
            # caller learns the destination is unavailable, not that we failed.)
            self._respond_local(500, "Server Error (downstream 503)")
            return
        if self._auth and (best._status == 401 or best._status == 407):
            # §16.7 step 7: every challenge goes up in the one response, so the UAC can
            # answer all of them.
            seen = set(best.headers.getall("WWW-Authenticate")) | set(
                best.headers.getall("Proxy-Authenticate")
            )
            for name, value in self._auth:
                if value not in seen:
                    best.add_header(name, value)
        self.final_sent = True
        _send_upstream(self.proxy, self.txn, best)
        self._release(best)
        self._check_done()

    cpdef cancel(self):
        """A CANCEL from upstream (§16.10): no new branches; pending ones are cancelled and
        their 487 goes back as the best response.  With no branch yet (a handler still
        deciding, or between serial targets) the 487 goes back at once."""
        if self.final_sent:
            return
        self.cancelled = True
        self.serial = []
        if self.active == 0:
            self._respond_local(487)
            return
        cdef Branch b
        for b in self.branches:
            b.cancel()

    # -- branches ----------------------------------------------------------------------------

    cdef _start(self, list targets):
        proxy = self.proxy
        cdef list failed = []
        cdef Branch branch
        for target in targets:
            try:
                branch = proxy._make_branch(self, target)
            except ValueError as exc:
                _log.info("cannot forward %s to %r: %s", self.request.method, target, exc)
                if isinstance(exc, _BadTarget):
                    failed.append((exc.status, exc.reason, exc.headers(proxy, self.source)))
                else:
                    failed.append((503, None, []))
                continue
            self.branches.append(branch)
            self.active += 1
            self._start_timer_c(branch)
            if branch.hop is not None:
                resolver = proxy.resolver
                if resolver is not None:
                    # RFC 3263: the next hop is a host name: the branch starts once the
                    # resolver has ordered its addresses (_resolved; never called back from
                    # in here).
                    branch.resolving = True
                    resolver.resolve(branch.hop, functools.partial(self._resolved, branch))
                    continue
            try:
                # (The client transaction is not kept on the branch: it holds the branch as
                # its handler, and a cycle would leave the pair to the cyclic GC.)
                branch.key = proxy._attached().request(branch.request, branch.dest,
                                                       branch).key
            except ValueError as exc:
                _log.info("cannot start a branch to %s: %s", branch.dest, exc)
                self._branch_failed(branch, 503)
        for status, reason, headers in failed:
            self._record_final(self.request.reply(status, reason, to_tag=_new_tag(),
                                                  headers=headers or None))
        if self.active == 0 and not self.final_sent:
            self._branches_done()

    cdef _start_timer_c(self, Branch branch):
        # §16.8: every INVITE branch has its Timer C (unless the proxy turned it off).
        cdef double timer_c = self.proxy.timer_c
        if timer_c > 0 and branch.request.method == "INVITE":
            self._arm_timer_c(branch, timer_c)

    cdef _arm_timer_c(self, Branch branch, double delay):
        # §16.8: Timer C for ``branch``, ``delay`` seconds from now.
        branch._timer_c = self.proxy._attached()._later(delay, self._timer_c, (branch,))

    def _timer_c(self, Branch branch not None):
        # §16.8: a branch stuck after a provisional response is cancelled; one that never
        # got any is treated as if a 408 had come.
        branch._timer_c = None
        if branch.final is not None:
            return
        if branch._timer_c_due:
            # A provisional response restarted Timer C after this node was armed: wait out
            # the rest (restarting lazily, here, spares every ringing call a cancel and a
            # schedule on the wheel; almost all are answered or gone long before).
            left = branch._timer_c_due - self.proxy._attached()._now()
            if left > 0:
                self._arm_timer_c(branch, left)
                return
        if branch.provisional:
            branch.timer_c_fired = True
            branch.cancel()
        else:
            self._branch_failed(branch, 408)

    def expire_timer_c(self, Branch branch not None):
        """Timer C's expiry for ``branch`` now, whatever its deadline (a routing decision's
        ring timeout, shorter than Timer C): CANCELled if it rang, else failed as by a 408."""
        if branch._timer_c is not None:
            cancel_timer(branch._timer_c)
        branch._timer_c_due = 0.0      # (a restart by a 1xx would otherwise re-arm it)
        self._timer_c(branch)

    # -- RFC 3263 next-hop failover ------------------------------------------------------
    # A branch whose next hop is a host name holds the resolver's ordered addresses; a 503,
    # a timeout or a transport error on one moves the same branch on to the next (§4.3),
    # with a fresh copy of the request and a new client transaction.  Upstream sees only
    # the outcome of the last attempt.

    def _resolved(self, Branch branch not None, addresses, reason):
        branch.resolving = False
        if branch.final is not None:
            return                       # Timer C, or the context ended while resolving
        if self.cancelled or branch.cancel_wanted:
            self._branch_failed(branch, 487)
            return
        if not addresses:
            self._branch_failed(branch, 503, _phrase("Service Unavailable", reason))
            return
        branch.alternates = list(addresses)
        if not self._try_next(branch):
            self._branch_failed(branch, 503, _UNREACHABLE)

    cdef bint _try_next(self, Branch branch) except -1:
        """Send the branch's request to its next address; False when none is left."""
        proxy = self.proxy
        cdef Branch attempt
        while branch.alternates:
            dest = branch.alternates.pop(0)
            try:
                attempt = proxy._make_branch(self, branch.target, dest)
                branch.request, branch.dest = attempt.request, attempt.dest
                branch.provisional = False
                branch.key = proxy._attached().request(branch.request, branch.dest, branch).key
            except ValueError as exc:
                _log.info("cannot forward %s to %s: %s", self.request.method, dest, exc)
                continue
            if branch._timer_c is None:
                self._start_timer_c(branch)
            return True
        return False

    cdef bint _fail_over(self, Branch branch, int status, bint local) except -1:
        """§4.3: try the branch's next address after ``status``; True when one was sent."""
        if not branch.alternates or self.cancelled or self.final_sent \
                or branch.cancel_wanted or branch.cancel_sent:
            return False
        if not _rfc3263_fail_over(status, provisional=branch.provisional, local=local):
            return False
        _log.info("%s to %s failed (%d): trying %s", self.request.method, branch.dest, status,
                  branch.alternates[0])
        return self._try_next(branch)

    cpdef _branch_failed(self, Branch branch, int status, reason=None):
        if branch.final is not None:
            return
        if self._fail_over(branch, status, True):
            return
        response = self.request.reply(status, reason, to_tag=_new_tag())
        self._branch_final(branch, response)

    cdef _on_branch_response(self, Branch branch, Response response):
        response._drop_first_value(H_VIA)  # §16.7 step 3: our Via
        if branch.trunk is not None:
            # A branch to a trunk: its challenge is answered here (None: re-sent), and its
            # responses carry the caller's CSeq again.
            answered = self._trunk_response(branch, response)
            if answered is None:
                return
            response = answered
        cdef int status = response._status
        proxy = self.proxy
        if 100 < status < 300 and branch.target.binding is not None and proxy.nat \
                and self.request.method in _TARGET_METHODS \
                and _contact_behind_nat(response, branch.dest):
            # Our registered user answers from behind a NAT: the caller's in-dialog requests
            # will reach it over the flow we sent the request on.
            _add_alias(response, branch.dest)
        if 100 < status < 300:
            media = proxy.media
            if media is not None and media.on_response(
                    self, response, functools.partial(self._branch_response, branch, response)):
                return
        self._branch_response(branch, response)

    cdef Response _trunk_response(self, Branch branch, Response response):
        """A response on a branch to a trunk (Kamailio's ``uac_auth`` + dialog
        ``track_cseq_updates``): a 401/407 is answered with the trunk's credentials -- the
        request re-sent on this branch with CSeq + 1, once per realm -- and never reaches the
        caller (None); a second challenge for a realm becomes a 403 of ours.  Other responses
        get the caller's CSeq back; a 2xx to an INVITE that was re-sent records the dialog's
        CSeq shift, so the caller's later requests are shifted toward the provider."""
        tb = branch.trunk
        trunks = self.proxy.trunks
        cdef int status = response._status
        if tb.shift:
            cseq = response.cseq
            if cseq is not None:
                response.set_header("CSeq", f"{cseq.seq - tb.shift} {cseq.method}")
        if (status == 401 or status == 407) and branch.final is None and trunks is not None:
            if tb.name not in trunks.clients:
                return response   # no credentials for this trunk: nothing of ours to add
            if self.cancelled or branch.cancel_sent or branch.timer_c_fired or self.final_sent:
                # The branch is ending anyway: no new request; the challenge (which was for
                # us) becomes what the caller's CANCEL or Timer C would have brought.
                return self.request.reply(408 if branch.timer_c_fired else 487,
                                          to_tag=_new_tag())
            answer = trunks.answer(tb, response, branch.request)
            if answer is None:
                return response   # nothing we can answer (an unknown algorithm)
            if answer is False:
                _log.warning("trunk %s refused our credentials for %s %s (%d): 403 upstream",
                             tb.name, self.request.method, self.request.uri, status)
                return self.request.reply(403, "Forbidden (trunk authentication failed)",
                                          to_tag=_new_tag())
            self._resend(branch, answer)
            return None
        if trunks is not None and self.request.method == "INVITE":
            if 100 < status < 300:
                trunks.dialog_answered(tb, self.request, response,
                                       self.proxy._attached()._now())
            elif status >= 300 and tb.dialog is not None \
                    and (self.request.to is None or self.request.to.tag is None):
                trunks.dialog_failed(tb)     # an early dialog that never became one
        return response

    cdef _resend(self, Branch branch, tuple credentials):
        """The branch's request again, as its UAC would after a challenge (RFC 3261 §22.2,
        §8.1.3.5): a new client transaction (new Via branch), CSeq + 1, the credentials.  The
        branch keeps its place in the context: its CANCEL, Timer C and final response now
        follow the new transaction."""
        proxy = self.proxy
        old = branch.request
        cdef Request request = old.copy()
        request._drop_first_value(H_VIA)
        request.add_via(proxy._via(branch.dest, proxy._new_branch(self.loop)))
        cseq = old.cseq
        assert cseq is not None  # validated on arrival
        request.set_header("CSeq", f"{cseq.seq + 1} {cseq.method}")
        name, value = credentials
        # Credentials for other realms stay (§22.3: one per challenging realm); an earlier
        # answer for this realm (a stale nonce) is replaced.
        realm = _auth_realm(value)
        kept = [v for v in request.headers.getlines(name) if _auth_realm(v) != realm]
        if len(kept) != request.headers.count(name):
            request.remove_header(name)
            for v in kept:
                request.add_header(name, v)
        request.add_header(name, value)
        branch.trunk.shift += 1
        branch.trunk.resent()
        branch.request = request
        branch.provisional = False
        if branch._timer_c is not None:  # §16.8: a new request, a new wait for an answer
            branch._timer_c_due = 0.0
            cancel_timer(branch._timer_c)
            self._arm_timer_c(branch, proxy.timer_c)
        try:
            branch.key = proxy._attached().request(request, branch.dest, branch).key
        except ValueError as exc:
            _log.info("cannot re-send to %s with credentials: %s", branch.dest, exc)
            self._branch_failed(branch, 503)

    cpdef _branch_response(self, Branch branch, Response response):
        cdef int status = response._status
        cdef Branch b
        if status < 200:
            if branch.final is not None:
                return
            branch.provisional = True
            if branch.cancel_wanted:
                branch.cancel()
            if status == 100:
                return  # §16.7 step 5: 100 is hop by hop
            if branch._timer_c is not None:  # §16.8: a 101-199 restarts Timer C (see _timer_c)
                proxy = self.proxy
                branch._timer_c_due = proxy._attached()._now() + proxy.timer_c
            self._hook(response)
            if not self.final_sent:
                _send_upstream(self.proxy, self.txn, response)
            return
        if status < 300:
            if branch.final is None:
                branch.final = response
                branch._stop_timers()
                self.active -= 1
            self._hook(response)
            if not self.final_sent or self.request.method == "INVITE":
                # §16.7 step 9: every 2xx to an INVITE goes up at once (each is a dialog).
                _send_upstream(self.proxy, self.txn, response)
            if not self.final_sent:
                self.final_sent = True
                self.serial = []
                self._release(response)
                for b in self.branches:  # §16.7 step 10
                    if b is not branch:
                        b.cancel()
            self._check_done()
            return
        if branch.final is not None:
            return
        if status == 503 and branch.hop is not None:
            # RFC 3263 §4.3: a 503 from a resolved next hop; with Retry-After it is skipped
            # for that long, and the next address (if any) gets the request.
            seconds = _retry_after(response)
            resolver = self.proxy.resolver
            if seconds and resolver is not None:
                resolver.unavailable(branch.dest, seconds)
            if self._fail_over(branch, status, False):
                return
        self._hook(response)
        if branch.timer_c_fired and status == 487:
            # Our Timer C CANCEL brought this 487; the caller did not cancel, nobody answered:
            # it counts as 408 (Kamailio's tm fakes a 408 on fr_inv_timer too).  A 2xx that
            # crossed the CANCEL still goes up above: the call connects after all.
            response = self.request.reply(408, to_tag=_new_tag())
        self._branch_final(branch, response)

    cdef _branch_final(self, Branch branch, Response response):
        branch.final = response
        branch._stop_timers()
        self.active -= 1
        self._record_final(response)
        cdef Branch b
        if response._status >= 600 and not self.final_sent:
            # §16.7 step 5: a 6xx ends the search: cancel the rest, try nothing new.
            self.serial = []
            for b in self.branches:
                b.cancel()
        if self.active == 0:
            self._branches_done()
        self._check_done()

    cdef _record_final(self, Response response):
        cdef int status = response._status
        if status == 401 or status == 407:
            name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
            if self._auth is None:
                self._auth = []
            self._auth += [(name, v) for v in response.headers.getall(name)]
        cdef Response best = self._best
        if best is None or _rank(status) < _rank(best._status):
            self._best = response

    cdef _branches_done(self):
        if self.final_sent:
            return
        cdef Response best = self._best
        cdef bint six = best is not None and best._status >= 600
        if self.serial and not self.cancelled and not six:
            self._start(self.serial.pop(0))
            return
        router = self.proxy.router
        if best is not None and not self.cancelled and not six and router is not None:
            try:
                if router.on_failure(self, best):
                    return
            except Exception:
                _log.exception(
                    "failure hook raised for %s %s", self.request.method, self.request.uri
                )
                self._respond_local(500)
                return
        self.send_best()

    cdef _hook(self, Response response):
        proxy = self.proxy
        if proxy._wants_responses:
            router = proxy.router
            if router is not None:
                try:
                    router.on_response(self, response)
                except Exception:
                    _log.exception("response hook raised for %d", response._status)

    # -- upstream ----------------------------------------------------------------------------

    cdef Response _make_response(self, int status, reason, headers, tag):
        cdef Request req = self.request
        to = req.to
        to_tag = tag() if status > 100 and (to is None or to.tag is None) else None
        return req.reply(status, reason, to_tag=to_tag, headers=list(headers) or None)

    cdef _respond_local(self, int status, reason=None):
        self.respond(status, reason)

    cdef _check_done(self):
        # Settled (final response sent, no branch pending): break the reference cycles
        # (context <-> branches, <-> server transaction, <-> router data) so reference counting
        # frees all of it.  Left to the cyclic GC, ~10 objects per call cost more CPU than the
        # whole proxy path (full collections walk every live transaction).
        if self.final_sent and self.active == 0 and self.txn.data is self:
            self._settle()
            self.branches = []
            self.txn.data = _FINISHED
            self.data = None

    cdef _settle(self):
        # The branches' client transactions linger (Timers K, D, M: up to 32 s) holding
        # their branch, and through it this context with every message of the call.  When
        # nothing can look at the context any more (no response or media hook, no trunk
        # branch), each gets a handler that keeps only what a retransmitted 2xx needs.
        proxy = self.proxy
        if proxy.media is not None or proxy._wants_responses:
            return
        layer = proxy._attached()
        cdef bint alias = proxy.nat and self.request.method in _TARGET_METHODS
        cdef Branch b
        cdef ClientTransaction txn
        for b in self.branches:
            if b.key is None or b.trunk is not None:
                continue
            found = layer.client_transaction(b.key)
            if found is None:
                continue
            txn = <ClientTransaction?>found
            if txn.handler is not b:
                continue
            final = b.final
            if txn._state == S_ACCEPTED and final is not None and b.final._status < 300:
                txn.handler = _Settled(proxy, self.txn, b.dest,
                                       alias and b.target.binding is not None)
            else:
                # Completed or done: it calls its handler no more (a transport error on a
                # finished branch changes nothing).
                txn.handler = _IGNORE

    cdef _release(self, Response final):
        # The first final response went upstream: the context no longer counts against
        # max_pending, and a router that asked (``on_final``) hears the outcome, and so does
        # the media hook of a call it anchored.
        if not self._counted:
            return
        self._counted = False
        proxy = self.proxy
        if self.media is not None:
            media = proxy.media
            if media is not None:
                media.on_final(self, final)
        proxy._live -= 1
        host = self.source.host
        per_source = proxy._per_source
        n = per_source.get(host, 1) - 1
        if n:
            per_source[host] = n
        else:
            per_source.pop(host, None)
        if proxy._wants_final:
            router = proxy.router
            if router is not None:
                try:
                    router.on_final(self, final)
                except Exception:
                    _log.exception("final-response hook raised for %d", final._status)

    def __repr__(self):
        return (
            f"<ResponseContext {self.request.method} {self.request.uri} "
            f"branches={len(self.branches)} active={self.active}>"
        )


@cython.final
cdef class Target:
    """Where one branch goes (§16.5's target set, one element).

    ``uri``: the new Request-URI (None: keep the Request-URI, as loose routing does).  ``route``:
    Route header values to push in front (a binding's Path, RFC 3327, or an outbound proxy).
    ``dest``: the transport address to send to, bypassing §8.1.2/RFC 3263 (a TCP binding's
    connection, a NAT'd contact's source).  ``binding``: the location-service binding this
    target came from, when it is a registered contact of one of our users (the relay policy
    lets anyone reach those).  ``trunk``: the name of the trunk this branch goes to (its
    provider's 401/407 are answered with that trunk's credentials, :attr:`Proxy.trunks`).
    """

    cdef public object uri
    cdef public tuple route
    cdef public object dest
    cdef public object binding
    cdef public object trunk

    def __init__(self, uri=None, *, route=(), dest=None, binding=None, trunk=None):
        self.uri = uri
        self.route = tuple(route)
        self.dest = dest
        self.binding = binding
        self.trunk = trunk

    def __repr__(self):
        return f"Target({str(self.uri) if self.uri is not None else None!r})"


@cython.final
cdef class StatelessContext:
    """A request being proxied statelessly (§16.11): one target, nothing remembered."""

    cdef public Proxy proxy
    cdef public Request request
    cdef public object source
    cdef public bint decided
    cdef public object data
    cdef public bint routed

    def __init__(self, Proxy proxy not None, Request request not None, source):
        self.proxy = proxy
        self.request = request
        self.source = source

    @property
    def stateless(self):
        return True

    @property
    def done(self):
        return self.decided

    def forward(self, targets, *, parallel=True):
        """Forward to the first target only: a stateless proxy cannot fork (§16.11)."""
        if self.decided:
            return
        self.decided = True
        for target in targets:
            self.proxy._forward_stateless(self.request, target, self.source)
            return
        self._send(480, None, ())

    def respond(self, status, reason=None, *, headers=(), stateless=None):
        if self.decided:
            return
        self.decided = True
        if self.request.method != "ACK":  # an ACK is never answered (§17)
            self._send(status, reason, headers)

    cdef _send(self, status, reason, headers):
        cdef Request req = self.request
        if isinstance(status, Response):
            response = _with_to_tag(status, functools.partial(_stateless_tag, req))
        else:
            to = req.to
            # A stateless proxy's To tag must be the same for a retransmitted request.
            tag = (
                None
                if status == 100 or (to is not None and to.tag)
                else _stateless_tag(req)
            )
            response = req.reply(status, reason, to_tag=tag, headers=list(headers) or None)
        self.proxy._send_response(response, self.source)


cdef str _rr_uri(Address local, bint secure=False):
    """Our Record-Route URI for the listener ``local``; ``secure``: a sips: URI (a TLS hop of a
    sips request; sips means TLS, so no ``transport=tls``, RFC 5630 §3.1.3)."""
    cdef str host = local.host
    cdef str transport = local.transport
    port = local.port
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    if secure:
        return f"<sips:{host}:{port};lr>"
    t = "" if transport == "UDP" else f";transport={transport.lower()}"
    return f"<sip:{host}:{port}{t};lr>"


cdef inline bint _same_peer(Address a, Address b) except -1:
    # Address.peer without its tuples: the same transport, host and port.
    return a.transport == b.transport and a.host == b.host and a.port == b.port


@cython.final
cdef class Proxy(TransactionUserBase):
    """The proxy core: a TransactionUser (stateful) or a message sink (``stateless=True``).

    - ``router``: the routing policy (:class:`RequestRouter`; None: loose-route everything,
      404 for requests addressed to us).
    - ``record_route``: add our Record-Route (``;lr``, matching the outgoing transport; two of
      them when the transport changes, RFC 5658) to initial dialog-creating requests.
    - ``timer_c``: Timer C in seconds (§16.8: more than 3 minutes; 0 turns it off).
    - ``max_pending``: response contexts waiting for a final response; beyond it new requests
      get 503 with ``Retry-After: retry_after`` (memory stays bounded under a flood).
      ``max_pending_per_source`` (default: half of it) bounds one source host's share, so a
      flood from one place cannot take every slot.
    - ``aliases``: other host names that mean us (for Route and Record-Route recognition), in
      addition to our sent-by addresses.
    - ``schemes``: Request-URI schemes we can route (others: 416, §16.3 step 2).
    - ``proxy_require``: option tags we support in Proxy-Require (others: 420, §16.3 step 6).
    - ``loop_detection``: §16.3 step 4 / RFC 5393 (482 for a request that comes back
      unchanged; a spiral, changed by routing, is fine).
    - ``trusted``: source hosts (``host in trusted``: a
      :class:`~fastsip.proxy.edge.TrustedNetworks`) whose requests need not come through us.
    - ``require_own_route`` (default: ``record_route``): a request in a dialog (To tag) or an
      ACK is loose-routed only when it came through our Record-Route (a Route naming us) or
      its Request-URI names us; otherwise an untrusted source gets 403 (an ACK is dropped).
      Without it, adding a To tag would turn the proxy into an open relay.
    - ``nat``: NAT traversal (:mod:`fastsip.proxy.nat`): the Contact of a client behind NAT in
      a dialog-creating or target-refresh request or answer gets an ``alias`` naming its flow,
      and a request whose Request-URI carries one (its last hop: no Route left) goes there.

    Local answers (``ctx.respond``) that are negative and come before anything else went
    upstream are sent statelessly: see :meth:`ResponseContext.respond`.
    """

    # The proxy never reads a transaction's messages once it has its final response: the
    # transaction layer drops them when the transaction starts to linger.
    sheds_messages = True

    cdef public object router
    cdef public bint record_route
    cdef public double timer_c
    cdef public bint stateless
    cdef public Py_ssize_t max_pending
    cdef public Py_ssize_t max_pending_per_source
    cdef dict _per_source
    cdef public object retry_after
    cdef public object aliases
    cdef public frozenset schemes
    cdef public frozenset proxy_require
    cdef public bint loop_detection
    cdef public object trusted
    cdef public bint require_own_route
    cdef public bint nat
    cdef public object nat_keeper
    cdef public object media
    cdef public object resolver
    cdef readonly object refusals
    cdef public object trunks
    cdef TransactionLayer _layer
    cdef object _transport_local_for
    cdef object _transport_via_for
    # The transport's compiled stand-in (fastsip.transport._base): both of the above by C
    # calls.  None: the transport has none, and they are called as bound methods.
    cdef TransportBase _transport_c
    cdef Py_ssize_t _live
    cdef bint _wants_responses
    cdef bint _wants_final
    # Our branches' unique parts: this process's random prefix and a counter.
    cdef unsigned long long _count
    cdef str _prefix
    cdef dict _sent_by
    cdef object _hosts
    cdef set _ports
    # Our last Via up to its branch, and the end and transport it was made for (_via).
    cdef str _via_head
    cdef Address _via_ours
    cdef str _via_transport

    def __init__(self, router=None, *, record_route=True, timer_c=180.0, stateless=False,
                 max_pending=100_000, max_pending_per_source=None, retry_after=5,
                 aliases=(), schemes=("sip", "sips"), proxy_require=(), loop_detection=True,
                 trusted=frozenset(), require_own_route=None, nat=True):
        self.router = router
        self.record_route = record_route
        self.timer_c = timer_c
        self.stateless = stateless
        self.max_pending = max_pending
        self.max_pending_per_source = (
            max_pending_per_source if max_pending_per_source is not None
            else max(1, max_pending // 2)
        )
        self._per_source = {}
        self.retry_after = retry_after
        self.aliases = {_canonical_host(a) for a in aliases}
        self.schemes = frozenset(s.lower() for s in schemes)
        self.proxy_require = frozenset(proxy_require)
        self.loop_detection = loop_detection
        self.trusted = trusted
        self.require_own_route = record_route if require_own_route is None \
            else require_own_route
        self.nat = nat
        self.refusals = _Refusals()
        self._wants_responses = bool(getattr(router, "wants_responses", False))
        self._wants_final = callable(getattr(router, "on_final", None))
        self._prefix = os.urandom(3).hex()
        self._sent_by = {}
        self._ports = set()

    # -- wiring ------------------------------------------------------------------------------

    def attach(self, TransactionLayer layer not None):
        """Use ``layer`` (whose TU must be this proxy) and its transport and clock.  An I/O
        shell (``fastsip.asyncio.Endpoint``) calls this once it has started."""
        if layer.tu is not self:
            raise ValueError("the transaction layer's TU is another object")
        self._layer = layer
        self._sent_by.clear()
        self._hosts = None
        # Looked up once: our end of every branch and Record-Route comes from it.
        self._transport_local_for = getattr(layer.transport, "local_for", None)
        # Our Via may name another port than our Record-Route: a worker's own socket, which
        # the requests it forwards leave from (fastsip.asyncio.transport's own_sockets).
        self._transport_via_for = getattr(layer.transport, "via_for", None)
        self._transport_c = compiled_transport(layer.transport)
        attach = getattr(self.router, "attach", None)
        if attach is not None:
            attach(self)

    @property
    def layer(self):
        return self._attached()

    @property
    def transport(self):
        return self._attached().transport

    @property
    def clock(self):
        return self._attached().clock

    @property
    def pending(self):
        """Response contexts still waiting for their final response."""
        return self._live

    cdef TransactionLayer _attached(self):
        if self._layer is None:
            raise ValueError("the Proxy has no transaction layer yet (attach one)")
        return self._layer

    def sent_by(self, str transport):
        """Our host and port for ``transport`` (Via, Record-Route), cached."""
        sb = self._sent_by.get(transport)
        if sb is None:
            sb = self._sent_by[transport] = self._attached().transport.sent_by(transport)
        return sb

    cdef _local(self):
        if self._hosts is None:
            hosts = set(self.aliases)
            ports = set()
            transport = self._attached().transport
            local_addresses = getattr(transport, "local_addresses", None)
            if local_addresses is not None:
                # Every listening and advertised address, and every interface address behind
                # a wildcard listener (the shell knows them).
                own_hosts, own_ports = local_addresses()
                hosts.update(_canonical_host(h) for h in own_hosts)
                ports.update(own_ports)
            else:
                for t in ("UDP", "TCP", "TLS", "SCTP", "WS", "WSS"):
                    try:
                        host, port = transport.sent_by(t)
                    except Exception as exc:  # noqa: BLE001 - no listener at all (yet)
                        _log.debug("no sent-by for %s: %s", t, exc)
                        continue
                    hosts.add(_canonical_host(host))
                    ports.add(port)
            self._hosts, self._ports = hosts, ports
        return self._hosts

    cpdef bint is_local(self, uri) except -1:
        """Does ``uri`` name this proxy?  Its host (or maddr) is one of our addresses (every
        listening and advertised one; every interface address behind a wildcard listener), an
        alias or a served domain, and its port, when it has one, is one of ours.  A URI with no
        port names us on whatever port we listen (``sip:127.0.0.1`` for a proxy on 5080): the
        one definition of "us" for Route popping, the relay policy and the default routing."""
        if uri is None:
            return False
        cdef URI u = uri
        if not u._is_sip():
            return False
        return self._host_port_is_ours(u._maddr() or u.host, u.port)

    cdef bint _host_port_is_ours(self, str host, port) except -1:
        # is_local's answer for a SIP URI's host (or maddr) and port (None: any of ours).
        if memo_get(_CANONICAL, host) not in self._local():
            return False
        return port is None or port in self._ports

    cdef bint _names_us(self, NameAddr route) except -1:
        """:meth:`is_local` of a Route value's URI, read from the parser's index: every
        in-dialog request's Route names us, and building its URI to ask cost more than the
        question (a URI with a ``maddr`` is built and asked as it is)."""
        parts = route._sip_host_port()
        if parts is None:
            return False
        host, port, maddr = <tuple>parts
        if maddr:
            return self.is_local(route._uri())
        return self._host_port_is_ours(host, port)

    cdef bint _via_is_ours(self, str host, port, str transport) except -1:
        # A Via without a port names its transport's default one (DEFAULT_PORTS).
        return self._host_port_is_ours(
            host, port if port is not None else _DEFAULT_PORTS.get(transport, 5060))

    # -- TransactionUser ---------------------------------------------------------------------

    cpdef on_request(self, txn, Request request):
        # (The TransactionUser callbacks are C calls from the layer: TransactionUserBase.)
        if txn is None or request is None:
            raise TypeError("on_request needs a ServerTransaction and a Request")
        cdef ServerTransaction stxn = txn
        cdef str method = request._method()
        if method == "CANCEL":
            self._on_cancel(stxn, request)
            return
        source = stxn.source
        host = source.host
        per_source = self._per_source
        if self._live >= self.max_pending or \
                per_source.get(host, 0) >= self.max_pending_per_source:
            self._overloaded(host, method)
            stxn.respond_statelessly(
                request.reply(
                    503, to_tag=_stateless_tag(request),
                    headers=[("Retry-After", str(self.retry_after))],
                )
            )
            return
        cdef ResponseContext ctx = ResponseContext(self, stxn, request, source)
        stxn.data = ctx  # for a CANCEL (§16.10)
        self._live += 1
        per_source[host] = per_source.get(host, 0) + 1
        try:
            bad = self._validate(request)
            if bad is None and self.loop_detection:
                ctx.loop = request.loop_hash()  # §16.6 step 8, on arrival
                if self._looped(request, ctx.loop):
                    bad = (482, None, [])
            if bad is not None:
                ctx.respond(bad[0], bad[1], headers=bad[2])
                return
            in_dialog, routed = self._preprocess(request)
        except ValueError as exc:  # a header that fails to parse on first access
            ctx.respond(400, _bad_request(exc))
            return
        self._dispatch(ctx, in_dialog, routed)

    cdef _overloaded(self, host, method):
        if self.refusals.refused(self._attached()._now()):
            _log.warning("overload: %d contexts pending (%d from %s): 503 for %s "
                         "(%d refused so far)", self._live, self._per_source.get(host, 0), host,
                         method, self.refusals.count)

    def dialog_allowed(self, ctx):
        """May this in-dialog request be loose-routed on (see ``require_own_route``)?  It came
        through our Record-Route, or names us, or comes from a trusted source."""
        request = ctx.request
        return (not self.require_own_route or ctx.routed or ctx.source.host in self.trusted
                or (not request.route and self.is_local(request.uri)))

    cdef _dispatch(self, ctx, bint in_dialog, bint routed=True):
        cdef Request request = ctx.request
        router = self.router
        ctx.routed = routed
        if router is None or (in_dialog and not router.in_dialog):
            if in_dialog and not self.dialog_allowed(ctx):
                # "In a dialog" but not through our Record-Route: loose-routing it would let
                # anyone bounce requests off us to any address by adding a To tag.
                _log.debug("403 for %s %s from %s: in a dialog, not routed through us",
                           request.method, request.uri, ctx.source)
                ctx.respond(403, _FORBIDDEN_NOT_ROUTED)
                return
            if not request._routes() and self.is_local(request._uri()):
                ctx.respond(404 if request._method() != "OPTIONS" or in_dialog else 200)
            else:
                ctx.forward([Target()])
            return
        try:
            router.on_request(ctx)
        except Exception:
            _log.exception("router raised for %s %s", request.method, request.uri)
            ctx.respond(500)

    cpdef on_ack(self, Request request, source):
        """An ACK for a 2xx (or one that matches nothing): forwarded statelessly, end to end,
        along its Route set / Request-URI (§16.11 for the ACK, §13.2.2.4 end to end).  An ACK
        for one of our own stateless answers (our To tag) ends here, and so does one that did
        not come through our Record-Route (see ``require_own_route``)."""
        cdef NameAddr to
        if request is None:
            raise TypeError("on_ack needs a Request")
        try:
            to = request._to()
            if to is not None and _is_local_tag(to._tag()):
                return
            _, routed = self._preprocess(request)
            if not routed and self.require_own_route and source.host not in self.trusted:
                if request._routes() or not self.is_local(request._uri()):
                    _log.debug("dropping ACK from %s: not routed through us", source)
                return
            if self.trunks is not None:
                # §13.2.2.4: the ACK for a 2xx carries the CSeq of the INVITE it answers --
                # the one the provider saw, when we re-sent it with credentials.
                self.trunks.shift_ack(request)
            self._forward_ack(request, source)
        except ValueError as exc:
            _log.debug("dropping ACK from %s: %s", source, exc)

    cdef _forward_ack(self, Request request, source):
        if not request._routes() and self.is_local(request._uri()):
            return  # an ACK for us: we never send 2xx to INVITE, so nothing to do
        media = self.media
        if media is not None and media.on_ack(
                request, functools.partial(self._forward_stateless, request, Target(), source)):
            return
        self._relay_stateless(request, Target(), source)

    cpdef on_stray_response(self, Response response, source):
        """A response no client transaction wants (a 2xx retransmitted after Timer M, or any
        response in stateless mode): route it back by the next Via (§16.7 step 3, §16.11)."""
        if response is None:
            raise TypeError("on_stray_response needs a Response")
        top = response.top_via
        if top is None or not self._via_is_ours(top.host, top.port, top.transport):
            return
        keeper = self.nat_keeper
        if keeper is not None and keeper.on_response(response):
            return  # the answer to a keep-alive: the flow is alive
        response._drop_first_value(H_VIA)
        nxt = response.top_via
        if nxt is None:
            return  # it was for us
        self._attached()._send(wire(response), response_destination(nxt))

    cpdef on_server_timeout(self, txn):
        pass  # Timer H: the upstream never ACKed our non-2xx; nothing is waiting on it

    # -- stateless entry ---------------------------------------------------------------------

    def receive(self, msg, source):
        """The entry point for messages from the transport.  Stateful: the transaction layer
        takes them.  Stateless (§16.11): nothing is kept; requests are routed at once (one
        target), ACK/CANCEL forwarded like any request, responses routed back by Via."""
        if not self.stateless:
            self._attached().receive(msg, source)
            return
        if isinstance(msg, Response):
            self.on_stray_response(msg, source)
            return
        cdef Request request = msg
        ctx = StatelessContext(self, request, source)
        try:
            if request.method == "ACK":
                # An ACK with a route set (for a 2xx) follows it; one without (for a non-2xx,
                # or a 2xx without Record-Route) is routed like its INVITE, below.
                to = request.to
                if to is not None and _is_local_tag(to.tag):
                    return  # the ACK for one of our own answers
                self._preprocess(request)
                if request.route or not self.router:
                    self._forward_ack(request, source)
                    return
                self._dispatch(ctx, False)
                return
            bad = self._validate(request)
            if bad is not None:
                ctx.respond(bad[0], bad[1], headers=bad[2])
                return
            in_dialog, routed = self._preprocess(request)
        except ValueError as exc:
            ctx.respond(400, _bad_request(exc))
            return
        # A CANCEL is routed like its INVITE (the router must be deterministic, §16.11) and
        # goes out with the same derived branch, so the next hop matches it.
        self._dispatch(ctx, in_dialog, routed)

    # -- §16.3 and §16.4 ---------------------------------------------------------------------

    cdef _validate(self, Request request):
        """§16.3, with Kamailio's ``sanity`` checks in front: the request must be one we can
        proxy.  Returns (status, reason, headers) of the error response, or None.

        Every header a layer above reads is parsed here, once (the views are cached), so a
        malformed one is answered 400 with the problem named, before routing and
        authentication, and can never raise later from deep inside a layer.  May raise
        ParseError itself (the caller answers 400)."""
        repeated = request.repeated_single_field()
        if repeated is not None:
            return (400, f"Bad Request (more than one {repeated})", [])
        cseq = request._cseq()
        cdef NameAddr frm = request._from()
        cdef NameAddr to = request._to()
        if frm is None or to is None or not request._call_id() or cseq is None:
            return (400, "Bad Request (missing From, To, Call-ID or CSeq)", [])
        # (Checked, not built: a BYE's From and To are never read as URIs.  A malformed one
        # raises ParseError: 400 too.)
        if not frm._uri_valid() or not to._uri_valid():
            return (400, "Bad Request (From or To)", [])
        cdef str method = request._method()
        if (<tuple>cseq)[1] != method:     # the CSeq namedtuple's method
            return (400, "Bad Request (CSeq method does not match)", [])
        # The lazily parsed lists: every Via (loop detection reads them all), the route set,
        # and Contact, which the registrar, logs and routes read.
        request._vias()
        request._routes()
        request._contacts()
        cdef URI uri = request._uri()
        if uri.scheme not in self.schemes:
            return (416, None, [])
        mf = request._max_forwards()
        if (
            mf is not None
            and mf <= 0
            # An OPTIONS to the proxy itself is answered, not forwarded (§11, §16.3 step 3);
            # to a user -- ours or not -- it would have to go on: 483 (RFC 4475 zeromf).
            and not (method == "OPTIONS" and uri.user is None and self.is_local(uri))
        ):
            return (483, None, [])
        required = request._values(H_PROXY_REQUIRE, True)
        if required:
            unsupported = [t.strip() for t in required if t.strip() not in self.proxy_require]
            if unsupported:
                return (420, None, [("Unsupported", ", ".join(unsupported))])
        return None

    cdef bint _looped(self, Request request, str mine) except -1:
        cdef list vias = request._vias()
        if len(vias) < 2:
            return False
        cdef str branch
        cdef Via via
        for via in vias:
            branch = via._branch()
            if not branch or not branch.startswith(_MAGIC_COOKIE + "-"):
                continue
            if not self._via_is_ours(via._host(), via._port(), via._transport()):
                continue
            # Our branches: "z9hG4bK-" + loop hash + "." + unique part.
            if branch[len(_MAGIC_COOKIE) + 1:].split(".", 1)[0] == mine:
                return True
        return False

    cdef tuple _preprocess(self, Request request):
        """§16.4: a Request-URI that is one of our Record-Route URIs came through a strict
        router (the real target is the last Route); then our own Route values are removed.
        Returns (in a dialog: it has a To tag, routed here: it named us in a Route or, via a
        strict router, in the Request-URI)."""
        cdef bint routed = False
        cdef URI uri = request._uri()
        if uri._lr() and self.is_local(uri):
            routes = [str(r) for r in request._routes()]
            if routes:
                request.remove_header("Route")
                for value in reversed(routes[:len(routes) - 1]):
                    request.add_route(value)
                target = routes[len(routes) - 1].strip()
                if target.startswith("<"):
                    target = target[1:target.index(">")]
                request.uri = target
                routed = True
        # Ours may be there twice (RFC 5658 double Record-Route across transports).
        cdef list routes_view
        for _ in range(2):
            routes_view = request._routes()
            if not routes_view or not self._names_us(<NameAddr>routes_view[0]):
                break
            request._drop_first_value(H_ROUTE)
            routed = True
        cdef NameAddr to = request._to()
        return to is not None and to._tag() is not None, routed

    # -- §16.6 forwarding --------------------------------------------------------------------

    cdef tuple _prepare(self, Request request, Target target, source, bint record_route,
                        resolved=None):
        """§16.6 steps 2-7 on ``request`` (a copy, or the original when stateless): returns the
        destination, the URI it was derived from (None: the target named an address) and our
        end towards it when the Record-Route needed it (None: not looked up; the Via needs it
        too, so it is asked once); the caller adds the Via (step 8) and sends.  ``resolved``:
        the address RFC 3263 chose for that URI, used instead of it."""
        # A sips Request-URI asks for TLS on every hop to the end (RFC 5630 deprecates the
        # last-hop exception), and retargeting never changes the scheme.
        cdef bint secure = _is_sips(request._uri())
        tls_target = None
        if target.uri is not None:
            request._set_uri(_as_uri(target.uri))
            if _is_sips(request._uri()) != secure:
                tls_target = _keep_scheme(request, secure)
        if request._max_forwards() is None:
            request.set_header("Max-Forwards", "70")
        else:
            request.decrement_max_forwards()
        for value in reversed(target.route):
            request.add_route(value)
        # Step 6: a strict router next: it gets the Request-URI, which goes last in Route.
        cdef bint strict = False
        cdef list routes = request._routes()
        cdef URI first
        if routes:
            first = (<NameAddr>routes[0])._uri()
            if first is not None and not first._lr():
                values = [str(r) for r in routes]
                request.remove_header("Route")
                values = values[1:] + [f"<{request._uri()}>"]
                for value in reversed(values):
                    request.add_route(value)
                request.uri = first
                strict = True
        flow = None
        if target.dest is None and self.nat and not strict and not request._routes():
            # An in-dialog request to a client behind NAT: its target's alias names the flow.
            flow = _pop_alias(request)
        hop_uri = None
        if target.dest is not None:
            dest = target.dest
        elif flow is not None:
            dest = flow
        else:
            # (``routes`` is the Route set as pushed above, before any strict-router swap.)
            hop_uri = (<NameAddr>routes[0])._uri() if routes and not strict else request._uri()
            if resolved is not None:
                dest = resolved
            elif tls_target is not None and not strict and not routes:
                dest = tls_target
            else:
                try:
                    # Step 7: to the first Route, or (a strict router) the new Request-URI.
                    dest = next_hop(request._uri()) if strict else request_next_hop(request)
                except ValueError as exc:
                    raise _BadTarget(str(exc)) from None
        if self.nat and request._method() in _TARGET_METHODS \
                and _request_behind_nat(request, source):
            _add_alias(request, source)
        # §16.6 steps 4 and 7: a sips top Route (or strict router) secures this hop too.
        secure = secure or bool(routes and _is_sips((<NameAddr>routes[0])._uri()))
        if secure and (<Address?>dest).transport != "TLS":
            raise _NoSecureHop(f"sips request to {dest}: not a TLS hop")
        out = None
        if record_route:
            # §16.6 step 4: a sips Record-Route for a sips request (on a TLS hop: one that
            # came in otherwise gets a sip: URI for its side, the truth about that hop).
            out = self.local_for(dest)
            inbound = self.local_for(source)
            if not _same_peer(inbound, out):
                # RFC 5658: the request changes transport, address family or interface here,
                # so each side gets a Record-Route it can reach (the caller's route set starts
                # at the inbound one, the callee's at the outbound one).
                request.add_record_route(
                    _rr_uri(inbound, secure and inbound.transport == "TLS"))
            request.add_record_route(_rr_uri(out, secure))
        return dest, hop_uri, out

    cpdef local_for(self, peer):
        """Our end of a message to ``peer`` (or from it, when ``peer`` is a source naming the
        socket it arrived on): transport, advertised host and port of that listener.  A
        transport without ``local_for`` stands in with its ``sent_by`` for the transport."""
        if self._transport_c is not None:
            return self._transport_c.local_for(peer)
        local_for = self._transport_local_for
        if local_for is not None:
            return local_for(peer)
        host, port = self.sent_by(peer.transport)
        return _Address(peer.transport, host, port)

    cpdef str _via(self, dest, str branch, local=None):
        """Our Via towards ``dest`` (``local``: our end of it, when already known; a transport
        with ``via_for`` names it, as the socket the request leaves from may not be the one
        our Record-Route names)."""
        if self._transport_c is not None:
            local = self._transport_c.via_for(dest, local)
        elif self._transport_via_for is not None:
            local = self._transport_via_for(dest, local)
        elif local is None:
            local = self.local_for(dest)
        cdef Address ours = local
        cdef str transport = (<Address?>dest).transport
        cdef str host
        if ours is not self._via_ours or transport != self._via_transport:
            # Nearly every branch leaves from the same end over the same transport: its
            # sent-by is formatted once (an Address is a value: the same object, the same
            # end).
            host = ours.host
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            self._via_head = f"SIP/2.0/{transport} {host}:{ours.port};branch="
            self._via_ours = ours
            self._via_transport = transport
        return self._via_head + branch

    cdef str _new_branch(self, str loop):
        # "z9hG4bK-" + §16.6 step 8's loop hash + "." + this process's prefix and a counter:
        # unique (§8.1.1.7), and our loop detection finds the hash in it (_looped).
        self._count += 1
        return f"{_MAGIC_COOKIE}-{loop}.{self._prefix}{self._count:x}"

    cpdef Branch _make_branch(self, ResponseContext ctx, Target target, resolved=None):
        cdef Request original = ctx.request
        cdef Request copy = original.copy()  # §16.6 step 1: a copy per branch, nothing parsed
        cdef str method = original._method()
        cdef NameAddr to = original._to()
        cdef bint rr = (
            self.record_route
            and method in _RECORD_ROUTE_METHODS
            and (to is None or to._tag() is None)
        )
        trunks = self.trunks
        tb = None
        if trunks is not None:
            # To a trunk, or in a dialog whose CSeq we shift: stay in the path (a forced
            # Record-Route) and number the request as the provider expects.
            tb = trunks.branch(original, copy, target, self._attached()._now())
            if tb is not None and target.trunk is not None \
                    and method in _RECORD_ROUTE_METHODS:
                rr = rr or to is None or to._tag() is None
        dest, hop_uri, local = self._prepare(copy, target, ctx.source, rr, resolved)
        copy.add_via(self._via(dest, self._new_branch(ctx.loop), local))
        cdef Branch made = Branch(ctx, target, copy, dest)
        if tb is not None:
            made.trunk = tb
        if resolved is None and hop_uri is not None and self.resolver is not None \
                and not memo_get(_IP_LITERAL, (<Address?>dest).host):
            # A host name: RFC 3263 orders its addresses before this branch is sent.
            made.hop = _NextHop.from_uri(hop_uri)
        return made

    def _forward_stateless(self, Request request not None, Target target not None, source):
        self._relay_stateless(request, target, source)

    cdef _relay_stateless(self, Request request, Target target, source):
        # (The ACK's path calls this directly: no Python method call per ACK.)
        cdef bint rr
        cdef NameAddr to
        try:
            to = request._to()
            rr = (
                self.record_route
                and request._method() in _RECORD_ROUTE_METHODS
                and (to is None or to._tag() is None)
            )
            dest, _, local = self._prepare(request, target, source, rr)
        except ValueError as exc:  # Max-Forwards ran out, or no route to the target
            _log.debug("not forwarding %s: %s", request.method, exc)
            return
        request.add_via(self._via(dest, request.stateless_branch(), local))
        self._attached()._send(wire(request), dest)

    def _send_response(self, Response response not None, source):
        top = response.top_via
        if top is None:
            return
        self._attached()._send(wire(response), response_destination(top, source))

    # -- §16.10 CANCEL -----------------------------------------------------------------------

    cdef _on_cancel(self, ServerTransaction txn, Request cancel):
        try:
            bad = self._validate(cancel)
            invite = self._attached().find_invite(cancel) if bad is None else None
        except ValueError as exc:
            bad = (400, _bad_request(exc), [])
        if bad is not None:
            txn.respond_statelessly(cancel.reply(bad[0], bad[1], to_tag=_stateless_tag(cancel),
                                                 headers=bad[2] or None))
            return
        ctx = invite.data if invite is not None else None
        if ctx is _FINISHED:
            # §16.10: the context exists but is settled: 200, and the CANCEL changes nothing.
            txn.respond(cancel.reply(200, to_tag=_new_tag()))
            return
        if not isinstance(ctx, ResponseContext):
            # No response context: nothing of ours to cancel (we proxy statefully).
            txn.respond_statelessly(cancel.reply(481, to_tag=_stateless_tag(cancel)))
            return
        txn.respond(cancel.reply(200, to_tag=_new_tag()))
        (<ResponseContext>ctx).cancel()
