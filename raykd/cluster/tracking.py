"""Experiment tracking through Ray's integrations: `tracking.backend` none | tensorboard | mlflow | wandb.

Three things are tracked, each as its own run of the backend (an MLflow run, a TensorBoard folder,
a W&B run) in the experiment/project `tracking.project` (default: the config's name):

- every training run (teacher, ensemble members, student, student_nokd, the KD curve's pairs):
  its parameters and, per epoch, loss and validation metrics. `TrainTracking` is a Ray Train
  callback: it runs on the Train controller and logs each report as it arrives, so workers never
  talk to the backend; the tracked run is named after the artifact (`teacher`, `student` ...);
- Tune trials, through Ray Tune's own logger callbacks (`tune_callbacks`: MLflowLoggerCallback,
  TBXLoggerCallback, WandbLoggerCallback), one tracked run per trial;
- the report (`log_report`, after evaluate): test metrics, with report.json, report.md and the
  plots as artifacts (TensorBoard: as text and images).

Metric names are the same in every backend: `loss`, `val/ndcg_at_10`, `val/hr_at_10`, ...,
`best/ndcg_at_10`, `epoch_s`; test metrics `test/<model>/ndcg_at_10` ("@" is not allowed by MLflow).
Steps are epochs counted from 1. MLflow's default store is a SQLite file, `sqlite:///<run>/mlflow.db`
(open it with `mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db`; MLflow's file store is in
maintenance mode and needs an opt-in to be read; a `file:` tracking.uri still works when asked for); TensorBoard's event files go to
`<run>/tensorboard/` (`tensorboard --logdir <run>/tensorboard`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import ray.train
import yaml

from raykd.config import Config, TrackingConfig
from raykd.core import console, rundir
from raykd.core.errors import RaykdError

MODULES = {"mlflow": "mlflow", "wandb": "wandb", "tensorboard": "tensorboardX"}
INSTALL = {"mlflow": "pip install 'raykd[mlflow]'", "wandb": "pip install 'raykd[wandb]'",
           "tensorboard": "pip install tensorboardX (it comes with ray[tune])"}
REPORTED = ("popularity", "teacher", "teacher_ensemble", "student", "student_nokd", "tune_best")


def settings(tracking: TrackingConfig, name: str, run_dir: Path) -> dict:
    """The backend, its URI and project with this run directory's defaults filled in.

    A plain dict: it travels to the Train controller (a Ray actor) inside `TrainTracking`.
    """
    root = Path(run_dir).resolve()
    uri = tracking.uri
    if tracking.backend == "tensorboard":
        uri = str(Path(uri or root / "tensorboard").expanduser().resolve())
    elif tracking.backend == "mlflow" and not uri:
        uri = f"sqlite:///{root / 'mlflow.db'}"  # MLflow's file store is in maintenance mode
    return {"backend": tracking.backend, "uri": uri, "project": tracking.project or name, "run_dir": str(root)}


def require(backend: str) -> None:
    """A clear error, before any work, when the backend's package is not installed."""
    module = MODULES.get(backend)
    if module is None:
        return
    try:
        __import__(module)
    except ImportError:
        raise RaykdError(f"tracking.backend={backend} needs the {module} package: {INSTALL[backend]}, or set "
                         "tracking.backend=none") from None


