"""A small pure-Python pcap reader for the RTP conformance tests (no tshark needed in CI).

Reads classic pcap (either byte order, micro- or nanosecond timestamps) with Ethernet (VLAN
tags included), BSD loopback, Linux cooked or raw-IP framing, and yields the UDP datagrams of
unfragmented IPv4/IPv6 packets with their frame number and timestamp.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class UdpDatagram:
    frame: int          # 1-based, as Wireshark numbers frames
    time: float         # capture timestamp, seconds since the epoch
    src: str
    sport: int
    dst: str
    dport: int
    payload: bytes


def _ipv4(b: bytes) -> str:
    return ".".join(str(x) for x in b)


def _ip_payload(data: bytes, off: int, ethertype: int):
    if ethertype == 0x0800:
        ihl = (data[off] & 0x0F) * 4
        total = struct.unpack_from("!H", data, off + 2)[0]
        frag = struct.unpack_from("!H", data, off + 6)[0]
        if data[off + 9] != 17 or frag & 0x3FFF:     # not UDP, or a fragment
            return None
        return _ipv4(data[off + 12:off + 16]), _ipv4(data[off + 16:off + 20]), data[off + ihl:off + total]
    if ethertype == 0x86DD:
        if data[off + 6] != 17:
            return None
        plen = struct.unpack_from("!H", data, off + 4)[0]
        src = data[off + 8:off + 24].hex()
        dst = data[off + 24:off + 40].hex()
        return src, dst, data[off + 40:off + 40 + plen]
    return None


def read_udp(path: str | Path) -> Iterator[UdpDatagram]:
    raw = Path(path).read_bytes()
    magic = raw[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise ValueError(f"{path}: not a classic pcap file")
    nano = magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d")
    linktype = struct.unpack_from(endian + "I", raw, 20)[0] & 0x0FFFFFFF
    off, frame = 24, 0
    while off + 16 <= len(raw):
        sec, frac, incl, _orig = struct.unpack_from(endian + "IIII", raw, off)
        data = raw[off + 16:off + 16 + incl]
        off += 16 + incl
        frame += 1
        t = sec + frac / (1e9 if nano else 1e6)
        if linktype == 1:                            # Ethernet
            ethertype, p = struct.unpack_from("!H", data, 12)[0], 14
            while ethertype in (0x8100, 0x88A8):
                ethertype, p = struct.unpack_from("!H", data, p + 2)[0], p + 4
        elif linktype == 0:                          # BSD loopback: host-order AF
            af = struct.unpack_from(endian + "I", data, 0)[0]
            ethertype, p = (0x0800 if af == 2 else 0x86DD), 4
        elif linktype == 113:                        # Linux cooked
            ethertype, p = struct.unpack_from("!H", data, 14)[0], 16
        elif linktype in (101, 12):                  # raw IP
            ethertype, p = (0x0800 if data[0] >> 4 == 4 else 0x86DD), 0
        else:
            raise ValueError(f"{path}: unsupported link type {linktype}")
        ip = _ip_payload(data, p, ethertype)
        if ip is None:
            continue
        src, dst, udp = ip
        if len(udp) < 8:
            continue
        sport, dport, ulen = struct.unpack_from("!HHH", udp, 0)
        yield UdpDatagram(frame, t, src, sport, dst, dport, bytes(udp[8:ulen]))


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    lines = Path(path).read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"))) for line in lines[1:] if line]


def read_streams(path: str | Path) -> list[dict[str, object]]:
    """Rows of ``tshark -z rtp,streams``: addresses, SSRC, packets, lost, jitter (ms)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if len(parts) < 10 or not parts[6].startswith("0x"):
            continue
        # columns from the right are fixed: ... Pkts Lost (pct) minΔ meanΔ maxΔ minJ meanJ maxJ [X]
        tail = parts[-1] == "X"
        nums = parts[:-1] if tail else parts
        rows.append({
            "src": parts[2], "sport": int(parts[3]), "dst": parts[4], "dport": int(parts[5]),
            "ssrc": int(parts[6], 16), "packets": int(nums[-9]), "lost": int(nums[-8]),
            "min_jitter": float(nums[-3]), "mean_jitter": float(nums[-2]),
            "max_jitter": float(nums[-1]),
        })
    return rows
