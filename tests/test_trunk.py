"""The digest client (RFC 7616 / RFC 8760) and the sans-IO outbound registration state machine
(fastsip.proxy.trunk), driven with exact times against the real server-side authenticator."""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from procutil import posix_only

from fastsip.proxy.auth import (
    Credentials,
    DigestAuthenticator,
    DigestClient,
    digest_authorization,
    parse_auth_params,
)
from fastsip.proxy.trunk import (
    BACKING_OFF,
    FAILED,
    REGISTERED,
    REGISTERING,
    Registration,
    TrunkAuth,
    TrunkBranch,
    TrunkError,
    load_trunk_credentials,
    parse_trunk,
)
from fastsip.sip import Request, Response

# RFC 7616 §3.9.1: the worked example (HTTP, but the digest is the same computation).
RFC7616 = {
    "realm": "http-auth@example.org",
    "nonce": "7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
    "opaque": "FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS",
    "qop": "auth, auth-int",
}
CNONCE = "f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ"


@pytest.mark.parametrize(("algorithm", "expected"), [
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
])
def test_rfc7616_example(algorithm: str, expected: str) -> None:
    value = digest_authorization({**RFC7616, "algorithm": algorithm}, "GET", "/dir/index.html",
                                 "Mufasa", "Circle of Life", nc=1, cnonce=CNONCE)
    scheme, params = parse_auth_params(value)
    assert scheme == "Digest"
    assert params["response"] == expected
    assert params["qop"] == "auth" and params["nc"] == "00000001"
    assert params["opaque"] == RFC7616["opaque"]


def test_sha512_256_is_the_truncated_sha512_variant() -> None:
    # RFC 8760 §2.1 / RFC 7616 §3.3: SHA-512/256 (FIPS 180-4), not SHA-512 cut to 256 bits.
    challenge = {**RFC7616, "algorithm": "SHA-512-256"}
    value = digest_authorization(challenge, "GET", "/dir/index.html", "Mufasa",
                                 "Circle of Life", nc=1, cnonce=CNONCE)

    def h(text: str) -> str:
        return hashlib.new("sha512_256", text.encode()).hexdigest()

    ha1 = h(f"Mufasa:{RFC7616['realm']}:Circle of Life")
    ha2 = h("GET:/dir/index.html")
    want = h(f"{ha1}:{RFC7616['nonce']}:00000001:{CNONCE}:auth:{ha2}")
    assert parse_auth_params(value)[1]["response"] == want
    assert hashlib.sha512(b"x").hexdigest()[:64] != hashlib.new("sha512_256", b"x").hexdigest()


def _register() -> Request:
    return Request.create("REGISTER", "sip:example.com", [
        ("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-1"), ("Max-Forwards", "70"),
        ("From", "<sip:alice@example.com>;tag=1"), ("To", "<sip:alice@example.com>"),
        ("Call-ID", "c1"), ("CSeq", "1 REGISTER"), ("Contact", "<sip:alice@127.0.0.1:5070>")])


@pytest.mark.parametrize("algorithms", [("MD5",), ("SHA-256",), ("SHA-512-256",),
                                        ("MD5", "SHA-256", "SHA-512-256")])
@pytest.mark.parametrize("proxy", [False, True])
def test_client_answers_the_server(algorithms: tuple[str, ...], proxy: bool) -> None:
    creds = Credentials()
    creds.add("alice", password="s3cret")
    server = DigestAuthenticator("example.com", creds, algorithms=algorithms)
    request = _register()
    challenge = server.challenge(request, 100.0, proxy=proxy)
    client = DigestClient("alice", "s3cret")
    answer = client.answer(challenge, request)
    assert answer is not None
    name, value, realm = answer
    assert name == ("Proxy-Authorization" if proxy else "Authorization")
    assert realm == "example.com"
    # The strongest algorithm offered is the one answered (RFC 8760 §2.4).
    assert parse_auth_params(value)[1]["algorithm"] == algorithms[-1] if len(algorithms) > 1 \
        else algorithms[0]
    request.add_header(name, value)
    result = server.authenticate(request, 101.0, proxy=proxy)
    assert result.ok, result.reason
    assert "s3cret" not in repr(client)


