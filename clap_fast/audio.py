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
import re
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
    "CHANNEL_LAYOUTS",
    "as_waveform_list",
    "int16_round_trip",
    "fill",
    "resample",
    "load_audio",
    "AudioBatch",
    "prepare_batch",
]

log = logging.getLogger(__name__)

FILL_POLICIES = ("repeatpad", "repeat", "pad")
LONG_POLICIES = ("sliding", "first", "rand_trunc", "fusion")


CHANNEL_LAYOUTS = ("first", "last")
_MAX_CHANNELS = 16  # a (batch, samples) array never has this few samples per clip


def _downmix(x: torch.Tensor | np.ndarray, channels: str, what: str):
    """Mean over the channel axis of a multi-channel clip (or a batch of them)."""
    if channels not in CHANNEL_LAYOUTS:
        raise ValueError(f"channels must be one of {CHANNEL_LAYOUTS} or None, got {channels!r}")
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.dtype == torch.int16:
        t = t.float() / 32767.0
    if not t.is_floating_point():
        raise ValueError(f"{what} has dtype {t.dtype}; expected float samples or int16 PCM")
    return t.float().mean(dim=-2 if channels == "first" else -1)


def as_waveform_list(
    waveforms: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    channels: str | None = None,
) -> list[torch.Tensor]:
    """Validate user input and return a list of 1-D float32 CPU tensors.

    Input rules (float dtypes, or int16 PCM read as x / 32767):
      * a 1-D array / tensor is one clip;
      * a (B, T) array / tensor, or a sequence of 1-D clips, is a batch;
      * multi-channel audio needs ``channels=``: "last" for (T, C) clips as ``soundfile.read``
        returns them ((B, T, C) batches), "first" for (C, T) ((B, C, T)); it is downmixed by
        mean. Without it, a 2-D array with at most 16 columns and more rows than columns looks
        like (T, C) and is refused, and 3-D input is refused;
      * a string or path is refused (files go to ``embed_audio_files``).
    Raises ValueError naming the problem otherwise.
    """
    if isinstance(waveforms, (torch.Tensor, np.ndarray)):
        if channels is not None:
            if waveforms.ndim not in (2, 3):
                raise ValueError(
                    f"channels={channels!r} needs a multi-channel clip (2-D) or a batch of them "
                    f"(3-D), got shape {tuple(waveforms.shape)}"
                )
            waveforms = _downmix(waveforms, channels, "waveforms")
            if waveforms.ndim == 1:
                waveforms = waveforms[None]
        elif waveforms.ndim == 1:
            waveforms = waveforms[None]  # one clip
        elif (
            waveforms.ndim == 2
            and waveforms.shape[0] > waveforms.shape[1]
            and (0 < waveforms.shape[1] <= _MAX_CHANNELS)
        ):
            t, c = waveforms.shape
            raise ValueError(
                f"waveforms of shape ({t}, {c}) look like one clip of {t} samples in {c} channels "
                f"(as soundfile.read returns it), not {t} clips of {c} samples; pass "
                "channels='last' to downmix it, or give (batch, samples)"
            )
        if waveforms.ndim != 2:
            raise ValueError(
                f"waveforms must be a (batch, samples) array, got shape {tuple(waveforms.shape)}; "
                "multi-channel audio needs channels='first' or 'last'"
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
        if isinstance(x, (str, bytes)):
            raise ValueError(f"waveform {i} is a string ({x!r}); files go to embed_audio_files")
        if channels is not None and np.ndim(x) == 2:
            x = _downmix(x, channels, f"waveform {i}")
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


def load_audio(path: str, target_sr: int) -> torch.Tensor:
    """Decode a file with soundfile (wav / flac / ogg …), downmix by mean, resample -> 1-D float32."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        _check_not_truncated(path, f.extra_info)
        data, sr = f.read(dtype="float32", always_2d=True), f.samplerate
    if data.shape[0] == 0:
        raise ValueError(f"{path}: no samples")
    x = torch.from_numpy(data.mean(axis=1))
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{path}: NaN or infinite samples")
    return resample(x, sr, target_sr)


_DATA_LEN = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.M)


def _check_not_truncated(path: str, extra_info: str) -> None:
    """libsndfile reads a WAV / AIFF cut short without complaint (it notes the real length in
    its log): refuse it rather than embed a fragment. Streaming headers (0 or 0xFFFFFFFF) pass."""
    m = _DATA_LEN.search(extra_info or "")
    if m and int(m[2]) < int(m[1]) and 0 < int(m[1]) < 0xFFFFFFF0:
        raise ValueError(
            f"{path}: truncated: the header declares {m[1]} bytes of audio, the file holds {m[2]}"
        )


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
