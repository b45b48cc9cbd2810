# cython: language_level=3
"""C-level view of the message core, for compiled layers to ``cimport`` (the transaction layer
does): the header ids, the offset structs the parser fills, and Message, Request and Response
with their fields and C methods.  Python sees the same classes through ``fastsip.sip``.

A view of a message's bytes (a ``const char*`` with offsets) is valid while the message is
alive and unedited at that line: ``_base(h)`` gives the buffer a header entry's offsets are in.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING
from cpython.list cimport PyList_GET_ITEM
from libc.stdint cimport int16_t, int32_t, uint8_t

# Header names: ids for the well-known names, compact forms folded in (RFC 3261 7.3.3, 20;
# RFC 3265, 3515, 3841, 3892, 4028, 4474 for the later letters).  The table of names is in
# _message.pyx; its first entries keep these ids.
cdef enum:
    H_OTHER = 0
    H_VIA = 1
    H_FROM = 2
    H_TO = 3
    H_CALL_ID = 4
    H_CSEQ = 5
    H_CONTACT = 6
    H_CONTENT_LENGTH = 7
    H_CONTENT_TYPE = 8
    H_MAX_FORWARDS = 9
    H_ROUTE = 10
    H_RECORD_ROUTE = 11
    H_TIMESTAMP = 12
    H_PROXY_REQUIRE = 44       # (its place in _message.pyx's table; asserted there)
    N_HEADER_IDS = 72

cdef enum:
    URI_OPAQUE = 0
    URI_SIP = 1
    URI_SIPS = 2
    URI_TEL = 3
    RPORT_ABSENT = -2
    RPORT_EMPTY = -1

ctypedef struct UriParts:
    int kind
    int32_t scheme_e           # scheme is p[s:scheme_e]
    int32_t user_s, user_e     # -1 when there is no userinfo
    int32_t pw_s, pw_e         # -1 when there is no password
    int32_t host_s, host_e     # tel: the number; opaque: everything after "scheme:"
    int port                      # -1 when absent
    int32_t params_s, params_e  # ";a=b;c" (leading ';' included); params_s == params_e: none
    int32_t headers_s, headers_e  # after '?'; -1 when none

ctypedef struct ParamSpan:
    int32_t name_s, name_e
    int32_t value_s, value_e   # -1 when the param has no value
    bint quoted

ctypedef struct ViaParts:
    int32_t s, e
    int32_t proto_s, proto_e   # "SIP/2.0" as written may hold LWS; these are the name and
    int32_t ver_s, ver_e       # version tokens
    int32_t tr_s, tr_e
    int32_t host_s, host_e
    int port
    int32_t params_s           # the first ';' after sent-by, == e without params
    int32_t branch_s, branch_e
    int32_t received_s, received_e
    int32_t maddr_s, maddr_e
    int rport

ctypedef struct NameAddrParts:
    int32_t s, e
    int32_t dn_s, dn_e         # -1 when no display name
    uint8_t quoted
    int32_t uri_s, uri_e
    uint8_t angle
    int32_t params_s, params_e
    int32_t tag_s, tag_e       # -1 when absent
    uint8_t wildcard

ctypedef struct HEntry:
    int32_t line_s, line_e     # the whole line(s): terminator and folded continuations included
    int32_t name_s, name_e
    int32_t value_s, value_e   # trimmed; may span folded lines
    int16_t id
    int16_t src                   # -1: the message buffer; >= 0: index into Message._extra
    uint8_t folded
    uint8_t deleted


# The typed views.  Compiled layers that ``cimport`` them read a URI's fields as struct members
# and call the views' C accessors instead of the Python properties: a property read from
# another module is a generic attribute look-up (a type look-up, a descriptor call), a few
# hundred of them a call before these declarations (docs/performance.md).  The accessors
# return what the property of the same name does; on None they are undefined (check first).
cdef class URI:
    cdef readonly str scheme
    cdef readonly object user
    cdef readonly object password
    cdef readonly str host
    cdef readonly object port
    cdef readonly dict params
    cdef readonly dict headers
    cdef str _text

    cdef bint _is_sip(self) noexcept
    cpdef str aor(self)
    cdef object _maddr(self)
    cdef bint _lr(self) except -1
    cdef object _transport(self)


cdef class Via:
    cdef object _owner            # keeps the buffer alive
    cdef const char* _p
    cdef ViaParts _v
    cdef dict _params
    cdef bint _lazy
    cdef int32_t _ls, _le

    cdef int _need(self) except -1
    cdef str _host(self)
    cdef object _port(self)
    cdef str _transport(self)
    cdef object _branch(self)
    cdef object _received(self)
    cdef object _maddr(self)
    cdef object _rport(self)


# What NameAddr._sip_scan found out about a sip/sips URI without building it.
cdef enum:
    SIP_SCAN_OTHER = 0
    SIP_SCAN_PLAIN = 1
    SIP_SCAN_MADDR = 2
    SIP_SCAN_READ = 3


cdef class NameAddr:
    cdef object _owner
    cdef const char* _p
    cdef NameAddrParts _n
    cdef URI _c_uri
    cdef dict _params
    # The URI's parts once it was scanned and checked whole (_u_ok): building it, or reading
    # its host and port, then scans it no more.
    cdef UriParts _u
    cdef bint _u_ok

    cdef URI _uri(self)
    cdef bint _uri_valid(self) except -1
    cdef str _uri_text(self)
    cdef tuple _sip_host_port(self)
    cdef int _sip_scan(self) except -2
    cdef object _tag(self)


cdef inline str lowered(str text):
    """``text.lower()``, without the call and the copy when nothing would change: hosts,
    schemes and parameter names nearly always arrive in lower case (§19.1.4 compares them
    case-insensitively).  One home for the compiled layers' case folding of such names."""
    cdef Py_UCS4 c
    for c in text:
        if (c >= 65 and c <= 90) or c >= 0x80:      # A-Z, or anything str.lower() may fold
            return text.lower()
    return text


