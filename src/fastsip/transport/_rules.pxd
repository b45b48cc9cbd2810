# cython: language_level=3
"""C-level entries of the transport rules (fastsip/transport/_rules.pyx) that the compiled
relay path calls for every message: the intake's sent-by check, the next hop of a request
and the destination of a response, without a Python call each.
:mod:`fastsip.transport.rules` documents them."""

from fastsip.transport._address cimport Address


cpdef Address response_destination(via, source=*)
cpdef Address next_hop(target)
cpdef Address request_next_hop(request, outbound_proxy=*)
cpdef bint check_sent_by(response, local) except -1
