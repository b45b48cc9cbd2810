"""The proxy core (RFC 3261 §16): a stateful, forking proxy and a stateless one, sans-IO.

:class:`Proxy` is a :class:`~fastsip.transaction.TransactionUser`.  For each new request it
validates (§16.3), applies route information preprocessing (§16.4: strict-router compatibility,
popping our own Route) and then either loose-routes it on its own (an in-dialog request: it has a
To tag) or asks the *router* (an initial request).  The router decides through the
:class:`ResponseContext` it is given, now or later (an ``async`` handler)::

    class MyRouter:
        in_dialog = False                        # True: see in-dialog requests too
        def on_request(self, ctx: ResponseContext) -> None:
            ctx.forward([Target("sip:bob@192.0.2.7")])     # or ctx.respond(404)
        def on_failure(self, ctx: ResponseContext, best: Response) -> bool:
            return False                         # True: "I will forward or respond later"
        def on_response(self, ctx: ResponseContext, response: Response) -> None:
            pass                                 # sees each response from a branch

    proxy = Proxy(MyRouter())
    endpoint = Endpoint(proxy, listen=[...]); await endpoint.start()
    proxy.attach(endpoint.transactions)

(:mod:`fastsip.app` is the friendly layer over this: decorated functions and default routing.)

The response context (§16.7) forks in parallel and in series, forwards 1xx (not 100) and every
2xx at once, cancels the other branches after a 2xx or a 6xx, and otherwise sends the best final
response when every branch is done (6xx, else the lowest class, 503 becomes 500).  Timer C
(§16.8) guards each INVITE branch; a CANCEL from upstream (§16.10) gets its 200 here and cancels
every pending branch, whose 487 then goes back as the best response.  ACKs for 2xx and responses
that match no transaction are forwarded statelessly.

With ``stateless=True`` (§16.11) give messages to :meth:`Proxy.receive` instead of the
transaction layer (``transport.on_message = proxy.receive``): requests are forwarded to one
target with a branch derived from the upstream one (so retransmissions and the CANCEL follow the
same path), responses are routed back by their Via; nothing is kept.

Every message of a call runs through the classes above, so they are compiled
(:mod:`fastsip.proxy._core`: ``cdef`` classes with typed fields that call each other, the
transaction machines and the message core in C); this module is their public home, with the
protocols a router and a media hook implement.  The plain pieces both share (method sets, To
tags of local answers, the ranking of final responses) are in :mod:`fastsip.proxy.base`.
Being final ``cdef`` classes, they cannot be subclassed and take no attributes beyond their
own: a router keeps its per-request state in ``ctx.data``, and a proxy with other behaviour is
composed (a router, a media hook), not derived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from fastsip.proxy._core import Branch, Proxy, ResponseContext, StatelessContext, Target
from fastsip.proxy.base import (
    FINISHED,
    FORBIDDEN_NOT_ROUTED,
    MAGIC_COOKIE,
    NO_SECURE_HOP,
    RECORD_ROUTE_METHODS,
    UNREACHABLE,
)
from fastsip.sip import Request, Response
from fastsip.transport import Address

__all__ = [
    "FINISHED",
    "FORBIDDEN_NOT_ROUTED",
    "MAGIC_COOKIE",
    "NO_SECURE_HOP",
    "RECORD_ROUTE_METHODS",
    "UNREACHABLE",
    "Branch",
    "MediaHook",
    "Proxy",
    "ProxyContext",
    "RequestRouter",
    "ResponseContext",
    "StatelessContext",
    "Target",
]


class ProxyContext(Protocol):
    """What a router sees: the request and the two ways to decide.  Both
    :class:`ResponseContext` (stateful) and :class:`StatelessContext` implement it."""

    request: Request
    source: Address
    proxy: Proxy
    data: Any
    routed: bool

    @property
    def stateless(self) -> bool: ...
    @property
    def done(self) -> bool: ...
    def forward(self, targets: Iterable[Target], *, parallel: bool = True) -> None: ...
    def respond(
        self,
        status: int | Response,
        reason: str | None = None,
        *,
        headers: Iterable[tuple[str, str]] = (),
        stateless: bool | None = None,
    ) -> None: ...


class RequestRouter(Protocol):
    """The routing policy above the proxy core (see :mod:`fastsip.app` for the friendly one)."""

    @property
    def in_dialog(self) -> bool:
        """True: in-dialog requests (To tag present) reach :meth:`on_request` too; False: the
        core loose-routes them (DESIGN §4)."""

    def on_request(self, ctx: ProxyContext) -> None:
        """Decide for a new request: call ``ctx.forward(...)`` or ``ctx.respond(...)``, now or
        later.  An exception here becomes a 500."""

    def on_failure(self, ctx: ResponseContext, best: Response) -> bool:
        """Every branch failed (no 2xx, no 6xx, not cancelled); ``best`` is what would go back.
        Return True to take over (forward to new targets or respond, now or later), False to
        send ``best``."""

    def on_response(self, ctx: ResponseContext, response: Response) -> None:
        """A response from a branch (not 100), our Via already removed, before it is forwarded
        or kept for the best-response choice.  Called only when ``wants_responses`` is true.

        (Optional, found by name: ``on_final(ctx, response)`` hears the first final response
        that went upstream for a stateful context -- forwarded, best, or local -- for logs and
        accounting, without polling.)"""


class MediaHook(Protocol):
    """Media anchoring beside the routing (``Proxy.media``; ``fastsip serve --media``): it may
    rewrite the SDP of a request before the proxy forwards it and of a response before the
    proxy passes it on, and it must be told when a call ends.  Rewriting waits for a media
    relay, so each of the first two may *hold* the message (return True) and call ``resume()``
    when its body is ready (or answer the request itself through ``ctx``); the core does
    nothing more with a held message until then.  The core stays sans-IO: whatever waits runs
    in the hook's shell."""

    def on_forward(self, ctx: ResponseContext, resume: Callable[[], None]) -> bool:
        """``ctx.request`` is about to be forwarded (once per context).  True: held."""

    def on_response(self, ctx: ResponseContext, response: Response,
                    resume: Callable[[], None]) -> bool:
        """A 101-299 from a branch, our Via removed, before the proxy handles it.  True: held."""

    def on_final(self, ctx: ResponseContext, response: Response) -> None:
        """The first final response went upstream for ``ctx`` (a failure ends the call's
        media; a 2xx does not)."""

    def on_ack(self, request: Request, resume: Callable[[], None]) -> bool:
        """An ACK for a 2xx is about to be forwarded (it may carry the answer of a late
        offer).  True: held until ``resume()``."""