# Message, Request and Response take no part in the cyclic GC (see Message's fields below);
# their @cython.no_gc is in _message.pyx, where Cython applies it.
cdef class Message:
    cdef object _data               # bytes, or a memoryview (cast to 'B') of other buffers
    cdef const char* _buf
    # Offsets are int32: Limits caps a message below 2**31 octets.
    cdef int32_t _len
    cdef int32_t _start             # start line begins here (leading CRLFs skipped)
    cdef int32_t _sl_e              # end of the start line's text
    cdef int32_t _hdr_s             # first header line
    cdef int32_t _blank_s           # the empty line that ends the header section
    cdef int32_t _body_s, _body_e
    cdef HEntry* _h                 # a pooled array of POOLED_HEADERS, or a bigger heap one

    cdef int _nh, _cap
    cdef int16_t _first[N_HEADER_IDS]
    # Parts of the top Via, From and To found while validating, reused by the accessors (they
    # describe the original buffer, so an edit of their header clears them).
    cdef bint _parts_ok             # the top Via's (any Via edit clears it)
    cdef bint _names_ok             # From's and To's (an edit of either clears it)
    cdef ViaParts _top_via
    cdef NameAddrParts _from_p, _to_p
    cdef list _extra
    cdef object _new_body
    cdef object _new_start_line     # bytes, CRLF included
    cdef bint _edited
    # caches of typed views (an edit clears its header's: _invalidate_for)
    cdef object _c_via, _c_top_via, _c_from, _c_to, _c_cseq, _c_route, _c_contact
    cdef object _c_record_route
    # No GC participation, on purpose: a message and its views reference only immutable
    # buffers (never each other), so they cannot form cycles.  The object stays under
    # pymalloc's 512-byte limit and its header index comes from a pool, so creating and
    # freeing a message costs no malloc.

    cdef inline const char* _base(self, HEntry* h) noexcept:
        # h.src >= 0 only names an entry of _extra (a list of bytes), so nothing can fail.
        if h.src < 0:
            return self._buf
        return PyBytes_AS_STRING(<object>PyList_GET_ITEM(self._extra, h.src))

    cdef inline object _owner_of(self, HEntry* h):
        # What a view must keep alive: the bytes of an edited line, the message's bytes, or the
        # message itself when it holds a buffer export of a bytearray/memoryview.
        if h.src >= 0:
            return self._extra[h.src]
        return self._data

    cdef int _find(self, int hid, int after) noexcept
    cdef int _add_entry(self) except -1
    cdef void _reindex(self) noexcept
    cdef void _invalidate_for(self, int hid) noexcept
    cdef int _rescan_top_via(self, HEntry* h) except -1
    cdef int _copy_into(self, Message m) except -1
    cdef int _validate(self) except -1
    cdef str _value_str(self, int i)
    cdef list _values(self, int hid, bint split)
    cdef bint _top_via_parts(self, ViaParts* v, const char** p) except -1
    cdef object _single_name_addr(self, int hid)
    cdef list _name_addr_list(self, int hid)
    cdef int _line(self, int hid, const char* name, Py_ssize_t nlen, const char* value,
                   Py_ssize_t vlen) except -1
    cdef int _insert(self, int at, int hid, const char* name, Py_ssize_t nlen, const char* value,
                     Py_ssize_t vlen) except -1
    cdef int _insert_obj(self, int at, int hid, object name, object value) except -1
    cdef int _replace_value(self, int i, const char* value, Py_ssize_t vlen) except -1
    cdef int _replace_value_obj(self, int i, object value) except -1
    cdef int _delete(self, int i) except -1
    cdef object _pop_first_value(self, int hid, bint want_text)
    cdef int _drop_first_value(self, int hid) except -1
    cdef bint _entry_named(self, int i, int hid, object name) except -1
    # The C side of the properties of the same name (the lists are the cached ones: read,
    # never edit them).
    cdef str _call_id(self)
    cdef object _cseq(self)
    cdef object _max_forwards(self)
    cdef list _vias(self)
    cdef NameAddr _from(self)
    cdef NameAddr _to(self)
    cdef list _contacts(self)
    cdef list _routes(self)
    cdef list _record_routes(self)
    # What the intake does to every message it delivers, callable from C.
    cpdef bint stamp_received(self, str host, int port) except -1
    cpdef bint ensure_content_length(self) except -1
    cdef bytes _wire(self)
    # The edits a proxy makes to every message it relays, callable from C.
    cpdef add_via(self, value)
    cpdef pop_via(self)
    cpdef add_record_route(self, value)
    cpdef pop_route(self)
    cpdef decrement_max_forwards(self)
    cpdef repeated_single_field(self)


