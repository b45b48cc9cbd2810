# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""The media relay's packet path: RTP/RTCP datagrams move socket to socket in C.

The shell (fastsip.asyncio) owns the sockets and the loop; it registers each leg's fd here.  On
Linux the Relay keeps every leg's fd in an epoll set of its own: the loop watches that one
descriptor (:meth:`Relay.fileno`) and calls :meth:`Relay.poll`, which drains every ready leg in
C -- one Python call per wake-up, however many streams are busy.  Elsewhere the shell watches
each fd and calls :meth:`Relay.drain` for it.  A drain reads datagrams in batches into
buffers allocated once per Relay, latches the source address (rtpengine-style), updates the
leg's counters and RFC 3550 receive statistics in C, and sends the batch from the bridged
leg's fd to that leg's remote end.  No Python object is made per packet.

This module does no signalling: which legs exist, their SDP addresses and bridges come from
the ng control layer through the shell.
"""

from libc.errno cimport errno
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp, memcpy, memset

from fastsip.rtp._stats cimport RtpStats

import ipaddress
import os

cdef extern from *:
    """
    /* Batched datagram I/O with one shape on every platform.
     *
     * Linux has recvmmsg/sendmmsg: one system call moves a whole batch, which is most of the
     * relay's speed (the per-packet cost is dominated by syscalls, not by our C).  Elsewhere
     * the same calls are emulated per datagram, still in C, selected at compile time because
     * the symbols do not exist there (a run-time check could not even link):
     *   - other POSIX systems: recvmsg/sendmsg, which report truncation in msg_flags like
     *     recvmmsg does (recvfrom(MSG_TRUNC) returning the real length is Linux-only);
     *   - Windows: recvfrom/sendto (no recvmsg without WSAIoctl); WSAEMSGSIZE is truncation.
     * The fs_ names keep the C library's own types out of the Cython declarations.
     */
    #if defined(_WIN32)
    #include <winsock2.h>
    #include <ws2tcpip.h>
    #ifdef _MSC_VER
    #pragma comment(lib, "Ws2_32.lib")
    #endif
    typedef int fs_socklen_t;
    typedef struct { void *iov_base; size_t iov_len; } fs_iovec;
    typedef struct {
        void *msg_name; fs_socklen_t msg_namelen; fs_iovec *msg_iov; size_t msg_iovlen;
        void *msg_control; size_t msg_controllen; int msg_flags;
    } fs_msghdr;
    typedef struct { fs_msghdr msg_hdr; unsigned int msg_len; } fs_mmsg;
    #define FS_TRUNC 0x20
    #define FS_BATCHED 0
    #else
    #include <errno.h>
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <netinet/in.h>
    #include <arpa/inet.h>
    typedef socklen_t fs_socklen_t;
    typedef struct iovec fs_iovec;
    typedef struct msghdr fs_msghdr;
    #if defined(__linux__)
    typedef struct mmsghdr fs_mmsg;
    #define FS_BATCHED 1
    #else
    typedef struct { fs_msghdr msg_hdr; unsigned int msg_len; } fs_mmsg;
    #define FS_BATCHED 0
    #endif
    #define FS_TRUNC MSG_TRUNC
    #endif

    /* What a failed call means to the relay. */
    #define FS_ERR_AGAIN 1   /* nothing (more) to read, or no room to send: stop this batch */
    #define FS_ERR_INTR 2    /* a signal: try again */
    #define FS_ERR_OTHER 3

    static int fs_last_error(void) {
    #if defined(_WIN32)
        int e = WSAGetLastError();
        if (e == WSAEWOULDBLOCK || e == WSAENOBUFS) return FS_ERR_AGAIN;
        if (e == WSAEINTR) return FS_ERR_INTR;
    #else
        int e = errno;
        if (e == EAGAIN || e == EWOULDBLOCK || e == ENOBUFS) return FS_ERR_AGAIN;
        if (e == EINTR) return FS_ERR_INTR;
    #endif
        return FS_ERR_OTHER;
    }

    /* Read up to n datagrams without blocking.  Returns how many (msg_len and msg_hdr.msg_flags
     * set for each), or -1 when the first read failed (see fs_last_error). */
    static int fs_recv_batch(int fd, fs_mmsg *v, unsigned int n) {
    #if defined(__linux__)
        return recvmmsg(fd, v, n, MSG_DONTWAIT, NULL);
    #elif defined(_WIN32)
        unsigned int i;
        for (i = 0; i < n; i++) {
            int namelen = v[i].msg_hdr.msg_namelen;
            int r = recvfrom((SOCKET)fd, (char *)v[i].msg_hdr.msg_iov[0].iov_base,
                             (int)v[i].msg_hdr.msg_iov[0].iov_len, 0,
                             (struct sockaddr *)v[i].msg_hdr.msg_name, &namelen);
            v[i].msg_hdr.msg_flags = 0;
            v[i].msg_hdr.msg_namelen = namelen;
            if (r == SOCKET_ERROR) {
                int e = WSAGetLastError();
                /* Too long, or the ICMP of an earlier send reported here (WSAECONNRESET on
                 * UDP): the slot is consumed and dropped as an error. */
                if (e == WSAEMSGSIZE || e == WSAECONNRESET) {
                    v[i].msg_hdr.msg_flags = FS_TRUNC;
                    v[i].msg_len = 0;
                    continue;
                }
                return i > 0 ? (int)i : -1;
            }
            v[i].msg_len = (unsigned int)r;
        }
        return (int)n;
    #else
        unsigned int i;
        for (i = 0; i < n; i++) {
            ssize_t r = recvmsg(fd, &v[i].msg_hdr, MSG_DONTWAIT);
            if (r < 0) return i > 0 ? (int)i : -1;
            v[i].msg_len = (unsigned int)r;
        }
        return (int)n;
    #endif
    }

    /* Send up to n datagrams without blocking.  Returns how many went (a prefix), or -1 when
     * the first send failed (see fs_last_error). */
    static int fs_send_batch(int fd, fs_mmsg *v, unsigned int n) {
    #if defined(__linux__)
        return sendmmsg(fd, v, n, MSG_DONTWAIT);
    #elif defined(_WIN32)
        unsigned int i;
        for (i = 0; i < n; i++) {
            int r = sendto((SOCKET)fd, (const char *)v[i].msg_hdr.msg_iov[0].iov_base,
                           (int)v[i].msg_hdr.msg_iov[0].iov_len, 0,
                           (const struct sockaddr *)v[i].msg_hdr.msg_name,
                           v[i].msg_hdr.msg_namelen);
            if (r == SOCKET_ERROR) return i > 0 ? (int)i : -1;
        }
        return (int)n;
    #else
        unsigned int i;
        for (i = 0; i < n; i++) {
            if (sendmsg(fd, &v[i].msg_hdr, MSG_DONTWAIT) < 0) return i > 0 ? (int)i : -1;
        }
        return (int)n;
    #endif
    }

    /* A poll set of the relay's own: every leg's fd in one epoll instance (Linux), so the
     * loop watches one descriptor and one call from Python drains every ready leg -- the
     * loop's cost per wake-up is paid once for all streams, not once per socket.  Elsewhere
     * there is none (fs_pollset_new returns -1) and the shell watches each fd itself. */
    #if defined(__linux__)
    #include <sys/epoll.h>
    #include <unistd.h>
    #define FS_POLLSET 1
    #define FS_POLL_MAX 256
    static int fs_pollset_new(void) { return epoll_create1(EPOLL_CLOEXEC); }
    static int fs_pollset_add(int ps, int fd, void *ptr) {
        struct epoll_event ev;
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN;
        ev.data.ptr = ptr;
        return epoll_ctl(ps, EPOLL_CTL_ADD, fd, &ev);
    }
    static int fs_pollset_del(int ps, int fd) {
        struct epoll_event ev;
        memset(&ev, 0, sizeof(ev));
        return epoll_ctl(ps, EPOLL_CTL_DEL, fd, &ev);
    }
    /* The ready members (their pointers) without waiting: at most FS_POLL_MAX. */
    static int fs_pollset_ready(int ps, void **ready) {
        struct epoll_event ev[FS_POLL_MAX];
        int i, r = epoll_wait(ps, ev, FS_POLL_MAX, 0);
        for (i = 0; i < r; i++) ready[i] = ev[i].data.ptr;
        return r;
    }
    static void fs_pollset_close(int ps) { close(ps); }
    #else
    #define FS_POLLSET 0
    #define FS_POLL_MAX 256
    static int fs_pollset_new(void) { return -1; }
    static int fs_pollset_add(int ps, int fd, void *ptr) {
        (void)ps; (void)fd; (void)ptr; return -1;
    }
    static int fs_pollset_del(int ps, int fd) { (void)ps; (void)fd; return -1; }
    static int fs_pollset_ready(int ps, void **ready) { (void)ps; (void)ready; return -1; }
    static void fs_pollset_close(int ps) { (void)ps; }
    #endif

    /* The address family of a bound socket, or -1. */
    static int fs_sock_family(int fd) {
        struct sockaddr_storage ss;
        fs_socklen_t len = (fs_socklen_t)sizeof(ss);
        memset(&ss, 0, sizeof(ss));
    #if defined(_WIN32)
        if (getsockname((SOCKET)fd, (struct sockaddr *)&ss, &len) != 0) return -1;
    #else
        if (getsockname(fd, (struct sockaddr *)&ss, &len) != 0) return -1;
    #endif
        return ss.ss_family;
    }
    """
    ctypedef unsigned int fs_socklen_t
    ctypedef struct fs_iovec:
        void *iov_base
        size_t iov_len
    ctypedef struct fs_msghdr:
        void *msg_name
        fs_socklen_t msg_namelen
        fs_iovec *msg_iov
        size_t msg_iovlen
        int msg_flags
    ctypedef struct fs_mmsg:
        fs_msghdr msg_hdr
        unsigned int msg_len

    int FS_TRUNC, FS_BATCHED
    int FS_ERR_AGAIN, FS_ERR_INTR
    int fs_last_error() noexcept nogil
    int fs_recv_batch(int fd, fs_mmsg *v, unsigned int n) noexcept nogil
    int fs_send_batch(int fd, fs_mmsg *v, unsigned int n) noexcept nogil
    int fs_sock_family(int fd) noexcept nogil
    int FS_POLLSET, FS_POLL_MAX
    int fs_pollset_new() noexcept nogil
    int fs_pollset_add(int ps, int fd, void *ptr) noexcept nogil
    int fs_pollset_del(int ps, int fd) noexcept nogil
    int fs_pollset_ready(int ps, void **ready) noexcept nogil
    void fs_pollset_close(int ps) noexcept nogil

    # Only the fields this module reads or writes; the C headers above bring the full types.
    int AF_INET, AF_INET6
    ctypedef unsigned short sa_family_t
    struct sockaddr_storage:
        sa_family_t ss_family
    struct in_addr:
        pass
    struct in6_addr:
        pass
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    unsigned short htons(unsigned short) noexcept nogil
    unsigned short ntohs(unsigned short) noexcept nogil


cdef enum:
    # Latching modes (C constants: the drain loop must not look up module globals).
    _LATCH_OFF = 0      # trust the SDP address: never learn a source
    _LATCH_FIRST = 1    # learn the first source; re-learn only after it fell silent
    _LATCH_STRICT = 2   # learn the first source; then drop (and count) every other source
    # Slot size: an Ethernet MTU's datagram fits, and so does anything RTP carries in practice
    # (RTP over UDP is kept under the path MTU).  A longer datagram is dropped, never cut.
    SLOT_SIZE = 2048
    DEFAULT_CLOCK_RATE = 8000
    FS_POLL_MAX_C = 256     # the C block's FS_POLL_MAX, as a size Cython can declare with

# A latched source that has sent nothing for this long may be replaced by a new one (a NAT
# rebinding or a moved endpoint), in LATCH_FIRST mode.  rtpengine also uses 3 s, differently:
# for 3 s after each offer/answer it follows the newest source, then confirms one for good
# (only its media-handover flag moves it later).  Counting from the latched source's last
# packet instead needs no signalling time here and still recovers from a NAT rebinding.
cdef double RELATCH_AFTER = 3.0

LATCH_OFF = _LATCH_OFF
LATCH_FIRST = _LATCH_FIRST
LATCH_STRICT = _LATCH_STRICT

batched = bool(FS_BATCHED)


cdef inline bint _same_address(const sockaddr_storage *a, const sockaddr_storage *b) noexcept:
    """Same family, port and address: the fields that identify a UDP source (sin_zero,
    flowinfo and padding may differ between two sockaddrs of the same source)."""
    if a.ss_family != b.ss_family:
        return False
    if a.ss_family == AF_INET:
        return ((<const sockaddr_in *>a).sin_port == (<const sockaddr_in *>b).sin_port
                and memcmp(&(<const sockaddr_in *>a).sin_addr,
                           &(<const sockaddr_in *>b).sin_addr, 4) == 0)
    if a.ss_family == AF_INET6:
        return ((<const sockaddr_in6 *>a).sin6_port == (<const sockaddr_in6 *>b).sin6_port
                and memcmp(&(<const sockaddr_in6 *>a).sin6_addr,
                           &(<const sockaddr_in6 *>b).sin6_addr, 16) == 0
                and (<const sockaddr_in6 *>a).sin6_scope_id
                == (<const sockaddr_in6 *>b).sin6_scope_id)
    return False


cdef inline unsigned int _sockaddr_len(const sockaddr_storage *a) noexcept:
    if a.ss_family == AF_INET:
        return sizeof(sockaddr_in)
    return sizeof(sockaddr_in6)


cdef object _address_tuple(const sockaddr_storage *a):
    """(host, port) of a sockaddr, for stats() (not on the packet path)."""
    cdef const unsigned char *raw
    if a.ss_family == AF_INET:
        raw = <const unsigned char *>&(<const sockaddr_in *>a).sin_addr
        return (str(ipaddress.IPv4Address(raw[:4])),
                ntohs((<const sockaddr_in *>a).sin_port))
    raw = <const unsigned char *>&(<const sockaddr_in6 *>a).sin6_addr
    return (str(ipaddress.IPv6Address(raw[:16])), ntohs((<const sockaddr_in6 *>a).sin6_port))


cdef inline bint _looks_like_rtcp(const unsigned char *data, unsigned int length) noexcept:
    """RFC 5761 section 4: version 2 and a second octet in 192..223 is RTCP, not RTP."""
    return length >= 8 and (data[0] >> 6) == 2 and 192 <= data[1] <= 223


cdef class _Leg:
    """One relay socket and what the relay knows of its remote end.  Plain C fields: the
    drain loop touches nothing else."""

    cdef int fd
    cdef int family                  # of the fd: sends use it
    cdef bint rtcp
    cdef int latching
    cdef _Leg partner                # where datagrams received here are sent from; or None
    # The SDP address (set_peer) and the learned source (latching).
    cdef sockaddr_storage sdp_peer
    cdef bint has_sdp_peer
    cdef sockaddr_storage latched_addr
    cdef bint latched
    cdef double latched_last         # `now` of the last packet from the latched source
    # Counters of what this leg received (see Relay.stats).
    cdef unsigned long long packets, bytes, errors, sent
    cdef double last_packet
    # RFC 3550 figures of the current SSRC (RTP legs only).
    cdef RtpStats rtp
    cdef unsigned int ssrc
    cdef bint has_ssrc
    cdef unsigned int clock_rate

    cdef inline const sockaddr_storage *remote(self) noexcept:
        """Where datagrams for this leg's remote end go now, or NULL."""
        if self.latched and self.latching != _LATCH_OFF:
            return &self.latched_addr
        if self.has_sdp_peer:
            return &self.sdp_peer
        return NULL


