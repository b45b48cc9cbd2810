"""Dialogs (RFC 3261 §12): the state two UAs share after an INVITE succeeds, and the rules for
building requests inside it (§12.2.1.1, loose and strict routing).

Sans-IO and plain data: a :class:`Dialog` is made from the dialog-creating request and response,
updated by target refreshes, and asked for the next in-dialog request; the UA core sends it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable

from fastsip.errors import FastSIPError
from fastsip.sip import URI, NameAddr, Request, Response

__all__ = ["Dialog", "DialogError", "DialogId", "new_tag"]

log = logging.getLogger("fastsip.ua")

DialogId = tuple[str, str, str]
"""(Call-ID, local tag, remote tag): the dialog ID of §12."""

EARLY = "early"
CONFIRMED = "confirmed"
TERMINATED = "terminated"


class DialogError(FastSIPError, ValueError):
    """A message cannot make or belong to a dialog (no Contact, no tags ...)."""


def new_tag() -> str:
    """A fresh From/To tag: 64 random bits (§19.3 asks for at least 32)."""
    return os.urandom(8).hex()


def _uri_text(addr: NameAddr | None) -> str:
    if addr is None or addr.uri is None:
        raise DialogError("a From or To header without a URI")
    return str(addr.uri)


def _header_without_tag(addr: NameAddr | None) -> str:
    """A From/To value with its tag dropped, keeping the display name and other parameters:
    the dialog's local/remote URI as it goes back on the wire."""
    if addr is None or addr.uri is None:
        raise DialogError("a From or To header without a URI")
    name = f'"{addr.display_name}" ' if addr.display_name else ""
    params = "".join(f";{k}" if v is None else f";{k}={v}"
                     for k, v in addr.params.items() if k != "tag")
    return f"{name}<{addr.uri}>{params}"


def _split(header: str | NameAddr) -> tuple[str | None, NameAddr | None]:
    return (header, None) if isinstance(header, str) else (None, header)


def _checked(addr: NameAddr | None) -> NameAddr:
    if addr is None or addr.uri is None:
        raise DialogError("a From or To header without a URI")
    return addr


