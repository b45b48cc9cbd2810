"""Digest authentication: known vectors, the challenge/response round trip, and its failures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from fastsip import Request, Response, parse
from fastsip.proxy.auth import (
    AuthResult,
    Credentials,
    CredentialsError,
    DigestAuthenticator,
    digest_response,
    parse_auth_params,
)

REALM = "example.com"
T0 = 1_700_000_000.0


def H(algorithm: str, text: str) -> str:
    return hashlib.new({"MD5": "md5", "SHA-256": "sha256"}[algorithm], text.encode()).hexdigest()


def request(
    *auth: str, method: str = "REGISTER", ruri: str = "sip:example.com", header: str = ""
) -> Request:
    name = header or "Authorization"
    lines = [
        f"{method} {ruri} SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-auth",
        "Max-Forwards: 70",
        "To: <sip:alice@example.com>",
        "From: <sip:alice@example.com>;tag=1928301774",
        "Call-ID: auth-test@192.0.2.10",
        f"CSeq: 2 {method}",
        *(f"{name}: {a}" for a in auth),
        "Content-Length: 0",
        "",
        "",
    ]
    msg = parse("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg


def answer(
    challenge: Response,
    *,
    user: str = "alice",
    password: str = "secret",
    method: str = "REGISTER",
    uri: str = "sip:example.com",
    nc: int = 1,
    cnonce: str = "0a4f113b",
    pick: str = "MD5",
    proxy: bool = False,
    nonce: str | None = None,
    qop: bool = True,
) -> str:
    """What a client puts in Authorization for ``challenge`` (the header of algorithm ``pick``)."""
    name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
    for line in challenge.headers.getlines(name):
        _, p = parse_auth_params(line)
        if p["algorithm"] == pick:
            break
    else:
        raise AssertionError(f"no {pick} challenge")
    nonce = nonce or p["nonce"]
    ha1 = H(pick, f"{user}:{p['realm']}:{password}")
    ncs = f"{nc:08x}"
    if qop:
        resp = digest_response(pick, ha1, nonce, method, uri, qop="auth", nc=ncs, cnonce=cnonce)
        extra = f', qop=auth, nc={ncs}, cnonce="{cnonce}"'
    else:
        resp = digest_response(pick, ha1, nonce, method, uri)
        extra = ""
    return (
        f'Digest username="{user}", realm="{p["realm"]}", nonce="{nonce}", uri="{uri}",'
        f' response="{resp}", algorithm={pick}, opaque="{p["opaque"]}"{extra}'
    )


@pytest.fixture
def creds() -> Credentials:
    c = Credentials()
    c.add("alice", password="secret")
    return c


@pytest.fixture
def auth(creds: Credentials) -> DigestAuthenticator:
    return DigestAuthenticator(REALM, creds, secret=b"k" * 32)


# -- known vectors ---------------------------------------------------------------------------


def test_rfc2617_md5_vector() -> None:
    ha1 = H("MD5", "Mufasa:testrealm@host.com:Circle Of Life")
    got = digest_response(
        "MD5",
        ha1,
        "dcd98b7102dd2f0e8b11d0f600bfb0c093",
        "GET",
        "/dir/index.html",
        qop="auth",
        nc="00000001",
        cnonce="0a4f113b",
    )
    assert got == "6629fae49393a05397450978507c4ef1"


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
        ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
    ],
)
def test_rfc7616_vectors(algorithm: str, expected: str) -> None:
    """RFC 7616 §3.9.1: the same exchange answered with MD5 and with SHA-256."""
    ha1 = H(algorithm, "Mufasa:http-auth@example.org:Circle of Life")
    got = digest_response(
        algorithm,
        ha1,
        "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
        "GET",
        "/dir/index.html",
        qop="auth",
        nc="00000001",
        cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ",
    )
    assert got == expected


def test_rfc2617_vector_through_the_authenticator_with_ha1_credentials() -> None:
    """An HA1-only credentials entry verifies a real exchange without knowing the password."""
    creds = Credentials.from_lines(
        [f"Mufasa:md5:{H('MD5', 'Mufasa:testrealm@host.com:Circle Of Life')}"]
    )
    a = DigestAuthenticator("testrealm@host.com", creds, algorithms=["MD5"])
    ch = a.challenge(request(), T0)
    req = request(
        answer(ch, user="Mufasa", password="Circle Of Life", uri="sip:example.com"),
    )
    assert a.authenticate(req, T0 + 1) == AuthResult(True, "Mufasa")


# -- the challenge ---------------------------------------------------------------------------


def test_challenge_401_sha256_first(auth: DigestAuthenticator) -> None:
    ch = auth.challenge(request(), T0)
    assert ch.status_code == 401
    lines = ch.headers.getlines("WWW-Authenticate")
    parsed = [parse_auth_params(line) for line in lines]
    assert [p["algorithm"] for _, p in parsed] == ["SHA-256", "MD5"]
    for scheme, p in parsed:
        assert scheme == "Digest" and p["realm"] == REALM and p["qop"] == "auth"
        assert p["nonce"] == parsed[0][1]["nonce"] and p["opaque"] and "stale" not in p
    assert auth.challenge(request(), T0).headers.getlines("WWW-Authenticate") != lines


def test_proxy_challenge_407(auth: DigestAuthenticator) -> None:
    ch = auth.challenge(request(method="INVITE", ruri="sip:bob@example.com"), T0, proxy=True)
    assert ch.status_code == 407 and ch.headers.getlines("WWW-Authenticate") == []
    assert len(ch.headers.getlines("Proxy-Authenticate")) == 2
    cred = answer(ch, method="INVITE", uri="sip:bob@example.com", proxy=True, pick="SHA-256")
    req = request(cred, method="INVITE", ruri="sip:bob@example.com", header="Proxy-Authorization")
    assert auth.authenticate(req, T0 + 1, proxy=True).ok
    # The same credentials in Authorization are not proxy credentials.
    req = request(cred, method="INVITE", ruri="sip:bob@example.com")
    assert not auth.authenticate(req, T0 + 1, proxy=True).ok


# -- verification ----------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_round_trip(auth: DigestAuthenticator, algorithm: str) -> None:
    ch = auth.challenge(request(), T0)
    result = auth.authenticate(request(answer(ch, pick=algorithm)), T0 + 2)
    assert result == AuthResult(True, "alice")


def test_no_credentials_and_authorize(auth: DigestAuthenticator) -> None:
    result = auth.authenticate(request(), T0)
    assert not result.ok and result.user is None
    outcome = auth.authorize(request(), T0)
    assert isinstance(outcome, Response) and outcome.status_code == 401
    ok = auth.authorize(request(answer(outcome)), T0 + 1)
    assert ok == AuthResult(True, "alice")


def test_wrong_password_rejected(auth: DigestAuthenticator) -> None:
    ch = auth.challenge(request(), T0)
    result = auth.authenticate(request(answer(ch, password="guess")), T0 + 1)
    assert not result.ok and not result.stale and "wrong response" in result.reason
    unknown = auth.authenticate(request(answer(ch, user="mallory")), T0 + 1)
    assert not unknown.ok


def test_stale_nonce_flagged_and_rechallenged(auth: DigestAuthenticator) -> None:
    ch = auth.challenge(request(), T0)
    late = T0 + auth.nonce_ttl + 1
    result = auth.authenticate(request(answer(ch)), late)
    assert result == AuthResult(False, "alice", stale=True, reason="nonce expired")
    outcome = auth.authorize(request(answer(ch, nc=2)), late)
    assert isinstance(outcome, Response)
    assert all("stale=TRUE" in v for v in outcome.headers.getlines("WWW-Authenticate"))
    # A stale nonce with a wrong password is just wrong, not stale.
    assert not auth.authenticate(request(answer(ch, password="x", nc=3)), late).stale
    # Within the lifetime it is fine.
    assert auth.authenticate(request(answer(ch, nc=4)), T0 + auth.nonce_ttl).ok


def test_nonce_count_replay_rejected(auth: DigestAuthenticator) -> None:
    ch = auth.challenge(request(), T0)
    first = request(answer(ch, nc=1))
    assert auth.authenticate(first, T0 + 1).ok
    replay = auth.authenticate(first, T0 + 2)
    assert not replay.ok and "replayed" in replay.reason
    assert auth.authenticate(request(answer(ch, nc=3)), T0 + 3).ok
    assert not auth.authenticate(request(answer(ch, nc=2)), T0 + 4).ok  # lower than seen
    assert auth.authenticate(request(answer(ch, nc=4)), T0 + 5).ok


def test_nonce_count_memory_is_bounded(auth: DigestAuthenticator) -> None:
    for i in range(50):
        ch = auth.challenge(request(), T0 + i)
        assert auth.authenticate(request(answer(ch)), T0 + i).ok
    assert len(auth._nc) == 50
    auth.authenticate(request(), T0 + 48.5 + auth.nonce_ttl)
    assert len(auth._nc) == 1  # only the nonce issued at T0+49 can still be used


def test_tampered_and_foreign_nonces_rejected(auth: DigestAuthenticator) -> None:
    ch = auth.challenge(request(), T0)
    _, p = parse_auth_params(ch.headers.getlines("WWW-Authenticate")[0])
    nonce = p["nonce"]
    # Move the issue time forward by flipping a timestamp bit, and re-sign the response: the
    # HMAC no longer matches.
    flipped = ("B" if nonce[5] != "B" else "C").join((nonce[:5], nonce[6:]))
    for bad in (flipped, nonce[:-2], "not base64 !", "dcd98b7102dd2f0e8b11d0f600bfb0c093"):
        result = auth.authenticate(request(answer(ch, nonce=bad)), T0 + 1)
        assert not result.ok and not result.stale and result.reason == "nonce not issued by us"
    other = DigestAuthenticator(REALM, auth.credentials, secret=b"other")
    ch2 = other.challenge(request(), T0)
    assert not auth.authenticate(request(answer(ch2)), T0 + 1).ok


def test_realm_uri_algorithm_qop_checks(auth: DigestAuthenticator) -> None:
    ch = auth.challenge(request(), T0)
    good = answer(ch)
    # Credentials for another realm are ignored; ours among several are found.
    other = good.replace(f'realm="{REALM}"', 'realm="elsewhere.net"')
    assert not auth.authenticate(request(other), T0 + 1).ok
    assert auth.authenticate(request(other, good), T0 + 1).ok
    # The digest uri must be the Request-URI.
    wrong_uri = answer(ch, uri="sip:attacker.example", nc=2)
    result = auth.authenticate(request(wrong_uri), T0 + 1)
    assert not result.ok and "Request-URI" in result.reason
    # An algorithm we did not offer, and qop=auth-int, are refused.
    md5_only = DigestAuthenticator(REALM, auth.credentials, algorithms=["MD5"], secret=b"k" * 32)
    ch_sha = auth.challenge(request(), T0)
    assert not md5_only.authenticate(request(answer(ch_sha, pick="SHA-256")), T0 + 1).ok
    auth_int = answer(ch, nc=5).replace("qop=auth", "qop=auth-int")
    assert "qop" in auth.authenticate(request(auth_int), T0 + 1).reason
    # A wrong opaque is refused.
    bad_opaque = answer(ch, nc=6).replace(f'opaque="{auth.opaque}"', 'opaque="x"')
    assert not auth.authenticate(request(bad_opaque), T0 + 1).ok
    # Unknown schemes (RFC 4475 regaut01) are no credentials at all.
    assert not auth.authenticate(request("NoOneKnowsThisScheme opaque-data=here"), T0).ok


def test_rfc2069_without_qop_only_when_allowed(creds: Credentials) -> None:
    strict = DigestAuthenticator(REALM, creds)
    ch = strict.challenge(request(), T0)
    assert not strict.authenticate(request(answer(ch, qop=False)), T0 + 1).ok
    lenient = DigestAuthenticator(REALM, creds, allow_no_qop=True)
    ch = lenient.challenge(request(), T0)
    cred = answer(ch, qop=False)
    assert lenient.authenticate(request(cred), T0 + 1).ok
    assert not lenient.authenticate(request(cred), T0 + 2).ok  # one request per nonce


def test_malformed_credentials(auth: DigestAuthenticator) -> None:
    for bad in ('Digest username="alice, realm="x"', "Digest username", 'Digest realm="a" "b"'):
        assert not auth.authenticate(request(bad), T0).ok


def test_parse_auth_params_quoting() -> None:
    scheme, p = parse_auth_params(
        'Digest username="a\\"b", realm="r, with comma",nc=00000001 , qop=auth'
    )
    assert scheme == "Digest"
    assert p == {"username": 'a"b', "realm": "r, with comma", "nc": "00000001", "qop": "auth"}


# -- the credentials file --------------------------------------------------------------------


def test_credentials_file_forms(tmp_path: Path) -> None:
    md5 = H("MD5", f"carol:{REALM}:pw")
    sha = H("SHA-256", f"carol:{REALM}:pw")
    path = tmp_path / "users"
    path.write_text(
        "# users of example.com\n"
        "\n"
        "alice:secret\n"
        "bob:example.com:pa:ss#1\n"
        "bob:other.org:different\n"
        f"carol:md5:{md5.upper()}\n"
        f"  carol:sha256:{sha}  \n",
        encoding="utf-8",
    )
    creds = Credentials.from_file(path)
    assert creds.ha1("alice", REALM, "MD5") == H("MD5", f"alice:{REALM}:secret")
    assert creds.ha1("bob", REALM, "SHA-256") == H("SHA-256", f"bob:{REALM}:pa:ss#1")
    assert creds.ha1("bob", "other.org", "MD5") == H("MD5", "bob:other.org:different")
    assert creds.ha1("bob", "third.net", "MD5") is None
    assert creds.ha1("carol", REALM, "MD5") == md5
    assert creds.ha1("carol", REALM, "SHA-256") == sha
    assert creds.ha1("nobody", REALM, "MD5") is None


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("alice:x\nnocolon\n", 2),
        ("# c\n:pw\n", 2),
        ("alice:x\nalice:y\n", 2),
        ("carol:md5:abc\n", 1),
        ("carol:sha256:" + "0" * 32 + "\n", 1),
        ("dave::pw\n", 1),
    ],
)
def test_credentials_file_errors_name_the_line(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "users"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CredentialsError) as info:
        Credentials.from_file(path)
    assert info.value.line == line and f"{path}:{line}:" in str(info.value)


def test_credentials_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read"):
        Credentials.from_file(tmp_path / "absent")
