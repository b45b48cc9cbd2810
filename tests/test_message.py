"""The message API: header access, typed views, URIs, the edit journal, replies and framing."""

from __future__ import annotations

import gc
import pickle
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastsip
from fastsip import URI, CSeq, Limits, ParseError, message_length, parse
from fastsip.sip import Request, Response

SDP = (b"v=0\r\no=alice 2890844526 2890844526 IN IP4 192.0.2.101\r\ns=-\r\n"
       b"c=IN IP4 192.0.2.101\r\nt=0 0\r\nm=audio 49172 RTP/AVP 0 8 101\r\n"
       b"a=rtpmap:101 telephone-event/8000\r\n")

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport\r\n"
    b"v: SIP/2.0/TCP 192.0.2.4;branch=z9hG4bKnashds8;received=192.0.2.1, SIP/2.0/UDP [2001:db8::1]:5070;branch=z9hG4bK3\r\n"
    b"Route: <sip:p1.example.com;lr>, <sip:p2.example.com;lr>\r\n"
    b"Route: <sip:p3.example.com;lr>\r\n"
    b"Max-Forwards: 70\r\n"
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b'f: "Alice \\"A\\" Liddell" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    b"i: a84b4c76e66710@pc33.atlanta.example.com\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com>;expires=60;q=0.7, sip:alice@192.0.2.9\r\n"
    b"Allow: INVITE, ACK,CANCEL\r\n"
    b"Allow: BYE\r\n"
    b"Date: Sat, 13 Nov 2010 23:29:00 GMT\r\n"
    b"X-Custom: a, b\r\n"
    b"c: application/sdp\r\n"
    b"l: " + str(len(SDP)).encode() + b"\r\n\r\n" + SDP
)


@pytest.fixture
def msg() -> fastsip.Request:
    m = parse(INVITE)
    assert isinstance(m, fastsip.Request)
    return m


def test_request_line_and_scalars(msg: fastsip.Request) -> None:
    assert msg.method == "INVITE"
    assert str(msg.uri) == "sip:bob@biloxi.example.com"
    assert msg.uri.user == "bob" and msg.uri.host == "biloxi.example.com" and msg.uri.port is None
    assert msg.call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    assert msg.cseq == CSeq(314159, "INVITE") and msg.cseq.seq == 314159
    assert isinstance(msg.cseq, tuple) and msg.cseq == (314159, "INVITE")
    assert msg.max_forwards == 70
    assert msg.content_length == len(SDP)
    assert msg.body == SDP and isinstance(msg.body, memoryview)
    assert msg.content_type == "application/sdp"
    assert msg.is_request and not msg.is_response


def test_headers_case_insensitive_compact_forms_and_splitting(msg: fastsip.Request) -> None:
    h = msg.headers
    assert h.get("call-id") == h.get("I") == h.get("Call-ID") == msg.call_id
    assert h.get("Content-Type") == "application/sdp"
    assert h.getall("allow") == ["INVITE", "ACK", "CANCEL", "BYE"]
    assert h.getall("VIA") == [
        "SIP/2.0/UDP pc33.atlanta.example.com:5060;branch=z9hG4bK776asdhds;rport",
        "SIP/2.0/TCP 192.0.2.4;branch=z9hG4bKnashds8;received=192.0.2.1",
        "SIP/2.0/UDP [2001:db8::1]:5070;branch=z9hG4bK3",
    ]
    # Date and unknown fields are never split at commas.
    assert h.getall("Date") == ["Sat, 13 Nov 2010 23:29:00 GMT"]
    assert h.getall("x-custom") == ["a, b"]
    assert h.getlines("Route") == ["<sip:p1.example.com;lr>, <sip:p2.example.com;lr>",
                                   "<sip:p3.example.com;lr>"]
    assert h.get("Missing") is None and h.get("Missing", "d") == "d" and h.getall("Missing") == []
    assert "from" in h and "f" in h and "Missing" not in h
    with pytest.raises(KeyError):
        h["Missing"]
    names = [n for n, _ in h]
    assert names[:3] == ["Via", "v", "Route"] and names[-1] == "l"
    assert len(h) == 16
    assert fastsip.canonical_name("v") == "Via" and fastsip.canonical_name("CALL-id") == "Call-ID"


def test_via_values(msg: fastsip.Request) -> None:
    v = msg.via
    assert [x.branch for x in v] == ["z9hG4bK776asdhds", "z9hG4bKnashds8", "z9hG4bK3"]
    assert [x.transport for x in v] == ["UDP", "TCP", "UDP"]
    assert [x.sent_by for x in v] == [("pc33.atlanta.example.com", 5060), ("192.0.2.4", None),
                                      ("[2001:db8::1]", 5070)]
    assert v[0].rport == 0 and v[0].has_rport and v[1].rport is None and not v[1].has_rport
    assert v[1].received == "192.0.2.1"
    assert v[0].params == {"branch": "z9hG4bK776asdhds", "rport": None}
    assert v[0].protocol == "SIP/2.0" and v[0].rfc3261_branch
    assert msg.top_via is not None and msg.top_via.branch == "z9hG4bK776asdhds"
    assert str(v[2]) == "SIP/2.0/UDP [2001:db8::1]:5070;branch=z9hG4bK3"


def test_name_addrs(msg: fastsip.Request) -> None:
    assert msg.from_.display_name == 'Alice "A" Liddell'
    assert msg.from_.tag == "1928301774" and msg.to.tag is None
    assert msg.to.display_name == "Bob" and str(msg.to.uri) == "sip:bob@biloxi.example.com"
    c = msg.contact
    assert [str(x.uri) for x in c] == ["sip:alice@pc33.atlanta.example.com", "sip:alice@192.0.2.9"]
    assert c[0].expires == 60 and c[0].q == 0.7 and c[1].expires is None
    assert [x.uri.host for x in msg.route] == ["p1.example.com", "p2.example.com", "p3.example.com"]
    assert all(x.uri.lr for x in msg.route)
    assert msg.record_route == []


