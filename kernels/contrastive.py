"""Contrastive (CLIP / CLAP) loss, Triton kernels (forward + backward). Reference:
``kernels/contrastive_ref.py`` (same signatures, same math).

Math, with s the already exponentiated logit scale, A (n, d) this rank's features, B (N, d)
all features of the other modality and t_i = offset + i the target column of row i::

    X[i, j] = a_i . b_j,   L = s * X
    loss    = mean_i [ lse_i - L[i, t_i] ],        lse_i = logsumexp_j L[i, j]
    G       = exp(L - lse[:, None]) - delta       delta[i, j] = (j == t_i)
    dA = c * G @ B,   dB = c * G^T @ A,   ds = w g sum(G * X),   c = s w g, w = 1 / n

The symmetric variant (n == N, one process) adds the column direction on the same L:
w = 1 / (2 n) and G gains exp(L - lse_col[None, :]) - delta; the loss is the mean of the two
directions. The n x N logits never exist in memory.

What one program computes:
  * ``_fwd_kernel`` (grid: row groups x column splits): for each BLOCK_M row tile of its row
    group, an online log-sum-exp over the BLOCK_N column tiles of its column split (each tile a
    K-loop of BLOCK_K-wide dots), stored as partial row statistics (max m, off-target sum
    r = sum_{j != t} exp(L_ij - m), target logit) per split. Symmetric: the same tile also
    updates the column statistics of its column split for its row group (read-modify-write of
    the program's own slice of a (groups, N) buffer; no atomics), so B is swept once for both
    directions. A few O((splits + groups) N) torch ops merge the partials. Splitting the
    column sweep is what fills the GPU at N = 4096 (32 row tiles alone would leave 100 of 132
    SMs idle). The loss is formed from m, the target logit x_t and r (log1p(r / exp(x_t - m))
    when x_t is within 1 of the max), so tiny losses keep their relative precision; the backward
    uses G[i, t_i] = -q_i, q_i = 1 - P[i, t_i] = r / (exp(x_t - m) + r), for the same reason.
  * ``_bwd_kernel``, FlashAttention-2 style, launched twice: once owning BLOCK_M row tiles of A
    (sweeping the column tiles of B, accumulating dA in registers), once owning row tiles of B
    (``TRANS``: sweeping A, accumulating dB). Each recomputes its L tile from the inputs and G
    from the saved row / column LSEs; the gradient dot G @ Y is accumulated over one BLOCK_D
    slice of d (the whole of d = 512 in the GPU configs). No atomics: every output element has
    one owner and a fixed summation order, so two backward runs are bitwise equal. When there
    are too few owned tiles to fill the GPU (n < ~17k on an H100), the sweep is split and fp32
    partial gradients are summed by torch in a fixed order; otherwise the kernel stores the
    final, scaled gradient in the input dtype. Cost: 2 n N d MACs per launch (recompute +
    gradient dot), 4 n N d for the backward, n N d for the (fused symmetric) forward.

Precision: loads are fp32, fp16 or bf16; every dot accumulates in fp32, the softmax runs in
fp32, the loss is fp32 and gradients are returned in the inputs' dtype. fp32 inputs use IEEE
fp32 dots (``input_precision="ieee"``, no TF32: the loss must match fp64 to 1e-5), so fp32 runs
on the CUDA cores; bf16 / fp16 operands go to the tensor cores. The half-precision operand of
the gradient dot is G itself (|G| <= 2), never the scaled w g s G (which underflows fp16 at
n = 256k); fp16 G is further multiplied by 2^14 and the scale c / 2^14 is applied to the fp32
accumulator. Under ``TRITON_INTERPRET=1`` bf16 loads are upcast to fp32 (the interpreter's bf16
arithmetic is wrong); fp16 runs natively.

Limits: any n >= 1, N >= n + offset, any d (masked, need not be a power of two); int64 element
offsets; logit_scale 0-d or (1,); no double backward. Registered as torch ops
``clap_fast::contrastive_fwd`` / ``clap_fast::contrastive_bwd`` (``custom_op`` without device
types, so the same op runs on CUDA and through the interpreter, and ``torch.compile`` treats it
as opaque). Launch settings: ``@triton.autotune`` over the configs in ``_FWD_CONFIGS`` /
``_BWD_CONFIGS`` (one config under the interpreter); ``report_specs`` lists them for
``python -m kernels.report``.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from kernels.contrastive_ref import _finish

__all__ = ["contrastive_loss", "contrastive_loss_symmetric", "report_specs"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FP16_G_SCALE = 2.0**14  # |G| <= 2, so 2^14 G stays below fp16's 65504


@triton.jit
def _row_ptrs(ptr, idx, stride_n, ALIGNED: tl.constexpr):
    """(len(idx), 1) pointers to rows ``idx`` (int64 offsets). ALIGNED: the caller checked
    16-byte aligned rows; the hint is what a launch on such tensors specialises to, and it lets
    an ahead-of-time compile without argument attributes see the same alignment."""
    p = ptr + idx.to(tl.int64)[:, None] * stride_n
    if ALIGNED:
        p = tl.multiple_of(p, [16, 16])
    return p


@triton.jit
def _logits_tile(
    x_ptr, y_ptr, rows, cols, row_ok, col_ok, D,
    stride_x_n, stride_x_d, stride_y_n, stride_y_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """(BLOCK_M, BLOCK_N) fp32 tile of X[rows] @ Y[cols]^T, K-looped over d; int64 offsets."""
    if ALIGNED:
        D = (D // 16) * 16  # == D; tells the compiler d % 16 == 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_rows = _row_ptrs(x_ptr, rows, stride_x_n, ALIGNED)
    y_rows = _row_ptrs(y_ptr, cols, stride_y_n, ALIGNED)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_ok = kk[None, :] < D
        x = tl.load(x_rows + kk[None, :] * stride_x_d, mask=row_ok[:, None] & k_ok, other=0.0)
        y = tl.load(y_rows + kk[None, :] * stride_y_d, mask=col_ok[:, None] & k_ok, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _fwd_kernel(
    a_ptr, b_ptr, scale_ptr, row_part_ptr, col_part_ptr,
    n, N, D, offset, rows_per_group, cols_per_split,
    stride_a_n, stride_a_d, stride_b_n, stride_b_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ALIGNED: tl.constexpr,
):  # fmt: skip
    """Partial statistics of one (row group, column split) block of L.

    row_part (3, splits, n): max, off-target sum, target logit of each row over this split;
    col_part (2, groups, N) (SYMMETRIC): max and off-target sum of each column over this group.
    """
    group = tl.program_id(0)
    split = tl.program_id(1)
    s = tl.load(scale_ptr).to(tl.float32)
    r_begin = group * rows_per_group
    r_end = tl.minimum(n, r_begin + rows_per_group)
    c_begin = split * cols_per_split
    c_end = tl.minimum(N, c_begin + cols_per_split)
    num_splits = tl.num_programs(1)
    num_groups = tl.num_programs(0)
    for r0 in range(r_begin, r_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < r_end
        m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        r = tl.zeros((BLOCK_M,), dtype=tl.float32)
        x_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(c_begin, c_end, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N)
            col_ok = cols < c_end
            x = s * _logits_tile(
                a_ptr, b_ptr, rows, cols, row_ok, col_ok, D,
                stride_a_n, stride_a_d, stride_b_n, stride_b_d,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, ALIGNED,
            )  # fmt: skip
            valid = row_ok[:, None] & col_ok[None, :]
            x = tl.where(valid, x, float("-inf"))
            is_t = (cols[None, :] == (offset + rows)[:, None]) & valid
            m_new = tl.maximum(m, tl.max(x, axis=1))
            e = tl.where(is_t, 0.0, tl.exp(x - m_new[:, None]))
            r = r * tl.exp(m - m_new) + tl.sum(e, axis=1)
            m = m_new
            x_t += tl.sum(tl.where(is_t, x, 0.0), axis=1)
            if SYMMETRIC:  # column statistics of this group: own slice, read-modify-write
                c_ptr = col_part_ptr + group * N + cols
                seen = col_ok & (r0 > r_begin)  # the group's first row tile starts afresh
                tl.debug_barrier()  # make the previous row tile's stores visible to all threads
                cm = tl.load(c_ptr, mask=seen, other=float("-inf"))
                cr = tl.load(c_ptr + num_groups * N, mask=seen, other=0.0)
                cm_new = tl.maximum(cm, tl.max(x, axis=0))
                ec = tl.where(is_t, 0.0, tl.exp(x - cm_new[None, :]))
                cr = cr * tl.exp(cm - cm_new) + tl.sum(ec, axis=0)
                tl.store(c_ptr, cm_new, mask=col_ok)
                tl.store(c_ptr + num_groups * N, cr, mask=col_ok)
        p = row_part_ptr + split * n + rows
        tl.store(p, m, mask=row_ok)
        tl.store(p + num_splits * n, r, mask=row_ok)
        tl.store(p + 2 * num_splits * n, x_t, mask=row_ok)


@triton.jit
def _bwd_kernel(
    x_ptr, y_ptr, scale_ptr, grad_ptr, lse_r_ptr, q_r_ptr, lse_c_ptr, q_c_ptr, out_ptr, ds_ptr,
    n_own, n_other, D, offset, weight, other_per_split,
    stride_x_n, stride_x_d, stride_y_n, stride_y_d, stride_out_split, stride_out_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    TRANS: tl.constexpr, SYMMETRIC: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, G_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """out[split, own tile, d slice] = c * G_tile @ Y over this split's tiles of Y (X owned).

    Not TRANS: X = A (own = rows i), Y = B (other = columns j), out = dA; also stores the
    per-row partial ds (splits, n). TRANS: X = B (own = columns j), Y = A, out = dB, and the
    tile is L^T (own j, other i).
    """
    if ALIGNED:
        D = (D // 16) * 16  # see _logits_tile
    n_dslices = tl.cdiv(D, BLOCK_D)
    tile = tl.program_id(0) // n_dslices
    dslice = tl.program_id(0) % n_dslices
    split = tl.program_id(1)
    s = tl.load(scale_ptr).to(tl.float32)
    g = tl.load(grad_ptr).to(tl.float32) * weight
    own = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    own_ok = own < n_own
    # statistics indexed by the owned index, loaded once
    if TRANS:
        if SYMMETRIC:
            lse_own = tl.load(lse_c_ptr + own, mask=own_ok, other=0.0)
            q_own = tl.load(q_c_ptr + own, mask=own_ok, other=0.0)
    else:
        lse_own = tl.load(lse_r_ptr + own, mask=own_ok, other=0.0)
        q_own = tl.load(q_r_ptr + own, mask=own_ok, other=0.0)
    dd = dslice * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd[None, :] < D
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    ds_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_begin = split * other_per_split
    c_end = tl.minimum(n_other, c_begin + other_per_split)
    for c0 in range(c_begin, c_end, BLOCK_N):
        oth = c0 + tl.arange(0, BLOCK_N)
        oth_ok = oth < c_end
        raw = _logits_tile(
            x_ptr, y_ptr, own, oth, own_ok, oth_ok, D,
            stride_x_n, stride_x_d, stride_y_n, stride_y_d,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION, ALIGNED,
        )  # fmt: skip
        x = s * raw
        if TRANS:  # tile (own j, other i)
            is_t = own[:, None] == (offset + oth)[None, :]
            lse_r = tl.load(lse_r_ptr + oth, mask=oth_ok, other=0.0)
            q = tl.load(q_r_ptr + oth, mask=oth_ok, other=0.0)[None, :]
            p = tl.exp(x - lse_r[None, :])
            if SYMMETRIC:
                p += tl.exp(x - lse_own[:, None])
                q += q_own[:, None]
        else:  # tile (own i, other j)
            is_t = oth[None, :] == (offset + own)[:, None]
            p = tl.exp(x - lse_own[:, None])
            q = q_own[:, None]
            if SYMMETRIC:
                p += tl.exp(x - tl.load(lse_c_ptr + oth, mask=oth_ok, other=0.0)[None, :])
                q += tl.load(q_c_ptr + oth, mask=oth_ok, other=0.0)[None, :]
        gt = tl.where(is_t, -q, p)  # P_t - 1 without cancellation
        gt = tl.where(own_ok[:, None] & oth_ok[None, :], gt, 0.0)
        if not TRANS:
            ds_acc += tl.sum(gt * raw, axis=1)
        y = tl.load(
            _row_ptrs(y_ptr, oth, stride_y_n, ALIGNED) + dd[None, :] * stride_y_d,
            mask=oth_ok[:, None] & d_ok,
            other=0.0,
        )
        if UPCAST:
            acc = tl.dot(gt, y.to(tl.float32), acc, input_precision=PRECISION)
        else:  # G (not c G) as the half operand: no underflow; c is applied in fp32 below
            acc = tl.dot((gt * G_SCALE).to(y.dtype), y, acc)
    coef = s * g / G_SCALE
    out = _row_ptrs(out_ptr + split * stride_out_split, own, stride_out_n, ALIGNED)
    tl.store(out + dd[None, :], acc * coef, mask=own_ok[:, None] & d_ok)
    if not TRANS:
        tl.store(ds_ptr + split * n_own + own, ds_acc * g, mask=own_ok & (dslice == 0))


# ----------------------------------------------------------------------------- launch settings


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, bd: int | None = None):
    kw = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    if bd is not None:
        kw["BLOCK_D"] = bd
    return triton.Config(kw, num_warps=warps, num_stages=stages)


# GPU configs, keyed by (dtype class, symmetric): fp32 runs IEEE FFMA dots, bf16 / fp16
# tensor-core dots. Each one compiled offline with Triton's ptxas for sm_90a without spills
# (``report_specs``). 128 x 128 tiles spill in the symmetric forward (both statistics in
# registers) and in the backward (a 128 x d accumulator), so those use 64-row tiles.
_GPU_FWD_CONFIGS = {
    ("half", False): [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4)],
    ("half", True): [_cfg(128, 64, 64, 8, 3), _cfg(64, 128, 64, 4, 4)],
    ("fp32", False): [_cfg(128, 128, 32, 8, 2), _cfg(64, 64, 32, 4, 3)],
    ("fp32", True): [_cfg(128, 64, 32, 8, 2), _cfg(64, 64, 32, 4, 3)],
}
_GPU_BWD_CONFIGS = {
    (cls, sym): (
        [_cfg(64, 64, 64, 8, 1, bd=512), _cfg(64, 32, 64, 8, 2, bd=512)]
        + [_cfg(64, 64, 64, 8, 2, bd=256)]
        if cls == "half"
        else [_cfg(64, 32, 32, 8, 2, bd=256), _cfg(64, 32, 32, 8, 1, bd=128)]
    )
    for cls in ("half", "fp32")
    for sym in (False, True)
}
if _INTERPRET:  # one config (the interpreter cannot autotune); wide tiles = few programs
    _FWD_CONFIGS = {"any": [_cfg(64, 64, 128, 4, 1)]}
    _BWD_CONFIGS = {"any": [_cfg(64, 64, 128, 4, 1, bd=128)]}
else:
    _FWD_CONFIGS, _BWD_CONFIGS = _GPU_FWD_CONFIGS, _GPU_BWD_CONFIGS
GRANULE = 64 if _INTERPRET else 128  # row groups / column splits are multiples of this
_MIN_BLOCK_M = 64


def _variant(t: torch.Tensor, symmetric: bool):
    if _INTERPRET:
        return "any"
    return ("fp32" if t.dtype == torch.float32 else "half", bool(symmetric))


def _prune(table: dict, ptr_name: str):
    def prune(configs, named_args, **kwargs):
        allowed = table[_variant(named_args[ptr_name], kwargs["SYMMETRIC"])]
        keep = [c for c in configs if any(c is a for a in allowed)]
        if "BLOCK_D" in keep[0].kwargs:  # no slice much wider than d
            wide = max(16, triton.next_power_of_2(named_args["D"]))
            fit = [c for c in keep if c.kwargs["BLOCK_D"] <= wide]
            keep = fit or [min(keep, key=lambda c: c.kwargs["BLOCK_D"])]
        return keep

    return prune


def _all(table: dict) -> list:
    return [c for cs in table.values() for c in cs]


_fwd = triton.autotune(
    _all(_FWD_CONFIGS),
    key=["n", "N", "D", "SYMMETRIC"],
    prune_configs_by={"early_config_prune": _prune(_FWD_CONFIGS, "a_ptr")},
)(_fwd_kernel)
_bwd = triton.autotune(
    _all(_BWD_CONFIGS),
    key=["n_own", "n_other", "D", "TRANS", "SYMMETRIC"],
    prune_configs_by={"early_config_prune": _prune(_BWD_CONFIGS, "x_ptr")},
)(_bwd_kernel)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # interpreter: a few programs, enough to exercise groups and splits
    return torch.cuda.get_device_properties(device).multi_processor_count


def _precision(x: torch.Tensor, y: torch.Tensor) -> dict:
    """Dot settings and the ALIGNED hint flag: 16-byte aligned pointers, d and row strides
    multiples of 16 elements, unit column stride (true for contiguous d = 512 features)."""
    upcast = x.dtype == torch.float32 or (_INTERPRET and x.dtype == torch.bfloat16)
    aligned = x.shape[1] % 16 == 0 and all(
        t.data_ptr() % 16 == 0 and t.stride(1) == 1 and t.stride(0) % 16 == 0 for t in (x, y)
    )
    return dict(UPCAST=upcast, PRECISION="ieee" if upcast else "tf32", ALIGNED=aligned)


def _chunks(size: int, parts: int) -> tuple[int, int]:
    """Split ``size`` into at most ``parts`` chunks of whole GRANULEs -> (chunk, count)."""
    granules = triton.cdiv(size, GRANULE)
    chunk = triton.cdiv(granules, max(1, min(parts, granules))) * GRANULE
    return chunk, triton.cdiv(size, chunk)


def _forward_stats(a, b, scale, offset: int, symmetric: bool):
    """A (n, d), B (N, d) -> per-row loss (n,), row stats (2, n), column loss and stats
    (symmetric only) from one sweep; stats = [lse, 1 - P_target], fp32."""
    n, D = a.shape
    N = b.shape[0]
    target = 4 * _num_sms(a.device)  # programs: a few waves
    if symmetric:  # groups x splits ~ target, both buffers O(sqrt(target) N)
        groups = max(1, round(math.sqrt(target)))
    else:
        groups = triton.cdiv(n, GRANULE)
    rows_per_group, groups = _chunks(n, groups)
    cols_per_split, splits = _chunks(N, triton.cdiv(target, groups))
    row_part = torch.empty(3, splits, n, device=a.device, dtype=torch.float32)
    if symmetric:
        col_part = torch.empty(2, groups, N, device=a.device, dtype=torch.float32)
    else:
        col_part = row_part  # never touched unless SYMMETRIC
    _fwd[(groups, splits)](
        a, b, scale, row_part, col_part, n, N, D, offset, rows_per_group, cols_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        SYMMETRIC=symmetric, **_precision(a, b),
    )  # fmt: skip
    m = row_part[0].amax(0)
    r = (row_part[1] * torch.exp(row_part[0] - m)).sum(0)
    x_t = row_part[2].sum(0)
    loss_r, lse_r, q_r = _finish(m, x_t, r)
    if not symmetric:
        return loss_r, torch.stack((lse_r, q_r)), None, None
    m = col_part[0].amax(0)
    r = (col_part[1] * torch.exp(col_part[0] - m)).sum(0)
    loss_c, lse_c, q_c = _finish(m, x_t, r)  # square: column j's target is row j's
    return loss_r, torch.stack((lse_r, q_r)), loss_c, torch.stack((lse_c, q_c))


def _grad(x, y, scale, grad, stats_r, stats_c, offset, weight, trans, symmetric):
    """Gradient of the owned features x (n_own, d) against y (n_other, d), in x's dtype;
    plus the per-row partial ds (splits, n_own) when not ``trans``."""
    n_own, D = x.shape
    n_other = y.shape[0]
    tiles = triton.cdiv(n_own, _MIN_BLOCK_M)
    splits = min(4, triton.cdiv(2 * _num_sms(x.device), tiles))
    per_split, splits = _chunks(n_other, splits)
    if splits == 1:  # final gradient, scaled and cast in the kernel
        out = torch.empty_like(x, memory_format=torch.contiguous_format)[None]
    else:  # fp32 partials, summed below in a fixed order
        out = torch.empty(splits, n_own, D, device=x.device, dtype=torch.float32)
    # ds: per-row partials of dL/ds (never touched when trans)
    ds = stats_r if trans else torch.empty(splits, n_own, device=x.device, dtype=torch.float32)
    g_scale = FP16_G_SCALE if x.dtype == torch.float16 else 1.0

    def grid(meta):
        return (triton.cdiv(n_own, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_D"]), splits)

    _bwd[grid](
        x, y, scale, grad, stats_r[0], stats_r[1], stats_c[0], stats_c[1], out, ds,
        n_own, n_other, D, offset, weight, per_split,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1),
        TRANS=trans, SYMMETRIC=symmetric, G_SCALE=g_scale, **_precision(x, y),
    )  # fmt: skip
    dx = out[0] if splits == 1 else out.sum(0).to(x.dtype)
    return dx, ds


# ----------------------------------------------------------------------------- torch ops


@torch.library.custom_op("clap_fast::contrastive_fwd", mutates_args=())
def _fwd_op(
    a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> loss (0-d fp32), row stats (2, n), column stats (2, N) (empty unless symmetric)."""
    loss_r, stats_r, loss_c, stats_c = _forward_stats(a, b, scale, offset, symmetric)
    if not symmetric:
        return loss_r.mean(), stats_r, stats_r.new_empty(2, 0)
    return (loss_r.sum() + loss_c.sum()) / (2 * a.shape[0]), stats_r, stats_c


