"""Audio front end: mel filterbanks, LAION's front-end buffers, the fusion mel views.

Two front ends exist in LAION CLAP (see ``shared/reference/LAION-FACTS.md``):

* non-fusion checkpoints compute a Slaney log-mel inside the model from the waveform;
* fusion checkpoints receive an HTK log-mel computed in preprocessing (torchaudio's
  MelSpectrogram in LAION), stacked into 4 views (global + 3 crops) for long clips.

Both go through ``ops.log_mel`` (Triton on the GPU, an FFT on the CPU). LAION's checkpoints also
store the STFT as conv weights (``spectrogram_extractor.stft.conv_{real,imag}.weight``) and the
filterbank (``logmel_extractor.melW``); we keep them as buffers so the state dict round-trips,
use ``melW`` as the filterbank, and never run the 1-GMAC convolution.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clap_fast import ops
from clap_fast.config import AudioConfig
from kernels.mel_ref import dft_basis

__all__ = [
    "slaney_mel_fb",
    "htk_mel_fb",
    "LaionSpectrogramWeights",
    "LaionLogmel",
    "fusion_views",
    "fusion_chunk_starts",
    "spec_augment",
]


def _slaney_hz_to_mel(f: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    f = np.asarray(f, dtype=np.float64)
    return np.where(
        f >= min_log_hz,
        min_log_mel + np.log(np.maximum(f, 1e-12) / min_log_hz) / logstep,
        f / f_sp,
    )


def _slaney_mel_to_hz(m: np.ndarray) -> np.ndarray:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), m * f_sp)


def _triangles(mel_f: np.ndarray, fft_freqs: np.ndarray) -> np.ndarray:
    """(n_mels, n_freq) triangular filters with corners at mel_f (n_mels + 2 points)."""
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    return np.maximum(0.0, np.minimum(lower, upper))


def slaney_mel_fb(
    sample_rate: int = 48000,
    n_fft: int = 1024,
    n_mels: int = 64,
    fmin: float = 50,
    fmax: float = 14000,
) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) float32: librosa's default mel filterbank (Slaney scale and area
    normalisation), transposed as LAION stores it (``melW``). Computed in float64."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mels = np.linspace(_slaney_hz_to_mel(fmin), _slaney_hz_to_mel(fmax), n_mels + 2)
    mel_f = _slaney_mel_to_hz(mels)
    w = _triangles(mel_f, fft_freqs)
    w *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return torch.from_numpy(w.T.astype(np.float32)).contiguous()


def htk_mel_fb(
    sample_rate: int = 48000,
    n_fft: int = 1024,
    n_mels: int = 64,
    fmin: float = 50,
    fmax: float = 14000,
) -> torch.Tensor:
    """(n_fft // 2 + 1, n_mels) float32: torchaudio's MelSpectrogram filterbank with the HTK
    scale and no normalisation (what LAION's fusion preprocessing uses)."""
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)

    def hz_to_mel(f: float) -> float:
        return 2595.0 * math.log10(1.0 + f / 700.0)

    m = np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2)
    mel_f = 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return torch.from_numpy(_triangles(mel_f, fft_freqs).T.astype(np.float32)).contiguous()


class _WeightHolder(nn.Module):
    """A module holding one buffer named ``weight`` (keeps LAION's ``…conv_real.weight`` keys)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)


class _STFTWeights(nn.Module):
    def __init__(self, n_fft: int) -> None:
        super().__init__()
        basis = dft_basis(n_fft, torch.device("cpu"), torch.float64)
        n_bins = n_fft // 2 + 1
        self.conv_real = _WeightHolder(basis[:, :n_bins].T[:, None, :].float().contiguous())
        self.conv_imag = _WeightHolder(basis[:, n_bins:].T[:, None, :].float().contiguous())


class LaionSpectrogramWeights(nn.Module):
    """LAION's STFT-as-conv weights: checkpoints load and save unchanged, and the export branch
    of ``ops.log_mel`` convolves with them (eager runs an FFT of the same basis instead)."""

    def __init__(self, n_fft: int) -> None:
        super().__init__()
        self.stft = _STFTWeights(n_fft)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(real, imag) conv weights, each (n_fft // 2 + 1, 1, n_fft)."""
        return self.stft.conv_real.weight, self.stft.conv_imag.weight


