# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""The media send path in C: every granted G.711 frame of every stream, built and sent with no
Python object per packet.

A :class:`SendState` is one stream's sending state -- SSRC, payload type, sequence number,
first timestamp, marker, the frame grid (epoch, ptime, next frame) and the pre-encoded source --
kept in C fields.  :class:`~fastsip.rtp.session.MediaSession` owns one and reads and writes it
as its own state (its Python path numbers packets from the same fields), so there is nothing to
hand back when it switches between paths: the session stays the authority on what is sent.

The session decides what may go out: while its frames are plain audio from its source (no
RFC 4733 event, no echo, sending, an IP destination) it *grants* them -- every frame below
``grant`` (the next event's first frame, or no end) -- and says when it next needs a tick of
its own (``wake``: an ungranted frame, a playout slot, an RTCP report); any change of what the
grant rests on (hold, a new destination, DTMF queued, echo) takes it back.  Once per tick the
shell calls :meth:`Sender.due` (the streams whose session needs its tick, which may take
frames back for its Python path) and then :meth:`Sender.flush` with the loop's ``now``: that
puts every due granted frame of every stream on the frame grid the session uses (frame k due
at ``epoch + k * ptime``; a loop later than ``max_burst`` frames skips the oldest, as the
session does), builds them into buffers allocated once and sends them from the stream's socket
(``sendmmsg`` on Linux when a stream has several, else ``sendto``).  Counters go to the state
as deltas the session folds into its statistics when it reads them.  This module reads no
clock; the fds belong to the shell.
"""

cimport cython
from libc.math cimport floor
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from fastsip.rtp._net cimport sockaddr_from_ip, sockaddr_storage

import ipaddress

cdef extern from *:
    """
    #if defined(_WIN32)
    #include <winsock2.h>
    #include <ws2tcpip.h>
    #ifdef _MSC_VER
    #pragma comment(lib, "Ws2_32.lib")
    #endif
    #else
    #include <errno.h>
    #include <string.h>
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <netinet/in.h>
    #endif

    #define FSS_MAX_BATCH 64

    static int fss_sendto(int fd, const unsigned char *data, unsigned int len,
                          const void *to, unsigned int tolen) {
    #if defined(_WIN32)
        return sendto((SOCKET)fd, (const char *)data, (int)len, 0,
                      (const struct sockaddr *)to, (int)tolen) == SOCKET_ERROR ? -1 : 0;
    #else
        return sendto(fd, data, len, 0, (const struct sockaddr *)to, (socklen_t)tolen) < 0
            ? -1 : 0;
    #endif
    }

    /* Send n (<= FSS_MAX_BATCH) datagrams, the i-th at buf + i * stride, lens[i] long, all to
     * one address from fd.  Returns how many failed.  Linux moves several in one system call
     * (sendmmsg); one datagram, and every datagram elsewhere, goes by sendto. */
    static unsigned int fss_send(int fd, const void *to, unsigned int tolen,
                                 const unsigned char *buf, unsigned int stride,
                                 const unsigned int *lens, unsigned int n) {
        unsigned int off = 0, failed = 0;
        int tries = 0, kind;
    #if defined(__linux__)
        if (n > 1) {
            struct mmsghdr msgs[FSS_MAX_BATCH];
            struct iovec iov[FSS_MAX_BATCH];
            unsigned int i;
            memset(msgs, 0, sizeof(struct mmsghdr) * n);
            for (i = 0; i < n; i++) {
                iov[i].iov_base = (void *)(buf + (size_t)i * stride);
                iov[i].iov_len = lens[i];
                msgs[i].msg_hdr.msg_name = (void *)to;
                msgs[i].msg_hdr.msg_namelen = (socklen_t)tolen;
                msgs[i].msg_hdr.msg_iov = &iov[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            while (off < n) {
                int r = sendmmsg(fd, msgs + off, n - off, MSG_DONTWAIT);
                if (r > 0) { off += (unsigned int)r; continue; }
                kind = fs_last_error();
                if (kind == FS_ERR_INTR && tries++ < 3) continue;
                if (kind == FS_ERR_AGAIN) return failed + (n - off);
                failed++;
                off++;
            }
            return failed;
        }
    #endif
        while (off < n) {
            if (fss_sendto(fd, buf + (size_t)off * stride, lens[off], to, tolen) == 0) {
                off++;
                continue;
            }
            kind = fs_last_error();
            if (kind == FS_ERR_INTR && tries++ < 3) continue;
            if (kind == FS_ERR_AGAIN) return failed + (n - off);
            failed++;
            off++;
        }
        return failed;
    }
    """
    int FSS_MAX_BATCH
    unsigned int fss_send(int fd, const void *to, unsigned int tolen,
                          const unsigned char *buf, unsigned int stride,
                          const unsigned int *lens, unsigned int n) noexcept nogil


cdef enum:
    HEADER = 12
    # A slot holds one datagram: the header and up to 200 ms of 8 kHz G.711 (ptime's limit).
    SLOT = 2048
    MAX_BATCH = 64      # the C block's FSS_MAX_BATCH, as a size Cython can declare with

#: the longest payload (octets) the Sender builds: a session sends longer frames itself
max_payload = SLOT - HEADER


@cython.final
cdef class SendState:
    """One stream's sending state, in C fields the session and :class:`Sender` share.

    ``grant``: the Sender may send frames ``next_frame .. grant - 1`` (the session sets it
    when all of them are plain audio); ``packets``/``octets``/``audio_packets`` count what the
    Sender sent since the session last took them (it zeroes them), ``max_lateness`` likewise
    the worst ``now - due`` among them."""

    cdef public unsigned int ssrc
    cdef public int payload_type
    cdef public unsigned int sequence
    cdef public unsigned int ts0
    cdef public int samples_per_frame
    cdef public double epoch
    cdef public double ptime
    cdef public long long next_frame
    cdef public long long grant
    cdef public int max_burst
    cdef public double wake
    cdef public bint marker
    cdef public long long source_frame0
    cdef public bint loop
    cdef public unsigned long long packets
    cdef public unsigned long long octets
    cdef public unsigned long long audio_packets
    cdef public unsigned long long skipped_frames
    cdef public double max_lateness
    cdef readonly bint attached        # to a Sender (which then has its fd)
    cdef readonly bint has_remote
    cdef bytes _source
    cdef const unsigned char *_src
    cdef long long _src_len
    cdef int _fd
    cdef object _owner
    cdef sockaddr_storage _remote
    cdef unsigned int _remote_len

    def __init__(self, ssrc=0, int payload_type=0, int samples_per_frame=160,
                 double ptime=0.02):
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.samples_per_frame = samples_per_frame
        self.ptime = ptime
        self.max_burst = 5
        self.source = b""
        self._fd = -1

    @property
    def source(self):
        """The encoded source: one octet per sample, a whole number of frames."""
        return self._source

    @source.setter
    def source(self, bytes value not None):
        self._source = value
        self._src = <const unsigned char *>value
        self._src_len = len(value)

    def set_remote(self, host, int port):
        """Where granted frames go: an IP literal (no DNS) and port.  False (and no remote) for
        anything else -- the session's Python path then sends, as it can resolve names."""
        cdef sockaddr_storage addr
        self.has_remote = False
        if not 0 < port < 65536:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except (ValueError, TypeError):
            return False
        if ip.version == 6 and ip.scope_id is not None and not ip.scope_id.isdigit():
            return False                     # a named zone: the Python path resolves it
        self._remote_len = sockaddr_from_ip(&addr, ip, port)
        self._remote = addr
        self.has_remote = True
        return True


@cython.final
cdef class Sender:
    """The granted frames of every attached stream, sent by one :meth:`flush` per tick."""

    cdef list _states
    cdef unsigned char *_buf
    cdef unsigned int _lens[MAX_BATCH]
    cdef public unsigned long long sent
    cdef public unsigned long long errors

    def __cinit__(self):
        self._states = []
        self._buf = <unsigned char *>malloc(MAX_BATCH * SLOT)
        if self._buf == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self._buf)

    def attach(self, SendState state not None, int fd, owner=None):
        """Send ``state``'s granted frames from ``fd`` (the shell's socket, non-blocking);
        :meth:`due` names it by ``owner``."""
        if state.attached:
            raise ValueError("the state is attached to a Sender already")
        state._fd = fd
        state._owner = owner
        state.attached = True
        self._states.append(state)

    def detach(self, SendState state not None):
        """Stop sending for ``state`` (before its socket closes); a grant not flushed is
        withdrawn, so the session's Python path sends those frames."""
        if not state.attached:
            return
        self._states.remove(state)
        state.attached = False
        state._fd = -1
        state._owner = None
        state.grant = state.next_frame

    def __len__(self):
        return len(self._states)

    def due(self, double now):
        """The owners of the streams whose session needs a tick at ``now`` (``wake <= now``),
        in the order they were attached."""
        cdef SendState st
        return [st._owner for st in self._states if st.wake <= now]

    def flush(self, double now):
        """Build and send every stream's granted frames; returns how many datagrams were built
        (those the kernel refused count in :attr:`errors` too: RTP is lossy, and the session
        counts a packet as sent once built, as its Python path does)."""
        cdef SendState st
        cdef Py_ssize_t total = 0
        for st in self._states:
            if st.grant > st.next_frame and st.epoch <= now:
                total += self._flush_one(st, now)
        self.sent += total
        return total

    cdef Py_ssize_t _flush_one(self, SendState st, double now) noexcept:
        cdef long long k, offset, due, first
        cdef long long spf = st.samples_per_frame
        cdef unsigned int n = 0, total = 0, ts
        cdef unsigned char *p
        cdef double late
        # MediaSession.tick's arithmetic, to the float: frame k is due at epoch + k * ptime
        due = <long long>floor((now - st.epoch) / st.ptime + 1e-6) + 1
        if due > st.grant:
            due = st.grant
        first = st.next_frame
        if due <= first:
            return 0
        if due - first > st.max_burst > 0:
            st.skipped_frames += <unsigned long long>(due - st.max_burst - first)
            first = due - st.max_burst
            st.marker = True
        for k in range(first, due):
            # Frame k's payload, exactly as MediaSession._frame chooses it.
            if st._src_len == 0:
                continue
            offset = (k - st.source_frame0) * spf
            if offset < 0:
                continue
            if offset >= st._src_len:
                if not st.loop:
                    continue
                offset %= st._src_len
            if offset + spf > st._src_len or spf > SLOT - HEADER:
                continue                     # never: whole frames, and the session checks
            p = self._buf + n * SLOT
            ts = <unsigned int>(st.ts0 + <unsigned long long>k * <unsigned long long>spf)
            p[0] = 0x80
            p[1] = (st.payload_type & 0x7F) | (0x80 if st.marker else 0)
            p[2] = (st.sequence >> 8) & 0xFF
            p[3] = st.sequence & 0xFF
            p[4] = (ts >> 24) & 0xFF
            p[5] = (ts >> 16) & 0xFF
            p[6] = (ts >> 8) & 0xFF
            p[7] = ts & 0xFF
            p[8] = (st.ssrc >> 24) & 0xFF
            p[9] = (st.ssrc >> 16) & 0xFF
            p[10] = (st.ssrc >> 8) & 0xFF
            p[11] = st.ssrc & 0xFF
            memcpy(p + HEADER, st._src + offset, <size_t>spf)
            self._lens[n] = <unsigned int>(HEADER + spf)
            n += 1
            st.marker = False
            st.sequence = (st.sequence + 1) & 0xFFFF
            st.packets += 1
            st.octets += <unsigned long long>spf
            st.audio_packets += 1
            late = now - (st.epoch + k * st.ptime)
            if late > st.max_lateness:
                st.max_lateness = late
            if n == MAX_BATCH:
                self._send(st, n)
                total += n
                n = 0
        if n:
            self._send(st, n)
            total += n
        st.next_frame = due
        return total

    cdef void _send(self, SendState st, unsigned int n) noexcept:
        if not st.has_remote or st._fd < 0:
            self.errors += n
            return
        self.errors += fss_send(st._fd, &st._remote, st._remote_len, self._buf, SLOT,
                                self._lens, n)
