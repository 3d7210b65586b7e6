"""Reliability of the run directory and the stage runner (issue 26, items 4, 9, 15, 16, 17)."""

from __future__ import annotations

import pytest

from raykd.core.errors import RaykdError
from tests.conftest import tiny_config


@pytest.mark.parametrize(("name", "setting"), [("embed_items", "teacher.item_text"), ("tune", "tune.enabled")])
def test_named_disabled_stage_is_an_error_naming_its_setting(tmp_path, name, setting):
    """`raykd embed-items` on a config without item text must not exit 0 having done nothing."""
    cfg = tiny_config(tmp_path)
    with pytest.raises(RaykdError, match=setting.replace(".", r"\.")):
        __import__("raykd.stages").stages.run(cfg, [name])
    assert not (tmp_path / "run.lock").exists()


def test_mlflow_default_store_is_sqlite_in_the_run_dir_and_readable_without_file_store_opt_in(tmp_path, monkeypatch):
    """MLflow's file store is in maintenance mode: the default is `sqlite:///<run>/mlflow.db`."""
    from mlflow.tracking import MlflowClient

    from raykd.cluster import tracking
    from raykd.config import TrackingConfig

    found = tracking.settings(TrackingConfig(backend="mlflow"), "quickstart", tmp_path)
    assert found["uri"] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    run = tracking.open_run(found, "student", {"a": 1}, {"raykd.role": "student"})
    run.log({"loss": 0.5}, step=1)
    run.close()
    assert (tmp_path / "mlflow.db").is_file() and not (tmp_path / "mlruns").exists()
    client = MlflowClient(tracking_uri=found["uri"])  # as `mlflow ui --backend-store-uri` reads it
    exp = client.get_experiment_by_name("quickstart")
    (row,) = client.search_runs([exp.experiment_id])
    assert row.data.metrics["loss"] == 0.5 and row.info.run_name == "student"
    file_uri = (tmp_path / "other").as_uri()  # `file:` still works when asked for
    assert tracking.settings(TrackingConfig(backend="mlflow", uri=file_uri), "q", tmp_path)["uri"] == file_uri
