"""STUN Binding on the SIP port (RFC 5389, RFC 5626 §4.4.2): the sans-IO codec against an
independent decoding (struct, by the RFC's layout), fuzzed, and on a real serve socket."""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsip.transport.stun import MAGIC_COOKIE, binding_response, is_stun

sys.path.insert(0, str(Path(__file__).parent))
from netutil import needs_ipv6
from procutil import free_port
from serveutil import Serve, final_status, sip_exchange
from serveutil import request as sip_request


def request(txid: bytes, attributes: bytes = b"") -> bytes:
    return struct.pack("!HHI12s", 0x0001, len(attributes), MAGIC_COOKIE, txid) + attributes


def mapped(answer: bytes, txid: bytes) -> tuple[str, int]:
    """Decode a Binding success response's XOR-MAPPED-ADDRESS (RFC 5389 §15.2)."""
    kind, length, cookie, got_txid = struct.unpack_from("!HHI12s", answer)
    assert (kind, cookie, got_txid) == (0x0101, MAGIC_COOKIE, txid)
    assert len(answer) == 20 + length
    attr, size = struct.unpack_from("!HH", answer, 20)
    assert attr == 0x0020
    _, family, xport = struct.unpack_from("!BBH", answer, 24)
    port = xport ^ (MAGIC_COOKIE >> 16)
    raw = answer[28:28 + size - 4]
    if family == 1:
        addr = ipaddress.IPv4Address(int.from_bytes(raw, "big") ^ MAGIC_COOKIE)
    else:
        mask = int.from_bytes(struct.pack("!I", MAGIC_COOKIE) + txid, "big")
        addr = ipaddress.IPv6Address(int.from_bytes(raw, "big") ^ mask)
    return str(addr), port


def test_binding_ipv4_and_ipv6() -> None:
    txid = os.urandom(12)
    assert mapped(binding_response(request(txid), "203.0.113.7", 40312) or b"", txid) \
        == ("203.0.113.7", 40312)
    assert mapped(binding_response(request(txid), "2001:db8::7", 1) or b"", txid) \
        == ("2001:db8::7", 1)
    # A FINGERPRINT-style attribute (well formed) is fine.
    with_attr = request(txid, struct.pack("!HHI", 0x8028, 4, 0xDEADBEEF))
    assert binding_response(with_attr, "198.51.100.1", 5060) is not None


@pytest.mark.parametrize("data", [
    b"", b"\x00\x01", request(b"x" * 12)[:19],
    struct.pack("!HHI12s", 0x0101, 0, MAGIC_COOKIE, b"x" * 12),        # a response
    struct.pack("!HHI12s", 0x0001, 0, 0x12345678, b"x" * 12),          # no magic cookie
    struct.pack("!HHI12s", 0x0001, 4, MAGIC_COOKIE, b"x" * 12),        # length past the end
    struct.pack("!HHI12s", 0x0001, 3, MAGIC_COOKIE, b"x" * 12) + b"abc",  # not a multiple of 4
    request(b"x" * 12, struct.pack("!HH", 0x0006, 40) + b"abcd"),       # attribute overruns
])
def test_not_a_binding_request_gets_nothing(data: bytes) -> None:
    assert binding_response(data, "192.0.2.1", 5060) is None


def test_sip_is_never_stun() -> None:
    assert not is_stun(b"OPTIONS sip:a SIP/2.0\r\n") and not is_stun(b"SIP/2.0 200 OK")
    assert not is_stun(b"\r\n\r\n") and not is_stun(b"")
    assert is_stun(request(b"y" * 12))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_fuzzed_input_never_raises(tail: bytes) -> None:
    data = struct.pack("!HHI", 0x0001, len(tail), MAGIC_COOKIE) + tail
    answer = binding_response(data, "192.0.2.1", 5060)
    assert answer is None or len(answer) == 32
    binding_response(b"\x00" + tail, "192.0.2.1", 5060)


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
def test_serve_answers_stun_keepalives(tmp_path: Path, host: str) -> None:
    port = free_port(host)
    bracketed = f"[{host}]" if ":" in host else host
    serve = Serve(tmp_path, port, listen=[f"udp:{bracketed}:{port}"])
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            s.settimeout(2.0)
            txid = os.urandom(12)
            # Garbage that looks like STUN is dropped, unanswered; the server stays up.
            s.sendto(b"\x00\x01garbage", (host, port))
            s.sendto(request(txid), (host, port))
            answer, sender = s.recvfrom(2048)
            assert sender[:2] == (host, port)
            assert mapped(answer, txid) == (host, s.getsockname()[1])
            s.settimeout(0.5)
            with pytest.raises(OSError):
                s.recvfrom(2048)            # nothing for the garbage
        if family == socket.AF_INET:
            lines = sip_exchange(port, sip_request("OPTIONS", f"sip:{host}:{port}", call_id="st"))
            assert final_status(lines) == 200
    finally:
        assert serve.close() == 0
    assert "Traceback" not in serve.log()
