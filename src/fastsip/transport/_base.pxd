# cython: language_level=3
"""C-level forms of the callbacks between the shell and the compiled layers (the transport,
``deliver``, ``admit``: fastsip/transport/_base.pyx), for both sides to ``cimport``."""


cdef class TransportBase:
    # The Transport protocol's per-message methods as C methods: a shell whose transport
    # has a compiled one (its ``compiled`` attribute, see compiled_transport) is called
    # without a Python call per send; any other transport is called as before.
    cpdef send(self, data, dest)
    cpdef local_for(self, dest)
    cpdef via_for(self, dest, local=*)


cdef TransportBase compiled_transport(object transport)


cdef class MessageSink:
    # The intake's ``deliver(msg, source)`` as a C method: the transaction layer inherits it,
    # and a shell that holds the layer itself (see direct_callee) delivers each message by a
    # C call instead of a Python call of the bound ``receive``.
    cpdef receive(self, msg, source)


cdef class SourceAdmission:
    # The shell's ``admit(host, now)`` hook as a C method, for a compiled edge policy (the
    # proxy's source guard) that inherits it.
    cpdef bint admit(self, host, double now) except -1


cdef object direct_callee(object callback)
cdef bint admit_c(object admit, object host, double now) except -1
cdef bint deliver_c(object deliver, object msg, object source) except -1
