"""RTCP (RFC 3550 §6): parse and build SR, RR, SDES, BYE, APP, RFC 4585 feedback, compounds.

Also builds a receiver report from :class:`~fastsip.rtp.RtpStats` and computes the RFC 3550 A.7
transmission interval.  RTCP runs a few packets per second per stream, so this is plain Python;
the per-packet work lives in the compiled modules.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from fastsip.rtp.errors import RtcpError

if TYPE_CHECKING:
    from fastsip.rtp._stats import RtpStats

# RFC 3550 §12.1 and RFC 4585 §6.1 packet types
RTCP_SR = 200
RTCP_RR = 201
RTCP_SDES = 202
RTCP_BYE = 203
RTCP_APP = 204
RTCP_RTPFB = 205
RTCP_PSFB = 206

# RFC 3550 §6.5 SDES item types
SDES_END, SDES_CNAME, SDES_NAME, SDES_EMAIL, SDES_PHONE, SDES_LOC, SDES_TOOL, SDES_NOTE, SDES_PRIV = range(9)

_HEADER = struct.Struct("!BBH")
_REPORT = struct.Struct("!IB3sIIII")
_SR_INFO = struct.Struct("!IQIII")

#: Seconds from the NTP epoch (1900) to the Unix epoch (1970).
NTP_UNIX_OFFSET = 2208988800


def ntp_timestamp(unix_time: float) -> int:
    """64-bit NTP timestamp (RFC 3550 §4) of a Unix time in seconds."""
    seconds = unix_time + NTP_UNIX_OFFSET
    whole = int(seconds)
    return ((whole & 0xFFFFFFFF) << 32) | int((seconds - whole) * (1 << 32))


def _header(packet_type: int, count: int, body_length: int, padding: int = 0) -> bytes:
    total = 4 + body_length + padding
    if total % 4:
        raise RtcpError("RTCP packet length is not a multiple of 32 bits")
    return _HEADER.pack(0x80 | (0x20 if padding else 0) | count, packet_type, total // 4 - 1)


@dataclass(frozen=True, slots=True)
class ReceptionReport:
    """One report block (§6.4.1): loss, highest sequence, jitter and round-trip fields."""

    ssrc: int
    fraction_lost: int = 0
    cumulative_lost: int = 0
    highest_sequence: int = 0
    jitter: int = 0
    lsr: int = 0
    dlsr: int = 0

    @classmethod
    def parse(cls, data: bytes | memoryview, offset: int = 0) -> ReceptionReport:
        ssrc, fraction, lost, highest, jitter, lsr, dlsr = _REPORT.unpack_from(data, offset)
        cumulative = int.from_bytes(lost, "big", signed=True)   # 24-bit two's complement
        return cls(ssrc, fraction, cumulative, highest, jitter, lsr, dlsr)

    def __bytes__(self) -> bytes:
        # Clamp as §6.4.1 says: the field is 24-bit signed.
        lost = max(-0x800000, min(0x7FFFFF, self.cumulative_lost))
        return _REPORT.pack(self.ssrc, self.fraction_lost, lost.to_bytes(3, "big", signed=True),
                            self.highest_sequence & 0xFFFFFFFF, self.jitter, self.lsr, self.dlsr)


def _parse_reports(body: bytes, offset: int, count: int, what: str) -> list[ReceptionReport]:
    if offset + 24 * count > len(body):
        raise RtcpError(f"RTCP {what} length is invalid")
    return [ReceptionReport.parse(body, offset + 24 * i) for i in range(count)]


@dataclass(slots=True)
class SenderReport:
    """SR (§6.4.1): sender info plus reception report blocks."""

    ssrc: int
    ntp_timestamp: int
    rtp_timestamp: int
    packet_count: int
    octet_count: int
    reports: list[ReceptionReport] = field(default_factory=list)
    extension: bytes = b""

    packet_type = RTCP_SR

    @classmethod
    def _parse(cls, count: int, body: bytes) -> SenderReport:
        if len(body) < 24:
            raise RtcpError("RTCP sender report length is invalid")
        ssrc, ntp, rtp_ts, packets, octets = _SR_INFO.unpack_from(body)
        reports = _parse_reports(body, 24, count, "sender report")
        return cls(ssrc, ntp, rtp_ts, packets, octets, reports, bytes(body[24 + 24 * count:]))

    def __bytes__(self) -> bytes:
        body = _SR_INFO.pack(self.ssrc, self.ntp_timestamp, self.rtp_timestamp,
                             self.packet_count, self.octet_count)
        body += b"".join(bytes(r) for r in self.reports) + self.extension
        return _header(RTCP_SR, len(self.reports), len(body)) + body


@dataclass(slots=True)
class ReceiverReport:
    """RR (§6.4.2): the reporter's SSRC and reception report blocks."""

    ssrc: int
    reports: list[ReceptionReport] = field(default_factory=list)
    extension: bytes = b""

    packet_type = RTCP_RR

    @classmethod
    def _parse(cls, count: int, body: bytes) -> ReceiverReport:
        if len(body) < 4:
            raise RtcpError("RTCP receiver report length is invalid")
        (ssrc,) = struct.unpack_from("!I", body)
        reports = _parse_reports(body, 4, count, "receiver report")
        return cls(ssrc, reports, bytes(body[4 + 24 * count:]))

    def __bytes__(self) -> bytes:
        if len(self.reports) > 31:
            raise RtcpError("at most 31 report blocks per RR")
        body = struct.pack("!I", self.ssrc) + b"".join(bytes(r) for r in self.reports) + self.extension
        return _header(RTCP_RR, len(self.reports), len(body)) + body