def test_client_wrong_password_is_refused() -> None:
    creds = Credentials()
    creds.add("alice", password="right")
    server = DigestAuthenticator("example.com", creds)
    request = _register()
    answer = DigestClient("alice", "wrong").answer(server.challenge(request, 1.0), request)
    assert answer is not None
    request.add_header(answer[0], answer[1])
    assert not server.authenticate(request, 2.0).ok


def test_client_counts_nonce_uses() -> None:
    creds = Credentials()
    creds.add("alice", password="pw")
    server = DigestAuthenticator("example.com", creds)
    client = DigestClient("alice", "pw")
    challenge = server.challenge(_register(), 1.0)
    ncs = []
    for _ in range(3):
        answer = client.answer(challenge, _register())
        assert answer is not None
        ncs.append(parse_auth_params(answer[1])[1]["nc"])
    assert ncs == ["00000001", "00000002", "00000003"]


# -- trunk specs and credentials ----------------------------------------------------------------


def test_parse_trunk() -> None:
    t = parse_trunk("prov=sip:alice@192.0.2.1:5080")
    assert (t.name, t.user, t.register) == ("prov", "alice", True)
    assert t.registrar_uri() == "sip:192.0.2.1:5080"
    assert t.aor() == "sip:alice@192.0.2.1"
    assert not parse_trunk("gw=sip:gw.example.net;register=no").register
    for bad in ("prov", "=sip:a@b", "prov=http://x", "prov=sip:example.net",
                "p r=sip:a@b", "prov=sip:a@b;register=maybe"):
        with pytest.raises(TrunkError):
            parse_trunk(bad)


@posix_only("chmod 600/644 and the mode check: Windows has no group/other permission bits "
            "(st_mode only mirrors the read-only flag; the product skips the check there)")
def test_credentials_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "trunks"
    path.write_text("# provider\nprov:alice:pa:ss\n\nother:bob:x\n")
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING):
        clients = load_trunk_credentials(path)
    assert not caplog.records
    assert clients["prov"].username == "alice" and clients["other"].username == "bob"
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_trunk_credentials(path)
    assert "readable by others" in caplog.text and "pa:ss" not in caplog.text
    path.write_text("prov:alice\n")
    with pytest.raises(TrunkError, match=":1:") as err:
        load_trunk_credentials(path)
    assert "alice" not in str(err.value)


# -- the registration state machine -------------------------------------------------------------


class Provider:
    """A registrar with digest auth, in-process (the real authenticator, no sockets)."""

    def __init__(self, password: str = "pw", expires: int = 60) -> None:
        creds = Credentials()
        creds.add("alice", password=password)
        self.auth = DigestAuthenticator("prov.example", creds)
        self.expires = expires
        self.seen: list[Request] = []

    def answer(self, request: Request, now: float) -> Response:
        self.seen.append(request)
        result = self.auth.authenticate(request, now)
        if not result.ok:
            return self.auth.challenge(request, now)
        contact = request.headers.get("Contact", "").split(";")[0]
        return request.reply(200, to_tag="p1",
                             headers=[("Contact", f"{contact};expires={self.expires}")])


def _registration(**kw: object) -> Registration:
    trunk = parse_trunk("prov=sip:alice@prov.example")
    return Registration(trunk, "sip:alice@127.0.0.1:5060", kw.pop("client", DigestClient("alice", "pw")),  # type: ignore[arg-type]
                        rng=random.Random(1), **kw)  # type: ignore[arg-type]


def _exchange(reg: Registration, provider: Provider, out: list[Request], now: float) -> None:
    while out:
        request = out.pop(0)
        out += reg.receive_response(provider.answer(request, now), now)


