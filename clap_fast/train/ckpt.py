"""Checkpoints of ``clap_fast.train``: sharded save, resume, top-K and the LAION export.

* ``save_checkpoint``: a ``torch.distributed.checkpoint`` directory under
  ``<logs>/<name>/checkpoints`` holding model, optimiser, ``meta.json`` (step, epoch, data
  position = batches consumed in the epoch, top-K scores) and every rank's RNG (safetensors).
  Written to a temporary directory and published whole; ``epoch_latest`` is a symlink to a
  fresh ``latest_<step>`` replaced atomically, so a crash never leaves a half-written
  checkpoint and no folder mixes two saves.
* ``resume`` / ``load_checkpoint_into``: the reverse (``--resume latest`` or a path). The
  folder is checked first and every pickle in it is read through ``clap_fast.safety``; a
  problem stops the run with one line naming it. The learning rate is recomputed from the
  step, so the schedule needs no state of its own.
* ``update_top_k``: ``--save-top-performance`` checkpoints ranked by an eval metric.
* ``export_laion``: the full weights gathered into LAION's single-file ``.pt``
  (``final_laion.pt``, loadable by ``CLAP.from_pretrained``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clap_fast.model import CLAP
from clap_fast.safety import (
    UnsafeCheckpointError,
    check_dcp_folder,
    load_dcp,
    load_rng_state,
    save_rng_state,
    set_rng_state,
)
from clap_fast.train.dist import Dist, all_gather_object, barrier
from clap_fast.train.params import TrainConfig

__all__ = [
    "save_checkpoint",
    "load_checkpoint_into",
    "check_checkpoint",
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


def _rng_name(rank: int) -> str:
    return f"rng_{rank}.safetensors"


def save_checkpoint(
    ckpt_dir: Path,
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    meta: dict[str, Any],
    d: Dist,
) -> Path:
    """Atomically write a sharded checkpoint ``ckpt_dir/name`` (``epoch_latest``: a symlink).

    Every rank writes its shards and RNG state (safetensors) into a temporary directory; rank 0
    then publishes the whole folder at once: ``epoch_latest`` points at a fresh directory
    (``latest_<step>``, or ``latest_<step>-<k>`` when that name is taken, e.g. by a step
    checkpoint at an epoch's end or another run) swapped in with ``os.replace`` on the link;
    a named checkpoint (``epoch_<n>``) replaces an existing folder of that name by two renames.
    A folder therefore never mixes the tensors of two saves.
    """
    import torch.distributed.checkpoint as dcp

    step = meta["step"]
    meta = {**meta, "world": d.world}
    if name == "epoch_latest":
        base, k = f"latest_{step:08d}", 0
        final = ckpt_dir / base
        while final.exists() or final.is_symlink():
            k += 1
            final = ckpt_dir / f"{base}-{k}"
        final = ckpt_dir / all_gather_object(final.name, d)[0]  # rank 0's choice
    else:
        final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp_{final.name}"
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(d)
    dcp.save(_state(model, opt), checkpoint_id=str(tmp))
    save_rng_state(tmp / _rng_name(d.rank))
    barrier(d)
    if d.main:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            trash = ckpt_dir / f".old_{final.name}"
            shutil.rmtree(trash, ignore_errors=True)
            os.rename(final, trash)
            os.rename(tmp, final)
            shutil.rmtree(trash)
        else:
            os.rename(tmp, final)
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


META_KEYS = ("step", "epoch", "batches_in_epoch")


def check_checkpoint(path: Path, d: Dist) -> dict:
    """Check a training checkpoint folder before anything is loaded -> its meta.

    Raises UnsafeCheckpointError with one line naming the problem: not a folder (e.g. a
    ``.pt``), an empty folder, missing / unparsable ``meta.json`` or a key of it, this rank's
    missing RNG file, ``.metadata`` refused by the allow-list, a missing or truncated shard.
    """
    if path.is_symlink() and not path.exists():
        raise UnsafeCheckpointError(f"{path} is a dangling link (to {os.readlink(path)})")
    if not path.exists():
        raise UnsafeCheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise UnsafeCheckpointError(
            f"{path} is a file, not a training checkpoint folder (<logs>/<name>/checkpoints/"
            "epoch_latest or epoch_<n>); load LAION .pt weights with --pretrained instead"
        )
    if not any(path.iterdir()):
        raise UnsafeCheckpointError(f"{path} is an empty folder")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise UnsafeCheckpointError(f"{path}: meta.json is missing") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise UnsafeCheckpointError(f"{path}/meta.json does not parse ({exc})") from None
    if not isinstance(meta, dict):
        raise UnsafeCheckpointError(f"{path}/meta.json is not an object")
    for k in META_KEYS:
        if not isinstance(meta.get(k), int) or isinstance(meta.get(k), bool) or meta[k] < 0:
            raise UnsafeCheckpointError(
                f"{path}/meta.json: {k!r} must be an integer >= 0, got {meta.get(k)!r}"
            )
    if not (path / _rng_name(d.rank)).is_file() and not (path / f"rng_{d.rank}.pt").is_file():
        saved = meta.get("world", "?")
        raise UnsafeCheckpointError(
            f"{path}: RNG state of rank {d.rank} ({_rng_name(d.rank)}) is missing "
            f"(saved by {saved} ranks, resuming with {d.world})"
        )
    check_dcp_folder(path)
    return meta


def load_checkpoint_into(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer | None, d: Dist
) -> dict:
    """Restore model (and optimiser, RNG) from a checkpoint directory; returns its meta.

    Every pickle in the folder is read through ``clap_fast.safety`` (allow-listed metadata,
    ``weights_only=True`` elsewhere); the folder is checked first (``check_checkpoint``).
    """
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = check_checkpoint(path, d)
    path = path.resolve()
    if opt is None:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
        )

        state = {"model": get_model_state_dict(model)}
        load_dcp(state, path)
        set_model_state_dict(model, state["model"])
        return meta
    state = _state(model, opt)
    load_dcp(state, path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = path / _rng_name(d.rank)
    set_rng_state(load_rng_state(rng if rng.is_file() else path / f"rng_{d.rank}.pt"))
    return meta


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
    if cfg.resume == "latest" and not path.exists() and not path.is_symlink():
        others = sorted(p.name for p in ckpt_dir.glob("*") if p.is_dir() and p.name[0] != ".")
        if others:
            raise SystemExit(
                f"--resume latest: {path} is missing but {ckpt_dir} holds {others[:5]}; "
                "pass one of them to --resume, or remove them to start fresh"
            )
        log.warning("--resume latest: no checkpoint in %s yet, starting fresh", ckpt_dir)
        return 0, 0, 0, []
    try:
        meta = load_checkpoint_into(path, model, opt, d)  # checks the folder first
    except UnsafeCheckpointError as exc:
        raise SystemExit(f"--resume {cfg.resume}: {exc}") from None
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
