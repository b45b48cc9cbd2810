# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, embedsignature=True, always_allow_keywords=False
"""The timer wheel: a hierarchical timing wheel for SIP transaction timers (RFC 3261 §17).

A carrier proxy keeps hundreds of thousands of transactions alive, each with retransmission and
timeout timers, and cancels most of them before they fire.  Here a timer is a 40-byte node in a
chunked slab, linked by index into one of 64 slots on one of 11 levels; scheduling appends it to
a slot, cancelling unlinks it, both O(1) with no tombstone left behind.  Each level has a 64-bit
word saying which slots hold anything, so ``advance`` jumps straight from one non-empty slot to
the next however far the clock moves.  When the clock enters a higher-level slot its timers
cascade to lower levels, so every timer fires from level 0 at its own tick: never early (its tick
is its deadline rounded *up*, and the exact deadline is checked again when it fires), at most one
tick late.

What expiry costs is mostly memory latency and sorting.  A linked list is a chain of dependent
loads, one cache miss at a time, so every list (a slot, the due list ...) is eight interleaved
sub-lists walked in lockstep, and cascading gathers a slot into an array before re-placing it
with prefetches.  A tick's batch is put in deadline order by a bucket sort (linear for spread
deadlines), and expired key nodes are freed where they lie instead of being unlinked one by one.

Two modes share the one wheel:

* callback mode, ``call_later``/``call_at``, returns a :class:`TimerHandle`;
* key mode, ``schedule_key``/``schedule_key_at``, takes an integer key and returns an integer
  token, and ``advance_keys`` hands every expired key back in one ``array('q')`` - no Python
  object per timer and no Python call per expiry.  Compiled callers use ``schedule_key_c`` and
  ``cancel_key_c`` (see ``_wheel.pxd``).

The wheel reads no clock: its time moves only when ``advance(now)`` is called (sans-IO).  The
event-loop driver in ``fastsip.asyncio.timers`` calls it from a single loop timer.
"""

cimport cython
from cpython cimport array as carray
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM
from libc.math cimport isnan
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import array
import logging

from fastsip.errors import FastSIPError

cdef extern from *:
    """
    #if defined(_MSC_VER)
    #include <intrin.h>
    static __inline int fs_clz64(unsigned __int64 x) {
        unsigned long i; _BitScanReverse64(&i, x); return 63 - (int)i;
    }
    static __inline int fs_ctz64(unsigned __int64 x) {
        unsigned long i; _BitScanForward64(&i, x); return (int)i;
    }
    #else
    #define fs_clz64(x) __builtin_clzll(x)
    #define fs_ctz64(x) __builtin_ctzll(x)
    #endif
    #if defined(__GNUC__)
    #define fs_prefetch(p) __builtin_prefetch((p), 1)
    #else
    #define fs_prefetch(p) ((void)(p))
    #endif

    /* Call a packed (callback, *args) tuple without building an args tuple. */
    static PyObject *fs_call_packed(PyObject *packed) {
        Py_ssize_t n = PyTuple_GET_SIZE(packed);
        PyObject **items = ((PyTupleObject *)packed)->ob_item;
        return PyObject_Vectorcall(items[0], items + 1, (size_t)(n - 1), NULL);
    }
    """
    int fs_clz64(uint64_t x) noexcept nogil
    int fs_ctz64(uint64_t x) noexcept nogil
    void fs_prefetch(const void* p) noexcept nogil
    object fs_call_packed(object packed)

logger = logging.getLogger("fastsip.timers")


class TimerError(FastSIPError, ValueError):
    """Bad input to the timer wheel: a NaN deadline or clock value, or a tick that is not a
    positive number of seconds."""


# A timer node's state, in Node.flags.
cdef enum:
    F_PENDING = 1
    F_KEY = 2
    F_ARGS = 4

cdef uint32_t NIL = 0xFFFFFFFF
cdef uint32_t GEN_MASK = 0x7FFFFFFF        # tokens keep the generation in 31 bits: int64 > 0
cdef uint32_t HANDLE_CANCELLED = 0x80000000
# Ticks are clamped to +-2**62 so that "hours" and "never" alike stay inside 11 levels.
cdef int64_t MAX_TICK = (<int64_t>1) << 62
cdef double MAX_Q = <double>((<int64_t>1) << 62)
# Slack for the float division when() / tick: a deadline that is a whole number of ticks must
# land on that tick, not the next.  Early firing is impossible anyway: it is re-checked exactly.
cdef double EPS = 1e-9

cdef carray.array _KEY_ARRAY = array.array("q")


# ---------------------------------------------------------------------------------------------
# Node storage and the intrusive lists

cdef inline Node* _N(Node** chunks, uint32_t i) noexcept nogil:
    return &chunks[i >> CHUNK_BITS][i & CHUNK_MASK]


cdef inline void _link_tail(Node** ch, uint32_t head, uint32_t i, Node* n) noexcept nogil:
    cdef Node* h = _N(ch, head)
    cdef uint32_t last = h.prev
    n.prev = last
    n.next = head
    _N(ch, last).next = i
    h.prev = i


cdef inline void _unlink(Node** ch, Node* n) noexcept nogil:
    _N(ch, n.prev).next = n.next
    _N(ch, n.next).prev = n.prev


cdef inline bint _empty(Node** ch, uint32_t head) noexcept nogil:
    return _N(ch, head).next == head


cdef inline void _splice(Node** ch, uint32_t src, uint32_t dst) noexcept nogil:
    """Move every node of list ``src`` to the tail of list ``dst``, in O(1)."""
    cdef Node* s = _N(ch, src)
    if s.next == src:
        return
    cdef Node* d = _N(ch, dst)
    cdef uint32_t first = s.next
    cdef uint32_t last = s.prev
    _N(ch, d.prev).next = first
    _N(ch, first).prev = d.prev
    _N(ch, last).next = dst
    d.prev = last
    s.next = src
    s.prev = src


