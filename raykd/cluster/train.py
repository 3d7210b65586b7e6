"""The one training loop for teacher and students: on Ray Train's TorchTrainer, or as one Ray task.

`fit(spec, run_dir)` (a `raykd.training.spec.RunSpec`) trains one run and publishes the checkpoint that was
best on validation NDCG@10 as the artifact `<run>/<spec.name>/` (model.safetensors, model.json,
metrics.json, manifest.json; see raykd.core.rundir). A run on one CPU worker (`train.trainer: auto`)
is one Ray task (raykd.cluster.task). Otherwise `fit` builds the window dataset (Ray Data, streamed
from the Parquet shards every epoch, with soft labels when distilling) and runs `train_loop` on
`num_workers` DDP workers: every epoch each worker trains on its shard, all workers evaluate a
slice of the validation users (summed with an all-reduce, so every rank takes the same
early-stopping decision), and rank 0 reports a checkpoint (loop.checkpoint_due). Either way a
rerun, or a restart after a lost worker, resumes from the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raykd.cluster import ray_private, tracking
from raykd.cluster import task as train_task
from raykd.cluster.needs import DRIVER_RESOURCE
from raykd.cluster.runtime import own_signal_handlers
from raykd.config import TrainConfig
from raykd.core import checkpoints, console, metrics, models, rundir, sequences, staleness
from raykd.core.errors import RaykdError
from raykd.training import loop
from raykd.training.spec import RunSpec


def fit(spec: RunSpec, run_dir: Path, before_epoch: Callable[[int], None] | None = None) -> dict:
    """Train one run with Ray Train and publish its best checkpoint as the artifact `run_dir/spec.name`.

    A finished model with the same fingerprint (settings and upstream keys) is reused instead.
    `before_epoch(epoch)` runs on rank 0 as each epoch starts (tests inject worker faults with it).
    """
    run_dir = Path(run_dir).resolve()
    if before_epoch is not None:
        spec = dataclasses.replace(spec, before_epoch=before_epoch)
    data_dir = run_dir / rundir.DATA
    out = run_dir / spec.name
    fingerprint = spec.fingerprint
    done = reusable(out, fingerprint)
    if done:
        console.say(f"{spec.name}: reusing {out} (same inputs and settings)")
        return {**done, "reused": True}
    storage = run_dir / "ray_train"
    ray_name = spec.name.replace("/", "-")  # kd_curve/d8/student -> one flat Ray Train run name
    _forget_stale_run(storage / ray_name, fingerprint)
    callbacks = [EpochLines(spec.name, spec.train.epochs), *tracking.train_callbacks(run_dir, spec)]
    m, tc, kd = spec.model, spec.train, spec.kd
    in_task = tc.runs_in_task()
    console.say(f"{spec.name}: training {m.family} dim={m.dim} layers={m.layers} on {tc.num_workers} "
                f"{'GPU' if tc.use_gpu else 'CPU'} worker(s){' in one Ray task' if in_task else ' (Ray Train)'}")
    t0 = time.perf_counter()
    extra = {"name": spec.name, "alpha": kd.alpha if kd else 0.0, "temperature": kd.temperature if kd else 1.0,
             "kd_loss": kd.loss if kd and kd.alpha > 0 else None, "fingerprint": fingerprint,
             "trainer": "ray_task" if in_task else "torch_trainer"}
    if in_task:
        ckpt = train_task.fit(spec, data_dir, storage / ray_name, callbacks)
        summary = export(ckpt, out, spec, data_dir, {**extra, "train_seconds": time.perf_counter() - t0})
    else:
        trainer = make_trainer(spec, ray_name, storage, data_dir, callbacks=callbacks)
        with own_signal_handlers():  # Ray Train's abort-this-run Ctrl-C handler must not outlive the run
            result = trainer.fit()
        if result.error or result.checkpoint is None:
            raise RaykdError(f"{spec.name}: training failed: {result.error}")
        with result.checkpoint.as_directory() as ckpt:
            summary = export(Path(ckpt), out, spec, data_dir, {**extra, "train_seconds": time.perf_counter() - t0})
    console.say(f"{spec.name}: best valid NDCG@10 {summary['valid']['ndcg@10']:.4f} at epoch {summary['best_epoch']} "
                f"({summary['epochs_run']} epochs, {console.duration(summary['train_seconds'])}) -> {out}")
    return summary


def parallel_runs(train_cfg: TrainConfig) -> int:
    """Training runs of this size that fit at once; TorchTrainer runs leave one CPU free for Ray Data,
    whose read tasks would otherwise wait forever behind the Train workers."""
    res = ray.cluster_resources()
    if train_cfg.use_gpu:
        fits = int(res.get("GPU", 0) // train_cfg.num_workers)
    elif train_cfg.runs_in_task():  # reads its windows itself (no Ray Data CPU to keep free); driven by a thread
        return max(1, int(res.get("CPU", 1) // train_cfg.cpus_per_worker))
    else:
        fits = int((res.get("CPU", 1) - 1) // (train_cfg.num_workers * train_cfg.cpus_per_worker))
    return max(1, min(fits, int(res.get(DRIVER_RESOURCE, 0))))


def fit_many(specs: list[RunSpec], run_dir: Path, parallel: int) -> list[dict]:
    """`fit` for every spec, in order; `parallel` > 1 runs that many at once. Finished ones are reused.

    Runs that train as Ray tasks (raykd.cluster.task) are driven from threads of this process, so
    their epoch lines print here as they come; TorchTrainer runs are each driven by a Ray task on
    the zero-CPU driver resource (as Tune drives its trials).
    """
    todo = [s for s in specs if not reusable(Path(run_dir) / s.name, s.fingerprint)]
    parallel = min(parallel, len(todo))
    if parallel <= 1:
        return [fit(s, run_dir) for s in specs]
    console.say(f"{len(todo)} training runs, {parallel} at a time: {', '.join(s.name for s in todo)}")
    if all(s.train.runs_in_task() for s in specs):
        pool = ThreadPoolExecutor(parallel, thread_name_prefix="raykd-fit")
        try:
            futures = [pool.submit(fit, s, run_dir) for s in specs]
            for done in as_completed(futures):
                done.result()  # the first failure is raised as it happens
            return [f.result() for f in futures]
        except BaseException:  # Ctrl-C or a failed run: stop the other runs' tasks too
            train_task.CANCEL.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            train_task.CANCEL.clear()
    remote_fit = ray.remote(num_cpus=0, resources={DRIVER_RESOURCE: 1}, max_retries=0)(fit)
    pending, results = {}, {}
    for i, spec in enumerate(specs):
        if len(pending) >= parallel:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
        pending[remote_fit.remote(spec, run_dir)] = i
    for ref, i in pending.items():
        results[i] = ray.get(ref)
    return [results[i] for i in range(len(specs))]


def make_trainer(spec: RunSpec, name: str, storage: Path, data_dir: Path,
                 callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer for one run (also what each Tune trial builds and fits); the spec travels
    to the workers as it is."""
    ds = window_dataset(data_dir, spec.model.max_len, loop.soft_dir_of(spec), spec.seed)
    train_cfg = spec.train
    return TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec, "data_dir": str(Path(data_dir).resolve())},
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker={"CPU": train_cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds},
    )


