"""Swin (shifted) window attention, pure PyTorch reference (same signature as
``kernels.window_attention.window_attention``).

Math (HTS-AT / Swin, as LAION CLAP computes it), for a token grid of H x W and window w::

    qkv      (B, H, W, 3C) the fused projection output in token layout; channel s*C + h*D + d
             holds part s (q, k, v) of head h, dim d (D = C / heads)
    shift    roll the grid by (-shift, -shift)        (shift 0 or w / 2)
    windows  w x w tiles, tokens in row-major order inside a tile
    scores   (q * D**-0.5) @ k^T + table[rel_index]   (table: ((2w-1)^2, heads))
             + mask                                   (-100 between different shift regions)
    out      softmax(scores) @ v, tiles put back, roll by (+shift, +shift)  -> (B, H, W, C)

The output is in token layout, ready for the output projection. Because the qkv and output
projections act per token, projecting before the roll/partition (here) equals LAION's order.
This reference materialises B * nW * heads * w^4 scores; the Triton kernel does not.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["window_attention", "relative_position_index", "shift_mask"]


@functools.lru_cache(maxsize=16)
@torch.inference_mode(False)  # a cached inference tensor would break autograd later
def _relative_position_index_cpu(window_size: int) -> torch.Tensor:
    coords = torch.stack(
        torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing="ij")
    ).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    rel = rel + (window_size - 1)
    return rel[..., 0] * (2 * window_size - 1) + rel[..., 1]


def relative_position_index(window_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(w*w, w*w) int64: the standard Swin relative-position index into the bias table."""
    return _relative_position_index_const(window_size).to(device)


@functools.lru_cache(maxsize=32)
@torch.inference_mode(False)
def _shift_mask_cpu(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    img = torch.zeros(height, width)
    cnt = 0
    for hs in (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None)):
        for ws in (
            slice(0, -window_size),
            slice(-window_size, -shift_size),
            slice(-shift_size, None),
        ):
            img[hs, ws] = cnt
            cnt += 1
    win = _partition(img[None, :, :, None], window_size).reshape(-1, window_size * window_size)
    diff = win[:, None, :] - win[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))


# assume_constant_result: torch.compile takes the cached tensors as constants instead of tracing
# their construction (tracing the masked region fill made torch 2.11's vectorised CPU codegen
# emit C++ that does not compile).
@torch.compiler.assume_constant_result
def _shift_mask_const(height: int, width: int, window_size: int, shift_size: int) -> torch.Tensor:
    return _shift_mask_cpu(height, width, window_size, shift_size)


@torch.compiler.assume_constant_result
def _relative_position_index_const(window_size: int) -> torch.Tensor:
    return _relative_position_index_cpu(window_size)


def shift_mask(
    height: int, width: int, window_size: int, shift_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """(nW, w*w, w*w) float32 additive mask of a shifted block: 0 inside a region, -100 across."""
    return _shift_mask_const(height, width, window_size, shift_size).to(device)


def _partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * nW, w, w, C)."""
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w, w, c)


def _reverse(windows: torch.Tensor, w: int, h: int, wd: int) -> torch.Tensor:
    """(B * nW, w, w, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // w) * (wd // w))
    x = windows.view(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, c)


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
    """Shifted-window multi-head attention with relative-position bias.

    Args:
        qkv: (B, H, W, 3C) fp32/fp16/bf16, H and W multiples of window_size.
        bias_table: ((2w-1)^2, num_heads) relative-position bias table.
        num_heads: heads; C must be a multiple of it.
        window_size: w (8 in HTS-AT).
        shift_size: 0 or w // 2 (cyclic shift with the -100 region mask).
        scale: q scale, default head_dim ** -0.5.
        upcast: compute in float32 and cast the output back (the reference for low precision).

    Returns:
        (B, H, W, C) in qkv's dtype, token layout.
    """
    b, h, wd, c3 = qkv.shape
    c = c3 // 3
    if c3 % 3 or c % num_heads:
        raise ValueError(f"qkv last dim {c3} is not 3 * heads * head_dim for {num_heads} heads")
    if h % window_size or wd % window_size:
        raise ValueError(f"grid {h}x{wd} is not a multiple of window {window_size}")
    d = c // num_heads
    scale = d**-0.5 if scale is None else scale
    in_dtype = qkv.dtype
    if upcast:
        qkv = qkv.float()
        bias_table = bias_table.float()
    x = qkv
    if shift_size > 0:
        x = torch.roll(x, shifts=(-shift_size, -shift_size), dims=(1, 2))
    n = window_size * window_size
    win = _partition(x, window_size).reshape(-1, n, 3, num_heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = win[0] * scale, win[1], win[2]
    attn = q @ k.transpose(-2, -1)  # (B*nW, heads, n, n)
    index = relative_position_index(window_size, qkv.device)
    # contiguous: inductor folds this into a constant and vectorises the fused bias-add + softmax
    # only when it is read with unit stride (a permuted view made it scalar: 87 ms -> 20 ms of
    # softmax per HTSAT-tiny batch of 8 in int8_compile on 2 cores)
    bias = bias_table[index.view(-1)].view(n, n, num_heads).permute(2, 0, 1).contiguous()
    attn = attn + bias.unsqueeze(0).to(attn.dtype)
    if shift_size > 0:
        mask = shift_mask(h, wd, window_size, shift_size, qkv.device).to(attn.dtype)
        nw = mask.shape[0]
        attn = attn.view(-1, nw, num_heads, n, n) + mask[None, :, None]
        attn = attn.view(-1, num_heads, n, n)
    attn = torch.softmax(attn, dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(-1, window_size, window_size, c)
    out = _reverse(out, window_size, h, wd)
    if shift_size > 0:
        out = torch.roll(out, shifts=(shift_size, shift_size), dims=(1, 2))
    return out.to(in_dtype)
