"""Frame-level audio embeddings: LAION HTS-AT's ``fine_grained_embedding`` with timestamps.

HTS-AT ends in an 8×8 token grid per 10 s window (frequency groups × time). LAION's
``fine_grained_embedding`` folds the grid back to time (the ``freq_ratio`` groups are laid side
by side in time), averages over frequency and repeats each step 32 times to 1024 frames; the 32
distinct steps cover 10/32 s = 0.3125 s each. ``embed_frames`` returns those 32 steps per window
(``upsample=True`` gives LAION's 1024-frame layout), optionally passed through the audio
projection into the joint space and L2-normalised.

Approximate for text alignment: CLAP was trained on the pooled embedding only, so a projected
frame is the projection of a frequency-averaged token, not a trained frame-text score; use it
for localisation heat-maps and retrieval within a clip, not as calibrated probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from clap_fast import ops, validate
from clap_fast.audio import as_waveform_list, fill, int16_round_trip, resample

__all__ = ["Frames", "fine_grained", "embed_frames"]


@dataclass
class Frames:
    """One clip's frames: ``times`` (T,) start seconds and ``embeddings`` (T, D) float32."""

    times: torch.Tensor
    embeddings: torch.Tensor


def fine_grained(branch, tokens: torch.Tensor, upsample: bool = False) -> torch.Tensor:
    """(B, N, C) final HTS-AT tokens -> (B, T, C) time steps (LAION's fine-grained layout).

    T = 4·S for an S×S token grid (32 for HTS-AT at spec size 256); ``upsample`` repeats each step
    ``1024 // T`` times as LAION's ``interpolate`` does.
    """
    b, n, c = tokens.shape
    s = int(round(n**0.5))
    r = branch.freq_ratio
    x = tokens.transpose(1, 2).reshape(b, c, s, s)  # (B, C, F, T) token grid
    x = x.reshape(b, c, r, s // r, s).permute(0, 1, 3, 2, 4).reshape(b, c, s // r, r * s)
    x = x.mean(dim=2).transpose(1, 2)  # (B, r·S, C)
    if upsample:
        x = x.repeat_interleave(1024 // x.shape[1], dim=1)
    return x


def embed_frames(
    model,
    waveforms,
    sample_rate: int = 48000,
    *,
    project: bool = True,
    normalize: bool = True,
    upsample: bool = False,
    channels: str | None = None,
) -> list[Frames]:
    """Frame embeddings of each clip (non-fusion HTS-AT models).

    Clips are cut into 10 s windows starting every 10 s (the last one ``repeatpad``-filled, as
    LAION fills short clips); frames starting after the clip's end are dropped.

    Returns:
        one ``Frames`` per clip: times (T,) in seconds, embeddings (T, 512) projected (or
        (T, C) raw tower features with ``project=False``).
    """
    branch = model.audio_branch
    if model.cfg.audio.model_type != "HTSAT" or model.cfg.enable_fusion:
        raise ValueError("frame embeddings need a non-fusion HTS-AT model")
    sample_rate = validate.check_sample_rate(sample_rate)
    validate.check_not_paths(waveforms)
    cfg = model.cfg.audio
    n = cfg.clip_samples
    dev = ops.device_of(model)
    out = []
    with torch.inference_mode():
        for clip in as_waveform_list(waveforms, channels):
            x = int16_round_trip(resample(clip, sample_rate, cfg.sample_rate))
            starts = list(range(0, x.shape[0], n))
            wins = torch.stack([fill(x[s : s + n], n, "repeatpad") for s in starts]).to(dev)
            tokens = branch.forward_mel(branch.log_mel(wins))
            f = fine_grained(branch, tokens, upsample).float()
            if project:
                f = model.audio_projection(f)
            if normalize:
                f = F.normalize(f, dim=-1)
            step = n / cfg.sample_rate / f.shape[1]
            times = torch.tensor(
                np.concatenate([s / cfg.sample_rate + step * np.arange(f.shape[1]) for s in starts])
            )
            f = f.reshape(-1, f.shape[-1]).cpu()
            keep = times < x.shape[0] / cfg.sample_rate
            out.append(Frames(times=times[keep].float(), embeddings=f[keep]))
    return out
