"""Proxy core (RFC 3261 §16) over the real TransactionLayer, UserAgents and raw endpoints, on a
TimerWheel clock: validation, routing, forking and response aggregation, Timer C, CANCEL, ACK
for 2xx, loop detection and the stateless mode."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_proxy_net import Net, Phone, ProxyNode, Raw, raw_request

from fastsip.proxy.base import stateless_branch
from fastsip.proxy.core import Branch, ProxyContext, ResponseContext, Target
from fastsip.sip import Request, Response, parse
from fastsip.ua import Call

PROXY = "sip:127.0.0.1:5060;lr"


class FixedRouter:
    """Forwards every initial request to ``targets`` (parallel or not); records failures."""

    in_dialog = False
    wants_responses = False

    def __init__(self, targets: list[str] | None = None, parallel: bool = True,
                 failover: list[str] | None = None) -> None:
        self.targets = targets or []
        self.parallel = parallel
        self.failover = failover
        self.failures: list[int] = []
        self.contexts: list[ProxyContext] = []

    def on_request(self, ctx: ProxyContext) -> None:
        self.contexts.append(ctx)
        if self.targets:
            ctx.forward([Target(t) for t in self.targets], parallel=self.parallel)
        else:
            ctx.forward([Target()])

    def on_failure(self, ctx: ResponseContext, best: Response) -> bool:
        self.failures.append(best.status_code)
        if self.failover:
            ctx.forward([Target(self.failover.pop(0))])
            return True
        return False

    def on_response(self, ctx: ResponseContext, response: Response) -> None:
        pass


def ring(status: int = 180) -> Any:
    return lambda call: call.ring(status)


def reject(status: int) -> Any:
    return lambda call: call.reject(status)


def setup(router: Any = None, **kw: Any) -> tuple[Net, ProxyNode, Phone]:
    net = Net()
    proxy = ProxyNode(net, router, **kw)
    alice = Phone(net, "alice", 5070)
    return net, proxy, alice


def call_via_proxy(alice: Phone, uri: str) -> Call:
    return alice.ua.invite(uri, body=b"v=0\r\n", proxy=PROXY)


# -- the basic path -----------------------------------------------------------------------------


def test_call_through_proxy_record_route_and_ack_end_to_end() -> None:
    net, proxy, alice = setup(FixedRouter(["sip:bob@127.0.0.1:5080"]))
    bob = Phone(net, "bob", 5080)
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(1.0)
    assert call.status == 200 and call.state == "confirmed"
    invite = bob.calls[0].invite
    # §16.6: R-URI retargeted, Max-Forwards decremented, our Record-Route with lr, our Via on
    # top with an RFC 3261 branch, and our Route (the UAC's preloaded one) removed.
    assert str(invite.uri) == "sip:bob@127.0.0.1:5080"
    assert invite.max_forwards == 69
    assert [str(r) for r in invite.record_route] == ["<sip:127.0.0.1:5060;lr>"]
    assert invite.via[0].host == "127.0.0.1" and invite.via[0].port == 5060
    assert invite.via[0].rfc3261_branch and len(invite.via) == 2
    assert invite.route == []
    # §16.2: a 100 Trying went back at once; the ACK for the 2xx crossed the proxy (route set)
    assert "SIP/2.0 100 Trying" in net.lines("proxy", "alice")
    assert "ACK sip:bob@127.0.0.1:5080 SIP/2.0" in net.lines("proxy", "bob")
    # The dialog's route set goes through the proxy, so the BYE does too (loose routing).
    call.bye()
    net.run(2.0)
    assert call.bye_status == 200
    assert "BYE sip:bob@127.0.0.1:5080 SIP/2.0" in net.lines("proxy", "bob")
    assert proxy.proxy.pending == 0


def test_in_dialog_request_does_not_reach_router() -> None:
    router = FixedRouter(["sip:bob@127.0.0.1:5080"])
    net, _proxy, alice = setup(router)
    Phone(net, "bob", 5080)
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(1.0)
    call.bye()
    net.run(2.0)
    assert [c.request.method for c in router.contexts] == ["INVITE"]


def test_no_record_route_when_disabled() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:bob@127.0.0.1:5080"]), record_route=False)
    bob = Phone(net, "bob", 5080)
    call_via_proxy(alice, "sip:bob@example.com")
    net.run(1.0)
    assert bob.calls[0].invite.record_route == []


# -- §16.3 validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("text, status", [
    (raw_request(max_forwards=0), 483),
    (raw_request(uri="mailto:bob@example.com"), 416),
    (raw_request(extra="Proxy-Require: foo\n"), 420),
    (raw_request(cseq_method="BYE"), 400),
])
def test_validation(text: str, status: int) -> None:
    net, proxy, _ = setup(FixedRouter(["sip:bob@127.0.0.1:5080"]))
    up = Raw(net, "up", 5071)
    up.send_to(text)
    net.run(0.1)
    finals = [s for s in up.statuses() if s >= 200]
    assert finals == [status]
    if status == 420:
        assert up.responses()[-1].headers.get("Unsupported") == "foo"
    assert proxy.proxy.pending == 0


def test_malformed_header_gets_400_and_proxy_keeps_serving() -> None:
    net, _proxy, _ = setup(FixedRouter())
    up = Raw(net, "up", 5071, )
    up.send_to(raw_request(uri="sip:bob@127.0.0.1:5090").replace("From: <sip:alice",
                                                                  "From: <<<sip:alice"))
    net.run(0.1)
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200, to_tag="x"))
    up.send_to(raw_request("MESSAGE", "sip:bob@127.0.0.1:5090"))
    net.run(0.2)
    assert up.statuses()[0] == 400 or 400 in up.statuses()
    assert 200 in up.statuses()
    assert down.requests("MESSAGE")


@pytest.mark.parametrize("header, to_tag", [("From", None), ("To", None), ("From", "t1"),
                                             ("To", "t1")])
def test_malformed_from_or_to_uri_gets_400_and_is_not_relayed(header: str,
                                                               to_tag: str | None) -> None:
    # An empty URI parameter (";;") is caught by the URI's own parse, not by the name-addr
    # scan: the core checks the URI without building it (a BYE's From and To are never
    # read), and the answer must still be 400 before anything is relayed.
    net, proxy, _ = setup(FixedRouter(["sip:bob@127.0.0.1:5090"]))
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200, to_tag="x"))
    method = "MESSAGE" if to_tag is None else "BYE"
    route = "" if to_tag is None else f"Route: <{PROXY}>\n"     # a BYE routed through us
    text = raw_request(method, "sip:bob@127.0.0.1:5090", to_tag=to_tag or "", extra=route)
    start = text.index(f"\n{header}: <") + len(header) + 4
    end = text.index(">", start)
    up.send_to(text[:end] + ";;lr" + text[end:])
    net.run(0.2)
    assert [s for s in up.statuses() if s >= 200] == [400]
    assert down.requests(method) == []
    # The same request with the URI intact goes through.
    up.send_to(raw_request(method, "sip:bob@127.0.0.1:5090", to_tag=to_tag or "", extra=route,
                           call_id="ok-" + header))
    net.run(0.2)
    assert len(down.requests(method)) == 1
    assert proxy.proxy.pending == 0


def test_options_with_max_forwards_zero_to_us_is_not_483() -> None:
    net, _proxy, _ = setup(None)
    up = Raw(net, "up", 5071)
    up.send_to(raw_request("OPTIONS", "sip:127.0.0.1:5060", max_forwards=0))
    net.run(0.1)
    assert up.statuses() == [200]


# -- §16.4 route processing ---------------------------------------------------------------------


def test_strict_router_upstream_request_uri_is_our_record_route() -> None:
    # A strict router put our Record-Route URI in the Request-URI and the remote target last
    # in Route (§16.4): we restore the target and forward to it.
    net, _proxy, _ = setup(FixedRouter())
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200))
    up.send_to(raw_request("BYE", PROXY.replace("sip:", "sip:"), to_tag="t1",
                           extra="Route: <sip:bob@127.0.0.1:5090>\n"))
    net.run(0.1)
    (bye,) = down.requests("BYE")
    assert str(bye.uri) == "sip:bob@127.0.0.1:5090"
    assert bye.route == []
    assert 200 in up.statuses()


def test_strict_router_downstream_postprocess() -> None:
    # §16.6 step 6: the next Route is a strict router (no lr): it becomes the Request-URI and
    # the Request-URI goes last in Route.
    net, _proxy, _ = setup(FixedRouter())
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200))
    up.send_to(raw_request("MESSAGE", "sip:bob@example.com",
                           extra=f"Route: <{PROXY}>, <sip:127.0.0.1:5090>\n"))
    net.run(0.1)
    (msg,) = down.requests("MESSAGE")
    assert str(msg.uri) == "sip:127.0.0.1:5090"
    assert [str(r) for r in msg.route] == ["<sip:bob@example.com>"]


def _past_our_route(first: str) -> list[Request]:
    """What reaches the next hop (down, 5090) of a MESSAGE whose Route is ``first`` and then
    down's loose-routing URI."""
    net, _proxy, _ = setup(FixedRouter())
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200))
    up.send_to(raw_request("MESSAGE", "sip:bob@example.com",
                           extra=f"Route: {first}, <sip:127.0.0.1:5090;lr>\n"))
    net.run(0.1)
    return down.requests("MESSAGE")


