"""Untrusted input: no byte string crashes, hangs or slows the parser down beyond linear time.

Everything the parser (and each typed view) may do with hostile bytes is one of: return a
message, or raise ParseError (a ValueError) with an offset inside the input.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsip
from fastsip import ParseError, parse

SEEDS = sorted((Path(__file__).parent / "data" / "rfc4475").glob("*.dat"))
SEED_BYTES = [p.read_bytes() for p in SEEDS]

ALPHABET = b"\r\n \t:;,<>\"\\@=/%[]?&*0123456789.SIPVvfFtTlLIiaA-zZ\x00\xff"


def exercise(data: bytes) -> None:
    """Parse and read every view; only ParseError may come out."""
    try:
        m = parse(data)
    except ParseError as e:
        assert -1 <= e.offset <= max(len(data), 65535)
        assert e.status in (400, 414, 505, 513)
        return
    for attr in ("call_id", "cseq", "max_forwards", "content_length", "start_line"):
        _ = getattr(m, attr)
    for view in ("via", "from_", "to", "contact", "route", "record_route"):
        try:
            v = getattr(m, view)
        except ParseError:
            continue
        for x in (v if isinstance(v, list) else [v] if v is not None else []):
            try:  # lower Vias are parsed when first read
                _ = (str(x), x.params, getattr(x, "uri", None), getattr(x, "branch", None))
            except ParseError:
                pass
    if isinstance(m, fastsip.Request):
        try:
            _ = m.uri
        except ParseError:
            pass
    m.headers.items()
    for name, _ in m.headers:
        m.headers.getall(name)
    assert bytes(parse(bytes(m))) == bytes(m)
    try:
        fastsip.message_length(data)
    except ParseError:
        pass


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    exercise(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(list(ALPHABET)), max_size=400).map(bytes))
def test_sip_alphabet(data: bytes) -> None:
    exercise(b"INVITE sip:a@b SIP/2.0\r\n" + data)


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEED_BYTES),
    st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 8), st.binary(max_size=8)), max_size=6),
)
def test_mutated_torture_messages(seed: bytes, edits: list[tuple[int, int, bytes]]) -> None:
    data = bytearray(seed)
    for pos, cut, ins in edits:
        pos %= len(data) + 1
        data[pos:pos + cut] = ins
    exercise(bytes(data))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SEED_BYTES), st.integers(1, 4000))
def test_stream_framing_of_truncated_messages(seed: bytes, cut: int) -> None:
    try:
        n = fastsip.message_length(seed[:cut])
    except ParseError:
        return
    assert n <= cut


def _cost(make: object, n: int) -> float:
    data = make(n)  # type: ignore[operator]
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        try:
            m = parse(data, fastsip.Limits(max_message_size=1 << 26, max_headers=30000,
                                           max_line_length=1 << 26))
            _ = [v.branch for v in m.via]
        except ParseError:
            pass
        best = min(best, time.perf_counter() - t)
    return best


PATHOLOGICAL = {
    "many headers": lambda n: b"OPTIONS sip:a@b SIP/2.0\r\n" + b"X: y\r\n" * n + b"\r\n",
    "folded lines": lambda n: b"OPTIONS sip:a@b SIP/2.0\r\nX: y\r\n" + b" z\r\n" * n + b"\r\n",
    "long quoted": lambda n: b'OPTIONS sip:a@b SIP/2.0\r\nFrom: "' + b"\\\"" * n + b"\r\n\r\n",
    "many vias": lambda n: b"OPTIONS sip:a@b SIP/2.0\r\nVia: " + b"SIP/2.0/UDP h;branch=z9hG4bKx," * n
    + b"SIP/2.0/UDP h\r\n\r\n",
    "many params": lambda n: b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h" + b";a=b" * n + b"\r\n\r\n",
    "no line end": lambda n: b"OPTIONS sip:a@b SIP/2.0\r\nX: " + b"a" * (8 * n),
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_parse_time_is_linear(name: str) -> None:
    """Eight times the input may not cost much more than eight times the time (a quadratic
    path would cost 64x).  A ratio, so a slow machine does not make it flaky."""
    make = PATHOLOGICAL[name]
    small, large = _cost(make, 2000), _cost(make, 16000)
    assert large < 24 * max(small, 2e-5), f"{name}: {small * 1e6:.0f} us -> {large * 1e6:.0f} us"
