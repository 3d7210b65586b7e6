"""Experiment tracking (raykd.cluster.tracking), read back with each backend's own reader.

One tiny pipeline runs with `tracking.backend=mlflow` on a local file store: MLflow's client must
find a run per trained model with its per-epoch loss and validation metrics, and a `report` run
with the test metrics, report.json, report.md and the plots. The same run checks the console:
raykd's lines only, Ray's output in <run>/logs/. TensorBoard's writer is checked without Ray
(the Train callback fed reports by hand, read back with EventAccumulator), and Ray Tune's logger
callbacks on a one-trial Tune run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_config

from raykd.cluster import tracking
from raykd.config import load_config
from raykd.core import console
from raykd.stages import pipeline

mlflow = pytest.importorskip("mlflow")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def mlflow_client(uri: str):
    import os

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: the file store is an opt-in
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def mlflow_run(ray_session, tmp_path_factory):
    """The tiny pipeline with MLflow tracking, its console output captured. The teacher trains on
    Ray Train (tracked in its controller), the students as Ray tasks (tracked by the driver)."""
    import contextlib
    import io

    run_dir = tmp_path_factory.mktemp("tracked")
    uri = (run_dir.parent / f"{run_dir.name}-mlruns").as_uri()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pipeline.run(tiny_config(run_dir, "tracking.backend=mlflow", f"tracking.uri={uri}",
                                 "tracking.project=tiny", "teacher.train.trainer=ray_train"))
    return run_dir, uri, out.getvalue()


def test_mlflow_has_every_training_run_per_epoch_and_the_report(mlflow_run):
    run_dir, uri, _ = mlflow_run
    client = mlflow_client(uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert {"teacher", "student", "student_nokd", "report"} <= set(runs)
    for name in ("teacher", "student", "student_nokd"):
        run = runs[name]
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "val/ndcg_at_10")
        assert [m.step for m in history] == [1, 2]  # epochs from 1
        assert all(0 <= m.value <= 1 for m in history)
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 2
        assert run.data.params["model.dim"] == ("16" if name == "teacher" else "8")
        assert run.data.tags["raykd.role"] == name
    assert runs["student"].data.params["kd.alpha"] == "0.5" and "kd.alpha" not in runs["student_nokd"].data.params
    report_run = runs["report"]
    report = json.loads((run_dir / "report.json").read_text())
    assert report_run.data.metrics["test/student/ndcg_at_10"] == pytest.approx(report["student"]["ndcg@10"])
    files = {f.path for f in client.list_artifacts(report_run.info.run_id)}
    assert {"report.json", "report.md", "curves.png", "kd_gain.png"} <= files


def test_the_console_shows_raykd_lines_and_ray_output_goes_to_the_logs(mlflow_run):
    run_dir, _, printed = mlflow_run
    lines = printed.splitlines()
    assert len(lines) < 60
    for noise in ("pid=", "Traceback", "core_worker.cc", "RayDeprecationWarning", "execution finished", "\x1b["):
        assert not [line for line in lines if noise in line], noise
    assert any(line.startswith("teacher: epoch 2/2 loss") for line in lines)  # the last epoch is always shown
    assert any(line.startswith("evaluate: test metrics") for line in lines)
    logs = run_dir / "logs"
    assert "teacher: epoch 1/2" in (logs / "raykd.log").read_text()
    assert "TrainController" in (logs / "ray-workers.log").read_text()


def test_tensorboard_events_of_a_training_run_and_the_report(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["tracking.backend=tensorboard", f"output_dir={tmp_path}"])
    found = tracking.settings(cfg.tracking, cfg.name, tmp_path)
    callback = tracking.TrainTracking(found, "student", {"model": {"dim": 8}}, {"raykd.role": "student"})
    for epoch in range(3):  # reports as raykd.cluster.train.train_loop makes them (epochs from 0)
        callback.after_report(None, [{"epoch": epoch, "loss": 3.0 - epoch, "val_ndcg@10": 0.1 * (epoch + 1),
                                      "val_hr@10": 0.2, "best_val_ndcg@10": 0.1 * (epoch + 1),
                                      "final": epoch == 2}], None)
    assert not callback.failed and callback.run is None
    (tmp_path / "report.md").write_text("# report\n")
    (tmp_path / "report.json").write_text(json.dumps({"student": {"ndcg@10": 0.25}}))
    tracking.log_report(cfg, tmp_path, {"student": {"ndcg@10": 0.25, "hr@10": 0.5}, "plots": {}})

    events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "student"))
    events.Reload()
    assert [(e.step, round(e.value, 3)) for e in events.Scalars("val/ndcg_at_10")] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [e.value for e in events.Scalars("loss")] == [3.0, 2.0, 1.0]
    report = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard" / "report"))
    report.Reload()
    assert report.Scalars("test/student/ndcg_at_10")[0].value == pytest.approx(0.25)
    assert "report.md/text_summary" in report.Tags()["tensors"]


def test_a_missing_backend_package_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(tracking.RaykdError, match=r"raykd\[wandb\]"):
        tracking.require("wandb")


def test_tune_trials_through_rays_logger_callbacks(ray_session, tmp_path):
    """Ray Tune's MLflow and TensorBoard loggers, as raykd.stages.tune gets them from `tune_callbacks`."""
    from ray import tune

    from raykd.cluster.runtime import own_signal_handlers

    def trainable(config):
        for epoch in range(2):
            tune.report({"epoch": epoch, "val_ndcg@10": 0.1 * (epoch + 1) * config["x"]})

    uri = (tmp_path / "mlruns").as_uri()
    for backend, extra in (("mlflow", [f"tracking.uri={uri}"]), ("tensorboard", [])):
        cfg = load_config(None, [f"tracking.backend={backend}", f"output_dir={tmp_path}", "name=t", *extra])
        tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 0.5}), param_space={"x": tune.grid_search([1.0])},
                           run_config=tune.RunConfig(name=backend, storage_path=str(tmp_path / "ray"), verbose=0,
                                                     callbacks=tracking.tune_callbacks(cfg)))
        with own_signal_handlers():  # as raykd.stages.tune does: Tune's Ctrl-C handler ends with the search
            tuner.fit()
    client = mlflow_client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("t").experiment_id])
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val_ndcg_at_10")] == pytest.approx([0.1, 0.2])
    (trial_dir,) = (tmp_path / "tensorboard" / "tune").iterdir()
    events = event_accumulator.EventAccumulator(str(trial_dir))
    events.Reload()
    assert "ray/tune/val_ndcg_10" in events.Tags()["scalars"]  # TensorBoard writes "@" as "_"
    assert tracking.tune_callbacks(load_config(None, [f"output_dir={tmp_path}"])) == []


