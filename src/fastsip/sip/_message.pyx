# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False
"""The SIP message core: a one-pass, zero-copy parser, typed header views, edits, serialization.

``parse(data)`` walks the bytes once and records, for every header line, a small-int name id and
the offsets of its name and value (Kamailio's ``hdr_field`` list, without the copies).  Nothing is
decoded until asked for; typed views (Via, name-addr, URI, CSeq) are built on first access and
cached.  What the transaction layer needs at once is validated during that pass (the start line
and Request-URI, the top Via, the structure of From and To, CSeq, Call-ID, Max-Forwards and
Content-Length), so a message that ``parse`` accepts can be matched to a transaction and
answered; everything else (lower Vias, Contact, Route, the URIs inside From and To) raises
ParseError when first read.

Edits are a journal over the header index (Kamailio's lumps): an edited or inserted header line
lives in a small bytes object of its own, a removed one is flagged, and ``bytes(msg)`` copies the
untouched lines from the original buffer.  An unedited message serializes to its input bytes.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memchr, memcmp, memcpy, memmove, memset

import hashlib
import ipaddress
import os
from collections import namedtuple

from fastsip.errors import ParseError

cdef extern from *:
    """
    /* Token characters of RFC 3261 25.1 (alphanum - . ! % * _ + ` ' ~). */
    static unsigned char fastsip_token[256];
    /* Characters allowed in an unquoted generic-param value: token, host (IPv6 references with
       [ ] :), and the few more that real gear sends unquoted.  UTF-8 octets too. */
    static unsigned char fastsip_pvalue[256];
    /* Characters of a URI up to its end: anything but LWS, < > and " (RFC 3986 excludes them). */
    static unsigned char fastsip_urichar[256];
    /* Characters of a hostname or IPv4 address (RFC 3261 25.1; '_' tolerated, as gear sends it). */
    static unsigned char fastsip_hostchar[256];
    /* SP HT CR LF: CR and LF only occur inside a value where a line was folded. */
    static unsigned char fastsip_lws[256];
    static inline uint64_t fastsip_load8(const char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
    static inline uint32_t fastsip_load4(const char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
    static inline uint16_t fastsip_load2(const char *p) { uint16_t v; memcpy(&v, p, 2); return v; }
    /* One header line from p[i]: returns the index of the '\\n' that ends it (-1 when there is
       none before n) and leaves in *colon the index of its first ':' (the '\\n' when it has
       none).  With SSE2 (every x86-64) sixteen octets a step, both at once: a line is one or
       two steps where memchr's call alone costs more; elsewhere memchr and a loop. */
    #if defined(__SSE2__) && (defined(__GNUC__) || defined(__clang__))
    #include <emmintrin.h>
    static inline Py_ssize_t fastsip_line(const char *p, Py_ssize_t i, Py_ssize_t n,
                                          Py_ssize_t *colon) {
        const __m128i nl = _mm_set1_epi8('\\n'), co = _mm_set1_epi8(':');
        Py_ssize_t c = -1;
        unsigned mn, mc;
        for (; i + 16 <= n; i += 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)(p + i));
            mn = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, nl));
            if (c < 0) {
                mc = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(v, co));
                if (mn) mc &= (mn & (0u - mn)) - 1;     /* only colons before the '\\n' */
                if (mc) c = i + __builtin_ctz(mc);
            }
            if (mn) {
                i += __builtin_ctz(mn);
                *colon = c < 0 ? i : c;
                return i;
            }
        }
        for (; i < n; i++) {
            if (p[i] == '\\n') {
                *colon = c < 0 ? i : c;
                return i;
            }
            if (c < 0 && p[i] == ':') c = i;
        }
        return -1;
    }
    #else
    static inline Py_ssize_t fastsip_line(const char *p, Py_ssize_t i, Py_ssize_t n,
                                          Py_ssize_t *colon) {
        const char *q = (const char *)memchr(p + i, '\\n', (size_t)(n - i));
        const char *c;
        if (q == NULL) return -1;
        c = (const char *)memchr(p + i, ':', (size_t)(q - (p + i)));
        *colon = (c == NULL ? q : c) - p;
        return q - p;
    }
    #endif
    /* The end of the run of octets of a character class (table) that starts at i.  Four
       octets a step while they all belong: these runs (tokens, hosts, parameter values, URIs)
       are most of what the parser reads octet by octet.  Always inlined: the runs are short
       and gcc otherwise calls it from the larger scanners. */
    #if defined(__GNUC__) || defined(__clang__)
    __attribute__((always_inline))
    #endif
    static inline Py_ssize_t fastsip_span(const unsigned char *table, const char *p,
                                          Py_ssize_t i, Py_ssize_t e) {
        while (i + 4 <= e && (table[(unsigned char)p[i]] & table[(unsigned char)p[i + 1]]
                              & table[(unsigned char)p[i + 2]] & table[(unsigned char)p[i + 3]]))
            i += 4;
        while (i < e && table[(unsigned char)p[i]])
            i++;
        return i;
    }
    /* p[0:n] as a str.  ASCII, what SIP text nearly always is, is copied straight into a new
       one-octet str (what PyUnicode_DecodeUTF8 ends up doing, minus its dispatch); anything
       else is decoded as UTF-8, undecodable octets kept as surrogate escapes. */
    static PyObject *fastsip_text(const char *p, Py_ssize_t n) {
        Py_ssize_t i = 0;
        uint64_t acc = 0;
        PyObject *s;
        for (; i + 8 <= n; i += 8) acc |= fastsip_load8(p + i);
        for (; i < n; i++) acc |= (unsigned char)p[i];
        if (acc & 0x8080808080808080ULL) return PyUnicode_DecodeUTF8(p, n, "surrogateescape");
        s = PyUnicode_New(n, 127);
        if (s != NULL && n) memcpy(PyUnicode_1BYTE_DATA(s), p, n);
        return s;
    }
    /* A 2-item instance of a tuple subclass (the CSeq namedtuple): what tuple.__new__ does,
       minus the argument tuple and the temporary copy. */
    static PyObject *fastsip_tuple2(PyObject *type, PyObject *a, PyObject *b) {
        PyObject *t = ((PyTypeObject *)type)->tp_alloc((PyTypeObject *)type, 2);
        if (t == NULL) return NULL;
        Py_INCREF(a); PyTuple_SET_ITEM(t, 0, a);
        Py_INCREF(b); PyTuple_SET_ITEM(t, 1, b);
        return t;
    }
    static void fastsip_init_tables(void) {
        const char *t;
        int c;
        for (c = 0; c < 256; c++) {
            int alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
            fastsip_token[c] = alnum;
            fastsip_pvalue[c] = alnum || c >= 0x80;
            fastsip_urichar[c] = c > 0x20 && c < 0x7f && c != '<' && c != '>' && c != '"';
            fastsip_hostchar[c] = alnum || c == '-' || c == '.' || c == '_';
            fastsip_lws[c] = c == ' ' || c == 9 || c == 13 || c == 10;
        }
        for (t = "-.!%*_+`'~"; *t; t++) {
            fastsip_token[(unsigned char)*t] = 1;
            fastsip_pvalue[(unsigned char)*t] = 1;
        }
        for (t = "[]:/@=?&$#"; *t; t++) fastsip_pvalue[(unsigned char)*t] = 1;
    }
    """
    unsigned char fastsip_token[256]
    unsigned char fastsip_pvalue[256]
    unsigned char fastsip_urichar[256]
    unsigned char fastsip_hostchar[256]
    unsigned char fastsip_lws[256]
    uint64_t fastsip_load8(const char* p) noexcept
    uint32_t fastsip_load4(const char* p) noexcept
    uint16_t fastsip_load2(const char* p) noexcept
    Py_ssize_t fastsip_line(const char* p, Py_ssize_t i, Py_ssize_t n, Py_ssize_t* colon) noexcept
    Py_ssize_t fastsip_span(const unsigned char* table, const char* p, Py_ssize_t i,
                            Py_ssize_t e) noexcept
    void fastsip_init_tables()
    Py_buffer* PyMemoryView_GET_BUFFER(object mv)
    object fastsip_tuple2(object tuple_type, object a, object b)
    str fastsip_text(const char* p, Py_ssize_t n)

fastsip_init_tables()


# ---------------------------------------------------------------------------------------------
# Header names: ids for the well-known names, compact forms folded in (RFC 3261 7.3.3, 20;
# RFC 3265, 3515, 3841, 3892, 4028, 4474 for the later letters).
# ---------------------------------------------------------------------------------------------

# (canonical name, compact form, comma-separated list grammar?).  The first twelve keep the ids of
# the H_* enum in _message.pxd (shared with compiled layers); the rest are numbered in order.
_HEADER_TABLE = [
    ("Via", "v", True), ("From", "f", False), ("To", "t", False), ("Call-ID", "i", False),
    ("CSeq", None, False), ("Contact", "m", True), ("Content-Length", "l", False),
    ("Content-Type", "c", False), ("Max-Forwards", None, False), ("Route", None, True),
    ("Record-Route", None, True), ("Timestamp", None, False),
    ("Accept", None, True), ("Accept-Contact", "a", True), ("Accept-Encoding", None, True),
    ("Accept-Language", None, True), ("Alert-Info", None, True), ("Allow", None, True),
    ("Allow-Events", "u", True), ("Authentication-Info", None, False),
    ("Authorization", None, False), ("Call-Info", None, True),
    ("Content-Disposition", None, False), ("Content-Encoding", "e", True),
    ("Content-Language", None, True), ("Date", None, False), ("Error-Info", None, True),
    ("Event", "o", False), ("Expires", None, False), ("History-Info", None, True),
    ("Identity", "y", False), ("In-Reply-To", None, True), ("Min-Expires", None, False),
    ("Min-SE", None, False), ("MIME-Version", None, False), ("Organization", None, False),
    ("P-Asserted-Identity", None, True), ("P-Preferred-Identity", None, True),
    ("Path", None, True), ("Priority", None, False), ("Privacy", None, False),
    ("Proxy-Authenticate", None, False), ("Proxy-Authorization", None, False),
    ("Proxy-Require", None, True), ("RAck", None, False), ("Reason", None, True),
    ("Refer-To", "r", False), ("Referred-By", "b", False), ("Reject-Contact", "j", True),
    ("Replaces", None, False), ("Reply-To", None, False), ("Request-Disposition", "d", True),
    ("Require", None, True), ("Retry-After", None, False), ("RSeq", None, False),
    ("Security-Client", None, True), ("Security-Server", None, True),
    ("Security-Verify", None, True), ("Server", None, False), ("Service-Route", None, True),
    ("Session-Expires", "x", False), ("SIP-ETag", None, False), ("SIP-If-Match", None, False),
    ("Subject", "s", False), ("Subscription-State", None, False), ("Supported", "k", True),
    ("Unsupported", None, True), ("User-Agent", None, False), ("Warning", None, True),
    ("WWW-Authenticate", None, False),
]

cdef int16_t _compact_id[128]          # compact letter (lowercased) -> id
cdef bint _is_list[N_HEADER_IDS]
cdef list _canonical = [None] * N_HEADER_IDS
# Every lowercase long name, back to back, and beside it its case fold: 0x20 under each letter,
# 0 under anything else ('-'), which must then match exactly.
DEF NAMES_BLOB = 2048
cdef char _names_blob[NAMES_BLOB]
cdef char _names_fold[NAMES_BLOB]
cdef int32_t _name_off[N_HEADER_IDS]
cdef int32_t _name_len[N_HEADER_IDS]
# Well-known names by a perfect hash of (length, first, middle and last letter): _hash_id[h] is
# the only id whose name can be p[:n], so one exact comparison decides.  The multiplier is
# searched at import for one under which the names do not collide.
DEF MAX_NAME = 33
DEF NAME_HASH_BITS = 10
cdef int8_t _hash_id[1 << NAME_HASH_BITS]
cdef uint32_t _hash_mult = 0
cdef int _n_ids = len(_HEADER_TABLE) + 1
assert _n_ids <= N_HEADER_IDS <= 127


cdef inline uint32_t _name_hash(const char* p, Py_ssize_t n, uint32_t mult) noexcept:
    """For 1 <= n < MAX_NAME.  |0x20 folds letters to lower case and keeps '-'."""
    cdef uint32_t x = (<uint32_t>n
                       | (<uint32_t>((<unsigned char>p[0]) | 0x20) << 8)
                       | (<uint32_t>((<unsigned char>p[n >> 1]) | 0x20) << 16)
                       | (<uint32_t>((<unsigned char>p[n - 1]) | 0x20) << 24))
    return (x * mult) >> (32 - NAME_HASH_BITS)


cdef void _init_names() except *:
    global _hash_mult
    cdef int i, h
    cdef uint32_t k, mult
    cdef bint ok
    memset(_compact_id, 0, sizeof(_compact_id))
    memset(_is_list, 0, sizeof(_is_list))
    blob = bytearray()
    for i, (name, compact, is_list) in enumerate(_HEADER_TABLE, 1):
        assert len(name) < MAX_NAME
        _canonical[i] = name
        _is_list[i] = is_list
        _name_off[i] = len(blob)
        _name_len[i] = len(name)
        blob += name.lower().encode()
        if compact is not None:
            _compact_id[ord(compact)] = i
    assert len(blob) <= NAMES_BLOB
    for i in range(len(blob)):
        _names_blob[i] = blob[i]
        _names_fold[i] = 0x20 if 97 <= blob[i] <= 122 else 0
    for k in range(1, 1000000):
        mult = (k * <uint32_t>0x9E3779B1) | 1
        memset(_hash_id, 0, sizeof(_hash_id))
        ok = True
        for i in range(1, _n_ids):
            h = _name_hash(_names_blob + _name_off[i], _name_len[i], mult)
            if _hash_id[h]:
                ok = False
                break
            _hash_id[h] = i
        if ok:
            _hash_mult = mult
            return
    raise AssertionError("no perfect hash for the header names")

_init_names()


cdef inline bint _name_eq(const char* p, Py_ssize_t off, Py_ssize_t n) noexcept:
    """p[:n] is the well-known name at _names_blob[off:off + n], letters in either case (n >= 2).

    OR-ing 0x20 into a byte gives a lowercase letter only when the byte is that letter in
    either case, so OR-ing the name's fold (0x20 under letters, 0 under '-') compares exactly
    and case-insensitively, several bytes at a time, whatever p holds: a match also proves
    p[:n] is token characters.  Loads overlap instead of finishing byte by byte (the last
    one ends at n), so nothing past either name is read."""
    cdef const char* cand = _names_blob + off
    cdef const char* fold = _names_fold + off
    cdef Py_ssize_t i = 0
    if n >= 8:
        while i + 8 < n:
            if (fastsip_load8(p + i) | fastsip_load8(fold + i)) != fastsip_load8(cand + i):
                return False
            i += 8
        i = n - 8
        return (fastsip_load8(p + i) | fastsip_load8(fold + i)) == fastsip_load8(cand + i)
    if n >= 4:
        i = n - 4
        return ((fastsip_load4(p) | fastsip_load4(fold)) == fastsip_load4(cand)
                and (fastsip_load4(p + i) | fastsip_load4(fold + i)) == fastsip_load4(cand + i))
    i = n - 1
    return ((fastsip_load2(p) | fastsip_load2(fold)) == fastsip_load2(cand)
            and (p[i] | fold[i]) == cand[i])


cdef inline int _header_id(const char* p, Py_ssize_t n) noexcept:
    """The id of the header name p[:n], 0 when it is not a well-known one.  p need not be
    validated: a nonzero id means p[:n] is that name (or its compact letter), so token
    characters."""
    cdef int c, hid
    if n == 1:
        c = (<unsigned char>p[0]) | 0x20
        return _compact_id[c] if c < 128 else 0
    if n >= MAX_NAME or n < 1:
        return 0
    hid = _hash_id[_name_hash(p, n, _hash_mult)]
    if _name_len[hid] == n and _name_eq(p, _name_off[hid], n):
        return hid
    return 0


cdef int _name_id_of(object name) except -1:
    cdef bytes b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
    cdef Py_ssize_t i, n = len(b)
    cdef const char* p = b
    for i in range(n):
        if not fastsip_token[<unsigned char>p[i]]:
            return 0
    return _header_id(p, n) if n else 0


cdef int _H_PROXY_REQUIRE = _name_id_of("Proxy-Require")
assert _H_PROXY_REQUIRE == H_PROXY_REQUIRE
cdef int _H_PROXY_AUTHORIZATION = _name_id_of("Proxy-Authorization")

# FNV-1a, 64 bits: a hash of raw header bytes that is the same in every process (a loop
# that passes through two workers of a cluster must still be recognised), cheap, and not a
# security boundary (see Request.loop_hash).
DEF FNV_OFFSET = 14695981039346656037
DEF FNV_PRIME = 1099511628211


cdef inline uint64_t _fnv(uint64_t h, const char* p, Py_ssize_t s, Py_ssize_t e) noexcept:
    cdef Py_ssize_t i
    for i in range(s, e):
        h = (h ^ <unsigned char>p[i]) * <uint64_t>FNV_PRIME
    return h


cdef inline uint64_t _fnv_end(uint64_t h) noexcept:
    # A field separator: "ab" + "" and "a" + "b" must not hash alike.
    return (h ^ 0xFF) * <uint64_t>FNV_PRIME


# ---------------------------------------------------------------------------------------------
# Small scanning helpers.  Offsets are Py_ssize_t; every loop is bounded by an explicit end.
# ---------------------------------------------------------------------------------------------

cdef inline bint _is_lws(char c) noexcept:
    # CR and LF only appear inside a header value where the line was folded (the line scanner
    # has already cut the message at real line ends), so here they are whitespace.
    return fastsip_lws[<unsigned char>c]


cdef inline Py_ssize_t _skip_lws(const char* p, Py_ssize_t i, Py_ssize_t e) noexcept:
    while i < e and _is_lws(p[i]):
        i += 1
    return i


cdef inline Py_ssize_t _rtrim(const char* p, Py_ssize_t s, Py_ssize_t e) noexcept:
    while e > s and _is_lws(p[e - 1]):
        e -= 1
    return e


cdef inline Py_ssize_t _digits_end(const char* p, Py_ssize_t i, Py_ssize_t e) noexcept:
    """The end of the run of decimal digits that starts at i (i itself when there is none): a
    CSeq number, a status code."""
    while i < e and p[i] >= b'0' and p[i] <= b'9':
        i += 1
    return i


cdef inline Py_ssize_t _span(const unsigned char* table, const char* p, Py_ssize_t i,
                             Py_ssize_t e) noexcept:
    """The end of the run of octets of a character class (table) that starts at i (see
    fastsip_span: always inlined, a call would cost as much as a short run)."""
    return fastsip_span(table, p, i, e)


cdef inline Py_ssize_t _token_end(const char* p, Py_ssize_t i, Py_ssize_t e) noexcept:
    """The end of the run of token characters that starts at i (i itself when there is none)."""
    return _span(fastsip_token, p, i, e)


cdef inline bint _ieq(const char* p, Py_ssize_t n, const char* lower, Py_ssize_t m) noexcept:
    """Case-insensitive comparison of p[:n] with a lowercase ASCII literal."""
    cdef Py_ssize_t i
    cdef unsigned char c
    if n != m:
        return False
    for i in range(n):
        c = <unsigned char>p[i]
        if c >= b'A' and c <= b'Z':
            c |= 0x20
        if c != <unsigned char>lower[i]:
            return False
    return True


cdef const char* _HEX_DIGITS = b"0123456789abcdef"


cdef inline str _text(const char* p, Py_ssize_t s, Py_ssize_t e):
    return fastsip_text(p + s, e - s)


cdef inline bint _lower_already(const char* p, Py_ssize_t s, Py_ssize_t e) noexcept:
    """p[s:e] has no upper-case ASCII letter, no octet past ASCII (whose case str.lower()
    would decide) and no '%' (an escape may hide a capital): its text is its lower case."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(s, e):
        c = <unsigned char>p[i]
        if (c >= 65 and c <= 90) or c >= 0x80 or c == 37:
            return False
    return True


