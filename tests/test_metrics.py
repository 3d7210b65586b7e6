"""Ranking metrics against hand-computed values (arithmetic in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from raykd.core.metrics import (
    MISS_RANK,
    evaluate_model,
    exclusion_mask,
    ranking_metrics,
    scoring_latency_ms,
    target_ranks,
    topk_overlap,
)
from raykd.core.models import SASRec

PAD = torch.finfo(torch.float32).min
NAN = float("nan")


def ranks_of(scores: list[float], target: int, exclude: list[int] = ()) -> int:
    s = torch.tensor([scores])
    mask = exclusion_mask([np.array(exclude, dtype=np.int64)], s.shape[1])
    return int(target_ranks(s, torch.tensor([target]), mask)[0])


def test_rank_zero_is_a_perfect_hit():
    r = ranks_of([PAD, 5, 4, 3, 2], target=1)
    assert r == 0
    m = ranking_metrics(torch.tensor([r]))
    assert m["ndcg@10"] == 1.0 and m["hr@10"] == 1.0 and m["mrr@10"] == 1.0


def test_rank_three():
    # Items 1, 2, 3 score above item 4: rank 3; NDCG = 1/log2(3 + 2) = 0.430677, MRR = 1/4.
    r = ranks_of([PAD, 5, 4, 3, 2, 1], target=4)
    assert r == 3
    m = ranking_metrics(torch.tensor([r]))
    assert m["ndcg@10"] == pytest.approx(1 / math.log2(5)) == pytest.approx(0.430677, abs=1e-6)
    assert m["hr@10"] == 1.0 and m["mrr@10"] == 0.25


def test_excluded_items_do_not_count():
    # Items 1 and 2 (seen) are not candidates: only item 3 is above item 4, so rank 1.
    assert ranks_of([PAD, 5, 4, 3, 2, 1], target=4, exclude=[1, 2]) == 1


def test_target_is_never_excluded():
    # A repeat item in `seen` is still ranked (rank 0 here), not dropped.
    assert ranks_of([PAD, 5, 4, 3], target=1, exclude=[1]) == 0


def test_padding_column_never_counts():
    # Column 0 holds the highest score of the row, yet the target is still rank 0.
    assert ranks_of([9.0, 1.0, 0.0], target=1) == 0


def test_tie_counts_against_the_target():
    # Item 2 ties item 1: pessimistic rank 1, so no hit at k = 1.
    r = ranks_of([PAD, 1.0, 1.0, 0.0], target=1)
    assert r == 1
    assert ranking_metrics(torch.tensor([r]), ks=(1,))["hr@1"] == 0.0


def test_all_tied_scores_rank_last():
    # 5 items, all 0: the 4 others tie with the target, rank 4: a miss at k = 1..4.
    r = ranks_of([PAD, 0, 0, 0, 0, 0], target=3)
    assert r == 4
    m = ranking_metrics(torch.tensor([r]), ks=(1, 4, 5))
    assert m["hr@1"] == 0.0 and m["hr@4"] == 0.0 and m["hr@5"] == 1.0


def test_nan_target_is_a_miss():
    r = ranks_of([PAD, 1.0, NAN, 0.0], target=2)
    assert r == MISS_RANK
    m = ranking_metrics(torch.tensor([r]), ks=(10, 20))
    assert all(v == 0.0 for v in m.values())


def test_nan_other_score_counts_above_target():
    # Item 1 is NaN: counted above the target (item 2); item 3 is below. Rank 1.
    assert ranks_of([PAD, NAN, 1.0, 0.0], target=2) == 1


def test_padding_target_is_a_miss():
    assert ranks_of([PAD, 1.0, 0.0], target=0) == MISS_RANK


def test_ranking_metrics_means_by_hand():
    # Ranks 0, 3, 15, 25:
    #   hr@10 = 2/4; ndcg@10 = (1 + 1/log2 5)/4; mrr@10 = (1 + 1/4)/4
    #   hr@20 = 3/4; ndcg@20 = (1 + 1/log2 5 + 1/log2 17)/4; mrr@20 = (1 + 1/4 + 1/16)/4
    m = ranking_metrics(np.array([0, 3, 15, 25]))
    assert m["hr@10"] == 0.5 and m["hr@20"] == 0.75
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(5)) / 4)
    assert m["ndcg@20"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(17)) / 4)
    assert m["mrr@10"] == pytest.approx(1.25 / 4)
    assert m["mrr@20"] == pytest.approx((1.25 + 1 / 16) / 4)


def test_ranking_metrics_rejects_empty():
    with pytest.raises(ValueError, match="empty"):
        ranking_metrics(torch.zeros(0, dtype=torch.long))


class NextItemOracle(nn.Module):
    """Scores item (last + 1) at 10 and every other item j at -j: a hand-checkable model."""

    def __init__(self, num_items: int, max_len: int):
        super().__init__()
        self.num_items, self.max_len = num_items, max_len
        self.unused = nn.Parameter(torch.zeros(1))  # gives the model a device

    def last_scores(self, seq: torch.Tensor) -> torch.Tensor:
        items = torch.arange(self.num_items + 1, dtype=torch.float32)
        scores = -items.repeat(len(seq), 1)
        scores.scatter_(1, (seq[:, -1:] + 1).clamp(max=self.num_items), 10.0)
        scores[:, 0] = PAD
        return scores


def test_evaluate_model_by_hand():
    # V = 5. User 1: last 2 -> item 3 scores 10, target 3: rank 0.
    # User 2: last 3 -> item 4 tops, target 4: rank 0.
    # User 3: history (2, 4) -> item 5 scores 10; target 3 scores -3, below 5 (10), 1 (-1),
    #   2 (-2): rank 3; with item 2 seen (excluded): rank 2.
    # ranks (0, 0, 2): hr@10 = 1, ndcg@10 = (1 + 1 + 1/log2 4)/3 = 2.5/3, mrr@10 = (2 + 1/3)/3
    model = NextItemOracle(num_items=5, max_len=4)
    model.train()
    histories = [np.array([1, 2]), np.array([3]), np.array([2, 4])]
    seen = [np.array([1, 2]), np.array([3]), np.array([2, 4])]
    targets = np.array([3, 4, 3])
    for batch_size in (1, 2, 256):
        m, ranks = evaluate_model(model, histories, targets, seen, batch_size=batch_size, return_ranks=True)
        assert ranks.tolist() == [0, 0, 2]
        assert m["users"] == 3 and m["hr@10"] == 1.0
        assert m["ndcg@10"] == pytest.approx(2.5 / 3)
        assert m["mrr@10"] == pytest.approx((2 + 1 / 3) / 3)
    assert model.training  # the caller's mode is restored
    _, ranks = evaluate_model(model, histories, targets, None, return_ranks=True)
    assert ranks.tolist() == [0, 0, 3]


def test_evaluate_real_model_accepts_padded_tensor():
    model = SASRec(num_items=12, dim=8, layers=1, heads=2, max_len=6, dropout=0.1)
    histories = [np.array([1, 2, 3, 4, 5, 6, 7, 8]), np.array([9]), np.array([], dtype=np.int64)]
    targets = np.array([9, 10, 11])
    from_lists = evaluate_model(model, histories, targets, [h for h in histories])
    padded = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 0, 0, 0, 0, 9], [0] * 6])
    from_tensor = evaluate_model(model, padded, targets, [h for h in histories])
    assert from_lists == from_tensor
    assert from_lists["users"] == 3 and 0.0 <= from_lists["ndcg@10"] <= 1.0


def test_topk_overlap_by_hand():
    a = torch.tensor([[PAD, 4, 3, 2, 1]])
    # top-2(a) = {1, 2}; top-2(b) = {4, 3}: overlap 0.
    assert topk_overlap(a, torch.tensor([[PAD, 1, 2, 3, 4]]), k=2) == 0.0
    b = torch.tensor([[PAD, 4, 3, 1, 2]])
    # top-2: {1, 2} vs {1, 2} -> 1; top-3: {1, 2, 3} vs {1, 2, 4} -> 2/3.
    assert topk_overlap(a, b, k=2) == 1.0
    assert topk_overlap(a, b, k=3) == pytest.approx(2 / 3)
    # Excluding item 1: top-2 {2, 3} vs {2, 4} -> 1/2.
    assert topk_overlap(a, b, k=2, exclude=exclusion_mask([np.array([1])], 5)) == 0.5


def test_exclusion_mask_handles_empty_rows():
    mask = exclusion_mask([np.array([], dtype=np.int64), np.array([2, 3])], 4)
    assert mask.tolist() == [[False] * 4, [False, False, True, True]]


def test_scoring_latency_is_positive():
    model = SASRec(num_items=50, dim=8, layers=1, heads=1, max_len=10, dropout=0.0)
    assert scoring_latency_ms(model, max_len=10, num_items=50, batch_size=16, repeats=3) > 0
