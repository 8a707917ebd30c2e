"""Process group and collectives of ``clap_fast.train``: who am I, and what do all ranks agree on.

* ``Dist``: rank, world size, local rank and device of this process; ``init_distributed`` builds
  it from torchrun's environment (nccl on the GPU, gloo on the CPU) or for one plain process.
* ``barrier`` / ``agree`` / ``all_gather_object``: no-ops for one process, so the trainer,
  checkpoints and evaluation call them unconditionally.
* ``GlobalBatchNorm2d``: ``--use-bn-sync`` (statistics over the global batch, also on gloo).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from clap_fast.train.params import TrainConfig

__all__ = ["Dist", "init_distributed", "barrier", "agree", "all_gather_object", "GlobalBatchNorm2d"]


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(cfg: TrainConfig) -> Dist:
    """torchrun env -> process group (nccl on GPU, gloo on CPU); plain ``python`` -> one process.

    On the CPU the cores are shared evenly among the node's ranks (intra-op threads).
    """
    cuda = torch.cuda.is_available()
    if not cuda:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(cfg.dist_backend or ("nccl" if cuda else "gloo"))
    return Dist(rank, world, local, device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def agree(flag: bool, d: Dist, op: str = "min") -> bool:
    """All ranks' flags combined (min: all true; max: any true). A host sync."""
    if d.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj: Any, d: Dist) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with statistics over the global batch (all ranks), for ``--use-bn-sync``.

    ``nn.SyncBatchNorm`` only runs on accelerators; this one all-reduces per-channel sums with
    autograd (``torch.distributed.nn``), so it works with gloo on the CPU, under FSDP2 and DDP,
    and keeps BatchNorm2d's state-dict keys. Eval mode uses the running statistics as usual.
    """

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> GlobalBatchNorm2d:
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.load_state_dict(bn.state_dict())
        return new.to(bn.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        import torch.distributed.nn.functional as dist_fn

        xf = x.float()
        local = torch.stack([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3))])
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=torch.float32)
        total = dist_fn.all_reduce(torch.cat([local.flatten(), count]))
        n = total[-1]
        mean = total[: self.num_features] / n
        var = (total[self.num_features : 2 * self.num_features] / n - mean * mean).clamp_min(0)
        with torch.no_grad():
            m = self.momentum if self.momentum is not None else 0.1
            self.running_mean.lerp_(mean.detach(), m)
            self.running_var.lerp_(var.detach() * n / (n - 1), m)
            self.num_batches_tracked += 1
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)
