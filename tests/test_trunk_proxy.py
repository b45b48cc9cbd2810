"""The proxy core's side of trunks, sans-IO on the test network: a branch to a trunk answers the
provider's 407 with the trunk's credentials (CSeq + 1, a new transaction), the caller never sees
the challenge, the dialog's later requests from the caller (ACK, BYE, re-INVITE) are shifted
toward the provider and their responses back, the provider's own requests are not, a CANCEL
follows the re-sent INVITE, and a second challenge ends as a 403."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from test_proxy_net import Net, Phone, ProxyNode

from fastsip.proxy.auth import Credentials, DigestAuthenticator, DigestClient
from fastsip.proxy.core import ProxyContext, ResponseContext, Target
from fastsip.proxy.trunk import TrunkAuth
from fastsip.sip import Message, Request, Response
from fastsip.transport import Address
from fastsip.ua import Call

PROXY = "sip:127.0.0.1:5060;lr"
PROVIDER = "sip:+15550100@127.0.0.1:5090"


class TrunkRouter:
    in_dialog = False
    wants_responses = False

    def __init__(self, also: str | None = None) -> None:
        self.also = also

    def on_request(self, ctx: ProxyContext) -> None:
        targets = [Target(PROVIDER, trunk="prov")]
        if self.also:
            targets.append(Target(self.also))     # forked: a plain branch beside the trunk
        ctx.forward(targets)

    def on_failure(self, ctx: ResponseContext, best: Response) -> bool:
        return False

    def on_response(self, ctx: ResponseContext, response: Response) -> None:
        pass


class Provider(Phone):
    """A UA that challenges every INVITE without good Proxy-Authorization (407), records what
    it receives, and then does ``then(call)`` (answer by default)."""

    def __init__(self, net: Net, password: str = "pw", then: Any = None) -> None:
        creds = Credentials()
        creds.add("trunkuser", password=password)
        self.auth = DigestAuthenticator("provider.test", creds, algorithms=("SHA-256", "MD5"),
                                        check_uri=True)
        self.received: list[Message] = []

        def policy(call: Call) -> None:
            if self.auth.authenticate(call.invite, net.wheel.time(), proxy=True).ok:
                (then or (lambda c: c.answer(b"v=0\r\n", content_type="application/sdp")))(call)
                return
            challenge = self.auth.challenge(call.invite, net.wheel.time(), proxy=True)
            call.reject(407, headers=[("Proxy-Authenticate", v) for v in
                                      challenge.headers.getall("Proxy-Authenticate")])

        super().__init__(net, "provider", 5090, policy=policy)

    def deliver(self, msg: Message, source: Address) -> None:
        self.received.append(msg)
        super().deliver(msg, source)

    def got(self, method: str) -> list[Request]:
        return [m for m in self.received if isinstance(m, Request) and m.method == method]


class Caller(Phone):
    """A UA that records what it receives."""

    def __init__(self, net: Net) -> None:
        self.received: list[Message] = []
        super().__init__(net, "alice", 5070)

    def deliver(self, msg: Message, source: Address) -> None:
        self.received.append(msg)
        super().deliver(msg, source)


def setup(password: str = "pw", then: Any = None, also: str | None = None,
          **kw: Any) -> tuple[Net, ProxyNode, Caller, Provider]:
    net = Net()
    node = ProxyNode(net, TrunkRouter(also), **kw)
    node.proxy.trunks = TrunkAuth({"prov": DigestClient("trunkuser", "pw")})
    alice = Caller(net)
    provider = Provider(net, password, then)
    return net, node, alice, provider


def cseqs(requests: list[Request]) -> list[int]:
    return [r.cseq.seq for r in requests if r.cseq is not None]


def test_challenge_answered_and_dialog_shifted() -> None:
    net, node, alice, provider = setup()
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(1.0)
    assert call.status == 200 and call.state == "confirmed"
    assert not any(" 407 " in line for line in net.lines("proxy", "alice"))
    invites = provider.got("INVITE")
    assert cseqs(invites) == [1, 2]
    assert "Proxy-Authorization" in invites[1].headers
    assert "Proxy-Authorization" not in invites[0].headers
    assert invites[0].top_via.branch != invites[1].top_via.branch  # type: ignore[union-attr]
    assert invites[1].record_route            # the proxy stays in the path
    # ACK for the 407 (hop by hop, CSeq 1) and the ACK for the 2xx (CSeq 2, §13.2.2.4).
    assert cseqs(provider.got("ACK")) == [1, 2]
    assert len(node.proxy.trunks.dialogs) == 1
    # A re-INVITE and the BYE from the caller: shifted by one, and back for the caller.
    alice.ua.reinvite(call, b"v=0\r\n")
    net.run(2.0)
    assert cseqs(provider.got("INVITE"))[-1] == 3   # the caller's 2, shifted
    assert cseqs(provider.got("ACK"))[-1] == 3
    call.bye()
    net.run(3.0)
    assert call.bye_status == 200                    # the response carried the caller's CSeq
    assert cseqs(provider.got("BYE")) == [4]
    assert node.proxy.trunks.dialogs == {}           # the BYE ended the shift
    assert node.proxy.pending == 0


def test_provider_side_requests_are_not_shifted() -> None:
    net, node, alice, provider = setup()
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(1.0)
    assert call.status == 200
    theirs = provider.calls[-1]
    theirs.bye()
    net.run(2.0)
    assert theirs.bye_status == 200
    # The provider's BYE reaches the caller with the provider's own CSeq, and the 200 goes
    # back to the provider unchanged (its transaction matched it: bye_status 200 above).
    byes = [m for m in alice.received if isinstance(m, Request) and m.method == "BYE"]
    assert len(byes) == 1 and byes[0].cseq is not None
    assert theirs.dialog is not None and byes[0].cseq.seq == theirs.dialog.local_cseq == 1
    assert call.state == "terminated"
    assert node.proxy.trunks.dialogs == {}


def test_wrong_credentials_end_as_403_after_one_retry() -> None:
    net, node, alice, provider = setup(password="other")
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(2.0)
    assert call.status == 403
    assert cseqs(provider.got("INVITE")) == [1, 2]    # one retry, never a loop
    assert not any(" 407 " in line for line in net.lines("proxy", "alice"))
    assert node.proxy.trunks.refused == 1 and node.proxy.trunks.dialogs == {}


def test_early_dialog_that_fails_leaves_no_shift() -> None:
    def ring_then_busy(call: Call) -> None:
        call.ring(180)       # an early dialog (To tag): its shift is recorded ...
        call.reject(486)     # ... and forgotten when the INVITE fails

    net, node, alice, provider = setup(then=ring_then_busy)
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(2.0)
    assert call.status == 486
    assert cseqs(provider.got("INVITE")) == [1, 2]
    assert node.proxy.trunks.dialogs == {}


def test_cancel_follows_the_resent_invite() -> None:
    net, _node, alice, provider = setup(then=lambda c: c.ring(180))
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(1.0)
    assert any(" 180 " in line for line in
                 net.lines("proxy", "alice"))
    call.cancel()
    net.run(2.0)
    cancels = provider.got("CANCEL")
    invites = provider.got("INVITE")
    assert len(cancels) == 1
    # §9.1: the CANCEL matches the INVITE it cancels: the re-sent one's branch and CSeq.
    assert cancels[0].cseq is not None and cancels[0].cseq.seq == 2
    assert cancels[0].top_via.branch == invites[1].top_via.branch  # type: ignore[union-attr]
    assert call.status == 487


def test_forked_beside_a_plain_branch() -> None:
    net, _node, alice, provider = setup(also="sip:carol@127.0.0.1:5095")
    carol = Phone(net, "carol", 5095, policy=lambda c: c.ring(180))
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(1.0)
    assert call.status == 200 and call.state == "confirmed"
    assert cseqs(provider.got("INVITE")) == [1, 2]
    # The plain branch was cancelled after the trunk's 2xx (§16.7 step 10), unshifted.
    assert carol.calls and carol.calls[0].state == "terminated"
    assert "CANCEL sip:carol@127.0.0.1:5095 SIP/2.0" in net.lines("proxy", "carol")
    call.bye()
    net.run(2.0)
    assert call.bye_status == 200 and cseqs(provider.got("BYE")) == [3]


def test_timer_c_cancels_the_resent_invite() -> None:
    net, node, alice, provider = setup(then=lambda c: c.ring(180), timer_c=5.0)
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(10.0)
    cancels = provider.got("CANCEL")
    assert len(cancels) == 1 and cancels[0].cseq is not None and cancels[0].cseq.seq == 2
    assert call.status == 408                   # §16.8: nobody answered
    assert node.proxy.pending == 0


def test_unchallenged_trunk_call_keeps_an_unshifted_entry() -> None:
    net = Net()
    node = ProxyNode(net, TrunkRouter())
    node.proxy.trunks = TrunkAuth({"prov": DigestClient("trunkuser", "pw")})
    alice = Caller(net)
    Phone(net, "provider", 5090)               # answers without a challenge
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(1.0)
    assert call.status == 200
    # One entry, offset 0: it names the trunk, so a challenged BYE would be answered too.
    (entry,) = node.proxy.trunks.dialogs.values()
    assert entry.offset == 0 and entry.trunk == "prov"
    call.bye()
    net.run(2.0)
    assert call.bye_status == 200 and node.proxy.trunks.dialogs == {}


def test_no_trunk_state_without_trunks() -> None:
    net = Net()
    node = ProxyNode(net, TrunkRouter())
    alice = Phone(net, "alice", 5070)
    Provider(net)
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(2.0)
    # Without trunk credentials the challenge goes to the caller as it is.
    assert call.status == 407
    assert node.proxy.trunks is None


def test_challenge_after_cancel_is_not_answered_nor_relayed() -> None:
    # The provider sends nothing provisional before its 407, so the caller's CANCEL has to
    # wait (§9.1); the 407 then ends the branch, and the caller hears 487, never the 407.
    net, node, alice, provider = setup()
    net.drop = lambda data, dest: dest.port == 5090 and data.startswith(b"INVITE") \
        and net.wheel.time() < 0.2          # the first INVITE is "slow" to arrive
    call = alice.ua.invite("sip:+15550100@example.com", body=b"v=0\r\n", proxy=PROXY)
    net.run(0.1)
    call.cancel()
    net.run(5.0)
    assert call.status == 487
    assert not any(" 407 " in line for line in net.lines("proxy", "alice"))
    assert cseqs(provider.got("INVITE")) == [1]     # no re-send after the CANCEL
    assert node.proxy.pending == 0


def test_trunks_driver_registers_and_refreshes_on_the_proxy_clock() -> None:
    from test_proxy_net import Raw

    from fastsip.app.trunks import Trunks
    from fastsip.proxy.trunk import REGISTERED, parse_trunk

    net = Net()
    node = ProxyNode(net, TrunkRouter())
    creds = Credentials()
    creds.add("trunkuser", password="pw")
    auth = DigestAuthenticator("provider.test", creds)

    def registrar(request: Request) -> Response:
        now = net.wheel.time()
        if not auth.authenticate(request, now).ok:
            return auth.challenge(request, now)
        contact = (request.headers.get("Contact") or "").split(";")[0]
        return request.reply(200, to_tag="r1",
                             headers=[("Contact", f"{contact};expires=10")])

    raw = Raw(net, "registrar", 5099, auto=registrar)
    trunks = Trunks([parse_trunk("prov=sip:trunkuser@127.0.0.1:5099")],
                    {"prov": DigestClient("trunkuser", "pw")})
    trunks.attach(node.proxy)
    assert node.proxy.trunks is trunks.auth
    net.run(1.0)
    status = trunks.status()["prov"]
    assert status["state"] == REGISTERED and status["failures"] == 0
    assert status["expires_at"] is not None and status["next_attempt"] is not None
    # Granted 10 s: refreshed every 5 s, each a challenged REGISTER and its answer.
    net.run(31.0)
    reg = trunks.registrations["prov"]
    assert reg.registered_count == 7
    registers = raw.requests("REGISTER")
    assert len(registers) == 14
    assert registers[0].headers.get("Contact") == "<sip:trunkuser@127.0.0.1:5060>;expires=3600"
    # Which trunk a request came from: its source, else our registered Contact.
    invite = Request.create("INVITE", "sip:trunkuser@127.0.0.1:5060", [
        ("Via", "SIP/2.0/UDP 127.0.0.9:5070;branch=z9hG4bK-i"), ("From", "<sip:x@y>;tag=1"),
        ("To", "<sip:trunkuser@127.0.0.1>"), ("Call-ID", "i1"), ("CSeq", "1 INVITE")])
    assert trunks.match(Address("UDP", "127.0.0.1", 5099), invite) == "prov"
    assert trunks.match(Address("UDP", "127.0.0.9", 5070), invite) == "prov"
    other = Request.create("INVITE", "sip:bob@127.0.0.1:5060", [
        ("Via", "SIP/2.0/UDP 127.0.0.9:5070;branch=z9hG4bK-j"), ("From", "<sip:x@y>;tag=1"),
        ("To", "<sip:bob@127.0.0.1>"), ("Call-ID", "i2"), ("CSeq", "1 INVITE")])
    assert trunks.match(Address("UDP", "127.0.0.9", 5070), other) is None
    trunks.stop()
    net.run(60.0)
    assert len(raw.requests("REGISTER")) == 14    # stopped: no more refreshes
