"""Train CLAP: ``torchrun --nproc_per_node N -m clap_fast.train …`` or ``python -m clap_fast.train …``.

Accepts the seed README's command (see ``params``). This file is the setup and one flat loop
(``main`` is what ``clap_fast/train/__main__.py`` runs); checkpoints live in ``ckpt``,
evaluation in ``evaluate``, logs and meters in ``log``, process-group helpers in ``dist``.

* model: FSDP2 (``fully_shard`` per Swin block, per Swin stage, per text layer, then the
  root) or DDP; ``--compile`` compiles each block / layer in place (static shapes: the last
  partial batch is dropped, evaluation batches are padded); ``--precision bf16`` decided once
  by ``precision.resolve_precision`` (FSDP2 mixed precision on sharded GPUs, autocast otherwise,
  also on CPUs with bf16 units) with the log-mel front end, ``bn0`` and the loss in fp32; SyncBatchNorm with ``--use-bn-sync``;
  fused Adam/AdamW on the GPU; LAION's parameter groups; cosine schedule with linear warm-up;
  logit scales clamped to [0, ln 100] after each step (``train_step``).
* data: ``clap_fast.data`` (workers decode, crop and tokenise); ranks agree every step that all
  of them still hold a batch (one tiny all-reduce), so uneven shards or skipped samples never
  hang a collective; skip counts are reported at each epoch's end.
* checkpoints (``<logs>/<name>/checkpoints``): sharded, atomic, resumable mid-epoch
  (``ckpt``); ``final_laion.pt`` is LAION's single-file layout.
* logs: ``out.log``, ``results.jsonl``, ``params.json``, tensorboard / wandb, tqdm on rank 0.
"""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from clap_fast.config import get_config
from clap_fast.data import (
    DecodeSpec,
    SkipStats,
    WebAudioDataset,
    make_loader,
    split_exists,
    split_urls,
)
from clap_fast.loss import ClipLoss, clamp_logit_scale_
from clap_fast.model import CLAP
from clap_fast.train.ckpt import (
    export_laion,
    load_checkpoint_into,
    resume,
    save_checkpoint,
    save_epoch_end,
)
from clap_fast.train.dist import Dist, GlobalBatchNorm2d, agree, init_distributed
from clap_fast.train.evaluate import evaluate, forward, to_device
from clap_fast.train.log import Reporter, Throughput, flops_per_sample, format_table, open_run
from clap_fast.train.params import TrainConfig, parse_args
from clap_fast.train.precision import Precision, resolve_precision

__all__ = [
    "main",
    "train",
    "train_step",
    "build_model",
    "param_groups",
    "cosine_lr",
    "export_laion",
    "load_checkpoint_into",
]

log = logging.getLogger("clap_fast.train")


# --------------------------------------------------------------------------- setup
def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig) -> CLAP:
    """The CLAP model of the run (random init from ``--seed``, or ``--pretrained`` weights)."""
    if cfg.pretrained and cfg.pretrained.lower() != "openai":
        model = CLAP.from_pretrained(cfg.pretrained, device="cpu")
        n = sum(p.numel() for p in model.parameters())
        log.info("--pretrained: loaded %s (%s, %s text tower, %.1fM parameters, fusion %s)",
                 cfg.pretrained, model.cfg.name, model.text_type, n / 1e6,
                 "on" if model.cfg.enable_fusion else "off")  # fmt: skip
    else:
        if cfg.pretrained:
            log.warning(
                "--pretrained openai (CLIP text weights) needs a download: ignored, random init"
            )
        mcfg = get_config(
            cfg.model,
            text=cfg.tmodel,
            enable_fusion=cfg.enable_fusion,
            text_overrides=cfg.text_overrides,
        )
        if cfg.clip_samples:
            mcfg.audio.clip_samples = cfg.clip_samples
        model = CLAP(mcfg)
    if cfg.clip_samples:
        model.cfg.audio.clip_samples = cfg.clip_samples
    return model.train()


def text_tower_modules(model: CLAP) -> list[nn.Module]:
    """The text tower proper (frozen by --freeze-text; its projection stays trainable, as LAION)."""
    mods: list[nn.Module] = [model.text_branch]
    if model.text_type == "transformer":
        mods += [model.token_embedding, model.ln_final]
    return mods


