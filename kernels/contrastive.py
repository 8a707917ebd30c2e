"""Contrastive (CLIP / CLAP) loss, Triton kernels (forward + backward). Reference:
``kernels/contrastive_ref.py`` (same signatures, same math).

Math, with s the already exponentiated logit scale, A (n, d) this rank's features, B (N, d)
all features of the other modality and t_i = offset + i the target column of row i::

    L[i, j] = s * a_i . b_j
    loss    = mean_i [ lse_i - L[i, t_i] ],        lse_i = logsumexp_j L[i, j]
    G       = w * g * (exp(L - lse[:, None]) - delta)    delta[i, j] = (j == t_i), w = 1 / n
    dA = s * G @ B,   dB = s * G^T @ A,   ds = sum(A * (G @ B))      (g = upstream gradient)

The symmetric variant (n == N, one process) adds the column direction on the same L:
w = 1 / (2 n) and G gains exp(L - lse_col[None, :]) - delta; the loss is the mean of the two
directions.

What one program computes:
  * ``_fwd_kernel``: BLOCK_M rows of A against all of B, streaming BLOCK_N-column tiles of L
    (each tile a K-loop of BLOCK_K-wide dots) with an online log-sum-exp; it stores lse_i and
    the per-row loss and q_i = 1 - P[i, t_i] (n floats each). The loss is formed from the
    running max m, the target logit x_t and the off-target sum r = sum_{j != t} exp(x_j - m)
    (log1p(r / exp(x_t - m)) when x_t is within 1 of the max), so tiny losses keep their
    relative precision; the backward uses G[i, t_i] = -q_i instead of P_t - 1 for the same
    reason. The n x N logits never exist in memory. The
    symmetric variant launches it twice, (A, B) and (B, A), for row and column LSE.
  * ``_bwd_kernel``: one (BLOCK_M, BLOCK_N) tile of L, recomputed once, turned into G, then for
    each BLOCK_D slice of d: G @ B_tile atomically added into an fp32 (n, d) buffer and
    G^T @ A_tile into an fp32 (N, d) buffer. dA, dB and ds follow from those two buffers with
    a few O((n + N) d) torch ops. Cost: 1 tile recompute + 2 grad dots = 3 n N d MACs, the
    same as an unfused backward, with no n x N intermediate.

Precision: loads are fp32, fp16 or bf16; every dot accumulates in fp32, the softmax runs in
fp32, the loss is fp32 and gradients are cast back to the inputs' dtypes. fp32 inputs use IEEE
fp32 dots (``input_precision="ieee"``, no TF32: the loss must match fp64 to 1e-5), so fp32 runs
on the CUDA cores; use bf16 features for tensor-core speed. Under ``TRITON_INTERPRET=1`` all
loads are upcast to fp32 (the interpreter's bf16 arithmetic is wrong).

Limits: any n >= 1, N >= n + offset, any d (masked, need not be a power of two); logit_scale
0-d or (1,); the backward's atomics make gradients bitwise non-deterministic (order of fp32
adds); no double backward. Registered as torch ops ``clap_fast::contrastive_fwd`` /
``clap_fast::contrastive_bwd`` (``custom_op`` without device types, so the same op runs on CUDA
and through the interpreter, and ``torch.compile`` treats it as opaque).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["contrastive_loss", "contrastive_loss_symmetric"]


@triton.jit
def _logits_tile(
    a_ptr,
    b_ptr,
    rows,
    cols,
    n,
    N,
    D,
    stride_a_n,
    stride_a_d,
    stride_b_n,
    stride_b_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) fp32 tile of A[rows] @ B[cols]^T, K-looped over d."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        a = tl.load(
            a_ptr + rows[:, None] * stride_a_n + kk[None, :] * stride_a_d,
            mask=(rows[:, None] < n) & (kk[None, :] < D),
            other=0.0,
        )
        b = tl.load(
            b_ptr + cols[:, None] * stride_b_n + kk[None, :] * stride_b_d,
            mask=(cols[:, None] < N) & (kk[None, :] < D),
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _log1p(x):
    """log(1 + x), accurate for small x (Goldberg's trick: no libdevice needed)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / (u - 1.0)))


@triton.jit
def _fwd_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    loss_ptr,
    lse_ptr,
    q_ptr,
    n,
    N,
    D,
    offset,
    stride_a_n,
    stride_a_d,
    stride_b_n,
    stride_b_d,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    target = offset + rows
    s = tl.load(scale_ptr).to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_{j != t} exp(x_j - m)
    x_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        x = s * _logits_tile(
            a_ptr, b_ptr, rows, cols, n, N, D,
            stride_a_n, stride_a_d, stride_b_n, stride_b_d,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        x = tl.where(cols[None, :] < N, x, float("-inf"))
        is_t = cols[None, :] == target[:, None]
        m_new = tl.maximum(m, tl.max(x, axis=1))
        e = tl.where(is_t, 0.0, tl.exp(x - m_new[:, None]))
        r = r * tl.exp(m - m_new) + tl.sum(e, axis=1)
        m = m_new
        x_t += tl.sum(tl.where(is_t, x, 0.0), axis=1)
    # loss = lse - x_t without cancellation when the target is (near) the max: see the header
    e_t = tl.exp(x_t - m)
    z = e_t + r
    gap = m - x_t
    loss = tl.where(gap > 1.0, gap + tl.log(z), _log1p(r / e_t))
    ok = rows < n
    tl.store(loss_ptr + rows, loss, mask=ok)
    tl.store(lse_ptr + rows, m + tl.log(z), mask=ok)
    tl.store(q_ptr + rows, r / z, mask=ok)


@triton.jit
def _bwd_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    grad_ptr,
    lse_r_ptr,
    q_r_ptr,
    lse_c_ptr,
    q_c_ptr,
    ga_ptr,
    gb_ptr,
    n,
    N,
    D,
    offset,
    weight,
    stride_a_n,
    stride_a_d,
    stride_b_n,
    stride_b_d,
    stride_ga_n,
    stride_gb_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.load(scale_ptr).to(tl.float32)
    g = tl.load(grad_ptr).to(tl.float32) * weight
    x = s * _logits_tile(
        a_ptr, b_ptr, rows, cols, n, N, D,
        stride_a_n, stride_a_d, stride_b_n, stride_b_d,
        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
    )  # fmt: skip
    row_ok = rows < n
    col_ok = cols < N
    is_t = cols[None, :] == (offset + rows)[:, None]
    lse_r = tl.load(lse_r_ptr + rows, mask=row_ok, other=0.0)
    q = tl.load(q_r_ptr + rows, mask=row_ok, other=0.0)  # 1 - P[i, t_i], from the forward
    gt = tl.exp(x - lse_r[:, None])
    if SYMMETRIC:
        lse_c = tl.load(lse_c_ptr + cols, mask=col_ok, other=0.0)
        gt += tl.exp(x - lse_c[None, :])
        q += tl.load(q_c_ptr + rows, mask=row_ok, other=0.0)  # square: column t_i == row i
    gt = tl.where(is_t, -q[:, None], gt)  # P_t - 1 without cancellation
    gt = tl.where(row_ok[:, None] & col_ok[None, :], gt * g, 0.0)
    if not UPCAST:
        gt = gt.to(a_ptr.dtype.element_ty)  # tensor-core dots for fp16 / bf16
    ds_ = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + ds_
        d_ok = dd[None, :] < D
        a = tl.load(
            a_ptr + rows[:, None] * stride_a_n + dd[None, :] * stride_a_d,
            mask=row_ok[:, None] & d_ok,
            other=0.0,
        )
        b = tl.load(
            b_ptr + cols[:, None] * stride_b_n + dd[None, :] * stride_b_d,
            mask=col_ok[:, None] & d_ok,
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        part_a = tl.dot(gt, b, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D) of G @ B
        part_b = tl.dot(tl.trans(gt), a, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D)
        tl.atomic_add(
            ga_ptr + rows[:, None] * stride_ga_n + dd[None, :], part_a, mask=row_ok[:, None] & d_ok
        )
        tl.atomic_add(
            gb_ptr + cols[:, None] * stride_gb_n + dd[None, :], part_b, mask=col_ok[:, None] & d_ok
        )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _settings(a: torch.Tensor, D: int) -> dict:
    """Launch settings from a small heuristic (no autotune: the interpreter allows one config)."""
    interp = _interpreting() or not a.is_cuda
    upcast = interp or a.dtype == torch.float32
    if interp:  # few, large programs: each interpreted program costs milliseconds
        bk = min(256, max(16, triton.next_power_of_2(D)))
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=bk, BLOCK_D=bk, UPCAST=True, PRECISION="ieee")
    precision = "ieee" if a.dtype == torch.float32 else "tf32"
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, BLOCK_D=64, UPCAST=upcast, PRECISION=precision)


def _row_stats(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (n, d), B (N, d) -> per-row loss (n,) and stats (2, n) = [lse, 1 - P_target], fp32."""
    n, D = a.shape
    N = b.shape[0]
    loss = torch.empty(n, device=a.device, dtype=torch.float32)
    stats = torch.empty(2, n, device=a.device, dtype=torch.float32)
    cfg = _settings(a, D)
    cfg.pop("BLOCK_D")
    grid = (triton.cdiv(n, cfg["BLOCK_M"]),)
    _fwd_kernel[grid](
        a, b, scale, loss, stats[0], stats[1], n, N, D, offset,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), **cfg,
    )  # fmt: skip
    return loss, stats


@torch.library.custom_op("clap_fast::contrastive_fwd", mutates_args=())
def _fwd(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss (0-d fp32), row stats (2, n), column stats (2, N) (empty unless symmetric)."""
    loss_r, stats_r = _row_stats(a, b, scale, offset)
    if not symmetric:
        return loss_r.mean(), stats_r, stats_r.new_empty(2, 0)
    loss_c, stats_c = _row_stats(b, a, scale, 0)
    return (loss_r.sum() + loss_c.sum()) / (2 * a.shape[0]), stats_r, stats_c


@_fwd.register_fake
def _fwd_fake(a, b, scale, offset, symmetric):
    f32 = dict(device=a.device, dtype=torch.float32)
    n_col = b.shape[0] if symmetric else 0
    return a.new_empty((), **f32), a.new_empty(2, a.shape[0], **f32), a.new_empty(2, n_col, **f32)


@torch.library.custom_op("clap_fast::contrastive_bwd", mutates_args=())
def _bwd(
    grad: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    stats_r: torch.Tensor,
    stats_c: torch.Tensor,
    offset: int,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad (0-d) -> dA (n, d), dB (N, d), d(scale) (scale's shape), in the inputs' dtypes."""
    n, D = a.shape
    N = b.shape[0]
    ga = torch.zeros(n, D, device=a.device, dtype=torch.float32)
    gb = torch.zeros(N, D, device=a.device, dtype=torch.float32)
    cfg = _settings(a, D)
    grid = (triton.cdiv(n, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    weight = 1.0 / (2 * n) if symmetric else 1.0 / n
    stats_c = stats_c if symmetric else stats_r  # never read unless SYMMETRIC
    _bwd_kernel[grid](
        a, b, scale, grad.float().contiguous(), stats_r[0], stats_r[1], stats_c[0], stats_c[1],
        ga, gb, n, N, D, offset, weight,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), ga.stride(0), gb.stride(0),
        SYMMETRIC=symmetric, **cfg,
    )  # fmt: skip
    s = scale.detach().float().reshape(())
    dscale = (ga * a.float()).sum().reshape(scale.shape).to(scale.dtype)
    return (ga * s).to(a.dtype), (gb * s).to(b.dtype), dscale


@_bwd.register_fake
def _bwd_fake(grad, a, b, scale, stats_r, stats_c, offset, symmetric):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    a, b, scale, offset, symmetric = inputs
    _, stats_r, stats_c = output
    ctx.save_for_backward(a, b, scale, stats_r, stats_c)
    ctx.offset, ctx.symmetric = offset, symmetric


def _backward(ctx, grad_loss, _grad_stats_r, _grad_stats_c):
    a, b, scale, stats_r, stats_c = ctx.saved_tensors
    da, db, dscale = _bwd(grad_loss, a, b, scale, stats_r, stats_c, ctx.offset, ctx.symmetric)
    return da, db, dscale, None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"A must be (n, d) and B (N, d); got {tuple(a.shape)}, {tuple(b.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be 0-d or shape (1,), got {tuple(scale.shape)}")
    if offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"offset {offset} + n {a.shape[0]} exceeds N {b.shape[0]}")
    if a.dtype != b.dtype:
        raise ValueError(f"A and B must share a dtype, got {a.dtype} and {b.dtype}")


def contrastive_loss(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """Streaming one-direction contrastive loss (see the module docstring).

    A: (n, d), B: (N, d), fp32 / fp16 / bf16, same dtype; logit_scale: 0-d or (1,), already
    exponentiated; targets ``offset + i``. Returns the 0-d fp32 loss, differentiable in A, B
    and logit_scale.
    """
    _check(features_a, features_b, logit_scale, offset)
    return _fwd(features_a, features_b, logit_scale, int(offset), False)[0]


def contrastive_loss_symmetric(
    features_a: torch.Tensor, features_b: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Mean of both directions for a square problem: A, B (n, d), targets on the diagonal.

    Equals ``(contrastive_loss(A, B, s) + contrastive_loss(B, A, s)) / 2`` with one fused
    backward (3 n^2 d MACs instead of 6). Returns the 0-d fp32 loss.
    """
    _check(features_a, features_b, logit_scale, 0)
    if features_a.shape != features_b.shape:
        raise ValueError("the symmetric loss needs A and B of the same shape (n, d)")
    return _fwd(features_a, features_b, logit_scale, 0, True)[0]


def report_specs() -> list[dict]:
    """Every (kernel, configuration) this module can launch on a GPU, for python -m kernels.report.

    ``_settings``' GPU tiles (64 x 64 x 32, BLOCK_D 64, Triton's default 4 warps / 3 stages) at
    fp32 / bf16 / fp16 features; the forward, and the backward plain and symmetric. FLOP and
    bytes per call for n = N = 4096, d = 512 (one direction): forward n N d MACs, backward
    3 n N d MACs (header); bytes: features read once, fp32 stats and gradient buffers once.
    """
    n = big_n = 4096
    d = 512
    specs = []
    for dtype, itemsize in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
        upcast = dtype == "fp32"
        precision = "ieee" if upcast else "tf32"
        feats = (n + big_n) * d * itemsize
        for fn, symmetric in ((_fwd_kernel, None), (_bwd_kernel, False), (_bwd_kernel, True)):
            consts = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, UPCAST=upcast, PRECISION=precision)
            if fn is _bwd_kernel:
                consts.update(BLOCK_D=64, SYMMETRIC=symmetric)
            sig = {}
            for a in fn.arg_names:
                if a in consts:
                    sig[a] = "constexpr"
                elif a in ("a_ptr", "b_ptr"):
                    sig[a] = f"*{dtype}"
                elif a.endswith("_ptr"):
                    sig[a] = "*fp32"
                else:
                    sig[a] = "fp32" if a == "weight" else "i32"
            if fn is _fwd_kernel:
                flop, nbytes, kind = 2 * n * big_n * d, feats + 3 * n * 4, "fwd"
            else:
                flop, nbytes = 6 * n * big_n * d, feats + (n + big_n) * d * 4 * 2 + 4 * n * 4
                kind = "bwd symmetric" if symmetric else "bwd"
            specs.append(
                dict(
                    fn=fn,
                    config=f"{kind} BM64 BN64 BK32{' BD64' if fn is _bwd_kernel else ''} w4 s3",
                    dtype=dtype,
                    signature=sig,
                    constexprs=consts,
                    options={"num_warps": 4, "num_stages": 3},
                    flop=flop,
                    hbm_bytes=nbytes,
                    problem="n=N=4096, d=512",
                    tensor_core=not upcast,
                )
            )
    return specs
