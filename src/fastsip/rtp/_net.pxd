# cython: language_level=3
"""The socket glue of the compiled packet paths (``_relay``, ``_sender``, ``_receiver``, and the
SIP shell's UDP socket in ``fastsip.asyncio._udp``): the platform's headers, what a failed call
means, the sockaddr types they touch, and the conversions between an IP address and a
``sockaddr_storage`` -- one home, compiled into each module that cimports it (a
declarations-only .pxd: there is no ``_net`` extension module)."""

from libc.string cimport memcmp, memcpy, memset

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
    #include <stdio.h>
    #include <string.h>
    #include <sys/types.h>
    #include <sys/socket.h>
    #include <sys/uio.h>
    #include <netinet/in.h>
    #include <arpa/inet.h>
    #include <net/if.h>
    #endif

    /* What a failed socket call means to a packet path. */
    #define FS_ERR_AGAIN 1   /* nothing (more) to read, or no room to send: stop this batch */
    #define FS_ERR_INTR 2    /* a signal: try again */
    #define FS_ERR_OTHER 3   /* this datagram alone was refused (unreachable, EPERM...) */

    #if defined(__linux__)
    /* Point msgs[0..n) at consecutive slots of buf (slot octets each) through iov, and at
     * addrs for their sources: what recvmmsg needs, for the media receiver and the SIP
     * socket alike (a caller adds control buffers after). */
    static void fs_mmsg_slots(struct mmsghdr *msgs, struct iovec *iov, unsigned int n,
                              void *buf, size_t slot, struct sockaddr_storage *addrs) {
        unsigned int i;
        memset(msgs, 0, sizeof(struct mmsghdr) * n);
        for (i = 0; i < n; i++) {
            iov[i].iov_base = (char *)buf + (size_t)i * slot;
            iov[i].iov_len = slot;
            msgs[i].msg_hdr.msg_name = &addrs[i];
            msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
    }
    #endif

    /* The error number of the last failed socket call (read it before anything else runs). */
    static int fs_errno(void) {
    #if defined(_WIN32)
        return WSAGetLastError();
    #else
        return errno;
    #endif
    }

    static int fs_error_class(int e) {
    #if defined(_WIN32)
        if (e == WSAEWOULDBLOCK || e == WSAENOBUFS) return FS_ERR_AGAIN;
        if (e == WSAEINTR) return FS_ERR_INTR;
    #else
        if (e == EAGAIN || e == EWOULDBLOCK || e == ENOBUFS) return FS_ERR_AGAIN;
        if (e == EINTR) return FS_ERR_INTR;
    #endif
        return FS_ERR_OTHER;
    }

    static int fs_last_error(void) {
        return fs_error_class(fs_errno());
    }

    /* The printable address of an IPv4/IPv6 sockaddr into out, and its port; -1 for any
       other family (or an address inet_ntop refuses). */
    static int fs_sockaddr_name(const struct sockaddr_storage *a, char *out,
                                unsigned int outlen) {
        if (a->ss_family == AF_INET) {
            const struct sockaddr_in *v4 = (const struct sockaddr_in *)a;
            if (inet_ntop(AF_INET, (void *)&v4->sin_addr, out, outlen) == NULL) return -1;
            return ntohs(v4->sin_port);
        }
        if (a->ss_family == AF_INET6) {
            const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)a;
            if (inet_ntop(AF_INET6, (void *)&v6->sin6_addr, out, outlen) == NULL) return -1;
            return ntohs(v6->sin6_port);
        }
        return -1;
    }

    /* addr for an IP literal of family (no brackets, no zone) and a port: its length, or 0
       when host is not such a literal. */
    static unsigned int fs_sockaddr_from_text(struct sockaddr_storage *addr, int family,
                                              const char *host, int port) {
        memset(addr, 0, sizeof(struct sockaddr_storage));
        if (family == AF_INET) {
            struct sockaddr_in *v4 = (struct sockaddr_in *)addr;
            if (inet_pton(AF_INET, host, &v4->sin_addr) != 1) return 0;
            v4->sin_family = AF_INET;
            v4->sin_port = htons((unsigned short)port);
            return (unsigned int)sizeof(struct sockaddr_in);
        }
        if (family == AF_INET6) {
            struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)addr;
            if (inet_pton(AF_INET6, host, &v6->sin6_addr) != 1) return 0;
            v6->sin6_family = AF_INET6;
            v6->sin6_port = htons((unsigned short)port);
            return (unsigned int)sizeof(struct sockaddr_in6);
        }
        return 0;
    }

    /* The printable source address (as Python's socket module gives it: an IPv6 scope as
       "%" and the interface's name, or its number) into out; its length, or -1. */
    static int fs_source_name(const struct sockaddr_storage *a, char *out, unsigned int outlen) {
        size_t n;
        if (fs_sockaddr_name(a, out, outlen) < 0) return -1;
        n = strlen(out);
        if (a->ss_family == AF_INET6) {
            unsigned int scope = ((const struct sockaddr_in6 *)a)->sin6_scope_id;
            if (scope != 0 && n + 1 + 16 < outlen) {
                out[n++] = '%';
    #if defined(_WIN32)
                n += (size_t)sprintf(out + n, "%u", scope);
    #else
                if (if_indextoname(scope, out + n) != NULL) n = strlen(out);
                else n += (size_t)snprintf(out + n, outlen - n, "%u", scope);
    #endif
            }
        }
        return (int)n;
    }
    """
    int FS_ERR_AGAIN, FS_ERR_INTR, FS_ERR_OTHER
    int fs_last_error() noexcept nogil
    int fs_errno() noexcept nogil
    int fs_error_class(int e) noexcept nogil
    # Only the fields the packet paths read or write; the C headers above bring the full types.
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
    int fs_sockaddr_name(const sockaddr_storage *a, char *out, unsigned int outlen) noexcept nogil
    unsigned int fs_sockaddr_from_text(sockaddr_storage *addr, int family, const char *host,
                                       int port) noexcept nogil
    int fs_source_name(const sockaddr_storage *a, char *out, unsigned int outlen) noexcept nogil


cdef inline unsigned int sockaddr_from_ip(sockaddr_storage *addr, object ip, int port) except 0:
    """Fill ``addr`` from an ``ipaddress`` address and a port (1..65535, checked by the
    caller); returns its length.  A numeric IPv6 zone becomes the scope id; a named one is
    left for the caller to refuse or ignore (resolving it is not the packet path's job)."""
    cdef bytes packed = ip.packed
    memset(addr, 0, sizeof(sockaddr_storage))
    if ip.version == 4:
        (<sockaddr_in *>addr).sin_family = AF_INET
        (<sockaddr_in *>addr).sin_port = htons(port)
        memcpy(&(<sockaddr_in *>addr).sin_addr, <const char *>packed, 4)
        return sizeof(sockaddr_in)
    (<sockaddr_in6 *>addr).sin6_family = AF_INET6
    (<sockaddr_in6 *>addr).sin6_port = htons(port)
    memcpy(&(<sockaddr_in6 *>addr).sin6_addr, <const char *>packed, 16)
    if ip.scope_id is not None and ip.scope_id.isdigit():
        (<sockaddr_in6 *>addr).sin6_scope_id = int(ip.scope_id)
    return sizeof(sockaddr_in6)


cdef inline bint same_host(const sockaddr_storage *a, const sockaddr_storage *b) noexcept:
    """Same family and address (and IPv6 scope), whatever the ports: one host, as a source's
    printable name (fs_source_name) tells it."""
    if a.ss_family != b.ss_family:
        return False
    if a.ss_family == AF_INET:
        return memcmp(&(<const sockaddr_in *>a).sin_addr,
                      &(<const sockaddr_in *>b).sin_addr, 4) == 0
    if a.ss_family == AF_INET6:
        return (memcmp(&(<const sockaddr_in6 *>a).sin6_addr,
                       &(<const sockaddr_in6 *>b).sin6_addr, 16) == 0
                and (<const sockaddr_in6 *>a).sin6_scope_id
                == (<const sockaddr_in6 *>b).sin6_scope_id)
    return False


cdef inline bint same_address(const sockaddr_storage *a, const sockaddr_storage *b) noexcept:
    """Same family, port and address: the fields that identify a UDP source (sin_zero,
    flowinfo and padding may differ between two sockaddrs of the same source)."""
    if not same_host(a, b):
        return False
    if a.ss_family == AF_INET:
        return (<const sockaddr_in *>a).sin_port == (<const sockaddr_in *>b).sin_port
    return (<const sockaddr_in6 *>a).sin6_port == (<const sockaddr_in6 *>b).sin6_port


cdef inline unsigned int sockaddr_len(const sockaddr_storage *a) noexcept:
    if a.ss_family == AF_INET:
        return sizeof(sockaddr_in)
    return sizeof(sockaddr_in6)


cdef inline object address_tuple(const sockaddr_storage *a):
    """(host, port) of an IPv4/IPv6 sockaddr, None for any other family."""
    cdef char name[64]
    cdef int port = fs_sockaddr_name(a, name, sizeof(name))
    if port < 0:
        return None
    return ((<char *>name).decode("ascii"), port)
