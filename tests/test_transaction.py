"""RFC 3261 §17 state machines at exact times: every timer, every transition of figures 5-8
(with RFC 6026's Accepted state), and the matching rules of §17.1.3 and §17.2.3.

The clock is a real TimerWheel advanced by hand; the transport records what would go out.
"""

from __future__ import annotations

from typing import Any

import pytest

import fastsip
from fastsip import TimerWheel
from fastsip.transaction import (
    ACCEPTED,
    CALLING,
    COMPLETED,
    CONFIRMED,
    PROCEEDING,
    TERMINATED,
    TRYING,
    ClientTransaction,
    ServerTransaction,
    TimerConfig,
    TransactionLayer,
    hop_by_hop_request,
    new_branch,
)
from fastsip.transport import Address

UDP = Address("UDP", "192.0.2.20", 5060)
TCP = Address("TCP", "192.0.2.20", 5060, connection=7)


class Wire:
    """The transport: records (message, destination) for everything sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[fastsip.Message, Address]] = []

    def send(self, data: bytes, dest: Address) -> None:
        self.sent.append((fastsip.parse(data), dest))

    def sent_by(self, transport: str) -> tuple[str, int]:
        return ("192.0.2.1", 5060)

    def take(self) -> list[fastsip.Message]:
        out = [m for m, _ in self.sent]
        self.sent.clear()
        return out


class Recorder:
    """Both a ClientHandler and a TransactionUser that records every call."""

    def __init__(self, answer: int | None = None) -> None:
        self.events: list[tuple[str, Any]] = []
        self.answer = answer

    def on_response(self, txn: ClientTransaction, response: fastsip.Response) -> None:
        self.events.append(("response", response.status_code))

    def on_timeout(self, txn: ClientTransaction) -> None:
        self.events.append(("timeout", txn.request.method))

    def on_transport_error(self, txn: ClientTransaction) -> None:
        self.events.append(("transport_error", txn.request.method))

    def on_request(self, txn: ServerTransaction, request: fastsip.Request) -> None:
        self.events.append(("request", request.method))
        if self.answer is not None:
            txn.reply(self.answer)

    def on_ack(self, request: fastsip.Request, source: Address) -> None:
        self.events.append(("ack", request.cseq.seq if request.cseq else None))

    def on_stray_response(self, response: fastsip.Response, source: Address) -> None:
        self.events.append(("stray", response.status_code))

    def on_server_timeout(self, txn: ServerTransaction) -> None:
        self.events.append(("server_timeout", txn.method))


def make(tu: Recorder | None = None) -> tuple[TransactionLayer, Wire, TimerWheel, Recorder]:
    wire, wheel, rec = Wire(), TimerWheel(tick=0.001), tu or Recorder()
    return TransactionLayer(wire, wheel, rec, TimerConfig()), wire, wheel, rec


def request(method: str = "INVITE", branch: str | None = None, cseq: int = 1,
            host: str = "client.example.com", to_tag: str = "") -> fastsip.Request:
    branch = branch or new_branch()
    to = "<sip:bob@example.com>" + (f";tag={to_tag}" if to_tag else "")
    return fastsip.Request.create(method, "sip:bob@example.com", [
        ("Via", f"SIP/2.0/UDP {host}:5060;branch={branch}"),
        ("Route", "<sip:proxy.example.com;lr>"),
        ("Max-Forwards", "70"),
        ("From", "<sip:alice@example.com>;tag=a1"),
        ("To", to),
        ("Call-ID", "call-1@example.com"),
        ("CSeq", f"{cseq} {method}"),
    ])


def response(req: fastsip.Request, status: int, to_tag: str = "b2") -> fastsip.Response:
    return req.reply(status, to_tag=to_tag)


def times_of(wheel: TimerWheel, wire: Wire, until: float, step: float = 0.001) -> list[float]:
    """Advance to `until` in small steps and return when something was sent."""
    out = []
    t = wheel.time()
    while t < until:
        t = round(t + step, 6)
        wheel.advance(t)
        if wire.sent:
            out.append(t)
            wire.sent.clear()
    return out


# -- client INVITE (figure 5, RFC 6026 figure 5) -------------------------------------------------

def test_client_invite_timer_a_doubles_and_timer_b_times_out() -> None:
    layer, wire, wheel, rec = make()
    txn = layer.request(request(), UDP, rec)
    assert txn.state == CALLING and len(wire.take()) == 1
    sends = times_of(wheel, wire, 33.0, step=0.0005)
    # Timer A: T1, 2T1, 4T1 ... after each send; Timer B at 64*T1 = 32 s (A's 7th would be 63.5).
    assert sends == pytest.approx([0.5, 1.5, 3.5, 7.5, 15.5, 31.5], abs=0.002)
    assert rec.events == [("timeout", "INVITE")]
    assert txn.state == TERMINATED and layer.client_transactions == 0


def test_client_invite_provisional_stops_retransmissions_and_timer_b() -> None:
    layer, wire, wheel, rec = make()
    req = request()
    txn = layer.request(req, UDP, rec)
    wire.take()
    wheel.advance(0.2)
    layer.receive(response(req, 180), UDP)
    assert txn.state == PROCEEDING
    assert times_of(wheel, wire, 40.0, step=0.01) == []
    assert rec.events == [("response", 180)]  # no timeout in Proceeding
    layer.receive(response(req, 183), UDP)
    assert rec.events[-1] == ("response", 183)


def test_client_invite_2xx_accepted_passes_every_2xx_then_timer_m() -> None:
    layer, wire, wheel, rec = make()
    req = request()
    txn = layer.request(req, UDP, rec)
    ok = response(req, 200)
    layer.receive(response(req, 100), UDP)
    layer.receive(ok, UDP)
    assert txn.state == ACCEPTED
    layer.receive(ok, UDP)  # retransmitted 2xx: to the TU too (it re-sends its ACK)
    assert rec.events == [("response", 100), ("response", 200), ("response", 200)]
    assert [m.method for m in wire.take()] == ["INVITE"]  # the transaction never ACKs a 2xx
    wheel.advance(31.9)
    assert txn.state == ACCEPTED
    wheel.advance(32.01)
    assert txn.state == TERMINATED and layer.client_transactions == 0
    layer.receive(ok, UDP)  # after Timer M: a stray for the UA core
    assert rec.events[-1] == ("stray", 200)


def test_client_invite_non_2xx_is_acked_by_the_transaction() -> None:
    layer, wire, wheel, rec = make()
    req = request(cseq=7)
    txn = layer.request(req, UDP, rec)
    wire.take()
    busy = response(req, 486, to_tag="t9")
    layer.receive(busy, UDP)
    assert txn.state == COMPLETED and rec.events == [("response", 486)]
    (ack,) = wire.take()
    assert ack.method == "ACK" and str(ack.uri) == str(req.uri)
    assert ack.via[0].branch == req.via[0].branch and len(ack.via) == 1
    assert ack.cseq == (7, "ACK") and ack.to.tag == "t9" and ack.from_.tag == "a1"
    assert ack.call_id == req.call_id and [str(r) for r in ack.route] == [str(r) for r in req.route]
    layer.receive(busy, UDP)  # retransmitted final: ACK again, TU not bothered
    assert [m.method for m in wire.take()] == ["ACK"] and rec.events == [("response", 486)]
    wheel.advance(31.9)
    assert txn.state == COMPLETED  # Timer D: 32 s over UDP
    wheel.advance(32.1)
    assert txn.state == TERMINATED


def test_client_invite_over_reliable_transport() -> None:
    layer, wire, wheel, rec = make()
    req = request()
    txn = layer.request(req, TCP, rec)
    assert times_of(wheel, wire, 31.0, step=0.01) == [0.01]  # just the initial send
    layer.receive(response(req, 603), TCP)
    assert txn.state == TERMINATED  # Timer D = 0 for reliable transports
    assert [m.method for m in wire.take()] == ["ACK"]


# -- client non-INVITE (figure 6) -----------------------------------------------------------------

def test_client_non_invite_timer_e_caps_at_t2_and_timer_f() -> None:
    layer, wire, wheel, rec = make()
    layer.request(request("OPTIONS"), UDP, rec)
    wire.take()
    sends = times_of(wheel, wire, 33.0, step=0.0005)
    assert sends == pytest.approx([0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5],
                                  abs=0.002)
    assert rec.events == [("timeout", "OPTIONS")]


def test_client_non_invite_provisional_then_final_then_timer_k() -> None:
    layer, wire, wheel, rec = make()
    req = request("REGISTER")
    txn = layer.request(req, UDP, rec)
    wire.take()
    wheel.advance(0.1)
    layer.receive(response(req, 100), UDP)
    assert txn.state == PROCEEDING
    # In Proceeding, Timer E fires at T2 intervals.
    assert times_of(wheel, wire, 9.0, step=0.0005) == pytest.approx([0.5, 4.5, 8.5], abs=0.002)
    ok = response(req, 200)
    layer.receive(ok, UDP)
    layer.receive(ok, UDP)  # absorbed
    assert rec.events == [("response", 100), ("response", 200)]
    assert txn.state == COMPLETED
    wheel.advance(9.0 + 4.9)
    assert txn.state == COMPLETED
    wheel.advance(9.0 + 5.1)  # Timer K = T4
    assert txn.state == TERMINATED


@pytest.mark.parametrize("method", ["INVITE", "OPTIONS"])
@pytest.mark.parametrize("start", [0.0, 7.3])
def test_timer_b_and_f_expire_at_64_t1_from_the_send_over_udp(method: str, start: float) -> None:
    # Over UDP Timers B/F ride on the end of the A/E retransmission chain (one wheel node per
    # transaction): they must still expire at 64*T1 after the request was first sent, not
    # 64*T1 after some retransmission, and not before.
    layer, wire, wheel, rec = make()
    wheel.advance(start)
    layer.request(request(method), UDP, rec)
    wire.take()
    assert len(wheel) == 1                               # A/E and B/F share one node
    wheel.advance(start + 31.999)
    assert rec.events == []
    wheel.advance(start + 32.0)
    assert rec.events == [("timeout", method)]
    assert layer.client_transactions == 0 and len(wheel) == 0


def test_timer_f_still_expires_in_proceeding_while_e_runs_at_t2() -> None:
    layer, wire, wheel, rec = make()
    req = request("OPTIONS")
    layer.request(req, UDP, rec)
    wire.take()
    wheel.advance(0.2)
    layer.receive(response(req, 180), UDP)
    sends = times_of(wheel, wire, 31.999, step=0.0005)
    assert sends == pytest.approx([0.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5], abs=0.002)
    assert rec.events == [("response", 180)]
    wheel.advance(32.0)
    assert rec.events == [("response", 180), ("timeout", "OPTIONS")]


def test_timer_b_wins_over_a_retransmission_due_at_the_same_instant() -> None:
    # T1 = 1, T2 = 4: E fires at 1, 3, 7, 11, ... 59, 63; F at 64 = 63 + 1 < 63 + 4.  And an
    # INVITE with T1 = 0.5 whose A would fire at 31.5 + 32 = 63.5 > B (32): B comes alone.
    wire, wheel, rec = Wire(), TimerWheel(tick=0.001), Recorder()
    layer = TransactionLayer(wire, wheel, rec, TimerConfig(t1=1.0, t2=4.0))
    layer.request(request("OPTIONS"), UDP, rec)
    wire.take()
    sends = times_of(wheel, wire, 65.0, step=0.0005)
    assert sends == pytest.approx([1, 3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47, 51, 55,
                                   59, 63], abs=0.002)
    assert rec.events == [("timeout", "OPTIONS")]


def test_a_final_response_leaves_one_timer_node_cancelled_per_client_transaction() -> None:
    # A 2xx to an INVITE, or a final response to a non-INVITE, costs one cancel (the A/E
    # chain, which carries B/F) and arms one linger timer (M, K).
    layer, _wire, wheel, rec = make()
    for method in ("INVITE", "BYE"):
        req = request(method)
        before = (wheel.scheduled, wheel.cancelled)
        layer.request(req, UDP, rec)
        layer.receive(response(req, 200), UDP)
        assert (wheel.scheduled - before[0], wheel.cancelled - before[1]) == (2, 1), method


def test_transport_error_ends_client_transactions_to_that_peer() -> None:
    layer, _wire, _wheel, rec = make()
    layer.request(request("OPTIONS"), TCP, rec)
    layer.request(request("OPTIONS"), Address("UDP", "192.0.2.99", 5060), rec)
    layer.transport_error(Address("TCP", "192.0.2.20", 5060))
    assert rec.events == [("transport_error", "OPTIONS")]
    assert layer.client_transactions == 1


def test_request_needs_a_branch_and_is_not_ack() -> None:
    layer, _wire, _wheel, rec = make()
    with pytest.raises(ValueError):
        layer.request(request("ACK"), UDP, rec)
    no_branch = fastsip.Request.create("OPTIONS", "sip:a@b", [("Via", "SIP/2.0/UDP h"),
                                                             ("CSeq", "1 OPTIONS")])
    with pytest.raises(ValueError):
        layer.request(no_branch, UDP, rec)


# -- server INVITE (figure 7, RFC 6026 figure 7) -----------------------------------------------

def test_server_invite_sends_100_and_absorbs_retransmissions() -> None:
    layer, wire, _wheel, rec = make()
    req = request()
    layer.receive(req, UDP)
    assert rec.events == [("request", "INVITE")]
    (trying,) = wire.take()
    assert trying.status_code == 100 and trying.to.tag is None
    layer.receive(req, UDP)  # retransmission: the last provisional again, TU not called
    assert [m.status_code for m in wire.take()] == [100]
    assert rec.events == [("request", "INVITE")]
    assert layer.server_transactions == 1


def test_server_invite_non_2xx_timer_g_and_timer_h() -> None:
    layer, wire, wheel, rec = make(Recorder(answer=486))
    layer.receive(request(), UDP)
    assert [m.status_code for m in wire.take()] == [486]  # answered at once: no 100
    sends = times_of(wheel, wire, 33.0, step=0.0005)
    # Timer G: T1 doubling up to T2; Timer H at 64*T1.
    assert sends == pytest.approx([0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5],
                                  abs=0.002)
    assert rec.events == [("request", "INVITE"), ("server_timeout", "INVITE")]
    assert layer.server_transactions == 0


def test_server_invite_ack_confirms_then_timer_i() -> None:
    layer, wire, wheel, rec = make(Recorder(answer=404))
    req = request()
    layer.receive(req, UDP)
    final = wire.take()[0]
    txn = next(iter(layer._server.values()))
    ack = fastsip.Request.create("ACK", "sip:bob@example.com", [
        ("Via", str(req.via[0])), ("From", "<sip:alice@example.com>;tag=a1"),
        ("To", f"<sip:bob@example.com>;tag={final.to.tag}"), ("Call-ID", "call-1@example.com"),
        ("CSeq", "1 ACK")])
    wheel.advance(0.2)
    layer.receive(ack, UDP)
    assert txn.state == CONFIRMED
    assert ("ack", 1) not in rec.events  # an ACK for a non-2xx is the transaction's
    assert times_of(wheel, wire, 5.1, step=0.001) == []  # Timer G stopped
    assert txn.state == CONFIRMED  # absorbing ACK retransmissions for T4 ...
    wheel.advance(5.25)
    assert txn.state == TERMINATED  # ... Timer I = T4 = 5 s after the ACK


def test_server_invite_2xx_accepted_hands_ack_up_and_timer_l() -> None:
    layer, wire, wheel, rec = make(Recorder(answer=200))
    req = request()
    layer.receive(req, UDP)
    txn = next(iter(layer._server.values()))
    assert txn.state == ACCEPTED and [m.status_code for m in wire.take()] == [200]
    layer.receive(req, UDP)  # INVITE retransmission: absorbed, nothing re-sent by the txn
    assert wire.take() == []
    txn.respond(txn.last_response)  # the TU's own 2xx retransmission goes out
    assert [m.status_code for m in wire.take()] == [200]
    ack = fastsip.Request.create("ACK", "sip:bob@example.com", [
        ("Via", str(req.via[0])), ("From", "<sip:alice@example.com>;tag=a1"),
        ("To", "<sip:bob@example.com>;tag=x"), ("Call-ID", "call-1@example.com"),
        ("CSeq", "1 ACK")])
    layer.receive(ack, UDP)
    assert rec.events[-1] == ("ack", 1)
    with pytest.raises(ValueError):
        txn.reply(486)
    wheel.advance(32.1)  # Timer L
    assert txn.state == TERMINATED and layer.server_transactions == 0
    layer.receive(ack, UDP)  # an ACK for a 2xx with no transaction: straight to the TU
    assert rec.events[-1] == ("ack", 1)


def test_server_invite_over_reliable_transport_terminates_on_ack() -> None:
    layer, wire, wheel, _rec = make(Recorder(answer=480))
    req = request()
    layer.receive(req, TCP)
    txn = next(iter(layer._server.values()))
    (final, dest) = wire.sent[0]
    # Back over the connection the request came on (and, were it closed, to the Via's
    # sent-by: §18.2.2).
    assert dest.connection == TCP.connection and dest.transport == "TCP"
    assert (dest.host, dest.port) == ("client.example.com", 5060)
    wire.take()
    assert times_of(wheel, wire, 5.0, step=0.01) == []  # no Timer G over TCP
    ack = fastsip.Request.create("ACK", "sip:bob@example.com", [
        ("Via", str(req.via[0])), ("From", "<sip:alice@example.com>;tag=a1"),
        ("To", f"<sip:bob@example.com>;tag={final.to.tag}"), ("Call-ID", "call-1@example.com"),
        ("CSeq", "1 ACK")])
    layer.receive(ack, TCP)
    assert txn.state == TERMINATED  # Timer I = 0


# -- server non-INVITE (figure 8) -------------------------------------------------------------------

def test_server_non_invite_trying_proceeding_completed_timer_j() -> None:
    layer, wire, wheel, rec = make()
    req = request("OPTIONS")
    layer.receive(req, UDP)
    txn = next(iter(layer._server.values()))
    assert txn.state == TRYING and wire.take() == []  # no automatic 100 for non-INVITE
    layer.receive(req, UDP)
    assert wire.take() == [] and rec.events == [("request", "OPTIONS")]  # absorbed in Trying
    txn.reply(100)
    assert txn.state == PROCEEDING
    layer.receive(req, UDP)
    assert [m.status_code for m in wire.take()] == [100, 100]
    txn.reply(200)
    assert txn.state == COMPLETED
    layer.receive(req, UDP)
    assert [m.status_code for m in wire.take()] == [200, 200]
    wheel.advance(31.9)
    assert txn.state == COMPLETED
    wheel.advance(32.1)  # Timer J = 64*T1 over UDP
    assert txn.state == TERMINATED


def test_server_non_invite_reliable_terminates_at_once() -> None:
    layer, _wire, _wheel, _rec = make(Recorder(answer=200))
    layer.receive(request("BYE"), TCP)
    assert layer.server_transactions == 0


# -- matching (§17.1.3, §17.2.3) --------------------------------------------------------------------

def test_server_matching_branch_sent_by_and_method() -> None:
    layer, _wire, _wheel, rec = make(Recorder(answer=200))
    b = new_branch()
    layer.receive(request("OPTIONS", branch=b), UDP)
    layer.receive(request("OPTIONS", branch=b), UDP)  # retransmission
    layer.receive(request("OPTIONS", branch=b, host="other.example.com"), UDP)  # other sent-by
    layer.receive(request("OPTIONS", branch=new_branch()), UDP)
    assert rec.events == [("request", "OPTIONS")] * 3


def test_cancel_is_its_own_transaction_and_finds_the_invite() -> None:
    layer, _wire, _wheel, rec = make()
    b = new_branch()
    layer.receive(request("INVITE", branch=b), UDP)
    cancel = request("CANCEL", branch=b)
    layer.receive(cancel, UDP)
    assert rec.events == [("request", "INVITE"), ("request", "CANCEL")]
    invite_txn = layer.find_invite(cancel)
    assert invite_txn is not None and invite_txn.method == "INVITE"
    assert layer.find_invite(request("CANCEL", branch=new_branch())) is None


def test_hop_by_hop_requests_copy_what_matches_the_invite_and_nothing_else() -> None:
    # §9.1 and §17.1.1.3: Request-URI, Call-ID, From, CSeq number, the single top Via and the
    # Route set come from the INVITE; the ACK's To is the response's (with its tag).
    invite = fastsip.Request.create("INVITE", "sip:bob@192.0.2.9:5070;transport=udp", [
        ("Via", "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-ours"),
        ("Via", "SIP/2.0/UDP 10.0.0.1:5062;branch=z9hG4bK-theirs"),
        ("Route", "<sip:p1.example.com;lr>"), ("Route", "<sip:p2.example.com;lr>"),
        ("Max-Forwards", "12"), ("From", "<sip:a@example.com>;tag=f1"),
        ("To", "<sip:bob@example.com>"), ("Call-ID", "hop@example.com"), ("CSeq", "314 INVITE"),
        ("Contact", "<sip:a@10.0.0.1:5062>"), ("Subject", "not copied")], b"v=0\r\n",
        content_type="application/sdp")
    cancel = hop_by_hop_request(invite, "CANCEL", headers=[("Reason", "SIP;cause=200")])
    ack = hop_by_hop_request(invite, "ACK", to="<sip:bob@example.com>;tag=t9")
    for req, method in ((cancel, "CANCEL"), (ack, "ACK")):
        assert req.method == method and str(req.uri) == str(invite.uri)
        assert [v.branch for v in req.via] == ["z9hG4bK-ours"]
        assert [str(r) for r in req.route] == [str(r) for r in invite.route]
        assert req.call_id == invite.call_id and req.from_ is not None and req.from_.tag == "f1"
        assert req.cseq is not None and (req.cseq.seq, req.cseq.method) == (314, method)
        assert req.max_forwards == 70 and req.body == b""
        assert req.headers.get("Contact") is None and req.headers.get("Subject") is None
    assert cancel.to is not None and cancel.to.tag is None
    assert cancel.headers.get("Reason") == "SIP;cause=200"
    assert ack.to is not None and ack.to.tag == "t9" and ack.headers.get("Reason") is None
    # Each matches the INVITE's transaction at the next hop (§9.2, §17.2.3).
    layer, _wire, _wheel, _rec = make()
    assert layer.server_key(cancel)[:-1] == layer.server_key(invite)[:-1]
    assert layer.server_key(ack) == layer.server_key(invite)


def test_rfc2543_requests_match_without_magic_cookie() -> None:
    layer, wire, _wheel, rec = make(Recorder(answer=486))
    req = fastsip.Request.create("INVITE", "sip:bob@example.com", [
        ("Via", "SIP/2.0/UDP old.example.com"), ("From", "<sip:a@example.com>;tag=1"),
        ("To", "<sip:bob@example.com>"), ("Call-ID", "2543@example.com"), ("CSeq", "5 INVITE")])
    layer.receive(req, UDP)
    final = wire.take()[0]
    layer.receive(req, UDP)  # retransmission matched by the RFC 2543 rule
    assert rec.events == [("request", "INVITE")] and [m.status_code for m in wire.take()] == [486]
    ack = fastsip.Request.create("ACK", "sip:bob@example.com", [
        ("Via", "SIP/2.0/UDP old.example.com"), ("From", "<sip:a@example.com>;tag=1"),
        ("To", f"<sip:bob@example.com>;tag={final.to.tag}"), ("Call-ID", "2543@example.com"),
        ("CSeq", "5 ACK")])
    layer.receive(ack, UDP)
    assert next(iter(layer._server.values())).state == CONFIRMED


def test_client_matching_by_branch_and_cseq_method() -> None:
    layer, _wire, _wheel, rec = make()
    req = request("INVITE")
    layer.request(req, UDP, rec)
    other = request("INVITE")
    layer.receive(response(other, 200), UDP)  # unknown branch
    cancel_resp = fastsip.parse(bytes(response(req, 200)).replace(b"1 INVITE", b"1 CANCEL"))
    layer.receive(cancel_resp, UDP)  # same branch, other method: not this transaction
    assert rec.events == [("stray", 200), ("stray", 200)]


def test_responses_go_where_section_18_2_2_says() -> None:
    layer, wire, _wheel, _rec = make(Recorder(answer=200))
    req = fastsip.Request.create("OPTIONS", "sip:bob@example.com", [
        ("Via", f"SIP/2.0/UDP 10.0.0.5:5070;branch={new_branch()};rport=40000;received=198.51.100.7"),
        ("From", "<sip:a@example.com>;tag=1"), ("To", "<sip:bob@example.com>"),
        ("Call-ID", "x"), ("CSeq", "1 OPTIONS")])
    layer.receive(req, Address("UDP", "198.51.100.7", 40000))
    (_, dest) = wire.sent[0]
    assert dest == Address("UDP", "198.51.100.7", 40000)


def test_server_non_invite_abandoned_by_its_tu_is_freed() -> None:
    layer, _wire, wheel, _rec = make()  # the recorder never answers
    layer.receive(request("OPTIONS"), UDP)
    txn = next(iter(layer._server.values()))
    wheel.advance(63.9)
    assert txn.state == TRYING and layer.server_transactions == 1
    wheel.advance(64.1)  # 2*64*T1: well after the client's Timer F
    assert txn.state == TERMINATED and layer.server_transactions == 0


def test_server_non_invite_answered_late_keeps_its_timer_j() -> None:
    layer, _wire, wheel, _rec = make()
    layer.receive(request("OPTIONS"), UDP)
    txn = next(iter(layer._server.values()))
    wheel.advance(10.0)
    txn.reply(200)
    wheel.advance(41.9)  # Timer J runs 32 s from the answer; the abandon guard is gone
    assert txn.state == COMPLETED
    wheel.advance(42.2)  # (a lax timer: up to 128 ms late, so that lingerers share wakeups)
    assert txn.state == TERMINATED


# -- stateless answers, caps, robustness (a server on a public address) ------------------------


def test_respond_statelessly_sends_once_and_keeps_nothing() -> None:
    class Reject(Recorder):
        def on_request(self, txn: ServerTransaction, request: fastsip.Request) -> None:
            super().on_request(txn, request)
            txn.respond_statelessly(request.reply(404, to_tag="sl"))

    layer, wire, wheel, rec = make(Reject())
    invite = request("INVITE")
    layer.receive(invite, UDP)
    assert [m.status_code for m in wire.take()] == [404]   # no 100 before it either
    assert layer.server_transactions == 0
    # No Timer G: nothing more is ever sent; a retransmission is a new request, answered anew.
    wheel.advance(40.0)
    assert wire.take() == []
    layer.receive(invite, UDP)
    assert [m.status_code for m in wire.take()] == [404]
    # The ACK for it matches nothing: the TU hears it (and decides to drop it).
    ack = fastsip.Request.create("ACK", "sip:bob@example.com", [
        ("Via", str(invite.via[0])), ("From", "<sip:alice@example.com>;tag=a1"),
        ("To", "<sip:bob@example.com>;tag=sl"), ("Call-ID", "call-1@example.com"),
        ("CSeq", "1 ACK")])
    layer.receive(ack, UDP)
    assert rec.events[-1] == ("ack", 1)


def test_server_table_cap_gets_503_without_a_transaction() -> None:
    layer, wire, _wheel, rec = make(Recorder())          # the TU never answers
    layer.max_server_transactions = 3
    for _ in range(5):
        layer.receive(request("OPTIONS"), UDP)
    sent = wire.take()
    assert [m.status_code for m in sent] == [503, 503]
    assert all(m.headers.get("Retry-After") == "5" for m in sent)
    assert layer.server_transactions == 3 and len(rec.events) == 3 and layer.refusals.count == 2


def test_client_table_cap_refuses_new_requests() -> None:
    layer, _wire, _wheel, rec = make()
    layer.max_client_transactions = 2
    layer.request(request("OPTIONS"), UDP, rec)
    layer.request(request("OPTIONS"), UDP, rec)
    with pytest.raises(ValueError, match="cap"):
        layer.request(request("OPTIONS"), UDP, rec)


def test_a_full_server_table_ends_its_oldest_lingering_transaction_before_refusing() -> None:
    """A finished transaction lingers (Timer J: 32 s over UDP) only to absorb retransmissions:
    at the cap, the oldest of those goes early; only a table all at work answers 503."""
    layer, wire, wheel, rec = make(Recorder(answer=200))
    layer.max_server_transactions = 2
    first = request("OPTIONS")
    layer.receive(first, UDP)                            # answered: lingers (Completed)
    rec.answer = None
    busy = request("OPTIONS")
    layer.receive(busy, UDP)                             # unanswered: at work (Trying)
    assert [m.status_code for m in wire.take()] == [200]
    # The table is full; a third request ends the lingering one and is taken.
    third = request("OPTIONS")
    layer.receive(third, UDP)
    assert wire.take() == [] and rec.events[-1] == ("request", "OPTIONS")
    assert layer.server_transactions == 2 and layer.reclaimed == 1
    assert layer.refusals.count == 0
    # Both left are at work: now the cap refuses, statelessly.
    layer.receive(request("OPTIONS"), UDP)
    assert [m.status_code for m in wire.take()] == [503]
    assert layer.refusals.count == 1 and layer.reclaimed == 1
    # The ended one is gone: its retransmission is a new request to the TU (no 200 resent).
    events = len(rec.events)
    busy_txn = layer._server[layer.server_key(busy)]
    busy_txn.reply(200)                                  # (frees a slot: lingers now)
    wire.take()
    layer.receive(first, UDP)
    assert len(rec.events) == events + 1 and wire.take() == []
    wheel.advance(wheel.time() + 40)


def test_a_full_client_table_ends_its_oldest_lingering_transaction_before_refusing() -> None:
    layer, _wire, _wheel, rec = make()
    layer.max_client_transactions = 2
    done = layer.request(request("OPTIONS"), UDP, rec)
    layer.receive(response(done.request, 200), UDP)      # Completed: lingers (Timer K)
    assert done.state == COMPLETED
    busy = layer.request(request("OPTIONS"), UDP, rec)   # Trying: at work
    third = layer.request(request("OPTIONS"), UDP, rec)  # the table was full: done ends
    assert done.state == TERMINATED and busy.state == TRYING and third.state == TRYING
    assert layer.client_transactions == 2 and layer.reclaimed == 1
    with pytest.raises(ValueError, match="cap"):
        layer.request(request("OPTIONS"), UDP, rec)


def test_a_parse_error_in_the_tu_gets_400_and_no_transaction_is_left() -> None:
    class Lazy(Recorder):
        def on_request(self, txn: ServerTransaction, request: fastsip.Request) -> None:
            request.contact  # noqa: B018 - a lazily parsed header that is malformed

    layer, wire, _wheel, _rec = make(Lazy())
    bad = fastsip.parse(bytes(request("OPTIONS")).replace(
        b"Max-Forwards", b"Contact: <sip:bob@exa mple.com>\r\nMax-Forwards"))
    layer.receive(bad, UDP)
    [answer] = wire.take()
    assert answer.status_code == 400 and answer.reason.startswith("Bad Request (")
    assert layer.server_transactions == 0


class Shedding(Recorder):
    """A TU that never reads a finished transaction's messages (as the proxy core)."""

    sheds_messages = True


