"""SDP session descriptions (RFC 8866): parse to typed objects, serialize back in RFC order.

Parsing is strict about structure (every line ``<type>=<value>``, the fields each line must
have) and lenient where real devices differ (LF-only line ends, direction attributes in any
case, unknown line types kept as-is).  ``str(session)`` re-serializes with CRLF; an input in
canonical order round-trips exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastsip.errors import FastSIPError


class SdpError(FastSIPError, ValueError):
    """A malformed session description."""


#: RFC 3551 static payload types: number -> (encoding, clock rate, channels)
STATIC_PAYLOAD_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("PCMU", 8000, 1), 3: ("GSM", 8000, 1), 4: ("G723", 8000, 1), 5: ("DVI4", 8000, 1),
    6: ("DVI4", 16000, 1), 7: ("LPC", 8000, 1), 8: ("PCMA", 8000, 1), 9: ("G722", 8000, 1),
    10: ("L16", 44100, 2), 11: ("L16", 44100, 1), 12: ("QCELP", 8000, 1), 13: ("CN", 8000, 1),
    14: ("MPA", 90000, 1), 15: ("G728", 8000, 1), 16: ("DVI4", 11025, 1),
    17: ("DVI4", 22050, 1), 18: ("G729", 8000, 1), 25: ("CelB", 90000, 1),
    26: ("JPEG", 90000, 1), 28: ("nv", 90000, 1), 31: ("H261", 90000, 1),
    32: ("MPV", 90000, 1), 33: ("MP2T", 90000, 1), 34: ("H263", 90000, 1),
}

DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")


@dataclass
class Origin:
    """``o=``: who made the description, and its version (bumped on every change)."""

    username: str = "-"
    session_id: int = 0
    session_version: int = 0
    nettype: str = "IN"
    addrtype: str = "IP4"
    address: str = "0.0.0.0"

    def __str__(self) -> str:
        return (f"{self.username} {self.session_id} {self.session_version} {self.nettype} "
                f"{self.addrtype} {self.address}")


@dataclass
class Connection:
    """``c=``: where media goes.  ``address`` may carry /ttl and /count for multicast."""

    address: str
    nettype: str = "IN"
    addrtype: str = "IP4"

    @property
    def host(self) -> str:
        return self.address.split("/")[0]

    def __str__(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"


@dataclass
class RtpMap:
    """``a=rtpmap``: a payload type's encoding, clock rate and channel count."""

    payload_type: int
    encoding: str
    clock_rate: int
    channels: int | None = None

    def __str__(self) -> str:
        tail = f"/{self.channels}" if self.channels is not None else ""
        return f"{self.payload_type} {self.encoding}/{self.clock_rate}{tail}"


Attribute = tuple[str, "str | None"]


def _attributes_str(attributes: list[Attribute]) -> list[str]:
    return [f"a={name}" if value is None else f"a={name}:{value}" for name, value in attributes]


def _direction(attributes: list[Attribute]) -> str | None:
    for name, value in attributes:
        if value is None and name.lower() in DIRECTIONS:
            return name.lower()
    return None