def test_registers_with_digest_and_refreshes() -> None:
    provider = Provider(expires=60)
    reg = _registration(expires=3600, margin=30.0)
    out = reg.start(0.0)
    assert reg.state == REGISTERING
    _exchange(reg, provider, out, 0.0)
    assert reg.state == REGISTERED and reg.failures == 0
    assert [r.cseq.seq for r in provider.seen if r.cseq] == [1, 2]
    assert "Authorization" not in provider.seen[0].headers
    assert "Authorization" in provider.seen[1].headers
    assert provider.seen[0].call_id == provider.seen[1].call_id
    # Granted 60 (not the 3600 asked): refresh at max(30, 60-30) = 30 s.
    assert reg.expires_at == 60.0 and reg.get_timer() == 30.0
    assert reg.handle_timer(29.9) == []
    out = reg.handle_timer(30.0)
    assert len(out) == 1 and out[0].cseq is not None and out[0].cseq.seq == 3
    _exchange(reg, provider, out, 30.0)
    assert reg.state == REGISTERED and reg.expires_at == 90.0 and reg.registered_count == 2


def test_short_expiry_refreshes_at_half() -> None:
    provider = Provider(expires=4)
    reg = _registration()
    _exchange(reg, provider, reg.start(0.0), 0.0)
    assert reg.get_timer() == 2.0


def test_wrong_password_backs_off_exponentially_capped() -> None:
    provider = Provider(password="other")
    reg = _registration(retry_min=30.0, retry_max=3600.0)
    now = 0.0
    out = reg.start(now)
    delays = []
    for _ in range(12):
        _exchange(reg, provider, out, now)
        assert reg.state == FAILED
        t = reg.get_timer()
        assert t is not None
        delays.append(t - now)
        now = t
        out = reg.handle_timer(now)
    # Two REGISTERs per attempt (one challenge answered, never a second time).
    assert len(provider.seen) == 24
    assert all(d1 >= d0 * 1.4 or d1 >= 3600 * 0.75 for d0, d1 in itertools.pairwise(delays))
    assert 22.5 <= delays[0] <= 30.0
    assert max(delays) <= 3600.0 and delays[-1] >= 2700.0


def test_timeout_backs_off_then_recovers() -> None:
    provider = Provider()
    reg = _registration()
    reg.start(0.0)
    reg.transaction_failed(32.0)
    assert reg.state == BACKING_OFF and reg.failures == 1
    t = reg.get_timer()
    assert t is not None and 32.0 + 22.5 <= t <= 62.0
    _exchange(reg, provider, reg.handle_timer(t), t)
    assert reg.state == REGISTERED and reg.failures == 0


def test_403_and_stale_responses() -> None:
    reg = _registration()
    first = reg.start(0.0)[0]
    older = first.reply(200, to_tag="x")
    reg.cseq += 0
    forbidden = first.reply(403, to_tag="x")
    assert reg.receive_response(first.reply(100), 0.1) == []
    assert reg.receive_response(forbidden, 0.2) == []
    assert reg.state == FAILED and reg.last_status == 403
    # A late 200 for an older CSeq does not count once a newer REGISTER went.
    reg.handle_timer(reg.get_timer() or 0.0)
    assert reg.receive_response(older, 100.0) == [] and reg.state != REGISTERED


def test_423_asks_min_expires() -> None:
    reg = _registration(expires=30)
    first = reg.start(0.0)[0]
    out = reg.receive_response(first.reply(423, to_tag="x", headers=[("Min-Expires", "120")]),
                               0.1)
    assert len(out) == 1 and out[0].headers.get("Expires") == "120"


def test_no_credentials_fails_on_challenge() -> None:
    provider = Provider()
    reg = _registration(client=None)
    _exchange(reg, provider, reg.start(0.0), 0.0)
    assert reg.state == FAILED and len(provider.seen) == 1


# -- the core's dialog CSeq shifts --------------------------------------------------------------


def _in_dialog(method: str, frm: str, to: str, seq: int, call_id: str = "c1") -> Request:
    return Request.create(method, "sip:x@127.0.0.1", [
        ("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-x"), ("Max-Forwards", "70"),
        ("From", f"<sip:a@h>;tag={frm}"), ("To", f"<sip:b@h>;tag={to}"),
        ("Call-ID", call_id), ("CSeq", f"{seq} {method}")])


