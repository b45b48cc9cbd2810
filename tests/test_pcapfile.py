"""The capture reader used by the conformance tests (tests/pcapfile.py), checked against tshark.

tshark's decode was recorded once (tests/data/pcap/regen.py) and committed, so these tests need
neither tshark nor anything outside the repository.
"""

from __future__ import annotations

import csv
import hashlib
import re
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pcapfile import (
    LINKTYPE_NONE,
    Packet,
    PcapFormatError,
    read_frames,
    read_packets,
    tcp_streams,
)

DATA = Path(__file__).parent / "data" / "pcap"
FRAMES = DATA / "tshark-frames"
SIP_FIELDS = DATA / "tshark-sip-fields"


def capture_path(name: str) -> Path:
    """The capture a reference file is named after (synthetic ones live in synthetic/)."""
    if name.startswith("synthetic-"):
        return DATA / "synthetic" / name.removeprefix("synthetic-")
    return DATA / name


def read_tsv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def as_row(pkt: Packet) -> list[str]:
    """A packet in the shape of a tshark-frames row."""
    return [
        str(pkt.frame_number), pkt.proto, pkt.src, str(pkt.sport), pkt.dst, str(pkt.dport),
        "" if pkt.seq is None else str(pkt.seq), str(len(pkt.payload)),
        hashlib.sha256(pkt.payload).hexdigest()[:16],
    ]


FRAME_REFS = sorted(p.name.removesuffix(".tsv") for p in FRAMES.glob("*.tsv")
                    if p.name != "frame-counts.tsv")
SIP_REFS = sorted(p.name.removesuffix(".sip-fields.tsv") for p in SIP_FIELDS.glob("*.tsv"))


def test_reference_data_is_present() -> None:
    # every copied capture has tshark's view of it, and the SIP-field decodes came with them
    assert len(SIP_REFS) == 25
    assert set(SIP_REFS) <= set(FRAME_REFS)
    assert sum(name.startswith("synthetic-") for name in FRAME_REFS) == 7


@pytest.mark.parametrize("name", FRAME_REFS)
def test_transport_packets_match_tshark(name: str) -> None:
    """Every UDP datagram and TCP segment, at the frame tshark shows it in, with the same
    (inner-most) addresses, ports, TCP sequence number and payload bytes."""
    with (FRAMES / f"{name}.tsv").open(encoding="utf-8") as f:
        expected = [line.rstrip("\n").split("\t") for line in f][1:]
    got = [as_row(p) for p in read_packets(capture_path(name))]
    assert got == expected


@pytest.mark.parametrize("row", read_tsv(FRAMES / "frame-counts.tsv"), ids=lambda r: r["capture"])
def test_frame_numbering_matches_tshark(row: dict[str, str]) -> None:
    frames = list(read_frames(capture_path(row["capture"])))
    assert [f.number for f in frames] == list(range(1, int(row["frames"]) + 1))


# --- SIP: the frames tshark decodes SIP in -------------------------------------------------

SIP_START = re.compile(rb"^(?:[A-Z]+ [^ \r\n]+ SIP/2\.0\r?\n|SIP/2\.0 \d{3} )")
CONTENT_LENGTH = re.compile(rb"\r\n(?:content-length|l)[ \t]*:[ \t]*(\d+)", re.IGNORECASE)


def sip_message_ends(buf: bytes) -> list[int]:
    """End offsets of the SIP messages in a stream, framed by Content-Length (RFC 3261 §18.3);
    a deliberately small framer so this test does not depend on fastsip itself."""
    ends: list[int] = []
    pos = 0
    while True:
        while buf.startswith(b"\r\n", pos):  # keep-alive CRLFs between messages
            pos += 2
        head_end = buf.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return ends
        m = CONTENT_LENGTH.search(buf, pos - 2 if pos >= 2 else pos, head_end + 2)
        end = head_end + 4 + (int(m.group(1)) if m else 0)
        if end > len(buf):
            return ends
        ends.append(end)
        pos = end


