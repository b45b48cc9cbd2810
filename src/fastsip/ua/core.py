"""The UA core (RFC 3261 §8, §12-15): UAC and UAS over the transaction layer, sans-IO.

:class:`UserAgent` is the transaction user.  As a UAS it answers INVITEs through a pluggable
policy (``on_incoming``; the default rings and answers with SDP), retransmits its 2xx until
the ACK comes (§13.3.1.4), and handles ACK, BYE, CANCEL (§9.2), OPTIONS (§11), re-INVITE
(§14.2) and everything else with the right error.  As a UAC it places calls (:meth:`invite`),
ACKs every 2xx directly to the remote target (§13.2.2.4), and ends or abandons them
(:meth:`Call.bye`, :meth:`Call.cancel`).  Outcomes arrive as plain callbacks on :class:`Call`
so any I/O shell (the CLI's asyncio one, a test's clock) can count them.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable, Iterable
from typing import Any

from fastsip.errors import FastSIPError
from fastsip.sip import URI, Request, Response
from fastsip.transaction import (
    ClientTransaction,
    ServerTransaction,
    TimerConfig,
    TransactionLayer,
    hop_by_hop_request,
    new_branch,
)
from fastsip.transport import DEFAULT_PORTS, Address, Transport
from fastsip.transport.rules import strip_brackets
from fastsip.ua.dialog import EARLY, Dialog, DialogError, DialogId, new_tag

__all__ = [
    "ALLOW",
    "AutoAnswer",
    "Call",
    "OptionsResult",
    "UAError",
    "UserAgent",
    "uri_destination",
]

log = logging.getLogger("fastsip.ua")

#: The methods this UA core implements (the Allow header of §20.5).
ALLOW = "INVITE, ACK, CANCEL, BYE, OPTIONS"
#: Methods we know of but do not implement: 405 with Allow (§8.2.1); anything else is 501.
KNOWN_METHODS = frozenset({"REGISTER", "PRACK", "SUBSCRIBE", "NOTIFY", "PUBLISH", "INFO",
                           "REFER", "MESSAGE", "UPDATE"})
SDP = "application/sdp"

# Call states.
CALLING = "calling"          # INVITE sent / received, nothing else yet
PROCEEDING = "proceeding"    # a provisional response went out / came in
ANSWERED = "answered"        # 2xx sent (UAS, awaiting ACK) / received (UAC, ACK sent)
CONFIRMED_CALL = "confirmed"  # ACK received (UAS) / sent (UAC): the call is up
TERMINATING = "terminating"  # BYE sent, no final response yet
TERMINATED = "terminated"


class UAError(FastSIPError):
    """A UA operation that does not fit the call's state (cancel after answer, bye before)."""


def uri_destination(uri: URI, default_transport: str = "UDP") -> Address:
    """Where a request for ``uri`` goes without DNS (RFC 3263 reduced to literals): the URI's
    ``transport`` parameter (else TLS for sips, else ``default_transport``), ``maddr`` or host,
    the URI's port or the transport's default."""
    param = uri.transport
    if param:
        transport = param.upper()
    elif uri.scheme == "sips":
        transport = "TLS"
    else:
        transport = default_transport.upper()
    port = uri.port or DEFAULT_PORTS.get(transport, 5060)
    return Address(transport, strip_brackets(uri.maddr or uri.host), port)


class OptionsResult:
    """What an OPTIONS request came back with: the final response, or a status the UA core
    made up (408 on timeout, 503 on transport error, §8.1.3.1)."""

    __slots__ = ("response", "status")

    def __init__(self, status: int, response: Response | None) -> None:
        self.status = status
        self.response = response


