"""RFC 3261 §18 rules as plain functions: next hop (RFC 3263 §4 without DNS SRV/NAPTR), the
§18.1.1 size rule, the §18.1.2 sent-by check, received/rport (§18.2.1, RFC 3581) and the
response destination (§18.2.2)."""

from __future__ import annotations

from pathlib import Path

import pytest

import fastsip
from fastsip import Request, Response, parse, parse_uri
from fastsip.transport import Address
from fastsip.transport.rules import (
    UDP_SIZE_LIMIT,
    check_sent_by,
    error_response,
    is_local_tag,
    next_hop,
    request_next_hop,
    response_destination,
    select_transport,
    stamp_received,
)


def request(via: str, uri: str = "sip:bob@example.com", routes: tuple[str, ...] = ()) -> Request:
    headers = [("Via", via)] + [("Route", r) for r in routes] + [
        ("Max-Forwards", "70"), ("From", "<sip:a@x>;tag=1"), ("To", "<sip:b@x>"),
        ("Call-ID", "c"), ("CSeq", "1 OPTIONS")]
    return Request.create("OPTIONS", uri, headers)


def response(via: str) -> Response:
    return request(via).reply(200)


@pytest.mark.parametrize("target, expected", [
    ("sip:bob@192.0.2.1", Address("UDP", "192.0.2.1", 5060)),
    ("sip:bob@192.0.2.1:5070", Address("UDP", "192.0.2.1", 5070)),
    ("sip:bob@example.com;transport=tcp", Address("TCP", "example.com", 5060)),
    ("sip:bob@example.com;transport=TLS", Address("TLS", "example.com", 5061)),
    ("sips:bob@example.com", Address("TLS", "example.com", 5061)),
    ("sips:bob@example.com:6000;transport=tcp", Address("TLS", "example.com", 6000)),
    ("sip:[2001:db8::1]:5080;transport=tcp", Address("TCP", "2001:db8::1", 5080)),
    ("sip:[::1]", Address("UDP", "::1", 5060)),
    ("sip:bob@example.com;maddr=239.255.255.1", Address("UDP", "239.255.255.1", 5060)),
    ("sip:p.example.com;transport=sctp", Address("SCTP", "p.example.com", 5060)),
])
def test_next_hop(target: str, expected: Address) -> None:
    assert next_hop(target) == expected
    assert next_hop(parse_uri(target)) == expected


@pytest.mark.parametrize("target", ["sips:bob@example.com;transport=udp", "tel:+15551234",
                                    "mailto:bob@example.com"])
def test_next_hop_rejects(target: str) -> None:
    with pytest.raises(ValueError):
        next_hop(target)


def test_request_next_hop_prefers_outbound_proxy_then_route() -> None:
    plain = request("SIP/2.0/UDP h:5060;branch=z9hG4bK1", "sip:bob@192.0.2.9:5099")
    assert request_next_hop(plain) == Address("UDP", "192.0.2.9", 5099)
    routed = request("SIP/2.0/UDP h:5060;branch=z9hG4bK1", "sip:bob@192.0.2.9",
                     routes=("<sip:p1.example.com;transport=tcp;lr>", "<sip:p2.example.com;lr>"))
    assert request_next_hop(routed) == Address("TCP", "p1.example.com", 5060)
    assert request_next_hop(routed, "sip:out.example.com:5080") == \
        Address("UDP", "out.example.com", 5080)


def test_select_transport_size_rule() -> None:
    assert select_transport("UDP", UDP_SIZE_LIMIT) == "UDP"
    assert select_transport("UDP", UDP_SIZE_LIMIT + 1) == "TCP"
    assert select_transport("UDP", 5000, tcp=False) == "UDP"
    assert select_transport("UDP", 900, udp_size_limit=800) == "TCP"
    assert select_transport("TLS", 5000) == "TLS"
    assert select_transport("TCP", 10) == "TCP"


