"""RTP captures for tshark: a minimal pcap writer (raw IPv4/UDP, microsecond timestamps) and
the parse of ``tshark -z rtp,streams``, shared by the quality tests (tests/test_quality.py,
tests/test_cli_media.py).  tshark analyses the capture independently of fastsip."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

TSHARK = shutil.which("tshark")


def rtp_packet(seq: int, ts: int, ssrc: int, payload: bytes = b"\xff" * 160) -> bytes:
    return struct.pack("!BBHII", 0x80, 0, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + payload


def _ip_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def write_pcap(path: Path, packets: list[tuple[float, bytes]], sport: int, dport: int) -> None:
    """Classic pcap, LINKTYPE_RAW (101): each datagram wrapped in IPv4/UDP 127.0.0.1 -> 127.0.0.1.

    Timestamps are written in whole microseconds: callers pass times already rounded so that
    what tshark reads is exactly what the meter saw."""
    out = bytearray(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 101))
    for ident, (when, payload) in enumerate(packets):
        udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident & 0xFFFF, 0,
                                   64, 17, 0, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])))
        struct.pack_into("!H", ip, 10, _ip_checksum(bytes(ip)))
        frame = bytes(ip) + udp
        micros = round(when * 1_000_000)
        out += struct.pack("<IIII", micros // 1_000_000, micros % 1_000_000, len(frame), len(frame))
        out += frame
    path.write_bytes(bytes(out))


@dataclass
class TsharkStream:
    packets: int
    lost: int
    max_jitter: float
    mean_jitter: float


_STREAM_LINE = re.compile(
    r"\s*[\d.]+\s+[\d.]+\s+\S+\s+\d+\s+\S+\s+(?P<dport>\d+)\s+0x[0-9a-fA-F]+\s+\S+\s+"
    r"(?P<pkts>\d+)\s+(?P<lost>-?\d+)\s+\(-?[\d.]+%\)\s+(?P<rest>.*)$")


def tshark_rtp_streams(pcap: Path, port: int) -> list[TsharkStream]:
    """``tshark -z rtp,streams`` on the capture, the UDP port decoded as RTP.

    Its table: start/end time, addresses and ports, SSRC, payload, packets, "lost (pct%)", then
    the delta and jitter columns (ms) that the header names."""
    assert TSHARK is not None
    out = subprocess.run(
        [TSHARK, "-n", "-r", str(pcap), "-q", "-d", f"udp.port=={port},rtp", "-z", "rtp,streams"],
        capture_output=True, text=True, timeout=60, check=True).stdout
    header = next(line for line in out.splitlines() if "Max Jitter" in line)
    names = [f"{a} {b}" for a, b in re.findall(r"(Min|Mean|Max) (Delta|Jitter)", header)]
    streams = []
    for line in out.splitlines():
        m = _STREAM_LINE.match(line)
        if m is None or int(m["dport"]) != port:
            continue
        values = dict(zip(names, (float(x) for x in re.findall(r"-?\d+\.\d+", m["rest"]))))
        streams.append(TsharkStream(int(m["pkts"]), int(m["lost"]), values["Max Jitter"],
                                    values["Mean Jitter"]))
    return streams
