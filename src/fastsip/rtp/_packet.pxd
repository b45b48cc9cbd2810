# cython: language_level=3
# Shared with the other compiled RTP modules (stats, jitter buffer), which read the header fields
# of a parsed packet as C integers instead of through Python attribute lookups.

cdef class RtpPacket:
    cdef public unsigned short sequence_number
    cdef public unsigned int timestamp
    cdef public unsigned int ssrc
    cdef public bint marker
    cdef unsigned char _payload_type
    cdef unsigned char _csrc_count
    cdef bint _has_extension
    cdef unsigned short _ext_profile
    # The datagram (or payload object for a constructed packet) and where each part lies in it:
    # nothing is copied at parse time.
    cdef object _data
    cdef Py_ssize_t _csrc_offset
    cdef Py_ssize_t _ext_offset      # start of the extension *data* (after profile/length)
    cdef Py_ssize_t _ext_length      # bytes of extension data
    cdef Py_ssize_t _payload_offset
    cdef Py_ssize_t _payload_length
    cdef Py_ssize_t _padding_length  # including the count octet; 0 = no padding
    cdef object _csrc                # tuple, built on first access (or given)
    cdef object _ext_block           # bytes of extension data for constructed packets