def test_lingering_transactions_of_a_shedding_tu_keep_only_what_they_resend() -> None:
    # Server side: a non-INVITE in Completed still answers a retransmission with its final
    # response (kept as bytes), but its request and response objects are gone.
    layer, wire, wheel, rec = make(Shedding(answer=200))
    req = request("OPTIONS")
    layer.receive(req, UDP)
    txn = next(iter(layer._server.values()))
    assert txn.state == COMPLETED and txn.last_response is None and txn.method == "OPTIONS"
    with pytest.raises(ValueError, match="shed"):
        txn.request  # noqa: B018
    layer.receive(req, UDP)
    assert [m.status_code for m in wire.take()] == [200, 200]
    # An INVITE answered 486: Timer G still resends it, and the ACK still confirms.
    layer, wire, wheel, rec = make(Shedding(answer=486))
    invite = request()
    layer.receive(invite, UDP)
    itxn = layer._server[layer.server_key(invite)]
    assert itxn.state == COMPLETED and itxn.last_response is None
    [final] = wire.take()
    assert times_of(wheel, wire, 0.6) == [0.5]                  # Timer G
    ack = fastsip.Request.create("ACK", "sip:bob@example.com", [
        ("Via", str(invite.via[0])), ("From", "<sip:alice@example.com>;tag=a1"),
        ("To", f"<sip:bob@example.com>;tag={final.to.tag}"), ("Call-ID", "call-1@example.com"),
        ("CSeq", "1 ACK")])
    layer.receive(ack, UDP)
    assert itxn.state == CONFIRMED
    # Client side: an INVITE's 2xx in Accepted still reaches the TU every time; a non-2xx
    # is ACKed again from the kept bytes.
    ctxn = layer.request(request(), UDP, rec)
    sent = wire.take()[0]
    assert isinstance(sent, fastsip.Request)
    ok = response(sent, 200)
    layer.receive(ok, UDP)
    layer.receive(ok, UDP)
    assert ctxn.state == ACCEPTED and ctxn.last_response is None
    assert rec.events[-2:] == [("response", 200), ("response", 200)]
    ntxn = layer.request(request(), UDP, rec)
    busy = response(wire.take()[0], 486)  # type: ignore[arg-type]
    layer.receive(busy, UDP)
    layer.receive(busy, UDP)
    assert [m.method for m in wire.take()] == ["ACK", "ACK"]  # type: ignore[union-attr]
    assert ntxn.state == COMPLETED
    with pytest.raises(ValueError, match="shed"):
        ntxn.request  # noqa: B018


