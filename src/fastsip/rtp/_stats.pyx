# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""RFC 3550 receiver statistics for one synchronization source.

A.1 sequence validation (probation, dropout, misorder, 64-bit extended sequence numbers),
A.3 loss (expected, received, cumulative and interval fraction lost) and A.8 interarrival jitter.
The caller demultiplexes by SSRC and passes each packet with its arrival time (seconds, any epoch).
"""

from libc.math cimport fabs

from fastsip.rtp._packet cimport RtpPacket

from fastsip.rtp._numpy import numpy_module

DEF RTP_SEQ_MOD = 65536


cdef class RtpStats:
    """Receiver statistics of one RTP source, as an RFC 3550 receiver report carries them."""

    def __init__(self, double clock_rate, *, int min_sequential=2, int max_dropout=3000,
                 int max_misorder=100):
        if clock_rate <= 0:
            raise ValueError("clock_rate must be positive")
        self.clock_rate = clock_rate
        self.min_sequential = min_sequential
        self.max_dropout = max_dropout
        self.max_misorder = max_misorder
        self.ssrc = None

    cdef void _init_seq(self, unsigned int seq) noexcept:
        self._base_seq = seq
        self._max_seq = seq
        self._bad_seq = RTP_SEQ_MOD + 1   # so seq == bad_seq is false
        self._cycles = 0
        self.received = 0
        self._received_prior = 0
        self._expected_prior = 0

    cdef int _update_seq(self, unsigned int seq) noexcept:
        """RFC 3550 A.1 update_seq(); returns 1 when the packet is valid."""
        cdef unsigned int udelta = (seq - self._max_seq) & 0xFFFF
        if self._probation:
            if seq == ((self._max_seq + 1) & 0xFFFF):
                self._probation -= 1
                self._max_seq = seq
                if self._probation == 0:
                    # Unlike A.1's listing, count the probation packets as received and start
                    # the expected range at the first of them: an analyser's numbers then match
                    # (tshark counts every packet), and the loss figure is unchanged.
                    self._init_seq(seq)
                    self._base_seq = (seq - (self.min_sequential - 1)) & 0xFFFF
                    self.received = self.min_sequential
                    if self._base_seq > seq:   # the probation run wrapped: count that cycle
                        self._cycles = RTP_SEQ_MOD
                    return 1
            else:
                self._probation = self.min_sequential - 1
                self._max_seq = seq
            return 0
        elif udelta < <unsigned int>self.max_dropout:
            # in order, with permissible gap
            if seq < self._max_seq:
                self._cycles += RTP_SEQ_MOD
            self._max_seq = seq
        elif udelta <= RTP_SEQ_MOD - <unsigned int>self.max_misorder:
            # the sequence number made a very large jump
            if seq == self._bad_seq:
                # two sequential packets: assume the other side restarted without telling us
                self._init_seq(seq)
            else:
                self._bad_seq = (seq + 1) & 0xFFFF
                self.bad += 1
                return 0
        else:
            # duplicate or reordered packet
            self.misordered += 1
        self.received += 1
        return 1

    cpdef bint update(self, RtpPacket packet, double arrival_time):
        """Account one packet that arrived at ``arrival_time`` (seconds).

        Returns False when A.1 does not count it (probation, or a jump not yet confirmed)."""
        return self.update_fields(packet.sequence_number, packet.timestamp, arrival_time,
                                  packet.ssrc)

    cpdef bint update_fields(self, unsigned int sequence_number, unsigned int timestamp,
                             double arrival_time, object ssrc=None):
        """:meth:`update` from header fields (for batch columns or another parser's packets)."""
        if not self._started:
            self.ssrc = ssrc
        return self.update_c(sequence_number, timestamp, arrival_time)

    cdef bint update_c(self, unsigned int sequence_number, unsigned int timestamp,
                       double arrival_time) noexcept:
        """:meth:`update_fields` for compiled callers: C arguments, ``ssrc`` left alone."""
        cdef int valid
        cdef double d
        cdef int ts_delta
        cdef unsigned int seq = sequence_number & 0xFFFF
        if not self._started:
            self._started = True
            self._init_seq(seq)
            self._max_seq = (seq - 1) & 0xFFFF
            self._probation = self.min_sequential
            self._cycles = 0
        valid = self._update_seq(seq)
        if valid or self._probation:
            # A.8: D(i,j) = (Rj - Ri) - (Sj - Si), in timestamp units; the timestamp difference
            # is taken modulo 2**32 so a timestamp wrap is not a jump.
            if self._have_transit:
                ts_delta = <int>(timestamp - self._last_ts)
                d = (arrival_time - self._last_arrival) * self.clock_rate - ts_delta
                self._jitter += (fabs(d) - self._jitter) / 16.0
            self._have_transit = True
            self._last_arrival = arrival_time
            self._last_ts = timestamp
        if valid:
            self.last_extended_sequence = self._cycles + seq
        return valid

    cdef void reset_c(self) noexcept:
        """Forget the source: the next packet starts a new one (A.1 probation included), as
        when a relay sees the SSRC change.  Settings (clock rate, A.1 limits) stay."""
        self._init_seq(0)
        self._max_seq = 0
        self._probation = 0
        self._bad_seq = 0
        self.bad = 0
        self.misordered = 0
        self._started = False
        self.ssrc = None
        self._have_transit = False
        self._last_arrival = 0.0
        self._last_ts = 0
        self._jitter = 0.0
        self.last_extended_sequence = 0

    def update_many(self, sequence_numbers, timestamps, arrival_times, ssrc=None):
        """:meth:`update_fields` over NumPy columns (e.g. from ``parse_batch``), in C.

        Returns how many packets A.1 counted."""
        numpy = numpy_module()
        cdef const unsigned short[:] seq = numpy.ascontiguousarray(sequence_numbers,
                                                                   dtype=numpy.uint16)
        cdef const unsigned int[:] ts = numpy.ascontiguousarray(timestamps, dtype=numpy.uint32)
        cdef const double[:] arr = numpy.ascontiguousarray(arrival_times, dtype=numpy.float64)
        cdef Py_ssize_t i, n = seq.shape[0]
        cdef Py_ssize_t counted = 0
        if ts.shape[0] != n or arr.shape[0] != n:
            raise ValueError("columns differ in length")
        for i in range(n):
            counted += self.update_fields(seq[i], ts[i], arr[i], ssrc)
        return counted

    @property
    def probation(self):
        """Packets still needed before the source is valid (0 once it is)."""
        return self._probation

    @property
    def base_sequence(self):
        return self._base_seq

    @property
    def cycles(self):
        """Sequence number wraps, as a count (A.1 keeps it shifted by 16 bits)."""
        return self._cycles >> 16

    @property
    def max_sequence(self):
        """The highest 16-bit sequence number received."""
        return self._max_seq

    @property
    def extended_max_sequence(self):
        """The highest sequence number received, extended with the wrap count (A.1)."""
        return self._cycles + self._max_seq

    @property
    def expected(self):
        """A.3: packets expected, from the first valid sequence number to the highest."""
        if not self._started or self._probation:
            return 0
        return <long long>(self._cycles + self._max_seq) - <long long>self._base_seq + 1

    @property
    def cumulative_lost(self):
        """A.3: expected - received; negative when duplicates arrived.  Clamped to 24 bits
        signed only when a report is built."""
        return self.expected - <long long>self.received

    @property
    def fraction_lost(self):
        """A.3: fraction lost since the last :meth:`report`, in 1/256 units (0..255)."""
        cdef long long expected_interval = self.expected - <long long>self._expected_prior
        cdef long long received_interval = (<long long>self.received
                                            - <long long>self._received_prior)
        cdef long long lost_interval = expected_interval - received_interval
        if expected_interval == 0 or lost_interval <= 0:
            return 0
        return (lost_interval << 8) // expected_interval

    def report(self):
        """Close the report interval: returns ``(fraction_lost, cumulative_lost)`` for a
        reception report block and starts a new interval."""
        fraction = self.fraction_lost
        cumulative = self.cumulative_lost
        self._expected_prior = self.expected
        self._received_prior = self.received
        return fraction, cumulative

    @property
    def jitter(self):
        """A.8 interarrival jitter as an RR carries it: an integer in timestamp units."""
        return <unsigned int>self._jitter

    @property
    def jitter_seconds(self):
        """The same jitter estimate, unrounded, in seconds."""
        return self._jitter / self.clock_rate

    def __repr__(self):
        return (f"RtpStats(clock_rate={self.clock_rate:g}, received={self.received}, "
                f"expected={self.expected}, cumulative_lost={self.cumulative_lost}, "
                f"jitter={self.jitter})")
