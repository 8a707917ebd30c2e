"""Architecture configuration: JSON files in ``model_configs/`` parsed into typed dataclasses.

Names follow LAION's configs (``HTSAT-tiny``, ``PANN-14``, …); lookup is case-insensitive, so
``htsat-tiny`` works too. The text tower is chosen separately (``text="roberta"`` etc.), since
LAION's released checkpoints pair every audio tower with RoBERTa.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal, get_args

__all__ = [
    "AudioConfig",
    "HTSATConfig",
    "TextConfig",
    "CLAPConfig",
    "list_models",
    "get_config",
    "TEXT_TOWERS",
    "TextTower",
]

TextTower = Literal["roberta", "transformer", "bert", "bart"]
"""Text towers (LAION's ``--tmodel``); ``transformer`` is the CLIP-style one."""
TEXT_TOWERS: tuple[str, ...] = get_args(TextTower)


@dataclass
class HTSATConfig:
    embed_dim: int = 96
    """Width C of the first Swin stage; stages have C, 2C, 4C, 8C."""
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2])
    """Swin blocks per stage."""
    num_heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    """Attention heads per stage."""
    window_size: int = 8
    """Window side in tokens (8 x 8 = 64 tokens per window)."""
    spec_size: int = 256
    """Side of the square image the (1024 x 64) mel is folded into."""
    drop_path_rate: float = 0.1
    """Stochastic depth, linearly increasing over blocks (training only)."""


@dataclass
class AudioConfig:
    model_type: str = "HTSAT"
    """"HTSAT" or "PANN"."""
    model_name: str = "tiny"
    """tiny / base / large (HTSAT), Cnn6 / Cnn10 / Cnn14 (PANN), or a custom name."""
    sample_rate: int = 48000
    """Input sample rate; other rates are resampled by the API."""
    clip_samples: int = 480000
    """Samples per clip (10 s)."""
    window_size: int = 1024
    """STFT n_fft and window length."""
    hop_size: int = 480
    """STFT hop."""
    fmin: float = 50.0
    """Lowest mel frequency (Hz)."""
    fmax: float = 14000.0
    """Highest mel frequency (Hz)."""
    mel_bins: int = 64
    """Mel bands."""
    class_num: int = 527
    """Classes of the (unused for embeddings) AudioSet head kept for checkpoint compatibility."""
    htsat: HTSATConfig | None = None
    """Swin settings (HTSAT only)."""


@dataclass
class TextConfig:
    model_type: str = "roberta"
    """roberta | transformer (CLIP-style) | bert | bart."""
    context_length: int = 77
    """Tokens per caption (padding to max length)."""
    width: int = 512
    """CLIP-style transformer width (transformer only; HF towers take hidden_size from hf)."""
    heads: int = 8
    """CLIP-style transformer heads."""
    layers: int = 12
    """CLIP-style transformer layers."""
    vocab_size: int = 49408
    """CLIP-style transformer vocabulary."""
    hf: dict[str, Any] = field(default_factory=dict)
    """Overrides of the transformers config of HF towers (e.g. a small RoBERTa for tests)."""


@dataclass
class CLAPConfig:
    name: str = "HTSAT-tiny"
    """Architecture name."""
    embed_dim: int = 768
    """Width of the audio tower's pooled embedding (input of audio_projection)."""
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    joint_embed_shape: int = 512
    """Width of the shared embedding space."""
    enable_fusion: bool = False
    """Feature fusion for long audio (LAION's fusion checkpoints; HTSAT only)."""
    fusion_type: str = "aff_2d"
    """Only aff_2d is built (the type of every released fusion checkpoint)."""
    mlp_act: str = "relu"
    """Activation inside the projections."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLAPConfig:
        d = copy.deepcopy(d)
        audio = dict(d.pop("audio", None) or d.pop("audio_cfg", {}))
        h = audio.pop("htsat", None)
        audio_cfg = AudioConfig(**audio, htsat=HTSATConfig(**h) if h else None)
        text = dict(d.pop("text", None) or d.pop("text_cfg", {}))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CLAP config fields: {sorted(unknown)}")
        return cls(audio=audio_cfg, text=TextConfig(**text), **d)


def _config_files() -> dict[str, Any]:
    root = resources.files("clap_fast") / "model_configs"
    return {p.name[: -len(".json")]: p for p in root.iterdir() if p.name.endswith(".json")}


def list_models() -> list[str]:
    """Names of the built-in architectures."""
    return sorted(_config_files())


def get_config(
    name: str,
    *,
    text: str | None = None,
    enable_fusion: bool = False,
    text_overrides: dict[str, Any] | None = None,
) -> CLAPConfig:
    """The config of a built-in architecture (name case-insensitive), with the text tower chosen.

    Args:
        name: e.g. "HTSAT-tiny", "htsat-base", "PANN-14".
        text: roberta (default) | transformer | bert | bart.
        enable_fusion: LAION's feature fusion (aff_2d; HTSAT only).
        text_overrides: fields of TextConfig to override (``hf`` for HF towers).
    """
    files = _config_files()
    by_lower = {k.lower(): k for k in files}
    key = by_lower.get(name.lower())
    if key is None:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(files))}")
    raw = json.loads(files[key].read_text())
    raw["name"] = key
    cfg = CLAPConfig.from_dict(raw)
    if text is not None:
        if text not in TEXT_TOWERS:
            raise ValueError(f"unknown text tower {text!r}; available: {', '.join(TEXT_TOWERS)}")
        cfg.text.model_type = text
    for k, v in (text_overrides or {}).items():
        if not hasattr(cfg.text, k):
            raise ValueError(f"unknown text config field {k!r}")
        setattr(cfg.text, k, v)
    if enable_fusion:
        if cfg.audio.model_type != "HTSAT":
            raise ValueError("fusion (aff_2d) is built for HTSAT models only")
        cfg.enable_fusion = True
    return cfg