def _answered(auth: TrunkAuth, call_id: str, now: float, shift: int = 1) -> None:
    invite = Request.create("INVITE", "sip:x@127.0.0.1", [
        ("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-y"), ("Max-Forwards", "70"),
        ("From", "<sip:a@h>;tag=caller"), ("To", "<sip:b@h>"), ("Call-ID", call_id),
        ("CSeq", "1 INVITE")])
    tb = TrunkBranch("prov", shift)
    auth.dialog_answered(tb, invite, invite.reply(200, to_tag="prov"), now)


def test_shift_direction_and_bounds() -> None:
    auth = TrunkAuth({}, max_dialogs=3, max_age=100.0)
    _answered(auth, "c1", 0.0, shift=2)
    ours = _in_dialog("INFO", "caller", "prov", 5)
    copy = ours.copy()
    tb = auth.branch(ours, copy, None, 1.0)
    assert tb is not None and tb.name == "prov" and tb.shift == 2
    assert copy.cseq is not None and copy.cseq.seq == 7
    theirs = _in_dialog("INFO", "prov", "caller", 5)
    copy = theirs.copy()
    assert auth.branch(theirs, copy, None, 1.0) is None       # the provider's: untouched
    assert copy.cseq is not None and copy.cseq.seq == 5
    ack = _in_dialog("ACK", "caller", "prov", 1)
    auth.shift_ack(ack)
    assert ack.cseq is not None and ack.cseq.seq == 3
    # Capped: the least recently used go first.
    for n in range(2, 6):
        _answered(auth, f"c{n}", 2.0 + n)
    assert len(auth.dialogs) == 3 and ("c1", "caller", "prov") not in auth.dialogs
    # Unused for max_age: gone when the next dialog is recorded.
    _answered(auth, "c9", 500.0)
    assert list(auth.dialogs) == [("c9", "caller", "prov")]
    # A BYE from either side ends it (and is itself still shifted when it is the caller's).
    bye = _in_dialog("BYE", "prov", "caller", 9, call_id="c9")
    auth.branch(bye, bye.copy(), None, 501.0)
    assert auth.dialogs == {}


def test_stale_challenge_is_answered_once_more() -> None:
    creds = Credentials()
    creds.add("alice", password="pw")
    server = DigestAuthenticator("prov.example", creds)
    reg = _registration()
    first = reg.start(0.0)[0]
    (second,) = reg.receive_response(server.challenge(first, 0.0), 0.0)
    assert "Authorization" in second.headers
    # The nonce went stale meanwhile (RFC 7616 §3.3): the credentials were right; once more.
    (third,) = reg.receive_response(server.challenge(second, 0.1, stale=True), 0.1)
    assert third.cseq is not None and third.cseq.seq == 3
    # A plain challenge again: refused, no loop.
    assert reg.receive_response(server.challenge(third, 0.2), 0.2) == []
    assert reg.state == FAILED


def test_granted_interval_sources() -> None:
    reg = _registration(expires=3600)
    first = reg.start(0.0)[0]
    # Our Contact rewritten by a NATing provider, alone in the 200: its expires counts.
    reg.receive_response(first.reply(200, to_tag="x", headers=[
        ("Contact", "<sip:alice@203.0.113.7:40000>;expires=120")]), 0.0)
    assert reg.state == REGISTERED and reg.expires_at == 120.0
    # Several bindings, ours among them: ours counts, not the others'.
    assert reg.get_timer() == 60.0           # max(120 / 2, 120 - 90)
    second = reg.handle_timer(60.0)[0]
    reg.receive_response(second.reply(200, to_tag="x", headers=[
        ("Contact", "<sip:other@192.0.2.1>;expires=30"),
        ("Contact", "<sip:alice@127.0.0.1:5060>;expires=600")]), 60.0)
    assert reg.expires_at == 660.0
    assert reg.get_timer() == 570.0          # max(60 + 300, 660 - 90)
    # No Contact at all: the Expires header.
    third = reg.handle_timer(reg.get_timer() or 0.0)[0]
    reg.receive_response(third.reply(200, to_tag="x", headers=[("Expires", "50")]), 700.0)
    assert reg.expires_at == 750.0
