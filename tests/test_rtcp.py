"""RTCP: aiortc's vectors, round trips of every packet type, reports from RtpStats, A.7, fuzz."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsip.rtp import (
    App,
    Bye,
    Feedback,
    ReceiverReport,
    ReceptionReport,
    RtcpError,
    RtpError,
    RtpPacket,
    RtpStats,
    SdesChunk,
    SenderReport,
    SourceDescription,
    build_compound,
    ntp_timestamp,
    parse_rtcp,
    receiver_report,
    report_block,
    rtcp_interval,
)
from fastsip.rtp.rtcp import SDES_CNAME, UnknownRtcp

DATA = Path(__file__).parent / "data" / "rtp" / "aiortc"


def load(name: str) -> bytes:
    return (DATA / name).read_bytes()


def test_sr_vector():
    data = load("rtcp_sr.bin")
    [sr] = parse_rtcp(data)
    assert isinstance(sr, SenderReport)
    assert (sr.ssrc, sr.ntp_timestamp, sr.rtp_timestamp, sr.packet_count, sr.octet_count) == (
        1831097322, 16016567581311369308, 1722342718, 269, 13557)
    assert sr.reports == [ReceptionReport(2398654957, 0, 0, 246, 127, 0, 0)]
    assert bytes(sr) == data


def test_rr_vector():
    data = load("rtcp_rr.bin")
    [rr] = parse_rtcp(data)
    assert isinstance(rr, ReceiverReport) and rr.ssrc == 817267719
    assert rr.reports == [ReceptionReport(1200895919, 0, 0, 630, 1906, 0, 0)]
    assert bytes(rr) == data


def test_sdes_vector():
    data = load("rtcp_sdes.bin")
    [sdes] = parse_rtcp(data)
    assert sdes.chunks == [SdesChunk(1831097322, [(1, b"{63f459ea-41fe-4474-9d33-9707c9ee79d1}")])]
    assert sdes.chunks[0].cname == b"{63f459ea-41fe-4474-9d33-9707c9ee79d1}"
    assert bytes(sdes) == data


def test_bye_vectors():
    assert parse_rtcp(load("rtcp_bye.bin")) == [Bye([2924645187])]
    assert parse_rtcp(load("rtcp_bye_no_sources.bin")) == [Bye([])]
    assert parse_rtcp(load("rtcp_bye_padding.bin")) == [Bye([])]
    assert bytes(Bye([2924645187])) == load("rtcp_bye.bin")


def test_feedback_vectors():
    [pli] = parse_rtcp(load("rtcp_psfb_pli.bin"))
    assert pli == Feedback(206, 1, 1414554213, 587284409, b"")
    [nack] = parse_rtcp(load("rtcp_rtpfb.bin"))
    assert (nack.fmt, nack.ssrc, nack.media_ssrc) == (1, 2336520123, 4145934052)
    assert nack.lost == [12, 32, 39, 54, 76, 110, 123, 142, 183, 187, 223, 236, 271, 292]
    assert bytes(nack) == load("rtcp_rtpfb.bin")
    assert Feedback.nack(1, 2, nack.lost).lost == nack.lost


@pytest.mark.parametrize("name,reason", [
    ("rtcp_bye_invalid.bin", "bye length is invalid"),
    ("rtcp_psfb_invalid.bin", "payload-specific feedback length is invalid"),
    ("rtcp_rr_invalid.bin", "receiver report length is invalid"),
    ("rtcp_rtpfb_invalid.bin", "feedback length is invalid"),
    ("rtcp_sdes_item_truncated.bin", "SDES item is truncated"),
    ("rtcp_sdes_source_truncated.bin", "SDES source is truncated"),
    ("rtcp_sr_invalid.bin", "sender report length is invalid"),
])
def test_invalid_vectors(name, reason):
    with pytest.raises(RtcpError, match=reason):
        parse_rtcp(load(name))


def test_rtcp_error_is_an_rtp_value_error():
    with pytest.raises(RtpError):
        parse_rtcp(b"\x80")
    with pytest.raises(ValueError, match="version"):
        parse_rtcp(b"\x00\xc8\x00\x00")
    with pytest.raises(ValueError, match="length"):
        parse_rtcp(b"\x80\xc8\x00\x09")


def test_compound_round_trip_of_every_type():
    packets = [
        SenderReport(1, ntp_timestamp(1_700_000_000.25), 160, 10, 1600,
                     [ReceptionReport(2, 12, -3, 70000, 44, 5, 6)]),
        SourceDescription([SdesChunk(1, [(SDES_CNAME, b"alice@example.com"), (6, b"fastsip")]),
                           SdesChunk(3, [(SDES_CNAME, b"abc")])]),
        Bye([1, 3], b"call ended"),
        App(5, 1, b"TEST", b"12345678"),
        Feedback(206, 1, 1, 2),
        UnknownRtcp(207, 0, b"\x00\x00\x00\x01"),
    ]
    data = build_compound(packets)
    back = parse_rtcp(data)
    assert back == packets
    assert build_compound(back) == data
    assert back[0].reports[0].cumulative_lost == -3


def test_cumulative_lost_is_clamped_to_24_bits():
    block = ReceptionReport(1, cumulative_lost=1 << 30)
    assert ReceptionReport.parse(bytes(block)).cumulative_lost == 0x7FFFFF


def test_ntp_timestamp():
    assert ntp_timestamp(0.0) == 2208988800 << 32
    assert ntp_timestamp(0.5) & 0xFFFFFFFF == 1 << 31


def test_receiver_report_from_stats():
    stats = RtpStats(8000, min_sequential=1)
    for i in range(20):
        if i not in (3, 4):
            stats.update(RtpPacket(sequence_number=65530 + i & 0xFFFF, timestamp=160 * i,
                                   ssrc=0xABCD), 0.02 * i + (0.005 if i % 2 else 0))
    jitter = stats.jitter
    rr = receiver_report(0x1111, [stats, RtpStats(8000)])
    assert len(rr.reports) == 1               # a source with nothing received is left out
    block = rr.reports[0]
    assert block.ssrc == 0xABCD
    assert block.cumulative_lost == 2
    assert block.fraction_lost == 2 * 256 // 20
    assert block.highest_sequence == 65536 + (65530 + 19 - 65536)
    assert block.jitter == jitter > 0
    assert parse_rtcp(bytes(rr)) == [rr]
    # the interval closed: the next block reports no new loss
    assert report_block(stats).fraction_lost == 0


def test_report_block_lsr_dlsr():
    stats = RtpStats(8000)
    stats.update(RtpPacket(sequence_number=1), 0.0)
    stats.update(RtpPacket(sequence_number=2), 0.02)
    ntp = 0x1234_5678_9ABC_DEF0
    block = report_block(stats, last_sr_ntp=ntp, last_sr_arrival=10.0, now=10.5)
    assert block.lsr == 0x5678_9ABC
    assert block.dlsr == 32768


def test_rtcp_interval_a7():
    # a two-party call at 64 kb/s: rtcp_bw 5 % = 400 octets/s, so the 5 s minimum applies
    mid = rtcp_interval(2, 1, 400.0, False, 100.0, False, rng=lambda: 0.5)
    assert mid == pytest.approx(5.0 / (2.71828 - 1.5))
    assert rtcp_interval(2, 1, 400.0, False, 100.0, True, rng=lambda: 0.5) == pytest.approx(mid / 2)
    # a large session: the interval grows with members
    big = rtcp_interval(1000, 10, 400.0, False, 100.0, False, rng=lambda: 0.5)
    assert big == pytest.approx(100.0 * 990 / (400.0 * 0.75) / (2.71828 - 1.5))  # receivers: 75 %
    # senders share 25 % of the bandwidth when they are few
    snd = rtcp_interval(1000, 10, 400.0, True, 100.0, False, rng=lambda: 0.5)
    assert snd == pytest.approx(100.0 * 10 / 100.0 / (2.71828 - 1.5))
    rng = random.Random(1).random
    values = [rtcp_interval(2, 1, 400.0, False, 100.0, False, rng=rng) for _ in range(1000)]
    assert min(values) >= mid / 2 * 0.999 and max(values) <= mid * 1.5 * 1.001


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_rtcp_parser(data):
    try:
        packets = parse_rtcp(data)
    except RtcpError:
        return
    build_compound(packets)   # whatever parsed must serialize


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=4, max_size=120), st.integers(0, 31), st.sampled_from([200, 201, 202, 203, 204, 205, 206]))
def test_fuzz_rtcp_well_framed(body, count, pt):
    words = (len(body) // 4)
    data = bytes([0x80 | count, pt]) + (words - 1).to_bytes(2, "big") + body[4:4 * words]
    try:
        parse_rtcp(data)
    except RtcpError:
        pass