cdef inline void _link(Node** ch, uint32_t group, uint32_t i, Node* n) noexcept nogil:
    """Append node ``i`` to ``group``: to its sub-list, chosen round-robin by scheduling order."""
    _link_tail(ch, (group << SUB_BITS) | <uint32_t>(n.seq & (SUBLISTS - 1)), i, n)


cdef inline bint _group_empty(Node** ch, uint32_t group) noexcept nogil:
    cdef uint32_t h = group << SUB_BITS
    cdef uint32_t j
    for j in range(SUBLISTS):
        if _N(ch, h + j).next != h + j:
            return False
    return True


cdef inline void _splice_group(Node** ch, uint32_t src, uint32_t dst) noexcept nogil:
    """Move all of group ``src`` to group ``dst``, sub-list by sub-list, in O(SUBLISTS)."""
    cdef uint32_t j
    for j in range(SUBLISTS):
        _splice(ch, (src << SUB_BITS) + j, (dst << SUB_BITS) + j)


cdef inline void _reset_group(Node** ch, uint32_t group) noexcept nogil:
    cdef uint32_t h = group << SUB_BITS
    cdef uint32_t j
    for j in range(SUBLISTS):
        _N(ch, h + j).next = h + j
        _N(ch, h + j).prev = h + j


cdef int _grow_chunks(TimerWheel w) except -1:
    cdef Py_ssize_t cap
    cdef Node** table
    if w._nchunks == w._chunks_cap:
        cap = w._chunks_cap * 2 if w._chunks_cap else 16
        table = <Node**>PyMem_Realloc(w._chunks, cap * sizeof(Node*))
        if table == NULL:
            raise MemoryError()
        w._chunks = table
        w._chunks_cap = cap
    cdef Node* chunk = <Node*>PyMem_Malloc(CHUNK_SIZE * sizeof(Node))
    if chunk == NULL:
        raise MemoryError()
    w._chunks[w._nchunks] = chunk
    w._nchunks += 1
    return 0


cdef inline int64_t _alloc(TimerWheel w) except -1:
    cdef uint32_t i = w._free
    if i != NIL:
        w._free = <uint32_t>_N(w._chunks, i).data
        return i
    if <Py_ssize_t>w._fresh == w._nchunks * CHUNK_SIZE:
        if w._fresh >= 0xFFFF0000u:
            raise MemoryError("timer wheel is full")
        _grow_chunks(w)
    i = w._fresh
    w._fresh += 1
    _N(w._chunks, i).gen = 0
    return i


cdef inline void _release(TimerWheel w, uint32_t i, Node* n) noexcept nogil:
    # Bumping the generation is what makes every outstanding handle or token for it go stale.
    n.gen = (n.gen + 1) & GEN_MASK
    n.flags = 0
    n.data = w._free
    w._free = i


# ---------------------------------------------------------------------------------------------
# Ticks and placement

cdef inline int64_t _ceil_tick(TimerWheel w, double when) noexcept nogil:
    # Multiplying by 1/tick rounds differently from dividing, which is fine: the same function
    # places and re-places a node, and firing re-checks the exact deadline anyway.
    cdef double q = (when - w._origin) * w._inv_tick - EPS
    if q >= MAX_Q:
        return MAX_TICK - 1
    if q <= -MAX_Q:
        return -MAX_TICK
    cdef int64_t t = <int64_t>q       # truncation; ceil without a libm call
    return t + (<double>t < q)


cdef inline int64_t _floor_tick(TimerWheel w, double now) noexcept nogil:
    cdef double q = (now - w._origin) * w._inv_tick + EPS
    if q >= MAX_Q:
        return MAX_TICK - 1
    if q <= -MAX_Q:
        return -MAX_TICK
    cdef int64_t t = <int64_t>q
    return t - (<double>t > q)


cdef inline int64_t _place(TimerWheel w, uint32_t i, Node* n) noexcept nogil:
    """Link node ``i`` where its tick belongs; return the tick.

    Invariant: a node on level L agrees with the current tick on every digit above L and is
    strictly greater on digit L, so the first non-empty slot of the lowest level holding any
    timer is always the next thing that happens.
    """
    cdef int64_t d = _ceil_tick(w, n.when)
    cdef uint32_t pos
    cdef int lvl
    if d <= w._cur:
        pos = DUE
    else:
        lvl = (63 - fs_clz64(<uint64_t>(d ^ w._cur))) // LEVEL_BITS
        pos = lvl * LEVEL_SLOTS + <uint32_t>((d >> (lvl * LEVEL_BITS)) & (LEVEL_SLOTS - 1))
        w._bitmap[lvl] |= (<uint64_t>1) << (pos & (LEVEL_SLOTS - 1))
    _link(w._chunks, pos, i, n)
    return d


cdef inline int64_t _next_event(TimerWheel w) noexcept nogil:
    """The next tick at which a slot is due (to fire or cascade), or -1; sets ``_ev_pos``.

    Cancelling never clears a slot's bit: knowing the slot became empty would cost every cancel
    a look at all its sub-lists.  A bit whose slot turns out empty is dropped here instead, once.
    """
    cdef int lvl, s, sh
    cdef uint64_t b
    cdef int64_t hi
    cdef uint32_t pos
    for lvl in range(NLEVELS):
        b = w._bitmap[lvl]
        while b:
            s = fs_ctz64(b)
            pos = lvl * LEVEL_SLOTS + s
            if _group_empty(w._chunks, pos):
                b &= b - 1
                w._bitmap[lvl] &= ~((<uint64_t>1) << s)
                continue
            sh = (lvl + 1) * LEVEL_BITS
            hi = ((w._cur >> sh) << sh) if sh < 64 else 0
            w._ev_pos = pos
            return hi | ((<int64_t>s) << (lvl * LEVEL_BITS))
    return -1