class Call:
    """One INVITE session as one end sees it (``role`` "uac" or "uas").

    Callbacks (set any; each gets the call): ``on_progress`` (a provisional response),
    ``on_answer`` (2xx; for the UAC the ACK is already sent), ``on_confirm`` (UAS: the ACK
    arrived), ``on_end`` (the call is over: see ``status``, ``answered``, ``ended_by`` and
    ``error``).  ``status`` is the INVITE's final status (made-up 408/503 on timeout/transport
    error), ``bye_status`` the BYE's when we sent one.
    """

    __slots__ = (
        "_ack",
        "_answer",
        "_answer_at",
        "_cancel_wanted",
        "_content_type",
        "_interval",
        "_local_body",
        "_remote_body",
        "_timer",
        "answered",
        "bye_status",
        "data",
        "dest",
        "dialog",
        "ended_by",
        "error",
        "invite",
        "local_tag",
        "on_answer",
        "on_confirm",
        "on_end",
        "on_progress",
        "on_reinvite",
        "role",
        "state",
        "status",
        "transport",
        "txn",
        "ua",
    )

    def __init__(self, ua: UserAgent, role: str, invite: Request, transport: str) -> None:
        self.ua = ua
        self.role = role
        self.invite = invite
        self.dialog: Dialog | None = None
        self.state = CALLING
        self.status: int | None = None
        self.bye_status: int | None = None
        self.ended_by: str | None = None     # "local", "remote", "cancel", "timeout", "error"
        self.error: str | None = None
        self.local_tag = ""
        self.txn: ServerTransaction | ClientTransaction | None = None
        self.dest: Address | None = None
        self.transport = transport
        self.answered = False
        self.data: Any = None                # for the application
        self.on_progress: Callable[[Call], object] | None = None
        self.on_answer: Callable[[Call], object] | None = None
        self.on_confirm: Callable[[Call], object] | None = None
        self.on_end: Callable[[Call], object] | None = None
        #: a re-INVITE we answered 2xx: called with the call and the request's body (the new
        #: offer, e.g. hold), after the answer (``local_body``) went out
        self.on_reinvite: Callable[[Call, bytes], object] | None = None
        self._cancel_wanted = False
        self._answer: Response | None = None  # UAS: the 2xx being retransmitted until ACK
        self._answer_at = 0.0
        self._timer: Any = None
        self._interval = 0.0
        self._ack: bytes | None = None         # UAC: the ACK, for retransmitted 2xx
        self._local_body: bytes = b""
        self._content_type: str | None = None
        self._remote_body = b""

    @property
    def call_id(self) -> str:
        return self.invite.call_id or ""

    @property
    def ended(self) -> bool:
        return self.state == TERMINATED

    @property
    def local_body(self) -> bytes:
        """Our SDP (or other body): the INVITE's (UAC), the 2xx's (UAS), or our answer to the
        last re-INVITE."""
        return self._local_body

    @property
    def remote_body(self) -> bytes:
        """The SDP (or other body) of the INVITE (UAS) or of the 2xx (UAC)."""
        if self.role == "uas":
            return bytes(self.invite.body)
        return self._remote_body

    # -- UAS ---------------------------------------------------------------------------------

    def ring(self, status: int = 180, *, headers: Iterable[tuple[str, str]] = (),
             body: bytes | None = None, content_type: str | None = None) -> Response:
        """Send a provisional response (180 Ringing by default) with our To tag."""
        txn = self._server_txn()
        if status < 101 or status > 199:
            raise ValueError("a provisional status is 101..199")
        resp = self.invite.reply(status, to_tag=self.local_tag, record_route=True,
                                 headers=[("Contact", self.ua.contact(self.transport)), *headers],
                                 body=body, content_type=content_type)
        if self.dialog is None:
            # The provisional response with our tag makes an early dialog (§12.1.1): a BYE in
            # it from the caller must find it (§15.1.2).
            self.dialog = Dialog.from_uas(self.invite, self.local_tag, state=EARLY)
            self.ua.dialogs[self.dialog.id] = self
        txn.respond(resp)
        if self.state == CALLING:
            self.state = PROCEEDING
        return resp

    def answer(self, body: bytes = b"", *, content_type: str | None = SDP,
               headers: Iterable[tuple[str, str]] = ()) -> Response:
        """Send the 2xx, make the dialog, and retransmit the 2xx until the ACK (§13.3.1.4)."""
        txn = self._server_txn()
        request = txn.request
        resp = request.reply(
            200, to_tag=self.local_tag, record_route=True,
            headers=[("Contact", self.ua.contact(self.transport)), ("Allow", ALLOW), *headers],
            body=body, content_type=content_type if body else None)
        ua = self.ua
        if self.dialog is None:
            self.dialog = Dialog.from_uas(request, self.local_tag)
            ua.dialogs[self.dialog.id] = self
        else:
            self.dialog.confirm()                    # the early dialog from ring()
        self._local_body = body
        self._content_type = content_type
        txn.respond(resp)
        self.status = 200
        self.answered = True
        self.state = ANSWERED
        self._answer = resp
        self._answer_at = ua.clock.time()
        self._interval = ua.config.t1
        self._timer = ua.clock.call_later(self._interval, self._retransmit_2xx)
        if self.on_answer is not None:
            self.on_answer(self)
        return resp

    def reject(self, status: int = 486, reason: str | None = None, *,
               headers: Iterable[tuple[str, str]] = ()) -> Response:
        """Refuse the INVITE with a final non-2xx response; the call ends."""
        txn = self._server_txn()
        if status < 300:
            raise ValueError("a rejection is 300..699")
        resp = self.invite.reply(status, reason, to_tag=self.local_tag, headers=list(headers))
        txn.respond(resp)
        self.status = status
        self._end("local" if status != 487 else "cancel")
        return resp

    def _server_txn(self) -> ServerTransaction:
        txn = self.txn
        if self.role != "uas" or not isinstance(txn, ServerTransaction):
            raise UAError("only the UAS side of a call sends responses")
        if txn.last_response is not None and txn.last_response.status_code >= 200:
            raise UAError(f"the INVITE already has a final response ({txn.last_response.status_code})")
        return txn

    def _retransmit_2xx(self) -> None:
        # §13.3.1.4: T1, doubling to T2, until the ACK; after 64*T1 the UAS gives up and ends
        # the dialog with a BYE.  One timer per call covers both.
        self._timer = None
        resp = self._answer
        if resp is None or self.txn is None:
            return
        ua = self.ua
        if ua.clock.time() - self._answer_at >= ua.config.timeout:
            log.warning("no ACK for the 2xx of call %s: ending it with BYE", self.call_id)
            self._answer = None
            self.error = "no ACK"
            self.bye()
            return
        ua.transport.send(bytes(resp), self.txn.dest)
        self._interval = min(self._interval * 2, ua.config.t2)
        self._timer = ua.clock.call_later(self._interval, self._retransmit_2xx)

    def _acked(self) -> None:
        if self._answer is None:
            return                                   # ACK retransmission, or re-INVITE's again
        self._answer = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.state == ANSWERED:
            self.state = CONFIRMED_CALL
            if self.on_confirm is not None:
                self.on_confirm(self)

    # -- UAC ---------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Abandon a call not yet answered (§9.1): the CANCEL goes once a provisional response
        has come (before that it waits for one); a 2xx that still arrives is ACKed and BYEd."""
        if self.role != "uac":
            raise UAError("only the UAC cancels a call")
        if self.state in (ANSWERED, CONFIRMED_CALL, TERMINATING, TERMINATED):
            raise UAError(f"cannot cancel a call in state {self.state}")
        if self._cancel_wanted:
            return
        self._cancel_wanted = True
        if self.state == PROCEEDING:
            self.ua._send_cancel(self)

    def bye(self) -> None:
        """End an answered call: BYE in the dialog; ``on_end`` follows its final response."""
        dialog = self.dialog
        if dialog is None or self.state not in (ANSWERED, CONFIRMED_CALL):
            raise UAError(f"cannot send BYE in state {self.state}")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._answer = None
        self.state = TERMINATING
        self.ua._send_in_dialog(self, "BYE", _ByeHandler(self))

    def _end(self, ended_by: str) -> None:
        if self.state == TERMINATED:
            return
        self.state = TERMINATED
        self.ended_by = ended_by
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._answer = None
        ua = self.ua
        if self.dialog is not None:
            self.dialog.terminate()
            if self.role == "uac" and self._ack is not None:
                # Keep the dialog findable for 64*T1 so a late 2xx retransmission is still
                # ACKed (§13.2.2.4), then forget it.
                ua.clock.call_later(ua.config.timeout, ua._forget, self.dialog.id)
            else:
                ua.dialogs.pop(self.dialog.id, None)
        if self.on_end is not None:
            self.on_end(self)

    # ClientHandler for the INVITE (UAC)

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        status = response.status_code
        ua = self.ua
        if status < 200:
            if self.state == CALLING:
                self.state = PROCEEDING
                if self._cancel_wanted:
                    ua._send_cancel(self)
            if self.on_progress is not None and status > 100:
                self.on_progress(self)
            return
        if status >= 300:
            self.status = status
            self._end("cancel" if status == 487 and self._cancel_wanted else "remote")
            return
        ua._uac_2xx(self, response)

    def on_timeout(self, txn: ClientTransaction) -> None:
        self.status = 408
        self.error = "timeout"
        self._end("timeout")

    def on_transport_error(self, txn: ClientTransaction) -> None:
        self.status = 503
        self.error = "transport error"
        self._end("error")

    def __repr__(self) -> str:
        return f"<Call {self.role} {self.call_id} {self.state}>"


class _ByeHandler:
    """The BYE's client transaction: the call ends with its final response (or lack of one)."""

    __slots__ = ("call",)

    def __init__(self, call: Call) -> None:
        self.call = call

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        if response.status_code >= 200:
            self.call.bye_status = response.status_code
            self.call._end("local")

    def on_timeout(self, txn: ClientTransaction) -> None:
        self.call.bye_status = 408
        self.call._end("local")

    def on_transport_error(self, txn: ClientTransaction) -> None:
        self.call.bye_status = 503
        self.call._end("local")


