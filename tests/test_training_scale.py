"""Training that scales with the log: validation on a seeded user sample, progress inside epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykd.config import ModelConfig, TrainConfig
from raykd.core import metrics, models, sequences
from raykd.training import loop
from raykd.training.spec import RunSpec


def test_validation_users_is_every_user_or_a_fixed_sorted_sample():
    assert loop.validation_users(5, 0, seed=1).tolist() == [0, 1, 2, 3, 4]
    assert loop.validation_users(5, 5, seed=1).tolist() == [0, 1, 2, 3, 4]
    assert loop.validation_users(5, 9, seed=1).tolist() == [0, 1, 2, 3, 4]
    sample = loop.validation_users(1000, 10, seed=3)
    assert len(sample) == 10 and len(set(sample.tolist())) == 10
    assert (np.diff(sample) > 0).all() and sample.min() >= 0 and sample.max() < 1000
    assert np.array_equal(sample, loop.validation_users(1000, 10, seed=3))  # every epoch, every rank
    assert not np.array_equal(sample, loop.validation_users(1000, 10, seed=4))
    ranks = [sample[r::2] for r in range(2)]  # how a 2-worker run splits them
    assert sorted(np.concatenate(ranks).tolist()) == sample.tolist()


def test_progress_says_steps_rate_and_eta_only_after_its_interval(monkeypatch):
    clock = iter([0.0, 10.0, 40.0, 50.0, 80.0])
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    lines = []
    p = loop.Progress("teacher", epoch=0, every_s=30.0, windows=4000, say=lines.append)  # starts at t=0
    p.step(1, 256)  # t=10: too soon
    assert lines == []
    p.step(2, 256)  # t=40: 512 windows in 40 s = 12.8/s; 3488 left -> 272.5 s = 4:32
    assert lines == ["teacher: epoch 1 step 2, 13 windows/s, 13% of the epoch, ETA 4:32"]
    p.step(3, 256)  # t=50: 10 s after the last line
    assert len(lines) == 1
    p.step(4, 256)  # t=80: 1024 windows / 80 s = 12.8/s, 2976 left -> 232.5 s
    assert lines[-1] == "teacher: epoch 1 step 4, 13 windows/s, 26% of the epoch, ETA 3:52"
    assert loop._clock(3725) == "1:02:05"


def test_progress_without_a_known_epoch_size_has_no_eta(monkeypatch):
    clock = iter([0.0, 31.0])
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    lines = []
    loop.Progress("student", epoch=2, every_s=30.0, windows=None, say=lines.append).step(7, 62)
    assert lines == ["student: epoch 3 step 7, 2 windows/s"]


def test_validation_says_users_rate_and_eta_only_after_its_interval(monkeypatch):
    clock = iter([0.0, 10.0, 40.0, 50.0])
    monkeypatch.setattr(loop.time, "perf_counter", lambda: next(clock))
    lines = []
    said = loop.ValidationProgress("teacher", epoch=1, every_s=30.0, say=lines.append)  # starts at t=0
    said(256, 10_000)  # t=10: too soon
    said(4096, 10_000)  # t=40: 4096 users in 40 s = 102.4/s; 5904 left -> 57.7 s
    said(4352, 10_000)  # t=50: 10 s after the last line
    assert lines == ["teacher: epoch 2 validation, 4,096 of 10,000 users (41%), 102 users/s, ETA 0:57"]


def test_evaluate_model_reports_every_batch_of_users():


    torch.manual_seed(0)
    model = models.SASRec(num_items=20, dim=8, layers=1, heads=1, max_len=5, dropout=0.0)
    hist = [np.array([1, 2, 3])] * 7
    seen = []
    metrics.evaluate_model(model, hist, np.arange(1, 8), batch_size=3, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(3, 7), (6, 7), (7, 7)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared data folder of 60 users over 30 items (the format `raykd prepare` writes)."""
    from raykd.stages import prepare

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 12, 60)
    items = rng.integers(1, 31, int(lengths.sum())).astype(np.int32)
    out = tmp_path_factory.mktemp("prepared")
    result = {"lengths": lengths, "items": items, "user_raw": np.arange(60).astype(str),
              "item_raw": np.arange(1, 31).astype(str), "stats": {"users": 60, "items": 30}}
    prepare.write(result, out, num_shards=2)
    return out


