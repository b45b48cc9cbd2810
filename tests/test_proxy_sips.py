"""The proxy core and ``sips:`` (RFC 3261 §16.6 step 4, §26.2.2; RFC 5630 §5.3), sans-IO on
the test network of ``test_proxy_net``: a sips request leaves only over TLS and only for a
sips: target (the last hop too: any other target fails with 480 and Warning 380, and gets
nothing); its Record-Route is a sips: URI on a TLS hop -- the side it came in on keeps a sip:
URI when that hop was not TLS (RFC 5658 double Record-Route).  A sip request is never turned
into a sips one: for a sips: target it goes with a sip: Request-URI, over TLS."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_proxy_net import Net, ProxyNode, Raw, raw_request

from fastsip.proxy.core import NO_SECURE_HOP, ProxyContext, Target
from fastsip.sip import Response


class To:
    """Forwards every request to one target URI."""

    in_dialog = False
    wants_responses = False

    def __init__(self, uri: str | None) -> None:
        self.uri = uri

    def on_request(self, ctx: ProxyContext) -> None:
        ctx.forward([Target(self.uri)])

    def on_failure(self, ctx: object, best: Response) -> bool:
        return False

    def on_response(self, ctx: object, response: Response) -> None:
        pass


def _answer(request: object) -> Response:
    return request.reply(200, to_tag="b1")  # type: ignore[attr-defined, no-any-return]


def forward(ruri: str, target: str | None, extra: str = "") -> tuple[Raw, Raw]:
    """An INVITE for ``ruri`` from alice (over UDP) through the proxy, routed to ``target``;
    bob (port 5081) answers 200.  Returns (alice, bob)."""
    net = Net()
    ProxyNode(net, To(target))
    alice = Raw(net, "alice", 5071)
    bob = Raw(net, "bob", 5081, auto=_answer)
    alice.send_to(raw_request("INVITE", ruri, port=5071, extra=extra))
    net.run(1.0)
    return alice, bob


def test_sips_request_out_over_tls_records_a_sips_route() -> None:
    alice, bob = forward("sips:bob@example.com", "sips:bob@127.0.0.1:5081")
    [invite] = bob.requests("INVITE")
    assert str(invite.uri) == "sips:bob@127.0.0.1:5081"
    assert invite.via[0].transport == "TLS"
    # Out on TLS: sips: (no transport=tls: sips means TLS).  In on UDP: the truth, sip:.
    assert [str(r) for r in invite.record_route] == ["<sips:127.0.0.1:5060;lr>",
                                                     "<sip:127.0.0.1:5060;lr>"]
    assert 200 in alice.statuses()


@pytest.mark.parametrize(("target", "extra"), [
    # A contact registered with a sip: URI, over UDP, TCP or even TLS: never a sips target.
    ("sip:bob@127.0.0.1:5081", ""),
    ("sip:bob@127.0.0.1:5081;transport=tcp", ""),
    ("sip:bob@127.0.0.1:5081;transport=tls", ""),
    # A sips target behind a preloaded sip: Route over UDP: that hop is not TLS.
    ("sips:bob@127.0.0.1:5081", "Route: <sip:127.0.0.1:5060;lr>, <sip:127.0.0.1:5081;lr>\n"),
])
def test_sips_request_is_never_sent_to_a_sip_target_or_over_a_hop_without_tls(
        target: str, extra: str) -> None:
    alice, bob = forward("sips:bob@example.com", target, extra)
    assert bob.received == []
    # (Retransmitted: alice never ACKs it.)
    finals = {(r.status_code, r.reason, r.headers.get("Warning"))
              for r in alice.responses() if r.status_code >= 200}
    assert finals == {(480, NO_SECURE_HOP, '380 127.0.0.1:5060 "SIPS Not Allowed"')}


def test_sip_request_for_a_sips_target_goes_as_sip_over_tls() -> None:
    _, bob = forward("sip:bob@example.com", "sips:bob@127.0.0.1:5081")
    [invite] = bob.requests("INVITE")
    assert str(invite.uri) == "sip:bob@127.0.0.1:5081"
    assert invite.via[0].transport == "TLS"
    assert [str(r) for r in invite.record_route] == ["<sip:127.0.0.1:5060;transport=tls;lr>",
                                                     "<sip:127.0.0.1:5060;lr>"]


def test_sip_request_over_tls_hop_keeps_sip_record_route() -> None:
    # §16.6 step 4: a request without a sips Request-URI or top Route gets a sip: Record-Route
    # even when it leaves over TLS.
    _, bob = forward("sip:bob@example.com", "sip:bob@127.0.0.1:5081;transport=tls")
    [invite] = bob.requests("INVITE")
    assert [str(r) for r in invite.record_route] == ["<sip:127.0.0.1:5060;transport=tls;lr>",
                                                     "<sip:127.0.0.1:5060;lr>"]


def test_sips_top_route_makes_the_record_route_sips() -> None:
    # A preloaded loose Route to the next proxy, sips: the hop is TLS and the route sips.
    _, bob = forward("sip:bob@example.com", None,
                     extra="Route: <sip:127.0.0.1:5060;lr>, <sips:127.0.0.1:5081;lr>\n")
    [invite] = bob.requests("INVITE")
    assert invite.via[0].transport == "TLS"
    assert str(invite.record_route[0]) == "<sips:127.0.0.1:5060;lr>"