@pytest.mark.parametrize("ours", [
    f"<{PROXY}>",
    "<sip:127.0.0.1;lr>",                               # no port: ours on any port we listen
    "<sip:127.0.0.1:5060;transport=udp;lr>",
    "<SIP:127.0.0.1:5060;LR>",                          # scheme and parameter in any case
    "<sip:elsewhere.invalid;maddr=127.0.0.1;lr>",       # maddr decides where it points
])
def test_loose_route_pops_ours_in_any_form_and_keeps_request_uri(ours: str) -> None:
    (msg,) = _past_our_route(ours)
    assert str(msg.uri) == "sip:bob@example.com"
    assert [str(r) for r in msg.route] == ["<sip:127.0.0.1:5090;lr>"]


def test_route_whose_maddr_is_elsewhere_is_not_ours() -> None:
    # Our address, but a maddr that is not: the Route points there, and stays.
    assert _past_our_route("<sip:127.0.0.1:5060;maddr=127.0.0.9;lr>") == []


def test_loop_detected_482_but_spiral_allowed() -> None:
    # The target is the proxy itself with the same Request-URI: the request comes back
    # unchanged -> 482.  (A target that changes the Request-URI spirals and is fine.)
    net, _proxy, _ = setup(FixedRouter())
    up = Raw(net, "up", 5071)
    up.send_to(raw_request("MESSAGE", "sip:bob@127.0.0.1:5060;x=1"))
    net.run(0.5)
    assert 482 in up.statuses()