def test_check_sent_by() -> None:
    local = [("192.0.2.1", 5060), ("::1", 5070), ("Host.Example.com", 5061)]
    assert check_sent_by(response("SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1"), local)
    assert check_sent_by(response("SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1"), local)  # default
    assert check_sent_by(response("SIP/2.0/TCP [::1]:5070;branch=z9hG4bK1"), local)
    assert check_sent_by(response("SIP/2.0/TLS host.example.COM;branch=z9hG4bK1"), local)
    assert not check_sent_by(response("SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK1"), local)
    assert not check_sent_by(response("SIP/2.0/UDP 192.0.2.2:5060;branch=z9hG4bK1"), local)
    assert not check_sent_by(response("SIP/2.0/TLS host.example.com;branch=z9hG4bK1"),
                             [("host.example.com", 5060)])
    # A wildcard listener without an advertised address: any host on its port.
    assert check_sent_by(response("SIP/2.0/UDP 10.1.1.1:5080;branch=z9hG4bK1"),
                         [("0.0.0.0", 5080)])
    assert check_sent_by(response("SIP/2.0/UDP [2001:DB8::5]:5090;branch=z9hG4bK1"),
                         [("192.0.2.1", 5090), ("::", 5090)])
    assert check_sent_by(response("SIP/2.0/UDP [2001:DB8::5]:5090;branch=z9hG4bK1"),
                         [("[2001:db8::5]", 5090)])
    no_via = parse(b"SIP/2.0 200 OK\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(no_via, Response)
    assert not check_sent_by(no_via, local)


def test_stamp_received_and_response_destination() -> None:
    src = Address("UDP", "198.51.100.7", 40000)
    # Sent-by host differs from the source: received; rport asked for: filled in.
    req = request("SIP/2.0/UDP client.example.com:5060;branch=z9hG4bK1;rport")
    assert stamp_received(req, src)
    via = req.top_via
    assert via is not None
    assert via.received == "198.51.100.7" and via.rport == 40000 and via.branch == "z9hG4bK1"
    assert response_destination(via) == Address("UDP", "198.51.100.7", 40000)
    # Same host, no rport: nothing to record; the response goes to the sent-by port.
    same = request("SIP/2.0/UDP 198.51.100.7:5062;branch=z9hG4bK2")
    assert not stamp_received(same, src)
    assert same.top_via is not None and same.top_via.received is None
    assert response_destination(same.top_via) == Address("UDP", "198.51.100.7", 5062)
    # No port anywhere: the transport's default.
    bare = request("SIP/2.0/TLS [2001:db8::5];branch=z9hG4bK3")
    assert bare.top_via is not None
    assert response_destination(bare.top_via) == Address("TLS", "2001:db8::5", 5061)
    # Reliable transport with a known connection: back over it.
    conn = Address("TCP", "198.51.100.7", 40001, connection=9)
    tcp = request("SIP/2.0/TCP client.example.com;branch=z9hG4bK4")
    stamp_received(tcp, conn)
    assert tcp.top_via is not None
    # (and, should that connection close first, a new one to received + the sent-by port,
    # not to the peer's ephemeral port: §18.2.2)
    assert response_destination(tcp.top_via, conn) == Address("TCP", "198.51.100.7", 5060,
                                                              connection=9)
    assert response_destination(tcp.top_via) == Address("TCP", "198.51.100.7", 5060)


# -- stateless answers to malformed requests (§8.2.6, §21.4) -----------------------------------

def _error_of(data: bytes) -> fastsip.ParseError:
    with pytest.raises(fastsip.ParseError) as err:
        fastsip.parse(data)
    return err.value


BAD_MF = (b"INVITE sip:bob@example.com SIP/2.0\r\n"
          b"Via: SIP/2.0/UDP 192.0.2.15;branch=z9hG4bK1\r\n"
          b"v: SIP/2.0/UDP 192.0.2.16;branch=z9hG4bK2\r\n"
          b"Max-Forwards: 300\r\n"
          b"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n"
          b"i: bad-1@example.com\r\nCSeq: 8 INVITE\r\nContent-Length: 0\r\n\r\n")
BAD_VIA = BAD_MF.replace(b"192.0.2.15;branch=z9hG4bK1", b"192.0.2.15;;,;,,")  # RFC 4475 badinv01


def test_error_response_copies_what_routes_and_matches_it() -> None:
    answer = error_response(BAD_MF, _error_of(BAD_MF))
    assert answer is not None
    resp = fastsip.parse(answer)
    assert isinstance(resp, fastsip.Response)
    assert resp.status_code == 400 and "Max-Forwards" in resp.reason
    assert [v.branch for v in resp.via] == ["z9hG4bK1", "z9hG4bK2"]
    assert resp.call_id == "bad-1@example.com" and resp.cseq == (8, "INVITE")
    assert resp.to.tag and resp.from_.tag == "1" and resp.content_length == 0
    assert resp.max_forwards is None  # only what routes and matches the response is copied


def test_error_response_copies_a_broken_via_as_it_came() -> None:
    answer = error_response(BAD_VIA, _error_of(BAD_VIA))
    assert answer is not None
    assert answer.startswith(b"SIP/2.0 400 Bad Request (empty parameter name)\r\n")
    assert b"\r\nVia: SIP/2.0/UDP 192.0.2.15;;,;,,\r\nVia: SIP/2.0/UDP 192.0.2.16" in answer


def test_error_response_505_for_an_unsupported_version() -> None:
    data = BAD_VIA.replace(b"SIP/2.0\r\n", b"SIP/7.0\r\n", 1)
    answer = error_response(data, _error_of(data))
    assert answer is not None and answer.startswith(b"SIP/2.0 505 Version Not Supported\r\n")


@pytest.mark.parametrize("data", [
    BAD_VIA.replace(b"INVITE sip", b"ACK sip").replace(b"8 INVITE", b"8 ACK"),  # never answer ACK
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP h;;\r\n\r\n",                    # responses are dropped
    BAD_VIA.replace(b"i: bad-1@example.com\r\n", b""),                     # nothing to match on
    b"\x00\x01garbage",
])
def test_error_response_is_none_when_no_answer_is_allowed(data: bytes) -> None:
    try:
        fastsip.parse(data)
    except fastsip.ParseError as exc:
        assert error_response(data, exc) is None


def test_error_response_tags_are_ours() -> None:
    # ... so the ACK for such an answer is known as ours and never forwarded (proxy core).
    answer = error_response(BAD_MF, _error_of(BAD_MF))
    assert answer is not None
    to = fastsip.parse(answer).to
    assert to is not None and is_local_tag(to.tag)


def test_error_response_to_rfc4475_lwsstart() -> None:
    # RFC 4475 3.1.2.9: several SP between Request-Line elements; rejecting is right, and a
    # rejection is an answer, not silence.
    data = (Path(__file__).parent / "data" / "rfc4475" / "lwsstart.dat").read_bytes()
    answer = error_response(data, _error_of(data))
    assert answer is not None and answer.startswith(b"SIP/2.0 400 Bad Request (")
    assert b"Call-ID: lwsstart.dfknq234oi243099adsdfnawe3@example.com" in answer


def test_error_response_unfolds_continuation_lines() -> None:
    # RFC 4475 wsinv folds its To and Via over several lines; with its From broken it must
    # still be answered (the folded Via and To are copied whole).
    data = (Path(__file__).parent / "data" / "rfc4475" / "wsinv.dat").read_bytes()
    data = data.replace(b"<sip:jdrosen@example.com>", b"<sip:jdrosen@example.com", 1)
    answer = error_response(data, _error_of(data))
    assert answer is not None and answer.startswith(b"SIP/2.0 400 Bad Request (")
    assert b"\r\nVia: SIP  /   2.0 /UDP 192.0.2.2;branch=390skdjuw\r\n" in answer
    assert b"\r\nTo: sip:vivekg@chair-dnrc.example.com ;   tag    = 1918181833n\r\n" in answer
    # A "continuation" right after the request line continues nothing: it is a header line.
    odd = BAD_MF.replace(b"\r\nVia:", b"\r\n Via:", 1)
    answer = error_response(odd, _error_of(odd))
    assert answer is not None and b"\r\nVia: SIP/2.0/UDP" in answer
    # A corrupted status line that reads as a request line is a request: answered.
    assert error_response(b"SIP.2.0 200 OK\r\n" + BAD_MF.split(b"\r\n", 1)[1],
                          fastsip.ParseError("malformed SIP version", 0)) is not None


def test_address_is_an_immutable_value_outside_the_cyclic_gc() -> None:
    import gc
    import pickle

    a = Address("UDP", "192.0.2.1", 5060)
    assert a == Address("UDP", "192.0.2.1", 5060, 0) and hash(a) == hash(Address("UDP", "192.0.2.1", 5060))
    # connection names the socket or connection: another value, the same peer
    b = Address("UDP", "192.0.2.1", 5060, 3)
    assert a != b and a.peer == b.peer == ("UDP", "192.0.2.1", 5060)
    assert a != ("UDP", "192.0.2.1", 5060) and a != "udp:192.0.2.1:5060"
    assert len({a, Address("UDP", "192.0.2.1", 5060), b}) == 2
    assert pickle.loads(pickle.dumps(b)) == b            # the workers' hand-off carries it
    assert str(Address("TCP", "2001:db8::1", 5061)) == "tcp:[2001:db8::1]:5061"
    assert repr(b) == "Address(transport='UDP', host='192.0.2.1', port=5060, connection=3)"
    assert not a.reliable and Address("TLS", "h", 5061).reliable
    with pytest.raises(AttributeError):
        a.host = "198.51.100.1"  # type: ignore[misc]
    # Several are made per message and some linger in transactions: none is GC-tracked.
    assert not gc.is_tracked(a)