cdef inline str _text_lower(const char* p, Py_ssize_t s, Py_ssize_t e):
    """The text of p[s:e] in lower case: scheme names, hosts and parameter names, which are
    nearly always written so; only the rest pays for str.lower()."""
    if _lower_already(p, s, e):
        return _text(p, s, e)
    return _text(p, s, e).lower()


cdef inline object _opt_text(const char* p, Py_ssize_t s, Py_ssize_t e):
    """The text of p[s:e], or None when the part is absent (s < 0)."""
    return _text(p, s, e) if s >= 0 else None


cdef str _text_lws(const char* p, Py_ssize_t s, Py_ssize_t e):
    """Decode a value that may contain folded lines: each run of LWS with a line break becomes
    one SP (RFC 3261 7.3.1), leading and trailing LWS is dropped."""
    cdef Py_ssize_t i
    cdef bint fold = False
    s = _skip_lws(p, s, e)
    e = _rtrim(p, s, e)
    for i in range(s, e):
        if p[i] == b'\r' or p[i] == b'\n':
            fold = True
            break
    if not fold:
        return _text(p, s, e)
    out = bytearray()
    i = s
    while i < e:
        if p[i] == b'\r' or p[i] == b'\n':
            while len(out) and (out[len(out) - 1] == 0x20 or out[len(out) - 1] == 0x09):
                out.pop()
            i = _skip_lws(p, i, e)
            out.append(0x20)
            continue
        out.append(<unsigned char>p[i])
        i += 1
    return out.decode("utf-8", "surrogateescape")


cdef inline int64_t _digits(const char* p, Py_ssize_t s, Py_ssize_t e, int64_t limit) noexcept:
    """The decimal number in p[s:e], or -1 when it is empty, not all digits, or over limit."""
    cdef int64_t v = 0
    cdef Py_ssize_t i
    if s >= e:
        return -1
    for i in range(s, e):
        if p[i] < b'0' or p[i] > b'9':
            return -1
        v = v * 10 + (p[i] - 48)
        if v > limit:
            return -1
    return v


cdef bint same_host(const char* p, Py_ssize_t s, Py_ssize_t e, str host) except -1:
    """Is the host p[s:e], as a message writes it (a sent-by, a URI's host), ``host``?  As
    ``lowered(h.strip("[]"))`` compares them (brackets and case aside), without making a
    string while both are ASCII; otherwise by those strs (str.lower() folds more than
    ASCII)."""
    cdef Py_ssize_t hs = 0, n, i
    cdef const char* h = PyUnicode_AsUTF8AndSize(host, &n)
    cdef unsigned char a, b
    while s < e and (p[s] == b'[' or p[s] == b']'):
        s += 1
    while e > s and (p[e - 1] == b'[' or p[e - 1] == b']'):
        e -= 1
    while hs < n and (h[hs] == b'[' or h[hs] == b']'):
        hs += 1
    while n > hs and (h[n - 1] == b'[' or h[n - 1] == b']'):
        n -= 1
    for i in range(s, e):
        if <unsigned char>p[i] >= 0x80:
            return lowered(_text(p, s, e)) == lowered(host.strip("[]"))
    for i in range(hs, n):
        if <unsigned char>h[i] >= 0x80:
            return lowered(_text(p, s, e)) == lowered(host.strip("[]"))
    if e - s != n - hs:
        return 0
    for i in range(e - s):
        a = <unsigned char>p[s + i]
        b = <unsigned char>h[hs + i]
        if a >= b'A' and a <= b'Z':
            a += 32
        if b >= b'A' and b <= b'Z':
            b += 32
        if a != b:
            return 0
    return 1


cdef int _fail(str reason, Py_ssize_t offset, int status=400) except -1:
    raise ParseError(reason, offset, status)


cdef inline Py_ssize_t _scan_quoted(const char* p, Py_ssize_t i, Py_ssize_t e) except -2:
    """p[i] is '"'; return the index just past the closing quote (quoted-pair aware)."""
    cdef Py_ssize_t start = i
    i += 1
    while i < e:
        if p[i] == b'\\':
            i += 2
            continue
        if p[i] == b'"':
            return i + 1
        i += 1
    _fail("unterminated quoted string", start)


cdef Py_ssize_t _split_comma(const char* p, Py_ssize_t i, Py_ssize_t e) noexcept:
    """Index of the next top-level ',' at or after i (outside quotes and < >), or e.  Never
    fails: an unterminated quote or '<' runs to the end (the typed views report such errors;
    splitting a header for getall() must not)."""
    cdef bint angle = False
    # Most values hold one element: without any ',' the answer is e whatever the quotes and
    # < > say, and memchr finds that out without walking the value byte by byte.
    if i >= e or memchr(p + i, b',', e - i) == NULL:
        return e
    while i < e:
        if p[i] == b'"':
            i += 1
            while i < e and p[i] != b'"':
                i += 2 if p[i] == b'\\' else 1
        elif p[i] == b'<':
            angle = True
        elif p[i] == b'>':
            angle = False
        elif p[i] == b',' and not angle:
            return i
        i += 1
    return e


# ---------------------------------------------------------------------------------------------
# Offset-only parsers of URIs, generic params, Via and name-addr values (the parts structs they
# fill are declared in _message.pxd).
# ---------------------------------------------------------------------------------------------

cdef inline int _scan_hostport(const char* p, Py_ssize_t i, Py_ssize_t e,
                               int32_t* host_s, int32_t* host_e, int* port,
                               bint stop_lws) except -2:
    """host [":" port] at p[i:e]; returns the index after it.  An IPv6 reference needs [ ]
    (RFC 5118 4.2: a bare IPv6 address in a SIP URI is invalid)."""
    cdef Py_ssize_t s = i
    cdef int64_t v
    cdef Py_ssize_t ps
    if i < e and p[i] == b'[':
        while i < e and p[i] != b']':
            if not (p[i] == b'[' and i == s) and not (
                    (p[i] >= b'0' and p[i] <= b'9')
                    or ((p[i] | 0x20) >= b'a' and (p[i] | 0x20) <= b'f')
                    or p[i] == b':' or p[i] == b'.'):
                _fail("invalid character in IPv6 reference", i)
            i += 1
        if i >= e:
            _fail("unterminated IPv6 reference", s)
        i += 1
    else:
        i = _span(fastsip_hostchar, p, i, e)
    if i == s:
        _fail("missing host", s)
    host_s[0] = s
    host_e[0] = i
    port[0] = -1
    if stop_lws:
        i = _skip_lws(p, i, e)
    if i < e and p[i] == b':':
        i += 1
        if stop_lws:
            i = _skip_lws(p, i, e)
        ps = i
        while i < e and p[i] >= b'0' and p[i] <= b'9':
            i += 1
        v = _digits(p, ps, i, 65535)
        if v < 0:
            _fail("invalid port", ps)
        port[0] = <int>v
    return i


cdef Py_ssize_t _scan_uri(const char* p, Py_ssize_t s, Py_ssize_t e, UriParts* u) except -2:
    """Parse the URI in p[s:e] (the whole span must be the URI).  Returns e."""
    cdef Py_ssize_t i = s, at = -1, j
    cdef int kind
    if s >= e:
        _fail("empty URI", s)
    if (e - s >= 4 and (fastsip_load4(p + s) | fastsip_load4(b"\x20\x20\x20\0"))
            == fastsip_load4(b"sip:")):
        # "sip:" in any case, what nearly every URI starts with: the scheme checks below would
        # accept it and call it URI_SIP.
        i = s + 3
        kind = URI_SIP
    else:
        # scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
        if not ((p[i] | 0x20) >= b'a' and (p[i] | 0x20) <= b'z'):
            _fail("URI scheme must start with a letter", i)
        while i < e and p[i] != b':':
            if not (((p[i] | 0x20) >= b'a' and (p[i] | 0x20) <= b'z')
                    or (p[i] >= b'0' and p[i] <= b'9')
                    or p[i] == b'+' or p[i] == b'-' or p[i] == b'.'):
                _fail("invalid character in URI scheme", i)
            i += 1
        if i >= e:
            _fail("URI has no scheme", s)
        if _ieq(p + s, i - s, b"sip", 3):
            kind = URI_SIP
        elif _ieq(p + s, i - s, b"sips", 4):
            kind = URI_SIPS
        elif _ieq(p + s, i - s, b"tel", 3):
            kind = URI_TEL
        else:
            kind = URI_OPAQUE
    j = _span(fastsip_urichar, p, i + 1, e)
    if j < e:
        _fail("invalid character in URI", j)
    u.scheme_e = i
    u.kind = kind
    u.user_s = u.user_e = u.pw_s = u.pw_e = -1
    u.headers_s = u.headers_e = -1
    u.port = -1
    i += 1
    if kind == URI_OPAQUE:
        if i >= e:
            _fail("empty URI after scheme", i)
        u.host_s = i
        u.host_e = e
        u.params_s = u.params_e = e
        return e
    if kind == URI_TEL:
        u.host_s = i
        while i < e and p[i] != b';':
            i += 1
        if i == u.host_s:
            _fail("empty telephone number", i)
        u.host_e = i
        u.params_s = i
        u.params_e = e
        return e
    # sip / sips: [userinfo "@"] hostport uri-parameters [headers].  An unescaped '@' cannot
    # appear in host, params or headers, so the first '@' ends the userinfo (whose user part may
    # hold ';', '?', '/' and ',').
    j = i
    while j < e:
        if p[j] == b'@':
            at = j
            break
        j += 1
    if at >= 0:
        u.user_s = i
        j = i
        while j < at and p[j] != b':':
            j += 1
        u.user_e = j
        if j < at:
            u.pw_s = j + 1
            u.pw_e = at
        i = at + 1
    i = _scan_hostport(p, i, e, &u.host_s, &u.host_e, &u.port, False)
    u.params_s = i
    while i < e and p[i] != b'?':
        if i == u.params_s and p[i] != b';':
            _fail("unexpected character after host in URI", i)
        i += 1
    u.params_e = i
    if i < e:
        u.headers_s = i + 1
        u.headers_e = e
    return e


cdef inline Py_ssize_t _next_param(const char* p, Py_ssize_t i, Py_ssize_t e,
                                   ParamSpan* out) except -2:
    """At i (LWS allowed) expect ';' name [= value].  Returns the index after the param, or -1
    when p[i:] (after LWS) does not start with ';'."""
    i = _skip_lws(p, i, e)
    if i >= e or p[i] != b';':
        return -1
    i = _skip_lws(p, i + 1, e)
    out.name_s = i
    i = _token_end(p, i, e)
    if i == out.name_s:
        _fail("empty parameter name", i)
    out.name_e = i
    out.value_s = out.value_e = -1
    out.quoted = False
    i = _skip_lws(p, i, e)
    if i < e and p[i] == b'=':
        i = _skip_lws(p, i + 1, e)
        if i < e and p[i] == b'"':
            out.value_s = i
            i = _scan_quoted(p, i, e)
            out.value_e = i
            out.quoted = True
        else:
            out.value_s = i
            i = _span(fastsip_pvalue, p, i, e)
            if i == out.value_s:
                _fail("empty parameter value", i)
            out.value_e = i
    else:
        i = out.name_e
    return i


