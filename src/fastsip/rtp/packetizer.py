"""Audio to RTP packets and back: ptime framing, sequence/timestamp arithmetic, talkspurts.

The packetizer cuts an encoded stream (G.711 bytes, or any fixed-width samples) into ``ptime``
frames, numbers them from a random initial sequence number and timestamp (RFC 3550 §5.1) and
sets the marker bit on the first packet of each talkspurt (RFC 3551 §4.1).  The depacketizer
turns jitter-buffer frames back into a continuous byte stream, concealing MISSING frames.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterable
from typing import Any

from fastsip.rtp._jitter import Frame, FrameKind
from fastsip.rtp._packet import RtpPacket
from fastsip.rtp.events import TelephoneEvent


def _as_bytes(audio: Any, sample_width: int) -> bytes:
    # An array can only be one if NumPy is loaded: no import for the bytes case.
    np = sys.modules.get("numpy")
    if np is not None and isinstance(audio, np.ndarray):
        if audio.dtype.itemsize != sample_width:
            raise TypeError(f"{audio.dtype} samples do not match sample_width={sample_width}")
        if sample_width > 1:
            # RTP audio payloads are in network byte order (RFC 3551 §4.5.11 for L16)
            audio = audio.astype(audio.dtype.newbyteorder(">"), copy=False)
        return bytes(np.ascontiguousarray(audio).tobytes())
    return bytes(audio)


class Packetizer:
    """Turns an audio byte stream into RTP packets of ``ptime`` seconds each."""

    def __init__(self, payload_type: int, clock_rate: int = 8000, ptime: float = 0.02, *,
                 sample_width: int = 1, ssrc: int | None = None,
                 sequence_number: int | None = None, timestamp: int | None = None) -> None:
        if not 0 <= payload_type <= 127:
            raise ValueError("payload_type must be 0..127")
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self.ptime = ptime
        self.sample_width = sample_width
        self.samples_per_frame = round(clock_rate * ptime)
        if self.samples_per_frame <= 0:
            raise ValueError("ptime too short for the clock rate")
        self.frame_bytes = self.samples_per_frame * sample_width
        # Random starting points make known-plaintext attacks on SRTP harder (RFC 3550 §5.1).
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self.sequence_number = secrets.randbits(16) if sequence_number is None else sequence_number
        self.timestamp = secrets.randbits(32) if timestamp is None else timestamp
        self._pending = b""
        self._talkspurt = True        # the first packet starts a talkspurt
        self.packets_sent = 0
        self.octets_sent = 0           # payload octets, as an SR counts them

    def packetize(self, audio: Any, *, talkspurt_start: bool = False) -> list[RtpPacket]:
        """Packets for as many whole frames as ``audio`` (plus leftovers) makes; the remainder
        waits for the next call."""
        if talkspurt_start:
            self._talkspurt = True
        data = self._pending + _as_bytes(audio, self.sample_width)
        n = len(data) // self.frame_bytes
        packets = [self._packet(data[i * self.frame_bytes:(i + 1) * self.frame_bytes])
                   for i in range(n)]
        self._pending = data[n * self.frame_bytes:]
        return packets

    def _packet(self, payload: bytes) -> RtpPacket:
        packet = RtpPacket(payload_type=self.payload_type, sequence_number=self.sequence_number,
                           timestamp=self.timestamp, ssrc=self.ssrc, payload=payload,
                           marker=self._talkspurt)
        self._talkspurt = False
        self.sequence_number = (self.sequence_number + 1) & 0xFFFF
        self.timestamp = (self.timestamp + len(payload) // self.sample_width) & 0xFFFFFFFF
        self.packets_sent += 1
        self.octets_sent += len(payload)
        return packet

    def telephone_event(self, digit: str, duration: float, *, payload_type: int = 101,
                        volume: int = 10) -> list[RtpPacket]:
        """RFC 4733 packets for one DTMF key press on this stream (same SSRC and sequence).

        Every packet carries the event's start timestamp, the first has the marker bit; the
        media timestamp then moves on by the event's duration, as if audio had been sent."""
        events = TelephoneEvent.for_digit(digit, duration, clock_rate=self.clock_rate,
                                          ptime=self.ptime, volume=volume)
        packets = []
        for i, event in enumerate(events):
            packets.append(RtpPacket(payload_type=payload_type,
                                     sequence_number=self.sequence_number,
                                     timestamp=self.timestamp, ssrc=self.ssrc,
                                     payload=bytes(event), marker=i == 0))
            self.sequence_number = (self.sequence_number + 1) & 0xFFFF
        self.timestamp = (self.timestamp + events[-1].duration) & 0xFFFFFFFF
        self._talkspurt = True        # the audio after an event starts a new talkspurt
        self.packets_sent += len(packets)
        self.octets_sent += 4 * len(packets)
        return packets

    def flush(self) -> list[RtpPacket]:
        """A last, short packet for whatever is pending (end of stream)."""
        if not self._pending:
            return []
        payload, self._pending = self._pending, b""
        return [self._packet(payload)]

    def silence(self, duration: float) -> None:
        """Skip ``duration`` seconds without sending (DTX): the timestamp moves on, the sequence
        number does not, and the next packet starts a talkspurt."""
        self._pending = b""
        self.timestamp = (self.timestamp + round(duration * self.clock_rate)) & 0xFFFFFFFF
        self._talkspurt = True


class Depacketizer:
    """Jitter-buffer frames back to a continuous stream of fixed-width samples.

    A MISSING frame is concealed by repeating the last good frame once and by ``silence``
    after that (a receiver with a real PLC decodes the frames itself); EMPTY gives silence.
    """

    def __init__(self, samples_per_frame: int, *, sample_width: int = 1,
                 silence: bytes = b"\xff") -> None:
        self.frame_bytes = samples_per_frame * sample_width
        self._silence = (silence * self.frame_bytes)[:self.frame_bytes]
        self._last: bytes | None = None
        self._repeated = False

    def frame(self, frame: Frame) -> bytes:
        if frame.kind == FrameKind.NORMAL and frame.packet is not None:
            data = bytes(frame.packet.payload)
            self._last, self._repeated = data, False
            return data
        if frame.kind == FrameKind.MISSING and self._last is not None and not self._repeated:
            self._repeated = True
            return self._last
        return self._silence

    def frames(self, frames: Iterable[Frame]) -> bytes:
        return b"".join(self.frame(f) for f in frames)


def depacketize(packets: Iterable[RtpPacket], *, sample_width: int = 1,
                silence: bytes = b"\xff") -> bytes:
    """Payloads of in-order packets joined into one stream, with ``silence`` filling any
    timestamp gap (lost packets, or DTX) so the result keeps real time."""
    out = bytearray()
    next_ts: int | None = None
    for p in packets:
        if next_ts is not None:
            gap = (p.timestamp - next_ts) & 0xFFFFFFFF
            if 0 < gap < 0x80000000:
                out += (silence * (gap * sample_width))[:gap * sample_width]
        payload = bytes(p.payload)
        out += payload
        next_ts = (p.timestamp + len(payload) // sample_width) & 0xFFFFFFFF
    return bytes(out)
