"""A training run on one CPU worker, as one Ray task: no Train controller or worker group.

`raykd.cluster.train.fit` sends a run here when `train.trainer` is `auto` and the run has one CPU worker
(`TrainConfig.runs_in_task`); runs with several workers or a GPU keep Ray Train's TorchTrainer
(raykd.cluster.train.make_trainer).
The task runs the loop of every run (`raykd.training.loop.EpochRunner`: the step, epoch, validation and
early stopping of the Train loop) on the windows read straight from the prepared shards, and keeps what Ray
Train gives a one-worker run:

- the CPUs it reserves (`cpus_per_worker`, also its torch threads), so parallel runs share a node;
- checkpoints in raykd's format under `<run>/ray_train/<name>/checkpoint/`, swapped in whole
  (rundir.staged);
- resume: a rerun, or Ray's retry of a task whose process died (`max_failures`), starts after
  the last checkpoint;
- the same per-epoch reports to the same callbacks (epoch lines, experiment tracking), run by
  the process that called `fit` as the task writes them (`Progress`).

Checkpoint cadence (`loop.checkpoint_due`): every epoch while a checkpoint costs little next to
an epoch; otherwise when validation improved, and after the last epoch.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import ray
import torch

from raykd.core import console, rundir
from raykd.core.errors import RaykdError
from raykd.training import loop
from raykd.training.spec import RunSpec


def fit(spec: RunSpec, data_dir: Path, storage: Path, callbacks: list) -> Path:
    """Train `spec` in a Ray task; return its checkpoint directory (state, last and best weights).

    The task appends each epoch's report to `storage/progress.jsonl`; this process (the driver,
    or one of its threads when runs go in parallel) hands them to `callbacks` as they come, so
    epoch lines print in order with the driver's own and tracking runs where the driver runs.
    """
    tc = spec.train
    storage.mkdir(parents=True, exist_ok=True)
    progress = Progress(storage / PROGRESS, callbacks)
    task = ray.remote(train_in_task).options(num_cpus=tc.cpus_per_worker, max_retries=tc.max_failures,
                                             retry_exceptions=False)
    ref = task.remote(spec, str(data_dir), str(storage))
    try:
        while not ray.wait([ref], timeout=0.5)[0]:
            progress.poll()
            if CANCEL.is_set():  # the driver's main thread was interrupted (raykd.cluster.train.fit_many)
                raise RaykdError(f"{spec.name}: stopped; a rerun resumes from its last checkpoint")
    except BaseException:  # Ctrl-C here or in the main thread: the task must not train on unseen
        ray.cancel(ref, force=True)
        raise
    ckpt = Path(ray.get(ref))  # raises the task's error
    progress.poll()
    return ckpt


PROGRESS = "progress.jsonl"
CANCEL = threading.Event()  # set: every run driven from a thread of this process stops its task


class Progress:
    """The driver's side of a task's progress file: new report lines since it was opened."""

    def __init__(self, path: Path, callbacks: list):
        self.path, self.callbacks = path, callbacks
        self.offset = path.stat().st_size if path.exists() else 0  # an earlier run's lines are not news

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
        self.offset += len(complete)
        for line in complete.splitlines():
            report = json.loads(line)
            for callback in self.callbacks:
                callback.after_report(None, [report], None)


def train_in_task(spec: RunSpec, data_dir: str, storage: str) -> str:
    """The task's body: resume from the checkpoint if there is one, train, report every epoch."""
    torch.set_num_threads(max(1, int(spec.train.cpus_per_worker)))  # as a Train worker with these CPUs
    runner = loop.local_runner(spec, data_dir)
    ckpt = Path(storage) / "checkpoint"
    if (ckpt / "state.json").exists():
        runner.restore(ckpt)
        console.say(f"{spec.name}: resumed after epoch {runner.state['epoch'] + 1}")
    saved = runner.state["epoch"]
    with open(Path(storage) / PROGRESS, "a") as progress:
        def report(entry: dict, due: bool) -> float | None:
            nonlocal saved
            seconds = None
            if due:
                seconds, saved = _save(runner, ckpt), entry["epoch"]
            progress.write(json.dumps(entry) + "\n")
            progress.flush()
            return seconds

        runner.run(report)
    if saved != runner.state["epoch"] or not (ckpt / "state.json").exists():
        _save(runner, ckpt)  # the last epoch's state: what the export and a rerun read
    return str(ckpt)


def _save(runner: loop.EpochRunner, ckpt: Path) -> float:
    """Write the checkpoint beside the old one and swap it in (rundir.staged); return its seconds."""
    t0 = time.perf_counter()
    with rundir.staged(ckpt) as tmp:
        runner.save(tmp)
    return time.perf_counter() - t0
