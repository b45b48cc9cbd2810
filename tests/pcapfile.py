"""A small pcap/pcapng reader (stdlib only) that yields the UDP datagrams and TCP segments of a
capture, numbered the way tshark numbers frames, for the conformance tests.

It is a test helper, not part of fastsip: it trusts its input (the captures are committed) only
as far as not crashing on a truncated record, and it knows just the encapsulations our captures
use.  Formats: classic pcap (either byte order, micro- or nanosecond timestamps, the "modified"
variant) and pcapng (SHB/IDB/EPB/SPB and the obsolete PB, per-interface link types, several
sections).  Link types: Null/Loop (0, 108), Ethernet (1, with 802.1Q/802.1ad tags, LLC/SNAP
and PPPoE), raw IP (101, 12, 14, 228, 229), Linux SLL (113) and SLL2 (276).  Network: IPv4
(options, fragment reassembly, IP-in-IP) and IPv6 (extension headers, fragment reassembly,
tunnels).

    for pkt in read_packets("call.pcap"):
        print(pkt.frame_number, pkt.proto, pkt.src, pkt.sport, len(pkt.payload))

A fragmented datagram is reported once, at the frame that completes its reassembly: that is the
frame tshark shows the UDP/SIP layers in.  :func:`tcp_streams` puts each direction of a TCP
connection back in sequence order and says, for every byte, the frame from which it was
contiguously available (the frame tshark reports a reassembled PDU in).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "Frame",
    "Packet",
    "TcpStream",
    "read_frames",
    "read_packets",
    "tcp_streams",
]

# Link-layer header types (https://www.tcpdump.org/linktypes.html).
LINKTYPE_NONE = -1  # a pcapng record that is not a packet (it still takes a frame number)
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW_12 = 12  # DLT_RAW on some BSDs
LINKTYPE_RAW_14 = 14  # DLT_RAW on OpenBSD
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

ETH_IPV4 = 0x0800
ETH_IPV6 = 0x86DD
ETH_VLAN_TAGS = (0x8100, 0x88A8, 0x9100)
ETH_PPPOE_SESSION = 0x8864
PPP_IPV4 = 0x0021
PPP_IPV6 = 0x0057

IPPROTO_HOPOPTS = 0
IPPROTO_IPIP = 4
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_AH = 51
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_MOBILITY = 135
IPV6_EXTENSION_HEADERS = (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS, IPPROTO_MOBILITY)

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04


class Frame(NamedTuple):
    """One captured record: its 1-based number, link type, timestamp (s) and bytes."""

    number: int
    linktype: int
    timestamp: float
    data: bytes


class Packet(NamedTuple):
    """A UDP datagram or TCP segment, at the frame tshark shows its transport layer in."""

    frame_number: int
    proto: str  # "udp" | "tcp"
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes
    timestamp: float = 0.0
    seq: int | None = None  # TCP only: sequence number of the segment
    flags: int = 0  # TCP only: the flag bits (FIN 0x01, SYN 0x02, RST 0x04, ...)


class PcapFormatError(ValueError):
    """The file is neither pcap nor pcapng, or its headers make no sense."""


# --------------------------------------------------------------------------------------------
# Capture files
# --------------------------------------------------------------------------------------------

_PCAP_MAGICS = {
    # magic as read little-endian: (byte order, timestamp divisor, record header size)
    0xA1B2C3D4: ("<", 1e6, 16),
    0xD4C3B2A1: (">", 1e6, 16),
    0xA1B23C4D: ("<", 1e9, 16),
    0x4D3CB2A1: (">", 1e9, 16),
    0xA1B2CD34: ("<", 1e6, 24),  # Kuznetsov's "modified" pcap
    0x34CDB2A1: (">", 1e6, 24),
}
_PCAPNG_SHB = 0x0A0D0D0A
# Blocks that are not packets yet get a frame number from Wireshark (checked with tshark 4.0):
# systemd journal export, and custom blocks (copiable and not).
_PCAPNG_OTHER_RECORDS = (0x00000009, 0x00000BAD, 0x40000BAD)


def read_frames(path: str | Path) -> Iterator[Frame]:
    """Yield every record of a pcap or pcapng file, numbered from 1 as tshark does."""
    data = Path(path).read_bytes()
    if len(data) < 4:
        raise PcapFormatError(f"{path}: too short for a capture file")
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic in _PCAP_MAGICS:
        return _read_pcap(data, *_PCAP_MAGICS[magic])
    if magic == _PCAPNG_SHB:
        return _read_pcapng(data)
    raise PcapFormatError(f"{path}: unknown capture format (magic {magic:#010x})")


def _read_pcap(data: bytes, bo: str, divisor: float, rec_size: int) -> Iterator[Frame]:
    if len(data) < 24:
        raise PcapFormatError("truncated pcap file header")
    (network,) = struct.unpack_from(bo + "I", data, 20)
    linktype = network & 0x03FFFFFF
    # The top bits may say that every frame ends in an FCS of a given length (in 16-bit words).
    fcs_len = ((network >> 28) * 2) if network & 0x04000000 else 0
    offset, number = 24, 0
    while offset + rec_size <= len(data):
        sec, frac, caplen, _origlen = struct.unpack_from(bo + "IIII", data, offset)
        offset += rec_size
        if offset + caplen > len(data):
            break  # a record cut short (a capture still being written): stop before it
        frame = data[offset : offset + caplen]
        offset += caplen
        if fcs_len and len(frame) >= fcs_len:
            frame = frame[:-fcs_len]
        number += 1
        yield Frame(number, linktype, sec + frac / divisor, frame)


@dataclass
class _Interface:
    linktype: int
    snaplen: int
    ts_divisor: float = 1e6
    fcs_len: int = 0


def _read_pcapng(data: bytes) -> Iterator[Frame]:
    offset, number = 0, 0
    bo = "<"
    interfaces: list[_Interface] = []
    while offset + 12 <= len(data):
        (block_type,) = struct.unpack_from(bo + "I", data, offset)
        if block_type == _PCAPNG_SHB:
            # A new section: its own byte order, and its own interface list.
            (bom,) = struct.unpack_from("<I", data, offset + 8)
            bo = "<" if bom == 0x1A2B3C4D else ">"
            if struct.unpack_from(bo + "I", data, offset + 8)[0] != 0x1A2B3C4D:
                raise PcapFormatError(f"bad pcapng byte-order magic at {offset}")
            interfaces = []
        (block_len,) = struct.unpack_from(bo + "I", data, offset + 4)
        if block_len < 12 or offset + block_len > len(data):
            break  # truncated file: stop at the last whole block, as tshark does
        body = data[offset + 8 : offset + block_len - 4]
        offset += block_len

        if block_type == 1:  # Interface Description Block
            linktype, _reserved, snaplen = struct.unpack_from(bo + "HHI", body, 0)
            iface = _Interface(linktype, snaplen)
            for code, value in _pcapng_options(body, 8, bo):
                if code == 9 and value:  # if_tsresol
                    res = value[0]
                    iface.ts_divisor = float(2 ** (res & 0x7F)) if res & 0x80 else 10.0**res
                elif code == 13 and value:  # if_fcslen
                    iface.fcs_len = value[0]
            interfaces.append(iface)
        elif block_type in (6, 2):  # Enhanced Packet Block, obsolete Packet Block
            if block_type == 6:
                iface_id, ts_hi, ts_lo, caplen, _orig = struct.unpack_from(bo + "IIIII", body, 0)
            else:
                iface_id, _drops, ts_hi, ts_lo, caplen, _orig = struct.unpack_from(
                    bo + "HHIIII", body, 0
                )
            frame = body[20 : 20 + caplen]
            iface = interfaces[iface_id]
            if iface.fcs_len and len(frame) >= iface.fcs_len:
                frame = frame[: -iface.fcs_len]
            number += 1
            ts = ((ts_hi << 32) | ts_lo) / iface.ts_divisor
            yield Frame(number, iface.linktype, ts, frame)
        elif block_type == 3:  # Simple Packet Block: interface 0, no timestamp
            (orig_len,) = struct.unpack_from(bo + "I", body, 0)
            iface = interfaces[0]
            caplen = min(orig_len, iface.snaplen or orig_len, len(body) - 4)
            number += 1
            yield Frame(number, iface.linktype, 0.0, body[4 : 4 + caplen])
        elif block_type in _PCAPNG_OTHER_RECORDS:
            # Not a packet, but Wireshark shows it as a frame, so it takes a frame number.
            number += 1
            yield Frame(number, LINKTYPE_NONE, 0.0, b"")
        # Everything else (name resolution, statistics, decryption secrets...) is skipped.


def _pcapng_options(body: bytes, offset: int, bo: str) -> Iterator[tuple[int, bytes]]:
    while offset + 4 <= len(body):
        code, length = struct.unpack_from(bo + "HH", body, offset)
        offset += 4
        if code == 0:  # opt_endofopt
            return
        yield code, body[offset : offset + length]
        offset += (length + 3) & ~3


# --------------------------------------------------------------------------------------------
# Link, network and transport layers
# --------------------------------------------------------------------------------------------


@dataclass
class _Reassembly:
    """Fragments of one IP datagram seen so far: offset -> bytes, and the total once known."""

    pieces: dict[int, bytes] = field(default_factory=dict)
    total: int | None = None
    next_header: int | None = None  # IPv6: the protocol after the fragment header

    def add(self, offset: int, chunk: bytes, last: bool) -> bytes | None:
        self.pieces.setdefault(offset, chunk)
        if last:
            self.total = offset + len(chunk)
        if self.total is None:
            return None
        out = bytearray()
        for off in sorted(self.pieces):
            if off > len(out):
                return None  # a hole
            piece = self.pieces[off]
            out[off : off + len(piece)] = piece
        if len(out) < self.total:
            return None
        return bytes(out[: self.total])


class _Decoder:
    """Turns frames into packets, holding IP fragments across frames."""

    def __init__(self) -> None:
        self.fragments: dict[tuple[object, ...], _Reassembly] = {}

    def frame(self, frame: Frame) -> Iterator[Packet]:
        ip = _link_payload(frame.linktype, frame.data)
        if ip is not None:
            yield from self.ip(frame, ip)

    def ip(self, frame: Frame, data: bytes, depth: int = 0) -> Iterator[Packet]:
        if not data or depth > 4:
            return
        version = data[0] >> 4
        if version == 4:
            yield from self.ipv4(frame, data, depth)
        elif version == 6:
            yield from self.ipv6(frame, data, depth)

    def ipv4(self, frame: Frame, data: bytes, depth: int) -> Iterator[Packet]:
        if len(data) < 20:
            return
        ihl = (data[0] & 0x0F) * 4
        total_len, ident, frag = struct.unpack_from("!HHH", data, 2)
        proto = data[9]
        src = str(ipaddress.IPv4Address(data[12:16]))
        dst = str(ipaddress.IPv4Address(data[16:20]))
        if ihl < 20:
            return
        # total_len trims link-layer padding; 0 means "as captured" (TSO on the capturing host).
        end = total_len if ihl <= total_len <= len(data) else len(data)
        payload = data[ihl:end]
        more, offset = bool(frag & 0x2000), (frag & 0x1FFF) * 8
        if more or offset:
            key = (4, src, dst, ident, proto)
            entry = self.fragments.setdefault(key, _Reassembly())
            whole = entry.add(offset, payload, not more)
            if whole is None:
                return
            del self.fragments[key]
            payload = whole
        yield from self.transport(frame, proto, src, dst, payload, depth)

    def ipv6(self, frame: Frame, data: bytes, depth: int) -> Iterator[Packet]:
        if len(data) < 40:
            return
        (payload_len,) = struct.unpack_from("!H", data, 4)
        nh = data[6]
        src = str(ipaddress.IPv6Address(data[8:24]))
        dst = str(ipaddress.IPv6Address(data[24:40]))
        end = 40 + payload_len if payload_len and 40 + payload_len <= len(data) else len(data)
        payload = data[40:end]
        while True:
            if nh in IPV6_EXTENSION_HEADERS:
                if len(payload) < 8:
                    return
                nh, hlen = payload[0], (payload[1] + 1) * 8
                payload = payload[hlen:]
            elif nh == IPPROTO_AH:
                if len(payload) < 8:
                    return
                nh, hlen = payload[0], (payload[1] + 2) * 4
                payload = payload[hlen:]
            elif nh == IPPROTO_FRAGMENT:
                if len(payload) < 8:
                    return
                inner_nh = payload[0]
                off_flags, ident = struct.unpack_from("!HI", payload, 2)
                offset, more = off_flags & 0xFFF8, bool(off_flags & 1)
                chunk = payload[8:]
                if not more and offset == 0:  # an "atomic" fragment
                    nh, payload = inner_nh, chunk
                    continue
                key = (6, src, dst, ident)
                entry = self.fragments.setdefault(key, _Reassembly())
                if offset == 0:
                    entry.next_header = inner_nh
                whole = entry.add(offset, chunk, not more)
                if whole is None:
                    return
                del self.fragments[key]
                nh = entry.next_header if entry.next_header is not None else inner_nh
                payload = whole
            else:
                break
        yield from self.transport(frame, nh, src, dst, payload, depth)

    def transport(
        self, frame: Frame, proto: int, src: str, dst: str, data: bytes, depth: int
    ) -> Iterator[Packet]:
        if proto == IPPROTO_UDP:
            if len(data) < 8:
                return
            sport, dport, length = struct.unpack_from("!HHH", data, 0)
            end = length if 8 <= length <= len(data) else len(data)
            yield Packet(
                frame.number, "udp", src, sport, dst, dport, bytes(data[8:end]), frame.timestamp
            )
        elif proto == IPPROTO_TCP:
            if len(data) < 20:
                return
            sport, dport, seq = struct.unpack_from("!HHI", data, 0)
            doff = (data[12] >> 4) * 4
            flags = data[13] | ((data[12] & 0x01) << 8)
            if doff < 20:
                return
            yield Packet(
                frame.number, "tcp", src, sport, dst, dport, bytes(data[doff:]),
                frame.timestamp, seq, flags,
            )
        elif proto in (IPPROTO_IPIP, IPPROTO_IPV6):
            yield from self.ip(frame, data, depth + 1)


def _link_payload(linktype: int, data: bytes) -> bytes | None:
    """The network-layer bytes of a frame, or None if it carries no IP."""
    if linktype == LINKTYPE_ETHERNET:
        if len(data) < 14:
            return None
        (ethertype,) = struct.unpack_from("!H", data, 12)
        offset = 14
        while ethertype in ETH_VLAN_TAGS and len(data) >= offset + 4:
            (ethertype,) = struct.unpack_from("!H", data, offset + 2)
            offset += 4
        if ethertype <= 1500:  # 802.3 length field: only LLC/SNAP carries IP
            if data[offset : offset + 3] != b"\xaa\xaa\x03" or len(data) < offset + 8:
                return None
            (ethertype,) = struct.unpack_from("!H", data, offset + 6)
            offset += 8
        if ethertype == ETH_PPPOE_SESSION:  # PPPoE header (6 bytes), then the PPP protocol
            if len(data) < offset + 8:
                return None
            (ppp,) = struct.unpack_from("!H", data, offset + 6)
            ethertype = {PPP_IPV4: ETH_IPV4, PPP_IPV6: ETH_IPV6}.get(ppp, 0)
            offset += 8
        return data[offset:] if ethertype in (ETH_IPV4, ETH_IPV6) else None
    if linktype == LINKTYPE_LINUX_SLL:
        if len(data) < 16:
            return None
        (proto,) = struct.unpack_from("!H", data, 14)
        return data[16:] if proto in (ETH_IPV4, ETH_IPV6) else None
    if linktype == LINKTYPE_LINUX_SLL2:
        if len(data) < 20:
            return None
        (proto,) = struct.unpack_from("!H", data, 0)
        return data[20:] if proto in (ETH_IPV4, ETH_IPV6) else None
    if linktype in (LINKTYPE_RAW, LINKTYPE_RAW_12, LINKTYPE_RAW_14, LINKTYPE_IPV4, LINKTYPE_IPV6):
        return data
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        # A 4-byte address family, in the capturing host's byte order (NULL) or network order
        # (LOOP); its values differ between OSes (AF_INET6 is 10, 24, 28 or 30), so the IP
        # version nibble after it decides.
        return data[4:] if len(data) > 4 else None
    return None


def read_packets(path: str | Path) -> Iterator[Packet]:
    """Yield every UDP datagram and TCP segment (empty ones too) of a capture, in frame order."""
    decoder = _Decoder()
    for frame in read_frames(path):
        yield from decoder.frame(frame)


# --------------------------------------------------------------------------------------------
# TCP streams
# --------------------------------------------------------------------------------------------


@dataclass
class TcpStream:
    """One direction of a TCP connection, its payload back in sequence order.

    ``frames[i]`` is the frame from which byte ``i`` of ``data`` was contiguously available:
    the frame that carried it or, for bytes that arrived ahead of a gap, the frame that filled
    the gap.  A PDU ending at byte ``i`` is therefore complete at ``frames[i]``, the frame
    tshark reports a reassembled PDU in.  Retransmitted bytes are kept once, from the first copy.
    One connection per address/port 4-tuple: a later connection reusing the same 4-tuple is not
    told apart from the first (none of our captures has one).
    """

    src: str
    sport: int
    dst: str
    dport: int
    data: bytearray = field(default_factory=bytearray)
    frames: list[int] = field(default_factory=list)
    #: bytes still held past a hole when the capture ended (lost or never captured)
    pending: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    _base: int | None = None  # sequence number of data[0]

    @property
    def key(self) -> tuple[str, int, str, int]:
        return (self.src, self.sport, self.dst, self.dport)

    def frame_at(self, offset: int) -> int:
        """The frame from which byte ``offset`` of the stream was available."""
        return self.frames[offset]

    def add(self, pkt: Packet) -> None:
        """Take one segment of this direction (segments may come in any order)."""
        assert pkt.seq is not None
        seq, payload = pkt.seq, pkt.payload
        if pkt.flags & TCP_SYN:
            seq = (seq + 1) % 2**32  # the SYN takes one sequence number; data (TFO) follows it
            if self._base is None:
                self._base = seq
        if not payload:
            return
        if self._base is None:
            self._base = seq  # the capture started mid-connection
        rel = (seq - self._base) % 2**32
        if rel >= 2**31:  # starts before the first byte we hold: keep only what is new
            skip = 2**32 - rel
            if skip >= len(payload):
                return
            payload, rel = payload[skip:], 0
        held = self.pending.get(rel)
        if held is None or len(held[0]) < len(payload):
            self.pending[rel] = (payload, pkt.frame_number)
        self._drain(pkt.frame_number)

    def _drain(self, frame_number: int) -> None:
        for rel in sorted(self.pending):
            end = len(self.data)
            if rel > end:
                break  # a hole before this segment: keep it (and what follows) for later
            payload, _ = self.pending.pop(rel)
            new = payload[end - rel :]  # empty for a retransmission of bytes we already hold
            if new:
                self.data += new
                self.frames.extend([frame_number] * len(new))


def tcp_streams(packets: Iterable[Packet]) -> list[TcpStream]:
    """Each direction of each TCP connection in ``packets``, in order of first appearance."""
    streams: dict[tuple[str, int, str, int], TcpStream] = {}
    for pkt in packets:
        if pkt.proto != "tcp":
            continue
        key = (pkt.src, pkt.sport, pkt.dst, pkt.dport)
        stream = streams.get(key)
        if stream is None:
            stream = streams[key] = TcpStream(*key)
        stream.add(pkt)
    return list(streams.values())