def sip_frames_from_reader(path: Path) -> tuple[set[int], set[int]]:
    """(frames with a SIP-looking UDP payload, frames where a SIP message over TCP completes)."""
    packets = list(read_packets(path))
    udp = {p.frame_number for p in packets if p.proto == "udp" and SIP_START.match(p.payload)}
    tcp: set[int] = set()
    for stream in tcp_streams(packets):
        if SIP_START.match(bytes(stream.data[:200])):
            tcp |= {stream.frame_at(end - 1) for end in sip_message_ends(bytes(stream.data))}
    return udp, tcp


@pytest.mark.parametrize("name", SIP_REFS)
def test_sip_frames_match_tshark_sip_fields(name: str) -> None:
    """Each frame tshark decoded SIP in carries a UDP datagram, or completes a SIP message in a
    reassembled TCP stream; and each well-formed SIP start line we find is one tshark decoded."""
    rows = read_tsv(SIP_FIELDS / f"{name}.sip-fields.tsv")
    assert rows, name
    want_udp = {int(r["frame.number"]) for r in rows if ":udp:" in r["frame.protocols"]}
    want_tcp = {int(r["frame.number"]) for r in rows if ":tcp:" in r["frame.protocols"]}
    assert want_udp | want_tcp == {int(r["frame.number"]) for r in rows}

    path = capture_path(name)
    udp_frames = {p.frame_number for p in read_packets(path) if p.proto == "udp"}
    assert want_udp <= udp_frames
    found_udp, found_tcp = sip_frames_from_reader(path)
    assert found_udp <= want_udp  # no SIP-looking datagram tshark did not see as SIP
    assert found_tcp == want_tcp


def test_tshark_sees_sip_over_tcp_somewhere() -> None:
    # the TCP half of the test above is not vacuous
    tcp_captures = {name for name in SIP_REFS
                    if any(":tcp:" in r["frame.protocols"]
                           for r in read_tsv(SIP_FIELDS / f"{name}.sip-fields.tsv"))}
    assert {"sip-over-tcp.pcap", "ipip.pcap"} <= tcp_captures


# --- The synthetic captures, in detail ------------------------------------------------------

SYNTH = DATA / "synthetic"


def test_tcp_stream_reordering_and_retransmission() -> None:
    """be-nsec-vlan.pcap: INVITE a (frames 4, 7), OPTIONS b (7, 5 arrived early), BYE c (8),
    OPTIONS d (9, overlapping c's tail).  Retransmitted frame 6 adds nothing."""
    packets = list(read_packets(SYNTH / "be-nsec-vlan.pcap"))
    client = next(s for s in tcp_streams(packets) if s.sport == 40000)
    server = next(s for s in tcp_streams(packets) if s.sport == 5060)
    assert not server.data and not client.pending

    data = bytes(client.data)
    ends = sip_message_ends(data)
    assert ends[-1] == len(data)
    methods = [data[start:].split(b" ", 1)[0] for start in [0, *ends[:-1]]]
    assert methods == [b"INVITE", b"OPTIONS", b"BYE", b"OPTIONS"]
    assert [client.frame_at(e - 1) for e in ends] == [7, 7, 8, 9]
    assert len(client.frames) == len(data)
    assert client.frames[:200] == [4] * 200  # delivered in order by frame 4
    assert client.frames[200] == 7


def test_tcp_stream_holds_bytes_past_a_hole() -> None:
    seg = [p for p in read_packets(SYNTH / "be-nsec-vlan.pcap") if p.frame_number in (1, 4, 5)]
    (stream,) = tcp_streams(seg)
    assert len(stream.data) == 200 and set(stream.frames) == {4}
    assert len(stream.pending) == 1  # frame 5's bytes wait for the missing segment


def test_ipv4_fragments_reported_at_the_completing_frame() -> None:
    packets = {p.frame_number: p for p in read_packets(SYNTH / "be-nsec-vlan.pcap")}
    assert 11 not in packets and 12 not in packets  # fragments 2 and 3 came first
    invite = packets[14]
    assert invite.payload.startswith(b"INVITE ") and len(invite.payload) == 1696
    assert invite.payload.endswith(b"a=sendrecv\r\n")
    assert packets[13].payload.startswith(b"OPTIONS ")  # the datagram between the fragments
    assert 18 not in packets  # ICMP quoting a UDP header is not a UDP datagram


