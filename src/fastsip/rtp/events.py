"""RFC 4733 telephone-event payloads (DTMF digits and other named events over RTP)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from fastsip.rtp.errors import RtpError

_EVENT = struct.Struct("!BBH")

#: RFC 4733 §3.2: events 0-15 are the DTMF keys.
DTMF_EVENTS = "0123456789*#ABCD"


@dataclass(frozen=True, slots=True)
class TelephoneEvent:
    """One RFC 4733 §2.3 event block: event code, E bit, volume (-dBm0) and duration (ticks)."""

    event: int
    end: bool = False
    volume: int = 10
    duration: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.event <= 255:
            raise ValueError("event must be 0..255")
        if not 0 <= self.volume <= 63:
            raise ValueError("volume must be 0..63")
        if not 0 <= self.duration <= 0xFFFF:
            raise ValueError("duration must be 0..65535")

    @classmethod
    def parse(cls, payload: bytes | bytearray | memoryview) -> TelephoneEvent:
        """The first event block of a telephone-event payload (extra blocks are redundancy)."""
        if len(payload) < 4:
            raise RtpError("telephone-event payload shorter than 4 octets")
        event, flags, duration = _EVENT.unpack_from(payload)
        # The R bit (0x40) is reserved: senders set it to zero, receivers ignore it (§2.3.3).
        return cls(event, bool(flags & 0x80), flags & 0x3F, duration)

    def __bytes__(self) -> bytes:
        return _EVENT.pack(self.event, (0x80 if self.end else 0) | self.volume, self.duration)

    @property
    def digit(self) -> str | None:
        """The DTMF key for events 0-15, else None."""
        return DTMF_EVENTS[self.event] if self.event < 16 else None

    @classmethod
    def for_digit(cls, digit: str, duration: float, *, clock_rate: int = 8000,
                  ptime: float = 0.02, volume: int = 10) -> list[TelephoneEvent]:
        """The payloads a sender emits for one key press of ``duration`` seconds (RFC 4733
        §2.5.1): an update every ``ptime`` with the duration so far, then the final
        (E bit set) payload three times (§2.5.1.4), all for the same event timestamp."""
        step = round(clock_rate * ptime)
        total = max(step, round(clock_rate * duration))
        if total > 0xFFFF:
            raise ValueError("events longer than 65535 ticks need segmenting (RFC 4733 §2.5.1.3)")
        updates = [cls.from_digit(digit, volume=volume, duration=d)
                   for d in range(step, total, step)]
        final = cls.from_digit(digit, end=True, volume=volume, duration=total)
        return [*updates, final, final, final]

    @classmethod
    def from_digit(cls, digit: str, *, end: bool = False, volume: int = 10,
                   duration: int = 0) -> TelephoneEvent:
        index = DTMF_EVENTS.find(digit.upper())
        if len(digit) != 1 or index < 0:
            raise ValueError(f"not a DTMF key: {digit!r}")
        return cls(index, end, volume, duration)
