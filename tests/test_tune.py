"""The tune stage: search-space checks and the winner rules (no Ray), then one small real search.

The real search (OptunaSearch + ASHA through Ray Tune; each one-worker trial trains inside its Tune
trial, see test_tune_inprocess.py, which also covers trials on Ray Train) is interrupted with SIGINT
after its first trial, resumed, checked, and finally reused.
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
import yaml
from conftest import TINY

from raykd.config import load_config
from raykd.core import models, rundir, sequences
from raykd.core.errors import RaykdError
from raykd.stages import evaluate, prepare, soft_labels, tune
from raykd.stages.tune import report as tune_report
from raykd.stages.tune import space as tune_space

# 3 trials: the configured student first (T=1, alpha=0.5, dim=8), then two from TPE
SEARCH = [
    "tune.num_samples=3", "tune.grace_period=1", "tune.seed=1",
    ("tune.space={distill.temperature: {type: loguniform, low: 1, high: 4}, "
     "distill.alpha: {type: uniform, low: 0, high: 1}, distill.model.dim: {type: choice, values: [4, 8]}}"),
]


def cfg_with(*overrides, run_dir="/tmp/raykd-unused"):
    return load_config("configs/quickstart.yaml", [f"output_dir={run_dir}", *overrides])


# ---------------------------------------------------------------- search space, no Ray


def test_default_space_parses_to_optuna_distributions():
    space = tune_space.parse_space(cfg_with())
    assert set(space) == {"distill.temperature", "distill.alpha", "distill.model.dim", "distill.model.layers",
                          "distill.train.lr"}
    assert space["distill.temperature"].log and space["distill.temperature"].low == 1.0
    assert not space["distill.alpha"].log
    assert space["distill.model.dim"].choices == (8, 16, 32)


def test_int_ranges_and_any_distill_key_are_searchable():
    cfg = cfg_with("tune.space={distill.model.dim: {type: int, low: 8, high: 32}, "
                   "distill.train.weight_decay: {type: uniform, low: 0, high: 0.1}, "
                   "distill.loss: {type: choice, values: [kl, rank]}}")
    space = tune_space.parse_space(cfg)
    assert (space["distill.model.dim"].low, space["distill.model.dim"].high) == (8, 32)
    assert space["distill.loss"].choices == ("kl", "rank")


@pytest.mark.parametrize("space, message", [
    ("{}", "tune.space is empty"),
    ("{distill.temprature: {type: uniform, low: 1, high: 2}}", "not a config key: distill.temprature does not exist"),
    ("{distill.model.size: {type: choice, values: [1]}}", "valid keys here: distill.model.family"),
    ("{distill.alpha.x: {type: uniform, low: 0, high: 1}}", "distill.alpha is a value, not a section"),
    ("{distill.model: {type: choice, values: [1]}}", "is a section"),
    ("{teacher.train.lr: {type: loguniform, low: 0.001, high: 0.01}}", "only distill.* settings"),
    ("{distill.train.num_workers: {type: choice, values: [1, 2]}}", "cannot be searched"),
    ("{distill.temperature: {type: uniform, low: 5, high: 2}}", "low (5) is greater than high (2)"),
    ("{distill.temperature: {type: loguniform, low: 0, high: 2}}", "loguniform needs low > 0"),
    ("{distill.model.dim: {type: choice}}", "choice needs a non-empty `values` list"),
    ("{distill.model.dim: {type: choice, values: []}}", "choice needs a non-empty `values` list"),
    ("{distill.model.dim: {type: choice, values: [8], low: 1}}", "takes `values`, not low/high"),
    ("{distill.alpha: {type: uniform, low: 0}}", "needs both low and high"),
    ("{distill.alpha: {type: uniform, low: 0, high: 1, values: [1]}}", "`values` is only for type choice"),
    ("{distill.model.dim: {type: int, low: 8.5, high: 16}}", "whole numbers"),
    ("{distill.alpha: {type: uniform, low: 0, high: 2}}", "2.0 is not a valid distill.alpha"),
    ("{distill.loss: {type: uniform, low: 0, high: 1}}", "distill.loss is not a number"),
    ("{distill.model.heads: {type: choice, values: [1, 3]}}", "dim divisible by heads"),
])
def test_bad_search_spaces_are_clear_errors(space, message):
    with pytest.raises(RaykdError) as err:
        tune_space.parse_space(cfg_with(f"tune.space={space}"))
    assert message in str(err.value)


def test_errors_come_before_ray_starts(tmp_path):
    # no data, no Ray: the checks must not need either
    with pytest.raises(RaykdError, match="tune.space is empty"):
        tune.run(cfg_with("tune.space={}", run_dir=tmp_path))
    with pytest.raises(RaykdError, match="too small to finish one trial"):
        tune.run(cfg_with("tune.time_budget_s=1", run_dir=tmp_path))
    with pytest.raises(RaykdError, match="too small to finish one trial"):  # a Train start per trial
        tune.run(cfg_with("tune.time_budget_s=5", "tune.in_process=false", run_dir=tmp_path))
    assert not (tmp_path / "tune").exists()


def test_budget_estimate_uses_the_distilled_students_pace(tmp_path):
    (tmp_path / "student").mkdir()
    history = [{"seconds": s} for s in (9.0, 2.0, 2.0, 2.0)]
    (tmp_path / "student" / "metrics.json").write_text(json.dumps({"train_seconds": 40.0, "history": history}))
    cfg = cfg_with("distill.train.epochs=10", "tune.in_process=false", run_dir=tmp_path)
    # on Ray Train: start-up 40 - 15 = 25 s, then 10 epochs at the median pace after the first (2 s)
    assert tune.trial_estimate_s(tmp_path, cfg) == pytest.approx(25 + 20)
    with pytest.raises(RaykdError, match="at least 45 s"):
        tune.check_budget(cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"time_budget_s": 30})}), tmp_path)
    tune.check_budget(cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"time_budget_s": 45})}), tmp_path)
    # in the trial process: no Train start, only the trial's own 2 s floor
    here = cfg_with("distill.train.epochs=10", run_dir=tmp_path)
    assert tune.trial_estimate_s(tmp_path, here) == pytest.approx(2 + 20)


def test_disabled_stage_is_skipped(capsys):
    assert tune.run(cfg_with("tune.enabled=false", "tune.space={}")) == {}
    assert "skipped" in capsys.readouterr().out


def test_apply_values_sets_dotted_keys_on_a_copy():
    cfg = cfg_with()
    new = tune_space.apply_values(cfg, {"distill.temperature": 3.0, "distill.model.dim": np.int64(32)})
    assert new.distill.temperature == 3.0 and new.distill.model.dim == 32
    assert cfg.distill.temperature == 1.0 and cfg.distill.model.dim == 16
    with pytest.raises(RaykdError, match="less than or equal to 1"):
        tune_space.apply_values(cfg, {"distill.alpha": 1.5})


def test_the_codes_of_a_pq_table_are_searchable_from_a_dense_student():
    """The student has no item_table (dense): searching item_table.codes makes every trial a PQ
    student with that many codes (was: 'distill.model.item_table is a value, not a section')."""
    cfg = cfg_with("tune.space={distill.model.item_table.codes: {type: choice, values: [2, 4]}}")
    assert cfg.distill.model.item_table is None
    space = tune_space.parse_space(cfg)
    assert space["distill.model.item_table.codes"].choices == (2, 4)
    trial = tune_space.apply_values(cfg, {"distill.model.item_table.codes": 2})
    assert trial.distill.model.item_table.codes == 2 and trial.distill.model.item_table.kind == "pq"
    assert trial.distill.model.item_table.assign == "svd"  # teacher-free codes by default
    assert tune_space.config_value(cfg, "distill.model.item_table.codes") is None
    assert tune_space.configured_point(cfg, space) is None  # the config's own point is not in the space
    with pytest.raises(RaykdError, match="cannot exceed dim"):
        tune_space.parse_space(cfg_with("tune.space={distill.model.item_table.codes: {type: choice, "
                                        "values: [2, 64]}}"))


def test_configured_point_starts_the_search_only_when_inside_the_space():
    cfg = cfg_with()
    space = tune_space.parse_space(cfg)
    assert tune_space.configured_point(cfg, space) == {"distill.temperature": 1.0, "distill.alpha": 0.5,
                                                 "distill.model.dim": 16, "distill.model.layers": 1,
                                                 "distill.train.lr": 0.003}
    outside = cfg_with("distill.model.dim=64")
    assert tune_space.configured_point(outside, tune_space.parse_space(outside)) is None


# ---------------------------------------------------------------- the winner rules, no Ray


def hand_made_table() -> pd.DataFrame:
    return pd.DataFrame({
        "trial_id": ["a", "b", "c", "d", "e", "f"],
        "val_ndcg@10": [0.300, 0.296, 0.280, 0.2941, None, 0.290],
        "params": [40_000, 20_000, 5_000, 10_000, 1_000, 20_000],
        "latency_ms": [4.0, 2.5, 1.0, 2.0, 0.5, 3.0],
    })


def test_pareto_front_on_a_hand_made_table():
    t = hand_made_table().dropna()
    front = tune_report.pareto_front(t["val_ndcg@10"], t["params"])
    # f (same size as b, worse) is dominated; the rest trade NDCG for size
    assert list(t["trial_id"][front]) == ["a", "b", "c", "d"]


def test_pareto_pick_is_the_smallest_student_within_the_allowed_drop():
    t = hand_made_table()
    # within 2% of 0.300 means >= 0.294: b (0.296, 20k) and d (0.2941, 10k) qualify, d is smaller
    win, why = tune_report.pick_winner(t, "pareto", "params", 0.02)
    assert t.at[win, "trial_id"] == "d"
    assert "smallest student (10,000 params) within 2%" in why and "0.3000" in why
    # a tighter allowance (>= 0.2955) keeps only a and b; none at all keeps the best
    assert t.at[tune_report.pick_winner(t, "pareto", "params", 0.015)[0], "trial_id"] == "b"
    win0, why0 = tune_report.pick_winner(t, "pareto", "params", 0.0)
    assert t.at[win0, "trial_id"] == "a" and "no smaller student" in why0
    # a loose allowance reaches c; the failed trial e (no NDCG) never wins, however small
    assert t.at[tune_report.pick_winner(t, "pareto", "params", 0.10)[0], "trial_id"] == "c"
    # the same rule on latency
    assert t.at[tune_report.pick_winner(t, "pareto", "latency_ms", 0.02)[0], "trial_id"] == "d"


def test_ndcg_pick_is_the_best_and_ties_go_to_the_smaller_student():
    t = hand_made_table()
    win, why = tune_report.pick_winner(t, "ndcg", "params")
    assert t.at[win, "trial_id"] == "a" and "next best 0.2960" in why
    t.loc[len(t)] = ["g", 0.300, 30_000, 3.0]
    assert t.at[tune_report.pick_winner(t, "ndcg", "params")[0], "trial_id"] == "g"
    with pytest.raises(RaykdError, match="every trial failed"):
        tune_report.pick_winner(t.assign(**{"val_ndcg@10": None}), "ndcg", "params")


def test_budgeted_searcher_stops_proposing_and_keeps_time_spent_across_restore(tmp_path):
    space = tune_space.parse_space(cfg_with(*SEARCH))
    s = tune.BudgetedOptuna(space, metric=["best_val_ndcg@10", "params"], mode=["max", "min"], seed=0,
                            budget_s=3600, marker=str(tmp_path / "budget_spent"))
    first = s.suggest("t1")
    assert set(first) == set(space)
    s.on_trial_complete("t1", {"best_val_ndcg@10": 0.2, "params": 1000})
    assert s._ot_study.trials[0].values == [0.2, 1000]  # both objectives reached Optuna
    s._spent = 3599.0
    s.save(str(tmp_path / "state.pkl"))
    restored = tune.BudgetedOptuna(space, metric=["best_val_ndcg@10", "params"], mode=["max", "min"], seed=0,
                                   budget_s=3600, marker=str(tmp_path / "budget_spent"))
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.suggest("t2") is not None  # 1 s left
    restored._spent = 3600.0
    assert restored.suggest("t3") == restored.FINISHED
    assert (tmp_path / "budget_spent").exists()


# ---------------------------------------------------------------- a real search through Ray Tune


@pytest.fixture(scope="module")
def tiny_run(ray_session, tmp_path_factory):
    """Prepared data and soft labels on a tiny synthetic log (no distill stage).

    The teacher is saved untrained: its soft labels only need the right shape here, and a
    Ray Train run fewer keeps this file fast.
    """
    run_dir = tmp_path_factory.mktemp("tune_run")
    cfg = load_config("configs/quickstart.yaml", [*TINY, f"output_dir={run_dir}"])
    prepare.run(cfg)
    m = cfg.teacher.model
    desc = {"family": m.family, "num_items": sequences.num_items(run_dir / "data"), **m.model_dump(exclude={"family"})}
    torch.manual_seed(0)
    with rundir.staged(run_dir / "teacher") as tmp:  # published and recorded as the teacher stage does
        models.save_model(tmp, models.build_model(desc), desc, extra={"fingerprint": "untrained"})
        rundir.write_manifest(tmp, "untrained", {"data": rundir.key_of(run_dir / "data")})
    rundir.record(run_dir, "teacher", "teacher", ["data"])
    soft_labels.run(cfg)
    return run_dir


def search_cfg(run_dir, *extra):
    return load_config("configs/quickstart.yaml", [*TINY, *SEARCH, "tune.enabled=true", f"output_dir={run_dir}", *extra])


def test_search_interrupted_resumed_and_reused(tiny_run, monkeypatch, capsys):
    cfg = search_cfg(tiny_run)
    out = tiny_run / "tune"
    original = tune.Progress.on_trial_complete
    finished: list[str] = []

    def interrupt_after_first(self, iteration, trials, trial, **info):
        original(self, iteration, trials, trial, **info)
        finished.append(trial.trial_id)
        if len(finished) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: Tune saves the experiment and returns

    monkeypatch.setattr(tune.Progress, "on_trial_complete", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        tune.run(cfg)
    first_id = finished[0]
    first_ckpts = tune_report.trial_checkpoints(out, first_id)  # in-process: Tune's, under search/
    assert first_ckpts and not (out / "summary.json").exists()
    monkeypatch.setattr(tune.Progress, "on_trial_complete", original)

    handler = signal.getsignal(signal.SIGINT)
    summary = tune.run(cfg)  # resumes: the first trial is not run again
    assert signal.getsignal(signal.SIGINT) is handler  # Tune's Ctrl-C handler does not outlive the search
    printed = capsys.readouterr().out
    assert "resuming the search" in printed and "why:" in printed
    assert tune_report.trial_checkpoints(out, first_id) == first_ckpts
    assert f"({first_id}) started" not in printed.split("resuming the search")[1]

    table = pq.read_table(out / "trials.parquet").to_pandas()
    assert len(table) == 3 and table["trial_id"].is_unique and first_id in set(table["trial_id"])
    assert set(table["state"]) <= {"finished", "stopped"}
    assert table["configured"].sum() == 1  # the configured student was the first point
    assert len(pd.read_csv(out / "trials.csv")) == 3
    # the winner is the best val NDCG, exported as a servable student that scores like its trial
    win = table[table["winner"]].iloc[0]
    assert win["val_ndcg@10"] == table["val_ndcg@10"].max()
    assert summary["winner"]["trial_id"] == win["trial_id"]
    exported = json.loads((out / "best" / "metrics.json").read_text())
    assert exported["valid"]["ndcg@10"] == pytest.approx(win["val_ndcg@10"])
    model, desc = models.load_model(out / "best")
    assert desc["dim"] == win["distill.model.dim"] and models.count_params(model) == win["params"]
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["distill"]["temperature"] == pytest.approx(win["distill.temperature"])
    assert best["distill"]["model"]["dim"] == win["distill.model.dim"]
    for png in ("ndcg_vs_params.png", "ndcg_vs_temperature.png", "ndcg_vs_alpha.png"):
        assert (out / png).stat().st_size > 5000
    assert table["pareto"].any() and (table["params"] > 0).all() and (table["latency_ms"] > 0).all()

    # the evaluate stage scores tune/best on test
    report = evaluate.run(cfg)
    assert 0 <= report["tune_best"]["ndcg@10"] <= 1 and report["tune_best"]["params"] == win["params"]

    # same settings again: reused without Ray work; a new pick rule re-reads the same trials
    assert tune.run(cfg)["winner"] == summary["winner"]
    assert "reusing" in capsys.readouterr().out
    pareto = tune.run(search_cfg(tiny_run, "tune.max_quality_drop=0.5"))
    assert pareto["trials"] == 3 and "resuming" not in capsys.readouterr().out