# Not inline: _validate and the accessors each had a copy of the two scanners below, and a
# message runs through several of them -- one shared copy takes fewer instruction cache
# lines a message (_validate went from 12 KB of code to 1.6 KB; docs/performance.md).
cdef Py_ssize_t _scan_via(const char* p, Py_ssize_t i, Py_ssize_t e, ViaParts* v) except -2:
    """One via-parm from i; returns the index of the ',' that ends it, or e."""
    cdef ParamSpan prm
    cdef Py_ssize_t n
    i = _skip_lws(p, i, e)
    v.s = i
    v.proto_s = i
    if (i + 8 <= e and (fastsip_load8(p + i) | fastsip_load8(b"\x20\x20\x20\0\0\0\0\0"))
            == fastsip_load8(b"sip/2.0/")):
        # What every Via starts with, "SIP/2.0/" (any case) without LWS, in one comparison:
        # the same spans the token-by-token walk below finds.
        v.proto_e = i + 3
        v.ver_s = i + 4
        v.ver_e = i + 7
        i = _skip_lws(p, i + 8, e)
    else:
        i = v.proto_e = _token_end(p, i, e)
        if i == v.proto_s:
            _fail("Via: missing protocol name", i)
        i = _skip_lws(p, i, e)
        if i >= e or p[i] != b'/':
            _fail("Via: expected '/' after protocol name", i)
        i = _skip_lws(p, i + 1, e)
        v.ver_s = i
        i = v.ver_e = _token_end(p, i, e)
        if i == v.ver_s:
            _fail("Via: missing protocol version", i)
        i = _skip_lws(p, i, e)
        if i >= e or p[i] != b'/':
            _fail("Via: expected '/' before transport", i)
        i = _skip_lws(p, i + 1, e)
    v.tr_s = i
    i = v.tr_e = _token_end(p, i, e)
    if i == v.tr_s:
        _fail("Via: missing transport", i)
    n = i
    i = _skip_lws(p, i, e)
    if i == n:
        _fail("Via: expected whitespace before sent-by", i)
    i = _scan_hostport(p, i, e, &v.host_s, &v.host_e, &v.port, True)
    v.params_s = i
    v.branch_s = v.branch_e = v.received_s = v.received_e = v.maddr_s = v.maddr_e = -1
    v.rport = RPORT_ABSENT
    while True:
        n = _next_param(p, i, e, &prm)
        if n < 0:
            break
        i = n
        n = prm.name_e - prm.name_s
        if v.branch_s < 0 and _ieq(p + prm.name_s, n, b"branch", 6):
            v.branch_s = prm.value_s
            v.branch_e = prm.value_e
        elif v.received_s < 0 and _ieq(p + prm.name_s, n, b"received", 8):
            v.received_s = prm.value_s
            v.received_e = prm.value_e
        elif _ieq(p + prm.name_s, n, b"rport", 5):
            if prm.value_s < 0:
                v.rport = RPORT_EMPTY
            else:
                v.rport = <int>_digits(p, prm.value_s, prm.value_e, 65535)
                if v.rport < 0:
                    _fail("Via: invalid rport", prm.value_s)
        elif _ieq(p + prm.name_s, n, b"maddr", 5):
            v.maddr_s = prm.value_s
            v.maddr_e = prm.value_e
    v.e = _rtrim(p, v.s, i)
    i = _skip_lws(p, i, e)
    if i < e and p[i] != b',':
        _fail("Via: unexpected character", i)
    return i


cdef inline void _shift_via(ViaParts* v, int32_t d) noexcept:
    # The parts of a value scanned on its own, moved by d: to where a header line puts it.
    v.s += d
    v.e += d
    v.proto_s += d
    v.proto_e += d
    v.ver_s += d
    v.ver_e += d
    v.tr_s += d
    v.tr_e += d
    v.host_s += d
    v.host_e += d
    v.params_s += d
    if v.branch_s >= 0:
        v.branch_s += d
        v.branch_e += d
    if v.received_s >= 0:
        v.received_s += d
        v.received_e += d
    if v.maddr_s >= 0:
        v.maddr_s += d
        v.maddr_e += d


cdef Py_ssize_t _scan_name_addr(const char* p, Py_ssize_t i, Py_ssize_t e, bint in_list,
                                NameAddrParts* na, bint check_uri=True) except -2:
    """One (name-addr / addr-spec) *(;param) element from i; returns the index of the ',' that
    ends it (only when in_list), or e.  With check_uri False the URI's own syntax is left for
    the first read of ``.uri`` (parse() uses that: routing needs From/To tags, not their URIs)."""
    cdef ParamSpan prm
    cdef Py_ssize_t j, n
    cdef const char* q
    cdef UriParts u
    i = _skip_lws(p, i, e)
    na.s = i
    na.dn_s = na.dn_e = -1
    na.quoted = False
    na.angle = False
    na.wildcard = False
    na.tag_s = na.tag_e = -1
    if i >= e:
        _fail("empty name-addr", i)
    if p[i] == b'"':
        na.dn_s = i
        i = _scan_quoted(p, i, e)
        na.dn_e = i
        na.quoted = True
        i = _skip_lws(p, i, e)
        if i >= e or p[i] != b'<':
            _fail("expected '<' after display name", i)
    elif p[i] == b'*' and in_list:
        # Contact: * (RFC 3261 10.2.2)
        na.wildcard = True
        na.uri_s = i
        na.uri_e = i + 1
        na.params_s = na.params_e = i + 1
        i += 1
        na.e = i
        i = _skip_lws(p, i, e)
        if i < e and p[i] != b',':
            _fail("unexpected character after '*'", i)
        return i
    else:
        # Either a display name of tokens and LWS followed by '<', or an addr-spec.
        j = i
        while j < e and (fastsip_token[<unsigned char>p[j]] or _is_lws(p[j])):
            j += 1
        if j < e and p[j] == b'<':
            if j > i:
                na.dn_s = i
                na.dn_e = _rtrim(p, i, j)
            i = j
    if i < e and p[i] == b'<':
        na.angle = True
        q = <const char*>memchr(p + i + 1, b'>', e - i - 1)
        if q == NULL:
            _fail("unterminated '<'", i)
        j = q - p
        # Spaces just inside < > are not allowed by the grammar (RFC 4475 3.1.2.14); being liberal
        # here costs nothing and the value is forwarded as written.
        na.uri_s = _skip_lws(p, i + 1, j)
        na.uri_e = _rtrim(p, na.uri_s, j)
        i = j + 1
    else:
        # addr-spec: the URI runs to the first ';' ',' or LWS; what follows are header params.
        na.uri_s = i
        while i < e and not _is_lws(p[i]) and p[i] != b';' and not (p[i] == b',' and in_list):
            if not fastsip_urichar[<unsigned char>p[i]]:
                _fail("invalid character in URI", i)
            i += 1
        na.uri_e = i
    if check_uri:
        _scan_uri(p, na.uri_s, na.uri_e, &u)
    na.params_s = i
    while True:
        n = _next_param(p, i, e, &prm)
        if n < 0:
            break
        i = n
        # A duplicated param counts once, first wins (as tshark and most stacks read it).
        if (na.tag_s < 0 and prm.value_s >= 0
                and _ieq(p + prm.name_s, prm.name_e - prm.name_s, b"tag", 3)):
            na.tag_s = prm.value_s
            na.tag_e = prm.value_e
    na.params_e = i
    na.e = _rtrim(p, na.s, i)
    i = _skip_lws(p, i, e)
    if i < e and not (in_list and p[i] == b','):
        _fail("unexpected character after name-addr", i)
    return i


# ---------------------------------------------------------------------------------------------
# Typed values
# ---------------------------------------------------------------------------------------------

CSeq = namedtuple("CSeq", ["seq", "method"])
CSeq.__doc__ = "The CSeq header field: sequence number and method (RFC 3261 20.16)."
CSeq.__module__ = "fastsip.sip"
cdef object _CSeq = CSeq


cdef inline object _make_cseq(int64_t seq, str method):
    return fastsip_tuple2(_CSeq, seq, method)

cdef object _tuple_new = tuple.__new__

# Interned method names, so reading msg.method or cseq.method for the common ones allocates nothing.
_METHODS = ["INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE",
            "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE"]
cdef dict _method_by_bytes = {m.encode(): m for m in _METHODS}
_TRANSPORTS = ["UDP", "TCP", "TLS", "SCTP", "WS", "WSS", "TLS-SCTP"]
cdef dict _transport_by_bytes = {}
for _t in _TRANSPORTS:
    _transport_by_bytes[_t.encode()] = _t
    _transport_by_bytes[_t.lower().encode()] = _t


cdef bytes _methods_blob = "".join(_METHODS).encode()
cdef list _method_str = list(_METHODS)
cdef int _n_methods = len(_METHODS)
cdef int32_t _method_off[16]
cdef int32_t _method_len[16]
_k = 0
for _i, _m in enumerate(_METHODS):
    _method_off[_i] = _k
    _method_len[_i] = len(_m)
    _k += len(_m)


cdef inline str _method_text(const char* p, Py_ssize_t s, Py_ssize_t e):
    # A scan of 14 short names beats hashing a fresh bytes object; the common methods come back
    # as shared str objects, so reading msg.method allocates nothing.
    cdef Py_ssize_t n = e - s
    cdef int k
    cdef const char* blob = PyBytes_AS_STRING(_methods_blob)
    for k in range(_n_methods):
        if _method_len[k] == n and memcmp(blob + _method_off[k], p + s, n) == 0:
            return <str>_method_str[k]
    return _text(p, s, e)


cdef str _unquote(const char* p, Py_ssize_t s, Py_ssize_t e):
    """The content of a quoted-string p[s:e] (quotes included), quoted-pairs resolved."""
    cdef Py_ssize_t i
    out = bytearray()
    i = s + 1
    e -= 1
    while i < e:
        if p[i] == b'\\' and i + 1 < e:
            i += 1
        out.append(<unsigned char>p[i])
        i += 1
    return _text_lws(out, 0, len(out))


cdef dict _params_dict(const char* p, Py_ssize_t i, Py_ssize_t e):
    """Generic params as {lowercase name: value or None}; quoted values are unquoted."""
    cdef ParamSpan prm
    cdef Py_ssize_t n
    cdef dict d = {}
    while True:
        n = _next_param(p, i, e, &prm)
        if n < 0:
            return d
        i = n
        name = _text_lower(p, prm.name_s, prm.name_e)
        if name in d:
            continue
        if prm.value_s < 0:
            d[name] = None
        elif prm.quoted:
            d[name] = _unquote(p, prm.value_s, prm.value_e)
        else:
            d[name] = _text(p, prm.value_s, prm.value_e)


cdef inline int _hexval(char c) noexcept:
    if c >= b'0' and c <= b'9':
        return c - 48
    c |= 0x20
    if c >= b'a' and c <= b'f':
        return c - 87
    return -1


cdef str _unescape(const char* p, Py_ssize_t s, Py_ssize_t e):
    """%HH escapes resolved (RFC 3261 19.1.2); a '%' not followed by two hex digits stays."""
    cdef Py_ssize_t i
    cdef int hi, lo
    if memchr(p + s, b'%', e - s) == NULL:
        return _text(p, s, e)
    out = bytearray()
    i = s
    while i < e:
        if p[i] == b'%' and e - i >= 3:
            hi = _hexval(p[i + 1])
            lo = _hexval(p[i + 2])
            if hi >= 0 and lo >= 0:
                out.append(hi * 16 + lo)
                i += 3
                continue
        out.append(<unsigned char>p[i])
        i += 1
    return out.decode("utf-8", "surrogateescape")


@cython.freelist(16)
@cython.no_gc
cdef class URI:
    """A URI: sip, sips and tel are parsed; other schemes are kept opaque (RFC 3261 19.1).

    ``str(uri)`` gives the text as written.  ``user``, ``password`` and parameter values are
    %-unescaped.  ``==`` follows RFC 3261 19.1.4 for sip/sips (and RFC 3966 for tel).
    """
    # Fields: _message.pxd.

    def __init__(self, text):
        cdef bytes b = _as_bytes(text)
        _fill_uri_p(self, b, 0, len(b))

    @property
    def is_sip(self):
        """True for sip: and sips: URIs."""
        return self._is_sip()

    cdef bint _is_sip(self) noexcept:
        return self.scheme == "sip" or self.scheme == "sips"

    cpdef str aor(self):
        """The canonical address-of-record this URI names (the registrar's and the location
        service's key, RFC 3261 §10.3): ``scheme:user@host`` with the scheme and host
        lowercased, the user kept as is (§19.1.4 compares user parts case-sensitively), and
        no port, parameters or headers; ``scheme:host`` without a user part.  A tel: (or
        other non-SIP) URI keeps its opaque part as is."""
        scheme = lowered(self.scheme)
        if not self._is_sip():
            return f"{scheme}:{self.host}"
        host = lowered(self.host)
        return f"{scheme}:{host}" if self.user is None else f"{scheme}:{self.user}@{host}"

    @property
    def transport(self):
        """The transport parameter, lowercased, or None."""
        return self._transport()

    cdef object _transport(self):
        t = self.params.get("transport")
        return t.lower() if t else None

    @property
    def lr(self):
        """True when the URI carries the lr parameter (a loose router, RFC 3261 16.4)."""
        return "lr" in self.params

    cdef bint _lr(self) except -1:
        return "lr" in self.params

    @property
    def maddr(self):
        return self._maddr()

    cdef object _maddr(self):
        return self.params.get("maddr")

    @property
    def host_address(self):
        """The host without IPv6 brackets: what a socket call wants."""
        h = self.host
        return h[1:len(h) - 1] if h.startswith("[") else h

    def __str__(self):
        return self._text

    def __repr__(self):
        return f"URI({self._text!r})"

    def __hash__(self):
        if self.scheme == "tel":
            return hash((self.scheme, _tel_digits(self.host)))
        return hash((self.scheme, self.user, _norm_host(self.host)))

    def __eq__(self, other):
        if isinstance(other, str):
            try:
                other = URI(other)
            except ValueError:
                return False
        if not isinstance(other, URI):
            return NotImplemented
        return _uri_equal(self, <URI>other)

    def __ne__(self, other):
        r = self.__eq__(other)
        return r if r is NotImplemented else not r

    def __reduce__(self):
        return (URI, (self._text,))


cdef object _norm_host(str host):
    if host and host[0] == "[":
        try:
            return ipaddress.IPv6Address(host[1:len(host) - 1])
        except ValueError:
            pass
    return host.lower() if host else host


# URI parameters that must match when present in either URI (RFC 3261 19.1.4).
cdef tuple _URI_STRICT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


cdef bint _uri_equal(URI a, URI b):
    cdef str k
    if a.scheme != b.scheme:
        return False
    if a.scheme == "tel":
        return (_tel_digits(a.host) == _tel_digits(b.host)
                and {k: (v or "").lower() for k, v in a.params.items()}
                == {k: (v or "").lower() for k, v in b.params.items()})
    if a.scheme != "sip" and a.scheme != "sips":
        return a._text.partition(":")[2] == b._text.partition(":")[2]
    if a.user != b.user or a.password != b.password:
        return False
    if _norm_host(a.host) != _norm_host(b.host) or a.port != b.port:
        return False
    for k in _URI_STRICT_PARAMS:
        if (k in a.params) != (k in b.params):
            return False
    for k, v in a.params.items():
        if k in b.params:
            w = b.params[k]
            if (v or "").lower() != (w or "").lower():
                return False
    return a.headers == b.headers


cdef str _tel_digits(str number):
    # Visual separators do not count (RFC 3966 5.1.1).
    return "".join(c for c in number if c not in "-.()").lower()


cdef inline Py_ssize_t _uri_param(const char* p, Py_ssize_t i, Py_ssize_t e,
                                  Py_ssize_t* name_e) except -1:
    """The URI parameter that starts at p[i] (just after its ';'): returns its end (the next
    ';', or e) and sets ``name_e`` to the end of its name (its '=', or that end).  URI params
    are ;name[=value], split on ';' (values may hold ':' '[' ']' '/' ...); an empty one (';;',
    a trailing ';') is malformed.  The one reading of a parameter list: the URI builder, the
    check without building, and the NAT rules' scan all walk it with this."""
    cdef const char* q = <const char*>memchr(p + i, b';', e - i)
    cdef Py_ssize_t j = e if q == NULL else q - p
    if j == i:
        raise ParseError("empty URI parameter", i)
    q = <const char*>memchr(p + i, b'=', j - i)
    name_e[0] = j if q == NULL else q - p
    return j


