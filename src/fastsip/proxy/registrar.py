"""The registrar (RFC 3261 §10.3, Path per RFC 3327): REGISTER in, a final response out.

Sans-IO: :meth:`Registrar.handle` takes the parsed request, the transport address it came from
and the current time, updates a :class:`~fastsip.proxy.location.LocationStore` and returns the
response to send.  It is a coroutine because the store's operations are: a store on a disk or a
network is awaited, and the 200 goes out only once the binding is durable there.  Over a store
whose operations never wait (``immediate_reads`` and ``immediate_writes``, the in-memory one),
:func:`~fastsip.proxy.location.run_immediately` runs it in place, with no event loop.  Authentication is the caller's job (:mod:`fastsip.proxy.auth`) and happens
before ``handle``; the authenticated user name can be passed in so the registrar refuses to bind
an AOR that belongs to someone else (§10.3 step 3).

``now`` is absolute seconds in the caller's clock and should be wall-clock time (``time.time()``):
expiries are stored as absolute times, and the 200's Date header is rendered from ``now``.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from email.utils import formatdate
from typing import TypeVar

from fastsip.errors import ParseError
from fastsip.proxy.location import (
    Binding,
    LocationStore,
    MemoryLocationStore,
    aor_of,
    contact_key,
    lookup_order,
)
from fastsip.proxy.nat import request_behind_nat
from fastsip.sip import URI, Request, Response
from fastsip.transport import DEFAULT_PORTS, Address
from fastsip.transport.rules import next_hop

__all__ = ["Registrar"]

logger = logging.getLogger("fastsip.proxy")

_T = TypeVar("_T")

#: Option tags this registrar understands in Require / Proxy-Require (§8.2.2.3).
SUPPORTED = frozenset({"path", "outbound"})

# §10.3 step 6: a registrar may only reject an interval below its minimum with 423 when the
# interval is also under an hour; a longer one below the minimum is raised to the minimum.
_ONE_HOUR = 3600


class _Reject(Exception):
    """Internal: the request fails with this response (status, reason, extra headers)."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(reason)
        self.status = status
        # Parts of it come off the wire: printable ASCII, and short enough for a status line.
        reason = "".join(c if " " <= c <= "~" else "?" for c in reason)
        self.reason = reason if len(reason) <= 120 else reason[:116] + "...)"
        self.headers = headers or []


@dataclass(slots=True)
class _ContactUpdate:
    contact: str
    key: str
    expires: int
    q: float
    instance: str | None
    reg_id: int | None = None


def _tokens(values: Iterable[str]) -> list[str]:
    return [t.strip().lower() for v in values for t in v.split(",") if t.strip()]


def _parse_expires(text: str) -> int:
    text = text.strip()
    if not text.isdigit():
        raise _Reject(400, f"Bad Request (invalid Expires value {text!r})")
    return int(text)


def _unroutable(uri: URI) -> str:
    """Why the proxy could never reach a contact URI ("" when it can): only sip/sips, a
    transport we have, a port that can be one, and a host that can be an address."""
    if not uri.is_sip:
        return f"URI scheme {uri.scheme!r} cannot be reached (sip or sips only)"
    try:
        hop = next_hop(uri)
    except ValueError as exc:
        return f"cannot be reached: {exc}"
    if hop.transport not in DEFAULT_PORTS:
        return f"transport {uri.transport!r} is not supported"
    if uri.port == 0:
        return "port 0 cannot be reached"
    host = hop.host
    if not host:
        return "has no host"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        labels = host.rstrip(".").split(".")
        if len(host) > 253 or any(not 0 < len(label) <= 63 or not _LABEL.fullmatch(label)
                                  for label in labels):
            return f"host {host!r} is not a valid name"
    return ""


_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?")


