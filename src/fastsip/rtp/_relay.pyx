# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""The media relay's packet path: RTP/RTCP datagrams move socket to socket in C.

The shell (fastsip.asyncio) owns the sockets and the loop; it registers each leg's fd here.  On
Linux the loop watches one descriptor (:meth:`Relay.fileno`) and calls :meth:`Relay.poll`,
which relays what every ready leg received in C -- one Python call per wake-up, however many
streams are busy.  Two backends stand behind it (:attr:`Relay.backend`):

- ``io_uring`` (Linux >= 6.0, the default where it can be set up): each leg has a multishot
  recvmsg armed in the Relay's ring; the kernel puts datagrams in buffers of a provided-buffer
  ring and posts a completion each; poll() reaps them and submits every send of the wake-up in
  one io_uring_enter.  From Linux 6.1 the receives themselves run in a batch inside that
  io_uring_enter (DEFER_TASKRUN) and the loop watches an eventfd the ring signals; on 6.0 they
  run at the task's next kernel exit and the loop watches the ring.  The ring must be driven
  from the thread that made the Relay (IORING_SETUP_SINGLE_ISSUER), as asyncio objects are.
  With ``threaded=True`` (``fastsip media``) the ring is driven by a thread of the Relay's own
  instead (:meth:`Relay.start`): it blocks in io_uring_enter without the GIL and relays each
  batch with it held, so no event loop wakes per batch; control (add_leg, remove_leg,
  stats ...) runs in the caller's thread under the GIL as before and never touches the ring.
- ``mmsg``: every leg's fd in an epoll set of the Relay's own; poll() drains each ready leg
  with recvmmsg and forwards with sendmmsg.  Elsewhere than Linux the shell watches each fd
  and calls :meth:`Relay.drain` for it, which emulates the batch per datagram.

Either way the datagram's source is latched (rtpengine-style), the leg's counters and RFC 3550
receive statistics are updated in C, and the datagram goes out of the bridged leg's fd to that
leg's remote end -- with io_uring, once that end is a latched source, out of the leg's connected
twin instead (same port, connect()ed to the source: the kernel keeps the route; fs_twin_open).
No Python object is made per packet.  ``drain()`` (per leg, recvmmsg) works with either backend
until the first fileno()/poll(): from then on an io_uring Relay receives in the ring only.