class EpochLines(ray.train.UserCallback):
    """The epoch lines of one run, printed as each report arrives.

    One line per epoch is kept in raykd.log (and shown with `-v`); the console gets the first,
    then one every `every_s` seconds, and the last, each with the time so far and an ETA (an upper
    bound: early stopping may end the run sooner). For a TorchTrainer run this is Ray Train's
    controller, a Ray actor whose lines reach the driver through Ray's log forwarding, marked as
    raykd's (raykd.core.console.say); for a run in a Ray task (raykd.cluster.task) it is the driver itself.
    """

    def __init__(self, name: str, epochs: int, every_s: float = 20.0):
        self.name, self.epochs = name, epochs
        self.start = time.time()  # the driver's clock, at fit(): the elapsed time includes start-up
        self.throttle = console.Throttle(every_s)
        self.first = None

    def after_report(self, run_context, metrics, checkpoint):
        r = metrics[0]
        done, now = r["epoch"] + 1, time.time()
        elapsed = now - self.start
        if self.first is None:  # the first report of this process (a resumed run starts later than epoch 1)
            self.first = (done, now - r.get("epoch_s", 0.0))
        pace = (now - self.first[1]) / max(done - self.first[0] + 1, 1)  # seconds per epoch, reports included
        left = pace * (self.epochs - done)
        eta = f", ETA at most {console.duration(left)}" if not r.get("final") else ""
        line = (f"{self.name}: epoch {done}/{self.epochs} loss {r['loss']:.4f}, val NDCG@10 {r['val_ndcg@10']:.4f} "
                f"(best {r['best_val_ndcg@10']:.4f} at epoch {r.get('best_epoch', r['epoch']) + 1}), "
                f"{r.get('epoch_s', 0.0):.1f}s/epoch, {console.duration(elapsed)} so far{eta}")
        console.say(line, detail=not self.throttle.due(force=bool(r.get("final"))))


