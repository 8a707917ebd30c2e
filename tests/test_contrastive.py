"""Contrastive loss: blockwise reference, Triton kernel (interpreter on the CPU) and ClipLoss.

The oracle is the naive full-logits loss in fp64 (``contrastive_loss_naive``). Features are
L2-normalised, as in training, with LAION's initial scale 1/0.07 and its maximum 100.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch

from clap_fast import loss as clap_loss
from clap_fast import ops
from kernels import contrastive_ref as ref

HAS_GPU = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_GPU else "cpu"
TOL = 1e-5  # fp32 vs fp64, relative to the size of each compared tensor


def _features(n: int, d: int, seed: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return x.to(device=device, dtype=dtype)


def _scale(value: float, shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.float32, device=device)


def _rel_err(x: torch.Tensor, ref_: torch.Tensor) -> float:
    ref_ = ref_.detach().double().cpu()
    err = (x.detach().double().cpu() - ref_).abs().max()
    return float(err / ref_.abs().max().clamp_min(1e-30))


def _oracle(a, b, scale, offset=0, symmetric=False):
    """fp64 naive loss and its gradients in (A, B, scale)."""
    a64, b64, s64 = (t.detach().cpu().double().requires_grad_() for t in (a, b, scale))
    if symmetric:
        loss = ref.contrastive_loss_symmetric_naive(a64, b64, s64)
    else:
        loss = ref.contrastive_loss_naive(a64, b64, s64, offset)
    return (loss.detach(), *torch.autograd.grad(loss, (a64, b64, s64)))


def _check(fn, a, b, scale, offset=0, symmetric=False, tol=TOL, grad_tol=TOL):
    """Run ``fn`` forward + backward and compare the loss and every gradient with the oracle."""
    want = _oracle(a, b, scale, offset, symmetric)
    a_, b_, s_ = (t.detach().clone().requires_grad_() for t in (a, b, scale))
    loss = fn(a_, b_, s_) if symmetric else fn(a_, b_, s_, offset)
    grads = torch.autograd.grad(loss, (a_, b_, s_))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert _rel_err(loss, want[0]) <= tol, (loss.item(), want[0].item())
    for name, got, exp, inp in zip(("dA", "dB", "dscale"), grads, want[1:], (a, b, scale)):
        assert got.shape == inp.shape and got.dtype == inp.dtype, name
        assert _rel_err(got, exp) <= grad_tol, (name, _rel_err(got, exp))


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("n", [1, 7, 64, 130])
@pytest.mark.parametrize("d", [32, 512, 768])
@pytest.mark.parametrize("scale_shape,scale", [((), 1 / 0.07), ((1,), 100.0)])
def test_reference_matches_fp64(n, d, scale_shape, scale):
    s = _scale(scale, scale_shape)
    a = _features(n, d, 1, torch.float32)
    _check(ref.contrastive_loss, a, _features(n, d, 2, torch.float32), s)  # square, offset 0
    N, offset = 3 * n + 1, n + 1  # this rank's rows sit inside a larger gathered batch
    _check(ref.contrastive_loss, a, _features(N, d, 3, torch.float32), s, offset)


@pytest.mark.parametrize("n", [1, 7, 130])
def test_reference_symmetric_matches_fp64(n):
    a, b = _features(n, 96, 4, torch.float32), _features(n, 96, 5, torch.float32)
    _check(ref.contrastive_loss_symmetric, a, b, _scale(1 / 0.07, (1,)), symmetric=True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_reference_many_blocks(monkeypatch, symmetric):
    """Blocks of a few rows: the block loop, its offsets and the column LSE merge."""
    monkeypatch.setattr(ref, "_BLOCK_ELEMS", 3 * 130)  # 3 rows per block for N = 130
    assert ref.block_rows(130) == 3
    n = 130 if symmetric else 50
    a, b = _features(n, 40, 6, torch.float32), _features(130, 40, 7, torch.float32)
    if symmetric:
        _check(ref.contrastive_loss_symmetric, a, b, _scale(20.0, ()), symmetric=True)
    else:
        _check(ref.contrastive_loss, a, b, _scale(20.0, ()), offset=80)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_inputs(dtype):
    """Half inputs are computed in fp32: the loss is fp32-exact for the rounded inputs."""
    a, b = _features(33, 72, 8, dtype), _features(70, 72, 9, dtype)
    _check(ref.contrastive_loss, a, b, _scale(1 / 0.07, (1,)), 20, grad_tol=1e-2)


def test_reference_without_grad_matches():
    a, b, s = (
        _features(9, 32, 10, torch.float32),
        _features(20, 32, 11, torch.float32),
        _scale(5, ()),
    )
    with torch.no_grad():
        got = ref.contrastive_loss(a, b, s, 4)
    assert _rel_err(got, ref.contrastive_loss_naive(a.double(), b.double(), s.double(), 4)) < TOL


def test_reference_rejects_bad_offset_and_scale():
    a, b = torch.zeros(4, 8), torch.zeros(6, 8)
    with pytest.raises(ValueError, match="offset"):
        ref.contrastive_loss(a, b, torch.ones(()), 3)
    with pytest.raises(ValueError, match="logit_scale"):
        ref.contrastive_loss(a, b, torch.ones(2))


def test_naive_oracle_is_cross_entropy():
    """The oracle itself against an explicit formula (guards the fixture the rest relies on)."""
    a, b, s = _features(5, 16, 12), _features(9, 16, 13), torch.tensor(3.0, dtype=torch.float64)
    logits = s * a @ b.T
    want = (torch.logsumexp(logits, 1) - logits[torch.arange(5), torch.arange(2, 7)]).mean()
    assert torch.allclose(ref.contrastive_loss_naive(a, b, s, 2), want, rtol=1e-12)


# ----------------------------------------------------------------------------- Triton kernel


@pytest.fixture(scope="module")
def kernel():
    pytest.importorskip("triton")
    if not HAS_GPU and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from kernels import contrastive

    return contrastive


# (n, N, offset, d): tiny, odd, and large enough for several row groups / column splits /
# backward splits under the interpreter (blocks of 64, GRANULE 64, two "SMs").
KERNEL_CASES = [(1, 1, 0, 32), (1, 5, 3, 24), (7, 21, 7, 24), (40, 70, 30, 100), (130, 200, 70, 48)]


@pytest.mark.parametrize("n,N,offset,d", KERNEL_CASES)
@pytest.mark.parametrize("scale_shape,scale", [((), 1.0), ((1,), 100.0)])
def test_kernel_matches_fp64(kernel, n, N, offset, d, scale_shape, scale):
    a = _features(n, d, 20, torch.float32, KERNEL_DEVICE)
    b = _features(N, d, 21, torch.float32, KERNEL_DEVICE)
    _check(kernel.contrastive_loss, a, b, _scale(scale, scale_shape, KERNEL_DEVICE), offset)


@pytest.mark.parametrize("n,d", [(1, 32), (37, 48), (200, 40)])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_kernel_symmetric_matches_fp64(kernel, n, d, scale):
    """n = 200: two row tiles per row group, so the column statistics are read back and merged."""
    a = _features(n, d, 22, torch.float32, KERNEL_DEVICE)
    b = _features(n, d, 23, torch.float32, KERNEL_DEVICE)
    s = _scale(scale, (1,), KERNEL_DEVICE)
    _check(kernel.contrastive_loss_symmetric, a, b, s, symmetric=True)


# (dtype, loss tol, grad tol): fp32 accumulation, so the loss is near-exact for the rounded
# inputs; gradients carry one rounding of G (and of the result) to the input dtype.
HALF = [(torch.float16, 1e-4, 5e-3), (torch.bfloat16, 1e-4, 2e-2)]


@pytest.mark.parametrize("dtype,tol,grad_tol", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_kernel_half_inputs(kernel, dtype, tol, grad_tol, symmetric, scale):
    n, N = (70, 70) if symmetric else (33, 130)
    a = _features(n, 40, 24, dtype, KERNEL_DEVICE)
    b = _features(N, 40, 25, dtype, KERNEL_DEVICE)
    s = _scale(scale, (), KERNEL_DEVICE)
    if symmetric:
        _check(
            kernel.contrastive_loss_symmetric, a, b, s, symmetric=True, tol=tol, grad_tol=grad_tol
        )
    else:
        _check(kernel.contrastive_loss, a, b, s, 90, tol=tol, grad_tol=grad_tol)


def _backward_twice(fn, *inputs):
    out = []
    for _ in range(2):
        xs = [t.detach().clone().requires_grad_() for t in inputs]
        out.append(torch.autograd.grad(fn(*xs), xs))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kernel_backward_is_deterministic(kernel, dtype):
    """No atomics: every gradient element has one owner and a fixed summation order."""
    a = _features(130, 48, 26, dtype, KERNEL_DEVICE)
    b = _features(130, 48, 27, dtype, KERNEL_DEVICE)
    s = _scale(1 / 0.07, (1,), KERNEL_DEVICE)
    first, second = _backward_twice(kernel.contrastive_loss_symmetric, a, b, s)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def _row_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per-row relative error of a gradient (rows of a (n, d) tensor)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return (got - want).norm(dim=1) / want.norm(dim=1).clamp_min(1e-300)


def _check_fp16_rows(kernel, n: int, d: int, device: str, oracle) -> None:
    """fp16 at large n: w g P ~ 1 / (2 n^2) is far below fp16's normal range; the kernel's
    gradient dot takes G itself, so every row of dA and dB keeps ~fp16 precision."""
    a = _features(n, d, 28, torch.float16, device).requires_grad_()
    b = _features(n, d, 29, torch.float16, device).requires_grad_()
    s = _scale(1.0, (1,), device)  # s = 1: the flattest softmax, the smallest entries of G
    da, db = torch.autograd.grad(kernel.contrastive_loss_symmetric(a, b, s), (a, b))
    want_a, want_b = oracle(a, b, s)
    for got, want in ((da, want_a), (db, want_b)):
        assert bool(got.abs().amax(dim=1).gt(0).all()), "a gradient row underflowed to zero"
        assert _row_errors(got, want).max() < 5e-3


def _fp64_grads(a, b, s):
    return _oracle(a, b, s, symmetric=True)[1:3]


def test_kernel_fp16_large_n_no_underflow(kernel):
    _check_fp16_rows(kernel, 1024, 16, KERNEL_DEVICE, _fp64_grads)


def test_report_specs_describe_every_gpu_config(kernel):
    """report_specs: one dict per (kernel, variant, config, dtype), every argument typed."""
    specs = kernel.report_specs()
    keys = {"fn", "config", "dtype", "signature", "constexprs", "options", "flop", "hbm_bytes"}
    keys |= {"tensor_core", "problem"}
    want = 0
    for cls in ("fp32", "half", "half"):  # fp32, bf16, fp16
        for sym in (False, True):  # forward + backward (dA and dB) per config
            want += len(kernel._GPU_FWD_CONFIGS[cls, sym]) + 2 * len(
                kernel._GPU_BWD_CONFIGS[cls, sym]
            )
    assert len(specs) == want
    for spec in specs:
        assert set(spec) == keys
        sig, consts = spec["signature"], spec["constexprs"]
        assert list(sig) == list(spec["fn"].arg_names)
        assert {k for k, v in sig.items() if v == "constexpr"} == set(consts)
        assert spec["tensor_core"] == (spec["dtype"] != "fp32")
        assert spec["flop"] > 0 and spec["hbm_bytes"] > 0
        assert {"num_warps", "num_stages"} == set(spec["options"])


def test_ops_dispatches_to_kernel(kernel):
    a = _features(6, 24, 26, torch.float32, KERNEL_DEVICE)
    b = _features(18, 24, 27, torch.float32, KERNEL_DEVICE)
    s = _scale(10.0, (1,), KERNEL_DEVICE)
    with ops.use_backend("triton"):
        got = ops.contrastive_loss(a, b, s, 12)
        got_sym = ops.contrastive_loss_symmetric(a, b[:6], s)
    with ops.use_backend("reference"):
        want = ops.contrastive_loss(a, b, s, 12)
        want_sym = ops.contrastive_loss_symmetric(a, b[:6], s)
    assert _rel_err(got, want) < TOL and _rel_err(got_sym, want_sym) < TOL


# ----------------------------------------------------------------------------- ClipLoss


def _laion_loss(a, t, s_a, s_t=None, a_mlp=None, t_mlp=None):
    """LAION's single-process ClipLoss.forward, written out with full logits (fp64)."""
    ce = torch.nn.functional.cross_entropy
    labels = torch.arange(a.shape[0])
    if a_mlp is None:
        return (ce(s_a * a @ t.T, labels) + ce(s_a * t @ a.T, labels)) / 2
    return (
        ce(s_a * a @ t_mlp.T, labels)
        + ce(s_a * t_mlp @ a.T, labels)
        + ce(s_t * a_mlp @ t.T, labels)
        + ce(s_t * t @ a_mlp.T, labels)
    ) / 4


