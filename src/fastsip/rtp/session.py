"""A sans-IO RTP session for one G.711 audio stream of a call: pacing, RTCP, DTMF, echo, recording.

:class:`MediaSession` is fed datagrams and the time, and says what to send; it never reads a
clock or touches a socket (the asyncio shell, :mod:`fastsip.asyncio.rtp`, does both, for every
session of a process with one loop timer).  What it does:

- sends a source (16-bit PCM, encoded once up front) as PCMU or PCMA every ``ptime``.  Frame
  *k* is due at ``epoch + k * ptime`` and carries timestamp ``ts0 + k * samples_per_frame``:
  both derive from the frame index, never from a running sum, so there is no drift however
  long the call.  A late loop sends the frames due at once, at most ``max_burst``; frames
  older than that are skipped (the timestamp jumps, the sequence number does not).
  A source is played once, then nothing is sent (no comfort noise; RTCP goes on), or looped.
- symmetric RTP (RFC 4961): once the peer's packets arrive, we send to where they come from.
- hold: a direction without "send" (from the peer's sendonly/inactive) stops sending.
- echo: what arrives goes back rewritten with our SSRC, sequence numbers and timestamps.
- recording: received audio through a :class:`JitterBuffer` and a :class:`Depacketizer`
  (MISSING frames concealed) into 16-bit PCM.
- DTMF (RFC 4733): :meth:`MediaSession.send_dtmf` paces events out (marker on the first packet,
  one timestamp per event, the end packet three times); received events are reported once
  each, however many end packets come.
- RTCP (RFC 3550): SR or RR plus SDES CNAME at the §6.3/A.7 interval, BYE at :meth:`close`;
  the round-trip time from the LSR/DLSR of the peer's reports.

RTP and RTCP go out of different sockets, so they come out of different calls:
:meth:`MediaSession.tick` returns RTP datagrams, :meth:`MediaSession.poll_rtcp` and
:meth:`MediaSession.close` RTCP ones.

A shell may attach :attr:`MediaSession.send_state` to a compiled
:class:`~fastsip.rtp._sender.Sender`: the session then grants it the plain audio frames (up to
its next RFC 4733 event) instead of returning them, and wants a tick only at
``send_state.wake``.  The sequence number, marker and frame grid live in that state for both
paths, so the session stays the authority on what is sent.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt

from fastsip.rtp._g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from fastsip.rtp._jitter import FrameKind, JitterBuffer
from fastsip.rtp._packet import RtpPacket
from fastsip.rtp._sender import SendState, max_payload
from fastsip.rtp._stats import RtpStats
from fastsip.rtp.events import TelephoneEvent
from fastsip.rtp.packetizer import Depacketizer
from fastsip.rtp.rtcp import (
    SDES_CNAME,
    Bye,
    ReceiverReport,
    ReceptionReport,
    RtcpPacket,
    SdesChunk,
    SenderReport,
    SourceDescription,
    build_compound,
    ntp_timestamp,
    parse_rtcp,
    report_block,
    rtcp_interval,
)

if TYPE_CHECKING:
    from fastsip.sdp import NegotiatedMedia

__all__ = ["CODECS", "Addr", "Datagram", "MediaSession", "Meter", "SendStats"]

log = logging.getLogger("fastsip.rtp.session")

Addr = tuple[str, int]
Datagram = tuple[bytes, Addr]
Samples = npt.NDArray[np.int16]

_Encoder = Callable[[Any], npt.NDArray[np.uint8]]
_Decoder = Callable[[Any], npt.NDArray[np.int16]]

#: codec name -> (static payload type, encoder, decoder, the code of a zero sample)
CODECS: dict[str, tuple[int, _Encoder, _Decoder, int]] = {
    "PCMU": (0, ulaw_encode, ulaw_decode, 0xFF),
    "PCMA": (8, alaw_encode, alaw_decode, 0xD5),
}

_HEADER = struct.Struct("!BBHII")
_SENDING = ("sendrecv", "sendonly")
_FOREVER = 1 << 62        # a grant without end: frame numbers never get there
_RECEIVING = ("sendrecv", "recvonly")


class Meter(Protocol):
    """What a quality meter needs from a session (``fastsip.rtp.quality.QualityMeter``)."""

    def on_packet(self, sequence_number: int, timestamp: int, arrival_time: float) -> Any: ...

    def set_round_trip(self, seconds: float) -> Any: ...


@dataclass
class SendStats:
    """What this session sent: RTP packets/octets (payload octets, as an SR counts them)."""

    packets: int = 0
    octets: int = 0
    audio_packets: int = 0
    event_packets: int = 0
    echo_packets: int = 0
    skipped_frames: int = 0        # frames dropped because the loop was later than max_burst
    rtcp_packets: int = 0
    max_lateness: float = 0.0      # worst (now - due time) of a frame sent by tick(), seconds
    #: every frame's lateness, when a measurement asks for it (None: not kept)
    lateness: list[float] | None = None


@dataclass
class _Dtmf:
    digit: str
    start_frame: int
    events: list[TelephoneEvent] = field(default_factory=list)


class MediaSession:
    """One RTP audio stream (G.711 PCMU/PCMA, optional RFC 4733 events), sans-IO.

    Times (``now``) are seconds on the shell's monotonic clock; ``wallclock_offset`` is added
    to get Unix time for RTCP's NTP timestamps.
    """

    def __init__(self, *, codec: str = "PCMU", payload_type: int | None = None,
                 clock_rate: int = 8000, ptime: float = 0.02,
                 telephone_event: int | None = 101, remote: Addr | None = None,
                 remote_rtcp: Addr | None = None, direction: str = "sendrecv",
                 source: Samples | None = None, loop: bool = False, echo: bool = False,
                 record: bool = False, cname: str | None = None, ssrc: int | None = None,
                 max_burst: int = 5, jitter_delay: float = 0.06,
                 wallclock_offset: float = 0.0, session_bandwidth: float | None = None,
                 rng: Callable[[], float] = random.random) -> None:
        codec = codec.upper()
        if codec not in CODECS:
            raise ValueError(f"unsupported codec {codec!r} (PCMU or PCMA)")
        static_pt, self._encode, self._decode, self._zero_code = CODECS[codec]
        self.codec = codec
        self.payload_type = static_pt if payload_type is None else payload_type
        self.telephone_event = telephone_event
        self.clock_rate = clock_rate
        if not 0.005 <= ptime <= 0.2:
            raise ValueError("ptime must be 5..200 ms")
        self.ptime = ptime
        self.samples_per_frame = round(clock_rate * ptime)
        self._remote = remote
        self._sdp_remote = remote
        self.remote_rtcp = remote_rtcp if remote_rtcp is not None else \
            ((remote[0], remote[1] + 1) if remote is not None else None)
        self._direction = direction
        self._echo_mode = echo
        self.record = record
        self.ssrc = secrets.randbits(32) if ssrc is None else ssrc
        self.cname = cname or f"fastsip-{self.ssrc:08x}"
        self.max_burst = max(1, max_burst)
        self.jitter_delay = jitter_delay
        self.wallclock_offset = wallclock_offset
        self._rng = rng
        # RFC 3550 §6.2: RTCP gets 5 % of the session bandwidth; G.711 at this ptime plus
        # RTP/UDP/IPv4 headers (40 octets) is the session bandwidth.
        if session_bandwidth is None:
            session_bandwidth = (self.samples_per_frame + 40) / ptime
        self.rtcp_bandwidth = 0.05 * session_bandwidth

        # sending: the sequence number, marker and frame grid live in a compiled SendState,
        # shared with the shell's compiled send path (fastsip.rtp._sender.Sender), which sends
        # the frames tick() grants it.  Both paths number packets from the same fields, so
        # switching between them (an RFC 4733 event, echo, hold) hands nothing over.
        self._tx = SendStats()
        self.epoch: float | None = None
        self._ts0 = secrets.randbits(32)
        self._st = SendState(ssrc=self.ssrc, payload_type=self.payload_type,
                             samples_per_frame=self.samples_per_frame, ptime=ptime)
        self._st.ts0 = self._ts0
        self._st.sequence = secrets.randbits(16)
        self._st.marker = True
        self._st.max_burst = self.max_burst
        self._st_remote: Addr | None = None      # the remote last given to the SendState
        self._source: bytes = b""
        self._source_loop = loop
        self._source_frame0 = 0
        if source is not None:
            self.set_source(source, loop=loop)
        self._dtmf: deque[_Dtmf] = deque()
        self._dtmf_end_frame = 0

        # receiving
        self.latched = False
        self.rtcp_latched = False
        self.rx = RtpStats(clock_rate)
        self.meter: Meter | None = None
        #: called when the peer's SSRC changes (a new source, RFC 3550 §8.2): its return value
        #: becomes :attr:`meter`, so each source is measured on its own (None: keep the meter)
        self.new_meter: Callable[[], Meter | None] | None = None
        #: called with each RTCP reception report block the peer sends about our stream (our
        #: SSRC) and its arrival time: what a quality report's "tx" direction is made of
        self.on_report_block: Callable[[ReceptionReport, float], object] | None = None
        self.malformed = 0              # datagrams that were not RTP / RTCP: dropped
        self.foreign_payload = 0        # RTP of a payload type we did not agree
        self.event_packets = 0
        self.remote_ssrc: int | None = None
        self._remote_ts0: int | None = None   # echo: the source's first timestamp...
        self._echo_ts = self._ts0                  # ...and ours for it
        self._echo_next = self._ts0
        #: statistics of the peer's earlier sources (its SSRC changed)
        self.rx_history: list[RtpStats] = []
        self.dtmf_received: list[tuple[str, int]] = []
        self.on_dtmf: Callable[[str, int], object] | None = None
        self._ev_ts: int | None = None
        self._ev_digit: str | None = None
        self._ev_duration = 0
        self._ev_ended = True
        self._ev_done: deque[int] = deque(maxlen=16)

        # recording
        self._jb: JitterBuffer | None = None
        self._discarded_before = 0        # frames the jitter buffers of earlier sources dropped
        self._depacketizer: Depacketizer | None = None
        self._play_epoch: float | None = None
        self._play_ptime = ptime
        self._next_slot = 0
        self._pending_empty = 0
        self._recorded: list[bytes] = []
        self._filling = True              # a new jitter buffer's first EMPTY frames: not silence

        # RTCP
        self.round_trip: float | None = None
        self.remote_bye = False
        self._next_rtcp: float | None = None
        self._avg_rtcp_size = 128.0
        self._initial_rtcp = True
        self._sent_since_report = False
        self._last_sr_ntp: int | None = None      # the peer's last SR, for LSR/DLSR
        self._last_sr_arrival: float | None = None
        self._closed = False

    # The sending fields the compiled send path shares (see __init__).
    @property
    def _sequence(self) -> int:
        return int(self._st.sequence)

    @_sequence.setter
    def _sequence(self, value: int) -> None:
        self._st.sequence = value

    @property
    def _next_frame(self) -> int:
        return int(self._st.next_frame)

    @_next_frame.setter
    def _next_frame(self, value: int) -> None:
        self._st.next_frame = value

    @property
    def _marker(self) -> bool:
        return bool(self._st.marker)

    @_marker.setter
    def _marker(self, value: bool) -> None:
        self._st.marker = value

    # What the compiled path's grant depends on: a change takes it back (and asks the shell
    # for a tick), so the next tick decides afresh.
    @property
    def remote(self) -> Addr | None:
        """Where RTP goes (the SDP's address until the peer's packets latch it)."""
        return self._remote

    @remote.setter
    def remote(self, value: Addr | None) -> None:
        self._remote = value
        self._revoke()

    @property
    def direction(self) -> str:
        return self._direction

    @direction.setter
    def direction(self, value: str) -> None:
        self._direction = value
        self._revoke()

    @property
    def echo(self) -> bool:
        """Echo mode: send what arrives, nothing else."""
        return self._echo_mode

    @echo.setter
    def echo(self, value: bool) -> None:
        self._echo_mode = value
        # echo mode sends no source: the compiled path gets none, so its grant only keeps
        # the frame grid (and this session needs no tick per frame)
        self._st.source = b"" if value else self._source
        self._revoke()

    def _revoke(self) -> None:
        st = self._st
        st.grant = 0
        st.wake = -1.0

    @property
    def send_state(self) -> SendState:
        """The sending state a shell attaches to its compiled :class:`~fastsip.rtp._sender.
        Sender` (with the RTP socket's fd) so that :meth:`tick` may grant it plain audio
        frames instead of returning them."""
        return self._st

    @property
    def tx(self) -> SendStats:
        """What this session sent, the compiled path's packets included."""
        self._settle()
        return self._tx

    def _settle(self) -> None:
        # Fold what the compiled path sent since the last look into the statistics.
        st = self._st
        if st.packets:
            tx = self._tx
            tx.packets += st.packets
            tx.octets += st.octets
            tx.audio_packets += st.audio_packets
            st.packets = st.octets = st.audio_packets = 0
            self._sent_since_report = True
        if st.skipped_frames:
            self._tx.skipped_frames += st.skipped_frames
            st.skipped_frames = 0
        self._tx.max_lateness = max(self._tx.max_lateness, st.max_lateness)

    # -- set-up ----------------------------------------------------------------------------

    @classmethod
    def from_negotiated(cls, media: NegotiatedMedia, **kwargs: Any) -> MediaSession:
        """A session for one agreed stream of :func:`fastsip.sdp.negotiate`."""
        codec = media.codec.encoding.upper()
        if media.codec.clock_rate != 8000 or codec not in CODECS:
            raise ValueError(f"cannot send {media.codec.encoding}/{media.codec.clock_rate} "
                             "(PCMU or PCMA only)")
        kwargs.setdefault("ptime", media.ptime / 1000)
        return cls(codec=codec, payload_type=media.payload_type,
                   telephone_event=media.telephone_event,
                   remote=(media.remote_address, media.remote_port),
                   direction=media.direction, **kwargs)

    def update(self, media: NegotiatedMedia) -> None:
        """A new offer/answer (re-INVITE): the direction, and the peer's address when the SDP
        moved it (then we latch again to where its packets come from)."""
        self.set_direction(media.direction)
        if media.telephone_event is not None:
            self.telephone_event = media.telephone_event
        remote = (media.remote_address, media.remote_port)
        if media.remote_address in ("0.0.0.0", "::", "") or not media.remote_port:
            return                               # RFC 2543 hold: the direction says it all
        if remote != self._sdp_remote:
            self._sdp_remote = remote
            self.remote = remote
            self.remote_rtcp = (remote[0], remote[1] + 1)
            self.latched = self.rtcp_latched = False

    def set_direction(self, direction: str) -> None:
        """Our direction (``sendrecv``, ``sendonly``, ``recvonly``, ``inactive``): without
        "send" nothing goes out but RTCP; sending again starts a talkspurt."""
        if direction not in ("sendrecv", "sendonly", "recvonly", "inactive"):
            raise ValueError(f"not a direction: {direction}")
        if direction in _SENDING and self.direction not in _SENDING:
            self._marker = True
        self.direction = direction

    @property
    def sending(self) -> bool:
        return self.direction in _SENDING and self.remote is not None and not self._closed

    def set_source(self, samples: Samples, *, loop: bool = False) -> None:
        """Audio to send from the next frame on: 16-bit mono PCM at the clock rate, encoded
        once here.  The last frame is padded with silence."""
        pcm = np.ascontiguousarray(samples, dtype=np.int16)
        pad = -len(pcm) % self.samples_per_frame
        if pad:
            pcm = np.concatenate([pcm, np.zeros(pad, np.int16)])
        self._source = bytes(self._encode(pcm))
        self._source_loop = loop
        self._source_frame0 = self._next_frame
        self._marker = True
        st = self._st
        st.source = b"" if self._echo_mode else self._source
        st.loop = loop
        st.source_frame0 = self._source_frame0

    def start(self, now: float) -> None:
        """Frame 0 is due at ``now``; the first RTCP report after the initial interval."""
        if self.epoch is not None:
            return
        self.epoch = now
        self._next_frame = 0
        self._st.epoch = now
        self._revoke()
        self._schedule_rtcp(now)

    def frame_time(self, index: int) -> float:
        """When frame ``index`` is due."""
        if self.epoch is None:
            raise ValueError("the session has not started")
        return self.epoch + index * self.ptime

    # -- sending ---------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """The earliest time something is due (a frame, a playout slot, an RTCP report)."""
        if self.epoch is None or self._closed:
            return None
        due = self._next_rtcp
        if self.sending:
            t = self.epoch + self._next_frame * self.ptime
            due = t if due is None else min(due, t)
        if self._play_epoch is not None:
            t = self._play_epoch + self._next_slot * self._play_ptime
            due = t if due is None else min(due, t)
        return due

    def tick(self, now: float) -> list[Datagram]:
        """RTP datagrams due at ``now`` (in order), and the recording's playout slots.

        With the send state attached to a shell's Sender, plain audio frames are *granted*
        instead: the Sender sends frames below ``send_state.grant`` as they fall due, and
        ``send_state.wake`` says when this session next needs a tick of its own (a frame the
        grant does not cover, a playout slot, an RTCP report)."""
        out = self._tick(now)
        self._st.wake = self._wake()
        return out

    def _wake(self) -> float:
        epoch = self.epoch
        if epoch is None or self._closed:
            return math.inf
        st = self._st
        frame = st.next_frame
        if st.attached and st.grant > frame:
            frame = st.grant
        wake = epoch + frame * self.ptime
        if self._next_rtcp is not None and self._next_rtcp < wake:
            wake = self._next_rtcp
        if self._play_epoch is not None:
            wake = min(wake, self._play_epoch + self._next_slot * self._play_ptime)
        return wake

    def _tick(self, now: float) -> list[Datagram]:
        if self._play_epoch is not None:
            self._playout(now)
        epoch = self.epoch
        if epoch is None or self._closed:
            return []
        # frame k is due at epoch + k * ptime; the epsilon absorbs float error at exact ticks
        due = math.floor((now - epoch) / self.ptime + 1e-6) + 1
        st = self._st
        first = st.next_frame
        if due <= first:
            return []
        if due <= st.grant and st.attached:
            return []                            # the Sender's (it skips a late loop's too)
        if not self.sending or self.remote is None:
            st.next_frame = due
            self._dtmf_expire(due)
            return []
        if due - first > self.max_burst:
            # The loop was late by more than max_burst frames: drop the oldest rather than
            # send a long burst; timestamps stay on the frame grid, so the peer sees a gap.
            self._tx.skipped_frames += due - self.max_burst - first
            first = due - self.max_burst
            st.next_frame = first
            st.marker = True
        if st.attached:
            limit = self._grant_limit()
            if due <= limit:
                st.grant = limit                 # the shell's Sender builds and sends them
                return []
        out: list[Datagram] = []
        dest = self.remote
        tx = self._tx
        for k in range(first, due):
            data = self._frame(k)
            if data is not None:
                out.append((data, dest))
                late = now - (epoch + k * self.ptime)
                tx.max_lateness = max(tx.max_lateness, late)
                if tx.lateness is not None:
                    tx.lateness.append(late)
        self._next_frame = due
        return out

    def _grant_limit(self) -> int:
        """The first frame the compiled path may not send: the next RFC 4733 event's (or
        never, as far as the source goes; in echo mode its source is empty, so it sends
        nothing); 0 with a per-frame lateness log or without an IP-literal destination."""
        if self._tx.lateness is not None or self.samples_per_frame > max_payload:
            return 0
        remote = self._remote
        if remote is not self._st_remote:
            self._st_remote = remote
            if remote is None or not self._st.set_remote(remote[0], remote[1]):
                self._st_remote = None
                return 0
        if not self._st.has_remote:
            return 0
        return self._dtmf[0].start_frame if self._dtmf else _FOREVER

    def _frame(self, k: int) -> bytes | None:
        while self._dtmf:
            ev = self._dtmf[0]
            if k < ev.start_frame:
                break
            i = k - ev.start_frame
            if i < len(ev.events) and self.telephone_event is not None:
                event = ev.events[i]
                self._tx.event_packets += 1
                if i == len(ev.events) - 1:
                    self._dtmf.popleft()
                    self._marker = True          # the audio after an event starts a talkspurt
                return self._packet(self.telephone_event, i == 0,
                                    self._ts0 + ev.start_frame * self.samples_per_frame,
                                    bytes(event))
            self._dtmf.popleft()
        if self.echo:
            return None                          # echo mode sends what arrives, nothing else
        source = self._source
        if not source:
            return None
        spf = self.samples_per_frame
        offset = (k - self._source_frame0) * spf
        if offset < 0:
            return None
        if offset >= len(source):
            if not self._source_loop:
                return None
            offset %= len(source)
        marker = self._marker
        self._marker = False
        self._tx.audio_packets += 1
        return self._packet(self.payload_type, marker, self._ts0 + k * spf,
                            source[offset:offset + spf])

    def _packet(self, payload_type: int, marker: bool, timestamp: int, payload: bytes) -> bytes:
        seq = self._sequence
        self._sequence = (seq + 1) & 0xFFFF
        tx = self._tx
        tx.packets += 1
        tx.octets += len(payload)
        self._sent_since_report = True
        return _HEADER.pack(0x80, payload_type | (0x80 if marker else 0), seq,
                            timestamp & 0xFFFFFFFF, self.ssrc) + payload

    def _dtmf_expire(self, due: int) -> None:
        while self._dtmf and self._dtmf[0].start_frame + len(self._dtmf[0].events) <= due:
            self._dtmf.popleft()

    def send_dtmf(self, digits: str, now: float, duration: float = 0.1,
                  gap: float = 0.1) -> float:
        """Queue RFC 4733 events for ``digits`` (0-9 * # A-D), the first at ``now`` (or when
        the digits queued before end), each ``duration`` long then ``gap`` apart.  Events
        replace audio while they last.  Returns when the last one ends."""
        if self.telephone_event is None:
            raise ValueError("no telephone-event payload type was agreed")
        if self.epoch is None:
            raise ValueError("the session has not started")
        presses = [TelephoneEvent.for_digit(d, duration, clock_rate=self.clock_rate,
                                            ptime=self.ptime) for d in digits]  # validates
        start = max(self._next_frame, self._dtmf_end_frame,
                    math.ceil((now - self.epoch) / self.ptime - 1e-6))
        spacing = max(1, round((duration + gap) / self.ptime))
        for digit, events in zip(digits, presses):
            self._dtmf.append(_Dtmf(digit.upper(), start, events))
            start += max(len(events) + 1, spacing)
        self._dtmf_end_frame = start
        self._revoke()
        return self.epoch + start * self.ptime

    # -- receiving -------------------------------------------------------------------------

    def receive(self, data: bytes, source_addr: Addr, now: float) -> list[Datagram]:
        """An RTP datagram from ``source_addr``.  Returns what goes back at once (echo)."""
        if self._closed:
            return []
        try:
            packet = RtpPacket.parse(data)
        except ValueError:                       # RtpError: not RTP, dropped and counted
            self.malformed += 1
            return []
        pt = packet.payload_type
        if not self.latched and (pt == self.payload_type or pt == self.telephone_event):
            # Symmetric RTP: the peer sends from where it receives (NAT or not).  Only a
            # payload type the SDP agreed latches: a stray datagram that merely parses as RTP
            # (an RTCP report sent to the wrong port reads as payload type 72-76, RFC 5761
            # §4) would otherwise send the whole call's audio to wherever it came from.
            self.latched = True
            if source_addr != self.remote:
                log.debug("RTP latched to %s (SDP said %s)", source_addr, self.remote)
                self.remote = source_addr
                if not self.rtcp_latched:
                    self.remote_rtcp = (source_addr[0], source_addr[1] + 1)
        if pt == self.telephone_event and pt != self.payload_type:
            self.event_packets += 1
            self._on_event(packet)
            return []
        if pt != self.payload_type:
            self.foreign_payload += 1
            return []
        if packet.ssrc != self.remote_ssrc:
            if self.remote_ssrc is not None:
                self._new_source(now)
            self.remote_ssrc = packet.ssrc
        self.rx.update(packet, now)
        meter = self.meter
        if meter is not None:
            meter.on_packet(packet.sequence_number, packet.timestamp, now)
        if self.record and self.direction in _RECEIVING:
            self._record_packet(packet, now)
        if self.echo and self.sending and self.remote is not None:
            return [(self._echo(packet), self.remote)]
        return []

    def _new_source(self, now: float) -> None:
        # The peer's SSRC changed (another media source behind the same address, RFC 3550
        # §8.2): its numbering starts afresh, so do its statistics, the recording's jitter
        # buffer (the old one is played out first) and the echo's timestamp mapping.
        log.debug("RTP source %08x replaced by a new one", self.remote_ssrc or 0)
        self.rx_history.append(self.rx)
        self.rx = RtpStats(self.clock_rate)
        if self._jb is not None:
            self._playout(now)
            for frame in self._jb.flush():
                self._play_frame(frame)
            self._discarded_before += self._jb.discarded
            self._jb = None
            self._play_epoch = None
            self._pending_empty = 0
        if self._remote_ts0 is not None:
            self._echo_ts = self._echo_next
            self._remote_ts0 = None
        if self.new_meter is not None:
            self.meter = self.new_meter()

    def _echo(self, packet: RtpPacket) -> bytes:
        marker = packet.marker
        if self._remote_ts0 is None:
            self._remote_ts0 = packet.timestamp
            marker = True
        ts = self._echo_ts + ((packet.timestamp - self._remote_ts0) & 0xFFFFFFFF)
        self._echo_next = ts + packet.payload_length
        self._tx.echo_packets += 1
        return self._packet(self.payload_type, marker, ts, bytes(packet.payload))

    def _on_event(self, packet: RtpPacket) -> None:
        try:
            event = TelephoneEvent.parse(packet.payload)
        except ValueError:
            self.malformed += 1
            return
        ts = packet.timestamp
        if ts != self._ev_ts:
            if ts in self._ev_done:
                return                           # a late copy of an event already reported
            self._finish_event()
            self._ev_ts = ts
            self._ev_digit = event.digit
            self._ev_duration = event.duration
            self._ev_ended = False
        elif event.duration > self._ev_duration:
            self._ev_duration = event.duration
        if event.end and not self._ev_ended:
            self._finish_event()

    def _finish_event(self) -> None:
        # Reported once: at the first end packet (the other two are redundancy, §2.5.1.4), or
        # when a new event starts / the session closes without one (all ends lost).
        if self._ev_ended or self._ev_ts is None:
            return
        self._ev_ended = True
        self._ev_done.append(self._ev_ts)
        if self._ev_digit is None:
            return                               # a non-DTMF event (tones, flash...)
        ms = round(self._ev_duration * 1000 / self.clock_rate)
        self.dtmf_received.append((self._ev_digit, ms))
        if self.on_dtmf is not None:
            self.on_dtmf(self._ev_digit, ms)

    # -- recording -------------------------------------------------------------------------

    def _record_packet(self, packet: RtpPacket, now: float) -> None:
        if self._jb is None:
            # Packetize the recording by what the peer sends (a=ptime is only a wish), when
            # that is a sane packet (10-60 ms of G.711); else by our ptime.  (A 1-sample
            # "frame" would also make a 1 ms jitter buffer, which random timestamps crash:
            # see test_jitter_buffer_delay_histogram_overflow.)
            samples = packet.payload_length
            if not self.clock_rate // 100 <= samples <= self.clock_rate * 3 // 50:
                samples = self.samples_per_frame
            self._play_ptime = samples / self.clock_rate
            # A recorder wants every frame more than low latency: excess delay is trimmed only
            # after a second of it (a burst of slots after the process stalled is not excess).
            self._jb = JitterBuffer(self.clock_rate, self._play_ptime, delay=self.jitter_delay,
                                    max_delay=max(0.5, 2 * self.jitter_delay),
                                    shrink_after=max(10, round(1.0 / self._play_ptime)))
            self._depacketizer = Depacketizer(samples, silence=bytes((self._zero_code,)))
            self._play_epoch = now
            self._next_slot = 0
            self._st.wake = -1.0                 # playout slots from now on
            self._filling = True
        self._jb.put(packet, now)

    def _playout(self, now: float) -> None:
        jb, play_epoch = self._jb, self._play_epoch
        if jb is None or play_epoch is None:
            return
        due = math.floor((now - play_epoch) / self._play_ptime + 1e-6) + 1
        for slot in range(self._next_slot, due):
            self._play_frame(jb.get(play_epoch + slot * self._play_ptime))
        self._next_slot = max(due, self._next_slot)

    def _play_frame(self, frame: Any) -> None:
        if frame.kind == FrameKind.EMPTY:
            # Filling, or nothing came: silence only between sounds (not while a new buffer
            # fills, nor after the last), so the recording keeps real time without padding.
            if not self._filling:
                self._pending_empty += 1
            return
        assert self._depacketizer is not None
        if self._pending_empty:
            self._recorded.append(bytes((self._zero_code,))
                                  * (self._pending_empty * self._depacketizer.frame_bytes))
            self._pending_empty = 0
        self._recorded.append(self._depacketizer.frame(frame))
        self._filling = False

    def recorded(self) -> Samples:
        """The received audio so far as 16-bit PCM (all of it after :meth:`close`)."""
        return self._decode(b"".join(self._recorded)) if self._recorded else \
            np.zeros(0, np.int16)

    # -- RTCP ------------------------------------------------------------------------------

    def _schedule_rtcp(self, now: float) -> None:
        senders = int(self._sent_since_report) + int(self.rx.received > 0)
        self._next_rtcp = now + rtcp_interval(
            2, senders, self.rtcp_bandwidth, self._sent_since_report, self._avg_rtcp_size,
            self._initial_rtcp, self._rng)
        self._initial_rtcp = False

    def poll_rtcp(self, now: float) -> list[Datagram]:
        """The RTCP compound due at ``now``, if any (for the RTCP socket)."""
        if self._next_rtcp is None or now < self._next_rtcp or self._closed:
            return []
        out = self._rtcp(now, bye=False)
        self._schedule_rtcp(now)
        self._sent_since_report = False
        self._st.wake = self._wake()
        return out

    def rtcp_report(self, now: float) -> list[RtcpPacket]:
        """The report (SR if we sent since the last one, else RR) and SDES we would send now."""
        self._settle()
        blocks: list[ReceptionReport] = []
        if self.rx.ssrc is not None and self.rx.received > 0:
            blocks.append(report_block(self.rx, last_sr_ntp=self._last_sr_ntp,
                                       last_sr_arrival=self._last_sr_arrival, now=now))
        report: RtcpPacket
        if self._sent_since_report and self.epoch is not None:
            rtp_now = self._ts0 + round((now - self.epoch) * self.clock_rate)
            report = SenderReport(self.ssrc, ntp_timestamp(now + self.wallclock_offset),
                                  rtp_now & 0xFFFFFFFF, self.tx.packets & 0xFFFFFFFF,
                                  self.tx.octets & 0xFFFFFFFF, blocks)
        else:
            report = ReceiverReport(self.ssrc, blocks)
        sdes = SourceDescription([SdesChunk(self.ssrc, [(SDES_CNAME, self.cname.encode())])])
        return [report, sdes]

    def _rtcp(self, now: float, *, bye: bool) -> list[Datagram]:
        packets = self.rtcp_report(now)
        if bye:
            packets.append(Bye([self.ssrc]))
        data = build_compound(packets)
        self._avg_rtcp_size = len(data) / 16 + self._avg_rtcp_size * 15 / 16   # §6.3.3
        if self.remote_rtcp is None:
            return []
        self._tx.rtcp_packets += 1
        return [(data, self.remote_rtcp)]

    def receive_rtcp(self, data: bytes, source_addr: Addr, now: float) -> None:
        """An RTCP datagram from ``source_addr``: SR times (for our LSR/DLSR), report blocks
        about us (round-trip time), BYE.  Malformed ones are dropped and counted."""
        if self._closed:
            return
        try:
            packets = parse_rtcp(data)
        except ValueError:
            self.malformed += 1
            return
        if not self.rtcp_latched:
            self.rtcp_latched = True
            self.remote_rtcp = source_addr
        for p in packets:
            if isinstance(p, SenderReport):
                self._last_sr_ntp = p.ntp_timestamp
                self._last_sr_arrival = now
                self._report_blocks(p.reports, now)
            elif isinstance(p, ReceiverReport):
                self._report_blocks(p.reports, now)
            elif isinstance(p, Bye) and (self.remote_ssrc is None
                                         or self.remote_ssrc in p.sources):
                self.remote_bye = True

    def _report_blocks(self, blocks: Sequence[ReceptionReport], now: float) -> None:
        for block in blocks:
            if block.ssrc != self.ssrc:
                continue
            if self.on_report_block is not None:
                self.on_report_block(block, now)
            if block.lsr == 0:
                continue                         # no SR of ours reached the peer yet
            # RFC 3550 §6.4.1: RTT = A - LSR - DLSR, in 1/65536 s, A our arrival time.
            arrival = (ntp_timestamp(now + self.wallclock_offset) >> 16) & 0xFFFFFFFF
            rtt = ((arrival - block.lsr - block.dlsr) & 0xFFFFFFFF) / 65536
            if rtt < 60.0:                       # else a wrapped negative: clocks disagree
                self.round_trip = rtt
                if self.meter is not None:
                    self.meter.set_round_trip(rtt)

    # -- the end ---------------------------------------------------------------------------

    def close(self, now: float) -> list[Datagram]:
        """Stop: the last report with a BYE (for the RTCP socket); the recording's buffered
        frames are played out; an event whose end never came is reported."""
        if self._closed:
            return []
        out = self._rtcp(now, bye=True) if self.epoch is not None else []
        self._closed = True
        self._revoke()
        self._finish_event()
        if self._jb is not None:
            if self._play_epoch is not None:
                self._playout(now)
            for frame in self._jb.flush():
                self._play_frame(frame)
        return out

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def discarded(self) -> int:
        """Frames the recording's jitter buffers dropped (too late, or excess delay): what a
        quality report counts as discarded (0 when not recording)."""
        return self._discarded_before + (self._jb.discarded if self._jb is not None else 0)

    def stats(self) -> dict[str, Any]:
        """Per-direction figures for a quality report (plain numbers)."""
        rx = self.rx
        return {
            "sent": {"packets": self.tx.packets, "octets": self.tx.octets,
                     "audio": self.tx.audio_packets, "events": self.tx.event_packets,
                     "echo": self.tx.echo_packets, "skipped_frames": self.tx.skipped_frames,
                     "rtcp": self.tx.rtcp_packets, "max_lateness": self.tx.max_lateness},
            "received": {"packets": rx.received, "expected": rx.expected,
                         "lost": rx.cumulative_lost, "jitter": rx.jitter_seconds,
                         "ssrc": rx.ssrc, "events": self.event_packets,
                         "malformed": self.malformed, "foreign_payload": self.foreign_payload,
                         "discarded": self.discarded},
            "round_trip": self.round_trip,
            "dtmf": list(self.dtmf_received),
        }
