"""Type stub for the compiled RTP packet core (fastsip/rtp/_packet.pyx)."""

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

ONE_BYTE_EXTENSION_PROFILE: int
TWO_BYTE_EXTENSION_PROFILE: int

class RtpPacket:
    sequence_number: int
    timestamp: int
    ssrc: int
    marker: bool
    payload_type: int
    def __init__(
        self,
        *,
        payload_type: int = 0,
        sequence_number: int = 0,
        timestamp: int = 0,
        ssrc: int = 0,
        payload: Buffer = b"",
        marker: bool = False,
        csrc: Iterable[int] = (),
        extensions: Mapping[int, bytes] | None = None,
        extension_profile: int | None = None,
        extension_data: bytes | None = None,
        padding: int = 0,
    ) -> None: ...
    @staticmethod
    def parse(data: Buffer) -> RtpPacket: ...
    @property
    def version(self) -> int: ...
    @property
    def padding(self) -> int: ...
    @property
    def extension(self) -> bool: ...
    @property
    def csrc(self) -> tuple[int, ...]: ...
    @property
    def payload(self) -> memoryview: ...
    @property
    def payload_length(self) -> int: ...
    @property
    def extension_profile(self) -> int | None: ...
    @property
    def extension_data(self) -> bytes | None: ...
    @property
    def extensions(self) -> dict[int, bytes]: ...
    def __bytes__(self) -> bytes: ...
    def __eq__(self, other: object, /) -> bool: ...
    __hash__: None  # type: ignore[assignment]  # header fields are writable

class RtpBatch:
    valid: npt.NDArray[np.bool_]
    error: npt.NDArray[np.uint8]
    payload_type: npt.NDArray[np.uint8]
    marker: npt.NDArray[np.bool_]
    sequence_number: npt.NDArray[np.uint16]
    timestamp: npt.NDArray[np.uint32]
    ssrc: npt.NDArray[np.uint32]
    csrc_count: npt.NDArray[np.uint8]
    payload_offset: npt.NDArray[np.int32]
    payload_length: npt.NDArray[np.int32]
    def __init__(self, n: int) -> None: ...
    def __len__(self) -> int: ...

def parse_batch(datagrams: Sequence[Buffer]) -> RtpBatch: ...
def parse_batch_buffer(
    buffer: Buffer, offsets: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64]
) -> RtpBatch: ...
