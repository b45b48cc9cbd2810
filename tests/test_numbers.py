"""Number handling: E.164 normalization (RFC 3966 separators, national prefixes), and the RFC
3325 trust boundary for P-Asserted-Identity -- as helpers, in the Router's default policy,
and end to end through ``fastsip serve`` to a sipp callee that shows what it received."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastsip.app import Router
from fastsip.app.numbers import (
    NumberError,
    assert_preferred_identity,
    normalize_e164,
    privacy_id,
    strip_untrusted_identity,
    withhold_identity,
)
from fastsip.proxy import MemoryLocationStore, Registrar
from fastsip.sip import URI

sys.path.insert(0, str(Path(__file__).parent))
from procutil import free_port
from serveutil import (
    DOMAIN,
    HOST,
    SIPP,
    Serve,
    finish,
    register,
    request,
    sip_exchange,
    sipp,
    stop,
    successful,
)
from test_examples import PBX, STRANGER, TRUSTED, decide, sip

# -- E.164 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("tel:+44-20-7946-0000", "+442079460000"),
    ("tel:+1.555.123.4567;ext=12", "+15551234567"),
    ("+44 (20) 7946 0000", "+442079460000"),
    ("0044 20 7946 0000", "+442079460000"),
    ("sip:+442079460000@gw.example.net;user=phone", "+442079460000"),
    ("sip:+44-20-7946-0000;isub=1@gw.example.net;user=phone", "+442079460000"),
    (URI("tel:+442079460000"), "+442079460000"),
])
def test_normalize_international(value: str | URI, expected: str) -> None:
    assert normalize_e164(value) == expected


def test_normalize_national_prefix_rule() -> None:
    assert normalize_e164("020 7946 0000", country_code="44",
                          national_prefix="0") == "+442079460000"
    assert normalize_e164("sip:020-7946-0000@example.com;user=phone", country_code="+44",
                          national_prefix="0") == "+442079460000"
    # France: 0 national prefix, 33 country code.
    assert normalize_e164("01 23 45 67 89", country_code="33",
                          national_prefix="0") == "+33123456789"
    with pytest.raises(NumberError):
        normalize_e164("020 7946 0000")              # national, and no rule given


@pytest.mark.parametrize("bad", ["bob", "+44abc", "+1", "+1234567890123456", "sip:gw.example",
                                 "7042"])
def test_normalize_rejects_what_is_not_a_number(bad: str) -> None:
    with pytest.raises(NumberError):
        normalize_e164(bad, country_code="44", national_prefix="0")


def test_router_exports_the_helper() -> None:
    from fastsip.app.router import normalize_e164 as exported

    assert exported is normalize_e164


def test_request_number_in_routes() -> None:
    from fastsip.app.router import Request as RoutingRequest

    router = Router(trusted=TRUSTED)
    seen: list[str | None] = []
    for n, uri in enumerate(("tel:+44-20-7946-0000", "sip:020-7946-0000@example.com;user=phone",
                             f"sip:bob@{DOMAIN}"), start=1):
        ctx = decide(router, sip("INVITE", uri, n=n))
        req = ctx.data
        assert isinstance(req, RoutingRequest)
        seen.append(req.number(country_code="44", national_prefix="0"))
    assert seen == ["+442079460000", "+442079460000", None]


# -- RFC 3325 helpers ----------------------------------------------------------------------------

PAI = "P-Asserted-Identity: <sip:+442079460000@example.com>"


def test_identity_helpers() -> None:
    req = sip("INVITE", f"sip:bob@{DOMAIN}", headers=[PAI])
    assert not strip_untrusted_identity(req, True) and "P-Asserted-Identity" in req.headers
    assert strip_untrusted_identity(req, False) and "P-Asserted-Identity" not in req.headers

    req = sip("INVITE", f"sip:bob@{DOMAIN}", headers=[PAI, "Privacy: header;id"])
    assert privacy_id(req)
    assert not withhold_identity(req, True)
    assert withhold_identity(req, False) and "P-Asserted-Identity" not in req.headers
    req = sip("INVITE", f"sip:bob@{DOMAIN}", headers=[PAI, "Privacy: none"])
    assert not privacy_id(req) and not withhold_identity(req, False)

    req = sip("INVITE", f"sip:bob@{DOMAIN}",
              headers=['P-Preferred-Identity: "Alice" <sip:alice@example.com>'])
    assert not assert_preferred_identity(req, None)              # not authenticated
    assert assert_preferred_identity(req, "alice")
    assert req.headers.get("P-Asserted-Identity") == '"Alice" <sip:alice@example.com>'
    assert "P-Preferred-Identity" not in req.headers
    req = sip("INVITE", f"sip:bob@{DOMAIN}",
              headers=["P-Preferred-Identity: <sip:ceo@example.com>"])
    assert not assert_preferred_identity(req, "alice")           # someone else: dropped
    assert "P-Asserted-Identity" not in req.headers and "P-Preferred-Identity" not in req.headers


def test_router_default_policy_strips_pai_from_untrusted_sources() -> None:
    registrar = Registrar(MemoryLocationStore(), domains=[DOMAIN])
    router = Router(registrar=registrar, trusted=TRUSTED, wallclock=lambda: 1e6)
    outside = sip("INVITE", "sip:+15551234567@gw.example.net", headers=[PAI])
    decide(router, outside, STRANGER)
    assert "P-Asserted-Identity" not in outside.headers
    inside = sip("INVITE", "sip:+15551234567@gw.example.net", headers=[PAI], n=2)
    ctx = decide(router, inside, PBX)
    assert ctx.forwarded and inside.headers.get("P-Asserted-Identity") is not None
    # Privacy: id from a trusted PBX to a gateway outside the trust domain: withheld.
    private = sip("INVITE", "sip:+15551234567@gw.example.net", headers=[PAI, "Privacy: id"],
                  n=3)
    decide(router, private, PBX)
    assert "P-Asserted-Identity" not in private.headers
    # ... but kept toward a trusted next hop (the other PBX).
    private = sip("INVITE", "sip:+15551234567@192.0.2.11", headers=[PAI, "Privacy: id"], n=4)
    decide(router, private, PBX)
    assert private.headers.get("P-Asserted-Identity") is not None
    # A routes author may take the policy over.
    router.identity_policy = False
    outside = sip("INVITE", f"sip:bob@{DOMAIN}", headers=[PAI], n=5)
    decide(router, outside, STRANGER)
    assert "P-Asserted-Identity" in outside.headers


# -- end to end: what the callee receives ----------------------------------------------------------

needs_sipp = pytest.mark.skipif(SIPP is None, reason="sipp (sip-tester) is not installed")

CALLEE_HOST = "127.0.0.2"   # an untrusted next hop: only 127.0.0.1 is --trusted below


def received_invites(msg_file: Path) -> list[str]:
    out = []
    for block in msg_file.read_text().split("----------------------------------------------- ")[1:]:
        _, _, rest = block.partition("\n")
        head, _, body = rest.partition("\n")
        body = body.lstrip()
        if "message received" in head and body.startswith("INVITE "):
            out.append(body)
    return out


def call_with(tmp_path: Path, name: str, extra_headers: list[str], *serve_args: str) -> str:
    """Register bob at a busy sipp callee on CALLEE_HOST, call him through serve with
    ``extra_headers`` from 127.0.0.1, and return the INVITE the callee received."""
    callee_port = free_port(CALLEE_HOST)
    callee = sipp("uas_busy.xml", tmp_path, f"{name}-callee", "-p", str(callee_port), "-m", "1",
                  background=True, timeout=20, host=CALLEE_HOST)
    serve = Serve(tmp_path, free_port(), *serve_args)
    try:
        register(tmp_path, f"{name}-reg", serve.port, "bob", callee_port,
                 contact_host=CALLEE_HOST)
        assert successful(tmp_path, f"{name}-reg") == 1, serve.log()
        invite = request("INVITE", f"sip:bob@{DOMAIN}", call_id=name, headers=extra_headers)
        lines = sip_exchange(serve.port, invite)
        assert lines and lines[-1].startswith("SIP/2.0 486"), (lines, serve.log()[-2000:])
        finish(callee, 15)
    finally:
        serve.close()
        stop(callee)
    (received,) = received_invites(tmp_path / f"{name}-callee.msg")
    return received


@needs_sipp
def test_serve_strips_pai_from_an_untrusted_source(tmp_path: Path) -> None:
    received = call_with(tmp_path, "untrusted", [PAI])
    assert "p-asserted-identity" not in received.lower()


@needs_sipp
def test_serve_keeps_pai_from_a_trusted_source(tmp_path: Path) -> None:
    received = call_with(tmp_path, "trusted", [PAI], "--trusted", f"{HOST}/32")
    assert "P-Asserted-Identity: <sip:+442079460000@example.com>" in received


@needs_sipp
def test_serve_withholds_pai_under_privacy_id(tmp_path: Path) -> None:
    received = call_with(tmp_path, "private", [PAI, "Privacy: id"], "--trusted", f"{HOST}/32")
    assert "p-asserted-identity" not in received.lower()
    assert "Privacy: id" in received


def test_authenticated_users_preferred_identity_becomes_asserted() -> None:
    """RFC 3325 §6 through the proxy core: bob authenticates (407, then credentials) and
    prefers an identity of his; the gateway receives it as P-Asserted-Identity, and no PPI.
    Another user's identity preferred by bob is asserted for nobody."""
    from test_app import app, authorization, default_router
    from test_proxy_net import Raw, raw_request

    from fastsip.proxy import Credentials, DigestAuthenticator

    creds = Credentials()
    creds.add("bob", password="secret")
    auth = DigestAuthenticator(DOMAIN, creds, algorithms=("MD5",))
    net, _proxy, up = app(default_router(authenticator=auth))
    gw = Raw(net, "gw", 5090, auto=lambda r: r.reply(200, to_tag="g"))
    uri = "sip:+15551234567@127.0.0.1:5090"

    def invite(preferred: str, call_id: str, credentials: str = "", cseq: int = 1) -> None:
        up.send_to(raw_request("INVITE", uri, call_id=call_id, cseq=cseq, extra=(
            f"P-Preferred-Identity: {preferred}\n{credentials}")).replace(
            "From: <sip:alice@127.0.0.1:5071>", f"From: <sip:bob@{DOMAIN}>"))

    for n, preferred in enumerate(("<sip:bob@example.com>", "<sip:ceo@example.com>")):
        invite(preferred, f"ppi{n}")
        net.run(0.2 + n)
        challenge = up.responses()[-1]
        assert challenge.status_code == 407
        value = authorization(challenge, "bob", "secret", "INVITE", uri, "Proxy-Authenticate")
        invite(preferred, f"ppi{n}", f"Proxy-Authorization: {value}\n", cseq=2)
        net.run(0.5 + n)
    first, second = gw.requests("INVITE")
    assert first.headers.getall("P-Asserted-Identity") == ["<sip:bob@example.com>"]
    assert "P-Preferred-Identity" not in first.headers
    assert "P-Asserted-Identity" not in second.headers
    assert "P-Preferred-Identity" not in second.headers
