"""Digest authentication for a registrar and a proxy (RFC 3261 §22, RFC 8760, RFC 7616).

Sans-IO: :class:`DigestAuthenticator` takes a request and the current time and answers with a
challenge response or a verdict; it never reads a clock.  Nonces carry their own issue time and
an HMAC over it, so validating one needs no per-challenge server state; the only state kept is
the highest nonce-count seen per nonce in use (replay protection), bounded by the nonce lifetime.

Credentials come from a plain text file (:meth:`Credentials.from_file`), one user per line::

    # comments start with '#'
    alice:secret                   (a '#' after the start of a line is part of the password)
    bob:example.com:pa:ss          (user:realm:password; this form allows ':' in a password)
    carol:md5:<32 hex digits>      (HA1 = MD5("carol:REALM:password"): no password on disk)
    carol:sha256:<64 hex digits>   (HA1 = SHA-256("carol:REALM:password"))

A second field of ``md5``, ``sha256`` or ``sha-256`` always means an HA1 (so no realm can be
called that).  Leading and trailing whitespace of a line is ignored.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fastsip.errors import FastSIPError, ParseError
from fastsip.sip import URI, Request, Response

__all__ = [
    "ALGORITHMS",
    "AuthResult",
    "Credentials",
    "CredentialsError",
    "DigestAuthenticator",
    "DigestClient",
    "digest_authorization",
    "digest_response",
    "parse_auth_params",
]

logger = logging.getLogger("fastsip.proxy")

#: Digest algorithms we implement (RFC 8760 §2.1 for SIP), by their name in the challenge.
ALGORITHMS = {"MD5": "md5", "SHA-256": "sha256", "SHA-512-256": "sha512_256"}
#: A client's preference when a server offers several (RFC 8760 §2.4: the strongest it knows).
CLIENT_PREFERENCE = ("SHA-512-256", "SHA-256", "MD5")

# HA1 tags accepted in a credentials file, mapped to the algorithm name of the challenge.
_HA1_TAGS = {"md5": "MD5", "sha256": "SHA-256", "sha-256": "SHA-256"}
_HEX = re.compile(r"[0-9a-fA-F]+")


class CredentialsError(FastSIPError, ValueError):
    """A credentials file (or entry) cannot be used; ``line`` is its 1-based line, or 0."""

    def __init__(self, message: str, source: str = "", line: int = 0) -> None:
        where = f"{source}:{line}: " if line else (f"{source}: " if source else "")
        super().__init__(where + message)
        self.source = source
        self.line = line


def _hash(algorithm: str, text: str) -> str:
    # surrogateescape: text off the wire (a digest uri) may hold bytes that are not UTF-8;
    # they hash as the bytes that came, and never raise.
    return hashlib.new(ALGORITHMS[algorithm],
                       text.encode("utf-8", "surrogateescape")).hexdigest()


def digest_response(
    algorithm: str,
    ha1: str,
    nonce: str,
    method: str,
    digest_uri: str,
    *,
    qop: str | None = None,
    nc: str = "",
    cnonce: str = "",
) -> str:
    """The ``response`` of a Digest Authorization (RFC 2617 §3.2.2.1, RFC 7616 §3.4.1):
    HA2 = H(method:digest-uri); with ``qop="auth"`` H(HA1:nonce:nc:cnonce:qop:HA2), without a
    qop (RFC 2069 form) H(HA1:nonce:HA2)."""
    ha2 = _hash(algorithm, f"{method}:{digest_uri}")
    if qop is None:
        return _hash(algorithm, f"{ha1}:{nonce}:{ha2}")
    return _hash(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


@dataclass(slots=True)
class _Entry:
    password: str | None = None
    ha1: dict[str, str] = field(default_factory=dict)  # algorithm -> HA1 hex (lowercase)


class Credentials:
    """Users and their secrets: a password (any algorithm, any realm) or precomputed HA1s."""

    def __init__(self) -> None:
        # (user, realm or None for "any realm") -> secret
        self._entries: dict[tuple[str, str | None], _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self,
        user: str,
        *,
        password: str | None = None,
        realm: str | None = None,
        ha1: str | None = None,
        algorithm: str = "MD5",
    ) -> None:
        """Add a user with a ``password`` (for ``realm``, or any realm), or with the ``ha1`` of
        ``algorithm`` ("MD5" or "SHA-256"), H(user:realm:password) computed for the realm the
        authenticator will use.  A user may have one HA1 per algorithm."""
        if not user:
            raise CredentialsError("empty user name")
        if (password is None) == (ha1 is None):
            raise CredentialsError(f"user {user!r}: give a password or an HA1, not both or none")
        entry = self._entries.setdefault((user, realm), _Entry())
        if password is not None:
            if entry.password is not None or entry.ha1:
                raise CredentialsError(f"user {user!r} defined twice")
            entry.password = password
            return
        assert ha1 is not None
        if algorithm not in ALGORITHMS:
            raise CredentialsError(f"user {user!r}: unknown algorithm {algorithm!r}")
        size = hashlib.new(ALGORITHMS[algorithm]).digest_size * 2
        if len(ha1) != size or not _HEX.fullmatch(ha1):
            raise CredentialsError(f"user {user!r}: an {algorithm} HA1 is {size} hex digits")
        if entry.password is not None or algorithm in entry.ha1:
            raise CredentialsError(f"user {user!r} defined twice")
        entry.ha1[algorithm] = ha1.lower()

    def ha1(self, user: str, realm: str, algorithm: str) -> str | None:
        """H(user:realm:password) for ``algorithm``, or None if the user is unknown or has no
        secret usable with that algorithm."""
        entry = self._entries.get((user, realm)) or self._entries.get((user, None))
        if entry is None:
            return None
        if entry.password is not None:
            return _hash(algorithm, f"{user}:{realm}:{entry.password}")
        return entry.ha1.get(algorithm)

    @classmethod
    def from_lines(cls, lines: Iterable[str], source: str = "<credentials>") -> Credentials:
        """Parse the credentials file format (see the module docstring)."""
        creds = cls()
        for number, raw in enumerate(lines, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, rest = line.partition(":")
            if not sep or not user:
                raise CredentialsError("expected user:password", source, number)
            tag, sep2, value = rest.partition(":")
            try:
                if sep2 and tag.lower() in _HA1_TAGS:
                    creds.add(user, ha1=value, algorithm=_HA1_TAGS[tag.lower()])
                elif sep2:
                    if not tag:
                        raise CredentialsError("empty realm in user:realm:password")
                    creds.add(user, realm=tag, password=value)
                else:
                    creds.add(user, password=rest)
            except CredentialsError as exc:
                message = str(exc)
                raise CredentialsError(message, source, number) from None
        return creds

    @classmethod
    def from_file(cls, path: str | Path) -> Credentials:
        """Read a credentials file (UTF-8); errors name the file and line."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CredentialsError(f"cannot read credentials: {exc}", str(path)) from None
        return cls.from_lines(text.splitlines(), str(path))