This module does no signalling: which legs exist, their SDP addresses and bridges come from
the ng control layer through the shell.
"""

from libc.errno cimport EAGAIN, EBUSY, EINTR, ENOBUFS, errno
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from fastsip.rtp._net cimport (
    AF_INET, AF_INET6, FS_ERR_AGAIN, FS_ERR_INTR, address_tuple, fs_last_error, same_address,
    sockaddr_from_ip, sockaddr_len, sockaddr_storage,
)
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

    /* io_uring (Linux >= 6.0): one io_uring_enter per wake-up carries every send of that
     * wake-up, and receives complete without a system call of ours at all -- a multishot
     * recvmsg per leg, armed once, fills buffers of a provided-buffer ring and posts a
     * completion per datagram.  recvmmsg/sendmmsg cost two system calls per packet when, as
     * with RTP, each socket has one datagram per wake-up; this costs about one per wake-up.
     * Raw system calls and our own copies of the (stable) kernel ABI structures: no liburing,
     * and no <linux/io_uring.h>, which manylinux's old kernel headers lack.  Any failure at
     * setup (an old kernel, io_uring_disabled, a seccomp filter's EPERM) makes the Relay use
     * the recvmmsg/sendmmsg path instead. */
    #include <stdint.h>
    #if defined(__linux__)
    #define FS_URING 1
    #define FS_DONTWAIT MSG_DONTWAIT
    #include <stdint.h>
    #include <stdlib.h>
    #include <sys/eventfd.h>
    #include <sys/mman.h>
    #include <sys/syscall.h>
    #ifndef __NR_io_uring_setup
    #define __NR_io_uring_setup 425
    #endif
    #ifndef __NR_io_uring_enter
    #define __NR_io_uring_enter 426
    #endif
    #ifndef __NR_io_uring_register
    #define __NR_io_uring_register 427
    #endif
    typedef struct {
        uint8_t opcode; uint8_t flags; uint16_t ioprio; int32_t fd;
        uint64_t off; uint64_t addr; uint32_t len; uint32_t op_flags; uint64_t user_data;
        uint16_t buf_group; uint16_t personality; uint32_t file_index;
        uint64_t addr3; uint64_t pad2;
    } fs_sqe;
    typedef struct { uint64_t user_data; int32_t res; uint32_t flags; } fs_cqe;
    typedef struct { uint32_t head, tail, ring_mask, ring_entries, flags, dropped, array, resv1;
                     uint64_t user_addr; } fs_sq_off;
    typedef struct { uint32_t head, tail, ring_mask, ring_entries, overflow, cqes, flags, resv1;
                     uint64_t user_addr; } fs_cq_off;
    typedef struct {
        uint32_t sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle, features, wq_fd;
        uint32_t resv[3]; fs_sq_off sq_off; fs_cq_off cq_off;
    } fs_uring_params;
    typedef struct { uint64_t addr; uint32_t len; uint16_t bid; uint16_t resv; } fs_ubuf;
    typedef struct { uint64_t ring_addr; uint32_t ring_entries; uint16_t bgid; uint16_t pad;
                     uint64_t resv[3]; } fs_ubuf_reg;
    typedef struct { uint32_t namelen, controllen, payloadlen, flags; } fs_recvmsg_out;

    #define FS_OP_SENDMSG 9
    #define FS_OP_RECVMSG 10
    #define FS_OP_ASYNC_CANCEL 14
    #define FS_SQE_BUFFER_SELECT (1U << 5)
    #define FS_SQE_CQE_SKIP_SUCCESS (1U << 6)
    #define FS_RECV_MULTISHOT (1U << 1)
    #define FS_CQE_F_BUFFER (1U << 0)
    #define FS_CQE_F_MORE (1U << 1)
    #define FS_CQE_BUFFER_SHIFT 16
    #define FS_SETUP_CQSIZE (1U << 3)
    #define FS_SETUP_SUBMIT_ALL (1U << 7)
    #define FS_SETUP_SINGLE_ISSUER (1U << 12)
    #define FS_SETUP_COOP_TASKRUN (1U << 8)
    #define FS_SETUP_TASKRUN_FLAG (1U << 9)
    #define FS_SQ_TASKRUN (1U << 2)
    #define FS_REGISTER_EVENTFD 4
    #define FS_SETUP_DEFER_TASKRUN (1U << 13)
    #define FS_SETUP_R_DISABLED (1U << 6)
    #define FS_REGISTER_ENABLE_RINGS 12
    #define FS_OP_READ 22
    #define FS_ENTER_GETEVENTS (1U << 0)
    #define FS_FEAT_SINGLE_MMAP (1U << 0)
    #define FS_FEAT_NODROP (1U << 1)
    #define FS_FEAT_REG_REG_RING (1U << 13)
    #define FS_OP_SEND 26
    #define FS_REGISTER_PBUF_RING 22
    #define FS_OFF_SQ_RING 0ULL
    #define FS_OFF_CQ_RING 0x8000000ULL
    #define FS_OFF_SQES 0x10000000ULL
    #define FS_BGID 0

    typedef struct {
        int fd;
        int evfd;         /* DEFER_TASKRUN: the eventfd the loop watches; else -1 */
        int defer;        /* receives run in our io_uring_enter (DEFER_TASKRUN) */
        int send_addr;    /* IORING_OP_SEND takes a destination (addr2): no msghdr to copy */
        unsigned *sq_flags;
        unsigned *sq_head, *sq_tail, *sq_array, sq_mask, sq_entries, sq_local;
        fs_sqe *sqes;
        unsigned *cq_head, *cq_tail, cq_mask;
        fs_cqe *cqes;
        void *sq_ptr, *cq_ptr; size_t sq_sz, cq_sz, sqes_sz;
        fs_ubuf *br; unsigned br_mask; uint16_t br_tail; size_t br_sz;
        unsigned char *bufs; unsigned buf_size, nbufs;
    } fs_uring;

    static void fs_uring_close(fs_uring *r) {
        if (r->bufs) { free(r->bufs); r->bufs = NULL; }
        if (r->br) { munmap(r->br, r->br_sz); r->br = NULL; }
        if (r->sqes) { munmap(r->sqes, r->sqes_sz); r->sqes = NULL; }
        if (r->cq_ptr && r->cq_ptr != r->sq_ptr) munmap(r->cq_ptr, r->cq_sz);
        if (r->sq_ptr) munmap(r->sq_ptr, r->sq_sz);
        r->sq_ptr = r->cq_ptr = NULL;
        if (r->fd >= 0) { close(r->fd); r->fd = -1; }
        if (r->evfd >= 0) { close(r->evfd); r->evfd = -1; }
    }

    /* 0, or -errno (the caller then falls back to recvmmsg/sendmmsg). */
    static int fs_uring_init(fs_uring *r, unsigned entries, unsigned cq_entries, unsigned nbufs,
                             unsigned buf_size, int try_defer, int threaded) {
        fs_uring_params p;
        fs_ubuf_reg reg;
        unsigned i;
        int e;
        memset(r, 0, sizeof(*r));
        memset(&p, 0, sizeof(p));
        r->fd = -1;
        r->evfd = -1;
        /* DEFER_TASKRUN (6.1): a receive's work waits for our next io_uring_enter and runs
         * there in a batch, instead of interrupting whatever the task does (a signal-like
         * notification per wake-up).  Measured here: 0.4 us less per packet.  The ring's own
         * descriptor does not poll readable for such work, so an eventfd tells the loop.
         * Without it (6.0), COOP_TASKRUN: the work runs at the task's next kernel exit, and
         * the ring descriptor polls readable once completions are posted. */
        /* threaded: the ring starts disabled and the relay's own thread enables it, which
         * makes that thread its single issuer (the one task that may submit and, with
         * DEFER_TASKRUN, run the receives); it waits in io_uring_enter, so no eventfd. */
        unsigned disabled = threaded ? FS_SETUP_R_DISABLED : 0;
        p.flags = FS_SETUP_CQSIZE | FS_SETUP_SUBMIT_ALL | FS_SETUP_SINGLE_ISSUER
                  | FS_SETUP_DEFER_TASKRUN | FS_SETUP_TASKRUN_FLAG | disabled;
        p.cq_entries = cq_entries;
        r->fd = try_defer ? (int)syscall(__NR_io_uring_setup, entries, &p) : -1;
        r->defer = r->fd >= 0;
        if (r->fd < 0 && (!try_defer || errno == EINVAL)) {
            memset(&p, 0, sizeof(p));
            p.flags = FS_SETUP_CQSIZE | FS_SETUP_SUBMIT_ALL | FS_SETUP_SINGLE_ISSUER
                      | FS_SETUP_COOP_TASKRUN | disabled;
            p.cq_entries = cq_entries;
            r->fd = (int)syscall(__NR_io_uring_setup, entries, &p);
        }
        if (r->fd < 0) return -errno;
        if (r->defer && !threaded) {
            r->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
            if (r->evfd < 0 || syscall(__NR_io_uring_register, r->fd, FS_REGISTER_EVENTFD,
                                       &r->evfd, 1) < 0) {
                e = -errno; fs_uring_close(r); return e;
            }
        }
        if (!(p.features & FS_FEAT_SINGLE_MMAP) || !(p.features & FS_FEAT_NODROP)) {
            fs_uring_close(r); return -ENOSYS;
        }
        /* send with a destination (6.1): skips the msghdr and iovec copies of a sendmsg.
         * No feature bit names it; REG_REG_RING (6.3) says the kernel is newer. */
        r->send_addr = (p.features & FS_FEAT_REG_REG_RING) != 0;
        r->sq_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
        r->cq_sz = p.cq_off.cqes + p.cq_entries * sizeof(fs_cqe);
        if (r->cq_sz > r->sq_sz) r->sq_sz = r->cq_sz;
        r->cq_sz = r->sq_sz;
        r->sq_ptr = mmap(NULL, r->sq_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
                         FS_OFF_SQ_RING);
        if (r->sq_ptr == MAP_FAILED) { e = -errno; r->sq_ptr = NULL; fs_uring_close(r); return e; }
        r->cq_ptr = r->sq_ptr;
        r->sqes_sz = p.sq_entries * sizeof(fs_sqe);
        r->sqes = (fs_sqe *)mmap(NULL, r->sqes_sz, PROT_READ | PROT_WRITE,
                                 MAP_SHARED | MAP_POPULATE, r->fd, FS_OFF_SQES);
        if (r->sqes == MAP_FAILED) { e = -errno; r->sqes = NULL; fs_uring_close(r); return e; }
        {
            char *sq = (char *)r->sq_ptr;
            r->sq_head = (unsigned *)(sq + p.sq_off.head);
            r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
            r->sq_mask = *(unsigned *)(sq + p.sq_off.ring_mask);
            r->sq_entries = p.sq_entries;
            r->sq_array = (unsigned *)(sq + p.sq_off.array);
            r->sq_flags = (unsigned *)(sq + p.sq_off.flags);
            r->cq_head = (unsigned *)(sq + p.cq_off.head);
            r->cq_tail = (unsigned *)(sq + p.cq_off.tail);
            r->cq_mask = *(unsigned *)(sq + p.cq_off.ring_mask);
            r->cqes = (fs_cqe *)(sq + p.cq_off.cqes);
            /* identity map: sqe i is slot i */
            for (i = 0; i < p.sq_entries; i++) r->sq_array[i] = i;
            r->sq_local = *r->sq_tail;
        }
        /* The provided-buffer ring: nbufs buffers (a power of two) the kernel picks from. */
        r->br_sz = nbufs * sizeof(fs_ubuf);
        r->br = (fs_ubuf *)mmap(NULL, r->br_sz, PROT_READ | PROT_WRITE,
                                MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (r->br == MAP_FAILED) { e = -errno; r->br = NULL; fs_uring_close(r); return e; }
        r->bufs = (unsigned char *)calloc(nbufs, buf_size);
        if (r->bufs == NULL) { fs_uring_close(r); return -ENOMEM; }
        r->nbufs = nbufs; r->buf_size = buf_size; r->br_mask = nbufs - 1;
        memset(&reg, 0, sizeof(reg));
        reg.ring_addr = (uint64_t)(uintptr_t)r->br;
        reg.ring_entries = nbufs;
        reg.bgid = FS_BGID;
        if (syscall(__NR_io_uring_register, r->fd, FS_REGISTER_PBUF_RING, &reg, 1) < 0) {
            e = -errno; fs_uring_close(r); return e;
        }
        for (i = 0; i < nbufs; i++) {
            fs_ubuf *b = &r->br[i];
            b->addr = (uint64_t)(uintptr_t)(r->bufs + (size_t)i * buf_size);
            b->len = buf_size;
            b->bid = (uint16_t)i;
        }
        r->br_tail = (uint16_t)nbufs;
        /* the tail overlays br[0].resv */
        __atomic_store_n(&r->br[0].resv, r->br_tail, __ATOMIC_RELEASE);
        return 0;
    }

    /* Give buffer bid back to the kernel (published by fs_uring_buf_publish). */
    static inline void fs_uring_buf_return(fs_uring *r, unsigned bid) {
        fs_ubuf *b = &r->br[r->br_tail & r->br_mask];
        b->addr = (uint64_t)(uintptr_t)(r->bufs + (size_t)bid * r->buf_size);
        b->len = r->buf_size;
        b->bid = (uint16_t)bid;
        r->br_tail++;
    }
    static inline void fs_uring_buf_publish(fs_uring *r) {
        __atomic_store_n(&r->br[0].resv, r->br_tail, __ATOMIC_RELEASE);
    }
    static inline unsigned char *fs_uring_buf(fs_uring *r, unsigned bid) {
        return r->bufs + (size_t)bid * r->buf_size;
    }

    /* A zeroed SQE to fill, or NULL when the SQ is full (submit first). */
    static inline fs_sqe *fs_uring_sqe(fs_uring *r) {
        unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
        fs_sqe *s;
        if (r->sq_local - head >= r->sq_entries) return NULL;
        s = &r->sqes[r->sq_local & r->sq_mask];
        memset(s, 0, sizeof(*s));
        r->sq_local++;
        return s;
    }
    static inline unsigned fs_uring_sq_entries(fs_uring *r) { return r->sq_entries; }
    static inline unsigned fs_uring_pending(fs_uring *r) {
        return r->sq_local - *r->sq_tail;
    }
    /* Submit every prepared SQE and, with getevents, run the ring's deferred work (receives)
     * so their CQEs are posted.  Returns what io_uring_enter returned (-errno on failure). */
    static int fs_uring_enter(fs_uring *r, int getevents) {
        unsigned n = r->sq_local - *r->sq_tail;
        int ret;
        __atomic_store_n(r->sq_tail, r->sq_local, __ATOMIC_RELEASE);
        if (n == 0 && !getevents) return 0;
        ret = (int)syscall(__NR_io_uring_enter, r->fd, n, 0,
                           getevents ? FS_ENTER_GETEVENTS : 0, NULL, 0);
        return ret < 0 ? -errno : ret;
    }
    /* The next CQE or NULL; fs_uring_cq_advance(r) after reading it. */
    static inline fs_cqe *fs_uring_cqe(fs_uring *r) {
        unsigned head = *r->cq_head;
        if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) return NULL;
        return &r->cqes[head & r->cq_mask];
    }
    /* The descriptor the loop watches: readable when poll() has work. */
    static inline int fs_uring_poll_fd(fs_uring *r) { return r->defer ? r->evfd : r->fd; }
    /* DEFER_TASKRUN: reset the eventfd; then, if work came in since the last enter or
     * completions wait, set it again (it may have been signalled just before the reset). */
    static void fs_uring_rearm_wakeup(fs_uring *r) {
        uint64_t v;
        if (!r->defer || r->evfd < 0) return;
        while (read(r->evfd, &v, sizeof(v)) < 0 && errno == EINTR) {}
        if ((__atomic_load_n(r->sq_flags, __ATOMIC_ACQUIRE) & FS_SQ_TASKRUN)
                || *r->cq_head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) {
            v = 1;
            while (write(r->evfd, &v, sizeof(v)) < 0 && errno == EINTR) {}
        }
    }
    static inline int fs_uring_deferred(fs_uring *r) { return r->defer; }
    static inline int fs_uring_send_addr(fs_uring *r) { return r->send_addr; }
    /* Threaded: make the calling thread the ring's single issuer (0 or -errno). */
    static int fs_uring_enable(fs_uring *r) {
        return syscall(__NR_io_uring_register, r->fd, FS_REGISTER_ENABLE_RINGS, NULL, 0) < 0
               ? -errno : 0;
    }
    /* Threaded: block until a completion is posted (with DEFER_TASKRUN: until receives are
     * pending, which this call then runs).  Submits nothing: the SQ is only published by
     * fs_uring_enter, under the GIL, so the control thread may queue entries meanwhile. */
    static int fs_uring_wait(fs_uring *r) {
        int ret = (int)syscall(__NR_io_uring_enter, r->fd, 0, 1, FS_ENTER_GETEVENTS, NULL, 0);
        return ret < 0 ? -errno : ret;
    }
    static int fs_eventfd_new(void) { return eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC); }
    static void fs_eventfd_signal(int fd) {
        uint64_t v = 1;
        while (write(fd, &v, sizeof(v)) < 0 && errno == EINTR) {}
    }
    static void fs_fd_close(int fd) { if (fd >= 0) close(fd); }
    static inline void fs_uring_cq_advance(fs_uring *r) {
        __atomic_store_n(r->cq_head, *r->cq_head + 1, __ATOMIC_RELEASE);
    }
    #else
    #define FS_URING 0
    #define FS_DONTWAIT 0
    typedef struct { int fd; } fs_uring;
    typedef struct { uint64_t user_data; int32_t res; uint32_t flags; } fs_cqe;
    typedef struct {
        uint8_t opcode; uint8_t flags; uint16_t ioprio; int32_t fd; uint64_t off; uint64_t addr;
        uint32_t len; uint32_t op_flags; uint64_t user_data; uint16_t buf_group;
        uint32_t file_index;
    } fs_sqe;
    typedef struct { uint32_t namelen, controllen, payloadlen, flags; } fs_recvmsg_out;
    #define FS_OP_SENDMSG 9
    #define FS_OP_RECVMSG 10
    #define FS_OP_ASYNC_CANCEL 14
    #define FS_OP_READ 22
    #define FS_SQE_BUFFER_SELECT 0
    #define FS_SQE_CQE_SKIP_SUCCESS 0
    #define FS_RECV_MULTISHOT 0
    #define FS_CQE_F_BUFFER 0
    #define FS_CQE_F_MORE 0
    #define FS_CQE_BUFFER_SHIFT 16
    #define FS_BGID 0
    static int fs_uring_init(fs_uring *r, unsigned e, unsigned c, unsigned n, unsigned b,
                             int d, int t) {
        (void)e; (void)c; (void)n; (void)b; (void)d; (void)t; r->fd = -1; return -1;
    }
    static int fs_uring_enable(fs_uring *r) { (void)r; return -1; }
    static int fs_uring_wait(fs_uring *r) { (void)r; return -1; }
    static int fs_eventfd_new(void) { return -1; }
    static void fs_eventfd_signal(int fd) { (void)fd; }
    static void fs_fd_close(int fd) { (void)fd; }
    static void fs_uring_close(fs_uring *r) { (void)r; }
    static void fs_uring_buf_return(fs_uring *r, unsigned bid) { (void)r; (void)bid; }
    static void fs_uring_buf_publish(fs_uring *r) { (void)r; }
    static unsigned char *fs_uring_buf(fs_uring *r, unsigned bid) {
        (void)r; (void)bid; return NULL;
    }
    static fs_sqe *fs_uring_sqe(fs_uring *r) { (void)r; return NULL; }
    static unsigned fs_uring_pending(fs_uring *r) { (void)r; return 0; }
    static unsigned fs_uring_sq_entries(fs_uring *r) { (void)r; return 0; }
    static int fs_uring_enter(fs_uring *r, int g) { (void)r; (void)g; return -1; }
    static fs_cqe *fs_uring_cqe(fs_uring *r) { (void)r; return NULL; }
    static void fs_uring_cq_advance(fs_uring *r) { (void)r; }
    static int fs_uring_poll_fd(fs_uring *r) { (void)r; return -1; }
    static void fs_uring_rearm_wakeup(fs_uring *r) { (void)r; }
    static int fs_uring_deferred(fs_uring *r) { (void)r; return 0; }
    static int fs_uring_send_addr(fs_uring *r) { (void)r; return 0; }
    #define FS_OP_SEND 26
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

    /* A leg's connected twin (Linux, the io_uring backend): a second socket bound to the
     * leg's own address and port and connected to its latched remote end.  Sending on a
     * connected UDP socket reuses the route the kernel cached at connect(), where every
     * datagram sent with an address looks its route up again: about a fifth of the kernel's
     * cost per relayed packet on loopback.  The leg's own socket stays unconnected, so
     * datagrams from any other source still reach it (latching, a NAT rebinding, strays);
     * the kernel gives the twin only what comes from its peer (a connected socket is the
     * closer match).  SO_REUSEPORT is what lets the two share the port, set now and not at
     * bind time: the port allocator still sees every port it binds as taken, and the kernel
     * lets only sockets of the same user join the pair.  Returns the fd, or -1 (errno). */
    #if defined(__linux__)
    #include <sys/ioctl.h>
    static int fs_twin_open(int fd, const struct sockaddr_storage *peer, unsigned peerlen) {
        struct sockaddr_storage local;
        socklen_t len = (socklen_t)sizeof(local);
        int one = 1, v6only = 0, t, e;
        socklen_t vlen = (socklen_t)sizeof(v6only);
        memset(&local, 0, sizeof(local));
        if (getsockname(fd, (struct sockaddr *)&local, &len) != 0) return -1;
        if (setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0) return -1;
        t = socket(local.ss_family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (t < 0) return -1;
        if (local.ss_family == AF_INET6
                && getsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, &vlen) == 0)
            (void)setsockopt(t, IPPROTO_IPV6, IPV6_V6ONLY, &v6only, sizeof(v6only));
        if (setsockopt(t, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one)) != 0
                || bind(t, (struct sockaddr *)&local, len) != 0
                || connect(t, (const struct sockaddr *)peer, (socklen_t)peerlen) != 0) {
            e = errno;
            close(t);
            errno = e;
            return -1;
        }
        return t;
    }
    /* Point a twin at a new peer (a re-latched source). */
    static int fs_twin_connect(int t, const struct sockaddr_storage *peer, unsigned peerlen) {
        return connect(t, (const struct sockaddr *)peer, (socklen_t)peerlen);
    }
    /* Whether a datagram waits in fd's receive queue (-1: cannot tell). */
    static int fs_queued(int fd) {
        int n = 0;
        if (ioctl(fd, FIONREAD, &n) != 0) return -1;
        return n > 0;
    }
    #else
    static int fs_queued(int fd) { (void)fd; return -1; }
    static int fs_twin_open(int fd, const struct sockaddr_storage *peer, unsigned peerlen) {
        (void)fd; (void)peer; (void)peerlen; return -1;
    }
    static int fs_twin_connect(int t, const struct sockaddr_storage *peer, unsigned peerlen) {
        (void)t; (void)peer; (void)peerlen; return -1;
    }
    #endif
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
    int fs_recv_batch(int fd, fs_mmsg *v, unsigned int n) noexcept nogil
    int fs_send_batch(int fd, fs_mmsg *v, unsigned int n) noexcept nogil
    int fs_sock_family(int fd) noexcept nogil
    int fs_twin_open(int fd, const sockaddr_storage *peer, unsigned int peerlen) noexcept nogil
    int fs_twin_connect(int t, const sockaddr_storage *peer, unsigned int peerlen) noexcept nogil
    int fs_queued(int fd) noexcept nogil
    int FS_POLLSET, FS_POLL_MAX
    int fs_pollset_new() noexcept nogil
    int fs_pollset_add(int ps, int fd, void *ptr) noexcept nogil
    int fs_pollset_del(int ps, int fd) noexcept nogil
    int fs_pollset_ready(int ps, void **ready) noexcept nogil
    void fs_pollset_close(int ps) noexcept nogil

    int FS_URING
    ctypedef unsigned long long uint64_t
    ctypedef struct fs_uring:
        int fd
    ctypedef struct fs_cqe:
        uint64_t user_data
        int res
        unsigned int flags
    ctypedef struct fs_sqe:
        unsigned char opcode
        unsigned char flags
        unsigned short ioprio
        int fd
        uint64_t off                # addr2: IORING_OP_SEND's destination
        uint64_t addr
        unsigned int len
        unsigned int op_flags
        uint64_t user_data
        unsigned short buf_group
        unsigned int file_index     # its low 16 bits: addr_len
    ctypedef struct fs_recvmsg_out:
        unsigned int namelen
        unsigned int controllen
        unsigned int payloadlen
        unsigned int flags
    int FS_OP_SENDMSG, FS_OP_RECVMSG, FS_OP_ASYNC_CANCEL, FS_OP_READ, FS_OP_SEND
    int FS_SQE_BUFFER_SELECT, FS_SQE_CQE_SKIP_SUCCESS, FS_RECV_MULTISHOT
    unsigned int FS_CQE_F_BUFFER, FS_CQE_F_MORE, FS_CQE_BUFFER_SHIFT
    int FS_BGID
    int FS_DONTWAIT, ECANCELED
    unsigned int fs_uring_sq_entries(fs_uring *r) noexcept nogil
    int fs_uring_init(fs_uring *r, unsigned entries, unsigned cq_entries, unsigned nbufs,
                      unsigned buf_size, int try_defer, int threaded) noexcept nogil
    int fs_uring_enable(fs_uring *r) noexcept nogil
    int fs_uring_wait(fs_uring *r) noexcept nogil
    int fs_eventfd_new() noexcept nogil
    void fs_eventfd_signal(int fd) noexcept nogil
    void fs_fd_close(int fd) noexcept nogil
    void fs_uring_close(fs_uring *r) noexcept nogil
    void fs_uring_buf_return(fs_uring *r, unsigned bid) noexcept nogil
    void fs_uring_buf_publish(fs_uring *r) noexcept nogil
    unsigned char *fs_uring_buf(fs_uring *r, unsigned bid) noexcept nogil
    fs_sqe *fs_uring_sqe(fs_uring *r) noexcept nogil
    unsigned int fs_uring_pending(fs_uring *r) noexcept nogil
    int fs_uring_enter(fs_uring *r, int getevents) noexcept nogil
    fs_cqe *fs_uring_cqe(fs_uring *r) noexcept nogil
    void fs_uring_cq_advance(fs_uring *r) noexcept nogil
    int fs_uring_poll_fd(fs_uring *r) noexcept nogil
    void fs_uring_rearm_wakeup(fs_uring *r) noexcept nogil
    int fs_uring_deferred(fs_uring *r) noexcept nogil
    int fs_uring_send_addr(fs_uring *r) noexcept nogil


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
    # io_uring: the submission queue holds one wake-up round's sends (a full queue is
    # submitted early); completions have room for a burst of every leg; the buffer ring's
    # buffers (a power of two) each hold the recvmsg header, a source address and a slot.
    URING_ENTRIES = 1024
    URING_CQ_ENTRIES = 16384
    URING_BUFS = 4096
    URING_NAME = 128        # sizeof(sockaddr_storage): the name space in each buffer
    URING_HDR = 16          # sizeof(struct io_uring_recvmsg_out)
    URING_ROUNDS = 8        # reap/submit rounds per poll(): a busy ring cannot hold the loop
    MAX_FAILED_ARMS = 16    # a leg's receive failing this often in a row is given up
    # A completion's user_data: a leg's receive is (serial << 24 | slot); a failed send is
    # SEND_TAG | receiving slot << 24 | sending slot; a cancel's completion is ignored.
    SLOT_BITS = 24
    SLOT_MASK = (1 << 24) - 1

# A latched source that has sent nothing for this long may be replaced by a new one (a NAT
# rebinding or a moved endpoint), in LATCH_FIRST mode.  rtpengine also uses 3 s, differently:
# for 3 s after each offer/answer it follows the newest source, then confirms one for good
# (only its media-handover flag moves it later).  Counting from the latched source's last
# packet instead needs no signalling time here and still recovers from a NAT rebinding.
cdef double RELATCH_AFTER = 3.0

cdef unsigned long long SEND_TAG = 1ULL << 63
cdef unsigned long long CANCEL_TAG = 1ULL << 62
# Threaded: the completion of the read armed on the relay's wake-up eventfd (control work).
cdef unsigned long long WAKE_TAG = 1ULL << 61
# A receive on a leg's connected twin (see fs_twin_open): TWIN_TAG | serial << 24 | slot.
cdef unsigned long long TWIN_TAG = 1ULL << 60

LATCH_OFF = _LATCH_OFF
LATCH_FIRST = _LATCH_FIRST
LATCH_STRICT = _LATCH_STRICT

batched = bool(FS_BATCHED)
uring_compiled = bool(FS_URING)

#: Set to ``mmsg`` to make ``Relay(backend="auto")`` use recvmmsg/sendmmsg even where io_uring
#: works (a comparison, or a kernel whose io_uring misbehaves).
BACKEND_ENV = "FASTSIP_RELAY_BACKEND"
#: Set to ``0`` to make ``Relay(threaded=True)`` run on the caller's loop (fileno/poll)
#: instead of a thread of its own (a comparison).
THREAD_ENV = "FASTSIP_RELAY_THREAD"
#: Set to ``0`` to make an io_uring Relay send to latched sources from each leg's own socket
#: with the address, not from a connected twin (a comparison).
TWIN_ENV = "FASTSIP_RELAY_TWINS"


cdef inline double _wall_clock() noexcept nogil:
    """time.time() without a Python call: the `now` the packet thread stamps legs with."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


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
    # io_uring: this leg's index in Relay._slots, a serial no other leg ever gets (a stale
    # completion of a removed leg is recognised by it), and whether its receive is armed.
    cdef unsigned int slot
    cdef unsigned long long serial
    cdef bint armed
    cdef unsigned int failed_arms    # receives ended by an error since the last datagram
    # The connected twin (io_uring only; see fs_twin_open), or -1.  latch_version counts
    # the latched source's changes; the twin is connected to the source of twin_version, and
    # twin_refused names the version the twin failed for (none is tried again until the
    # source changes).  Its receive is armed in the ring like the leg's own.
    cdef int twin_fd
    cdef unsigned long long latch_version, twin_version, twin_refused
    cdef bint twin_armed
    cdef bint twin_waiting           # in Relay._twins_waiting: its receive is not armed yet
    cdef unsigned int twin_failed_arms

    def __cinit__(self):
        self.twin_fd = -1

    def __dealloc__(self):
        fs_fd_close(self.twin_fd)

    cdef inline bint twin_current(self) noexcept:
        """Whether the twin is open and connected to the latched source as it is now."""
        return self.twin_fd >= 0 and self.twin_version == self.latch_version

    cdef inline const sockaddr_storage *remote(self) noexcept:
        """Where datagrams for this leg's remote end go now, or NULL."""
        if self.latched and self.latching != _LATCH_OFF:
            return &self.latched_addr
        if self.has_sdp_peer:
            return &self.sdp_peer
        return NULL


