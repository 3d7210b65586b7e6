"""Inside a Tune trial (a Ray actor): distill one student with the sampled values.

Each trial builds the `RunSpec` of the student its sampled config describes and trains it one of
two ways, reporting the same metrics every epoch (val NDCG@10, its best so far, the student's size
and `epochs_done`, the epoch counter ASHA uses) and the same checkpoints (raykd.core.checkpoints):

- in the trial itself (`in_process`: one CPU worker): `loop.local_runner`, the loop `fit_local` runs,
  on windows it streams from the shards as it goes (loop.streamed_batches); each epoch's
  checkpoint goes to Tune (`ray.tune.report(..., checkpoint=...)`, kept under
  `tune/search/trial_<id>/`) and a restarted trial resumes from `ray.tune.get_checkpoint()`.
  No Train controller, worker group, process group or Ray Data dataset is started.
- with a `TorchTrainer` (raykd.cluster.train.make_trainer) for several workers or a GPU: `TrialReport`
  forwards every epoch's Train report to Tune; checkpoints stay in `tune/train/trial_<id>/`.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback

from raykd.cluster import train
from raykd.config import Config
from raykd.core import models, rundir, sequences
from raykd.stages.tune.report import METRIC
from raykd.stages.tune.space import apply_values
from raykd.training import loop
from raykd.training.plan import kd_settings
from raykd.training.spec import RunSpec


def in_process(cfg: Config) -> bool:
    """Whether trials train inside the Tune trial: a student on one CPU worker needs no Train start.
    `tune.in_process: false` (when the config has that key) keeps every trial on Ray Train."""
    t = cfg.distill.train
    return t.num_workers == 1 and not t.use_gpu and bool(getattr(cfg.tune, "in_process", True))


def trial_spec(cfg: Config, name: str, upstream: dict | None = None) -> RunSpec:
    """The training run of a trial (or of the winner): the student of `cfg`'s distill settings."""
    kd, found = kd_settings(cfg, "tune")
    d = cfg.distill
    return RunSpec(name, d.model, d.train, cfg.seed, kd=kd, upstream=upstream or found)


def run_trial(config: dict, setup: dict) -> None:
    """One trial: distill a student with the sampled values (Ray Train), report to Tune."""
    import ray.data
    import ray.tune

    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()  # this actor's own Ray Data context: keep logs quiet
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    cfg = apply_values(Config.model_validate(setup["base"]), config)
    cfg = cfg.model_copy(update={"output_dir": setup["run_dir"]})
    data_dir = Path(setup["run_dir"]) / rundir.DATA
    d = cfg.distill
    desc = {"family": d.model.family, "num_items": sequences.num_items(data_dir),
            **d.model.model_dump(exclude={"family"})}
    size = student_size(desc)
    trial_id = ray.tune.get_context().get_trial_id()
    spec = trial_spec(cfg.model_copy(update={"distill": d.model_copy(update={"train": d.train.model_copy(
        update={"cpus_per_worker": setup["cpus_per_worker"]})})}), f"tune/trial_{trial_id}")
    if setup.get("in_process"):
        train_here(spec, data_dir, size, setup, t0)
        return
    trainer = train.make_trainer(spec, f"trial_{trial_id}", Path(setup["storage"]), data_dir,
                                 callbacks=[TrialReport(size)])
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / "state.json").read_text())
    ray.tune.report(final_report(state, size, t0, result.checkpoint.path))


def final_report(state: dict, size: dict, t0: float, checkpoint_path: str | None) -> dict:
    """The trial's last report: its best val NDCG@10, wall time and time spent in epochs."""
    best = state["best"]["metrics"]["ndcg@10"]
    return {**size, "epoch": state["epoch"], "epochs_done": state["epoch"] + 1, METRIC: best,
            "val_ndcg@10": best, "checkpoint_path": checkpoint_path, "trial_s": time.perf_counter() - t0,
            "loop_s": sum(h["seconds"] for h in state["history"]), "finished": 1}


def train_here(spec: RunSpec, data_dir: Path, size: dict, setup: dict, t0: float) -> None:
    """The in-process trial: the loop of `fit_local`, one Tune report and checkpoint per epoch."""
    import ray.tune
    import torch

    torch.set_num_threads(max(1, int(setup["cpus_per_worker"])))  # as a Train worker with these CPUs
    runner = loop.local_runner(spec, data_dir)
    ckpt = ray.tune.get_checkpoint()
    if ckpt:  # a restored search: this trial resumes after its last reported epoch
        with ckpt.as_directory() as d:
            runner.restore(d)

    def report(entry: dict, due: bool) -> None:  # every epoch checkpoints: Tune keeps the last two
        with tempfile.TemporaryDirectory() as d:
            runner.save(d)
            ray.tune.report(trial_report(entry, size), checkpoint=ray.tune.Checkpoint.from_directory(d))

    runner.run(report)
    ray.tune.report(final_report(runner.state, size, t0, None))  # the path: tune_report finds Tune's latest


def trial_report(entry: dict, size: dict) -> dict:
    """An epoch's report as Tune reads it: the run's report, the student's size and ASHA's clock."""
    return {**entry, **size, "epochs_done": entry["epoch"] + 1}


class TrialReport(TuneReportCallback):
    """Runs in the Train controller: forwards each epoch's report to Tune (TuneReportCallback adds
    the checkpoint path) with the student's size and an epoch counter, ASHA's clock, added."""

    def __init__(self, extra: dict):
        super().__init__()
        self.extra = extra

    def after_report(self, run_context, metrics, checkpoint):
        first = trial_report(metrics[0], self.extra)
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def student_size(desc: dict) -> dict:
    """Parameters and single-thread scoring latency (ms per 256 users) of an untrained student."""
    import torch

    model = models.build_model(desc)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable across trials that share the machine
    try:
        from raykd.core.metrics import scoring_latency_ms

        # the least of three medians: other trials share the machine, and contention only adds
        latency = min(scoring_latency_ms(model, desc["max_len"], desc["num_items"], repeats=5) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    return {"params": models.count_params(model), "latency_ms": latency}