cdef int _check_uri(const char* p, Py_ssize_t s, Py_ssize_t e, UriParts* u) except -1:
    """Raise the ParseError that building the URI in p[s:e] would raise, without building it:
    for a URI that is only validated (a request's From and To), not read.  Its parts are left
    in ``u``."""
    cdef Py_ssize_t i, k
    _scan_uri(p, s, e, u)
    if u.params_e > u.params_s:
        i = u.params_s
        while i < u.params_e:
            i = _uri_param(p, i + 1, u.params_e, &k)
    return 0


cdef int _fill_uri_p(URI self, const char* p, Py_ssize_t s, Py_ssize_t e) except -1:
    cdef UriParts u
    _scan_uri(p, s, e, &u)
    return _fill_uri_parts(self, p, s, e, &u)


cdef int _fill_uri_parts(URI self, const char* p, Py_ssize_t s, Py_ssize_t e,
                         const UriParts* u) except -1:
    """Fill ``self`` from the parts ``_scan_uri`` found in p[s:e]."""
    cdef Py_ssize_t i, j, k
    self._text = _text(p, s, e)
    self.scheme = _text_lower(p, s, u.scheme_e)
    self.user = _unescape(p, u.user_s, u.user_e) if u.user_s >= 0 else None
    self.password = _unescape(p, u.pw_s, u.pw_e) if u.pw_s >= 0 else None
    if (u.kind == URI_SIP or u.kind == URI_SIPS) and not (
            u.host_e > u.host_s and p[u.host_s] == b'['):
        self.host = _text_lower(p, u.host_s, u.host_e)      # (an IPv6 reference as written)
    else:
        self.host = _text(p, u.host_s, u.host_e)
    self.port = u.port if u.port >= 0 else None
    self.params = {}
    if u.params_e > u.params_s:
        i = u.params_s
        while i < u.params_e:
            i += 1
            j = _uri_param(p, i, u.params_e, &k)
            name = _text(p, i, k) if _lower_already(p, i, k) else _unescape(p, i, k).lower()
            self.params[name] = _unescape(p, k + 1, j) if k < j else None
            i = j
    self.headers = {}
    if u.headers_s >= 0:
        i = u.headers_s
        while i < u.headers_e:
            j = i
            while j < u.headers_e and p[j] != b'&':
                j += 1
            k = i
            while k < j and p[k] != b'=':
                k += 1
            if j > i:
                self.headers[_unescape(p, i, k)] = _unescape(p, k + 1, j) if k < j else ""
            i = j + 1
    return 0


cdef URI _make_uri(const char* p, Py_ssize_t s, Py_ssize_t e):
    cdef URI u = URI.__new__(URI)
    _fill_uri_p(u, p, s, e)
    return u


cdef URI _make_uri_from(const char* p, Py_ssize_t s, Py_ssize_t e, const UriParts* parts):
    """``_make_uri`` for a URI already scanned (and its parameters checked)."""
    cdef URI u = URI.__new__(URI)
    _fill_uri_parts(u, p, s, e, parts)
    return u


def parse_uri(text):
    """Parse a URI from ``str`` or bytes; raises ParseError when it is malformed."""
    return URI(text)


@cython.freelist(32)
@cython.no_gc
cdef class Via:
    """One Via header field value (RFC 3261 20.42), read lazily from the message buffer."""
    # Fields: _message.pxd.  A lower Via is only split out of its header line (_lazy, _ls,
    # _le); its syntax is parsed on first read, so listing msg.via costs no parsing (the top
    # one is parsed, and checked, by parse()).

    cdef int _need(self) except -1:
        cdef Py_ssize_t end
        if self._lazy:
            end = _scan_via(self._p, self._ls, self._le, &self._v)
            if end != self._le:
                _fail("Via: unexpected ','", end)
            self._lazy = False
        return 0

    @property
    def protocol(self):
        """"SIP/2.0" (name/version as sent, without LWS)."""
        self._need()
        return _text(self._p, self._v.proto_s, self._v.proto_e).upper() + "/" + \
            _text(self._p, self._v.ver_s, self._v.ver_e)

    @property
    def transport(self):
        """Transport in upper case: "UDP", "TCP", "TLS", "SCTP", "WS", "WSS" or as sent."""
        return self._transport()

    cdef str _transport(self):
        self._need()
        cdef object b = PyBytes_FromStringAndSize(self._p + self._v.tr_s,
                                                  self._v.tr_e - self._v.tr_s)
        t = _transport_by_bytes.get(b)
        return t if t is not None else _text(self._p, self._v.tr_s, self._v.tr_e).upper()

    @property
    def host(self):
        """The sent-by host as written (IPv6 references keep their brackets)."""
        return self._host()

    cdef str _host(self):
        self._need()
        return _text(self._p, self._v.host_s, self._v.host_e)

    @property
    def port(self):
        """The sent-by port, or None when absent."""
        return self._port()

    cdef object _port(self):
        self._need()
        return self._v.port if self._v.port >= 0 else None

    @property
    def sent_by(self):
        """(host, port) with port None when absent."""
        return (self._host(), self._port())

    @property
    def branch(self):
        return self._branch()

    cdef object _branch(self):
        self._need()
        return _opt_text(self._p, self._v.branch_s, self._v.branch_e)

    @property
    def received(self):
        return self._received()

    cdef object _received(self):
        self._need()
        return _opt_text(self._p, self._v.received_s, self._v.received_e)

    @property
    def maddr(self):
        return self._maddr()

    cdef object _maddr(self):
        self._need()
        return _opt_text(self._p, self._v.maddr_s, self._v.maddr_e)

    @property
    def rport(self):
        """The rport value (RFC 3581): None when absent, 0 when present without a value."""
        return self._rport()

    cdef object _rport(self):
        self._need()
        if self._v.rport == RPORT_ABSENT:
            return None
        return 0 if self._v.rport == RPORT_EMPTY else self._v.rport

    @property
    def has_rport(self):
        self._need()
        return self._v.rport != RPORT_ABSENT

    @property
    def params(self):
        """Every parameter as {lowercase name: value or None}, in order."""
        self._need()
        if self._params is None:
            self._params = _params_dict(self._p, self._v.params_s, self._v.e)
        return self._params

    @property
    def rfc3261_branch(self):
        """True when the branch carries the RFC 3261 magic cookie "z9hG4bK" (17.2.3)."""
        self._need()
        return (self._v.branch_s >= 0 and self._v.branch_e - self._v.branch_s >= 7
                and PyBytes_FromStringAndSize(self._p + self._v.branch_s, 7) == b"z9hG4bK")

    def __str__(self):
        self._need()
        return _text_lws(self._p, self._v.s, self._v.e)

    def __repr__(self):
        self._need()
        return f"<Via {self!s}>"

    def __eq__(self, other):
        self._need()
        if isinstance(other, Via):
            return str(self) == str(other)
        return NotImplemented

    def __hash__(self):
        self._need()
        return hash(str(self))


cdef Via _make_via(object owner, const char* p, ViaParts* v):
    cdef Via via = Via.__new__(Via)
    via._owner = owner
    via._p = p
    via._v = v[0]
    return via


cdef Via _lazy_via(object owner, const char* p, Py_ssize_t s, Py_ssize_t e):
    cdef Via via = Via.__new__(Via)
    via._owner = owner
    via._p = p
    via._lazy = True
    via._ls = <int32_t>s
    via._le = <int32_t>e
    return via


@cython.freelist(32)
@cython.no_gc
cdef class NameAddr:
    """A name-addr or addr-spec with its header parameters: From, To, Contact, Route,
    Record-Route (RFC 3261 20.10, 20.20, 20.39)."""
    # Fields: _message.pxd.

    @property
    def display_name(self):
        """The display name, unquoted and unescaped; None when there is none."""
        if self._n.dn_s < 0:
            return None
        if self._n.quoted:
            return _unquote(self._p, self._n.dn_s, self._n.dn_e)
        return _text_lws(self._p, self._n.dn_s, self._n.dn_e)

    @property
    def uri(self):
        """The URI (None for the Contact wildcard '*')."""
        return self._uri()

    cdef URI _uri(self):
        if self._n.wildcard:
            return None
        if self._c_uri is None:
            if self._u_ok:
                self._c_uri = _make_uri_from(self._p, self._n.uri_s, self._n.uri_e, &self._u)
            else:
                self._c_uri = _make_uri(self._p, self._n.uri_s, self._n.uri_e)
        return self._c_uri

    cdef bint _uri_valid(self) except -1:
        """Whether there is a URI (not the "*" Contact); raises the ParseError :attr:`uri`
        would, without building the URI when it was not read yet."""
        if self._n.wildcard:
            return False
        if self._c_uri is None and not self._u_ok:
            _check_uri(self._p, self._n.uri_s, self._n.uri_e, &self._u)
            self._u_ok = True
        return True

    cdef tuple _sip_host_port(self):
        """``(host, port, maddr)`` of the URI when it is a sip or sips URI, read without
        building it: the host as written (compare it lowered), the port or None, and whether a
        ``maddr`` parameter with a value is set.  None for another scheme or the "*" Contact.
        Raises the ParseError :attr:`uri` would: the URI is checked whole.  (The NAT rules ask
        this of every message's Contact, which nothing else reads as a URI.)"""
        cdef int kind = self._sip_scan()
        cdef URI built
        if kind == SIP_SCAN_OTHER:
            return None
        if kind != SIP_SCAN_READ:
            return (_text(self._p, self._u.host_s, self._u.host_e),
                    self._u.port if self._u.port >= 0 else None, kind == SIP_SCAN_MADDR)
        built = self._uri()
        if not built._is_sip():
            return None
        return (built.host, built.port, bool(built._maddr()))

    cdef int _sip_scan(self) except -2:
        """How :meth:`_sip_host_port` can answer: SIP_SCAN_OTHER (not a sip or sips URI, or
        "*"), SIP_SCAN_PLAIN or SIP_SCAN_MADDR (host and port are ``_u``'s offsets into
        ``_p``; with or without a ``maddr``), or SIP_SCAN_READ (the URI object must read it:
        an escaped parameter name, or it is built already).  Raises the ParseError
        :attr:`uri` would."""
        cdef UriParts* u = &self._u
        cdef const char* p = self._p
        cdef Py_ssize_t i, j, k
        cdef bint maddr = False, escaped = False
        if self._n.wildcard:
            return SIP_SCAN_OTHER
        if self._c_uri is not None:
            return SIP_SCAN_READ
        if not self._u_ok:
            _scan_uri(p, self._n.uri_s, self._n.uri_e, u)
        if u.params_e > u.params_s:
            i = u.params_s
            while i < u.params_e:
                i += 1
                j = _uri_param(p, i, u.params_e, &k)
                if memchr(p + i, b'%', k - i) != NULL:
                    escaped = True           # an escaped name: the URI's own reading
                elif _ieq(p + i, k - i, b"maddr", 5):
                    maddr = k + 1 < j        # (the last one counts, as in uri.params)
                i = j
        self._u_ok = True                    # scanned, and every parameter checked
        if escaped:
            return SIP_SCAN_READ
        if u.kind != URI_SIP and u.kind != URI_SIPS:
            return SIP_SCAN_OTHER
        return SIP_SCAN_MADDR if maddr else SIP_SCAN_PLAIN

    cdef str _uri_text(self):
        """``str(self.uri)`` without building the URI: the text as written (None for "*")."""
        if self._n.wildcard:
            return None
        if self._c_uri is not None:
            return self._c_uri._text
        return _text(self._p, self._n.uri_s, self._n.uri_e)

    @property
    def tag(self):
        return self._tag()

    cdef object _tag(self):
        return _opt_text(self._p, self._n.tag_s, self._n.tag_e)

    @property
    def params(self):
        """Header parameters (not URI parameters) as {lowercase name: value or None}."""
        if self._params is None:
            self._params = _params_dict(self._p, self._n.params_s, self._n.params_e)
        return self._params

    @property
    def wildcard(self):
        """True for the "*" Contact of a remove-all REGISTER (RFC 3261 10.2.2)."""
        return bool(self._n.wildcard)

    @property
    def expires(self):
        """The expires parameter as an int (Contact), or None."""
        v = self.params.get("expires")
        if v is None or not v.isdigit():
            return None
        return int(v)

    @property
    def q(self):
        """The q parameter as a float (Contact), or None."""
        v = self.params.get("q")
        try:
            return float(v) if v is not None else None
        except ValueError:
            return None

    def __str__(self):
        return _text_lws(self._p, self._n.s, self._n.e)

    def __repr__(self):
        return f"<NameAddr {self!s}>"

    def __eq__(self, other):
        if isinstance(other, NameAddr):
            return str(self) == str(other)
        return NotImplemented

    def __hash__(self):
        return hash(str(self))


cdef NameAddr _make_name_addr(object owner, const char* p, NameAddrParts* n):
    cdef NameAddr na = NameAddr.__new__(NameAddr)
    na._owner = owner
    na._p = p
    na._n = n[0]
    return na


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------

cdef class Limits:
    """Explicit bounds for untrusted input.  A message over a bound raises ParseError (513 for
    size, 400 otherwise); nothing is ever read past the buffer or left unbounded."""
    cdef readonly Py_ssize_t max_message_size
    cdef readonly Py_ssize_t max_headers
    cdef readonly Py_ssize_t max_line_length

    def __init__(self, max_message_size=65535, max_headers=256, max_line_length=8192):
        if max_message_size <= 0 or max_message_size > 0x7FFFFFFF:
            raise ValueError("max_message_size must be in 1 .. 2**31-1")
        if max_headers <= 0 or max_headers > 0x7FFF:
            raise ValueError("max_headers must be in 1 .. 32767")
        if max_line_length <= 0:
            raise ValueError("max_line_length must be positive")
        self.max_message_size = max_message_size
        self.max_headers = max_headers
        self.max_line_length = max_line_length

    def __repr__(self):
        return (f"Limits(max_message_size={self.max_message_size}, max_headers={self.max_headers},"
                f" max_line_length={self.max_line_length})")


cdef Limits _default_limits = Limits()


# ---------------------------------------------------------------------------------------------
# The message (its fields, the HEntry of its header index and its C methods are declared in
# _message.pxd, for compiled layers to cimport)
# ---------------------------------------------------------------------------------------------

DEF POOLED_HEADERS = 32
DEF POOL_SIZE = 256

# Header index arrays of POOLED_HEADERS entries, kept for reuse: parsing a message then takes no
# malloc.  Only touched with the GIL held (parse and dealloc).
cdef HEntry* _pool[POOL_SIZE]
cdef int _pool_n = 0


cdef HEntry* _take_headers() except NULL:
    global _pool_n
    cdef HEntry* a
    if _pool_n:
        _pool_n -= 1
        return _pool[_pool_n]
    a = <HEntry*>PyMem_Malloc(POOLED_HEADERS * sizeof(HEntry))
    if a == NULL:
        raise MemoryError()
    return a


cdef void _give_headers(HEntry* a, int cap) noexcept:
    global _pool_n
    if cap == POOLED_HEADERS and _pool_n < POOL_SIZE:
        _pool[_pool_n] = a
        _pool_n += 1
    else:
        PyMem_Free(a)


