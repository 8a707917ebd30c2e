"""Waveform preprocessing: validation, decoding, resampling, LAION's int16 round trip, filling
and the long-audio policies.

Short clips (fewer than ``clip_samples``):
  ``repeatpad`` (default; LAION's everywhere) tiles the clip ``clip_samples // len`` times and
  zero-pads the rest; ``repeat`` tiles and cuts; ``pad`` zero-pads.

Long clips (more than ``clip_samples``) — ``long_audio``:
  ``sliding`` (default for non-fusion inference, deterministic): 10 s windows starting every
  ``clip_samples`` samples plus one window aligned to the end; the clip's embedding is the mean
  of the windows' L2-normalised embeddings, re-normalised.
  ``first``: the first 10 s (deterministic, cheapest).
  ``rand_trunc``: LAION's uniformly random 10 s crop; reproducible with a ``torch.Generator``.
  ``fusion`` (fusion models; their only policy): 4 HTK-mel views (the whole clip shrunk to 10 s,
  plus front / middle / back crops). Deterministic centred crops by default; LAION's random
  crops with a generator.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clap_fast import ops
from clap_fast.config import AudioConfig
from clap_fast.frontend import fusion_views, htk_mel_fb

__all__ = [
    "FILL_POLICIES",
    "LONG_POLICIES",
    "as_waveform_list",
    "int16_round_trip",
    "fill",
    "resample",
    "read_audio",
    "load_audio",
    "AudioBatch",
    "prepare_batch",
]

log = logging.getLogger(__name__)

FILL_POLICIES = ("repeatpad", "repeat", "pad")
LONG_POLICIES = ("sliding", "first", "rand_trunc", "fusion")


def as_waveform_list(
    waveforms: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
) -> list[torch.Tensor]:
    """Validate user input and return a list of 1-D float32 CPU tensors.

    Accepts a (B, T) tensor / array or a sequence of 1-D tensors / arrays; float dtypes, or
    int16 PCM (read as x / 32767). Raises ValueError naming the problem otherwise.
    """
    if isinstance(waveforms, (torch.Tensor, np.ndarray)):
        if waveforms.ndim != 2:
            raise ValueError(
                f"waveforms must be a (batch, samples) array, got shape {tuple(waveforms.shape)}; "
                "wrap a single clip as x[None] or [x]"
            )
        items = list(waveforms)
    elif isinstance(waveforms, Sequence) and not isinstance(waveforms, (str, bytes)):
        items = list(waveforms)
    else:
        raise ValueError(
            f"waveforms must be an array, a tensor or a list of them, got {type(waveforms).__name__}"
        )
    if not items:
        raise ValueError("no waveforms given (empty batch)")
    out = []
    for i, x in enumerate(items):
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach()
        if t.ndim != 1:
            raise ValueError(f"waveform {i} must be 1-D (mono samples), got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"waveform {i} is empty")
        if t.dtype == torch.int16:
            t = t.float() / 32767.0
        elif t.is_floating_point():
            t = t.float()
        else:
            raise ValueError(
                f"waveform {i} has dtype {t.dtype}; expected float samples in [-1, 1] or int16 PCM"
            )
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"waveform {i} contains {bad} NaN or infinite samples")
        out.append(t.cpu())
    return out


def int16_round_trip(x: torch.Tensor) -> torch.Tensor:
    """LAION's quantisation: clamp to [-1, 1], ×32767, truncate toward zero to int16, ÷32767."""
    return (torch.clamp(x, -1.0, 1.0) * 32767.0).to(torch.int16).to(torch.float32) / 32767.0