def test_contact_wildcard() -> None:
    m = parse(b"REGISTER sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
              b"Contact: *\r\nExpires: 0\r\nContent-Length: 0\r\n\r\n")
    (c,) = m.contact
    assert c.wildcard and c.uri is None and str(c) == "*"


def test_unedited_message_is_its_input(msg: fastsip.Request) -> None:
    assert bytes(msg) is INVITE  # not even a copy
    assert bytes(parse(bytearray(INVITE))) == INVITE
    assert bytes(parse(memoryview(INVITE))) == INVITE
    assert bytes(parse(b"\r\n\r\n" + INVITE)) == INVITE  # leading CRLFs are not the message


def test_bytearray_and_memoryview_input() -> None:
    buf = bytearray(INVITE)
    m = parse(buf)
    assert m.via[0].branch == "z9hG4bK776asdhds"
    mv = memoryview(b"xx" + INVITE)[2:]
    assert parse(mv).call_id == "a84b4c76e66710@pc33.atlanta.example.com"
    del buf, m
    gc.collect()


def test_messages_stay_out_of_the_cyclic_gc() -> None:
    # A message holds only immutable buffers, so it cannot be in a cycle; tracking it would
    # make every young collection walk every message in flight (the @cython.no_gc of Message,
    # Request and Response, which must stay in _message.pyx for Cython to apply it).
    request = parse(INVITE)
    response = request.reply(200, to_tag="t")
    assert isinstance(request, Request) and isinstance(response, Response)
    assert not gc.is_tracked(request)
    assert not gc.is_tracked(response)
    assert not gc.is_tracked(request.copy())
    assert gc.is_tracked([request])     # (the check itself can tell)


def test_proxy_edits(msg: fastsip.Request) -> None:
    msg.add_via("SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK-proxy;rport")
    assert msg.decrement_max_forwards() == 69
    assert msg.pop_route() == "<sip:p1.example.com;lr>"
    msg.add_record_route("<sip:192.0.2.10;lr>")
    out = bytes(msg)
    re = parse(out)
    assert [v.branch for v in re.via] == ["z9hG4bK-proxy", "z9hG4bK776asdhds", "z9hG4bKnashds8",
                                          "z9hG4bK3"]
    assert re.max_forwards == 69
    assert [r.uri.host for r in re.route] == ["p2.example.com", "p3.example.com"]
    assert [str(r) for r in re.record_route] == ["<sip:192.0.2.10;lr>"]
    assert bytes(re.body) == SDP
    # The edited message reads back its own edits before serialization, too.
    assert msg.via[0].branch == "z9hG4bK-proxy" and msg.max_forwards == 69
    assert [r.uri.host for r in msg.route] == ["p2.example.com", "p3.example.com"]
    # Untouched lines are copied byte for byte (compact forms, spacing).
    assert b"\r\nf: \"Alice \\\"A\\\" Liddell\" <sip:alice@atlanta.example.com>;tag=1928301774\r\n" in out


def test_pop_until_empty(msg: fastsip.Request) -> None:
    assert msg.pop_route() and msg.pop_route() and msg.pop_route()
    assert msg.pop_route() is None and msg.route == []
    for _ in range(3):
        assert msg.pop_via()
    assert msg.pop_via() is None and msg.via == [] and msg.top_via is None
    assert b"Route" not in bytes(msg) and b"Via" not in bytes(msg) and b"\r\nv:" not in bytes(msg)


def test_max_forwards_zero_and_absent() -> None:
    m = parse(b"OPTIONS sip:a@b SIP/2.0\r\nMax-Forwards: 0\r\nl: 0\r\n\r\n")
    with pytest.raises(ValueError, match="483"):
        m.decrement_max_forwards()
    m = parse(b"OPTIONS sip:a@b SIP/2.0\r\nl: 0\r\n\r\n")
    assert m.decrement_max_forwards() == 70 and parse(bytes(m)).max_forwards == 70


def test_a_presence_test_sees_compact_forms_any_case_and_not_what_was_removed(
        msg: fastsip.Request) -> None:
    h = msg.headers
    assert "From" in h and "from" in h and "f" in h      # written in its compact form
    assert "Call-ID" in h and "x-custom" in h and "X-CUSTOM" in h
    assert "Subject" not in h and "X-Other" not in h and "X-Custo" not in h
    assert msg.remove_header("Date") == 1 and "Date" not in msg.headers
    assert msg.remove_header("X-Custom") == 1 and "X-Custom" not in msg.headers
    assert msg.remove_header("Route") == 2 and "Route" not in msg.headers
    msg.add_header("X-Custom", "again")
    assert "x-custom" in msg.headers
    msg.pop_via()
    assert "Via" in msg.headers                            # the second line's two remain
    assert "Via" in parse(bytes(msg)).headers


def test_set_add_remove_headers_and_body(msg: fastsip.Request) -> None:
    msg.set_header("Allow", "INVITE, BYE")
    assert msg.headers.getall("Allow") == ["INVITE", "BYE"]
    msg.set_header("Subject", "lunch")
    msg.add_header("X-First", "1", first=True)
    msg.add_header("Route", "<sip:p0.example.com;lr>", first=True)
    assert msg.remove_header("date") == 1 and msg.remove_header("date") == 0
    msg.set_body(b"hello", content_type="text/plain")
    out = parse(bytes(msg))
    assert out.headers.get("Subject") == "lunch"
    assert out.headers.items()[0] == ("X-First", "1")
    assert out.route[0].uri.host == "p0.example.com"
    assert "Date" not in out.headers
    assert bytes(out.body) == b"hello" and out.content_length == 5
    assert out.headers.getall("content-length") == ["5"]
    assert out.content_type == "text/plain"
    with pytest.raises(ValueError):
        msg.set_header("X-Evil", "a\r\nVia: injected")
    with pytest.raises(ValueError):
        msg.set_header("Content-Length", "9")
    with pytest.raises(ParseError):
        msg.add_via("not a via")


