"""Retrieval and zero-shot metrics against hand-computed cases and a LAION-style reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clap_fast import metrics
from clap_fast.metrics import (
    multi_caption_metrics_from_logits,
    ranks,
    retrieval_metrics,
    retrieval_metrics_from_logits,
    retrieval_metrics_multi_caption,
    summarize_ranks,
    zero_shot_accuracy,
)


def _laion_preds(logits: torch.Tensor) -> np.ndarray:
    """LAION's way: position of the diagonal item in argsort(descending)."""
    ranking = torch.argsort(logits, descending=True)
    return torch.where(ranking == torch.arange(len(logits)).view(-1, 1))[1].numpy()


def _laion_audio_to_text(logits_per_audio: torch.Tensor) -> tuple[float, np.ndarray]:
    """LAION's evaluate_clotho_audiocaps audio→text loop (5 captions per audio, unsorted)."""
    maps, best = [], []
    for d in range(logits_per_audio.shape[0]):
        ranking = torch.argsort(logits_per_audio[d], descending=True)
        truth = torch.arange(5 * d, 5 * d + 5).view(-1, 1)
        found = torch.where(torch.stack([ranking] * 5) == truth)[1].numpy()
        best.append(found.min())
        kept = found[found < 10]
        maps.append(np.sum(np.arange(1, len(kept) + 1) / (kept + 1)) / 5)
    return float(np.mean(maps)), np.array(best)


def test_square_hand_case():
    logits = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.3], [0.1, 0.7, 0.6]])
    m = retrieval_metrics_from_logits(logits)
    # audio→text ranks [0, 2, 1]; text→audio (columns) ranks [0, 1, 0]
    assert m["num_samples"] == 3
    assert m["audio_to_text_mean_rank"] == pytest.approx(2.0)
    assert m["audio_to_text_median_rank"] == 2.0
    assert m["audio_to_text_R@1"] == pytest.approx(1 / 3)
    assert m["audio_to_text_R@5"] == 1.0
    assert m["audio_to_text_mAP@10"] == pytest.approx(11 / 18)
    assert m["text_to_audio_mean_rank"] == pytest.approx(4 / 3)
    assert m["text_to_audio_median_rank"] == 1.0
    assert m["text_to_audio_R@1"] == pytest.approx(2 / 3)
    assert m["text_to_audio_mAP@10"] == pytest.approx(5 / 6)


def test_summary_even_median_and_cutoffs():
    m = summarize_ranks(np.array([0, 1, 2, 3, 12]), "x")
    assert m["x_mean_rank"] == pytest.approx(18 / 5 + 1)
    assert m["x_median_rank"] == 3.0
    assert m["x_R@1"] == pytest.approx(0.2)
    assert m["x_R@5"] == pytest.approx(0.8)
    assert m["x_R@10"] == pytest.approx(0.8)
    assert m["x_mAP@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 5)  # rank 12 scores 0
    # np.median of [0, 1, 2, 3] is 1.5 → floor 1 → 2
    assert summarize_ranks(np.array([3, 0, 2, 1]), "y")["y_median_rank"] == 2.0


def test_ties_follow_stable_descending_order():
    # A tied item counts as ahead only when it sits in an earlier column.
    assert ranks(np.ones((3, 3)), np.arange(3)).tolist() == [0, 1, 2]
    logits = np.array([[0.5, 0.5, 0.2], [0.2, 0.5, 0.5], [0.5, 0.5, 0.2]])
    assert ranks(logits, np.array([1, 1, 0])).tolist() == [1, 0, 0]
    m = retrieval_metrics_from_logits(np.zeros((4, 4)))
    assert m["audio_to_text_mean_rank"] == pytest.approx(2.5)  # chance, not 1 or N
    assert m["audio_to_text_R@1"] == pytest.approx(0.25)


def test_ranks_match_stable_argsort_with_many_ties_and_chunks(monkeypatch):
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 64)  # several chunks of 2 rows
    logits = torch.randint(0, 4, (37, 29)).float()
    targets = torch.randint(0, 29, (37,))
    order = torch.argsort(logits, dim=1, descending=True, stable=True)
    expected = torch.where(order == targets[:, None])[1]
    assert torch.equal(ranks(logits, targets), expected)


