"""Swin (shifted) window attention for HTS-AT, fused forward and backward Triton kernels (v2).

Math (same as ``kernels/window_attention_ref.py``), token grid H x W, window w, N = w*w tokens
per window, head dim D = C / heads::

    qkv (B, H, W, 3C), channel s*C + h*D + d = part s (q, k, v) of head h, dim d
    token (ys, xs) of the rolled grid reads/writes grid cell ((ys + shift) % H, (xs + shift) % W)
    S = scale * (q @ k^T) + table[rel(i, j), h] + mask(i, j)          (N x N, fp32)
        rel(i, j) = (y_i - y_j + w - 1) * (2w - 1) + (x_i - x_j + w - 1)  (in-window coordinates)
        mask(i, j) = -100 if region(i) != region(j) else 0   (all 0 when shift = 0)
        region = 3 * r(ys, H) + r(xs, W),  r(c, L) = [c >= L - w] + [c >= L - shift]
                 (LAION's img_mask slices (0, -w), (-w, -shift), (-shift, None))
    P = softmax(S) (fp32),  out = P @ v  -> (B, H, W, C) in token layout, rolled back
    lse = rowmax(S) + log(rowsum(exp(S - rowmax)))   saved, (B*nW, heads, N) fp32

Backward (P recomputed from lse; nothing of size N^2 is saved)::

    dv = P^T dO,  dP = dO v^T,  delta = rowsum(dO * out),  dS = P * (dP - delta)
    dq = scale * dS k,  dk = scale * dS^T q,
    d table[r, h] = sum over windows, (i, j) with rel(i, j) = r, of dS[i, j]

Precision (FlashAttention-2 style): bf16/fp16 q, k, v, dO go straight into ``tl.dot`` (tensor
cores) with fp32 accumulation; softmax, lse and dS are fp32; P and dS are rounded to the input
dtype for the dots that consume them (P v, P^T dO, dS k, dS^T q). fp32 inputs use IEEE fp32 dots
by default or TF32 when asked (``precision="tf32"``). The interpreter (no bf16 dot there) upcasts
the rounded operands to fp32, so it computes the same roundings with exact products.

Work split: one program = a run-time number of consecutive windows (``windows_per_program``) and
a run-time group of consecutive heads (``heads_per_program``; all heads unless the batch has too
few windows to fill the GPU). For each window the program walks its heads in channel order, so it
reads the window's qkv rows contiguously (all heads: whole rows) and neighbouring head slices
share their 32-byte sectors in L1 instead of being fetched by programs in different waves. The
grid is 1-D with the head group fastest. Every batch-dependent value is a run-time argument
excluded from Triton's integer specialisation, so one compile serves every batch size: one
compile per (dtype, window, head dim, precision).

Bias-table gradient without float atomics: each (window, head) folds its dS into the
(2w-1) x (2w-1) relative offsets in registers (dS reshaped to rows (y_i, y_j), columns
(x_i, x_j), then two small dots with 0/1 selection matrices: T = Sel^T A Sel) and stores one
16 x 16 fp32 tile; torch sums the tiles over windows in a fixed order, so two backward passes
give bit-identical gradients.

HBM traffic per token (ideal: q, k, v read once, o written once; elements of the input dtype):
forward 3C in + C out (+ 4 B x heads of lse); backward 3C + C + C in (qkv, o, dO), 3C out, + lse,
+ 1 KB per (window, head) of fold tiles (16 B per token per head for w = 8). HTS-AT-tiny stage 1
(C = 96, bf16): forward 768 B + 16 B lse per token, backward 1,536 B + 16 B lse + 64 B tiles.
The bias is read from a dense (heads, N, N) fp32 copy of the table (16 KB per head, made by the
launcher): L1/L2 traffic, re-read for every (window, head).
Static sm_90a estimate (Triton 3.6's ptxas, no GPU; ``report_specs()``, kernels/README.md):
window 8, no spills at head dims 24-64 in bf16/fp16 (fp32 IEEE and TF32 too): forward 4 warps,
164-186 registers; backward 8 warps, 220-246 registers; HGMMA for the attention dots, 16-byte
global accesses. HTS-AT-tiny stage 1, B = 64, bf16 is memory-bound: ~61 us forward, ~127 us
backward at an H100's 3.35 TB/s. UNMEASURED on a GPU (none lent so far).

Supported: head dim <= 64 (24 and 48 padded to 32 / 64 with masks), window 4 or 8,
0 <= shift < window, H and W multiples of the window, fp32 / fp16 / bf16 qkv, bias table of any
float dtype (read as fp32). Not supported: attention masks other than the Swin shift mask,
dropout, non-square windows, double backward. Runs under Triton's interpreter
(``TRITON_INTERPRET=1``) on CPU tensors.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.window_attention_ref import relative_position_index

__all__ = ["window_attention", "report_specs"]

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Batch-dependent (or stage-dependent) integers: never specialised, so no recompiles.
_RUNTIME_INTS = [
    "num_windows",
    "num_heads",
    "grid_h",
    "grid_w",
    "shift",
    "windows_per_program",
    "heads_per_program",
    "num_groups",
]
FOLD = 16  # fold tile side: 2w - 1 <= 15 relative offsets per axis, padded for tl.dot


@triton.jit
def _operand(x, INTERPRET: tl.constexpr):
    """A loaded input-dtype tile as a dot operand (the interpreter has no bf16 dot: fp32)."""
    if INTERPRET:
        x = x.to(tl.float32)
    return x


@triton.jit
def _round(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 tile rounded to ``dtype`` (round to nearest even). The interpreter's fp32 -> bf16
    cast truncates, so there the rounding is done on the bits and the tile stays fp32."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        else:
            x = x.to(dtype).to(tl.float32)
    else:
        x = x.to(dtype)
    return x


@triton.jit
def _window_cells(win, n_win_img, n_wx, ty, tx, grid_h, grid_w, shift, WINDOW: tl.constexpr):
    """Batch index (scalar: a window lies in one image), source grid cells (y, x) and shift
    region of one window's tokens. Cyclic shift by index: rolled cell (ys, xs) is grid cell
    (ys + shift, xs + shift). With shift 0 all tokens of a window share a region (no mask)."""
    b = (win // n_win_img).to(tl.int64)
    wl = win % n_win_img
    ys = (wl // n_wx) * WINDOW + ty
    xs = (wl % n_wx) * WINDOW + tx
    ry = (ys >= grid_h - WINDOW).to(tl.int32) + (ys >= grid_h - shift).to(tl.int32)
    rx = (xs >= grid_w - WINDOW).to(tl.int32) + (xs >= grid_w - shift).to(tl.int32)
    return b, (ys + shift) % grid_h, (xs + shift) % grid_w, ry * 3 + rx


@triton.jit
def _rows(b, y, x, stride_b, stride_h, stride_w, shift_by, ROW_ALIGN: tl.constexpr):
    """(N,) int64 element offsets of a window's token rows (+ ``shift_by`` channels). The
    launcher checked every stride and the channel count are multiples of ROW_ALIGN, so the
    hint lets the compiler use 16-byte loads and stores without specialising on the strides."""
    # Two hints: a ``+ 0`` folds away and would take a single hint with it.
    row = tl.multiple_of(b * stride_b + y * stride_h + x * stride_w, ROW_ALIGN)
    return tl.multiple_of(row + shift_by, ROW_ALIGN)


@triton.jit
def _scores(q, k, bias_ptr, head, t, region, scale, N: tl.constexpr, PREC: tl.constexpr):
    """(N, N) fp32 scores scale * q k^T + bias + LAION's -100 between shift regions (the
    forward and the backward share this, so the recomputed P is the forward's P). The bias
    comes from the dense (heads, N, N) fp32 copy of the table, contiguous 16-byte loads (it is
    16 KB per head, L1/L2-resident; a gather by index from the table cost ~30 more registers)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
    # evict_last: the bias is re-read for every window (L1-resident while heads x 16 KB fits).
    s += tl.load(
        bias_ptr + head * (N * N) + t[:, None] * N + t[None, :], eviction_policy="evict_last"
    )
    return s + tl.where(region[:, None] != region[None, :], -100.0, 0.0)


