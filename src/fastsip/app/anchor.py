"""Media anchoring for ``fastsip serve --media ng:HOST:PORT``: every call's RTP goes through a
media relay driven over rtpengine's ng protocol (``fastsip media``, or rtpengine itself).

:class:`MediaAnchor` is the proxy core's :class:`~fastsip.proxy.core.MediaHook`, doing what
Kamailio's ``rtpengine`` module does in a typical configuration:

- an INVITE or UPDATE with an SDP body, initial or in a dialog (a re-INVITE), is held while
  the relay answers an ``offer``; its body becomes the relay's SDP, then it is forwarded;
- a 1xx/2xx with SDP to such a request is held for the ``answer`` likewise;
- a BYE, and a final failure (>= 300, a CANCEL's 487 included) of an anchored INVITE,
  ``delete`` the call's media (nothing waits for those);
- the late offer: an INVITE without SDP is anchored when its 1xx/2xx brings the offer (the
  callee offers) and the ACK the answer;
- a re-offer in a call this process does not know (anchored by another node, or before a
  restart) is anchored if the call's relay has it (a ``query`` first);
- a routing handler may keep a call out of the relay: ``req.media = False`` (or ``True`` to
  insist when the default is off).

Several relays make a set: a call's relay is picked by a hash of its Call-ID (so every
worker and every node sends a call's commands to the same relay without sharing anything),
and a new call whose relay does not answer, or refuses (out of ports), is offered to the
next one, which then keeps it.  A call no relay takes gets a 503 "Media Relay Unavailable":
a call the operator wants anchored is not put through without its media.  Only the ng client waits (on the loop, as a task through ``spawn``); the core calls
these methods synchronously and resumes the held message when the task is done.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Protocol

from fastsip.errors import FastSIPError
from fastsip.proxy.core import ResponseContext
from fastsip.sip import Message, Response
from fastsip.sip import Request as SipRequest

__all__ = ["MediaAnchor", "NgCommander"]

log = logging.getLogger("fastsip.app.media")

_OFFER_METHODS = frozenset({"INVITE", "UPDATE"})
#: ``ctx.media`` of an INVITE sent on without SDP: its answers will carry the offer.
_LATE = "late"
#: rtpengine's options for a proxy in front of phones: the SDP's o= and c= name the relay
#: (replace-origin, replace-session-connection), as Kamailio's configurations ask.
_REPLACE = ["origin", "session-connection"]
#: Calls remembered as anchored (so an in-dialog request that carries no routing decision
#: follows its call's choice); the oldest are forgotten first past this many.
_MAX_CALLS = 100_000


class NgCommander(Protocol):
    """What sends ng commands: :class:`fastsip.asyncio.ngclient.NgClient`."""

    async def command(self, command: Mapping[str, Any]) -> dict[str, Any]: ...


_Spawn = Callable[[Coroutine[Any, Any, None]], object]


def _is_sdp(msg: Message) -> bool:
    if msg.content_length == 0:
        return False
    ctype = msg.content_type
    return ctype is not None and ctype.split(";", 1)[0].strip().lower() == "application/sdp"


def _tags(msg: Message) -> tuple[str | None, str | None]:
    frm, to = msg.from_, msg.to
    return (frm.tag if frm is not None else None, to.tag if to is not None else None)


class MediaAnchor:
    """The :class:`~fastsip.proxy.core.MediaHook` of ``serve --media`` (module docstring).

    - ``relays``: one sender of ng commands per relay (open
      :class:`~fastsip.asyncio.ngclient.NgClient` s): the relay set.
    - ``spawn``: runs a coroutine as a task (``loop.create_task``).
    - ``default``: anchor calls unless a handler says ``req.media = False`` (False: only
      those a handler marks ``req.media = True``).
    - ``flags``: extra ng flags for offers and answers (e.g. ``["trust-address"]``).
    """

    def __init__(self, relays: Sequence[NgCommander], spawn: _Spawn, *, default: bool = True,
                 flags: list[str] | None = None) -> None:
        if not relays:
            raise ValueError("MediaAnchor needs at least one relay")
        self.relays = list(relays)
        self.spawn = spawn
        self.default = default
        self.flags = list(flags or [])
        #: Anchored calls -> the index of their relay in ``relays``.
        self._calls: OrderedDict[str, int] = OrderedDict()
        self._tasks: set[object] = set()
        #: Calls whose offer came in a 1xx/2xx: the ACK brings the answer.
        self._awaiting_ack: set[str] = set()
        #: Counts, for logs and the summary: offers, answers, deletes, failures.
        self.counts = {"offer": 0, "answer": 0, "delete": 0, "failed": 0}

    @property
    def in_flight(self) -> list[object]:
        """The commands still waiting for their relay (tasks): a stopping server lets them
        finish, so a BYE's delete is not lost to the stop."""
        return list(self._tasks)

    # -- which calls -------------------------------------------------------------------------

    def _wanted(self, ctx: ResponseContext) -> bool:
        request = ctx.request
        call_id = request.call_id or ""
        choice = getattr(ctx.data, "media", None)
        if choice is None:
            if _tags(request)[1] is not None:            # in a dialog: as the call began
                return call_id in self._calls
            choice = self.default
        return bool(choice)

    def _relay_of(self, call_id: str) -> int:
        """The call's relay: the one that took it, else the one its Call-ID hashes to (the
        same in every worker and on every node)."""
        index = self._calls.get(call_id)
        if index is None:
            index = zlib.crc32(call_id.encode("utf-8", "surrogateescape")) % len(self.relays)
        return index

    def _remember(self, call_id: str, index: int) -> None:
        calls = self._calls
        calls[call_id] = index
        calls.move_to_end(call_id)
        while len(calls) > _MAX_CALLS:
            calls.popitem(last=False)

    # -- MediaHook ---------------------------------------------------------------------------

    def on_forward(self, ctx: ResponseContext, resume: Callable[[], None]) -> bool:
        request = ctx.request
        method = request.method
        call_id = request.call_id or ""
        if method == "BYE":
            # Also for a call this process never saw (another node's, or ours before a
            # restart): its relay is the one its Call-ID names, and a delete for a call a
            # relay does not have is harmless.
            index = self._calls.pop(call_id, None)
            self._send_delete(request, self._relay_of(call_id) if index is None else index)
            return False
        if method == "INVITE" and request.content_length == 0 and _tags(request)[1] is None \
                and self._wanted(ctx):
            ctx.media = _LATE             # the offer will come in an answer (late offer)
            return False
        if method not in _OFFER_METHODS or not _is_sdp(request):
            ctx.media = False
            return False
        if _tags(request)[1] is not None and call_id not in self._calls \
                and getattr(ctx.data, "media", None) is None:
            # A re-offer in a call we do not know: anchored by another node, or by us before
            # a restart?  Its relay knows.
            self._start(self._adopt(ctx, resume))
            return True
        if not self._wanted(ctx):
            ctx.media = False
            return False
        self._start(self._offer(ctx, resume))
        return True

    def on_response(self, ctx: ResponseContext, response: Response,
                    resume: Callable[[], None]) -> bool:
        if not _is_sdp(response) or ctx.request.method not in _OFFER_METHODS:
            return False
        if ctx.media is True:
            self._start(self._answer(ctx, response, resume))
            return True
        if ctx.media == _LATE:
            self._start(self._late_offer(ctx, response, resume))
            return True
        return False

    def on_ack(self, request: SipRequest, resume: Callable[[], None]) -> bool:
        call_id = request.call_id or ""
        if call_id not in self._awaiting_ack or not _is_sdp(request):
            return False
        self._awaiting_ack.discard(call_id)
        self._start(self._late_answer(request, resume))
        return True

    def on_final(self, ctx: ResponseContext, response: Response) -> None:
        if ctx.media not in (True, _LATE) or response.status_code < 300:
            return
        request = ctx.request
        if request.method == "INVITE" and _tags(request)[1] is None:
            # The call failed (or was cancelled): its media goes.  (A failed re-INVITE leaves
            # the call, and its media, as they were: RFC 3261 §14.1.)
            index = self._calls.pop(request.call_id or "", None)
            if index is not None:
                self._send_delete(request, index)

    # -- ng ----------------------------------------------------------------------------------

    def _base(self, msg: Message, command: str) -> dict[str, Any]:
        from_tag, to_tag = _tags(msg)
        out: dict[str, Any] = {"command": command, "call-id": msg.call_id or "",
                               "from-tag": from_tag or ""}
        if to_tag is not None:
            out["to-tag"] = to_tag
        return out

    def _media_options(self, out: dict[str, Any], msg: Message, source_host: str | None
                       ) -> dict[str, Any]:
        out["sdp"] = bytes(msg.body)
        out["replace"] = list(_REPLACE)
        if self.flags:
            out["flags"] = list(self.flags)
        if source_host is not None:
            # Where the signalling came from: a relay that does not trust SDP addresses (the
            # default of rtpengine's) sends there until latching learns the media's source.
            out["received-from"] = ["IP6" if ":" in source_host else "IP4", source_host]
        return out

    async def _place_offer(self, call_id: str, command: dict[str, Any]) -> bytes | None:
        """Send an offer to the call's relay (a new call may go on to the next, which then
        keeps it); the relay's SDP, or None when no relay took it."""
        first = self._relay_of(call_id)
        tries = 1 if call_id in self._calls else len(self.relays)
        for step in range(tries):
            index = (first + step) % len(self.relays)
            try:
                sdp = _sdp_of(await self.relays[index].command(command))
            except FastSIPError as exc:
                self.counts["failed"] += 1
                log.warning("media relay %d: offer for call %s failed: %s", index + 1,
                            call_id, exc)
                continue
            self.counts["offer"] += 1
            self._remember(call_id, index)
            return sdp
        return None

    async def _offer(self, ctx: ResponseContext, resume: Callable[[], None]) -> None:
        request = ctx.request
        call_id = request.call_id or ""
        command = self._media_options(self._base(request, "offer"), request, ctx.source.host)
        sdp = await self._place_offer(call_id, command)
        if sdp is not None:
            request.set_body(sdp)
            resume()
            return
        log.warning("media relay: no relay took call %s: 503", call_id)
        self._calls.pop(call_id, None)
        ctx.media = False
        if not ctx.final_sent:
            ctx.respond(503, "Media Relay Unavailable")

    async def _late_offer(self, ctx: ResponseContext, response: Response,
                          resume: Callable[[], None]) -> None:
        # The callee offers: in ng terms the offer is *from* its tag (the response's To tag)
        # to the caller's.
        call_id = response.call_id or ""
        from_tag, to_tag = _tags(response)
        command: dict[str, Any] = {"command": "offer", "call-id": call_id,
                                   "from-tag": to_tag or "", "to-tag": from_tag or ""}
        sdp = await self._place_offer(call_id, self._media_options(command, response, None))
        if sdp is not None:
            if response.status_code >= 200:
                self._awaiting_ack.add(call_id)
            response.set_body(sdp)
        # (No relay took it: the callee's offer goes on unchanged, the call unanchored; the
        # 2xx cannot be refused any more.)
        resume()

    async def _late_answer(self, request: SipRequest, resume: Callable[[], None]) -> None:
        call_id = request.call_id or ""
        from_tag, to_tag = _tags(request)
        command: dict[str, Any] = {"command": "answer", "call-id": call_id,
                                   "from-tag": to_tag or "", "to-tag": from_tag or ""}
        self._media_options(command, request, None)
        try:
            request.set_body(_sdp_of(await self.relays[self._relay_of(call_id)].command(command)))
            self.counts["answer"] += 1
        except FastSIPError as exc:
            self.counts["failed"] += 1
            log.warning("media relay: late answer for call %s failed: %s: passed on unchanged",
                        call_id, exc)
        resume()

    async def _adopt(self, ctx: ResponseContext, resume: Callable[[], None]) -> None:
        request = ctx.request
        call_id = request.call_id or ""
        index = self._relay_of(call_id)
        try:
            known = (await self.relays[index].command(
                {"command": "query", "call-id": call_id})).get("result") == "ok"
        except FastSIPError:
            known = False
        if not known:
            ctx.media = False            # not an anchored call: its media goes end to end
            resume()
            return
        self._remember(call_id, index)
        await self._offer(ctx, resume)

    async def _answer(self, ctx: ResponseContext, response: Response,
                      resume: Callable[[], None]) -> None:
        command = self._media_options(self._base(response, "answer"), response, None)
        try:
            reply = await self.relays[self._relay_of(response.call_id or "")].command(command)
            response.set_body(_sdp_of(reply))
            self.counts["answer"] += 1
        except FastSIPError as exc:
            # The answer is on its way to the caller already in the callee's mind: passing it
            # on unanchored beats losing it (the call may lack media; the log says why).
            self.counts["failed"] += 1
            log.warning("media relay: answer for call %s failed: %s: passed on unchanged",
                        response.call_id, exc)
        resume()

    def _send_delete(self, msg: Message, index: int) -> None:
        self._start(self._delete(self._base(msg, "delete"), index))

    async def _delete(self, command: dict[str, Any], index: int) -> None:
        try:
            await self.relays[index].command(command)
            self.counts["delete"] += 1
        except FastSIPError as exc:
            # The relay's own timeout frees it anyway.
            log.info("media relay: delete for call %s: %s", command.get("call-id"), exc)

    def _start(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.spawn(coro)
        if task is not None:
            self._tasks.add(task)
            done = getattr(task, "add_done_callback", None)
            if done is not None:
                done(self._tasks.discard)


def _sdp_of(reply: dict[str, Any]) -> bytes:
    sdp = reply.get("sdp")
    if isinstance(sdp, str):
        return sdp.encode()
    if isinstance(sdp, bytes):
        return sdp
    raise _NoSdp(f"the relay's reply has no SDP: {sorted(reply)}")


class _NoSdp(FastSIPError):
    pass

