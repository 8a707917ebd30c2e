"""Contrastive loss benchmark: forward + backward of the symmetric single-process CLAP loss.

Providers (the same run, the same inputs: L2-normalised (N, d) audio and text features, d=512,
fp32 or bf16):
  * ``triton``          ``kernels.contrastive.contrastive_loss_symmetric`` (CUDA only)
  * ``reference``       ``kernels.contrastive_ref.contrastive_loss_symmetric`` (blockwise)
  * ``naive_eager``     open_clip's ``ClipLoss`` (full logits, both matmuls) if importable,
                        else the LAION-style full-logits loss
  * ``naive_compiled``  the LAION-style full-logits loss under ``torch.compile``

Sizes: GPU N in {1024, 4096, 16384, 65536, 262144}; CPU N in {768, 4096, 16384} (compiled
naive only up to 4096: compiling on 2 cores takes most of a minute per shape; bf16 on the CPU
only up to 4096: the reference computes in fp32 anyway). Full-logits providers that would not
fit in memory are skipped with the reason.

FLOP model (``extra_info["model_gflop"]``): 6 N^2 d, the three N x N x d matmuls any exact
symmetric loss needs (logits, dA, dB); ``tflops`` = model FLOP / median time, so providers are
compared on the same work. The Triton kernel itself does 10 N^2 d (one forward sweep, two
recomputes in the backward).

Peak memory (``extra_info``), measured on one extra forward + backward outside the timed loop:
  * CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the call
    (``peak_extra_mib``);
  * CPU: the process's peak resident set (``VmHWM`` in /proc/self/status) minus its resident
    set before the call, after resetting the peak by writing "5" to /proc/self/clear_refs
    (Linux >= 4.0). Large tensors are mmap-backed in glibc, so freed blocks leave the RSS and
    the peak reflects the call's own allocations (tracemalloc cannot see torch's).

Run: ``pytest bench/bench_contrastive.py --benchmark-json out.json`` (``--benchmark-disable``
for a one-shot smoke run).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

from bench.sizes import TINY, largest_last
from kernels import contrastive_ref

D = 512
HAS_GPU = torch.cuda.is_available()
SIZES = [1024, 4096, 16384, 65536, 262144] if HAS_GPU else [768, 4096, 16384]
if TINY:  # gpu_run.sh --dry-run
    SIZES = [64, 256]
PROVIDERS = ["triton", "reference", "naive_eager", "naive_compiled"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MIB = 1 << 20


def _laion_naive(a: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """LAION's single-process ClipLoss: two full (N, N) logit matrices."""
    return contrastive_ref.contrastive_loss_symmetric_naive(a, t, s)


def _open_clip_or_laion():
    try:
        from open_clip.loss import ClipLoss
    except ImportError:
        return _laion_naive, "laion-style"
    loss = ClipLoss()
    return (lambda a, t, s: loss(a, t, s.reshape(()))), "open_clip.ClipLoss"


def _loss_fn(provider: str):
    if provider == "triton":
        from kernels import contrastive

        return contrastive.contrastive_loss_symmetric, "kernels.contrastive"
    if provider == "reference":
        return contrastive_ref.contrastive_loss_symmetric, "kernels.contrastive_ref"
    if provider == "naive_eager":
        return _open_clip_or_laion()
    return torch.compile(_laion_naive), "torch.compile(laion-style)"


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _peak_extra_mib(step, device: torch.device) -> float | None:
    """Peak memory of one ``step()`` above what was allocated before it, in MiB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / MIB
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    step()
    return (_rss_kib("VmHWM") - base) / 1024


@pytest.mark.parametrize("N", largest_last(SIZES))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_contrastive_fwd_bwd(benchmark, provider, dtype, N):
    device = torch.device("cuda" if HAS_GPU else "cpu")
    if benchmark.disabled and N > SIZES[0]:
        pytest.skip("smoke run (--benchmark-disable): smallest size only")
    if provider == "triton" and not HAS_GPU:
        pytest.skip("triton provider needs a CUDA GPU")
    if not HAS_GPU and N > 4096 and (provider == "naive_compiled" or dtype == "bf16"):
        pytest.skip("CPU: compiled naive and bf16 only up to N=4096 (compile time, fp32 math)")
    if provider.startswith("naive") and HAS_GPU:
        need = 3 * N * N * 4  # two fp32 logit matrices + one softmax gradient
        if need > 0.9 * torch.cuda.mem_get_info()[0]:
            pytest.skip(f"full logits need ~{need / 2**30:.0f} GiB")
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DTYPES[dtype]
    a = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(device, dt)
    t = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).to(device, dt)
    a.requires_grad_()
    t.requires_grad_()
    s = torch.full((1,), 1 / 0.07, device=device, requires_grad=True)
    fn, impl = _loss_fn(provider)

    def step():
        a.grad = t.grad = s.grad = None
        loss = fn(a, t, s)
        loss.backward()
        if HAS_GPU:
            torch.cuda.synchronize()  # host sync: time the whole forward + backward
        return loss

    loss = step()  # warm-up (and compile, autotune)
    want = contrastive_ref.contrastive_loss_symmetric(a.detach(), t.detach(), s.detach())
    # the kernel and the reference compute in fp32 on the rounded inputs; bf16 full-logits
    # baselines round the logits themselves
    rtol = 1e-4 if dtype == "fp32" or provider in ("triton", "reference") else 3e-2
    assert torch.allclose(loss.detach().float(), want, rtol=rtol), (float(loss), float(want))
    peak = _peak_extra_mib(step, device)
    benchmark.extra_info.update(
        provider=provider,
        impl=impl,
        N=N,
        d=D,
        dtype=dtype,
        model_gflop=round(6 * N * N * D / 1e9, 3),
        device=torch.cuda.get_device_name() if HAS_GPU else "cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        peak_extra_mib=None if peak is None else round(peak, 1),
        inputs_mib=round(2 * N * D * a.element_size() / MIB, 1),
        memory_method="cuda.max_memory_allocated" if HAS_GPU else "VmHWM-VmRSS after clear_refs",
        git_commit=os.environ.get("GIT_COMMIT", ""),
    )
    benchmark.pedantic(step, rounds=3 if N >= 16384 else 10, iterations=1, warmup_rounds=0)
    median = benchmark.stats.stats.median if benchmark.stats else None
    if median:
        benchmark.extra_info["tflops"] = round(6 * N * N * D / median / 1e12, 4)