cdef class Relay:
    """The compiled packet path of a media relay; see the module docstring."""

    cdef unsigned int _batch
    cdef unsigned int _max_batches
    cdef dict _legs
    # Preallocated once: `batch` receive slots (buffer, iovec, source address, header) and as
    # many send headers, whose iovecs point into the receive buffers (nothing is copied).
    cdef unsigned char *_buf
    cdef fs_iovec *_riov
    cdef fs_iovec *_siov
    cdef sockaddr_storage *_src
    cdef fs_mmsg *_rmsg
    cdef fs_mmsg *_smsg
    cdef int _pollset                # the legs' epoll set (Linux), or -1

    def __cinit__(self):
        self._pollset = -1
        self._buf = NULL
        self._riov = self._siov = NULL
        self._src = NULL
        self._rmsg = self._smsg = NULL

    def __init__(self, int batch=64, *, int max_batches=8):
        cdef unsigned int i
        if batch < 1 or batch > 1024:
            raise ValueError("batch must be 1..1024")
        if max_batches < 1:
            raise ValueError("max_batches must be positive")
        if self._buf != NULL:
            raise RuntimeError("Relay.__init__ called twice")
        self._batch = batch
        self._max_batches = max_batches
        self._legs = {}
        self._buf = <unsigned char *>calloc(batch, SLOT_SIZE)
        self._riov = <fs_iovec *>calloc(batch, sizeof(fs_iovec))
        self._siov = <fs_iovec *>calloc(batch, sizeof(fs_iovec))
        self._src = <sockaddr_storage *>calloc(batch, sizeof(sockaddr_storage))
        self._rmsg = <fs_mmsg *>calloc(batch, sizeof(fs_mmsg))
        self._smsg = <fs_mmsg *>calloc(batch, sizeof(fs_mmsg))
        if (self._buf == NULL or self._riov == NULL or self._siov == NULL or self._src == NULL
                or self._rmsg == NULL or self._smsg == NULL):
            raise MemoryError()
        for i in range(self._batch):
            self._riov[i].iov_base = self._buf + i * SLOT_SIZE
            self._riov[i].iov_len = SLOT_SIZE
            self._rmsg[i].msg_hdr.msg_iov = &self._riov[i]
            self._rmsg[i].msg_hdr.msg_iovlen = 1
            self._rmsg[i].msg_hdr.msg_name = &self._src[i]
            self._smsg[i].msg_hdr.msg_iov = &self._siov[i]
            self._smsg[i].msg_hdr.msg_iovlen = 1
        if FS_POLLSET:
            self._pollset = fs_pollset_new()
            if self._pollset < 0:
                raise OSError(errno, os.strerror(errno))

    def __dealloc__(self):
        if self._pollset >= 0:
            fs_pollset_close(self._pollset)
        free(self._buf)
        free(self._riov)
        free(self._siov)
        free(self._src)
        free(self._rmsg)
        free(self._smsg)

    cdef _Leg _get(self, object leg):
        cdef _Leg found = self._legs.get(leg)
        if found is None:
            raise KeyError(f"no leg {leg!r}")
        return found

    def add_leg(self, leg, int fd, *, bint rtcp=False):
        """Relay datagrams of ``fd`` (a non-blocking bound UDP socket the shell owns) as leg
        ``leg`` (an id the shell chose).  ``rtcp``: the leg carries RTCP (counted, not
        analysed)."""
        cdef _Leg new
        cdef int family
        if leg in self._legs:
            raise ValueError(f"leg {leg!r} already added")
        family = fs_sock_family(fd)
        if family != AF_INET and family != AF_INET6:
            raise ValueError(f"fd {fd} is not a bound IPv4 or IPv6 socket")
        new = _Leg.__new__(_Leg)
        new.fd = fd
        new.family = family
        new.rtcp = rtcp
        new.latching = _LATCH_FIRST
        new.partner = None
        new.clock_rate = DEFAULT_CLOCK_RATE
        if not rtcp:
            new.rtp = RtpStats(DEFAULT_CLOCK_RATE)
        # The poll set holds a borrowed pointer: the leg stays in _legs (alive) until
        # remove_leg takes it out of the set first.
        if self._pollset >= 0 and fs_pollset_add(self._pollset, fd, <void *>new) != 0:
            raise OSError(errno, f"cannot watch fd {fd}: {os.strerror(errno)}")
        self._legs[leg] = new

    def set_peer(self, leg, str host, int port):
        """The remote end of ``leg`` as SDP gives it (an IP literal, no DNS).  Until a source
        is latched, datagrams for this leg's remote go here.  A new SDP address forgets the
        latched source: the remote is learned again, as rtpengine does after each signal."""
        cdef _Leg target = self._get(leg)
        cdef sockaddr_storage addr
        cdef bytes packed
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        ip = ipaddress.ip_address(host)
        packed = ip.packed
        memset(&addr, 0, sizeof(addr))
        if ip.version == 4:
            (<sockaddr_in *>&addr).sin_family = AF_INET
            (<sockaddr_in *>&addr).sin_port = htons(port)
            memcpy(&(<sockaddr_in *>&addr).sin_addr, <const char *>packed, 4)
        else:
            (<sockaddr_in6 *>&addr).sin6_family = AF_INET6
            (<sockaddr_in6 *>&addr).sin6_port = htons(port)
            memcpy(&(<sockaddr_in6 *>&addr).sin6_addr, <const char *>packed, 16)
            if ip.scope_id is not None and ip.scope_id.isdigit():
                (<sockaddr_in6 *>&addr).sin6_scope_id = int(ip.scope_id)
        target.sdp_peer = addr
        target.has_sdp_peer = True
        target.latched = False

    def set_latching(self, leg, int mode):
        """LATCH_FIRST (the default), LATCH_OFF or LATCH_STRICT for ``leg``."""
        cdef _Leg target = self._get(leg)
        if mode != _LATCH_OFF and mode != _LATCH_FIRST and mode != _LATCH_STRICT:
            raise ValueError(f"unknown latching mode {mode!r}")
        target.latching = mode
        if mode == _LATCH_OFF:
            target.latched = False

    def bridge(self, leg_a, leg_b):
        """Datagrams received on ``leg_a`` go out of ``leg_b``'s fd to its remote end, and the
        reverse.  Either leg's earlier partner is left without one."""
        cdef _Leg a = self._get(leg_a)
        cdef _Leg b = self._get(leg_b)
        if a is b:
            raise ValueError("a leg cannot be bridged to itself")
        if a.partner is not None and a.partner is not b:
            a.partner.partner = None
        if b.partner is not None and b.partner is not a:
            b.partner.partner = None
        a.partner = b
        b.partner = a

    def set_clock_rate(self, leg, int rate):
        """The RTP clock rate of ``leg``'s payload (jitter is measured in its units).  A new
        rate starts the RFC 3550 figures over."""
        cdef _Leg target = self._get(leg)
        if rate <= 0:
            raise ValueError("clock rate must be positive")
        if target.rtcp or <unsigned int>rate == target.clock_rate:
            target.clock_rate = rate
            return
        target.clock_rate = rate
        target.rtp = RtpStats(rate)
        target.has_ssrc = False

    def remove_leg(self, leg):
        """Forget ``leg`` (the shell closes its fd).  Its partner stays, with nowhere to send."""
        cdef _Leg gone = self._legs.pop(leg, None)
        if gone is None:
            raise KeyError(f"no leg {leg!r}")
        if self._pollset >= 0:
            fs_pollset_del(self._pollset, gone.fd)
        if gone.partner is not None:
            gone.partner.partner = None
            gone.partner = None

    @property
    def legs(self):
        return len(self._legs)

    def stats(self, leg):
        """Counters of what ``leg`` received; see the stub for the keys."""
        cdef _Leg target = self._get(leg)
        cdef const sockaddr_storage *remote = target.remote()
        result = {
            "packets": target.packets,
            "bytes": target.bytes,
            "errors": target.errors,
            "sent": target.sent,
            "last_packet": target.last_packet,
            "peer": _address_tuple(remote) if remote != NULL else None,
            "sdp_peer": _address_tuple(&target.sdp_peer) if target.has_sdp_peer else None,
            "latched": bool(target.latched),
        }
        if not target.rtcp:
            result["ssrc"] = target.ssrc if target.has_ssrc else None
            result["lost"] = target.rtp.cumulative_lost
            result["jitter"] = target.rtp.jitter_seconds * 1000.0
            result["expected"] = target.rtp.expected
            result["received"] = target.rtp.received
        return result

    def fileno(self):
        """The descriptor to watch for :meth:`poll` (an epoll set of every leg's fd, Linux),
        or -1: then watch each leg's fd and call :meth:`drain`."""
        return self._pollset

    def poll(self, double now):
        """Drain every leg that is readable now (each up to its budget); returns how many
        datagrams were read.  One call per loop wake-up however many streams are busy."""
        cdef void *ready[FS_POLL_MAX_C]
        cdef Py_ssize_t total = 0
        cdef int n, i, _round
        if self._pollset < 0:
            return 0
        for _round in range(4):
            n = fs_pollset_ready(self._pollset, ready)
            if n <= 0:
                break
            for i in range(n):
                total += self._drain(<_Leg>ready[i], now)
            if n < FS_POLL_MAX:
                break
        return total

    def drain(self, leg, double now):
        """Read ``leg``'s fd until it is empty or the budget (``batch * max_batches``
        datagrams) is spent; relay what was read.  Returns how many datagrams were read.

        Network errors are counted, never raised.  An unknown leg (removed while its fd was
        still registered with the loop) reads nothing and returns 0."""
        cdef _Leg source = self._legs.get(leg)
        if source is None:
            return 0
        return self._drain(source, now)

    cdef Py_ssize_t _drain(self, _Leg leg, double now) noexcept:
        cdef Py_ssize_t total = 0
        cdef unsigned int _round, i, n, nsend
        cdef int got, err
        cdef fs_mmsg *msg
        cdef _Leg out
        cdef const sockaddr_storage *dst
        cdef unsigned int dstlen
        cdef bint can_send
        cdef const unsigned char *data
        cdef unsigned int length, ssrc
        for _round in range(self._max_batches):
            for i in range(self._batch):
                # recvmmsg writes these back; they must be reset before each call.
                self._rmsg[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
                self._rmsg[i].msg_hdr.msg_flags = 0
            got = fs_recv_batch(leg.fd, self._rmsg, self._batch)
            if got < 0:
                err = fs_last_error()
                if err == FS_ERR_INTR:
                    continue
                if err != FS_ERR_AGAIN:
                    leg.errors += 1
                break
            n = <unsigned int>got
            if n == 0:
                break
            total += n
            leg.last_packet = now
            # The batch has one destination: the partner's remote end, from the partner's fd
            # (a partner's remote only moves when the partner's own fd is drained).
            out = leg.partner
            dst = out.remote() if out is not None else NULL
            can_send = dst != NULL and dst.ss_family == out.family
            dstlen = _sockaddr_len(dst) if can_send else 0
            nsend = 0
            for i in range(n):
                msg = &self._rmsg[i]
                if msg.msg_hdr.msg_flags & FS_TRUNC:
                    leg.errors += 1       # longer than a slot: dropped, never relayed cut
                    continue
                length = msg.msg_len
                data = self._buf + i * SLOT_SIZE
                leg.packets += 1
                leg.bytes += length
                if not self._admit(leg, &self._src[i], data, length, now):
                    leg.errors += 1
                    continue
                if not leg.rtcp and length >= 12 and (data[0] >> 6) == 2 \
                        and not _looks_like_rtcp(data, length):
                    ssrc = ((<unsigned int>data[8] << 24) | (<unsigned int>data[9] << 16)
                            | (<unsigned int>data[10] << 8) | data[11])
                    if not leg.has_ssrc or ssrc != leg.ssrc:
                        # a new source: RFC 3550 state starts over (A.1 probation included)
                        leg.rtp.reset_c()
                        leg.ssrc = ssrc
                        leg.has_ssrc = True
                    leg.rtp.update_c((<unsigned int>data[2] << 8) | data[3],
                                     (<unsigned int>data[4] << 24) | (<unsigned int>data[5] << 16)
                                     | (<unsigned int>data[6] << 8) | data[7],
                                     now)
                if not can_send:
                    leg.errors += 1       # no bridge, no remote yet, or a family mismatch
                    continue
                self._siov[nsend].iov_base = <void *>data
                self._siov[nsend].iov_len = length
                self._smsg[nsend].msg_hdr.msg_name = <void *>dst
                self._smsg[nsend].msg_hdr.msg_namelen = dstlen
                nsend += 1
            if nsend:
                self._send(leg, out, nsend)
            if n < self._batch:
                # A short batch: the queue was empty when the kernel looked.  Stop here and
                # save the EAGAIN call; the loop (level-triggered) calls again for new data.
                break
        return total

    cdef inline bint _admit(self, _Leg leg, const sockaddr_storage *src,
                            const unsigned char *data, unsigned int length,
                            double now) noexcept:
        """Latching: learn the source, or check it.  False: drop the datagram (strict)."""
        if leg.latching == _LATCH_OFF:
            return True
        if not leg.latched:
            # rtpengine's GH #697: Asterisk sends stray RTCP to the RTP port; such a datagram
            # must not become the RTP return address.  It is still relayed.
            if not leg.rtcp and _looks_like_rtcp(data, length):
                return True
            memcpy(&leg.latched_addr, src, sizeof(sockaddr_storage))
            leg.latched = True
            leg.latched_last = now
            return True
        if _same_address(src, &leg.latched_addr):
            leg.latched_last = now
            return True
        if leg.latching == _LATCH_STRICT:
            return False
        if now - leg.latched_last >= RELATCH_AFTER:
            # the latched source fell silent: follow the new one (NAT rebinding, handover)
            memcpy(&leg.latched_addr, src, sizeof(sockaddr_storage))
            leg.latched_last = now
        # LATCH_FIRST relays another source's datagrams but keeps the return path, as
        # rtpengine does without strict-source.
        return True

    cdef void _send(self, _Leg leg, _Leg out, unsigned int nsend) noexcept:
        """Send the batch's first ``nsend`` send slots from ``out``'s fd; failures count as
        errors of ``leg`` (where the datagrams came in)."""
        cdef unsigned int off = 0
        cdef int sent, err, tries = 0
        while off < nsend:
            sent = fs_send_batch(out.fd, self._smsg + off, nsend - off)
            if sent > 0:
                off += sent
                out.sent += sent
                continue
            err = fs_last_error()
            if err == FS_ERR_INTR and tries < 3:
                tries += 1
                continue
            if err == FS_ERR_AGAIN:
                # the socket's send buffer is full: the rest of the batch would fail too
                leg.errors += nsend - off
                return
            # this datagram's destination refused it (e.g. EPERM, unreachable): skip it only
            leg.errors += 1
            off += 1
