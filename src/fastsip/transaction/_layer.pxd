# cython: language_level=3
"""C-level view of the transaction machines (RFC 3261 §17), for compiled layers above them
(the proxy's relay path, once it is compiled) to ``cimport``: typed fields and direct calls
instead of Python attribute look-ups and calls.  What Python sees is documented in
:mod:`fastsip.transaction.layer`."""

cimport cython

from fastsip.sip._message cimport Request, Response
from fastsip.timers._wheel cimport TimerHandle, TimerWheel
from fastsip.transport._base cimport MessageSink, TransportBase


cdef enum:
    # A transaction's state as a C int; ``state`` reads the name (fastsip.transaction.base).
    S_CALLING = 0
    S_TRYING = 1
    S_PROCEEDING = 2
    S_COMPLETED = 3
    S_ACCEPTED = 4
    S_CONFIRMED = 5
    S_TERMINATED = 6


cdef class ClientHandlerBase:
    # The ClientHandler protocol (fastsip.transaction.layer) as C methods: a compiled handler
    # (the proxy's branches) that inherits it is called without a Python call; any other
    # object with the three methods is called as before.
    cpdef on_response(self, txn, Response response)
    cpdef on_timeout(self, txn)
    cpdef on_transport_error(self, txn)


cdef class TransactionUserBase:
    # The TransactionUser protocol as C methods, for a compiled TU (the proxy core).
    cpdef on_request(self, txn, Request request)
    cpdef on_ack(self, Request request, source)
    cpdef on_stray_response(self, Response response, source)
    cpdef on_server_timeout(self, txn)


cdef inline int cancel_timer(timer) except -1:
    # A timer of the layer's clock: a wheel's handle by a C call, another's by its method.
    if type(timer) is TimerHandle:
        (<TimerHandle>timer).cancel()
    else:
        timer.cancel()
    return 0


@cython.final
cdef class TransactionLayer(MessageSink):
    cdef readonly object transport
    # The transport's compiled stand-in (fastsip.transport._base), None without one.
    cdef TransportBase _compiled
    cdef readonly object clock
    cdef public object call_later_lax
    cdef readonly object tu
    cdef TransactionUserBase _ctu     # tu, when it is compiled (C calls); else None
    cdef readonly bint shed
    cdef readonly object config
    # The config's values, read once: a frozen TimerConfig never changes.
    cdef double _t1, _t2, _t4, _timeout
    cdef public object max_server_transactions
    cdef public object max_client_transactions
    cdef public object retry_after
    cdef readonly object refusals
    cdef readonly dict _client
    cdef readonly dict _server
    # The transactions of each table that are finished and only linger (to absorb
    # retransmissions), oldest first: the first to go when a table is full.
    cdef dict _client_lingering
    cdef dict _server_lingering
    cdef readonly Py_ssize_t reclaimed
    # The clock's wheel, when the clock is a WheelDriver (its methods are the wheel's): timers
    # by C calls.  _wheel_lax: call_later_lax as __init__ found it, while it is the wheel's.
    cdef TimerWheel _wheel
    cdef object _wheel_lax

    cpdef tuple server_key(self, Request request)
    cdef int _on_request(self, txn, Request request) except -1
    cdef int _on_ack(self, Request request, source) except -1
    cdef int _on_stray_response(self, Response response, source) except -1
    cdef int _on_server_timeout(self, txn) except -1
    cdef object _later(self, double delay, callback, tuple args=*)
    cdef object _later_lax(self, double delay, callback)
    cdef double _now(self) except? -1.0
    cdef int _send(self, data, dest) except -1
    cpdef request(self, request, dest, handler)
    cdef int _receive_response(self, Response response, object source) except -1
    cdef int _receive_request(self, Request request, object source) except -1
    cdef int _answer_statelessly(self, object request, object source, int status,
                                 object reason, object headers=*) except -1
    cdef int _overload(self, str side, object cap) except -1
    cdef bint _reclaim(self, dict lingering) except -1


cdef class _Lingering:
    cdef object _request
    cdef public object last_response
    cdef readonly TransactionLayer layer
    cdef readonly object key
    cdef readonly str method
    cdef readonly bint is_invite
    cdef readonly object dest
    cdef bint _reliable             # dest.reliable, read once
    cdef int _state
    cdef object _timer
    cdef object _timeout
    cdef double _interval

    cdef void _shed(self) noexcept
    cdef int _cancel_timers(self) except -1


@cython.final
cdef class ClientTransaction(_Lingering):
    cdef public object handler
    cdef bytes _data
    cdef double _deadline
    cdef object _ack

    cdef int _start(self) except -1
    cdef int _receive(self, Response response) except -1
    cdef int _linger(self, double delay) except -1
    cdef int _stop_retransmitting(self) except -1
    cdef int _cancel_timeout(self) except -1
    cdef int _end(self) except -1


@cython.final
cdef class ServerTransaction(_Lingering):
    cdef readonly object source
    cdef public object data
    cdef object _data

    cpdef respond(self, Response response)
    cpdef respond_statelessly(self, Response response)
    cdef int _receive_retransmission(self, object request, object source) except -1
    cdef int _end(self) except -1