def test_spiral_is_not_a_loop() -> None:
    class Spiral(FixedRouter):
        def on_request(self, ctx: ProxyContext) -> None:
            if ctx.request.uri.user == "alias":   # first pass: retarget through ourselves
                ctx.forward([Target("sip:bob@127.0.0.1:5060")])
            else:
                ctx.forward([Target("sip:bob@127.0.0.1:5090")])

    net, _proxy, _ = setup(Spiral())
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200))
    up.send_to(raw_request("MESSAGE", "sip:alias@127.0.0.1:5060"))
    net.run(0.5)
    assert len(down.requests("MESSAGE")) == 1
    assert len(down.requests("MESSAGE")[0].via) == 3
    assert up.statuses() == [200]


# -- §16.7 forking and aggregation --------------------------------------------------------------


def test_parallel_fork_best_response_and_2xx_forwarded() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081", "sip:b2@127.0.0.1:5082"]))
    Phone(net, "b1", 5081, reject(486))
    b2 = Phone(net, "b2", 5082, ring())
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(0.5)
    assert call.state == "proceeding"  # the 180 went up, the 486 is kept
    b2.calls[0].answer(b"v=0\r\n")
    net.run(1.0)
    assert call.status == 200 and call.state == "confirmed"


def test_parallel_fork_all_fail_best_is_lowest_class() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081", "sip:b2@127.0.0.1:5082",
                                           "sip:b3@127.0.0.1:5083"]))
    Phone(net, "b1", 5081, reject(503))
    Phone(net, "b2", 5082, reject(486))
    Phone(net, "b3", 5083, reject(302))
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(1.0)
    assert call.status == 302


