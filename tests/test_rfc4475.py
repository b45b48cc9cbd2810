"""RFC 4475 torture messages: every message parses or is rejected as the RFC (and our documented
strict-or-liberal choice) says.

Choices for the INVALID messages the RFC lets an element accept or reject:
  rejected (ParseError, 400): badinv01, clerr, ncl, quotbal, test (RFC: must reject);
    lwsruri, lwsstart, trws, ltgtruri (the Request-Line is the one thing we never repair: a proxy
    must not forward a repaired one, so repairing buys nothing); scalar02, scalarlg (CSeq over
    2**31-1, RFC 3261 8.1.1.5); baddn (unquoted display name with ',' is not a name-addr);
  rejected with status 505: badvers; a response with a 10-digit code: bigcode (dropped).
  accepted (the layer above decides): baddate (Date is never interpreted), badaspec (spaces
    inside < > are trimmed), regbadct (Contact addr-spec with escaped headers), escruri (a proxy
    must strip URI headers; the parser keeps them), mismatch01/02 (CSeq vs method is a check for
    the transaction user, which answers 400/501).
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

import fastsip

DATA = Path(__file__).parent / "data" / "rfc4475"

MANIFEST = [
    row
    for row in csv.reader(
        (line for line in (DATA / "MANIFEST.tsv").read_text().splitlines() if not line.startswith("#")),
        delimiter="\t",
    )
    if row
]
VERDICT = {row[0]: row[3] for row in MANIFEST}

MUST_REJECT = {"badinv01", "clerr", "ncl", "quotbal", "badvers", "bigcode", "test"}
ALSO_REJECTED = {"lwsruri", "lwsstart", "trws", "ltgtruri", "scalar02", "scalarlg", "baddn"}
ACCEPTED_INVALID = {"baddate", "badaspec", "regbadct", "escruri", "mismatch01", "mismatch02"}


def load(name: str) -> bytes:
    return (DATA / f"{name}.dat").read_bytes()


def test_manifest_is_complete() -> None:
    assert len(VERDICT) == 50
    invalid = {n[:-4] for n, v in VERDICT.items() if v in ("INVALID", "NOT-IN-RFC")}
    # every INVALID message has a documented decision
    assert invalid == MUST_REJECT | ALSO_REJECTED | ACCEPTED_INVALID


@pytest.mark.parametrize(
    "name", sorted(n[:-4] for n, v in VERDICT.items() if v in ("VALID", "SEMANTIC"))
)
def test_valid_and_semantic_messages_parse(name: str) -> None:
    data = load(name)
    msg = fastsip.parse(data)
    # An unedited message serializes to exactly the bytes that formed it.
    assert bytes(msg) == data[: len(bytes(msg))]
    if name not in ("dblreq", "mcl01"):
        assert bytes(msg) == data
    # Reading every typed view never breaks on a message the RFC calls well-formed.
    for attr in ("call_id", "cseq", "max_forwards", "via", "from_", "to", "contact", "route",
                 "record_route", "body", "content_length"):
        getattr(msg, attr)
    list(msg.headers)


@pytest.mark.parametrize("name", sorted(MUST_REJECT | ALSO_REJECTED))
def test_rejected_messages_raise_parse_error(name: str) -> None:
    with pytest.raises(fastsip.ParseError) as err:
        fastsip.parse(load(name))
    assert isinstance(err.value, ValueError)
    assert err.value.offset >= 0
    assert err.value.reason


@pytest.mark.parametrize("name", sorted(ACCEPTED_INVALID))
def test_liberally_accepted_messages_parse(name: str) -> None:
    fastsip.parse(load(name))


def test_badvers_answers_505() -> None:
    with pytest.raises(fastsip.ParseError) as err:
        fastsip.parse(load("badvers"))
    assert err.value.status == 505


def test_baddn_errata_copy_is_rejected_too() -> None:
    with pytest.raises(fastsip.ParseError):
        fastsip.parse((DATA / "errata" / "baddn.crlf-fixed.dat").read_bytes())


def test_wsinv_reads_through_folding_and_lws() -> None:
    msg = fastsip.parse(load("wsinv"))
    assert msg.method == "INVITE"
    assert msg.to.tag == "1918181833n"
    assert msg.from_.tag == "98asjd8"
    assert msg.from_.display_name == 'J Rosenberg \\"'
    assert msg.max_forwards == 68
    assert msg.cseq == (9, "INVITE")
    assert msg.call_id == "wsinv.ndaksdj@192.0.2.1"
    assert [v.branch for v in msg.via] == ["390skdjuw", "z9hG4bK9ikj8", "z9hG4bK30239"]
    assert [v.transport for v in msg.via] == ["UDP", "TCP", "UDP"]
    assert [v.host for v in msg.via] == ["192.0.2.2", "spindle.example.com", "192.168.255.111"]
    assert msg.headers.get("Subject") == ""
    assert msg.headers.get("s") == ""
    assert msg.headers.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert msg.headers.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert msg.headers.getall("UnknownHeaderWithUnusualValue") == [";;,,;;,;"]
    (contact,) = msg.contact
    assert contact.display_name == 'Quoted string ""'
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert contact.q == 0.33
    (route,) = msg.route
    assert route.uri.params == {"lr": None, "unknownwith": "value", "unknown-no-value": None}
    assert msg.content_length == 150 == len(msg.body)


def test_intmeth_unusual_characters() -> None:
    msg = fastsip.parse(load("intmeth"))
    assert msg.method == "!interesting-Method0123456789_*+`.%indeed'~"
    assert msg.cseq.method == msg.method
    assert msg.uri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert msg.uri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert msg.uri.host == "example.com"
    assert msg.to.display_name == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert msg.from_.display_name == "token1~` token2'+_ token3*%!.-"
    assert msg.from_.tag == "_token~1'+`*%!-."
    assert msg.via[0].branch == "z9hG4bK-.!%66*_+`'~"
    assert msg.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert msg.headers.get("extensionHeader-!.%*+_`'~") == "\ufeff大停電"


def test_esc01_unescaping_and_uri_equality() -> None:
    msg = fastsip.parse(load("esc01"))
    assert msg.to.uri == fastsip.URI("sip:user@example.com")
    assert msg.uri.user == "sips:user@example.com"


def test_escnull_keeps_nul_and_distinct_contacts() -> None:
    msg = fastsip.parse(load("escnull"))
    users = [c.uri.user for c in msg.contact]
    assert users == ["%00", "%00%00"] or users == ["\x00", "\x00\x00"]
    assert users[0] != users[1]
    assert msg.to.uri.user == "null-\x00-null"


def test_esc02_percent_is_not_unescaped_in_method_and_header_names() -> None:
    msg = fastsip.parse(load("esc02"))
    assert msg.method == "RE%47IST%45R"
    assert len(msg.contact) == 2  # C%6Fntact is an unknown header, not Contact
    assert msg.headers.get("C%6Fntact") == "<sip:alias2@host2.example.com>"
    assert msg.to.display_name == "%Z%45"


def test_semiuri_user_part_holds_semicolon() -> None:
    msg = fastsip.parse(load("semiuri"))
    assert msg.uri.user == "user;par=u@example.net"
    assert msg.uri.host == "example.com"
    assert msg.uri.params == {}


def test_dblreq_ignores_trailing_octets() -> None:
    data = load("dblreq")
    msg = fastsip.parse(data)
    assert msg.method == "REGISTER"
    assert msg.content_length == 0
    assert bytes(msg) == data[: data.index(b"\r\n\r\n") + 4]


def test_mpart01_binary_body_framed_by_content_length() -> None:
    msg = fastsip.parse(load("mpart01"))
    assert len(msg.body) == msg.content_length == int(msg.headers["Content-Length"])
    assert b"\x00" in bytes(msg.body)


def test_noreason_and_unreason() -> None:
    assert fastsip.parse(load("noreason")).reason == ""
    r = fastsip.parse(load("unreason"))
    assert r.status_code == 200
    assert r.reason.startswith("= 2**3 * 5**2 но сто девяносто девять")


def test_transports_via_values() -> None:
    msg = fastsip.parse(load("transports"))
    assert [v.transport for v in msg.via] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]


def test_cparam_contact_vs_uri_params() -> None:
    c1 = fastsip.parse(load("cparam01")).contact[0]
    assert "unknownparam" in c1.params and "unknownparam" not in c1.uri.params
    c2 = fastsip.parse(load("cparam02")).contact[0]
    assert "unknownparam" in c2.uri.params and "unknownparam" not in c2.params


def test_regescrt_keeps_escaped_route_header_in_contact_uri() -> None:
    c = fastsip.parse(load("regescrt")).contact[0]
    assert c.uri.headers == {"Route": "<sip:sip.example.com>"}


def test_mcl01_multiple_content_lengths_are_visible() -> None:
    msg = fastsip.parse(load("mcl01"))
    assert msg.headers.getall("Content-Length") == ["13", "5"]
    assert msg.content_length == 13


def test_semantic_checks_have_what_they_need() -> None:
    insuf = fastsip.parse(load("insuf"))
    assert insuf.call_id is None and insuf.from_ is None and insuf.to is None
    assert fastsip.parse(load("unkscm")).uri.scheme == "nobodyknowsthisscheme"
    assert not fastsip.parse(load("unkscm")).uri.is_sip
    assert fastsip.parse(load("zeromf")).max_forwards == 0
    assert fastsip.parse(load("badbranch")).via[0].branch == "z9hG4bK"
    inv = fastsip.parse(load("inv2543"))
    assert inv.via[0].branch is None and inv.from_.tag is None and inv.max_forwards is None
    bcast = fastsip.parse(load("bcast"))
    assert bcast.via[1].host == "255.255.255.255"
    multi = fastsip.parse(load("multi01"))
    assert len(multi.headers.getall("Call-ID")) == 2
