"""Training: ``torchrun -m clap_fast.train …`` / ``python -m clap_fast.train …`` (``__main__``).

``params`` (the run configuration and its LAION-compatible CLI) → ``loop`` (setup, model
wrapping, ``train_step``, the loop) with ``dist`` (process group), ``ckpt`` (sharded
checkpoints, resume, LAION export), ``evaluate`` (retrieval and zero-shot) and ``log``
(logs, reporters, throughput). The data comes from ``clap_fast.data``.
"""

from __future__ import annotations

from clap_fast.train.ckpt import export_laion, load_checkpoint_into
from clap_fast.train.loop import (
    build_model,
    cosine_lr,
    main,
    param_groups,
    text_layers,
    train,
    train_step,
)
from clap_fast.train.params import TrainConfig, parse_args

__all__ = [
    "TrainConfig", "parse_args", "main", "train", "train_step", "build_model", "param_groups",
    "cosine_lr", "text_layers", "export_laion", "load_checkpoint_into",
]  # fmt: skip
