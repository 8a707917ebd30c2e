"""Contrastive (CLIP / CLAP) loss, pure PyTorch reference (same signature as
``kernels.contrastive.contrastive_loss``).

One direction of the symmetric loss: rows of this rank's features A against all features B of
the other modality::

    logits = scale * A @ B^T                  (n, N)
    loss   = mean_i [ logsumexp_j logits[i, j] - logits[i, offset + i] ]

This first version materialises the (n, N) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["contrastive_loss"]


def contrastive_loss(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """A: (n, d), B: (N, d), logit_scale: 0-d or (1,) (already exponentiated) -> 0-d loss."""
    n = features_a.shape[0]
    logits = logit_scale.reshape(()) * features_a.float() @ features_b.float().T
    target = torch.arange(offset, offset + n, device=features_a.device)
    return F.cross_entropy(logits, target)
