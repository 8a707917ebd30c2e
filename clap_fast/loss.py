"""LAION CLAP's contrastive training loss (``ClipLoss``), computed through ``ops.contrastive_loss``.

Semantics follow laion_clap's ``clap_module/loss.py`` (without horovod and without the
``weight_loss_kappa`` weighting, which the released recipes leave off):

* One process: the mean of both directions of ``s * A @ T^T`` with targets on the diagonal.
* ``world_size > 1``: features are all-gathered, either through the autograd-aware
  ``torch.distributed.nn.functional.all_gather`` (``gather_with_grad=True``) or through a plain
  ``all_gather`` with this rank's own tensor put back in its slot so its gradient flows
  (``gather_with_grad=False``; with ``local_loss`` LAION does not put it back).
  ``local_loss=True``: this rank's rows against all columns, targets ``rank * n + i``;
  ``local_loss=False``: every rank computes the full (all vs all) loss.
* ``mlp_loss``: four cross terms averaged, audio vs text_mlp under ``logit_scale_a`` and
  audio_mlp vs text under ``logit_scale_t``.

None of these materialise an n x N logit matrix: the op streams tiles (Triton on CUDA, a
blockwise PyTorch reference elsewhere). Every rank must hold the same batch size n.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from clap_fast import ops

__all__ = ["LOGIT_SCALE_MAX", "ClipLoss", "clamp_logit_scale_", "gather_features"]

LOGIT_SCALE_MAX = math.log(100)
"""LAION clamps the (log) logit scales to [0, ln 100] after every optimiser step."""


def gather_features(
    features: torch.Tensor,
    *,
    gather_with_grad: bool,
    local_loss: bool,
    rank: int,
    world_size: int,
) -> torch.Tensor:
    """(n, d) this rank's features -> (world_size * n, d), rank r's rows at [r * n, (r + 1) * n).

    With ``gather_with_grad`` gradients flow to every rank (the backward is a reduce-scatter
    sum); otherwise only this rank's slot carries a gradient, and only when not ``local_loss``
    (LAION's behaviour).
    """
    if gather_with_grad:
        return torch.cat(dist_fn.all_gather(features), dim=0)
    parts = [torch.empty_like(features) for _ in range(world_size)]
    dist.all_gather(parts, features.detach().contiguous())
    if not local_loss:
        parts[rank] = features
    return torch.cat(parts, dim=0)


class ClipLoss(nn.Module):
    """LAION's CLAP contrastive loss.

    Args:
        local_loss: with several ranks, compute only this rank's rows against all gathered
            features (targets offset by ``rank * n``) instead of the full loss on every rank.
        gather_with_grad: all-gather with autograd so gradients reach the other ranks.
        mlp_loss: add LAION's MLP-loss cross terms (needs ``logit_scale_t`` and the ``*_mlp``
            features in ``forward``).
        rank: this process's rank.
        world_size: number of processes (1: no communication).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        mlp_loss: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.mlp_loss = mlp_loss
        self.rank = rank
        self.world_size = world_size

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return gather_features(
            x,
            gather_with_grad=self.gather_with_grad,
            local_loss=self.local_loss,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _pair(self, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Mean of both directions of ``scale * A @ B^T``; a, b: (n, d) this rank's features."""
        if self.world_size == 1:
            return ops.contrastive_loss_symmetric(a, b, scale)
        all_a, all_b = self._gather(a), self._gather(b)
        if not self.local_loss:
            return ops.contrastive_loss_symmetric(all_a, all_b, scale)
        offset = self.rank * a.shape[0]
        loss_a = ops.contrastive_loss(a, all_b, scale, offset)
        loss_b = ops.contrastive_loss(b, all_a, scale, offset)
        return (loss_a + loss_b) / 2

    def forward(
        self,
        audio_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale_a: torch.Tensor,
        logit_scale_t: torch.Tensor | None = None,
        audio_features_mlp: torch.Tensor | None = None,
        text_features_mlp: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The 0-d fp32 loss.

        audio_features, text_features (and the ``*_mlp`` ones): (n, d) this rank's (normalised)
        embeddings; logit_scale_a / logit_scale_t: the already exponentiated scales, 0-d or (1,).
        """
        if not self.mlp_loss:
            return self._pair(audio_features, text_features, logit_scale_a)
        if logit_scale_t is None or audio_features_mlp is None or text_features_mlp is None:
            raise ValueError("mlp_loss needs logit_scale_t, audio_features_mlp, text_features_mlp")
        loss_a = self._pair(audio_features, text_features_mlp, logit_scale_a)
        loss_t = self._pair(audio_features_mlp, text_features, logit_scale_t)
        return (loss_a + loss_t) / 2


@torch.no_grad()
def clamp_logit_scale_(model: nn.Module, max_value: float = LOGIT_SCALE_MAX) -> int:
    """Clamp every ``logit_scale*`` parameter of ``model`` (the log scales) to [0, max_value].

    Call after each optimiser step, as LAION does. Works through DDP / FSDP2 wrappers (matches
    on the last component of the parameter name). Returns how many parameters were clamped.
    """
    count = 0
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("logit_scale"):
            param.clamp_(0.0, max_value)
            count += 1
    return count
