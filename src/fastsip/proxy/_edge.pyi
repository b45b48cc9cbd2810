"""Type stub for the compiled per-message admission (fastsip/proxy/_edge.pyx), bound as
fastsip.proxy.edge.SourceGuard.admit, which documents it."""

from fastsip.proxy.edge import SourceGuard

def admit(self: SourceGuard, host: str, now: float) -> bool: ...