@cython.no_gc
cdef class Message:
    """A parsed SIP message (base of Request and Response).  Build one with ``parse()``."""
    def __dealloc__(self):
        if self._h != NULL:
            _give_headers(self._h, self._cap)
            self._h = NULL

    def __init__(self, *args, **kwargs):
        raise TypeError("use fastsip.parse(data), Request.create() or Response.create()")

    # -- internal access -------------------------------------------------------------------

    cdef int _find(self, int hid, int after) noexcept:
        cdef int i
        if after < 0:
            i = self._first[hid]
            return i
        for i in range(after + 1, self._nh):
            if self._h[i].id == hid and not self._h[i].deleted:
                return i
        return -1

    cdef int _add_entry(self) except -1:
        cdef HEntry* nh
        if self._nh == self._cap:
            nh = <HEntry*>PyMem_Realloc(self._h, 2 * self._cap * sizeof(HEntry))
            if nh == NULL:
                raise MemoryError()
            self._h = nh
            self._cap *= 2
        self._nh += 1
        return self._nh - 1

    cdef void _reindex(self) noexcept:
        cdef int i
        for i in range(N_HEADER_IDS):
            self._first[i] = -1
        for i in range(self._nh - 1, -1, -1):
            if not self._h[i].deleted:
                self._first[self._h[i].id] = i

    cdef void _invalidate_for(self, int hid) noexcept:
        # An edit of the header ``hid`` (0: one of no known name): what was read of the
        # other headers stays valid -- their bytes and offsets did not move (the views and
        # parts point into buffers, never at entry numbers) -- so a stamped Via, an added
        # Record-Route or a popped Route keeps the From and To parse() found, and the views.
        self._edited = True
        if hid == H_VIA:
            self._parts_ok = False
            self._c_via = self._c_top_via = None
        elif hid == H_FROM:
            self._names_ok = False
            self._c_from = None
        elif hid == H_TO:
            self._names_ok = False
            self._c_to = None
        elif hid == H_CSEQ:
            self._c_cseq = None
        elif hid == H_ROUTE:
            self._c_route = None
        elif hid == H_CONTACT:
            self._c_contact = None
        elif hid == H_RECORD_ROUTE:
            self._c_record_route = None

    cdef int _copy_into(self, Message m) except -1:
        # The copy shares the (immutable) buffer and the bytes of edited lines, and gets its
        # own header index and list of edited lines, so edits to one never show in the other.
        m._data = self._data
        m._buf = self._buf
        m._len = self._len
        m._start = self._start
        m._sl_e = self._sl_e
        m._hdr_s = self._hdr_s
        m._blank_s = self._blank_s
        m._body_s = self._body_s
        m._body_e = self._body_e
        if self._cap == POOLED_HEADERS:
            m._h = _take_headers()
        else:
            m._h = <HEntry*>PyMem_Malloc(self._cap * sizeof(HEntry))
            if m._h == NULL:
                raise MemoryError()
        m._cap = self._cap
        memcpy(m._h, self._h, self._nh * sizeof(HEntry))
        m._nh = self._nh
        memcpy(m._first, self._first, sizeof(self._first))
        m._parts_ok = self._parts_ok
        m._names_ok = self._names_ok
        m._top_via = self._top_via
        m._from_p = self._from_p
        m._to_p = self._to_p
        m._extra = list(self._extra) if self._extra is not None else None
        m._new_body = self._new_body
        m._new_start_line = self._new_start_line
        m._edited = self._edited
        # The views read the shared buffers at offsets the copy has too, and an edit of either
        # message clears only its own caches: the copy starts with the views parsed so far.
        m._c_via = self._c_via
        m._c_top_via = self._c_top_via
        m._c_from = self._c_from
        m._c_to = self._c_to
        m._c_cseq = self._c_cseq
        m._c_route = self._c_route
        m._c_contact = self._c_contact
        m._c_record_route = self._c_record_route
        return 0

    # -- validation done by parse() ----------------------------------------------------------

    cdef int _validate(self) except -1:
        """The checks that make an accepted message safe to route (see the module doc)."""
        cdef int i
        cdef HEntry* h
        cdef const char* p = self._buf
        cdef Py_ssize_t j, k
        cdef NameAddrParts na
        for i in range(self._nh):
            h = &self._h[i]
            if h.id == H_VIA:
                # The top Via keys the transaction and routes the response: it must be sound
                # now.  Lower ones are only read when a response is forwarded (msg.via).
                if i == self._first[H_VIA]:
                    _scan_via(p, h.value_s, h.value_e, &self._top_via)
            elif h.id == H_FROM:
                _scan_name_addr(p, h.value_s, h.value_e, False,
                                &self._from_p if i == self._first[H_FROM] else &na, False)
            elif h.id == H_TO:
                _scan_name_addr(p, h.value_s, h.value_e, False,
                                &self._to_p if i == self._first[H_TO] else &na, False)
            elif h.id == H_CSEQ:
                j = _skip_lws(p, h.value_s, h.value_e)
                k = _digits_end(p, j, h.value_e)
                # RFC 3261 8.1.1.5: the sequence number is less than 2**31.
                if _digits(p, j, k, 0x7FFFFFFF) < 0:
                    _fail("CSeq: invalid sequence number", j)
                j = _skip_lws(p, k, h.value_e)
                if j == k or j >= h.value_e:
                    _fail("CSeq: missing method", j)
                if _token_end(p, j, h.value_e) != h.value_e:
                    _fail("CSeq: invalid method", _token_end(p, j, h.value_e))
            elif h.id == H_MAX_FORWARDS:
                if _digits(p, h.value_s, h.value_e, 255) < 0:
                    _fail("Max-Forwards: not a number in 0..255", h.value_s)
            elif h.id == H_CALL_ID:
                if h.value_e <= h.value_s:
                    _fail("Call-ID: empty", h.value_s)
        self._parts_ok = self._names_ok = True
        return 0

    # -- header access -----------------------------------------------------------------------

    cdef str _value_str(self, int i):
        cdef HEntry* h = &self._h[i]
        cdef const char* p = self._base(h)
        if h.folded:
            return _text_lws(p, h.value_s, h.value_e)
        return _text(p, h.value_s, h.value_e)

    cdef list _values(self, int hid, bint split):
        """Every value of header id hid (not H_OTHER), split at top-level commas if asked."""
        cdef list out = []
        cdef int i = self._first[hid]
        cdef HEntry* h
        cdef const char* p
        cdef Py_ssize_t j, k
        while i >= 0:
            h = &self._h[i]
            if not split:
                out.append(self._value_str(i))
            else:
                p = self._base(h)
                j = h.value_s
                while j < h.value_e:
                    k = _split_comma(p, j, h.value_e)
                    if k > j or k < h.value_e:
                        out.append(_text_lws(p, j, k))
                    j = k + 1
            i = self._find(hid, i)
        return out

    @property
    def headers(self):
        """Every header field, case-insensitively and with compact forms equal to long ones."""
        return Headers._new(self)

    @property
    def call_id(self):
        """The Call-ID (str), or None when the message has none."""
        return self._call_id()

    cdef str _call_id(self):
        cdef int i = self._first[H_CALL_ID]
        return self._value_str(i) if i >= 0 else None

    @property
    def cseq(self):
        """CSeq(seq, method), or None when the message has none."""
        return self._cseq()

    cdef object _cseq(self):
        cdef int i
        cdef HEntry* h
        cdef const char* p
        cdef Py_ssize_t j, k, m
        if self._c_cseq is None:
            i = self._first[H_CSEQ]
            if i < 0:
                return None
            h = &self._h[i]
            p = self._base(h)
            j = _skip_lws(p, h.value_s, h.value_e)
            k = _digits_end(p, j, h.value_e)
            m = _skip_lws(p, k, h.value_e)
            self._c_cseq = _make_cseq(_digits(p, j, k, 0x7FFFFFFF), _method_text(p, m, h.value_e))
        return self._c_cseq

    @property
    def max_forwards(self):
        """Max-Forwards as an int, or None when absent."""
        return self._max_forwards()

    cdef object _max_forwards(self):
        cdef int i = self._first[H_MAX_FORWARDS]
        cdef HEntry* h
        if i < 0:
            return None
        h = &self._h[i]
        return _digits(self._base(h), h.value_s, h.value_e, 255)

    @property
    def content_length(self):
        """Length of the body in octets (the Content-Length that framed it)."""
        if self._new_body is not None:
            return len(self._new_body)
        return self._body_e - self._body_s

    @property
    def content_type(self):
        cdef int i = self._first[H_CONTENT_TYPE]
        return self._value_str(i) if i >= 0 else None

    @property
    def body(self):
        """The body: a zero-copy view of exactly Content-Length octets (``bytes(msg.body)``
        copies it)."""
        if self._new_body is not None:
            return memoryview(self._new_body)
        return memoryview(self._data)[self._body_s:self._body_e]

    @body.setter
    def body(self, value):
        self.set_body(value)

    @property
    def via(self):
        """Every Via value, top first."""
        return self._vias()

    cdef list _vias(self):
        cdef list out
        cdef int i
        cdef HEntry* h
        cdef const char* p
        cdef Py_ssize_t j, k
        if self._c_via is None:
            out = []
            i = self._first[H_VIA]
            while i >= 0:
                h = &self._h[i]
                p = self._base(h)
                j = h.value_s
                if self._parts_ok and i == self._first[H_VIA]:
                    out.append(_make_via(self._owner_of(h), p, &self._top_via))
                    j = self._top_via.e
                    j = _skip_lws(p, j, h.value_e) + 1
                while j < h.value_e:
                    k = _split_comma(p, j, h.value_e)
                    if _skip_lws(p, j, k) == k:
                        _fail("Via: empty value", j)
                    out.append(_lazy_via(self._owner_of(h), p, j, k))
                    j = k + 1
                i = self._find(H_VIA, i)
            self._c_via = out
        return self._c_via

    @property
    def top_via(self):
        """The topmost Via value, or None."""
        cdef int i = self._first[H_VIA]
        cdef HEntry* h
        if self._c_top_via is not None:
            return self._c_top_via
        if self._c_via is not None:
            return self._c_via[0] if self._c_via else None
        if i < 0:
            return None
        h = &self._h[i]
        if not self._parts_ok:
            self._rescan_top_via(h)
        via = _make_via(self._owner_of(h), self._base(h), &self._top_via)
        # (Read several times a message -- the key, the stamp, the response's route -- and
        # made once until the Via changes.)
        self._c_top_via = via
        return via

    cdef bint _top_via_parts(self, ViaParts* v, const char** p) except -1:
        """Fill ``v`` and ``p`` with the top Via's parts; False when there is no Via.  The
        parts parse() found are reused; after an edit of a Via the top value is scanned once
        more (_rescan_top_via)."""
        cdef int i = self._first[H_VIA]
        cdef HEntry* h
        if i < 0:
            return False
        h = &self._h[i]
        p[0] = self._base(h)
        if not self._parts_ok:
            self._rescan_top_via(h)
        v[0] = self._top_via
        return True

    cdef int _rescan_top_via(self, HEntry* h) except -1:
        # After an edit of a Via (the intake's stamp, the proxy's own Via on a branch): the
        # top value's parts again, kept until the next Via edit, so the transaction key, the
        # view and the routing of the response scan it once.
        _scan_via(self._base(h), h.value_s, h.value_e, &self._top_via)
        self._parts_ok = True
        return 0

    cdef object _single_name_addr(self, int hid):
        cdef int i = self._first[hid]
        cdef HEntry* h
        cdef NameAddrParts na
        if i < 0:
            return None
        h = &self._h[i]
        if self._names_ok and (hid == H_FROM or hid == H_TO):
            return _make_name_addr(self._owner_of(h), self._base(h),
                                   &self._from_p if hid == H_FROM else &self._to_p)
        # As parse() does: the URI's own syntax is checked when .uri is read, so .from_/.to
        # behave the same before and after an edit (a stamped Via) of the message.
        _scan_name_addr(self._base(h), h.value_s, h.value_e, False, &na, False)
        return _make_name_addr(self._owner_of(h), self._base(h), &na)

    cdef list _name_addr_list(self, int hid):
        cdef list out = []
        cdef int i = self._first[hid]
        cdef HEntry* h
        cdef const char* p
        cdef Py_ssize_t j
        cdef NameAddrParts na
        while i >= 0:
            h = &self._h[i]
            p = self._base(h)
            j = h.value_s
            while j < h.value_e:
                j = _scan_name_addr(p, j, h.value_e, True, &na)
                out.append(_make_name_addr(self._owner_of(h), p, &na))
                j += 1
            i = self._find(hid, i)
        return out

    @property
    def from_(self):
        """The From header field (NameAddr), or None."""
        return self._from()

    cdef NameAddr _from(self):
        if self._c_from is None:
            self._c_from = self._single_name_addr(H_FROM)
        return self._c_from

    @property
    def to(self):
        """The To header field (NameAddr), or None."""
        return self._to()

    cdef NameAddr _to(self):
        if self._c_to is None:
            self._c_to = self._single_name_addr(H_TO)
        return self._c_to

    # The lists of name-addrs below are the same list (and views, whose URIs are parsed once)
    # until the message is edited, as ``via``: a proxy reads them several times per message
    # (validation, loose-routing pops, the next hop, NAT detection, the registrar, the log).

    @property
    def contact(self):
        """Every Contact value (NameAddr; a wildcard '*' has ``.wildcard`` set)."""
        return self._contacts()

    cdef list _contacts(self):
        if self._c_contact is None:
            self._c_contact = self._name_addr_list(H_CONTACT)
        return self._c_contact

    @property
    def route(self):
        """Every Route value, first to last."""
        return self._routes()

    cdef list _routes(self):
        if self._c_route is None:
            self._c_route = self._name_addr_list(H_ROUTE)
        return self._c_route

    @property
    def record_route(self):
        """Every Record-Route value, first to last."""
        return self._record_routes()

    cdef list _record_routes(self):
        if self._c_record_route is None:
            self._c_record_route = self._name_addr_list(H_RECORD_ROUTE)
        return self._c_record_route

    @property
    def is_request(self):
        return isinstance(self, Request)

    @property
    def is_response(self):
        return isinstance(self, Response)

    @property
    def start_line(self):
        """The start line as text (no CRLF)."""
        if self._new_start_line is not None:
            return self._new_start_line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
        return _text(self._buf, self._start, self._sl_e)

    # -- edits (a journal over the header index) --------------------------------------------

    cdef int _line(self, int hid, const char* name, Py_ssize_t nlen, const char* value,
                   Py_ssize_t vlen) except -1:
        """Store a new header line "name: value\\r\\n" (one allocation) and leave its offsets in
        a fresh entry at the end of the index (the caller moves it).  Returns that entry."""
        cdef Py_ssize_t k
        cdef char c
        if nlen == 0:
            raise ValueError("empty header name")
        for k in range(nlen):
            if not fastsip_token[<unsigned char>name[k]]:
                raise ValueError(f"invalid header name {name[:nlen]!r}")
        for k in range(vlen):
            c = value[k]
            if c == b'\r' or c == b'\n' or c == 0:
                raise ValueError("header value must not contain CR, LF or NUL")
        cdef bytes line = PyBytes_FromStringAndSize(NULL, nlen + vlen + 4)
        cdef char* w = PyBytes_AS_STRING(line)
        memcpy(w, name, nlen)
        w[nlen] = b':'
        w[nlen + 1] = b' '
        memcpy(w + nlen + 2, value, vlen)
        w[nlen + 2 + vlen] = b'\r'
        w[nlen + 3 + vlen] = b'\n'
        if self._extra is None:
            self._extra = []
        self._extra.append(line)
        cdef int i = self._add_entry()
        cdef HEntry* h = &self._h[i]
        h.line_s = 0
        h.line_e = <int32_t>(nlen + vlen + 4)
        h.name_s = 0
        h.name_e = <int32_t>nlen
        h.value_s = <int32_t>(nlen + 2)
        h.value_e = <int32_t>(nlen + 2 + vlen)
        h.id = hid
        h.src = len(self._extra) - 1
        h.folded = False
        h.deleted = False
        return i

    cdef int _insert(self, int at, int hid, const char* name, Py_ssize_t nlen, const char* value,
                     Py_ssize_t vlen) except -1:
        """Insert a header line before entry `at` (at == _nh: after the last)."""
        cdef int i = self._line(hid, name, nlen, value, vlen)
        cdef HEntry tmp = self._h[i]
        cdef int k
        if at < i:
            memmove(&self._h[at + 1], &self._h[at], (i - at) * sizeof(HEntry))
            self._h[at] = tmp
            for k in range(N_HEADER_IDS):
                if self._first[k] >= at:
                    self._first[k] += 1
        if self._first[hid] < 0 or self._first[hid] > at:
            self._first[hid] = at
        self._invalidate_for(hid)
        return at

    cdef int _insert_obj(self, int at, int hid, object name, object value) except -1:
        cdef bytes n = _as_bytes(name)
        cdef bytes v = _as_bytes(value)
        return self._insert(at, hid, n, len(n), v, len(v))

    cdef int _replace_value(self, int i, const char* value, Py_ssize_t vlen) except -1:
        """Give entry i a new value, keeping its name as written."""
        cdef HEntry* h = &self._h[i]
        cdef const char* p = self._base(h)
        cdef int hid = h.id
        cdef int j = self._line(hid, p + h.name_s, h.name_e - h.name_s, value, vlen)
        self._h[i] = self._h[j]
        self._nh -= 1
        self._invalidate_for(hid)
        return 0

    cdef int _replace_value_obj(self, int i, object value) except -1:
        cdef bytes v = _as_bytes(value)
        return self._replace_value(i, v, len(v))

    cdef int _delete(self, int i) except -1:
        cdef int hid = self._h[i].id
        self._h[i].deleted = True
        if self._first[hid] == i:
            self._first[hid] = self._find(hid, i)
        self._invalidate_for(hid)
        return 0

    cdef object _pop_first_value(self, int hid, bint want_text):
        """Remove the first comma-separated value of header hid; returns its text (None when
        there was none, or when the caller said it does not want it)."""
        cdef int i = self._first[hid]
        cdef HEntry* h
        cdef const char* p
        cdef Py_ssize_t k, r
        if i < 0:
            return None
        h = &self._h[i]
        p = self._base(h)
        if hid == H_VIA and self._parts_ok and not h.folded:
            # Where the top value ends, parse() (or the last Via edit) already found: a
            # response's Via line often holds every hop's value ("Via: ours, theirs"), and
            # the split would walk ours byte by byte again.
            k = _skip_lws(p, self._top_via.e, h.value_e)
        else:
            k = _split_comma(p, h.value_s, h.value_e)
        first = _text_lws(p, h.value_s, k) if want_text else None
        if k >= h.value_e:
            self._delete(i)
        elif h.folded:
            r = _skip_lws(p, k + 1, h.value_e)
            self._replace_value_obj(i, _text_lws(p, r, h.value_e))
        else:
            r = _skip_lws(p, k + 1, h.value_e)
            self._replace_value(i, p + r, h.value_e - r)
        return first

    cpdef add_via(self, value):
        """Add a Via value on top (a proxy's or a UAC's own; RFC 3261 16.6 step 8)."""
        cdef ViaParts v
        cdef bytes b = _as_bytes(value)
        if _scan_via(b, 0, len(b), &v) != len(b):
            raise ParseError("add_via takes exactly one Via value", 0)
        cdef int at = self._first[H_VIA]
        at = self._insert(at if at >= 0 else 0, H_VIA, b"Via", 3, b, len(b))
        # The new top value's parts are the scan's above, where the new line holds the value:
        # the branch's transaction key and the views read them without another scan.
        _shift_via(&v, self._h[at].value_s)
        self._top_via = v
        self._parts_ok = True

    cpdef bint stamp_received(self, str host, int port) except -1:
        """§18.2.1 and RFC 3581 §4 on the top Via of a request that came from ``host``:``port``
        (``host`` without brackets): ``received=HOST`` when the sent-by host is another, and
        ``rport=PORT`` filled in when the client sent an empty ``rport`` (``received`` is then
        added too).  One edit of that value: the rest stays as written, an older ``received``
        is dropped, other Via values on the same line are kept.  True when the Via changed,
        False when it needed nothing or there is none; ParseError for a top Via that does not
        parse."""
        cdef int i = self._first[H_VIA]
        cdef HEntry* h
        cdef const char* p
        cdef Py_ssize_t vs, ve, k, j, n, hs, he, nl
        cdef ViaParts v
        cdef ParamSpan prm
        cdef bytes unfolded
        cdef bytes hb = host.encode("utf-8", "surrogateescape")
        cdef bint add_received, fill_rport
        if i < 0:
            return False
        h = &self._h[i]
        p = self._base(h)
        vs = h.value_s
        ve = h.value_e
        if h.folded:
            # Continuation lines: work on the unfolded text (the new value is one line).
            unfolded = _text_lws(p, vs, ve).encode("utf-8", "surrogateescape")
            p = unfolded
            vs = 0
            ve = len(unfolded)
        if self._parts_ok and not h.folded:
            # The parts parse() found (every request is stamped: no second scan of it).
            v = self._top_via
            k = _skip_lws(p, v.e, ve)
        else:
            k = _scan_via(p, vs, ve, &v)
        hs = v.host_s
        he = v.host_e
        if he - hs >= 2 and p[hs] == b'[' and p[he - 1] == b']':
            hs += 1
            he -= 1
        add_received = not (he - hs == len(hb) and memcmp(p + hs, <const char*>hb, he - hs) == 0)
        fill_rport = v.rport == RPORT_EMPTY
        if not add_received and not fill_rport:
            return False
        parts = [PyBytes_FromStringAndSize(p + v.s, v.params_s - v.s)]
        j = v.params_s
        while True:
            n = _next_param(p, j, k, &prm)
            if n < 0:
                break
            nl = prm.name_e - prm.name_s
            if _ieq(p + prm.name_s, nl, b"received", 8):
                pass
            elif fill_rport and prm.value_s < 0 and _ieq(p + prm.name_s, nl, b"rport", 5):
                parts.append(b";rport=%d" % port)
            else:
                parts.append(PyBytes_FromStringAndSize(p + j, n - j))
            j = n
        parts.append(b";received=" + hb)
        if k < ve:
            parts.append(PyBytes_FromStringAndSize(p + k, ve - k))   # ", " and the other values
        value = b"".join(parts)
        self._replace_value(i, value, len(value))
        return True

    cpdef pop_via(self):
        """Remove the top Via value (a proxy forwarding a response, RFC 3261 16.7 step 3);
        returns it as text, or None when there was none."""
        return self._pop_first_value(H_VIA, True)

    cdef int _drop_first_value(self, int hid) except -1:
        """pop_via() or pop_route() for a caller that discards the value (a proxy forwarding
        a response, or past its own Route): the value is not decoded."""
        self._pop_first_value(hid, False)
        return 0

    cpdef add_record_route(self, value):
        """Add a Record-Route value on top of the Record-Route list (RFC 3261 16.6 step 4)."""
        cdef NameAddrParts na
        cdef bytes b = _as_bytes(value)
        if _scan_name_addr(b, 0, len(b), False, &na) != len(b):
            raise ParseError("add_record_route takes exactly one name-addr", 0)
        cdef int at = self._first[H_RECORD_ROUTE]
        self._insert(at if at >= 0 else 0, H_RECORD_ROUTE, b"Record-Route", 12, b, len(b))

    def add_route(self, value):
        """Add a Route value on top of the route set (pre-loaded routes, RFC 3261 8.1.2)."""
        cdef NameAddrParts na
        cdef bytes b = _as_bytes(value)
        if _scan_name_addr(b, 0, len(b), False, &na) != len(b):
            raise ParseError("add_route takes exactly one name-addr", 0)
        cdef int at = self._first[H_ROUTE]
        self._insert(at if at >= 0 else 0, H_ROUTE, b"Route", 5, b, len(b))

    cpdef pop_route(self):
        """Remove the first Route value (loose routing, RFC 3261 16.4); returns it as text,
        or None when there was none."""
        return self._pop_first_value(H_ROUTE, True)

    cpdef decrement_max_forwards(self):
        """Max-Forwards minus one (RFC 3261 16.6 step 3; added as 70 when absent).  Returns the
        new value.  Raises ValueError when it is already 0: the caller answers 483."""
        cdef int i = self._first[H_MAX_FORWARDS]
        cdef HEntry* h
        cdef int64_t mf
        if i < 0:
            self._insert(self._nh, H_MAX_FORWARDS, b"Max-Forwards", 12, b"70", 2)
            return 70
        h = &self._h[i]
        mf = _digits(self._base(h), h.value_s, h.value_e, 255)
        if mf <= 0:
            raise ValueError("Max-Forwards is 0: answer 483 Too Many Hops")
        cdef char digits[4]
        cdef int nd = _format_decimal(mf - 1, digits)
        self._replace_value(i, digits, nd)
        return mf - 1

    def set_header(self, name, value):
        """Set a header field to one value: the first line is replaced, other lines removed,
        and the field is appended when absent."""
        cdef int hid = _name_id_of(name)
        cdef int i, first = -1
        if hid == H_CONTENT_LENGTH:
            raise ValueError("Content-Length follows the body; use set_body()")
        for i in range(self._nh):
            if self._h[i].deleted or not self._entry_named(i, hid, name):
                continue
            if first < 0:
                first = i
            else:
                self._h[i].deleted = True
        if first >= 0:
            self._reindex()
            self._replace_value_obj(first, value)
        else:
            self._insert_obj(self._nh, hid, _canonical[hid] if hid else name, value)

    def add_header(self, name, value, *, first=False):
        """Add a header line: after the last line, or before every other one with first=True
        (or, for a field already present, before its first line)."""
        cdef int hid = _name_id_of(name)
        cdef int i, at = self._nh
        if hid == H_CONTENT_LENGTH:
            raise ValueError("Content-Length follows the body; use set_body()")
        if first:
            at = 0
            for i in range(self._nh):
                if not self._h[i].deleted and self._entry_named(i, hid, name):
                    at = i
                    break
        self._insert_obj(at, hid, _canonical[hid] if hid else name, value)

    def remove_header(self, name):
        """Remove every line of a header field; returns how many lines were removed."""
        cdef int hid = _name_id_of(name)
        cdef int i, n = 0
        for i in range(self._nh):
            if not self._h[i].deleted and self._entry_named(i, hid, name):
                self._h[i].deleted = True
                n += 1
        if n:
            self._reindex()
            self._invalidate_for(hid)
        return n

    cdef bint _entry_named(self, int i, int hid, object name) except -1:
        cdef HEntry* h = &self._h[i]
        cdef bytes b
        if hid:
            return h.id == hid
        if h.id:
            return False
        b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
        return _ieq_bytes(self._base(h) + h.name_s, h.name_e - h.name_s, b)

    cpdef repeated_single_field(self):
        """The name of the first field that may appear once but stands on more than one
        header line -- From, To, Call-ID, CSeq, Max-Forwards or Content-Length (RFC 3261
        §20; a compact form counts as its field) -- or None.  A proxy answers such a request
        400 (§16.3 step 1; RFC 4475 §3.3.8, ``multi01``): the parser accepts it, so that it can be
        answered.  One pass over the header index, edits included; no string is made unless
        one is found."""
        cdef int i, hid
        cdef uint32_t seen = 0, bit
        for i in range(self._nh):
            if self._h[i].deleted:
                continue
            hid = self._h[i].id
            if hid == H_FROM or hid == H_TO or hid == H_CALL_ID or hid == H_CSEQ or \
                    hid == H_MAX_FORWARDS or hid == H_CONTENT_LENGTH:
                bit = (<uint32_t>1) << hid
                if seen & bit:
                    return _canonical[hid]
                seen |= bit
        return None

    cpdef bint ensure_content_length(self) except -1:
        """Add ``Content-Length`` when the message has none; True when added.

        A datagram's body is the rest of it (RFC 3261 §18.3), so one may come without the
        header; over TCP or TLS the header alone frames the message, and a body forwarded
        there without it would be read as the next message (§20.14: MUST on streams)."""
        if self._first[H_CONTENT_LENGTH] >= 0:
            return False
        self._insert_obj(self._nh, H_CONTENT_LENGTH, "Content-Length", str(self.content_length))
        return True

    def set_body(self, body, content_type=None):
        """Replace the body; Content-Length follows, and Content-Type is set when given."""
        cdef bytes b = bytes(body)
        cdef int i = self._first[H_CONTENT_LENGTH]
        self._new_body = b
        if i >= 0:
            self._replace_value_obj(i, str(len(b)))
        else:
            self._insert_obj(self._nh, H_CONTENT_LENGTH, "Content-Length", str(len(b)))
        if content_type is not None:
            self.set_header("Content-Type", content_type)
        self._invalidate_for(H_CONTENT_LENGTH)     # (the body: no view reads it)

    # -- serialization -----------------------------------------------------------------------

    def __bytes__(self):
        return self._wire()

    cdef bytes _wire(self):
        # The message as sent: the original bytes while nothing changed, else the lines
        # assembled in one allocation (the compiled layers call it through wire()).
        cdef Py_ssize_t total, n
        cdef int i
        cdef HEntry* h
        cdef bytes out
        cdef char* w
        if not self._edited and self._new_start_line is None and self._new_body is None:
            if (self._start == 0 and self._body_e == self._len
                    and type(self._data) is bytes):
                return self._data
            return PyBytes_FromStringAndSize(self._buf + self._start, self._body_e - self._start)
        sl = self._new_start_line
        total = len(sl) if sl is not None else self._hdr_s - self._start
        for i in range(self._nh):
            h = &self._h[i]
            if not h.deleted:
                total += h.line_e - h.line_s
        total += self._body_s - self._blank_s
        body = self._new_body
        total += len(body) if body is not None else self._body_e - self._body_s
        out = PyBytes_FromStringAndSize(NULL, total)
        w = PyBytes_AS_STRING(out)
        if sl is not None:
            n = len(sl)
            memcpy(w, PyBytes_AS_STRING(sl), n)
        else:
            n = self._hdr_s - self._start
            memcpy(w, self._buf + self._start, n)
        w += n
        for i in range(self._nh):
            h = &self._h[i]
            if not h.deleted:
                n = h.line_e - h.line_s
                memcpy(w, self._base(h) + h.line_s, n)
                w += n
        n = self._body_s - self._blank_s
        memcpy(w, self._buf + self._blank_s, n)
        w += n
        if body is not None:
            memcpy(w, PyBytes_AS_STRING(body), len(body))
        else:
            memcpy(w, self._buf + self._body_s, self._body_e - self._body_s)
        return out

    def __len__(self):
        return len(self._wire())

    def __repr__(self):
        return f"<{type(self).__name__} {self.start_line!r}>"

    def __reduce__(self):
        return (parse, (self.__bytes__(),))