def parse_auth_params(value: str) -> tuple[str, dict[str, str]]:
    """Split a credentials or challenge header value into (scheme, {param: value}).

    Parameter names are lowercased; quoted-string values are unquoted (backslash escapes
    undone).  Commas inside quotes do not split.  Raises ParseError on malformed input.
    """
    text = value.strip()
    match = re.match(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*", text)
    if match is None:
        raise ParseError("credentials: missing auth scheme")
    scheme = match.group(1)
    params: dict[str, str] = {}
    i, n = match.end(), len(text)
    while i < n:
        m = re.compile(r"\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*").match(text, i)
        if m is None:
            raise ParseError(f"credentials: expected name=value at {text[i : i + 20]!r}")
        name = m.group(1).lower()
        i = m.end()
        if i < n and text[i] == '"':
            out: list[str] = []
            i += 1
            while True:
                if i >= n:
                    raise ParseError("credentials: unterminated quoted string")
                ch = text[i]
                if ch == "\\" and i + 1 < n:
                    out.append(text[i + 1])
                    i += 2
                elif ch == '"':
                    i += 1
                    break
                else:
                    out.append(ch)
                    i += 1
            param = "".join(out)
        else:
            m = re.compile(r"[^\s,\"]*").match(text, i)
            assert m is not None
            param = m.group(0)
            i = m.end()
        if name in params:
            raise ParseError(f"credentials: parameter {name!r} repeated")
        params[name] = param
        m = re.compile(r"\s*(,|$)").match(text, i)
        if m is None:
            raise ParseError(f"credentials: expected ',' at {text[i : i + 20]!r}")
        i = m.end()
    return scheme, params


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The verdict on a request's credentials.

    ``ok``: authenticated as ``user``.  ``stale``: the credentials were right but the nonce has
    expired; challenge again with ``stale=True`` so the client retries without asking its user.
    ``reason``: why not, for logs (never sent: it would help an attacker).  ``guess``: the
    credentials were checked against a secret and were wrong, or named a user we do not have --
    what a password guesser or a user scanner produces, as opposed to a stale or foreign nonce,
    a replay or a client bug, which reveal nothing (abuse defence counts only guesses).
    """

    ok: bool
    user: str | None = None
    stale: bool = False
    reason: str = ""
    guess: bool = False


_NONCE_TS = struct.Struct(">q")  # issue time, in microseconds of the caller's clock
_SALT_LEN = 6  # two nonces issued in the same microsecond still differ
_MAC_LEN = 16  # truncated HMAC-SHA-256: 128 bits is plenty against forgery
_NONCE_LEN = _NONCE_TS.size + _SALT_LEN + _MAC_LEN


class DigestAuthenticator:
    """Challenges requests and checks their Digest credentials for one realm.

    ``algorithms``: offered in this order, one challenge header each; SHA-256 first because
    RFC 8760 §2.4 has the server list its preferred algorithm first and clients pick the first
    they support (MD5 stays for the many clients that know nothing else).  ``nonce_ttl``: how
    long a nonce is accepted, in seconds.  ``secret``: the HMAC key for nonces (random per
    process if None: after a restart, old nonces fail and clients get a fresh challenge).
    ``allow_no_qop``: accept RFC 2069-style credentials without ``qop`` (no cnonce, no
    nonce-count, hence weaker replay protection: each such nonce is then good for one request).
    ``check_uri``: require the digest ``uri`` to equal the Request-URI (RFC 2617 §3.2.2.5).
    """

    def __init__(
        self,
        realm: str,
        credentials: Credentials,
        *,
        algorithms: Iterable[str] = ("SHA-256", "MD5"),
        nonce_ttl: float = 300.0,
        secret: bytes | str | None = None,
        allow_no_qop: bool = False,
        check_uri: bool = True,
    ) -> None:
        self.realm = realm
        self.credentials = credentials
        self.algorithms = tuple(algorithms)
        for algorithm in self.algorithms:
            if algorithm not in ALGORITHMS:
                raise ValueError(f"unsupported digest algorithm {algorithm!r}")
        if not self.algorithms:
            raise ValueError("at least one digest algorithm is needed")
        self.nonce_ttl = nonce_ttl
        if secret is None:
            secret = secrets.token_bytes(32)
        self._secret = secret.encode() if isinstance(secret, str) else secret
        self.allow_no_qop = allow_no_qop
        self.check_uri = check_uri
        # opaque is constant per realm and secret: clients echo it, and it must stay short
        # (sipp keeps at most 63 characters of it).
        self.opaque = hmac.new(self._secret, b"opaque:" + realm.encode(), "sha256").hexdigest()[:16]
        # nonce -> (issue time, highest nonce-count accepted), in order of first use, which is
        # close to issue order: expired entries are dropped from the front.
        self._nc: OrderedDict[str, tuple[float, int]] = OrderedDict()

    # -- nonces ---------------------------------------------------------------------------

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, body + self.realm.encode(), "sha256").digest()[:_MAC_LEN]

    def make_nonce(self, now: float) -> str:
        """A fresh nonce: base64 of (issue time, salt, HMAC(secret, time+salt+realm))."""
        body = _NONCE_TS.pack(int(now * 1e6)) + secrets.token_bytes(_SALT_LEN)
        return base64.urlsafe_b64encode(body + self._mac(body)).decode("ascii")

    def _nonce_issued(self, nonce: str) -> float | None:
        """The issue time of a nonce we made, or None if it is not one of ours (tampered)."""
        try:
            raw = base64.urlsafe_b64decode(nonce.encode("ascii"))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return None
        if len(raw) != _NONCE_LEN:
            return None
        body, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        (micros,) = _NONCE_TS.unpack_from(body)
        return float(micros) / 1e6

    def _forget_old(self, now: float) -> None:
        horizon = now - self.nonce_ttl
        while self._nc:
            nonce, (issued, _) = next(iter(self._nc.items()))
            if issued >= horizon:
                break
            del self._nc[nonce]

    # -- challenge ------------------------------------------------------------------------

    def challenge(
        self, request: Request, now: float, *, proxy: bool = False, stale: bool = False
    ) -> Response:
        """A 401 with one WWW-Authenticate per algorithm (407 with Proxy-Authenticate when
        ``proxy``), all sharing one fresh nonce."""
        nonce = self.make_nonce(now)
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        headers = []
        for algorithm in self.algorithms:
            value = (
                f'Digest realm="{_quote(self.realm)}", nonce="{nonce}", opaque="{self.opaque}",'
                f' algorithm={algorithm}, qop="auth"'
            )
            if stale:
                value += ", stale=TRUE"
            headers.append((name, value))
        if proxy:
            return request.reply(407, "Proxy Authentication Required", headers=headers)
        return request.reply(401, "Unauthorized", headers=headers)

    # -- verification ---------------------------------------------------------------------

    def authenticate(self, request: Request, now: float, *, proxy: bool = False) -> AuthResult:
        """Check the request's Authorization (Proxy-Authorization when ``proxy``) for our
        realm.  Records the nonce-count of accepted credentials, so calling this twice on the
        same request fails the second time (a replay)."""
        self._forget_old(now)
        name = "Proxy-Authorization" if proxy else "Authorization"
        params: dict[str, str] | None = None
        for line in request.headers.getlines(name):
            try:
                scheme, candidate = parse_auth_params(line)
            except ParseError as exc:
                return AuthResult(False, reason=f"malformed {name}: {exc.reason}")
            # Credentials for other realms belong to other servers (RFC 3261 §22.3): skip them.
            if scheme.lower() == "digest" and candidate.get("realm") == self.realm:
                params = candidate
                break
        if params is None:
            return AuthResult(False, reason=f"no {name} for realm {self.realm!r}")
        return self._verify(request, now, params)

    def _verify(self, request: Request, now: float, p: dict[str, str]) -> AuthResult:
        user = p.get("username")
        nonce = p.get("nonce")
        digest_uri = p.get("uri")
        response = p.get("response")
        if not user or not nonce or digest_uri is None or not response:
            return AuthResult(False, reason="credentials lack username, nonce, uri or response")
        algorithm = p.get("algorithm", "MD5")
        algorithm = {a.upper(): a for a in self.algorithms}.get(algorithm.upper(), algorithm)
        if algorithm not in self.algorithms:
            return AuthResult(False, user, reason=f"algorithm {algorithm!r} not offered")
        if "opaque" in p and p["opaque"] != self.opaque:
            return AuthResult(False, user, reason="opaque does not match")
        if self.check_uri and not _same_uri(digest_uri, request.uri):
            return AuthResult(False, user, reason="digest uri is not the Request-URI")
        issued = self._nonce_issued(nonce)
        if issued is None:
            return AuthResult(False, user, reason="nonce not issued by us")
        qop = p.get("qop")
        nc_value = 0
        if qop is None:
            if not self.allow_no_qop:
                return AuthResult(False, user, reason="credentials without qop are not accepted")
            nc, cnonce = "", ""
        elif qop.lower() != "auth":
            return AuthResult(False, user, reason=f"qop {qop!r} not offered")
        else:
            nc, cnonce = p.get("nc", ""), p.get("cnonce", "")
            if len(nc) != 8 or not _HEX.fullmatch(nc) or not cnonce:
                return AuthResult(False, user, reason="qop=auth needs an 8-hex-digit nc and cnonce")
            nc_value = int(nc, 16)
        ha1 = self.credentials.ha1(user, self.realm, algorithm)
        if ha1 is None:
            return AuthResult(False, user, reason=f"no {algorithm} secret for user {user!r}",
                              guess=True)
        expected = digest_response(
            algorithm, ha1, nonce, request.method, digest_uri, qop=qop, nc=nc, cnonce=cnonce
        )
        if not hmac.compare_digest(expected, response.lower()):
            return AuthResult(False, user, reason="wrong response (bad password?)", guess=True)
        # The response is right: only now may the nonce's age make it "stale" (RFC 2617
        # §3.2.1: stale means the digest was valid and only the nonce is too old).
        if now - issued > self.nonce_ttl:
            return AuthResult(False, user, stale=True, reason="nonce expired")
        _, highest = self._nc.get(nonce, (issued, -1))
        if nc_value <= highest:
            return AuthResult(False, user, reason=f"nonce-count {nc_value} replayed")
        self._nc[nonce] = (issued, nc_value)
        return AuthResult(True, user)

    def authorize(
        self, request: Request, now: float, *, proxy: bool = False
    ) -> AuthResult | Response:
        """:meth:`authenticate`, and on failure the challenge to send (``stale`` as found):
        the one call a registrar or proxy needs.  Returns the AuthResult only when ok."""
        result = self.authenticate(request, now, proxy=proxy)
        if result.ok:
            return result
        if result.reason and request.headers.getlines(
            "Proxy-Authorization" if proxy else "Authorization"
        ):
            logger.info("%s from %s: %s", request.method, result.user or "?", result.reason)
        return self.challenge(request, now, proxy=proxy, stale=result.stale)


# -- the client side (a UAC answering 401/407: outbound registrations, trunk relays) -----------


def _pick_challenge(response: Response) -> tuple[str, dict[str, str]] | None:
    """The challenge to answer in a 401/407: the Digest one whose algorithm we like best
    (RFC 8760 §2.4: a server lists one per algorithm, a client takes the strongest it
    supports).  Returns (credentials header name, challenge params) or None."""
    if response.status_code == 407:
        challenge, answer = "Proxy-Authenticate", "Proxy-Authorization"
    else:
        challenge, answer = "WWW-Authenticate", "Authorization"
    best: tuple[int, dict[str, str]] | None = None
    for line in response.headers.getlines(challenge):
        try:
            scheme, params = parse_auth_params(line)
        except ParseError:
            continue
        if scheme.lower() != "digest" or "nonce" not in params or "realm" not in params:
            continue
        algorithm = params.get("algorithm", "MD5").upper()
        rank = next((i for i, a in enumerate(CLIENT_PREFERENCE) if a == algorithm), None)
        if rank is None:
            continue  # -sess variants and unknown algorithms: not offered to us in SIP
        params["algorithm"] = CLIENT_PREFERENCE[rank]
        if best is None or rank < best[0]:
            best = (rank, params)
    return (answer, best[1]) if best is not None else None


def digest_authorization(
    challenge: dict[str, str],
    method: str,
    digest_uri: str,
    username: str,
    password: str,
    *,
    nc: int = 1,
    cnonce: str = "",
) -> str:
    """The value of an Authorization / Proxy-Authorization answering ``challenge`` (the
    params of a Digest challenge, :func:`parse_auth_params`): RFC 7616 §3.4 with ``qop=auth``
    when offered (``nc`` and ``cnonce`` then count), the RFC 2069 form otherwise."""
    algorithm = challenge.get("algorithm", "MD5")
    realm = challenge.get("realm", "")
    nonce = challenge.get("nonce", "")
    ha1 = _hash(algorithm, f"{username}:{realm}:{password}")
    offered = [q.strip().lower() for q in challenge.get("qop", "").split(",")]
    qop = "auth" if "auth" in offered else None
    nc_text = f"{nc:08x}"
    response = digest_response(algorithm, ha1, nonce, method, digest_uri, qop=qop,
                               nc=nc_text, cnonce=cnonce)
    parts = [f'Digest username="{_quote(username)}"', f'realm="{_quote(realm)}"',
             f'nonce="{_quote(nonce)}"', f'uri="{_quote(digest_uri)}"',
             f'response="{response}"', f"algorithm={algorithm}"]
    if qop is not None:
        parts += [f"qop={qop}", f"nc={nc_text}", f'cnonce="{_quote(cnonce)}"']
    if "opaque" in challenge:
        parts.append(f'opaque="{_quote(challenge["opaque"])}"')
    return ", ".join(parts)


class DigestClient:
    """One account's answers to challenges (a UAC's side of RFC 3261 §22.2-22.3): given a
    401/407 and the request it answers, the header to add to the re-sent request.  Keeps the
    nonce-count of the last nonce only (each challenge brings a fresh one).  The password is
    kept here and nowhere else, and never appears in its repr."""

    __slots__ = ("_nc", "_nonce", "_password", "username")

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self._password = password
        self._nonce = ""
        self._nc = 0

    def __repr__(self) -> str:
        return f"<DigestClient {self.username!r}>"

    def answer(self, response: Response, request: Request) -> tuple[str, str, str] | None:
        """(header name, header value, realm key) for re-sending ``request`` after the
        challenge ``response``; None when it offers nothing we can answer.  The realm key is
        the realm, marked when the challenge says ``stale=true`` (RFC 7616 §3.3: the last
        credentials were right, only the nonce was old), so a caller answering "once per
        realm" answers a stale challenge once more -- and still never loops."""
        picked = _pick_challenge(response)
        if picked is None:
            return None
        name, challenge = picked
        nonce = challenge["nonce"]
        if nonce != self._nonce:
            self._nonce, self._nc = nonce, 0
        self._nc += 1
        value = digest_authorization(challenge, request.method, str(request.uri),
                                     self.username, self._password, nc=self._nc,
                                     cnonce=secrets.token_hex(8))
        stale = challenge.get("stale", "").lower() == "true"
        return name, value, challenge["realm"] + ("\x00stale" if stale else "")


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _same_uri(digest_uri: str, request_uri: URI) -> bool:
    if digest_uri == str(request_uri):
        return True
    try:
        return URI(digest_uri) == request_uri
    except (ParseError, ValueError):
        return False
