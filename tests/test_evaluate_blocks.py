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