def text_layers(model: CLAP) -> list[nn.Module]:
    """The text tower's repeated layers (one FSDP unit / compile unit each)."""
    tb = model.text_branch
    if model.text_type == "transformer":
        return list(tb.resblocks)
    if model.text_type == "bart":
        return list(tb.encoder.layers) + list(tb.decoder.layers)
    return list(tb.encoder.layer)


def freeze(cfg: TrainConfig, model: CLAP) -> None:
    """--freeze-text, and no gradients for modules the loss does not use (DDP-safe)."""
    if cfg.freeze_text:
        for m in text_tower_modules(model):
            m.requires_grad_(False)
        if model.text_type == "transformer":
            model.positional_embedding.requires_grad_(False)
    for name in ("tscam_conv", "head"):  # the AudioSet classifier: off the embedding path
        if hasattr(model.audio_branch, name):
            getattr(model.audio_branch, name).requires_grad_(False)
    if not cfg.clap_mlploss:
        for m in (model.audio_transform, model.text_transform):
            m.requires_grad_(False)
        model.logit_scale_t.requires_grad_(False)


def parallelize(cfg: TrainConfig, model: CLAP, d: Dist, precision: Precision) -> nn.Module:
    """Compile per block, then FSDP2 per block / stage / text layer / root, or DDP."""
    cuda = d.device.type == "cuda"
    bf16 = precision.fsdp_mixed
    blocks = [b for layer in model.audio_branch.layers for b in getattr(layer, "blocks", [])]
    if cfg.compile:
        units = blocks + text_layers(model)
        # Swin blocks differ by stage (resolution, width, shift): each distinct block is its own
        # compile, more than dynamo's default limit of 8, past which it silently runs eager.
        torch._dynamo.config.recompile_limit = max(
            torch._dynamo.config.recompile_limit, len(units) + 8
        )
        for m in units:
            m.compile(dynamic=False)
    if cfg.use_bn_sync and d.world > 1:
        model.audio_branch.bn0 = GlobalBatchNorm2d.from_bn(model.audio_branch.bn0)
    model.to(d.device)
    if d.world == 1:
        return model  # one process: nothing to shard
    if cfg.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[d.device.index] if cuda else None,
            find_unused_parameters=model.text_type == "bart",  # BART's decoder output is unused
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else None
    )
    fp32 = MixedPrecisionPolicy(
        param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=True
    )
    kw = {"mp_policy": mp} if mp else {}
    for b in blocks:
        fully_shard(b, **kw)
    for layer in model.audio_branch.layers:
        fully_shard(layer, **kw)
    fully_shard(model.audio_branch.patch_embed, **kw)
    for layer in text_layers(model):
        fully_shard(layer, **kw)
    if bf16:  # bn0 sees the fp32 log-mel; the root keeps its fp32 inputs (waveform)
        fully_shard(model.audio_branch.bn0, mp_policy=fp32)
        root_mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        return fully_shard(model, mp_policy=root_mp)
    return fully_shard(model)


def param_groups(model: nn.Module, wd: float) -> list[dict[str, Any]]:
    """LAION's groups: no weight decay on norms, biases, logit scales, bias tables, 1-D params."""

    def no_decay(n: str, p: torch.Tensor) -> bool:
        return (
            p.ndim < 2 or "bn" in n or "ln" in n or "norm" in n or "bias" in n
            or "logit_scale" in n or "relative_position_bias_table" in n or "positional_embedding" in n
        )  # fmt: skip

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": wd},
    ]


def build_optimizer(cfg: TrainConfig, model: nn.Module, d: Dist) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    kw = {"fused": True} if d.device.type == "cuda" else {}
    groups = param_groups(model, cfg.wd)
    return cls(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kw)


