"""Inside a Tune trial (a Ray actor): distill one student with the sampled values.

Each trial builds the `RunSpec` of the student its sampled config describes, fits it with a
`TorchTrainer` (raykd.train.make_trainer), and `TrialReport` forwards every epoch's Train report
(val NDCG@10, the checkpoint path, the student's size and the epoch counter ASHA uses) to Tune.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray.tune.integration.ray_train import TuneReportCallback

from raykd import models, rundir, sequences, train
from raykd.config import Config
from raykd.distill import kd_settings
from raykd.spec import RunSpec
from raykd.tune_report import METRIC
from raykd.tune_space import apply_values


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
    trainer = train.make_trainer(spec, f"trial_{trial_id}", Path(setup["storage"]), data_dir,
                                 callbacks=[TrialReport(size)])
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / "state.json").read_text())
    loop_s = sum(h["seconds"] for h in state["history"])
    ray.tune.report({**size, "epoch": state["epoch"], "epochs_done": state["epoch"] + 1,
                     METRIC: state["best"]["metrics"]["ndcg@10"], "val_ndcg@10": state["best"]["metrics"]["ndcg@10"],
                     "checkpoint_path": result.checkpoint.path, "trial_s": time.perf_counter() - t0,
                     "loop_s": loop_s, "finished": 1})


class TrialReport(TuneReportCallback):
    """Runs in the Train controller: forwards each epoch's report to Tune (TuneReportCallback adds
    the checkpoint path) with the student's size and an epoch counter, ASHA's clock, added."""

    def __init__(self, extra: dict):
        super().__init__()
        self.extra = extra

    def after_report(self, run_context, metrics, checkpoint):
        first = {**metrics[0], **self.extra, "epochs_done": metrics[0]["epoch"] + 1}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def student_size(desc: dict) -> dict:
    """Parameters and single-thread scoring latency (ms per 256 users) of an untrained student."""
    import torch

    model = models.build_model(desc)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable across trials that share the machine
    try:
        from raykd.metrics import scoring_latency_ms

        # the least of three medians: other trials share the machine, and contention only adds
        latency = min(scoring_latency_ms(model, desc["max_len"], desc["num_items"], repeats=5) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    return {"params": models.count_params(model), "latency_ms": latency}
