# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""G.711 μ-law and A-law over NumPy arrays, bit-exact with the ITU-T reference (G.191 STL g711.c).

Encoding is one lookup in a 65536-entry table indexed by the 16-bit sample, decoding one lookup in
a 256-entry table; the tables are computed at import from the ITU algorithm, so nothing is
transcribed by hand.  Linear samples are 16-bit signed (the codecs use the top 14 / 13 bits).
"""

from fastsip.rtp._numpy import numpy_module

cdef unsigned char _ULAW_ENC[65536]
cdef unsigned char _ALAW_ENC[65536]
cdef short _ULAW_DEC[256]
cdef short _ALAW_DEC[256]


cdef unsigned char _ulaw_compress(int x) noexcept nogil:
    # G.191: magnitude in one's complement for negative input, biased by 33 (0x84 >> 2).
    cdef int absno = (((~x) >> 2) if x < 0 else (x >> 2)) + 33
    cdef int i, segno, out
    if absno > 0x1FFF:
        absno = 0x1FFF
    i = absno >> 6
    segno = 1
    while i != 0:
        segno += 1
        i >>= 1
    out = ((8 - segno) << 4) | (0x0F - ((absno >> segno) & 0x0F))
    if x >= 0:
        out |= 0x80
    return out


cdef short _ulaw_expand(int code) noexcept nogil:
    cdef int sign = -1 if code < 0x80 else 1
    cdef int mantissa = ~code
    cdef int exponent = (mantissa >> 4) & 0x07
    cdef int step = 4 << (exponent + 1)
    mantissa &= 0x0F
    return sign * ((0x80 << exponent) + step * mantissa + step // 2 - 4 * 33)


cdef unsigned char _alaw_compress(int x) noexcept nogil:
    # G.191: 12-bit magnitude (one's complement for negative input), segment by doubling,
    # even bits inverted.
    cdef int ix = ((~x) >> 4) if x < 0 else (x >> 4)
    cdef int iexp
    if ix > 15:
        iexp = 1
        while ix > 16 + 15:
            ix >>= 1
            iexp += 1
        ix -= 16
        ix += iexp << 4
    if x >= 0:
        ix |= 0x80
    return ix ^ 0x55


cdef short _alaw_expand(int code) noexcept nogil:
    cdef int ix = (code ^ 0x55) & 0x7F
    cdef int iexp = ix >> 4
    cdef int mant = ix & 0x0F
    if iexp > 0:
        mant += 16
    mant = (mant << 4) + 8
    if iexp > 1:
        mant <<= iexp - 1
    return mant if code > 127 else -mant


cdef void _build_tables() noexcept nogil:
    cdef int v
    for v in range(65536):
        _ULAW_ENC[v] = _ulaw_compress(<short>v)
        _ALAW_ENC[v] = _alaw_compress(<short>v)
    for v in range(256):
        _ULAW_DEC[v] = _ulaw_expand(v)
        _ALAW_DEC[v] = _alaw_expand(v)


_build_tables()


cdef object _as_int16(samples):
    numpy = numpy_module()
    if isinstance(samples, (bytes, bytearray, memoryview)):
        return numpy.frombuffer(samples, dtype=numpy.int16)
    arr = numpy.ascontiguousarray(samples)
    if arr.dtype != numpy.int16:
        raise TypeError(f"G.711 encodes 16-bit signed samples, not {arr.dtype}")
    return arr.reshape(-1)


cdef object _as_uint8(codes):
    numpy = numpy_module()
    if isinstance(codes, (bytes, bytearray, memoryview)):
        return numpy.frombuffer(codes, dtype=numpy.uint8)
    arr = numpy.ascontiguousarray(codes)
    if arr.dtype != numpy.uint8:
        raise TypeError(f"G.711 decodes 8-bit codes, not {arr.dtype}")
    return arr.reshape(-1)


cdef object _encode(const unsigned char* table, samples, out):
    numpy = numpy_module()
    arr = _as_int16(samples)
    cdef const unsigned short[::1] src = arr.view(numpy.uint16)
    cdef Py_ssize_t i, n = src.shape[0]
    if out is None:
        out = numpy.empty(n, dtype=numpy.uint8)
    cdef unsigned char[::1] dst = out
    if dst.shape[0] != n:
        raise ValueError("out has the wrong length")
    with nogil:
        for i in range(n):
            dst[i] = table[src[i]]
    return out


cdef object _decode(const short* table, codes, out):
    numpy = numpy_module()
    arr = _as_uint8(codes)
    cdef const unsigned char[::1] src = arr
    cdef Py_ssize_t i, n = src.shape[0]
    if out is None:
        out = numpy.empty(n, dtype=numpy.int16)
    cdef short[::1] dst = out
    if dst.shape[0] != n:
        raise ValueError("out has the wrong length")
    with nogil:
        for i in range(n):
            dst[i] = table[src[i]]
    return out


def ulaw_encode(samples, out=None):
    """μ-law codes (uint8 array) of 16-bit samples (int16 array or native-endian bytes)."""
    return _encode(_ULAW_ENC, samples, out)


def ulaw_decode(codes, out=None):
    """16-bit samples (int16 array) of μ-law codes (uint8 array or bytes, e.g. an RTP payload)."""
    return _decode(_ULAW_DEC, codes, out)


def alaw_encode(samples, out=None):
    """A-law codes (uint8 array) of 16-bit samples (int16 array or native-endian bytes)."""
    return _encode(_ALAW_ENC, samples, out)


def alaw_decode(codes, out=None):
    """16-bit samples (int16 array) of A-law codes (uint8 array or bytes)."""
    return _decode(_ALAW_DEC, codes, out)
