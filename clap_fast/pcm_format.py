"""The int16 PCM sample format of PCM shards (see ``clap_fast.pcm``): a leaf module, so the
training loader (``clap_fast.data``) and the converter (``clap_fast.pcm``) share it.

A PCM member ``<key>.npy`` is a 1-D little-endian int16 NumPy array (no pickle) holding channel 0
at 48 kHz after LAION's quantisation, ``q = trunc(clamp(x, -1, 1) * 32767)``; ``q / 32767``
(:func:`to_float`) is bit for bit LAION's int16 round trip of the source clip.
"""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "PCM_EXT",
    "PCM_RATE",
    "quantize",
    "to_float",
    "encode_pcm",
    "decode_pcm",
    "pcm_length",
    "stack_waveforms",
]

PCM_EXT = "npy"
PCM_RATE = 48000
"""The rate of every PCM shard (LAION's training rate)."""
_SCALE = 32767.0


# ------------------------------------------------------------------------- samples
def quantize(x: torch.Tensor) -> torch.Tensor:
    """(T,) float waveform → (T,) int16 ``trunc(clamp(x, -1, 1) * 32767)`` (LAION's quantiser)."""
    return (torch.clamp(x, -1.0, 1.0) * _SCALE).to(torch.int16)


def to_float(q: torch.Tensor) -> torch.Tensor:
    """int16 (any shape) → float32 ``q / 32767``: the tail of LAION's int16 round trip.

    Run it after the copy to the device, so the host-to-device copy moves 2 bytes a sample.
    """
    return q.to(torch.float32) / _SCALE


def encode_pcm(q: np.ndarray) -> bytes:
    """(T,) int16 → the bytes of a ``.npy`` member."""
    if q.dtype != np.int16 or q.ndim != 1:
        raise ValueError(f"PCM must be a 1-D int16 array, got {q.dtype} {q.shape}")
    buf = io.BytesIO()
    np.save(buf, q.astype("<i2", copy=False), allow_pickle=False)
    return buf.getvalue()


def _header(data: bytes) -> tuple[int, int]:
    """(samples, offset of the data) of a ``.npy`` member; ValueError unless 1-D ``<i2``."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype != np.dtype("<i2") or len(shape) != 1:
        raise ValueError(f"PCM member must be 1-D <i2, got {dtype} {shape}")
    n, offset = int(shape[0]), f.tell()
    if len(data) != offset + 2 * n:
        raise ValueError(f"PCM member holds {len(data) - offset} bytes, its header says {2 * n}")
    return n, offset


def pcm_length(data: bytes) -> int:
    """Samples in a ``.npy`` PCM member, from its header alone (no copy)."""
    return _header(data)[0]


def decode_pcm(data: bytes, copy: bool = True) -> torch.Tensor:
    """A ``.npy`` PCM member → (T,) int16 tensor (no pickle); ValueError if malformed.

    ``copy=False`` (the loader, which crops and then stacks into a new batch tensor anyway)
    returns a view of ``data`` that must not be written to.
    """
    n, offset = _header(data)
    if n == 0:
        raise ValueError("empty PCM member")
    if not copy and sys.byteorder == "little":
        with warnings.catch_warnings():  # bytes are read-only; the view is only read
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(data, dtype=torch.int16, count=n, offset=offset)
    arr = np.frombuffer(data, dtype="<i2", count=n, offset=offset)
    return torch.from_numpy(arr.astype(np.int16))  # the copy makes it writable and native


def stack_waveforms(waves: Sequence[torch.Tensor]) -> torch.Tensor:
    """(T,) waveforms → (B, T): int16 if all are int16 (PCM shards), float32 otherwise."""
    if all(w.dtype == torch.int16 for w in waves):
        return torch.stack(list(waves))
    return torch.stack([to_float(w) if w.dtype == torch.int16 else w for w in waves])