def test_a_tu_that_keeps_messages_reads_them_after_the_final_response() -> None:
    layer, _wire, _wheel, _rec = make(Recorder(answer=200))
    req = request("OPTIONS")
    layer.receive(req, UDP)
    txn = next(iter(layer._server.values()))
    assert txn.request is req and txn.last_response is not None


# -- the compiled paths: a driver's wheel scheduled in C, compiled TUs and handlers ---------------

class WheelClock:
    """What ``fastsip.asyncio.WheelDriver`` is to the layer, without a loop: its methods are
    its wheel's own (``call_later_now``, ``call_later_lax``, ``clock_time``), counted from an
    owner's clock that the test moves with the wheel.  The layer schedules on the wheel by C
    calls then; the timers must fire exactly as through a called clock."""

    def __init__(self, wheel: TimerWheel) -> None:
        self.now = wheel.time()
        self.wheel = wheel
        wheel.set_clock(lambda: self.now)
        self.call_later = wheel.call_later_now
        self.call_later_lax = wheel.call_later_lax
        self.time = wheel.clock_time


def times_of_owned(clock: WheelClock, wire: Wire, until: float,
                   step: float = 0.0005) -> list[float]:
    """times_of, with the owner's clock moved along with the wheel (as a loop's is)."""
    out = []
    t = clock.wheel.time()
    while t < until:
        t = round(t + step, 6)
        clock.now = t
        clock.wheel.advance(t)
        if wire.sent:
            out.append(t)
            wire.sent.clear()
    return out