class _OneShot:
    """Client handler for a request whose only interest is its final outcome."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[OptionsResult], object] | None) -> None:
        self.callback = callback

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        if response.status_code >= 200 and self.callback is not None:
            self.callback(OptionsResult(response.status_code, response))

    def on_timeout(self, txn: ClientTransaction) -> None:
        if self.callback is not None:
            self.callback(OptionsResult(408, None))

    def on_transport_error(self, txn: ClientTransaction) -> None:
        if self.callback is not None:
            self.callback(OptionsResult(503, None))


class AutoAnswer:
    """The default UAS policy: ring (180), then answer with SDP after ``answer_after`` seconds
    (at once by default).  The answer is RFC 3264 offer/answer over the INVITE's offer (our
    media on ``media_address:media_port``; no RTP is sent), cached per distinct offer so a load
    of identical offers costs one negotiation.

    With ``media_for``, each call gets its own media address: ``media_for(call)`` (called once,
    when the INVITE arrives) returns the (address, port) of the call's RTP socket, kept by
    Call-ID in :attr:`media_of` until :meth:`forget`; such answers are not cached (each
    names its own port).  ``media_for`` may return None to use the shared address."""

    def __init__(self, media_address: str = "127.0.0.1", media_port: int = 6000, *,
                 answer_after: float = 0.0, cache_size: int = 256,
                 media_for: Callable[[Call], tuple[str, int] | None] | None = None) -> None:
        self.media_address = media_address
        self.media_port = media_port
        self.answer_after = answer_after
        self.media_for = media_for
        #: per-call media addresses given by ``media_for`` (by Call-ID)
        self.media_of: dict[str, tuple[str, int]] = {}
        self._cache: dict[bytes, bytes] = {}
        self._cache_size = cache_size

    def __call__(self, call: Call) -> None:
        if self.media_for is not None:
            media = self.media_for(call)
            if media is not None:
                self.media_of[call.call_id] = media
        call.ring()
        if self.answer_after > 0:
            call.ua.clock.call_later(self.answer_after, self._answer, call)
        else:
            self._answer(call)

    def _answer(self, call: Call) -> None:
        if call.state not in (CALLING, PROCEEDING):
            return                                   # cancelled while ringing
        call.answer(self.answer_sdp(call, bytes(call.invite.body)))

    def forget(self, call: Call) -> None:
        """Drop a call's media address (at its end)."""
        self.media_of.pop(call.call_id, None)

    def answer_sdp(self, call: Call, offer: bytes) -> bytes:
        """Our answer to ``offer`` in ``call``, on the call's own media address if it has one."""
        media = self.media_of.get(call.call_id)
        if media is None:
            return self.sdp_for(offer)
        return self._negotiate(offer, *media)

    def sdp_for(self, offer: bytes) -> bytes:
        """Our answer to ``offer`` (an offer of our own when the INVITE had none, §13.2.1)."""
        sdp = self._cache.get(offer)
        if sdp is None:
            sdp = self._negotiate(offer, self.media_address, self.media_port)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[offer] = sdp
        return sdp

    def _negotiate(self, offer: bytes, address: str, port: int) -> bytes:
        from fastsip.sdp import SdpError, SessionDescription, create_answer, create_offer

        if offer.strip():
            try:
                parsed = SessionDescription.parse(offer)
                return bytes(create_answer(parsed, address, port))
            except SdpError as exc:
                log.info("unusable SDP offer (%s): answering with an offer of our own", exc)
        return bytes(create_offer(address, port))


