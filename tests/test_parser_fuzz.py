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
    # the transaction layer's first read of every datagram: never more than None or a key
    key = m.transaction_key()
    assert key is None or (isinstance(key, tuple) and len(key) in (2, 4))
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


# --- header names: parse() against the RFC 3261 grammar, written out plainly -----------------

TOKEN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~")
# (canonical name, compact letter or None, list grammar?), the parser's own table of names
KNOWN = {}
for _name, _compact, _ in fastsip.sip._message._HEADER_TABLE:
    KNOWN[_name.lower().encode()] = _name
    if _compact:
        KNOWN[_compact.encode()] = _name
# A value each field that parse() validates accepts; anything else gets "1".
VALID = {"Via": b"SIP/2.0/UDP h;branch=z9hG4bK-1", "From": b"<sip:a@b>;tag=1",
         "To": b"<sip:b@b>", "CSeq": b"1 OPTIONS", "Content-Length": b"0"}
START = b"OPTIONS sip:a@b SIP/2.0\r\n"


def reference_header_name(line: bytes) -> tuple[int, bytes | str]:
    """header-name = token, then *(SP / HTAB) ":" (RFC 3261 7.3.1, 25.1): (end of the name,
    the name) when the line is well formed, else (offset, reason) of the error."""
    if line[:1] == b"\r":
        return 0, "bare CR in header section"   # a CR that does not end the header section
    j = 0
    while j < len(line) and line[j] in TOKEN:
        j += 1
    if j == 0:
        return 0, "invalid header name"
    k = j
    while k < len(line) and line[k] in b" \t":
        k += 1
    if k >= len(line) or line[k] != ord(":"):
        return k, "header line without ':'"
    return j, line[:j]


def _flip_case(name: bytes, flips: list[bool]) -> bytes:
    return bytes(c ^ 0x20 if chr(c).isalpha() and f else c
                 for c, f in zip(name, flips + [False] * len(name)))


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(st.sampled_from(sorted(KNOWN)),
              st.lists(st.sampled_from(sorted(TOKEN)), max_size=20).map(bytes),
              # '-' | 0x20 == CR | 0x20: a comparison folding every octet would take these
              st.sampled_from(sorted(k.replace(b"-", b"\r") for k in KNOWN if b"-" in k))),
    st.lists(st.booleans(), max_size=20),
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1),
                       st.sampled_from([b"\r", b"\x00", b"\xff", b"\xc3", b" ", b"\t", b"-",
                                        b"_", b"@", b"\x0d", b"\x2d", b"\x7f", b"M", b"m"])),
             max_size=2),
    st.sampled_from([b"", b" ", b"\t", b" \t "]),
)
def test_header_names_follow_the_grammar(name: bytes, flips: list[bool],
                                         edits: list[tuple[int, int, bytes]],
                                         before_colon: bytes) -> None:
    """parse() recognises a well-known name by one comparison of several octets at a time and
    checks other names octet by octet: either way it must accept exactly the lines the grammar
    allows, read the same name, and report the same error at the same offset otherwise."""
    raw = bytearray(_flip_case(name, flips))
    for pos, cut, ins in edits:
        pos %= len(raw) + 1
        raw[pos:pos + cut] = ins
    head = bytes(raw) + before_colon + b":"
    if head[:1] in (b" ", b"\t"):
        head = b"X" + head          # a leading SP/HT is a continuation line: tested elsewhere
    where, expected = reference_header_name(head)
    canonical = KNOWN.get(expected.lower()) if isinstance(expected, bytes) else None
    value = VALID.get(canonical or "", b"1")
    data = START + head + b" " + value + b"\r\n\r\n"
    if isinstance(expected, str):
        with pytest.raises(ParseError) as err:
            parse(data)
        assert (err.value.reason, err.value.offset) == (expected, len(START) + where)
        return
    m = parse(data)
    name = expected.decode()
    assert m.headers.items() == [(name, value.decode())]
    if canonical is not None:
        assert m.headers.getlines(canonical) == [value.decode()]
    assert fastsip.canonical_name(name) == (canonical or name)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.text("abXY-", min_size=1, max_size=24),
                          st.binary(max_size=40).map(
                              lambda v: v.replace(b"\n", b"").replace(b"\r", b"").strip())),
                min_size=1, max_size=12),
       st.booleans())
def test_header_lines_split_where_the_grammar_says(lines: list[tuple[str, bytes]],
                                                   bare_lf: bool) -> None:
    """Lines of every length around the 16-octet steps of the line scanner, values with ':'
    and non-ASCII octets in them: each header line is read whole, its name up to the first
    ':' and its value after it, decoded as UTF-8 with surrogate escapes."""
    eol = b"\n" if bare_lf else b"\r\n"
    head = b"".join(f"X-{name}".encode() + b": " + value + eol for name, value in lines)
    m = parse(b"OPTIONS sip:a@b SIP/2.0" + eol + head + eol)
    assert m.headers.items() == [(f"X-{name}", value.decode("utf-8", "surrogateescape"))
                                 for name, value in lines]
    # and without the empty line the header section does not end
    with pytest.raises(ParseError, match="not terminated"):
        parse(b"OPTIONS sip:a@b SIP/2.0" + eol + head.rstrip(b"\r\n"))


def test_text_is_decoded_whatever_the_position_of_a_non_ascii_octet() -> None:
    for n in range(1, 20):
        for pos in range(n):
            for odd in (b"\xc3\xa9", b"\xff"):
                call_id = b"a" * pos + odd + b"b" * (n - pos)
                m = parse(b"OPTIONS sip:a@b SIP/2.0\r\nCall-ID: " + call_id + b"\r\n\r\n")
                assert m.call_id == call_id.decode("utf-8", "surrogateescape")


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