cdef int _cascade(TimerWheel w, uint32_t pos) except -1:
    """Empty slot ``pos``, whose time has come: a level-0 slot is due as a whole; a higher one's
    nodes are re-placed against the (just advanced) current tick, one level down or more."""
    cdef Node** ch = w._chunks
    cdef Py_ssize_t k, count
    cdef uint32_t idx
    if pos < LEVEL_SLOTS:
        _splice_group(ch, pos, DUE)
    else:
        # Gather first (lockstep: several misses in flight), then place in a second pass that
        # can prefetch ahead, since it reads indices out of an array instead of a chain.
        count = _gather(w, pos)
        _reset_group(ch, pos)
        for k in range(count):
            if k + 8 < count:
                fs_prefetch(_N(ch, w._batch[k + 8].idx))
            idx = w._batch[k].idx
            _place(w, idx, _N(ch, idx))
    w._bitmap[pos >> LEVEL_BITS] &= ~((<uint64_t>1) << (pos & (LEVEL_SLOTS - 1)))
    return 0


# ---------------------------------------------------------------------------------------------
# Firing

cdef inline bint _before(const Entry* a, const Entry* b) noexcept nogil:
    # Deadline order, ties in scheduling order; deadlines are never NaN, seqs never equal.
    return a.when < b.when or (a.when == b.when and a.seq < b.seq)


cdef inline void _swap(Entry* x, Entry* y) noexcept nogil:
    cdef Entry tmp = x[0]
    x[0] = y[0]
    y[0] = tmp


cdef void _sort_entries(Entry* a, Py_ssize_t n) noexcept nogil:
    """Sort a batch in place: quicksort (median of three, Hoare) down to insertion sort.

    Inlined comparisons matter here: with libc's qsort the calls through a function pointer
    made sorting cost more than everything else expiry does (~100 ns a timer).
    """
    cdef Py_ssize_t i, j, mid
    cdef Entry pivot, tmp
    while n > 16:
        mid = n >> 1
        if _before(&a[mid], &a[0]):
            _swap(&a[0], &a[mid])
        if _before(&a[n - 1], &a[mid]):
            _swap(&a[mid], &a[n - 1])
            if _before(&a[mid], &a[0]):
                _swap(&a[0], &a[mid])
        pivot = a[mid]
        i = -1
        j = n
        while True:
            i += 1
            while _before(&a[i], &pivot):
                i += 1
            j -= 1
            while _before(&pivot, &a[j]):
                j -= 1
            if i >= j:
                break
            _swap(&a[i], &a[j])
        # [0, j] <= pivot <= [j + 1, n): recurse into the smaller side, loop on the larger.
        if j + 1 < n - j - 1:
            _sort_entries(a, j + 1)
            a += j + 1
            n -= j + 1
        else:
            _sort_entries(a + j + 1, n - j - 1)
            n = j + 1
    for i in range(1, n):
        tmp = a[i]
        j = i
        while j > 0 and _before(&tmp, &a[j - 1]):
            a[j] = a[j - 1]
            j -= 1
        a[j] = tmp


cdef void _sort_batch(Entry* a, Py_ssize_t n) noexcept nogil:
    """Sort a batch by (deadline, scheduling order) in expected linear time.

    A batch is usually one tick's timers with deadlines spread across it, so a bucket per
    entry over [min, max] leaves almost every bucket with 0-2 entries to finish by insertion
    sort.  Comparison sorting random data mispredicts a branch per comparison: it cost ~40 ns
    a timer at 1000 a tick, more than all the rest of expiry.  The bucket index is a monotonic
    function of the deadline, so bucket order never contradicts deadline order; crowded
    buckets (equal deadlines, clusters) fall back to the quicksort.
    """
    cdef Py_ssize_t i, b, start, size
    cdef double lo, hi, scale
    cdef Entry* out
    cdef Py_ssize_t* counts
    cdef uint32_t* bucket
    if n <= 32:
        _sort_entries(a, n)
        return
    lo = a[0].when
    hi = lo
    for i in range(1, n):
        if a[i].when < lo:
            lo = a[i].when
        elif a[i].when > hi:
            hi = a[i].when
    scale = n / (hi - lo) if hi > lo else 0.0
    if not (scale > 0.0 and scale < 1e300):
        _sort_entries(a, n)
        return
    out = <Entry*>malloc(n * sizeof(Entry) + (n + 1) * sizeof(Py_ssize_t) + n * sizeof(uint32_t))
    if out == NULL:
        _sort_entries(a, n)
        return
    counts = <Py_ssize_t*>(out + n)
    bucket = <uint32_t*>(counts + n + 1)
    memset(counts, 0, (n + 1) * sizeof(Py_ssize_t))
    for i in range(n):
        b = <Py_ssize_t>((a[i].when - lo) * scale)
        if b >= n:
            b = n - 1
        bucket[i] = <uint32_t>b
        counts[b + 1] += 1
    for b in range(n):
        counts[b + 1] += counts[b]
    for i in range(n):
        b = bucket[i]
        out[counts[b]] = a[i]
        counts[b] += 1
    # counts[b] is now the end of bucket b (and the start of bucket b + 1).
    start = 0
    for b in range(n):
        size = counts[b] - start
        if size > 1:
            _sort_entries(out + start, size)
        start = counts[b]
    memcpy(a, out, n * sizeof(Entry))
    free(out)


cdef int _grow_batch(TimerWheel w, Py_ssize_t need) except -1:
    cdef Py_ssize_t cap = w._batch_cap if w._batch_cap else 256
    cdef Entry* buf
    while cap < need:
        cap *= 2
    buf = <Entry*>PyMem_Realloc(w._batch, cap * sizeof(Entry))
    if buf == NULL:
        raise MemoryError()
    w._batch = buf
    w._batch_cap = cap
    return 0