def test_epoch_lines_show_progress_and_eta_and_are_throttled(capsys):
    from raykd.cluster.train import EpochLines

    lines = EpochLines("student", epochs=4, every_s=3600)
    for epoch in range(4):
        lines.after_report(None, [{"epoch": epoch, "loss": 1.0, "val_ndcg@10": 0.1, "best_val_ndcg@10": 0.1,
                                   "best_epoch": epoch, "epoch_s": 0.5, "final": epoch == 3}], None)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" loss")[0] for line in out] == ["student: epoch 1/4", "student: epoch 4/4"]
    assert "ETA at most" in out[0] and "ETA" not in out[1]
    console.set_level(console.VERBOSE)
    try:
        lines.after_report(None, [{"epoch": 1, "loss": 1.0, "val_ndcg@10": 0.1, "best_val_ndcg@10": 0.1}], None)
    finally:
        console.set_level(console.NORMAL)
    assert "student: epoch 2/4" in capsys.readouterr().out


def test_settings_defaults(tmp_path):
    cfg = load_config("configs/quickstart.yaml", ["tracking.backend=mlflow", f"output_dir={tmp_path}"])
    found = tracking.settings(cfg.tracking, cfg.name, Path(cfg.output_dir))
    assert found["uri"] == f"sqlite:///{tmp_path.resolve()}/mlflow.db" and found["project"] == "quickstart"
    assert tracking.metric_name("val_ndcg@10") == "val_ndcg_at_10"


def test_wandb_offline(tmp_path, monkeypatch):
    """W&B without a server: an offline run per training run (skipped without the wandb extra)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(None, ["tracking.backend=wandb", f"output_dir={tmp_path}"])
    callback = tracking.TrainTracking(tracking.settings(cfg.tracking, cfg.name, tmp_path), "teacher", {"seed": 0}, {})
    for epoch in range(2):
        callback.after_report(None, [{"epoch": epoch, "loss": 1.0, "val_ndcg@10": 0.1, "best_val_ndcg@10": 0.1,
                                      "final": epoch == 1}], None)
    assert not callback.failed and len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
