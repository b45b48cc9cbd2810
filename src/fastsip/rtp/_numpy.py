"""NumPy, imported when an array API is first used rather than when :mod:`fastsip.rtp` is.

NumPy is the array type of the RTP batch, jitter-buffer playout and G.711 APIs, and nothing
else needs it: the proxy, the registrar and the media relay's packet path run without it, so
a proxy-only install does not carry it (it is the ``numpy`` extra).  The compiled modules call
:func:`numpy_module` at the top of each array function instead of importing NumPy at import.
"""

from __future__ import annotations

from types import ModuleType

_numpy: ModuleType | None = None


def numpy_module() -> ModuleType:
    """The numpy module; an ImportError that says which extra to install when it is missing."""
    global _numpy
    if _numpy is None:
        try:
            import numpy
        except ImportError as exc:
            raise ImportError("this RTP array API needs NumPy: pip install 'fastsip[numpy]'"
                              ) from exc
        _numpy = numpy
    return _numpy