cdef Py_ssize_t _gather(TimerWheel w, uint32_t group) except -1:
    """Copy every node of ``group`` into the batch array, walking its sub-lists in lockstep:
    one node from each in turn, which also restores scheduling order across them."""
    cdef Node** ch = w._chunks
    cdef uint32_t base = group << SUB_BITS
    cdef uint32_t at[SUBLISTS]
    cdef uint32_t j, i, live
    cdef Py_ssize_t k = 0
    cdef Node* n
    cdef Entry* e
    for j in range(SUBLISTS):
        at[j] = _N(ch, base + j).next
    live = SUBLISTS
    while live:
        if k + SUBLISTS > w._batch_cap:
            _grow_batch(w, k + SUBLISTS)
        live = 0
        for j in range(SUBLISTS):
            i = at[j]
            if i != base + j:
                n = _N(ch, i)
                at[j] = n.next
                e = &w._batch[k]
                e.when = n.when
                e.seq = n.seq
                e.idx = i
                e.gen = n.gen
                k += 1
                live += 1
    return k


cdef Py_ssize_t _collect(TimerWheel w) except -1:
    """The BATCH group as a batch array, in (deadline, scheduling order)."""
    cdef Py_ssize_t k
    cdef Py_ssize_t count = _gather(w, BATCH)
    for k in range(1, count):
        if _before(&w._batch[k], &w._batch[k - 1]):
            _sort_batch(w._batch, count)
            break
    return count


cdef int _reserve_keys(TimerWheel w, Py_ssize_t more) except -1:
    """Room for ``more`` expired keys, so the firing loop itself can never fail half-way."""
    cdef Py_ssize_t cap = w._keys_cap if w._keys_cap else 256
    cdef int64_t* buf
    while cap < w._nkeys + more:
        cap *= 2
    if cap != w._keys_cap:
        buf = <int64_t*>PyMem_Realloc(w._keys, cap * sizeof(int64_t))
        if buf == NULL:
            raise MemoryError()
        w._keys = buf
        w._keys_cap = cap
    return 0


cdef inline void _unlink_fired(TimerWheel w, Py_ssize_t start, Py_ssize_t stop) noexcept nogil:
    """Unlink the batch entries in [start, stop) that fired (marked gen = NIL) but were left on
    the BATCH list: freed nodes keep their links, and nothing is allocated until Python runs."""
    cdef Node** ch = w._chunks
    cdef Py_ssize_t k
    for k in range(start, stop):
        if w._batch[k].gen == NIL:
            _unlink(ch, _N(ch, w._batch[k].idx))


cdef int _invoke(TimerWheel w, PyObject* p, uint32_t flags) except -1:
    """Run one callback; an Exception goes to the error handler, never into the wheel."""
    cdef object cb = <object>p
    Py_DECREF(cb)       # the node's reference; ``cb`` holds its own until we return
    try:
        if flags & F_ARGS:
            fs_call_packed(cb)
        else:
            cb()
    except Exception as exc:
        func = (<tuple>cb)[0] if flags & F_ARGS else cb
        if w._on_error is None:
            logger.error("timer callback %r raised", func, exc_info=exc)
        else:
            w._on_error(exc, func)
    return 0


cdef Py_ssize_t _fire_due(TimerWheel w, double now) except -1:
    """Fire the DUE list in deadline order; return how many fired.

    Expired keys are not unlinked one by one: until a Python callback is about to run nothing
    can look at the BATCH list, so the fired nodes are freed where they lie and the list is
    emptied in one step at the end (or unlinked just before a callback, which may cancel).
    """
    cdef Node** ch = w._chunks
    cdef Node* n
    cdef Entry* e
    cdef Py_ssize_t k = 0
    cdef Py_ssize_t linked_from = 0     # entries [linked_from, k) may be fired-but-linked
    cdef Py_ssize_t count
    cdef Py_ssize_t fired = 0
    cdef Py_ssize_t counted = 0         # of `fired`, already added to w._fired
    cdef PyObject* p
    cdef uint32_t flags, idx
    _splice_group(ch, DUE, BATCH)
    count = _collect(w)
    _reserve_keys(w, count)
    while k < count:
        e = &w._batch[k]
        if k + 8 < count:
            # Sorted order visits the batch's nodes out of memory order: fetch ahead.
            fs_prefetch(_N(ch, w._batch[k + 8].idx))
        k += 1
        idx = e.idx
        n = _N(ch, idx)
        if n.gen != e.gen:
            continue        # cancelled by an earlier callback of this batch
        if n.when > now:
            # Its tick has come but float rounding put the deadline a hair after `now`.
            _unlink(ch, n)
            _link(ch, DEFER, idx, n)
            continue
        if now - n.when > w._max_late:
            w._max_late = now - n.when
        w._pending -= 1
        fired += 1
        flags = n.flags
        if flags & F_KEY:
            w._keys[w._nkeys] = n.data
            w._nkeys += 1
            _release(w, idx, n)
            e.gen = NIL
        else:
            _unlink_fired(w, linked_from, k - 1)
            _unlink(ch, n)
            linked_from = k
            p = <PyObject*><Py_ssize_t>n.data
            _release(w, idx, n)
            w._fired += fired - counted       # exact counters for the callback to read
            counted = fired
            _invoke(w, p, flags)
            ch = w._chunks      # a callback may have grown the slab
            if not _group_empty(ch, DUE):
                # A callback scheduled something already due: merge it so order still holds.
                _splice_group(ch, DUE, BATCH)
                count = _collect(w)
                _reserve_keys(w, count)
                k = 0
                linked_from = 0
    # Whatever is still on BATCH fired and was freed in place.
    _reset_group(ch, BATCH)
    w._fired += fired - counted
    return fired


