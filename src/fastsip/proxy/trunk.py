"""Trunks to SIP providers: their definitions, their credentials and the outbound registration
state machine (Kamailio's ``uac`` module, ``uac_reg`` and ``uac_auth``, is the behavioural model).

Sans-IO: :class:`Registration` takes responses, transaction failures and the current time and
returns the REGISTER requests to send (without a Via: the shell adds it, with a fresh branch, and
sends through the transaction layer) and the time of its next timer (:meth:`get_timer`).  It
never reads a clock nor opens a socket.

A registration is kept alive: REGISTER with our Contact; on 401/407 the same request again,
CSeq + 1, with the trunk's credentials (:class:`~fastsip.proxy.auth.DigestClient`) -- once per
realm per attempt, so a wrong password is one extra request, never a loop; on 200 the interval
the provider granted (our Contact's ``expires``, else Expires, else the one asked) and a refresh
at half of it, or ``margin`` seconds before the end if that comes later; on 423 the
Min-Expires asked for.  Any failure (403, a second challenge, a timeout, no route) backs off
exponentially with jitter from ``retry_min`` to ``retry_max`` seconds, so a wrong password costs
the provider two REGISTERs per back-off period, not a storm.

The state for logs and metrics is plain attributes: ``state`` (one of :data:`STATES`),
``next_attempt`` (when the next REGISTER goes, on the caller's clock), ``failures`` (in a
row), ``expires_at`` and ``last_status``.
"""

from __future__ import annotations

import logging
import os
import random
import stat
import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastsip.errors import FastSIPError, ParseError
from fastsip.proxy.auth import DigestClient
from fastsip.sip import URI, Request, Response

__all__ = [
    "BACKING_OFF",
    "FAILED",
    "REGISTERED",
    "REGISTERING",
    "STATES",
    "UNREGISTERED",
    "Registration",
    "TrunkAuth",
    "TrunkBranch",
    "TrunkError",
    "TrunkSpec",
    "load_trunk_credentials",
    "parse_trunk",
]

log = logging.getLogger("fastsip.proxy.trunk")

UNREGISTERED = "unregistered"
REGISTERING = "registering"
REGISTERED = "registered"
#: The last attempt failed and the next one waits (``next_attempt``): "failed" while the
#: provider's refusal is the reason (403, wrong password), "backing-off" after a timeout or a
#: transport error.
FAILED = "failed"
BACKING_OFF = "backing-off"
STATES = (UNREGISTERED, REGISTERING, REGISTERED, FAILED, BACKING_OFF)


class TrunkError(FastSIPError, ValueError):
    """A ``--trunk`` spec or a trunk credentials file that cannot be used."""


@dataclass(frozen=True, slots=True)
class TrunkSpec:
    """A trunk: ``name``, the provider's ``uri`` (``sip:USER@HOST[:PORT]``), whether we
    register to it, and the address-of-record user we register as."""

    name: str
    uri: URI
    register: bool

    @property
    def user(self) -> str:
        return self.uri.user or ""

    @property
    def host(self) -> str:
        return self.uri.host

    def registrar_uri(self) -> str:
        """The Request-URI of our REGISTERs: the provider's domain (§10.2: no user part)."""
        host = self.uri.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        port = f":{self.uri.port}" if self.uri.port else ""
        transport = self.uri.params.get("transport") if self.uri.params else None
        tail = f";transport={transport}" if transport else ""
        return f"{self.uri.scheme}:{host}{port}{tail}"

    def aor(self) -> str:
        """Our address of record at the provider: ``sip:USER@HOST`` (To and From)."""
        host = self.uri.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{self.uri.scheme}:{self.user}@{host}"


