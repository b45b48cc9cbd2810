"""WAV files in and out for calls that carry sound: 16-bit PCM, mono, 8 kHz (G.711's format).

Reading accepts 16-bit PCM at any rate and channel count: channels are mixed down to mono and
the rate converted to 8 kHz by linear interpolation (good enough for test prompts; not a
studio resampler).  8-, 24- and 32-bit or compressed files are refused with an error naming the
file and what it is.  Writing is always 8 kHz 16-bit mono.
"""

from __future__ import annotations

import re
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fastsip.errors import FastSIPError

__all__ = ["WavError", "read_wav", "recording_path", "write_wav"]

RATE = 8000


class WavError(FastSIPError, ValueError):
    """A WAV file that cannot be used as call audio (names the file and why)."""


def read_wav(path: str | Path, rate: int = RATE) -> npt.NDArray[np.int16]:
    """The file's audio as mono 16-bit PCM at ``rate`` Hz."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as w:
            channels, width, file_rate, frames = (w.getnchannels(), w.getsampwidth(),
                                                  w.getframerate(), w.getnframes())
            data = w.readframes(frames)
    except (wave.Error, EOFError) as exc:
        raise WavError(f"{path}: not a PCM WAV file ({exc})") from exc
    except OSError as exc:
        raise WavError(f"{path}: {exc.strerror or exc}") from exc
    if width != 2:
        raise WavError(f"{path}: {8 * width}-bit samples ({channels} channel(s), {file_rate} Hz);"
                       " only 16-bit PCM is accepted")
    samples = np.frombuffer(data, dtype="<i2")
    if channels > 1:
        usable = len(samples) - len(samples) % channels
        samples = samples[:usable].reshape(-1, channels).astype(np.int32).mean(axis=1)
        samples = np.round(samples).astype(np.int16)
    if file_rate != rate:
        samples = _resample(samples, file_rate, rate)
    return np.ascontiguousarray(samples, dtype=np.int16)


def _resample(samples: npt.NDArray[np.int16], src: int, dst: int) -> npt.NDArray[np.int16]:
    if len(samples) == 0:
        return samples
    n = max(1, round(len(samples) * dst / src))
    positions = np.arange(n) * (src / dst)
    out = np.interp(positions, np.arange(len(samples)), samples.astype(np.float64))
    result: npt.NDArray[np.int16] = np.clip(np.round(out), -32768, 32767).astype(np.int16)
    return result


def write_wav(path: str | Path, samples: npt.ArrayLike, rate: int = RATE) -> Path:
    """Write mono 16-bit PCM; returns the path."""
    path = Path(path)
    pcm = np.ascontiguousarray(samples, dtype="<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


_UNSAFE = re.compile(r"[^A-Za-z0-9._@+-]")


def recording_path(directory: str | Path, call_id: str, suffix: str = "") -> Path:
    """``DIRECTORY/<Call-ID>.wav`` with the Call-ID made a safe file name (no separators, no
    leading dot, bounded length)."""
    name = _UNSAFE.sub("_", call_id).lstrip(".") or "call"
    return Path(directory) / f"{name[:128]}{suffix}.wav"
