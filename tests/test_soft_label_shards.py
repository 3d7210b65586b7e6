"""Soft labels written by the scoring actors themselves, shard by shard, in position order."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, untrained_teacher

from raykd.config import load_config
from raykd.core import models, rundir, sequences
from raykd.stages import prepare, soft_labels


def test_position_order_puts_each_users_windows_in_position_order():
    # user 0: positions 0..4 cut into windows [3, 4] (last first) and [0, 1, 2]; user 1: positions 5, 6
    pos = np.array([[-1, 3, 4], [0, 1, 2], [-1, 5, 6]])
    order = soft_labels.position_order(pos)
    assert order.tolist() == [1, 0, 2]
    real = pos[order][pos[order] >= 0]
    assert real.tolist() == list(range(7))


def test_position_order_keeps_padding_only_windows_last():
    pos = np.array([[-1, -1], [-1, 1], [-1, 0]])
    assert soft_labels.position_order(pos).tolist() == [2, 1, 0]


@pytest.fixture(scope="module")
def sharded_run(ray_session, tmp_path_factory):
    """Three sequence shards and an untrained teacher, scored by two actors."""
    run_dir = tmp_path_factory.mktemp("soft_shards")
    cfg = load_config("configs/quickstart.yaml", [*TINY, f"output_dir={run_dir}", "data.num_shards=3",
                                                   "soft_labels.num_workers=2", "soft_labels.batch_size=7"])
    prepare.run(cfg)
    untrained_teacher(run_dir, cfg)
    soft_labels.run(cfg)
    return run_dir, cfg


def test_every_shard_is_written_by_the_actors_with_every_position_in_order(sharded_run):
    run_dir, cfg = sharded_run
    out = run_dir / "soft_labels"
    shards = sequences.shard_paths(run_dir / "data")
    assert len(shards) == 3
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".parquet") == [s.name for s in shards]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no leftover temporary files"
    teacher, desc = models.load_model(run_dir / "teacher")
    k = cfg.soft_labels.top_k
    for shard in shards:
        seqs = pq.read_table(shard, columns=["user", "train"])
        w = sequences.windows(seqs["train"].combine_chunks(), desc["max_len"])
        table = pq.read_table(out / shard.name)
        users = seqs["user"].to_numpy()
        assert table["user"].to_numpy().tolist() == users[w["user"]].tolist()  # (user, t) order
        assert table["t"].to_numpy().tolist() == w["t"].tolist()
        with torch.no_grad():  # the reference: every window at once, the whole score matrix
            real = w["pos"] >= 0
            logits = teacher.score(teacher(torch.as_tensor(w["input"], dtype=torch.long))[torch.as_tensor(real)])
        logits = logits[torch.as_tensor(np.argsort(w["pos"][real]))]
        top = torch.topk(logits, k, dim=1)
        idx = np.stack(table["idx"].to_numpy(zero_copy_only=False))
        assert np.array_equal(np.sort(idx, 1), np.sort(top.indices.numpy(), 1))
        got = np.stack(table["logits"].to_numpy(zero_copy_only=False)).astype(np.float32)
        np.testing.assert_allclose(got, top.values.numpy(), rtol=2e-3, atol=2e-3)  # stored as float16
        rest = logits.scatter(1, top.indices, float("-inf")).logsumexp(1).numpy()
        np.testing.assert_allclose(table["rest"].to_numpy(), rest, rtol=1e-5, atol=1e-5)


def test_actor_files_equal_the_in_process_scorer(sharded_run, tmp_path):
    run_dir, cfg = sharded_run
    rows, size = soft_labels.score_here([run_dir / "teacher"], run_dir / "data", tmp_path,
                                        cfg.soft_labels.top_k, cfg.soft_labels.batch_size)
    info = rundir.read_manifest(run_dir / "soft_labels")
    assert rows == info["rows"] > 0 and size > 0
    for p in sorted((run_dir / "soft_labels").glob("part-*.parquet")):
        assert pq.read_table(p).equals(pq.read_table(tmp_path / p.name))


def test_the_scorer_says_its_progress_inside_a_shard(sharded_run, tmp_path, monkeypatch):
    """Ray Data hands a task's outputs on when it ends: a shard's progress must come from the actor."""
    run_dir, cfg = sharded_run
    lines = []
    monkeypatch.setattr(soft_labels.console, "say", lines.append)
    monkeypatch.setattr(soft_labels, "PROGRESS_S", 0.0)
    shard = sequences.shard_paths(run_dir / "data")[0]
    scorer = soft_labels.ShardScorer([str(run_dir / "teacher")], 20, cfg.soft_labels.top_k, False, 7, str(tmp_path))
    (row,) = list(scorer.write_shard(shard))
    assert len(lines) >= 2 and all(line.startswith(f"soft_labels: {shard.name}: ") for line in lines)
    done = [int(line.split(": ")[2].split(" of ")[0].replace(",", "")) for line in lines]
    assert done == sorted(done) and done[-1] < row["positions"][0]
