"""Waveform preprocessing: validation, decoding, resampling, LAION's int16 round trip, filling
and the long-audio policies: one path for the inference API and the training loader.

``decode_audio`` (file or bytes -> 1-D clip at the model's rate) and ``prepare_clip`` (1-D clip
-> model input) are the preparation steps; ``prepare_batch`` (the API, zero-shot evaluation)
and ``clap_fast.data`` (the training loader) both call them. Where LAION's inference and
training code differ, the difference is a named option, not a second pipeline:

  =============  ====================================  ======================================
  option         inference API (default)               training loader (LAION's training)
  =============  ====================================  ======================================
  ``downmix``    "mean" of all channels                "first": channel 0 only
  ``antialias``  True: the fusion's whole-clip view    False: torchvision < 0.17's Resize,
                 resized as laion_clap does today      what LAION trained with
  ``long_audio`` "sliding" windows (deterministic)     "rand_trunc" (LAION's random crop)
  ``generator``  None: centred fusion crops            seeded per sample: random crops
  =============  ====================================  ======================================

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

import functools
import io
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO, Literal, get_args

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
    "read_audio",
    "decode_audio",
    "load_audio",
    "PreparedClip",
    "prepare_clip",
    "AudioBatch",
    "prepare_batch",
]

log = logging.getLogger(__name__)

Filling = Literal["repeatpad", "repeat", "pad"]
"""Short clips (see the module docstring)."""
LongAudio = Literal["sliding", "first", "rand_trunc", "fusion"]
"""Long clips (see the module docstring)."""
Downmix = Literal["mean", "first"]
"""Multi-channel files: the mean of the channels, or LAION's training loader's channel 0."""
FILL_POLICIES: tuple[str, ...] = get_args(Filling)
LONG_POLICIES: tuple[str, ...] = get_args(LongAudio)


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


def read_audio(
    source: str | os.PathLike | bytes | BinaryIO,
    name: str | None = None,
    *,
    downmix: Downmix = "mean",
) -> tuple[torch.Tensor, int]:
    """Decode a path, bytes or an open binary file with soundfile (wav / flac / ogg …) and
    downmix -> ((T,) float32 mono clip at the file's own rate, that rate). Raises ValueError for
    an empty, truncated or non-finite file; ``name`` is what the error messages call it."""
    import soundfile as sf

    if name is None:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    elif not hasattr(source, "read"):
        source = str(source)
    with sf.SoundFile(source) as f:
        _check_not_truncated(name, f.extra_info)
        data, sr = f.read(dtype="float32", always_2d=True), f.samplerate
    if data.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    if not np.isfinite(data).all():
        raise ValueError(f"{name}: NaN or infinite samples")
    if downmix == "mean":
        mono = data.mean(axis=1)
    elif downmix == "first":
        mono = np.ascontiguousarray(data[:, 0])
    else:
        raise ValueError(f"downmix must be one of {get_args(Downmix)}, got {downmix!r}")
    return torch.from_numpy(mono), int(sr)


def decode_audio(
    source: str | os.PathLike | bytes, target_sr: int, *, downmix: Downmix = "mean"
) -> torch.Tensor:
    """Decode a file (path) or its bytes (``read_audio``), downmix, resample -> 1-D float32 clip
    at ``target_sr``. Raises ValueError for an empty, truncated or non-finite file."""
    x, sr = read_audio(source, downmix=downmix)
    return resample(x, sr, target_sr)


def load_audio(path: str, target_sr: int) -> torch.Tensor:
    """A file -> 1-D float32 clip at ``target_sr``, downmixed by mean (the API's choice)."""
    return decode_audio(path, target_sr, downmix="mean")


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


@dataclass
class PreparedClip:
    """One clip as model input: ``windows`` (W, clip_samples) float32, or int16 for an int16
    clip (non-fusion; W > 1 only for ``sliding``), or ``mel_fusion`` (4, frames, mel_bins) float32 and ``longer``."""

    windows: torch.Tensor | None = None
    mel_fusion: torch.Tensor | None = None
    longer: bool = False


@functools.cache
def _htk_fb(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> torch.Tensor:
    with torch.inference_mode(False):  # a cached inference tensor would break autograd later
        return htk_mel_fb(sample_rate, n_fft, n_mels, fmin, fmax)


def _check_options(fusion: bool, filling: str, long_audio: str | None) -> str:
    if filling not in FILL_POLICIES:
        raise ValueError(f"data filling must be one of {FILL_POLICIES}, got {filling!r}")
    long_audio = long_audio or ("fusion" if fusion else "sliding")
    if long_audio not in LONG_POLICIES:
        raise ValueError(f"long-audio policy must be one of {LONG_POLICIES}, got {long_audio!r}")
    if fusion != (long_audio == "fusion"):
        raise ValueError("fusion models take long_audio='fusion', and only they do")
    return long_audio


def prepare_clip(
    x: torch.Tensor,
    cfg: AudioConfig,
    *,
    fusion: bool,
    data_filling: Filling = "repeatpad",
    long_audio: LongAudio | None = None,
    generator: torch.Generator | None = None,
    antialias: bool = True,
    clip_samples: int | None = None,
    device: torch.device | None = None,
) -> PreparedClip:
    """One validated 1-D clip at ``cfg.sample_rate`` -> model input (see the module docstring).

    int16 round trip (an int16 clip is taken as already quantised, and non-fusion windows stay
    int16), then: non-fusion, a short clip is filled (``data_filling``) and a long one
    cut by ``long_audio`` (default ``sliding``); fusion, the HTK log-mel of the (filled) clip
    computed by ``ops.log_mel`` on ``device`` and its 4 views (``antialias``, ``generator`` for
    random crops). ``clip_samples`` overrides the config's clip length.
    """
    long_audio = _check_options(fusion, data_filling, long_audio)
    clip = clip_samples or cfg.clip_samples
    if x.dtype == torch.int16:
        # PCM shards hold LAION's quantised samples already: crops and fills stay int16 (the
        # division by 32767 happens on the device); fusion needs the float clip now.
        if fusion:
            x = x.to(torch.float32) / 32767.0
    else:
        x = int16_round_trip(x)
    if not fusion:
        if x.shape[0] > clip:
            return PreparedClip(windows=torch.stack(_windows(x, clip, long_audio, generator)))
        return PreparedClip(windows=fill(x, clip, data_filling)[None])
    if x.shape[0] <= clip:
        x = fill(x, clip, data_filling)
    fb = _htk_fb(cfg.sample_rate, cfg.window_size, cfg.mel_bins, cfg.fmin, cfg.fmax).to(device)
    mel = ops.log_mel(x[None].to(device), fb, n_fft=cfg.window_size, hop_length=cfg.hop_size)[0]
    chunk = clip // cfg.hop_size + 1
    views, longer = fusion_views(mel, chunk, antialias=antialias, generator=generator)
    return PreparedClip(mel_fusion=views, longer=longer)


def prepare_batch(
    clips: list[torch.Tensor],
    cfg: AudioConfig,
    *,
    fusion: bool,
    data_filling: Filling = "repeatpad",
    long_audio: LongAudio | None = None,
    generator: torch.Generator | None = None,
    antialias: bool = True,
    device: torch.device | None = None,
) -> AudioBatch:
    """Validated 48 kHz clips -> a batch of model inputs, each through ``prepare_clip``.

    Fusion mel views are computed with ``ops.log_mel`` on ``device``.
    """
    _check_options(fusion, data_filling, long_audio)
    preps = [
        prepare_clip(
            c,
            cfg,
            fusion=fusion,
            data_filling=data_filling,
            long_audio=long_audio,
            generator=generator,
            antialias=antialias,
            device=device,
        )  # fmt: skip
        for c in clips
    ]
    if not fusion:
        counts = torch.tensor([len(p.windows) for p in preps])
        return AudioBatch(
            owner=torch.repeat_interleave(torch.arange(len(clips)), counts),
            waveform=torch.cat([p.windows for p in preps]).to(device),
        )
    return AudioBatch(
        owner=torch.arange(len(clips)),
        mel_fusion=torch.stack([p.mel_fusion for p in preps]),
        longer=torch.tensor([p.longer for p in preps], device=device),
    )