@dataclass(slots=True)
class SdesChunk:
    """One SDES chunk: a source and its (type, value) items, e.g. ``(SDES_CNAME, b"user@host")``."""

    ssrc: int
    items: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cname(self) -> bytes | None:
        return next((v for t, v in self.items if t == SDES_CNAME), None)


@dataclass(slots=True)
class SourceDescription:
    """SDES (§6.5)."""

    chunks: list[SdesChunk] = field(default_factory=list)

    packet_type = RTCP_SDES

    @classmethod
    def _parse(cls, count: int, body: bytes) -> SourceDescription:
        chunks, pos = [], 0
        for _ in range(count):
            if pos + 4 > len(body):
                raise RtcpError("RTCP SDES source is truncated")
            (ssrc,) = struct.unpack_from("!I", body, pos)
            pos += 4
            items = []
            while True:
                if pos >= len(body):
                    raise RtcpError("RTCP SDES item is truncated")
                item_type = body[pos]
                if item_type == SDES_END:
                    pos = (pos + 4) & ~3          # the null octets pad the chunk to 32 bits
                    break
                if pos + 2 > len(body) or pos + 2 + body[pos + 1] > len(body):
                    raise RtcpError("RTCP SDES item is truncated")
                length = body[pos + 1]
                items.append((item_type, bytes(body[pos + 2:pos + 2 + length])))
                pos += 2 + length
            chunks.append(SdesChunk(ssrc, items))
        return cls(chunks)

    def __bytes__(self) -> bytes:
        body = bytearray()
        for chunk in self.chunks:
            body += struct.pack("!I", chunk.ssrc)
            for item_type, value in chunk.items:
                if not 1 <= item_type <= 255 or len(value) > 255:
                    raise RtcpError("SDES item type must be 1..255 and value at most 255 octets")
                body += bytes((item_type, len(value))) + value
            body += b"\x00" * (4 - len(body) % 4)   # at least one null octet ends the list
        if len(self.chunks) > 31:
            raise RtcpError("at most 31 SDES chunks per packet")
        return _header(RTCP_SDES, len(self.chunks), len(body)) + bytes(body)


@dataclass(slots=True)
class Bye:
    """BYE (§6.6): the sources leaving, with an optional reason."""

    sources: list[int] = field(default_factory=list)
    reason: bytes | None = None

    packet_type = RTCP_BYE

    @classmethod
    def _parse(cls, count: int, body: bytes) -> Bye:
        if 4 * count > len(body):
            raise RtcpError("RTCP bye length is invalid")
        sources = list(struct.unpack_from(f"!{count}I", body))
        reason = None
        pos = 4 * count
        if pos < len(body):
            length = body[pos]
            if pos + 1 + length > len(body):
                raise RtcpError("RTCP bye reason is truncated")
            reason = bytes(body[pos + 1:pos + 1 + length])
        return cls(sources, reason)

    def __bytes__(self) -> bytes:
        body = struct.pack(f"!{len(self.sources)}I", *self.sources)
        if self.reason is not None:
            if len(self.reason) > 255:
                raise RtcpError("BYE reason is at most 255 octets")
            body += bytes((len(self.reason),)) + self.reason
            body += b"\x00" * (-len(body) % 4)
        return _header(RTCP_BYE, len(self.sources), len(body)) + body


