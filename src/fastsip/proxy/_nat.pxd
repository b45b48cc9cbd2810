# cython: language_level=3
"""C-level view of the NAT rules every forwarded message meets (fastsip/proxy/_nat.pyx), for
the compiled proxy core to ``cimport``; :mod:`fastsip.proxy.nat` documents them."""

from fastsip.sip._message cimport Message, Request
from fastsip.transport._address cimport Address


cpdef bint request_behind_nat(Request request, Address source) except -1
cpdef bint contact_behind_nat(Message message, Address peer) except -1
cpdef bint add_alias(Message message, flow) except -1
cpdef pop_alias(Request request)
cpdef Address binding_flow(binding)
