"""Call quality: what one RTP stream's receiver measured, and what the listener likely heard.

:class:`QualityMeter` takes the header fields and arrival time of every packet of one stream
(sans-IO: the shell reads the clock once per datagram and passes it in) and keeps RFC 3550
numbers -- interarrival jitter (A.8, from the compiled :class:`~fastsip.rtp.RtpStats`), loss from
extended sequence numbers (A.1/A.3, wrap included), duplicates and reordering counted apart --
plus a per-second series for plotting.  The far end's RTCP receiver reports describe the other
direction and go in through :meth:`QualityMeter.on_remote_report`.

:meth:`QualityMeter.record` turns either direction into a :class:`QualityRecord`, rated with the
ITU-T G.107 E-model (:func:`r_factor`) and its MOS mapping (:func:`mos_from_r`, G.107 Annex B).
The E-model parameters and their sources are listed in docs/quality.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastsip.rtp._stats import RtpStats

__all__ = [
    "CODEC_IMPAIRMENT",
    "DEFAULT_NETWORK_DELAY",
    "G107_DEFAULTS",
    "EModelParameters",
    "QualityMeter",
    "QualityRecord",
    "QualitySample",
    "codec_impairment",
    "mos_from_r",
    "r_factor",
    "round_trip_time",
]


# --------------------------------------------------------------------------------------------
# ITU-T G.107 E-model (narrowband)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EModelParameters:
    """The E-model inputs other than delay and loss, named with G.107's symbols (lower case).

    Defaults are G.107 Table 3 ("Default values and permitted ranges for the parameters"): with
    them and no delay or loss the model gives R = 93.2.  Loudness ratings and noise levels
    describe handsets and rooms, which a packet meter cannot see, so they stay at the defaults.
    """

    slr: float = 8.0        # send loudness rating, dB
    rlr: float = 2.0        # receive loudness rating, dB
    stmr: float = 15.0      # sidetone masking rating, dB
    lstr: float = 18.0      # listener sidetone rating, dB
    ds: float = 3.0         # D-value of the telephone, send side
    dr: float = 3.0         # D-value of the telephone, receive side (enters only via LSTR/STMR)
    telr: float = 65.0      # talker echo loudness rating, dB
    wepl: float = 110.0     # weighted echo path loss, dB
    qdu: float = 1.0        # number of quantizing distortion units
    nc: float = -70.0       # circuit noise referred to the 0 dBr point, dBm0p
    nfor: float = -64.0     # noise floor at the receive side, dBmp
    ps: float = 35.0        # room noise at the send side, dB(A)
    pr: float = 35.0        # room noise at the receive side, dB(A)
    a: float = 0.0          # advantage factor (0 for wired access)
    mt: float = 100.0       # Idd: minimum perceivable delay, ms (G.107 since 2011; 100 before)
    st: float = 1.0         # Idd: delay sensitivity (1 = the original curve)


#: G.107 Table 3.
G107_DEFAULTS = EModelParameters()

#: One-way network delay assumed when no RTCP round trip is known: G.107 Table 3's default for
#: T and Ta (0 ms), i.e. only the local packetization and jitter-buffer delay are rated.
DEFAULT_NETWORK_DELAY = 0.0

#: (Ie, Bpl) per codec, from ITU-T G.113 Appendix I (Tables I.1 and I.3): G.711 has Ie = 0 and
#: Bpl = 25.1 with the packet-loss concealment of G.711 Appendix I (4.3 without it, the G.107
#: default); G.729A with VAD Ie = 11, Bpl = 19.0.
CODEC_IMPAIRMENT: dict[str, tuple[float, float]] = {
    "PCMU": (0.0, 25.1),
    "PCMA": (0.0, 25.1),
    "G729": (11.0, 19.0),
}
_G711_NO_PLC_BPL = 4.3


def codec_impairment(codec: str, plc: bool = True) -> tuple[float, float]:
    """The E-model's (Ie, Bpl) for an RTP encoding name (``PCMU``, ``PCMA``, ``G729``).

    ``plc=False`` is G.711 without concealment (Bpl 4.3).  Unknown codecs raise ValueError: a
    made-up impairment would give a confident-looking but meaningless MOS."""
    name = codec.upper().replace(".", "")
    if name in ("G711U", "G711A"):
        name = "PCMU"
    try:
        ie, bpl = CODEC_IMPAIRMENT[name]
    except KeyError:
        raise ValueError(f"no G.113 impairment values for codec {codec!r}") from None
    if not plc and name in ("PCMU", "PCMA"):
        bpl = _G711_NO_PLC_BPL
    return ie, bpl


def _log10(x: float) -> float:
    return math.log10(x)


def _basic_signal_to_noise(p: EModelParameters) -> tuple[float, float]:
    """G.107 §7.2: (Ro, No)."""
    olr = p.slr + p.rlr
    nos = p.ps - p.slr - p.ds - 100.0 + 0.004 * (p.ps - olr - p.ds - 14.0) ** 2
    pre = p.pr + 10.0 * _log10(1.0 + 10.0 ** ((10.0 - p.lstr) / 10.0))
    nor = p.rlr - 121.0 + pre + 0.008 * (pre - 35.0) ** 2
    nfo = p.nfor + p.rlr
    no = 10.0 * _log10(10.0 ** (p.nc / 10.0) + 10.0 ** (nos / 10.0)
                       + 10.0 ** (nor / 10.0) + 10.0 ** (nfo / 10.0))
    return 15.0 - 1.5 * (p.slr + no), no


def _stmro(p: EModelParameters, t: float) -> float:
    return -10.0 * _log10(math.pow(10.0, -p.stmr / 10.0)
                          + math.exp(-t / 4.0) * math.pow(10.0, -p.telr / 10.0))


def _ist(stmro: float) -> float:
    return (12.0 * math.pow(1.0 + math.pow((stmro - 13.0) / 6.0, 8), 1.0 / 8.0)
            - 28.0 * math.pow(1.0 + math.pow((stmro + 1.0) / 19.4, 35), 1.0 / 35.0)
            - 13.0 * math.pow(1.0 + math.pow((stmro - 3.0) / 33.0, 13), 1.0 / 13.0)
            + 29.0)


def _simultaneous_impairment(p: EModelParameters, ro: float, no: float, ist: float) -> float:
    """G.107 §7.3: Is = Iolr + Ist + Iq."""
    olr = p.slr + p.rlr
    xolr = olr + 0.2 * (64.0 + no - p.rlr)
    iolr = 20.0 * (math.pow(1.0 + math.pow(xolr / 8.0, 8), 1.0 / 8.0) - xolr / 8.0)
    q = 37.0 - 15.0 * _log10(p.qdu)
    g = 1.07 + 0.258 * q + 0.0602 * q * q
    y = (ro - 100.0) / 15.0 + 46.0 / 8.4 - g / 9.0
    z = 46.0 / 30.0 - g / 40.0
    iq = 15.0 * _log10(1.0 + math.pow(10.0, y) + math.pow(10.0, z))
    return iolr + ist + iq



def _delay_impairment(p: EModelParameters, ro: float, no: float, ist: float,
                      t: float, tr: float, ta: float) -> float:
    """G.107 §7.4: Id = Idte + Idle + Idd (T, Tr, Ta in ms)."""
    # Talker echo, Idte.
    terv = (p.telr - 40.0 * _log10((1.0 + t / 10.0) / (1.0 + t / 150.0))
            + 6.0 * math.exp(-0.3 * t * t))
    if p.stmr < 9.0:
        terv += ist / 2.0
    roe = -1.5 * (no - p.rlr)
    re = 80.0 + 2.5 * (terv - 14.0)
    idte = (((roe - re) / 2.0 + math.sqrt((roe - re) ** 2 / 4.0 + 100.0) - 1.0)
            * (1.0 - math.exp(-t)))
    if p.stmr > 20.0:
        idte = math.sqrt(idte * idte + ist * ist)
    # Listener echo, Idle.
    rle = 10.5 * (p.wepl + 7.0) * math.pow(tr + 1.0, -0.25)
    idle = (ro - rle) / 2.0 + math.sqrt((ro - rle) ** 2 / 4.0 + 169.0)
    # Too-long absolute delay, Idd (zero up to mT).
    if ta <= p.mt:
        idd = 0.0
    else:
        x = _log10(ta / p.mt) / _log10(2.0)
        e = 6.0 * p.st
        idd = 25.0 * (math.pow(1.0 + math.pow(x, e), 1.0 / e)
                      - 3.0 * math.pow(1.0 + math.pow(x / 3.0, e), 1.0 / e) + 2.0)
    return idte + idle + idd


def r_factor(one_way_delay_ms: float = 0.0, packet_loss_pct: float = 0.0, *,
             ie: float = 0.0, bpl: float = 4.3, burst_r: float = 1.0,
             params: EModelParameters = G107_DEFAULTS) -> float:
    """The G.107 transmission rating R = Ro - Is - Id - Ie,eff + A.

    ``one_way_delay_ms`` is the mouth-to-ear delay; for a packet network with no echo data the
    usual planning reading is used: T = Ta = that delay and Tr = 2 T (the listener's echo makes a
    round trip).  ``packet_loss_pct`` is Ppl in percent, ``burst_r`` G.107's BurstR (1 for random
    loss).  The defaults (G.107 Table 3) give 93.2."""
    if one_way_delay_ms < 0 or packet_loss_pct < 0 or burst_r <= 0 or bpl <= 0:
        raise ValueError("delay and loss must be >= 0, burst_r and bpl > 0")
    ppl = min(packet_loss_pct, 100.0)
    ro, no = _basic_signal_to_noise(params)
    t = ta = one_way_delay_ms
    ist = _ist(_stmro(params, t))
    is_ = _simultaneous_impairment(params, ro, no, ist)
    id_ = _delay_impairment(params, ro, no, ist, t, 2.0 * t, ta)
    # G.107 §7.5: Ie,eff = Ie + (95 - Ie) * Ppl / (Ppl / BurstR + Bpl)
    ie_eff = ie + (95.0 - ie) * ppl / (ppl / burst_r + bpl)
    return ro - is_ - id_ - ie_eff + params.a


def mos_from_r(r: float) -> float:
    """G.107 Annex B: the conversational-quality MOS (1..4.5) estimated from R.

    The Annex B cubic dips just below 1 for 0 < R < 6.5; it is held at 1, the floor of the
    MOS scale, so MOS never rises as R falls."""
    if r < 0:
        return 1.0
    if r > 100:
        return 4.5
    return max(1.0, 1.0 + 0.035 * r + r * (r - 60.0) * (100.0 - r) * 7e-6)


def round_trip_time(arrival_ntp_middle: int, lsr: int, dlsr: int) -> float | None:
    """RFC 3550 §6.4.1 round trip from a report block: A - LSR - DLSR, in seconds.

    All three are "middle 32 bits" NTP values (1/65536 s units); ``arrival_ntp_middle`` is when
    the report arrived.  None when the block carries no LSR (no SR received yet) or the result is
    negative (clocks or fields are off)."""
    if lsr == 0:
        return None
    rtt_units = (arrival_ntp_middle - lsr - dlsr) & 0xFFFFFFFF
    if rtt_units >= 0x80000000:     # negative as a signed 32-bit value
        return None
    return rtt_units / 65536.0


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------

@dataclass(slots=True)
class QualitySample:
    """One second of a stream: the packets that arrived in it, the packets whose media time
    falls in it and never arrived, and the RFC 3550 jitter during it (mean and max, ms)."""

    second: int
    packets: int = 0
    lost: int = 0
    jitter_ms: float = 0.0
    jitter_ms_max: float = 0.0


@dataclass(slots=True)
class QualityRecord:
    """One direction of one call, as measured and as the E-model rates it.

    ``direction`` is ``"rx"`` (what we received, measured here) or ``"tx"`` (what we sent, as
    the far end's RTCP receiver reports describe it).  ``loss_pct`` is network loss
    (``lost / expected``); ``discarded`` counts packets that arrived too late for the jitter
    buffer, which the E-model rates as lost too.  ``rtt_ms`` is None when no RTCP round trip was
    measured (the E-model then used :data:`DEFAULT_NETWORK_DELAY`).  ``r_factor`` and ``mos``
    are None when there is nothing to rate: no packet received (rx), no report (tx)."""

    call_id: str
    direction: str
    codec: str
    packets: int
    expected: int
    lost: int
    loss_pct: float
    discarded: int
    duplicates: int
    reordered: int
    jitter_ms_mean: float
    jitter_ms_max: float
    rtt_ms: float | None
    one_way_delay_ms: float
    burst_r: float
    r_factor: float | None
    mos: float | None
    series: list[QualitySample] = field(default_factory=list)

    def as_dict(self, series: bool = True) -> dict[str, object]:
        """Plain values for JSON/CSV; the series as a list of objects (or left out)."""
        out: dict[str, object] = {
            name: getattr(self, name) for name in self.__dataclass_fields__ if name != "series"
        }
        if series:
            out["series"] = [
                {"second": s.second, "packets": s.packets, "lost": s.lost,
                 "jitter_ms": s.jitter_ms, "jitter_ms_max": s.jitter_ms_max}
                for s in self.series
            ]
        return out


class _Second:
    """Per-second accumulators (arrival time for packets/jitter, media time for loss)."""

    __slots__ = (
        "expected",
        "jitter_count",
        "jitter_max",
        "jitter_sum",
        "lost",
        "packets",
        "received",
    )

    def __init__(self) -> None:
        self.packets = 0
        self.lost = 0           # tx: the far end's cumulative count at its last report here
        self.expected = 0
        self.received = 0
        self.jitter_sum = 0.0
        self.jitter_count = 0
        self.jitter_max = 0.0


# How far before the first packet a reordered packet may still be placed (sequence numbers).
_REORDER_MARGIN = 128


class QualityMeter:
    """Receiver-side quality of one RTP stream (one SSRC), fed per packet by the shell.

    Loss is counted from extended sequence numbers over a bitmap of the packets seen (one bit per
    packet: 23 kB per hour of 20 ms audio), so a duplicate never hides a loss and a late packet
    fills its gap wherever it lands.  Jitter is the RFC 3550 A.8 estimate of the compiled
    :class:`RtpStats`, sampled after every packet; its mean and maximum over the call are what
    Wireshark's RTP stream analysis shows as mean and max jitter."""

    def __init__(self, clock_rate: int = 8000, ptime: float = 0.02, codec: str = "PCMU", *,
                 jitter_buffer_delay: float | None = None, plc: bool = True,
                 max_dropout: int = 3000, max_misorder: int = 100) -> None:
        if clock_rate <= 0 or ptime <= 0:
            raise ValueError("clock_rate and ptime must be positive")
        self.clock_rate = clock_rate
        self.ptime = ptime
        self.codec = codec
        self.ie, self.bpl = codec_impairment(codec, plc)
        #: Playout delay the jitter buffer adds (s); default two packets, a common fixed depth.
        self.jitter_buffer_delay = 2 * ptime if jitter_buffer_delay is None else jitter_buffer_delay
        self.max_dropout = max_dropout
        self.max_misorder = max_misorder
        self._stats = RtpStats(clock_rate, max_dropout=max_dropout, max_misorder=max_misorder)
        self.rtt: float | None = None
        # receive direction
        self.packets = 0            # every datagram accounted, duplicates included
        self.duplicates = 0
        self.reordered = 0          # arrived after a higher sequence number (not duplicates)
        self.ignored = 0            # A.1 rejected (unconfirmed jump) or older than the bitmap
        self._start: float | None = None
        self._seconds: dict[int, _Second] = {}
        self._jitter_sum = 0.0
        self._jitter_count = 0
        self._jitter_max = 0.0
        # current sequence segment (a confirmed restart opens a new one)
        self._anchor = 0            # extended seq of bitmap bit 0
        self._first_ext = 0         # extended seq of the segment's first packet
        self._first_second = 0      # media second of the segment's first packet
        self._max_ext = -1
        self._min_ext = 0
        self._seen = bytearray()
        self._received_unique = 0
        # totals of closed segments
        self._closed_expected = 0
        self._closed_received = 0
        self._closed_runs = 0
        self._closed_lost_after_loss = 0
        self._pending_jump: tuple[int, float] | None = None
        # transmit direction, from the far end's receiver reports
        self._remote_reports = 0
        self._remote_fraction_sum = 0
        self._remote_cumulative = 0
        # (extended highest sequence, cumulative lost) of the first and the latest report
        self._remote_first: tuple[int, int] | None = None
        self._remote_last: tuple[int, int] | None = None
        self._remote_jitter_sum = 0.0
        self._remote_jitter_max = 0.0
        self._remote_sent: int | None = None
        self._remote_series: dict[int, _Second] = {}
        self._remote_start: float | None = None

    # ---------------------------------------------------------------- receive direction

    def on_packet(self, sequence_number: int, timestamp: int, arrival_time: float) -> None:
        """Account one received RTP packet (header fields, arrival time in seconds, any epoch)."""
        seq = sequence_number & 0xFFFF
        stats = self._stats
        had_transit = self._start is not None
        valid = stats.update_fields(seq, timestamp & 0xFFFFFFFF, arrival_time)
        if self._start is None:
            self._start = arrival_time
            self._open_segment(seq, 0)
        elif not valid and stats.probation == 0:
            # A.1: a big jump, not yet confirmed by a following packet: not counted (a stray
            # packet must not inflate the expected count by thousands).
            self.ignored += 1
            self._pending_jump = (seq, arrival_time)
            return
        else:
            delta = (seq - (self._max_ext & 0xFFFF)) & 0xFFFF
            if self.max_dropout <= delta <= 0x10000 - self.max_misorder:
                # A.1 confirmed a restart (two sequential packets after a jump): new segment,
                # starting with the packet that opened the jump.
                self._close_segment()
                second = int(arrival_time - self._start)
                pending = self._pending_jump
                if pending is not None and ((seq - pending[0]) & 0xFFFF) == 1:
                    self._open_segment(pending[0], second)
                    self.ignored -= 1       # it was not stray after all
                    self._mark(self._anchor + _REORDER_MARGIN, pending[1])
                    self._count_arrival(pending[1], None)
                else:
                    self._open_segment(seq, second)
        self._pending_jump = None
        ext = self._extend(seq)
        self._mark(ext, arrival_time)
        # The jitter estimate moved only if RtpStats already had a previous transit time.
        self._count_arrival(arrival_time, stats.jitter_seconds * 1000.0 if had_transit else None)

    def _open_segment(self, seq: int, second: int) -> None:
        self._anchor = (1 << 16) + seq - _REORDER_MARGIN   # keep room below the first packet
        self._first_ext = self._anchor + _REORDER_MARGIN
        self._first_second = second
        self._max_ext = self._first_ext - 1
        self._min_ext = self._first_ext
        self._seen = bytearray()
        self._received_unique = 0

    def _extend(self, seq: int) -> int:
        """The extended sequence number nearest the highest one seen (RFC 3550 A.1)."""
        delta = (seq - (self._max_ext & 0xFFFF)) & 0xFFFF
        if delta >= 0x8000:
            delta -= 0x10000
        return self._max_ext + delta

    def _mark(self, ext: int, arrival_time: float) -> None:
        index = ext - self._anchor
        if index < 0:
            self.ignored += 1        # before the bitmap: cannot tell a duplicate from a late one
            return
        byte, bit = index >> 3, 1 << (index & 7)
        if byte >= len(self._seen):
            self._seen.extend(bytes(byte - len(self._seen) + 64))
        if self._seen[byte] & bit:
            self.duplicates += 1
            return
        self._seen[byte] |= bit
        self._received_unique += 1
        if ext > self._max_ext:
            self._max_ext = ext
        elif ext < self._max_ext:
            self.reordered += 1
        self._min_ext = min(self._min_ext, ext)

    def _count_arrival(self, arrival_time: float, jitter_ms: float | None) -> None:
        assert self._start is not None
        self.packets += 1
        sec = self._second(self._seconds, max(0, int(arrival_time - self._start)))
        sec.packets += 1
        if jitter_ms is not None:
            self._jitter_sum += jitter_ms
            self._jitter_count += 1
            self._jitter_max = max(self._jitter_max, jitter_ms)
            sec.jitter_sum += jitter_ms
            sec.jitter_count += 1
            sec.jitter_max = max(sec.jitter_max, jitter_ms)

    @staticmethod
    def _second(table: dict[int, _Second], second: int) -> _Second:
        sec = table.get(second)
        if sec is None:
            sec = table[second] = _Second()
        return sec

    def _segment_losses(self) -> tuple[int, int, int]:
        """(expected, runs of consecutive losses, losses that follow a loss) of this segment,
        and the media-time loss of each second is added to the per-second table.

        Works on the bitmap as a string of "0"/"1" (bit i at index i) so that an hour of
        packets is counted by str.count, not by a Python loop per packet."""
        if self._received_unique == 0:
            return 0, 0, 0
        lo, hi = self._min_ext - self._anchor, self._max_ext - self._anchor
        nbits = len(self._seen) * 8
        bits = format(int.from_bytes(self._seen, "little"), "b").zfill(nbits)[::-1]
        expected = hi - lo + 1
        lost = expected - bits.count("1", lo, hi + 1)
        # The range starts on a received packet, so every run of losses follows a received
        # one: runs = occurrences of "10" (received, then lost) in bit order.
        runs = bits.count("10", lo, hi + 1)
        # Bin by media time: packet offset o (from the segment's first packet) is in second
        # floor(o * ptime); second k starts at offset ceil(k / ptime) (the epsilon keeps
        # k / ptime exact for 20 ms: 50 k).
        first = self._first_ext - self._anchor
        k_lo = math.floor((lo - first) * self.ptime + 1e-9)
        k_hi = math.floor((hi - first) * self.ptime + 1e-9)
        for k in range(k_lo, k_hi + 1):
            a = max(lo, first + math.ceil((k - 1e-9) / self.ptime))
            b = min(hi + 1, first + math.ceil((k + 1 - 1e-9) / self.ptime))
            if a >= b:
                continue
            sec = self._second(self._seconds, max(0, self._first_second + k))
            sec.expected += b - a
            sec.received += bits.count("1", a, b)
        return expected, runs, lost - runs

    def _close_segment(self) -> None:
        expected, runs, after_loss = self._segment_losses()
        self._closed_expected += expected
        self._closed_received += self._received_unique
        self._closed_runs += runs
        self._closed_lost_after_loss += after_loss

    @property
    def jitter_ms(self) -> float:
        """The current RFC 3550 jitter estimate, in ms (what an RR would carry now)."""
        return self._stats.jitter_seconds * 1000.0

    # ---------------------------------------------------------------- round trip, far end

    def set_round_trip(self, seconds: float) -> None:
        """The round-trip time from RTCP (A - LSR - DLSR, see :func:`round_trip_time`)."""
        if seconds < 0:
            raise ValueError("round-trip time must be >= 0")
        self.rtt = seconds

    def set_jitter_buffer_delay(self, seconds: float) -> None:
        """The playout delay the jitter buffer currently adds (its target depth)."""
        if seconds < 0:
            raise ValueError("jitter buffer delay must be >= 0")
        self.jitter_buffer_delay = seconds

    def on_remote_report(self, fraction_lost: int, cumulative_lost: int, jitter_ts_units: int,
                         extended_highest_sequence: int | None = None, *,
                         packets_sent: int | None = None, now: float | None = None) -> None:
        """A reception report block the far end sent about our stream (RFC 3550 §6.4.1).

        ``fraction_lost`` is in 1/256 units, ``jitter_ts_units`` in timestamp units.  Give
        ``packets_sent`` (our sender's count when the report arrived) for an exact loss
        percentage -- without it, the extended highest sequence numbers of successive reports
        give the loss between them -- and ``now`` (same clock as arrival times) to place the
        report in the series."""
        self._remote_reports += 1
        self._remote_fraction_sum += fraction_lost
        self._remote_cumulative = cumulative_lost
        if extended_highest_sequence is not None:
            point = (extended_highest_sequence, cumulative_lost)
            if self._remote_first is None:
                self._remote_first = point
            self._remote_last = point
        if packets_sent is not None:
            self._remote_sent = packets_sent
        jitter_ms = jitter_ts_units * 1000.0 / self.clock_rate
        self._remote_jitter_sum += jitter_ms
        self._remote_jitter_max = max(self._remote_jitter_max, jitter_ms)
        if now is not None:
            if self._remote_start is None:
                # The series shares the receive side's time axis when there is one.
                self._remote_start = self._start if self._start is not None else now
            sec = self._second(self._remote_series, max(0, int(now - self._remote_start)))
            sec.packets += 1
            sec.lost = max(0, cumulative_lost)     # cumulative here; differenced in record()
            sec.jitter_sum += jitter_ms
            sec.jitter_count += 1
            sec.jitter_max = max(sec.jitter_max, jitter_ms)

    # ---------------------------------------------------------------- the record

    def one_way_delay(self) -> float:
        """Mouth-to-ear delay the E-model is given (s): half the RTCP round trip (or
        :data:`DEFAULT_NETWORK_DELAY`), plus one packet of packetization, plus the jitter
        buffer's playout delay."""
        network = self.rtt / 2.0 if self.rtt is not None else DEFAULT_NETWORK_DELAY
        return network + self.ptime + self.jitter_buffer_delay

    def record(self, call_id: str, direction: str, discarded: int = 0) -> QualityRecord:
        """The quality record of ``direction`` ("rx": measured here; "tx": from the far end's
        reports) so far.  ``discarded`` is the jitter buffer's late-discard count for rx."""
        if direction == "rx":
            return self._record_rx(call_id, discarded)
        if direction == "tx":
            return self._record_tx(call_id, discarded)
        raise ValueError(f"direction must be 'rx' or 'tx', not {direction!r}")

    def _rate(self, loss_pct: float, burst_r: float,
              measured: bool) -> tuple[float, float | None, float | None]:
        delay_ms = self.one_way_delay() * 1000.0
        if not measured:
            return delay_ms, None, None
        r = r_factor(delay_ms, loss_pct, ie=self.ie, bpl=self.bpl, burst_r=burst_r)
        return delay_ms, r, mos_from_r(r)

    def _record_rx(self, call_id: str, discarded: int) -> QualityRecord:
        # Copy the per-second table so the open segment's losses are added to a snapshot.
        saved = {k: _copy_second(v) for k, v in self._seconds.items()}
        expected, runs, after_loss = self._segment_losses()
        table, self._seconds = self._seconds, saved
        expected += self._closed_expected
        received = self._received_unique + self._closed_received
        runs += self._closed_runs
        after_loss += self._closed_lost_after_loss
        lost = expected - received
        loss_pct = 100.0 * lost / expected if expected else 0.0
        burst_r = _burst_ratio(expected, lost, runs, after_loss)
        rated_pct = 100.0 * min(expected, lost + discarded) / expected if expected else 0.0
        delay_ms, r, mos = self._rate(rated_pct, burst_r, expected > 0)
        series = [
            QualitySample(
                second, sec.packets, sec.expected - sec.received,
                sec.jitter_sum / sec.jitter_count if sec.jitter_count else 0.0, sec.jitter_max)
            for second, sec in sorted(table.items())
        ]
        return QualityRecord(
            call_id=call_id, direction="rx", codec=self.codec, packets=self.packets,
            expected=expected, lost=lost, loss_pct=loss_pct, discarded=discarded,
            duplicates=self.duplicates, reordered=self.reordered,
            jitter_ms_mean=self._jitter_sum / self._jitter_count if self._jitter_count else 0.0,
            jitter_ms_max=self._jitter_max, rtt_ms=_ms(self.rtt), one_way_delay_ms=delay_ms,
            burst_r=burst_r, r_factor=r, mos=mos, series=series,
        )

    def _record_tx(self, call_id: str, discarded: int) -> QualityRecord:
        lost = max(0, self._remote_cumulative)
        n = self._remote_reports
        first, last = self._remote_first, self._remote_last
        if self._remote_sent:
            expected = max(self._remote_sent, lost)
            loss_pct = 100.0 * lost / expected
        elif first is not None and last is not None and last[0] > first[0]:
            # Without our own count: the loss between the first and the latest report, over the
            # packets the far end expected in between (both fields are cumulative).
            expected = 0
            loss_pct = 100.0 * max(0, last[1] - first[1]) / (last[0] - first[0])
        else:
            # Failing that, the reports' interval fractions are the best estimate.
            expected = 0
            loss_pct = 100.0 * self._remote_fraction_sum / 256.0 / n if n else 0.0
        delay_ms, r, mos = self._rate(min(100.0, loss_pct), 1.0, n > 0)
        series: list[QualitySample] = []
        previous = 0
        for second, sec in sorted(self._remote_series.items()):
            series.append(QualitySample(second, 0, max(0, sec.lost - previous),
                                        sec.jitter_sum / sec.jitter_count, sec.jitter_max))
            previous = sec.lost
        return QualityRecord(
            call_id=call_id, direction="tx", codec=self.codec,
            packets=self._remote_sent or 0, expected=expected, lost=lost, loss_pct=loss_pct,
            discarded=discarded, duplicates=0, reordered=0,
            jitter_ms_mean=self._remote_jitter_sum / n if n else 0.0,
            jitter_ms_max=self._remote_jitter_max, rtt_ms=_ms(self.rtt),
            one_way_delay_ms=delay_ms, burst_r=1.0, r_factor=r, mos=mos, series=series,
        )


def _copy_second(sec: _Second) -> _Second:
    new = _Second()
    new.packets, new.expected, new.received = sec.packets, sec.expected, sec.received
    new.lost = sec.lost
    new.jitter_sum, new.jitter_count, new.jitter_max = sec.jitter_sum, sec.jitter_count, sec.jitter_max
    return new


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _burst_ratio(expected: int, lost: int, runs: int, after_loss: int) -> float:
    """G.107's BurstR = 1 / (p + q) of the two-state (Gilbert) loss model fitted to the stream:
    p = P(loss | previous received), q = P(received | previous lost).  1 for random loss; more
    for bursty loss.  1 when there is too little loss to tell."""
    received = expected - lost
    if lost == 0 or received == 0 or runs == 0:
        return 1.0
    p = runs / received                 # a received packet followed by a loss opens a run
    q = (lost - after_loss) / lost       # a lost packet followed by a received one ends a run
    if p + q <= 0:
        return 1.0
    return 1.0 / (p + q)