@dataclass(slots=True)
class App:
    """APP (§6.7): application-defined, named by four ASCII characters."""

    subtype: int
    ssrc: int
    name: bytes
    data: bytes = b""

    packet_type = RTCP_APP

    @classmethod
    def _parse(cls, count: int, body: bytes) -> App:
        if len(body) < 8:
            raise RtcpError("RTCP APP length is invalid")
        (ssrc,) = struct.unpack_from("!I", body)
        return cls(count, ssrc, bytes(body[4:8]), bytes(body[8:]))

    def __bytes__(self) -> bytes:
        if len(self.name) != 4 or len(self.data) % 4 or not 0 <= self.subtype <= 31:
            raise RtcpError("APP needs a 4-octet name, 32-bit aligned data and subtype 0..31")
        body = struct.pack("!I", self.ssrc) + self.name + self.data
        return _header(RTCP_APP, self.subtype, len(body)) + body


@dataclass(slots=True)
class Feedback:
    """RFC 4585 transport-layer (RTPFB, 205) or payload-specific (PSFB, 206) feedback."""

    packet_type: int
    fmt: int
    ssrc: int
    media_ssrc: int
    fci: bytes = b""

    @classmethod
    def _parse_typed(cls, packet_type: int, count: int, body: bytes) -> Feedback:
        if len(body) < 8:
            what = "transport" if packet_type == RTCP_RTPFB else "payload-specific"
            raise RtcpError(f"RTCP {what} feedback length is invalid")
        ssrc, media = struct.unpack_from("!II", body)
        return cls(packet_type, count, ssrc, media, bytes(body[8:]))

    @property
    def lost(self) -> list[int]:
        """Sequence numbers a Generic NACK (RTPFB, FMT 1) asks for again."""
        if self.packet_type != RTCP_RTPFB or self.fmt != 1:
            return []
        out = []
        for i in range(0, len(self.fci) - 3, 4):
            pid, blp = struct.unpack_from("!HH", self.fci, i)
            out.append(pid)
            out.extend((pid + b + 1) & 0xFFFF for b in range(16) if blp & (1 << b))
        return out

    @classmethod
    def nack(cls, ssrc: int, media_ssrc: int, lost: Iterable[int]) -> Feedback:
        """A Generic NACK (RFC 4585 §6.2.1) for the given sequence numbers."""
        seqs = sorted({s & 0xFFFF for s in lost})
        fci = bytearray()
        while seqs:
            pid = seqs.pop(0)
            blp = 0
            for s in list(seqs):
                if 0 < (s - pid) & 0xFFFF <= 16:
                    blp |= 1 << (((s - pid) & 0xFFFF) - 1)
                    seqs.remove(s)
            fci += struct.pack("!HH", pid, blp)
        return cls(RTCP_RTPFB, 1, ssrc, media_ssrc, bytes(fci))

    def __bytes__(self) -> bytes:
        body = struct.pack("!II", self.ssrc, self.media_ssrc) + self.fci
        return _header(self.packet_type, self.fmt, len(body))  + body


@dataclass(slots=True)
class UnknownRtcp:
    """A packet type this module does not decode, kept whole so a compound round-trips."""

    packet_type: int
    count: int
    body: bytes

    def __bytes__(self) -> bytes:
        return _header(self.packet_type, self.count, len(self.body)) + self.body


RtcpPacket = Union[  # noqa: UP007 - a runtime alias, kept 3.10-compatible
    SenderReport, ReceiverReport, SourceDescription, Bye, App, Feedback, UnknownRtcp
]

_PARSERS: dict[int, Callable[[int, bytes], RtcpPacket]] = {
    RTCP_SR: SenderReport._parse,
    RTCP_RR: ReceiverReport._parse,
    RTCP_SDES: SourceDescription._parse,
    RTCP_BYE: Bye._parse,
    RTCP_APP: App._parse,
}


