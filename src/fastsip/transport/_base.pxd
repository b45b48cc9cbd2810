# cython: language_level=3
"""C-level view of :class:`fastsip.transport.Transport` (fastsip/transport/_base.pyx), for the
compiled layers that send through it to ``cimport``."""


cdef class TransportBase:
    # The Transport protocol's per-message methods as C methods: a shell whose transport
    # has a compiled one (its ``compiled`` attribute, see compiled_transport) is called
    # without a Python call per send; any other transport is called as before.
    cpdef send(self, data, dest)
    cpdef local_for(self, dest)
    cpdef via_for(self, dest, local=*)


cdef TransportBase compiled_transport(object transport)