cdef inline bytes _as_bytes(object v):
    if type(v) is bytes:
        return <bytes>v
    if isinstance(v, str):
        return (<str>v).encode("utf-8", "surrogateescape")
    return bytes(v)


cdef inline int _format_decimal(int v, char* out) noexcept:
    """Decimal digits of v >= 0 into out (10 octets at most); returns how many."""
    cdef int n = 1, t = v, i
    while t >= 10:
        t //= 10
        n += 1
    for i in range(n - 1, -1, -1):
        out[i] = <char>(48 + v % 10)
        v //= 10
    return n


cdef bint _ieq_bytes(const char* p, Py_ssize_t n, bytes name):
    cdef Py_ssize_t i
    cdef const char* q = name
    if n != len(name):
        return False
    for i in range(n):
        if ((<unsigned char>p[i]) | 0x20) != ((<unsigned char>q[i]) | 0x20):
            return False
    return True


@cython.no_gc
cdef class Request(Message):
    """A SIP request."""
    @property
    def method(self):
        return self._method()

    cdef str _method(self):
        if self._c_method is None:
            self._c_method = _method_text(self._buf, self._m_s, self._m_e)
        return self._c_method

    @property
    def uri(self):
        """The Request-URI (``str(msg.uri)`` gives its text)."""
        return self._uri()

    cdef URI _uri(self):
        if self._c_uri is None:
            if self._ru_ok:
                self._c_uri = _make_uri_from(self._buf, self._u_s, self._u_e, &self._ru)
            else:
                self._c_uri = _make_uri(self._buf, self._u_s, self._u_e)
        return self._c_uri

    cpdef object transaction_key(self):
        """RFC 3261 §17.2.3: the server transaction this request belongs to, read from the
        parser's index as (top Via branch, sent-by host in lower case, sent-by port or None,
        method), ACK folded to INVITE so it finds the INVITE's transaction.  None when the top
        Via's branch lacks the magic cookie (an RFC 2543 peer, matched by §17.2.3's fallback)
        or there is no Via.  No Via object is built: two strs and the tuple."""
        cdef ViaParts v
        cdef const char* p
        cdef Py_ssize_t j
        cdef bint fold = False
        if not self._top_via_parts(&v, &p):
            return None
        if v.branch_s < 0 or v.branch_e - v.branch_s <= 7 \
                or memcmp(p + v.branch_s, b"z9hG4bK", 7) != 0:
            return None
        method = self._method()
        if method == "ACK":
            method = "INVITE"
        # Hosts compare case-insensitively (§19.1.4); most arrive in lower case already, so
        # the lower() copy is made only when a byte could change.
        for j in range(v.host_s, v.host_e):
            if (p[j] >= 65 and p[j] <= 90) or <unsigned char>p[j] >= 0x80:
                fold = True
                break
        host = _text(p, v.host_s, v.host_e)
        if fold:
            host = host.lower()
        return (_text(p, v.branch_s, v.branch_e), host, v.port if v.port >= 0 else None, method)

    cpdef copy(self):
        """An independent copy of this request, edits so far included: what a proxy forwards
        on each branch (§16.6 step 1).  Nothing is scanned again -- the cost of
        ``parse(bytes(msg))`` without the serialization and the parse."""
        cdef Request m = Request.__new__(Request)
        self._copy_into(m)
        m._m_s = self._m_s
        m._m_e = self._m_e
        m._u_s = self._u_s
        m._u_e = self._u_e
        m._ru = self._ru
        m._ru_ok = self._ru_ok
        m._c_method = self._c_method
        # After ``uri = ...`` the new URI lives only in the cache (the offsets still name the
        # old one).  URIs are immutable, so the copy shares it in any case: a branch's copy
        # does not parse the Request-URI again.
        m._c_uri = self._c_uri
        return m

    @uri.setter
    def uri(self, value):
        self._set_uri(value if isinstance(value, URI) else URI(value))

    cdef int _set_uri(self, URI u) except -1:
        # (The setter, callable from C: a proxy retargets every branch it makes.)
        self._new_start_line = (f"{self._method()} {u._text} SIP/2.0\r\n").encode(
            "utf-8", "surrogateescape")
        self._c_uri = u
        self._edited = True
        return 0

    cpdef str stateless_branch(self):
        """§16.11: the branch a stateless proxy puts in its Via is a function of this
        request's own transaction id, so a retransmission, the ACK for a non-2xx and the
        CANCEL (same upstream branch, method left out) all go out with the same branch:
        ``z9hG4bKsl`` and 80 bits of BLAKE2b (a collision of two requests' ids is out of
        reach), the same in every process.  Documented as
        :func:`fastsip.proxy.base.stateless_branch`, which asks this; read from the parser's
        index, no Via object built (every ACK for a 2xx pays it)."""
        cdef ViaParts v
        cdef const char* p
        cdef char port[12]
        cdef Py_ssize_t nb, nh, np
        cdef char* out
        cdef bytes key_bytes
        if self._top_via_parts(&v, &p) and v.branch_s >= 0 and v.branch_e - v.branch_s >= 7 \
                and memcmp(p + v.branch_s, b"z9hG4bK", 7) == 0:
            # The octets of "BRANCH\0HOST\0PORT" (PORT "None" without one) straight from the
            # buffer: the UTF-8 (surrogate-escaped) text the key once was, built as one bytes.
            nb = v.branch_e - v.branch_s
            nh = v.host_e - v.host_s
            if v.port >= 0:
                np = _format_decimal(v.port, port)
            else:
                memcpy(port, b"None", 4)
                np = 4
            key_bytes = PyBytes_FromStringAndSize(NULL, nb + nh + np + 2)
            out = PyBytes_AS_STRING(key_bytes)
            memcpy(out, p + v.branch_s, nb)
            out[nb] = 0
            memcpy(out + nb + 1, p + v.host_s, nh)
            out[nb + 1 + nh] = 0
            memcpy(out + nb + nh + 2, port, np)
        else:  # RFC 2543 peer: the §17.2.3 fields
            top = self.top_via
            frm = self.from_
            cseq = self._cseq()
            key_bytes = "\x00".join(
                (
                    str(self._uri()),
                    (frm.tag or "") if frm is not None else "",
                    self._call_id() or "",
                    str(cseq.seq) if cseq is not None else "",
                    str(top) if top is not None else "",
                )
            ).encode("utf-8", "surrogateescape")
        digest = _BRANCH_HASH.copy()     # (a copy: no keyword parsing per ACK, as a new one has)
        digest.update(key_bytes)
        return "z9hG4bKsl" + digest.hexdigest()

    cpdef loop_hash(self):
        """RFC 3261 §16.6 step 8: 16 hex digits that are the same for this request when it
        comes back to us -- over the Request-URI as received, the From and To tags, Call-ID,
        the CSeq number, Proxy-Require and Proxy-Authorization.  The Via header, which §16.6
        also lists, is left out on purpose: it changes on every hop, so including it would hide
        every loop (RFC 5393 §4.2 says the same).  Read from the parser's index, nothing
        decoded; the same in every process (FNV-1a 64).  Not a defence against a client that
        forges a collision: the worst it gets is a 482 for its own request."""
        cdef uint64_t hv = <uint64_t>FNV_OFFSET
        cdef int i, hid
        cdef HEntry* h
        cdef const char* p
        cdef NameAddrParts na
        cdef Py_ssize_t j, k
        hv = _fnv_end(_fnv(hv, self._buf, self._u_s, self._u_e))
        for hid in (H_FROM, H_TO):
            i = self._first[hid]
            if i >= 0:
                h = &self._h[i]
                p = self._base(h)
                if self._names_ok:        # the parts parse() found (no edit since)
                    na = self._from_p if hid == H_FROM else self._to_p
                else:
                    _scan_name_addr(p, h.value_s, h.value_e, False, &na, False)
                if na.tag_s >= 0:
                    hv = _fnv(hv, p, na.tag_s, na.tag_e)
            hv = _fnv_end(hv)
        i = self._first[H_CALL_ID]
        if i >= 0:
            h = &self._h[i]
            hv = _fnv(hv, self._base(h), h.value_s, h.value_e)
        hv = _fnv_end(hv)
        i = self._first[H_CSEQ]
        if i >= 0:
            h = &self._h[i]
            p = self._base(h)
            j = _skip_lws(p, h.value_s, h.value_e)
            k = _digits_end(p, j, h.value_e)
            hv = _fnv(hv, p, j, k)
        hv = _fnv_end(hv)
        for hid in (_H_PROXY_REQUIRE, _H_PROXY_AUTHORIZATION):
            for i in range(self._nh):
                h = &self._h[i]
                if h.id == hid and not h.deleted:
                    hv = _fnv_end(_fnv(hv, self._base(h), h.value_s, h.value_e))
            hv = _fnv_end(hv)
        # Sixteen hex digits, written here: "%016x" % hv made an int and ran the formatter
        # (~1,200 instructions, twice a call).
        cdef char digits[16]
        for j in range(15, -1, -1):
            digits[j] = _HEX_DIGITS[hv & 15]
            hv >>= 4
        return _text(digits, 0, 16)

    def reply(self, int status, reason=None, *, to_tag=None, headers=None, body=None,
              content_type=None, record_route=False):
        """Build a response to this request per RFC 3261 8.2.6: Via, From, To, Call-ID and CSeq
        copied; a To tag added for status > 100 when the request had none (``to_tag`` or a
        random one); Timestamp copied into a 100 (8.2.6.1).  ``record_route=True`` also copies
        Record-Route (a UAS answering a dialog-creating request, 12.1.1)."""
        return self._reply(status, reason, to_tag, headers, body, content_type, record_route)

    cdef Message _reply(self, int status, object reason, object to_tag, object headers,
                        object body, object content_type, bint record_route):
        # reply() for compiled callers (the server transaction's 100 Trying): no Python call
        # and keyword parsing, and the status line and an empty body's Content-Length are
        # constants; with the call they were a third of a 100 Trying's instructions (9,100
        # before, 6,200 now).  A status line is made once per code, from REASON_PHRASES as
        # it reads then.
        cdef int i
        cdef NameAddr to
        if status < 100 or status > 699:
            raise ValueError("status must be in 100..699")
        if reason is None:
            status_line = _STATUS_LINES.get(status)
            if status_line is None:
                status_line = _STATUS_LINES[status] = (
                    f"SIP/2.0 {status} {REASON_PHRASES.get(status, '')}\r\n".encode())
        else:
            status_line = f"SIP/2.0 {status} {reason}\r\n".encode("utf-8", "surrogateescape")
        parts = [status_line]
        for i in range(self._nh):
            h = self._h[i]
            if h.deleted:
                continue
            if h.id == H_VIA or h.id == H_FROM or h.id == H_CALL_ID or h.id == H_CSEQ or (
                    record_route and h.id == H_RECORD_ROUTE) or (
                    status == 100 and h.id == H_TIMESTAMP):
                parts.append(PyBytes_FromStringAndSize(self._base(&self._h[i]) + h.line_s,
                                                       h.line_e - h.line_s))
            elif h.id == H_TO:
                line = PyBytes_FromStringAndSize(self._base(&self._h[i]) + h.line_s,
                                                 h.line_e - h.line_s)
                try:
                    to = self._to()
                    tagged = to is not None and to._tag() is not None
                except ParseError:
                    # A To whose URI does not parse still gets its answer (a 400 saying so):
                    # whether it has a tag is read from the text.
                    tagged = b";tag=" in line.lower().replace(b" ", b"")
                if status > 100 and not tagged:
                    if to_tag is None:
                        to_tag = os.urandom(6).hex()
                    line = line.rstrip(b"\r\n") + b";tag=" + str(to_tag).encode() + b"\r\n"
                parts.append(line)
        for name, value in _header_items(headers):
            parts.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
        if body is None:
            if content_type is not None:
                parts.append(f"Content-Type: {content_type}\r\n".encode())
            parts.append(b"Content-Length: 0\r\n\r\n")
            return parse_c(b"".join(parts), None)
        b = bytes(body)
        if content_type is not None:
            parts.append(f"Content-Type: {content_type}\r\n".encode())
        parts.append(b"Content-Length: %d\r\n\r\n" % len(b))
        parts.append(b)
        return parse_c(b"".join(parts), None)

    @staticmethod
    def create(method, uri, headers=None, body=b"", *, content_type=None):
        """Build a request from scratch: ``Request.create("OPTIONS", "sip:a@b", [("Via", ...),
        ...])``.  Content-Length is added from the body."""
        return _create(f"{method} {uri} SIP/2.0", headers, body, content_type)


