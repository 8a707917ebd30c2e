"""Exportable encoder wrappers: raw inputs in, L2-normalised embeddings out.

The model's eager path (``CLAP.encode_audio``) computes the log-mel through ``ops.log_mel``;
that reference framing (``unfold`` after a reflect pad) and its DFT basis (``hann_window`` in
float64 built inside the graph) do not export: the legacy exporter rejects ``unfold`` with a
dynamic batch, and the dynamo exporter has no ONNX function for ``aten.hann_window``. The
wrappers therefore restructure the same math from the model's own weights, without touching
the model files:

* front end: reflect pad, then a strided ``conv1d`` whose 2·(n_fft/2+1) filters are the
  Hann-windowed cos / −sin basis (the STFT as a convolution; no ONNX STFT/DFT op), power,
  ``@ melW`` (the checkpoint's filterbank), ``10·log10(max(·, 1e-10))``;
* HTS-AT's bicubic resize of the time axis (1001 → 1024 frames, ``align_corners=True``) as a
  constant (1024, 1001) matrix: TensorRT's ONNX parser has no cubic ``Resize`` and the matrix
  is exactly what ``F.interpolate`` computes (obtained by interpolating an identity);
* the fusion patch embed (``torch.nonzero`` + scatter in the model) as "fuse every row, then
  ``where(longer, fused, global)``", which equals the model in eval mode (its BatchNorms use
  running statistics, so a row's result does not depend on the other rows).

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
from clap_fast.htsat import HTSAT
from clap_fast.model import CLAP
from kernels.mel_ref import dft_basis

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


class LogMel(nn.Module):
    """(B, L) float32 waveform -> (B, T, n_mels) Slaney log-mel, as ``kernels.mel_ref.log_mel``.

    The STFT is a strided conv1d against the windowed DFT basis (2·(n_fft/2+1) output channels;
    about 2 GFLOP per 10 s clip), which every ONNX runtime and TensorRT can run.
    """

    def __init__(self, n_fft: int, hop: int, mel_fb: torch.Tensor, amin: float = 1e-10) -> None:
        super().__init__()
        self.n_fft, self.hop, self.amin = n_fft, hop, amin
        self.n_bins = n_fft // 2 + 1
        basis = dft_basis(n_fft, torch.device("cpu"), torch.float64)  # (n_fft, 2·n_bins)
        self.register_buffer("basis", basis.T[:, None, :].float().contiguous(), persistent=False)
        self.mel_fb = mel_fb  # the model's melW buffer (shared, not copied)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        x = F.pad(waveform[:, None, :], (pad, pad), mode="reflect")
        y = F.conv1d(x, self.basis, stride=self.hop)  # (B, 2·n_bins, T)
        power = y[:, : self.n_bins].square() + y[:, self.n_bins :].square()
        mel = torch.matmul(power.transpose(1, 2), self.mel_fb.float())  # (B, T, n_mels)
        return torch.log10(torch.clamp(mel, min=self.amin)) * 10.0


def _bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix M with ``M @ x == F.interpolate(x, n_out, bicubic, align_corners)``
    along one axis (the other axis keeps its size, where align_corners bicubic is the identity)."""
    eye = torch.eye(n_in, dtype=torch.float64)[None, None]
    m = F.interpolate(eye, size=(n_out, n_in), mode="bicubic", align_corners=True)[0, 0]
    return m.float().contiguous()


