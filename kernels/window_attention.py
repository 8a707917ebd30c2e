"""Swin (shifted) window attention for HTS-AT, fused forward and backward Triton kernels.

Math (same as ``kernels/window_attention_ref.py``), token grid H x W, window w, N = w*w tokens
per window, head dim D = C / heads::

    qkv (B, H, W, 3C), channel s*C + h*D + d = part s (q, k, v) of head h, dim d
    token (ys, xs) of the rolled grid reads/writes grid cell ((ys + shift) % H, (xs + shift) % W)
    S = (q * scale) @ k^T + table[rel(i, j), h] + mask(i, j)          (N x N, fp32)
        rel(i, j) = (y_i - y_j + w - 1) * (2w - 1) + (x_i - x_j + w - 1)  (in-window coordinates)
        mask(i, j) = -100 if region(i) != region(j) else 0             (shift > 0 only)
        region = 3 * r(ys, H) + r(xs, W),  r(c, L) = [c >= L - w] + [c >= L - shift]
                 (LAION's img_mask slices (0, -w), (-w, -shift), (-shift, None))
    P = softmax(S) (fp32),  out = P @ v  -> (B, H, W, C) in token layout, rolled back
    lse = rowmax(S) + log(rowsum(exp(S - rowmax)))   saved, (B*nW, heads, N) fp32

Backward (P recomputed from lse; nothing of size N^2 is saved)::

    dv = P^T dO,  dP = dO v^T,  delta = rowsum(dO * out),  dS = P * (dP - delta)
    dq = scale * dS k,  dk = dS^T (q * scale),  d table[r, h] = sum over windows, (i, j) with
    rel(i, j) = r of dS[i, j]

One program handles WINDOWS_PER_PROGRAM consecutive windows of one head, one window (N x D
tiles, D padded to a power of two with masks) per loop step. The head's N x N bias tile is
gathered once per program. Roll, partition and reverse are pure index arithmetic: q, k, v are
loaded straight from ``qkv`` and the output is stored straight into (B, H, W, C).

The bias-table gradient is deterministic without float atomics: each backward program sums dS
over its windows in registers and writes one (N x N) partial per (program, head); torch then
sums the partials over programs and reduces each relative offset through a fixed gather
(``_rel_gather``), so two backward passes give bit-identical gradients.

Supported: head dim <= 64 (24, 32, 64 in HTS-AT; 24 is padded to 32; 128 would need more
shared memory than an H100 has in the fp32 backward), window 4 or 8 (N a
power of two >= 16), 0 <= shift < window, H and W multiples of the window, fp32 / fp16 / bf16
qkv (loaded and computed in fp32, one cast on store), bias table of any float dtype.
fp32 inputs use IEEE fp32 dot products; fp16/bf16 inputs use TF32 (k, v, dO hold exactly;
q * scale, P and dS are rounded to TF32 inside the dots, like the bf16 P of FlashAttention). Not supported: attention
masks other than the Swin shift mask, dropout, non-square windows, double backward.
Runs under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["window_attention"]


@triton.jit
def _bias_tile(table_ptr, stride_table_r, stride_table_h, head, ty, tx, WINDOW: tl.constexpr):
    """(N, N) fp32 relative-position bias of one head, gathered from the table by index."""
    rel = (ty[:, None] - ty[None, :] + WINDOW - 1) * (2 * WINDOW - 1) + (
        tx[:, None] - tx[None, :] + WINDOW - 1
    )
    return tl.load(table_ptr + rel * stride_table_r + head * stride_table_h).to(tl.float32)


@triton.jit
def _window_cells(
    win, n_win_img, n_wx, ty, tx, grid_h, grid_w, WINDOW: tl.constexpr, SHIFT: tl.constexpr
):
    """Batch index, rolled-grid cells (ys, xs) and source grid cells (y, x) of one window's tokens.

    Cyclic shift by index: rolled cell (ys, xs) is grid cell (ys + shift, xs + shift).
    """
    b = (win // n_win_img).to(tl.int64)
    wl = win % n_win_img
    ys = (wl // n_wx) * WINDOW + ty
    xs = (wl % n_wx) * WINDOW + tx
    return b, ys, xs, (ys + SHIFT) % grid_h, (xs + SHIFT) % grid_w


@triton.jit
def _scores(
    q,
    k,
    bias,
    ys,
    xs,
    grid_h,
    grid_w,
    WINDOW: tl.constexpr,
    SHIFT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(N, N) fp32 scores q·kᵀ + bias, plus LAION's -100 between shift regions (forward and
    backward share this, so the recomputed P is the forward's P)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) + bias
    if SHIFT > 0:
        ry = (ys >= grid_h - WINDOW).to(tl.int32) + (ys >= grid_h - SHIFT).to(tl.int32)
        rx = (xs >= grid_w - WINDOW).to(tl.int32) + (xs >= grid_w - SHIFT).to(tl.int32)
        region = ry * 3 + rx
        s = s + tl.where(region[:, None] != region[None, :], -100.0, 0.0)
    return s


@triton.jit
def _window_attn_fwd_kernel(
    qkv_ptr,
    table_ptr,
    out_ptr,
    lse_ptr,
    stride_qkv_b,
    stride_qkv_h,
    stride_qkv_w,
    stride_out_b,
    stride_out_h,
    stride_out_w,
    stride_table_r,
    stride_table_h,
    num_windows,
    num_heads,
    grid_h,
    grid_w,
    channels,
    scale,
    WINDOW: tl.constexpr,
    SHIFT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOWS_PER_PROGRAM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    N: tl.constexpr = WINDOW * WINDOW
    t = tl.arange(0, N)
    ty = t // WINDOW
    tx = t % WINDOW
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    # The bias tile is the same for every window of this head: gather it once per program.
    bias = _bias_tile(table_ptr, stride_table_r, stride_table_h, head, ty, tx, WINDOW)
    q_col = head * HEAD_DIM + d
    n_wx = grid_w // WINDOW
    n_win_img = (grid_h // WINDOW) * n_wx
    for i in range(WINDOWS_PER_PROGRAM):
        win = pid * WINDOWS_PER_PROGRAM + i
        valid = win < num_windows
        b, ys, xs, y, x = _window_cells(win, n_win_img, n_wx, ty, tx, grid_h, grid_w, WINDOW, SHIFT)
        row = b * stride_qkv_b + y * stride_qkv_h + x * stride_qkv_w
        ld_mask = d_ok[None, :] & valid
        ptrs = qkv_ptr + row[:, None] + q_col[None, :]
        q = tl.load(ptrs, mask=ld_mask, other=0.0).to(tl.float32) * scale
        k = tl.load(ptrs + channels, mask=ld_mask, other=0.0).to(tl.float32)
        v = tl.load(ptrs + 2 * channels, mask=ld_mask, other=0.0).to(tl.float32)
        s = _scores(q, k, bias, ys, xs, grid_h, grid_w, WINDOW, SHIFT, DOT_PRECISION)
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        l = tl.sum(p, axis=1)
        o = tl.dot(p, v, input_precision=DOT_PRECISION) / l[:, None]
        out_row = b * stride_out_b + y * stride_out_h + x * stride_out_w
        out_ptrs = out_ptr + out_row[:, None] + q_col[None, :]
        tl.store(out_ptrs, o.to(out_ptr.dtype.element_ty), mask=ld_mask)
        lse_off = (win.to(tl.int64) * num_heads + head) * N + t
        tl.store(lse_ptr + lse_off, m + tl.log(l), mask=(t < N) & valid)


@triton.jit
def _window_attn_bwd_kernel(
    qkv_ptr,
    table_ptr,
    out_ptr,
    dout_ptr,
    lse_ptr,
    dqkv_ptr,
    dbias_part_ptr,
    stride_qkv_b,
    stride_qkv_h,
    stride_qkv_w,
    stride_out_b,
    stride_out_h,
    stride_out_w,
    stride_dout_b,
    stride_dout_h,
    stride_dout_w,
    stride_dqkv_b,
    stride_dqkv_h,
    stride_dqkv_w,
    stride_table_r,
    stride_table_h,
    num_windows,
    num_heads,
    grid_h,
    grid_w,
    channels,
    scale,
    WINDOW: tl.constexpr,
    SHIFT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    WINDOWS_PER_PROGRAM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    N: tl.constexpr = WINDOW * WINDOW
    t = tl.arange(0, N)
    ty = t // WINDOW
    tx = t % WINDOW
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    bias = _bias_tile(table_ptr, stride_table_r, stride_table_h, head, ty, tx, WINDOW)
    q_col = head * HEAD_DIM + d
    n_wx = grid_w // WINDOW
    n_win_img = (grid_h // WINDOW) * n_wx
    # dS summed over this program's windows (first stage of the deterministic bias reduction).
    dbias = tl.zeros((N, N), dtype=tl.float32)
    for i in range(WINDOWS_PER_PROGRAM):
        win = pid * WINDOWS_PER_PROGRAM + i
        valid = win < num_windows
        b, ys, xs, y, x = _window_cells(win, n_win_img, n_wx, ty, tx, grid_h, grid_w, WINDOW, SHIFT)
        ld_mask = d_ok[None, :] & valid
        row = b * stride_qkv_b + y * stride_qkv_h + x * stride_qkv_w
        ptrs = qkv_ptr + row[:, None] + q_col[None, :]
        q = tl.load(ptrs, mask=ld_mask, other=0.0).to(tl.float32) * scale
        k = tl.load(ptrs + channels, mask=ld_mask, other=0.0).to(tl.float32)
        v = tl.load(ptrs + 2 * channels, mask=ld_mask, other=0.0).to(tl.float32)
        out_row = b * stride_out_b + y * stride_out_h + x * stride_out_w
        o = tl.load(out_ptr + out_row[:, None] + q_col[None, :], mask=ld_mask, other=0.0)
        dout_row = b * stride_dout_b + y * stride_dout_h + x * stride_dout_w
        do = tl.load(dout_ptr + dout_row[:, None] + q_col[None, :], mask=ld_mask, other=0.0)
        do = do.to(tl.float32)
        lse_off = (win.to(tl.int64) * num_heads + head) * N + t
        lse = tl.load(lse_ptr + lse_off, mask=(t < N) & valid, other=0.0)
        s = _scores(q, k, bias, ys, xs, grid_h, grid_w, WINDOW, SHIFT, DOT_PRECISION)
        p = tl.exp(s - lse[:, None])
        # Invalid (past-the-end) windows have dO = 0, so dS = 0 and they add nothing below.
        dv = tl.dot(tl.trans(p), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        delta = tl.sum(o.to(tl.float32) * do, axis=1)
        ds = p * (dp - delta[:, None])
        dbias += ds
        dq = tl.dot(ds, k, input_precision=DOT_PRECISION) * scale
        dk = tl.dot(tl.trans(ds), q, input_precision=DOT_PRECISION)
        drow = b * stride_dqkv_b + y * stride_dqkv_h + x * stride_dqkv_w
        dptrs = dqkv_ptr + drow[:, None] + q_col[None, :]
        dtype = dqkv_ptr.dtype.element_ty
        tl.store(dptrs, dq.to(dtype), mask=ld_mask)
        tl.store(dptrs + channels, dk.to(dtype), mask=ld_mask)
        tl.store(dptrs + 2 * channels, dv.to(dtype), mask=ld_mask)
    part = dbias_part_ptr + (pid.to(tl.int64) * num_heads + head) * N * N
    tl.store(part + t[:, None] * N + t[None, :], dbias)


@functools.lru_cache(maxsize=8)
def _rel_gather_cpu(window_size: int) -> torch.Tensor:
    """((2w-1)^2, N) int64: flat (i*N + j) positions of each relative offset, padded with N*N."""
    n = window_size * window_size
    t = torch.arange(n)
    ty, tx = t // window_size, t % window_size
    rel = (ty[:, None] - ty[None, :] + window_size - 1) * (2 * window_size - 1) + (
        tx[:, None] - tx[None, :] + window_size - 1
    )
    rel = rel.flatten()
    num_rel = (2 * window_size - 1) ** 2
    # Each offset occurs at most N times (the zero offset exactly N times).
    gather = torch.full((num_rel, n), n * n, dtype=torch.int64)
    order = torch.argsort(rel, stable=True)
    counts = torch.bincount(rel, minlength=num_rel)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(n * n) - starts[rel[order]]
    gather[rel[order], slot] = order
    return gather


def _rel_gather(window_size: int, device: torch.device) -> torch.Tensor:
    return _rel_gather_cpu(window_size).to(device)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _windows_per_program(qkv: torch.Tensor, num_windows: int, num_heads: int, per_sm: int) -> int:
    """Windows per program: all of them under the interpreter (a program costs milliseconds
    there); on a GPU enough programs to fill ``per_sm`` waves of SMs, at most 64 windows each."""
    if not qkv.is_cuda:
        return num_windows
    target = per_sm * _sm_count(qkv.device.index or 0)
    return max(1, min(64, (num_windows * num_heads) // max(1, target)))


def _launch_params(qkv: torch.Tensor, num_heads: int) -> dict:
    d = qkv.shape[-1] // 3 // num_heads
    # Offline ptxas for sm_90 (bf16, w 8, D 24; no GPU run yet): forward 166 registers, backward
    # 255 (it keeps S, P, dP, dS and the dS sum live), no spills at 4 or 8 warps; 8 warps makes
    # ptxas insert warpgroup syncs for the wgmma, so both use 4.
    return dict(
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        # fp32 inputs keep fp32 dot products (as PyTorch's default matmul); TF32 holds fp16 and
        # bf16 operands exactly.
        DOT_PRECISION="ieee" if qkv.dtype == torch.float32 else "tf32",
        num_warps=4,
    )


@torch.library.custom_op("clap_fast::window_attention_fwd", mutates_args=())
def _window_attention_fwd(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    num_heads: int,
    window_size: int,
    shift_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, H, W, 3C), table ((2w-1)^2, heads) -> out (B, H, W, C), lse (B*nW, heads, N) fp32."""
    b, h, wd, c3 = qkv.shape
    c = c3 // 3
    n = window_size * window_size
    num_windows = b * (h // window_size) * (wd // window_size)
    out = qkv.new_empty((b, h, wd, c))
    lse = torch.empty((num_windows, num_heads, n), device=qkv.device, dtype=torch.float32)
    wpp = _windows_per_program(qkv, num_windows, num_heads, per_sm=8)
    grid = (triton.cdiv(num_windows, wpp), num_heads)
    _window_attn_fwd_kernel[grid](
        qkv,
        bias_table,
        out,
        lse,
        *qkv.stride()[:3],
        *out.stride()[:3],
        *bias_table.stride(),
        num_windows,
        num_heads,
        h,
        wd,
        c,
        scale,
        WINDOW=window_size,
        SHIFT=shift_size,
        WINDOWS_PER_PROGRAM=wpp,
        **_launch_params(qkv, num_heads),
    )
    return out, lse


@_window_attention_fwd.register_fake
def _(qkv, bias_table, num_heads, window_size, shift_size, scale):
    b, h, wd, c3 = qkv.shape
    num_windows = b * (h // window_size) * (wd // window_size)
    lse = qkv.new_empty((num_windows, num_heads, window_size * window_size), dtype=torch.float32)
    return qkv.new_empty((b, h, wd, c3 // 3)), lse


@torch.library.custom_op("clap_fast::window_attention_bwd", mutates_args=())
def _window_attention_bwd(
    grad_out: torch.Tensor,
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    window_size: int,
    shift_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out (B, H, W, C) -> d qkv (B, H, W, 3C) in qkv's dtype, d table in the table's dtype."""
    b, h, wd, c3 = qkv.shape
    c = c3 // 3
    n = window_size * window_size
    num_windows = lse.shape[0]
    grad_out = grad_out.contiguous()
    dqkv = torch.empty_like(qkv)
    wpp = _windows_per_program(qkv, num_windows, num_heads, per_sm=4)
    num_programs = triton.cdiv(num_windows, wpp)
    # Stage 1 buffer: one (N x N) fp32 partial per (program, head), about 9 MB at HTS-AT stage 1,
    # batch 128 on an H100 (133 programs x 4 heads x 64 x 64).
    parts = torch.empty((num_programs, num_heads, n, n), device=qkv.device, dtype=torch.float32)
    _window_attn_bwd_kernel[(num_programs, num_heads)](
        qkv,
        bias_table,
        out,
        grad_out,
        lse,
        dqkv,
        parts,
        *qkv.stride()[:3],
        *out.stride()[:3],
        *grad_out.stride()[:3],
        *dqkv.stride()[:3],
        *bias_table.stride(),
        num_windows,
        num_heads,
        h,
        wd,
        c,
        scale,
        WINDOW=window_size,
        SHIFT=shift_size,
        WINDOWS_PER_PROGRAM=wpp,
        **_launch_params(qkv, num_heads),
    )
    # Stage 2, deterministic: a fixed-order sum over programs, then each relative offset sums its
    # (at most N) positions through a fixed gather (a zero slot pads the short rows).
    dbias = parts.sum(0).flatten(1)  # (heads, N*N)
    dbias = torch.cat([dbias, dbias.new_zeros(num_heads, 1)], dim=1)
    gather = _rel_gather(window_size, qkv.device)  # ((2w-1)^2, N)
    dtable = dbias[:, gather].sum(-1).t()  # ((2w-1)^2, heads)
    return dqkv, dtable.to(bias_table.dtype).contiguous()


@_window_attention_bwd.register_fake
def _(grad_out, qkv, bias_table, out, lse, num_heads, window_size, shift_size, scale):
    return torch.empty_like(qkv), torch.empty_like(bias_table)


def _setup_context(ctx, inputs, output) -> None:
    qkv, bias_table, num_heads, window_size, shift_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, bias_table, out, lse)
    ctx.params = (num_heads, window_size, shift_size, scale)


def _backward(ctx, grad_out, grad_lse):
    qkv, bias_table, out, lse = ctx.saved_tensors
    dqkv, dtable = _window_attention_bwd(grad_out, qkv, bias_table, out, lse, *ctx.params)
    return dqkv, dtable, None, None, None, None


_window_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def window_attention(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    *,
    num_heads: int,
    window_size: int,
    shift_size: int = 0,
    scale: float | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Shifted-window multi-head attention with relative-position bias (Triton).

    Args:
        qkv: (B, H, W, 3C) fp32/fp16/bf16, H and W multiples of window_size, channel stride 1.
        bias_table: ((2w-1)^2, num_heads) relative-position bias table, any float dtype.
        num_heads: heads; C must be a multiple of it, head dim <= 64.
        window_size: w, 4 or 8 (8 in HTS-AT).
        shift_size: 0 <= shift < w (cyclic shift with LAION's -100 region mask).
        scale: q scale, default head_dim ** -0.5.
        upcast: accepted for signature parity with the reference; the kernel always computes
            in fp32.

    Returns:
        (B, H, W, C) in qkv's dtype, token layout. Differentiable in qkv and bias_table.
    """
    del upcast  # always fp32 inside
    b, h, wd, c3 = qkv.shape
    c = c3 // 3
    if c3 % 3 or c % num_heads:
        raise ValueError(f"qkv last dim {c3} is not 3 * heads * head_dim for {num_heads} heads")
    if h % window_size or wd % window_size:
        raise ValueError(f"grid {h}x{wd} is not a multiple of window {window_size}")
    if window_size not in (4, 8):
        raise ValueError(f"window_size must be 4 or 8, got {window_size}")
    if not 0 <= shift_size < window_size:
        raise ValueError(f"shift_size must be in [0, {window_size}), got {shift_size}")
    if c // num_heads > 64:
        raise ValueError(f"head dim {c // num_heads} > 64 is not supported")
    if bias_table.shape != ((2 * window_size - 1) ** 2, num_heads):
        raise ValueError(f"bias_table shape {tuple(bias_table.shape)} does not match w, heads")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()  # copies: the kernel needs unit channel stride
    scale = (c // num_heads) ** -0.5 if scale is None else float(scale)
    out, _ = _window_attention_fwd(qkv, bias_table, num_heads, window_size, shift_size, scale)
    return out


def report_specs() -> list[dict]:
    """Every (kernel, configuration) this module can launch on a GPU, for python -m kernels.report.

    Window 8 (every HTS-AT), shift 0 and 4, head dims 24 / 32 / 64 (HTS-AT tiny / base / large),
    fp32 / bf16 / fp16 qkv (fp32 bias table), forward and backward, with ``_launch_params``'
    settings. Windows per program and FLOP / bytes for stage 1 (64 x 64 tokens, 4 heads) at
    B = 64 on an H100 (132 SMs); FLOP as bench_window_attention counts them (QK^T and PV:
    4 N^2 D per window and head forward; the backward's five matmuls 2.5x that).
    """
    batch, grid, heads, window, sms = 64, 64, 4, 8, 132
    n = window * window
    num_windows = batch * (grid // window) ** 2
    tokens = batch * grid * grid
    specs = []
    for head_dim, model in ((24, "tiny"), (32, "base"), (64, "large")):
        c = heads * head_dim
        fwd_flop = 4 * num_windows * heads * n * n * head_dim
        lse_bytes = num_windows * heads * n * 4
        for dtype, itemsize in (("fp32", 4), ("bf16", 2), ("fp16", 2)):
            for shift in (0, window // 2):
                for fn, per_sm in ((_window_attn_fwd_kernel, 8), (_window_attn_bwd_kernel, 4)):
                    wpp = max(1, min(64, num_windows * heads // (per_sm * sms)))
                    consts = dict(
                        WINDOW=window,
                        SHIFT=shift,
                        HEAD_DIM=head_dim,
                        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                        WINDOWS_PER_PROGRAM=wpp,
                        DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                    )
                    fp32_ptrs = ("table_ptr", "lse_ptr", "dbias_part_ptr")
                    sig = {
                        a: "constexpr"
                        if a in consts
                        else ("*fp32" if a in fp32_ptrs else f"*{dtype}")
                        if a.endswith("_ptr")
                        else "fp32"
                        if a == "scale"
                        else "i32"
                        for a in fn.arg_names
                    }
                    if fn is _window_attn_fwd_kernel:
                        flop, nbytes = fwd_flop, tokens * 4 * c * itemsize + lse_bytes
                    else:
                        flop = int(2.5 * fwd_flop)
                        nbytes = tokens * 8 * c * itemsize + lse_bytes
                        nbytes += triton.cdiv(num_windows, wpp) * heads * n * n * 4
                    specs.append(
                        dict(
                            fn=fn,
                            config=f"win{window} shift{shift} hd{head_dim} wpp{wpp} w4",
                            dtype=dtype,
                            signature=sig,
                            constexprs=consts,
                            options={"num_warps": 4, "num_stages": 3},
                            flop=flop,
                            hbm_bytes=nbytes,
                            problem=f"HTS-AT-{model} stage 1 (64x64 tokens, {heads} heads), B=64",
                            tensor_core=dtype != "fp32",
                        )
                    )
    return specs
