"""kernels/window_attention.py against kernels/window_attention_ref.py.

On a machine without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 first). Cases are chosen to cover every axis the issue names (fp32 / bf16,
shift 0 and w/2, window 4 and 8, head dims 24, 32, 48 and 64, grids 8x8, 16x16 and 64x16, batch
1 and 3) without the full product, which the interpreter could not run in minutes. The
interpreter has no bf16 dot, so there the kernel rounds its bf16/fp16 dot operands (P, dS) to
the input dtype and multiplies in fp32: the same numbers a tensor core computes.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import kernels.window_attention as K
from kernels import window_attention_ref as ref
from kernels.window_attention import window_attention

# Kernel-level tests run where the kernels run: the GPU, else the interpreter on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (batch, grid H, grid W, heads, head_dim, window, shift)
CASES = [
    (1, 8, 8, 2, 24, 8, 0),
    (1, 8, 8, 2, 32, 8, 4),  # grid == window with a shift: two regions per axis
    (3, 16, 16, 2, 24, 8, 4),
    (3, 16, 16, 3, 32, 4, 2),
    (1, 64, 16, 2, 24, 8, 4),
    (3, 64, 16, 2, 32, 4, 0),
    (1, 16, 16, 2, 24, 4, 2),
    (3, 64, 16, 2, 24, 8, 4),
    (1, 64, 16, 2, 32, 4, 2),
    (1, 16, 16, 1, 64, 8, 4),  # head dim 64 (HTS-AT base/large widths)
    (1, 8, 16, 2, 48, 8, 4),  # head dim 48, padded to 64
]


def _case_id(case: tuple[int, ...]) -> str:
    b, h, w, heads, d, win, shift = case
    return f"b{b}-{h}x{w}-h{heads}-d{d}-w{win}-s{shift}"


def _inputs(case, dtype: torch.dtype, device: str = "cpu"):
    b, h, w, heads, d, win, shift = case
    qkv = torch.randn(b, h, w, 3 * heads * d, device=device).to(dtype)
    # A table well away from zero so a wrong gather or mask changes the result visibly.
    table = torch.randn((2 * win - 1) ** 2, heads, device=device)
    grad = torch.randn(b, h, w, heads * d, device=device).to(dtype)
    return qkv, table, grad


def _run(fn, qkv, table, grad, case, **kw):
    """Forward + backward: (out, d qkv, d table), all leaves fresh."""
    b, h, w, heads, d, win, shift = case
    qkv = qkv.detach().clone().requires_grad_()
    table = table.detach().clone().requires_grad_()
    out = fn(qkv, table, num_heads=heads, window_size=win, shift_size=shift, **kw)
    dqkv, dtable = torch.autograd.grad(out, (qkv, table), grad)
    return out.detach(), dqkv, dtable


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_fp32_matches_reference(case):
    qkv, table, grad = _inputs(case, torch.float32)
    got = _run(window_attention, qkv, table, grad, case)
    want = _run(ref.window_attention, qkv, table, grad, case)
    for name, g, w in zip(("out", "dqkv", "dtable"), got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        # d table sums dS over every window and batch: scale the tolerance with its magnitude.
        tol = 2e-5 * max(1.0, w.abs().max().item())
        assert _max_err(g, w) <= tol, f"{name}: {_max_err(g, w):.3g} > {tol:.3g}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bf16_within_torch_error(case):
    """bf16 kernel vs the fp32 reference, within 3x PyTorch's own bf16 error (plus a floor)."""
    qkv, table, grad = _inputs(case, torch.bfloat16)
    got = _run(window_attention, qkv, table, grad, case)
    torch_bf16 = _run(ref.window_attention, qkv, table, grad, case)
    exact = _run(ref.window_attention, qkv.float(), table, grad.float(), case)
    for name, g, t, e in zip(("out", "dqkv", "dtable"), got, torch_bf16, exact):
        assert g.dtype == t.dtype, name
        floor = 4e-3 * e.abs().max().item()  # about one bf16 ulp of the largest value
        err, torch_err = _max_err(g, e), _max_err(t, e)
        assert err <= 3 * torch_err + floor, f"{name}: {err:.3g} vs torch bf16 {torch_err:.3g}"


