"""Contrastive (CLIP / CLAP) loss, blockwise pure-PyTorch reference (same signature as
``kernels.contrastive.contrastive_loss``).

Math. One direction of the symmetric loss: rows of this rank's features A against all features
B of the other modality, with ``s`` the already exponentiated logit scale::

    L[i, j] = s * a_i . b_j                               (never materialised as a whole)
    loss    = mean_i [ logsumexp_j L[i, j] - L[i, offset + i] ]

Gradients, with P = softmax over rows of L, delta[i, j] = (j == offset + i) and
G = (P - delta) / n::

    dA = s * G @ B,   dB = s * G^T @ A,   ds = sum_ij G[i, j] * (a_i . b_j) = sum(A * (G @ B))

The symmetric variant (n == N, single process) averages both directions of one square L::

    loss_sym = (mean_i [lse_row_i - L[i, i]] + mean_j [lse_col_j - L[j, j]]) / 2
    G_sym    = (P_row - I + P_col - I) / (2 n)       P_col = softmax over columns of L

How. Rows are processed in blocks of ``block_rows(N)`` rows, so the largest temporary is one
(rows, N) fp32 block (at most 2^22 elements = 16 MiB). When a gradient is needed, the forward
pass computes it in the same sweep (the block's softmax is at hand) and keeps only dA, dB, ds:
memory O((n + N) d) plus one block, and the same three matmuls as the naive loss.
Per row the loss is formed from the running max m, the target logit x_t and the off-target sum
r = sum_{j != t} exp(x_j - m) (log1p(r / exp(x_t - m)) when x_t is near the max), so a tiny
loss keeps its relative precision instead of cancelling in ``lse - x_t``; likewise the target
entry of G is -r / (exp(x_t - m) + r), not P_t - 1. The symmetric
variant needs the column log-sum-exp before any gradient, so it sweeps twice (three matmuls for
both directions, where two naive directions cost six).

Limits: inputs of any float dtype are computed in fp32 (the result is fp32); double backward
is not supported; ``offset + n <= N``.
"""

from __future__ import annotations

import torch

__all__ = [
    "contrastive_loss",
    "contrastive_loss_symmetric",
    "contrastive_loss_naive",
    "contrastive_loss_symmetric_naive",
    "block_rows",
]

_BLOCK_ELEMS = 1 << 22  # elements of the largest temporary (fp32: 16 MiB)


def block_rows(num_cols: int) -> int:
    """Rows per block so that one (rows, num_cols) fp32 block holds at most 2^22 elements."""
    return max(1, min(4096, _BLOCK_ELEMS // max(1, num_cols)))


def _check(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, offset: int) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"A must be (n, d) and B (N, d); got {tuple(a.shape)}, {tuple(b.shape)}")
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must be 0-d or shape (1,), got {tuple(scale.shape)}")
    if offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"offset {offset} + n {a.shape[0]} exceeds N {b.shape[0]}")


def _finish(m: torch.Tensor, x_t: torch.Tensor, r: torch.Tensor):
    """Per-row loss, lse and q = 1 - P[i, t_i] from the row max m, target logit x_t and
    r = sum_{j != t} exp(x_j - m), without the cancellation of ``lse - x_t`` for tiny losses."""
    e_t = torch.exp(x_t - m)
    z = e_t + r
    gap = m - x_t
    loss = torch.where(gap > 1, gap + torch.log(z), torch.log1p(r / e_t))
    return loss, m + torch.log(z), r / z