@dataclass
class Media:
    """One ``m=`` section: a media stream's port, transport, formats and attributes."""

    media: str
    port: int
    proto: str
    formats: list[str]
    port_count: int | None = None
    information: str | None = None
    connection: Connection | None = None
    bandwidths: list[tuple[str, int]] = field(default_factory=list)
    key: str | None = None
    attributes: list[Attribute] = field(default_factory=list)

    # -- attribute helpers ---------------------------------------------------------------------
    def attribute(self, name: str) -> str | None:
        """The value of the first ``a=name:value`` (or "" for a property attribute)."""
        for n, v in self.attributes:
            if n == name:
                return "" if v is None else v
        return None

    def attribute_values(self, name: str) -> list[str]:
        return ["" if v is None else v for n, v in self.attributes if n == name]

    def set_attribute(self, name: str, value: str | None) -> None:
        """Replace every ``a=name`` with one (at the first one's place), or append it."""
        for i, (n, _) in enumerate(self.attributes):
            if n == name:
                self.attributes[i] = (name, value)
                self.attributes[i + 1:] = [a for a in self.attributes[i + 1:] if a[0] != name]
                return
        self.attributes.append((name, value))

    @property
    def payload_types(self) -> list[int]:
        """The formats as RTP payload type numbers (RTP profiles only)."""
        return [int(f) for f in self.formats if f.isdigit()]

    @property
    def rtpmaps(self) -> dict[int, RtpMap]:
        """Payload type -> RtpMap, from ``a=rtpmap`` lines and the RFC 3551 static table."""
        out: dict[int, RtpMap] = {}
        for pt in self.payload_types:
            if pt in STATIC_PAYLOAD_TYPES:
                enc, rate, ch = STATIC_PAYLOAD_TYPES[pt]
                out[pt] = RtpMap(pt, enc, rate, ch if ch != 1 else None)
        for value in self.attribute_values("rtpmap"):
            try:
                pt_s, spec = value.split(None, 1)
                parts = spec.strip().split("/")
                out[int(pt_s)] = RtpMap(int(pt_s), parts[0], int(parts[1]),
                                        int(parts[2]) if len(parts) > 2 and parts[2] else None)
            except (ValueError, IndexError):
                raise SdpError(f"bad rtpmap attribute: {value!r}") from None
        return out

    @property
    def fmtp(self) -> dict[int, str]:
        out = {}
        for value in self.attribute_values("fmtp"):
            pt_s, _, params = value.partition(" ")
            if pt_s.isdigit():
                out[int(pt_s)] = params.strip()
        return out

    @property
    def ptime(self) -> int | None:
        """``a=ptime`` in milliseconds."""
        value = self.attribute("ptime")
        try:
            return round(float(value)) if value else None
        except ValueError:
            raise SdpError(f"bad ptime: {value!r}") from None

    @property
    def direction(self) -> str | None:
        """sendrecv / sendonly / recvonly / inactive from this section's attributes, if any."""
        return _direction(self.attributes)

    def set_direction(self, direction: str) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"not a direction: {direction}")
        self.attributes = [a for a in self.attributes
                           if not (a[1] is None and a[0].lower() in DIRECTIONS)]
        self.attributes.append((direction, None))

    def lines(self) -> list[str]:
        port = f"{self.port}/{self.port_count}" if self.port_count is not None else str(self.port)
        out = [f"m={self.media} {port} {self.proto} {' '.join(self.formats)}".rstrip()]
        if self.information is not None:
            out.append(f"i={self.information}")
        if self.connection is not None:
            out.append(f"c={self.connection}")
        out += [f"b={t}:{v}" for t, v in self.bandwidths]
        if self.key is not None:
            out.append(f"k={self.key}")
        return out + _attributes_str(self.attributes)


