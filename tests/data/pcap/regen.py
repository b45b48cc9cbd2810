"""Regenerate the synthetic captures and tshark's reference decode of every capture here.

    python tests/data/pcap/regen.py            # needs tshark on PATH (Wireshark 4.x)

Run it only when a capture is added or the synthetic set changes, and commit what it writes:
the tests compare tests/pcapfile.py against these files and never need tshark themselves.

* ``synthetic/*`` — small captures written below, covering what the real captures lack: big-endian
  and nanosecond pcap, the "modified" pcap, pcapng with several interfaces, link types and
  sections (one big-endian), simple packet blocks, raw-IP/Null/SLL2 link types, VLAN/QinQ,
  LLC/SNAP and PPPoE framing, IPv4 options and out-of-order fragments, IPv6 extension headers
  and fragments, IP-in-IP tunnels, and a SIP-over-TCP stream with out-of-order segments and
  retransmissions.  Their SIP messages are made up here (example.com/192.0.2.x/2001:db8::).
* ``tshark-frames/<capture>.tsv`` — tshark's view of every UDP datagram and TCP segment:
  frame number, transport, inner-most IP addresses and ports, TCP sequence number, payload
  length and the first 16 hex digits of the payload's SHA-256.  Frames where UDP/TCP appears
  only inside an ICMP error are left out (the reader does not look inside ICMP).
  ``tshark-frames/frame-counts.tsv`` has each capture's number of frames.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import struct
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SYNTH = HERE / "synthetic"
FRAMES = HERE / "tshark-frames"
CAPTURE_SUFFIXES = {".pcap", ".pcapng", ".cap", ""}

# --------------------------------------------------------------------------------------------
# Packet builders
# --------------------------------------------------------------------------------------------


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _addr(a: str) -> bytes:
    return ipaddress.ip_address(a).packed


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    if ":" in src:
        return _addr(src) + _addr(dst) + struct.pack("!I3xB", length, proto)
    return _addr(src) + _addr(dst) + struct.pack("!xBH", proto, length)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    hdr = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    c = _csum(_pseudo(src, dst, 17, 8 + len(payload)) + hdr + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), c) + payload


def tcp(src: str, dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
        payload: bytes = b"") -> bytes:
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0)
    c = _csum(_pseudo(src, dst, 6, len(hdr) + len(payload)) + hdr + payload)
    return hdr[:16] + struct.pack("!H", c) + hdr[18:] + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1, frag: int = 0,
         options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), ident, frag, 64,
                      proto, 0, _addr(src), _addr(dst)) + options
    return hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:] + payload


def ipv4_fragments(src: str, dst: str, proto: int, payload: bytes, ident: int,
                   size: int) -> list[bytes]:
    out = []
    for off in range(0, len(payload), size):
        more = 0x2000 if off + size < len(payload) else 0
        out.append(ipv4(src, dst, proto, payload[off : off + size], ident, more | off // 8))
    return out


def ipv6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), nh, 64, _addr(src),
                       _addr(dst)) + payload


def ext_opts(nh: int) -> bytes:
    """A hop-by-hop or destination options header: 8 bytes, PadN only."""
    return bytes([nh, 0, 1, 4, 0, 0, 0, 0])


def eth(payload: bytes, ethertype: int = 0x0800, vlans: tuple[int, ...] = ()) -> bytes:
    out = b"\x02\x00\x00\x00\x00\x02" + b"\x02\x00\x00\x00\x00\x01"
    for i, vid in enumerate(vlans):
        out += struct.pack("!H", 0x88A8 if i < len(vlans) - 1 else 0x8100) + struct.pack("!H", vid)
    return out + struct.pack("!H", ethertype) + payload


def sip(method: str, n: int, body: bytes = b"", call: str = "synthetic", pad: int = 0) -> bytes:
    head = (
        f"{method} sip:bob@example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK-{call}-{n}\r\n"
        f"Max-Forwards: 70\r\n"
        f"From: <sip:alice@example.com>;tag=a{n}\r\n"
        f"To: <sip:bob@example.com>\r\n"
        f"Call-ID: {call}-{n}@192.0.2.1\r\n"
        f"CSeq: {n} {method}\r\n"
        + (f"X-Padding: {'p' * pad}\r\n" if pad else "")
        + ("Content-Type: application/sdp\r\n" if body else "")
        + f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


SDP = (
    b"v=0\r\no=- 1 1 IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 192.0.2.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0 8 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
    b"a=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\na=sendrecv\r\n"
)

# --------------------------------------------------------------------------------------------
# File writers
# --------------------------------------------------------------------------------------------


def write_pcap(path: Path, linktype: int, frames: list[bytes], bo: str = "<", nsec: bool = False,
               modified: bool = False) -> None:
    magic = 0xA1B2CD34 if modified else 0xA1B23C4D if nsec else 0xA1B2C3D4
    out = bytearray(struct.pack(bo + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype))
    for i, f in enumerate(frames):
        frac = (i * 1000 + 7) * (1000 if nsec else 1)
        out += struct.pack(bo + "IIII", 1_700_000_000 + i, frac, len(f), len(f))
        if modified:
            out += struct.pack(bo + "IHBx", 0, 0, 0)  # ifindex, protocol, pkt_type, pad
        out += f
    path.write_bytes(bytes(out))


def _block(bo: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(bo + "II", btype, n) + body + struct.pack(bo + "I", n)


def _opt(bo: str, code: int, value: bytes) -> bytes:
    return struct.pack(bo + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(bo: str) -> bytes:
    return _block(bo, 0x0A0D0D0A, struct.pack(bo + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(bo: str, linktype: int, tsresol: int | None = None) -> bytes:
    opts = b""
    if tsresol is not None:
        opts = _opt(bo, 9, bytes([tsresol])) + _opt(bo, 0, b"")
    return _block(bo, 1, struct.pack(bo + "HHI", linktype, 0, 65535) + opts)


def epb(bo: str, iface: int, ts: int, data: bytes) -> bytes:
    return _block(bo, 6, struct.pack(bo + "IIIII", iface, ts >> 32, ts & 0xFFFFFFFF, len(data),
                                     len(data)) + data)


def spb(bo: str, data: bytes) -> bytes:
    return _block(bo, 3, struct.pack(bo + "I", len(data)) + data)


# --------------------------------------------------------------------------------------------
# The synthetic captures
# --------------------------------------------------------------------------------------------

C4, S4, T4 = "192.0.2.1", "192.0.2.2", "198.51.100.7"
C6, S6 = "2001:db8::1", "2001:db8::2"


def tcp_and_ipv4_frames() -> list[bytes]:
    """Big-endian nanosecond pcap, Ethernet + 802.1Q: SIP over TCP with reordering and
    retransmission, then IPv4 options, out-of-order fragments, tunnels, SNAP and PPPoE."""
    v = (100,)
    a = sip("INVITE", 1, SDP, "tcp")
    b = sip("OPTIONS", 2, call="tcp")
    c = sip("BYE", 3, call="tcp")
    d = sip("OPTIONS", 4, call="tcp")
    stream = a + b + c + d
    isn, sisn = 1000, 5000

    def seg(off: int, end: int, flags: int = 0x18) -> bytes:
        return eth(ipv4(C4, S4, 6, tcp(C4, S4, 40000, 5060, isn + 1 + off, sisn + 1, flags,
                                       stream[off:end])), vlans=v)

    lb, lc = len(a) + len(b), len(a) + len(b) + len(c)
    frames = [
        eth(ipv4(C4, S4, 6, tcp(C4, S4, 40000, 5060, isn, 0, 0x02)), vlans=v),  # 1 SYN
        eth(ipv4(S4, C4, 6, tcp(S4, C4, 5060, 40000, sisn, isn + 1, 0x12)), vlans=v),  # 2
        eth(ipv4(C4, S4, 6, tcp(C4, S4, 40000, 5060, isn + 1, sisn + 1, 0x10)), vlans=v),  # 3
        seg(0, 200),  # 4: first part of INVITE a
        seg(lb - 50, lb),  # 5: tail of OPTIONS b, ahead of a gap
        seg(0, 200),  # 6: retransmission of 4
        seg(200, lb - 50),  # 7: fills the gap: a and b complete here
        seg(lb, lc),  # 8: BYE c whole
        seg(lc - 10, len(stream)),  # 9: overlaps c's end, carries OPTIONS d: d completes here
    ]
    # 10: IPv4 with options (Router Alert + NOP padding to a 4-byte boundary)
    frames.append(eth(ipv4(C4, S4, 17, udp(C4, S4, 5060, 5060, sip("MESSAGE", 5)),
                           options=b"\x94\x04\x00\x00"), vlans=v))
    # 11-14: a 3-fragment INVITE, fragments 2 and 3 first, another datagram in between
    big = udp(C4, S4, 5060, 5060, sip("INVITE", 6, SDP, pad=1200))
    f1, f2, f3 = ipv4_fragments(C4, S4, 17, big, 0x4242, 800)
    frames += [eth(f2, vlans=v), eth(f3, vlans=v),
               eth(ipv4(S4, C4, 17, udp(S4, C4, 5060, 5060, sip("OPTIONS", 7))), vlans=v),
               eth(f1, vlans=v)]
    # 15: IPv4-in-IPv4
    frames.append(eth(ipv4(T4, S4, 4, ipv4(C4, S4, 17, udp(C4, S4, 5060, 5060,
                                                           sip("NOTIFY", 8)))), vlans=v))
    # 16: QinQ (802.1ad outer tag, 802.1Q inner tag)
    frames.append(eth(ipv4(C4, S4, 17, udp(C4, S4, 5060, 5060, sip("INFO", 9))),
                      vlans=(200, 100)))
    # 17: IPv6-in-IPv4 (6in4)
    frames.append(eth(ipv4(T4, S4, 41, ipv6(C6, S6, 17, udp(C6, S6, 5060, 5060,
                                                            sip("UPDATE", 10)))), vlans=v))
    # 18: an ICMP port-unreachable quoting a UDP datagram: no packet for the reader
    quoted = ipv4(C4, S4, 17, udp(C4, S4, 5060, 5061, sip("OPTIONS", 11)))[:28]
    icmp = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    icmp = icmp[:2] + struct.pack("!H", _csum(icmp)) + icmp[4:]
    frames.append(eth(ipv4(S4, C4, 1, icmp), vlans=v))
    # 19: 802.3 + LLC/SNAP (no VLAN)
    ip = ipv4(C4, S4, 17, udp(C4, S4, 5060, 5060, sip("PRACK", 12)))
    llc = b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + ip
    frames.append(b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01"
                  + struct.pack("!H", len(llc)) + llc)
    # 20: PPPoE session carrying IPv6
    ip6 = ipv6(C6, S6, 17, udp(C6, S6, 5060, 5060, sip("SUBSCRIBE", 13)))
    frames.append(eth(struct.pack("!BBHHH", 0x11, 0, 0x1234, len(ip6) + 2, 0x0057) + ip6,
                      ethertype=0x8864))
    return frames


def small_set(tag: str) -> list[bytes]:
    """Raw IP frames: IPv4 UDP, IPv6 UDP, IPv4 TCP."""
    return [
        ipv4(C4, S4, 17, udp(C4, S4, 5060, 5060, sip("OPTIONS", 1, call=tag))),
        ipv6(C6, S6, 17, udp(C6, S6, 5062, 5060, sip("OPTIONS", 2, call=tag))),
        ipv4(C4, S4, 6, tcp(C4, S4, 40001, 5060, 77, 0, 0x18, sip("OPTIONS", 3, call=tag))),
    ]


def write_pcapng(path: Path) -> None:
    """Two sections (little-, then big-endian), several interfaces and link types, SPBs, IPv6
    extension headers and out-of-order IPv6 fragments, IPv6-in-IPv6, blocks to skip."""
    out = bytearray()
    le, be = "<", ">"
    out += shb(le)
    out += idb(le, 1)  # 0: Ethernet, microseconds
    out += idb(le, 101, tsresol=9)  # 1: raw IP, nanoseconds
    out += idb(le, 276, tsresol=0x80 | 20)  # 2: Linux SLL2, 2^-20 s
    t = 1_700_000_000
    # frame 1: raw IPv6 with hop-by-hop + destination options before UDP
    p = udp(C6, S6, 5060, 5060, sip("OPTIONS", 1, call="ng"))
    out += epb(le, 1, t * 10**9, ipv6(C6, S6, 0, ext_opts(60) + ext_opts(17) + p))
    # frames 2 and 5: a fragmented IPv6 datagram (hop-by-hop, then fragment header), 2nd first
    big = udp(C6, S6, 5060, 5060, sip("INVITE", 2, SDP, call="ng", pad=900))
    cut = 1000

    def frag6(off: int, chunk: bytes, more: bool) -> bytes:
        fh = struct.pack("!BBHI", 17, 0, off | int(more), 0xABCDEF)
        return eth(ipv6(C6, S6, 0, ext_opts(44) + fh + chunk), ethertype=0x86DD)

    out += epb(le, 0, (t + 1) * 10**6, frag6(cut, big[cut:], False))
    # frame 3: a simple packet block (interface 0, Ethernet)
    out += spb(le, eth(ipv4(C4, S4, 17, udp(C4, S4, 5060, 5060, sip("MESSAGE", 3, call="ng")))))
    # a name-resolution block and a custom block: skipped
    out += _block(le, 4, struct.pack(le + "HH", 0, 0))
    out += _block(le, 0x00000BAD, struct.pack(le + "I", 32473) + b"custom")
    # frame 4: Linux SLL2 IPv4 UDP
    p4 = ipv4(C4, S4, 17, udp(C4, S4, 5060, 5060, sip("INFO", 4, call="ng")))
    sll2 = struct.pack("!HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\x02\0\0\0\0\x01\0\0")
    out += epb(le, 2, (t + 3) << 20, sll2 + p4)
    out += epb(le, 0, (t + 4) * 10**6, frag6(0, big[:cut], True))  # frame 5: completes
    # an interface statistics block: skipped
    out += _block(le, 5, struct.pack(le + "III", 0, 0, 0))
    # section 2, big-endian: Linux SLL (113)
    out += shb(be)
    out += idb(be, 113)
    sll = struct.pack("!HHH8sH", 0, 1, 6, b"\x02\0\0\0\0\x01\0\0", 0x86DD)
    inner = ipv6(C6, S6, 60, ext_opts(17) + udp(C6, S6, 5060, 5060, sip("NOTIFY", 6, call="ng")))
    out += epb(be, 0, (t + 5) * 10**6, sll + ipv6("2001:db8::a", "2001:db8::b", 41, inner))
    path.write_bytes(bytes(out))


def write_synthetic() -> None:
    SYNTH.mkdir(exist_ok=True)
    write_pcap(SYNTH / "be-nsec-vlan.pcap", 1, tcp_and_ipv4_frames(), bo=">", nsec=True)
    write_pcap(SYNTH / "raw101.pcap", 101, small_set("raw101"))
    write_pcap(SYNTH / "raw12-be.pcap", 12, small_set("raw12"), bo=">")
    write_pcap(SYNTH / "raw14-nsec.pcap", 14, small_set("raw14"), nsec=True)
    # Null/loopback: a 4-byte address family in the (here big-endian) capturing host's order,
    # AF_INET6 = 30 as on macOS.
    null = [struct.pack(">I", 30 if f[0] >> 4 == 6 else 2) + f for f in small_set("null")]
    write_pcap(SYNTH / "null-be.pcap", 0, null, bo=">")
    write_pcap(SYNTH / "modified.pcap", 1,
               [eth(f, 0x86DD if f[0] >> 4 == 6 else 0x0800) for f in small_set("mod")],
               modified=True)
    write_pcapng(SYNTH / "multi-section.pcapng")


# --------------------------------------------------------------------------------------------
# tshark's reference decode
# --------------------------------------------------------------------------------------------

FIELDS = [
    "frame.number", "frame.protocols", "ip.src", "ip.dst", "ipv6.src", "ipv6.dst",
    "udp.srcport", "udp.dstport", "udp.payload", "tcp.srcport", "tcp.dstport", "tcp.seq_raw",
    "tcp.payload",
]
HEADER = ["frame.number", "proto", "src", "sport", "dst", "dport", "tcp.seq_raw",
          "payload_len", "payload_sha256_16"]


def tshark_frames(capture: Path) -> list[list[str]]:
    cmd = ["tshark", "-n", "-r", str(capture), "-Y", "(udp or tcp) and not icmp and not icmpv6",
           "-T", "fields", "-E", "occurrence=l", "-E", "separator=\t"]
    for f in FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        v = dict(zip(FIELDS, line.split("\t"), strict=True))
        layers = v["frame.protocols"].split(":")
        # the inner-most IP layer is the one the transport header belongs to
        last_ip = max((i for i, p in enumerate(layers) if p in ("ip", "ipv6")), default=-1)
        fam = "ipv6" if layers[last_ip] == "ipv6" else "ip"
        proto = "udp" if "udp" in layers and ("tcp" not in layers
                                              or layers.index("udp") < layers.index("tcp")) \
            else "tcp"
        payload = bytes.fromhex(v[f"{proto}.payload"].replace(":", ""))
        rows.append([
            v["frame.number"], proto, v[f"{fam}.src"], v[f"{proto}.srcport"], v[f"{fam}.dst"],
            v[f"{proto}.dstport"], v["tcp.seq_raw"] if proto == "tcp" else "",
            str(len(payload)), hashlib.sha256(payload).hexdigest()[:16],
        ])
    return rows


def captures() -> list[Path]:
    found = [p for p in HERE.iterdir() if p.is_file() and p.suffix in CAPTURE_SUFFIXES]
    found += list(SYNTH.iterdir()) if SYNTH.exists() else []
    return sorted(found, key=lambda p: (p.parent != HERE, p.name))


def main() -> int:
    if not shutil.which("tshark"):
        print("regen.py needs tshark on PATH", file=sys.stderr)
        return 1
    write_synthetic()
    FRAMES.mkdir(exist_ok=True)
    version = subprocess.run(["tshark", "--version"], capture_output=True, text=True, check=False)
    (FRAMES / "TSHARK_VERSION").write_text(version.stdout.splitlines()[0] + "\n")
    counts = ["capture\tframes"]
    for capture in captures():
        rows = tshark_frames(capture)
        name = capture.name if capture.parent == HERE else f"synthetic-{capture.name}"
        lines = ["\t".join(HEADER)] + ["\t".join(r) for r in rows]
        (FRAMES / f"{name}.tsv").write_text("\n".join(lines) + "\n")
        n = subprocess.run(["tshark", "-r", str(capture), "-T", "fields", "-e", "frame.number"],
                           check=True, capture_output=True, text=True).stdout.split()
        counts.append(f"{name}\t{len(n)}")
        print(f"{name:45} {len(n):5} frames {len(rows):5} transport packets")
    (FRAMES / "frame-counts.tsv").write_text("\n".join(counts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
