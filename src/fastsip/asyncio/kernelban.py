"""Banned sources dropped by the kernel: a classic BPF socket filter on our UDP sockets.

A banned source's datagrams are dropped by :class:`~fastsip.proxy.edge.SourceGuard` before
they are parsed, but each one still wakes the loop, is copied out of the kernel and costs
~2-4 us of Python -- and, worse, a flood of them fills the socket's receive buffer, so the
kernel drops legitimate datagrams that arrive meanwhile.  A socket filter (``SO_ATTACH_FILTER``,
Linux; any process may filter its own sockets) that rejects the banned IPv4 sources makes
the kernel discard them before they are queued: a flood then costs serve nothing and crowds
out nobody.

The program is a balanced comparison tree over the sorted addresses (``jgt``/``jeq`` with
``ja`` trampolines, since classic BPF's conditional jumps reach at most 255 instructions), so
every datagram costs ~2·log2(n) instructions whatever the number of bans.  At most
:data:`MAX_ADDRESSES` fit in the 4096 instructions the kernel allows; beyond that, the most
recent bans go in and the rest stay with the Python check.  IPv6 sources are not filtered here
(the Python check still drops them).
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import socket
import struct
import sys
from collections.abc import Iterable

__all__ = ["MAX_ADDRESSES", "attach", "available", "detach", "program"]

log = logging.getLogger("fastsip.asyncio.kernelban")

SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27
BPF_MAXINSNS = 4096
#: Addresses one program can hold (about 1.5 instructions each, with room to spare).
MAX_ADDRESSES = 2000

# Classic BPF opcodes (linux/filter.h).
_LD_W_ABS = 0x20        # BPF_LD | BPF_W | BPF_ABS
_JMP_JA = 0x05          # BPF_JMP | BPF_JA
_JMP_JEQ_K = 0x15       # BPF_JMP | BPF_JEQ | BPF_K
_JMP_JGT_K = 0x25       # BPF_JMP | BPF_JGT | BPF_K
_RET_K = 0x06           # BPF_RET | BPF_K
_SKF_NET_OFF = -0x100000  # loads relative to the network header
_ACCEPT = 0xFFFFFFFF
_LEAF = 8               # a chain of jeq for this many addresses or fewer

_Insn = tuple[int, int, int, int]


def available() -> bool:
    """Can this platform filter sockets this way (Linux)?"""
    return sys.platform.startswith("linux")


def _tree(ips: list[int]) -> list[_Insn]:
    """Code that drops (``ret 0``) when the loaded source address is in ``ips`` (sorted) and
    accepts otherwise."""
    if len(ips) <= _LEAF:
        # jeq ... jeq, ret ACCEPT, ret 0: an equal address jumps to the last instruction.
        m = len(ips)
        code: list[_Insn] = [(_JMP_JEQ_K, m - i, 0, ip) for i, ip in enumerate(ips)]
        code += [(_RET_K, 0, 0, _ACCEPT), (_RET_K, 0, 0, 0)]
        return code
    mid = (len(ips) - 1) // 2
    left = _tree(ips[: mid + 1])                  # <= ips[mid]
    right = _tree(ips[mid + 1:])                  # > ips[mid]
    # jgt: greater goes to the trampoline (next), else over it into the left subtree.
    return [(_JMP_JGT_K, 0, 1, ips[mid]), (_JMP_JA, 0, 0, len(left)), *left, *right]


def program(addresses: Iterable[str]) -> list[_Insn] | None:
    """The filter for the IPv4 ``addresses`` (others are skipped; at most MAX_ADDRESSES, the
    last ones given), or None when there is nothing to filter."""
    ips: list[int] = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is None:
                continue
            ip = ip.ipv4_mapped
        ips.append(int(ip))
    if not ips:
        return None
    ips = sorted(set(ips[-MAX_ADDRESSES:]))
    code = [(_LD_W_ABS, 0, 0, (_SKF_NET_OFF + 12) & 0xFFFFFFFF), *_tree(ips)]  # IPv4 saddr
    if len(code) > BPF_MAXINSNS:   # pragma: no cover - MAX_ADDRESSES keeps it well under
        raise ValueError(f"{len(code)} BPF instructions: too many")
    return code


def attach(sock: socket.socket, code: list[_Insn]) -> None:
    """Attach (or replace, atomically) ``code`` as ``sock``'s filter.  Raises OSError."""
    insns = (ctypes.c_uint64 * len(code))()
    raw = b"".join(struct.pack("=HBBI", *insn) for insn in code)
    ctypes.memmove(insns, raw, len(raw))
    fprog = struct.pack("@HP", len(code), ctypes.addressof(insns))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)     # the kernel copies it


def detach(sock: socket.socket) -> None:
    """Remove ``sock``'s filter, if it has one."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError:
        pass                                       # ENOENT: there was none