@cython.no_gc
cdef class Response(Message):
    """A SIP response."""
    cpdef copy(self):
        """An independent copy of this response, edits so far included."""
        cdef Response m = Response.__new__(Response)
        self._copy_into(m)
        m._status = self._status
        m._r_s = self._r_s
        m._r_e = self._r_e
        return m

    @property
    def status_code(self):
        return self._status

    @property
    def reason(self):
        return _text(self._buf, self._r_s, self._r_e)

    @property
    def method(self):
        """The method of the request this answers (from CSeq)."""
        c = self._cseq()
        return (<tuple>c)[1] if c is not None else None     # CSeq.method

    cpdef object transaction_key(self):
        """RFC 3261 §17.1.3: the client transaction this response answers, as (top Via
        branch, CSeq method); None without a branch or a CSeq (no transaction can match)."""
        cdef ViaParts v
        cdef const char* p
        if not self._top_via_parts(&v, &p) or v.branch_s < 0:
            return None
        c = self._cseq()
        if c is None:
            return None
        return (_text(p, v.branch_s, v.branch_e), (<tuple>c)[1])     # CSeq.method

    @staticmethod
    def create(int status, reason=None, headers=None, body=b"", *, content_type=None):
        """Build a response from scratch; Content-Length is added from the body."""
        if status < 100 or status > 699:
            raise ValueError("status must be in 100..699")
        if reason is None:
            reason = REASON_PHRASES.get(status, "")
        return _create(f"SIP/2.0 {status} {reason}", headers, body, content_type)


#: reply()'s status lines for the standard reason phrases, made once per status code.
cdef dict _STATUS_LINES = {}


def _header_items(headers):
    if headers is None:
        return ()
    if isinstance(headers, dict):
        return headers.items()
    return headers


cdef object _create(str start_line, headers, body, content_type):
    parts = [start_line.encode("utf-8", "surrogateescape"), b"\r\n"]
    for name, value in _header_items(headers):
        if _name_id_of(name) == H_CONTENT_LENGTH:
            continue
        parts.append(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape"))
    b = bytes(body)
    if content_type is not None:
        parts.append(f"Content-Type: {content_type}\r\n".encode())
    parts.append(b"Content-Length: %d\r\n\r\n" % len(b))
    parts.append(b)
    return parse(b"".join(parts))


REASON_PHRASES = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated", 200: "OK", 202: "Accepted",
    204: "No Notification", 300: "Multiple Choices", 301: "Moved Permanently",
    302: "Moved Temporarily", 305: "Use Proxy", 380: "Alternative Service", 400: "Bad Request",
    401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 407: "Proxy Authentication Required",
    408: "Request Timeout", 410: "Gone", 412: "Conditional Request Failed",
    413: "Request Entity Too Large", 414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 417: "Unknown Resource-Priority", 420: "Bad Extension",
    421: "Extension Required", 422: "Session Interval Too Small", 423: "Interval Too Brief",
    428: "Use Identity Header", 429: "Provide Referrer Identity", 430: "Flow Failed",
    433: "Anonymity Disallowed", 436: "Bad Identity-Info", 437: "Unsupported Certificate",
    438: "Invalid Identity Header", 439: "First Hop Lacks Outbound Support",
    440: "Max-Breadth Exceeded", 469: "Bad Info Package", 470: "Consent Needed",
    480: "Temporarily Unavailable", 481: "Call/Transaction Does Not Exist",
    482: "Loop Detected", 483: "Too Many Hops", 484: "Address Incomplete", 485: "Ambiguous",
    486: "Busy Here", 487: "Request Terminated", 488: "Not Acceptable Here",
    489: "Bad Event", 491: "Request Pending", 493: "Undecipherable",
    494: "Security Agreement Required", 500: "Server Internal Error", 501: "Not Implemented",
    502: "Bad Gateway", 503: "Service Unavailable", 504: "Server Time-out",
    505: "Version Not Supported", 513: "Message Too Large",
    555: "Push Notification Service Not Supported",
    580: "Precondition Failure", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable", 607: "Unwanted", 608: "Rejected",
}


# ---------------------------------------------------------------------------------------------
# Headers view
# ---------------------------------------------------------------------------------------------