def parse_trunk(spec: str) -> TrunkSpec:
    """``NAME=sip:USER@HOST[:PORT][;register=no]`` → a :class:`TrunkSpec` (TrunkError says
    what is wrong, and never echoes anything but the spec, which holds no secret)."""
    name, sep, text = spec.partition("=")
    name = name.strip()
    if not sep or not name or not text:
        raise TrunkError(f"{spec!r}: expected NAME=sip:USER@HOST[:PORT]")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise TrunkError(f"{spec!r}: a trunk name is letters, digits, '-', '_' and '.'")
    try:
        uri = URI(text.strip())
    except (ParseError, ValueError) as exc:
        raise TrunkError(f"{spec!r}: not a SIP URI ({exc})") from None
    if not uri.is_sip:
        raise TrunkError(f"{spec!r}: needs a sip: or sips: URI")
    if getattr(uri, "password", None):
        # (Not echoed: the spec holds a secret.)
        raise TrunkError(f"--trunk {name}: a password in the URI is not allowed (it would "
                         "show in process lists and logs): use --trunk-credentials")
    register = True
    params = uri.params or {}
    value = params.get("register")
    if value is not None:
        if value.lower() not in ("yes", "no"):
            raise TrunkError(f"{spec!r}: register=yes or register=no")
        register = value.lower() == "yes"
    if register and not uri.user:
        raise TrunkError(f"{spec!r}: registering needs a user (sip:USER@HOST)")
    return TrunkSpec(name, uri, register)


