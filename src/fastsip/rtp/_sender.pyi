"""Type stub for the compiled media send path (fastsip/rtp/_sender.pyx)."""

from typing import Any, Final, final

max_payload: Final[int]
"""The longest payload (octets) a Sender builds; a session sends longer frames itself."""

@final
class SendState:
    ssrc: int
    payload_type: int
    sequence: int
    ts0: int
    samples_per_frame: int
    epoch: float
    ptime: float
    next_frame: int
    grant: int
    max_burst: int
    wake: float
    marker: bool
    source_frame0: int
    loop: bool
    packets: int
    octets: int
    audio_packets: int
    skipped_frames: int
    max_lateness: float
    source: bytes
    @property
    def attached(self) -> bool: ...
    @property
    def has_remote(self) -> bool: ...
    def __init__(self, ssrc: int = 0, payload_type: int = 0, samples_per_frame: int = 160,
                 ptime: float = 0.02) -> None: ...
    def set_remote(self, host: str, port: int) -> bool: ...

@final
class Sender:
    sent: int
    errors: int
    def __init__(self) -> None: ...
    def attach(self, state: SendState, fd: int, owner: object = None) -> None: ...
    def detach(self, state: SendState) -> None: ...
    def __len__(self) -> int: ...
    def due(self, now: float) -> list[Any]: ...
    def flush(self, now: float) -> int: ...
