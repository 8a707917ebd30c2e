"""Training-step and data-loader throughput.

Benchmarks (one optimiser step = forward, ClipLoss, backward, AdamW, logit-scale clamp; the
log-mel runs inside the step, as in ``clap_fast.train``):

* ``test_train_step_cpu[eager|compiled|eager_bf16]``: HTSAT-mini + a 2-layer CLIP-style text
  tower, batch 4, 1 s clips, CPU fp32; ``compiled`` compiles each Swin block and text layer as
  the trainer's ``--compile`` does (static shapes); ``eager_bf16`` is ``--precision bf16`` on a
  CPU with bf16 units (bf16 autocast; skipped on CPUs without them, where the trainer falls
  back to fp32).
* ``test_train_step_gpu[laion_fp32_eager|ours_bf16_compiled]`` (CUDA only): HTSAT-tiny +
  RoBERTa-sized text tower at batch 64, 10 s clips. LAION's recipe = fp32, eager, reference ops
  (``CLAP_FAST_BACKEND=reference``); ours = bf16 autocast (fp32 front end and loss), compiled
  blocks, Triton kernels. ``extra_info`` carries samples/s and an MFU estimate
  (FLOPs counted by ``torch.utils.flop_counter`` on one forward, x3 for the step).
* ``test_loader_clips_per_s``: the webdataset pipeline (decode, crop, int16, tokenise) over a
  synthetic shard, one worker; ``extra_info["clips_per_s"]``.

Run: ``pytest bench/bench_train.py --benchmark-json out.json``; ``--benchmark-disable`` for a
smoke run (each body once).
"""

from __future__ import annotations

import pytest
import torch

import clap_fast
from clap_fast import ops
from clap_fast.loss import ClipLoss
from clap_fast.train import param_groups, train_step
from clap_fast.train.precision import cpu_has_bf16_units, resolve_precision

HAS_GPU = torch.cuda.is_available()


def _step_fn(model: clap_fast.CLAP, batch: dict[str, torch.Tensor], bf16: bool):
    """The trainer's own ``train_step`` (one process: bf16 is autocast on the batch's device)."""
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=batch["waveform"].is_cuda)
    loss_fn = ClipLoss()
    prec = resolve_precision("bf16" if bf16 else "fp32", batch["waveform"].device, sharded=False)

    def step() -> torch.Tensor:
        return train_step(model, opt, loss_fn, batch, 1e-4, prec)[0]

    return step


def _batch(b: int, samples: int, ctx: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "waveform": (0.1 * torch.randn(b, samples, generator=g)).to(device),
        "input_ids": torch.randint(1, vocab - 1, (b, ctx), generator=g).to(device),
        "attention_mask": torch.ones(b, ctx, dtype=torch.long, device=device),
    }


def _compile_blocks(model: clap_fast.CLAP) -> None:
    from clap_fast.train import text_layers

    for layer in model.audio_branch.layers:
        for blk in layer.blocks:
            blk.compile(dynamic=False)
    for layer in text_layers(model):
        layer.compile(dynamic=False)


def _run(
    benchmark, step, batch_size: int, flops: float | None = None, peak: float | None = None
) -> None:
    for _ in range(2):  # warm-up (compilation, allocator, autotuning)
        step()
    if benchmark.disabled:
        benchmark(step)
        return
    benchmark.pedantic(lambda: float(step()), rounds=5, iterations=1)  # float(): host sync
    sps = batch_size / benchmark.stats.stats.median
    benchmark.extra_info["samples_per_s"] = sps
    if flops and peak:
        benchmark.extra_info["mfu"] = 3 * flops * sps / peak


@pytest.mark.parametrize("mode", ["eager", "compiled", "eager_bf16"])
def test_train_step_cpu(benchmark, mode: str, monkeypatch) -> None:
    if mode.endswith("bf16") and not cpu_has_bf16_units():
        pytest.skip("this CPU has no bf16 units (the trainer runs fp32 here)")
    torch.manual_seed(0)
    model = clap_fast.create_model(
        "HTSAT-mini", text="transformer", text_overrides={"width": 64, "layers": 2, "heads": 2}
    ).train()
    model.cfg.audio.clip_samples = 48000
    if mode == "compiled":
        _compile_blocks(model)
    with ops.use_backend("reference"):
        batch = _batch(4, 48000, 77, 49408, "cpu")
        _run(benchmark, _step_fn(model, batch, bf16=mode.endswith("bf16")), 4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["laion_fp32_eager", "ours_bf16_compiled"])
def test_train_step_gpu(benchmark, recipe: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from clap_fast.train.log import _PEAK_FLOPS

    torch.manual_seed(0)
    model = clap_fast.create_model("HTSAT-tiny", text="roberta", device="cuda").train()
    batch = _batch(64, 480000, 77, 50265, "cuda")
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(batch["waveform"][:1], batch["input_ids"][:1], batch["attention_mask"][:1])
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in _PEAK_FLOPS.items() if k in name), None)
    if recipe == "laion_fp32_eager":
        with ops.use_backend("reference"):
            _run(benchmark, _step_fn(model, batch, bf16=False), 64, fc.get_total_flops(), peak)
    else:
        _compile_blocks(model)
        _run(benchmark, _step_fn(model, batch, bf16=True), 64, fc.get_total_flops(), peak)


def test_loader_clips_per_s(benchmark, tmp_path) -> None:
    pytest.importorskip("soundfile")  # writes and decodes FLAC (absent on the GPU image)
    from clap_fast import synth
    from clap_fast.config import get_config
    from clap_fast.data import DecodeSpec, WebAudioDataset, make_loader, split_urls

    synth.write_webdataset(
        tmp_path, "synth", {"train": 32}, shard_size=32, duration=3.0, progress=False
    )
    urls, n = split_urls(str(tmp_path), "synth", "train")
    cfg = get_config("HTSAT-mini", text="transformer")
    spec = DecodeSpec(cfg.audio, cfg.text, 480000)

    def load() -> int:
        ds = WebAudioDataset(urls, spec, batch_size=8, seed=0, shuffle_buffer=8)
        clips = 0
        for item in make_loader(ds, 1):
            clips += len(item.get("keys", []))
        return clips

    assert load() == n
    if benchmark.disabled:
        benchmark(load)
        return
    benchmark.pedantic(load, rounds=3, iterations=1)
    benchmark.extra_info["clips_per_s"] = n / benchmark.stats.stats.median