cdef class Request(Message):
    cdef int32_t _m_s, _m_e, _u_s, _u_e
    cdef URI _c_uri
    cdef str _c_method
    # The Request-URI's parts as parse() scanned them (_ru_ok; offsets into the buffer, as
    # _u_s and _u_e are): building the URI does not scan it again.
    cdef UriParts _ru
    cdef bint _ru_ok

    cdef str _method(self)
    cdef URI _uri(self)
    cdef int _set_uri(self, URI u) except -1
    cpdef object transaction_key(self)
    cpdef str stateless_branch(self)
    cpdef copy(self)
    cpdef loop_hash(self)
    cdef Message _reply(self, int status, object reason, object to_tag, object headers,
                        object body, object content_type, bint record_route)


cdef class Response(Message):
    cdef int _status
    cdef int32_t _r_s, _r_e

    cpdef object transaction_key(self)
    cpdef copy(self)


# parse() for compiled callers (the datagram intake); ``limits`` a Limits or None.
cdef Message parse_c(object data, object limits)

# Host comparison in place, for the compiled layers (a sent-by or URI host against ours).
cdef bint same_host(const char* p, Py_ssize_t s, Py_ssize_t e, str host) except -1


cdef inline bytes wire(object msg):
    """``bytes(msg)`` for the compiled layers' sends: a Message serializes in C, without
    the look-up and binding of ``__bytes__`` that ``bytes()`` does (seven a proxied call).
    Anything else (a test's raw bytes) goes through ``bytes()``."""
    if isinstance(msg, Message):
        return (<Message>msg)._wire()
    return bytes(msg)
