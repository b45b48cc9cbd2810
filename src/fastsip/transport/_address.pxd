# cython: language_level=3
"""C-level view of the transport address (fastsip/transport/_address.pyx), for compiled
modules to ``cimport``: a variable typed ``Address`` reads its fields as C struct members
instead of through Python attribute look-ups (several per datagram on the relay path).
:mod:`fastsip.transport` documents it."""

cimport cython


@cython.final
cdef class Address:
    cdef readonly str transport
    cdef readonly str host
    cdef readonly object port
    cdef readonly object connection