def test_503_becomes_500() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081"]))
    Phone(net, "b1", 5081, reject(503))
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(1.0)
    assert call.status == 500


def test_6xx_ends_search_and_cancels_others() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081", "sip:b2@127.0.0.1:5082"]))
    b1 = Phone(net, "b1", 5081, ring())
    b2 = Phone(net, "b2", 5082, ring())
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(0.5)
    b2.calls[0].reject(603)
    net.run(1.0)
    assert "CANCEL sip:b1@127.0.0.1:5081 SIP/2.0" in net.lines("proxy", "b1")
    assert b1.calls[0].status == 487
    assert call.status == 603


def test_two_2xx_both_forwarded_and_others_cancelled() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081", "sip:b2@127.0.0.1:5082",
                                           "sip:b3@127.0.0.1:5083"]))
    Phone(net, "b1", 5081)             # answers at once
    Phone(net, "b2", 5082)             # answers at once too: a second dialog
    b3 = Phone(net, "b3", 5083, ring())
    call_via_proxy(alice, "sip:bob@example.com")
    net.run(1.0)
    oks = [line for line in net.lines("proxy", "alice") if line.startswith("SIP/2.0 200")]
    assert len(oks) >= 2
    assert b3.calls[0].status == 487


def test_serial_fork_next_on_failure() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081", "sip:b2@127.0.0.1:5082"],
                                          parallel=False))
    Phone(net, "b1", 5081, reject(480))
    b2 = Phone(net, "b2", 5082)
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(1.0)
    assert call.status == 200 and b2.calls
    b1_invites = [x for x in net.lines("proxy", "b1") if x.startswith("INVITE")]
    assert len(b1_invites) == 1


def test_failure_hook_failover() -> None:
    router = FixedRouter(["sip:b1@127.0.0.1:5081"], failover=["sip:gw@127.0.0.1:5082"])
    net, _proxy, alice = setup(router)
    Phone(net, "b1", 5081, reject(486))
    gw = Phone(net, "gw", 5082)
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(1.0)
    assert router.failures == [486]
    assert call.status == 200 and gw.calls


def test_auth_challenges_aggregated() -> None:
    def challenge(realm: str) -> Any:
        return lambda r: r.reply(407, to_tag="t", headers=[
            ("Proxy-Authenticate", f'Digest realm="{realm}", nonce="n"')])

    net, _proxy, _ = setup(FixedRouter(["sip:b1@127.0.0.1:5081", "sip:b2@127.0.0.1:5082"]))
    up = Raw(net, "up", 5071)
    Raw(net, "b1", 5081, auto=challenge("one"))
    Raw(net, "b2", 5082, auto=challenge("two"))
    up.send_to(raw_request("MESSAGE", "sip:bob@example.com"))
    net.run(0.5)
    (resp,) = up.responses()
    assert resp.status_code == 407
    realms = resp.headers.getall("Proxy-Authenticate")
    assert len(realms) == 2 and any("one" in r for r in realms) and any("two" in r for r in realms)


def test_no_answer_408_after_timer_b() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:nobody@127.0.0.1:5099"]))
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(40.0)
    assert call.status == 408


# -- §16.8 Timer C, §16.10 CANCEL ---------------------------------------------------------------


def test_timer_c_cancels_ringing_branch() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081"]), timer_c=181.0)
    b1 = Phone(net, "b1", 5081, ring())
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(100.0)
    assert call.state == "proceeding"
    net.run(200.0)
    assert "CANCEL sip:b1@127.0.0.1:5081 SIP/2.0" in net.lines("proxy", "b1")
    assert b1.calls[0].status == 487
    # Nobody answered: the caller hears 408, not the 487 of a CANCEL it never sent.
    assert call.status == 408