class UserAgent:
    """The UA core: a :class:`~fastsip.transaction.TransactionUser` that is both UAC and UAS.

    ``transport`` and ``clock`` are what the transaction layer uses (the UA core sends 2xx
    retransmissions and ACKs for 2xx itself, straight to the transport).  Give it a layer with
    :meth:`attach` (or let it make one: :meth:`create_layer`).  ``on_incoming(call)`` decides
    what to do with a new INVITE (ring, answer, reject); the default is :class:`AutoAnswer`.
    ``on_call_end`` (optional) sees every call that ends, either role.  ``answerer`` answers
    the SDP offers of re-INVITEs in any call (default: ``on_incoming`` when it is an
    :class:`AutoAnswer`; without one, the 2xx repeats our last SDP).
    """

    def __init__(self, transport: Transport | None = None, clock: Any = None, *,
                 on_incoming: Callable[[Call], object] | None = None,
                 on_call_end: Callable[[Call], object] | None = None,
                 answerer: AutoAnswer | None = None,
                 config: TimerConfig | None = None, user: str = "fastsip",
                 user_agent: str | None = "fastsip", from_host: str | None = None) -> None:
        self.transport: Transport = transport if transport is not None else _Unattached()
        self.clock: Any = clock if clock is not None else _Unattached()
        self.config = config or TimerConfig()
        self.on_incoming: Callable[[Call], object] = on_incoming or AutoAnswer()
        self.on_call_end = on_call_end
        self.answerer = answerer
        self.user = user
        self.user_agent = user_agent
        self.from_host = from_host
        self.layer: TransactionLayer | None = None
        self.dialogs: dict[DialogId, Call] = {}
        self._contacts: dict[str, str] = {}
        self._extra: list[tuple[str, str]] = [("User-Agent", user_agent)] if user_agent else []

    # -- wiring ------------------------------------------------------------------------------

    def attach(self, layer: TransactionLayer) -> None:
        """Use ``layer`` to send requests, and its transport and clock for what the UA core
        sends and times itself (the layer's TU must be this UA).  An I/O shell that builds the
        layer (``fastsip.asyncio.Endpoint``) calls this once it has started."""
        if layer.tu is not self:
            raise UAError("the transaction layer's TU is another object")
        self.layer = layer
        self.transport = layer.transport
        self.clock = layer.clock
        self.config = layer.config
        self._contacts.clear()

    def create_layer(self) -> TransactionLayer:
        """A transaction layer over our transport and clock, with this UA as its TU."""
        if isinstance(self.transport, _Unattached) or isinstance(self.clock, _Unattached):
            raise UAError("create_layer needs the transport and clock given to UserAgent()")
        layer = TransactionLayer(self.transport, self.clock, self, self.config)
        self.attach(layer)
        return layer

    def _layer(self) -> TransactionLayer:
        if self.layer is None:
            raise UAError("the UserAgent has no transaction layer yet (attach one)")
        return self.layer

    def contact(self, transport: str) -> str:
        """Our Contact for ``transport``: where in-dialog requests reach us (§8.1.1.8)."""
        c = self._contacts.get(transport)
        if c is None:
            host, port = self.transport.sent_by(transport)
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            params = "" if transport == "UDP" else f";transport={transport.lower()}"
            c = self._contacts[transport] = f"<sip:{self.user}@{host}:{port}{params}>"
        return c

    def _via(self, transport: str) -> str:
        host, port = self.transport.sent_by(transport)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"SIP/2.0/{transport} {host}:{port};branch={new_branch()};rport"

    def _forget(self, dialog_id: DialogId) -> None:
        call = self.dialogs.get(dialog_id)
        if call is not None and call.state == TERMINATED:
            del self.dialogs[dialog_id]

    # -- UAC ---------------------------------------------------------------------------------

    def invite(self, uri: str | URI, *, body: bytes = b"", content_type: str = SDP,
               from_uri: str | None = None, to_uri: str | None = None,
               headers: Iterable[tuple[str, str]] = (), transport: str = "UDP",
               proxy: str | URI | None = None) -> Call:
        """Place a call to ``uri`` (§13.2.1).  The INVITE goes to ``proxy`` when given (with a
        Route to it, loose routing) else to the URI's host.  Set callbacks on the returned call
        before the clock next runs: responses arrive only from the I/O shell."""
        layer = self._layer()
        target = uri if isinstance(uri, URI) else URI(uri)
        hop = target if proxy is None else (proxy if isinstance(proxy, URI) else URI(proxy))
        dest = uri_destination(hop, transport)
        host, _ = self.transport.sent_by(dest.transport)
        frm = from_uri or f"sip:{self.user}@{self.from_host or host}"
        hdrs: list[tuple[str, str]] = [("Via", self._via(dest.transport))]
        if proxy is not None:
            hdrs.append(("Route", f"<{hop};lr>" if not hop.lr else f"<{hop}>"))
        hdrs += [
            ("Max-Forwards", "70"),
            ("From", f"<{frm}>;tag={new_tag()}"),
            ("To", f"<{to_uri or target}>"),
            ("Call-ID", f"{os.urandom(10).hex()}@{host}"),
            ("CSeq", "1 INVITE"),
            ("Contact", self.contact(dest.transport)),
            ("Allow", ALLOW),
            *self._extra,
            *headers,
        ]
        request = Request.create("INVITE", str(target), hdrs, body,
                                 content_type=content_type if body else None)
        call = Call(self, "uac", request, dest.transport)
        call.dest = dest
        call._local_body = body
        call._content_type = content_type
        call.txn = layer.request(request, dest, call)
        return call

    def _uac_2xx(self, call: Call, response: Response) -> None:
        """A 2xx to our INVITE, first or retransmitted, from this or another fork (§13.2.2.4)."""
        to = response.to
        if to is None or not to.tag:
            log.warning("2xx without a To tag for call %s: ignored", call.call_id)
            return
        if call.dialog is not None and call.dialog.remote_tag != to.tag:
            # Another fork answered too: ACK it and end that dialog (we keep the first).
            self._ack_and_bye_fork(call, response)
            return
        if call.dialog is not None:
            if call._ack is not None and call.dest is not None:
                self.transport.send(call._ack, self._dialog_destination(call.dialog,
                                                                        call.transport))
            return
        try:
            dialog = Dialog.from_uac(call.invite, response)
        except DialogError as exc:
            log.warning("2xx for call %s makes no dialog: %s", call.call_id, exc)
            call.status = response.status_code
            call.error = str(exc)
            call._end("error")
            return
        call.dialog = dialog
        self.dialogs[dialog.id] = call
        call.status = response.status_code
        call.answered = True
        call._remote_body = bytes(response.body)
        call.state = ANSWERED
        ack = self._build_ack(call, dialog)
        call._ack = ack
        self.transport.send(ack, self._dialog_destination(dialog, call.transport))
        call.state = CONFIRMED_CALL
        if call._cancel_wanted:
            call.bye()                                # §9.1: the CANCEL lost the race
            return
        if call.on_answer is not None:
            call.on_answer(call)

    def _build_ack(self, call: Call, dialog: Dialog) -> bytes:
        # §13.2.2.4: an ACK in the dialog with the INVITE's CSeq number, a new branch, sent
        # straight to the transport (not a transaction).
        cseq = call.invite.cseq
        ack = dialog.create_request("ACK", [("Via", self._via(call.transport)), *self._extra],
                                    cseq=cseq.seq if cseq is not None else 1)
        return bytes(ack)

    def _ack_and_bye_fork(self, call: Call, response: Response) -> None:
        try:
            fork = Dialog.from_uac(call.invite, response)
        except DialogError:
            return
        ack = self._build_ack(call, fork)
        dest = self._dialog_destination(fork, call.transport)
        self.transport.send(ack, dest)
        bye = fork.create_request("BYE", [("Via", self._via(call.transport)), *self._extra])
        self._layer().request(bye, dest, _OneShot(None))

    def _dialog_destination(self, dialog: Dialog, transport: str) -> Address:
        return uri_destination(dialog.next_hop(), transport)

    def _send_in_dialog(self, call: Call, method: str, handler: Any,
                        body: bytes = b"", content_type: str | None = None,
                        headers: Iterable[tuple[str, str]] = ()) -> ClientTransaction:
        dialog = call.dialog
        assert dialog is not None
        request = dialog.create_request(
            method, [("Via", self._via(call.transport)), *self._extra, *headers], body,
            content_type=content_type if body else None)
        return self._layer().request(request, self._dialog_destination(dialog, call.transport),
                                     handler)

    def _send_cancel(self, call: Call) -> None:
        # §9.1: Request-URI, Call-ID, To, From, CSeq number and the single top Via (same
        # branch) as the INVITE; its Route too.  It goes where the INVITE went.
        cancel = hop_by_hop_request(call.invite, "CANCEL", headers=self._extra)
        assert call.dest is not None
        self._layer().request(cancel, call.dest, _OneShot(None))

    def options(self, uri: str | URI, callback: Callable[[OptionsResult], object] | None = None,
                *, transport: str = "UDP") -> ClientTransaction:
        """Send OPTIONS out of any dialog (§11.1); ``callback`` gets the outcome."""
        layer = self._layer()
        target = uri if isinstance(uri, URI) else URI(uri)
        dest = uri_destination(target, transport)
        host, _ = self.transport.sent_by(dest.transport)
        request = Request.create("OPTIONS", str(target), [
            ("Via", self._via(dest.transport)),
            ("Max-Forwards", "70"),
            ("From", f"<sip:{self.user}@{self.from_host or host}>;tag={new_tag()}"),
            ("To", f"<{target}>"),
            ("Call-ID", f"{os.urandom(10).hex()}@{host}"),
            ("CSeq", "1 OPTIONS"),
            ("Contact", self.contact(dest.transport)),
            ("Accept", SDP),
            *self._extra,
        ])
        return layer.request(request, dest, _OneShot(callback))

    def reinvite(self, call: Call, body: bytes | None = None, *,
                 callback: Callable[[OptionsResult], object] | None = None) -> ClientTransaction:
        """Send a re-INVITE in the call's dialog (§14.1) with ``body`` (default: our last SDP);
        its 2xx is ACKed like the first one.  ``callback`` gets the final outcome."""
        if call.dialog is None or call.state != CONFIRMED_CALL:
            raise UAError(f"cannot re-INVITE in state {call.state}")
        sdp = call._local_body if body is None else body
        return self._send_in_dialog(call, "INVITE", _ReinviteHandler(self, call, callback),
                                    sdp, call._content_type,
                                    [("Contact", self.contact(call.transport))])

    # -- TransactionUser ---------------------------------------------------------------------

    def on_request(self, txn: ServerTransaction, request: Request) -> None:
        method = request.method
        try:
            to = request.to
            to_tag = to.tag if to is not None else None
            require = request.headers.get("Require")
            if require and method != "CANCEL":
                # §8.2.2.3: we support no extensions.
                txn.reply(420, headers=[("Unsupported", require)])
                return
            if to_tag:
                self._in_dialog(txn, request, method, to_tag)
            elif method == "INVITE":
                self._new_invite(txn, request)
            elif method == "CANCEL":
                self._cancel(txn, request)
            elif method == "OPTIONS":
                self._options(txn, request)
            elif method == "BYE":
                txn.reply(481)
            else:
                self._unsupported(txn, method)
        except Exception:
            # §4 of DESIGN: a bug in handling one request costs that request a 500, not the UA.
            log.exception("error handling %s %s", method, request.call_id)
            if txn.state in ("trying", "proceeding"):
                txn.reply(500)

    def _unsupported(self, txn: ServerTransaction, method: str) -> None:
        if method in KNOWN_METHODS:
            txn.reply(405, headers=[("Allow", ALLOW)])
        else:
            txn.reply(501)

    def _options(self, txn: ServerTransaction, request: Request) -> None:
        # §11.2: what we would say to an INVITE now (200), and what we can do.
        txn.reply(200, headers=[("Allow", ALLOW), ("Accept", SDP), ("Accept-Encoding", "identity"),
                                ("Accept-Language", "en"), ("Supported", ""), *self._extra])

    def _new_invite(self, txn: ServerTransaction, request: Request) -> None:
        frm = request.from_
        if frm is None or not frm.tag or not request.contact or not request.call_id:
            txn.reply(400, "Missing From tag, Contact or Call-ID")
            return
        call = Call(self, "uas", request, txn.source.transport)
        call.local_tag = new_tag()
        call.txn = txn
        call.dest = txn.dest
        txn.data = call
        if self.on_call_end is not None:
            call.on_end = self.on_call_end
        self.on_incoming(call)

    def _cancel(self, txn: ServerTransaction, request: Request) -> None:
        invite_txn = self._layer().find_invite(request)
        call = invite_txn.data if invite_txn is not None else None
        if not isinstance(call, Call):
            txn.reply(481)
            return
        # §9.2: 200 to the CANCEL (same To tag as the INVITE's responses), then 487 to the
        # INVITE if it has no final response yet.
        txn.reply(200, to_tag=call.local_tag)
        if call.state in (CALLING, PROCEEDING) and invite_txn is not None \
                and (invite_txn.last_response is None or invite_txn.last_response.status_code < 200):
            call.reject(487)

    def _in_dialog(self, txn: ServerTransaction, request: Request, method: str,
                   to_tag: str) -> None:
        frm = request.from_
        call = self.dialogs.get((request.call_id or "", to_tag, frm.tag if frm is not None and
                                 frm.tag else ""))
        if call is None or call.dialog is None or call.state == TERMINATED:
            txn.reply(481)                           # §12.2.2
            return
        dialog = call.dialog
        if not dialog.accept_remote_cseq(request):
            txn.reply(500, "CSeq Out of Order")
            return
        if method == "BYE":
            txn.reply(200)
            if call.role == "uas" and isinstance(call.txn, ServerTransaction) and \
                    call.txn.state == "proceeding":
                call.reject(487)                     # BYE in an early dialog (§15.1.2)
            call._end("remote")
        elif method == "INVITE":
            self._reinvite(txn, request, call, dialog)
        elif method == "OPTIONS":
            self._options(txn, request)
        elif method == "CANCEL":
            txn.reply(481)
        else:
            self._unsupported(txn, method)

    def _reinvite(self, txn: ServerTransaction, request: Request, call: Call,
                  dialog: Dialog) -> None:
        if call._answer is not None or call.state not in (CONFIRMED_CALL, ANSWERED):
            # §14.2: a 2xx of ours still waits for its ACK (or the call is not up).
            txn.reply(500, headers=[("Retry-After", str(random.randint(0, 10)))])
            return
        dialog.refresh_target(request)
        body = call._local_body
        ctype = call._content_type
        offer = bytes(request.body)
        answerer = self.answerer if self.answerer is not None else \
            self.on_incoming if isinstance(self.on_incoming, AutoAnswer) else None
        if offer and answerer is not None:
            body, ctype = answerer.answer_sdp(call, offer), SDP
            call._local_body = body
        resp = request.reply(200, headers=[("Contact", self.contact(call.transport)),
                                           ("Allow", ALLOW)],
                             body=body, content_type=ctype if body else None)
        txn.respond(resp)
        if call.on_reinvite is not None:
            call.on_reinvite(call, offer)
        call._answer = resp
        call.txn = txn
        call._answer_at = self.clock.time()
        call._interval = self.config.t1
        call._timer = self.clock.call_later(call._interval, call._retransmit_2xx)

    def on_ack(self, request: Request, source: Address) -> None:
        to = request.to
        frm = request.from_
        if to is None or frm is None or not to.tag or not frm.tag:
            return
        call = self.dialogs.get((request.call_id or "", to.tag, frm.tag))
        if call is not None:
            call._acked()

    def on_stray_response(self, response: Response, source: Address) -> None:
        # A 2xx retransmission after the INVITE transaction ended: ACK it again (§13.2.2.4).
        status = response.status_code
        cseq = response.cseq
        if status < 200 or status >= 300 or cseq is None or cseq.method != "INVITE":
            return
        to = response.to
        frm = response.from_
        if to is None or frm is None or not to.tag or not frm.tag:
            return
        call = self.dialogs.get((response.call_id or "", frm.tag, to.tag))
        if call is not None and call.role == "uac" and call._ack is not None \
                and call.dialog is not None:
            self.transport.send(call._ack, self._dialog_destination(call.dialog, call.transport))

    def on_server_timeout(self, txn: ServerTransaction) -> None:
        # Timer H: our non-2xx final response was never ACKed; the call already ended.
        log.info("no ACK for the %s final response to %s %s",
                 txn.last_response.status_code if txn.last_response else "?", txn.method,
                 txn.request.call_id)

    # -- introspection -----------------------------------------------------------------------

    @property
    def active_calls(self) -> int:
        return sum(1 for c in self.dialogs.values() if c.state != TERMINATED)