@pytest.mark.parametrize("mlp_loss", [False, True])
def test_clip_loss_single_process_matches_laion(mlp_loss):
    feats = [_features(12, 32, 30 + i, torch.float32) for i in range(4)]
    scales = [_scale(1 / 0.07, (1,)), _scale(math.exp(2.0), ())]
    inputs = [t.clone().requires_grad_() for t in feats + scales]
    a, t, a_mlp, t_mlp, s_a, s_t = inputs
    if mlp_loss:
        got = clap_loss.ClipLoss(mlp_loss=True)(a, t, s_a, s_t, a_mlp, t_mlp)
        used = inputs
    else:
        got = clap_loss.ClipLoss()(a, t, s_a)
        used = [a, t, s_a]
    got_grads = torch.autograd.grad(got, used)
    x64 = [u.detach().double().requires_grad_() for u in used]
    if mlp_loss:
        want = _laion_loss(x64[0], x64[1], x64[4], x64[5], x64[2], x64[3])
    else:
        want = _laion_loss(x64[0], x64[1], x64[2])
    want_grads = torch.autograd.grad(want, x64)
    assert _rel_err(got, want) < TOL
    for g, w in zip(got_grads, want_grads):
        assert _rel_err(g, w) < TOL


def test_clamp_logit_scale():
    model = torch.nn.Module()
    model.logit_scale_a = torch.nn.Parameter(torch.tensor([7.0]))
    model.logit_scale_t = torch.nn.Parameter(torch.tensor(-1.0))
    model.other = torch.nn.Parameter(torch.tensor(7.0))
    assert clap_loss.clamp_logit_scale_(model) == 2
    assert model.logit_scale_a.item() == pytest.approx(math.log(100))
    assert model.logit_scale_t.item() == 0.0 and model.other.item() == 7.0


