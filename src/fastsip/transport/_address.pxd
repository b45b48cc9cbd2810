# cython: language_level=3
"""C-level view of the transport address (fastsip/transport/_address.pyx), for compiled
modules to ``cimport``: a variable typed ``Address`` reads its fields as C struct members
instead of through Python attribute look-ups (several per datagram on the relay path).
:mod:`fastsip.transport` documents it."""

cimport cython
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject


@cython.final
cdef class Address:
    cdef readonly str transport
    cdef readonly str host
    cdef readonly object port
    cdef readonly object connection


cdef inline Address make_address(str transport, str host, object port, object connection):
    """``Address(transport, host, port, connection)`` from compiled code: the fields set in C,
    without the constructor's Python call (a datagram's source is made once per datagram)."""
    cdef Address a = Address.__new__(Address)
    a.transport = transport
    a.host = host
    a.port = port
    a.connection = connection
    return a


@cython.final
cdef class HostMemo:
    cdef dict _known
    cdef object _fn
    cdef Py_ssize_t _bound
    cdef object _compute(self, str host)


cdef inline object memo_get(HostMemo memo, str host):
    """``memo(host)`` from compiled code: a host asked before costs one dict look-up."""
    cdef PyObject* known = PyDict_GetItem(memo._known, host)
    if known is not NULL:
        return <object>known
    return memo._compute(host)