def export(ckpt: Path, out: Path, spec: RunSpec, data_dir: Path, extra: dict) -> dict:
    """Publish a checkpoint's best-on-validation model as the artifact `out` (servable as is).

    Written into a staging folder and renamed into place, its manifest last: a run killed
    mid-export leaves the previous model or none, never a mix of the two.
    """
    state = checkpoints.read_state(ckpt)
    model, desc = models.load_model(Path(ckpt) / "best")
    best = state["best"]
    # epochs count from 1 in every file and line a user reads (the checkpoint state counts from 0)
    summary = {**extra, "best_epoch": best["epoch"] + 1, "valid": best["metrics"],
               "epochs_run": state["epoch"] + 1, "history": [{**h, "epoch": h["epoch"] + 1} for h in state["history"]],
               "resumed": state.get("resumed", 0), "replica_digests": state.get("replica_digests", []),
               "params": models.count_params(model), "sparse_table": loop.sparse_table(spec, desc)}
    data = rundir.read_manifest(data_dir)  # the model is tied to the vocabulary it was trained on
    with rundir.staged(out) as tmp:
        models.save_model(tmp, model, desc, extra={"fingerprint": spec.fingerprint})
        (tmp / rundir.METRICS).write_text(json.dumps(summary, indent=2))
        rundir.write_manifest(tmp, spec.fingerprint, spec.upstream, role=spec.role,
                              vocab_digest=data.get("vocab_digest"), num_items=desc["num_items"])
    staleness.mark_stale(Path(data_dir).parent)  # a report that scored the model replaced here says so
    return summary


def reusable(out: Path, fingerprint: str) -> dict | None:
    """The stored summary of a finished model with this fingerprint, else None."""
    if rundir.key_of(out) != fingerprint:
        return None
    try:
        return json.loads((out / rundir.METRICS).read_text())
    except (OSError, ValueError):
        return None


def _forget_stale_run(path: Path, fingerprint: str) -> None:
    """Ray resumes a run with the same name: only let it when the run was for this same config."""
    marker = path.with_suffix(".fingerprint")
    if path.exists() and (not marker.exists() or marker.read_text() != fingerprint):
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)


BLOCK_WINDOWS = 1024  # windows a Ray Data task yields at a time (shuffled within loop.SHUFFLE_WINDOWS)
BLOCK_BYTES = 8 << 20  # Ray Data joins yielded tables into blocks of at most this (its default: 128 MiB)


