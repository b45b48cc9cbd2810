# cython: language_level=3
"""The source guard's per-message admission, compiled: :class:`fastsip.proxy.edge.SourceGuard`
derives from :class:`GuardState` and documents the policy; ``edge.py`` keeps everything else
(bans, failed logins, the sweep).

It runs for every datagram and every message on a connection, before the message is parsed --
under a flood, for every packet of it -- so the token bucket is C arithmetic, and the state it
reads (the bans, the rate and burst, the trusted networks, the sources) are C fields of the
guard: no Python frame, and no attribute looked up by name, per packet.
"""

from fastsip.transport._address cimport HostMemo, memo_get
from fastsip.transport._base cimport SourceAdmission

import logging

log = logging.getLogger("fastsip.proxy.edge")

#: Hosts whose answer (trusted or not) :meth:`GuardState.admit` keeps at most (then it starts
#: over): a deployment's trusted peers are a handful of gateways and proxies.
cdef enum:
    TRUSTED_KEPT = 1024


cdef class GuardState(SourceAdmission):
    """What :meth:`admit` reads and writes, as C fields; :class:`~fastsip.proxy.edge.SourceGuard`
    (a Python class deriving from this one) sets them and keeps the rest of its state.  As a
    :class:`~fastsip.transport._base.SourceAdmission`, the compiled UDP shell asks it by a
    C call."""

    #: host -> the time its ban ends
    cdef public dict bans
    cdef public double rate
    cdef public double burst
    cdef public object trusted
    cdef public dict _sources
    #: Messages dropped: from a banned source, or over the rate.
    cdef public long long dropped
    #: ``trusted.host_trusted`` remembered, and the ``trusted`` it asks: a trusted peer sends
    #: most of the traffic, and a C dict look-up answers it for a tenth of the Python call.
    cdef HostMemo _trusted_hosts
    cdef object _trusted_for

    def __cinit__(self, *args, **kwargs):
        self.bans = {}
        self._sources = {}

    cpdef bint admit(self, host, double now) except -1:
        """Called for every message (or new connection) from ``host`` before any work is done
        on it: False means drop it silently (banned, or it just went over its rate)."""
        cdef dict bans = self.bans
        if bans:
            until = bans.get(host)
            if until is not None:
                if now < <double>until:
                    self.dropped += 1
                    return False
                del bans[host]
                log.info("ban on %s expired", host)
                self._changed()
        cdef double rate = self.rate
        if not rate:
            return True
        trusted = self.trusted
        if self._trusted_hosts is None or trusted is not self._trusted_for:
            # Set anew (a reload): forget the old answers.
            self._trusted_for = trusted
            self._trusted_hosts = HostMemo(trusted.host_trusted, TRUSTED_KEPT)
        if memo_get(self._trusted_hosts, host):
            return True
        src = self._sources.get(host)
        if src is None:
            src = self._track(host, now)
            if src is None:
                return True         # table full of live sources: fail open, other caps hold
        cdef double burst = self.burst
        cdef double tokens = <double>src.tokens + (now - <double>src.seen) * rate
        if tokens > burst:
            tokens = burst
        src.seen = now
        if tokens < 1.0:
            src.tokens = tokens
            self._ban(host, now, f"over the rate limit ({rate:g}/s, burst {burst:g})")
            self.dropped += 1
            return False
        src.tokens = tokens - 1.0
        return True