cdef Py_ssize_t _advance(TimerWheel w, double now) except -1:
    if isnan(now):
        raise TimerError("advance(): now is NaN")
    if w._running:
        raise RuntimeError("TimerWheel.advance() called from inside a timer callback")
    if now > w._now:
        w._now = now
    now = w._now
    cdef int64_t target = _floor_tick(w, now)
    cdef int64_t ev
    cdef Py_ssize_t fired = 0
    w._running = True
    try:
        while True:
            if not _group_empty(w._chunks, DUE):
                fired += _fire_due(w, now)
                continue
            ev = _next_event(w)
            if ev < 0 or ev > target:
                break
            w._cur = ev
            _cascade(w, w._ev_pos)
        if target > w._cur:
            w._cur = target
    finally:
        w._running = False
        # Whatever a raising error handler left unfired, and the deferred, wait for next time.
        _splice_group(w._chunks, BATCH, DUE)
        _splice_group(w._chunks, DEFER, DUE)
    return fired


cdef int _check_wakeup(TimerWheel w) except -1:
    """After an advance: call the wakeup hook if work is now due before the owner's wakeup.

    Callbacks never call the hook (the driver re-arms after its own advance), but an advance
    made by someone else must not leave an earlier timer waiting behind the armed one.
    """
    cdef int64_t ev
    if w._wakeup_hook is None or not w._pending:
        return 0
    ev = w._cur + 1 if not _group_empty(w._chunks, DUE) else _next_event(w)
    if 0 <= ev < w._wakeup_tick:
        _call_wakeup_hook(w, ev)
    return 0


cdef carray.array _take_keys(TimerWheel w):
    cdef carray.array out = carray.clone(_KEY_ARRAY, w._nkeys, False)
    if w._nkeys:
        memcpy(out.data.as_voidptr, w._keys, w._nkeys * sizeof(int64_t))
    w._nkeys = 0
    return out


cdef double _group_min_when(Node** ch, uint32_t group, double best) noexcept nogil:
    cdef uint32_t head, i
    cdef Node* n
    for head in range(group << SUB_BITS, (group + 1) << SUB_BITS):
        i = _N(ch, head).next
        while i != head:
            n = _N(ch, i)
            if n.when < best:
                best = n.when
            i = n.next
    return best


cdef inline int64_t _schedule(TimerWheel w, double when, int64_t data, uint32_t kind) except -1:
    if isnan(when):
        raise TimerError("timer deadline is NaN")
    cdef int64_t i = _alloc(w)
    cdef Node* n = _N(w._chunks, <uint32_t>i)
    n.when = when
    n.seq = w._seq
    w._seq += 1
    n.data = data
    n.flags = kind | F_PENDING
    cdef int64_t d = _place(w, <uint32_t>i, n)
    w._pending += 1
    w._scheduled += 1
    if d < w._wakeup_tick and not w._running and w._wakeup_hook is not None:
        # The owner sleeps past this timer: let it re-arm.  Only an earlier timer costs a call.
        _call_wakeup_hook(w, d)
    return i


cdef int _call_wakeup_hook(TimerWheel w, int64_t tick) except -1:
    w._wakeup_tick = tick
    try:
        w._wakeup_hook()
    except Exception as exc:
        # Whatever was being scheduled stays scheduled; a broken hook must not half-make it.
        if w._on_error is None:
            logger.error("timer wakeup hook %r raised", w._wakeup_hook, exc_info=exc)
        else:
            w._on_error(exc, w._wakeup_hook)
    return 0


cdef inline void _cancel_node(TimerWheel w, uint32_t i, Node* n) noexcept:
    cdef uint32_t flags = n.flags
    cdef PyObject* p = <PyObject*><Py_ssize_t>n.data
    _unlink(w._chunks, n)       # the slot's bit may go stale: _next_event drops it
    _release(w, i, n)
    w._pending -= 1
    w._cancelled += 1
    if not (flags & F_KEY):
        Py_DECREF(<object>p)    # last: a callback's destructor may run arbitrary code


# ---------------------------------------------------------------------------------------------
# The Python surface

@cython.final
@cython.freelist(1024)
cdef class TimerHandle:
    """A scheduled callback: ``cancel()`` it, read ``when``, ``cancelled`` and ``pending``.

    40 bytes (48 with allocator rounding) on top of the wheel's 40-byte node; the wheel keeps
    the callback, not the handle, so a handle nobody holds costs nothing after scheduling.
    """

    def __init__(self) -> None:
        raise TypeError("TimerHandle is made by TimerWheel.call_later()/call_at()")

    def __dealloc__(self) -> None:
        Py_XDECREF(self._wheel)

    cpdef bint cancel(self) except -1:
        """Unschedule the callback; True if it was still pending (O(1): an unlink)."""
        self._gen |= HANDLE_CANCELLED
        if self._wheel == NULL:
            return False
        cdef TimerWheel w = <TimerWheel>self._wheel
        cdef Node* n = _N(w._chunks, self._idx)
        if n.gen != (self._gen & GEN_MASK) or not (n.flags & F_PENDING):
            return False
        _cancel_node(w, self._idx, n)
        return True

    @property
    def when(self) -> float:
        """The deadline, in wheel seconds, exactly as scheduled."""
        return self._when

    @property
    def cancelled(self) -> bool:
        """True once ``cancel()`` has been called (as asyncio's ``TimerHandle.cancelled()``)."""
        return (self._gen & HANDLE_CANCELLED) != 0

    @property
    def pending(self) -> bool:
        """True until the callback has fired or been cancelled."""
        if self._wheel == NULL:
            return False
        cdef TimerWheel w = <TimerWheel>self._wheel
        cdef Node* n = _N(w._chunks, self._idx)
        return n.gen == (self._gen & GEN_MASK) and (n.flags & F_PENDING) != 0

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else ("pending" if self.pending else "done")
        return f"<TimerHandle when={self._when!r} {state}>"