class _HTSATBody(nn.Module):
    """HTS-AT from the normalised log-mel to pooled tokens, with the resize as a matmul."""

    def __init__(self, branch: HTSAT, n_frames: int) -> None:
        super().__init__()
        self.branch = branch
        target = branch.spec_size * branch.freq_ratio
        m = _bicubic_matrix(n_frames, target) if n_frames < target else None
        self.register_buffer("resize", m, persistent=False)

    def image(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, C, T, F) log-mel -> (B, C, S, S) image (bn0, resize, fold), as HTSAT._to_image."""
        br = self.branch
        x = br.bn0(mel.transpose(1, 3)).transpose(1, 3)
        if self.resize is not None:
            x = torch.matmul(self.resize.to(x.dtype), x)
        b, c, t, f = x.shape
        r = br.freq_ratio
        x = x.transpose(2, 3).reshape(b, c, f, r, t // r)
        return x.permute(0, 1, 3, 2, 4).reshape(b, c, f * r, t // r)

    def tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.branch.layers:
            tokens = layer(tokens)
        return self.branch.norm(tokens).mean(dim=1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        pe = self.branch.patch_embed
        g = pe.proj(self.image(mel))
        return self.tokens(pe.norm(g.flatten(2).transpose(1, 2)))


class AudioEncoder(nn.Module):
    """(B, clip_samples) float32 waveform -> (B, 512) L2-normalised embedding (non-fusion)."""

    def __init__(self, model: CLAP) -> None:
        super().__init__()
        if model.cfg.enable_fusion:
            raise ValueError("AudioEncoder is for non-fusion models; use FusionAudioEncoder")
        cfg = model.cfg.audio
        branch = model.audio_branch
        self.frontend = LogMel(cfg.window_size, cfg.hop_size, branch.logmel_extractor.melW)
        n_frames = cfg.clip_samples // cfg.hop_size + 1
        self.htsat = _HTSATBody(branch, n_frames) if isinstance(branch, HTSAT) else None
        self.branch = branch
        self.projection = model.audio_projection

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        mel = self.frontend(waveform.float()).unsqueeze(1)  # front end always in fp32
        mel = mel.to(self.projection[0].weight.dtype)
        pooled = self.htsat(mel) if self.htsat is not None else self.branch.forward_mel(mel)
        return F.normalize(self.projection(pooled).float(), dim=-1)


class FusionAudioEncoder(nn.Module):
    """Fusion HTS-AT: (B, 4, 1001, 64) mel views + (B,) bool ``longer`` -> (B, 512) embedding.

    The model's data-dependent row selection is replaced by computing the fusion for every row
    and selecting with ``where`` (exact in eval mode; costs the AFF block for short rows too).
    """

    def __init__(self, model: CLAP) -> None:
        super().__init__()
        if not model.cfg.enable_fusion or not isinstance(model.audio_branch, HTSAT):
            raise ValueError("FusionAudioEncoder needs a fusion HTS-AT model")
        self.body = _HTSATBody(model.audio_branch, 1001)
        self.projection = model.audio_projection

    def forward(self, mel_fusion: torch.Tensor, longer: torch.Tensor) -> torch.Tensor:
        pe = self.body.branch.patch_embed
        x = self.body.image(mel_fusion.to(self.projection[0].weight.dtype))
        g = pe.proj(x[:, :1])
        local = x[:, 1:]
        b, nc, h, w = local.shape
        local = pe.mel_conv2d(local.reshape(b * nc, 1, h, w))
        local = local.reshape(b, nc, *local.shape[1:]).permute(0, 2, 3, 1, 4).flatten(3)
        tw = g.shape[-1]
        local = F.pad(local, (0, tw - local.shape[-1])) if local.shape[-1] < tw else local[..., :tw]
        fused = _aff(pe.fusion_model, g, local)
        g = torch.where(longer.reshape(-1, 1, 1, 1), fused, g)
        pooled = self.body.tokens(pe.norm(g.flatten(2).transpose(1, 2)))
        return F.normalize(self.projection(pooled).float(), dim=-1)


def _aff(aff: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``htsat.AFF.forward`` in eval mode, without its batch-of-one branch (a shape guard that
    would pin the exported batch size); eval-mode BatchNorm makes the branch a no-op."""
    xa = x + residual
    w = torch.sigmoid(aff.local_att(xa) + aff.global_att(xa))
    return 2 * x * w + 2 * residual * (1 - w)


class TextEncoder(nn.Module):
    """(B, L) int64 ``input_ids`` and ``attention_mask`` -> (B, 512) L2-normalised embedding."""

    def __init__(self, model: CLAP) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        m = self.model
        if m.text_type == "roberta":
            # RoBERTa's own position ids are an int32 CumSum, which TensorRT's parser rejects
            # (CumSum: float types only); the same ids from a float cumsum (exact below 2^24).
            pad = m.text_branch.config.pad_token_id
            keep = (input_ids != pad).float()
            pos = (torch.cumsum(keep, dim=1) * keep).long() + pad
            out = m.text_branch(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=pos
            )
            feats = m.text_projection(out["pooler_output"])
        else:
            feats = m.encode_text(input_ids, attention_mask)
        return F.normalize(feats.float(), dim=-1)


class EagerReference(nn.Module):
    """The model's own eager path (FFT front end, bicubic resize, row selection), normalised:
    what every export is compared with. Takes the same inputs as the tower's wrapper."""

    def __init__(self, model: CLAP, tower: str) -> None:
        super().__init__()
        self.model, self.tower = model, tower

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.tower == "text":
            return F.normalize(m.encode_text(*inputs).float(), dim=-1)
        if m.cfg.enable_fusion:
            mel, longer = inputs
            return F.normalize(m.encode_audio(mel_fusion=mel, longer=longer).float(), dim=-1)
        return F.normalize(m.encode_audio(inputs[0]).float(), dim=-1)


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
        from clap_fast.checkpoint import load_pretrained

        return load_pretrained(path, device="cpu", text_overrides=spec.text_overrides).eval()
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