def test_matches_laion_without_ties():
    logits = torch.randn(50, 50) + 2 * torch.eye(50)
    got = retrieval_metrics_from_logits(logits)
    for name, mat in (("audio_to_text", logits), ("text_to_audio", logits.T)):
        preds = _laion_preds(mat)
        assert got[f"{name}_mean_rank"] == pytest.approx(preds.mean() + 1)
        assert got[f"{name}_median_rank"] == np.floor(np.median(preds)) + 1
        for k in (1, 5, 10):
            assert got[f"{name}_R@{k}"] == pytest.approx(np.mean(preds < k))
        want = np.mean(np.where(preds < 10, 1 / (preds + 1), 0.0))
        assert got[f"{name}_mAP@10"] == pytest.approx(want)


def test_embeddings_and_loss():
    a = F.normalize(torch.randn(8, 16), dim=-1)
    t = F.normalize(a + 0.5 * torch.randn(8, 16), dim=-1)
    plain = retrieval_metrics(a, t)
    scaled = retrieval_metrics(a.numpy(), t.numpy(), logit_scale=torch.tensor([20.0]))
    assert "loss" not in plain
    assert {k: v for k, v in scaled.items() if k != "loss"} == plain
    logits = 20.0 * a @ t.T
    labels = torch.arange(8)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert scaled["loss"] == pytest.approx(float(want), rel=1e-5)


# Three audios, five captions each (captions 5a … 5a+4 describe audio a). POS[a, j] is the
# position of caption j in audio a's descending ranking; the logits are -POS.
POS = np.array(
    [
        [5, 0, 9, 2, 7, 1, 3, 4, 6, 8, 10, 11, 12, 13, 14],
        [0, 2, 4, 5, 6, 12, 3, 14, 1, 10, 7, 8, 9, 11, 13],
        [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0, 1, 2, 3, 4],
    ]
)


def test_multi_caption_hand_case():
    m = multi_caption_metrics_from_logits(-POS.astype(float), np.repeat(np.arange(3), 5))
    # audio→text: own-caption ranks a0 [5,0,9,2,7], a1 [12,3,14,1,10], a2 [0,1,2,3,4]
    # best ranks [0, 1, 0]
    assert m["num_samples"] == 3
    assert m["audio_to_text_R@1"] == pytest.approx(2 / 3)
    assert m["audio_to_text_R@5"] == 1.0
    assert m["audio_to_text_mean_rank"] == pytest.approx(4 / 3)
    assert m["audio_to_text_median_rank"] == 1.0
    # sorted: a0 (1/1 + 2/3 + 3/6 + 4/8 + 5/10)/5 = 19/30, a1 (1/2 + 2/4)/5 = 1/5, a2 1
    assert m["audio_to_text_mAP@10"] == pytest.approx((19 / 30 + 1 / 5 + 1) / 3)
    # LAION, caption order: a0 (1/6 + 2/1 + 3/10 + 4/3 + 5/8)/5 = 177/200, a1 (1/4 + 2/2)/5
    assert m["audio_to_text_mAP@10_laion"] == pytest.approx((177 / 200 + 1 / 4 + 1) / 3)
    assert m["audio_to_text_mAP@10_laion"] > m["audio_to_text_mAP@10"] + 0.09
    # text→audio, each caption over 3 audios (column ties: earlier audio ahead):
    # ranks [1,0,2,0,1, 2,1,2,0,1, 0,0,0,0,0]
    assert m["text_to_audio_mean_rank"] == pytest.approx(5 / 3)
    assert m["text_to_audio_median_rank"] == 1.0
    assert m["text_to_audio_R@1"] == pytest.approx(8 / 15)
    assert m["text_to_audio_R@5"] == 1.0
    assert m["text_to_audio_mAP@10"] == pytest.approx(11 / 15)