# ----------------------------------------------------------------------------- 2 processes

WORLD, N_LOCAL, DIM = 2, 5, 24
# (gather_with_grad, local_loss, mlp_loss); LAION's no-grad local loss drops the cross-rank
# gradient terms by design, so only its loss value is compared.
CONFIGS = [(True, True, False), (True, False, False), (False, False, False), (False, True, False)]
CONFIGS += [(True, True, True), (False, False, True)]


def _global_data():
    feats = [_features(WORLD * N_LOCAL, DIM, 40 + i, torch.float32) for i in range(4)]
    return feats, [_scale(1 / 0.07, (1,)), _scale(12.0, (1,))]


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        feats, scales = _global_data()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        results = {}
        for cfg in CONFIGS:
            gwg, local, mlp = cfg
            inputs = [f[rows].clone().requires_grad_() for f in feats]
            inputs += [s.clone().requires_grad_() for s in scales]
            fn = clap_loss.ClipLoss(local, gwg, mlp, rank=rank, world_size=WORLD)
            a, t, a_mlp, t_mlp, s_a, s_t = inputs
            loss = fn(a, t, s_a, s_t, a_mlp, t_mlp) if mlp else fn(a, t, s_a)
            loss.backward()
            grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in inputs]
            results[cfg] = (loss.detach(), [g.detach() for g in grads])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_loss_equals_global(tmp_path):
    """gloo, 2 ranks: distributed ClipLoss vs the single-process loss on the whole batch.

    Gradient bookkeeping (LAION / open_clip semantics, before DDP averages parameter grads):
    with ``gather_with_grad`` every rank's loss reaches every rank's features, so a rank's
    feature gradient is that of the *sum* over ranks, i.e. WORLD x the global gradient; without
    it (global loss), each rank's own slot carries exactly the global gradient. The scale's
    gradient is local to each rank and DDP averages it: mean over ranks == global.
    """
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    feats, scales = _global_data()
    for cfg in CONFIGS:
        gwg, local, mlp = cfg
        inputs = [x.clone().requires_grad_() for x in feats + scales]
        a, t, a_mlp, t_mlp, s_a, s_t = inputs
        fn = clap_loss.ClipLoss(mlp_loss=mlp)
        want = fn(a, t, s_a, s_t, a_mlp, t_mlp) if mlp else fn(a, t, s_a)
        want_grads = torch.autograd.grad(want, inputs, allow_unused=True)
        losses = torch.stack([per_rank[r][cfg][0] for r in range(WORLD)])
        if local:  # each rank holds its rows' share: the global loss is the mean
            assert _rel_err(losses.mean(), want) < TOL, cfg
        else:  # every rank computes the whole loss
            assert all(_rel_err(x, want) < TOL for x in losses), cfg
        if not gwg and local:
            continue
        factor = WORLD if gwg else 1
        n_feat = 4 if mlp else 2
        n_scale = 2 if mlp else 1
        for i in range(n_feat):
            got = torch.cat([per_rank[r][cfg][1][i] for r in range(WORLD)])
            assert _rel_err(got, factor * want_grads[i]) < TOL, (cfg, i)
        for i in range(4, 4 + n_scale):
            got = torch.stack([per_rank[r][cfg][1][i] for r in range(WORLD)]).mean(0)
            assert _rel_err(got, want_grads[i]) < TOL, (cfg, i)


