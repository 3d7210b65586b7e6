"""The run-directory contract (raykd.core.rundir, raykd.stages): manifests, atomic publication, the run
record, the lock, and the defects a new user hit before it existed (issue 12)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
from conftest import tiny_config

from raykd import cli, stages
from raykd.config import load_config
from raykd.core import rundir
from raykd.core.errors import RaykdError


def make(root, artifact, key, files=("a.txt",)):
    with rundir.staged(root / artifact) as tmp:
        for f in files:
            (tmp / f).write_text(key)
        rundir.write_manifest(tmp, key)


# ---------------------------------------------------------------- pure: no Ray

def test_staged_publication_is_all_or_nothing(tmp_path):
    make(tmp_path, "student", "k1")
    with pytest.raises(RuntimeError), rundir.staged(tmp_path / "student") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-export")
    assert (tmp_path / "student" / "a.txt").read_text() == "k1"  # the previous artifact, untouched
    assert rundir.key_of(tmp_path / "student") == "k1"
    assert [p.name for p in tmp_path.iterdir()] == ["student"]  # no staging folder left behind
    make(tmp_path, "student", "k2")
    assert rundir.key_of(tmp_path / "student") == "k2"
    manifest = rundir.read_manifest(tmp_path / "student")
    assert manifest["versions"]["torch"] and manifest["versions"]["python"] and manifest["created"]


def test_a_folder_without_its_manifest_is_not_an_artifact(tmp_path):
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "model.json").write_text("{}")  # what a run killed between writes left
    assert rundir.key_of(tmp_path / "student") is None
    (tmp_path / ".student.staging-1234").mkdir()
    with rundir.lock(tmp_path):  # taking the lock sweeps what killed runs left
        assert not (tmp_path / ".student.staging-1234").exists()


def test_record_tracks_the_chain_of_upstream_keys(tmp_path):
    make(tmp_path, "data", "d1")
    rundir.record(tmp_path, "data", "prepare")
    make(tmp_path, "student", "s1")
    rundir.record(tmp_path, "student", "distill", ["data"])
    assert rundir.current(tmp_path, "student") == tmp_path / "student"
    make(tmp_path, "data", "d2")  # prepared again, from other data
    rundir.record(tmp_path, "data", "prepare")
    assert rundir.current(tmp_path, "student") is None
    assert "earlier data/" in rundir.stale_reason(tmp_path, "student")
    with pytest.raises(RaykdError, match="raykd distill CONFIG"):
        rundir.served_model(tmp_path)
    make(tmp_path, "student", "s2")
    rundir.record(tmp_path, "student", "distill", ["data"])
    assert rundir.served_model(tmp_path) == tmp_path / "student"
    assert rundir.forget(tmp_path, "distill") == ["student"]
    assert rundir.current(tmp_path, "student") is None
    assert "not produced by the run's current config" in rundir.stale_reason(tmp_path, "student")


def test_served_model_prefers_a_current_tune_winner(tmp_path):
    make(tmp_path, "data", "d1")
    rundir.record(tmp_path, "data", "prepare")
    for name, stage in (("student", "distill"), ("tune/best", "tune")):
        make(tmp_path, name, name, files=("model.json",))
        rundir.record(tmp_path, name, stage, ["data"])
    assert rundir.served_model(tmp_path) == tmp_path / "tune" / "best"
    rundir.forget(tmp_path, "tune")  # the config's tune stage is off now
    assert rundir.served_model(tmp_path) == tmp_path / "student"
    assert rundir.served_model(tmp_path / "student") == tmp_path / "student"  # a model folder is itself


def test_a_second_process_cannot_take_a_held_run_directory(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from raykd.core import rundir\n"
        f"with rundir.lock({str(tmp_path)!r}, 'raykd pipeline'):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}"])
        with pytest.raises(RaykdError, match=r"in use by pid \d+ \(raykd pipeline"):
            stages.run(cfg, ["prepare"])
    finally:
        holder.kill()
        holder.wait()
    with rundir.lock(tmp_path), rundir.lock(tmp_path):  # free again once the holder died; re-entrant
        pass


def test_output_dir_under_a_file_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code = cli.main(["prepare", "configs/quickstart.yaml", f"output_dir={tmp_path / 'afile' / 'run'}"])
    err = capsys.readouterr().err
    assert code == 1 and "is a file, not a folder" in err and "internal error" not in err


@pytest.mark.parametrize("stage, needs", [
    ("embed-items", "data"), ("teacher", "data"), ("soft-labels", "data"), ("distill", "data"),
    ("tune", "data"), ("evaluate", "data")])
def test_each_stage_alone_on_a_fresh_directory_says_what_to_run(tmp_path, capsys, stage, needs):
    extra = ["teacher.item_text=true", "data.item_text={path: t.csv}"] if stage == "embed-items" else []
    t0 = time.perf_counter()
    code = cli.main([stage, "configs/quickstart.yaml", f"output_dir={tmp_path / 'fresh'}", *extra])
    err = capsys.readouterr().err
    assert code == 1 and "internal error" not in err, err
    assert f"{needs}, but {needs}/ has not been produced" in err and "run `raykd prepare CONFIG` first" in err
    assert time.perf_counter() - t0 < 10  # said before Ray starts


def test_serve_min_replicas_above_max_is_a_config_error():
    with pytest.raises(RaykdError, match="min_replicas"):
        load_config(None, ["serve.min_replicas=3", "serve.max_replicas=2"])


def test_the_core_imports_no_ray():
    code = ("import sys; import raykd.core.models, raykd.core.losses, raykd.core.metrics, raykd.core.sequences, raykd.core.checkpoints, "
            "raykd.training.loop, raykd.training.spec, raykd.core.text, raykd.core.rundir, raykd.serve.recommender; "
            "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- on a real run (Ray)

def test_rerun_with_other_data_and_tune_off_never_reports_or_serves_the_old_winner(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("ray_train", ".lock"))
    # a winner from an earlier search, as the tune stage records it
    shutil.copytree(run / "student", run / "tune" / "best")
    rundir.record(run, "tune/best", "tune", ["data", "soft_labels"])
    assert rundir.served_model(run) == run / "tune" / "best"
    old_data = rundir.key_of(run / "data")

    stages.run(tiny_config(run, "data.synthetic.seed=7", "distill.train_nokd=false"))  # new data, tune off
    assert rundir.key_of(run / "data") != old_data
    report = json.loads((run / "report.json").read_text())
    assert "tune_best" not in report and "student_nokd" not in report
    assert "student_nokd" in report["skipped"] and "tune/best" in report["skipped"]
    assert rundir.served_model(run) == run / "student"
    student = rundir.read_manifest(run / "student")
    assert student["upstream"]["data"] == rundir.key_of(run / "data")


def test_serving_a_run_prepared_again_is_refused_with_the_fix(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("ray_train", ".lock"))
    stages.run(tiny_config(run, "data.synthetic.seed=11"), ["prepare"])
    code = cli.main(["serve", str(run)])
    err = capsys.readouterr().err
    assert code == 1 and "earlier data/" in err and "raykd distill CONFIG" in err
    # the model folder itself, served alone, is checked against the vocabulary it was trained on
    code = cli.main(["serve", str(run / "student")])
    err = capsys.readouterr().err
    assert code == 1 and "vocabulary" in err and "internal error" not in err


def test_a_truncated_model_is_refused_before_ray_starts(tiny_run, tmp_path, capsys):
    shutil.copytree(tiny_run / "student", tmp_path / "student")
    shutil.copytree(tiny_run / "data", tmp_path / "data")
    weights = tmp_path / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    code = cli.main(["serve", str(tmp_path / "student")])
    err = capsys.readouterr().err
    assert code == 1 and "cannot be served" in err and "internal error" not in err


def test_a_run_killed_during_export_leaves_the_previous_model(tiny_run, tmp_path, monkeypatch):
    from raykd.cluster import train
    from raykd.core import models
    from raykd.training.spec import RunSpec

    shutil.copytree(tiny_run / "student", tmp_path / "student")
    before = {p.name: p.read_bytes() for p in (tmp_path / "student").iterdir()}
    ckpt = tiny_run / "ray_train" / "student" / "checkpoint"  # the one-worker run's task checkpoint
    cfg = tiny_config(tmp_path)
    spec = RunSpec("student", cfg.distill.model, cfg.distill.train, cfg.seed, upstream={"data": "other"})
    real = models.save_model

    def killed(folder, *args, **kwargs):
        real(folder, *args, **kwargs)  # the weights and model.json are written ...
        raise KeyboardInterrupt  # ... and the process is stopped before metrics.json and the manifest

    monkeypatch.setattr(models, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        train.export(ckpt, tmp_path / "student", spec, tiny_run / "data", {"name": "student"})
    assert {p.name: p.read_bytes() for p in (tmp_path / "student").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["student"]
    monkeypatch.setattr(models, "save_model", real)
    train.export(ckpt, tmp_path / "student", spec, tiny_run / "data", {"name": "student"})  # the rerun
    manifest = rundir.read_manifest(tmp_path / "student")
    assert manifest["key"] == spec.fingerprint and manifest["vocab_digest"] == rundir.read_manifest(
        tiny_run / "data")["vocab_digest"]
    assert json.loads((tmp_path / "student" / "metrics.json").read_text())["name"] == "student"


def test_a_vocabulary_of_the_same_size_with_other_ids_is_refused(tiny_run, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raykd.serve.recommender import Recommender

    shutil.copytree(tiny_run / "student", tmp_path / "student")
    shutil.copytree(tiny_run / "data", tmp_path / "data")
    Recommender(tmp_path / "student")  # its own vocabulary: fine
    items = pq.read_table(tmp_path / "data" / "items.parquet")
    raw = items["raw_id"].to_pylist()
    swapped = items.set_column(items.schema.get_field_index("raw_id"), "raw_id", pa.array(raw[1:] + raw[:1]))
    pq.write_table(swapped, tmp_path / "data" / "items.parquet")  # same size, other ids at each index
    with pytest.raises(RaykdError, match="another item vocabulary"):
        Recommender(tmp_path / "student")