@cython.freelist(16)
@cython.no_gc
cdef class Headers:
    """Case-insensitive view of a message's header fields; compact forms equal long forms.

    ``get(name)`` gives the first value, ``getall(name)`` every value across header lines and,
    for fields whose grammar is a comma-separated list (Via, Contact, Route, Allow, ...), across
    commas (quotes and < > respected).  Other fields (Date, WWW-Authenticate, unknown fields)
    are never split.  Iterating gives ``(name, value)`` for each header line in wire order, with
    the name as written.
    """
    cdef Message _m

    @staticmethod
    cdef Headers _new(Message m):
        cdef Headers h = Headers.__new__(Headers)
        h._m = m
        return h

    cdef list _collect(self, name, bint split_lists):
        cdef int hid = _name_id_of(name)
        cdef Message m = self._m
        cdef list out = []
        cdef int i
        cdef bytes b
        cdef HEntry* h
        if hid:
            return m._values(hid, split_lists and _is_list[hid])
        b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
        for i in range(m._nh):
            h = &m._h[i]
            if not h.deleted and h.id == 0 and _ieq_bytes(m._base(h) + h.name_s,
                                                          h.name_e - h.name_s, b):
                out.append(m._value_str(i))
        return out

    def get(self, name, default=None):
        """The first value of a header field (str), or ``default``."""
        vals = self._collect(name, True)
        return vals[0] if vals else default

    def getall(self, name, default=None):
        """Every value of a header field, in order; ``default`` (or []) when absent."""
        vals = self._collect(name, True)
        if not vals and default is not None:
            return default
        return vals

    def count(self, name):
        """How many header lines the field has (commas not counted): ``count("From") > 1`` is a
        duplicated single-instance field.  Makes no strings."""
        cdef int hid = _name_id_of(name)
        cdef Message m = self._m
        cdef int i, n = 0
        if not hid:
            return len(self._collect(name, False))
        i = m._first[hid]
        if i < 0:
            return 0
        for i in range(i, m._nh):
            if m._h[i].id == hid and not m._h[i].deleted:
                n += 1
        return n

    def getlines(self, name):
        """Every header line's whole value for a field, never split at commas."""
        return self._collect(name, False)

    def __getitem__(self, name):
        vals = self._collect(name, True)
        if not vals:
            raise KeyError(name)
        return vals[0]

    def __contains__(self, name):
        # A presence test makes no strings (the router asks one of every initial request).
        cdef int hid = _name_id_of(name)
        cdef Message m = self._m
        cdef int i
        cdef bytes b
        cdef HEntry* h
        if hid:
            i = m._first[hid]
            while i >= 0:
                if not m._h[i].deleted:
                    return True
                i = m._find(hid, i)
            return False
        b = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else bytes(name)
        for i in range(m._nh):
            h = &m._h[i]
            if not h.deleted and h.id == 0 and _ieq_bytes(m._base(h) + h.name_s,
                                                          h.name_e - h.name_s, b):
                return True
        return False

    def __iter__(self):
        cdef Message m = self._m
        cdef int i
        cdef HEntry* h
        for i in range(m._nh):
            h = &m._h[i]
            if not h.deleted:
                yield (_text(m._base(h), h.name_s, h.name_e), m._value_str(i))

    def items(self):
        """``(name, value)`` for every header line, in wire order."""
        return list(self)

    def keys(self):
        return [n for n, _ in self]

    def __len__(self):
        cdef Message m = self._m
        cdef int i, n = 0
        for i in range(m._nh):
            if not m._h[i].deleted:
                n += 1
        return n

    def __repr__(self):
        return f"<Headers {self.items()!r}>"


def canonical_name(name):
    """The canonical spelling of a header name ("v" -> "Via", "call-id" -> "Call-ID"); unknown
    names come back unchanged."""
    cdef int hid = _name_id_of(name)
    return _canonical[hid] if hid else name


# ---------------------------------------------------------------------------------------------
# parse() and stream framing
# ---------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _line_end(const char* p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """Index of the '\\n' ending the line that starts at i, or -1."""
    cdef const char* q = <const char*>memchr(p + i, b'\n', n - i)
    return -1 if q == NULL else q - p


cdef int _check_version(const char* p, Py_ssize_t s, Py_ssize_t e) except -1:
    """SIP-Version = "SIP" "/" 1*DIGIT "." 1*DIGIT; only 2.0 is supported (505 otherwise)."""
    cdef Py_ssize_t i
    if e - s >= 4 and _ieq(p + s, 4, b"sip/", 4):
        i = s + 4
        while i < e and p[i] >= b'0' and p[i] <= b'9':
            i += 1
        if i > s + 4 and i < e and p[i] == b'.':
            i += 1
            while i < e and p[i] >= b'0' and p[i] <= b'9':
                i += 1
            if i == e:
                if e - s == 7 and p[s + 4] == b'2' and p[s + 5] == b'.' and p[s + 6] == b'0':
                    return 0
                _fail("unsupported SIP version", s, 505)
    _fail("malformed SIP version", s)


cdef Message _parse(object data, Limits limits):
    cdef Message m
    cdef Request req
    cdef Response resp
    cdef const char* p
    cdef const char* q
    cdef Py_ssize_t n, i, j, k, le, ce, sp1, cl_i
    cdef Py_buffer* view
    cdef HEntry* h
    cdef HEntry* hs
    cdef int hid, nh, cap
    cdef int64_t cl, code
    cdef Py_ssize_t max_line, max_headers

    if type(data) is bytes:
        p = PyBytes_AS_STRING(data)
        n = PyBytes_GET_SIZE(data)
    else:
        # Zero copy for bytearray/memoryview too: the memoryview holds the buffer export (and
        # keeps a bytearray from being resized) for as long as the message or a view lives.
        data = memoryview(data).cast("B")
        view = PyMemoryView_GET_BUFFER(data)
        p = <const char*>view.buf
        n = view.len
    if True:
        if n > limits.max_message_size:
            _fail(f"message larger than {limits.max_message_size} octets",
                  limits.max_message_size, 513)
        i = 0
        # RFC 3261 7.5: CRLFs before the start line are ignored.
        while i < n and (p[i] == b'\r' or p[i] == b'\n'):
            i += 1
        if i >= n:
            _fail("empty message", i)
        le = _line_end(p, i, n)
        if le < 0:
            _fail("start line not terminated", n)
        ce = le - 1 if le > i and p[le - 1] == b'\r' else le
        if ce - i > limits.max_line_length:
            _fail("start line too long", i, 414 if p[i] != b'S' else 400)

        if ce - i >= 4 and _ieq(p + i, 4, b"sip/", 4):
            # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase
            resp = Response.__new__(Response)
            m = resp
            sp1 = i
            while sp1 < ce and p[sp1] != b' ':
                sp1 += 1
            _check_version(p, i, sp1)
            j = sp1 + 1
            k = _digits_end(p, j, ce)
            code = _digits(p, j, k, 999) if k - j == 3 else -1
            if code < 100 or code > 699:
                _fail("invalid status code", j)
            if k < ce and p[k] != b' ':
                _fail("expected SP after status code", k)
            resp._status = <int>code
            resp._r_s = k + 1 if k < ce else ce
            resp._r_e = ce
        else:
            # Request-Line = Method SP Request-URI SP SIP-Version, single SPs (RFC 4475 3.1.2.9:
            # extra SP, trailing SP and LWS inside the URI are rejected, not repaired).
            req = Request.__new__(Request)
            m = req
            j = _token_end(p, i, ce)
            if j == i:
                _fail("invalid method", i)
            if j >= ce or p[j] != b' ':
                _fail("expected SP after method", j)
            req._m_s = i
            req._m_e = j
            j += 1
            q = <const char*>memchr(p + j, b' ', ce - j)
            k = ce if q == NULL else q - p
            if k >= ce:
                _fail("request line has no SIP version", ce)
            if k == j:
                _fail("empty Request-URI", j)
            if p[j] == b'<':
                _fail("Request-URI enclosed in <>", j)
            _check_version(p, k + 1, ce)
            req._u_s = j
            req._u_e = k
            _scan_uri(p, j, k, &req._ru)
            req._ru_ok = True

        m._start = i
        m._sl_e = ce
        i = le + 1
        m._hdr_s = i
        # The index is filled through locals (hs, nh, cap) and stored back once: the module is
        # built with -fno-strict-aliasing, so every store into an entry would otherwise make the
        # compiler reload the message's and the limits' fields.
        hs = _take_headers()
        m._h = hs
        m._cap = cap = POOLED_HEADERS
        nh = 0
        max_line = limits.max_line_length
        max_headers = limits.max_headers
        memset(m._first, 0xFF, sizeof(m._first))

        # Header lines, up to the empty line.
        while True:
            if i >= n:
                m._nh = nh
                _fail("header section not terminated by an empty line", i)
            if p[i] == b'\n':
                m._blank_s = i
                i += 1
                break
            if p[i] == b'\r':
                if i + 1 < n and p[i + 1] == b'\n':
                    m._blank_s = i
                    i += 2
                    break
                m._nh = nh
                _fail("bare CR in header section", i)
            le = fastsip_line(p, i, n, &k)
            if le < 0:
                m._nh = nh
                _fail("header line not terminated", n)
            ce = le - 1 if le > i and p[le - 1] == b'\r' else le
            if ce - i > max_line:
                m._nh = nh
                _fail("header line too long", i)
            if p[i] == b' ' or p[i] == b'\t':
                # A folded continuation of the previous header line (RFC 3261 7.3.1).
                if nh == 0:
                    _fail("continuation line before any header", i)
                h = &hs[nh - 1]
                k = _rtrim(p, i, ce)
                if k > i:
                    if h.value_e <= h.value_s:
                        h.value_s = _skip_lws(p, i, k)
                    h.value_e = k
                    h.folded = True
                h.line_e = le + 1
                i = le + 1
                continue
            if nh >= max_headers:
                m._nh = nh
                _fail("too many header lines", i)
            # The name runs to the line's first ':' (k, found with the line's end), LWS before
            # it dropped.  A well-known name is recognised and validated by one exact comparison
            # (_header_id), any other is checked octet by octet; a line that is neither takes
            # _bad_header_line, which says what is wrong and where.
            j = k
            while j > i and (p[j - 1] == b' ' or p[j - 1] == b'\t'):
                j -= 1
            hid = _header_id(p + i, j - i)
            if k >= ce or (hid == 0 and (j == i or _token_end(p, i, j) != j)):
                m._nh = nh
                _bad_header_line(p, i, ce)
            k = _skip_lws(p, k + 1, ce)
            if nh == cap:
                m._nh = nh
                m._add_entry()
                hs = m._h
                cap = m._cap
            h = &hs[nh]
            h.line_s = <int32_t>i
            h.line_e = <int32_t>(le + 1)
            h.name_s = <int32_t>i
            h.name_e = <int32_t>j
            h.value_s = <int32_t>k
            h.value_e = <int32_t>_rtrim(p, k, ce)
            h.id = <int16_t>hid
            h.src = -1
            h.folded = False
            h.deleted = False
            if m._first[hid] < 0:
                m._first[hid] = <int16_t>nh
            nh += 1
            i = le + 1
        m._nh = nh

        # Body: exactly Content-Length octets; without one (datagrams, RFC 3261 18.3) the rest.
        m._body_s = i
        cl_i = m._first[H_CONTENT_LENGTH]
        if cl_i >= 0:
            h = &m._h[cl_i]
            cl = _digits(p, h.value_s, h.value_e, 0x7FFFFFFF)
            if cl < 0:
                _fail("Content-Length: not a non-negative number", h.value_s)
            if cl > n - i:
                _fail("Content-Length larger than the data", i)
            m._body_e = i + cl
        else:
            m._body_e = n
        m._len = n
        m._data = data
        m._buf = p
        m._validate()
        return m


cdef int _bad_header_line(const char* p, Py_ssize_t i, Py_ssize_t ce) except -1:
    """Raise the ParseError for the header line p[i:ce] that parse()'s fast path refused: its
    name is not token characters, or no ':' follows it."""
    cdef Py_ssize_t j = _token_end(p, i, ce), k
    if j == i:
        _fail("invalid header name", i)
    k = j
    while k < ce and (p[k] == b' ' or p[k] == b'\t'):
        k += 1
    if k >= ce or p[k] != b':':
        _fail("header line without ':'", k)
    _fail("invalid header name", i)     # not reached: the fast path accepts such a line


#: The empty hash every stateless branch starts from (Request.stateless_branch).
_BRANCH_HASH = hashlib.blake2b(digest_size=10)


cdef Message parse_c(object data, object limits):
    # parse() for compiled callers (the datagram intake): no Python call per datagram.
    return _parse(data, <Limits?>limits if limits is not None else _default_limits)


def parse(data, Limits limits=None):
    """Parse one SIP message from bytes, bytearray or memoryview; returns a Request or Response.

    Raises ParseError (a ValueError) with ``.offset``, ``.reason`` and ``.status`` (the response
    code a server should answer a request with: 400, 505, 513 ...).  Octets after the message's
    Content-Length are ignored (RFC 3261 18.3).
    """
    return _parse(data, limits if limits is not None else _default_limits)


def message_length(data, Limits limits=None):
    """Frame a stream (TCP/TLS, RFC 3261 18.3): how long is the first message in ``data``?

    Returns ``n > 0`` when ``data[:n]`` is one complete message, ``0`` when more bytes are needed,
    and ``-n`` when ``data[:n]`` is a keep-alive to consume (RFC 5626 3.5.1): ``-4`` for a
    CRLFCRLF ping (answer with a CRLF pong), ``-2`` for a CRLF pong.  A Content-Length that is
    missing counts as 0.  Raises ParseError when the header section outgrows the message size
    limit without ending, or Content-Length is malformed: the stream cannot be resynchronized
    and the connection should be closed.
    """
    cdef Limits lim = limits if limits is not None else _default_limits
    cdef const unsigned char[:] buf
    cdef const char* p
    cdef Py_ssize_t n, i, le, ce, j, k, hdr_end = -1
    cdef int64_t cl = 0
    cdef bytes b
    if type(data) is bytes:
        b = <bytes>data
        p = PyBytes_AS_STRING(b)
        n = PyBytes_GET_SIZE(b)
    else:
        buf = data
        n = buf.shape[0]
        if n == 0:
            return 0
        p = <const char*>&buf[0]
    if n == 0:
        return 0
    if p[0] == b'\r' or p[0] == b'\n':
        if n >= 4 and p[0] == b'\r' and p[1] == b'\n' and p[2] == b'\r' and p[3] == b'\n':
            return -4
        if n >= 2 and p[0] == b'\r' and p[1] == b'\n':
            return -2
        if p[0] == b'\n':
            return -1
        return 0
    i = 0
    while True:
        if i >= n:
            if n > lim.max_message_size:
                _fail("header section exceeds the message size limit", n, 513)
            return 0
        le = _line_end(p, i, n)
        if le < 0:
            if n > lim.max_message_size:
                _fail("header section exceeds the message size limit", n, 513)
            return 0
        ce = le - 1 if le > i and p[le - 1] == b'\r' else le
        if ce == i:
            hdr_end = le + 1
            break
        if i > 0 and p[i] != b' ' and p[i] != b'\t':
            # Content-Length / l, found without building an index.
            j = i
            while j < ce and fastsip_token[<unsigned char>p[j]]:
                j += 1
            if _header_id(p + i, j - i) == H_CONTENT_LENGTH and j > i:
                while j < ce and (p[j] == b' ' or p[j] == b'\t'):
                    j += 1
                if j < ce and p[j] == b':':
                    k = _rtrim(p, j + 1, ce)
                    j = _skip_lws(p, j + 1, k)
                    cl = _digits(p, j, k, 0x7FFFFFFF)
                    if cl < 0:
                        _fail("Content-Length: not a non-negative number", j)
        i = le + 1
    if hdr_end + cl > lim.max_message_size:
        _fail("message larger than the size limit", hdr_end, 513)
    if n < hdr_end + cl:
        return 0
    return hdr_end + cl