def test_fp16_forward_and_backward():
    case = (1, 16, 16, 2, 24, 8, 4)
    qkv, table, grad = _inputs(case, torch.float16)
    got = _run(window_attention, qkv, table, grad, case)
    torch_fp16 = _run(ref.window_attention, qkv, table, grad, case)
    exact = _run(ref.window_attention, qkv.float(), table, grad.float(), case)
    for name, g, t, e in zip(("out", "dqkv", "dtable"), got, torch_fp16, exact):
        assert g.dtype == t.dtype, name
        err, torch_err = _max_err(g, e), _max_err(t, e)
        assert err <= 3 * torch_err + 1e-3 * e.abs().max().item(), name


def test_backward_is_deterministic():
    case = (3, 16, 16, 2, 24, 8, 4)
    qkv, table, grad = _inputs(case, torch.float32)
    first = _run(window_attention, qkv, table, grad, case)
    second = _run(window_attention, qkv, table, grad, case)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_custom_scale_and_strided_input():
    """A non-default scale, a strided qkv view (unit channel stride) and a strided table."""
    case = (1, 16, 8, 2, 24, 4, 2)
    b, h, w, heads, d, win, shift = case
    big = torch.randn(b, h, w, 3 * heads * d + 8)
    qkv = big[..., 4 : 4 + 3 * heads * d]  # not contiguous
    table = torch.randn(heads, (2 * win - 1) ** 2).t()  # column-major table
    grad = torch.randn(b, h, w, heads * d)
    got = _run(window_attention, qkv, table, grad, case, scale=0.3)
    want = _run(ref.window_attention, qkv, table, grad, case, scale=0.3)
    for g, w_ in zip(got, want):
        assert _max_err(g, w_) <= 2e-5 * max(1.0, w_.abs().max().item())


def test_shift_mask_matters():
    """The kernel's mask must be LAION's: dropping the shift changes the output."""
    case = (1, 16, 16, 1, 32, 8, 4)
    qkv, table, _ = _inputs(case, torch.float32)
    shifted = window_attention(qkv, table, num_heads=1, window_size=8, shift_size=4)
    unmasked = torch.roll(
        ref.window_attention(
            torch.roll(qkv, (-4, -4), (1, 2)), table, num_heads=1, window_size=8, shift_size=0
        ),
        (4, 4),
        (1, 2),
    )
    assert _max_err(shifted, unmasked) > 1e-2


def test_mask_is_minus_100_not_minus_inf():
    """With scores spread over hundreds, -100 only partly masks: LAION's value must be used."""
    case = (1, 16, 16, 2, 32, 8, 4)
    qkv, table, grad = _inputs(case, torch.float32)
    got = _run(window_attention, qkv, table, grad, case, scale=30.0)
    want = _run(ref.window_attention, qkv, table, grad, case, scale=30.0)
    for g, w in zip(got, want):
        assert _max_err(g, w) <= 1e-4 * max(1.0, w.abs().max().item())


@triton.jit
def _fold_kernel(ds_ptr, out_ptr, WINDOW: tl.constexpr, PREC: tl.constexpr):
    n: tl.constexpr = WINDOW * WINDOW
    t = tl.arange(0, n)
    f = tl.arange(0, 16)
    ds = tl.load(ds_ptr + t[:, None] * n + t[None, :])
    tl.store(out_ptr + f[:, None] * 16 + f[None, :], K._fold(ds, WINDOW, PREC))


