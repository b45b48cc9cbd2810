"""Type stub for the compiled G.711 codec (fastsip/rtp/_g711.pyx)."""

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

def ulaw_encode(
    samples: npt.NDArray[np.int16] | Buffer, out: npt.NDArray[np.uint8] | None = None
) -> npt.NDArray[np.uint8]: ...
def ulaw_decode(
    codes: npt.NDArray[np.uint8] | Buffer, out: npt.NDArray[np.int16] | None = None
) -> npt.NDArray[np.int16]: ...
def alaw_encode(
    samples: npt.NDArray[np.int16] | Buffer, out: npt.NDArray[np.uint8] | None = None
) -> npt.NDArray[np.uint8]: ...
def alaw_decode(
    codes: npt.NDArray[np.uint8] | Buffer, out: npt.NDArray[np.int16] | None = None
) -> npt.NDArray[np.int16]: ...
