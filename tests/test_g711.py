"""G.711 against a reference written here from the ITU algorithm (segment / quantization step
formulas), over every 16-bit input and every code; plus RFC 4733 telephone events."""

from __future__ import annotations

import numpy as np
import pytest

from fastsip.rtp import (
    RtpError,
    RtpPacket,
    TelephoneEvent,
    alaw_decode,
    alaw_encode,
    ulaw_decode,
    ulaw_encode,
)


def ref_ulaw_encode(x: int) -> int:
    # 14-bit magnitude (one's complement for negatives, as the ITU G.191 software does), +33 bias,
    # segment = position of the leading one above bit 5, 4-bit step index, all bits inverted.
    mag = (-x - 1 if x < 0 else x) >> 2
    biased = min(mag + 33, 8191)
    seg = biased.bit_length() - 6
    step = (biased >> (seg + 1)) & 0xF
    code = (seg << 4) | step
    return (~code & 0x7F) | (0x80 if x >= 0 else 0)


def ref_ulaw_decode(code: int) -> int:
    inv = ~code & 0xFF
    seg, step = (inv >> 4) & 7, inv & 0xF
    value = 4 * (((2 * step + 33) << seg) - 33)     # midpoint of the quantization interval
    return -value if inv & 0x80 else value


def ref_alaw_encode(x: int) -> int:
    mag = (-x - 1 if x < 0 else x) >> 4            # 12-bit magnitude
    seg = 0 if mag < 16 else mag.bit_length() - 4
    step = mag & 0xF if seg == 0 else (mag >> (seg - 1)) & 0xF
    code = (seg << 4) | step | (0x80 if x >= 0 else 0)
    return code ^ 0x55                               # even bits inverted


def ref_alaw_decode(code: int) -> int:
    c = code ^ 0x55
    seg, step = (c >> 4) & 7, c & 0xF
    value = (2 * step + 1) * 8 if seg == 0 else ((2 * step + 33) * 8) << (seg - 1)
    return value if c & 0x80 else -value


ALL = np.arange(-32768, 32768, dtype=np.int16)
CODES = np.arange(256, dtype=np.uint8)


def test_ulaw_encode_all_16_bit_inputs():
    expected = np.array([ref_ulaw_encode(int(x)) for x in ALL], dtype=np.uint8)
    assert np.array_equal(ulaw_encode(ALL), expected)


def test_alaw_encode_all_16_bit_inputs():
    expected = np.array([ref_alaw_encode(int(x)) for x in ALL], dtype=np.uint8)
    assert np.array_equal(alaw_encode(ALL), expected)


def test_decode_all_codes():
    assert ulaw_decode(CODES).tolist() == [ref_ulaw_decode(c) for c in range(256)]
    assert alaw_decode(CODES).tolist() == [ref_alaw_decode(c) for c in range(256)]


def test_known_points():
    # Silence codes and full scale, as every G.711 implementation knows them.
    assert ulaw_encode(np.array([0], np.int16))[0] == 0xFF
    assert alaw_encode(np.array([0], np.int16))[0] == 0xD5
    assert ulaw_decode(b"\x00\x80")[0] == -32124 and ulaw_decode(b"\x80")[0] == 32124
    assert alaw_decode(b"\xaa\x2a").tolist() == [32256, -32256]


@pytest.mark.parametrize("enc,dec", [(ulaw_encode, ulaw_decode), (alaw_encode, alaw_decode)])
def test_round_trip_is_stable_and_close(enc, dec):
    # Decoding then re-encoding a code gives the code back (except μ-law's two zeros).
    codes = enc(dec(CODES))
    same = codes == CODES
    assert same.sum() >= 255
    err = np.abs(dec(enc(ALL)).astype(np.int32) - ALL.astype(np.int32))
    assert err.max() <= 1024  # half the widest quantization step


def test_accepts_bytes_and_out_and_rejects_wrong_dtype():
    pcm = np.array([100, -100, 2000], dtype=np.int16)
    out = np.empty(3, np.uint8)
    assert ulaw_encode(pcm.tobytes(), out=out) is out
    assert np.array_equal(out, ulaw_encode(pcm))
    with pytest.raises(TypeError):
        ulaw_encode(np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError):
        alaw_decode(b"abc", out=np.empty(2, np.int16))


def test_telephone_event_vector_and_round_trip(tmp_path):
    from pathlib import Path
    data = (Path(__file__).parent / "data" / "rtp" / "aiortc" / "rtp_dtmf.bin").read_bytes()
    pkt = RtpPacket.parse(data)
    ev = TelephoneEvent.parse(pkt.payload)
    assert bytes(ev) == bytes(pkt.payload)
    assert ev == TelephoneEvent(event=1, end=True, volume=10, duration=960)
    assert ev.digit == "1"
    e = TelephoneEvent.from_digit("#", end=True, volume=7, duration=800)
    assert bytes(e) == bytes([11, 0x87, 0x03, 0x20])
    assert TelephoneEvent.parse(bytes(e)) == e and e.digit == "#"
    with pytest.raises(RtpError):
        TelephoneEvent.parse(b"\x01\x02")
    with pytest.raises(ValueError):
        TelephoneEvent.from_digit("x")
