"""clap_fast: a performance edition of LAION CLAP.

import clap_fast
model = clap_fast.CLAP.from_pretrained("630k-audioset-best")
model = clap_fast.create_model("htsat-tiny", text="roberta")
"""

from __future__ import annotations

from typing import Any

from clap_fast.config import CLAPConfig, get_config, list_models
from clap_fast.model import CLAP

__all__ = ["CLAP", "CLAPConfig", "create_model", "get_config", "list_models", "__version__"]
__version__ = "0.1.0"


def create_model(
    name: str = "HTSAT-tiny",
    *,
    text: str = "roberta",
    enable_fusion: bool = False,
    text_overrides: dict[str, Any] | None = None,
    device: str | None = "cpu",
) -> CLAP:
    """A randomly initialised CLAP model of a built-in architecture (no network access).

    Args:
        name: architecture (``list_models()``), case-insensitive, e.g. "htsat-tiny", "PANN-14".
        text: roberta | transformer | bert | bart.
        enable_fusion: LAION's feature fusion for long audio (HTSAT only).
        text_overrides: TextConfig fields, e.g. ``{"hf": {"num_hidden_layers": 2}}``.
        device: "cpu", "cuda", "auto".
    """
    from clap_fast import ops

    cfg = get_config(name, text=text, enable_fusion=enable_fusion, text_overrides=text_overrides)
    return CLAP(cfg).to(ops.resolve_device(device)).eval()