def test_a_run_validates_on_the_sample_and_reports_its_metrics(prepared):
    spec = RunSpec("student", ModelConfig(dim=8, layers=1, heads=1, max_len=10),
                   TrainConfig(epochs=1, batch_size=16, val_users=12), seed=5)
    model, summary = loop.fit_local(spec, prepared, log=lambda *_: None)
    split = sequences.read_split(prepared)
    users = loop.validation_users(60, 12, seed=5)
    expected = metrics.evaluate_model(model, *sequences.eval_inputs(split, "valid", users))
    every = metrics.evaluate_model(model, *sequences.eval_inputs(split, "valid"))
    assert summary["valid"]["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-12)
    assert expected["users"] == 12 and every["users"] == 60
    assert summary["valid"]["ndcg@10"] != pytest.approx(every["ndcg@10"], abs=1e-9)  # the sample, not everyone


def test_loss_auto_samples_the_softmax_only_on_a_large_catalogue():
    from raykd.config import SAMPLED_ABOVE_ITEMS

    auto, full, sampled = TrainConfig(), TrainConfig(loss="full"), TrainConfig(loss="sampled")
    assert auto.loss == "auto"
    assert not loop.sampled_softmax(auto, SAMPLED_ABOVE_ITEMS) and loop.sampled_softmax(auto, SAMPLED_ABOVE_ITEMS + 1)
    assert not loop.sampled_softmax(full, 10 * SAMPLED_ABOVE_ITEMS)
    assert loop.sampled_softmax(sampled, 10)


def test_loss_auto_on_a_small_catalogue_is_the_full_softmax(prepared):
    spec = RunSpec("teacher", ModelConfig(dim=8, layers=1, heads=1, max_len=10), TrainConfig(epochs=1), seed=0)
    desc = loop.model_desc(spec, prepared)
    assert loop.sampling_log_q(spec, desc, prepared, "cpu") is None
    forced = RunSpec("teacher", spec.model, TrainConfig(epochs=1, loss="sampled"), seed=0)
    log_q = loop.sampling_log_q(forced, desc, prepared, "cpu")
    assert log_q is not None and len(log_q) == desc["num_items"] + 1  # row 0: padding


def test_reading_only_the_sampled_users_gives_their_rows_of_the_whole_split(prepared):
    whole = sequences.read_split(prepared)
    assert sequences.num_users(prepared) == len(whole["user"]) == 60
    users = np.array([0, 5, 29, 30, 31, 59])  # across both shards (30 users each)
    part = sequences.read_split(prepared, users)
    assert part["user"].tolist() == whole["user"][users].tolist()
    assert all(np.array_equal(part["train"][i], whole["train"][u]) for i, u in enumerate(users))
    assert np.array_equal(part["valid"], whole["valid"][users]) and np.array_equal(part["test"], whole["test"][users])
    assert len(sequences.read_split(prepared, np.array([], dtype=np.int64))["user"]) == 0


def test_a_run_says_its_validation_progress(prepared, monkeypatch):
    """progress_s ~ 0: a line after every validation batch, from the runner a stage uses."""
    lines = []
    monkeypatch.setattr(loop.console, "say", lines.append)
    spec = RunSpec("student", ModelConfig(dim=8, layers=1, heads=1, max_len=10),
                   TrainConfig(epochs=1, batch_size=16, val_users=12, progress_s=1e-9), seed=5)
    loop.fit_local(spec, prepared, log=lambda *_: None)
    said = [line for line in lines if "validation" in line]
    assert said and said[-1].startswith("student: epoch 1 validation, 12 of 12 users (100%)"), lines


def test_a_sampled_run_trains_its_table_sparsely_in_process(prepared):
    spec = RunSpec("teacher", ModelConfig(dim=8, layers=1, heads=1, max_len=10),
                   TrainConfig(epochs=2, batch_size=16, loss="sampled", num_negatives=5), seed=5)
    runner = loop.local_runner(spec, prepared)
    assert isinstance(runner.optimizer, loop.TableAndRest)
    before = runner.core.item_emb.weight.detach().clone()
    runner.run(lambda report, due: None)
    assert runner.summary()["sparse_table"] is True
    assert not torch.equal(runner.core.item_emb.weight.detach(), before)  # the table did train
