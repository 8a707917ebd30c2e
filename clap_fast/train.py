"""Train CLAP: ``torchrun --nproc_per_node N -m clap_fast.train …`` or ``python -m clap_fast.train …``.

Accepts the seed README's command (see ``clap_fast.params``). One flat loop:

* model: FSDP2 (``fully_shard`` per Swin block, per Swin stage, per text layer, then the
  root) or DDP; ``--compile`` compiles each block / layer in place (static shapes: the last
  partial batch is dropped, evaluation batches are padded); bf16 mixed precision on the GPU
  with the log-mel front end, ``bn0`` and the loss in fp32; SyncBatchNorm with ``--use-bn-sync``;
  fused Adam/AdamW on the GPU; LAION's parameter groups; cosine schedule with linear warm-up;
  logit scales clamped to [0, ln 100] after each step.
* data: ``clap_fast.data`` (workers decode, crop and tokenise); ranks agree every step that all
  of them still hold a batch (one tiny all-reduce), so uneven shards or skipped samples never
  hang a collective; skip counts are reported at each epoch's end.
* checkpoints (``<logs>/<name>/checkpoints``): ``torch.distributed.checkpoint`` directories
  holding model, optimiser, step, epoch, data position (batches consumed in the epoch) and every
  rank's RNG. Written to a temporary directory and renamed (``epoch_latest`` is a symlink
  replaced atomically), so a crash never leaves a half-written checkpoint. ``final_laion.pt``
  is LAION's single-file layout, loadable by ``CLAP.from_pretrained``.
* logs: ``out.log``, ``results.jsonl``, ``params.json``, tensorboard / wandb, tqdm on rank 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
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
from clap_fast.params import TrainConfig, parse_args

__all__ = [
    "main",
    "train",
    "build_model",
    "param_groups",
    "cosine_lr",
    "export_laion",
    "load_checkpoint_into",
]

log = logging.getLogger("clap_fast.train")

# Dense bf16 peak FLOP/s by GPU name fragment, for the MFU estimate (override: CLAP_FAST_PEAK_FLOPS).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12}


# --------------------------------------------------------------------------- setup
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
    """torchrun env -> process group (nccl on GPU, gloo on CPU); plain ``python`` -> one process."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda", 0) if cuda else torch.device("cpu"))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(cfg.dist_backend or ("nccl" if cuda else "gloo"))
    return Dist(rank, world, local, device)