cdef inline unsigned long long _receive_ud(_Leg leg, bint twin) noexcept:
    """The user_data of ``leg``'s receive in the ring (on its twin's socket with ``twin``),
    which its completions and its cancel name."""
    return (TWIN_TAG if twin else 0) | (leg.serial << SLOT_BITS) | leg.slot


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
    # The io_uring backend (see the C block): the ring, whether receives are armed in it (from
    # the first fileno()/poll(): until then drain() reads the fds directly), legs by slot,
    # per-send headers and address copies (one per submission queue entry), and the
    # buffers to give back to the kernel once the sends reading them are submitted.
    cdef fs_uring _ring
    cdef bint _uring
    cdef bint _armed
    cdef list _slots
    cdef list _free_slots
    cdef unsigned long long _serial
    cdef fs_msghdr _urecv
    cdef fs_mmsg *_usend
    cdef fs_iovec *_usiov
    cdef sockaddr_storage *_udst
    cdef unsigned int _nusend
    cdef unsigned int _usend_max
    cdef unsigned short *_bids
    cdef unsigned int _nbids
    # Threaded (io_uring only): the packet loop runs in a thread of the Relay's own, which is
    # the ring's single issuer.  The GIL is the lock between it and control: the thread
    # waits for completions without it and reaps/relays/submits with it, so add_leg,
    # remove_leg, stats ... (Python, holding the GIL) never see a half-done batch.  Control
    # never touches the ring then: legs to arm and receives to cancel wait in these lists and
    # the eventfd wakes the thread (a read armed in the ring), which queues them.
    cdef bint _threaded
    cdef bint _stopping
    cdef bint _wake_armed
    cdef int _wakefd
    cdef unsigned long long _wakeval
    cdef list _to_arm
    cdef list _to_cancel
    # Twins whose receive waits for the leg's own socket to be drained (see _twin).
    cdef list _twins_waiting
    cdef bint _twins                 # connected twins in use (TWIN_ENV)
    cdef object _thread
    cdef object _thread_error

    def __cinit__(self):
        self._wakefd = -1
        self._pollset = -1
        self._uring = False
        self._usend = NULL
        self._usiov = NULL
        self._udst = NULL
        self._bids = NULL
        self._buf = NULL
        self._riov = self._siov = NULL
        self._src = NULL
        self._rmsg = self._smsg = NULL

    def __init__(self, int batch=64, *, int max_batches=8, str backend="auto",
                 bint threaded=False):
        cdef unsigned int i
        cdef int rc
        if batch < 1 or batch > 1024:
            raise ValueError("batch must be 1..1024")
        if max_batches < 1:
            raise ValueError("max_batches must be positive")
        if backend not in ("auto", "io_uring", "io_uring_coop", "mmsg"):
            raise ValueError(f"unknown backend {backend!r}")
        if backend == "auto" and os.environ.get(BACKEND_ENV, "") == "mmsg":
            backend = "mmsg"
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
        self._slots = []
        self._free_slots = []
        self._to_arm = []
        self._to_cancel = []
        self._twins_waiting = []
        self._twins = os.environ.get(TWIN_ENV, "") != "0"
        if threaded and os.environ.get(THREAD_ENV, "") == "0":
            threaded = False
        if backend != "mmsg":
            rc = fs_uring_init(&self._ring, URING_ENTRIES, URING_CQ_ENTRIES, URING_BUFS,
                               URING_HDR + URING_NAME + SLOT_SIZE,
                               backend != "io_uring_coop", threaded) if FS_URING else -38
            if rc == 0:
                self._uring = True
                if threaded:
                    self._wakefd = fs_eventfd_new()
                    if self._wakefd < 0:
                        raise OSError(errno, os.strerror(errno))
                    self._threaded = True
                self._usend_max = fs_uring_sq_entries(&self._ring)
                self._usend = <fs_mmsg *>calloc(self._usend_max, sizeof(fs_mmsg))
                self._usiov = <fs_iovec *>calloc(self._usend_max, sizeof(fs_iovec))
                self._udst = <sockaddr_storage *>calloc(self._usend_max,
                                                        sizeof(sockaddr_storage))
                self._bids = <unsigned short *>calloc(URING_BUFS, sizeof(unsigned short))
                if (self._usend == NULL or self._usiov == NULL or self._udst == NULL
                        or self._bids == NULL):
                    raise MemoryError()
                for i in range(self._usend_max):
                    self._usend[i].msg_hdr.msg_iov = &self._usiov[i]
                    self._usend[i].msg_hdr.msg_iovlen = 1
                    self._usend[i].msg_hdr.msg_name = &self._udst[i]
                # The multishot receive's template: room for the source address, no control.
                memset(&self._urecv, 0, sizeof(self._urecv))
                self._urecv.msg_namelen = URING_NAME
                return
            if backend != "auto":
                raise OSError(-rc, f"io_uring unavailable: {os.strerror(-rc)}")
        if FS_POLLSET:
            self._pollset = fs_pollset_new()
            if self._pollset < 0:
                raise OSError(errno, os.strerror(errno))

    def __dealloc__(self):
        # A running thread holds a reference: a Relay being freed has none (or it ended).
        fs_fd_close(self._wakefd)
        if self._pollset >= 0:
            fs_pollset_close(self._pollset)
        if self._uring:
            fs_uring_close(&self._ring)
        free(self._usend)
        free(self._usiov)
        free(self._udst)
        free(self._bids)
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
        if self._uring:
            self._serial += 1
            new.serial = self._serial
            if self._free_slots:
                new.slot = self._free_slots.pop()
                self._slots[new.slot] = new
            else:
                new.slot = len(self._slots)
                self._slots.append(new)
            if self._armed:
                if self._threaded:
                    self._to_arm.append(new)
                    fs_eventfd_signal(self._wakefd)
                else:
                    self._arm(new)
                    self._flush()

    def set_peer(self, leg, str host, int port):
        """The remote end of ``leg`` as SDP gives it (an IP literal, no DNS).  Until a source
        is latched, datagrams for this leg's remote go here.  A new SDP address forgets the
        latched source: the remote is learned again, as rtpengine does after each signal."""
        cdef _Leg target = self._get(leg)
        cdef sockaddr_storage addr
        if not 0 < port < 65536:
            raise ValueError(f"port {port} out of range")
        sockaddr_from_ip(&addr, ipaddress.ip_address(host), port)
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
        if self._uring:
            self._slots[gone.slot] = None
            self._free_slots.append(gone.slot)
            if self._threaded:
                # The thread cancels it (its own ring) at once; until then the ring's
                # reference keeps the socket, not its fd number, and the closed-over fd is
                # never armed again (a leg to arm is checked against its slot first).  The
                # twin's fd is closed here the same way: the thread submits every send it
                # queues before it lets go of the GIL, so none names it afterwards.
                if gone.armed:
                    self._to_cancel.append(_receive_ud(gone, False))
                    gone.armed = False
                if gone.twin_armed:
                    self._to_cancel.append(_receive_ud(gone, True))
                    gone.twin_armed = False
                if self._to_cancel:
                    fs_eventfd_signal(self._wakefd)
            elif gone.armed or gone.twin_armed:
                # Cancel the multishot receives now: the shell closes the fd next, and the
                # ring's reference would keep the socket (and its port) alive.  With a twin,
                # the cancels must also complete (getevents runs deferred completions) before
                # it is closed: until its last reference goes it still takes its peer's
                # datagrams from the leg's own socket.
                self._cancel(gone)
                self._flush(gone.twin_fd >= 0)
                fs_uring_rearm_wakeup(&self._ring)   # for what that enter received
        fs_fd_close(gone.twin_fd)
        gone.twin_fd = -1
        if gone.partner is not None:
            gone.partner.partner = None
            gone.partner = None

    @property
    def legs(self):
        return len(self._legs)

    def stats(self, leg):
        """Counters of what ``leg`` received; see the stub for the keys."""
        cdef _Leg target = self._get(leg)
        # One snapshot, read in C before any Python call (which could let the packet thread
        # run between two fields): the counters agree with each other.
        cdef unsigned long long packets = target.packets, nbytes = target.bytes
        cdef unsigned long long errors = target.errors, sent = target.sent
        cdef double last_packet = target.last_packet
        cdef sockaddr_storage remote_copy, sdp_copy
        cdef const sockaddr_storage *remote = target.remote()
        cdef bint has_remote = remote != NULL, has_sdp = target.has_sdp_peer
        cdef bint latched = target.latched, has_ssrc = target.has_ssrc
        # sends go out of the twin, connected to the latched source (io_uring)
        cdef bint connected = latched and target.twin_current()
        cdef unsigned int ssrc = target.ssrc
        rtp = target.rtp
        if has_remote:
            memcpy(&remote_copy, remote, sizeof(sockaddr_storage))
        if has_sdp:
            memcpy(&sdp_copy, &target.sdp_peer, sizeof(sockaddr_storage))
        rtp_figures = None
        if not target.rtcp:
            rtp_figures = (rtp.cumulative_lost, rtp.jitter_seconds, rtp.expected, rtp.received)
        result = {
            "packets": packets,
            "bytes": nbytes,
            "errors": errors,
            "sent": sent,
            "last_packet": last_packet,
            "peer": address_tuple(&remote_copy) if has_remote else None,
            "sdp_peer": address_tuple(&sdp_copy) if has_sdp else None,
            "latched": bool(latched),
            "connected": bool(connected),
        }
        if rtp_figures is not None:
            result["ssrc"] = ssrc if has_ssrc else None
            result["lost"] = rtp_figures[0]
            result["jitter"] = rtp_figures[1] * 1000.0
            result["expected"] = rtp_figures[2]
            result["received"] = rtp_figures[3]
        return result

    @property
    def backend(self):
        """``io_uring`` or ``mmsg`` (recvmmsg/sendmmsg, or their per-datagram emulation)."""
        return "io_uring" if self._uring else "mmsg"

    @property
    def threaded(self):
        """Whether the packet loop runs in a thread of its own (:meth:`start`): io_uring and
        ``threaded=True`` asked (and FASTSIP_RELAY_THREAD not ``0``).  Then fileno() is -1
        and poll()/drain() are not used: nothing to watch on the caller's loop."""
        return bool(self._threaded)

    def start(self):
        """Threaded: start the packet thread (once); returns when its ring is enabled and
        every leg's receive armed.  OSError if the ring cannot be enabled."""
        import threading

        if not self._threaded:
            raise RuntimeError("start() is for a threaded Relay")
        if self._thread is not None:
            return
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name="fastsip-relay", daemon=True)
        self._thread.start()
        ready.wait()
        if self._thread_error is not None:
            self._thread.join()
            raise self._thread_error

    def stop(self):
        """Threaded: end the packet thread and wait for it (receives already cancelled by
        remove_leg are submitted first).  The Relay relays nothing afterwards."""
        thread = self._thread
        if thread is None or self._stopping:
            return
        self._stopping = True
        fs_eventfd_signal(self._wakefd)
        thread.join()

    def _run(self, ready):
        """The packet thread's body: wait for completions without the GIL, then relay what
        came in with it held (see _threaded)."""
        cdef int rc, failures = 0
        with nogil:
            rc = fs_uring_enable(&self._ring)
        if rc < 0:
            self._thread_error = OSError(-rc, f"io_uring: {os.strerror(-rc)}")
            ready.set()
            return
        self._arm_all()
        self._arm_wake()
        self._flush()
        ready.set()
        while not self._stopping:
            with nogil:
                rc = fs_uring_wait(&self._ring)
            if rc < 0 and rc != -EINTR and rc != -EAGAIN and rc != -EBUSY:
                # not a signal or a full CQ: a ring that fails every wait would spin a core
                failures += 1
                if failures > 1000:
                    self._thread_error = OSError(-rc, f"io_uring: {os.strerror(-rc)}")
                    break
            else:
                failures = 0
            self._control()
            self._uring_poll(_wall_clock(), True)
        self._control()
        self._flush()

    cdef void _control(self) noexcept:
        """Threaded: queue the receives control asked to arm or cancel since the last call."""
        cdef _Leg leg
        while self._to_cancel:
            self._cancel_ud(self._to_cancel.pop())
        while self._to_arm:
            leg = <_Leg>self._to_arm.pop()
            # removed meanwhile (its fd may be closed, its number someone else's): skip
            if not leg.armed and self._slot_leg(leg.slot) is leg:
                self._arm(leg)
        if not self._wake_armed:
            self._arm_wake()

    cdef void _arm_wake(self) noexcept:
        cdef fs_sqe *sqe = self._sqe()
        if sqe == NULL:
            return
        sqe.opcode = FS_OP_READ
        sqe.fd = self._wakefd
        sqe.addr = <uint64_t>&self._wakeval
        sqe.len = sizeof(unsigned long long)
        sqe.user_data = WAKE_TAG
        self._wake_armed = True

    @property
    def deferred(self):
        """io_uring: whether receives run batched in our io_uring_enter (DEFER_TASKRUN, Linux
        6.1; else COOP_TASKRUN, as ``backend="io_uring_coop"`` asks, or Linux 6.0 gets)."""
        return bool(self._uring and fs_uring_deferred(&self._ring))

    def fileno(self):
        """The descriptor to watch for :meth:`poll`, or -1: then watch each leg's fd and call
        :meth:`drain`.  With io_uring it is the ring, and from this call on every leg's
        receive lives in the ring (drain() then finds nothing); with recvmmsg it is an epoll
        set of every leg's fd (Linux)."""
        if self._threaded:
            return -1
        if self._uring:
            self._arm_all()
            return fs_uring_poll_fd(&self._ring)
        return self._pollset

    def poll(self, double now):
        """Drain every leg that is readable now (each up to its budget); returns how many
        datagrams were read.  One call per loop wake-up however many streams are busy."""
        cdef void *ready[FS_POLL_MAX_C]
        cdef Py_ssize_t total = 0
        cdef int n, i, _round
        if self._threaded:
            return 0
        if self._uring:
            self._arm_all()
            return self._uring_poll(now)
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
        cdef unsigned int length
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
            dstlen = sockaddr_len(dst) if can_send else 0
            nsend = 0
            for i in range(n):
                msg = &self._rmsg[i]
                if msg.msg_hdr.msg_flags & FS_TRUNC:
                    leg.errors += 1       # longer than a slot: dropped, never relayed cut
                    continue
                length = msg.msg_len
                data = self._buf + i * SLOT_SIZE
                if not self._accept(leg, &self._src[i], data, length, now):
                    continue
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

    cdef inline bint _accept(self, _Leg leg, const sockaddr_storage *src,
                             const unsigned char *data, unsigned int length,
                             double now) noexcept:
        """Count a received datagram, latch or check its source, update the RFC 3550
        figures.  False: dropped (strict latching), counted as an error."""
        cdef unsigned int ssrc
        leg.packets += 1
        leg.bytes += length
        if not self._admit(leg, src, data, length, now):
            leg.errors += 1
            return False
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
        return True

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
            leg.latch_version += 1
            return True
        if same_address(src, &leg.latched_addr):
            leg.latched_last = now
            return True
        if leg.latching == _LATCH_STRICT:
            return False
        if now - leg.latched_last >= RELATCH_AFTER:
            # the latched source fell silent: follow the new one (NAT rebinding, handover)
            memcpy(&leg.latched_addr, src, sizeof(sockaddr_storage))
            leg.latched_last = now
            leg.latch_version += 1
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

    # -- io_uring ------------------------------------------------------------------------

    cdef void _arm_all(self) noexcept:
        """Arm every leg's receive in the ring (once: the first fileno()/poll())."""
        cdef _Leg leg
        if self._armed:
            return
        self._armed = True
        for obj in self._slots:
            if obj is not None:
                leg = <_Leg>obj
                if not leg.armed:
                    self._arm(leg)
        self._flush()

    cdef fs_sqe *_sqe(self) noexcept:
        """A submission queue entry; a full queue is submitted first."""
        cdef fs_sqe *sqe = fs_uring_sqe(&self._ring)
        if sqe == NULL:
            self._flush()
            sqe = fs_uring_sqe(&self._ring)
        return sqe

    cdef bint _arm_receive(self, int fd, unsigned long long user_data) noexcept:
        """Queue a multishot receive on ``fd``: every datagram its socket gets becomes a
        completion in a provided buffer, until it ends (no buffer left, an error, a cancel).
        False: no submission entry."""
        cdef fs_sqe *sqe = self._sqe()
        if sqe == NULL:
            return False
        sqe.opcode = FS_OP_RECVMSG
        sqe.fd = fd
        sqe.addr = <uint64_t>&self._urecv
        sqe.len = 1
        sqe.ioprio = FS_RECV_MULTISHOT
        sqe.flags = FS_SQE_BUFFER_SELECT
        sqe.buf_group = FS_BGID
        sqe.user_data = user_data
        return True

    cdef void _arm(self, _Leg leg) noexcept:
        """Queue ``leg``'s receive (on its own socket)."""
        if self._arm_receive(leg.fd, _receive_ud(leg, False)):
            leg.armed = True

    cdef void _cancel(self, _Leg leg) noexcept:
        """Queue the cancel of ``leg``'s receives (its own socket's and its twin's)."""
        if leg.armed:
            self._cancel_ud(_receive_ud(leg, False))
            leg.armed = False
        if leg.twin_armed:
            self._cancel_ud(_receive_ud(leg, True))
            leg.twin_armed = False

    cdef void _arm_twin(self, _Leg leg) noexcept:
        """Queue the receive of ``leg``'s twin."""
        if self._arm_receive(leg.twin_fd, _receive_ud(leg, True)):
            leg.twin_armed = True

    cdef int _twin(self, _Leg leg) noexcept:
        """The fd to send ``leg``'s datagrams from, connected to its latched remote end: the
        twin, opened or re-connected here when the source changed; -1 when there is none
        (not latched, latching off, or the twin failed for this source): then leg.fd sends
        with the address.  Only a latched source gets one: it has sent us datagrams, so it
        is there (an SDP address may have nothing listening, and a connected socket would
        collect the ICMP errors of every send)."""
        cdef int fd
        cdef unsigned int peerlen
        if not leg.latched or leg.latching == _LATCH_OFF or not self._twins:
            return -1
        if leg.twin_current():
            return leg.twin_fd
        if leg.twin_refused == leg.latch_version:
            return -1
        peerlen = sockaddr_len(&leg.latched_addr)
        if leg.twin_fd < 0:
            fd = fs_twin_open(leg.fd, &leg.latched_addr, peerlen)
            if fd < 0:
                leg.twin_refused = leg.latch_version
                return -1
            leg.twin_fd = fd
            leg.twin_failed_arms = 0
        elif fs_twin_connect(leg.twin_fd, &leg.latched_addr, peerlen) != 0:
            self._close_twin(leg)
            return -1
        leg.twin_version = leg.latch_version
        if not leg.twin_armed and not leg.twin_waiting:
            # From connect() on, the peer's datagrams come in on the twin, and the ones that
            # came before may still wait on the leg's own socket.  Reading both at once would
            # relay some out of order (a burst at the switch, seen in tests), so the twin's
            # receive is armed only once the leg's socket is drained (_arm_waiting_twins).
            leg.twin_failed_arms = 0
            leg.twin_waiting = True
            self._twins_waiting.append(leg)
        return leg.twin_fd

    cdef void _arm_waiting_twins(self) noexcept:
        """Arm the receive of each waiting twin whose leg's own socket has nothing left to
        read (or is not read at all any more); the others wait for the next poll."""
        cdef list still = []
        cdef _Leg leg
        for obj in self._twins_waiting:
            leg = <_Leg>obj
            if leg.twin_fd < 0 or leg.twin_armed or self._slot_leg(leg.slot) is not leg:
                leg.twin_waiting = False              # closed, or the leg removed
            elif leg.armed and fs_queued(leg.fd) > 0:
                still.append(leg)
            else:
                leg.twin_waiting = False
                self._arm_twin(leg)
        self._twins_waiting = still

    cdef void _close_twin(self, _Leg leg) noexcept:
        """Give ``leg``'s twin up for its current source: cancel its receive, submit what
        is queued (sends may name its fd), close it."""
        if leg.twin_fd < 0:
            return
        if leg.twin_armed:
            self._cancel_ud(_receive_ud(leg, True))
            leg.twin_armed = False
        self._flush()
        fs_fd_close(leg.twin_fd)
        leg.twin_fd = -1
        leg.twin_refused = leg.latch_version

    cdef void _cancel_ud(self, unsigned long long ud) noexcept:
        cdef fs_sqe *sqe = self._sqe()
        if sqe == NULL:
            return
        sqe.opcode = FS_OP_ASYNC_CANCEL
        sqe.fd = -1
        sqe.addr = ud
        sqe.flags = FS_SQE_CQE_SKIP_SUCCESS
        sqe.user_data = CANCEL_TAG

    cdef void _flush(self, bint getevents=False) noexcept:
        """Submit what is queued (sends, receives to arm, cancels): one io_uring_enter, which
        with ``getevents`` (DEFER_TASKRUN) also runs the receives that came in.  The sends are
        non-blocking and run inside the call, so afterwards the buffers they read go back to
        the kernel."""
        cdef unsigned int i
        cdef int rc, tries = 0
        while (getevents or fs_uring_pending(&self._ring)) and tries < 4:
            rc = fs_uring_enter(&self._ring, getevents)
            if rc >= 0 or (rc != -EINTR and rc != -EAGAIN and rc != -EBUSY):
                break
            tries += 1
        for i in range(self._nbids):
            fs_uring_buf_return(&self._ring, self._bids[i])
        if self._nbids:
            fs_uring_buf_publish(&self._ring)
        self._nbids = 0
        self._nusend = 0

    cdef _Leg _slot_leg(self, unsigned long long slot):
        if slot >= <unsigned long long>len(self._slots):
            return None
        return <_Leg>self._slots[slot]

    cdef Py_ssize_t _uring_poll(self, double now, bint waited=False) noexcept:
        """Reap the ring's completions: relay each received datagram (its send queued),
        re-arm receives that ended; submit; again while completions come (bounded)."""
        cdef Py_ssize_t total = 0
        cdef fs_cqe *cqe
        cdef unsigned long long ud
        cdef int res, _round
        cdef unsigned int flags, bid, reaped
        cdef bint twin
        cdef _Leg leg, other
        cdef bint defer = fs_uring_deferred(&self._ring)
        for _round in range(URING_ROUNDS):
            if defer and not (waited and _round == 0):
                # submit the last round's sends; run the receives that came in (a thread
                # that waited in io_uring_enter ran them there already)
                self._flush(True)
            reaped = 0
            while True:
                cqe = fs_uring_cqe(&self._ring)
                if cqe == NULL:
                    break
                ud = cqe.user_data
                res = cqe.res
                flags = cqe.flags
                fs_uring_cq_advance(&self._ring)
                reaped += 1
                if ud & SEND_TAG:
                    # a send failed (success posts nothing): the datagram is an error of the
                    # leg it came in on, and was not sent after all
                    leg = self._slot_leg((ud >> SLOT_BITS) & SLOT_MASK)
                    other = self._slot_leg(ud & SLOT_MASK)
                    if leg is not None:
                        leg.errors += 1
                    if other is not None and other.sent:
                        other.sent -= 1
                    continue
                if ud & CANCEL_TAG:
                    continue
                if ud & WAKE_TAG:
                    self._wake_armed = False
                    if not self._stopping:
                        self._arm_wake()
                    continue
                # the leg's own socket, or its twin: either way the datagram is the leg's
                twin = (ud & TWIN_TAG) != 0
                ud &= ~TWIN_TAG
                leg = self._slot_leg(ud & SLOT_MASK)
                if leg is not None and leg.serial != ud >> SLOT_BITS:
                    leg = None            # a removed leg's last completion
                if flags & FS_CQE_F_BUFFER:
                    bid = flags >> FS_CQE_BUFFER_SHIFT
                    if leg is not None and res >= 0:
                        total += 1
                        if twin:
                            leg.twin_failed_arms = 0
                        else:
                            leg.failed_arms = 0
                        self._uring_packet(leg, fs_uring_buf(&self._ring, bid), now)
                    # given back after the next submit (a queued send reads it until then)
                    self._bids[self._nbids] = <unsigned short>bid
                    self._nbids += 1
                elif leg is not None and res < 0 and res != -ENOBUFS and res != -ECANCELED:
                    # (on a twin, typically ECONNREFUSED: an ICMP port unreachable for a
                    # datagram sent to its peer)
                    leg.errors += 1
                    if twin:
                        leg.twin_failed_arms += 1
                    else:
                        leg.failed_arms += 1
                if leg is not None and not (flags & FS_CQE_F_MORE):
                    # The receive ended (out of buffers, an error): arm it again -- unless it
                    # keeps failing at once, which would spin the loop (counted as errors).
                    # A twin failing so is closed instead: its peer's datagrams go back to
                    # the leg's own socket, and sends to it carry the address again.
                    if twin:
                        leg.twin_armed = False
                        if leg.twin_fd >= 0:
                            if leg.twin_failed_arms < MAX_FAILED_ARMS:
                                self._arm_twin(leg)
                            else:
                                self._close_twin(leg)
                    else:
                        leg.armed = False
                        if leg.failed_arms < MAX_FAILED_ARMS:
                            self._arm(leg)
            if reaped == 0:
                break
            if not defer:
                self._flush()
        if self._twins_waiting:
            self._arm_waiting_twins()
        self._flush()
        fs_uring_rearm_wakeup(&self._ring)
        return total

    cdef void _uring_packet(self, _Leg leg, unsigned char *buf, double now) noexcept:
        """One received datagram in a provided buffer: account for it and queue its send."""
        cdef fs_recvmsg_out *hdr = <fs_recvmsg_out *>buf
        cdef const sockaddr_storage *src = <const sockaddr_storage *>(buf + URING_HDR)
        cdef const unsigned char *data = buf + URING_HDR + URING_NAME
        cdef unsigned int length = hdr.payloadlen
        cdef _Leg out
        cdef const sockaddr_storage *dst
        cdef int twin_fd
        cdef fs_sqe *sqe
        leg.last_packet = now
        if hdr.flags & FS_TRUNC or length > SLOT_SIZE:
            leg.errors += 1               # longer than a slot: dropped, never relayed cut
            return
        if not self._accept(leg, src, data, length, now):
            return
        out = leg.partner
        dst = out.remote() if out is not None else NULL
        if dst == NULL or dst.ss_family != out.family:
            leg.errors += 1               # no bridge, no remote yet, or a family mismatch
            return
        twin_fd = self._twin(out)         # before taking an entry: it may submit the queue
        if twin_fd < 0 and self._nusend >= self._usend_max:
            self._flush()                 # the address copies are all in use
        sqe = self._sqe()
        if sqe == NULL:
            leg.errors += 1
            return
        if twin_fd >= 0:
            # connected to exactly this remote end: no address, the cached route
            sqe.fd = twin_fd
            sqe.opcode = FS_OP_SEND
            sqe.addr = <uint64_t>data
            sqe.len = length
            sqe.off = 0
            sqe.file_index = 0
        else:
            self._queue_addressed_send(sqe, out, dst, data, length)
        # MSG_DONTWAIT: a full send buffer fails the send (counted), as sendmmsg's does,
        # instead of io_uring parking it until the socket is writable.
        sqe.op_flags = FS_DONTWAIT
        sqe.flags = FS_SQE_CQE_SKIP_SUCCESS
        sqe.user_data = SEND_TAG | (<unsigned long long>leg.slot << SLOT_BITS) | out.slot
        out.sent += 1

    cdef inline void _queue_addressed_send(self, fs_sqe *sqe, _Leg out,
                                           const sockaddr_storage *dst,
                                           const unsigned char *data,
                                           unsigned int length) noexcept:
        """Fill ``sqe`` to send ``data`` from ``out``'s own socket to ``dst``."""
        cdef unsigned int i, dstlen
        # The address is copied: a later datagram of this round may re-latch the partner.
        dstlen = sockaddr_len(dst)
        i = self._nusend
        self._nusend += 1
        memcpy(&self._udst[i], dst, dstlen)
        sqe.fd = out.fd
        if fs_uring_send_addr(&self._ring):
            sqe.opcode = FS_OP_SEND
            sqe.addr = <uint64_t>data
            sqe.len = length
            sqe.off = <uint64_t>&self._udst[i]
            sqe.file_index = dstlen
        else:
            self._usend[i].msg_hdr.msg_namelen = dstlen
            self._usiov[i].iov_base = <void *>data
            self._usiov[i].iov_len = length
            sqe.opcode = FS_OP_SENDMSG
            sqe.addr = <uint64_t>&self._usend[i].msg_hdr
            sqe.len = 1