class LaionLogmel(nn.Module):
    """Holds ``melW`` (n_fft // 2 + 1, n_mels), the Slaney filterbank of non-fusion models."""

    def __init__(self, cfg: AudioConfig) -> None:
        super().__init__()
        fb = slaney_mel_fb(cfg.sample_rate, cfg.window_size, cfg.mel_bins, cfg.fmin, cfg.fmax)
        self.register_buffer("melW", fb)


def log_mel_for(
    cfg: AudioConfig,
    waveform: torch.Tensor,
    mel_fb: torch.Tensor,
    stft: LaionSpectrogramWeights | None = None,
) -> torch.Tensor:
    """(B, L) waveform -> (B, T, n_mels) float32 log-mel with the config's STFT settings.

    Always fp32, also under autocast: in fp16 the power of a loud frame overflows. ``stft``
    (the model's LAION weights) is what ``ops.log_mel``'s export branch convolves with.
    """
    weights = tuple(w.float() for w in stft.weights()) if stft is not None else None
    with torch.autocast(waveform.device.type, enabled=False):
        return ops.log_mel(
            waveform.float(), mel_fb.float(), n_fft=cfg.window_size, hop_length=cfg.hop_size,
            stft_weights=weights,
        )  # fmt: skip


def _drop_stripes(x: torch.Tensor, dim: int, width: int, stripes: int) -> torch.Tensor:
    """Zero ``stripes`` random bands of width U[0, width) along ``dim`` of (B, C, T, F), per sample."""
    b, size = x.shape[0], x.shape[dim]
    dist = torch.randint(0, width, (b, stripes), device=x.device)
    start = (torch.rand(b, stripes, device=x.device) * (size - dist + 1)).long()
    pos = torch.arange(size, device=x.device)[None, None, :]
    hit = ((pos >= start[..., None]) & (pos < (start + dist)[..., None])).any(dim=1)  # (B, size)
    shape = [b, 1, 1, 1]
    shape[dim] = size
    return x * (~hit).view(shape).to(x.dtype)


def spec_augment(
    x: torch.Tensor,
    time_width: int = 64,
    time_stripes: int = 2,
    freq_width: int = 8,
    freq_stripes: int = 2,
) -> torch.Tensor:
    """LAION's training-time SpecAugment (torchlibrosa's settings) on (B, C, T, F) mel."""
    x = _drop_stripes(x, 2, time_width, time_stripes)
    return _drop_stripes(x, 3, freq_width, freq_stripes)


def fusion_chunk_starts(
    total_frames: int, chunk_frames: int, generator: torch.Generator | None
) -> tuple[int, int, int]:
    """Start frames of the front / middle / back crops (LAION's ``np.array_split`` thirds).

    With a generator: uniform within each third (LAION's random choice, reproducible with a
    seed). Without: the middle of each third (the deterministic inference default).
    """
    starts = np.array_split(np.arange(total_frames - chunk_frames + 1), 3)
    out = []
    for part in starts:
        if len(part) == 0:
            out.append(0)  # LAION: an empty third falls back to the first frame
        elif generator is None:
            out.append(int(part[(len(part) - 1) // 2]))
        else:
            out.append(int(part[int(torch.randint(len(part), (1,), generator=generator))]))
    return out[0], out[1], out[2]


def fusion_views(
    mel: torch.Tensor,
    chunk_frames: int,
    *,
    antialias: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, bool]:
    """The 4 fusion views of one clip's log-mel.

    Args:
        mel: (T, n_mels) HTK log-mel of the whole (unpadded) clip.
        chunk_frames: frames of a 10 s view (1001).
        antialias: torchvision >= 0.17's Resize default (what laion_clap does today); False
            reproduces the training-time behaviour.
        generator: random crops (LAION) when given; centred crops otherwise.

    Returns:
        ((4, chunk_frames, n_mels) views, longer). When the clip has no more frames than a view,
        the 4 views are copies and ``longer`` is False.
    """
    total = mel.shape[0]
    if total <= chunk_frames:
        if total < chunk_frames:
            raise ValueError(f"mel has {total} frames, fewer than a view ({chunk_frames})")
        return mel.unsqueeze(0).expand(4, -1, -1).contiguous(), False
    a, b, c = fusion_chunk_starts(total, chunk_frames, generator)
    shrink = F.interpolate(
        mel[None, None],
        size=(chunk_frames, mel.shape[1]),
        mode="bilinear",
        align_corners=False,
        antialias=antialias,
    )[0, 0]
    crops = [mel[s : s + chunk_frames] for s in (a, b, c)]
    return torch.stack([shrink, *crops], dim=0), True