def cosine_lr(step: int, base: float, warmup: int, total: int) -> float:
    """LAION's schedule: linear warm-up to ``base`` over ``warmup`` steps, then cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(e, es) / es)) * base


# ----------------------------------------------------------------------------- train
def _train_data(cfg: TrainConfig, model_cfg: Any, d: Dist) -> tuple[WebAudioDataset, int, int]:
    """This rank's training stream -> (dataset, shards, samples per epoch over all ranks)."""
    urls, num, unknown = [], 0, []
    for name in cfg.datasetnames:
        found = False
        for info in cfg.datasetinfos:
            try:
                if split_exists(cfg.datasetpath, name, info):
                    u, n = split_urls(cfg.datasetpath, name, info)
                    urls, num, found = urls + u, num + n, True
            except ValueError as exc:  # a sizes.json that exists but is garbage
                raise SystemExit(f"error: {exc}") from None
        unknown += [] if found else [name]
    if unknown and urls:  # a misspelled name is an error, never silently ignored
        raise SystemExit(
            f"error: --datasetnames {unknown}: no {cfg.datasetinfos} split with a sizes.json "
            f"under {cfg.datasetpath}"
        )
    if not urls:
        raise SystemExit(
            f"no training shards under {cfg.datasetpath} for {cfg.datasetnames} x {cfg.datasetinfos}"
        )
    spec = DecodeSpec(
        model_cfg.audio, model_cfg.text, model_cfg.audio.clip_samples, cfg.data_filling,
        cfg.data_truncating, cfg.enable_fusion,
    )  # fmt: skip
    dataset = WebAudioDataset(
        urls, spec, batch_size=cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world,
        shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
    )  # fmt: skip
    return dataset, len(urls), cfg.train_num_samples or num


