# cython: language_level=3
"""C-level view of the compiled log-line helpers (fastsip/app/_logline.pyx), for serve's
router to queue its request line without a Python call."""


cdef class QueueEmitter:
    cdef object _handler, _put, _qsize
    cdef str _name, _levelname
    cdef Py_ssize_t _bound

    cdef int emit(self, str msg, object args, object extra) except -1
