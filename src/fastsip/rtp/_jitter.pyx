# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""An RTP jitter buffer: packets in by arrival, one frame out per playout slot.

The buffer is a ring of ``capacity`` slots indexed by 64-bit extended sequence number, so
sequence wraparound, reordering and duplicates are plain index arithmetic.  Each ``get`` yields
the frame for the next slot: NORMAL (a packet), MISSING (its packet never came in time: conceal
it) or EMPTY (nothing to play: underrun, or still filling).  pjmedia's jbuf is the model for the
state machine (prefetch, progressive discard); WebRTC NetEq for the delay estimate (a histogram of
each packet's delay relative to the fastest one, forgetting the past geometrically, read at a
percentile).  The same C core runs the per-packet API and the batch ``playout`` simulation.
"""

cimport cython
from libc.math cimport ceil
from libc.stdlib cimport calloc, free

from fastsip.rtp._packet cimport RtpPacket

import enum

from fastsip.rtp._numpy import numpy_module


class FrameKind(enum.IntEnum):
    """What a playout slot holds."""
    NORMAL = 0    #: a received packet
    MISSING = 1   #: the packet for this slot is lost (or late): the caller conceals it
    EMPTY = 2     #: nothing to play: the buffer is filling or ran dry


cdef object _NORMAL = FrameKind.NORMAL
cdef object _MISSING = FrameKind.MISSING
cdef object _EMPTY = FrameKind.EMPTY

DEF K_NORMAL = 0
DEF K_MISSING = 1
DEF K_EMPTY = 2

# slot states
DEF S_FREE = 0
DEF S_PRESENT = 1
DEF S_PLAYED = 2      # played or discarded: a copy arriving now is a duplicate
DEF S_MISSED = 3      # emitted as MISSING: the packet arriving now is late

# put() results
DEF PUT_OK = 0
DEF PUT_DUPLICATE = 1
DEF PUT_LATE = 2
DEF PUT_HELD = 3      # far from the playout point: held until the next packet confirms a jump
DEF PUT_RESYNC = 4    # confirmed jump: the buffer restarted at the new position

PUT_RESULTS = {PUT_OK: "ok", PUT_DUPLICATE: "duplicate", PUT_LATE: "late", PUT_HELD: "held",
               PUT_RESYNC: "resync"}


@cython.freelist(32)
cdef class Frame:
    """One playout slot's content."""

    cdef readonly object kind
    cdef readonly long long extended_sequence_number
    cdef readonly unsigned int timestamp
    cdef readonly object packet

    @property
    def sequence_number(self):
        """The 16-bit RTP sequence number of the slot (None for an EMPTY frame)."""
        if self.kind is _EMPTY:
            return None
        return self.extended_sequence_number & 0xFFFF

    @property
    def payload(self):
        return None if self.packet is None else self.packet.payload

    def __repr__(self):
        return (f"Frame({self.kind.name}, sequence_number={self.sequence_number}, "
                f"timestamp={self.timestamp})")


cdef Frame _EMPTY_FRAME = Frame.__new__(Frame)
_EMPTY_FRAME.kind = _EMPTY
_EMPTY_FRAME.extended_sequence_number = -1