def test_request_uri_rewrite(msg: fastsip.Request) -> None:
    msg.uri = "sip:bob@192.0.2.55:5062;transport=tcp"
    out = parse(bytes(msg))
    assert out.start_line == "INVITE sip:bob@192.0.2.55:5062;transport=tcp SIP/2.0"
    assert out.uri.port == 5062 and out.uri.transport == "tcp"


def test_reply_follows_rfc3261_8_2_6(msg: fastsip.Request) -> None:
    trying = msg.reply(100)
    assert trying.status_code == 100 and trying.reason == "Trying"
    assert trying.to.tag is None  # no tag on 100 (8.2.6.2)
    ok = msg.reply(200, to_tag="abc", body=SDP, content_type="application/sdp",
                   headers=[("Contact", "<sip:bob@192.0.2.4>")])
    assert ok.to.tag == "abc" and ok.status_code == 200 and ok.reason == "OK"
    assert [v.branch for v in ok.via] == [v.branch for v in msg.via]
    assert ok.from_.tag == msg.from_.tag and ok.call_id == msg.call_id and ok.cseq == msg.cseq
    assert bytes(ok.body) == SDP and ok.contact[0].uri.host == "192.0.2.4"
    busy = msg.reply(486)
    assert busy.to.tag and busy.reason == "Busy Here"
    assert msg.reply(486).to.tag != busy.to.tag  # random tags
    in_dialog = parse(INVITE.replace(b"To: Bob <sip:bob@biloxi.example.com>",
                                     b"To: Bob <sip:bob@biloxi.example.com>;tag=xyz"))
    assert in_dialog.reply(200).to.tag == "xyz"  # a To tag already there is kept
    with pytest.raises(ValueError):
        msg.reply(99)


def test_create_from_scratch() -> None:
    req = fastsip.Request.create(
        "OPTIONS", "sip:carol@chicago.example.com",
        {"Via": "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bKx", "From": "<sip:a@b>;tag=1",
         "To": "<sip:carol@chicago.example.com>", "Call-ID": "c1", "CSeq": "1 OPTIONS",
         "Max-Forwards": "70"})
    assert req.method == "OPTIONS" and req.cseq == (1, "OPTIONS") and req.content_length == 0
    resp = fastsip.Response.create(404, headers=[("Via", "SIP/2.0/UDP h;branch=z9hG4bK2"),
                                                 ("CSeq", "2 BYE")], body=b"x")
    assert resp.status_code == 404 and resp.reason == "Not Found" and resp.method == "BYE"
    assert bytes(resp.body) == b"x"


@pytest.mark.parametrize("a,b,equal", [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=tcp", True),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5", True),
    ("sip:carol@chicago.com;security=on", "sip:carol@chicago.com;newparam=5", True),
    ("sip:alice@atlanta.com;transport=tcp", "sip:alice@atlanta.com", False),
    ("sip:ALICE@AtLanTa.CoM", "sip:alice@atlanta.com", False),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060", False),
    ("sip:bob@biloxi.com", "sips:bob@biloxi.com", False),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;newparam=6", False),
    ("sip:carol@chicago.com?Subject=next%20meeting", "sip:carol@chicago.com?Subject=%6Eext%20meeting", True),
    ("sip:carol@chicago.com?Subject=a", "sip:carol@chicago.com", False),
    ("tel:+1-201-555-0123", "tel:+12015550123", True),
    ("mailto:a@b", "mailto:a@b", True),
])
def test_uri_comparison_rfc3261_19_1_4(a: str, b: str, equal: bool) -> None:
    assert (URI(a) == URI(b)) is equal
    assert (URI(b) == URI(a)) is equal
    if equal:
        assert hash(URI(a)) == hash(URI(b))


def test_uri_parts() -> None:
    u = URI("sips:alice:secret@[2001:db8::1]:5061;transport=tcp;lr;maddr=239.1.1.1?h=v&x=y")
    assert (u.scheme, u.user, u.password, u.host, u.port) == ("sips", "alice", "secret",
                                                              "[2001:db8::1]", 5061)
    assert u.params == {"transport": "tcp", "lr": None, "maddr": "239.1.1.1"}
    assert u.headers == {"h": "v", "x": "y"} and u.lr and u.maddr == "239.1.1.1"
    assert u.host_address == "2001:db8::1"
    t = URI("tel:+1-201-555-0123;phone-context=example.com")
    assert t.scheme == "tel" and t.host == "+1-201-555-0123" and t.params == {
        "phone-context": "example.com"}
    o = URI("urn:service:sos")
    assert o.scheme == "urn" and not o.is_sip and str(o) == "urn:service:sos"
    assert pickle.loads(pickle.dumps(u)) == u
    for bad in ["", "sip:", "sip:a@", "sip:a@b:99999", "sip:a@[::1", "1sip:a@b", "sip:a@b c",
                "sip:a@b:x"]:
        with pytest.raises(ParseError):
            URI(bad)


@pytest.mark.parametrize("text,scheme,host,params", [
    ("sip:bob@example.com;lr", "sip", "example.com", {"lr": None}),
    ("SIP:Bob@EXAMPLE.com;Transport=TCP;LR", "sip", "example.com",
     {"transport": "TCP", "lr": None}),
    ("sips:[2001:DB8::1]:5061;MAddr=h", "sips", "[2001:DB8::1]", {"maddr": "h"}),   # as written
    ("sip:b@h;%4Cr;x%41=1", "sip", "h", {"lr": None, "xa": "1"}),    # escapes, then the case
    ("sip:b@h;%C3%89x=1", "sip", "h", {"\u00e9x": "1"}),           # str.lower(), not ASCII's
    ("tel:+1-201-555-0123;Phone-Context=Example.COM", "tel", "+1-201-555-0123",
     {"phone-context": "Example.COM"}),
])
def test_uri_scheme_host_and_parameter_names_in_lower_case(
        text: str, scheme: str, host: str, params: dict[str, str | None]) -> None:
    # RFC 3261 19.1.4: scheme, host and parameter names compare case-insensitively, so they
    # are kept in lower case (an IPv6 reference and a tel: number as written; values as sent).
    u = URI(text)
    assert (u.scheme, u.host, u.params) == (scheme, host, params)
    assert str(u) == text


