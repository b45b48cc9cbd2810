# cython: language_level=3
"""C-level entry of the datagram intake (fastsip/transport/_intake.pyx), for the compiled UDP
shell to ``cimport``: one call per datagram without a Python call's argument tuple and int
objects.  :mod:`fastsip.transport.intake` documents the rules."""


cdef bint receive_datagram_c(data, str host, int port, int connection, limits, transport,
                             deliver, local, steer, malformed) except -1