class _Unattached:
    """Stands in for the transport and clock until :meth:`UserAgent.attach`."""

    def _fail(self, *args: Any) -> Any:
        raise UAError("the UserAgent is not attached to a transaction layer yet")

    send = sent_by = call_later = time = _fail


class _ReinviteHandler:
    """A re-INVITE's client transaction: ACK its 2xx (as for the first INVITE, §14.1)."""

    __slots__ = ("_ack", "call", "callback", "ua")

    def __init__(self, ua: UserAgent, call: Call,
                 callback: Callable[[OptionsResult], object] | None) -> None:
        self.ua = ua
        self.call = call
        self.callback = callback
        self._ack: bytes | None = None

    def on_response(self, txn: ClientTransaction, response: Response) -> None:
        status = response.status_code
        if status < 200:
            return
        call = self.call
        dialog = call.dialog
        if status < 300 and dialog is not None:
            if self._ack is None:
                dialog.refresh_target(response)
                cseq = response.cseq
                self._ack = bytes(dialog.create_request(
                    "ACK", [("Via", self.ua._via(call.transport)), *self.ua._extra],
                    cseq=cseq.seq if cseq is not None else dialog.local_cseq))
            # Every 2xx (retransmissions too) gets the ACK again; later strays via call._ack.
            self.ua.transport.send(self._ack, self.ua._dialog_destination(dialog, call.transport))
            call._ack = self._ack
        self._done(status, response)
        if status in (408, 481) and call.state == CONFIRMED_CALL:
            call.bye()                               # §14.1: the dialog is gone

    def _done(self, status: int, response: Response | None) -> None:
        if self.callback is not None:
            cb, self.callback = self.callback, None  # once, even if the 2xx is retransmitted
            cb(OptionsResult(status, response))

    def on_timeout(self, txn: ClientTransaction) -> None:
        self._done(408, None)

    def on_transport_error(self, txn: ClientTransaction) -> None:
        self._done(503, None)
