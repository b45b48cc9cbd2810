"""UA core tests: two UserAgents over the real TransactionLayer, an in-memory network and a
TimerWheel as the clock, so every retransmission happens at an exact time (no sleeping)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import pytest

from fastsip import TimerWheel, parse
from fastsip.sip import Request, Response
from fastsip.transport import Address
from fastsip.transport.rules import stamp_received
from fastsip.ua import AutoAnswer, Call, OptionsResult, UAError, UserAgent

SDP_OFFER = (b"v=0\r\no=- 1 1 IN IP4 10.0.0.1\r\ns=-\r\nc=IN IP4 10.0.0.1\r\nt=0 0\r\n"
             b"m=audio 4000 RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n")


class Net:
    """Datagrams (or stream segments) queued between nodes; ``drop`` can lose some."""

    def __init__(self) -> None:
        self.wheel = TimerWheel(0.001)
        self.queue: deque[tuple[bytes, Address, Address]] = deque()
        self.nodes: dict[tuple[str, int], Node] = {}
        self.log: list[tuple[float, str, str]] = []   # (time, sender, first line)
        self.drop: Callable[[bytes, Address], bool] = lambda data, dest: False

    def run(self, until: float | None = None) -> None:
        """Deliver everything queued; with ``until``, also run the clock to that time."""
        self.flush()
        if until is None:
            return
        while True:
            nxt = self.wheel.next_deadline()
            if nxt is None or nxt > until:
                break
            self.wheel.advance(nxt)
            self.flush()
        self.wheel.advance(until)
        self.flush()

    def flush(self) -> None:
        while self.queue:
            data, src, dest = self.queue.popleft()
            node = self.nodes.get((dest.host, dest.port))
            if node is None or self.drop(data, dest):
                continue
            msg = parse(data)
            if isinstance(msg, Request):
                stamp_received(msg, src)
            node.layer.receive(msg, src)

    def sent(self, name: str, prefix: str) -> list[float]:
        return [t for t, who, line in self.log if who == name and line.startswith(prefix)]


class Node:
    def __init__(self, net: Net, name: str, port: int, transport: str = "UDP", **kw: object) -> None:
        self.net = net
        self.name = name
        self.host = "127.0.0.1"
        self.port = port
        self.transport = transport
        net.nodes[(self.host, port)] = self
        self.ua = UserAgent(self, net.wheel, **kw)  # type: ignore[arg-type]
        self.layer = self.ua.create_layer()

    def send(self, data: bytes, dest: Address) -> None:
        self.net.log.append((self.net.wheel.time(), self.name, data.split(b"\r\n", 1)[0].decode()))
        self.net.queue.append((data, Address(dest.transport, self.host, self.port), dest))

    def sent_by(self, transport: str) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def uri(self) -> str:
        t = "" if self.transport == "UDP" else f";transport={self.transport.lower()}"
        return f"sip:bob@{self.host}:{self.port}{t}"


def pair(transport: str = "UDP", **uas_kw: object) -> tuple[Net, Node, Node]:
    net = Net()
    return net, Node(net, "alice", 5070, transport), Node(net, "bob", 5080, transport, **uas_kw)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, Call]] = []

    def attach(self, call: Call) -> Call:
        call.on_progress = lambda c: self.events.append(("progress", c))
        call.on_answer = lambda c: self.events.append(("answer", c))
        call.on_confirm = lambda c: self.events.append(("confirm", c))
        call.on_end = lambda c: self.events.append(("end", c))
        return call

    @property
    def names(self) -> list[str]:
        return [e for e, _ in self.events]


def incoming_recorder(rec: Recorder, then: Callable[[Call], object]) -> Callable[[Call], None]:
    def on_incoming(call: Call) -> None:
        rec.attach(call)
        then(call)
    return on_incoming


# -- the basic call ----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["UDP", "TCP"])
def test_call_answer_ack_bye(transport: str) -> None:
    uas_rec = Recorder()
    net, alice, bob = pair(transport, on_incoming=incoming_recorder(uas_rec, AutoAnswer()))
    rec = Recorder()
    call = rec.attach(alice.ua.invite(bob.uri, body=SDP_OFFER, transport=transport))
    net.run()
    assert rec.names == ["progress", "answer"]
    assert call.status == 200 and call.answered and call.state == "confirmed"
    assert b"m=audio 6000 RTP/AVP 0 8" in call.remote_body
    assert uas_rec.names == ["answer", "confirm"]
    uas_call = uas_rec.events[0][1]
    assert uas_call.dialog is not None and call.dialog is not None
    # The two ends see the same dialog from opposite sides (§12).
    assert uas_call.dialog.local_tag == call.dialog.remote_tag
    assert uas_call.dialog.remote_tag == call.dialog.local_tag
    assert [line for _, who, line in net.log if who == "bob"][:2] == [
        "SIP/2.0 180 Ringing", "SIP/2.0 200 OK"]
    assert net.sent("alice", "ACK") == [0.0]

    call.bye()
    net.run()
    assert call.ended and call.bye_status == 200 and call.ended_by == "local"
    assert uas_call.ended and uas_call.ended_by == "remote"
    assert rec.names[-1] == "end" and uas_rec.names[-1] == "end"
    # Nothing retransmitted afterwards (TCP: nothing at all; UDP: Timer K lingers, silently).
    n = len(net.log)
    net.run(until=100.0)
    assert len(net.log) == n
    assert alice.ua.dialogs == {} and bob.ua.dialogs == {}
    assert len(alice.layer) == 0 and len(bob.layer) == 0


def test_ack_in_dialog_goes_to_contact_with_invite_cseq() -> None:
    net, alice, bob = pair()
    acks: list[Request] = []

    def spy(data: bytes, dest: Address) -> bool:
        # Every datagram to bob passes here; the ACKs are kept (and none is dropped).
        if dest.port == bob.port and data.startswith(b"ACK "):
            ack = parse(data)
            assert isinstance(ack, Request)
            acks.append(ack)
        return False

    net.drop = spy
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run()
    ack = acks[0]
    assert str(ack.uri) == "sip:fastsip@127.0.0.1:5080"   # the 2xx's Contact (remote target)
    assert ack.cseq is not None and ack.cseq.seq == 1 and ack.cseq.method == "ACK"
    assert ack.top_via is not None and ack.top_via.branch != call.invite.top_via.branch  # type: ignore[union-attr]


# -- §13.3.1.4: 2xx retransmission until ACK ---------------------------------------------------


def test_uas_retransmits_2xx_until_ack_and_uac_acks_each() -> None:
    net, alice, bob = pair()
    lost = {"n": 2}

    def drop(data: bytes, dest: Address) -> bool:
        if data.startswith(b"ACK") and lost["n"]:
            lost["n"] -= 1
            return True
        return False

    net.drop = drop
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run(until=10.0)
    # 200 at 0, again at T1=0.5 and 1.5 (interval doubling); the third ACK gets through.
    assert net.sent("bob", "SIP/2.0 200") == [0.0, 0.5, 1.5]
    assert net.sent("alice", "ACK") == [0.0, 0.5, 1.5]
    assert call.state == "confirmed"
    bob_call = next(iter(bob.ua.dialogs.values()))
    assert bob_call.state == "confirmed"


def test_uas_gives_up_after_64_t1_and_sends_bye() -> None:
    net, alice, bob = pair()
    net.drop = lambda data, dest: data.startswith(b"ACK")
    uas_rec = Recorder()
    bob.ua.on_incoming = incoming_recorder(uas_rec, AutoAnswer())
    alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run(until=40.0)
    times = net.sent("bob", "SIP/2.0 200")
    # T1 doubling capped at T2=4: 0, .5, 1.5, 3.5, 7.5, 11.5 ... 31.5; gives up at 32 (64*T1).
    assert times == [0.0, 0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert net.sent("bob", "BYE") == [pytest.approx(35.5)]
    uas_call = uas_rec.events[0][1]
    assert uas_call.ended and uas_call.error == "no ACK" and uas_call.bye_status == 200


def test_retransmitted_2xx_after_invite_transaction_ended_is_acked_again() -> None:
    net, alice, bob = pair()
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run(until=40.0)                      # Timer M ends alice's INVITE transaction
    assert alice.layer.client_transactions == 0
    assert call.dialog is not None
    bob_call = next(iter(bob.ua.dialogs.values()))
    assert bob_call._answer is None
    # The 2xx again (e.g. a late duplicate): it reaches the TU as a stray and is ACKed.
    alice.layer.receive(parse(bytes(bob_call.txn.last_response)),  # type: ignore[union-attr]
                        Address("UDP", "127.0.0.1", 5080))
    assert net.sent("alice", "ACK") == [0.0, 40.0]


# -- CANCEL (§9) -------------------------------------------------------------------------------


def test_cancel_after_ringing_gets_487() -> None:
    uas_rec = Recorder()
    net, alice, bob = pair(on_incoming=incoming_recorder(uas_rec, lambda c: c.ring()))
    rec = Recorder()
    call = rec.attach(alice.ua.invite(bob.uri, body=SDP_OFFER))
    net.run()
    assert call.state == "proceeding"
    call.cancel()
    net.run(until=40.0)
    lines = [line for _, who, line in net.log if who == "bob"]
    assert lines == ["SIP/2.0 180 Ringing", "SIP/2.0 200 OK", "SIP/2.0 487 Request Terminated"]
    assert call.ended and call.status == 487 and call.ended_by == "cancel"
    assert uas_rec.events[-1][0] == "end" and uas_rec.events[-1][1].status == 487
    # the non-2xx final response is ACKed by alice's transaction layer, which absorbs it
    assert net.sent("alice", "ACK") == [0.0]
    assert len(bob.layer) == 0 and len(alice.layer) == 0


def test_cancel_waits_for_a_provisional_response() -> None:
    net, alice, bob = pair(on_incoming=lambda c: None)      # bob says nothing at first
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.drop = lambda data, dest: data.startswith(b"SIP/2.0 100")
    call.cancel()
    net.run(until=1.0)
    assert net.sent("alice", "CANCEL") == []                # §9.1: not before a provisional
    bob_call: Call = bob.layer._server[next(iter(bob.layer._server))].data
    bob_call.ring()
    net.run(until=2.0)
    assert len(net.sent("alice", "CANCEL")) == 1
    assert call.status == 487


def test_cancel_after_answer_is_an_error_and_cancel_unknown_gets_481() -> None:
    net, alice, bob = pair()
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run()
    with pytest.raises(UAError):
        call.cancel()
    cancel = Request.create("CANCEL", bob.uri, [
        ("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKnope"), ("From", "<sip:a@x>;tag=1"),
        ("To", "<sip:b@y>"), ("Call-ID", "nope"), ("CSeq", "1 CANCEL")])
    alice.send(bytes(cancel), Address("UDP", "127.0.0.1", 5080))
    net.run()
    assert net.log[-1][2] == "SIP/2.0 481 Call/Transaction Does Not Exist"


def test_cancel_racing_200_ends_with_bye() -> None:
    net, alice, bob = pair(on_incoming=lambda c: c.ring())
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run()
    bob_call = bob.layer._server[next(iter(bob.layer._server))].data
    bob_call.answer(b"")                      # 200 leaves bob before the CANCEL arrives
    call.cancel()
    net.run(until=1.0)
    assert call.ended and call.status == 200 and call.bye_status == 200
    assert bob_call.ended


# -- other requests ----------------------------------------------------------------------------


def test_options() -> None:
    net, alice, bob = pair()
    results: list[OptionsResult] = []
    alice.ua.options(bob.uri, results.append)
    net.run()
    assert results[0].status == 200
    resp = results[0].response
    assert resp is not None and "BYE" in resp.headers.getall("Allow")
    assert resp.headers.get("Accept") == "application/sdp"


def test_options_timeout_is_408() -> None:
    net, alice, _ = pair()
    results: list[OptionsResult] = []
    alice.ua.options("sip:nobody@127.0.0.1:5999", results.append)
    net.run(until=40.0)
    assert results[0].status == 408 and results[0].response is None


def _send_request(net: Net, node: Node, method: str, to: str = "<sip:b@y>",
                  extra: list[tuple[str, str]] | None = None) -> str:
    req = Request.create(method, "sip:bob@127.0.0.1:5080", [
        ("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK" + method), ("Max-Forwards", "70"),
        ("From", "<sip:a@x>;tag=1"), ("To", to), ("Call-ID", "cid-" + method),
        ("CSeq", f"1 {method}"), *(extra or [])])
    node.send(bytes(req), Address("UDP", "127.0.0.1", 5080))
    net.run()
    return net.log[-1][2]


def test_unsupported_and_out_of_dialog_requests() -> None:
    net, alice, _bob = pair()
    assert _send_request(net, alice, "REGISTER") == "SIP/2.0 405 Method Not Allowed"
    assert _send_request(net, alice, "FOO") == "SIP/2.0 501 Not Implemented"
    assert _send_request(net, alice, "BYE").startswith("SIP/2.0 481")
    assert _send_request(net, alice, "INFO", "<sip:b@y>;tag=zz").startswith("SIP/2.0 481")
    assert _send_request(net, alice, "OPTIONS", extra=[("Require", "100rel")]).startswith(
        "SIP/2.0 420")


def test_reject_policy() -> None:
    net, alice, bob = pair(on_incoming=lambda c: c.reject(486))
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run(until=40.0)
    assert call.ended and call.status == 486 and not call.answered and call.ended_by == "remote"


def test_invite_timeout_is_408_and_bye_before_answer_is_an_error() -> None:
    net, alice, _ = pair()
    call = alice.ua.invite("sip:nobody@127.0.0.1:5999", body=SDP_OFFER)
    with pytest.raises(UAError):
        call.bye()
    net.run(until=40.0)
    assert call.status == 408 and call.ended_by == "timeout"


# -- in-dialog: re-INVITE, remote BYE, CSeq order ----------------------------------------------


def test_reinvite_in_dialog() -> None:
    net, alice, bob = pair()
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run()
    results: list[OptionsResult] = []
    alice.ua.reinvite(call, callback=results.append)
    net.run(until=5.0)
    assert results and results[0].status == 200
    assert len(net.sent("alice", "ACK")) == 2
    assert len(net.sent("bob", "SIP/2.0 200")) == 2          # acked at once: no retransmission
    bob_call = next(iter(bob.ua.dialogs.values()))
    assert bob_call.dialog is not None and bob_call.dialog.remote_cseq == 2
    call.bye()
    net.run()
    assert bob_call.ended


def test_remote_bye_ends_the_uac_call() -> None:
    net, alice, bob = pair()
    rec = Recorder()
    call = rec.attach(alice.ua.invite(bob.uri, body=SDP_OFFER))
    net.run()
    bob_call = next(iter(bob.ua.dialogs.values()))
    bob_call.bye()
    net.run()
    assert call.ended and call.ended_by == "remote" and rec.names[-1] == "end"
    assert bob_call.ended and bob_call.bye_status == 200
    bye_lines = net.sent("bob", "BYE")
    assert len(bye_lines) == 1


def test_in_dialog_request_with_lower_cseq_gets_500() -> None:
    net, alice, bob = pair()
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run()
    assert call.dialog is not None
    call.dialog.local_cseq = -1                               # next CSeq 0 < 1: out of order
    results: list[OptionsResult] = []
    alice.ua._send_in_dialog(call, "OPTIONS", _Catch(results))
    net.run()
    assert results[0].status == 500


class _Catch:
    def __init__(self, out: list[OptionsResult]) -> None:
        self.out = out

    def on_response(self, txn: object, response: Response) -> None:
        if response.status_code >= 200:
            self.out.append(OptionsResult(response.status_code, response))

    def on_timeout(self, txn: object) -> None:
        self.out.append(OptionsResult(408, None))

    def on_transport_error(self, txn: object) -> None:
        self.out.append(OptionsResult(503, None))


def test_bye_before_ack_stops_2xx_retransmission() -> None:
    net, alice, bob = pair()
    net.drop = lambda data, dest: data.startswith(b"ACK")
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run()
    call.bye()
    net.run(until=40.0)
    assert net.sent("bob", "SIP/2.0 200 OK") and call.ended
    bob_call_200s = [t for t in net.sent("bob", "SIP/2.0 200") if t > 0.0]
    assert bob_call_200s == []                                # the BYE stopped them at once


def test_bye_in_early_dialog_gets_200_and_the_invite_487() -> None:
    net, alice, bob = pair(on_incoming=lambda c: c.ring())
    call = alice.ua.invite(bob.uri, body=SDP_OFFER)
    net.run()
    bob_call = next(iter(bob.ua.dialogs.values()))
    assert bob_call.dialog is not None and bob_call.dialog.early
    # alice's UA sends BYEs only on answered calls; forge one in the early dialog (§15).
    inv = call.invite
    bye = Request.create("BYE", bob.uri, [
        ("Via", "SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKearlybye"), ("Max-Forwards", "70"),
        ("From", inv.headers.get("From") or ""),
        ("To", f"<{bob.uri}>;tag={bob_call.local_tag}"), ("Call-ID", call.call_id),
        ("CSeq", "2 BYE")])
    alice.send(bytes(bye), Address("UDP", "127.0.0.1", 5080))
    net.run(until=1.0)
    lines = [line for _, who, line in net.log if who == "bob"]
    assert lines[-2:] == ["SIP/2.0 200 OK", "SIP/2.0 487 Request Terminated"]
    assert bob_call.ended and call.ended and call.status == 487
    assert bob.ua.dialogs == {}
