"""Audio embedding throughput of the deployment targets vs PyTorch (pytest-benchmark).

    pytest bench/bench_export.py --benchmark-json out.json          # measure
    pytest bench/bench_export.py --benchmark-disable                # smoke test (one call each)
    CLAP_FAST_BENCH_MODEL=HTSAT-mini pytest bench/bench_export.py   # small model, fast compiles
    CLAP_FAST_BENCH_BACKENDS=eager,onnxruntime pytest bench/bench_export.py

CPU (batch 1 and 8): PyTorch eager (the model's own path), ``torch.compile`` of it (static
shapes), the AOTInductor package (``export.aoti``, static batch) and onnxruntime CPU on the
ONNX graph (``export.onnx``). Goal: onnxruntime >= 1.5x eager.
GPU (batch 1 and 64, skipped without CUDA): eager, compiled, AOTInductor and, where TensorRT is
installed, a TensorRT fp16 engine (``export.trt``). Goals: >= 3x eager at batch 1, >= 1.2x
compiled at batch 64.

Every timed call is also checked once against eager (cosine >= 0.999) so that a fast wrong
backend cannot report a number. Model: HTSAT-tiny with random weights (timing does not depend on
the weights); inputs are prepared 10 s waveforms (tones + noise). Compile and export happen in
module-scoped fixtures, outside the timed region. Results carry model, batch, device, threads
and versions in ``extra_info``.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxruntime")

from clap_fast import ops  # noqa: E402
from export.encoders import ModelSpec, load_model, parity, sample_waveforms  # noqa: E402

MODEL = os.environ.get("CLAP_FAST_BENCH_MODEL", "HTSAT-tiny")
CPU_BACKENDS = ("eager", "compiled", "aoti", "onnxruntime")
GPU_BACKENDS = ("eager", "compiled", "aoti", "tensorrt_fp16")
SELECTED = set(filter(None, os.environ.get("CLAP_FAST_BENCH_BACKENDS", "").split(",")))
HAS_CUDA = torch.cuda.is_available()
TINY_TEXT = {"width": 64, "layers": 1, "heads": 2}  # the text tower is not benchmarked here


def _want(backend: str) -> None:
    if SELECTED and backend not in SELECTED:
        pytest.skip(f"{backend} not in CLAP_FAST_BENCH_BACKENDS")


@functools.cache
def _model() -> torch.nn.Module:
    return load_model(ModelSpec(MODEL, text="transformer", text_overrides=TINY_TEXT))


def _eager(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return F.normalize(model.encode_audio(x), dim=-1)

    return run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench_export")


@functools.cache
def _onnx_path(workdir: Path) -> Path:
    from export.onnx import export_tower

    return export_tower(_model(), "audio", workdir, verify_batches=(1,)).path


def _backend(
    name: str, batch: int, device: str, workdir: Path
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable (B, 480000) -> (B, 512) for one backend; compiles / exports outside timing."""
    model = _model().to(device)
    if name == "eager":
        return _eager(model)
    if name == "compiled":
        compiled = torch.compile(model.encode_audio, dynamic=False)

        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return F.normalize(compiled(x), dim=-1)

        return run
    if name == "aoti":
        from export.aoti import export_tower_aoti, load_package

        res = export_tower_aoti(_model(), "audio", workdir / device, device=device, batch=batch)
        pkg = load_package(res.path)
        _model().to(device)
        return lambda x: pkg(x)
    if name == "onnxruntime":
        from export.runners import OnnxRunner

        runner = OnnxRunner(_onnx_path(workdir), "cpu")
        return runner.embed_audio
    if name == "tensorrt_fp16":
        from export.trt import (
            BatchProfile,
            BuildConfig,
            TRTEncoder,
            build_engine,
            trt_unavailable_reason,
        )

        reason = trt_unavailable_reason()
        if reason:
            pytest.skip(reason)
        engine = workdir / f"audio_fp16_b{batch}.engine"
        build_engine(
            BuildConfig(_onnx_path(workdir), engine, BatchProfile(1, batch, batch), "fp16")
        )
        return TRTEncoder(engine).embed_audio
    raise ValueError(name)


def _run_bench(benchmark, backend: str, batch: int, device: str, workdir: Path) -> None:
    _want(backend)
    fn = _backend(backend, batch, device, workdir)
    x = sample_waveforms(batch, seed=batch).to(device)
    ref = _eager(_model().to(device))(x)
    out = fn(x)  # warm-up, and the correctness gate
    p = parity(ref.float().cpu(), out.float().cpu())
    assert out.shape == (batch, 512) and p["cos_min"] >= 0.999, p

    def call() -> torch.Tensor:
        y = fn(x)
        if device == "cuda":
            torch.cuda.synchronize()  # host sync: time the work, not the launch
        return y

    benchmark.group = f"audio {device} batch {batch}"
    benchmark.extra_info.update(
        model=MODEL, backend=backend, batch=batch, device=device, cos_vs_eager=p["cos_min"],
        threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.machine(),
        gpu=torch.cuda.get_device_name() if device == "cuda" else None,
    )  # fmt: skip
    with ops.use_backend("auto"):
        benchmark(call)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_audio_cpu(benchmark, backend: str, batch: int, workdir: Path) -> None:
    _run_bench(benchmark, backend, batch, "cpu", workdir)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_audio_gpu(benchmark, backend: str, batch: int, workdir: Path) -> None:
    _run_bench(benchmark, backend, batch, "cuda", workdir)
