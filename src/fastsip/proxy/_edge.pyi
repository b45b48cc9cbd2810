"""Type stub for the compiled per-message admission (fastsip/proxy/_edge.pyx): the state
fastsip.proxy.edge.SourceGuard derives from, which documents it."""

from typing import Any

from fastsip.transport._base import SourceAdmission

class GuardState(SourceAdmission):
    bans: dict[str, float]
    rate: float
    burst: float
    trusted: Any
    _sources: dict[str, Any]
    dropped: int
    def admit(self, host: str, now: float) -> bool: ...