def fill(x: torch.Tensor, length: int, policy: str = "repeatpad") -> torch.Tensor:
    """Bring a 1-D clip shorter than ``length`` to ``length`` samples (see module docstring)."""
    n = x.shape[-1]
    if n >= length:
        return x[..., :length]
    if policy == "repeatpad":
        return F.pad(x.repeat(length // n), (0, length - (length // n) * n))
    if policy == "repeat":
        return x.repeat(length // n + 1)[:length]
    if policy == "pad":
        return F.pad(x, (0, length - n))
    raise ValueError(f"data filling must be one of {FILL_POLICIES}, got {policy!r}")


def resample(x: torch.Tensor, orig: int, target: int) -> torch.Tensor:
    """Resample a 1-D clip with torchaudio (band-limited sinc)."""
    if orig == target:
        return x
    if not isinstance(orig, (int, np.integer)) or orig <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {orig!r}")
    try:
        import torchaudio.functional as AF
    except ImportError as exc:
        raise ValueError(
            f"audio at {orig} Hz needs resampling to {target} Hz, which needs torchaudio "
            "(pip install torchaudio), or resample it yourself"
        ) from exc
    return AF.resample(x, int(orig), int(target))


def read_audio(source, name: str | None = None) -> tuple[torch.Tensor, int]:
    """Decode a path or an open binary file with soundfile and downmix by mean.

    Returns the (T,) float32 mono clip at the file's own rate, and that rate.
    """
    import soundfile as sf

    name = name or str(source)
    data, sr = sf.read(
        source if hasattr(source, "read") else str(source), dtype="float32", always_2d=True
    )
    if data.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    x = torch.from_numpy(data.mean(axis=1))
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: NaN or infinite samples")
    return x, int(sr)


def load_audio(path: str, target_sr: int) -> torch.Tensor:
    """Decode a file with soundfile (wav / flac / ogg …), downmix by mean, resample -> 1-D float32."""
    x, sr = read_audio(path)
    return resample(x, sr, target_sr)


@dataclass
class AudioBatch:
    """Model inputs for a batch of clips.

    Non-fusion: ``waveform`` (W, clip_samples) with ``owner`` (W,) mapping windows to clips.
    Fusion: ``mel_fusion`` (B, 4, frames, mel_bins) and ``longer`` (B,) bool; owner = arange(B).
    """

    owner: torch.Tensor
    waveform: torch.Tensor | None = None
    mel_fusion: torch.Tensor | None = None
    longer: torch.Tensor | None = None


def _windows(
    x: torch.Tensor, clip: int, policy: str, generator: torch.Generator | None
) -> list[torch.Tensor]:
    n = x.shape[0]
    if policy == "sliding":
        starts = list(range(0, n - clip, clip)) + [n - clip]
    elif policy == "first":
        starts = [0]
    elif policy == "rand_trunc":
        starts = [int(torch.randint(0, n - clip + 1, (1,), generator=generator))]
    else:
        raise ValueError(
            f"long-audio policy for non-fusion models must be sliding, first or rand_trunc, got {policy!r}"
        )
    return [x[s : s + clip] for s in starts]


def prepare_batch(
    clips: list[torch.Tensor],
    cfg: AudioConfig,
    *,
    fusion: bool,
    data_filling: str = "repeatpad",
    long_audio: str | None = None,
    generator: torch.Generator | None = None,
    antialias: bool = True,
    device: torch.device | None = None,
) -> AudioBatch:
    """Turn validated 48 kHz clips into model inputs (int16 round trip, fill, long policy).

    Fusion mel views are computed with ``ops.log_mel`` on ``device``.
    """
    clip = cfg.clip_samples
    if data_filling not in FILL_POLICIES:
        raise ValueError(f"data filling must be one of {FILL_POLICIES}, got {data_filling!r}")
    long_audio = long_audio or ("fusion" if fusion else "sliding")
    if long_audio not in LONG_POLICIES:
        raise ValueError(f"long-audio policy must be one of {LONG_POLICIES}, got {long_audio!r}")
    if fusion != (long_audio == "fusion"):
        raise ValueError("fusion models take long_audio='fusion', and only they do")
    clips = [int16_round_trip(c) for c in clips]
    if not fusion:
        wins, owner = [], []
        for i, c in enumerate(clips):
            parts = (
                _windows(c, clip, long_audio, generator)
                if c.shape[0] > clip
                else [fill(c, clip, data_filling)]
            )
            wins += parts
            owner += [i] * len(parts)
        return AudioBatch(owner=torch.tensor(owner), waveform=torch.stack(wins).to(device))
    fb = htk_mel_fb(cfg.sample_rate, cfg.window_size, cfg.mel_bins, cfg.fmin, cfg.fmax).to(device)
    chunk = clip // cfg.hop_size + 1
    views, longer = [], []
    for c in clips:
        if c.shape[0] <= clip:
            c = fill(c, clip, data_filling)
        mel = ops.log_mel(c[None].to(device), fb, n_fft=cfg.window_size, hop_length=cfg.hop_size)[0]
        v, is_longer = fusion_views(mel, chunk, antialias=antialias, generator=generator)
        views.append(v)
        longer.append(is_longer)
    return AudioBatch(
        owner=torch.arange(len(clips)),
        mel_fusion=torch.stack(views),
        longer=torch.tensor(longer, device=device),
    )
