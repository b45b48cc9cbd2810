"""Strict bencode for the ng protocol: round trips, refusals with offsets, limits, fuzzing."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsip.errors import FastSIPError
from fastsip.relay.bencode import BencodeError, decode, encode


def _unsorted_dict(pairs: list[tuple[bytes, bytes]]) -> bytes:
    """A bencoded dictionary with its keys in the order given (values already encoded)."""
    return b"d" + b"".join(encode(k) + v for k, v in pairs) + b"e"


SDP = (b"v=0\r\no=user1 53655765 2353687637 IN IP4 127.0.0.1\r\ns=-\r\n"
       b"c=IN IP4 127.0.0.1\r\nt=0 0\r\nm=audio 6000 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\n")
# What Kamailio's rtpengine module really sends, keys in its (unsorted) order.
KAMAILIO_OFFER = _unsorted_dict([
    (b"supports", encode([b"load limit"])),
    (b"sdp", encode(SDP)),
    (b"flags", encode([b"trust-address"])),
    (b"replace", encode([b"origin", b"session-connection"])),
    (b"received-from", encode([b"IP4", b"127.0.0.1"])),
    (b"call-id", encode(b"1-1234@host")),
    (b"from-tag", encode(b"ab12c")),
    (b"command", encode(b"offer")),
    (b"sip-message-type", encode(b"sip_request")),
])


def test_decode_kamailio_offer_with_unsorted_keys() -> None:
    msg = decode(KAMAILIO_OFFER)
    assert isinstance(msg, dict)
    assert msg[b"command"] == b"offer"
    assert msg[b"flags"] == [b"trust-address"]
    assert msg[b"received-from"] == [b"IP4", b"127.0.0.1"]
    assert msg[b"sdp"] == SDP
    assert next(iter(msg)) == b"supports"  # arrival order kept


@pytest.mark.parametrize("value", [
    0, -1, 42, 2**63 - 1, -(2**63 - 1), b"", b"spam", b"\x00\xff", [], [1, [2, [3]]], {},
    {b"a": 1, b"b": [b"x", {b"c": b""}]},
])
def test_round_trip(value: object) -> None:
    assert decode(encode(value)) == value  # type: ignore[arg-type]


def test_encode_sorts_keys_and_accepts_str_tuple() -> None:
    assert encode({"result": "pong"}) == b"d6:result4:ponge"
    assert encode({b"z": 1, "a": (1, "x")}) == b"d1:ali1e1:xe1:zi1ee"
    assert encode("é") == b"2:\xc3\xa9"


def test_encode_refuses_what_bencode_cannot_carry() -> None:
    with pytest.raises(TypeError):
        encode(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        encode({1: 2})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        encode({"a": 1, b"a": 2})
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(ValueError):
        encode(cycle)  # type: ignore[arg-type]


@pytest.mark.parametrize(("data", "offset", "reason"), [
    (b"", 0, "empty"),
    (b"i-0e", 1, "negative zero"),
    (b"i03e", 1, "leading zero"),
    (b"ie", 1, "bad integer"),
    (b"i-e", 1, "bad integer"),
    (b"i1x2e", 1, "bad integer"),
    (b"i12", 1, "unterminated"),
    (b"i" + b"9" * 25 + b"e", 1, "too long"),
    (b"i9223372036854775808e", 1, "out of range"),
    (b"01:a", 0, "leading zero"),
    (b"5:abc", 0, "runs past the end"),
    (b"-1:a", 0, "unexpected byte"),
    (b"di1ei2ee", 1, "key is not a byte string"),
    (b"dli1eei2ee", 1, "key is not a byte string"),
    (b"d1:ai1e1:ai2ee", 7, "duplicate"),
    (b"d1:ae", 1, "key without a value"),
    (b"l", 1, "truncated"),
    (b"li1e", 4, "truncated"),
    (b"e", 0, "unexpected end marker"),
    (b"i1ei2e", 3, "trailing data"),
    (b"x", 0, "unexpected byte"),
])
def test_refusals_carry_offset_and_reason(data: bytes, offset: int, reason: str) -> None:
    with pytest.raises(BencodeError) as info:
        decode(data)
    assert info.value.offset == offset
    assert reason in info.value.reason
    assert isinstance(info.value, FastSIPError) and isinstance(info.value, ValueError)


def test_limits() -> None:
    deep = b"l" * 32 + b"e" * 32
    assert decode(deep) is not None
    with pytest.raises(BencodeError, match="nesting deeper than 32"):
        decode(b"l" * 33 + b"e" * 33)
    with pytest.raises(BencodeError, match="nesting deeper than 4"):
        decode(b"l" * 5 + b"e" * 5, max_depth=4)
    with pytest.raises(BencodeError, match="exceeds the limit"):
        decode(b"0:" * 10, max_size=8)
    with pytest.raises(BencodeError, match="more than 3 elements"):
        decode(b"li1ei2ei3ee", max_items=3)
    # a million nested lists must be refused quickly, not recurse
    with pytest.raises(BencodeError):
        decode(b"l" * 1_000_000)


def test_accepts_memoryview_and_bytearray() -> None:
    assert decode(memoryview(b"4:spam")) == b"spam"
    assert decode(bytearray(b"li1ee")) == [1]


_values = st.recursive(
    st.integers(min_value=-(2**63) + 1, max_value=2**63 - 1) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.binary(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_round_trip_property(value: object) -> None:
    assert decode(encode(value)) == value  # type: ignore[arg-type]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(i, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:
            buf[i:i] = bytes([rng.choice(b"ield:0123456789-")])
        elif op == 2 and buf:
            del buf[min(i, len(buf) - 1)]
        elif op == 3:
            buf = buf[:i]
        else:
            j = rng.randrange(len(buf) + 1)
            buf[i:i] = buf[j:j + rng.randint(1, 16)]
    return bytes(buf)


def test_fuzz_only_bencode_error_escapes() -> None:
    seeds = [
        KAMAILIO_OFFER,
        encode({"command": "query", "call-id": "x", "flags": ["a", "b"], "n": -5}),
        encode({"result": "ok", "tags": {"a": {"medias": [{"index": 1, "streams": [{}]}]}}}),
    ]
    rng = random.Random(13)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(6000):
        data = _mutate(rng, rng.choice(seeds))
        try:
            decode(data, max_depth=8, max_items=500)
        except BencodeError as e:
            assert 0 <= e.offset <= len(data)
            outcomes["error"] += 1
        else:
            outcomes["ok"] += 1
    # both branches were exercised: the fuzzer is not just feeding garbage
    assert outcomes["ok"] > 50 and outcomes["error"] > 1000
