# cython: language_level=3
"""C-level entry of the datagram intake (fastsip/transport/_intake.pyx), for the compiled UDP
shell to ``cimport``: one call per datagram without a Python call's argument tuple and int
objects.  :mod:`fastsip.transport.intake` documents the rules."""


cdef bint receive_datagram_c(data, str host, int port, int connection, limits, transport,
                             deliver, local, steer, malformed) except -1


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
