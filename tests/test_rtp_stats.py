"""RtpStats: RFC 3550 A.1/A.3/A.8 vectors, and agreement with tshark on real captures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fastsip.rtp import RtpError, RtpPacket, RtpStats, parse_batch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from rtp_pcap import read_streams, read_tsv, read_udp

PCAP = HERE / "data" / "rtp" / "pcap"
TSHARK = HERE / "data" / "rtp" / "tshark"


def pkt(seq: int, ts: int = 0) -> RtpPacket:
    return RtpPacket(payload_type=0, sequence_number=seq & 0xFFFF, timestamp=ts & 0xFFFFFFFF,
                     ssrc=1234)


def test_jitter_vector_from_aiortc():
    # clock 8000, ts = i * 160: arrivals 0/0.03/0.05 s -> RR jitter 0, 5, 4
    s = RtpStats(8000)
    got = []
    for i, t in enumerate((0.0, 0.03, 0.05)):
        s.update(pkt(i, 160 * i), t)
        got.append(s.jitter)
    assert got == [0, 5, 4]
    s = RtpStats(8000)
    for i, t in enumerate((0.0, 0.02, 0.04)):
        s.update(pkt(i, 160 * i), t)
        assert s.jitter == 0


def test_jitter_vector_from_pion():
    # clock 90000, two packets 1 s apart, timestamp delta 60000 -> D = 30000 -> J = 30000/16
    s = RtpStats(90000)
    s.update(pkt(0, 0), 10.0)
    s.update(pkt(1, 60000), 11.0)
    assert s.jitter == 30000 // 16
    assert s.jitter_seconds == pytest.approx(30000 / 16 / 90000)


def test_jitter_ignores_timestamp_wrap():
    s = RtpStats(8000)
    for i in range(10):
        s.update(pkt(i, 0xFFFFFF00 + 160 * i), 0.02 * i)
    assert s.jitter == 0


def test_loss_and_fraction_lost_vector():
    # 20 packets minus seq 1; after the first 9 received: lost 1, fraction 25 (1/10 * 256)
    s = RtpStats(8000, min_sequential=1)
    received = 0
    for i in range(20):
        if i == 1:
            continue
        s.update(pkt(i, 160 * i), 0.02 * i)
        received += 1
        if received == 9:
            assert (s.expected, s.received, s.cumulative_lost) == (10, 9, 1)
            assert s.fraction_lost == 25
            assert s.report() == (25, 1)
    # the next interval had no loss
    assert s.fraction_lost == 0 and s.cumulative_lost == 1


def test_sequence_wrap_extends_to_64_bits():
    s = RtpStats(8000)
    for i in range(10):
        assert s.update(pkt(65530 + i, 160 * i), 0.02 * i) == (i >= 1)
    assert s.max_sequence == 3
    assert s.cycles == 1
    assert s.extended_max_sequence == 65536 + 3
    assert s.last_extended_sequence == 65536 + 3
    assert (s.expected, s.received, s.cumulative_lost) == (10, 10, 0)


def test_probation_needs_min_sequential_packets():
    s = RtpStats(8000, min_sequential=3)
    assert not s.update(pkt(100), 0)
    assert not s.update(pkt(50), 0)      # out of sequence: probation starts over
    assert not s.update(pkt(51), 0)
    assert s.probation == 1
    assert s.update(pkt(52), 0)
    assert s.probation == 0
    assert (s.base_sequence, s.received, s.expected) == (50, 3, 3)


def test_probation_across_wrap():
    s = RtpStats(8000)
    s.update(pkt(65535), 0)
    s.update(pkt(0), 0)
    assert (s.expected, s.received) == (2, 2)


def test_big_jump_is_bad_then_restart_is_accepted():
    s = RtpStats(8000)
    for i in range(5):
        s.update(pkt(i), 0)
    assert not s.update(pkt(30000), 0)       # a single far-off packet is discarded
    assert s.bad == 1 and s.received == 5
    assert s.update(pkt(30001), 0)           # two in a row: the sender restarted
    assert s.received == 1 and s.base_sequence == 30001


def test_duplicates_and_misorder_count_as_received():
    s = RtpStats(8000)
    for seq in (0, 1, 2, 4, 3, 3, 5):
        s.update(pkt(seq), 0)
    assert s.misordered == 2
    assert s.expected == 6 and s.received == 7
    assert s.cumulative_lost == -1            # RFC 3550 §6.4.1: duplicates make loss negative


def test_update_many_matches_per_packet_updates():
    frames = list(read_udp(PCAP / "g711a.pcap"))
    pkts = [RtpPacket.parse(d.payload) for d in frames]
    one = RtpStats(8000)
    for p, d in zip(pkts, frames):
        one.update(p, d.time)
    b = parse_batch([d.payload for d in frames])
    many = RtpStats(8000)
    counted = many.update_many(b.sequence_number, b.timestamp, [d.time for d in frames],
                               ssrc=int(b.ssrc[0]))
    assert counted == len(frames) - 1          # the first packet is in probation
    assert (many.received, many.expected, many.jitter, many.ssrc) == (
        one.received, one.expected, one.jitter, one.ssrc)
    assert many.jitter_seconds == one.jitter_seconds
    with pytest.raises(ValueError):
        many.update_many([1], [1, 2], [0.0])


# --- conformance: header fields against tshark's per-packet decode ------------------------------

HEADER_FILES = sorted(p.name.replace(".rtp-headers.tsv", "") for p in TSHARK.glob("*.rtp-headers.tsv"))


@pytest.mark.parametrize("capture", HEADER_FILES)
def test_header_fields_match_tshark(capture):
    frames = {d.frame: d for d in read_udp(PCAP / capture)}
    rows = read_tsv(TSHARK / f"{capture}.rtp-headers.tsv")
    assert rows
    for row in rows:
        d = frames[int(row["frame.number"])]
        if row["rtp.version"] != "2":
            # tshark shows what it can of non-RTP datagrams on an RTP port (e.g. a 4-byte NAT
            # keepalive of 0xff); they are not RTP, and the parser must say so.
            with pytest.raises(RtpError):
                RtpPacket.parse(d.payload)
            continue
        p = RtpPacket.parse(d.payload)
        assert p.version == int(row["rtp.version"])
        assert (p.padding > 0) == (row["rtp.padding"] in ("1", "True"))
        assert p.extension == (row["rtp.ext"] in ("1", "True"))
        assert len(p.csrc) == int(row["rtp.cc"])
        assert p.marker == (row["rtp.marker"] in ("1", "True"))
        assert p.payload_type == int(row["rtp.p_type"])
        assert p.sequence_number == int(row["rtp.seq"])
        assert p.timestamp == int(row["rtp.timestamp"])
        assert p.ssrc == int(row["rtp.ssrc"], 16)
        assert bytes(p) == d.payload
        if row.get("rtpevent.event_id"):
            from fastsip.rtp import TelephoneEvent
            ev = TelephoneEvent.parse(p.payload)
            assert ev.event == int(row["rtpevent.event_id"])
            assert ev.end == (row["rtpevent.end_of_event"] in ("1", "True"))
            assert ev.volume == int(row["rtpevent.volume"])
            assert ev.duration == int(row["rtpevent.duration"])


# --- conformance: loss and jitter against tshark's stream analysis -------------------------------

STREAM_FILES = sorted(p.name.replace(".rtp-streams.txt", "") for p in TSHARK.glob("*.rtp-streams.txt"))


def _analyse(capture: str, row: dict) -> tuple[RtpStats, list[float], int, set[int]]:
    stats = RtpStats(8000)
    jitters: list[float] = []
    packets, pts, prev_pt, first = 0, set(), None, True
    for d in read_udp(PCAP / capture):
        if (d.src, d.sport, d.dst, d.dport) != (row["src"], row["sport"], row["dst"], row["dport"]):
            continue
        try:
            p = RtpPacket.parse(d.payload)
        except RtpError:
            continue
        if p.ssrc != row["ssrc"]:
            continue
        packets += 1
        pts.add(p.payload_type)
        stats.update(p, d.time)
        # tshark's max/mean leave out the first packet, marker packets and payload type changes
        # (the jitter estimate itself runs over every packet, as RFC 3550 A.8 has it).
        if not (first or p.marker or (prev_pt is not None and p.payload_type != prev_pt)):
            jitters.append(stats.jitter_seconds * 1000)
        first, prev_pt = False, p.payload_type
    return stats, jitters, packets, pts


@pytest.mark.parametrize("capture", STREAM_FILES)
def test_loss_and_jitter_match_tshark_stream_analysis(capture):
    rows = read_streams(TSHARK / f"{capture}.rtp-streams.txt")
    assert rows
    compared = 0
    for row in rows:
        stats, jitters, packets, pts = _analyse(capture, row)
        assert packets == row["packets"] == stats.received
        assert stats.cumulative_lost == row["lost"]
        if pts <= {0, 8}:
            # G.711 streams: tshark prints jitter in ms to 3 decimals
            assert max(jitters) == pytest.approx(row["max_jitter"], abs=0.0011)
            assert sum(jitters) / len(jitters) == pytest.approx(row["mean_jitter"], abs=0.0011)
            compared += 1
        # Streams with RFC 4733 events are left out of the jitter comparison: tshark either
        # does not know the event clock (dtmf_2833: "-1") or flags the event packets, whose
        # timestamp stands still for the whole event by design, and drops them from its figures.
    assert compared or capture.startswith(("dtmf", "SIP_DTMF2"))
