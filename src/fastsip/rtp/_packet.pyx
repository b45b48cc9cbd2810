# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""RTP packets (RFC 3550 §5.1) with RFC 8285 header extensions, parsed without copying.

``RtpPacket.parse`` validates the fixed header, the CSRC list, the extension header and the
padding in one pass and records offsets into the datagram; the payload is a memoryview over it.
``parse_batch`` parses many datagrams straight into NumPy columns for analysis at line rate.
"""

cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy, memset

from fastsip.rtp._numpy import numpy_module

from fastsip.rtp.errors import RtpError

# RFC 8285 §4.2 / §4.3: the "defined by profile" values that mark the two extension forms.
DEF ONE_BYTE_PROFILE = 0xBEDE
DEF TWO_BYTE_PROFILE_MASK = 0xFFF0
DEF TWO_BYTE_PROFILE = 0x1000

ONE_BYTE_EXTENSION_PROFILE = ONE_BYTE_PROFILE
TWO_BYTE_EXTENSION_PROFILE = TWO_BYTE_PROFILE


cdef inline const unsigned char* _acquire(object data, Py_buffer* view,
                                          Py_ssize_t* length) except NULL:
    """Pointer and length of ``data``; bytes take a fast path, anything else the buffer protocol."""
    if type(data) is bytes:
        view.ndim = -12345    # marks "nothing to release"; a real export never has it
        length[0] = PyBytes_GET_SIZE(data)
        return <const unsigned char*>PyBytes_AS_STRING(data)
    PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    length[0] = view.len
    return <const unsigned char*>view.buf


cdef inline void _release(Py_buffer* view) noexcept:
    if view.ndim != -12345:
        PyBuffer_Release(view)


cdef inline unsigned int _be16(const unsigned char* p) noexcept nogil:
    return (<unsigned int>p[0] << 8) | p[1]


cdef inline unsigned int _be32(const unsigned char* p) noexcept nogil:
    return ((<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16)
            | (<unsigned int>p[2] << 8) | p[3])


cdef inline void _put16(unsigned char* p, unsigned int v) noexcept nogil:
    p[0] = (v >> 8) & 0xFF
    p[1] = v & 0xFF


cdef inline void _put32(unsigned char* p, unsigned int v) noexcept nogil:
    p[0] = (v >> 24) & 0xFF
    p[1] = (v >> 16) & 0xFF
    p[2] = (v >> 8) & 0xFF
    p[3] = v & 0xFF


# Error codes of the C-level header check, shared by parse() and parse_batch().
DEF OK = 0
DEF E_SHORT = 1
DEF E_VERSION = 2
DEF E_CSRC = 3
DEF E_EXTENSION = 4
DEF E_PADDING = 5

_REASONS = {
    E_SHORT: "RTP packet length < 12 (fixed header)",
    E_VERSION: "RTP packet has bad version (not 2)",
    E_CSRC: "RTP packet has truncated CSRC list",
    E_EXTENSION: "RTP packet has truncated header extension",
    E_PADDING: "RTP packet has invalid padding length",
}


cdef struct _Layout:
    Py_ssize_t csrc_offset
    Py_ssize_t ext_offset
    Py_ssize_t ext_length
    unsigned int ext_profile
    Py_ssize_t payload_offset
    Py_ssize_t payload_length
    Py_ssize_t padding_length


cdef inline int _check(const unsigned char* p, Py_ssize_t n, _Layout* out) noexcept nogil:
    """Validate the layout of one RTP datagram; every length is checked against ``n``."""
    cdef Py_ssize_t pos, cc, ext_words, pad
    if n < 12:
        return E_SHORT
    if (p[0] >> 6) != 2:
        return E_VERSION
    cc = p[0] & 0x0F
    pos = 12 + 4 * cc
    if pos > n:
        return E_CSRC
    out.csrc_offset = 12
    out.ext_offset = 0
    out.ext_length = 0
    out.ext_profile = 0
    if p[0] & 0x10:
        if pos + 4 > n:
            return E_EXTENSION
        out.ext_profile = _be16(p + pos)
        ext_words = _be16(p + pos + 2)
        pos += 4
        if pos + 4 * ext_words > n:
            return E_EXTENSION
        out.ext_offset = pos
        out.ext_length = 4 * ext_words
        pos += 4 * ext_words
    pad = 0
    if p[0] & 0x20:
        # RFC 3550 §5.1: the last octet counts the padding octets, itself included.
        if pos >= n:
            return E_PADDING
        pad = p[n - 1]
        if pad == 0 or pos + pad > n:
            return E_PADDING
    out.payload_offset = pos
    out.payload_length = n - pos - pad
    out.padding_length = pad
    return OK


def _parse_extensions(const unsigned char[:] block, unsigned int profile):
    """RFC 8285 elements of an extension block as ``{id: bytes}``.

    Parsing stops at the first element that does not fit or at ID 15 (§4.2: "the rest of the
    header extension must be ignored"), so a damaged element never hides the ones before it.
    """
    cdef Py_ssize_t i = 0, n = block.shape[0], length
    cdef unsigned int ident
    result = {}
    if profile == ONE_BYTE_PROFILE:
        while i < n:
            if block[i] == 0:          # padding between elements
                i += 1
                continue
            ident = block[i] >> 4
            length = (block[i] & 0x0F) + 1
            if ident == 15 or i + 1 + length > n:
                break
            result[ident] = bytes(block[i + 1:i + 1 + length])
            i += 1 + length
    elif (profile & TWO_BYTE_PROFILE_MASK) == TWO_BYTE_PROFILE:
        while i < n:
            if block[i] == 0:
                i += 1
                continue
            if i + 2 > n:
                break
            ident = block[i]
            length = block[i + 1]
            if i + 2 + length > n:
                break
            result[ident] = bytes(block[i + 2:i + 2 + length])
            i += 2 + length
    return result


def _build_extensions(dict extensions):
    """(profile, data) for RFC 8285 elements: one-byte form when every element allows it."""
    items = sorted(extensions.items())
    one_byte = all(1 <= k <= 14 and 1 <= len(v) <= 16 for k, v in items)
    out = bytearray()
    if one_byte:
        for k, v in items:
            out.append((k << 4) | (len(v) - 1))
            out += v
        profile = ONE_BYTE_PROFILE
    else:
        for k, v in items:
            if not 1 <= k <= 255 or len(v) > 255:
                raise RtpError(f"RFC 8285 extension {k} does not fit the two-byte form")
            out.append(k)
            out.append(len(v))
            out += v
        profile = TWO_BYTE_PROFILE
    while len(out) % 4:
        out.append(0)
    return profile, bytes(out)


@cython.freelist(64)
cdef class RtpPacket:
    """One RTP packet: header fields, CSRC list, header extension and a zero-copy payload.

    Build one with keyword arguments, or parse a datagram with :meth:`parse`.  Header fields are
    writable (a relay rewrites SSRC, sequence number and timestamp); ``bytes(packet)`` serializes.
    """

    def __init__(self, *, int payload_type=0, unsigned short sequence_number=0,
                 unsigned int timestamp=0, unsigned int ssrc=0, payload=b"", bint marker=False,
                 csrc=(), extensions=None, extension_profile=None, extension_data=None,
                 Py_ssize_t padding=0):
        if not 0 <= payload_type <= 127:
            raise ValueError("payload_type must be 0..127")
        csrc = tuple(csrc)
        if len(csrc) > 15:
            raise ValueError("at most 15 CSRC identifiers")
        for c in csrc:
            if not 0 <= c <= 0xFFFFFFFF:
                raise ValueError("CSRC out of range")
        if not 0 <= padding <= 255:
            raise ValueError("padding must be 0..255 octets")
        self._payload_type = payload_type
        self.sequence_number = sequence_number
        self.timestamp = timestamp
        self.ssrc = ssrc
        self.marker = marker
        self._csrc = csrc
        self._csrc_count = len(csrc)
        self._has_extension = False
        self._ext_block = None
        if extensions:
            self._ext_profile, self._ext_block = _build_extensions(dict(extensions))
            self._has_extension = True
        elif extension_profile is not None:
            data = bytes(extension_data or b"")
            if len(data) % 4 or len(data) > 4 * 0xFFFF:
                raise ValueError("extension_data must be a multiple of 4 octets")
            self._ext_profile = extension_profile
            self._ext_block = data
            self._has_extension = True
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            payload = memoryview(payload).cast("B")
        self._data = payload
        self._payload_offset = 0
        self._payload_length = len(payload)
        self._padding_length = padding

    @staticmethod
    def parse(data):
        """Parse one RTP datagram (bytes-like); raises :class:`RtpError` when it is malformed."""
        cdef Py_buffer view
        cdef Py_ssize_t n
        cdef _Layout lay
        cdef const unsigned char* p = _acquire(data, &view, &n)
        cdef int err = _check(p, n, &lay)
        cdef RtpPacket pkt
        if err != OK:
            _release(&view)
            raise RtpError(_REASONS[err])
        pkt = RtpPacket.__new__(RtpPacket)
        pkt._payload_type = p[1] & 0x7F
        pkt.marker = p[1] >> 7
        pkt.sequence_number = _be16(p + 2)
        pkt.timestamp = _be32(p + 4)
        pkt.ssrc = _be32(p + 8)
        pkt._csrc_count = p[0] & 0x0F
        pkt._has_extension = (p[0] & 0x10) != 0
        _release(&view)
        pkt._ext_profile = lay.ext_profile
        pkt._data = data
        pkt._csrc_offset = lay.csrc_offset
        pkt._ext_offset = lay.ext_offset
        pkt._ext_length = lay.ext_length
        pkt._payload_offset = lay.payload_offset
        pkt._payload_length = lay.payload_length
        pkt._padding_length = lay.padding_length
        return pkt

    @property
    def version(self):
        return 2

    @property
    def payload_type(self):
        return self._payload_type

    @payload_type.setter
    def payload_type(self, int value):
        if not 0 <= value <= 127:
            raise ValueError("payload_type must be 0..127")
        self._payload_type = value

    @property
    def padding(self):
        """Octets of padding (count octet included); 0 when the P bit is clear."""
        return self._padding_length

    @property
    def extension(self):
        """The X bit: whether the packet carries a header extension."""
        return self._has_extension

    @property
    def csrc(self):
        """The contributing sources, a tuple of 32-bit integers."""
        cdef Py_buffer view
        cdef Py_ssize_t n, i
        cdef const unsigned char* p
        if self._csrc is None:
            p = _acquire(self._data, &view, &n)
            try:
                self._csrc = tuple([_be32(p + self._csrc_offset + 4 * i)
                                    for i in range(self._csrc_count)])
            finally:
                _release(&view)
        return self._csrc

    @property
    def payload(self):
        """The payload as a memoryview over the datagram (no copy)."""
        cdef Py_ssize_t start = self._payload_offset
        return memoryview(self._data)[start:start + self._payload_length]

    @property
    def payload_length(self):
        return self._payload_length

    @property
    def extension_profile(self):
        """The 16-bit "defined by profile" field of the extension, or None without one."""
        return self._ext_profile if self._has_extension else None

    @property
    def extension_data(self):
        """The raw extension data (after the 4-octet extension header), or None."""
        if not self._has_extension:
            return None
        if self._ext_block is not None:
            return self._ext_block
        return bytes(memoryview(self._data)[self._ext_offset:self._ext_offset + self._ext_length])

    @property
    def extensions(self):
        """RFC 8285 header extension elements as ``{id: bytes}`` (empty for other profiles)."""
        data = self.extension_data
        if data is None:
            return {}
        return _parse_extensions(data, self._ext_profile)

    def __bytes__(self):
        cdef Py_buffer view
        cdef Py_ssize_t n, total, pos
        cdef const unsigned char* src
        cdef unsigned char* out
        csrc = self.csrc
        ext = self.extension_data if self._has_extension else b""
        cdef const unsigned char[:] ext_view = ext
        total = (12 + 4 * self._csrc_count + (4 + len(ext) if self._has_extension else 0)
                 + self._payload_length + self._padding_length)
        result = PyBytes_FromStringAndSize(NULL, total)
        out = <unsigned char*>PyBytes_AS_STRING(result)
        out[0] = (0x80 | (0x20 if self._padding_length else 0)
                  | (0x10 if self._has_extension else 0) | self._csrc_count)
        out[1] = (0x80 if self.marker else 0) | self._payload_type
        _put16(out + 2, self.sequence_number)
        _put32(out + 4, self.timestamp)
        _put32(out + 8, self.ssrc)
        pos = 12
        for c in csrc:
            _put32(out + pos, c)
            pos += 4
        if self._has_extension:
            _put16(out + pos, self._ext_profile)
            _put16(out + pos + 2, len(ext) // 4)
            pos += 4
            if len(ext):
                memcpy(out + pos, &ext_view[0], len(ext))
            pos += len(ext)
        src = _acquire(self._data, &view, &n)
        try:
            if self._payload_length:
                memcpy(out + pos, src + self._payload_offset, self._payload_length)
            pos += self._payload_length
            if self._padding_length:
                if self._payload_offset + self._payload_length + self._padding_length <= n and \
                        self._payload_offset != 0:
                    # parsed: keep the sender's padding octets as they were
                    memcpy(out + pos, src + self._payload_offset + self._payload_length,
                           self._padding_length)
                else:
                    memset(out + pos, 0, self._padding_length - 1)
                out[total - 1] = self._padding_length
        finally:
            _release(&view)
        return result

    def __eq__(self, other):
        if not isinstance(other, RtpPacket):
            return NotImplemented
        return bytes(self) == bytes(other)

    def __repr__(self):
        return (f"RtpPacket(payload_type={self._payload_type}, "
                f"sequence_number={self.sequence_number}, "
                f"timestamp={self.timestamp}, ssrc={self.ssrc:#010x}, marker={bool(self.marker)}, "
                f"payload=<{self._payload_length} bytes>)")


# --- batch ------------------------------------------------------------------------------------

class RtpBatch:
    """Header columns of many datagrams (one row each); ``valid`` is False for malformed rows."""

    __slots__ = ("valid", "error", "payload_type", "marker", "sequence_number", "timestamp",
                 "ssrc", "csrc_count", "payload_offset", "payload_length")

    def __init__(self, Py_ssize_t n):
        numpy = numpy_module()
        self.valid = numpy.empty(n, dtype=numpy.bool_)
        self.error = numpy.empty(n, dtype=numpy.uint8)
        self.payload_type = numpy.empty(n, dtype=numpy.uint8)
        self.marker = numpy.empty(n, dtype=numpy.bool_)
        self.sequence_number = numpy.empty(n, dtype=numpy.uint16)
        self.timestamp = numpy.empty(n, dtype=numpy.uint32)
        self.ssrc = numpy.empty(n, dtype=numpy.uint32)
        self.csrc_count = numpy.empty(n, dtype=numpy.uint8)
        self.payload_offset = numpy.empty(n, dtype=numpy.int32)
        self.payload_length = numpy.empty(n, dtype=numpy.int32)

    def __len__(self):
        return len(self.valid)


cdef void _fill_row(const unsigned char* p, Py_ssize_t n, Py_ssize_t i,
                    unsigned char[:] valid, unsigned char[:] error, unsigned char[:] pt,
                    unsigned char[:] marker, unsigned short[:] seq, unsigned int[:] ts,
                    unsigned int[:] ssrc, unsigned char[:] cc, int[:] poff,
                    int[:] plen) noexcept nogil:
    cdef _Layout lay
    cdef int err = _check(p, n, &lay)
    error[i] = err
    if err != OK:
        valid[i] = 0
        pt[i] = 0
        marker[i] = 0
        seq[i] = 0
        ts[i] = 0
        ssrc[i] = 0
        cc[i] = 0
        poff[i] = 0
        plen[i] = 0
        return
    valid[i] = 1
    pt[i] = p[1] & 0x7F
    marker[i] = p[1] >> 7
    seq[i] = _be16(p + 2)
    ts[i] = _be32(p + 4)
    ssrc[i] = _be32(p + 8)
    cc[i] = p[0] & 0x0F
    poff[i] = lay.payload_offset
    plen[i] = lay.payload_length


def parse_batch(datagrams):
    """Parse a sequence of datagrams into an :class:`RtpBatch` of NumPy columns.

    Malformed datagrams do not raise: their row has ``valid`` False and ``error`` set to the
    reason code (1 short, 2 version, 3 CSRC, 4 extension, 5 padding).
    """
    cdef Py_ssize_t i, n = len(datagrams), length
    cdef Py_buffer view
    cdef const unsigned char* p
    batch = RtpBatch(n)
    cdef unsigned char[:] valid = batch.valid.view("u1")
    cdef unsigned char[:] error = batch.error
    cdef unsigned char[:] pt = batch.payload_type
    cdef unsigned char[:] marker = batch.marker.view("u1")
    cdef unsigned short[:] seq = batch.sequence_number
    cdef unsigned int[:] ts = batch.timestamp
    cdef unsigned int[:] ssrc = batch.ssrc
    cdef unsigned char[:] cc = batch.csrc_count
    cdef int[:] poff = batch.payload_offset
    cdef int[:] plen = batch.payload_length
    if type(datagrams) is not list:
        datagrams = list(datagrams)
    for i in range(n):
        d = (<list>datagrams)[i]
        p = _acquire(d, &view, &length)
        _fill_row(p, length, i, valid, error, pt, marker, seq, ts, ssrc, cc, poff, plen)
        _release(&view)
    return batch


def parse_batch_buffer(const unsigned char[:] buffer, const long long[:] offsets,
                       const long long[:] lengths):
    """Like :func:`parse_batch` over datagrams packed in one buffer (``recvmmsg``-style).

    Row ``i`` is ``buffer[offsets[i]:offsets[i] + lengths[i]]``; payload offsets in the result
    are relative to each datagram's start.
    """
    cdef Py_ssize_t i, n = offsets.shape[0], size = buffer.shape[0]
    if lengths.shape[0] != n:
        raise ValueError("offsets and lengths differ in length")
    batch = RtpBatch(n)
    cdef unsigned char[:] valid = batch.valid.view("u1")
    cdef unsigned char[:] error = batch.error
    cdef unsigned char[:] pt = batch.payload_type
    cdef unsigned char[:] marker = batch.marker.view("u1")
    cdef unsigned short[:] seq = batch.sequence_number
    cdef unsigned int[:] ts = batch.timestamp
    cdef unsigned int[:] ssrc = batch.ssrc
    cdef unsigned char[:] cc = batch.csrc_count
    cdef int[:] poff = batch.payload_offset
    cdef int[:] plen = batch.payload_length
    for i in range(n):
        if offsets[i] < 0 or lengths[i] < 0 or offsets[i] + lengths[i] > size:
            raise ValueError(f"datagram {i} lies outside the buffer")
    with nogil:
        for i in range(n):
            _fill_row(&buffer[0] + offsets[i] if size else NULL, lengths[i], i,
                      valid, error, pt, marker, seq, ts, ssrc, cc, poff, plen)
    return batch
