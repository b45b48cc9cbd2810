"""The IP addresses configured on this host's interfaces.

A listener on a wildcard address (``0.0.0.0``, ``::``) receives on every one of them, so each is
"us" when a Request-URI or Route names it.  Read with getifaddrs(3) through ctypes (no
dependency, and it sees every interface, not just the one the routing table prefers); where that
is unavailable, the routed address guess plus loopback stands in.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys

__all__ = ["interface_addresses", "routed_address"]

log = logging.getLogger("fastsip.asyncio.netif")

# BSD-derived systems start a sockaddr with a length byte, then a one-byte family; Linux (and
# Solaris) with a two-byte family.  The address sits at the same offsets in both layouts.
_BSD_SOCKADDR = sys.platform.startswith(
    ("darwin", "freebsd", "openbsd", "netbsd", "dragonfly", "aix"))
_V4_OFFSET = 4          # sockaddr_in: family (2), port (2), then in_addr
_V6_OFFSET = 8          # sockaddr_in6: family (2), port (2), flowinfo (4), then in6_addr


class _IfAddrs(ctypes.Structure):
    """``struct ifaddrs``: the same field order on Linux, the BSDs and macOS."""


_IfAddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_IfAddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.c_void_p),
    ("ifa_netmask", ctypes.c_void_p),
    ("ifa_dstaddr", ctypes.c_void_p),      # a union with ifa_broadaddr
    ("ifa_data", ctypes.c_void_p),
]


def _family(sockaddr: int) -> int:
    if _BSD_SOCKADDR:
        return ctypes.c_ubyte.from_address(sockaddr + 1).value
    return ctypes.c_ushort.from_address(sockaddr).value


def _getifaddrs() -> list[str]:
    """The addresses getifaddrs(3) lists, in its order, IPv6 link-local ones left out (they
    need a scope to mean anything, and KAME stacks embed the scope in the address bytes)."""
    libc = ctypes.CDLL(None, use_errno=True)
    getifaddrs = libc.getifaddrs
    getifaddrs.argtypes = [ctypes.POINTER(ctypes.POINTER(_IfAddrs))]
    getifaddrs.restype = ctypes.c_int
    freeifaddrs = libc.freeifaddrs
    freeifaddrs.argtypes = [ctypes.POINTER(_IfAddrs)]
    freeifaddrs.restype = None
    head = ctypes.POINTER(_IfAddrs)()
    if getifaddrs(ctypes.byref(head)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    found: list[str] = []
    try:
        node = head
        while node:
            entry = node.contents
            sockaddr = entry.ifa_addr
            if sockaddr:
                family = _family(sockaddr)
                if family == socket.AF_INET:
                    raw = ctypes.string_at(sockaddr + _V4_OFFSET, 4)
                    found.append(socket.inet_ntop(socket.AF_INET, raw))
                elif family == socket.AF_INET6:
                    raw = ctypes.string_at(sockaddr + _V6_OFFSET, 16)
                    if not (raw[0] == 0xFE and raw[1] & 0xC0 == 0x80):     # fe80::/10
                        found.append(socket.inet_ntop(socket.AF_INET6, raw))
            node = entry.ifa_next
    finally:
        freeifaddrs(head)
    return found


def routed_address(v6: bool) -> str:
    """The address the routing table would use to reach the outside world (a connected UDP
    socket sends nothing); the loopback address when there is no route."""
    family = socket.AF_INET6 if v6 else socket.AF_INET
    probe = "2001:db8::1" if v6 else "192.0.2.1"
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((probe, 9))
            return str(s.getsockname()[0]).partition("%")[0]
    except OSError:
        return "::1" if v6 else "127.0.0.1"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _fallback() -> list[str]:
    found = ["127.0.0.1", routed_address(False)]
    if _has_ipv6_loopback():
        found += ["::1", routed_address(True)]
    return found


def interface_addresses() -> list[str]:
    """Every IP address configured on the host's interfaces, IPv4 and IPv6, as literals without
    brackets or scope ids (IPv6 link-local ones left out), each once, in the system's order.
    Where getifaddrs(3) is missing or fails (Windows), the routed address guess plus loopback.
    Read afresh on every call: interfaces come and go (DHCP, VPNs), so cache with care."""
    found: list[str] = []
    if os.name == "posix":
        try:
            found = _getifaddrs()
        except (OSError, AttributeError, ValueError) as exc:   # AttributeError: no such symbol
            log.debug("getifaddrs failed (%s): guessing the local addresses", exc)
    if not found:
        found = _fallback()
    return list(dict.fromkeys(found))