@cython.final
cdef class JitterBuffer:
    """Reorders RTP packets of one source and hands them out one ``ptime`` slot at a time.

    ``ptime`` and all delays are in seconds.  Fixed mode keeps ``delay`` as its target; adaptive
    mode moves the target to the ``percentile`` of observed packet delay (plus one frame), within
    ``[min_delay, max_delay]``.  When more is buffered than the target, one frame is discarded
    every ``shrink_after`` slots, never many at once; overflow drops only the oldest frames.
    """

    cdef readonly double clock_rate, ptime, percentile
    cdef readonly bint adaptive
    cdef readonly int capacity, shrink_after
    cdef readonly int samples_per_frame
    cdef long long _mask
    cdef long long* _slot_ext
    cdef unsigned char* _slot_state
    cdef unsigned int* _slot_ts
    cdef long long* _slot_ref
    cdef double* _slot_arrival
    cdef list _packets
    # sequence state
    cdef bint _have_seq, _emitted, _playing, _draining
    cdef long long _max_ext, _next, _high, _present
    cdef unsigned int _ref_ts
    cdef long long _ref_ext_ts
    cdef long long _last_play_ext
    cdef unsigned int _last_play_ts
    cdef long long _last_slot, _cand_slot
    # far-jump candidate
    cdef bint _cand_valid, _cand_behind
    cdef unsigned int _cand_seq, _cand_ts
    cdef double _cand_arrival
    cdef long long _cand_ref
    cdef object _cand_packet
    # delay estimate
    cdef bint _have_base
    cdef double _base_transit, _drift, _bucket_width, _forget, _weight, _total
    cdef double* _hist
    cdef int _nbuckets, _since_target, _over
    cdef int _target, _min_frames, _max_frames
    # statistics
    cdef readonly unsigned long long received, played, duplicates, late, lost, discarded
    cdef readonly unsigned long long empty, resyncs, overflows
    cdef readonly double last_delay

    def __cinit__(self):
        self._slot_ext = NULL
        self._slot_state = NULL
        self._slot_ts = NULL
        self._slot_ref = NULL
        self._slot_arrival = NULL
        self._hist = NULL

    def __init__(self, double clock_rate, double ptime=0.02, *, bint adaptive=False,
                 double delay=0.06, double min_delay=0.0, double max_delay=0.5,
                 double percentile=0.95, int history=500, int shrink_after=10,
                 int capacity=0):
        if clock_rate <= 0:
            raise ValueError("clock_rate must be positive")
        if not 0 < ptime <= 0.5:
            raise ValueError("ptime is in seconds (e.g. 0.02) and at most 0.5")
        if not 0 < percentile < 1:
            raise ValueError("percentile must be in (0, 1)")
        if max_delay < ptime or delay > max_delay or min_delay > max_delay:
            raise ValueError("need min_delay <= delay <= max_delay and max_delay >= ptime")
        if shrink_after < 1 or history < 2:
            raise ValueError("shrink_after >= 1 and history >= 2")
        self.clock_rate = clock_rate
        self.ptime = ptime
        self.adaptive = adaptive
        self.percentile = percentile
        self.shrink_after = shrink_after
        self.samples_per_frame = <int>(clock_rate * ptime + 0.5)
        self._max_frames = max(1, <int>ceil(max_delay / ptime - 1e-9))
        self._min_frames = max(1, <int>ceil(min_delay / ptime - 1e-9))
        self._target = max(1, <int>ceil(delay / ptime - 1e-9))
        if capacity <= 0:
            capacity = self._max_frames + 4
        cdef int cap = 8
        while cap < capacity:
            cap <<= 1
        self.capacity = cap
        self._mask = cap - 1
        self._slot_ext = <long long*>calloc(cap, sizeof(long long))
        self._slot_state = <unsigned char*>calloc(cap, sizeof(unsigned char))
        self._slot_ts = <unsigned int*>calloc(cap, sizeof(unsigned int))
        self._slot_ref = <long long*>calloc(cap, sizeof(long long))
        self._slot_arrival = <double*>calloc(cap, sizeof(double))
        self._packets = [None] * cap
        # Delay histogram: quarter-frame buckets up to the largest target.
        self._bucket_width = ptime / 4
        self._nbuckets = 4 * self._max_frames + 8
        self._hist = <double*>calloc(self._nbuckets, sizeof(double))
        if (self._slot_ext == NULL or self._slot_state == NULL or self._slot_ts == NULL
                or self._slot_ref == NULL or self._slot_arrival == NULL or self._hist == NULL):
            raise MemoryError()
        if not adaptive:
            self._min_frames = self._max_frames = self._target
        self._forget = 1.0 - 1.0 / history
        self._weight = 1.0
        # Let the "fastest packet" reference creep up by 0.1 % of a frame per packet, so clock
        # drift between sender and receiver does not read as ever-growing delay.
        self._drift = ptime * 0.001

    def __dealloc__(self):
        free(self._slot_ext)
        free(self._slot_state)
        free(self._slot_ts)
        free(self._slot_ref)
        free(self._slot_arrival)
        free(self._hist)

    # --- the C core ---------------------------------------------------------------------------

    cdef inline void _drop_slot(self, long long e, bint count_lost) noexcept nogil:
        """Consume slot ``e`` without playing it (overflow or shrink)."""
        cdef long long s = e & self._mask
        if self._slot_state[s] == S_PRESENT and self._slot_ext[s] == e:
            self._slot_state[s] = S_PLAYED
            self._present -= 1
            self.discarded += 1
        else:
            self._slot_ext[s] = e
            self._slot_state[s] = S_MISSED
            if count_lost:
                self.lost += 1

    cdef void _reset_slots(self) noexcept nogil:
        cdef long long i
        for i in range(self.capacity):
            if self._slot_state[i] == S_PRESENT:
                self.discarded += 1
            self._slot_state[i] = S_FREE
        self._present = 0

    cdef void _observe_delay(self, double arrival, long long ext_ts) noexcept nogil:
        cdef double transit = arrival - ext_ts / self.clock_rate
        cdef double rel
        cdef int b, i
        cdef double acc, goal
        if not self._have_base or transit < self._base_transit + self._drift:
            self._base_transit = transit
            self._have_base = True
        else:
            self._base_transit += self._drift
        rel = (transit - self._base_transit) / self._bucket_width
        # The bucket is chosen in doubles: a timestamp jump (a hostile or broken stream) makes
        # rel far beyond an int, and casting first would index _hist out of bounds.  NaN and
        # anything below 0 go to the first bucket.
        if rel >= self._nbuckets:
            b = self._nbuckets - 1
        elif rel > 0.0:
            b = <int>rel
        else:
            b = 0
        # Geometric forgetting without touching every bucket: grow the weight of new samples.
        self._weight /= self._forget
        self._hist[b] += self._weight
        self._total += self._weight
        if self._weight > 1e150:
            for i in range(self._nbuckets):
                self._hist[i] /= self._weight
            self._total /= self._weight
            self._weight = 1.0
        self._since_target += 1
        if self.adaptive and self._since_target >= 16:
            self._since_target = 0
            goal = self.percentile * self._total
            acc = 0.0
            for i in range(self._nbuckets):
                acc += self._hist[i]
                if acc >= goal:
                    break
            # delay covering the percentile, in frames, plus the frame being played
            b = <int>ceil((i + 1) * self._bucket_width / self.ptime - 1e-9) + 1
            if b < self._min_frames:
                b = self._min_frames
            if b > self._max_frames:
                b = self._max_frames
            self._target = b

    cdef int _put_core(self, unsigned int seq, unsigned int ts, double arrival,
                       long long ref) noexcept nogil:
        cdef long long ext, d, s, cand_ext, e, new_next
        cdef long long ext_ts
        self.received += 1
        if not self._have_seq:
            self._have_seq = True
            self._max_ext = seq
            self._next = seq
            self._high = seq
            self._ref_ts = ts
            self._ref_ext_ts = ts
            self._last_play_ext = seq - 1
            self._last_play_ts = ts - self.samples_per_frame
        # extend to 64 bits: the nearest value to the highest seen (a signed 16-bit step)
        ext = self._max_ext + <short>(<unsigned short>(seq - <unsigned int>self._max_ext))
        d = ext - self._next
        if d >= 2 * self.capacity or d < -self.capacity:
            # Far from the playout point: a sender restart, or a single stray packet.  Two in a
            # row confirm the jump (as RFC 3550 A.1 does); one alone is held back.
            if self._cand_valid and seq == ((self._cand_seq + 1) & 0xFFFF):
                self._reset_slots()
                self.resyncs += 1
                self._cand_valid = False
                cand_ext = ext - 1
                self._max_ext = ext
                self._next = cand_ext
                self._high = cand_ext
                self._emitted = False
                self._playing = False
                self._have_base = False
                self._ref_ts = self._cand_ts
                self._ref_ext_ts = self._cand_ts
                self._last_play_ext = cand_ext - 1
                self._last_play_ts = self._cand_ts - self.samples_per_frame
                self._store(cand_ext, self._cand_ts, self._cand_ts, self._cand_arrival,
                            self._cand_ref)
                self._cand_slot = self._last_slot
                ext_ts = self._ref_ext_ts + <int>(ts - self._ref_ts)
                self._ref_ts = ts
                self._ref_ext_ts = ext_ts
                self._store(ext, ts, ext_ts, arrival, ref)
                return PUT_RESYNC
            self._abandon_candidate()
            self._cand_valid = True
            self._cand_behind = d < 0
            self._cand_seq = seq
            self._cand_ts = ts
            self._cand_arrival = arrival
            self._cand_ref = ref
            return PUT_HELD
        self._abandon_candidate()
        ext_ts = self._ref_ext_ts + <int>(ts - self._ref_ts)
        self._ref_ts = ts
        self._ref_ext_ts = ext_ts
        if ext > self._max_ext:
            self._max_ext = ext
        if d < 0:
            if not self._emitted and self._high - ext < self.capacity:
                # reordered before playout started: just start earlier
                self._next = ext
            else:
                s = ext & self._mask
                if self._slot_ext[s] == ext and self._slot_state[s] == S_PLAYED:
                    self.duplicates += 1
                    return PUT_DUPLICATE
                self.late += 1
                return PUT_LATE
        elif d >= self.capacity:
            # Overflow: make room by consuming only the oldest slots, never the whole buffer.
            self.overflows += 1
            new_next = ext - self.capacity + 1
            e = self._next
            while e < new_next:
                self._drop_slot(e, self._emitted or self._present > 0)
                e += 1
            self._next = new_next
            self._emitted = True
        s = ext & self._mask
        if self._slot_state[s] == S_PRESENT and self._slot_ext[s] == ext:
            self.duplicates += 1
            return PUT_DUPLICATE
        self._store(ext, ts, ext_ts, arrival, ref)
        return PUT_OK

    cdef inline void _abandon_candidate(self) noexcept nogil:
        # A held packet that no other followed was a stray: very late, or noise from ahead.
        if self._cand_valid:
            self._cand_valid = False
            if self._cand_behind:
                self.late += 1
            else:
                self.discarded += 1

    cdef inline void _store(self, long long ext, unsigned int ts, long long ext_ts, double arrival,
                            long long ref) noexcept nogil:
        cdef long long s = ext & self._mask
        self._slot_ext[s] = ext
        self._slot_state[s] = S_PRESENT
        self._slot_ts[s] = ts
        self._slot_ref[s] = ref
        self._slot_arrival[s] = arrival
        self._last_slot = s
        if self._present == 0 or ext > self._high:
            self._high = ext
        self._present += 1
        self._observe_delay(arrival, ext_ts)

    cdef int _get_core(self, double now, long long* ext_out, long long* ref_out,
                       unsigned int* ts_out) noexcept nogil:
        cdef long long e, s, first
        if not self._playing:
            if self._present == 0:
                self.empty += 1
                return K_EMPTY
            first = self._next
            while first < self._high:
                s = first & self._mask
                if self._slot_state[s] == S_PRESENT and self._slot_ext[s] == first:
                    break
                first += 1
            if self._high - first + 1 < self._target and not self._draining:
                self.empty += 1
                return K_EMPTY
            if self._emitted:
                # slots skipped while refilling never arrived
                e = self._next
                while e < first:
                    self._drop_slot(e, True)
                    e += 1
            self._next = first
            self._playing = True
            self._over = 0
        if self._present == 0:
            self._playing = False      # underrun: refill to the target before playing again
            self.empty += 1
            return K_EMPTY
        if self._high - self._next + 1 > self._target + 1 and not self._draining:
            self._over += 1
            if self._over >= self.shrink_after:
                # Too much delay: drop one frame now, and not another for a while.
                self._over = 0
                self._drop_slot(self._next, True)
                self._next += 1
                self._emitted = True
                if self._present == 0:
                    self._playing = False
                    self.empty += 1
                    return K_EMPTY
        else:
            self._over = 0
        e = self._next
        self._next += 1
        self._emitted = True
        s = e & self._mask
        ext_out[0] = e
        if self._slot_state[s] == S_PRESENT and self._slot_ext[s] == e:
            self._slot_state[s] = S_PLAYED
            self._present -= 1
            self.played += 1
            ref_out[0] = self._slot_ref[s]
            ts_out[0] = self._slot_ts[s]
            self._last_play_ext = e
            self._last_play_ts = self._slot_ts[s]
            self.last_delay = now - self._slot_arrival[s]
            return K_NORMAL
        self._slot_ext[s] = e
        self._slot_state[s] = S_MISSED
        self.lost += 1
        ref_out[0] = -1
        ts_out[0] = <unsigned int>(self._last_play_ts
                                   + (e - self._last_play_ext) * self.samples_per_frame)
        return K_MISSING

    # --- per-packet API -----------------------------------------------------------------------

    cpdef int put(self, RtpPacket packet, double arrival_time):
        """Add a packet that arrived at ``arrival_time`` (seconds).  Returns a PUT code:
        0 stored, 1 duplicate, 2 late, 3 held (possible jump), 4 resync (jump confirmed)."""
        cdef int code = self._put_core(packet.sequence_number, packet.timestamp, arrival_time, 0)
        if code == PUT_OK:
            self._packets[self._last_slot] = packet
        elif code == PUT_HELD:
            self._cand_packet = packet
        elif code == PUT_RESYNC:
            self._packets[self._cand_slot] = self._cand_packet
            self._packets[self._last_slot] = packet
            self._cand_packet = None
        return code

    cpdef Frame get(self, double now):
        """The frame for the next playout slot (call once per ``ptime``); ``now`` (seconds, the
        clock of the arrival times) measures how long the played packet waited: ``last_delay``."""
        cdef long long ext = -1, ref = -1
        cdef unsigned int ts = 0
        cdef int kind = self._get_core(now, &ext, &ref, &ts)
        cdef Frame frame
        cdef long long s
        if kind == K_EMPTY:
            return _EMPTY_FRAME
        frame = Frame.__new__(Frame)
        frame.extended_sequence_number = ext
        frame.timestamp = ts
        if kind == K_NORMAL:
            frame.kind = _NORMAL
            s = ext & self._mask
            frame.packet = self._packets[s]
            self._packets[s] = None
        else:
            frame.kind = _MISSING
        return frame

    def flush(self):
        """Frames for everything still buffered, in order, without waiting for the target."""
        frames = []
        self._draining = True
        try:
            while self._present:
                frames.append(self.get(0.0))
        finally:
            self._draining = False
        return frames

    # --- batch --------------------------------------------------------------------------------

    def playout(self, sequence_numbers, timestamps, arrival_times, start_time=None,
                bint drain=True):
        """Simulate playout of a whole stream in C: slots every ``ptime`` from ``start_time``
        (default: the first arrival); packets enter when their arrival time has come.

        Returns ``(kind, extended_sequence_number, index, time)`` NumPy arrays, one row per slot:
        ``index`` is the input row played in that slot (-1 for MISSING/EMPTY).  With ``drain``,
        slots continue after the last arrival until the buffer is empty.
        """
        numpy = numpy_module()
        cdef const unsigned short[:] seq = numpy.ascontiguousarray(sequence_numbers,
                                                                   dtype=numpy.uint16)
        cdef const unsigned int[:] tss = numpy.ascontiguousarray(timestamps, dtype=numpy.uint32)
        cdef const double[:] arr = numpy.ascontiguousarray(arrival_times, dtype=numpy.float64)
        cdef Py_ssize_t n = seq.shape[0], i = 0, k = 0, rows
        if tss.shape[0] != n or arr.shape[0] != n:
            raise ValueError("columns differ in length")
        if n == 0:
            z = numpy.empty(0, numpy.int64)
            return numpy.empty(0, numpy.uint8), z, z.copy(), numpy.empty(0, numpy.float64)
        cdef double start = arr[0] if start_time is None else start_time
        cdef double last = start
        for i in range(n):
            if arr[i] > last:
                last = arr[i]
        rows = <Py_ssize_t>((last - start) / self.ptime) + 2 * self.capacity + 8
        kind_a = numpy.empty(rows, numpy.uint8)
        ext_a = numpy.empty(rows, numpy.int64)
        idx_a = numpy.empty(rows, numpy.int64)
        time_a = numpy.empty(rows, numpy.float64)
        cdef unsigned char[:] kind_v = kind_a
        cdef long long[:] ext_v = ext_a
        cdef long long[:] idx_v = idx_a
        cdef double[:] time_v = time_a
        cdef long long ext, ref
        cdef unsigned int ts
        cdef int kind
        cdef double t
        i = 0
        with nogil:
            while k < rows:
                t = start + k * self.ptime
                while i < n and arr[i] <= t:
                    self._put_core(seq[i], tss[i], arr[i], i)
                    i += 1
                if i >= n:
                    if not drain:
                        break
                    if self._present == 0:
                        break
                    self._draining = True
                ext = -1
                ref = -1
                kind = self._get_core(t, &ext, &ref, &ts)
                kind_v[k] = kind
                ext_v[k] = ext if kind != K_EMPTY else -1
                idx_v[k] = ref
                time_v[k] = t
                k += 1
            self._draining = False
        return kind_a[:k], ext_a[:k], idx_a[:k], time_a[:k]

    # --- state --------------------------------------------------------------------------------

    @property
    def target_delay(self):
        """The delay the buffer aims for, in seconds (whole frames)."""
        return self._target * self.ptime

    @property
    def current_delay(self):
        """What is buffered ahead of the playout point, in seconds (whole frames)."""
        if self._present == 0:
            return 0.0
        return (self._high - self._next + 1) * self.ptime

    @property
    def buffered(self):
        """Packets held right now."""
        return self._present

    @property
    def playing(self):
        """False while filling (at start and after an underrun)."""
        return self._playing

    def stats(self):
        """Counters as a dict (a snapshot)."""
        return {
            "received": self.received, "played": self.played, "duplicates": self.duplicates,
            "late": self.late, "lost": self.lost, "discarded": self.discarded,
            "empty": self.empty, "resyncs": self.resyncs, "overflows": self.overflows,
            "current_delay": self.current_delay, "target_delay": self.target_delay,
            "last_delay": self.last_delay,
        }
