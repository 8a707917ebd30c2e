"""Retrieval and zero-shot metrics, computed the way LAION CLAP reports them.

Ranks are 0-based: the rank of the true item is its position in the row's logits sorted in
descending order. From the ranks of one direction (``audio_to_text`` or ``text_to_audio``):

- ``mean_rank``   = mean(rank) + 1
- ``median_rank`` = floor(median(rank)) + 1   (``np.median``: the mean of the two middle ranks
  when their count is even, then floored)
- ``R@k``         = share of queries with rank < k, k in (1, 5, 10)
- ``mAP@10``      = mean over queries of 1 / (rank + 1) if rank < 10 else 0

Ties. LAION sorts with ``torch.argsort(descending=True)``, which is not stable, so the place of an
item tied with the target is unspecified there. Here the rank of target ``j`` in row ``q`` is

    rank = #{k : L[q, k] > L[q, j]} + #{k < j : L[q, k] == L[q, j]}

i.e. the target's position in a *stable* descending sort (equal logits keep column order). This
agrees with LAION whenever a row has no ties, is deterministic, and neither rewards nor punishes
a collapsed model: with all logits equal, the target of row ``i`` of a square matrix ranks ``i``,
which is chance level on average.

Every function accepts torch tensors or NumPy arrays; non-finite logits raise ``ValueError``.
Memory: rows are processed in chunks of about ``_CHUNK_ELEMENTS`` logits, so a 5k × 25k
AudioCaps-sized matrix never materialises more than a few tens of MB of comparisons at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

ArrayLike = torch.Tensor | np.ndarray

RECALL_KS = (1, 5, 10)
MAP_K = 10
_CHUNK_ELEMENTS = 1 << 24


def _as_float(x: ArrayLike, name: str, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t.detach().cpu()


def _as_index(x: ArrayLike, name: str, size: int) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D integer array, got {t.dtype} {tuple(t.shape)}")
    t = t.long().cpu()
    if t.numel() and (t.min() < 0 or t.max() >= size):
        raise ValueError(f"{name} has indices outside [0, {size})")
    return t


def ranks(logits: ArrayLike, targets: ArrayLike, rows: ArrayLike | None = None) -> torch.Tensor:
    """Rank of ``logits[rows[i], targets[i]]`` within its row, with the module's tie rule.

    Args:
        logits: (Q, K) scores; higher means more similar.
        targets: (T,) column of the true item for each query.
        rows: (T,) row of each query; default ``arange(Q)`` (then T must equal Q). A row may be
            queried several times (e.g. the 5 captions of one audio).

    Returns:
        (T,) int64 0-based ranks in [0, K).
    """
    logits = _as_float(logits, "logits", 2)
    q, k = logits.shape
    targets = _as_index(targets, "targets", k)
    if rows is None:
        if targets.numel() != q:
            raise ValueError(f"targets has {targets.numel()} entries for {q} rows")
        rows = torch.arange(q)
    else:
        rows = _as_index(rows, "rows", q)
        if rows.shape != targets.shape:
            raise ValueError(f"rows {tuple(rows.shape)} and targets {tuple(targets.shape)} differ")
    out = torch.empty(targets.numel(), dtype=torch.long)
    cols = torch.arange(k)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, targets.numel(), step):
        r, t = rows[start : start + step], targets[start : start + step]
        block = logits[r]  # (c, K): a copy, bounded by _CHUNK_ELEMENTS
        score = block.gather(1, t[:, None])
        ahead = (block > score) | ((block == score) & (cols[None, :] < t[:, None]))
        out[start : start + step] = ahead.sum(dim=1)
    return out


def summarize_ranks(rank: ArrayLike, name: str) -> dict[str, float]:
    """LAION's summary of one direction's 0-based ranks, keys prefixed with ``name``.

    Args:
        rank: (Q,) integer ranks.
        name: key prefix, e.g. ``"audio_to_text"``.

    Returns:
        ``{name}_mean_rank``, ``{name}_median_rank``, ``{name}_R@1/5/10``, ``{name}_mAP@10``.
    """
    r = np.asarray(torch.as_tensor(rank).cpu(), dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"rank must be a non-empty 1-D array, got shape {r.shape}")
    out = {
        f"{name}_mean_rank": float(r.mean() + 1),
        f"{name}_median_rank": float(np.floor(np.median(r)) + 1),
    }
    for k in RECALL_KS:
        out[f"{name}_R@{k}"] = float(np.mean(r < k))
    out[f"{name}_mAP@{MAP_K}"] = float(np.mean(np.where(r < MAP_K, 1.0 / (r + 1), 0.0)))
    return out


def retrieval_metrics_from_logits(logits_per_audio: ArrayLike) -> dict[str, float]:
    """Both directions of one-caption retrieval from a square logit matrix.

    Args:
        logits_per_audio: (N, N); entry [i, j] scores audio i against text j, the true pairs
            on the diagonal. Text→audio uses its transpose.

    Returns:
        ``num_samples`` and :func:`summarize_ranks` keys for ``audio_to_text`` and
        ``text_to_audio``.
    """
    logits = _as_float(logits_per_audio, "logits_per_audio", 2)
    n = logits.shape[0]
    if logits.shape != (n, n) or n == 0:
        raise ValueError(f"logits_per_audio must be square, non-empty: {tuple(logits.shape)}")
    diag = torch.arange(n)
    return {
        "num_samples": float(n),
        **summarize_ranks(ranks(logits, diag), "audio_to_text"),
        **summarize_ranks(ranks(logits.T, diag), "text_to_audio"),
    }


def retrieval_metrics(
    audio_emb: ArrayLike, text_emb: ArrayLike, logit_scale: float | ArrayLike | None = None
) -> dict[str, float]:
    """One-caption retrieval metrics from paired embeddings (LAION's ``get_metrics``).

    The similarity is ``audio_emb @ text_emb.T`` (pass L2-normalised embeddings, as the model
    returns them, for cosine similarity); ranks do not depend on a positive ``logit_scale``.

    Args:
        audio_emb: (N, d) audio embeddings; row i pairs with ``text_emb[i]``.
        text_emb: (N, d) text embeddings.
        logit_scale: the model's (exponentiated) logit scale. When given, ``loss`` — the
            symmetric contrastive cross-entropy, LAION's ``cumulative_loss`` — is added.

    Returns:
        The keys of :func:`retrieval_metrics_from_logits`, plus ``loss`` if ``logit_scale``.
    """
    a = _as_float(audio_emb, "audio_emb", 2)
    t = _as_float(text_emb, "text_emb", 2)
    if a.shape != t.shape:
        raise ValueError(f"audio_emb {tuple(a.shape)} and text_emb {tuple(t.shape)} differ")
    logits = a.float() @ t.float().T
    out = retrieval_metrics_from_logits(logits)
    if logit_scale is not None:
        scaled = torch.as_tensor(logit_scale, dtype=torch.float32).reshape(()) * logits
        labels = torch.arange(a.shape[0])
        loss = (F.cross_entropy(scaled, labels) + F.cross_entropy(scaled.T, labels)) / 2
        out["loss"] = float(loss)
    return out


def _grouped_ranks(rank: torch.Tensor, owner: torch.Tensor, n: int) -> np.ndarray:
    """(N, c_max) ranks of each audio's captions in caption order, padded with +inf."""
    order = torch.sort(owner, stable=True).indices  # keeps caption order within an audio
    counts = torch.bincount(owner, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(owner.numel()) - starts[owner[order]]
    grid = np.full((n, int(counts.max())), np.inf)
    grid[owner[order].numpy(), slot.numpy()] = rank[order].numpy()
    return grid


def _map_at_10(grid: np.ndarray, counts: np.ndarray) -> float:
    """Mean over rows of sum_p p / (r_p + 1) over the kept ranks r_p < 10, in the grid's order,
    divided by the row's caption count (p = 1, 2, … numbers the kept ranks)."""
    kept = grid < MAP_K
    position = np.cumsum(kept, axis=1)
    terms = np.where(kept, position / (np.where(kept, grid, 0.0) + 1), 0.0)
    return float(np.mean(terms.sum(axis=1) / counts))


def _caption_slots(owner: torch.Tensor, n: int) -> torch.Tensor:
    """(M,) position of each caption among its audio's captions, in caption order."""
    order = torch.sort(owner, stable=True).indices
    counts = torch.bincount(owner, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(owner)
    slot[order] = torch.arange(owner.numel()) - starts[owner[order]]
    return slot


def multi_caption_loss(
    logits_per_audio: torch.Tensor, owner: torch.Tensor, logit_scale: float | ArrayLike
) -> float:
    """LAION's ``cumulative_loss`` of a several-caption set: for each caption slot d (the d-th
    caption of every audio that has one), the cross-entropy of audio→text over that slot's
    captions and of text→audio over all audios, each averaged over slots, then the two
    directions averaged. With c captions for every audio this is LAION's value exactly."""
    scaled = torch.as_tensor(logit_scale, dtype=torch.float32).reshape(()) * logits_per_audio
    slot = _caption_slots(owner, scaled.shape[0])
    a2t, t2a = [], []
    for d in range(int(slot.max()) + 1):
        cols = torch.nonzero(slot == d).flatten()
        rows = owner[cols]
        a2t.append(F.cross_entropy(scaled[rows][:, cols], torch.arange(cols.numel())))
        t2a.append(F.cross_entropy(scaled[:, cols].T, rows))
    return float((torch.stack(a2t).mean() + torch.stack(t2a).mean()) / 2)


def multi_caption_metrics_from_logits(
    logits_per_audio: ArrayLike,
    caption_to_audio: ArrayLike,
    logit_scale: float | ArrayLike | None = None,
) -> dict[str, float]:
    """Retrieval with several captions per audio (Clotho, AudioCaps: 5), from logits.

    Args:
        logits_per_audio: (N, M) scores of N audios against M captions.
        caption_to_audio: (M,) the audio each caption describes; every audio needs ≥ 1.
        logit_scale: the model's (exponentiated) logit scale. When given, LAION's
            ``cumulative_loss`` (:func:`multi_caption_loss`) is added.

    Returns ``num_samples`` (N) and:

    - text→audio: each of the M captions is a query over the N audios;
      :func:`summarize_ranks` keys prefixed ``text_to_audio``.
    - audio→text: each audio ranks all M captions; its rank is the best (minimum) rank of its
      own captions, summarised into ``audio_to_text_{mean_rank, median_rank, R@1/5/10}``.
    - ``audio_to_text_mAP@10``: average precision at 10 over an audio's c captions,
      ``AP = (1/c) · Σ_{i : r_(i) < 10} i / (r_(i) + 1)`` with ``r_(1) < r_(2) < …`` its
      captions' ranks *sorted* (the precision at the i-th relevant hit), averaged over audios.
      This is the definition of Mei et al., whose code LAION adapted.
    - ``audio_to_text_mAP@10_laion``: LAION's ``evaluate_clotho_audiocaps`` value: the same sum,
      but over the ranks in caption order (unsorted), so the numerators 1, 2, … pair with the
      wrong hits. By the rearrangement inequality it is ≥ the sorted value, equal when the
      captions already come in rank order, and can exceed 1 for a single audio.
    """
    logits = _as_float(logits_per_audio, "logits_per_audio", 2)
    n, m = logits.shape
    owner = _as_index(caption_to_audio, "caption_to_audio", n)
    if owner.numel() != m:
        raise ValueError(f"caption_to_audio has {owner.numel()} entries for {m} captions")
    counts = torch.bincount(owner, minlength=n)
    if n == 0 or (counts == 0).any():
        raise ValueError("every audio needs at least one caption")
    out: dict[str, float] = {"num_samples": float(n)}
    out.update(summarize_ranks(ranks(logits.T, owner), "text_to_audio"))
    caption_rank = ranks(logits, torch.arange(m), rows=owner)  # (M,) rank in its audio's row
    grid = _grouped_ranks(caption_rank, owner, n)
    out.update(summarize_ranks(grid.min(axis=1), "audio_to_text"))
    c = counts.numpy().astype(np.float64)
    out[f"audio_to_text_mAP@{MAP_K}"] = _map_at_10(np.sort(grid, axis=1), c)
    out[f"audio_to_text_mAP@{MAP_K}_laion"] = _map_at_10(grid, c)
    if logit_scale is not None:
        out["cumulative_loss"] = multi_caption_loss(logits, owner, logit_scale)
    return out


def retrieval_metrics_multi_caption(
    audio_emb: ArrayLike,
    text_emb: ArrayLike,
    caption_to_audio: ArrayLike | None = None,
    logit_scale: float | ArrayLike | None = None,
) -> dict[str, float]:
    """:func:`multi_caption_metrics_from_logits` from embeddings (LAION's Clotho/AudioCaps eval).

    Args:
        audio_emb: (N, d) audio embeddings (L2-normalised for cosine similarity).
        text_emb: (N, c, d) — c captions per audio — or (M, d) captions. Flattened (N, c, d) is
            LAION's layout: captions 5i … 5i+4 describe audio i.
        caption_to_audio: (M,) audio index of each caption; required for (M, d) input unless
            M is a multiple of N (then caption j describes audio j // (M / N)).
        logit_scale: adds ``cumulative_loss`` (see :func:`multi_caption_metrics_from_logits`).
    """
    a = _as_float(audio_emb, "audio_emb", 2)
    t = torch.as_tensor(text_emb)
    if t.ndim == 3:
        if t.shape[0] != a.shape[0] or caption_to_audio is not None:
            raise ValueError("(N, c, d) text_emb needs N audios and no caption_to_audio")
        t = t.reshape(-1, t.shape[-1])
    t = _as_float(t, "text_emb", 2)
    if t.shape[1] != a.shape[1]:
        raise ValueError(f"embedding widths differ: audio {a.shape[1]}, text {t.shape[1]}")
    if caption_to_audio is None:
        if a.shape[0] == 0 or t.shape[0] % a.shape[0]:
            raise ValueError(
                f"{t.shape[0]} captions for {a.shape[0]} audios: pass caption_to_audio"
            )
        caption_to_audio = torch.arange(t.shape[0]) // (t.shape[0] // a.shape[0])
    return multi_caption_metrics_from_logits(a.float() @ t.float().T, caption_to_audio, logit_scale)


def zero_shot_accuracy(
    logits: ArrayLike, labels: ArrayLike, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy of zero-shot classification.

    Args:
        logits: (N, C) class scores (e.g. audio embeddings @ class-prompt embeddings.T).
        labels: (N,) true class index of each clip.
        topk: the k values; a k ≥ C counts every clip as correct (accuracy 1.0).

    Returns:
        ``{"top{k}": share of clips whose true class ranks < k}`` under the module's tie rule.
    """
    if any(k < 1 for k in topk):
        raise ValueError(f"topk values must be ≥ 1, got {tuple(topk)}")
    r = ranks(logits, labels).numpy()
    if r.size == 0:
        raise ValueError("no clips to score")
    return {f"top{k}": float(np.mean(r < k)) for k in topk}