def test_timer_c_cancel_crossed_by_2xx_connects_the_call() -> None:
    # The callee answers just as Timer C's CANCEL leaves: its 200 still reaches the caller
    # (the 408 is only for a 487 our CANCEL brought).
    net, _proxy, _ = setup(FixedRouter(["sip:b1@127.0.0.1:5081"]), timer_c=181.0)
    down = Raw(net, "b1", 5081)
    up = Raw(net, "up", 5071)
    up.send_to(raw_request("INVITE", "sip:bob@example.com", port=5071, branch="z9hG4bKtc",
                           call_id="tc"))
    net.run(0.1)
    (inv,) = down.requests("INVITE")
    down.reply(inv.reply(180, to_tag="d"))
    net.run(190.0)
    assert down.requests("CANCEL")  # (retransmitted: nobody answers it here)
    down.reply(inv.reply(200, to_tag="d"))
    net.run(191.0)
    assert [s for s in up.statuses() if s >= 200] == [200]


def test_timer_c_restarted_by_provisional() -> None:
    net, _proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081"]), timer_c=181.0)
    b1 = Phone(net, "b1", 5081, ring())
    call_via_proxy(alice, "sip:bob@example.com")
    net.run(150.0)
    b1.calls[0].ring(183)
    net.run(300.0)  # 150 + 181 = 331: not yet
    assert "CANCEL sip:b1@127.0.0.1:5081 SIP/2.0" not in net.lines("proxy", "b1")
    net.run(340.0)
    assert "CANCEL sip:b1@127.0.0.1:5081 SIP/2.0" in net.lines("proxy", "b1")


def test_timer_c_restarts_from_the_last_provisional() -> None:
    # Timer C is restarted lazily (its node fires at the old deadline and waits out the rest):
    # each provisional still moves the deadline to its arrival + Timer C, to the second.
    net, _proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081"]), timer_c=181.0)
    b1 = Phone(net, "b1", 5081, ring())
    call_via_proxy(alice, "sip:bob@example.com")
    net.run(100.0)
    b1.calls[0].ring(183)
    net.run(250.0)
    b1.calls[0].ring(183)
    net.run(250.0 + 180.5)
    assert "CANCEL sip:b1@127.0.0.1:5081 SIP/2.0" not in net.lines("proxy", "b1")
    net.run(250.0 + 181.5)
    assert "CANCEL sip:b1@127.0.0.1:5081 SIP/2.0" in net.lines("proxy", "b1")


def test_cancel_propagates_to_all_branches() -> None:
    net, proxy, alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081", "sip:b2@127.0.0.1:5082"]))
    b1 = Phone(net, "b1", 5081, ring())
    b2 = Phone(net, "b2", 5082, ring())
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(0.5)
    call.cancel()
    net.run(2.0)
    assert "SIP/2.0 200 OK" in [x for x in net.lines("proxy", "alice") if "200" in x]
    assert b1.calls[0].status == 487 and b2.calls[0].status == 487
    assert call.status == 487
    assert proxy.proxy.pending == 0


def test_cancel_before_downstream_provisional_waits_for_it() -> None:
    # §9.1: a CANCEL may only follow a provisional response.
    net, _proxy, _alice = setup(FixedRouter(["sip:b1@127.0.0.1:5081"]))
    down = Raw(net, "b1", 5081)
    up = Raw(net, "up", 5071)
    invite = raw_request("INVITE", "sip:bob@example.com", port=5071, branch="z9hG4bKc1",
                         call_id="cx")
    up.send_to(invite)
    net.run(0.1)
    up.send_to(raw_request("CANCEL", "sip:bob@example.com", port=5071, branch="z9hG4bKc1",
                           call_id="cx").replace("tag=a", "tag=X"))
    net.run(0.2)
    assert down.requests("CANCEL") == []
    (inv,) = down.requests("INVITE")
    down.reply(inv.reply(180, to_tag="d"))
    net.run(0.3)
    assert len(down.requests("CANCEL")) == 1


def test_cancel_unknown_gets_481() -> None:
    net, _proxy, _ = setup(FixedRouter())
    up = Raw(net, "up", 5071)
    up.send_to(raw_request("CANCEL", "sip:bob@example.com"))
    net.run(0.1)
    assert up.statuses() == [481]