def test_tunnels_vlans_snap_pppoe() -> None:
    packets = {p.frame_number: p for p in read_packets(SYNTH / "be-nsec-vlan.pcap")}
    assert packets[10].payload.startswith(b"MESSAGE ")  # IPv4 options
    assert (packets[15].src, packets[15].payload[:6]) == ("192.0.2.1", b"NOTIFY")  # IPIP: inner
    assert packets[16].payload.startswith(b"INFO ")  # QinQ
    assert (packets[17].src, packets[17].payload[:6]) == ("2001:db8::1", b"UPDATE")  # 6in4
    assert packets[19].payload.startswith(b"PRACK ")  # LLC/SNAP
    assert packets[20].payload.startswith(b"SUBSCRIBE ")  # PPPoE, IPv6


def test_timestamps_and_byte_orders() -> None:
    # be-nsec-vlan.pcap: big-endian, nanosecond; frame i at 1.7e9 + (i-1) s + ((i-1)*1000+7) us
    frames = list(read_frames(SYNTH / "be-nsec-vlan.pcap"))
    assert frames[0].linktype == 1
    assert frames[2].timestamp == pytest.approx(1_700_000_002.002007, abs=1e-6)
    # modified (Kuznetsov) pcap: 24-byte record headers
    assert [f.linktype for f in read_frames(SYNTH / "modified.pcap")] == [1, 1, 1]
    assert [f.linktype for f in read_frames(SYNTH / "raw12-be.pcap")] == [12, 12, 12]
    assert read_frames(SYNTH / "raw14-nsec.pcap").__next__().timestamp == pytest.approx(
        1_700_000_000.000007, abs=1e-9
    )


def test_pcapng_sections_interfaces_and_blocks() -> None:
    frames = list(read_frames(SYNTH / "multi-section.pcapng"))
    assert [f.linktype for f in frames] == [101, 1, 1, LINKTYPE_NONE, 276, 1, 113]
    assert frames[0].timestamp == 1_700_000_000  # if_tsresol 10^-9
    assert frames[4].timestamp == 1_700_000_003  # if_tsresol 2^-20
    assert frames[6].timestamp == 1_700_000_005  # big-endian second section, default 10^-6
    packets = {p.frame_number: p for p in read_packets(SYNTH / "multi-section.pcapng")}
    assert sorted(packets) == [1, 3, 5, 6, 7]
    assert packets[6].payload.startswith(b"INVITE ")  # IPv6 fragments, reassembled out of order
    assert packets[7].src == "2001:db8::1"  # IPv6-in-IPv6: the inner header


def test_real_ipv6_fragments_and_ipip() -> None:
    packets = {p.frame_number: p for p in read_packets(DATA / "ipv6frag.pcap")}
    invite = packets[2].payload  # reassembled from frames 1 and 2
    assert invite.startswith(b"INVITE ")
    (length,) = CONTENT_LENGTH.findall(invite)
    assert len(invite) == invite.index(b"\r\n\r\n") + 4 + int(length) == 1691
    ipip = list(read_packets(DATA / "ipip.pcap"))
    assert {p.proto for p in ipip} == {"tcp"}


def test_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"GIF89a...")
    with pytest.raises(PcapFormatError):
        list(read_frames(bad))
    # a truncated capture yields its whole records and stops
    whole = (DATA / "sip-register.pcap").read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(whole[:-10])
    assert [p.frame_number for p in read_packets(cut)] == [1]
    # a truncated pcapng stops at the last whole block
    ng = (SYNTH / "multi-section.pcapng").read_bytes()
    cut.write_bytes(ng[:-3])
    assert len(list(read_frames(cut))) == 6
    # a frame shorter than its headers is skipped, not an exception
    short = tmp_path / "short.pcap"
    short.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101)
                      + struct.pack("<IIII", 0, 0, 10, 10) + b"\x45" + b"\0" * 9)
    assert list(read_packets(short)) == []
