# cython: language_level=3, annotation_typing=False
"""The text of a log line, compiled: the log writer thread (:mod:`fastsip.app.logqueue`) turns
every queued ``(time, level, logger, template, args, extra)`` tuple into the line
:data:`~fastsip.app.logqueue.FORMAT` describes.  At INFO, serve logs a line per initial
request; in Python the two method calls, the time's format spec and the f-strings cost the
writer about as much again as the line's own ``template % args``.
"""

from __future__ import annotations

from cpython.time cimport time as _wall_clock

import time


cdef class TextLines:
    """``FORMAT``'s text of a queued tuple: ``asctime`` as :class:`logging.Formatter` writes
    it (``time_format`` of ``converter(created)``, then a comma and the milliseconds), its
    date and time formatted once per second.  One per formatter: only its writer thread
    calls it (and, after the writer stopped, whoever logs last)."""

    cdef object _time_format
    cdef object _converter
    cdef long long _second
    cdef str _stamp

    def __init__(self, str time_format="%Y-%m-%d %H:%M:%S", converter=time.localtime):
        self._time_format = time_format
        self._converter = converter
        self._second = -1
        self._stamp = ""

    cpdef str asctime(self, double created):
        """``created`` as ``%(asctime)s`` reads."""
        cdef long long second = <long long>created
        if second != self._second:
            self._stamp = time.strftime(self._time_format, self._converter(created))
            self._second = second
        return f"{self._stamp},{<int>((created - second) * 1000):03d}"

    def line(self, double created, str levelname, str name, str msg, args, extra=None):
        """The line of one queued tuple (``extra`` is not part of the text: the message says
        it all)."""
        text = msg % args if args else msg
        return f"{self.asctime(created)} {levelname} {name}: {text}"


cdef class QueueEmitter:
    """What :meth:`QueueLogHandler.direct <fastsip.app.logqueue.QueueLogHandler.direct>`
    gives: ``emit(template, args, extra=None)`` puts one line of logger ``name`` at ``level``
    on ``handler``'s queue as a tuple -- no LogRecord, no Python frame (serve's request line,
    one a call).  Past ``bound`` lines waiting it counts a drop; once the handler has closed,
    it has the handler write the line itself (``_write_now``)."""

    def __init__(self, handler, queue, str name, str levelname, Py_ssize_t bound):
        self._handler = handler
        self._put = queue.put
        self._qsize = queue.qsize
        self._name = name
        self._levelname = levelname
        self._bound = bound

    def __call__(self, str msg, args, extra=None):
        self.emit(msg, args, extra)

    cdef int emit(self, str msg, object args, object extra) except -1:
        handler = self._handler
        if self._qsize() < self._bound and not handler._closed:
            self._put((_wall_clock(), self._levelname, self._name, msg, args, extra))
        elif handler._closed:
            handler._write_now(_wall_clock(), self._levelname, self._name, msg, args, extra)
        else:
            handler.dropped += 1
        return 0