# -- stray responses, ACK -----------------------------------------------------------------------


def test_stray_2xx_forwarded_by_via() -> None:
    net, proxy, _ = setup(FixedRouter())
    up = Raw(net, "up", 5071)
    Raw(net, "down", 5090)
    resp = Response.create(200, headers=[
        ("Via", "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK-x.y"),
        ("Via", "SIP/2.0/UDP 127.0.0.1:5071;branch=z9hG4bKup"),
        ("From", "<sip:a@x>;tag=1"), ("To", "<sip:b@y>;tag=2"), ("Call-ID", "c"),
        ("CSeq", "1 INVITE")])
    down = net.nodes[("127.0.0.1", 5090)]
    down.send(bytes(resp), proxy.address)
    net.run(0.1)
    (got,) = up.responses()
    assert len(got.via) == 1 and got.via[0].port == 5071


def test_ack_for_2xx_forwarded_statelessly_by_route() -> None:
    net, _proxy, _ = setup(FixedRouter())
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090)
    up.send_to(raw_request("ACK", "sip:bob@127.0.0.1:5090", to_tag="t",
                           extra=f"Route: <{PROXY}>\n"))
    net.run(0.1)
    (ack,) = down.requests("ACK")
    assert ack.max_forwards == 69 and len(ack.via) == 2 and ack.route == []


# -- stateless mode (§16.11) --------------------------------------------------------------------


def test_stateless_forwarding_and_response_by_via() -> None:
    net, proxy, _ = setup(FixedRouter(["sip:bob@127.0.0.1:5090"]), stateless=True)
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090, auto=lambda r: r.reply(200, to_tag="d"))
    text = raw_request("MESSAGE", "sip:bob@example.com", port=5071, branch="z9hG4bKsame")
    up.send_to(text)
    up.send_to(text)  # a retransmission goes through too, with the same branch
    net.run(0.1)
    msgs = down.requests("MESSAGE")
    assert len(msgs) == 2
    assert msgs[0].via[0].branch == msgs[1].via[0].branch
    assert up.statuses() == [200, 200]
    assert proxy.layer.server_transactions == 0 and proxy.layer.client_transactions == 0


def _blake_branch(key: str) -> str:
    # §16.11's branch as fastsip defines it (an interoperable, stable value: a worker or a
    # restarted process must give a retransmission the branch its first copy got).
    return "z9hG4bKsl" + hashlib.blake2b(key.encode(), digest_size=10).hexdigest()


def test_stateless_branch_is_a_function_of_the_transaction_id() -> None:
    invite = parse(raw_request("INVITE", "sip:bob@example.com", port=5071,
                               branch="z9hG4bKabc", call_id="sb1").encode())
    ack = parse(raw_request("ACK", "sip:bob@example.com", port=5071, branch="z9hG4bKabc",
                            call_id="sb1").encode())
    other = parse(raw_request("INVITE", "sip:bob@example.com", port=5072,
                              branch="z9hG4bKabc", call_id="sb1").encode())
    assert isinstance(invite, Request) and isinstance(ack, Request)
    assert isinstance(other, Request)
    # RFC 3261 peers: the top Via's branch and sent-by, method left out.
    assert stateless_branch(invite) == _blake_branch("z9hG4bKabc\x00127.0.0.1\x005071")
    assert stateless_branch(ack) == stateless_branch(invite)
    assert stateless_branch(other) != stateless_branch(invite)     # another sent-by port
    no_port = parse(raw_request("MESSAGE", "sip:bob@example.com", branch="z9hG4bKp")
                    .replace("127.0.0.1:5071;branch", "host.example;branch").encode())
    assert isinstance(no_port, Request)
    assert stateless_branch(no_port) == _blake_branch("z9hG4bKp\x00host.example\x00None")
    # An RFC 2543 peer (no magic cookie): §17.2.3's fields, the top Via among them.
    old = parse(raw_request("INVITE", "sip:bob@example.com", port=5071, branch="1234",
                            call_id="sb2").encode())
    assert isinstance(old, Request) and old.from_ is not None and old.cseq is not None
    key = "\x00".join(("sip:bob@example.com", old.from_.tag or "", "sb2", "1",
                       str(old.top_via)))
    assert stateless_branch(old) == _blake_branch(key)
    # The proxy's stateless ACK carries it.
    net, _proxy, _ = setup(FixedRouter())
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090)
    up.send_to(raw_request("ACK", "sip:bob@127.0.0.1:5090", to_tag="t", branch="z9hG4bKack",
                           extra=f"Route: <{PROXY}>\n"))
    net.run(0.1)
    (fwd,) = down.requests("ACK")
    assert fwd.via[0].branch == _blake_branch(f"z9hG4bKack\x00{fwd.via[1].host}\x005071")