def _sweep(
    a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, offset: int, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over row blocks. a (n, d), b (N, d) fp32, s 0-d fp32.

    Returns the loss (0-d) and, when ``with_grad``, dA (n, d), dB (N, d), ds (0-d) of that loss.
    """
    n, N = a.shape[0], b.shape[0]
    total = a.new_zeros(())
    ga = torch.empty_like(a) if with_grad else None
    gb = torch.zeros_like(b) if with_grad else None
    bm = block_rows(N)
    for r0 in range(0, n, bm):
        r1 = min(n, r0 + bm)
        rows = torch.arange(r1 - r0, device=a.device)
        cols = offset + r0 + rows
        blk = torch.mm(a[r0:r1], b.T).mul_(s)  # (rows, N) fp32: the one block
        x_t = blk[rows, cols]
        m = blk.amax(dim=1)
        e = blk.sub_(m[:, None]).exp_()  # in place
        e[rows, cols] = 0.0
        r = e.sum(dim=1)
        loss, _, q = _finish(m, x_t, r)
        total = total + loss.sum()
        if with_grad:
            g = e.div_((torch.exp(x_t - m) + r)[:, None])  # softmax off the target
            g[rows, cols] = -q  # P_t - 1, exactly
            torch.mm(g, b, out=ga[r0:r1])
            gb.addmm_(g.T, a[r0:r1])
    if not with_grad:
        return total / n, None, None, None
    ds = (ga * a).sum() / n
    return total / n, ga.mul_(s / n), gb.mul_(s / n), ds


def _sweep_symmetric(
    a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, with_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Both directions of a square problem. a, b (n, d) fp32 -> loss, dA, dB, ds (as ``_sweep``).

    Column statistics (running max and off-diagonal sum) are merged online across row blocks.
    """
    n = a.shape[0]
    bm = block_rows(n)
    row_m, row_r, diag = a.new_empty(n), a.new_empty(n), a.new_empty(n)
    col_m, col_r = a.new_full((n,), float("-inf")), a.new_zeros(n)
    for r0 in range(0, n, bm):
        r1 = min(n, r0 + bm)
        rows = torch.arange(r1 - r0, device=a.device)
        blk = torch.mm(a[r0:r1], b.T).mul_(s)
        diag[r0:r1] = blk[rows, r0 + rows]
        m_new = torch.maximum(col_m, blk.amax(dim=0))
        e = torch.sub(blk, m_new[None, :]).exp_()
        e[rows, r0 + rows] = 0.0
        col_r.mul_(torch.exp(col_m - m_new)).add_(e.sum(dim=0))
        col_m = m_new
        row_m[r0:r1] = blk.amax(dim=1)
        e = torch.sub(blk, row_m[r0:r1, None], out=e).exp_()
        e[rows, r0 + rows] = 0.0
        row_r[r0:r1] = e.sum(dim=1)
    loss_r, lse_r, q_r = _finish(row_m, diag, row_r)
    loss_c, lse_c, q_c = _finish(col_m, diag, col_r)
    loss = (loss_r.sum() + loss_c.sum()) / (2 * n)
    if not with_grad:
        return loss, None, None, None
    ga = torch.empty_like(a)
    gb = torch.zeros_like(b)
    for r0 in range(0, n, bm):
        r1 = min(n, r0 + bm)
        rows = torch.arange(r1 - r0, device=a.device)
        blk = torch.mm(a[r0:r1], b.T).mul_(s)
        g = torch.sub(blk, lse_c[None, :]).exp_()  # column softmax
        g += blk.sub_(lse_r[r0:r1, None]).exp_()  # + row softmax
        g[rows, r0 + rows] = -(q_r[r0:r1] + q_c[r0:r1])  # both (P_t - 1), exactly
        torch.mm(g, b, out=ga[r0:r1])
        gb.addmm_(g.T, a[r0:r1])
    ds = (ga * a).sum() / (2 * n)
    return loss, ga.mul_(s / (2 * n)), gb.mul_(s / (2 * n)), ds


class _Blockwise(torch.autograd.Function):
    """Forward computes the loss and (when needed) its gradients; backward scales them."""

    @staticmethod
    def forward(ctx, a, b, scale, offset: int, symmetric: bool):  # type: ignore[override]
        with_grad = any(ctx.needs_input_grad[:3])
        s = scale.detach().reshape(()).float()
        af, bf = a.detach().float(), b.detach().float()
        if symmetric:
            loss, ga, gb, ds = _sweep_symmetric(af, bf, s, with_grad)
        else:
            loss, ga, gb, ds = _sweep(af, bf, s, offset, with_grad)
        if with_grad:
            ctx.save_for_backward(ga, gb, ds)
        ctx.dtypes = (a.dtype, b.dtype, scale.dtype, scale.shape)
        return loss

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        ga, gb, ds = ctx.saved_tensors
        a_dt, b_dt, s_dt, s_shape = ctx.dtypes
        da = (ga * grad).to(a_dt) if ctx.needs_input_grad[0] else None
        db = (gb * grad).to(b_dt) if ctx.needs_input_grad[1] else None
        dscale = (ds * grad).to(s_dt).reshape(s_shape) if ctx.needs_input_grad[2] else None
        return da, db, dscale, None, None


def contrastive_loss(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """Blockwise one-direction contrastive loss.

    A: (n, d), B: (N, d) any float dtype; logit_scale: 0-d or (1,), already exponentiated;
    targets ``offset + i``. Returns the 0-d fp32 loss; differentiable in A, B and logit_scale.
    """
    _check(features_a, features_b, logit_scale, offset)
    return _Blockwise.apply(features_a, features_b, logit_scale, int(offset), False)


def contrastive_loss_symmetric(
    features_a: torch.Tensor, features_b: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Mean of both directions for a square problem (n == N, targets on the diagonal).

    A, B: (n, d); logit_scale: 0-d or (1,). Returns the 0-d fp32 loss, equal to
    ``(contrastive_loss(A, B, s) + contrastive_loss(B, A, s)) / 2``.
    """
    _check(features_a, features_b, logit_scale, 0)
    if features_a.shape != features_b.shape:
        raise ValueError("the symmetric loss needs A and B of the same shape (n, d)")
    return _Blockwise.apply(features_a, features_b, logit_scale, 0, True)


def contrastive_loss_naive(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    logit_scale: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """The oracle: full (n, N) logits ("materialises n x N"), computed in the inputs' dtype.

    A: (n, d), B: (N, d), logit_scale: 0-d or (1,). Returns the 0-d loss.
    """
    logits = logit_scale.reshape(()) * features_a @ features_b.T
    target = torch.arange(offset, offset + features_a.shape[0], device=features_a.device)
    return torch.nn.functional.cross_entropy(logits, target)


def contrastive_loss_symmetric_naive(
    features_a: torch.Tensor, features_b: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """LAION's single-process symmetric loss with full logits (both matmuls, as LAION does)."""
    return (
        contrastive_loss_naive(features_a, features_b, logit_scale)
        + contrastive_loss_naive(features_b, features_a, logit_scale)
    ) / 2
