"""Tune trials that train in the trial itself (no Ray Train start), and the windows they share.

A student on one CPU worker trains inside its Tune trial with `loop.local_runner` (the loop of
`fit_local`) on windows streamed from the shards, with the soft labels of every real slot; each
epoch is reported to Tune with a checkpoint in the format Ray Train writes. The TorchTrainer path
stays for several workers or a GPU (forced here through `tune_trial.in_process`).
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, copy_parts, untrained_teacher

from raykd.cluster import train
from raykd.config import load_config
from raykd.core import models, sequences
from raykd.stages import prepare, soft_labels, tune
from raykd.stages.tune import report as tune_report
from raykd.stages.tune import trial as tune_trial
from raykd.training import loop

SPACE = ("tune.space={distill.temperature: {type: loguniform, low: 1, high: 4}, "
         "distill.alpha: {type: uniform, low: 0, high: 1}, distill.model.dim: {type: choice, values: [4, 8]}}")


def cfg_for(run_dir, *extra):
    return load_config("configs/quickstart.yaml", [*TINY, f"output_dir={run_dir}", *extra])


@pytest.fixture(scope="module")
def soft_run(ray_session, tmp_path_factory):
    """Prepared data and soft labels (of an untrained teacher: only their shape matters here)."""
    run_dir = tmp_path_factory.mktemp("inprocess_run")
    cfg = cfg_for(run_dir)
    prepare.run(cfg)
    untrained_teacher(run_dir, cfg)
    soft_labels.run(cfg)
    return run_dir


@pytest.fixture
def fresh_run(soft_run, tmp_path):
    """A run directory of its own (same data and soft labels), so searches never reuse each other."""
    copy_parts(soft_run, tmp_path, "data", "teacher", "soft_labels")
    return tmp_path


# ---------------------------------------------------------------- windows and soft labels


def test_soft_labels_are_packed_and_gathered_per_window_in_slot_order(soft_run):
    data, soft = soft_run / "data", soft_run / "soft_labels"
    cols = loop.windows_in_memory(data, 20, soft)
    first = 0
    for shard in sequences.shard_paths(data):
        table = sequences.window_table(shard, 20, soft / shard.name)
        labels = pq.read_table(soft / shard.name)
        k = labels.schema.field("idx").type.list_size
        idx = labels["idx"].combine_chunks().values.to_numpy().reshape(-1, k)
        pos = sequences.windows(pq.read_table(shard)["train"].combine_chunks(), 20)["pos"]
        for w in range(0, len(pos), 7):  # the reference: window by window, as the bytes were once built
            assert table["t_idx"][w].as_py() == idx[pos[w][pos[w] >= 0]].astype(np.int32).tobytes()
        # Ray Data's batches (bytes per window) and in-memory batches decode to the same tensors
        rows = np.arange(0, table.num_rows, 3)
        ray_batch = {c: table[c].to_numpy(zero_copy_only=False)[rows] for c in table.column_names}
        ray_batch = {c: np.stack(v) if c in ("input", "target") else v for c, v in ray_batch.items()}
        mine = sequences.take(cols, rows + first)
        for a, b in zip(loop.soft(ray_batch, "cpu"), loop.soft(mine, "cpu")):
            assert a is not None and torch.equal(a, b)
        assert np.array_equal(mine["target"], ray_batch["target"])
        first += table.num_rows
    assert first == len(cols["input"]) and cols["t_start"][-1] == len(cols["t_idx"]) == int((cols["target"] > 0).sum())


def test_local_run_checkpoints_resume_and_export_like_ray_train(soft_run, tmp_path):
    cfg = cfg_for(soft_run, "distill.loss=kl_full", "distill.train.loss=sampled", "distill.train.num_negatives=50")
    run_spec = tune_trial.trial_spec(cfg, "tune/trial_x")
    first = loop.local_runner(run_spec, soft_run / "data")
    first.epoch(0)
    first.save(tmp_path / "ckpt")
    again = loop.local_runner(run_spec, soft_run / "data")
    again.restore(tmp_path / "ckpt")
    assert again.state["epoch"] == 0 and again.state["resumed"] == 1
    h = again.epoch(1)
    assert h["epoch"] == 1 and h["steps"] > 0 and np.isfinite(h["loss"]) and set(loop.VAL_KEYS) <= set(h)
    again.save(tmp_path / "ckpt2")
    summary = train.export(tmp_path / "ckpt2", tmp_path / "best", run_spec, soft_run / "data", {"name": "x"})
    assert summary["epochs_run"] == 2 and [e["epoch"] for e in summary["history"]] == [1, 2]
    model, desc = models.load_model(tmp_path / "best")
    assert desc["dim"] == cfg.distill.model.dim and models.count_params(model) == summary["params"]


# ---------------------------------------------------------------- searches through Ray Tune


def test_inprocess_pareto_search_resumes_a_trial_from_its_last_checkpoint(fresh_run, monkeypatch, capsys):
    cfg = cfg_for(fresh_run, "tune.enabled=true", "tune.num_samples=2", "tune.objective=pareto", "tune.seed=1",
                  "distill.train.epochs=25", "distill.train.patience=25", SPACE)  # epochs left when interrupted
    out = fresh_run / "tune"
    original = tune.Progress.on_trial_result
    seen: list[str] = []

    def interrupt_at_epoch_3(self, iteration, trials, trial, result, **info):
        original(self, iteration, trials, trial, result, **info)
        # Ctrl-C in the middle of the first trial; Tune has registered its checkpoints of epochs 1-2
        if not seen and result.get("epochs_done") == 3:
            seen.append(trial.trial_id)
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(tune.Progress, "on_trial_result", interrupt_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        tune.run(cfg)
    assert "no Ray Train start" in capsys.readouterr().out
    assert tune_report.trial_checkpoints(out, seen[0])
    monkeypatch.setattr(tune.Progress, "on_trial_result", original)

    summary = tune.run(cfg)
    assert "resuming the search" in capsys.readouterr().out
    assert json.loads((out / "search.json").read_text())["in_process"] is True
    assert not (out / "train").exists()  # no Ray Train run at all
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 2 and set(table["state"]) == {"finished"} and table["overhead_s"].notna().all()
    row = table[table["trial_id"] == seen[0]].iloc[0]
    state = json.loads((tune_report.trial_checkpoints(out, seen[0])[-1] / "state.json").read_text())
    assert state["resumed"] == 1  # continued from its checkpoint, not restarted
    assert [h["epoch"] for h in state["history"]] == list(range(row["epochs_run"]))
    assert summary["winner"]["trial_id"] in set(table["trial_id"]) and table["pareto"].any()
    exported = json.loads((out / "best" / "metrics.json").read_text())
    assert exported["valid"]["ndcg@10"] == pytest.approx(summary["winner"]["val_ndcg@10"])


def test_trials_on_ray_train_when_not_in_process(fresh_run, monkeypatch, capsys):
    monkeypatch.setattr(tune_trial, "in_process", lambda cfg: False)  # as for 2 workers or a GPU
    cfg = cfg_for(fresh_run, "tune.enabled=true", "tune.num_samples=2", "tune.grace_period=1", SPACE)
    summary = tune.run(cfg)
    assert "worker(s) x" in capsys.readouterr().out
    out = fresh_run / "tune"
    assert json.loads((out / "search.json").read_text())["in_process"] is False
    table = pd.read_csv(out / "trials.csv")
    assert len(table) == 2 and table["val_ndcg@10"].notna().all()
    for trial_id in table["trial_id"]:
        assert tune_report.trial_checkpoints(out, trial_id)[0].parent == out / "train" / f"trial_{trial_id}"
    assert (out / "best" / "model.safetensors").exists() and summary["trials"] == 2
