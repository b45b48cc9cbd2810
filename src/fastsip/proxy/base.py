"""What the proxy core's Python and its compiled response context share, in plain Python: the
method sets, the reason phrases, the To tags and branches of local and stateless answers, the
ranking of final responses (§16.7 step 6) and the errors of a target that cannot be reached.

The response context and its branches are compiled (:mod:`fastsip.proxy._context`); the rest
of the proxy is :mod:`fastsip.proxy.core`, which documents both.  These pieces live here so the
compiled module imports them without importing the proxy core (a cycle).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from fastsip.proxy.auth import parse_auth_params
from fastsip.sip import Request, Response
from fastsip.transaction.base import MAGIC_COOKIE
from fastsip.transport.rules import is_local_tag, local_tag, next_hop, strip_brackets

if TYPE_CHECKING:
    from fastsip.proxy.core import Proxy
    from fastsip.transport import Address

__all__ = [
    "FINISHED",
    "FORBIDDEN_NOT_ROUTED",
    "MAGIC_COOKIE",
    "NO_SECURE_HOP",
    "RECORD_ROUTE_METHODS",
    "TARGET_METHODS",
    "UNREACHABLE",
    "BadTarget",
    "NoSecureHop",
    "auth_realm",
    "bad_request",
    "canonical_host",
    "is_ours",
    "keep_scheme",
    "new_tag",
    "phrase",
    "rank",
    "stateless_branch",
    "stateless_tag",
    "with_to_tag",
]

#: Methods whose forwarded initial request carries our Record-Route: the ones that create a
#: dialog (RFC 3261 INVITE, RFC 6665 SUBSCRIBE/NOTIFY, RFC 3515 REFER).  Others gain nothing.
RECORD_ROUTE_METHODS = frozenset({"INVITE", "SUBSCRIBE", "NOTIFY", "REFER"})
#: Requests whose Contact sets (or refreshes) a dialog's remote target (RFC 3261 §12.2, RFC
#: 3311, RFC 6665): a Contact behind NAT in them, or in their 1xx/2xx, gets an alias.
TARGET_METHODS = frozenset({"INVITE", "SUBSCRIBE", "NOTIFY", "REFER", "UPDATE"})
#: §16.7 step 6: within a class, prefer responses that let the UAC retry with more information.
_PREFERRED = frozenset({401, 407, 415, 420, 484})
#: ``ServerTransaction.data`` once its response context is settled (a late CANCEL gets 200).
FINISHED = "finished"
#: The reason phrase of the 503 for a branch whose next hop could not be reached or resolved.
UNREACHABLE = "Service Unavailable (next hop unreachable)"
#: The reason phrase for an in-dialog request that did not come through us.
FORBIDDEN_NOT_ROUTED = "Forbidden (not routed through this proxy)"
#: A sips request whose target has a sip: URI or can only be reached by a hop that is not TLS
#: (RFC 5630 §5.3: 480 with Warning 380 "SIPS Not Allowed").
NO_SECURE_HOP = "Temporarily Unavailable (no TLS path to the sips target)"


def phrase(status_text: str, detail: str | None) -> str:
    """A reason phrase with a detail in parentheses (printable ASCII, bounded)."""
    if not detail:
        return status_text
    text = "".join(c if " " <= c <= "~" else "?" for c in detail)[:120]
    return f"{status_text} ({text})"


def bad_request(exc: Exception) -> str:
    """A 400's reason phrase naming the problem (printable ASCII, bounded)."""
    reason = getattr(exc, "reason", None) or str(exc)
    text = "".join(c if " " <= c <= "~" else "?" for c in reason)[:100]
    return f"Bad Request ({text})"


@lru_cache(maxsize=4096)
def canonical_host(host: str) -> str:
    """A host as compared for "is this us": an IP literal in its one canonical text (IPv6
    compressed, lower case, brackets off), a name lower-cased."""
    text = strip_brackets(host)
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text.lower()


def stateless_branch(request: Request) -> str:
    """§16.11: the branch a stateless proxy puts in its Via is a function of the received
    request's own transaction id, so a retransmission, the ACK for a non-2xx and the CANCEL
    (same upstream branch, method left out) all go out with the same branch.  The message core
    computes it from its index (:meth:`Request.stateless_branch`): ``z9hG4bKsl`` and 80 bits
    of BLAKE2b over the top Via's branch and sent-by, or over §17.2.3's fields for an RFC 2543
    peer, the same in every process."""
    return request.stateless_branch()


def new_tag() -> str:
    """The To tag of a response we make statefully: fresh, and recognisably ours."""
    return local_tag()


def stateless_tag(request: Request) -> str:
    """The To tag of a stateless local answer: a function of the request's transaction id,
    so a retransmitted request gets the very same response (§16.11)."""
    return local_tag(stateless_branch(request)[-8:])


def is_ours(response: Response) -> bool:
    """Did we make ``response`` (its To tag is one of ours)?"""
    to = response.to
    return to is not None and is_local_tag(to.tag)


def auth_realm(value: str) -> str | None:
    """The realm of a credentials header value (None when it has none or does not parse)."""
    try:
        return parse_auth_params(value)[1].get("realm")
    except ValueError:
        return None


def with_to_tag(response: Response, tag: Callable[[], str]) -> Response:
    """§8.2.6.2: a response we make (registrar, challenge) carries a To tag, 100 excepted."""
    if response.status_code > 100:
        to = response.to
        if to is not None and to.tag is None:
            value = response.headers.get("To")
            if value is not None:
                response.set_header("To", f"{value};tag={tag()}")
    return response


def rank(status: int) -> tuple[int, int]:
    """§16.7 step 6's order of final responses, lowest best: a 6xx, else the lowest class,
    and within a class the ones that let the UAC retry with more information."""
    return (0 if status >= 600 else status // 100, 0 if status in _PREFERRED else 1)


class BadTarget(ValueError):
    """A target the request cannot be sent to; the branch fails with ``status``."""

    status = 400
    reason: str | None = None

    def headers(self, proxy: Proxy, source: Address) -> list[tuple[str, str]]:
        return []


class NoSecureHop(BadTarget):
    """RFC 3261 §26.2.2, RFC 5630 §5.3: a sips request goes over TLS on every hop, the last
    one included, and only to a sips: target; otherwise that target is unavailable: 480 with
    Warning 380 (SIPS Not Allowed), not our error."""

    status = 480
    reason = NO_SECURE_HOP

    def headers(self, proxy: Proxy, source: Address) -> list[tuple[str, str]]:
        host, port = proxy.sent_by(source.transport)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return [("Warning", f'380 {host}:{port} "SIPS Not Allowed"')]


def keep_scheme(request: Request, was_sips: bool) -> Address:
    """RFC 5630 §5.3: a proxy never retargets across schemes.  A sips request for a sip:
    target (a contact registered with a sip: URI) is refused; a sip request for a sips:
    target goes there with a sip: Request-URI over TLS.  Returns where the sips: URI led."""
    if was_sips:
        raise NoSecureHop(f"sips request for the sip: target {request.uri}")
    try:
        hop = next_hop(request.uri)
    except ValueError as exc:
        raise BadTarget(str(exc)) from None
    request.uri = "sip:" + str(request.uri)[5:]
    return hop
