"""Evaluation of ``clap_fast.train``: retrieval per dataset, 5-caption variant, zero-shot.

* ``evaluate``: for each training dataset with an eval split (``--eval-splits``, minus
  ``--exclude-eval-dataset``), every rank embeds its shards, the embeddings are all-gathered
  and ``clap_fast.metrics`` gives retrieval metrics (audio vs. each clip's first caption), plus
  the 5-caption variant when every clip has 5 captions; then zero-shot top-1/5 accuracy on
  ``--zeroshot-folder`` (``<label>/<file>``, first 10 s of each file).
* Ranks run equally many forwards (padding with a template batch) and batches are padded to
  the training batch size, so compiled and sharded models see static shapes and no collective
  hangs.
* ``to_device`` / ``forward``: one batch dict -> the model, shared with the train step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clap_fast import metrics
from clap_fast.data import DecodeSpec, WebAudioDataset, make_loader, split_exists, split_urls
from clap_fast.pcm import to_float
from clap_fast.train.dist import Dist, agree, all_gather_object
from clap_fast.train.params import TrainConfig

__all__ = ["evaluate", "eval_template", "to_device", "forward"]

log = logging.getLogger("clap_fast.train")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("waveform", "mel_fusion", "longer", "input_ids", "attention_mask")
    x = {k: batch[k].to(device, non_blocking=True) for k in keys if k in batch}
    if "waveform" in x and x["waveform"].dtype == torch.int16:  # PCM shards: 2 bytes/sample moved
        x["waveform"] = to_float(x["waveform"])
    return x


def forward(model: nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    model: nn.Module, batches: Any, d: Dist, bs: int, template: dict, scale: list | None = None
) -> tuple[list, list, list]:
    """Run every rank's eval batches (padded; ranks do equally many forwards) -> embeddings and
    caption owners; ``scale`` (a list, if given) receives ``exp(logit_scale_a)`` as a float."""
    audio, text, owners, last = [], [], [], []
    it = iter(batches)
    while True:
        b = next(it, None)
        while b is not None and "final" in b:
            b = next(it, None)
        if not agree(b is not None, d, op="max"):
            break
        x = to_device(b, d.device) if b is not None else template
        m = x["input_ids"].shape[0]
        n = (x["waveform"] if "waveform" in x else x["mel_fusion"]).shape[0]
        cap = bs * -(-m // bs)  # captions padded to a multiple of the batch: few static shapes
        out = forward(model, _pad_batch(x, bs, cap))
        if b is not None:
            audio.append(out["audio_features"][:n].float().cpu())
            text.append(out["text_features"][:m].float().cpu())
            owners.append(b["caption_owner"])
        last[:] = [out["logit_scale_a"].detach().reshape(-1)[0]]
    if scale is not None:
        scale[:] = [float(x) for x in last]  # one host sync
    return audio, text, owners


def evaluate(
    cfg: TrainConfig, model: nn.Module, model_cfg: Any, d: Dist, epoch: int
) -> dict[str, float]:
    """Retrieval metrics per eval dataset (+ 5-caption variant) and zero-shot on a folder."""
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
            template = eval_template(model_cfg, d.device)
        scale: list[float] = []
        a, t, o = _embed_all(
            model, make_loader(ds, min(cfg.workers, 1)), d, cfg.batch_size, template, scale
        )
        parts = all_gather_object((a, t, o), d)
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
            mc = metrics.retrieval_metrics_multi_caption(A_, T_, own, (scale or [None])[0])
            res.update({f"{name}/5cap_{k}": v for k, v in mc.items()})
        results.update(res)
    if cfg.zeroshot_folder:
        results.update(_zero_shot(cfg, model, model_cfg, d))
    model.train()
    return results


def eval_template(model_cfg: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """A one-row batch of the model's input shapes (padding rows, FLOP counting)."""
    L = model_cfg.text.context_length
    x = {
        "input_ids": torch.ones(1, L, dtype=torch.long),
        "attention_mask": torch.ones(1, L, dtype=torch.long),
    }
    if model_cfg.enable_fusion:
        frames = model_cfg.audio.clip_samples // model_cfg.audio.hop_size + 1
        x["mel_fusion"] = torch.zeros(1, 4, frames, model_cfg.audio.mel_bins)
        x["longer"] = torch.zeros(1, dtype=torch.bool)
    else:
        x["waveform"] = torch.zeros(1, model_cfg.audio.clip_samples)
    return {k: v.to(device) for k, v in x.items()}


def _zero_shot(cfg: TrainConfig, model: nn.Module, model_cfg: Any, d: Dist) -> dict[str, float]:
    """Top-1/5 zero-shot accuracy on ``<folder>/<label>/<file>``: first 10 s of each file.

    The prompt names a class by ``<folder>/classnames.json`` (``{label: words}``) when present,
    else by its folder name with underscores as spaces.
    """
    from clap_fast.audio import load_audio, prepare_batch
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

    def batches():
        for i in range(0, len(mine), cfg.batch_size):
            clips = [
                load_audio(str(f), model_cfg.audio.sample_rate)
                for f in mine[i : i + cfg.batch_size]
            ]
            # int16 round trip, then the first 10 s or ``--data-filling`` (one window per file)
            audio = prepare_batch(
                clips,
                model_cfg.audio,
                fusion=False,
                data_filling=cfg.data_filling,
                long_audio="first",
            )
            yield {
                "waveform": audio.waveform,
                **tok,
                "caption_owner": torch.zeros(len(labels), dtype=torch.long),
            }

    if cfg.enable_fusion:
        log.warning("zero-shot on a folder is not built for fusion models: skipped")
        return {}
    template = eval_template(model_cfg, d.device)
    a, t, _ = _embed_all(model, batches(), d, cfg.batch_size, template)
    parts = all_gather_object((a, t), d)
    A = torch.cat([x for pa, _ in parts for x in pa])
    T = next(x for _, pt in parts for x in pt)
    y = torch.tensor(
        [labels.index(f.parent.name) for r in range(d.world) for f in files[r :: d.world]]
    )
    acc = metrics.zero_shot_accuracy(A @ T.T, y, topk=(1, min(5, len(labels))))
    return {f"zeroshot/{k}": v for k, v in acc.items()}
