"""The routing API: :class:`Request` (what a handler gets), decisions, and :class:`Router`, which
runs the user's :class:`~fastsip.app.routes.Routes` on top of :class:`fastsip.proxy.Proxy`.

Sync handlers run inline (no coroutine is created).  Async handlers run as tasks through the
``spawn`` callable the I/O shell gives (``loop.create_task``), so this package stays free of
asyncio; at most ``max_concurrency`` run at once and at most ``max_per_source`` for one source
host, beyond which a request is answered ``503`` with ``Retry-After`` at once (never queued).  A
handler that raises gets the request a ``500`` and a ``log.exception`` line on
``fastsip.app``; the server keeps serving.

The location store is asynchronous (it may be a file or a database on the network), but a plain
``def`` handler never awaits it: ``req.relay()`` for one of our users and ``req.register()``
return decisions that the Router completes after the handler returns -- in place when the store
answers from memory, else as a task under the same bounds.

Default routing (no handler, or a handler that returns None), for the domains we serve
(``domains``; none given: any host naming this proxy):

- REGISTER for our domain: digest-authenticated when an authenticator is set (401), then the
  registrar.  For another domain: 403.
- Initial requests whose From is one of our domains: authenticated when an authenticator is
  set (407) -- our users must prove who they are before we route for them.
- OPTIONS to us (no user part): 200 with Allow (statelessly: keep-alives keep no state).
- A Request-URI in our domain: the registered contacts, forked in parallel (or in q order with
  ``serial_by_q``); none: 404.
- Another domain, or a preloaded Route: relayed -- subject to the relay policy below.

The relay policy (Kamailio's default configuration is the model) holds for every decision,
the user's handlers' included: an initial request from a source that is neither trusted
(:attr:`Request.trusted`) nor authenticated (:attr:`Request.authenticated`) may only reach our
users' registered contacts (or be answered).  Forwarding it anywhere else -- a foreign
Request-URI, a preloaded Route that does not name us, a gateway a handler chose -- gets a 407
challenge when an authenticator is set and 403 "Relaying Forbidden" otherwise.  A handler that
knows better sets ``req.trusted = True`` before deciding.  (``open_relay`` turns it off.)
Repeated failed logins are counted by a :class:`~fastsip.proxy.edge.SourceGuard`: a user who
keeps failing from one source gets 403 from there, and the source is banned.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from fastsip.app._router import Decision, Request, Router
from fastsip.app.numbers import normalize_e164
from fastsip.proxy.core import Target
from fastsip.sip import URI, Response
from fastsip.sip import Request as SipRequest
from fastsip.transport import Address

# The classes are compiled (fastsip.app._router: they run for every initial request); this
# module is their documented home, and holds the shapes a Router expects of what it is given.

__all__ = ["Decision", "Request", "Router", "normalize_e164"]

TargetLike = str | URI | Target | Any  # Any: a location Binding
#: What a Router's ``spawn`` is: ``loop.create_task`` (the stub types it with this).
_Spawn = Callable[[Coroutine[Any, Any, None]], object]


class Authenticator(Protocol):
    """:class:`fastsip.proxy.auth.DigestAuthenticator`'s shape, as the router uses it."""

    def challenge(self, request: SipRequest, now: float, *, proxy: bool = False,
                  stale: bool = False) -> Response: ...
    def authenticate(self, request: SipRequest, now: float, *, proxy: bool = False) -> Any: ...


class Registrar(Protocol):
    """:class:`fastsip.proxy.Registrar`'s shape, as the router uses it."""

    @property
    def immediate(self) -> bool: ...
    @property
    def store(self) -> Any: ...
    async def handle(self, request: SipRequest, source: Address, now: float, *,
                     user: str | None = None, addressed_to_us: bool = False) -> Response: ...
    async def lookup(self, uri: URI | str, now: float) -> list[Any]: ...