@triton.jit
def _fold(ds, WINDOW: tl.constexpr, PREC: tl.constexpr):
    """(N, N) dS -> (16, 16) sums per relative offset [dy + w - 1, dx + w - 1]: rows regrouped
    to (y_i, y_j) x (x_i, x_j), then Sel^T A Sel with Sel[(a, b), r] = [a - b + w - 1 == r]."""
    N: tl.constexpr = WINDOW * WINDOW
    a = tl.reshape(
        tl.permute(tl.reshape(ds, (WINDOW, WINDOW, WINDOW, WINDOW)), (0, 2, 1, 3)), (N, N)
    )
    u = tl.arange(0, N)
    r = tl.arange(0, 16)
    sel = ((u // WINDOW - u % WINDOW + WINDOW - 1)[:, None] == r[None, :]).to(tl.float32)
    t = tl.dot(tl.trans(sel), a, input_precision=PREC)
    return tl.dot(t, sel, input_precision=PREC)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _window_attn_fwd_kernel(
    qkv_ptr,
    bias_ptr,
    out_ptr,
    lse_ptr,
    stride_qkv_b,
    stride_qkv_h,
    stride_qkv_w,
    stride_out_b,
    stride_out_h,
    stride_out_w,
    num_windows,
    num_heads,
    grid_h,
    grid_w,
    channels,
    shift,
    windows_per_program,
    heads_per_program,
    num_groups,
    scale,
    WINDOW: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    group = pid % num_groups
    chunk = pid // num_groups
    N: tl.constexpr = WINDOW * WINDOW
    dtype = out_ptr.dtype.element_ty
    t = tl.arange(0, N)
    ty = t // WINDOW
    tx = t % WINDOW
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    n_wx = grid_w // WINDOW
    n_win_img = (grid_h // WINDOW) * n_wx
    for i in range(windows_per_program):
        win = chunk * windows_per_program + i
        valid = win < num_windows
        b, y, x, region = _window_cells(win, n_win_img, n_wx, ty, tx, grid_h, grid_w, shift, WINDOW)
        q_row = _rows(b, y, x, stride_qkv_b, stride_qkv_h, stride_qkv_w, 0, ROW_ALIGN)
        k_row = _rows(b, y, x, stride_qkv_b, stride_qkv_h, stride_qkv_w, channels, ROW_ALIGN)
        v_row = _rows(b, y, x, stride_qkv_b, stride_qkv_h, stride_qkv_w, 2 * channels, ROW_ALIGN)
        o_row = _rows(b, y, x, stride_out_b, stride_out_h, stride_out_w, 0, ROW_ALIGN)
        ld_mask = d_ok[None, :] & valid
        for hh in range(heads_per_program):
            head = group * heads_per_program + hh
            col = head * HEAD_DIM + d
            q = tl.load(qkv_ptr + q_row[:, None] + col[None, :], mask=ld_mask, other=0.0)
            k = tl.load(qkv_ptr + k_row[:, None] + col[None, :], mask=ld_mask, other=0.0)
            v = tl.load(qkv_ptr + v_row[:, None] + col[None, :], mask=ld_mask, other=0.0)
            q = _operand(q, INTERPRET)
            k = _operand(k, INTERPRET)
            v = _operand(v, INTERPRET)
            s = _scores(q, k, bias_ptr, head, t, region, scale, N, DOT_PRECISION)
            m = tl.max(s, axis=1)
            p = tl.exp(s - m[:, None])
            l = tl.sum(p, axis=1)
            pv = _round(p, dtype, INTERPRET)
            o = tl.dot(pv, v, input_precision=DOT_PRECISION) / l[:, None]
            tl.store(
                out_ptr + o_row[:, None] + col[None, :],
                _round(o, dtype, INTERPRET).to(dtype),
                mask=ld_mask,
            )
            lse_off = (win.to(tl.int64) * num_heads + head) * N + t
            tl.store(lse_ptr + lse_off, m + tl.log(l), mask=(t < N) & valid)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _window_attn_bwd_kernel(
    qkv_ptr,
    bias_ptr,
    out_ptr,
    dout_ptr,
    lse_ptr,
    dqkv_ptr,
    fold_ptr,
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
    num_windows,
    num_heads,
    grid_h,
    grid_w,
    channels,
    shift,
    windows_per_program,
    heads_per_program,
    num_groups,
    scale,
    WINDOW: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ROW_ALIGN: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    pid = tl.program_id(0)
    group = pid % num_groups
    chunk = pid // num_groups
    N: tl.constexpr = WINDOW * WINDOW
    dtype = dqkv_ptr.dtype.element_ty
    t = tl.arange(0, N)
    ty = t // WINDOW
    tx = t % WINDOW
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    f = tl.arange(0, 16)
    fold_off = f[:, None] * 16 + f[None, :]
    n_wx = grid_w // WINDOW
    n_win_img = (grid_h // WINDOW) * n_wx
    for i in range(windows_per_program):
        win = chunk * windows_per_program + i
        valid = win < num_windows
        b, y, x, region = _window_cells(win, n_win_img, n_wx, ty, tx, grid_h, grid_w, shift, WINDOW)
        q_row = _rows(b, y, x, stride_qkv_b, stride_qkv_h, stride_qkv_w, 0, ROW_ALIGN)
        k_row = _rows(b, y, x, stride_qkv_b, stride_qkv_h, stride_qkv_w, channels, ROW_ALIGN)
        v_row = _rows(b, y, x, stride_qkv_b, stride_qkv_h, stride_qkv_w, 2 * channels, ROW_ALIGN)
        o_row = _rows(b, y, x, stride_out_b, stride_out_h, stride_out_w, 0, ROW_ALIGN)
        do_row = _rows(b, y, x, stride_dout_b, stride_dout_h, stride_dout_w, 0, ROW_ALIGN)
        dq_row = _rows(b, y, x, stride_dqkv_b, stride_dqkv_h, stride_dqkv_w, 0, ROW_ALIGN)
        dk_row = _rows(b, y, x, stride_dqkv_b, stride_dqkv_h, stride_dqkv_w, channels, ROW_ALIGN)
        dv_row = _rows(
            b, y, x, stride_dqkv_b, stride_dqkv_h, stride_dqkv_w, 2 * channels, ROW_ALIGN
        )
        ld_mask = d_ok[None, :] & valid
        for hh in range(heads_per_program):
            head = group * heads_per_program + hh
            col = head * HEAD_DIM + d
            # Order chosen for register pressure: each result is stored as soon as it exists.
            do = tl.load(dout_ptr + do_row[:, None] + col[None, :], mask=ld_mask, other=0.0)
            o = tl.load(out_ptr + o_row[:, None] + col[None, :], mask=ld_mask, other=0.0)
            delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
            lse_off = (win.to(tl.int64) * num_heads + head) * N + t
            lse = tl.load(lse_ptr + lse_off, mask=(t < N) & valid, other=0.0)
            q = tl.load(qkv_ptr + q_row[:, None] + col[None, :], mask=ld_mask, other=0.0)
            k = tl.load(qkv_ptr + k_row[:, None] + col[None, :], mask=ld_mask, other=0.0)
            q = _operand(q, INTERPRET)
            k = _operand(k, INTERPRET)
            s = _scores(q, k, bias_ptr, head, t, region, scale, N, DOT_PRECISION)
            p = tl.exp(s - lse[:, None])
            # Past-the-end windows load dO = 0, so dS = 0 and their (masked) stores are no-ops.
            do = _operand(do, INTERPRET)
            dv = tl.dot(tl.trans(_round(p, dtype, INTERPRET)), do, input_precision=DOT_PRECISION)
            dv = _round(dv, dtype, INTERPRET).to(dtype)
            tl.store(dqkv_ptr + dv_row[:, None] + col[None, :], dv, mask=ld_mask)
            v = tl.load(qkv_ptr + v_row[:, None] + col[None, :], mask=ld_mask, other=0.0)
            v = _operand(v, INTERPRET)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            tile = fold_ptr + (win.to(tl.int64) * num_heads + head) * 256
            tl.store(tile + fold_off, _fold(ds, WINDOW, DOT_PRECISION), mask=valid)
            dsr = _round(ds, dtype, INTERPRET)
            dq = tl.dot(dsr, k, input_precision=DOT_PRECISION) * scale
            dq = _round(dq, dtype, INTERPRET).to(dtype)
            tl.store(dqkv_ptr + dq_row[:, None] + col[None, :], dq, mask=ld_mask)
            dk = tl.dot(tl.trans(dsr), q, input_precision=DOT_PRECISION) * scale
            dk = _round(dk, dtype, INTERPRET).to(dtype)
            tl.store(dqkv_ptr + dk_row[:, None] + col[None, :], dk, mask=ld_mask)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@dataclass(frozen=True)
class _Split:
    """How the (window, head) pairs are dealt to programs (all run-time kernel arguments)."""

    windows_per_program: int
    heads_per_program: int
    num_groups: int
    num_programs: int


def _split(num_windows: int, num_heads: int, sm_count: int | None) -> _Split:
    """Work split. Interpreter (``sm_count`` None): one program for everything (a program costs
    milliseconds there). GPU: about 4 programs per SM, each with whole windows; heads are split
    into power-of-two groups only when there are too few windows for 2 programs per SM (HTS-AT's
    last stage at small batch), so neighbouring head slices stay in one program."""
    if sm_count is None:
        return _Split(num_windows, num_heads, 1, 1)
    groups = 1
    while num_windows * groups < 2 * sm_count and num_heads % (2 * groups) == 0:
        groups *= 2
    per_group = max(1, (4 * sm_count) // groups)
    wpp = triton.cdiv(num_windows, min(num_windows, per_group))
    programs = triton.cdiv(num_windows, wpp)
    return _Split(wpp, num_heads // groups, groups, programs * groups)


def _row_align(*tensors: torch.Tensor) -> int:
    """Largest power of two <= 8 dividing the (B, H, W) strides of every tensor and the channel
    count C (in elements): the promise behind ``_rows``' hint. 8 for contiguous HTS-AT tensors
    whatever the batch, so it adds no compile per batch size."""
    g = tensors[0].shape[-1] // 3
    for t in tensors:
        for st in t.stride()[:3]:
            g = math.gcd(g, st)
    return math.gcd(g, 8)


def _constexprs(
    qkv: torch.Tensor, num_heads: int, window_size: int, precision: str, *others: torch.Tensor
) -> dict:
    d = qkv.shape[-1] // 3 // num_heads
    return dict(
        WINDOW=window_size,
        HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        # fp32 inputs: IEEE fp32 (default, as PyTorch's matmul) or TF32; bf16/fp16 operands go
        # to the tensor cores as they are (the precision string only matters for fp32 operands).
        DOT_PRECISION=precision if qkv.dtype == torch.float32 else "tf32",
        ROW_ALIGN=_row_align(qkv, *others),
        INTERPRET=_INTERPRET,
    )


def _options(kind: str, window_size: int, fma_dots: bool) -> dict:
    """Launch options ("fwd" / "bwd"; ``fma_dots`` for fp32 IEEE, no tensor cores). Offline
    ptxas for sm_90a (no GPU run yet), window 8: the bf16/fp16 forward fits 4 warps (164-186
    registers: 2-3 programs per SM), the backward needs 8 (4 warps spill 64 B at head dim 64;
    8 warps: 220-246 registers, one program per SM), and so does the fp32 IEEE forward (280 B
    of spills at 4 warps); window 4's 16-token tiles use 4 warps. One stage: nothing to
    pipeline across iterations beyond the loads the warps already overlap."""
    wide = window_size == 8 and (kind == "bwd" or fma_dots)
    return dict(num_warps=8 if wide else 4, num_stages=1)


def _dense_bias(bias_table: torch.Tensor, window_size: int) -> torch.Tensor:
    """((2w-1)^2, heads) table -> (heads, N, N) fp32, contiguous: the bias tile of every head
    (16 KB per head at w = 8; one small gather per call)."""
    index = _rel_index(window_size, bias_table.device)
    return bias_table.float().t()[:, index].contiguous()


@functools.lru_cache(maxsize=16)
def _rel_index(window_size: int, device: torch.device) -> torch.Tensor:
    """(N, N) relative-position index on ``device``, copied there once (not per call)."""
    return relative_position_index(window_size, device)


@dataclass
class _Launch:
    kernel: object
    grid: tuple[int]
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)


def _sm(qkv: torch.Tensor) -> int | None:
    return _sm_count(qkv.device.index or 0) if qkv.is_cuda else None


def _fwd_launch(
    qkv, bias, out, lse, num_heads, window_size, shift_size, scale, precision, sm_count
):
    """The forward kernel's launch (grid, arguments) for these tensors, without running it."""
    b, h, wd, c3 = qkv.shape
    num_windows = lse.shape[0]
    sp = _split(num_windows, num_heads, sm_count)
    args = (
        qkv,
        bias,
        out,
        lse,
        *qkv.stride()[:3],
        *out.stride()[:3],
        num_windows,
        num_heads,
        h,
        wd,
        c3 // 3,
        shift_size,
        sp.windows_per_program,
        sp.heads_per_program,
        sp.num_groups,
        scale,
    )
    consts = _constexprs(qkv, num_heads, window_size, precision, out)
    kw = dict(**consts, **_options("fwd", window_size, consts["DOT_PRECISION"] == "ieee"))
    return _Launch(_window_attn_fwd_kernel, (sp.num_programs,), args, kw)


def _bwd_launch(
    grad_out,
    qkv,
    bias,
    out,
    lse,
    dqkv,
    fold,
    num_heads,
    window_size,
    shift_size,
    scale,
    precision,
    sm_count,
):
    """The backward kernel's launch for these tensors, without running it."""
    b, h, wd, c3 = qkv.shape
    num_windows = lse.shape[0]
    sp = _split(num_windows, num_heads, sm_count)
    args = (
        qkv,
        bias,
        out,
        grad_out,
        lse,
        dqkv,
        fold,
        *qkv.stride()[:3],
        *out.stride()[:3],
        *grad_out.stride()[:3],
        *dqkv.stride()[:3],
        num_windows,
        num_heads,
        h,
        wd,
        c3 // 3,
        shift_size,
        sp.windows_per_program,
        sp.heads_per_program,
        sp.num_groups,
        scale,
    )
    consts = _constexprs(qkv, num_heads, window_size, precision, out, grad_out, dqkv)
    kw = dict(**consts, **_options("bwd", window_size, consts["DOT_PRECISION"] == "ieee"))
    return _Launch(_window_attn_bwd_kernel, (sp.num_programs,), args, kw)


@torch.library.custom_op("clap_fast::window_attention_fwd", mutates_args=())
def _window_attention_fwd(
    qkv: torch.Tensor,
    bias_table: torch.Tensor,
    num_heads: int,
    window_size: int,
    shift_size: int,
    scale: float,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv (B, H, W, 3C), table ((2w-1)^2, heads) -> out (B, H, W, C), lse (B*nW, heads, N) fp32."""
    b, h, wd, c3 = qkv.shape
    n = window_size * window_size
    num_windows = b * (h // window_size) * (wd // window_size)
    out = qkv.new_empty((b, h, wd, c3 // 3))
    lse = torch.empty((num_windows, num_heads, n), device=qkv.device, dtype=torch.float32)
    _fwd_launch(
        qkv,
        _dense_bias(bias_table, window_size),
        out,
        lse,
        num_heads,
        window_size,
        shift_size,
        scale,
        precision,
        _sm(qkv),
    )()
    return out, lse


@_window_attention_fwd.register_fake
def _(qkv, bias_table, num_heads, window_size, shift_size, scale, precision):
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
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out (B, H, W, C) -> d qkv (B, H, W, 3C) in qkv's dtype, d table in the table's dtype."""
    num_windows = lse.shape[0]
    grad_out = grad_out.contiguous()
    dqkv = torch.empty_like(qkv)
    # One 16 x 16 fp32 fold tile per (window, head): 1 KB, e.g. 16.8 MB at HTS-AT-tiny stage 1,
    # batch 64 (4,096 windows x 4 heads), against ~400 MB of qkv / o / dO / dqkv traffic.
    fold = torch.empty((num_windows, num_heads, FOLD, FOLD), device=qkv.device, dtype=torch.float32)
    _bwd_launch(
        grad_out,
        qkv,
        _dense_bias(bias_table, window_size),
        out,
        lse,
        dqkv,
        fold,
        num_heads,
        window_size,
        shift_size,
        scale,
        precision,
        _sm(qkv),
    )()
    # Deterministic: a fixed-order sum over windows, then the valid (2w-1) x (2w-1) offsets.
    r = 2 * window_size - 1
    dtable = fold.sum(0)[:, :r, :r].reshape(num_heads, r * r).t()
    return dqkv, dtable.to(bias_table.dtype).contiguous()


@_window_attention_bwd.register_fake
def _(grad_out, qkv, bias_table, out, lse, num_heads, window_size, shift_size, scale, precision):
    return torch.empty_like(qkv), torch.empty_like(bias_table)


def _setup_context(ctx, inputs, output) -> None:
    qkv, bias_table, num_heads, window_size, shift_size, scale, precision = inputs
    out, lse = output
    ctx.save_for_backward(qkv, bias_table, out, lse)
    ctx.params = (num_heads, window_size, shift_size, scale, precision)


def _backward(ctx, grad_out, grad_lse):
    qkv, bias_table, out, lse = ctx.saved_tensors
    dqkv, dtable = _window_attention_bwd(grad_out, qkv, bias_table, out, lse, *ctx.params)
    return dqkv, dtable, None, None, None, None, None


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
    precision: str = "ieee",
) -> torch.Tensor:
    """Shifted-window multi-head attention with relative-position bias (Triton).

    Args:
        qkv: (B, H, W, 3C) fp32/fp16/bf16, H and W multiples of window_size, channel stride 1.
        bias_table: ((2w-1)^2, num_heads) relative-position bias table, any float dtype.
        num_heads: heads; C must be a multiple of it, head dim <= 64.
        window_size: w, 4 or 8 (8 in HTS-AT).
        shift_size: 0 <= shift < w (cyclic shift with LAION's -100 region mask).
        scale: q scale, default head_dim ** -0.5.
        upcast: accepted for signature parity with the reference; softmax and accumulation are
            always fp32, and bf16/fp16 operands always feed the tensor cores as they are.
        precision: dot precision for fp32 qkv, "ieee" (default) or "tf32"; ignored otherwise.

    Returns:
        (B, H, W, C) in qkv's dtype, token layout. Differentiable in qkv and bias_table.
    """
    del upcast
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
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    if qkv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"qkv dtype {qkv.dtype} is not fp32, fp16 or bf16")
    if qkv.stride(-1) != 1:
        qkv = qkv.contiguous()  # copies: the kernel needs unit channel stride
    scale = (c // num_heads) ** -0.5 if scale is None else float(scale)
    out, _ = _window_attention_fwd(
        qkv, bias_table, num_heads, window_size, shift_size, scale, precision
    )
    return out


# ----------------------------------------------------------------- static report (sm_90a)

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _report_problem(head_dim: int) -> tuple[str, int, int, int, int]:
    """(name, tokens, channels, heads, windows) of the reference problem for one head dim."""
    b, grid, heads, w = 64, 64, 4, 8
    name = (
        "HTS-AT-tiny stage 1, B=64"
        if head_dim == 24
        else f"B=64, 64x64 grid, 4 heads x {head_dim}, w=8"
    )
    tokens = b * grid * grid
    return name, tokens, heads * head_dim, heads, tokens // (w * w)


def _cost(kind: str, head_dim: int, elem: int, window: int) -> tuple[str, int, int]:
    """(problem, flop, HBM bytes) per call from the kernel's own formulas (window 8 problem)."""
    name, tokens, c, heads, windows = _report_problem(head_dim)
    n = window * window
    pairs = windows * heads * (64 // n)  # same tokens in windows of n
    lse = pairs * n * 4
    if kind == "fwd":
        return name, pairs * 4 * n * n * head_dim, tokens * 4 * c * elem + lse
    fold = pairs * (2 * FOLD * n * n + 2 * FOLD * n * FOLD)
    nbytes = tokens * 8 * c * elem + lse + pairs * FOLD * FOLD * 4
    return name, pairs * 10 * n * n * head_dim + fold, nbytes


def report_specs() -> list[dict]:
    """Every (kernel, configuration) this module can launch on a GPU, for python -m kernels.report.

    Pure Python (no CUDA call): bf16/fp16 at head dims 24, 32, 48, 64 with window 8 (and 4 at
    head dim 32), fp32 IEEE and TF32 at head dim 24, forward and backward, as launched on a GPU
    (``_options``). Every listed configuration was checked free of spills with Triton 3.6's
    ptxas for sm_90a.
    """
    configs = [(dt, 8, d, "tf32") for dt in ("bf16", "fp16") for d in (24, 32, 48, 64)]
    configs += [("bf16", 4, 32, "tf32"), ("fp32", 8, 24, "ieee"), ("fp32", 8, 24, "tf32")]
    fp32_ptrs = {"bias_ptr", "lse_ptr", "fold_ptr"}
    specs = []
    for kind, fn in (("fwd", _window_attn_fwd_kernel), ("bwd", _window_attn_bwd_kernel)):
        for dt, window, d, prec in configs:
            consts = dict(
                WINDOW=window,
                HEAD_DIM=d,
                BLOCK_D=max(16, triton.next_power_of_2(d)),
                DOT_PRECISION=prec,
                ROW_ALIGN=8,
                INTERPRET=False,
            )
            sig = {}
            for name in fn.arg_names:
                if name in consts:
                    sig[name] = "constexpr"
                elif name.endswith("_ptr"):
                    sig[name] = "*fp32" if name in fp32_ptrs else f"*{dt}"
                else:
                    sig[name] = "fp32" if name == "scale" else "i32"
            elem = 4 if dt == "fp32" else 2
            problem, flop, nbytes = _cost(kind, d, elem, window)
            specs.append(
                dict(
                    fn=fn,
                    config=f"{kind} win{window} hd{d}" + (f" {prec}" if dt == "fp32" else ""),
                    dtype=dt,
                    signature=sig,
                    constexprs=consts,
                    options=_options(kind, window, prec == "ieee"),
                    flop=flop,
                    hbm_bytes=nbytes,
                    problem=problem,
                    tensor_core=prec == "tf32",
                )
            )
    return specs
