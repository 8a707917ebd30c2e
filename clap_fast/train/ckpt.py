"""Checkpoints of ``clap_fast.train``: sharded save, resume, top-K and the LAION export.

* ``save_checkpoint``: a ``torch.distributed.checkpoint`` directory under
  ``<logs>/<name>/checkpoints`` holding model, optimiser, ``meta.json`` (step, epoch, data
  position = batches consumed in the epoch, top-K scores) and every rank's RNG. Written to a
  temporary directory and renamed; ``epoch_latest`` is a symlink to ``latest_<step>`` replaced
  atomically, so a crash never leaves a half-written checkpoint.
* ``resume`` / ``load_checkpoint_into``: the reverse (``--resume latest`` or a path). The
  learning rate is recomputed from the step, so the schedule needs no state of its own.
* ``update_top_k``: ``--save-top-performance`` checkpoints ranked by an eval metric.
* ``export_laion``: the full weights gathered into LAION's single-file ``.pt``
  (``final_laion.pt``, loadable by ``CLAP.from_pretrained``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clap_fast.model import CLAP
from clap_fast.train.dist import Dist, agree, barrier
from clap_fast.train.params import TrainConfig

__all__ = [
    "save_checkpoint",
    "load_checkpoint_into",
    "resume",
    "update_top_k",
    "save_epoch_end",
    "export_laion",
]

log = logging.getLogger("clap_fast.train")


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def _rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(s: dict[str, Any]) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(
    ckpt_dir: Path,
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    meta: dict[str, Any],
    d: Dist,
) -> Path:
    """Atomically write a sharded checkpoint ``ckpt_dir/name`` (``epoch_latest``: a symlink).

    Every rank writes its shards and RNG state into a temporary directory; rank 0 renames it
    once all ranks are done. ``epoch_latest`` points at a concrete ``latest_<step>`` directory
    and is swapped with ``os.replace`` (atomic), then the previous target is removed.
    """
    import torch.distributed.checkpoint as dcp

    step = meta["step"]
    final = ckpt_dir / (f"latest_{step:08d}" if name == "epoch_latest" else name)
    tmp = ckpt_dir / f".tmp_{final.name}"
    if name == "epoch_latest" and agree(final.exists() if d.main else True, d):
        # Same step already saved (e.g. a step checkpoint at an epoch's end): the weights and
        # optimiser are identical; swap in the new RNG states and meta, each file atomically.
        torch.save(_rng_state(), final / f"rng_{d.rank}.pt.tmp")
        os.replace(final / f"rng_{d.rank}.pt.tmp", final / f"rng_{d.rank}.pt")
        barrier(d)
        if d.main:
            (final / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
            os.replace(final / "meta.json.tmp", final / "meta.json")
            _point_latest(ckpt_dir, final)
        barrier(d)
        return ckpt_dir / name
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    dcp.save(_state(model, opt), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_{d.rank}.pt")
    barrier(d)
    if d.main:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if name == "epoch_latest":
            _point_latest(ckpt_dir, final)
    barrier(d)
    return ckpt_dir / name


def _point_latest(ckpt_dir: Path, final: Path) -> None:
    """Swap the ``epoch_latest`` symlink to ``final`` (atomic) and remove its old target."""
    link = ckpt_dir / "epoch_latest"
    old = link.resolve() if link.is_symlink() else None
    tmp_link = ckpt_dir / ".epoch_latest.tmp"
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(final.name)
    os.replace(tmp_link, link)
    if old is not None and old != final.resolve() and old.exists():
        shutil.rmtree(old)


def load_checkpoint_into(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer | None, d: Dist
) -> dict:
    """Restore model (and optimiser, RNG) from a checkpoint directory; returns its meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    path = path.resolve()
    if opt is None:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
        )

        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
        return json.loads((path / "meta.json").read_text())
    state = _state(model, opt)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / f"rng_{d.rank}.pt"
    if rng.exists():
        _set_rng_state(torch.load(rng, weights_only=False))
    return json.loads((path / "meta.json").read_text())


def export_laion(model: nn.Module, cfg_model: Any, path: Path, d: Dist, epoch: int) -> None:
    """Gather the full weights and write LAION's single-file ``.pt`` on rank 0 (atomically)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from clap_fast.checkpoint import save_laion_checkpoint

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_model_state_dict(model, options=opts)
    if d.main:
        plain = CLAP(cfg_model)
        plain.load_state_dict(sd, strict=True)
        tmp = path.with_suffix(".pt.tmp")
        save_laion_checkpoint(plain, tmp, epoch=epoch, name=cfg_model.name)
        os.replace(tmp, path)
    barrier(d)


def update_top_k(
    cfg: TrainConfig,
    ckpt_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    meta: dict[str, Any],
    metrics: dict[str, float],
    best: list,
    epoch: int,
    d: Dist,
) -> list:
    """Keep the ``--save-top-performance`` best checkpoints by the chosen metric (higher is better)."""
    suffix = cfg.top_k_checkpoint_select_metric
    sel = cfg.top_k_checkpoint_select_dataset
    vals = [
        v
        for k, v in metrics.items()
        if k.endswith(suffix) and (sel == "all" or k.startswith(sel + "/"))
    ]
    if not vals:
        return best
    score = float(np.mean(vals))
    best = sorted(best + [[score, epoch]], key=lambda x: -x[0])
    keep, drop = best[: cfg.save_top_performance], best[cfg.save_top_performance :]
    if [score, epoch] in keep:
        save_checkpoint(ckpt_dir, f"top_epoch_{epoch}", model, opt, {**meta, "score": score}, d)
    if d.main:
        for _, e in drop:
            shutil.rmtree(ckpt_dir / f"top_epoch_{e}", ignore_errors=True)
    return keep


def resume(
    cfg: TrainConfig, ckpt_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, d: Dist
) -> tuple[int, int, int, list]:
    """``--resume``: restore model, optimiser and RNG -> (step, epoch, batches into it, top-K)."""
    if not cfg.resume:
        return 0, 0, 0, []
    path = ckpt_dir / "epoch_latest" if cfg.resume == "latest" else Path(cfg.resume)
    if not path.exists():
        if cfg.resume != "latest":
            raise SystemExit(f"--resume {cfg.resume}: no such checkpoint")
        log.info("--resume latest: no checkpoint yet, starting fresh")
        return 0, 0, 0, []
    meta = load_checkpoint_into(path, model, opt, d)
    step, epoch, skip = meta["step"], meta["epoch"], meta["batches_in_epoch"]
    log.info("resumed from %s: step %d, epoch %d, %d batches into it", path, step, epoch, skip)
    return step, epoch, skip, meta.get("best", [])


def save_epoch_end(
    cfg: TrainConfig,
    ckpt_dir: Path,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    epoch: int,
    metrics: dict[str, float],
    best: list,
    d: Dist,
) -> list:
    """After ``epoch`` epochs: ``epoch_<n>``, top-K and ``epoch_latest`` as asked -> new top-K."""
    meta = {"step": step, "epoch": epoch, "batches_in_epoch": 0, "best": best}
    if cfg.save_frequency and epoch % cfg.save_frequency == 0:
        save_checkpoint(ckpt_dir, f"epoch_{epoch}", model, opt, meta, d)
    if cfg.save_top_performance and metrics:
        best = update_top_k(cfg, ckpt_dir, model, opt, meta, metrics, best, epoch, d)
        meta["best"] = best
    if cfg.save_most_recent or cfg.save_every_n_steps or cfg.resume:
        save_checkpoint(ckpt_dir, "epoch_latest", model, opt, meta, d)
    return best