def test_a_driver_clock_fires_the_same_client_timers_through_its_wheel() -> None:
    wire, wheel, rec = Wire(), TimerWheel(tick=0.001), Recorder()
    clock = WheelClock(wheel)
    layer = TransactionLayer(wire, clock, rec, TimerConfig())
    before = wheel.scheduled
    txn = layer.request(request(), UDP, rec)
    wire.take()
    assert wheel.scheduled == before + 1      # Timer A, on the driver's wheel
    # Timer A doubling, Timer B at 64*T1 (as test_client_invite_timer_a_doubles_... above).
    assert times_of_owned(clock, wire, 33.0) == pytest.approx(
        [0.5, 1.5, 3.5, 7.5, 15.5, 31.5], abs=0.002)
    assert rec.events == [("timeout", "INVITE")] and txn.state == TERMINATED
    # Non-INVITE: Timer E caps at T2; a final response then lingers (Timer K, lax).
    req = request("OPTIONS")
    ntxn = layer.request(req, UDP, rec)
    wire.take()
    start = clock.now
    sends = times_of_owned(clock, wire, start + 8.0)
    assert [round(t - start, 3) for t in sends] == pytest.approx([0.5, 1.5, 3.5, 7.5],
                                                                 abs=0.002)
    layer.receive(response(req, 200), UDP)
    assert ntxn.state == COMPLETED
    times_of_owned(clock, wire, clock.now + 5.2, step=0.01)     # T4 = 5 s, up to 1/8 late
    assert ntxn.state == TERMINATED