cdef inline TimerHandle _new_handle(TimerWheel w, double when, int64_t idx):
    cdef TimerHandle h = TimerHandle.__new__(TimerHandle)
    Py_INCREF(w)
    h._wheel = <PyObject*>w
    h._when = when
    h._idx = <uint32_t>idx
    h._gen = _N(w._chunks, <uint32_t>idx).gen
    return h


# Lax timers (call_later_lax): rounded up to a multiple of a power-of-two number of ticks, at
# most LAX_MAX_TICKS and at most 1/LAX_SHARE of the delay.  Aligned powers of two nest, so a
# cascade from level 1 (every 64 ticks) lands lax timers of every grid on the same ticks.
cdef int64_t LAX_MAX_TICKS = 128
cdef int64_t LAX_SHARE = 8


cdef inline double _lax_when(TimerWheel w, double when, double delay) noexcept:
    """``when`` moved later, onto a coarse grid of ticks, so that the timers of many
    transactions share one wakeup; unchanged when ``delay`` is too short to allow slack."""
    cdef double ticks = delay * w._inv_tick
    if not (ticks >= 2 * LAX_SHARE):                   # also NaN: _schedule rejects it
        return when
    cdef int64_t d = _ceil_tick(w, when)
    if d < 0 or d >= MAX_TICK - LAX_MAX_TICKS:  # before the start, or "never": leave it
        return when
    cdef int64_t grid = 1
    cdef int64_t slack = LAX_MAX_TICKS
    if ticks < <double>(LAX_MAX_TICKS * LAX_SHARE):
        slack = <int64_t>ticks // LAX_SHARE
    while grid * 2 <= slack and grid < LAX_MAX_TICKS:
        grid *= 2
    cdef int64_t rounded = ((d + grid - 1) // grid) * grid
    if rounded == d:
        return when
    # The grid tick's own time: every timer moved to this tick gets the same double, so they
    # share its slot (and advance() to exactly this time fires them, as for any timer whose
    # deadline is a whole tick).
    return w._origin + <double>rounded * w._tick


cdef inline TimerHandle _call_at(TimerWheel w, double when, object callback, tuple args):
    """The callback-mode schedule behind call_later, call_later_now and call_at: the packed
    callback's reference is dropped again when scheduling fails."""
    cdef uint32_t kind = 0
    cdef int64_t data = _pack_callback(callback, args, &kind)
    cdef int64_t idx
    try:
        idx = _schedule(w, when, data, kind)
    except BaseException:
        Py_DECREF(<object><PyObject*><Py_ssize_t>data)
        raise
    return _new_handle(w, when, idx)


cdef inline int64_t _pack_callback(object callback, tuple args, uint32_t* kind) except? -1:
    """The owned PyObject* a callback node stores: the callable, or (callable, *args)."""
    cdef object packed
    cdef Py_ssize_t j, nargs = len(args)
    if nargs == 0:
        packed = callback
        kind[0] = 0
    else:
        packed = PyTuple_New(nargs + 1)
        Py_INCREF(callback)
        PyTuple_SET_ITEM(packed, 0, callback)
        for j in range(nargs):
            item = args[j]
            Py_INCREF(item)
            PyTuple_SET_ITEM(packed, j + 1, item)
        kind[0] = F_ARGS
    Py_INCREF(packed)
    return <int64_t><Py_ssize_t><PyObject*>packed


@cython.final
cdef class TimerWheel:
    """A hierarchical timing wheel: O(1) schedule and cancel, never early, at most a tick late.

    ``tick`` is the resolution in seconds; ``start`` the wheel's clock at creation.  The clock
    moves only through ``advance(now)``, which runs every callback whose tick has come, in
    deadline order (ties in scheduling order), and returns how many timers fired.
    """

    def __cinit__(self, double tick=0.001, double start=0.0):
        cdef uint32_t i
        cdef Node* h
        if not (tick > 0.0) or tick != tick or tick == float("inf"):
            raise TimerError(f"tick must be a positive number of seconds, not {tick!r}")
        if isnan(start):
            raise TimerError("start is NaN")
        self._tick = tick
        self._inv_tick = 1.0 / tick
        self._origin = start
        self._now = start
        self._cur = 0
        self._free = NIL
        self._wakeup_tick = MAX_TICK
        while self._nchunks * CHUNK_SIZE < NHEADS:
            _grow_chunks(self)
        # List heads are nodes 0 .. NHEADS-1, each an empty circle.
        for i in range(NHEADS):
            h = _N(self._chunks, i)
            h.prev = i
            h.next = i
            h.gen = 0
            h.flags = 0
        self._fresh = NHEADS

    def __dealloc__(self):
        cdef uint32_t head, i, nxt
        cdef Node* n
        if self._chunks != NULL:
            for head in range(NHEADS):
                i = _N(self._chunks, head).next
                while i != head:
                    n = _N(self._chunks, i)
                    nxt = n.next
                    if (n.flags & F_PENDING) and not (n.flags & F_KEY):
                        Py_XDECREF(<PyObject*><Py_ssize_t>n.data)
                    i = nxt
            for i in range(self._nchunks):
                PyMem_Free(self._chunks[i])
            PyMem_Free(self._chunks)
        PyMem_Free(self._batch)
        PyMem_Free(self._keys)

    # -- callback mode ------------------------------------------------------------------------

    def call_later(self, double delay, callback, *args) -> TimerHandle:
        """Run ``callback(*args)`` ``delay`` seconds after the wheel's current time."""
        return _call_at(self, self._now + delay, callback, args)

    def set_clock(self, clock, double offset=0.0) -> None:
        """Count :meth:`call_later_now` from ``clock() - offset``: the owner's clock (a
        driver's ``loop.time``), read here in C, where the wheel's own clock only moves on
        :meth:`advance`.  None: count from the wheel's clock."""
        self._clock = clock
        self._clock_offset = offset

    cdef void hold_clock(self, double now) noexcept:
        """Until :meth:`release_clock`, the owner's clock reads ``now`` (in its own units,
        before the offset): a shell that read the clock once for a wakeup's datagrams hands
        that reading to every timer they schedule, instead of a call of ``clock()`` per
        timer (about twenty a proxied call).  uvloop's ``loop.time()`` is that already:
        libuv caches it per loop iteration.  A wheel without an owner's clock (set_clock
        None) counts from its own, held or not."""
        self._held = now
        self._holding = True

    cdef void release_clock(self) noexcept:
        self._holding = False

    cdef double _owner_now(self) except? -1.0:
        # The owner's clock (set_clock) as call_later_now counts it.
        if self._clock is None:
            return self._now                # (no owner's clock: nothing is held either)
        if self._holding:
            return self._held - self._clock_offset
        return self._clock() - self._clock_offset

    def held_clock(self, double now, callback, *args):
        """``callback(*args)`` with the owner's clock held at ``now`` (see
        ``hold_clock``, the shell's C call); returns what it returns."""
        self.hold_clock(now)
        try:
            return callback(*args)
        finally:
            self.release_clock()

    def clock_time(self) -> float:
        """The owner's clock as :meth:`call_later_now` counts it (``clock() - offset``; the
        wheel's own time without one): a driver's ``time()``, read without a Python frame."""
        return self._owner_now()

    def call_later_now(self, double delay, callback, *args) -> TimerHandle:
        """``call_later`` counted from the owner's clock (see :meth:`set_clock`) instead of
        the latest advance: what a driver's ``call_later`` is, without a Python frame and an
        attribute walk per timer (a proxied call schedules about eight)."""
        cdef double now = self._owner_now()
        return _call_at(self, now + delay, callback, args)

    cdef TimerHandle later_c(self, double delay, object callback, tuple args):
        """:meth:`call_later_now` for compiled callers: ``args`` as a tuple the caller holds
        (``()`` for most), instead of a Python call that packs ``*args`` anew."""
        return _call_at(self, self._owner_now() + delay, callback, args)

    cdef TimerHandle later_lax_c(self, double delay, object callback, tuple args):
        """:meth:`call_later_lax` for compiled callers."""
        cdef double now = self._owner_now()
        return _call_at(self, _lax_when(self, now + delay, delay), callback, args)

    def call_later_lax(self, double delay, callback, *args) -> TimerHandle:
        """:meth:`call_later_now` for a timer whose exact moment does not matter: one that
        frees lingering state (RFC 3261's Timers D, I, J, K, L, M) or gives up after tens of
        seconds (B, F, H).  Its deadline is rounded *up* onto a grid of ticks -- a power of
        two, at most 128 ticks (0.128 s at 1 ms) and at most an eighth of ``delay`` -- so the
        timers of every call in progress share a few wakeups a second instead of one each (a
        proxy at 150 calls/s otherwise wakes ~240 times a second for them alone).  Never
        early; a delay under 16 ticks is not moved."""
        cdef double now = self._owner_now()
        return _call_at(self, _lax_when(self, now + delay, delay), callback, args)

    def call_at(self, double when, callback, *args) -> TimerHandle:
        """Run ``callback(*args)`` when the wheel's clock reaches ``when`` (seconds)."""
        return _call_at(self, when, callback, args)

    # -- key mode -----------------------------------------------------------------------------

    cdef int64_t schedule_key_c(self, double when, int64_t key) except -1:
        """Schedule ``key`` at ``when``; return its cancel token (C callers)."""
        cdef int64_t idx = _schedule(self, when, key, F_KEY)
        return ((<int64_t>_N(self._chunks, <uint32_t>idx).gen) << 32) | idx

    cdef bint cancel_key_c(self, int64_t token) noexcept:
        """Cancel a key timer by token; 1 if it was pending (C callers)."""
        cdef uint64_t idx = <uint64_t>token & 0xFFFFFFFFu
        if token < 0 or idx < NHEADS or idx >= self._fresh:
            return False
        cdef Node* n = _N(self._chunks, <uint32_t>idx)
        if (n.gen != <uint32_t>(token >> 32)
                or (n.flags & (F_PENDING | F_KEY)) != (F_PENDING | F_KEY)):
            return False
        _cancel_node(self, <uint32_t>idx, n)
        return True

    def schedule_key(self, double delay, int64_t key) -> int:
        """Schedule integer ``key`` to expire ``delay`` seconds from now; return a cancel token.

        Expired keys come back in one array from :meth:`advance_keys` (or go to
        :attr:`key_handler`), so expiring thousands of timers costs no Python call each.
        """
        return self.schedule_key_c(self._now + delay, key)

    def schedule_key_at(self, double when, int64_t key) -> int:
        """Schedule integer ``key`` to expire at wheel time ``when``; return a cancel token."""
        return self.schedule_key_c(when, key)

    def cancel_key(self, int64_t token) -> bool:
        """Cancel a key timer by its token; True if it was pending.  Stale tokens are ignored."""
        return self.cancel_key_c(token)

    def advance_keys(self, double now) -> array.array:
        """``advance(now)``, then return every key expired since the last call, oldest first.

        The result is an ``array.array('q')`` (int64): iterating gives plain ints, and
        ``numpy.frombuffer(keys, numpy.int64)`` views it without a copy.  ``key_handler`` is not
        called for these keys.
        """
        _advance(self, now)
        _check_wakeup(self)
        return _take_keys(self)

    @property
    def key_handler(self):
        """Called by :meth:`advance` as ``key_handler(keys)`` with all keys it expired, if set.

        Without a handler, expired keys wait in a buffer for :meth:`advance_keys`.
        """
        return self._key_handler

    @key_handler.setter
    def key_handler(self, handler) -> None:
        self._key_handler = handler

    # -- the clock ------------------------------------------------------------------------------

    def advance(self, double now) -> int:
        """Move the clock to ``now`` and fire every timer that is due; return how many fired.

        Callbacks run in deadline order (ties in scheduling order), may schedule and cancel any
        timer (one due before ``now`` fires in this same call), and an exception they raise goes
        to :attr:`on_error`.  The clock never goes back: an earlier ``now`` fires what is due.
        """
        cdef Py_ssize_t fired = _advance(self, now)
        _check_wakeup(self)
        if self._nkeys and self._key_handler is not None:
            keys = _take_keys(self)
            try:
                self._key_handler(keys)
            except Exception as exc:
                if self._on_error is None:
                    logger.error("timer key handler %r raised", self._key_handler, exc_info=exc)
                else:
                    self._on_error(exc, self._key_handler)
        return fired

    def time(self) -> float:
        """The wheel's clock: the ``now`` of the latest advance (or ``start``)."""
        return self._now

    @property
    def tick(self) -> float:
        """The resolution, in seconds: a timer fires at most this late."""
        return self._tick

    def next_deadline(self):
        """The earliest pending deadline (as scheduled), or None when nothing is pending.

        Exact, so it scans one slot: drivers should prefer :meth:`next_wakeup`, which is O(1).
        """
        cdef Node** ch = self._chunks
        cdef double inf = float("inf")
        cdef double best = inf
        if self._pending == 0:
            return None
        best = _group_min_when(ch, DUE, best)
        best = _group_min_when(ch, DEFER, best)
        best = _group_min_when(ch, BATCH, best)
        if _next_event(self) >= 0:
            best = _group_min_when(ch, self._ev_pos, best)
        return best

    def next_wakeup(self):
        """When ``advance`` next has work (a timer to fire or a slot to cascade), or None.

        Never later than the earliest deadline's tick, found in O(1) from the occupancy words.
        An event-loop driver sleeps until this time; nothing pending means no wakeup at all.
        """
        cdef Node** ch = self._chunks
        cdef double inf = float("inf")
        cdef double best
        if self._pending == 0:
            return None
        if not (_group_empty(ch, DUE) and _group_empty(ch, DEFER) and _group_empty(ch, BATCH)):
            best = _group_min_when(ch, DUE, inf)
            best = _group_min_when(ch, DEFER, best)
            return _group_min_when(ch, BATCH, best)
        cdef int64_t ev = _next_event(self)
        if ev < 0:
            return None
        return self._origin + ev * self._tick

    @property
    def wakeup_at(self) -> float:
        """When the owner will next call ``advance`` (a driver sets this after arming)."""
        if self._wakeup_tick >= MAX_TICK:
            return float("inf")
        return self._origin + self._wakeup_tick * self._tick

    @wakeup_at.setter
    def wakeup_at(self, double when) -> None:
        # +inf (or NaN) means "not armed": every new timer then calls the hook.
        if isnan(when) or when == float("inf"):
            self._wakeup_tick = MAX_TICK
        else:
            self._wakeup_tick = _ceil_tick(self, when)

    @property
    def wakeup_hook(self):
        """Called with no arguments when a timer is scheduled, outside ``advance``, for a tick
        before :attr:`wakeup_at`: the event-loop driver re-arms its one loop timer here."""
        return self._wakeup_hook

    @wakeup_hook.setter
    def wakeup_hook(self, hook) -> None:
        self._wakeup_hook = hook

    @property
    def on_error(self):
        """``on_error(exc, callback)`` receives what a callback raised; None logs it to
        ``logging.getLogger("fastsip.timers")``."""
        return self._on_error

    @on_error.setter
    def on_error(self, handler) -> None:
        self._on_error = handler

    def clear(self) -> int:
        """Cancel every pending timer (shutdown); return how many there were."""
        cdef uint32_t head, i, nxt
        cdef Node* n
        cdef Py_ssize_t count = 0
        cdef list dropped = []
        for head in range(NHEADS):
            i = _N(self._chunks, head).next
            while i != head:
                n = _N(self._chunks, i)
                nxt = n.next
                if not (n.flags & F_KEY):
                    # Release after the wheel is consistent: destructors may call back into it.
                    dropped.append(<object><PyObject*><Py_ssize_t>n.data)
                    Py_DECREF(<object><PyObject*><Py_ssize_t>n.data)
                _release(self, i, n)
                count += 1
                i = nxt
            _N(self._chunks, head).next = head
            _N(self._chunks, head).prev = head
        for i in range(NLEVELS):
            self._bitmap[i] = 0
        self._pending = 0
        self._cancelled += count
        dropped.clear()
        return count

    # -- counters -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._pending

    @property
    def scheduled(self) -> int:
        """Timers scheduled so far (both modes)."""
        return self._scheduled

    @property
    def fired(self) -> int:
        """Timers that fired: callbacks run plus keys expired."""
        return self._fired

    @property
    def cancelled(self) -> int:
        """Timers cancelled while pending (cancelling a fired one does not count)."""
        return self._cancelled

    @property
    def max_lateness(self) -> float:
        """The worst ``now - when`` seen at firing, in seconds (includes a late ``advance``)."""
        return self._max_late

    def __repr__(self) -> str:
        return (f"<TimerWheel tick={self._tick!r} time={self._now!r} pending={self._pending}"
                f" fired={self._fired} cancelled={self._cancelled}>")


def _bench_key_cycles(TimerWheel wheel, Py_ssize_t n, double delay) -> int:
    """``n`` key-mode schedule+cancel pairs through the C API, as the compiled transaction layer
    makes them: what a timer costs once no Python call is in the way (benchmarks use this)."""
    cdef Py_ssize_t i
    cdef double when = wheel._now + delay
    cdef int64_t ok = 0
    for i in range(n):
        ok += wheel.cancel_key_c(wheel.schedule_key_c(when + i * 1e-6, i))
    return ok