@pytest.mark.parametrize("window", [4, 8])
def test_fold_matches_index_add(window):
    """The in-kernel bias-gradient fold (reshape, permute, two selection dots) equals a plain
    scatter-add of dS over the Swin relative-position index."""
    n, r = window * window, 2 * window - 1
    ds = torch.randn(n, n, device=DEVICE)
    out = torch.full((16, 16), float("nan"), device=DEVICE)
    _fold_kernel[(1,)](ds, out, WINDOW=window, PREC="ieee")
    ds, out = ds.cpu(), out.cpu()
    want = torch.zeros(r * r, dtype=torch.float64)
    want.index_add_(0, ref.relative_position_index(window).flatten(), ds.double().flatten())
    torch.testing.assert_close(out[:r, :r].flatten().double(), want, rtol=0, atol=1e-5)
    assert torch.all(out[r:] == 0) and torch.all(out[:, r:] == 0)


@triton.jit
def _round_kernel(x_ptr, y_ptr, INTERPRET: tl.constexpr):
    i = tl.arange(0, 1024)
    tl.store(y_ptr + i, K._round(tl.load(x_ptr + i), tl.bfloat16, INTERPRET))


def test_interpreter_bf16_rounding_is_round_to_nearest_even():
    """The interpreter's own fp32 -> bf16 cast truncates; the kernel's bit-level rounding must
    match PyTorch's round-to-nearest-even, ties and negatives included."""
    x = torch.randn(1024) * torch.logspace(-3, 3, 1024)
    x[:4] = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 2**-130])  # ties, tiny
    y = torch.empty(1024, device=DEVICE)
    _round_kernel[(1,)](x.to(DEVICE), y, INTERPRET=K._INTERPRET)
    assert torch.equal(y.cpu(), x.bfloat16().float())


