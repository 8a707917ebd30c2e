"""The model factory, in open_clip's manner: the one place models are made.

``list_models`` / ``get_config`` (architectures, from ``model_configs/*.json``), ``create_model``
(random weights, no network), ``from_pretrained`` (any checkpoint format; architecture detected
from the weights) and ``load_checkpoint`` (weights into a model you already built). The package
root re-exports all five; ``CLAP.from_pretrained`` is the same loader as a classmethod.

Import layering (no circle, checked by ``tests/test_imports.py``): ``config`` ← ``checkpoint``
(formats; knows no model class) ← ``model`` (+ ``api``, the towers) ← ``factory`` ← ``clap_fast``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from clap_fast import checkpoint, ops
from clap_fast.config import get_config, list_models
from clap_fast.model import CLAP

__all__ = ["list_models", "get_config", "create_model", "from_pretrained", "load_checkpoint"]


def create_model(
    name: str = "HTSAT-tiny",
    *,
    text: str = "roberta",
    enable_fusion: bool = False,
    text_overrides: dict[str, Any] | None = None,
    device: str | torch.device | None = "cpu",
) -> CLAP:
    """A randomly initialised CLAP model of a built-in architecture (no network access), in
    eval mode.

    Args:
        name: architecture (``list_models()``), case-insensitive, e.g. "htsat-tiny", "PANN-14".
        text: roberta | transformer | bert | bart.
        enable_fusion: LAION's feature fusion for long audio (HTSAT only).
        text_overrides: TextConfig fields, e.g. ``{"hf": {"num_hidden_layers": 2}}``.
        device: "cpu", "cuda", "auto".
    """
    cfg = get_config(name, text=text, enable_fusion=enable_fusion, text_overrides=text_overrides)
    return CLAP(cfg).to(ops.resolve_device(device)).eval()


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = "cpu",
    text_overrides: dict[str, Any] | None = None,
) -> CLAP:
    """LAION ``.pt``, HF ClapModel (dir / safetensors), open_clip or our own format -> the
    model of the right architecture, loaded strictly, in eval mode (``CLAP.from_pretrained``)."""
    return CLAP.from_pretrained(name_or_path, device=device, text_overrides=text_overrides)


def load_checkpoint(model: CLAP, path: str | os.PathLike) -> list[str]:
    """Load a checkpoint's weights (any format ``from_pretrained`` reads) into ``model``,
    strictly: a checkpoint of another architecture raises ``CheckpointError`` naming the
    missing / unexpected keys and shape mismatches. Returns the keys that kept the model's
    values (only those a format does not carry: HF ClapModel's dropped buffers, optional
    text-tower buffers)."""
    sd, info = checkpoint.read_state_dict(path)
    fill = checkpoint.HF_FILLED if info["format"] == "hf" else ()
    return checkpoint.load_into(model, sd, fill_missing=fill)