def load_trunk_credentials(path: str | Path) -> dict[str, DigestClient]:
    """Read ``NAME:USER:PASSWORD`` lines (``#`` comments; the password may hold ':').  A file
    that others may read gets a WARNING (it holds passwords in clear).  Errors name the file
    and line, never a password."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TrunkError(f"{path}: cannot read trunk credentials: {exc}") from None
    # Not on Windows: there st_mode only mirrors the read-only flag (every file reads as
    # 0o666 or 0o444) and ACLs decide who reads it, so the warning would fire on every file.
    if sys.platform != "win32" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: trunk credentials are readable by others (mode %o): chmod 600 it",
                    path, stat.S_IMODE(mode))
    clients: dict[str, DigestClient] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep1, rest = line.partition(":")
        user, sep2, password = rest.partition(":")
        if not sep1 or not sep2 or not name or not user:
            raise TrunkError(f"{path}:{number}: expected NAME:USER:PASSWORD")
        if name in clients:
            raise TrunkError(f"{path}:{number}: trunk {name!r} defined twice")
        clients[name] = DigestClient(user, password)
    return clients


class Registration:
    """One outbound registration's state machine (see the module docstring).

    ``contact``: our Contact URI (the listener's advertised address, user = the trunk user).
    ``expires``: the interval we ask for.  ``rng``: for the back-off jitter (seeded in tests).
    """

    def __init__(
        self,
        trunk: TrunkSpec,
        contact: str,
        credentials: DigestClient | None = None,
        *,
        expires: int = 3600,
        # A refresh that times out (Timer F: 32 s) and its retry after retry_min (30 s) both
        # fit before the binding lapses; the provider never sees us unregistered for a lost
        # datagram.
        margin: float = 90.0,
        retry_min: float = 30.0,
        retry_max: float = 3600.0,
        rng: random.Random | None = None,
        call_id: str | None = None,
    ) -> None:
        self.trunk = trunk
        self.contact = contact
        self.credentials = credentials
        self.expires = expires
        self.margin = margin
        self.retry_min = retry_min
        self.retry_max = retry_max
        self._rng = rng or random.Random()
        # §10.2.4: one Call-ID and From tag for every REGISTER of this registration, the CSeq
        # rising by one each time.
        self.call_id = call_id or f"{os.urandom(10).hex()}@fastsip"
        self.from_tag = os.urandom(6).hex()
        self.cseq = 0
        self.state = UNREGISTERED
        #: When the next REGISTER goes (None: one is in flight, or stopped).
        self.next_attempt: float | None = None
        self.failures = 0
        self.expires_at: float | None = None
        self.last_status: int | None = None
        self.registered_count = 0
        self._realms: set[str] = set()    # challenges answered in this attempt
        self._asking = expires            # what this attempt asks for (423 raises it)
        self._stopped = False

    # -- the sans-IO surface -----------------------------------------------------------------

    def start(self, now: float) -> list[Request]:
        """Begin registering: the first REGISTER."""
        self._stopped = False
        return [self._attempt(now)]

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should run next (None: nothing scheduled)."""
        return None if self._stopped else self.next_attempt

    def handle_timer(self, now: float) -> list[Request]:
        """Time passed: a refresh or a retry is due."""
        if self._stopped or self.next_attempt is None or now < self.next_attempt:
            return []
        return [self._attempt(now)]

    def receive_response(self, response: Response, now: float) -> list[Request]:
        """A final response to our last REGISTER (provisional ones change nothing)."""
        status = response.status_code
        cseq = response.cseq
        if status < 200 or self._stopped or cseq is None or cseq.seq != self.cseq:
            return []   # provisional, stale (an older REGISTER's), or after stop()
        self.last_status = status
        if 200 <= status < 300:
            self._registered(response, now)
            return []
        if status in (401, 407):
            resend = self._answer(response)
            if resend is not None:
                return [resend]
            self._fail(now, f"{status} {response.reason} (credentials refused)", FAILED)
            return []
        if status == 423:
            floor = _int(response.headers.get("Min-Expires"))
            if floor is not None and self._asking < floor <= 86400:
                self._asking = floor
                self._realms.clear()
                return [self._request()]
        self._fail(now, f"{status} {response.reason}", FAILED)
        return []

    def transaction_failed(self, now: float, reason: str = "timeout") -> list[Request]:
        """The REGISTER's transaction ended without a response (Timer F, transport error)."""
        if not self._stopped:
            self.last_status = None
            self._fail(now, reason, BACKING_OFF)
        return []

    def contact_matches(self, uri: URI) -> bool:
        """Does ``uri`` (a request's Request-URI) name our registered Contact?"""
        want = _contact_key(self.contact)
        got = ((uri.user or ""), uri.host.lower(), uri.port)
        return got[:2] == want[:2] and (got[2] is None or got[2] == want[2])

    def stop(self) -> None:
        """No more REGISTERs (the server stops); the binding expires at the provider."""
        self._stopped = True
        self.next_attempt = None

    # -- inside ------------------------------------------------------------------------------

    def _attempt(self, now: float) -> Request:
        self.next_attempt = None
        if self.state != REGISTERED:
            self.state = REGISTERING
        self._realms.clear()
        self._asking = max(self._asking, self.expires)
        return self._request()

    def _request(self, auth: tuple[str, str] | None = None) -> Request:
        self.cseq += 1
        trunk = self.trunk
        aor = trunk.aor()
        headers = [
            ("Max-Forwards", "70"),
            ("From", f"<{aor}>;tag={self.from_tag}"),
            ("To", f"<{aor}>"),
            ("Call-ID", self.call_id),
            ("CSeq", f"{self.cseq} REGISTER"),
            ("Contact", f"<{self.contact}>;expires={self._asking}"),
            ("Expires", str(self._asking)),
        ]
        if auth is not None:
            headers.append(auth)
        headers.append(("User-Agent", "fastsip"))
        return Request.create("REGISTER", trunk.registrar_uri(), headers)

    def _answer(self, response: Response) -> Request | None:
        if self.credentials is None:
            return None
        # Build the request first (the digest covers its method and Request-URI), then the
        # credentials, then the same request with them and the next CSeq.
        probe = Request.create("REGISTER", self.trunk.registrar_uri(), [])
        answer = self.credentials.answer(response, probe)
        if answer is None:
            return None
        name, value, realm = answer
        if realm in self._realms:
            return None     # answered this realm once already: the credentials are wrong
        self._realms.add(realm)
        return self._request((name, value))

    def _registered(self, response: Response, now: float) -> None:
        granted = self._granted(response)
        if granted <= 0:
            self._fail(now, "200 OK granting no time (expires=0)", FAILED)
            return
        was = self.state
        self.state = REGISTERED
        self.failures = 0
        self.registered_count += 1
        self.expires_at = now + granted
        refresh = max(granted / 2.0, granted - self.margin)
        # Never later than a second before the end, never sooner than a second from now.
        refresh = max(1.0, min(refresh, granted - 1.0)) if granted > 2 else granted / 2.0
        self.next_attempt = now + refresh
        level = logging.INFO if was != REGISTERED else logging.DEBUG
        log.log(level, "trunk %s registered as %s for %ds (refresh in %.0fs)",
                self.trunk.name, self.trunk.user, granted, refresh)

    def _granted(self, response: Response) -> int:
        """The interval the provider granted our Contact (§10.2.4): its ``expires``
        parameter in the 200's Contact list, else the Expires header, else what we asked.
        A provider behind which we are NATed may list our Contact rewritten to the address
        it sees: with one Contact in the 200, that one is ours."""
        ours = _contact_key(self.contact)
        contacts = response.contact
        mine = [c for c in contacts if c.uri is not None and _contact_key(str(c.uri)) == ours]
        if not mine and len(contacts) == 1:
            mine = contacts
        for contact in mine:
            value = _int(contact.params.get("expires") if contact.params else None)
            if value is not None:
                return value
        value = _int(response.headers.get("Expires"))
        return value if value is not None else self._asking

    def _fail(self, now: float, reason: str, state: str) -> None:
        self.failures += 1
        base = min(self.retry_max, self.retry_min * 2.0 ** (self.failures - 1))
        # Jitter: 75-100 % of the step, so many servers that failed together do not retry
        # together (and the cap is never exceeded).
        delay = base * (0.75 + 0.25 * self._rng.random())
        self.state = state
        self.expires_at = None
        self.next_attempt = now + delay
        log.warning("trunk %s registration %s: %s; next attempt in %.0fs (failure %d)",
                    self.trunk.name, state, reason, delay, self.failures)

    def __repr__(self) -> str:
        return f"<Registration {self.trunk.name} {self.state}>"


def _contact_key(uri: str) -> tuple[str, str, int | None]:
    try:
        u = URI(uri)
    except (ParseError, ValueError):
        return ("", uri, None)
    return ((u.user or ""), u.host.lower(), u.port)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    return int(text) if text.isdigit() and len(text) < 10 else None


# -- upstream authentication and CSeq shifts (the proxy core's side) ----------------------------


class _Shift:
    """One dialog whose caller-side CSeq numbers are shifted toward a provider."""

    __slots__ = ("key", "offset", "seen", "trunk")

    def __init__(self, key: tuple[str, str, str], offset: int, trunk: str,
                 seen: float) -> None:
        self.key = key
        self.offset = offset
        self.trunk = trunk
        self.seen = seen


class TrunkBranch:
    """What a proxy branch to a trunk carries: the trunk's name, how far its CSeq is ahead of
    the caller's (``shift``), the realms it answered (once each) and, in a shifted dialog,
    the dialog's entry (a re-sent in-dialog request moves the dialog's shift too)."""

    __slots__ = ("dialog", "name", "realms", "shift")

    def __init__(self, name: str, shift: int = 0, dialog: _Shift | None = None) -> None:
        self.name = name
        self.shift = shift
        self.realms: set[str] = set()
        self.dialog = dialog

    def resent(self) -> None:
        """The branch's request went again with CSeq + 1 (``shift`` already raised)."""
        if self.dialog is not None:
            self.dialog.offset = self.shift


#: Key of a shifted dialog: (Call-ID, the caller's From tag, the provider's To tag) -- as
#: the caller's requests carry them; the provider's requests carry the tags the other way
#: round, so they never match (and are never shifted).
_DialogKey = tuple[str, str, str]


class TrunkAuth:
    """The proxy core's trunk state (:attr:`fastsip.proxy.Proxy.trunks`): each trunk's
    :class:`~fastsip.proxy.auth.DigestClient`, and the CSeq shift of each dialog whose
    INVITE we re-sent with credentials (Kamailio's dialog ``track_cseq_updates``).

    A shift is one small entry per dialog: its offset and trunk.  It goes when a BYE passes
    (either way), when it has not been used for ``max_age`` seconds, or -- the oldest first --
    beyond ``max_dialogs``.  Sans-IO: times come from the caller."""

    def __init__(self, clients: Mapping[str, DigestClient], *, max_dialogs: int = 100_000,
                 max_age: float = 86400.0) -> None:
        self.clients = dict(clients)
        self.max_dialogs = max_dialogs
        self.max_age = max_age
        self.dialogs: OrderedDict[_DialogKey, _Shift] = OrderedDict()
        #: Requests re-sent with credentials, and challenges refused a second time.
        self.answered = 0
        self.refused = 0

    # -- branches ------------------------------------------------------------------------------

    def branch(self, original: Request, copy: Request, target: Any,
               now: float) -> TrunkBranch | None:
        """For a branch about to be made from ``original`` (``copy`` is the branch's request):
        its :class:`TrunkBranch` when it goes to a trunk or belongs to a shifted dialog (whose
        CSeq is then shifted in ``copy``), else None."""
        entry = None
        if self.dialogs:
            entry = self._dialog(original, now)
            if entry is not None:
                _shift_cseq(copy, entry.offset)
        name = getattr(target, "trunk", None)
        if name is None and entry is not None:
            name = entry.trunk
        if name is None:
            return None
        return TrunkBranch(name, entry.offset if entry is not None else 0, entry)

    def _dialog(self, request: Request, now: float) -> _Shift | None:
        frm, to = request.from_, request.to
        call_id = request.call_id
        if frm is None or to is None or not to.tag or not frm.tag or not call_id:
            return None
        key = (call_id, frm.tag, to.tag)
        entry = self.dialogs.get(key)
        if request.method == "BYE":
            # The dialog ends (whichever side hangs up): the BYE itself is still shifted.
            self.dialogs.pop(key, None)
            self.dialogs.pop((call_id, to.tag, frm.tag), None)
            return entry
        if entry is None:
            return None
        if now - entry.seen > self.max_age:
            del self.dialogs[key]
            return None
        entry.seen = now
        self.dialogs.move_to_end(key)
        return entry

    def answer(self, tb: TrunkBranch, response: Response,
               request: Request) -> tuple[str, str] | None | Literal[False]:
        """Credentials for re-sending ``request`` after the challenge ``response`` on a branch
        to ``tb``'s trunk: (header, value); None when the trunk has no credentials (the
        challenge goes on as it is); False when this realm was answered once already on this
        branch (the credentials are wrong: never a loop)."""
        client = self.clients.get(tb.name)
        if client is None:
            return None
        answer = client.answer(response, request)
        if answer is None:
            return None
        name, value, realm = answer
        if realm in tb.realms:
            self.refused += 1
            return False
        tb.realms.add(realm)
        self.answered += 1
        return name, value

    def dialog_answered(self, tb: TrunkBranch, request: Request, response: Response,
                        now: float) -> None:
        """A 2xx (or a 1xx with a To tag: an early dialog) to an INVITE on a branch to a
        trunk: the caller's later requests in that dialog are shifted by the branch's shift
        (0 when it was not challenged: the entry then only names the trunk, so challenges of
        in-dialog requests are answered too)."""
        frm, to = request.from_, response.to
        call_id = request.call_id
        if frm is None or to is None or not frm.tag or not to.tag or not call_id:
            return
        key = (call_id, frm.tag, to.tag)
        entry = self.dialogs.get(key)
        if entry is None:
            entry = self.dialogs[key] = _Shift(key, tb.shift, tb.name, now)
            # Least recently used first (a use moves an entry to the end): the ones unused
            # for max_age go, and past max_dialogs the oldest.
            dialogs = self.dialogs
            while len(dialogs) > self.max_dialogs or \
                    now - next(iter(dialogs.values())).seen > self.max_age:
                dialogs.popitem(last=False)
        entry.offset = tb.shift
        entry.seen = now
        tb.dialog = entry

    def dialog_failed(self, tb: TrunkBranch) -> None:
        """The INVITE whose early dialog (a reliable 1xx) was recorded failed: forget it."""
        entry = tb.dialog
        if entry is not None and self.dialogs.get(entry.key) is entry:
            del self.dialogs[entry.key]
        tb.dialog = None

    def shift_ack(self, ack: Request) -> None:
        """An ACK for a 2xx from the caller of a shifted dialog: the CSeq of the INVITE the
        provider saw (RFC 3261 §13.2.2.4)."""
        if not self.dialogs:
            return
        frm, to = ack.from_, ack.to
        call_id = ack.call_id
        if frm is None or to is None or not frm.tag or not to.tag or not call_id:
            return
        entry = self.dialogs.get((call_id, frm.tag, to.tag))
        if entry is not None:
            _shift_cseq(ack, entry.offset)


def _shift_cseq(request: Request, offset: int) -> None:
    """CSeq (and a PRACK's RAck, RFC 3262, which names the INVITE's CSeq) ``offset`` higher."""
    cseq = request.cseq
    if cseq is None or not offset:
        return
    request.set_header("CSeq", f"{cseq.seq + offset} {cseq.method}")
    rack = request.headers.get("RAck")
    if rack is not None:
        parts = rack.split()
        if len(parts) == 3 and parts[1].isdigit():
            request.set_header("RAck", f"{parts[0]} {int(parts[1]) + offset} {parts[2]}")