# ----------------------------------------------------------------------------- sm_90 offline

_AOT_SCRIPT = """
import re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernels import contrastive as K

pattern = sys.argv[1]
bin_dir = Path(triton.__file__).parent / "backends/nvidia/bin"
specs = [s for s in K.report_specs()
         if re.fullmatch(pattern, f"{s['fn'].__name__} {s['dtype']} {s['config']}")]
assert specs, pattern
for spec in specs:
    fn = spec["fn"]
    consts = {(fn.arg_names.index(k),): v for k, v in spec["constexprs"].items()}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=consts)
    cubin = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"]).asm["cubin"]
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(bin_dir / "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
        res = subprocess.run([str(bin_dir / "cuobjdump"), "-res-usage", f.name],
                             capture_output=True, text=True, check=True).stdout
    tag = f"{fn.__name__} {spec['dtype']} {spec['config']}"
    assert "STACK:0" in res and not re.search(r"\\b(LDL|STL)\\b", sass), (tag, "spills", res)
    assert not re.search(r"\\b(ATOM|RED)\\b", sass), (tag, "atomics")
    if spec["tensor_core"]:
        assert re.search(r"\\b(HGMMA|HMMA)\\b", sass), (tag, "no tensor-core instructions")
"""


@pytest.mark.parametrize(
    "pattern",
    [
        "_fwd_kernel bf16 BM128 BN128 BK64 w8 s3",
        "_bwd_kernel bf16 BM64 BN64 BK64 BD512 w8 s1 SYMMETRIC( TRANS)?",
        pytest.param(".*", marks=pytest.mark.slow),  # all 44 specs: several minutes
    ],
    ids=["fwd-bf16-128x128", "bwd-bf16-64x64-d512", "all"],
)
def test_specs_compile_for_sm90_without_spills(pattern):
    """ptxas for an H100 without a GPU: no spills, no atomics, tensor cores where promised."""
    from tests.helpers import run_sm90_aot

    run_sm90_aot(_AOT_SCRIPT, (pattern,))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("n,N", [(4096, 4096), (1024, 8192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_kernel_realistic(kernel, n, N, dtype):
    tol, grad_tol = (TOL, TOL) if dtype == torch.float32 else (1e-4, 2e-2)
    a = _features(n, 512, 50, dtype, "cuda")
    b = _features(N, 512, 51, dtype, "cuda")
    kw = dict(tol=tol, grad_tol=grad_tol)
    _check(kernel.contrastive_loss, a, b, _scale(1 / 0.07, (1,), "cuda"), N - n, **kw)
    if n == N:
        s = _scale(100.0, (1,), "cuda")
        _check(kernel.contrastive_loss_symmetric, a, b, s, symmetric=True, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_backward_is_deterministic(kernel, dtype):
    a = _features(4096, 512, 52, dtype, "cuda")
    b = _features(4096, 512, 53, dtype, "cuda")
    s = _scale(1 / 0.07, (1,), "cuda")
    first, second = _backward_twice(kernel.contrastive_loss_symmetric, a, b, s)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def _fp32_blockwise_grads(a, b, s):
    """Oracle at sizes fp64 cannot hold: the blockwise reference (fp32) on the rounded inputs."""
    a32, b32 = (t.detach().float().requires_grad_() for t in (a, b))
    return torch.autograd.grad(ref.contrastive_loss_symmetric(a32, b32, s), (a32, b32))


@pytest.mark.gpu
def test_gpu_fp16_large_n_no_underflow(kernel):
    _check_fp16_rows(kernel, 65536, 512, "cuda", _fp32_blockwise_grads)


@pytest.mark.gpu
def test_gpu_kernel_compiles(kernel):
    a = _features(512, 512, 54, torch.float32, "cuda").requires_grad_()
    b = _features(2048, 512, 55, torch.float32, "cuda").requires_grad_()
    s = _scale(1 / 0.07, (1,), "cuda").requires_grad_()

    @torch.compile(fullgraph=True)
    def step(a, b, s):
        return kernel.contrastive_loss(a, b, s, 512) + kernel.contrastive_loss(b[:512], a, s)

    got = step(a, b, s)
    got.backward()
    want = _oracle(a, b, s, 512)[0] + _oracle(b[:512], a, s)[0]
    assert _rel_err(got, want) < TOL and a.grad is not None and s.grad is not None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_clip_loss_compiles_fullgraph(kernel, dtype):
    """torch.compile(fullgraph=True) over ClipLoss: the op stays opaque, results match eager."""
    loss_fn = clap_loss.ClipLoss()
    inputs = [_features(1024, 512, 56 + i, dtype, "cuda") for i in range(2)]
    inputs.append(_scale(1 / 0.07, (1,), "cuda"))
    eager = _backward_twice(lambda a, t, s: loss_fn(a, t, s), *inputs)[0]
    compiled_fn = torch.compile(loss_fn, fullgraph=True)
    compiled = _backward_twice(lambda a, t, s: compiled_fn(a, t, s), *inputs)[0]
    for x, y in zip(compiled, eager):
        assert torch.equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_opcheck(kernel, dtype):
    a = _features(100, 96, 58, dtype, "cuda").requires_grad_()
    b = _features(300, 96, 59, dtype, "cuda").requires_grad_()
    s = _scale(1 / 0.07, (1,), "cuda").requires_grad_()
    torch.library.opcheck(torch.ops.clap_fast.contrastive_fwd.default, (a, b, s, 200, False))
    torch.library.opcheck(torch.ops.clap_fast.contrastive_fwd.default, (a, b[:100], s, 0, True))