def test_a_driver_clock_fires_the_same_server_timers_through_its_wheel() -> None:
    wire, wheel, rec = Wire(), TimerWheel(tick=0.001), Recorder(answer=486)
    clock = WheelClock(wheel)
    layer = TransactionLayer(wire, clock, rec, TimerConfig())
    layer.receive(request(), UDP)
    assert [m.status_code for m in wire.take()] == [486]
    # Timer G doubling up to T2, Timer H at 64*T1 (lax: at most an eighth late, never early).
    assert times_of_owned(clock, wire, 36.5) == pytest.approx(
        [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5], abs=0.002)
    assert rec.events == [("request", "INVITE"), ("server_timeout", "INVITE")]
    assert layer.server_transactions == 0


def test_a_clock_that_is_not_its_wheels_own_is_called() -> None:
    # A driver whose call_later is its own (a wrapper, a test's spy) is called, not bypassed.
    wire, wheel, rec = Wire(), TimerWheel(tick=0.001), Recorder()
    clock = WheelClock(wheel)
    calls: list[float] = []

    def spy(delay: float, callback: Any, *args: Any) -> Any:
        calls.append(delay)
        return wheel.call_later_now(delay, callback, *args)

    clock.call_later = spy     # type: ignore[assignment]
    layer = TransactionLayer(wire, clock, rec, TimerConfig())
    layer.request(request(), UDP, rec)
    assert calls == [0.5]