def window_dataset(data_dir: Path, max_len: int, soft_dir: Path | None, seed: int,
                   block_bytes: int = BLOCK_BYTES) -> ray.data.Dataset:
    """The training windows as a streamed Ray Data dataset, never materialised: Ray Train runs it again
    every epoch, each worker iterating its share (streaming_split, equal=True, Ray Train's default).

    One row per sequence shard (with its soft-label shard) in a seeded order that changes every
    execution (randomize_block_order with reseed_after_execution: the per-epoch file shuffle); a
    map_batches task per shard cuts its windows a chunk of users at a time and shuffles them within a
    bounded buffer (loop.shuffled_batches) seeded by a per-execution seeded draw (Ray's `random()`).
    Blocks hold at most `block_bytes`, and no process holds more than a buffer of one shard. (The execution
    count lives in the dataset's context: a restarted worker group may replay an earlier epoch's order.)
    """
    from ray.data import RandomSeedConfig
    from ray.data.expressions import random

    items = [{"shard": str(p), "soft": str(s) if s else ""} for p, s in sequences.training_shards(data_dir, soft_dir)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    # num_cpus=0 for both tasks (fused or not): the Train workers may hold every CPU of the cluster
    # (one worker per 1-CPU node), and a task that waits for a CPU then never runs while training
    # waits for its windows (a deadlock; tests/multinode/cluster_utils_distill.py).
    ds = ds.with_column("draw", random(seed=seed, reseed_after_execution=True), num_cpus=0)
    ds = ds.map_batches(_shuffled_windows, fn_kwargs={"max_len": max_len}, batch_size=1, batch_format="numpy",
                        num_cpus=0)
    ds.context.target_max_block_size = block_bytes  # this dataset's blocks only
    return ds


def _shuffled_windows(batch: dict, max_len: int):
    """A Ray Data task's body: one shard's windows, block by block, shuffled with a seeded RNG."""
    for shard, soft, draw in zip(batch["shard"], batch["soft"], batch["draw"]):
        rng = np.random.default_rng(int(draw * 2**53))
        chunks = sequences.window_chunks(Path(shard), max_len, Path(soft) if soft else None)
        for block in loop.shuffled_batches(chunks, BLOCK_WINDOWS, loop.SHUFFLE_WINDOWS, rng):
            yield sequences.packed_table(block)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker: `config` is {"spec": RunSpec, "data_dir": str}; rank 0 also
    checkpoints. The loop is raykd.training.loop.EpochRunner's; this driver adds the worker's shard of the
    windows, validation summed over ranks, and Ray Train's reports and checkpoints."""
    spec, data_dir = config["spec"], config["data_dir"]
    ray_private.quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if rank != 0:
        spec = dataclasses.replace(spec, before_epoch=None)  # the fault-injection hook runs on rank 0 only
    desc = loop.model_desc(spec, data_dir)
    model = loop.build(spec, desc, data_dir)  # seeded: same init on every rank (DDP also broadcasts rank 0's)
    model = ray.train.torch.prepare_model(model)  # DDP + device placement (Ray)
    device = next(model.parameters()).device
    users = loop.validation_users(sequences.num_users(data_dir), spec.train.val_users, spec.seed)[rank::world]
    split = sequences.read_split(data_dir, users)  # this rank's validation users only
    val_users = np.arange(len(users))
    shard = ray.train.get_dataset_shard("train")  # this worker's share of the streamed windows (Ray)
    tc = spec.train
    per_step = loop.worker_batch(tc.batch_size, world, tc.batch_scaling)

    def batches(epoch: int):  # a new execution of the dataset: its own file order and shuffle (window_dataset)
        return shard.iter_batches(batch_size=per_step, batch_format="numpy")

    log_q = loop.sampling_log_q(spec, desc, data_dir, device)
    runner = loop.EpochRunner(spec, model, desc, device, batches,
                              lambda core, progress: _validate(core, split, val_users, device, world, progress),
                              log_q, world=world)
    if rank == 0:  # one progress line for the run, from rank 0 (its share of the windows)
        runner.say, runner.windows = console.say, sequences.count_windows(data_dir, desc["max_len"]) // world
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume after a restart or a rerun (Ray)
        with ckpt.as_directory() as d:
            runner.restore(d)
        print(f"rank {rank}: resumed after epoch {runner.state['epoch'] + 1}", flush=True)

    def report(entry: dict, due: bool) -> float | None:
        runner.state["replica_digests"] = _replica_digests(runner.core, world, device)
        return _report(entry, runner, rank, due)

    runner.run(report)


def _validate(core, split, users, device, world, progress=None) -> dict:
    """Validation metrics over this rank's users, summed across ranks (same result everywhere);
    `progress` (rank 0's, or None) is told how many of this rank's users are scored."""
    hist, targets, seen = sequences.eval_inputs(split, "valid", users)
    out = metrics.evaluate_model(core, hist, targets, seen, device=device, progress=progress) if len(users) else {}
    keys = loop.VAL_KEYS
    sums = torch.tensor([out.get(k, 0.0) * len(users) for k in keys] + [len(users)], dtype=torch.float64)
    if world > 1:
        sums = sums.to(device)
        dist.all_reduce(sums)
    sums = sums.cpu()
    return {k: float(sums[i] / max(float(sums[-1]), 1.0)) for i, k in enumerate(keys)}


def _replica_digests(core, world: int, device) -> list[str]:
    """A hash of every rank's parameters: DDP replicas must stay identical (tested)."""
    h = hashlib.sha256()
    for tensor in core.state_dict().values():
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    mine = torch.tensor(list(h.digest()[:16]), dtype=torch.uint8, device=device)
    if world == 1:
        return [bytes(mine.tolist()).hex()]
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    return [bytes(g.cpu().tolist()).hex() for g in gathered]


def _report(report: dict, runner: loop.EpochRunner, rank: int, due: bool) -> float | None:
    """Every rank reports (a barrier); rank 0 attaches this epoch's checkpoint when it is `due`
    (loop.checkpoint_due), and returns the seconds the checkpointed report took (Ray)."""
    if rank != 0 or not due:
        ray.train.report(report)
        return None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        runner.save(d)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))
    return time.perf_counter() - t0
