"""Blocked exact scoring (raykd.core.scoring) against hand-computed values and the whole-matrix functions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykd.core import item_tables, metrics, models, scoring


def tied_scores(rows: int, width: int, seed: int, levels: int = 7) -> torch.Tensor:
    """Random scores from a few levels, so that ties are everywhere, with a few -inf."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(0, levels, (rows, width), generator=gen).float()
    return s.masked_fill(torch.rand(rows, width, generator=gen) < 0.05, -torch.inf)


def random_seen(rows: int, width: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, width, rng.integers(0, 12)) for _ in range(rows)]  # duplicates and column 0 too


def reference_top_k(scores: torch.Tensor, k: int, seen: list[np.ndarray] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Ties to the lower column by brute force: a stable sort of the whole row."""
    s = scores.clone()
    s[:, 0] = -torch.inf
    if seen is not None:
        s[metrics.exclusion_mask(seen, s.shape[1])] = -torch.inf
    order = s.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return s.gather(1, order), order


def test_ordered_topk_hand_computed():
    values, columns = scoring.ordered_topk(torch.tensor([[1.0, 3, 3, 2, 3, 3, 0, 3]]), 3)
    assert values.tolist() == [[3, 3, 3]] and columns.tolist() == [[1, 2, 4]]
    values, columns = scoring.ordered_topk(torch.tensor([[1.0, 3, 3, 2, 3, 3, 0, 3]]), 6)
    assert columns.tolist() == [[1, 2, 4, 5, 7, 3]]


def test_top_k_ties_go_to_the_lower_column_across_blocks():
    scores = torch.zeros(2, 1000)
    scores[1, 900] = 1.0
    values, columns = scoring.top_k(scores, 5, block=128)
    assert columns.tolist() == [[0, 1, 2, 3, 4], [900, 0, 1, 2, 3]]
    assert values.tolist() == [[0.0] * 5, [1.0, 0, 0, 0, 0]]


@pytest.mark.parametrize("width,k,block", [(1000, 10, 64), (1000, 10, 1000), (1001, 37, 128), (300, 400, 64),
                                           (5000, 1, 256), (129, 5, 128)])
def test_blocked_top_k_equals_the_whole_matrix(width, k, block):
    scores = tied_scores(16, width, seed=width + k)
    seen = random_seen(16, width, seed=k)
    want_values, want_columns = reference_top_k(scores, min(k, width), seen)
    values, columns = scoring.blocked_top_k(scoring.FullScores(scores), k, seen, block=block)
    assert torch.equal(columns, want_columns) and torch.equal(values, want_values)
    whole = scores.clone()
    whole[:, 0] = -torch.inf
    whole[metrics.exclusion_mask(seen, width)] = -torch.inf
    assert torch.equal(scoring.top_k(whole, min(k, width))[1], want_columns)  # the unblocked path, same rule


def test_target_ranks_hand_computed():
    # candidates of row 0 (target 2): 1, 3, 4 -> 2 >= 2 and NaN count, 1 < 2 does not: rank 2
    scores = torch.tensor([[9.0, 1, 2, 2, torch.nan], [9.0, 5, 1, 1, 0], [9.0, torch.nan, 1, 2, 3]])
    targets = torch.tensor([2, 3, 1])
    seen = [np.array([]), np.array([1, 3]), np.array([])]
    ranks = scoring.blocked_target_ranks(scoring.FullScores(scores), targets, seen, block=2)
    assert ranks.tolist() == [2, 1, metrics.MISS_RANK]  # row 1: 1 is seen, 2 ties; row 2: a NaN target
    ranks = scoring.blocked_target_ranks(scoring.FullScores(scores), targets, seen, exclude_target=True, block=2)
    assert ranks.tolist() == [2, metrics.MISS_RANK, metrics.MISS_RANK]


@pytest.mark.parametrize("width,block", [(50, 8), (1000, 64), (1000, 1000), (777, 100)])
@pytest.mark.parametrize("exclude_target", [False, True])
def test_blocked_target_ranks_equal_target_ranks(width, block, exclude_target):
    rows = 40
    scores = tied_scores(rows, width, seed=width)
    scores[torch.rand(rows, width, generator=torch.Generator().manual_seed(1)) < 0.03] = torch.nan
    targets = torch.randint(0, width, (rows,), generator=torch.Generator().manual_seed(2))
    targets[:3] = 0  # padding targets are misses
    seen = random_seen(rows, width, seed=3)
    seen[5] = np.append(seen[5], int(targets[5]))  # a target among the seen items
    want = metrics.target_ranks(scores, targets, metrics.exclusion_mask(seen, width), exclude_target)
    got = scoring.blocked_target_ranks(scoring.FullScores(scores), targets, seen, exclude_target, block=block)
    assert torch.equal(got, want)
    assert torch.equal(scoring.blocked_target_ranks(scoring.FullScores(scores), targets, None, block=block),
                       metrics.target_ranks(scores, targets))


class WrongGuess(scoring.FullScores):
    def at(self, columns: torch.Tensor) -> torch.Tensor:
        return super().at(columns) + 0.5  # every first guess off: the windows' check must catch it


def test_blocked_target_ranks_never_depend_on_the_first_guess():
    scores = tied_scores(20, 500, seed=9)
    targets = torch.randint(1, 500, (20,), generator=torch.Generator().manual_seed(4))
    got = scoring.blocked_target_ranks(WrongGuess(scores), targets, None, block=64)
    assert torch.equal(got, metrics.target_ranks(scores, targets))


def test_windows_cover_every_column_once_with_one_shape():
    for width, block in [(10, 3), (9, 3), (5, 8), (100_001, 32768)]:
        covered = []
        for start, stop, skip in scoring.windows(width, block):
            assert stop - start == min(block, width)
            covered += range(start + skip, stop)
        assert covered == list(range(width))


@pytest.mark.parametrize("dim", [4, 16, 33, 64, 128])
@pytest.mark.parametrize("rows", [scoring.MIN_ROWS, 13, 256])
def test_dot_windows_equal_the_whole_product_bit_for_bit(dim, rows):
    # what makes the blocked answers exact: BLAS computes each element the same way in a window
    # (from MIN_ROWS rows: a product of one row takes a matrix-vector kernel with other last bits)
    gen = torch.Generator().manual_seed(dim)
    queries, items = torch.randn(rows, dim, generator=gen), torch.randn(20_011, dim, generator=gen)
    whole = queries @ items.T
    dot = scoring.DotScores(queries, items)
    for start, stop, skip in scoring.windows(dot.width, 4096):
        assert torch.equal(dot.block(start, stop)[:, skip:], whole[:, start + skip:stop])


@pytest.mark.parametrize("family", ["sasrec", "gru"])
def test_dot_scores_of_a_model_are_its_last_scores(family):
    torch.manual_seed(0)
    net = models.build_model({"family": family, "num_items": 3000, "dim": 16, "layers": 1, "heads": 2,
                              "max_len": 10, "dropout": 0.0}).eval()
    seq = torch.randint(0, 3001, (32, 10))
    with torch.no_grad():
        want = net.last_scores(seq)
        dot = scoring.dot_scores(net, seq)
        got = torch.cat([dot.block(s, e)[:, k:] for s, e, k in scoring.windows(dot.width, 512)], 1)
    assert torch.equal(got[:, 1:], want[:, 1:])  # column 0 is padding: never a candidate
    assert scoring.dot_scores(models.Ensemble([net, net]), seq) is None


def test_code_scores_hand_computed():
    # 2 sub-spaces of width 1 over 3-row codebooks: L_0 = q_0 * B[:, 0], L_1 = q_1 * B[:, 1]
    table = item_tables.PQTable(num_items=3, dim=2, codes=2, codebook=3)
    with torch.no_grad():
        table.codebooks.copy_(torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]]))
    table.set_codes(np.array([[0, 2], [2, 0], [1, 1]]))  # items 1..3 -> (1, 30), (3, 10), (2, 20)
    code = scoring.CodeScores(torch.tensor([[1.0, 1.0], [2.0, -1.0]] * 4), table)
    got = code.block(1, 4)[:2]
    assert torch.equal(got, torch.tensor([[31.0, 13.0, 22.0], [-28.0, -4.0, -16.0]]))
    assert torch.equal(code.at(torch.tensor([1, 3] * 4))[:2], torch.tensor([31.0, -16.0]))


@pytest.mark.parametrize("rows", [scoring.MIN_ROWS, 13, 256])
def test_code_scores_windows_agree_and_match_the_reconstructed_product(rows):
    # a PQ model's scores come from lookup tables (no [V + 1, D] table built): every window equals the
    # whole, `at` equals its entries, and both are the reconstructed product up to rounding
    torch.manual_seed(rows)
    net = models.build_model({"family": "sasrec", "num_items": 20_011, "dim": 16, "layers": 1, "heads": 2,
                              "max_len": 10, "dropout": 0.0,
                              "item_table": {"kind": "pq", "codes": 3, "codebook": 256}}).eval()
    net.item_emb.set_codes(np.random.default_rng(rows).integers(0, 256, (20_011, 3)))
    seq = torch.randint(0, 20_012, (rows, 10))
    with torch.no_grad():
        code = scoring.dot_scores(net, seq)
        assert isinstance(code, scoring.CodeScores)
        whole = code.block(0, code.width)
        for start, stop, skip in scoring.windows(code.width, 4096):
            assert torch.equal(code.block(start, stop)[:, skip:], whole[:, start + skip:stop])
        cols = torch.randint(1, code.width, (rows,))
        assert torch.equal(code.at(cols), whole[torch.arange(rows), cols])
        torch.testing.assert_close(whole[:, 1:], net.last_scores(seq)[:, 1:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pq", [False, True])
def test_head_scores_the_first_rows_exactly_as_the_whole_batch(pq):
    # a server scores a padded batch (at least MIN_ROWS rows) and selects over its real rows only
    torch.manual_seed(1)
    table = {"item_table": {"kind": "pq", "codes": 2, "codebook": 64}} if pq else {}
    net = models.build_model({"family": "sasrec", "num_items": 5000, "dim": 16, "layers": 1, "heads": 2,
                              "max_len": 10, "dropout": 0.0, **table}).eval()
    if pq:
        net.item_emb.set_codes(np.random.default_rng(0).integers(0, 64, (5000, 2)))
    seq = torch.randint(0, 5001, (scoring.MIN_ROWS, 10))
    with torch.no_grad():
        whole = scoring.dot_scores(net, seq)
        for n in (1, 3, scoring.MIN_ROWS):
            head = whole.head(n)
            assert head.rows == n and head.width == whole.width
            for start, stop, _ in scoring.windows(whole.width, 1024):
                assert torch.equal(head.block(start, stop), whole.block(start, stop)[:n])
            cols = torch.arange(1, scoring.MIN_ROWS + 1)
            assert torch.equal(head.at(cols[:n]), whole.at(cols)[:n])
            got = scoring.blocked_top_k(head, 10, [np.array([1, 2])] * n, 1024)
            want = scoring.blocked_top_k(whole, 10, [np.array([1, 2])] * scoring.MIN_ROWS, 1024)
            assert torch.equal(got[1], want[1][:n]) and torch.equal(got[0], want[0][:n])


@pytest.mark.parametrize("exclude_target", [False, True])
def test_evaluate_model_ranks_the_same_in_windows(exclude_target):
    torch.manual_seed(1)
    net = models.build_model({"family": "sasrec", "num_items": 2000, "dim": 8, "layers": 1, "heads": 2,
                              "max_len": 10, "dropout": 0.0})
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 2001, rng.integers(1, 12)) for _ in range(70)]
    targets = [int(h[0]) if i % 5 == 0 else int(rng.integers(1, 2001)) for i, h in enumerate(histories)]
    run = {"histories": histories, "targets": targets, "seen": histories, "batch_size": 32,
           "return_ranks": True, "exclude_target": exclude_target}
    whole = metrics.evaluate_model(net, **run, block=10_000)  # one window: the whole score matrix
    blocked = metrics.evaluate_model(net, **run, block=256)  # the last batch (6 users) stays whole
    assert np.array_equal(whole[1], blocked[1]) and whole[0] == blocked[0]


def test_the_recommender_answers_the_same_in_windows(tiny_run):
    """Small windows (many, the last one overlapping) give the single-matrix answers, k > a window too."""
    from raykd.serve.recommender import Recommender

    whole, blocked = Recommender(tiny_run, max_k=300), Recommender(tiny_run, max_k=300)
    blocked.block = 32
    assert blocked.desc["num_items"] + 1 > 3 * blocked.block  # several windows
    bodies = [{"user_id": u, "k": k, "exclude_seen": bool(n % 3)}
              for n, (u, k) in enumerate(zip(list(whole.histories)[:40], [1, 10, 50, 300] * 10))]
    bodies.append({"history": [whole.raw_item(1), whole.raw_item(2)], "k": 5})
    assert blocked.recommend_batch(bodies) == whole.recommend_batch(bodies)
    assert [blocked.recommend_batch([b])[0] for b in bodies[:5]] == whole.recommend_batch(bodies[:5])