@_fwd_op.register_fake
def _fwd_fake(a, b, scale, offset, symmetric):
    f32 = dict(device=a.device, dtype=torch.float32)
    n_col = b.shape[0] if symmetric else 0
    return a.new_empty((), **f32), a.new_empty(2, a.shape[0], **f32), a.new_empty(2, n_col, **f32)


@torch.library.custom_op("clap_fast::contrastive_bwd", mutates_args=())
def _bwd_op(
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
    weight = 1.0 / (2 * a.shape[0]) if symmetric else 1.0 / a.shape[0]
    grad = grad.float().reshape(1).contiguous()
    stats_c = stats_c if symmetric else stats_r  # never read unless SYMMETRIC
    common = (scale, grad, stats_r, stats_c, offset, weight)
    da, ds = _grad(a, b, *common, trans=False, symmetric=symmetric)
    db, _ = _grad(b, a, *common, trans=True, symmetric=symmetric)
    dscale = ds.sum().reshape(scale.shape).to(scale.dtype)
    return da, db, dscale


@_bwd_op.register_fake
def _bwd_fake(grad, a, b, scale, stats_r, stats_c, offset, symmetric):
    return torch.empty_like(a), torch.empty_like(b), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    a, b, scale, offset, symmetric = inputs
    _, stats_r, stats_c = output
    ctx.save_for_backward(a, b, scale, stats_r, stats_c)
    ctx.offset, ctx.symmetric = offset, symmetric


def _backward(ctx, grad_loss, _grad_stats_r, _grad_stats_c):
    a, b, scale, stats_r, stats_c = ctx.saved_tensors
    da, db, dscale = _bwd_op(grad_loss, a, b, scale, stats_r, stats_c, ctx.offset, ctx.symmetric)
    return da, db, dscale, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"A must be (n, d) and B (N, d); got {tuple(a.shape)}, {tuple(b.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be 0-d or shape (1,), got {tuple(scale.shape)}")
    if offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"offset {offset} + n {a.shape[0]} exceeds N {b.shape[0]}")
    if a.dtype != b.dtype:
        raise ValueError(f"A and B must share a dtype, got {a.dtype} and {b.dtype}")
    if a.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"features must be fp32, fp16 or bf16, got {a.dtype}")


