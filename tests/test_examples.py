"""The routes modules in ``examples/`` load with :func:`fastsip.app.load_routes` and decide as
their docstrings say.  Sans-IO: the real :class:`~fastsip.app.Router` (with a registrar over an
in-memory store) runs each module's hooks against a recording context in place of the proxy
core, so what is checked is the decision -- targets, serial or parallel, or the response."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from fastsip.app import Router, load_routes
from fastsip.proxy import MemoryLocationStore, Registrar
from fastsip.proxy.core import Target
from fastsip.proxy.edge import TrustedNetworks
from fastsip.sip import Request, Response, parse
from fastsip.transport import Address

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DOMAIN = "example.com"
NOW = 1_000_000.0
pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="no examples/ beside the tests")


class Ctx:
    """Records what the router decided (the ProxyContext shape, stateful)."""

    def __init__(self, request: Request, source: Address) -> None:
        self.request = request
        self.source = source
        self.proxy: Any = None  # the router asks the proxy only whether a host is us
        self.data: Any = None
        self.forwarded: list[tuple[list[Target], bool]] = []
        self.responses: list[int] = []

    @property
    def stateless(self) -> bool:
        return False

    @property
    def done(self) -> bool:
        return bool(self.responses) and self.responses[-1] >= 200

    def forward(self, targets: Iterable[Target], *, parallel: bool = True) -> None:
        self.forwarded.append((list(targets), parallel))

    def respond(self, status: int | Response, reason: str | None = None, *,
                headers: Iterable[tuple[str, str]] = (), stateless: bool | None = None) -> None:
        self.responses.append(status.status_code if isinstance(status, Response) else status)

    def uris(self, n: int = -1) -> list[str]:
        return [str(t.uri) for t in self.forwarded[n][0]]


#: The trust domain of these tests: a PBX/SBC of ours (``--trusted``).
TRUSTED = TrustedNetworks(["192.0.2.10", "192.0.2.11"])


def router_for(example: str) -> Router:
    registrar = Registrar(MemoryLocationStore(), domains=[DOMAIN])
    return Router(load_routes(EXAMPLES / example), registrar=registrar, wallclock=lambda: NOW,
                  trusted=TRUSTED)


def sip(method: str, uri: str, *, from_user: str = "alice", from_domain: str = DOMAIN,
        headers: Iterable[str] = (), n: int = 1, to: str | None = None) -> Request:
    lines = [
        f"{method} {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bK-ex{n}",
        "Max-Forwards: 70",
        f"From: <sip:{from_user}@{from_domain}>;tag=f{n}",
        f"To: <{to or uri}>",
        f"Call-ID: ex{n}@198.51.100.7",
        f"CSeq: 1 {method}",
        *headers,
        "Content-Length: 0",
    ]
    msg = parse(("\r\n".join(lines) + "\r\n\r\n").encode())
    assert isinstance(msg, Request)
    return msg


#: A phone somewhere on the internet (untrusted), and a PBX of ours (trusted).
STRANGER = Address("UDP", "198.51.100.7", 5060)
PBX = Address("UDP", "192.0.2.10", 5060)
SOURCE = PBX


def decide(router: Router, request: Request, source: Address = SOURCE) -> Ctx:
    ctx = Ctx(request, source)
    router.on_request(ctx)
    return ctx


def register(router: Router, user: str, contact: str) -> None:
    ctx = decide(router, sip("REGISTER", f"sip:{DOMAIN}", from_user=user,
                             to=f"sip:{user}@{DOMAIN}",
                             headers=[f"Contact: <{contact}>", "Expires: 3600"]))
    assert ctx.responses == [200], ctx.responses


# -- every example loads and has a request hook ------------------------------------------------


@pytest.mark.parametrize("example", ["lcr.py", "failover.py", "header_rule.py"])
def test_example_loads(example: str) -> None:
    routes = load_routes(EXAMPLES / example)
    assert routes.request is not None
    assert (EXAMPLES / example).read_text(encoding="utf-8").count("fastsip serve") >= 1  # says how to run it


# -- lcr.py -----------------------------------------------------------------------------------


def test_lcr_longest_prefix_cheapest_first_serial() -> None:
    router = router_for("lcr.py")
    ctx = decide(router, sip("INVITE", f"sip:+442079460000@{DOMAIN}"))
    assert ctx.uris() == ["sip:+442079460000@gw-b.example.net",
                          "sip:+442079460000@gw-a.example.net"]
    assert ctx.forwarded[0][1] is False  # serial: the next only when one fails
    ctx = decide(router, sip("INVITE", f"sip:+441619460000@{DOMAIN}", n=2))
    assert ctx.uris() == ["sip:+441619460000@gw-a.example.net",
                          "sip:+441619460000@gw-b.example.net"]


def test_lcr_normalizes_dialled_numbers() -> None:
    from importlib import util

    spec = util.spec_from_file_location("lcr_example", EXAMPLES / "lcr.py")
    assert spec is not None and spec.loader is not None
    lcr = util.module_from_spec(spec)
    spec.loader.exec_module(lcr)
    assert lcr.normalize("0044 20-7946.0000") == "+442079460000"
    assert lcr.normalize("bob") is None
    assert lcr.gateways("+15551234567")[0] == "sip:gw-us.example.net"
    assert lcr.gateways("+999") == []


def test_lcr_refuses_strangers_and_unknown_prefixes() -> None:
    router = router_for("lcr.py")
    ctx = decide(router, sip("INVITE", f"sip:+442079460000@{DOMAIN}",
                             from_domain="elsewhere.example"), STRANGER)
    assert ctx.responses == [403] and not ctx.forwarded
    # A From that claims our domain proves nothing: without authentication the relay policy
    # refuses to hand the call to a gateway (toll fraud).
    ctx = decide(router, sip("INVITE", f"sip:+442079460000@{DOMAIN}", n=3), STRANGER)
    assert ctx.responses == [403] and not ctx.forwarded
    ctx = decide(router, sip("INVITE", f"sip:+999123@{DOMAIN}", n=2))
    assert ctx.responses == [404]


def test_lcr_leaves_our_users_to_the_default_routing() -> None:
    router = router_for("lcr.py")
    register(router, "bob", "sip:bob@203.0.113.5:5062")
    ctx = decide(router, sip("INVITE", f"sip:bob@{DOMAIN}", n=3))
    assert ctx.uris() == ["sip:bob@203.0.113.5:5062"]
    ctx = decide(router, sip("INVITE", f"sip:nobody@{DOMAIN}", n=4))
    assert ctx.responses == [404]


# -- failover.py ------------------------------------------------------------------------------


def test_failover_on_5xx_and_timeout_only_once() -> None:
    router = router_for("failover.py")
    ctx = decide(router, sip("INVITE", f"sip:+15551234567@{DOMAIN}"))
    assert ctx.uris() == ["sip:+15551234567@gw1.example.net"]
    assert router.on_failure(ctx, Response.create(503)) is True  # type: ignore[arg-type]
    assert ctx.uris() == ["sip:+15551234567@gw2.example.net"]
    # The backup failing too: no third try, the best response goes back.
    router.on_failure(ctx, Response.create(500))  # type: ignore[arg-type]
    assert len(ctx.forwarded) == 2

    ctx = decide(router, sip("INVITE", f"sip:+15551234567@{DOMAIN}", n=2))
    router.on_failure(ctx, Response.create(408))  # type: ignore[arg-type]
    assert ctx.uris() == ["sip:+15551234567@gw2.example.net"]


def test_failover_not_on_the_callees_answer() -> None:
    router = router_for("failover.py")
    for n, status in enumerate((486, 404, 480), start=1):
        ctx = decide(router, sip("INVITE", f"sip:+15551234567@{DOMAIN}", n=n))
        router.on_failure(ctx, Response.create(status))  # type: ignore[arg-type]
        assert len(ctx.forwarded) == 1, status


# -- header_rule.py ---------------------------------------------------------------------------


def test_header_rule_tenant_picks_the_pbx_and_is_removed() -> None:
    router = router_for("header_rule.py")
    request = sip("INVITE", f"sip:100@{DOMAIN}", headers=["X-Tenant: ACME"])
    ctx = decide(router, request)
    assert ctx.uris() == ["sip:100@pbx.acme.example.net"]
    assert "X-Tenant" not in request.headers
    ctx = decide(router, sip("INVITE", f"sip:100@{DOMAIN}", headers=["X-Tenant: initech"], n=2))
    assert ctx.responses == [403]


def test_header_rule_pai_only_from_the_trust_domain() -> None:
    router = router_for("header_rule.py")
    pai = "P-Asserted-Identity: <sip:ceo@example.com>"
    outside = sip("INVITE", f"sip:100@{DOMAIN}", headers=[pai, "X-Tenant: globex"])
    ctx = decide(router, outside, STRANGER)
    # Neither header is believed from outside: both go, and the default routing decides
    # (nobody is registered as 100: 404), so no stranger reaches a tenant's PBX.
    assert "P-Asserted-Identity" not in outside.headers and "X-Tenant" not in outside.headers
    assert ctx.responses == [404] and not ctx.forwarded
    inside = sip("INVITE", f"sip:100@{DOMAIN}", headers=[pai, "X-Tenant: globex"], n=2)
    ctx = decide(router, inside, PBX)
    assert inside.headers.get("P-Asserted-Identity") == "<sip:ceo@example.com>"
    assert ctx.uris() == ["sip:100@pbx.globex.example.net;transport=tcp"]


def test_header_rule_without_tenant_is_default_routing() -> None:
    router = router_for("header_rule.py")
    ctx = decide(router, sip("INVITE", f"sip:nobody@{DOMAIN}"))
    assert ctx.responses == [404]
