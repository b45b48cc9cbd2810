"""Type stub for the compiled RFC 3550 statistics (fastsip/rtp/_stats.pyx)."""

from typing import final

import numpy.typing as npt

from fastsip.rtp._packet import RtpPacket

@final
class RtpStats:
    clock_rate: float
    min_sequential: int
    max_dropout: int
    max_misorder: int
    received: int
    bad: int
    misordered: int
    ssrc: int | None
    last_extended_sequence: int
    def __init__(
        self,
        clock_rate: float,
        *,
        min_sequential: int = 2,
        max_dropout: int = 3000,
        max_misorder: int = 100,
    ) -> None: ...
    def update(self, packet: RtpPacket, arrival_time: float) -> bool: ...
    def update_fields(
        self, sequence_number: int, timestamp: int, arrival_time: float, ssrc: int | None = None
    ) -> bool: ...
    def update_many(
        self,
        sequence_numbers: npt.ArrayLike,
        timestamps: npt.ArrayLike,
        arrival_times: npt.ArrayLike,
        ssrc: int | None = None,
    ) -> int: ...
    @property
    def probation(self) -> int: ...
    @property
    def base_sequence(self) -> int: ...
    @property
    def cycles(self) -> int: ...
    @property
    def max_sequence(self) -> int: ...
    @property
    def extended_max_sequence(self) -> int: ...
    @property
    def expected(self) -> int: ...
    @property
    def cumulative_lost(self) -> int: ...
    @property
    def fraction_lost(self) -> int: ...
    def report(self) -> tuple[int, int]: ...
    @property
    def jitter(self) -> int: ...
    @property
    def jitter_seconds(self) -> float: ...
