"""Run configuration of ``clap_fast.train``: a typed dataclass and a LAION-compatible CLI.

Every flag of LAION's ``training/params.py`` that the seed README uses is accepted with the same
spelling and meaning (``--save-frequency 50 --save-top-performance 3 --save-most-recent
--dataset-type webdataset --precision fp32 --pretrained openai --warmup 10000 --batch-size 184
--lr 1e-3 --wd 0.1 --epochs 400 --workers 10 --use-bn-sync --freeze-text --model HTSAT-tiny
--report-to wandb --wandb-notes … --resample-method None --datasetnames … --datasetinfos …
--datasetpath …``), plus our own (``--compile``, ``--parallel``, ``--zeroshot-folder`` …).

Other LAION flags (``--lp-mlp``, ``--horovod``, ``--mixup`` …) are accepted and ignored with a
warning naming them, so LAION scripts do not crash; their values are dropped. The resolved
configuration (``TrainConfig.to_dict``) is written into every run directory as ``params.json``.

``--pretrained openai`` (LAION: CLIP's text weights) cannot be honoured offline and is ignored
with a warning; ``--pretrained <path>`` loads any checkpoint ``CLAP.from_pretrained`` reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from clap_fast.audio import Filling
from clap_fast.config import TextTower

__all__ = ["TrainConfig", "parse_args", "build_parser", "PRECISION_ALIASES"]

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
PRECISION_ALIASES = {"amp": "bf16", "amp_bf16": "bf16", "amp_bfloat16": "bf16"}
"""LAION's spellings of bf16 mixed precision, accepted on the command line and normalised."""


