# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""The media endpoint's receive batch in C: datagrams, their sources and kernel receive stamps.

Reading an RTP socket from Python costs a ``recvmsg`` call per datagram and, for its receive
stamp (``SO_TIMESTAMPNS``), a list, a tuple and a ``bytes`` of ancillary data to unpack.
:meth:`Receiver.read` takes a whole batch in one system call (``recvmmsg`` on Linux;
``recvfrom`` per datagram elsewhere, without stamps), reads the stamps in C and returns one
``(data, source, stamp)`` per datagram, the source tuple shared while it does not change (a
latched peer sends from one address).  The shell owns the socket and says what the stamps'
clock is; this module reads no clock.
"""

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy

from fastsip.rtp._net cimport address_tuple, sockaddr_storage

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
    #include <time.h>
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <netinet/in.h>
    #include <arpa/inet.h>
    #endif

    #define FSR_MAX_BATCH 64
    #define FSR_SLOT 2048
    #define FSR_CTRL 64     /* room for one SCM_TIMESTAMPNS (a struct timespec) */

    /* Read up to n (<= FSR_MAX_BATCH) datagrams without blocking into buf (FSR_SLOT apart).
     * lens[i]: the length, or 0 for a datagram too long for a slot (dropped); addrs[i] and
     * addrlens[i]: the source; stamps[i]: the kernel's receive time (CLOCK_REALTIME seconds)
     * or -1.  Returns how many, 0 when nothing is queued. */
    static int fsr_recv(int fd, unsigned char *buf, unsigned char *ctrl, unsigned int n,
                        unsigned int *lens, struct sockaddr_storage *addrs,
                        unsigned int *addrlens, double *stamps) {
        unsigned int i;
    #if defined(__linux__)
        struct mmsghdr msgs[FSR_MAX_BATCH];
        struct iovec iov[FSR_MAX_BATCH];
        int got, tries = 0;
        fs_mmsg_slots(msgs, iov, n, buf, FSR_SLOT, addrs);
        for (i = 0; i < n; i++) {
            msgs[i].msg_hdr.msg_control = ctrl + (size_t)i * FSR_CTRL;
            msgs[i].msg_hdr.msg_controllen = FSR_CTRL;
        }
        for (;;) {
            got = recvmmsg(fd, msgs, n, MSG_DONTWAIT, NULL);
            if (got >= 0) break;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            /* a signal, or the ICMP error of an earlier send reported here: read on */
            if (++tries > 8) return 0;
        }
        for (i = 0; i < (unsigned int)got; i++) {
            struct msghdr *h = &msgs[i].msg_hdr;
            struct cmsghdr *c;
            lens[i] = (h->msg_flags & MSG_TRUNC) ? 0 : msgs[i].msg_len;
            addrlens[i] = h->msg_namelen;
            stamps[i] = -1.0;
            for (c = CMSG_FIRSTHDR(h); c != NULL; c = CMSG_NXTHDR(h, c)) {
                if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS
                        && c->cmsg_len >= CMSG_LEN(sizeof(struct timespec))) {
                    struct timespec ts;
                    memcpy(&ts, CMSG_DATA(c), sizeof(ts));
                    stamps[i] = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
                }
            }
        }
        return got;
    #else
        (void)ctrl;
        for (i = 0; i < n; i++) {
    #if defined(_WIN32)
            int alen = (int)sizeof(struct sockaddr_storage);
            int r = recvfrom((SOCKET)fd, (char *)(buf + (size_t)i * FSR_SLOT), FSR_SLOT, 0,
                             (struct sockaddr *)&addrs[i], &alen);
            if (r == SOCKET_ERROR) {
                int e = WSAGetLastError();
                if (e == WSAEMSGSIZE) { lens[i] = 0; addrlens[i] = (unsigned int)alen;
                                        stamps[i] = -1.0; continue; }
                if (e == WSAECONNRESET) { i--; n--; continue; }
                return (int)i;
            }
    #else
            socklen_t alen = sizeof(struct sockaddr_storage);
            ssize_t r = recvfrom(fd, buf + (size_t)i * FSR_SLOT, FSR_SLOT, MSG_DONTWAIT,
                                 (struct sockaddr *)&addrs[i], &alen);
            if (r < 0) {
                if (errno == EINTR || errno == ECONNREFUSED) { i--; n--; continue; }
                return (int)i;
            }
            if (r > FSR_SLOT) r = 0;
    #endif
            lens[i] = (unsigned int)r;
            addrlens[i] = (unsigned int)alen;
            stamps[i] = -1.0;
        }
        return (int)n;
    #endif
    }

    """
    int FSR_MAX_BATCH, FSR_SLOT, FSR_CTRL
    int fsr_recv(int fd, unsigned char *buf, unsigned char *ctrl, unsigned int n,
                 unsigned int *lens, sockaddr_storage *addrs, unsigned int *addrlens,
                 double *stamps) noexcept nogil


cdef enum:
    MAX_BATCH = 64      # FSR_MAX_BATCH
    SLOT = 2048         # FSR_SLOT
    CTRL = 64           # FSR_CTRL


@cython.final
cdef class Receiver:
    """Batches of datagrams from the shell's non-blocking UDP sockets (buffers allocated once,
    shared by every socket: one read at a time)."""

    cdef unsigned char *_buf
    cdef unsigned char *_ctrl
    cdef unsigned int _lens[MAX_BATCH]
    cdef unsigned int _addrlens[MAX_BATCH]
    cdef double _stamps[MAX_BATCH]
    cdef sockaddr_storage _addrs[MAX_BATCH]
    cdef sockaddr_storage _last
    cdef unsigned int _last_len
    cdef object _last_tuple

    def __cinit__(self):
        self._buf = <unsigned char *>malloc(MAX_BATCH * SLOT)
        self._ctrl = <unsigned char *>malloc(MAX_BATCH * CTRL)
        if self._buf == NULL or self._ctrl == NULL:
            raise MemoryError()
        self._last_len = 0

    def __dealloc__(self):
        free(self._buf)
        free(self._ctrl)

    def read(self, int fd, int limit=MAX_BATCH, double offset=0.0, double now=0.0):
        """Up to ``limit`` (at most 64) datagrams queued on ``fd``: ``(data, (host, port),
        time)``, where time is the kernel's receive stamp less ``offset`` (its clock on the
        caller's), or ``now`` where there is no stamp.  An empty list when nothing is queued."""
        cdef int got, i
        cdef list out = []
        cdef double t
        if limit <= 0:
            return out
        if limit > MAX_BATCH:
            limit = MAX_BATCH
        got = fsr_recv(fd, self._buf, self._ctrl, <unsigned int>limit, self._lens,
                       self._addrs, self._addrlens, self._stamps)
        for i in range(got):
            if self._addrlens[i] != self._last_len or self._last_tuple is None or \
                    memcmp(&self._addrs[i], &self._last, self._addrlens[i]) != 0:
                source = address_tuple(&self._addrs[i])
                if source is None:
                    continue                         # not IPv4/IPv6: not ours to answer
                self._last_tuple = source
                memcpy(&self._last, &self._addrs[i], self._addrlens[i])
                self._last_len = self._addrlens[i]
            t = self._stamps[i] - offset if self._stamps[i] >= 0 else now
            out.append((PyBytes_FromStringAndSize(<char *>self._buf + i * SLOT,
                                                  self._lens[i]),
                        self._last_tuple, t))
        return out