def contrastive_loss(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """Streaming one-direction contrastive loss (see the module docstring).

    A: (n, d), B: (N, d), fp32 / fp16 / bf16, same dtype; logit_scale: 0-d or (1,), already
    exponentiated; targets ``offset + i``. Returns the 0-d fp32 loss, differentiable in A, B
    and logit_scale (gradients in the inputs' dtypes).
    """
    _check(features_a, features_b, logit_scale, offset)
    return _fwd_op(features_a, features_b, logit_scale, int(offset), False)[0]


def contrastive_loss_symmetric(
    features_a: torch.Tensor, features_b: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Mean of both directions for a square problem: A, B (n, d), targets on the diagonal.

    Equals ``(contrastive_loss(A, B, s) + contrastive_loss(B, A, s)) / 2`` from one forward
    sweep (row and column statistics together) and one backward (two kernels). Returns the
    0-d fp32 loss.
    """
    _check(features_a, features_b, logit_scale, 0)
    if features_a.shape != features_b.shape:
        raise ValueError("the symmetric loss needs A and B of the same shape (n, d)")
    return _fwd_op(features_a, features_b, logit_scale, 0, True)[0]


# ----------------------------------------------------------------------------- static report

_REPORT_N, _REPORT_D, _REPORT_SMS = 4096, 512, 132  # reference problem; H100 / H200 SXM
_TRITON_DTYPE = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
_ELEM = {"fp32": 4, "bf16": 2, "fp16": 2}
_UNIT_STRIDES = ("stride_a_d", "stride_b_d", "stride_x_d", "stride_y_d")  # specialised to 1


def _spec(fn, cfg, dtype, consts, flop, hbm, problem, out_dtype=None) -> dict:
    half = dtype != "fp32"
    consts = {
        **cfg.kwargs,
        **consts,
        "UPCAST": not half,
        "PRECISION": "tf32" if half else "ieee",
        "ALIGNED": True,  # contiguous d = 512 features
        **dict.fromkeys(_UNIT_STRIDES, 1),
    }
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("a_ptr", "b_ptr", "x_ptr", "y_ptr"):
            sig[name] = _TRITON_DTYPE[dtype]
        elif name == "out_ptr":  # fp32 partials (split sweep) or the final gradient
            sig[name] = _TRITON_DTYPE[out_dtype]
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        else:
            sig[name] = "fp32" if name == "weight" else "i32"
    k = cfg.kwargs
    label = f"BM{k['BLOCK_M']} BN{k['BLOCK_N']} BK{k['BLOCK_K']}"
    label += f" BD{k['BLOCK_D']}" if "BLOCK_D" in k else ""
    label += f" w{cfg.num_warps} s{cfg.num_stages}"
    label += "".join(f" {c}" for c in ("SYMMETRIC", "TRANS") if consts.get(c))
    return {
        "fn": fn,
        "config": label,
        "dtype": dtype,
        "signature": sig,
        "constexprs": consts,
        "options": {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        "flop": int(flop),
        "hbm_bytes": int(hbm),
        "tensor_core": half,
        "problem": problem,
    }


def report_specs() -> list[dict]:
    """Every (kernel, configuration) this module can launch on a GPU, for python -m kernels.report.

    FLOP and HBM bytes for n = N = 4096, d = 512 (offset 0), with the launch heuristics above at
    132 SMs; HBM bytes count each input once (it fits in L2), the partial statistics and the
    outputs (the backward's fp32 partial gradients when its sweep is split).
    """
    n = N = _REPORT_N
    d = _REPORT_D
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        e = _ELEM[dtype]
        cls = "fp32" if dtype == "fp32" else "half"
        for sym in (False, True):
            problem = f"N={N}, d={d}, " + ("symmetric" if sym else "one direction")
            target = 4 * _REPORT_SMS
            groups = round(math.sqrt(target)) if sym else triton.cdiv(n, 128)
            groups = triton.cdiv(n, triton.cdiv(triton.cdiv(n, 128), groups) * 128)
            splits = min(triton.cdiv(N, 128), triton.cdiv(target, groups))
            stats = 4 * (3 * splits * n + (2 * groups * N if sym else 0))
            for cfg in _GPU_FWD_CONFIGS[cls, sym]:
                hbm = (n + N) * d * e + 2 * stats
                specs.append(
                    _spec(_fwd_kernel, cfg, dtype, {"SYMMETRIC": sym}, 2 * n * N * d, hbm, problem)
                )
            for trans in (False, True):
                for cfg in _GPU_BWD_CONFIGS[cls, sym]:
                    bd = cfg.kwargs["BLOCK_D"]
                    slices = triton.cdiv(d, bd)
                    tiles = triton.cdiv(n, _MIN_BLOCK_M)
                    bsplits = min(4, triton.cdiv(2 * _REPORT_SMS, tiles))
                    out = n * d * (4 * bsplits if bsplits > 1 else e)
                    flop = 2 * n * N * d * (slices + 1)  # recompute per d slice + gradient dot
                    hbm = (n + N) * d * e + 4 * 4 * (n + N) + out
                    consts = {"SYMMETRIC": sym, "TRANS": trans}
                    consts["G_SCALE"] = FP16_G_SCALE if dtype == "fp16" else 1.0
                    out_dt = "fp32" if bsplits > 1 else dtype
                    spec = _spec(_bwd_kernel, cfg, dtype, consts, flop, hbm, problem, out_dt)
                    specs.append(spec)
    return specs
