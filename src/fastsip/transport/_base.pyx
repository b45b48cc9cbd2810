# cython: language_level=3
"""The callbacks between the shell and the compiled layers, as classes with C methods.

The compiled layers and the shell call each other for every message: the shell hands each
datagram's source to the edge policy (``admit``) and each parsed message up (``deliver``, the
transaction layer's ``receive``); the transaction layer sends every message through its
transport, and the proxy core asks it for our end of each branch (``local_for``,
``via_for``): some thirty calls a proxied call.  Each side's callbacks are plain callables in
the API, so those were Python calls.  Here are their C-level forms, in two shapes:

- a callback that is one method (``deliver``, ``admit``): its owner derives from
  :class:`MessageSink` or :class:`SourceAdmission`, and whoever stores the bound method keeps
  the owner instead (``direct_callee``) and calls it in C (``deliver_c``, ``admit_c``);
- the transport, several methods on an object of the shell's: it can have a ``compiled``
  attribute, a :class:`TransportBase` whose methods do what the transport's do; the layers
  above look it up once (``compiled_transport``) and call it in C.

Anything else (an embedder's callables and transport, a Python subclass's overrides) is
called as before.
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


cdef class MessageSink:
    """What the intake hands a message to, ``deliver(msg, source)``, as a class with a C
    method: :class:`~fastsip.transaction.TransactionLayer` derives from it.  The compiled UDP
    shell, given the layer's bound ``receive`` as its ``on_message``, keeps the layer itself
    and delivers each message by a C call: six Python calls a proxied call fewer."""

    cpdef receive(self, msg, source):
        """Take a parsed message from ``source``."""
        raise NotImplementedError


cdef class SourceAdmission:
    """The shell's ``admit(host, now)`` hook as a class with a C method: the proxy's source
    guard (:class:`fastsip.proxy.edge.SourceGuard`) derives from it, and the compiled UDP
    shell, given a guard's bound ``admit`` as its hook, asks the guard by a C call."""

    cpdef bint admit(self, host, double now) except -1:
        """May ``host`` be heard at loop time ``now``?"""
        return True


cdef object direct_callee(object callback):
    # A bound ``receive`` of a MessageSink, or ``admit`` of a SourceAdmission, becomes the
    # object itself (deliver_c and admit_c call its C method; a Python subclass's override
    # still runs, by cpdef's dispatch); any other callable stays as it is.  Done once, where
    # a shell stores the callback, not per message.
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, MessageSink) and callback == owner.receive:
        return owner
    if isinstance(owner, SourceAdmission) and callback == owner.admit:
        return owner
    return callback


cdef bint admit_c(object admit, object host, double now) except -1:
    if isinstance(admit, SourceAdmission):
        return (<SourceAdmission>admit).admit(host, now)
    return bool(admit(host, now))


cdef bint deliver_c(object deliver, object msg, object source) except -1:
    if isinstance(deliver, MessageSink):
        (<MessageSink>deliver).receive(msg, source)
    else:
        deliver(msg, source)
    return True