def test_response_parsing() -> None:
    r = parse(b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
              b"To: <sip:a@b>;tag=t\r\nFrom: <sip:c@d>;tag=f\r\nCall-ID: x\r\n"
              b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(r, fastsip.Response) and r.status_code == 180 and r.reason == "Ringing"
    assert r.method == "INVITE" and r.is_response


@pytest.mark.parametrize("data,status,reason", [
    (b"INVITE sip:a@b SIP/2.1\r\n\r\n", 505, "version"),
    (b"SIP/3.0 200 OK\r\n\r\n", 505, "version"),
    (b"INVITE sip:a@b SIP/2.0\r\nVia SIP/2.0/UDP h\r\n\r\n", 400, ":"),
    (b"INVITE sip:a@b SIP/2.0\r\nCSeq: 1\r\n\r\n", 400, "CSeq"),
    (b"INVITE sip:a@b SIP/2.0\r\nCSeq: x INVITE\r\n\r\n", 400, "CSeq"),
    (b"INVITE sip:a@b SIP/2.0\r\nMax-Forwards: 256\r\n\r\n", 400, "Max-Forwards"),
    (b"INVITE sip:a@b SIP/2.0\r\nContent-Length: 1x\r\n\r\n", 400, "Content-Length"),
    (b"INVITE sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n", 400, "terminated"),
    (b"INVITE sip:a@b SIP/2.0\r\n From: x\r\n\r\n", 400, "continuation"),
    (b"INVITE sip:a@b SIP/2.0\r\nFrom: \"x <sip:a@b>\r\n\r\n", 400, "quoted"),
    (b"SIP/2.0 1000 OK\r\n\r\n", 400, "status"),
    (b"SIP/2.0 099 OK\r\n\r\n", 400, "status"),
    (b"INVITE sip:a@b SIP/2.0", 400, "start line"),
    (b"", 400, "empty"),
    (b"\r\n\r\n", 400, "empty"),
])
def test_malformed_messages(data: bytes, status: int, reason: str) -> None:
    with pytest.raises(ParseError) as err:
        parse(data)
    assert err.value.status == status
    assert reason.lower() in err.value.reason.lower()


def test_limits() -> None:
    many = b"OPTIONS sip:a@b SIP/2.0\r\n" + b"X-A: 1\r\n" * 20 + b"\r\n"
    assert len(parse(many, Limits(max_headers=20)).headers) == 20
    with pytest.raises(ParseError, match="too many"):
        parse(many, Limits(max_headers=19))
    long = b"OPTIONS sip:a@b SIP/2.0\r\nX-A: " + b"a" * 100 + b"\r\n\r\n"
    with pytest.raises(ParseError, match="too long"):
        parse(long, Limits(max_line_length=50))
    with pytest.raises(ParseError) as err:
        parse(long, Limits(max_message_size=100))
    assert err.value.status == 513
    with pytest.raises(ValueError):
        Limits(max_headers=0)
    # More header lines than the inline index holds are fine (the index grows).
    big = b"OPTIONS sip:a@b SIP/2.0\r\n" + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(200)) + b"\r\n"
    m = parse(big)
    assert len(m.headers) == 200 and m.headers.get("x-199") == "199"
    m.add_header("X-200", "200", first=True)
    assert parse(bytes(m)).headers.items()[0] == ("X-200", "200")


def test_message_length_framing() -> None:
    assert message_length(INVITE) == len(INVITE)
    for cut in (1, 10, len(INVITE) - len(SDP), len(INVITE) - 1):
        assert message_length(INVITE[:cut]) == 0
    assert message_length(INVITE + INVITE[:20]) == len(INVITE)
    assert message_length(bytearray(INVITE)) == len(INVITE)
    assert message_length(memoryview(INVITE + b"x")) == len(INVITE)
    assert message_length(b"") == 0
    assert message_length(b"\r\n\r\n" + INVITE) == -4  # ping: answer with a pong
    assert message_length(b"\r\n") == -2  # pong
    assert message_length(b"\r\nINVITE") == -2
    assert message_length(b"\r") == 0
    nocl = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/TCP h;branch=z9hG4bK1\r\n\r\nNEXT"
    assert message_length(nocl) == len(nocl) - 4  # no Content-Length on a stream: no body
    with pytest.raises(ParseError):
        message_length(b"OPTIONS sip:a@b SIP/2.0\r\nContent-Length: -999\r\n\r\n")
    with pytest.raises(ParseError) as err:
        message_length(b"OPTIONS sip:a@b SIP/2.0\r\nX: " + b"a" * 70000)
    assert err.value.status == 513
    with pytest.raises(ParseError):
        message_length(b"OPTIONS sip:a@b SIP/2.0\r\nl: 99999\r\n\r\n", Limits(max_message_size=1000))


def test_views_outlive_the_message_and_nothing_leaks() -> None:
    via = parse(INVITE).via[0]
    frm = parse(bytearray(INVITE)).from_
    gc.collect()
    assert via.branch == "z9hG4bK776asdhds" and frm.tag == "1928301774"

    def work() -> None:
        m = parse(bytearray(INVITE))
        m.via, m.from_, m.to, m.contact, m.route, m.cseq, m.uri, m.headers.items()
        m.add_via("SIP/2.0/UDP 192.0.2.10;branch=z9hG4bKx")
        m.pop_route()
        bytes(m)
        m.reply(180)

    for _ in range(200):
        work()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(2000):
        work()
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes retained after 2000 messages"