@dataclass
class SessionDescription:
    """A whole SDP body."""

    origin: Origin = field(default_factory=Origin)
    session_name: str = "-"
    version: int = 0
    information: str | None = None
    uri: str | None = None
    emails: list[str] = field(default_factory=list)
    phones: list[str] = field(default_factory=list)
    connection: Connection | None = None
    bandwidths: list[tuple[str, int]] = field(default_factory=list)
    times: list[tuple[int, int]] = field(default_factory=lambda: [(0, 0)])
    repeats: list[str] = field(default_factory=list)
    zones: str | None = None
    key: str | None = None
    attributes: list[Attribute] = field(default_factory=list)
    media: list[Media] = field(default_factory=list)

    @classmethod
    def parse(cls, data: str | bytes) -> SessionDescription:
        """Parse an SDP body; raises :class:`SdpError` when it is malformed."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                data = bytes(data).decode("utf-8")
            except UnicodeDecodeError as e:
                raise SdpError(f"SDP is not UTF-8: {e}") from None
        sd = cls(times=[])
        current: Media | None = None
        seen_v = seen_o = seen_s = False
        for number, raw in enumerate(data.split("\n"), 1):
            line = raw.removesuffix("\r")
            if not line:
                continue
            if len(line) < 2 or line[1] != "=" or not line[0].isalpha():
                raise SdpError(f"line {number} is not <type>=<value>: {line[:40]!r}")
            kind, value = line[0], line[2:]
            try:
                if kind == "v":
                    if value.strip() != "0":
                        raise SdpError(f"unsupported SDP version {value!r}")
                    seen_v = True
                elif kind == "o":
                    f = value.split()
                    if len(f) != 6:
                        raise SdpError("o= needs 6 fields")
                    sd.origin = Origin(f[0], int(f[1]), int(f[2]), f[3], f[4], f[5])
                    seen_o = True
                elif kind == "s":
                    sd.session_name = value
                    seen_s = True
                elif kind == "m":
                    f = value.split()
                    if len(f) < 3:
                        raise SdpError("m= needs media, port and proto")
                    port_s, _, count_s = f[1].partition("/")
                    port = int(port_s)
                    if not 0 <= port <= 65535:
                        raise SdpError(f"m= port out of range: {port}")
                    current = Media(f[0], port, f[2], f[3:], int(count_s) if count_s else None)
                    sd.media.append(current)
                elif kind == "i":
                    if current is None:
                        sd.information = value
                    else:
                        current.information = value
                elif kind == "u":
                    sd.uri = value
                elif kind == "e":
                    sd.emails.append(value)
                elif kind == "p":
                    sd.phones.append(value)
                elif kind == "c":
                    f = value.split()
                    if len(f) != 3:
                        raise SdpError("c= needs 3 fields")
                    conn = Connection(f[2], f[0], f[1])
                    if current is None:
                        sd.connection = conn
                    else:
                        current.connection = conn
                elif kind == "b":
                    bwtype, _, bw = value.partition(":")
                    target = sd.bandwidths if current is None else current.bandwidths
                    target.append((bwtype, int(bw)))
                elif kind == "t":
                    start, stop = value.split()
                    sd.times.append((int(start), int(stop)))
                elif kind == "r":
                    sd.repeats.append(value)
                elif kind == "z":
                    sd.zones = value
                elif kind == "k":
                    if current is None:
                        sd.key = value
                    else:
                        current.key = value
                elif kind == "a":
                    name, sep, val = value.partition(":")
                    attr = (name, val if sep else None)
                    (sd.attributes if current is None else current.attributes).append(attr)
                # other line types: RFC 8866 §5 says to ignore what we do not understand
            except SdpError:
                raise
            except ValueError:
                raise SdpError(f"line {number} is malformed: {line[:40]!r}") from None
        if not (seen_v and seen_o and seen_s):
            raise SdpError("SDP needs v=, o= and s= lines")
        if not sd.times:
            sd.times = [(0, 0)]
        return sd

    @property
    def direction(self) -> str | None:
        return _direction(self.attributes)

    def media_connection(self, media: Media) -> Connection | None:
        """The connection that applies to ``media`` (its own, else the session's)."""
        return media.connection or self.connection

    def lines(self) -> list[str]:
        out = [f"v={self.version}", f"o={self.origin}", f"s={self.session_name}"]
        if self.information is not None:
            out.append(f"i={self.information}")
        if self.uri is not None:
            out.append(f"u={self.uri}")
        out += [f"e={e}" for e in self.emails] + [f"p={p}" for p in self.phones]
        if self.connection is not None:
            out.append(f"c={self.connection}")
        out += [f"b={t}:{v}" for t, v in self.bandwidths]
        out += [f"t={a} {b}" for a, b in self.times] + [f"r={r}" for r in self.repeats]
        if self.zones is not None:
            out.append(f"z={self.zones}")
        if self.key is not None:
            out.append(f"k={self.key}")
        out += _attributes_str(self.attributes)
        for m in self.media:
            out += m.lines()
        return out

    def __str__(self) -> str:
        return "\r\n".join(self.lines()) + "\r\n"

    def __bytes__(self) -> bytes:
        return str(self).encode("utf-8")