class Dialog:
    """One dialog (§12): its ID, the URIs of both ends, the remote target, the route set, both
    CSeq counters and whether it is secure (sips).

    ``route_set`` holds Route header values in the order they go on a request from us: the
    Record-Route of the dialog-creating message, reversed when we are the UAC (§12.1.2) and kept
    in order when we are the UAS (§12.1.1).
    """

    __slots__ = (
        "_local_addr",
        "_local_header",
        "_remote_addr",
        "_remote_header",
        "call_id",
        "is_uac",
        "local_cseq",
        "local_tag",
        "remote_cseq",
        "remote_tag",
        "remote_target",
        "route_set",
        "secure",
        "state",
    )

    def __init__(self, call_id: str, local_tag: str, remote_tag: str, *,
                 local_header: str | NameAddr, remote_header: str | NameAddr,
                 remote_target: URI, route_set: Iterable[str] = (),
                 local_cseq: int = 0, remote_cseq: int | None = None, secure: bool = False,
                 state: str = CONFIRMED, is_uac: bool = True) -> None:
        self.call_id = call_id
        self.local_tag = local_tag
        self.remote_tag = remote_tag
        # From/To values (without tag) for our requests.  Given as the parsed header, they are
        # rendered on first use: most UAS dialogs never send a request of their own.
        self._local_header, self._local_addr = _split(local_header)
        self._remote_header, self._remote_addr = _split(remote_header)
        self.remote_target = remote_target
        self.route_set = list(route_set)
        self.local_cseq = local_cseq
        self.remote_cseq = remote_cseq
        self.secure = secure
        self.state = state
        self.is_uac = is_uac

    @property
    def local_header(self) -> str:
        """Our From value (no tag) on requests in this dialog."""
        if self._local_header is None:
            self._local_header = _header_without_tag(self._local_addr)
        return self._local_header

    @property
    def remote_header(self) -> str:
        """The To value (no tag) on requests in this dialog."""
        if self._remote_header is None:
            self._remote_header = _header_without_tag(self._remote_addr)
        return self._remote_header

    @property
    def local_uri(self) -> str:
        return str(NameAddrText(self.local_header))

    @property
    def remote_uri(self) -> str:
        return str(NameAddrText(self.remote_header))

    @property
    def id(self) -> DialogId:
        return (self.call_id, self.local_tag, self.remote_tag)

    @property
    def early(self) -> bool:
        return self.state == EARLY

    @property
    def confirmed(self) -> bool:
        return self.state == CONFIRMED

    @property
    def terminated(self) -> bool:
        return self.state == TERMINATED

    # -- creation ----------------------------------------------------------------------------

    @classmethod
    def from_uac(cls, request: Request, response: Response) -> Dialog:
        """The UAC's dialog from its INVITE and a 101-299 response with a To tag (§12.1.2)."""
        to = response.to
        frm = request.from_
        if to is None or not to.tag or frm is None or not frm.tag:
            raise DialogError("a dialog needs tags on both From and To")
        contacts = response.contact
        if not contacts or contacts[0].uri is None:
            # §12.1.2 requires a Contact in 2xx; tolerate a 1xx without one (early dialog with
            # the Request-URI as target until the 2xx refreshes it).
            if 200 <= response.status_code < 300:
                raise DialogError("a 2xx to INVITE without a Contact")
            target = request.uri
        else:
            target = contacts[0].uri
        routes = [str(r) for r in reversed(response.record_route)]
        cseq = request.cseq
        return cls(
            request.call_id or "", frm.tag, to.tag,
            local_header=frm, remote_header=to,
            remote_target=target, route_set=routes,
            local_cseq=cseq.seq if cseq is not None else 1, remote_cseq=None,
            secure=request.uri.scheme == "sips",
            state=CONFIRMED if response.status_code >= 200 else EARLY, is_uac=True)

    @classmethod
    def from_uas(cls, request: Request, local_tag: str, *, state: str = CONFIRMED) -> Dialog:
        """The UAS's dialog from the INVITE it answers with To tag ``local_tag`` (§12.1.1)."""
        frm = request.from_
        contacts = request.contact
        if frm is None or not frm.tag:
            raise DialogError("a dialog-creating request without a From tag")
        if not contacts or contacts[0].uri is None:
            raise DialogError("a dialog-creating request without a Contact")
        cseq = request.cseq
        return cls(
            request.call_id or "", local_tag, frm.tag,
            local_header=_checked(request.to), remote_header=frm,
            remote_target=contacts[0].uri, route_set=[str(r) for r in request.record_route],
            local_cseq=0, remote_cseq=cseq.seq if cseq is not None else None,
            secure=request.uri.scheme == "sips" and bool(request.via)
            and request.via[-1].transport == "TLS",
            state=state, is_uac=False)

    # -- updates -----------------------------------------------------------------------------

    def confirm(self, response: Response | None = None) -> None:
        """An early dialog becomes confirmed by a 2xx (§12.1); the 2xx's Contact is the target."""
        self.state = CONFIRMED
        if response is not None:
            self.refresh_target(response)

    def terminate(self) -> None:
        self.state = TERMINATED

    def refresh_target(self, message: Request | Response) -> None:
        """A target refresh request or its 2xx replaces the remote target (§12.2)."""
        contacts = message.contact
        if contacts and contacts[0].uri is not None:
            self.remote_target = contacts[0].uri

    def accept_remote_cseq(self, request: Request) -> bool:
        """§12.2.2: a request whose CSeq is lower than the last one is out of order (the UAS
        answers 500); otherwise the remote CSeq advances.  ACK and CANCEL reuse their INVITE's
        number and never move it."""
        cseq = request.cseq
        if cseq is None:
            return False
        if request.method in ("ACK", "CANCEL"):
            return True
        if self.remote_cseq is not None and cseq.seq < self.remote_cseq:
            return False
        self.remote_cseq = cseq.seq
        return True

    # -- building requests (§12.2.1.1) -------------------------------------------------------

    def request_uri_and_routes(self) -> tuple[str, list[str]]:
        """The Request-URI and Route values for a request in this dialog: loose routing when the
        first route has ``lr`` (or there is none), strict routing otherwise (§12.2.1.1)."""
        if not self.route_set:
            return str(self.remote_target), []
        first = NameAddrText(self.route_set[0])
        if first.lr:
            return str(self.remote_target), list(self.route_set)
        # Strict router: it is the Request-URI; the remote target goes last in Route.
        return str(first), self.route_set[1:] + [f"<{self.remote_target}>"]

    def next_hop(self) -> URI:
        """The URI whose address the request goes to first (§8.1.2): the first route, or the
        remote target when the route set is empty."""
        if self.route_set:
            return URI(str(NameAddrText(self.route_set[0])))
        return self.remote_target

    def create_request(self, method: str, headers: Iterable[tuple[str, str]] = (),
                       body: bytes = b"", *, content_type: str | None = None,
                       cseq: int | None = None) -> Request:
        """A request within the dialog, without Via (the caller adds it with a fresh branch).

        The local CSeq goes up by one for every method but ACK and CANCEL, which pass the
        INVITE's number in ``cseq``."""
        if cseq is None:
            self.local_cseq += 1
            cseq = self.local_cseq
        uri, routes = self.request_uri_and_routes()
        hdrs: list[tuple[str, str]] = [("Route", r) for r in routes]
        hdrs += [
            ("Max-Forwards", "70"),
            ("From", f"{self.local_header};tag={self.local_tag}"),
            ("To", f"{self.remote_header};tag={self.remote_tag}"),
            ("Call-ID", self.call_id),
            ("CSeq", f"{cseq} {method}"),
        ]
        hdrs += headers
        return Request.create(method, uri, hdrs, body, content_type=content_type)

    def __repr__(self) -> str:
        return f"<Dialog {self.call_id} {self.local_tag}/{self.remote_tag} {self.state}>"


class NameAddrText:
    """The URI inside a name-addr text ("<sip:p1;lr>" or a bare addr-spec), without parsing a
    whole message: Route values are strings in a dialog's route set."""

    __slots__ = ("uri",)

    def __init__(self, text: str) -> None:
        text = text.strip()
        lt = text.find("<")
        if lt >= 0:
            gt = text.find(">", lt)
            self.uri = text[lt + 1:gt if gt > 0 else len(text)]
        else:
            # addr-spec: parameters after ';' belong to the header, not the URI (§20.10)
            self.uri = text.split(";", 1)[0]

    @property
    def lr(self) -> bool:
        return URI(self.uri).lr

    def __str__(self) -> str:
        return self.uri
