"""kernels/window_attention.py against kernels/window_attention_ref.py.

On a machine without a GPU the kernels run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 first). Cases are chosen to cover every axis the issue names (fp32 / bf16,
shift 0 and w/2, window 4 and 8, head dims 24 and 32, grids 8x8, 16x16 and 64x16, batch 1 and 3)
without the full product, which the interpreter could not run in minutes.
"""

from __future__ import annotations

import pytest
import torch

from kernels import window_attention_ref as ref
from kernels.window_attention import _rel_gather, window_attention

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


@pytest.mark.parametrize("window", [4, 8])
def test_rel_gather_matches_index_add(window):
    """Stage 2 of the bias gradient equals a plain scatter-add over the Swin index."""
    n = window * window
    ds = torch.randn(3, n * n, dtype=torch.float64)
    index = ref.relative_position_index(window).flatten()
    want = torch.zeros((2 * window - 1) ** 2, 3, dtype=torch.float64)
    want.index_add_(0, index, ds.t())
    padded = torch.cat([ds, ds.new_zeros(3, 1)], dim=1)
    got = padded[:, _rel_gather(window, torch.device("cpu"))].sum(-1).t()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_heads=5, window_size=8), "heads"),
        (dict(num_heads=2, window_size=6), "multiple of window|window_size"),
        (dict(num_heads=2, window_size=8, shift_size=8), "shift_size"),
        (dict(num_heads=1, window_size=8), "head dim"),
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
    args = (2, 8, 4, 24**-0.5)
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
import sys, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kernels.window_attention as K

dt, window, head_dim, block_d, prec = sys.argv[1:]
consts = dict(WINDOW=int(window), SHIFT=int(window) // 2, HEAD_DIM=int(head_dim),
              BLOCK_D=int(block_d), WINDOWS_PER_PROGRAM=4, DOT_PRECISION=prec)
fp32_ptrs = ("table_ptr", "lse_ptr", "dbias_part_ptr")
for fn in (K._window_attn_fwd_kernel, K._window_attn_bwd_kernel):
    sig = {n: "constexpr" if n in consts else ("*fp32" if n in fp32_ptrs else "*" + dt)
           if n.endswith("_ptr") else "fp32" if n == "scale" else "i32" for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"], fn
"""


@pytest.mark.parametrize(
    "config", [("bf16", 8, 24, 32, "tf32"), ("fp32", 4, 32, 32, "ieee")], ids=str
)
def test_compiles_for_sm90_without_a_gpu(config):
    """PTX + ptxas for an H100, without a GPU: catches GPU-only compile errors on the CPU."""
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
