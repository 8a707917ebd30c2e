"""The CLAP model: an audio tower and a text tower projected into one embedding space.

Module and parameter names equal LAION's (``module.`` prefix aside), so a LAION state dict loads
with ``load_state_dict(strict=True)``. One deliberate difference: ``logit_scale_a/_t`` have shape
(1,) instead of 0-d, because FSDP2 refuses 0-d parameters. Loading accepts both shapes, and
``clap_fast.checkpoint.to_laion_state_dict`` writes them 0-d again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clap_fast import checkpoint, ops
from clap_fast.api import InferenceMixin
from clap_fast.config import CLAPConfig
from clap_fast.htsat import HTSAT
from clap_fast.pann import PANN
from clap_fast.text import CLIPTransformer, build_hf_tower, hf_tower_forward, hf_tower_width

__all__ = ["CLAP", "MLPLayers", "no_init"]

log = logging.getLogger(__name__)


_INIT_FNS = (
    "normal_", "trunc_normal_", "uniform_", "xavier_uniform_", "kaiming_uniform_",
    "zeros_", "ones_", "constant_",
)  # fmt: skip


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Build modules without random initialisation (their weights are about to be loaded).

    Saves most of the construction time of a large model (RoBERTa-base's init alone takes
    seconds on a CPU). Parameters hold uninitialised memory until loaded: use only when every
    parameter comes from a checkpoint.
    """
    try:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # transformers 5.x moved it
        from transformers.initialization import no_init_weights

    saved = {name: getattr(nn.init, name) for name in _INIT_FNS}
    for name in _INIT_FNS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        with no_init_weights():
            yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


