"""Tiled soft targets (raykd.core.soft_targets) against the one-matrix computation they replace."""

from __future__ import annotations

import pytest
import torch

from raykd.core import soft_targets


def _reference(hidden, tables, k):
    """The one-matrix computation: [P, V] scores, topk, then the log-mass of everything else."""
    scores = []
    for h, t in zip(hidden, tables):
        s = h @ t.T
        s[:, 0] = torch.finfo(s.dtype).min
        scores.append(s)
    if len(scores) > 1:
        scores = [torch.stack([s.log_softmax(-1) for s in scores]).mean(0)]
        scores[0][:, 0] = torch.finfo(scores[0].dtype).min
    top = torch.topk(scores[0], k, dim=1)
    return top.values, top.indices, scores[0].scatter(1, top.indices, float("-inf")).logsumexp(1)


def _inputs(members, positions=53, items=1001, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(positions, dim, generator=g) for _ in range(members)]
    tables = [torch.randn(items, dim, generator=g) for _ in range(members)]
    return hidden, tables


def test_the_rest_by_hand_for_one_row():
    # items 1..4 with logits 3, 1, 2, 0 (item 0 is padding); top-2 = items 1 and 3
    hidden = [torch.tensor([[1.0]])]
    table = torch.tensor([[5.0], [3.0], [1.0], [2.0], [0.0]])
    values, indices, rest = soft_targets.top_k_and_rest(hidden, [table], k=2, item_block=2)
    assert indices.tolist() == [[1, 3]] and values.tolist() == [[3.0, 2.0]]
    assert rest.item() == pytest.approx(torch.log(torch.exp(torch.tensor(1.0)) + 1.0).item(), abs=1e-6)


@pytest.mark.parametrize("members", [1, 2])
@pytest.mark.parametrize("item_block,row_block,group", [(128, 17, 32), (1000, 4096, 32), (7, 53, 32), (128, 10, 5),
                                                        (300, 53, 1), (256, 53, 300)])
def test_tiles_agree_with_the_one_matrix_computation(members, item_block, row_block, group):
    hidden, tables = _inputs(members)
    k = 20
    want = _reference(hidden, tables, k)
    got = soft_targets.top_k_and_rest(hidden, tables, k, row_block=row_block, item_block=item_block, group=group)
    assert torch.equal(got[1], want[1])  # the same items in the same order (random scores: no ties)
    assert torch.allclose(got[0], want[0], atol=1e-5)
    assert torch.allclose(got[2], want[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("members", [1, 2])
def test_a_catalogue_in_one_tile_is_bit_for_bit_the_one_matrix_result(members):
    hidden, tables = _inputs(members, items=300)
    want = _reference(hidden, tables, 10)
    got = soft_targets.top_k_and_rest(hidden, tables, 10, item_block=300)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_k_larger_than_a_tile_and_no_positions():
    hidden, tables = _inputs(1, positions=4, items=50)
    want = _reference(hidden, tables, 30)
    got = soft_targets.top_k_and_rest(hidden, tables, 30, item_block=8)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[2], want[2], rtol=1e-5)
    values, indices, rest = soft_targets.top_k_and_rest([torch.zeros(0, 12)], tables, 5, item_block=8)
    assert values.shape == (0, 5) and indices.shape == (0, 5) and rest.shape == (0,)


def test_tied_scores_keep_k_items_and_the_rest_of_the_mass():
    """A zero hidden state scores every item 0: every group reaches the threshold, all items tie."""
    hidden, tables = [torch.zeros(3, 12)], _inputs(1, items=1001)[1]
    values, indices, rest = soft_targets.top_k_and_rest(hidden, tables, 10, item_block=128, group=16)
    assert torch.equal(values, torch.zeros(3, 10))
    assert all(len(set(row)) == 10 and 0 not in row for row in indices.tolist())
    assert torch.allclose(rest, torch.full((3,), float(torch.log(torch.tensor(1000.0 - 10)))), rtol=1e-6)


def test_a_threshold_from_group_maxima_never_drops_a_top_item():
    """The best items sit in one group of the first tile: the group-maximum bound is then as low as it
    gets, and the later tiles must still bring their items in."""
    g = torch.Generator().manual_seed(3)
    hidden = [torch.ones(2, 1)]
    table = torch.randn(2000, 1, generator=g) * 0.1
    table[1:9] += 5.0  # 8 clear winners together in the first group
    table[1500:1504] += 4.0  # 4 more, late
    want = _reference(hidden, [table], 12)
    got = soft_targets.top_k_and_rest(hidden, [table], 12, item_block=256, group=16)
    assert torch.equal(got[1], want[1]) and torch.allclose(got[2], want[2], rtol=1e-5)