def _barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def _setup_logging(run_dir: Path, d: Dist) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank{d.rank}] %(levelname)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        h.setLevel(logging.INFO if d.main else logging.WARNING)
        root.addHandler(h)
    fh = logging.FileHandler(run_dir / ("out.log" if d.main else f"out_rank{d.rank}.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- model
def build_model(cfg: TrainConfig) -> CLAP:
    """The CLAP model of the run (random init from ``--seed``, or ``--pretrained`` weights)."""
    if cfg.pretrained and cfg.pretrained.lower() != "openai":
        from clap_fast.checkpoint import load_pretrained

        model = load_pretrained(cfg.pretrained, device="cpu")
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


def _cpu_inductor_workaround() -> None:
    """Scalar C++ code for inductor on the CPU.

    torch 2.11's vectorised CPU codegen emits uncompilable C++ (``decltype(float)::blendv``) for
    the shifted-window Swin block (masked roll / pad of ``window_attention_ref``); ``simdlen = 1``
    compiles it correctly, slower. GPU compilation is unaffected.
    """
    import torch._inductor.config as inductor_config

    inductor_config.cpp.simdlen = 1


def parallelize(cfg: TrainConfig, model: CLAP, d: Dist) -> nn.Module:
    """Compile per block, then FSDP2 per block / stage / text layer / root, or DDP."""
    cuda = d.device.type == "cuda"
    bf16 = cuda and cfg.precision in ("amp", "bf16", "amp_bf16", "amp_bfloat16")
    blocks = [b for layer in model.audio_branch.layers for b in getattr(layer, "blocks", [])]
    if cfg.compile:
        if not cuda:
            _cpu_inductor_workaround()
        for m in blocks + text_layers(model):
            m.compile(dynamic=False)
    if cfg.use_bn_sync and d.world > 1:
        model.audio_branch.bn0 = GlobalBatchNorm2d.from_bn(model.audio_branch.bn0)
    model.to(d.device)
    if d.world == 1:
        return model  # one process: nothing to shard (bf16 then runs under autocast)
    if cfg.parallel == "ddp":
        if d.world == 1:
            return model
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


# ------------------------------------------------------------------------ checkpoints
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
    if name == "epoch_latest" and _agree(final.exists() if d.main else True, d):
        # Same step already saved (e.g. a step checkpoint at an epoch's end): the weights and
        # optimiser are identical; swap in the new RNG states and meta, each file atomically.
        torch.save(_rng_state(), final / f"rng_{d.rank}.pt.tmp")
        os.replace(final / f"rng_{d.rank}.pt.tmp", final / f"rng_{d.rank}.pt")
        _barrier(d)
        if d.main:
            (final / "meta.json.tmp").write_text(json.dumps(meta, indent=1))
            os.replace(final / "meta.json.tmp", final / "meta.json")
            _point_latest(ckpt_dir, final)
        _barrier(d)
        return ckpt_dir / name
    if d.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(d)
    dcp.save(_state(model, opt), checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / f"rng_{d.rank}.pt")
    _barrier(d)
    if d.main:
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if name == "epoch_latest":
            _point_latest(ckpt_dir, final)
    _barrier(d)
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
    _barrier(d)


# ---------------------------------------------------------------------------- eval
def _all_gather_obj(obj: Any, d: Dist) -> list[Any]:
    if d.world == 1:
        return [obj]
    out: list[Any] = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def _agree(flag: bool, d: Dist, op: str = "min") -> bool:
    """All ranks' flags combined (min: all true; max: any true). A host sync."""
    if d.world == 1:
        return flag
    t = torch.tensor([int(flag)], device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.MAX)
    return bool(t.item())


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("waveform", "mel_fusion", "longer", "input_ids", "attention_mask")
    return {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}


def _forward(model: nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return model(
        x.get("waveform"), x["input_ids"], x["attention_mask"],
        mel_fusion=x.get("mel_fusion"), longer=x.get("longer"),
    )  # fmt: skip


def _pad_batch(x: dict[str, torch.Tensor], n: int, m: int) -> dict[str, torch.Tensor]:
    """Pad audio rows to ``n`` and caption rows to ``m`` (static shapes under compile)."""
    out = {}
    for k, v in x.items():
        rows = m if k in ("input_ids", "attention_mask") else n
        pad = rows - v.shape[0]
        out[k] = torch.cat([v, v[:1].expand(pad, *v.shape[1:])]) if pad > 0 else v
    return out


@torch.no_grad()
def _embed_all(
    model: nn.Module, batches: Any, d: Dist, bs: int, template: dict
) -> tuple[list, list, list]:
    """Run every rank's eval batches (padded; ranks do equally many forwards) -> embeddings."""
    audio, text, owners = [], [], []
    it = iter(batches)
    while True:
        b = next(it, None)
        while b is not None and "final" in b:
            b = next(it, None)
        if not _agree(b is not None, d, op="max"):
            break
        x = _to(b, d.device) if b is not None else template
        m = x["input_ids"].shape[0]
        n = (x["waveform"] if "waveform" in x else x["mel_fusion"]).shape[0]
        cap = bs * -(-m // bs)  # captions padded to a multiple of the batch: few static shapes
        out = _forward(model, _pad_batch(x, bs, cap))
        if b is not None:
            audio.append(out["audio_features"][:n].float().cpu())
            text.append(out["text_features"][:m].float().cpu())
            owners.append(b["caption_owner"])
    return audio, text, owners


def evaluate(
    cfg: TrainConfig, model: nn.Module, model_cfg: Any, d: Dist, epoch: int
) -> dict[str, float]:
    """Retrieval metrics per eval dataset (+ 5-caption variant) and zero-shot on a folder."""
    from clap_fast import metrics

    model.eval()
    results: dict[str, float] = {}
    spec = DecodeSpec(
        model_cfg.audio, model_cfg.text, model_cfg.audio.clip_samples, cfg.data_filling,
        "rand_trunc", cfg.enable_fusion, all_captions=True,
    )  # fmt: skip
    template = None
    for name in cfg.datasetnames:
        if name in cfg.exclude_eval_dataset:
            continue
        split = next((s for s in cfg.eval_splits if split_exists(cfg.datasetpath, name, s)), None)
        if split is None:
            continue
        urls, _ = split_urls(cfg.datasetpath, name, split)
        ds = WebAudioDataset(
            urls, spec, batch_size=cfg.batch_size, seed=cfg.seed, rank=d.rank,
            world_size=d.world, shuffle=False, drop_last=False,
        )  # fmt: skip
        if template is None:
            template = _eval_template(model_cfg, cfg, d)
        a, t, o = _embed_all(
            model, make_loader(ds, min(cfg.workers, 1)), d, cfg.batch_size, template
        )
        parts = _all_gather_obj((a, t, o), d)
        A, T, owner, base = [], [], [], 0
        for pa, pt, po in parts:
            for x, y, w in zip(pa, pt, po):
                A.append(x)
                T.append(y)
                owner.append(w + base)
                base += x.shape[0]
        if not A:
            continue
        A_, T_, own = torch.cat(A), torch.cat(T), torch.cat(owner)
        first = torch.zeros(A_.shape[0], dtype=torch.long)
        first[own.flip(0)] = torch.arange(own.numel() - 1, -1, -1)  # first caption of each clip
        res = {f"{name}/{k}": v for k, v in metrics.retrieval_metrics(A_, T_[first]).items()}
        counts = torch.bincount(own, minlength=A_.shape[0])
        if bool((counts == 5).all()):
            mc = metrics.retrieval_metrics_multi_caption(A_, T_, own)
            res.update({f"{name}/5cap_{k}": v for k, v in mc.items()})
        results.update(res)
    if cfg.zeroshot_folder:
        results.update(_zero_shot(cfg, model, model_cfg, d))
    model.train()
    return results


def _eval_template(model_cfg: Any, cfg: TrainConfig, d: Dist) -> dict[str, torch.Tensor]:
    L = model_cfg.text.context_length
    x = {
        "input_ids": torch.ones(1, L, dtype=torch.long),
        "attention_mask": torch.ones(1, L, dtype=torch.long),
    }
    if cfg.enable_fusion:
        frames = model_cfg.audio.clip_samples // model_cfg.audio.hop_size + 1
        x["mel_fusion"] = torch.zeros(1, 4, frames, model_cfg.audio.mel_bins)
        x["longer"] = torch.zeros(1, dtype=torch.bool)
    else:
        x["waveform"] = torch.zeros(1, model_cfg.audio.clip_samples)
    return {k: v.to(d.device) for k, v in x.items()}


def _zero_shot(cfg: TrainConfig, model: nn.Module, model_cfg: Any, d: Dist) -> dict[str, float]:
    """Top-1/5 zero-shot accuracy on ``<folder>/<label>/<file>``: first 10 s of each file.

    The prompt names a class by ``<folder>/classnames.json`` (``{label: words}``) when present,
    else by its folder name with underscores as spaces.
    """
    from clap_fast import metrics
    from clap_fast.audio import fill, int16_round_trip, load_audio
    from clap_fast.text import get_tokenizer

    root = Path(cfg.zeroshot_folder)
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = sorted(
        f for lab in labels for f in (root / lab).iterdir() if f.suffix.lower() in (".flac", ".wav")
    )
    mine = files[d.rank :: d.world]
    names_file = root / "classnames.json"
    names = json.loads(names_file.read_text()) if names_file.exists() else {}
    prompts = [
        cfg.zeroshot_template.format(names.get(lab, lab.replace("_", " "))) for lab in labels
    ]
    tok = get_tokenizer(model_cfg.text)(prompts)
    clip = model_cfg.audio.clip_samples

    def batches():
        for i in range(0, len(mine), cfg.batch_size):
            wav = [
                fill(
                    int16_round_trip(load_audio(str(f), model_cfg.audio.sample_rate))[:clip],
                    clip,
                    cfg.data_filling,
                )
                for f in mine[i : i + cfg.batch_size]
            ]
            yield {
                "waveform": torch.stack(wav),
                **tok,
                "caption_owner": torch.zeros(len(labels), dtype=torch.long),
            }

    if cfg.enable_fusion:
        log.warning("zero-shot on a folder is not built for fusion models: skipped")
        return {}
    template = _eval_template(model_cfg, cfg, d)
    a, t, _ = _embed_all(model, batches(), d, cfg.batch_size, template)
    parts = _all_gather_obj((a, t), d)
    A = torch.cat([x for pa, _ in parts for x in pa])
    T = next(x for _, pt in parts for x in pt)
    y = torch.tensor(
        [labels.index(f.parent.name) for r in range(d.world) for f in files[r :: d.world]]
    )
    acc = metrics.zero_shot_accuracy(A @ T.T, y, topk=(1, min(5, len(labels))))
    return {f"zeroshot/{k}": v for k, v in acc.items()}


# --------------------------------------------------------------------------- logging
class Reporter:
    """tensorboard / wandb / results.jsonl on rank 0."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, d: Dist) -> None:
        self.d, self.run_dir, self.tb, self.wandb = d, run_dir, None, None
        targets = [t for t in cfg.report_to.split(",") if t]
        if not d.main:
            return
        if "tensorboard" in targets:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "wandb" in targets:
            try:
                import wandb
            except ImportError as exc:
                raise SystemExit(
                    "--report-to wandb: the wandb package is not installed (pip install wandb; "
                    "set WANDB_MODE=offline or --wandb-offline to log without a network)"
                ) from exc
            mode = "offline" if cfg.wandb_offline else None
            self.wandb = wandb.init(
                project="clap_fast", name=run_dir.name, notes=cfg.wandb_notes, dir=str(run_dir),
                config=cfg.to_dict(), mode=mode, resume="allow",
            )  # fmt: skip

    def scalars(self, values: dict[str, float], step: int) -> None:
        if not self.d.main:
            return
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def record(self, entry: dict[str, Any]) -> None:
        if self.d.main:
            with open(self.run_dir / "results.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _flops_per_sample(model: CLAP, model_cfg: Any) -> float:
    """Forward FLOPs of one clip + one caption (counted once, on a batch of 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = _eval_template(model_cfg, TrainConfig(enable_fusion=model_cfg.enable_fusion), Dist())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        _forward(model.eval(), x)
    model.train()
    return float(fc.get_total_flops())


def _peak_flops(device: torch.device) -> float | None:
    if os.environ.get("CLAP_FAST_PEAK_FLOPS"):
        return float(os.environ["CLAP_FAST_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


# ----------------------------------------------------------------------------- train
def _run_dir(cfg: TrainConfig) -> Path:
    if cfg.name is None:
        cfg.name = f"{time.strftime('%Y_%m_%d-%H_%M_%S')}-model_{cfg.model}-lr_{cfg.lr}-b_{cfg.batch_size}-j_{cfg.workers}-p_{cfg.precision}"
    return Path(cfg.logs) / cfg.name


def _report_skips(
    stats: SkipStats, epoch: int, d: Dist, reporter: Reporter, loss: float
) -> dict[str, Any]:
    total = SkipStats()
    for s in _all_gather_obj(stats.to_dict(), d):
        total.merge(s)
    entry = {"epoch": epoch, "kind": "data", "train_loss": loss, "skipped": dict(total.counts),
             "clips": total.clips, "skipped_items": [list(x) for x in total.details]}  # fmt: skip
    if d.main:
        if total.counts:
            log.warning("epoch %d: skipped %s", epoch, dict(total.counts))
            for reason, shard, member in total.details:
                log.warning("  skipped (%s) %s :: %s", reason, shard, member)
        else:
            log.info("epoch %d: no bad samples", epoch)
        reporter.record(entry)
    return entry


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run the whole training; returns the last evaluation's metrics (rank 0; {} elsewhere)."""
    d = init_distributed(cfg)
    run_dir = _run_dir(cfg)
    ckpt_dir = run_dir / "checkpoints"
    if d.main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    _barrier(d)
    _setup_logging(run_dir, d)
    if d.device.type == "cpu":
        torch.set_num_threads(
            max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        )
    if d.main:
        (run_dir / "params.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    if cfg.precision != "fp32" and d.device.type != "cuda":
        log.warning("--precision %s: no GPU, training in fp32", cfg.precision)
    _seed_everything(cfg.seed)
    model = build_model(cfg)
    model_cfg = model.cfg
    torch.manual_seed(cfg.seed + 1 + d.rank)  # per-rank stream for drop-path etc.
    freeze(cfg, model)
    flops = _flops_per_sample(model, model_cfg)
    wrapped = parallelize(cfg, model, d)
    # bf16 on the GPU: FSDP2's mixed-precision policy when sharded, autocast for DDP / one GPU.
    bf16 = d.device.type == "cuda" and cfg.precision != "fp32"
    autocast = bf16 and (d.world == 1 or cfg.parallel == "ddp")
    opt = build_optimizer(cfg, wrapped, d)
    loss_fn = ClipLoss(cfg.local_loss, cfg.gather_with_grad, cfg.clap_mlploss, d.rank, d.world)

    urls, num = [], 0
    for name in cfg.datasetnames:
        for info in cfg.datasetinfos:
            if split_exists(cfg.datasetpath, name, info):
                u, n = split_urls(cfg.datasetpath, name, info)
                urls, num = urls + u, num + n
    if not urls:
        raise SystemExit(
            f"no training shards under {cfg.datasetpath} for {cfg.datasetnames} x {cfg.datasetinfos}"
        )
    num = cfg.train_num_samples or num
    steps_per_epoch = max(1, num // (cfg.batch_size * d.world))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    spec = DecodeSpec(
        model_cfg.audio,
        model_cfg.text,
        model_cfg.audio.clip_samples,
        cfg.data_filling,
        cfg.data_truncating,
        cfg.enable_fusion,
    )
    dataset = WebAudioDataset(
        urls, spec, batch_size=cfg.batch_size, seed=cfg.seed, rank=d.rank, world_size=d.world,
        shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
    )  # fmt: skip
    reporter = Reporter(cfg, run_dir, d)
    log.info(
        "%d training shards, %d samples, ~%d steps/epoch, %d ranks, device %s",
        len(urls),
        num,
        steps_per_epoch,
        d.world,
        d.device,
    )

    step, start_epoch, skip_batches, best = 0, 0, 0, []
    if cfg.resume:
        path = ckpt_dir / "epoch_latest" if cfg.resume == "latest" else Path(cfg.resume)
        if path.exists():
            meta = load_checkpoint_into(path, wrapped, opt, d)
            step, start_epoch, skip_batches = meta["step"], meta["epoch"], meta["batches_in_epoch"]
            best = meta.get("best", [])
            log.info(
                "resumed from %s: step %d, epoch %d, %d batches into it",
                path,
                step,
                start_epoch,
                skip_batches,
            )
        elif cfg.resume != "latest":
            raise SystemExit(f"--resume {cfg.resume}: no such checkpoint")
        else:
            log.info("--resume latest: no checkpoint yet, starting fresh")

    last_metrics: dict[str, float] = {}
    peak = _peak_flops(d.device)
    done = cfg.max_steps is not None and step >= cfg.max_steps
    for epoch in range(start_epoch, cfg.epochs):
        if done:
            break
        dataset.set_epoch(epoch)
        stats = SkipStats()
        batches_in_epoch, wait_s, t_epoch = 0, 0.0, time.perf_counter()
        worker_rates: list[tuple[int, int, float]] = []
        it = iter(make_loader(dataset, cfg.workers, cfg.prefetch_factor))
        bar = None
        if d.main:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=steps_per_epoch,
                initial=skip_batches,
                desc=f"epoch {epoch}",
                disable=None,
                leave=False,
            )
        window = {
            "loss": 0.0,
            "n": 0,
            "samples": 0,
            "seconds": 0.0,
            "t": time.perf_counter(),
            "wait": 0.0,
        }
        exhausted = False
        epoch_loss = [0.0, 0]
        while not done:
            t0 = time.perf_counter()
            batch = None
            while not exhausted:
                item = next(it, None)
                if item is None:
                    exhausted = True
                    break
                stats.merge(item["stats"])
                if item.get("final"):
                    worker_rates.append((item["worker"], 0, 0.0))
                    continue
                batch = item
                break
            waited = time.perf_counter() - t0
            if not _agree(batch is not None, d):
                break
            if skip_batches:  # resuming mid-epoch: replay the data position
                skip_batches -= 1
                batches_in_epoch += 1
                continue
            wait_s += waited
            window["wait"] += waited
            lr = cfg.lr if cfg.skip_scheduler else cosine_lr(step, cfg.lr, cfg.warmup, total_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            x = _to(batch, d.device)
            with torch.autocast("cuda", torch.bfloat16, enabled=autocast):
                out = _forward(wrapped, x)
            with torch.autocast(d.device.type, enabled=False):  # the loss in fp32
                loss = loss_fn(
                    out["audio_features"].float(), out["text_features"].float(), out["logit_scale_a"].float(),
                    out["logit_scale_t"].float(), out["audio_features_mlp"].float(), out["text_features_mlp"].float(),
                )  # fmt: skip
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            clamp_logit_scale_(wrapped)
            step += 1
            batches_in_epoch += 1
            loss_value = float(loss.detach())  # host sync, once per step (logging)
            window["loss"] += loss_value
            epoch_loss[0] += loss_value
            epoch_loss[1] += 1
            window["n"] += 1
            window["samples"] += x["input_ids"].shape[0] * d.world
            window["seconds"] += batch["seconds"] * d.world
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
            if step % cfg.log_every_n_steps == 0 or step == total_steps:
                dt = time.perf_counter() - window["t"]
                sps = window["samples"] / dt
                scale = float(out["logit_scale_a"].detach().reshape(-1)[0])
                vals = {
                    "train/loss": window["loss"] / window["n"], "train/lr": lr, "train/logit_scale": scale,
                    "train/samples_per_s": sps, "train/audio_seconds_per_s": window["seconds"] / dt,
                    "train/data_wait_fraction": window["wait"] / dt,
                }  # fmt: skip
                vals["train/tflops_per_s_per_rank"] = 3 * flops * sps / d.world / 1e12
                if peak:
                    vals["train/mfu"] = 3 * flops * sps / d.world / peak
                log.info(
                    "step %d epoch %d %s",
                    step,
                    epoch,
                    " ".join(f"{k[6:]}={v:.4g}" for k, v in vals.items()),
                )
                reporter.scalars(vals, step)
                window = {
                    "loss": 0.0,
                    "n": 0,
                    "samples": 0,
                    "seconds": 0.0,
                    "t": time.perf_counter(),
                    "wait": 0.0,
                }
            meta = {
                "step": step,
                "epoch": epoch,
                "batches_in_epoch": batches_in_epoch,
                "best": best,
            }
            if cfg.save_every_n_steps and step % cfg.save_every_n_steps == 0:
                save_checkpoint(ckpt_dir, "epoch_latest", wrapped, opt, meta, d)
            done = cfg.max_steps is not None and step >= cfg.max_steps
        if bar is not None:
            bar.close()
        for item in (
            it
        ):  # drain: the rest of the epoch's skip counts (batches beyond the sync point are dropped)
            stats.merge(item["stats"])
        _report_skips(stats, epoch, d, reporter, epoch_loss[0] / max(1, epoch_loss[1]))
        epoch_s = time.perf_counter() - t_epoch
        if stats.busy_s > 0:
            per_worker = stats.clips / stats.busy_s
            log.info("epoch %d: %d clips decoded on this rank, loader %.1f clips/s per worker, data wait %.0f%% of %.1f s",
                     epoch, stats.clips, per_worker, 100 * wait_s / max(epoch_s, 1e-9), epoch_s)  # fmt: skip
        completed = epoch + 1
        metrics: dict[str, float] = {}
        if (
            not cfg.no_eval
            and cfg.val_frequency
            and (completed % cfg.val_frequency == 0 or completed == cfg.epochs or done)
        ):
            metrics = evaluate(cfg, wrapped, model_cfg, d, completed)
            if d.main:
                log.info(
                    "eval epoch %d: %s",
                    completed,
                    json.dumps({k: round(v, 4) for k, v in metrics.items()}),
                )
                reporter.record({"epoch": completed, "step": step, "kind": "eval", **metrics})
                reporter.scalars({f"val/{k}": v for k, v in metrics.items()}, step)
            last_metrics = metrics
        meta = {"step": step, "epoch": completed, "batches_in_epoch": 0, "best": best}
        if cfg.save_frequency and completed % cfg.save_frequency == 0:
            save_checkpoint(ckpt_dir, f"epoch_{completed}", wrapped, opt, meta, d)
        if cfg.save_top_performance and metrics:
            best = _update_top_k(cfg, ckpt_dir, wrapped, opt, meta, metrics, best, completed, d)
            meta["best"] = best
        if cfg.save_most_recent or cfg.save_every_n_steps or cfg.resume:
            save_checkpoint(ckpt_dir, "epoch_latest", wrapped, opt, meta, d)
        skip_batches = 0
    if cfg.export_laion:
        export_laion(wrapped, model_cfg, ckpt_dir / "final_laion.pt", d, cfg.epochs)
    reporter.close()
    if d.world > 1:
        dist.destroy_process_group()
    return last_metrics if d.main else {}


def _update_top_k(cfg, ckpt_dir, model, opt, meta, metrics, best, epoch, d) -> list:
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


def format_table(metrics: dict[str, float]) -> str:
    """The final metrics as a two-column text table."""
    keys = [k for k in metrics if not k.endswith("num_samples")]
    width = max((len(k) for k in keys), default=10)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    lines += [f"{k:<{width}}  {metrics[k]:.4f}" for k in keys]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m clap_fast.train`` / ``torchrun -m clap_fast.train``."""
    cfg = parse_args(argv)
    metrics = train(cfg)
    if metrics:
        sys.stdout.write(format_table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
