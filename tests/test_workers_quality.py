"""The same config gives the same student quality on 1 and 2 workers (issue 13, deliverable 4).

The quickstart's data, teacher and soft labels, then its KD student twice: on one CPU worker (a
Ray task) and on two DDP workers (Ray Train, half a CPU each). Before the global batch was kept
fixed across worker counts, the 2-worker student took half the steps per epoch, stopped early in
its plateau and scored 0.10 test NDCG@10 against 0.25 on one worker. Compared here paired over
the same test users, under the served protocol; one seed, so the tolerance is relative (15 %).
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
from conftest import copy_parts

from raykd import stages
from raykd.config import load_config
from raykd.core import models, sequences
from raykd.stages import distill, evaluate


def quickstart(run_dir, *extra):
    return load_config("configs/quickstart.yaml", [f"output_dir={run_dir}", "tune.enabled=false",
                                                   "teacher.train.epochs=10", "distill.train_nokd=false",
                                                   "distill.train.epochs=30", "distill.train.min_epochs=15", *extra])


def test_one_and_two_workers_give_the_same_student_quality(ray_session, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    stages.run(quickstart(one), ["prepare", "teacher", "soft_labels", "distill"])
    copy_parts(one, two, "data", "teacher", "soft_labels")
    distill.run(quickstart(two, "distill.train.num_workers=2", "distill.train.cpus_per_worker=0.5"))
    runs = {n: json.loads((d / "student" / "metrics.json").read_text()) for n, d in (("one", one), ("two", two))}
    assert (runs["one"]["trainer"], runs["two"]["trainer"]) == ("ray_task", "torch_trainer")

    split = sequences.read_split(one / "data")
    hist, targets, seen = sequences.eval_inputs(split, "test")
    protocol = evaluate.Protocol(seen, True)
    ranks = {name: protocol.ranks(models.load_model(root / "student")[0], hist, targets)
             for name, root in (("one", one), ("two", two))}
    scores = {name: evaluate.summary(r) for name, r in ranks.items()}
    counts = pq.read_table(one / "data" / "items.parquet", columns=["count"])["count"].to_numpy()
    popularity = evaluate.summary(protocol.ranks(evaluate.Popularity(counts), hist, targets))
    paired = evaluate.paired_ndcg(ranks["two"], ranks["one"])
    print(f"test NDCG@10: 1 worker {scores['one']['ndcg@10']:.4f}, 2 workers {scores['two']['ndcg@10']:.4f}, "
          f"most-popular {popularity['ndcg@10']:.4f}; paired 2 - 1 {paired['mean_diff']:+.4f} ± {paired['stderr']:.4f}")
    assert paired["users"] == len(targets)
    # Within run-to-run noise: both students are still climbing at epoch 30, and one that leaves its
    # early plateau an epoch sooner is ~8 % ahead there (seen: 0.2458 on 2 workers vs 0.2266 on 1,
    # paired +0.019 ± 0.004). The old 2-worker defect was at 0.42x.
    ratio = scores["two"]["ndcg@10"] / scores["one"]["ndcg@10"]
    assert 0.85 <= ratio <= 1 / 0.85, ratio
    for name in ("one", "two"):  # and both far above most-popular (the 2-worker bug fell below it)
        assert scores[name]["ndcg@10"] > 2 * popularity["ndcg@10"]