def test_multi_caption_matches_laion_loop_and_layouts():
    n, d = 20, 8
    a = F.normalize(torch.randn(n, d), dim=-1)
    t = F.normalize(a[:, None, :] + 0.8 * torch.randn(n, 5, d), dim=-1)
    m = retrieval_metrics_multi_caption(a, t)
    flat = t.reshape(5 * n, d)
    assert retrieval_metrics_multi_caption(a, flat) == m
    assert retrieval_metrics_multi_caption(a, flat, np.repeat(np.arange(n), 5)) == m

    laion_map, best = _laion_audio_to_text(a @ flat.T)
    assert m["audio_to_text_mAP@10_laion"] == pytest.approx(laion_map)
    for k in (1, 5, 10):
        assert m[f"audio_to_text_R@{k}"] == pytest.approx(np.mean(best < k))
    t2a = np.concatenate([_laion_preds(t[:, c, :] @ a.T) for c in range(5)])
    assert m["text_to_audio_mAP@10"] == pytest.approx(np.mean(np.where(t2a < 10, 1 / (t2a + 1), 0)))
    assert m["text_to_audio_mean_rank"] == pytest.approx(t2a.mean() + 1)
    assert m["audio_to_text_mAP@10_laion"] >= m["audio_to_text_mAP@10"]


def test_multi_caption_order_and_uneven_counts():
    # Captions in any order with an index: the sorted mAP ignores order, LAION's does not.
    perm = np.array([1, 0, 3, 2, 4, 5])
    logits = -np.array([[1.0, 0.0, 2.0, 5.0, 3.0, 4.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]])
    owner = np.array([0, 0, 0, 1, 1, 1])
    base = multi_caption_metrics_from_logits(logits, owner)
    shuffled = multi_caption_metrics_from_logits(logits[:, perm], owner[perm])
    assert shuffled["audio_to_text_mAP@10"] == pytest.approx(base["audio_to_text_mAP@10"])
    assert shuffled["audio_to_text_mAP@10_laion"] != pytest.approx(
        base["audio_to_text_mAP@10_laion"]
    )
    # two captions for audio 0 (ranks 1, 0), one for audio 1 (rank 0): AP (1 + 2/2)/2 and 1
    uneven = multi_caption_metrics_from_logits(-np.array([[1.0, 0, 2], [2, 1, 0]]), [0, 0, 1])
    assert uneven["audio_to_text_mAP@10"] == pytest.approx(1.0)
    assert uneven["audio_to_text_mAP@10_laion"] == pytest.approx((1 / 2 + 2 / 1) / 2 / 2 + 1 / 2)


def test_zero_shot_accuracy():
    logits = np.array([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.4, 0.4, 0.1], [0.0, 0.2, 0.1]])
    labels = np.array([0, 1, 1, 2])
    # ranks: 0, 1, 1 (tie with class 0 ahead), 1
    acc = zero_shot_accuracy(logits, labels, topk=(1, 2, 5))
    assert acc == {"top1": 0.25, "top2": 1.0, "top5": 1.0}  # C = 3 < 5: top5 is 1
    assert zero_shot_accuracy(torch.eye(4), torch.arange(4)) == {"top1": 1.0, "top5": 1.0}


@pytest.mark.parametrize(
    "call",
    [
        lambda: retrieval_metrics_from_logits(np.array([[1.0, np.nan], [0.0, 1.0]])),
        lambda: retrieval_metrics_from_logits(np.ones((2, 3))),
        lambda: retrieval_metrics(np.ones((3, 4)), np.ones((2, 4))),
        lambda: ranks(np.ones((2, 2)), np.array([0, 2])),
        lambda: ranks(np.ones((2, 2)), np.array([0.0, 1.0])),
        lambda: multi_caption_metrics_from_logits(np.ones((2, 3)), [0, 0, 0]),
        lambda: retrieval_metrics_multi_caption(np.ones((3, 4)), np.ones((7, 4))),
        lambda: zero_shot_accuracy(np.ones((2, 3)), np.array([0, 1]), topk=(0,)),
    ],
)
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()