def test_compiled_tu_and_handler_bases_dispatch_to_python_overrides() -> None:
    # TransactionUserBase / ClientHandlerBase are called by C calls; a Python subclass's
    # methods must still be the ones that run (and a base's own do nothing).
    from fastsip.transaction import ClientHandlerBase, TransactionUserBase

    class TU(TransactionUserBase):
        def __init__(self) -> None:
            self.events: list[tuple[str, Any]] = []

        def on_request(self, txn: Any, request: fastsip.Request) -> None:
            self.events.append(("request", request.method))
            txn.reply(486)

        def on_ack(self, request: fastsip.Request, source: Any) -> None:
            self.events.append(("ack", request.method))

    class Handler(ClientHandlerBase):
        def __init__(self) -> None:
            self.events: list[tuple[str, Any]] = []

        def on_response(self, txn: Any, response: fastsip.Response) -> None:
            self.events.append(("response", response.status_code))

    wire, wheel, tu = Wire(), TimerWheel(tick=0.001), TU()
    layer = TransactionLayer(wire, wheel, tu, TimerConfig())
    layer.receive(request("INVITE"), UDP)
    assert tu.events == [("request", "INVITE")]
    assert [m.status_code for m in wire.take()] == [486]
    layer.receive(request("ACK"), UDP)             # matches nothing: to the TU
    assert tu.events[-1] == ("ack", "ACK")
    layer.receive(response(request(), 200), UDP)  # a stray: the base's on_stray_response
    handler = Handler()
    req = request("OPTIONS")
    layer.request(req, UDP, handler)
    layer.receive(response(req, 200), UDP)
    assert handler.events == [("response", 200)]
    wheel.advance(40.0)                            # Timer K: no callback; nothing raised
    base = ClientHandlerBase()
    txn = layer.request(request("OPTIONS"), UDP, base)
    wheel.advance(80.0)                            # Timer F: the base's on_timeout, a no-op
    assert txn.state == TERMINATED