def _warn_short_schedule(cfg: TrainConfig, total_steps: int, d: Dist) -> None:
    """A warm-up as long as the run (e.g. the default 10 000 steps in a short fine-tune) never
    reaches ``--lr``: say so, with the peak the schedule does reach."""
    if cfg.skip_scheduler or cfg.warmup < total_steps or not d.main:
        return
    peak = cosine_lr(total_steps - 1, cfg.lr, cfg.warmup, total_steps)
    log.warning("--warmup %d is not shorter than the run's %d steps: the learning rate only "
                "reaches %.3g (%.2g%% of --lr %g); pass a smaller --warmup (e.g. %d) for a short "
                "run", cfg.warmup, total_steps, peak, 100 * peak / cfg.lr, cfg.lr,
                max(1, total_steps // 10))  # fmt: skip


def _next_batch(it: Any, stats: SkipStats) -> dict[str, Any] | None:
    """This rank's next batch (None once its loader is exhausted); skip counts go to ``stats``."""
    for item in it:
        stats.merge(item["stats"])
        if not item.get("final"):  # a worker's last message carries only its counts
            return item
    return None


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    loss_fn: ClipLoss,
    x: dict[str, torch.Tensor],
    lr: float,
    precision: Precision,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimiser step at ``lr``: forward (in ``precision``'s autocast), loss in fp32,
    backward, update, logit-scale clamp -> (detached loss, model outputs)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with precision.autocast():
        out = forward(model, x)
    with precision.fp32():  # the loss in fp32
        loss = loss_fn(
            out["audio_features"].float(), out["text_features"].float(), out["logit_scale_a"].float(),
            out["logit_scale_t"].float(), out["audio_features_mlp"].float(), out["text_features_mlp"].float(),
        )  # fmt: skip
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    clamp_logit_scale_(model)
    return loss.detach(), out


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run the whole training; returns the last evaluation's metrics (rank 0; {} elsewhere)."""
    d = init_distributed(cfg)
    ckpt_dir = open_run(cfg, d) / "checkpoints"
    _seed_everything(cfg.seed)
    model = build_model(cfg)
    model_cfg = model.cfg
    torch.manual_seed(cfg.seed + 1 + d.rank)  # per-rank stream for drop-path etc.
    freeze(cfg, model)
    meter = Throughput(flops_per_sample(model, model_cfg), d)
    sharded = d.world > 1 and cfg.parallel == "fsdp"
    precision = resolve_precision(cfg.precision, d.device, sharded=sharded)  # decided once
    wrapped = parallelize(cfg, model, d, precision)
    opt = build_optimizer(cfg, wrapped, d)
    loss_fn = ClipLoss(cfg.local_loss, cfg.gather_with_grad, cfg.clap_mlploss, d.rank, d.world)
    dataset, shards, num = _train_data(cfg, model_cfg, d)
    steps_per_epoch = max(1, num // (cfg.batch_size * d.world))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    reporter = Reporter(cfg, ckpt_dir.parent, d)
    log.info("%d training shards, %d samples, ~%d steps/epoch, %d ranks, device %s",
             shards, num, steps_per_epoch, d.world, d.device)  # fmt: skip
    _warn_short_schedule(cfg, total_steps, d)
    step, start_epoch, skip_batches, best = resume(cfg, ckpt_dir, wrapped, opt, d)

    last_metrics: dict[str, float] = {}
    done = cfg.max_steps is not None and step >= cfg.max_steps
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        dataset.set_epoch(epoch, resume_batches=skip_batches)  # skipped without decoding
        stats = SkipStats()
        batches_in_epoch = 0
        meter.start_epoch()
        pin = d.device.type == "cuda"
        it = iter(make_loader(dataset, cfg.workers, cfg.prefetch_factor, pin_memory=pin))
        bar = None
        if d.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps_per_epoch, initial=skip_batches, desc=f"epoch {epoch}",
                       disable=None, leave=False)  # fmt: skip
        while not done:
            t0 = time.perf_counter()
            batch = _next_batch(it, stats)
            waited = time.perf_counter() - t0
            if not agree(batch is not None, d):
                break
            if skip_batches:  # resuming mid-epoch: replay the data position
                skip_batches -= 1
                batches_in_epoch += 1
                continue
            lr = cfg.lr if cfg.skip_scheduler else cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
            x = to_device(batch, d.device)
            loss, out = train_step(wrapped, opt, loss_fn, x, lr, precision)
            step += 1
            batches_in_epoch += 1
            loss_value = float(loss)  # host sync, once per step (logging)
            meter.add(
                loss_value, x["input_ids"].shape[0] * d.world, batch["seconds"] * d.world, waited
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if step % cfg.log_every_n_steps == 0 or step == total_steps:
                vals = meter.report(lr, float(out["logit_scale_a"].detach().reshape(-1)[0]))
                log.info("step %d epoch %d %s", step, epoch,
                         " ".join(f"{k[6:]}={v:.4g}" for k, v in vals.items()))  # fmt: skip
                reporter.scalars(vals, step)
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
                meta = dict(step=step, epoch=epoch, batches_in_epoch=batches_in_epoch, best=best)
                save_checkpoint(ckpt_dir, "epoch_latest", wrapped, opt, meta, d)
            done = cfg.max_steps is not None and step >= cfg.max_steps
        if bar is not None:
            bar.close()
        if not done and batches_in_epoch < steps_per_epoch and d.main:
            # the shards held fewer samples than sizes.json / --train-num-samples promised
            short = {"epoch": epoch, "kind": "data_shortfall", "planned_steps": steps_per_epoch,
                     "batches": batches_in_epoch, "planned_samples": num}  # fmt: skip
            log.warning("epoch %d: sizes.json / --train-num-samples promised %d samples (%d steps "
                        "per epoch; the schedule assumes them) but the data gave %d batches",
                        epoch, num, steps_per_epoch, batches_in_epoch)  # fmt: skip
            reporter.record(short)
        if done:  # --max-steps reached: stop the workers, never decode the rest of the epoch
            del it
        else:  # drain: the epoch's remaining skip counts (batches past the sync point are dropped)
            for item in it:
                stats.merge(item["stats"])
        reporter.epoch_end(stats, meter, epoch, stopped=done)
        completed = epoch + 1
        metrics: dict[str, float] = {}
        if (
            not cfg.no_eval
            and cfg.val_frequency
            and (completed % cfg.val_frequency == 0 or completed == cfg.epochs or done)
        ):
            metrics = evaluate(cfg, wrapped, model_cfg, d, completed)
            reporter.eval(metrics, completed, step)
            last_metrics = metrics
        best = save_epoch_end(cfg, ckpt_dir, wrapped, opt, step, completed, metrics, best, d)
        skip_batches = 0
    if cfg.export_laion:
        export_laion(wrapped, model_cfg, ckpt_dir / "final_laion.pt", d, cfg.epochs)
    reporter.close()
    if d.world > 1:
        dist.destroy_process_group()
    return last_metrics if d.main else {}


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m clap_fast.train`` / ``torchrun -m clap_fast.train``."""
    cfg = parse_args(argv)
    metrics = train(cfg)
    if metrics:
        sys.stdout.write(format_table(metrics))
    return 0
