"""evaluate's test ranks: blocks of users on Ray Data actors give what one process gives."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raykd.core import metrics, models, sequences
from raykd.stages import evaluate


def test_blocks_on_two_actors_rank_every_user_like_one_process(tiny_run):
    data_dir = tiny_run / "data"
    dirs = {name: [str(tiny_run / name)] for name in ("teacher", "student", "student_nokd")}
    got = evaluate.test_ranks(data_dir, dirs, True, ["student"], workers=2, block_users=37)
    hist, targets, seen = sequences.eval_inputs(sequences.read_split(data_dir), "test")
    assert got["target"].tolist() == list(targets)
    assert got["repeat"].tolist() == [t in set(h.tolist()) for h, t in zip(hist, targets)]
    for name in dirs:
        model = models.load_model(tiny_run / name)[0]
        _, expected = metrics.evaluate_model(model, hist, targets, seen, return_ranks=True, exclude_target=True)
        assert np.array_equal(got[name], expected), name
    student = models.load_model(tiny_run / "student")[0]
    _, aware = metrics.evaluate_model(student, hist, targets, None, return_ranks=True)
    assert np.array_equal(got["student" + evaluate.AWARE], aware)
    assert "student_nokd" + evaluate.AWARE not in got
    counts = pq.read_table(data_dir / "items.parquet", columns=["count"])["count"].to_numpy()
    _, pop = metrics.evaluate_model(evaluate.Popularity(counts), hist, targets, seen, return_ranks=True,
                                    exclude_target=True)
    assert np.array_equal(got[evaluate.POPULARITY], pop)
    agree = got[evaluate.AGREE + "student"]
    n = min(len(targets), evaluate.AGREE_USERS)
    assert np.isnan(agree[n:]).all() and not np.isnan(agree[:n]).any()


def test_top10_overlap_in_windows_equals_the_whole_matrix():
    torch.manual_seed(0)
    a = models.build_model({"family": "sasrec", "num_items": 40, "dim": 8, "layers": 1, "heads": 1, "max_len": 6,
                            "dropout": 0.0}).eval()
    b = models.build_model({"family": "sasrec", "num_items": 40, "dim": 4, "layers": 1, "heads": 1, "max_len": 6,
                            "dropout": 0.0}).eval()
    rng = np.random.default_rng(0)
    hist = [rng.integers(1, 41, size=rng.integers(1, 8)) for _ in range(20)]
    per_user = evaluate._overlap(a, b, hist, hist)
    with torch.no_grad():
        sa, sb = a.last_scores(models.left_pad(hist, 6)), b.last_scores(models.left_pad(hist, 6))
    whole = metrics.topk_overlap(sa, sb, 10, metrics.exclusion_mask(hist, 41))
    assert per_user.shape == (20,) and per_user.mean() == pytest.approx(whole, abs=1e-12)


def test_popularity_ranks_hand_computed():
    # counts of items 1..5: 3, 1, 3, 0, 5 -> at least 3: items 1, 3, 5
    pop = evaluate.Popularity(np.array([3, 1, 3, 0, 5]))
    targets = np.array([1, 2, 5, 4, 0, 3])
    seen = [np.array([5]), np.array([1, 1, 0]), np.array([]), np.array([4, 2]), np.array([1]), np.array([3, 5])]
    # 1: 3 and 5 tie or beat it, 5 seen -> 1; 2: 1, 3, 5 beat it, 1 seen (twice) -> 2; 5: none -> 0;
    # 4: all four others, 2 seen -> 3; padding target -> miss; 3: item 1 ties, 5 seen, 3 is the target itself -> 1
    assert pop.target_ranks(targets, seen, False).tolist() == [1, 2, 0, 3, metrics.MISS_RANK, 1]
    assert pop.target_ranks(targets, None, False).tolist() == [2, 3, 0, 4, metrics.MISS_RANK, 2]
    # a target among the seen items is a miss when excluded (user 3: 4 seen; user 5: 3 seen)
    assert pop.target_ranks(targets, seen, True).tolist() == [1, 2, 0, metrics.MISS_RANK, metrics.MISS_RANK,
                                                              metrics.MISS_RANK]


@pytest.mark.parametrize("exclude_target", [False, True])
def test_popularity_ranks_equal_the_score_matrix(exclude_target):
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 6, 300)  # ties everywhere
    pop = evaluate.Popularity(counts)
    targets = rng.integers(0, 301, 200)
    seen = [rng.integers(0, 301, rng.integers(0, 15)) for _ in range(200)]
    seen[7] = np.append(seen[7], targets[7])
    want = metrics.target_ranks(pop.last_scores(torch.zeros(200, 1)), torch.as_tensor(targets),
                                metrics.exclusion_mask(seen, 301), exclude_target)
    assert pop.target_ranks(targets, seen, exclude_target).tolist() == want.tolist()
    assert pop.target_ranks(targets, None, False).tolist() == metrics.target_ranks(
        pop.last_scores(torch.zeros(200, 1)), torch.as_tensor(targets)).tolist()