def parse_rtcp(data: bytes | bytearray | memoryview) -> list[RtcpPacket]:
    """Parse an RTCP datagram (one packet or a compound) into packet objects.

    Every length is checked against the datagram; padding is honoured where the P bit is set.
    Raises :class:`RtcpError` for malformed input.
    """
    data = bytes(data)
    packets: list[RtcpPacket] = []
    pos = 0
    if len(data) < 4:
        raise RtcpError("RTCP packet length is less than 4 bytes")
    while pos < len(data):
        if pos + 4 > len(data):
            raise RtcpError("RTCP packet is truncated")
        first, packet_type, words = _HEADER.unpack_from(data, pos)
        if first >> 6 != 2:
            raise RtcpError("RTCP packet has invalid version")
        end = pos + 4 + 4 * words
        if end > len(data):
            raise RtcpError("RTCP packet length is invalid")
        body = data[pos + 4:end]
        if first & 0x20:
            if not body or body[-1] == 0 or body[-1] > len(body):
                raise RtcpError("RTCP packet padding length is invalid")
            body = body[:-body[-1]]
        count = first & 0x1F
        parser = _PARSERS.get(packet_type)
        if parser is not None:
            packets.append(parser(count, body))
        elif packet_type in (RTCP_RTPFB, RTCP_PSFB):
            packets.append(Feedback._parse_typed(packet_type, count, body))
        else:
            packets.append(UnknownRtcp(packet_type, count, body))
        pos = end
    return packets


def build_compound(packets: Sequence[RtcpPacket]) -> bytes:
    """Serialize packets into one compound datagram (§6.1: SR or RR first, SDES with CNAME)."""
    return b"".join(bytes(p) for p in packets)


def report_block(stats: RtpStats, *, last_sr_ntp: int | None = None,
                 last_sr_arrival: float | None = None, now: float | None = None) -> ReceptionReport:
    """A reception report block for one source from its :class:`RtpStats`.

    Closes the stats' report interval (fraction lost is per interval).  ``last_sr_ntp`` is the
    NTP timestamp of the last SR from that source, received at ``last_sr_arrival`` (seconds, the
    same clock as ``now``): they give LSR and DLSR for the sender's round-trip estimate.
    """
    fraction, cumulative = stats.report()
    lsr = dlsr = 0
    if last_sr_ntp is not None and last_sr_arrival is not None and now is not None:
        lsr = (last_sr_ntp >> 16) & 0xFFFFFFFF          # middle 32 bits
        dlsr = max(0, int((now - last_sr_arrival) * 65536)) & 0xFFFFFFFF
    return ReceptionReport(
        ssrc=stats.ssrc or 0, fraction_lost=fraction, cumulative_lost=cumulative,
        highest_sequence=stats.extended_max_sequence & 0xFFFFFFFF, jitter=stats.jitter,
        lsr=lsr, dlsr=dlsr,
    )


def receiver_report(ssrc: int, sources: Iterable[RtpStats]) -> ReceiverReport:
    """An RR from our ``ssrc`` with one report block per source that has become valid."""
    return ReceiverReport(ssrc, [report_block(s) for s in sources if s.expected])


def rtcp_interval(members: int, senders: int, rtcp_bw: float, we_sent: bool,
                  avg_rtcp_size: float, initial: bool,
                  rng: Callable[[], float] = random.random) -> float:
    """RFC 3550 A.7: seconds until the next RTCP packet.

    ``rtcp_bw`` is the RTCP bandwidth in octets per second (5 % of the session bandwidth),
    ``avg_rtcp_size`` the running average compound size in octets.  The result is randomized
    over [0.5, 1.5] times the deterministic interval and divided by e - 3/2 to compensate for
    timer reconsideration (§6.3.1); pass ``rng`` for reproducible runs.
    """
    RTCP_MIN_TIME = 5.0
    RTCP_SENDER_BW_FRACTION = 0.25
    RTCP_RCVR_BW_FRACTION = 1 - RTCP_SENDER_BW_FRACTION
    COMPENSATION = 2.71828 - 1.5

    rtcp_min_time = RTCP_MIN_TIME / 2 if initial else RTCP_MIN_TIME
    n = members
    if 0 < senders <= members * RTCP_SENDER_BW_FRACTION:
        if we_sent:
            rtcp_bw *= RTCP_SENDER_BW_FRACTION
            n = senders
        else:
            rtcp_bw *= RTCP_RCVR_BW_FRACTION
            n -= senders
    t = avg_rtcp_size * n / rtcp_bw if rtcp_bw > 0 else float("inf")
    t = max(t, rtcp_min_time)
    t = t * (rng() + 0.5)
    return t / COMPENSATION