@dataclass
class TrainConfig:
    # ------------------------------------------------------------------ data
    datasetpath: str = ""
    """Root of LAION's layout ``<datasetpath>/<name>/<split>/*.tar`` + ``sizes.json``; may be a
    ``pipe:<command> <prefix>`` URL (the shard path is appended to the command)."""
    datasetnames: list[str] = field(default_factory=list)
    """Datasets (directories under ``datasetpath``) to train and evaluate on."""
    datasetinfos: list[str] = field(default_factory=lambda: ["train"])
    """Training splits; every ``<name>/<info>`` that exists is used."""
    eval_splits: list[str] = field(default_factory=lambda: ["test", "valid", "eval"])
    """Evaluation split of each dataset: the first of these that exists."""
    exclude_eval_dataset: list[str] = field(default_factory=list)
    """Datasets not to evaluate on."""
    dataset_type: Literal["webdataset"] = "webdataset"
    """Only ``webdataset`` (LAION's other types are toy/CSV image sets)."""
    train_num_samples: int | None = None
    """Samples per epoch; default: the sum of the training shards' ``sizes.json``."""
    workers: int = 1
    """Data loader worker processes per rank (0: decode in the training process)."""
    shuffle_buffer: int = 1000
    """Samples in each worker's shuffle buffer (1: no sample shuffling)."""
    resampled: bool = False
    """Draw shards with replacement (for multi-node runs whose shards do not split evenly)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead."""
    data_filling: Filling = "repeatpad"
    """Short clips: repeatpad | repeat | pad."""
    data_truncating: Literal["rand_trunc", "fusion"] = "rand_trunc"
    """Long clips: rand_trunc (LAION's random crop) | fusion (needs --enable-fusion)."""
    clip_samples: int | None = None
    """Override the model's clip length in samples (default: the config's, 480000 = 10 s)."""
    zeroshot_folder: str | None = None
    """A folder of ``<label>/<file>.flac|wav`` (+ optional ``classnames.json``, ``{label: words}``)
    for zero-shot accuracy at evaluation."""
    zeroshot_template: str = "This is a sound of {}."
    """Prompt template of zero-shot classification."""
    resample_method: str = "None"
    """LAION's flag; training data is 48 kHz and never resampled (only 'None' is accepted)."""
    # ----------------------------------------------------------------- model
    model: str = "HTSAT-tiny"
    """Audio architecture (``clap_fast.list_models()``); LAION's ``--amodel``."""
    tmodel: TextTower = "transformer"
    """Text tower: transformer (LAION's default) | roberta | bert | bart."""
    text_overrides: dict[str, Any] = field(default_factory=dict)
    """TextConfig overrides as JSON, e.g. ``{"width": 128, "layers": 2, "heads": 2}``."""
    pretrained: str = ""
    """A checkpoint to start from ('openai' is accepted and ignored: no network)."""
    enable_fusion: bool = False
    """LAION's feature fusion for long audio."""
    fusion_type: str = "aff_2d"
    """Only aff_2d is built."""
    freeze_text: bool = False
    """Keep the text tower fixed (no gradients, not in the optimiser)."""
    clap_mlploss: bool = False
    """LAION's MLP-loss cross terms."""
    # ------------------------------------------------------------ optimiser
    batch_size: int = 64
    """Per-rank batch size."""
    epochs: int = 32
    """Training epochs."""
    lr: float = 5e-4
    """Peak learning rate."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.999
    """Adam beta2 (LAION: 0.999 for non-ViT models)."""
    eps: float = 1e-8
    """Adam epsilon."""
    wd: float = 0.2
    """Weight decay (not on norms, biases, logit scales, bias tables)."""
    momentum: float = 0.9
    """SGD momentum (accepted for LAION compatibility; only adam/adamw are built)."""
    optimizer: Literal["adam", "adamw"] = "adamw"
    """adam | adamw."""
    warmup: int = 10000
    """Linear warm-up steps of the cosine schedule."""
    skip_scheduler: bool = False
    """Keep the learning rate constant."""
    max_steps: int | None = None
    """Stop after this many optimiser steps (for tests and benchmarks)."""
    # -------------------------------------------------------------- systems
    precision: Precision = "fp32"
    """fp32 | bf16 (LAION's amp, amp_bf16, amp_bfloat16 mean bf16): bf16 autocast, or FSDP2's
    bf16 mixed precision for sharded GPU runs; front end, bn0 and loss in fp32. On a CPU bf16
    needs bf16 units (AVX512-BF16 / AMX); without them the run warns and trains in fp32."""
    parallel: Literal["fsdp", "ddp"] = "fsdp"
    """fsdp (FSDP2, one unit per Swin block and text layer) | ddp."""
    compile: bool = False
    """torch.compile each Swin block and text layer (static shapes)."""
    use_bn_sync: bool = False
    """SyncBatchNorm for bn0."""
    local_loss: bool = False
    """Each rank computes its rows of the loss against all gathered features."""
    gather_with_grad: bool = False
    """All-gather features with gradients."""
    dist_backend: str | None = None
    """nccl on GPU, gloo on CPU by default."""
    seed: int = 4242
    """Seed of the model init, data order and augmentations."""
    # -------------------------------------------------- checkpoints and logs
    logs: str = "./logs"
    """Runs go to ``<logs>/<name>``. Under torchrun spell it ``--logdir``: torchrun's own parser
    rejects ``--logs`` as an ambiguous abbreviation of its ``--logs-specs``."""
    name: str | None = None
    """Run name (default: date + model + lr + batch)."""
    resume: str | None = None
    """A checkpoint directory to resume from, or 'latest' (this run's epoch_latest)."""
    save_frequency: int = 1
    """Keep ``epoch_{k}`` every this many epochs (0: never)."""
    save_most_recent: bool = False
    """Keep ``epoch_latest`` up to date."""
    save_top_performance: int = 0
    """Keep the best K checkpoints by ``top_k_checkpoint_select_metric``."""
    save_every_n_steps: int = 0
    """Also write ``epoch_latest`` every N steps (mid-epoch resume points)."""
    top_k_checkpoint_select_dataset: str = "all"
    """Dataset whose metric ranks checkpoints ('all': the mean over datasets)."""
    top_k_checkpoint_select_metric: str = "mAP@10"
    """Metric suffix ranking checkpoints (higher is better), e.g. 'mAP@10', 'R@10'."""
    val_frequency: int = 1
    """Evaluate every N epochs (0: never)."""
    no_eval: bool = False
    """Skip evaluation."""
    report_to: str = ""
    """'', tensorboard, wandb or 'wandb,tensorboard'."""
    wandb_notes: str = ""
    """Notes of the wandb run."""
    wandb_offline: bool = False
    """wandb in offline mode (also set by WANDB_MODE=offline)."""
    log_every_n_steps: int = 10
    """Training log interval."""
    export_laion: bool = True
    """Write ``<run>/checkpoints/final_laion.pt`` (LAION single-file layout) at the end."""
    ignored_flags: list[str] = field(default_factory=list)
    """LAION flags given but not implemented (warned about)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# LAION flags accepted for compatibility and ignored (name -> nargs).
_IGNORED = {
    "--train-data": 1, "--val-data": 1, "--train-ipc": 1, "--val-ipc": 1, "--val-num-samples": 1,
    "--csv-separator": 1, "--csv-img-key": 1, "--csv-caption-key": 1, "--imagenet-val": 1,
    "--imagenet-v2": 1, "--full-train-dataset": "+", "--dataset-proportion": 1,
    "--remotedata": 0, "--class-label-path": 1, "--log-local": 0, "--split-opt": 0,
    "--lr-pretrained": 1, "--beta1-pretrained": 1, "--beta2-pretrained": 1,
    "--eps-pretrained": 1, "--wd-pretrained": 1, "--momentum-pretrained": 1, "--lr-new": 1,
    "--beta1-new": 1, "--beta2-new": 1, "--eps-new": 1, "--wd-new": 1, "--momentum-new": 1,
    "--zeroshot-frequency": 1, "--pretrained-audio": 1, "--pretrained-text": 1,
    "--pretrained-image": 0, "--lock-image": 0, "--lock-image-unlocked-groups": 1,
    "--lock-image-freeze-bn-stats": 0, "--force-quick-gelu": 0, "--torchscript": 0,
    "--trace": 0, "--dist-url": 1, "--debug": 0, "--copy-codebase": 0, "--horovod": 0,
    "--ddp-static-graph": 0, "--no-set-device-rank": 0, "--openai-model-cache-dir": 1,
    "--parallel-eval": 0, "--lp-mlp": 0, "--lp-freeze": 0, "--lp-act": 1, "--lp-loss": 1,
    "--lp-metrics": 1, "--lp-lr": 1, "--kappa": 1, "--wandb-id": 1, "--sleep": 1, "--mixup": 0,
    "--text-augment-selection": 1, "--freeze-text-after": 1,
}  # fmt: skip


def _bool_flag(p: argparse.ArgumentParser, flag: str, default: bool, help: str) -> None:
    action = argparse.BooleanOptionalAction if default else "store_true"
    p.add_argument(flag, action=action, default=default, help=help)


@functools.cache
def choices() -> dict[str, tuple[str, ...]]:
    """{field: allowed values} of every ``Literal``-typed field of ``TrainConfig``: the one
    source of argparse's choices and of ``_validate``."""
    hints = typing.get_type_hints(TrainConfig)
    return {
        name: typing.get_args(hint)
        for name, hint in hints.items()
        if typing.get_origin(hint) is Literal
    }


def _precision(value: str) -> str:
    """argparse type of ``--precision``: LAION's aliases normalised to ``bf16``."""
    value = value.strip().lower()
    return PRECISION_ALIASES.get(value, value)


def build_parser() -> argparse.ArgumentParser:
    """The argparse mirror of ``TrainConfig`` (LAION spellings; ``--amodel`` = ``--model``)."""
    d = TrainConfig()
    docs = _field_docs()
    allowed = choices()
    p = argparse.ArgumentParser(
        prog="clap_fast.train", description="Train CLAP (FSDP2 / DDP, torchrun or one process)."
    )
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("ignored_flags", "model", "text_overrides"):
            continue
        flag = "--" + f.name.replace("_", "-")
        flags = [flag, "--logdir"] if f.name == "logs" else [flag]  # torchrun rejects --logs
        default = getattr(d, f.name)
        help_ = docs.get(f.name, "")
        if isinstance(default, bool):
            _bool_flag(p, flag, default, help_)
        elif isinstance(default, list):
            p.add_argument(flag, nargs="+", default=default, help=help_)
        elif f.name in ("train_num_samples", "clip_samples", "max_steps"):
            p.add_argument(flag, type=int, default=default, help=help_)
        elif f.name in ("resume", "name", "zeroshot_folder", "dist_backend"):
            p.add_argument(flag, type=str, default=default, help=help_)
        elif f.name in allowed:
            kind = _precision if f.name == "precision" else str
            p.add_argument(flag, type=kind, choices=allowed[f.name], default=default, help=help_)
        else:
            p.add_argument(*flags, type=type(default), default=default, help=help_)
    p.add_argument("--model", "--amodel", dest="model", default=d.model, help=docs["model"])
    p.add_argument("--text-overrides", type=json.loads, default={}, help=docs["text_overrides"])
    for flag, nargs in _IGNORED.items():
        kw: dict[str, Any] = {"action": "store_true"} if nargs == 0 else {"nargs": nargs}
        p.add_argument(
            flag, dest="_ignored_" + flag[2:].replace("-", "_"), help=argparse.SUPPRESS, **kw
        )
    return p


def _field_docs() -> dict[str, str]:
    """Field docstrings (the string literal under each field) for --help."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(TrainConfig))
    body = tree.body[0].body  # type: ignore[attr-defined]
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
            out[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return out


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Command line -> validated ``TrainConfig`` (unknown non-LAION flags are an error)."""
    ns = vars(build_parser().parse_args(argv))
    ignored = sorted(
        k[len("_ignored_") :] for k, v in ns.items() if k.startswith("_ignored_") and v
    )
    values = {k: v for k, v in ns.items() if not k.startswith("_ignored_")}
    cfg = TrainConfig(**values, ignored_flags=[("--" + k.replace("_", "-")) for k in ignored])
    if cfg.ignored_flags:
        log.warning(
            "LAION flags accepted but not implemented (ignored): %s", " ".join(cfg.ignored_flags)
        )
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    for name, allowed in choices().items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(
                f"--{name.replace('_', '-')} must be one of {allowed}, got {getattr(cfg, name)!r}"
            )
    if cfg.resample_method not in ("None", "none", ""):
        raise SystemExit(
            "--resample-method: training data must already be 48 kHz; only 'None' is supported"
        )
    if (cfg.data_truncating == "fusion") != cfg.enable_fusion:
        raise SystemExit("--data-truncating fusion and --enable-fusion go together")
    for target in [t for t in cfg.report_to.split(",") if t]:
        if target not in ("wandb", "tensorboard"):
            raise SystemExit(f"--report-to takes wandb and/or tensorboard, got {target!r}")
    if not cfg.datasetpath or not cfg.datasetnames:
        raise SystemExit("--datasetpath and --datasetnames are required")
    if cfg.batch_size < 1 or cfg.epochs < 1:
        raise SystemExit("--batch-size and --epochs must be positive")