def of_run(run_dir: Path) -> dict | None:
    """The tracking settings of the config a run directory was last run with (its config.yaml)."""
    try:
        raw = yaml.safe_load((Path(run_dir) / rundir.CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    tracking = TrackingConfig.model_validate(raw.get("tracking") or {})
    return None if tracking.backend == "none" else settings(tracking, raw.get("name") or "raykd", run_dir)


def metric_name(key: str) -> str:
    return key.replace("@", "_at_")


def epoch_metrics(report: dict) -> dict:
    """What one epoch's Ray Train report (raykd.cluster.train.train_loop) is tracked as."""
    out = {"loss": report["loss"], "best/ndcg_at_10": report["best_val_ndcg@10"]}
    out.update({f"val/{metric_name(k[4:])}": v for k, v in report.items() if k.startswith("val_")})
    if "epoch_s" in report:
        out["epoch_s"] = report["epoch_s"]
    return out


# ---------------------------------------------------------------- training runs (Ray Train)

def train_callbacks(run_dir: Path, spec) -> list:
    """Ray Train callbacks that track one training run (a raykd.training.spec.RunSpec); none when off."""
    found = of_run(run_dir)
    if found is None:
        return []
    require(found["backend"])
    params = {"name": spec.name, "role": spec.role, "seed": spec.seed, "model": spec.model.model_dump(mode="json"),
              "train": spec.train.model_dump(mode="json")}
    if spec.kd is not None:
        params["kd"] = {"alpha": spec.kd.alpha, "temperature": spec.kd.temperature, "loss": spec.kd.loss,
                        "transfer": bool(spec.kd.transfer_from)}
    tags = {"raykd.run_dir": str(run_dir), "raykd.role": spec.role, "raykd.fingerprint": spec.fingerprint}
    return [TrainTracking(found, spec.name, params, tags)]


class TrainTracking(ray.train.UserCallback):
    """Runs on Ray Train's controller: each epoch's report goes to the tracking backend.

    The tracked run opens with the first report (the controller's process, not the driver's) and
    closes with the report marked final. A backend that fails is reported once and then left
    alone: tracking never stops a training run.
    """

    def __init__(self, found: dict, name: str, params: dict, tags: dict):
        self.found, self.name, self.params, self.tags = found, name, params, tags
        self.run, self.failed = None, False

    def __getstate__(self) -> dict:
        return {**self.__dict__, "run": None}  # an open backend run stays in its process

    def after_report(self, run_context, metrics, checkpoint):
        if self.failed:
            return
        report = metrics[0]
        try:
            if self.run is None:
                self.run = open_run(self.found, self.name, self.params, self.tags)
            self.run.log(epoch_metrics(report), step=report["epoch"] + 1)
            if report.get("final"):
                self.run.close()
                self.run = None
        except Exception as err:  # noqa: BLE001 - any backend error: say it, keep training
            self.failed = True
            console.say(f"{self.name}: tracking to {self.found['backend']} failed, training goes on: "
                        f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")


# ---------------------------------------------------------------- Tune trials (Ray Tune's logger callbacks)

def tune_callbacks(cfg: Config) -> list:
    """Ray Tune logger callbacks for `cfg.tracking` (pass to tune.RunConfig(callbacks=...)); [] when off."""
    t = cfg.tracking
    if t.backend == "none":
        return []
    require(t.backend)
    found = settings(t, cfg.name, Path(cfg.output_dir))
    tensorboard_trials, mlflow_trials = _tune_classes()
    if t.backend == "tensorboard":
        return [tensorboard_trials(Path(found["uri"]) / "tune")]
    if t.backend == "mlflow":
        return [mlflow_trials(tracking_uri=found["uri"], experiment_name=found["project"],
                              tags={"raykd.run_dir": found["run_dir"], "raykd.stage": "tune"})]
    from ray.air.integrations.wandb import WandbLoggerCallback

    return [WandbLoggerCallback(project=found["project"], group="tune", **_wandb_settings(found))]


@functools.cache
def _tune_classes() -> tuple[type, type]:
    """Ray Tune's TensorBoard and MLflow loggers, adapted (built on first use: importing them imports mlflow)."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    class TensorBoardTrials(TBXLoggerCallback):
        """Ray's TensorBoard logger, writing each trial's events to `<tracking uri>/tune/<trial id>`
        rather than into the trial's own folder, so that one `tensorboard --logdir` shows every run."""

        def __init__(self, logdir: Path):
            super().__init__()
            self.logdir = Path(logdir)

        def log_trial_start(self, trial):
            if trial in self._trial_writer:
                self._trial_writer[trial].close()
            self._trial_writer[trial] = self._summary_writer_cls(str(self.logdir / trial.trial_id), flush_secs=30)
            self._trial_result[trial] = {}

    class MLflowTrials(MLflowLoggerCallback):
        """Ray's MLflow logger, with raykd's metric names (MLflow refuses "@") and a local file
        store allowed (MLflow 3 asks for an opt-in)."""

        def setup(self, *args, **kwargs):
            with allow_file_store(self.tracking_uri):
                super().setup(*args, **kwargs)

        def log_trial_result(self, iteration, trial, result):
            super().log_trial_result(iteration, trial, {metric_name(k): v for k, v in result.items()})

    return TensorBoardTrials, MLflowTrials


# ---------------------------------------------------------------- the report

def log_report(cfg: Config, run_dir: Path, report: dict) -> None:
    """Test metrics, report.json, report.md and the plots as one tracked run named `report`."""
    found = settings(cfg.tracking, cfg.name, run_dir)
    if found["backend"] == "none":
        return
    require(found["backend"])
    root = Path(run_dir)
    files = [root / rundir.REPORT_JSON, root / rundir.REPORT_MD, *[root / f for f in (report.get("plots") or {}).values()]]
    metrics = {f"test/{name}/{metric_name(k)}": v for name in REPORTED for k, v in (report.get(name) or {}).items()
               if k in ("ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20") and v is not None}
    paired = (report.get("student") or {}).get("paired_vs_nokd") or {}
    if paired.get("mean_diff") is not None:
        metrics["test/kd_gain/ndcg_at_10"] = paired["mean_diff"]
    meta = report.get("meta") or {}
    run = open_run(found, "report", {"config_hash": meta.get("config_hash"), "seed": meta.get("seed")},
                   {"raykd.run_dir": str(root.resolve()), "raykd.stage": "evaluate"})
    run.log(metrics, step=0)
    run.files([f for f in files if f.exists()])
    run.close()
    console.say(f"tracking: report, plots and test metrics logged to {found['backend']} at "
                f"{found['uri'] or found['project']}")


# ---------------------------------------------------------------- backends

def open_run(found: dict, name: str, params: dict, tags: dict):
    """One tracked run in the backend of `found` (settings()): .log(metrics, step), .files(paths), .close()."""
    return {"mlflow": _MLflowRun, "tensorboard": _TensorBoardRun, "wandb": _WandbRun}[found["backend"]](
        found, name, _flat(params), tags)


def _flat(params: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@contextlib.contextmanager
def allow_file_store(uri: str | None) -> Iterator[None]:
    """MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set; a `file:` URI (or a
    plain folder) in tracking.uri is that choice, so it is allowed while the store is opened."""
    local = uri is None or uri.startswith("file:") or "://" not in uri
    old = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    if local:
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if local:
            if old is None:
                os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
            else:
                os.environ["MLFLOW_ALLOW_FILE_STORE"] = old


class _MLflowRun:
    def __init__(self, found: dict, name: str, params: dict, tags: dict):
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        with allow_file_store(found["uri"]):
            self.client = MlflowClient(tracking_uri=found["uri"])  # opens (and caches) the store
            exp = self.client.get_experiment_by_name(found["project"])
            if exp is None:
                try:
                    exp_id = self.client.create_experiment(found["project"])
                except MlflowException:  # another run created it meanwhile
                    exp_id = self.client.get_experiment_by_name(found["project"]).experiment_id
            else:
                exp_id = exp.experiment_id
            self.run_id = self.client.create_run(exp_id, run_name=name, tags=tags).info.run_id
            self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])

    def log(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def files(self, paths: list[Path]) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p))

    def close(self, ok: bool = True) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


class _TensorBoardRun:
    def __init__(self, found: dict, name: str, params: dict, tags: dict):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(Path(found["uri"]) / name), flush_secs=10)
        rows = "\n".join(f"| {k} | {v} |" for k, v in {**params, **tags}.items())
        self.writer.add_text("params", f"| key | value |\n|---|---|\n{rows}", 0)

    def log(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step)
        self.writer.flush()

    def files(self, paths: list[Path]) -> None:
        for p in paths:
            if p.suffix == ".png":
                import matplotlib.image

                self.writer.add_image(p.stem, matplotlib.image.imread(str(p))[..., :3], 0, dataformats="HWC")
            elif p.suffix == ".json":
                self.writer.add_text(p.name, "```\n" + json.dumps(json.loads(p.read_text()), indent=2) + "\n```", 0)
            else:
                self.writer.add_text(p.name, p.read_text(), 0)
        self.writer.flush()

    def close(self, ok: bool = True) -> None:
        self.writer.close()


def _wandb_settings(found: dict) -> dict:
    if not found.get("uri"):
        return {}
    import wandb

    return {"settings": wandb.Settings(base_url=found["uri"])}


class _WandbRun:
    def __init__(self, found: dict, name: str, params: dict, tags: dict):
        import wandb
        from packaging.version import Version

        self.wandb = wandb
        # parallel training runs report from one driver process: newer wandb keeps several runs
        # open at once ("create_new"); older ones only one at a time (True finishes the previous)
        reinit = "create_new" if Version(wandb.__version__) >= Version("0.19.10") else True
        self.run = wandb.init(project=found["project"], name=name, group=Path(found["run_dir"]).name, config=params,
                              tags=[f"{k}={v}"[:64] for k, v in tags.items()], dir=found["run_dir"], reinit=reinit,
                              **_wandb_settings(found))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def files(self, paths: list[Path]) -> None:
        art = self.wandb.Artifact(f"{self.run.project}-report", type="report")
        for p in paths:
            art.add_file(str(p))
        self.run.log_artifact(art)
        self.run.log({p.stem: self.wandb.Image(str(p)) for p in paths if p.suffix == ".png"})

    def close(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)
