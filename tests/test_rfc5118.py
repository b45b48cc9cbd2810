"""RFC 5118 IPv6 torture messages parse as the manifest says.

The archive is LF-only and the two section 4.10 files lack the empty line that ends the header
section; the manifest says to turn LF into CRLF and terminate the header block to get wire bytes,
which is what `wire()` does.  ipv6-in-sdp declares Content-Length 268 for a 251-octet body (an
error the RFC inherited): over UDP that is RFC 4475 3.1.2.2's case, so the parser rejects it, and
the CRLF copy with the corrected length (crlf-ersip/) parses.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import fastsip

DATA = Path(__file__).parent / "data" / "rfc5118"
NAMES = [
    line.split("\t")[0]
    for line in (DATA / "MANIFEST.tsv").read_text().splitlines()
    if line and not line.startswith("#")
]


def wire(name: str) -> bytes:
    data = (DATA / name).read_bytes().replace(b"\n", b"\r\n")
    if b"\r\n\r\n" not in data:
        data += b"\r\n"
    return data


def test_manifest_lists_twelve() -> None:
    assert len(NAMES) == 12


@pytest.mark.parametrize("name", [n for n in NAMES if n not in ("ipv6-bad", "ipv6-in-sdp")])
def test_valid_ipv6_messages_parse(name: str) -> None:
    msg = fastsip.parse(wire(name))
    # Content-Length counts the LF-only body of the archive, so CRLF wire bytes can carry a few
    # octets past it: those are ignored (RFC 3261 18.3) and the message is the prefix it frames.
    assert wire(name).startswith(bytes(msg))
    assert len(msg.body) == int(msg.headers.get("Content-Length", "0"))
    for v in msg.via:
        assert v.host and v.branch
    for c in msg.contact:
        assert c.uri is not None and c.uri.host


def test_ipv6_bad_is_rejected() -> None:
    with pytest.raises(fastsip.ParseError):
        fastsip.parse(wire("ipv6-bad"))


def test_ipv6_good() -> None:
    msg = fastsip.parse(wire("ipv6-good"))
    assert msg.uri.host == "[2001:db8::10]"
    assert msg.uri.host_address == "2001:db8::10"
    assert msg.uri.port is None
    assert msg.via[0].host == "[2001:db8::9:1]"
    assert msg.contact[0].uri.host == "[2001:db8::1]"


def test_port_ambiguous_and_unambiguous() -> None:
    amb = fastsip.parse(wire("port-ambiguous"))
    assert amb.uri.host == "[2001:db8::10:5070]" and amb.uri.port is None
    unamb = fastsip.parse(wire("port-unambiguous"))
    assert unamb.uri.host == "[2001:db8::10]" and unamb.uri.port == 5070


def test_via_received_with_and_without_brackets() -> None:
    assert fastsip.parse(wire("via-received-param-with-delim")).via[0].received == "[2001:db8::9:255]"
    assert fastsip.parse(wire("via-received-param-no-delim")).via[0].received == "2001:db8::9:255"


def test_mixed_ip_versions_in_vias() -> None:
    vias = fastsip.parse(wire("mult-ip-in-header")).via
    assert [(v.host, v.port) for v in vias] == [
        ("[2001:db8::9:1]", 6050), ("192.0.2.1", None), ("[2001:db8::9:255]", None)]
    assert vias[2].received == "192.0.2.200"


def test_ipv4_mapped() -> None:
    msg = fastsip.parse(wire("ipv4-mapped-ipv6"))
    assert msg.via[0].host == "[::ffff:192.0.2.10]" and msg.via[0].port == 19823
    assert msg.contact[0].uri.host == "[::ffff:192.0.2.2]"


def test_ipv6_reference_with_three_colons_is_tolerated() -> None:
    three = fastsip.parse(wire("ipv6-bug-abnf-3-colons")).uri
    two = fastsip.parse(wire("ipv6-correct-abnf-2-colons")).uri
    assert three.host == "[2001:db8:::192.0.2.1]"
    assert two.host == "[2001:db8::192.0.2.1]"


def test_ipv6_in_sdp_with_the_rfcs_content_length_is_rejected() -> None:
    with pytest.raises(fastsip.ParseError, match="Content-Length"):
        fastsip.parse(wire("ipv6-in-sdp"))
    fixed = fastsip.parse((DATA / "crlf-ersip" / "ipv6-in-sdp").read_bytes())
    assert b"IN IP6 2001:db8::20" in bytes(fixed.body)


def test_ipv6_host_comparison_is_by_address() -> None:
    assert fastsip.URI("sip:a@[2001:db8::10]") == fastsip.URI("sip:a@[2001:DB8:0:0:0:0:0:10]")
    assert fastsip.URI("sip:a@[2001:db8::10]") != fastsip.URI("sip:a@[2001:db8::11]")