class MLPLayers(nn.Module):
    """LAION's transform head: Linear, ReLU, Dropout, Linear (keys sequential.0 / .3)."""

    def __init__(self, width: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.sequential = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sequential(x)


def _projection(din: int, dout: int, act: str) -> nn.Sequential:
    if act not in ("relu", "gelu"):
        raise ValueError(f"mlp_act must be relu or gelu, got {act!r}")
    return nn.Sequential(
        nn.Linear(din, dout), nn.ReLU() if act == "relu" else nn.GELU(), nn.Linear(dout, dout)
    )


class CLAP(InferenceMixin, nn.Module):
    """Contrastive language–audio model (LAION CLAP layout).

    Build with ``clap_fast.create_model(name, text=...)`` (random weights) or
    ``CLAP.from_pretrained(path_or_name)`` (also ``clap_fast.from_pretrained``).
    """

    def __init__(self, cfg: CLAPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        joint = cfg.joint_embed_shape
        if cfg.audio.model_type == "HTSAT":
            self.audio_branch = HTSAT(cfg.audio, cfg.enable_fusion)
        elif cfg.audio.model_type == "PANN":
            self.audio_branch = PANN(cfg.audio, cfg.enable_fusion)
        else:
            raise ValueError(f"unknown audio model type {cfg.audio.model_type!r}")
        t = cfg.text
        self.text_type = t.model_type
        if t.model_type == "transformer":
            self.text_branch = CLIPTransformer(t.width, t.layers, t.heads)
            self.token_embedding = nn.Embedding(t.vocab_size, t.width)
            self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
            self.ln_final = nn.LayerNorm(t.width)
            nn.init.normal_(self.token_embedding.weight, std=0.02)
            nn.init.normal_(self.positional_embedding, std=0.01)
            mask = torch.full((t.context_length, t.context_length), float("-inf")).triu_(1)
            self.register_buffer("attn_mask", mask, persistent=False)
            text_width = t.width
        else:
            self.text_branch = build_hf_tower(t)
            text_width = hf_tower_width(self.text_branch)
        self.text_transform = MLPLayers(joint)
        self.text_projection = _projection(text_width, joint, cfg.mlp_act)
        self.audio_transform = MLPLayers(joint)
        self.audio_projection = _projection(cfg.embed_dim, joint, cfg.mlp_act)
        init = math.log(1 / 0.07)
        self.logit_scale_a = nn.Parameter(torch.full((1,), init))
        self.logit_scale_t = nn.Parameter(torch.full((1,), init))

    # ----------------------------------------------------------- checkpoints
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        device: str | torch.device | None = "cpu",
        text_overrides: dict[str, Any] | None = None,
    ) -> CLAP:
        """Load LAION ``.pt``, HF ClapModel (dir / safetensors), open_clip, or our own format.

        The architecture is detected from the weights and loaded strictly (see
        ``clap_fast.checkpoint``). A bare released name (e.g. "630k-audioset-best") is fetched
        through huggingface_hub into its cache. Returns the model in eval mode on ``device``.
        """
        cfg, sd, info = checkpoint.read_checkpoint(name_or_path, text_overrides=text_overrides)
        hf = info["format"] == "hf"
        # HF lacks some keys: they keep a proper random init; otherwise every parameter is
        # about to be overwritten.
        with contextlib.nullcontext() if hf else no_init():
            model = cls(cfg)
        filled = checkpoint.load_into(model, sd, fill_missing=checkpoint.HF_FILLED if hf else ())
        if filled:
            log.info(
                "%s: %d keys absent from the checkpoint kept the model's values (%s …)",
                info["path"], len(filled), filled[0],
            )  # fmt: skip
        return model.eval().to(ops.resolve_device(device))

    def save_pretrained(self, directory: str | os.PathLike, format: str = "ours") -> None:
        """Write ``model.safetensors`` + ``config.json``: our format, or ``format="hf"`` for
        transformers' ``ClapModel.from_pretrained`` (HTS-AT + RoBERTa; see ``hf_format``)."""
        if format == "hf":
            from clap_fast.hf_format import save_hf

            return save_hf(self, directory)
        if format != "ours":
            raise ValueError(f"format must be 'ours' or 'hf', got {format!r}")
        checkpoint.save_pretrained(self, directory)

    # ------------------------------------------------------------------ towers
    def encode_audio(
        self,
        waveform: torch.Tensor | None = None,
        *,
        mel: torch.Tensor | None = None,
        mel_fusion: torch.Tensor | None = None,
        longer: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected, unnormalised audio features (B, 512).

        Non-fusion: ``waveform`` (B, clip_samples) float32, or instead its log-mel
        ``mel = self.audio_branch.log_mel(waveform)`` (B, 1, T, mel_bins) (what the
        ``int8_compile`` engine quantises: the front end stays fp32 outside it). Fusion:
        ``mel_fusion`` (B, 4, 1001, 64) HTK log-mel views and ``longer`` (B,) bool.
        """
        pooled = self.audio_branch(waveform, mel=mel, mel_fusion=mel_fusion, longer=longer)
        return self.audio_projection(pooled)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected, unnormalised text features (B, 512) from (B, L) token ids."""
        if self.text_type == "transformer":
            x = self.token_embedding(input_ids) + self.positional_embedding
            x = self.text_branch(x.transpose(0, 1), self.attn_mask).transpose(0, 1)
            x = self.ln_final(x)
            # EOT pooling: the EOT token has the highest id in CLIP's vocabulary.
            x = x[torch.arange(x.shape[0], device=x.device), input_ids.argmax(dim=-1)]
            return self.text_projection(x)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = hf_tower_forward(self.text_type, self.text_branch, input_ids, attention_mask)
        return self.text_projection(x)

    def forward(
        self,
        waveform: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        mel_fusion: torch.Tensor | None = None,
        longer: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training forward: normalised features, their MLP transforms and both scales (exp'd)."""
        a = F.normalize(self.encode_audio(waveform, mel_fusion=mel_fusion, longer=longer), dim=-1)
        t = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        return {
            "audio_features": a,
            "text_features": t,
            "audio_features_mlp": self.audio_transform(a),
            "text_features_mlp": self.text_transform(t),
            "logit_scale_a": self.logit_scale_a.exp(),
            "logit_scale_t": self.logit_scale_t.exp(),
        }

    # ------------------------------------------------------- checkpoint shapes
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):
        text = self.text_branch.state_dict(keep_vars=True)  # persistent entries only
        own = {f"text_branch.{k}": v for k, v in text.items()}
        checkpoint.fix_laion_state_dict(state_dict, own, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )
