"""Type stub for the compiled media receive batch (fastsip/rtp/_receiver.pyx)."""

from typing import final

@final
class Receiver:
    def __init__(self) -> None: ...
    def read(self, fd: int, limit: int = 64, offset: float = 0.0,
             now: float = 0.0) -> list[tuple[bytes, tuple[str, int], float]]: ...
