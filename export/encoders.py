"""Exportable encoder wrappers: raw inputs in, L2-normalised embeddings out.

The wrappers hold no model maths: they call the model's own ``encode_audio`` /
``encode_text``, which are written in exportable forms (see ``clap_fast/htsat.py``): under an
exporter ``ops.log_mel`` computes the STFT as a strided conv1d against the model's LAION STFT
weights (no ONNX STFT/DFT op), HTS-AT's bicubic time resize is a constant 4-tap gather
(TensorRT has no cubic ``Resize``), and the eval-mode fusion patch embed fuses every row and
selects with ``where`` (no ``nonzero``). What is left here is the input contract and the final
normalisation.

Audio contract: ``waveform`` is (B, 480000) float32 at 48 kHz, already prepared as the model's
API does it (``clap_fast.audio``: int16 round trip, repeat-pad / crop to 10 s). Fusion models
take ``mel_fusion`` (B, 4, 1001, 64) HTK log-mel views and ``longer`` (B,) bool, prepared by
``clap_fast.audio.prepare_batch``. Text: ``input_ids`` / ``attention_mask`` (B, L) int64.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import clap_fast
from clap_fast.model import CLAP

__all__ = [
    "AudioEncoder",
    "FusionAudioEncoder",
    "TextEncoder",
    "EagerReference",
    "ModelSpec",
    "load_model",
    "audio_encoder",
    "sample_waveforms",
    "sample_tokens",
    "sample_fusion_inputs",
    "parity",
    "sha256_file",
]


class AudioEncoder(nn.Module):
    """(B, clip_samples) float32 waveform -> (B, 512) L2-normalised embedding (non-fusion)."""

    def __init__(self, model: CLAP) -> None:
        super().__init__()
        if model.cfg.enable_fusion:
            raise ValueError("AudioEncoder is for non-fusion models; use FusionAudioEncoder")
        self.model = model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_audio(waveform.float()).float(), dim=-1)


class FusionAudioEncoder(nn.Module):
    """Fusion HTS-AT: (B, 4, 1001, 64) mel views + (B,) bool ``longer`` -> (B, 512) embedding."""

    def __init__(self, model: CLAP) -> None:
        super().__init__()
        if not model.cfg.enable_fusion:
            raise ValueError("FusionAudioEncoder needs a fusion model")
        self.model = model

    def forward(self, mel_fusion: torch.Tensor, longer: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_audio(mel_fusion=mel_fusion.float(), longer=longer)
        return F.normalize(feats.float(), dim=-1)


class TextEncoder(nn.Module):
    """(B, L) int64 ``input_ids`` and ``attention_mask`` -> (B, 512) L2-normalised embedding."""

    def __init__(self, model: CLAP) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(input_ids, attention_mask).float(), dim=-1)


class EagerReference(nn.Module):
    """The model run eagerly (outside any exporter: FFT front end, Triton on a GPU) behind the
    tower's wrapper: what every export is compared with. Same inputs as the wrapper."""

    def __init__(self, model: CLAP, tower: str) -> None:
        super().__init__()
        self.tower = tower
        self.wrapper = TextEncoder(model) if tower == "text" else audio_encoder(model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.wrapper(*inputs)


def audio_encoder(model: CLAP) -> nn.Module:
    """The audio wrapper that fits the model (fusion or not), in eval mode."""
    enc = FusionAudioEncoder(model) if model.cfg.enable_fusion else AudioEncoder(model)
    return enc.eval()


# ----------------------------------------------------------------------------- models


@dataclass
class ModelSpec:
    """What to build: an architecture name (random weights) and/or a checkpoint."""

    name: str = "HTSAT-tiny"
    """Architecture (``clap_fast.list_models()``, case-insensitive); ignored with a checkpoint."""
    checkpoint: str | None = None
    """LAION .pt / HF / clap_fast checkpoint; the architecture is detected from its weights."""
    text: str = "roberta"
    """Text tower for random-weight models."""
    text_overrides: dict[str, Any] | None = None
    """TextConfig overrides (e.g. a tiny tower for tests)."""
    enable_fusion: bool = False
    """Build the fusion variant (random weights only; checkpoints say it themselves)."""
    seed: int = 0
    """Seed of the random initialisation (reproducible exports of random models)."""


def load_model(spec: ModelSpec) -> CLAP:
    """Build or load the fp32 CPU model in eval mode; clear ValueError / FileNotFoundError."""
    if spec.checkpoint is not None:
        path = Path(spec.checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return clap_fast.from_pretrained(path, device="cpu", text_overrides=spec.text_overrides)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(spec.seed)
    try:
        model = clap_fast.create_model(
            spec.name, text=spec.text, enable_fusion=spec.enable_fusion,
            text_overrides=spec.text_overrides, device="cpu",
        )  # fmt: skip
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


def sha256_file(path: str | Path | None) -> str | None:
    """Hex sha256 of a file (None for None)."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------- test data


def sample_waveforms(
    batch: int, samples: int = 480000, sample_rate: int = 48000, seed: int = 0
) -> torch.Tensor:
    """(batch, samples) float32 real-ish clips: 1–3 tones with vibrato and decays, plus noise,
    int16-round-tripped like the model's preprocessing. Different per row, never silent."""
    from clap_fast.audio import int16_round_trip

    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples, dtype=torch.float64) / sample_rate
    rows = []
    for _ in range(batch):
        x = torch.zeros(samples, dtype=torch.float64)
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            f0 = 80.0 * 2 ** (float(torch.rand(1, generator=g)) * 6)  # 80 Hz .. 5 kHz
            vib = 1 + 0.01 * torch.sin(2 * math.pi * 5 * t)
            amp = 0.1 + 0.3 * float(torch.rand(1, generator=g))
            env = torch.exp(-t * float(torch.rand(1, generator=g)) * 2)
            x += amp * env * torch.sin(2 * math.pi * f0 * t * vib)
        x += 0.02 * torch.randn(samples, generator=g, dtype=torch.float64)
        rows.append(x)
    return int16_round_trip(torch.stack(rows).float())


def sample_fusion_inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, 4, 1001, 64) log-mel-like views (dB-scaled, not constant) and (batch,) longer
    flags alternating True / False (so both branches of the fusion are exercised)."""
    g = torch.Generator().manual_seed(seed)
    mel = -40 + 15 * torch.randn(batch, 4, 1001, 64, generator=g)
    longer = torch.arange(batch) % 2 == 0
    return mel, longer


def sample_tokens(model: CLAP, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, context_length) int64 token ids and mask of varied lengths, valid for the tower:
    BOS … EOS then padding (RoBERTa: 0 / 2 / pad 1; CLIP-style: EOT is the largest id)."""
    cfg = model.cfg.text
    g = torch.Generator().manual_seed(seed)
    length = cfg.context_length
    ids = torch.zeros(batch, length, dtype=torch.int64)
    mask = torch.zeros(batch, length, dtype=torch.int64)
    if cfg.model_type == "transformer":
        vocab, bos, eos, pad = cfg.vocab_size, cfg.vocab_size - 2, cfg.vocab_size - 1, 0
    else:
        vocab = int(model.text_branch.config.vocab_size)
        bos, eos, pad = 0, 2, int(getattr(model.text_branch.config, "pad_token_id", 1) or 1)
    for i in range(batch):
        n = int(torch.randint(3, length + 1, (1,), generator=g))
        body = torch.randint(3, max(vocab - 3, 4), (n - 2,), generator=g)
        ids[i, :n] = torch.cat([torch.tensor([bos]), body, torch.tensor([eos])])
        ids[i, n:] = pad
        mask[i, :n] = 1
    return ids, mask


def parity(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Row-wise cosine (min, mean) and max |Δ| between two (B, D) embedding batches."""
    ref = reference.detach().double().cpu()
    cand = torch.as_tensor(candidate).detach().double().cpu()
    if ref.shape != cand.shape:
        raise ValueError(f"parity: shapes differ, {tuple(ref.shape)} vs {tuple(cand.shape)}")
    cos = F.cosine_similarity(ref, cand, dim=-1)
    return {
        "cos_min": float(cos.min()),
        "cos_mean": float(cos.mean()),
        "max_abs_diff": float((ref - cand).abs().max()),
    }
