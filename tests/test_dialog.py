"""Dialog state (RFC 3261 §12): creation on each side, route sets, and in-dialog requests with
loose and strict routing (§12.2.1.1)."""

from __future__ import annotations

import pytest

from fastsip import parse
from fastsip.sip import Request, Response
from fastsip.ua import Dialog, DialogError

INVITE = (
    b"INVITE sip:bob@biloxi.example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP pc33.atlanta.example.com;branch=z9hG4bKnashds8\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice" <sip:alice@atlanta.example.com>;tag=1928301774\r\n'
    b"To: Bob <sip:bob@biloxi.example.com>\r\n"
    b"Call-ID: a84b4c76e66710\r\n"
    b"CSeq: 314159 INVITE\r\n"
    b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
    b"Record-Route: <sip:p2.example.com;lr>, <sip:p1.example.com;lr>\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def _invite() -> Request:
    msg = parse(INVITE)
    assert isinstance(msg, Request)
    return msg


def _ok(invite: Request, rr: str = "<sip:p2.example.com;lr>, <sip:p1.example.com;lr>") -> Response:
    return invite.reply(200, to_tag="a6c85cf", headers=[
        ("Contact", "<sip:bob@192.0.2.4>"), ("Record-Route", rr)])


def test_uac_dialog_reverses_record_route() -> None:
    inv = _invite()
    d = Dialog.from_uac(inv, _ok(inv))
    assert d.id == ("a84b4c76e66710", "1928301774", "a6c85cf")
    assert d.route_set == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert str(d.remote_target) == "sip:bob@192.0.2.4"
    assert d.local_cseq == 314159 and d.remote_cseq is None
    assert d.confirmed and d.is_uac and not d.secure
    assert d.local_uri == "sip:alice@atlanta.example.com"
    assert d.remote_uri == "sip:bob@biloxi.example.com"


def test_uas_dialog_keeps_record_route_order() -> None:
    inv = _invite()
    d = Dialog.from_uas(inv, "a6c85cf")
    assert d.id == ("a84b4c76e66710", "a6c85cf", "1928301774")
    assert d.route_set == ["<sip:p2.example.com;lr>", "<sip:p1.example.com;lr>"]
    assert str(d.remote_target) == "sip:alice@pc33.atlanta.example.com"
    assert d.remote_cseq == 314159 and d.local_cseq == 0 and not d.is_uac


def test_loose_routing_request() -> None:
    inv = _invite()
    d = Dialog.from_uac(inv, _ok(inv))
    bye = d.create_request("BYE", [("Via", "SIP/2.0/UDP h;branch=z9hG4bKx")])
    assert str(bye.uri) == "sip:bob@192.0.2.4"
    assert [str(r) for r in bye.route] == ["<sip:p1.example.com;lr>", "<sip:p2.example.com;lr>"]
    assert bye.cseq is not None and bye.cseq == (314160, "BYE")
    assert bye.from_ is not None and bye.from_.tag == "1928301774"
    assert bye.from_.display_name == "Alice"
    assert bye.to is not None and bye.to.tag == "a6c85cf"
    assert bye.call_id == "a84b4c76e66710"
    assert str(d.next_hop()) == "sip:p1.example.com;lr"


def test_strict_routing_request() -> None:
    inv = _invite()
    d = Dialog.from_uac(inv, _ok(inv, "<sip:p2.example.com;lr>, <sip:p1.example.com>"))
    req = d.create_request("INFO")
    # p1 has no lr: it becomes the Request-URI; the remote target goes last in Route.
    assert str(req.uri) == "sip:p1.example.com"
    assert [str(r) for r in req.route] == ["<sip:p2.example.com;lr>", "<sip:bob@192.0.2.4>"]


def test_no_route_set_and_ack_keeps_invite_cseq() -> None:
    inv = _invite()
    d = Dialog.from_uac(inv, inv.reply(200, to_tag="t", headers=[("Contact", "<sip:b@h:5062>")]))
    ack = d.create_request("ACK", cseq=314159)
    assert str(ack.uri) == "sip:b@h:5062" and ack.route == []
    assert ack.cseq == (314159, "ACK")
    assert d.local_cseq == 314159                    # ACK did not move it


def test_remote_cseq_order_and_target_refresh() -> None:
    inv = _invite()
    d = Dialog.from_uas(inv, "t")
    req = parse(INVITE.replace(b"CSeq: 314159", b"CSeq: 314158").replace(
        b"Contact: <sip:alice@pc33.atlanta.example.com>", b"Contact: <sip:alice@10.1.1.1>"))
    assert isinstance(req, Request)
    assert not d.accept_remote_cseq(req)
    req2 = parse(INVITE.replace(b"CSeq: 314159", b"CSeq: 314160"))
    assert isinstance(req2, Request)
    assert d.accept_remote_cseq(req2) and d.remote_cseq == 314160
    d.refresh_target(req)
    assert str(d.remote_target) == "sip:alice@10.1.1.1"


def test_dialog_errors() -> None:
    inv = _invite()
    with pytest.raises(DialogError):
        Dialog.from_uac(inv, inv.reply(200, to_tag="t"))           # 2xx without Contact
    no_contact = parse(INVITE.replace(b"Contact: <sip:alice@pc33.atlanta.example.com>\r\n", b""))
    assert isinstance(no_contact, Request)
    with pytest.raises(DialogError):
        Dialog.from_uas(no_contact, "t")
    assert issubclass(DialogError, ValueError)
