"""CPU inference engines: HTSAT-tiny audio embeddings of 10 s clips, every engine × batch 1 / 8.

Providers (one run, the same weights and inputs; see ``clap_fast.engines``):

  laion_clap  laion_clap 1.1.x's own modules (built offline as in ``bench_embed.py``), fp32:
              the outside baseline
  eager       ``model.embed_audio(x, engine="eager")``: clap_fast in PyTorch, fp32
  bf16        bf16 autocast, front end fp32 (fast only where the CPU has bf16 units)
  onnx        the exported graph in onnxruntime (CPU provider)
  openvino    the same graph in OpenVINO at f32 precision (skipped when not installed)
  openvino_bf16  the same graph in OpenVINO at bf16 inference precision (cos ≥ 0.9999 asserted)
  int8        the graph with its linear layers quantised by onnxruntime (dynamic, per channel)
  int8_compile  static int8 (torchao PT2E, calibrated on the built-in sound set) compiled by
              inductor to oneDNN int8 kernels, run in chunks of 2 rows; compiles once (minutes)
  auto        ``engine="auto"`` on a batch-sized job: bf16 on a CPU with bf16 units, fp32 eager
              without, int8_compile once the int8_compile row has built it for the model
              (what it picked is in ``extra_info["picked"]``)
  compile     torch.compile (static shapes); only with CLAP_BENCH_COMPILE=1 (minutes on 2 cores)

Exported engines export their graph once, before timing. Every row records its agreement with
fp32 eager and with laion_clap (min row cosine, max |Δ|); int8 must stay within
``INT8_MIN_COSINE`` of fp32 eager (auto too where it picked int8_compile), bf16 /
openvino_bf16 / auto within ``AUTO_MIN_COSINE``
(asserted), the exact engines within 1e-4. Each row's
``extra_info`` carries the CPU's ISA (``cpu_isa``: torch's capability and the /proc/cpuinfo
flags that matter) and the load average; on a shared machine treat the times as noisy.
``--benchmark-disable`` smoke runs batch 1 of eager, auto and int8 only (exports take a while).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from bench.bench_embed import SR, audio_batch, cf_model
from bench.bench_embed import audio_fn as baseline_audio_fn
from clap_fast import engines

BATCHES = [1, 8]
ROUNDS = 7
COMPILE = os.environ.get("CLAP_BENCH_COMPILE") == "1"
PROVIDERS = [
    "laion_clap",
    "eager",
    "bf16",
    "onnx",
    "openvino",
    "openvino_bf16",
    "int8",
    "int8_compile",
    "auto",
    "compile",
]
EXACT_ATOL = 1e-4
SMOKE = ("eager", "auto", "int8")  # CI's untimed pass: the default path and the quantised graph


def _embed(provider: str, batch: int):
    x = audio_batch(batch)
    if provider == "laion_clap":
        return baseline_audio_fn("laion_clap", batch)
    model = cf_model()
    return lambda: model.embed_audio(x, SR, batch_size=batch, engine=provider)


@functools.cache
def _reference(provider: str, batch: int) -> torch.Tensor | None:
    try:
        return _embed(provider, batch)()
    except pytest.skip.Exception:
        return None


def _agreement(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    got, want = got.double(), want.double()
    return {
        "max_abs_diff": float((got - want).abs().max()),
        "min_cosine": float(F.cosine_similarity(got, want, dim=-1).min()),
    }


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", BATCHES)
def test_cpu_engine_audio(benchmark, request, batch: int, provider: str) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CPU suite (the exported engines run on the CPU)")
    if request.config.getoption("benchmark_disable", False) and (
        batch != BATCHES[0] or provider not in SMOKE
    ):
        pytest.skip(f"smoke run (--benchmark-disable): batch 1 of {SMOKE} only")
    if provider == "compile" and not COMPILE:
        pytest.skip("torch.compile on the CPU takes minutes on 2 cores (CLAP_BENCH_COMPILE=1)")
    if provider == "int8_compile" and not engines.torchao_available():
        pytest.skip("torchao is not installed (pip install torchao)")
    if provider.startswith("openvino") and importlib.util.find_spec("openvino") is None:
        pytest.skip("OpenVINO is not installed (pip install openvino)")
    if provider == "openvino_bf16" and not engines.cpu_info().bf16_units:
        pytest.skip(f"no usable bf16 units ({engines.cpu_info().isa()}): OpenVINO would run f32")
    benchmark.group = f"audio cpu batch {batch}"
    # what auto picks for this batch-sized job (int8_compile once that row has built it)
    picked = engines.select(cf_model(), provider, "audio") if provider != "laion_clap" else None
    fn = _embed(provider, batch)
    out = fn()  # builds the engine (export / quantise / compile) before timing
    rounds = ROUNDS if provider != "laion_clap" or batch > 1 else 2 * ROUNDS
    out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)
    agree = {}
    for ref_name in ("eager", "laion_clap"):
        ref = _reference(ref_name, batch)
        if ref is not None and ref_name != provider:
            agree[ref_name] = _agreement(out, ref)
    info = engines.cpu_info()
    benchmark.extra_info.update(
        provider=provider,
        role="baseline" if provider in ("laion_clap", "eager") else "ours",
        batch=batch,
        items=batch,
        item_unit="clips",
        input="10 s clips, 48 kHz (HTSAT-tiny, RoBERTa-base weights drawn by transformers)",
        picked=None if picked is None else f"{picked.engine}: {picked.reason}",
        cpu_isa=info.isa(),
        cpu_flags=sorted(info.flags),
        agreement=agree,
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        sec = stats.stats.median
        benchmark.extra_info["clips_per_s"] = round(batch / sec, 3)
        benchmark.extra_info["audio_hours_per_s"] = round(batch * 10 / 3600 / sec, 5)
    assert out.shape == (batch, 512)
    fp32 = agree.get("eager")
    int8 = ("int8", "int8_compile")
    if fp32 is not None and (provider in int8 or picked is not None and picked.engine in int8):
        assert fp32["min_cosine"] >= engines.INT8_MIN_COSINE, fp32
    elif fp32 is not None and provider in ("bf16", "openvino_bf16", "auto"):
        assert fp32["min_cosine"] >= engines.AUTO_MIN_COSINE, fp32
    elif fp32 is not None and provider in ("onnx", "openvino", "compile"):
        assert fp32["max_abs_diff"] <= EXACT_ATOL, fp32
