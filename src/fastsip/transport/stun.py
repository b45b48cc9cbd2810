"""STUN Binding for SIP's own ports (RFC 5389 §7, as RFC 5626 §4.4.2 uses it): a client of
SIP outbound keeps its UDP flow alive with STUN Binding requests sent to the SIP port itself,
and learns from the answer whether its NAT binding changed.  Sans-IO: bytes in, bytes out.

A datagram whose first byte is 0 or 1 cannot be SIP (a SIP message starts with a method or
``SIP/``), so the transport hands such datagrams here; anything that is not a well-formed
Binding request (a response, an indication, a bad length, no magic cookie) gets no answer.
"""

from __future__ import annotations

import ipaddress
import struct

# The test runs for every datagram the transport reads: it is compiled, with the intake.
from fastsip.transport._intake import is_stun

__all__ = ["MAGIC_COOKIE", "binding_response", "is_stun"]

MAGIC_COOKIE = 0x2112A442
_HEADER = struct.Struct("!HHI12s")
_BINDING_REQUEST = 0x0001
_BINDING_SUCCESS = 0x0101
_XOR_MAPPED_ADDRESS = 0x0020
_MAX_REQUEST = 548            # RFC 5389 §7.1: without path MTU knowledge, requests stay this small


def binding_response(data: bytes, host: str, port: int) -> bytes | None:
    """The Binding success response to ``data`` if it is a well-formed Binding request from
    ``host``:``port`` (its XOR-MAPPED-ADDRESS is that address), else None."""
    if not 20 <= len(data) <= _MAX_REQUEST:
        return None
    kind, length, cookie, txid = _HEADER.unpack_from(data)
    if kind != _BINDING_REQUEST or cookie != MAGIC_COOKIE or length % 4 or 20 + length != len(data):
        return None
    # Every attribute must fit in the message (RFC 5389 §15: TLV, padded to 4 bytes).
    offset = 20
    while offset < len(data):
        if offset + 4 > len(data):
            return None
        _, size = struct.unpack_from("!HH", data, offset)
        offset += 4 + size + (-size % 4)
        if offset > len(data):
            return None
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None
    if not 0 <= port <= 0xFFFF:
        return None
    xport = port ^ (MAGIC_COOKIE >> 16)
    if ip.version == 4:
        xaddr = (int(ip) ^ MAGIC_COOKIE).to_bytes(4, "big")
        value = struct.pack("!BBH", 0, 1, xport) + xaddr
    else:
        mask = (MAGIC_COOKIE << 96) | int.from_bytes(txid, "big")
        xaddr = (int(ip) ^ mask).to_bytes(16, "big")
        value = struct.pack("!BBH", 0, 2, xport) + xaddr
    attribute = struct.pack("!HH", _XOR_MAPPED_ADDRESS, len(value)) + value
    return _HEADER.pack(_BINDING_SUCCESS, len(attribute), MAGIC_COOKIE, txid) + attribute