def test_stateless_cancel_follows_invite_branch() -> None:
    net, _proxy, _ = setup(FixedRouter(["sip:bob@127.0.0.1:5090"]), stateless=True)
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090)
    up.send_to(raw_request("INVITE", "sip:bob@example.com", port=5071, branch="z9hG4bKq",
                           call_id="c9"))
    up.send_to(raw_request("CANCEL", "sip:bob@example.com", port=5071, branch="z9hG4bKq",
                           call_id="c9"))
    net.run(0.1)
    inv, = down.requests("INVITE")
    can, = down.requests("CANCEL")
    assert inv.via[0].branch == can.via[0].branch


def test_stateless_validation_reply() -> None:
    net, _proxy, _ = setup(FixedRouter(["sip:bob@127.0.0.1:5090"]), stateless=True)
    up = Raw(net, "up", 5071)
    up.send_to(raw_request("MESSAGE", "sip:bob@example.com", port=5071, max_forwards=0))
    net.run(0.1)
    assert up.statuses() == [483]


# -- overload ----------------------------------------------------------------------------------


def test_max_pending_503() -> None:
    class Hold(FixedRouter):
        def on_request(self, ctx: ProxyContext) -> None:
            self.contexts.append(ctx)   # decides never

    net, _proxy, _ = setup(Hold(), max_pending=2, max_pending_per_source=2)
    up = Raw(net, "up", 5071)
    for _ in range(3):
        up.send_to(raw_request("MESSAGE", "sip:bob@example.com"))
    net.run(0.1)
    assert up.statuses() == [503]
    assert up.responses()[0].headers.get("Retry-After") == "5"


def test_router_exception_is_500() -> None:
    class Boom(FixedRouter):
        def on_request(self, ctx: ProxyContext) -> None:
            raise RuntimeError("boom")

    net, proxy, _ = setup(Boom())
    up = Raw(net, "up", 5071)
    up.send_to(raw_request("MESSAGE", "sip:bob@example.com"))
    net.run(0.1)
    assert up.statuses() == [500]
    assert proxy.proxy.pending == 0


def test_settled_contexts_leave_no_cyclic_garbage() -> None:
    # The per-call objects must be freed by reference counting: the cyclic GC's full passes
    # over a heap of live transactions cost more CPU than the proxy path itself.
    import gc

    net, proxy, _ = setup(FixedRouter(["sip:bob@127.0.0.1:5090"]))
    up = Raw(net, "up", 5071)
    Raw(net, "down", 5090, auto=lambda r: r.reply(180 if r.method == "INVITE" else 200,
                                                  to_tag="d"))
    gc.collect()
    gc.disable()
    try:
        up.send_to(raw_request("MESSAGE", "sip:bob@example.com"))
        up.send_to(raw_request("INVITE", "sip:bob@example.com"))
        net.run(0.1)
        down = net.nodes[("127.0.0.1", 5090)]
        assert isinstance(down, Raw)
        down.reply(down.requests("INVITE")[0].reply(486, to_tag="d"))
        net.run(100.0)  # every transaction timer has run out
        assert proxy.layer.server_transactions == 0 and proxy.layer.client_transactions == 0
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        kinds = {type(o).__name__ for o in gc.garbage}
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not kinds & {"ResponseContext", "Branch", "ServerTransaction", "ClientTransaction"}
    assert 486 in up.statuses() and 200 in up.statuses()


