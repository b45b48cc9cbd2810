# cython: language_level=3
"""The per-message methods of :class:`fastsip.transport.Transport` as a class with C methods.

The transaction layer sends every message through its transport, and the proxy core asks it
for our end of each branch (``local_for``, ``via_for``): about a dozen calls a proxied call.
A transport object is the shell's (fastsip's asyncio ``TransportLayer``, or an embedder's
own), so those were Python calls.  A shell can give its transport a ``compiled`` attribute:
a :class:`TransportBase` whose methods do what the transport's do.  The layers above look it
up once (:func:`compiled_transport`) and call it in C; a transport without one is called as
before.
"""


cdef class TransportBase:
    """A transport's ``send``, ``local_for`` and ``via_for`` as C methods (see the module
    docstring); the shell's subclass implements them."""

    cpdef send(self, data, dest):
        """Send one message to ``dest`` (:meth:`fastsip.transport.Transport.send`)."""
        raise NotImplementedError

    cpdef local_for(self, dest):
        """Our end of a message to ``dest``, or of one that came from it."""
        raise NotImplementedError

    cpdef via_for(self, dest, local=None):
        """Our end of a request we start towards ``dest``, for its Via (``local``: our end
        of it, when the caller has it)."""
        raise NotImplementedError


cdef TransportBase compiled_transport(object transport):
    # The compiled stand-in of ``transport`` (its ``compiled`` attribute), or None.
    found = getattr(transport, "compiled", None)
    return found if isinstance(found, TransportBase) else None