def test_pickle_round_trip(msg: fastsip.Request) -> None:
    assert bytes(pickle.loads(pickle.dumps(msg))) == INVITE


@pytest.mark.parametrize("to", [b"To: sip:bob@exa(mple.com", b"To: <sip:bob@[::1>"])
def test_a_to_uri_that_does_not_parse_fails_only_on_uri_edited_or_not(to: bytes) -> None:
    # A server answers such a request 400: building that answer (and reading the To tag) must
    # not need the To URI, before or after the message was edited (a stamped Via).
    raw = (b"OPTIONS sip:example.com SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK1\r\n"
           b"From: <sip:a@example.com>;tag=1\r\n" + to + b"\r\nCall-ID: c\r\n"
           b"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
    for edited in (False, True):
        request = parse(raw)
        assert isinstance(request, fastsip.Request)
        if edited:
            request.add_via("SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK2")
            request.pop_via()
        to_view = request.to
        assert to_view is not None and to_view.tag is None
        with pytest.raises(ParseError):
            to_view.uri  # noqa: B018
        answer = request.reply(400, "Bad Request (To)", to_tag="t1")
        assert answer.status_code == 400
        assert to + b";tag=t1\r\n" in bytes(answer)


def test_copy_is_independent_and_carries_edits_so_far() -> None:
    # A proxy forwards a copy of the request on each branch (§16.6 step 1): edits to one
    # branch's copy must never show in the original or in another branch's copy.
    req = parse(
        b"INVITE sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a\r\n"
        b"Route: <sip:p1.example.com;lr>\r\n"
        b"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n"
        b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n"
        b"Content-Type: application/sdp\r\nContent-Length: 4\r\n\r\nv=0\n"
    )
    assert isinstance(req, Request)
    req.decrement_max_forwards()
    req.uri = "sip:bob@192.0.2.9:5070"          # an edit made before the copy...
    first = req.copy()
    assert bytes(first) == bytes(req)           # ...is in the copy
    assert first.uri == req.uri and first.method == "INVITE" and first.max_forwards == 69
    first.pop_route()
    first.add_via("SIP/2.0/UDP 192.0.2.2:5060;branch=z9hG4bK-b1")
    first.add_record_route("<sip:192.0.2.2;lr>")
    second = req.copy()
    second.uri = "sip:bob@192.0.2.10"
    second.add_via("SIP/2.0/UDP 192.0.2.2:5060;branch=z9hG4bK-b2")
    # The original is untouched by either branch.
    assert req.top_via is not None and req.top_via.branch == "z9hG4bK-a"
    assert len(req.route) == 1 and not req.record_route and str(req.uri) == "sip:bob@192.0.2.9:5070"
    assert first.top_via is not None and first.top_via.branch == "z9hG4bK-b1"
    assert second.top_via is not None and second.top_via.branch == "z9hG4bK-b2"
    assert not first.route and len(second.route) == 1 and not second.record_route
    assert str(first.uri) == "sip:bob@192.0.2.9:5070" and str(second.uri) == "sip:bob@192.0.2.10"
    # Each copy serializes to what parsing it again gives, body included.
    for msg in (first, second):
        again = parse(bytes(msg))
        assert bytes(again) == bytes(msg) and bytes(msg.body) == b"v=0\n"
        assert [str(v) for v in again.via] == [str(v) for v in msg.via]


def test_views_are_parsed_once_shared_by_copies_and_dropped_by_edits() -> None:
    # A proxy reads Contact, Record-Route and the Request-URI several times per message and
    # once more on each branch's copy: the views (and the URIs inside them) are parsed once,
    # the copy starts with them, and an edit of either message rebuilds only its own.
    req = parse(
        b"INVITE sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a\r\n"
        b"Record-Route: <sip:p0.example.com;lr>\r\n"
        b"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n"
        b"Contact: <sip:alice@192.0.2.1:5060>\r\n"
        b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    )
    assert isinstance(req, Request)
    contacts, record_routes, uri, to = req.contact, req.record_route, req.uri, req.to
    assert req.contact is contacts and req.record_route is record_routes and req.uri is uri
    assert contacts[0].uri is contacts[0].uri
    copy = req.copy()
    assert copy.uri is uri and copy.contact is contacts and copy.to is to
    copy.set_header("Contact", "<sip:alice@198.51.100.7:40000;alias=x>")
    copy.add_record_route("<sip:p1.example.com;lr>")
    assert [str(c.uri) for c in copy.contact] == ["sip:alice@198.51.100.7:40000;alias=x"]
    assert [str(r.uri) for r in copy.record_route] == ["sip:p1.example.com;lr",
                                                        "sip:p0.example.com;lr"]
    # The original keeps its views, unchanged.
    assert req.contact is contacts and [str(c.uri) for c in contacts] == [
        "sip:alice@192.0.2.1:5060"]
    assert req.record_route is record_routes and len(record_routes) == 1
    req.remove_header("Contact")
    assert req.contact == [] and copy.contact[0].uri.params == {"alias": "x"}


def test_copy_of_a_response() -> None:
    resp = parse(b"SIP/2.0 180 Ringing\r\nVia: SIP/2.0/UDP p;branch=z9hG4bK-1\r\n"
                 b"Via: SIP/2.0/UDP a;branch=z9hG4bK-2\r\nFrom: <sip:a@x>;tag=1\r\n"
                 b"To: <sip:b@x>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n"
                 b"Content-Length: 0\r\n\r\n")
    assert isinstance(resp, Response)
    copy = resp.copy()
    copy.pop_via()
    assert copy.status_code == 180 and copy.reason == "Ringing" and len(copy.via) == 1
    assert len(resp.via) == 2 and bytes(resp).count(b"Via:") == 2


@pytest.mark.parametrize("first", [
    "SIP/2.0/UDP p;branch=z9hG4bK-1",
    "SIP/2.0/UDP p;branch=z9hG4bK-1 ",                      # LWS before the comma
    'SIP/2.0/UDP p:5070;branch=z9hG4bK-1;x="a, b"',          # a comma in a quoted value
    "SIP/2.0/UDP [2001:db8::1]:5070;rport=1;branch=z9hG4bK-1",
])
@pytest.mark.parametrize("read_first", [False, True])
def test_pop_via_of_a_line_with_several_values(first: str, read_first: bool) -> None:
    # A response's Via line often carries every hop ("Via: ours, theirs"): the pop ends the
    # top value where parse() found its end, whether or not the Via was read before.
    resp = parse(f"SIP/2.0 200 OK\r\nVia: {first}, SIP/2.0/TCP a;branch=z9hG4bK-2,"
                 f"SIP/2.0/UDP b;branch=z9hG4bK-3\r\nFrom: <sip:a@x>;tag=1\r\n"
                 f"To: <sip:b@x>;tag=2\r\nCall-ID: c\r\nCSeq: 1 INVITE\r\n"
                 f"Content-Length: 0\r\n\r\n".encode())
    assert isinstance(resp, Response)
    if read_first:
        assert resp.top_via is not None and resp.top_via.branch == "z9hG4bK-1"
    assert resp.pop_via() == first.strip()
    assert [v.branch for v in resp.via] == ["z9hG4bK-2", "z9hG4bK-3"]
    assert resp.top_via is not None and resp.top_via.transport == "TCP"
    again = parse(bytes(resp))
    assert isinstance(again, Response) and [str(v) for v in again.via] == [
        "SIP/2.0/TCP a;branch=z9hG4bK-2", "SIP/2.0/UDP b;branch=z9hG4bK-3"]


def test_headers_count_counts_lines_not_values() -> None:
    msg = parse(b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP a;branch=z9hG4bK-1, "
                b"SIP/2.0/UDP b;branch=z9hG4bK-2\r\nv: SIP/2.0/UDP c;branch=z9hG4bK-3\r\n"
                b"From: <sip:a@b>;tag=1\r\nTo: <sip:b@b>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n"
                b"X-Custom: 1\r\nx-custom: 2\r\nContent-Length: 0\r\n\r\n")
    assert msg.headers.count("Via") == 2 and msg.headers.count("v") == 2
    assert msg.headers.count("From") == 1 and msg.headers.count("Route") == 0
    assert msg.headers.count("X-Custom") == 2 and msg.headers.count("X-Other") == 0
    msg.pop_via()                                   # the first value of the first line...
    msg.add_via("SIP/2.0/UDP p;branch=z9hG4bK-9")   # ...and a new line on top
    assert msg.headers.count("Via") == 3 and len(msg.via) == 3
    msg.remove_header("Via")
    assert msg.headers.count("Via") == 0


def _options_with_via(via: str) -> bytes:
    return (f"OPTIONS sip:a@b SIP/2.0\r\nVia: {via}\r\nVia: SIP/2.0/UDP p;branch=z9hG4bK-p\r\n"
            "From: <sip:a@b>;tag=1\r\nTo: <sip:b@b>\r\nCall-ID: x\r\nCSeq: 1 OPTIONS\r\n"
            "Content-Length: 0\r\n\r\n").encode()


@pytest.mark.parametrize(("via", "host", "port", "changed", "expected"), [
    # RFC 3581 §4: an empty rport is filled, and received is added with it.
    ("SIP/2.0/UDP 10.0.0.2:5060;rport;branch=z9hG4bK-a", "203.0.113.9", 40000, True,
     "SIP/2.0/UDP 10.0.0.2:5060;rport=40000;branch=z9hG4bK-a;received=203.0.113.9"),
    # §18.2.1: another host gets received; an older received goes, an rport value stays.
    ("SIP/2.0/UDP h.example.com;branch=z9hG4bK-a;received=1.2.3.4;rport=999", "192.0.2.1",
     5060, True, "SIP/2.0/UDP h.example.com;branch=z9hG4bK-a;rport=999;received=192.0.2.1"),
    # The same host and no rport: nothing to say.
    ("SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK-a", "192.0.2.1", 5070, False,
     "SIP/2.0/UDP 192.0.2.1:5070;branch=z9hG4bK-a"),
    # An IPv6 sent-by compares without its brackets.
    ("SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bK-a;rport", "2001:db8::1", 5060, True,
     "SIP/2.0/TCP [2001:db8::1]:5060;branch=z9hG4bK-a;rport=5060;received=2001:db8::1"),
    # Parameter names are case-insensitive; a quoted value is kept as written.
    ('SIP/2.0/UDP 10.0.0.2;RPORT;branch=z9hG4bK-a;Received=9.9.9.9;x="a;b"', "10.0.0.2",
     5060, True, 'SIP/2.0/UDP 10.0.0.2;rport=5060;branch=z9hG4bK-a;x="a;b";received=10.0.0.2'),
])
def test_stamp_received_edits_the_top_via(via: str, host: str, port: int, changed: bool,
                                          expected: str) -> None:
    msg = parse(_options_with_via(via))
    assert msg.stamp_received(host, port) is changed
    assert str(msg.top_via) == expected
    again = parse(bytes(msg))           # what goes on the wire parses to the same Via
    assert str(again.top_via) == expected and len(again.via) == 2


def test_stamp_received_keeps_the_other_values_of_the_line_and_unfolds() -> None:
    msg = parse(_options_with_via(
        "SIP/2.0/UDP 10.0.0.2:5060;rport;branch=z9hG4bK-a, SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK-b"))
    assert msg.stamp_received("203.0.113.9", 4000)
    assert [str(v) for v in parse(bytes(msg)).via] == [
        "SIP/2.0/UDP 10.0.0.2:5060;rport=4000;branch=z9hG4bK-a;received=203.0.113.9",
        "SIP/2.0/UDP 10.0.0.3;branch=z9hG4bK-b", "SIP/2.0/UDP p;branch=z9hG4bK-p"]
    folded = parse(_options_with_via("SIP/2.0/UDP 10.0.0.2:5060;rport\r\n ;branch=z9hG4bK-a"))
    assert folded.stamp_received("203.0.113.9", 4000)
    top = parse(bytes(folded)).top_via
    assert top is not None and top.rport == 4000 and top.received == "203.0.113.9"
    assert top.branch == "z9hG4bK-a"


def _invite(**changes: str) -> bytes:
    fields = {"uri": "sip:bob@example.com", "via": "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-a",
              "from_tag": "1", "to_tag": "", "call_id": "c1", "cseq": "1",
              "extra": ""} | changes
    to = "<sip:bob@example.com>" + (f";tag={fields['to_tag']}" if fields["to_tag"] else "")
    return (f"INVITE {fields['uri']} SIP/2.0\r\nVia: {fields['via']}\r\n"
            f"From: Alice <sip:alice@example.com>;tag={fields['from_tag']}\r\nTo: {to}\r\n"
            f"Call-ID: {fields['call_id']}\r\nCSeq: {fields['cseq']} INVITE\r\n{fields['extra']}"
            "Max-Forwards: 70\r\nContent-Length: 0\r\n\r\n").encode()


def _key_from_via(msg: Request) -> tuple[object, ...] | None:
    """The §17.2.3 key the long way, through the Via object (what the layer did before)."""
    top = msg.top_via
    if top is None or not (top.branch or "").startswith("z9hG4bK") or len(top.branch) <= 7:
        return None
    return (top.branch, top.host.lower(), top.port,
            "INVITE" if msg.method == "ACK" else msg.method)


def test_transaction_key_is_rfc3261_17_2_3_read_from_the_index() -> None:
    assert parse(_invite()).transaction_key() == ("z9hG4bK-a", "192.0.2.1", 5060, "INVITE")
    # the host compares case-insensitively, a missing port stays None, IPv6 keeps brackets
    assert parse(_invite(via="SIP/2.0/UDP PC33.Atlanta.COM;branch=z9hG4bK-b")).transaction_key() \
        == ("z9hG4bK-b", "pc33.atlanta.com", None, "INVITE")
    assert parse(_invite(via="SIP/2.0/TCP [2001:DB8::9]:5070;branch=z9hG4bK-c")) \
        .transaction_key() == ("z9hG4bK-c", "[2001:db8::9]", 5070, "INVITE")
    # an ACK finds its INVITE's transaction; other methods keep their own
    ack = _invite().replace(b"INVITE sip:", b"ACK sip:").replace(b"1 INVITE", b"1 ACK")
    assert parse(ack).transaction_key() == parse(_invite()).transaction_key()
    bye = _invite().replace(b"INVITE sip:", b"BYE sip:").replace(b"1 INVITE", b"1 BYE")
    assert parse(bye).transaction_key()[3] == "BYE"
    # RFC 2543 peers (no magic cookie, or nothing after it) get None: the caller's fallback
    for via in ("SIP/2.0/UDP 192.0.2.1;branch=1234", "SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK",
                "SIP/2.0/UDP 192.0.2.1;branch=Z9HG4BK-a", "SIP/2.0/UDP 192.0.2.1"):
        assert parse(_invite(via=via)).transaction_key() is None, via
    # an edit re-reads the top Via: stamping keeps the key, a new Via on top makes its own
    msg = parse(_invite())
    msg.stamp_received("203.0.113.5", 4000)
    assert msg.transaction_key() == ("z9hG4bK-a", "192.0.2.1", 5060, "INVITE")
    msg.add_via("SIP/2.0/UDP Proxy.Example.com:5062;branch=z9hG4bK-p")
    assert msg.transaction_key() == ("z9hG4bK-p", "proxy.example.com", 5062, "INVITE")


def _torture_messages() -> Iterator[tuple[str, Request | Response]]:
    """(file name, message) for each RFC 4475 torture message that parses."""
    for path in sorted((Path(__file__).parent / "data" / "rfc4475").glob("*.dat")):
        try:
            yield path.name, parse(path.read_bytes())
        except ParseError:
            continue


def test_transaction_key_agrees_with_the_via_object_on_the_torture_tests() -> None:
    seen = 0
    for name, msg in _torture_messages():
        if isinstance(msg, Request):
            assert msg.transaction_key() == _key_from_via(msg), name
            seen += msg.transaction_key() is not None
    assert seen >= 20


def test_response_transaction_key_is_branch_and_cseq_method() -> None:
    ok = parse(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1;branch=z9hG4bK-a\r\n"
               b"CSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(ok, Response) and ok.transaction_key() == ("z9hG4bK-a", "BYE")
    no_branch = parse(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1\r\n"
                      b"CSeq: 7 BYE\r\nContent-Length: 0\r\n\r\n")
    assert no_branch.transaction_key() is None


def test_repeated_single_field_names_the_first_one_on_two_lines(msg: fastsip.Request) -> None:
    # INVITE above: Via, Route, Allow and Contact on several lines, and compact From and
    # Call-ID -- lists and single fields once each: nothing repeated.
    assert msg.repeated_single_field() is None
    for line, name in ((b"Call-ID: other@x\r\n", "Call-ID"),
                       (b"From: <sip:e@x>;tag=e\r\n", "From"), (b"t: <sip:e@x>\r\n", "To"),
                       (b"CSeq: 2 INVITE\r\n", "CSeq"), (b"Max-Forwards: 5\r\n", "Max-Forwards"),
                       (b"Content-Length: 0\r\n", "Content-Length")):
        # A compact form counts as its field ("t", and the INVITE's own "i", "f", "l").
        twice = parse(INVITE.replace(b"Allow: BYE\r\n", b"Allow: BYE\r\n" + line))
        assert twice.repeated_single_field() == name, line
    # The first repeated in line order, edits included: an added line counts, a removed one not.
    both = parse(INVITE.replace(b"Allow: BYE\r\n",
                                b"Allow: BYE\r\nTo: <sip:e@x>\r\nMax-Forwards: 3\r\n"))
    assert both.repeated_single_field() == "To"
    both.remove_header("To")
    assert both.repeated_single_field() == "Max-Forwards"
    msg.add_header("CSeq", "9 INVITE")
    assert msg.repeated_single_field() == "CSeq"


def test_repeated_single_field_agrees_with_header_counts_on_the_torture_tests() -> None:
    names = ("From", "To", "Call-ID", "CSeq", "Max-Forwards", "Content-Length")
    repeated = 0
    for name, m in _torture_messages():
        counted = [n for n in names if m.headers.count(n) > 1]
        assert (m.repeated_single_field() is None) == (not counted), name
        repeated += bool(counted)
    assert repeated >= 1          # multi01 at least


def test_loop_hash_covers_the_fields_of_rfc3261_16_6_step_8() -> None:
    base = parse(_invite()).loop_hash()
    # Sixteen lower-case hex digits of FNV-1a 64, the same in every process and release (the
    # branches of a rolling upgrade's old and new processes must still find a loop): pinned.
    assert base == "a7bbbb078d1238c0"
    assert parse(_invite(from_tag="zz")).loop_hash() == "c692e479947927fd"
    # The same request coming back: another Via on top, a stamped Via, a lower Max-Forwards.
    back = parse(_invite(via="SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK-x, SIP/2.0/UDP 192.0.2.1:5060;"
                             "branch=z9hG4bK-a"))
    back.stamp_received("203.0.113.5", 4000)
    back.decrement_max_forwards()
    assert back.loop_hash() == base
    # A Request-URI edited after arrival still hashes as received.
    edited = parse(_invite())
    edited.uri = "sip:bob@192.0.2.44"
    assert edited.loop_hash() == base
    # Any of the listed fields makes it another request.
    for change in ({"uri": "sip:carol@example.com"}, {"from_tag": "2"}, {"to_tag": "9"},
                   {"call_id": "c2"}, {"cseq": "2"}, {"extra": "Proxy-Require: foo\r\n"},
                   {"extra": 'Proxy-Authorization: Digest username="a"\r\n'}):
        assert parse(_invite(**change)).loop_hash() != base, change
    # Fields that run together differently are not confused ("ab"+"" vs "a"+"b").
    assert parse(_invite(from_tag="ab", call_id="c")).loop_hash() != \
        parse(_invite(from_tag="a", call_id="bc")).loop_hash()


# -- what an edit keeps --------------------------------------------------------------------------

_EDITS = [
    ("stamp", lambda m: m.stamp_received("198.51.100.7", 40000)),
    ("add_via", lambda m: m.add_via("SIP/2.0/UDP  [2001:db8::9]:5070 ;rport;branch=z9hG4bK-n")),
    ("pop_via", lambda m: m.pop_via()),
    ("from", lambda m: m.set_header("From", '"A" <sip:a@example.org>;tag=f2')),
    ("to", lambda m: m.set_header("t", "<sip:bob@example.com>;tag=t9")),
    ("route", lambda m: m.add_route("<sip:p9.example.net;lr>")),
    ("pop_route", lambda m: m.pop_route()),
    ("record_route", lambda m: m.add_record_route("<sip:p8.example.net;lr>")),
    ("other", lambda m: m.add_header("X-Note", "1")),
    ("drop_other", lambda m: m.remove_header("Subject")),
    ("cseq", lambda m: m.set_header("CSeq", "7 INVITE")),
    ("contact", lambda m: m.set_header("m", "<sip:alice@192.0.2.66:5999>")),
]


def _read(m: Request) -> tuple[object, ...]:
    # What the layers read of a message: the top Via's fields, every Via, the tags and URIs
    # of From and To, the routes, the Contact, the keys computed from the parts.
    top = m.top_via
    assert top is not None
    return (str(top), top.branch, top.host, top.port, top.received, top.rport,
            [str(v) for v in m.via], m.from_.tag, str(m.from_.uri), m.to.tag, str(m.to.uri),
            [str(r) for r in m.route], [str(r) for r in m.record_route],
            [str(c.uri) for c in m.contact], m.cseq.seq, m.transaction_key(), m.loop_hash(),
            m.stateless_branch())


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(range(len(_EDITS))), st.booleans()), max_size=8))
def test_an_edit_keeps_what_it_did_not_touch_and_renews_what_it_did(
        edits: list[tuple[int, bool]]) -> None:
    # An edit drops only its own header's parts and views (the intake's stamp keeps the From
    # and To parse() found; a Via edit scans the new top once): whatever was read before or
    # after, every read agrees with a fresh parse of what goes on the wire.
    msg = parse(
        b"INVITE sip:bob@example.com SIP/2.0\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.1:5060;rport;branch=z9hG4bK-a1,\r\n"
        b" SIP/2.0/TCP 192.0.2.2;branch=z9hG4bK-a2\r\n"
        b"Via: SIP/2.0/UDP 192.0.2.3;branch=z9hG4bK-a3\r\n"
        b"Route: <sip:p1.example.com;lr>\r\n"
        b"From: <sip:alice@example.com>;tag=1\r\nTo: <sip:bob@example.com>\r\n"
        b"Contact: <sip:alice@192.0.2.1:5060>\r\nSubject: hi\r\n"
        b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\nContent-Length: 0\r\n\r\n")
    assert isinstance(msg, Request)
    for index, read_between in edits:
        if read_between:
            _read(msg)
        name, edit = _EDITS[index]
        if name == "pop_via" and len(msg.via) < 2:
            continue
        edit(msg)
        again = parse(bytes(msg))
        assert isinstance(again, Request)
        assert _read(msg) == _read(again), name
        copy = msg.copy()
        assert _read(copy) == _read(again), name
