"""Type stub for the compiled jitter buffer (fastsip/rtp/_jitter.pyx)."""

import enum
from typing import final

import numpy as np
import numpy.typing as npt

from fastsip.rtp._packet import RtpPacket

PUT_RESULTS: dict[int, str]

class FrameKind(enum.IntEnum):
    NORMAL = 0
    MISSING = 1
    EMPTY = 2

class Frame:
    @property
    def kind(self) -> FrameKind: ...
    @property
    def extended_sequence_number(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def packet(self) -> RtpPacket | None: ...
    @property
    def sequence_number(self) -> int | None: ...
    @property
    def payload(self) -> memoryview | None: ...

@final
class JitterBuffer:
    clock_rate: float
    ptime: float
    percentile: float
    adaptive: bool
    capacity: int
    shrink_after: int
    samples_per_frame: int
    received: int
    played: int
    duplicates: int
    late: int
    lost: int
    discarded: int
    empty: int
    resyncs: int
    overflows: int
    last_delay: float
    def __init__(
        self,
        clock_rate: float,
        ptime: float = 0.02,
        *,
        adaptive: bool = False,
        delay: float = 0.06,
        min_delay: float = 0.0,
        max_delay: float = 0.5,
        percentile: float = 0.95,
        history: int = 500,
        shrink_after: int = 10,
        capacity: int = 0,
    ) -> None: ...
    def put(self, packet: RtpPacket, arrival_time: float) -> int: ...
    def get(self, now: float) -> Frame: ...
    def flush(self) -> list[Frame]: ...
    def playout(
        self,
        sequence_numbers: npt.ArrayLike,
        timestamps: npt.ArrayLike,
        arrival_times: npt.ArrayLike,
        start_time: float | None = None,
        drain: bool = True,
    ) -> tuple[
        npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]
    ]: ...
    @property
    def target_delay(self) -> float: ...
    @property
    def current_delay(self) -> float: ...
    @property
    def buffered(self) -> int: ...
    @property
    def playing(self) -> bool: ...
    def stats(self) -> dict[str, float]: ...
