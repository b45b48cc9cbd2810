# cython: language_level=3
# Shared with the relay's packet path (_relay.pyx), which keeps one RtpStats per RTP leg and
# feeds it header fields read from its receive buffers in C: one home for RFC 3550 statistics,
# and no Python object per packet.

cimport cython

from fastsip.rtp._packet cimport RtpPacket


@cython.final
cdef class RtpStats:
    cdef readonly double clock_rate
    cdef readonly int min_sequential, max_dropout, max_misorder
    # A.1 state
    cdef unsigned int _max_seq       # highest 16-bit sequence number seen
    cdef unsigned long long _cycles  # count of wraps, shifted: multiples of 2**16
    cdef unsigned long long _base_seq
    cdef unsigned int _bad_seq
    cdef int _probation
    cdef readonly unsigned long long received
    cdef unsigned long long _expected_prior, _received_prior
    cdef readonly unsigned long long bad, misordered
    cdef bint _started
    cdef readonly object ssrc
    # A.8 state
    cdef bint _have_transit
    cdef double _last_arrival
    cdef unsigned int _last_ts
    cdef double _jitter              # in timestamp units, not scaled
    cdef readonly unsigned long long last_extended_sequence

    cdef void _init_seq(self, unsigned int seq) noexcept
    cdef int _update_seq(self, unsigned int seq) noexcept
    # The C entry points: no Python object is made or looked up (the SSRC stays with the caller).
    cdef bint update_c(self, unsigned int sequence_number, unsigned int timestamp,
                       double arrival_time) noexcept
    cdef void reset_c(self) noexcept
    cpdef bint update(self, RtpPacket packet, double arrival_time)
    cpdef bint update_fields(self, unsigned int sequence_number, unsigned int timestamp,
                             double arrival_time, object ssrc=*)