def _emulated_forward(qkv, table, case, round_p: bool) -> torch.Tensor:
    """Forward in fp32 from the given (low-precision) qkv, P optionally rounded to qkv's dtype
    before P v; the output rounded once to qkv's dtype."""
    b, h, w, heads, d, win, shift = case
    n = win * win
    x = torch.roll(qkv.float(), (-shift, -shift), (1, 2))
    x = ref._partition(x, win).reshape(-1, n, 3, heads, d).permute(2, 0, 3, 1, 4)
    s = (x[0] @ x[1].transpose(-1, -2)) * d**-0.5 + K._dense_bias(table, win)[None]
    if shift:
        mask = ref.shift_mask(h, w, win, shift)
        s = (s.view(-1, mask.shape[0], heads, n, n) + mask[None, :, None]).view_as(s)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    pv = p.to(qkv.dtype).float() if round_p else p
    o = (pv @ x[2]) / p.sum(-1, keepdim=True)
    o = ref._reverse(o.transpose(1, 2).reshape(-1, win, win, heads * d), win, h, w)
    return torch.roll(o, (shift, shift), (1, 2)).to(qkv.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_forward_is_flash_attention_2_numerics(dtype):
    """bf16/fp16: S in fp32 from the input-dtype q, k; P rounded to the input dtype for P v;
    fp32 sums; one rounding of the output. The kernel must match that emulation far more often
    than an emulation that keeps P in fp32 (which pins the operand path, not just accuracy)."""
    case = (1, 16, 16, 2, 32, 8, 4)
    qkv, table, _ = _inputs(case, dtype)
    got = window_attention(qkv, table, num_heads=2, window_size=8, shift_size=4)
    fa2 = _emulated_forward(qkv, table, case, round_p=True)
    fp32_p = _emulated_forward(qkv, table, case, round_p=False)
    ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    assert torch.all((got.float() - fa2.float()).abs() <= ulp * fa2.float().abs() + 1e-6)
    miss_fa2 = (got != fa2).float().mean().item()  # summation order flips a few roundings
    miss_fp32 = (got != fp32_p).float().mean().item()
    assert miss_fa2 < 0.25 * miss_fp32, f"{miss_fa2:.3f} vs {miss_fp32:.3f}"


@pytest.mark.parametrize("sm_count", [1, 16])
def test_gpu_work_split_under_the_interpreter(monkeypatch, sm_count):
    """The GPU work split (several windows per program with past-the-end windows, or head
    groups), run by the interpreter: same results as one program doing everything."""
    case = (3, 16, 24, 4, 24, 8, 4)  # 18 windows: sm 1 -> 4 programs x 5 windows (2 idle
    # slots); sm 16 -> 2 head groups x 18 programs
    qkv, table, grad = _inputs(case, torch.float32)
    want = _run(ref.window_attention, qkv, table, grad, case)
    split = K._split(18, 4, sm_count)
    assert (split.windows_per_program, split.num_groups) == ((5, 1) if sm_count == 1 else (1, 2))
    monkeypatch.setattr(K, "_sm", lambda qkv: sm_count)
    got = _run(window_attention, qkv, table, grad, case)
    for g, w in zip(got, want):
        assert _max_err(g, w) <= 2e-5 * max(1.0, w.abs().max().item())


def _cache_key(launch: K._Launch) -> str:
    """Triton's own JIT cache key of a launch, as the GPU runtime would compute it (its binder,
    with the kernel's do_not_specialize list and the sm_90 backend), without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, compute_cache_key, create_function_from_signature

    kernel = launch.kernel
    dns = getattr(kernel, "do_not_specialize", None) or kernel.kwargs.get("do_not_specialize")
    jf = JITFunction(kernel.fn, do_not_specialize=dns)
    binder = create_function_from_signature(
        jf.signature, jf.params, make_backend(GPUTarget("cuda", 90, 32))
    )
    _, specialization, options = binder(*launch.args, **launch.kwargs)
    return compute_cache_key({}, specialization, options)


def _launches(batch: int, dtype=torch.bfloat16, head_dim: int = 24, sm_count: int = 4):
    """Forward and backward launches of one small shape (8x8 grid, 2 heads) on a GPU with
    ``sm_count`` SMs (4, so that batches 1, 3, 64 get different splits), not run."""
    heads, win, n = 2, 8, 64
    qkv = torch.zeros(batch, 8, 8, 3 * heads * head_dim, dtype=dtype)
    out = qkv.new_zeros(batch, 8, 8, heads * head_dim)
    lse = torch.zeros(batch, heads, n)
    bias = torch.zeros(heads, n, n)
    dqkv, fold = torch.zeros_like(qkv), torch.zeros(batch, heads, 16, 16)
    fwd = K._fwd_launch(qkv, bias, out, lse, heads, win, 4, 0.2, "ieee", sm_count)
    bwd = K._bwd_launch(out, qkv, bias, out, lse, dqkv, fold, heads, win, 4, 0.2, "ieee", sm_count)
    return fwd, bwd


def test_one_compile_per_dtype_window_head_dim():
    """Batch sizes 1, 3 and 64 (different work splits on an H100) share one Triton compile of
    each kernel; a different dtype or head dim does not (so the check can fail)."""
    by_batch = {b: _launches(b) for b in (1, 3, 64)}
    splits = {by_batch[b][0].args[-4] for b in by_batch}  # windows_per_program
    assert len(splits) > 1, "the batches should need different splits for this test to mean much"
    for i, name in enumerate(("fwd", "bwd")):
        keys = {_cache_key(by_batch[b][i]) for b in by_batch}
        assert len(keys) == 1, f"{name}: {len(keys)} compiles for batch sizes 1, 3, 64"
        other_dtype = _cache_key(_launches(3, dtype=torch.float16)[i])
        other_dim = _cache_key(_launches(3, head_dim=32)[i])
        assert len(keys | {other_dtype, other_dim}) == 3, name


def test_report_specs_are_well_formed():
    """report_specs() names every kernel argument, constexprs match, and the costs are sane."""
    specs = K.report_specs()
    keys = {"fn", "config", "dtype", "signature", "constexprs", "options", "flop", "hbm_bytes"}
    keys |= {"problem", "tensor_core"}
    assert {(s["config"], s["dtype"]) for s in specs} >= {
        (f"{k} win8 hd{d}", dt)
        for k in ("fwd", "bwd")
        for d in (24, 32, 48, 64)
        for dt in ("bf16", "fp16")
    }
    for s in specs:
        assert set(s) == keys
        assert list(s["signature"]) == list(s["fn"].arg_names)
        consts = {n for n, t in s["signature"].items() if t == "constexpr"}
        assert consts == set(s["constexprs"])
        assert s["flop"] > 0 and s["hbm_bytes"] > 0
    fwd = next(s for s in specs if s["config"] == "fwd win8 hd24" and s["dtype"] == "bf16")
    # HTS-AT-tiny stage 1, B = 64: 262,144 tokens x (3C in + C out) x 2 bytes + lse.
    assert fwd["hbm_bytes"] == 262144 * 4 * 96 * 2 + 4096 * 4 * 64 * 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=5, window_size=8), "heads"),
        (dict(num_heads=2, window_size=6), "multiple of window|window_size"),
        (dict(num_heads=2, window_size=8, shift_size=8), "shift_size"),
        (dict(num_heads=1, window_size=8), "head dim"),
        (dict(num_heads=2, window_size=8, precision="bf16x3"), "precision"),
    ],
)
def test_rejects_bad_arguments(kwargs, match):
    qkv = torch.randn(1, 8, 8, 3 * 96)
    table = torch.randn(225, kwargs["num_heads"])
    with pytest.raises(ValueError, match=match):
        window_attention(qkv, table, **kwargs)


def test_ops_dispatch_forced_triton(monkeypatch):
    """clap_fast.ops routes to this kernel when the triton backend is forced (interpreter)."""
    ops = pytest.importorskip("clap_fast.ops")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = (1, 8, 8, 2, 24, 8, 4)
    qkv, table, _ = _inputs(case, torch.float32)
    kw = dict(num_heads=2, window_size=8, shift_size=4)
    with ops.use_backend("triton"):
        got = ops.window_attention(qkv, table, **kw)
    want = ref.window_attention(qkv, table, **kw)
    assert _max_err(got, want) <= 2e-5


def _opcheck(device: str, dtype: torch.dtype) -> None:
    """torch.library.opcheck of the forward and backward ops (schema, fake, autograd, AOT)."""
    from kernels.window_attention import _window_attention_bwd, _window_attention_fwd

    qkv = torch.randn(1, 8, 8, 3 * 48, device=device, dtype=dtype, requires_grad=True)
    table = torch.randn(225, 2, device=device, requires_grad=True)
    args = (2, 8, 4, 24**-0.5, "ieee")
    torch.library.opcheck(_window_attention_fwd, (qkv, table, *args))
    out, lse = _window_attention_fwd(qkv.detach(), table.detach(), *args)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        _window_attention_bwd, (grad, qkv.detach(), table.detach(), out, lse, *args)
    )


def test_opcheck_interpreter():
    _opcheck("cuda" if torch.cuda.is_available() else "cpu", torch.float32)


def test_traced_by_torch_compile():
    """The op traces under torch.compile (aot_eager: no C++ compile) with its fake and autograd."""
    case = (1, 8, 8, 2, 24, 8, 4)
    qkv, table, grad = _inputs(case, torch.float32)

    def f(qkv, table, num_heads, window_size, shift_size):
        return 2.0 * window_attention(
            qkv, table, num_heads=num_heads, window_size=window_size, shift_size=shift_size
        )

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = _run(compiled, qkv, table, grad, case)
    want = _run(f, qkv, table, grad, case)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


_AOT_SCRIPT = """
import re, subprocess, sys, tempfile
from pathlib import Path
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.window_attention as K

config, dtype = sys.argv[1:]
spec = next(s for s in K.report_specs() if s["config"] == config and s["dtype"] == dtype)
fn = spec["fn"]
ptrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
consts = {(fn.arg_names.index(k),): v for k, v in spec["constexprs"].items()}
src = ASTSource(fn=fn, signature=spec["signature"], constexprs=consts, attrs=ptrs)
compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=spec["options"])
tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(compiled.asm["cubin"])
    f.flush()
    res = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