def test_answered_call_keeps_no_context_while_its_transactions_linger() -> None:
    # Timers L and M keep an answered INVITE's transactions for 32 s: they must not keep the
    # call's context, request copies and responses with them -- yet a retransmitted 2xx
    # still goes upstream (RFC 6026), our Via removed.
    import gc

    class Forget(FixedRouter):
        def on_request(self, ctx: ProxyContext) -> None:
            ctx.forward([Target(t) for t in self.targets])

    def alive() -> int:
        gc.collect()
        return sum(isinstance(o, (ResponseContext, Branch)) for o in gc.get_objects())

    net, proxy, _ = setup(Forget(["sip:bob@127.0.0.1:5090"]))
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090)
    before = alive()
    up.send_to(raw_request("INVITE", "sip:bob@example.com"))
    net.run(0.1)
    (invite,) = down.requests("INVITE")
    assert alive() == before + 2
    ok = invite.reply(200, to_tag="d")
    down.reply(ok)
    net.run(1.0)
    assert proxy.layer.server_transactions == 1 and proxy.layer.client_transactions == 1
    assert alive() == before
    down.reply(ok)                       # the UAS retransmits its 2xx (no ACK yet)
    net.run(2.0)
    oks = [r for r in up.responses() if r.status_code == 200]
    assert len(oks) == 2 and all(len(r.via) == 1 and r.via[0].port == 5071 for r in oks)


def test_stateless_ack_for_non_2xx_follows_invite_route() -> None:
    net, _, _ = setup(FixedRouter(["sip:bob@127.0.0.1:5090"]), stateless=True)
    up = Raw(net, "up", 5071)
    down = Raw(net, "down", 5090)
    up.send_to(raw_request("INVITE", "sip:bob@example.com", branch="z9hG4bKn2", call_id="n2"))
    net.run(0.1)
    (inv,) = down.requests("INVITE")
    down.reply(inv.reply(486, to_tag="d"))
    net.run(0.2)
    assert up.statuses() == [486]
    up.send_to(raw_request("ACK", "sip:bob@example.com", branch="z9hG4bKn2", call_id="n2",
                           to_tag="d"))
    net.run(0.3)
    (ack,) = down.requests("ACK")
    assert ack.via[0].branch == inv.via[0].branch  # the ACK matches the INVITE's transaction
    assert up.statuses() == [486]  # and is never answered


def test_on_final_hook_hears_each_outcome_once() -> None:
    class Final(FixedRouter):
        def __init__(self) -> None:
            super().__init__(["sip:b1@127.0.0.1:5081", "sip:b2@127.0.0.1:5082"])
            self.finals: list[tuple[str, int]] = []

        def on_final(self, ctx: ResponseContext, response: Response) -> None:
            self.finals.append((ctx.request.method, response.status_code))

    router = Final()
    net, _, alice = setup(router)
    Phone(net, "b1", 5081, reject(486))
    Phone(net, "b2", 5082)
    call = call_via_proxy(alice, "sip:bob@example.com")
    net.run(1.0)
    assert call.status == 200
    assert router.finals == [("INVITE", 200)]


def test_max_pending_per_source_leaves_room_for_others() -> None:
    class Hold(FixedRouter):
        def on_request(self, ctx: ProxyContext) -> None:
            self.contexts.append(ctx)   # decides never

    net, proxy, _ = setup(Hold(), max_pending=4, max_pending_per_source=2)
    up = Raw(net, "up", 5071)
    other = Raw(net, "other", 5072)
    other.host = "127.0.0.2"
    net.nodes[("127.0.0.2", 5072)] = other
    for _ in range(3):
        up.send_to(raw_request("MESSAGE", "sip:bob@example.com"))
    other.send_to(raw_request("MESSAGE", "sip:bob@example.com", port=5072).replace(
        "127.0.0.1:5072", "127.0.0.2:5072"))
    net.run(0.1)
    assert up.statuses() == [503]
    assert other.statuses() == []       # admitted (its context is pending)
    assert proxy.proxy.pending == 3
