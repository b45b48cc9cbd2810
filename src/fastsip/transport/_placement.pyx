# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Which worker of ``serve --workers N`` holds a call, when calls are *packed*: a table every
worker maps (shared memory the supervisor makes), from a Call-ID's hash to the worker that
took the call, and each worker's recent load beside it.

Why packed.  A worker that gets half the load does not cost half as much: between datagrams
it sleeps, and what ran meanwhile (the other worker, the peers) pushes its code and data out
of the caches, so each datagram costs more.  Measured here, one worker at 75 calls/s paid
1.3-2x the CPU per call of one at 150 (docs/scaling.md).  Spreading every call over every
worker by a hash of its Call-ID therefore makes a lightly loaded ``--workers N`` pay that
price N times.  So a worker keeps the new calls that reach it while it is busy less than
``spread_above`` of a core, and only past that passes them on -- to the busiest worker still
under it (packing, so the others stay idle), else to the least busy.  Under a load one core
carries, a call then costs what it costs with one worker; past it, every core works.

How the others find the call.  The table is written once per new call (an initial request:
no To tag, not ACK or CANCEL) and read for every other message, so a CANCEL, a
retransmission or an ACK that the kernel hands to another worker (another source port, a
worker restarted and SO_REUSEPORT's hash moved) still reaches the owner, as do the callee's
requests and responses.  A message of a call the table does not know (a call older than
the table's memory, a probe of our own) goes where its Call-ID hashes
(:func:`~fastsip.transport.rules.call_id_shard`, the caller's fallback: that rule is how
our own requests choose their Call-IDs).

The table.  ``slots`` 64-bit words in buckets of :data:`BUCKET`: a word is the hash's upper
56 bits and ``owner + 1`` in its low byte, written with a compare-and-swap (two workers
placing two calls in one bucket at once do not overwrite each other), and beside each a
32-bit stamp, the last second (CLOCK_MONOTONIC, one clock for every process of the host) the
call was seen.  A bucket that is full gives up its stalest entry.  At 2**20 slots a host
keeps about a million calls; a long call whose entry was given up in between (a million
calls later, none of its messages seen) has its BYE handled where its Call-ID hashes -- the
proxy routes a BYE by its Route headers, so it still arrives; only a routes module's own
per-call state, held by the owner, would miss it.

The loads.  Each worker publishes its process's CPU over wall time, measured over at least
:data:`LOAD_WINDOW` seconds and averaged over about :data:`LOAD_SMOOTHING` seconds (one noisy
window -- a neighbour on the host, a collection, the log writer's batch -- must not pass the
calls of that moment on: at 50 calls/s a lone 0.1 s reading over half a core did, in CI),
whenever it handles a message (no timer: an idle worker wakes
for nothing).  A worker that has published nothing for a while has had nothing to do, so
others read its load fading after two windows and as idle past :data:`LOAD_STALE` seconds;
a worker that is down takes no hand-off: the caller then claims the call itself
(:meth:`CallPlacement.claim`).
"""

from libc.math cimport exp
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memset
from posix.time cimport CLOCK_MONOTONIC, CLOCK_PROCESS_CPUTIME_ID, clock_gettime, timespec

cdef extern from *:
    """
    #include <stdint.h>
    #define FS_FNV_OFFSET 0xcbf29ce484222325ULL
    #define FS_FNV_PRIME 0x100000001b3ULL
    #if defined(_MSC_VER)
    /* Workers run on Linux alone (SO_REUSEPORT); elsewhere this only has to build. */
    static inline uint64_t fs_load64(uint64_t *p) { return *(volatile uint64_t *)p; }
    static inline int fs_cas64(uint64_t *p, uint64_t expected, uint64_t desired) {
        if (*p != expected) return 0;
        *p = desired;
        return 1;
    }
    #else
    static inline uint64_t fs_load64(uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline int fs_cas64(uint64_t *p, uint64_t expected, uint64_t desired) {
        return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE);
    }
    #endif
    """
    uint64_t fs_load64(uint64_t *p) nogil
    int fs_cas64(uint64_t *p, uint64_t expected, uint64_t desired) nogil
    uint64_t FS_FNV_OFFSET
    uint64_t FS_FNV_PRIME

from cpython.unicode cimport PyUnicode_AsUTF8AndSize

#: Entries per bucket: a new call may take any free (or the stalest) slot of its bucket.
BUCKET = 8
#: Slots in the table every worker maps: about a million calls remembered.
DEFAULT_SLOTS = 1 << 20
#: Seconds of CPU and wall time a load is measured over, at least.
LOAD_WINDOW = 0.1
#: A load measured longer ago than this reads as idle.
LOAD_STALE = 1.0
#: The time constant, in seconds, of the moving average a worker's load is: a sustained
#: load shows after about this long (0.9 s for 0.6 of a core against 0.5), one window's
#: burst moves it by a fifth.
LOAD_SMOOTHING = 0.5

cdef Py_ssize_t _BUCKET = BUCKET
cdef double _LOAD_WINDOW = LOAD_WINDOW
cdef double _LOAD_STALE = LOAD_STALE
cdef double _LOAD_SMOOTHING = LOAD_SMOOTHING
cdef uint64_t _MAGIC = 0x6673697063616c6c      # "fsipcall"
# The header: magic, workers, slots (uint64 each), then per worker a load and its time
# (double each): the table's words follow, then their stamps.
cdef Py_ssize_t _HEADER = 64
cdef Py_ssize_t _LOAD_ENTRY = 16


def table_bytes(int count, Py_ssize_t slots=DEFAULT_SLOTS) -> int:
    """The size of the shared memory a table for ``count`` workers and ``slots`` calls takes."""
    if not 1 <= count <= 255 or slots < _BUCKET or slots % _BUCKET:     # (owner + 1: a byte)
        raise ValueError(f"a table for {count} workers and {slots} slots")
    return _HEADER + count * _LOAD_ENTRY + slots * 8 + slots * 4


def format_table(buffer, int count, Py_ssize_t slots=DEFAULT_SLOTS) -> None:
    """Make ``buffer`` (writable, :func:`table_bytes` long at least) an empty table: the
    supervisor does this once, before the workers map it."""
    cdef unsigned char[::1] view = buffer
    cdef Py_ssize_t size = table_bytes(count, slots)
    if view.shape[0] < size:
        raise ValueError(f"{view.shape[0]} bytes for a table of {size}")
    memset(&view[0], 0, size)
    cdef uint64_t *header = <uint64_t *>&view[0]
    header[1] = <uint64_t>count
    header[2] = <uint64_t>slots
    header[0] = _MAGIC


cdef inline double _clock(int which) noexcept nogil:
    cdef timespec ts
    clock_gettime(which, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline uint64_t _fnv1a(const char *data, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = FS_FNV_OFFSET   # 64-bit FNV-1a
    cdef Py_ssize_t i
    for i in range(n):
        h ^= <uint8_t>data[i]
        h *= FS_FNV_PRIME
    return h


cdef uint64_t _key(str call_id) except? 0:
    """The Call-ID's hash with the low byte cleared (the owner goes there); never 0."""
    cdef Py_ssize_t n
    cdef const char *data
    cdef bytes raw
    cdef uint64_t h
    try:
        data = PyUnicode_AsUTF8AndSize(call_id, &n)
        h = _fnv1a(data, n)
    except UnicodeEncodeError:      # a lone surrogate (undecodable bytes as received)
        raw = call_id.encode("utf-8", "surrogateescape")
        h = _fnv1a(raw, len(raw))
    h &= ~(<uint64_t>0xFF)
    return h if h else <uint64_t>0x100


cdef class CallPlacement:
    """Worker ``index`` of ``count``'s view of the shared table in ``buffer`` (see the module
    docstring).  ``spread_above``: the load (a fraction of one core) past which the new calls
    this worker receives go to another worker."""

    cdef object _view               # keeps the mapping alive while the pointers are used
    cdef uint64_t *_words
    cdef uint32_t *_stamps
    cdef double *_loads
    cdef Py_ssize_t _buckets
    cdef readonly int index
    cdef readonly int count
    cdef readonly double spread_above
    #: This worker's load as last measured (a fraction of one core).
    cdef readonly double load
    cdef double _since_wall, _since_cpu
    #: New calls this worker kept, and passed to another.
    cdef readonly Py_ssize_t kept
    cdef readonly Py_ssize_t passed
    #: Whether the last :meth:`owner` placed a new call (rather than finding one).
    cdef readonly bint fresh

    def __init__(self, buffer, int index, int count, double spread_above=0.5,
                 Py_ssize_t slots=DEFAULT_SLOTS):
        cdef unsigned char[::1] view = buffer
        if not 0 <= index < count:
            raise ValueError(f"worker {index} of {count}")
        if view.shape[0] < table_bytes(count, slots):
            raise ValueError(f"{view.shape[0]} bytes: too small for the table")
        cdef uint64_t *header = <uint64_t *>&view[0]
        if header[0] != _MAGIC or header[1] != <uint64_t>count or header[2] != <uint64_t>slots:
            raise ValueError("not a call table for this many workers (format_table)")
        self._view = view
        self._loads = <double *>&view[_HEADER]
        self._words = <uint64_t *>&view[_HEADER + count * _LOAD_ENTRY]
        self._stamps = <uint32_t *>&view[_HEADER + count * _LOAD_ENTRY + slots * 8]
        self._buckets = slots // _BUCKET
        self.index = index
        self.count = count
        self.spread_above = spread_above
        self.load = 0.0
        self._since_wall = _clock(CLOCK_MONOTONIC)
        self._since_cpu = _clock(CLOCK_PROCESS_CPUTIME_ID)
        self.kept = self.passed = 0
        self.fresh = False

    # -- loads -----------------------------------------------------------------------------

    cdef inline void _measure(self, double now) noexcept:
        cdef double span = now - self._since_wall
        cdef double cpu
        if span < _LOAD_WINDOW:
            return
        cpu = _clock(CLOCK_PROCESS_CPUTIME_ID)
        # An exponential moving average, weighted by the span measured (a long quiet span
        # replaces the old reading almost entirely).
        self.load += (1.0 - exp(-span / _LOAD_SMOOTHING)) * ((cpu - self._since_cpu) / span
                                                             - self.load)
        self._since_wall = now
        self._since_cpu = cpu
        self._loads[2 * self.index] = self.load
        self._loads[2 * self.index + 1] = now

    def measure(self) -> None:
        """Measure and publish this worker's load, if :data:`LOAD_WINDOW` has passed (the
        hand-off reader calls it: a worker fed by hand-offs alone must be seen busy too)."""
        self._measure(_clock(CLOCK_MONOTONIC))

    def loads(self) -> list:
        """Every worker's load as this one sees it (idle when stale)."""
        cdef double now = _clock(CLOCK_MONOTONIC)
        return [self._load_of(i, now) for i in range(self.count)]

    cdef inline double _load_of(self, int worker, double now) noexcept:
        """Worker ``worker``'s load as published, fading once it is older than two windows:
        a worker measures when it handles a message, so one that has published nothing
        for that long has had nothing to do since (a burst's high reading must not keep
        calls away from it for the next second).  Idle past :data:`LOAD_STALE`."""
        cdef double at = self._loads[2 * worker + 1]
        cdef double age = now - at
        if at <= 0.0 or age > _LOAD_STALE:
            return 0.0
        if age > 2.0 * _LOAD_WINDOW:
            return self._loads[2 * worker] * (2.0 * _LOAD_WINDOW) / age
        return self._loads[2 * worker]

    cdef int _choose(self, double now) noexcept:
        """Where a new call goes while this worker is busy: the busiest worker under
        ``spread_above``, else the least busy -- this one when no other is less busy."""
        cdef int fit = -1, least = self.index, worker
        cdef double fit_load = -1.0, least_load = self.load, load
        for worker in range(self.count):
            if worker == self.index:
                continue
            load = self._load_of(worker, now)
            if load < self.spread_above and load > fit_load:
                fit, fit_load = worker, load
            if load < least_load:
                least, least_load = worker, load
        return fit if fit >= 0 else least

    # -- the table -------------------------------------------------------------------------

    cdef int _find(self, uint64_t key, uint32_t second) noexcept:
        cdef Py_ssize_t first = <Py_ssize_t>((key >> 8) % <uint64_t>self._buckets) * _BUCKET
        cdef Py_ssize_t slot
        cdef uint64_t word
        for slot in range(first, first + _BUCKET):
            word = fs_load64(&self._words[slot])
            if word & ~(<uint64_t>0xFF) == key:
                if self._stamps[slot] != second:
                    self._stamps[slot] = second
                return <int>(word & 0xFF) - 1
        return -1

    cdef void _store(self, uint64_t key, int owner, uint32_t second) noexcept:
        """Record ``owner`` for ``key``: over its entry if there is one, else in a free or
        the stalest slot of its bucket (a compare-and-swap: another worker writing the same
        bucket meanwhile makes us look again)."""
        cdef Py_ssize_t first = <Py_ssize_t>((key >> 8) % <uint64_t>self._buckets) * _BUCKET
        cdef Py_ssize_t slot, victim, free, stalest
        cdef uint64_t word, old, stalest_word = 0
        cdef uint64_t new = key | <uint64_t>(owner + 1)
        cdef uint32_t age, oldest
        cdef int _attempt
        for _attempt in range(4):
            victim = free = stalest = -1
            old = 0
            oldest = 0
            for slot in range(first, first + _BUCKET):
                word = fs_load64(&self._words[slot])
                if word & ~(<uint64_t>0xFF) == key:
                    victim, old = slot, word
                    break
                if word == 0:
                    if free < 0:
                        free = slot
                    continue
                age = second - self._stamps[slot]     # (modulo 2**32: a wrap is harmless)
                if stalest < 0 or age > oldest:
                    stalest, stalest_word, oldest = slot, word, age
            if victim < 0:
                if free >= 0:
                    victim, old = free, 0
                else:
                    victim, old = stalest, stalest_word
            if fs_cas64(&self._words[victim], old, new):
                self._stamps[victim] = second
                return

    def owner(self, str call_id, bint initial) -> int:
        """The worker that holds the call of ``call_id``: as the table says; for a new call
        (``initial``: a request with no To tag, not ACK or CANCEL) not in it, this worker,
        or another when this one is busy (recorded either way); -1 for any other message
        the table does not know (the caller falls back to the Call-ID's hash)."""
        cdef double now = _clock(CLOCK_MONOTONIC)
        cdef uint32_t second = <uint32_t>now
        cdef uint64_t key = _key(call_id)
        cdef int owner
        self._measure(now)
        self.fresh = False
        owner = self._find(key, second)
        if owner >= 0 and owner < self.count:
            return owner
        if not initial:
            return -1
        if self.load < self.spread_above:
            owner = self.index
        else:
            owner = self._choose(now)
        if owner == self.index:
            self.kept += 1
        else:
            self.passed += 1
        self._store(key, owner, second)
        self.fresh = True
        return owner

    def claim(self, str call_id) -> None:
        """Record this worker as the call's (its owner could not take it: down, or its
        queue full)."""
        cdef double now = _clock(CLOCK_MONOTONIC)
        self._store(_key(call_id), self.index, <uint32_t>now)