class Registrar:
    """A registrar over a location store.

    ``domains``: the domains this registrar is responsible for (host parts, case-insensitive);
    empty accepts any.  ``min_expires`` / ``max_expires`` / ``default_expires``: §10.3 step 6, in
    seconds.  Bindings are keyed by :func:`~fastsip.proxy.location.aor_of` of the To URI.
    """

    def __init__(
        self,
        store: LocationStore,
        *,
        domains: Iterable[str] = (),
        min_expires: int = 60,
        max_expires: int = 7200,
        default_expires: int = 3600,
        flow_timer: int | None = None,
    ) -> None:
        if not 0 <= min_expires <= max_expires:
            raise ValueError("need 0 <= min_expires <= max_expires")
        self.store = store
        self.domains = frozenset(d.lower() for d in domains)
        self.min_expires = min_expires
        self.max_expires = max_expires
        self.default_expires = min(max(default_expires, min_expires), max_expires)
        #: RFC 5626 Flow-Timer for outbound registrations: how often (seconds) the client
        #: should send its keep-alives (None: not said).
        self.flow_timer = flow_timer

    def is_ours(self, uri: URI) -> bool:
        """Whether ``uri``'s host is a domain this registrar is responsible for (always true
        when no domains were configured).  A proxy can use it to decide between a location
        lookup and forwarding (§10.3 step 1, §16.5)."""
        return not self.domains or uri.host.lower() in self.domains

    @property
    def immediate(self) -> bool:
        """Whether :meth:`handle` and :meth:`lookup` never wait (the store answers from memory
        and writes to it), so a caller may run them with
        :func:`~fastsip.proxy.location.run_immediately` instead of a task."""
        store = self.store
        return store.immediate_reads and store.immediate_writes

    async def lookup(self, uri: URI | str, now: float) -> list[Binding]:
        """The current bindings of the AOR ``uri`` names (q descending, newest first)."""
        return await self.store.lookup(aor_of(uri), now)

    def lookup_now(self, uri: URI | str, now: float) -> list[Binding] | None:
        """:meth:`lookup` in place, when the store is the in-memory one (its lookup is a dict
        read: no coroutine, for the lookup on every INVITE); None for any other store (one
        whose ``lookup`` is its own), which is awaited instead."""
        store = self.memory_store
        if store is None:
            return None
        return store.lookup_now(aor_of(uri), now)

    @property
    def store(self) -> LocationStore:
        """Where the bindings are kept."""
        return self._location_store

    @store.setter
    def store(self, store: LocationStore) -> None:
        self._location_store = store
        #: The store when it is the in-memory one, whose lookup is a dict read (the router
        #: reads it in place on every INVITE: :meth:`lookup_now`); None for any other store
        #: (one whose ``lookup`` is its own).
        self.memory_store: MemoryLocationStore | None = (
            store if isinstance(store, MemoryLocationStore)
            and type(store).lookup is MemoryLocationStore.lookup else None)

    async def handle(
        self, request: Request, source: Address, now: float, *, user: str | None = None,
        addressed_to_us: bool = False,
    ) -> Response:
        """Process one REGISTER (§10.3 steps 1-8) and return the final response to send.

        ``source`` is where the request came from: it is stored with each binding so a proxy can
        reach a contact behind a NAT.  ``user``, when given, is the name the request was
        authenticated as; the registrar then accepts only the AOR whose user part it is (403
        otherwise).  ``addressed_to_us``: the Request-URI names this server by its address
        (``REGISTER sip:192.0.2.10``, a phone's usual registrar setting) rather than a domain;
        the domain is then the To header's, which must still be ours.
        """
        try:
            return await self._handle(request, source, now, user, addressed_to_us)
        except _Reject as reject:
            logger.info(
                "REGISTER %s from %s rejected: %d %s",
                request.headers.get("To", "?"),
                source,
                reject.status,
                reject.reason,
            )
            return request.reply(reject.status, reject.reason, headers=reject.headers)

    async def _handle(self, request: Request, source: Address, now: float, user: str | None,
                      addressed_to_us: bool = False) -> Response:
        if request.method != "REGISTER":
            raise _Reject(405, "Method Not Allowed", [("Allow", "REGISTER")])
        # Step 1: the Request-URI names the domain whose location service is being changed.
        ruri = request.uri
        if not ruri.is_sip:
            raise _Reject(416, "Unsupported URI Scheme")
        if not addressed_to_us and not self.is_ours(ruri):
            # A registrar that is also a proxy would forward instead (the caller decides that
            # with is_ours()); this one refuses to act for a domain it does not serve.
            raise _Reject(403, "Forbidden (domain not served here)")
        # Step 2: extensions the request insists on.
        unsupported = [
            tag
            for name in ("Require", "Proxy-Require")
            for tag in _tokens(request.headers.getall(name))
            if tag not in SUPPORTED
        ]
        if unsupported:
            raise _Reject(420, "Bad Extension", [("Unsupported", ", ".join(unsupported))])
        # Step 5 (before 3/4, which need the AOR): the To header carries the address-of-record.
        to = request.to
        to_uri = to.uri if to is not None else None
        if to_uri is None or not to_uri.is_sip:
            # RFC 4475 §3.3.4 (unksm2): an AOR must be a SIP or SIPS URI.
            raise _Reject(400, "Bad Request (address-of-record must be a SIP or SIPS URI)")
        if not self.is_ours(to_uri):
            # §10.3 step 5: an AOR not valid for the domain is 404 (the Request-URI's domain, or
            # ours when the request was addressed to this server by IP).
            raise _Reject(404, "Not Found (address-of-record not in this domain)")
        aor = aor_of(to_uri)
        # Steps 3 and 4: the authenticated user may only change its own bindings.
        if user is not None and user != to_uri.user:
            raise _Reject(403, "Forbidden (not allowed to register this address-of-record)")
        call_id = request.call_id
        cseq = request.cseq
        if not call_id or cseq is None:
            raise _Reject(400, "Bad Request (missing Call-ID or CSeq)")
        # Step 6: the contacts and their expiration intervals.
        wildcard, updates = self._contacts(request)
        path = tuple(request.headers.getall("Path"))
        supported = _tokens(request.headers.getall("Supported"))
        supports_path = "path" in supported
        # RFC 5626: a client that asks for outbound (reg-id with +sip.instance, and says it
        # supports it) gets its binding kept per flow; so does one behind a NAT (nathelper).
        outbound = "outbound" in supported and any(
            u.reg_id is not None and u.instance for u in updates)
        flow = outbound or request_behind_nat(request, source)
        # The socket (UDP) or connection (TCP/TLS: its id names the worker holding it) the
        # REGISTER came on: the binding's flow is reached through it.
        sock = source.connection
        # Step 7: apply the updates, ordered by Call-ID/CSeq against the current bindings.
        current = {b.key: b for b in await self._store(aor, self.store.lookup(aor, now))}

        def check_order(binding: Binding) -> None:
            # A REGISTER from the same Call-ID that is not newer than the one that set this
            # binding arrived out of order (or replays an old one); applying it would undo a
            # later change.  The RFC only says "the request fails": 400 because retrying the
            # same request can never succeed (a 5xx with Retry-After would invite a retry).
            if binding.call_id == call_id and cseq.seq <= binding.cseq:
                raise _Reject(400, "Bad Request (CSeq out of order for this Call-ID)")

        if wildcard:
            for binding in current.values():
                check_order(binding)
            await self._store(aor, self.store.remove_all(aor))
            current = {}
            logger.info("%s: removed all bindings (Contact: *) from %s", aor, source)
        else:
            puts: list[Binding] = []
            removes: list[str] = []
            user_agent = request.headers.get("User-Agent")
            for update in updates:
                existing = current.get(update.key)
                if existing is not None:
                    check_order(existing)
                if update.expires == 0:
                    removes.append(update.contact)
                    continue
                if outbound and update.reg_id is not None and update.instance:
                    # RFC 5626 §6 step 3: a new flow for the same instance and reg-id
                    # replaces the old binding, whatever its Contact.
                    removes.extend(
                        b.contact for b in current.values()
                        if b.instance == update.instance and b.reg_id == update.reg_id
                        and b.key != update.key)
                puts.append(
                    Binding(
                        aor=aor,
                        contact=update.contact,
                        expires=now + update.expires,
                        q=update.q,
                        call_id=call_id,
                        cseq=cseq.seq,
                        path=path,
                        source=str(source),
                        instance=update.instance,
                        user_agent=user_agent,
                        registered_at=now,
                        flow=flow,
                        socket=sock,
                        reg_id=update.reg_id if outbound else None,
                    )
                )
            if puts or removes:
                await self._store(aor, self.store.update(aor, puts, removes))
                logger.debug(
                    "%s: %d bound, %d removed, from %s", aor, len(puts), len(removes), source
                )
                # What the store now holds, without asking it again (a round trip saved on a
                # networked store): what we read, with our changes applied.
                for removed in removes:
                    current.pop(contact_key(removed), None)
                current.update((b.key, b) for b in puts)
        # Step 8: 200 with every current binding (a fetch, with no Contact, lands here too).
        headers: list[tuple[str, str]] = [
            ("Contact", self._render_contact(b, now))
            for b in sorted((b for b in current.values() if b.expires > now), key=lookup_order)
        ]
        if supports_path and path and updates:
            # RFC 3327 §5.3: echo the Path the registrar stored, only to a UA that said it
            # understands Path.
            headers.extend(("Path", p) for p in path)
        if outbound and updates:
            # RFC 5626 §6: the binding is kept per flow; the client learns how often to keep
            # the flow alive.
            headers.append(("Require", "outbound"))
            if self.flow_timer:
                headers.append(("Flow-Timer", str(self.flow_timer)))
        headers.append(("Date", formatdate(now, usegmt=True)))
        return request.reply(200, "OK", headers=headers)

    def _contacts(self, request: Request) -> tuple[bool, list[_ContactUpdate]]:
        """Step 6: (is this ``Contact: *``, the per-contact updates), or a rejection."""
        try:
            contacts = request.contact
        except ParseError as exc:
            raise _Reject(400, f"Bad Request (invalid Contact: {exc.reason})") from None
        expires_header = request.headers.get("Expires")
        header_expires = None if expires_header is None else _parse_expires(expires_header)
        if any(c.wildcard for c in contacts):
            # §10.2.2: "*" removes every binding, and is only valid alone with Expires: 0.
            if len(contacts) != 1 or header_expires != 0:
                raise _Reject(400, "Bad Request (Contact: * needs Expires: 0 and no other contact)")
            return True, []
        updates: list[_ContactUpdate] = []
        too_brief = False
        raw_values = request.headers.getall("Contact")
        for n, c in enumerate(contacts):
            try:
                uri = c.uri
            except ParseError as exc:
                raise _Reject(400, f"Bad Request (invalid Contact URI: {exc.reason})") from None
            if uri is None:
                raise _Reject(400, "Bad Request (invalid Contact URI)")
            unreachable = _unroutable(uri)
            if unreachable:
                # A binding we could never send to would only turn later calls to this AOR
                # into 400s and timeouts: refuse it now, where the UA learns why.
                raise _Reject(400, f"Bad Request (Contact {unreachable})")
            raw = raw_values[n] if n < len(raw_values) else "<"
            if uri.headers and "<" not in raw:
                # §20.10: a URI with headers (or ',' ';' '?') must be in < >; without them
                # the '?' is not part of any URI (RFC 4475 3.1.2.13, regbadct): 400, not a
                # binding to a URI the UA never meant.
                raise _Reject(400, "Bad Request (invalid Contact: a URI with headers must "
                                   "be enclosed in < >)")
            params = {k.lower(): v for k, v in c.params.items()}
            if c.expires is not None:
                expires = c.expires
            elif "expires" in params:
                raise _Reject(400, "Bad Request (invalid Contact expires parameter)")
            elif header_expires is not None:
                expires = header_expires
            else:
                expires = self.default_expires
            expires = min(expires, self.max_expires)
            if 0 < expires < self.min_expires:
                if expires < _ONE_HOUR:
                    too_brief = True
                else:
                    expires = self.min_expires
            q = c.q
            if q is None:
                if "q" in params:
                    raise _Reject(400, "Bad Request (invalid Contact q parameter)")
                q = 1.0
            elif not 0.0 <= q <= 1.0:
                raise _Reject(400, "Bad Request (Contact q must be between 0 and 1)")
            text = str(uri)
            try:
                key = contact_key(uri)
            except ParseError as exc:
                raise _Reject(400, f"Bad Request (invalid Contact URI: {exc.reason})") from None
            reg_id_text = params.get("reg-id")
            reg_id = None
            if reg_id_text is not None:
                if not reg_id_text.isdigit() or not 0 < int(reg_id_text) < 2**31:
                    raise _Reject(400, "Bad Request (invalid Contact reg-id parameter)")
                reg_id = int(reg_id_text)
            instance = params.get("+sip.instance")
            if instance is not None:
                instance = instance.strip('"') or None
            updates.append(_ContactUpdate(text, key, expires, q, instance, reg_id))
        if too_brief:
            # The whole request fails, and the client learns the smallest interval we accept.
            raise _Reject(423, "Interval Too Brief", [("Min-Expires", str(self.min_expires))])
        return False, updates

    async def _store(self, aor: str, operation: Awaitable[_T]) -> _T:
        try:
            return await operation
        except Exception:
            # A store failure (disk full, database locked too long) commits nothing, since the
            # stores apply one REGISTER's changes atomically: say so, and let the UA retry
            # shortly instead of believing it is registered.
            logger.exception("%s: location store failed", aor)
            raise _Reject(500, "Server Internal Error", [("Retry-After", "5")]) from None

    @staticmethod
    def _render_contact(binding: Binding, now: float) -> str:
        parts = [f"<{binding.contact}>;expires={binding.expires_in(now)}"]
        if binding.q != 1.0:
            parts.append(f";q={binding.q:g}")
        if binding.instance is not None:
            # RFC 5626 §6: the registrar echoes +sip.instance (and reg-id) so the UA
            # recognizes its binding.
            parts.append(f';+sip.instance="{binding.instance}"')
            if binding.reg_id is not None:
                parts.append(f";reg-id={binding.reg_id}")
        return "".join(parts)
