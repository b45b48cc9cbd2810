# cython: language_level=3
"""The transport address, compiled: :mod:`fastsip.transport` documents it and is where users
import it from.  A proxied call makes about nine (a source per datagram, a destination per
send) and compares and hashes more; as a C type each costs a fraction of a Python object."""

cimport cython

#: Transports whose delivery is reliable (no retransmission of requests, §17.1.1.2 Timer A off).
RELIABLE = frozenset({"TCP", "TLS", "SCTP", "WS", "WSS"})
cdef frozenset _RELIABLE = RELIABLE


@cython.final
@cython.freelist(64)
@cython.no_gc
cdef class Address:
    """A transport address: ``transport`` ("UDP", "TCP", "TLS", upper case as in Via), ``host``
    (an IP literal without brackets), ``port``, and ``connection``: for stream transports the
    id of the connection a message arrived on, for datagrams the id of the local socket it
    arrived on (0: "any connection", "the usual socket").

    Two addresses that differ only in ``connection`` name the same peer (``peer``).  What is
    sent to an address with a ``connection`` goes over that connection while it is open
    (§18.2.2), otherwise over a new one to the peer; a datagram leaves from that socket, so
    the peer and any NAT in front of it see the address they sent to (a flow, RFC 5626).

    A value: equal and hashed by its four fields, never changed after it is made (its fields
    are read-only).  A C type rather than a Python class because several are made per
    message on the relay path; it holds only strings and integers, so it stays out of the
    cyclic GC.
    """

    # (Its fields are declared in _address.pxd, for the modules that cimport it.)

    def __init__(self, str transport, str host, port, connection=0):
        self.transport = transport
        self.host = host
        self.port = port
        self.connection = connection

    @property
    def reliable(self):
        return self.transport in _RELIABLE

    @property
    def peer(self):
        """(transport, host, port): the key of a connection table."""
        return (self.transport, self.host, self.port)

    def __eq__(self, other):
        if type(other) is not Address:
            return NotImplemented
        cdef Address o = <Address>other
        return (self.port == o.port and self.host == o.host
                and self.transport == o.transport
                and self.connection == o.connection)

    def __hash__(self):
        return hash((self.transport, self.host, self.port, self.connection))

    def __repr__(self):
        return (f"Address(transport={self.transport!r}, host={self.host!r}, "
                f"port={self.port!r}, connection={self.connection!r})")

    def __reduce__(self):
        return (Address, (self.transport, self.host, self.port, self.connection))

    def __str__(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport.lower()}:{host}:{self.port}"


@cython.final
cdef class HostMemo:
    """A pure function of a host (str), remembered: what ``functools.lru_cache`` does, for the
    questions the relay path asks about hosts on every message -- is this host us, is it a
    private address, is it an IP literal.  Compiled code reads a known host with
    :func:`memo_get` (``_address.pxd``): one dict look-up, where a call to an ``lru_cache``
    goes through the generic call protocol and builds a key tuple (~700 instructions, and
    "is this us" alone is asked four times a proxied call).  Bounded: past ``bound`` hosts it
    forgets them all and starts again, so a flood of made-up hosts cannot grow it.  Calling
    the memo from Python does the same as ``fn(host)``."""

    def __init__(self, fn, Py_ssize_t bound=4096):
        self._known = {}
        self._fn = fn
        self._bound = bound

    cdef object _compute(self, str host):
        value = self._fn(host)
        if len(self._known) >= self._bound:
            self._known.clear()
        self._known[host] = value
        return value

    def __call__(self, str host not None):
        return memo_get(self, host)

    def __len__(self) -> int:
        return len(self._known)
