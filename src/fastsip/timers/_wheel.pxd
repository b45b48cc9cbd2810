# cython: language_level=3
"""C-level view of the timer wheel, for compiled layers (the transaction layer) to ``cimport``.

A compiled caller schedules integer keys without touching a Python object::

    from fastsip.timers._wheel cimport TimerWheel
    token = wheel.schedule_key_c(when, key)     # -1 with an exception set on failure
    wheel.cancel_key_c(token)                   # 1 if it was pending, 0 otherwise
"""

from cpython.object cimport PyObject
from libc.stdint cimport int64_t, uint32_t, uint64_t


cdef enum:
    # Levels of 64 slots: one 64-bit occupancy word per level, and 11 levels cover every tick an
    # int64 can hold, so there is no overflow list to re-insert from.
    LEVEL_BITS = 6
    LEVEL_SLOTS = 64
    NLEVELS = 11
    NSLOTS = 704            # NLEVELS * LEVEL_SLOTS slots in the wheel proper: groups 0..703
    DUE = 704               # group of timers whose tick has come (or was past when scheduled)
    DEFER = 705             # due by tick but a few ulps after `now`: fire next advance, never early
    BATCH = 706             # the sorted batch being fired right now
    NGROUPS = 707
    # Every group (a slot, DUE, ...) is SUBLISTS interleaved lists; a timer joins list
    # seq % SUBLISTS.  A linked list is a chain of dependent loads, one cache miss at a time;
    # walking the sub-lists in lockstep keeps that many misses in flight instead.
    SUB_BITS = 3
    SUBLISTS = 8
    NHEADS = 5656           # NGROUPS * SUBLISTS list heads: node indices 0 .. NHEADS-1
    CHUNK_BITS = 12         # nodes live in chunks of 4096 that never move, so indices stay valid
    CHUNK_SIZE = 4096
    CHUNK_MASK = 4095


cdef struct Node:
    # One pending timer, 40 bytes.  Lists link by 32-bit index rather than pointer: it halves the
    # links and lets a cancel token name a node as (generation, index) that can be checked.
    uint32_t prev
    uint32_t next
    uint32_t gen            # bumped each time the node is freed: stale handles and tokens miss
    uint32_t flags          # state: pending, key or callback, callback packed with args
    double when             # the deadline as asked for, in wheel seconds
    uint64_t seq            # scheduling order, the tie-break between equal deadlines
    int64_t data            # the key, or an owned PyObject*: callback or (callback, *args)


cdef struct Entry:
    # A batch entry, copied out of its node so sorting touches one contiguous array.
    double when
    uint64_t seq
    uint32_t idx
    uint32_t gen


cdef class TimerHandle:
    cdef PyObject* _wheel       # owned reference: the handle keeps its wheel alive
    cdef double _when
    cdef uint32_t _idx
    cdef uint32_t _gen          # the node's generation when scheduled | HANDLE_CANCELLED

    cpdef bint cancel(self) except -1


cdef class TimerWheel:
    cdef Node** _chunks
    cdef Py_ssize_t _nchunks
    cdef Py_ssize_t _chunks_cap
    cdef uint32_t _fresh            # next never-used node index
    cdef uint32_t _free             # head of the free list (index), or NIL
    cdef uint64_t _bitmap[NLEVELS]       # one bit per non-empty slot, per level
    cdef int _ev_pos                # slot of the event _next_event last found

    cdef double _tick
    cdef double _inv_tick
    cdef double _origin
    cdef double _now
    cdef int64_t _cur               # last tick processed
    cdef uint64_t _seq
    cdef int64_t _wakeup_tick       # the owner (driver) calls advance() by this tick

    cdef Py_ssize_t _pending
    cdef uint64_t _scheduled
    cdef uint64_t _fired
    cdef uint64_t _cancelled
    cdef double _max_late

    cdef bint _running
    cdef Entry* _batch
    cdef Py_ssize_t _batch_cap
    cdef int64_t* _keys
    cdef Py_ssize_t _nkeys
    cdef Py_ssize_t _keys_cap

    cdef object _on_error
    cdef object _key_handler
    cdef object _wakeup_hook
    cdef object _clock              # the owner's clock, for call_later_now (None: the wheel's)
    cdef double _clock_offset
    cdef double _held               # the owner's clock while a shell holds it (hold_clock)
    cdef bint _holding

    cdef int64_t schedule_key_c(self, double when, int64_t key) except -1
    cdef void hold_clock(self, double now) noexcept
    cdef void release_clock(self) noexcept
    cdef double _owner_now(self) except? -1.0
    cdef bint cancel_key_c(self, int64_t token) noexcept
    # call_later_now and call_later_lax for compiled callers (the transaction layer's timers).
    cdef TimerHandle later_c(self, double delay, object callback, tuple args)
    cdef TimerHandle later_lax_c(self, double delay, object callback, tuple args)