stack, local = map(int, re.search(r"STACK:(\\d+) SHARED:\\d+ LOCAL:(\\d+)", res).groups())
assert stack == 0 and local == 0, f"spills: {res}"
assert not spec["tensor_core"] or re.search(r"HGMMA|HMMA", sass), "no tensor-core instruction"
"""


@pytest.mark.parametrize(
    "config",
    [("fwd win8 hd24", "bf16"), ("bwd win8 hd64", "bf16"), ("bwd win8 hd24 ieee", "fp32")],
    ids=str,
)
def test_compiles_for_sm90_without_a_gpu(config):
    """PTX + ptxas for an H100 (sm_90a), without a GPU: the report's configurations compile,
    do not spill, and the tensor-core ones contain HGMMA/HMMA (the slowest-to-fit ones here;
    ``python -m kernels.report`` checks them all)."""
    from tests.helpers import run_sm90_aot

    run_sm90_aot(_AOT_SCRIPT, config)


# ---------------------------------------------------------------- GPU only

# HTS-AT-tiny stages at batch 8: (grid, C, heads); window 8, head dims 24 / 24 / 24 / 24.
STAGES = [(64, 96, 4), (32, 192, 8), (16, 384, 16), (8, 768, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("stage", STAGES, ids=lambda s: f"{s[0]}x{s[0]}-C{s[1]}")
@pytest.mark.parametrize("shift", [0, 4])
def test_gpu_htsat_tiny_stages(stage, dtype, shift):
    grid, c, heads = stage
    if grid == 8 and shift:
        pytest.skip("HTS-AT's last stage never shifts")
    case = (8, grid, grid, heads, c // heads, 8, shift)
    qkv, table, grad = _inputs(case, dtype, "cuda")
    got = _run(window_attention, qkv, table, grad, case)
    exact = _run(ref.window_attention, qkv.float(), table, grad.float(), case)
    if dtype == torch.float32:
        for name, g, e in zip(("out", "dqkv", "dtable"), got, exact):
            tol = 1e-4 * max(1.0, e.abs().max().item())
            assert _max_err(g, e) <= tol, name
        return
    torch_bf16 = _run(ref.window_attention, qkv, table, grad, case)
    for name, g, t, e in zip(("out", "dqkv", "dtable"), got, torch_bf16, exact):
        err, torch_err = _max_err(g, e), _max_err(t, e)
        assert err <= 3 * torch_err + 1e-2 * e.abs().max().item(), name


@pytest.mark.gpu
def test_gpu_torch_compile():
    case = (2, 32, 32, 8, 24, 8, 4)
    qkv, table, grad = _inputs(case, torch.bfloat16, "cuda")

    def f(qkv, table, num_heads, window_size, shift_size):
        out = window_attention(
            qkv, table, num_heads=num_heads, window_size=window_size, shift_size=shift_size
        )
        return out * 2.0

    compiled = torch.compile(f, fullgraph=True)
    got = _run(compiled, qkv, table, grad, case)
    want = _run(f, qkv, table, grad, case)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_opcheck(dtype):
    _opcheck("cuda", dtype)


@pytest.mark.gpu
def test_gpu_one_compile_across_batch_sizes():
    """On a real GPU: batch sizes 1, 3, 64 add at most one entry to each kernel's JIT cache
    (fp16, head dim 48: a family no other test compiles)."""
    from kernels.window_attention import _window_attn_bwd_kernel, _window_attn_fwd_kernel

    dev = torch.cuda.current_device()
    kernels = (_window_attn_fwd_kernel, _window_attn_bwd_kernel)
    before = [len(k.device_caches[dev][0]) for k in kernels]
    for b in (1, 3, 64):
        case = (b, 16, 16, 2, 48, 8, 4)
        qkv, table, grad = _inputs(case, torch.float16, "cuda")
        _run(window_attention, qkv, table, grad, case)
    after = [len(k.device_caches[dev][0]) for k in kernels]
    assert [a - b for a, b in zip(after, before)] == [1, 1], (before, after)
