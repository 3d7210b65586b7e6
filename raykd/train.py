"""The one training loop for teacher and students, run by Ray Train's TorchTrainer.

`fit(...)` builds the window dataset (Ray Data, with soft labels when distilling), runs
`train_loop` on `num_workers` DDP workers, and exports the checkpoint that was best on validation
NDCG@10 to `<run>/<name>/` (model.safetensors + model.json + metrics.json). Every epoch each
worker trains on its shard, all workers evaluate a slice of the validation users (summed with an
all-reduce, so every rank takes the same early-stopping decision), and rank 0 reports a
checkpoint. A rerun, or a restart after a lost worker (FailureConfig), resumes from the latest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raykd import checkpoints, loop, metrics, models, sequences
from raykd.config import ModelConfig, TrainConfig, section_hash
from raykd.errors import RaykdError
from raykd.runtime import DRIVER_RESOURCE, ensure_ray

FAULT_ENV = "RAYKD_FAULT_AFTER_EPOCH"  # test hook: rank 0 dies once after this epoch's checkpoint


def fit(name: str, run_dir: Path, data_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
        seed: int = 0, soft_dir: Path | None = None, alpha: float = 0.0, temperature: float = 1.0,
        kd_loss: str = "kl", upstream: str = "", item_text: Path | None = None, text_mode: str = "fuse",
        init_from: list[Path] | None = None, init_std: float = 0.02) -> dict:
    """Train one model with Ray Train and export its best checkpoint to `run_dir/name`.

    `upstream` fingerprints the inputs (prepared data, soft labels): a finished model trained on
    the same inputs with the same settings is reused instead of retrained.
    """
    run_dir, data_dir = Path(run_dir).resolve(), Path(data_dir).resolve()
    out = run_dir / name
    fingerprint = fingerprint_of(model_cfg, train_cfg, seed, alpha, temperature, kd_loss, upstream, item_text,
                                 text_mode, init_from, init_std)
    done = reusable(out, fingerprint)
    if done:
        print(f"{name}: reusing {out} (same inputs and settings)", flush=True)
        return {**done, "reused": True}
    ensure_ray()
    storage = run_dir / "ray_train"
    ray_name = name.replace("/", "-")  # kd_curve/d8/student -> one flat Ray Train run name
    _forget_stale_run(storage / ray_name, fingerprint)
    trainer = make_trainer(ray_name, storage, data_dir, model_cfg, train_cfg, seed, soft_dir, alpha, temperature,
                           kd_loss, item_text=item_text, text_mode=text_mode, init_from=init_from,
                           init_std=init_std)
    print(f"{name}: training {model_cfg.family} dim={model_cfg.dim} layers={model_cfg.layers} on "
          f"{train_cfg.num_workers} worker(s) ({'GPU' if train_cfg.use_gpu else 'CPU'})", flush=True)
    t0 = time.perf_counter()
    result = trainer.fit()
    if result.error or result.checkpoint is None:
        raise RaykdError(f"{name}: training failed: {result.error}")
    with result.checkpoint.as_directory() as ckpt:
        summary = export(Path(ckpt), out, {"name": name, "train_seconds": time.perf_counter() - t0,
                                           "alpha": alpha, "temperature": temperature,
                                           "kd_loss": kd_loss if alpha > 0 else None, "fingerprint": fingerprint})
    print(f"{name}: best valid NDCG@10 {summary['valid']['ndcg@10']:.4f} at epoch {summary['best_epoch']} "
          f"({summary['epochs_run']} epochs, {summary['train_seconds']:.0f}s) -> {out}", flush=True)
    return summary


def fingerprint_of(model_cfg: ModelConfig, train_cfg: TrainConfig, seed: int = 0, alpha: float = 0.0,
                   temperature: float = 1.0, kd_loss: str = "kl", upstream: str = "", item_text: Path | None = None,
                   text_mode: str = "fuse", init_from: list[Path] | None = None, init_std: float = 0.02,
                   **_: object) -> str:
    """What a finished model must have been trained with to be reused (extra `fit` arguments ignored)."""
    return (section_hash(model_cfg, train_cfg) + f"-{seed}-{alpha}-{temperature}-{kd_loss}-{upstream}"
            + (f"-text:{text_mode}" if item_text else "") + (f"-init:{init_std}" if item_text or init_from else ""))


def parallel_runs(train_cfg: TrainConfig) -> int:
    """Training runs of this size that fit at once; one CPU stays free for Ray Data (GUIDE.md section 4)."""
    res = ray.cluster_resources()
    if train_cfg.use_gpu:
        fits = int(res.get("GPU", 0) // train_cfg.num_workers)
    else:
        fits = int((res.get("CPU", 1) - 1) // (train_cfg.num_workers * train_cfg.cpus_per_worker))
    return max(1, min(fits, int(res.get(DRIVER_RESOURCE, 0))))


def fit_many(jobs: list[dict], parallel: int) -> list[dict]:
    """`fit(**job)` for every job, in order; `parallel` > 1 runs that many at once, each driven by a
    Ray task on the zero-CPU driver resource (as Tune drives its trials)."""
    if parallel <= 1 or len(jobs) == 1:
        return [fit(**job) for job in jobs]
    print(f"{len(jobs)} training runs, {parallel} at a time: {', '.join(j['name'] for j in jobs)}", flush=True)
    remote_fit = ray.remote(num_cpus=0, resources={DRIVER_RESOURCE: 1}, max_retries=0)(fit)
    pending, results = {}, {}
    for i, job in enumerate(jobs):
        if len(pending) >= parallel:
            done, _ = ray.wait(list(pending), num_returns=1)
            results[pending.pop(done[0])] = ray.get(done[0])
        pending[remote_fit.remote(**job)] = i
    for ref, i in pending.items():
        results[i] = ray.get(ref)
    return [results[i] for i in range(len(jobs))]


def make_trainer(name: str, storage: Path, data_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 seed: int = 0, soft_dir: Path | None = None, alpha: float = 0.0, temperature: float = 1.0,
                 kd_loss: str = "kl", callbacks: list | None = None, item_text: Path | None = None,
                 text_mode: str = "fuse", init_from: list[Path] | None = None, init_std: float = 0.02) -> TorchTrainer:
    """The TorchTrainer for one model (also what each Tune trial builds and fits).

    `item_text`: a `vectors.parquet` of item text vectors, fused into the model and/or used to
    initialise its item table (`text_mode`, teacher only). `init_from`: teacher folders whose item
    representations, reduced to this model's width, initialise its item table (embedding transfer).
    """
    desc = {"family": model_cfg.family, "num_items": sequences.num_items(data_dir),
            **model_cfg.model_dump(exclude={"family"})}
    if item_text is not None and text_mode in ("fuse", "both"):
        desc["text_dim"] = loop.text_dim(item_text, model_cfg.dim)
    ds = window_dataset(data_dir, model_cfg.max_len, soft_dir if alpha > 0 else None)
    loop_cfg = {"name": name, "desc": desc, "train": train_cfg.model_dump(), "data_dir": str(Path(data_dir).resolve()),
                "seed": seed, "alpha": alpha, "temperature": temperature, "kd_loss": kd_loss,
                "item_counts": loop.item_log_q(data_dir) if train_cfg.loss == "sampled" else None,
                "fault_after_epoch": os.environ.get(FAULT_ENV),
                "item_text": str(Path(item_text).resolve()) if item_text else None, "text_mode": text_mode,
                "init_from": [str(Path(f).resolve()) for f in init_from] if init_from else None, "init_std": init_std}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=train_cfg.num_workers, use_gpu=train_cfg.use_gpu,
                                     resources_per_worker={"CPU": train_cfg.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(storage), callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=train_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets={"train": ds},
    )


def export(ckpt: Path, out: Path, extra: dict) -> dict:
    """Write a checkpoint's best-on-validation model to `out` (servable as is) with its summary."""
    state = checkpoints.read_state(ckpt)
    model, desc = models.load_model(Path(ckpt) / "best")
    best = state["best"]
    # epochs count from 1 in every file and line a user reads (the checkpoint state counts from 0)
    summary = {**extra, "best_epoch": best["epoch"] + 1, "valid": best["metrics"],
               "epochs_run": state["epoch"] + 1, "history": [{**h, "epoch": h["epoch"] + 1} for h in state["history"]],
               "resumed": state.get("resumed", 0), "replica_digests": state.get("replica_digests", []),
               "params": models.count_params(model)}
    models.save_model(out, model, desc, extra={"fingerprint": extra.get("fingerprint")})
    (Path(out) / "metrics.json").write_text(json.dumps(summary, indent=2))
    return summary


def reusable(out: Path, fingerprint: str) -> dict | None:
    """The stored summary of a finished model with this fingerprint, else None."""
    try:
        if json.loads((out / "model.json").read_text()).get("fingerprint") == fingerprint:
            return json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        pass
    return None


def _forget_stale_run(path: Path, fingerprint: str) -> None:
    """Ray resumes a run with the same name: only let it when the run was for this same config."""
    marker = path.with_suffix(".fingerprint")
    if path.exists() and (not marker.exists() or marker.read_text() != fingerprint):
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint)


def window_dataset(data_dir: Path, max_len: int, soft_dir: Path | None) -> ray.data.Dataset:
    """Ray Data: one task per sequence shard cuts windows (and attaches its soft-label shard)."""
    shards = sequences.shard_paths(data_dir)
    if soft_dir is not None:
        soft = [Path(soft_dir) / p.name for p in shards]
        missing = [str(s) for s in soft if not s.exists()]
        if missing:
            raise RaykdError(f"soft labels missing: {', '.join(missing)}; run `raykd soft-labels CONFIG`")
    items = [{"shard": str(p), "soft": str(Path(soft_dir) / p.name) if soft_dir else ""} for p in shards]

    def cut(batch: dict) -> object:
        for shard, soft in zip(batch["shard"], batch["soft"]):
            yield sequences.window_table(Path(shard), max_len, Path(soft) if soft else None)

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    # materialised once, so epochs and workers read blocks without re-running tasks
    return ds.map_batches(cut, batch_size=1, batch_format="numpy").materialize()


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker (rank 0 also checkpoints)."""
    tc = config["train"]
    _quiet_ray_train_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    model = loop.build(config)  # seeded: same init on every rank (DDP also broadcasts rank 0's)
    model = ray.train.torch.prepare_model(model)  # DDP + device placement (Ray)
    device = next(model.parameters()).device
    core = models.unwrap(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    state = {"epoch": -1, "best": {"epoch": -1, "metrics": {"ndcg@10": -1.0}}, "bad_epochs": 0, "history": []}
    best_weights = checkpoints.weights(core)
    ckpt = ray.train.get_checkpoint()
    if ckpt:  # resume after a restart or a rerun (Ray)
        with ckpt.as_directory() as d:
            state, best_weights = checkpoints.load(d, core, optimizer, device)
        state["resumed"] = state.get("resumed", 0) + 1
        print(f"rank {rank}: resumed after epoch {state['epoch'] + 1}", flush=True)
    split = sequences.read_split(config["data_dir"])
    val_users = np.arange(rank, len(split["user"]), world)
    shard = ray.train.get_dataset_shard("train")  # this worker's share of the windows (Ray)
    log_q = torch.tensor(config["item_counts"], device=device) if config["item_counts"] else None
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _nullcontext()
    for epoch in range(state["epoch"] + 1, tc["epochs"]):
        if loop.should_stop(state, tc):  # resumed a run that had already stopped early
            break
        t0 = time.perf_counter()
        if rank == 0 and config["fault_after_epoch"] == str(epoch - 1):
            _die_once(config["data_dir"])
        batches_iter = shard.iter_batches(batch_size=loop.worker_batch(tc["batch_size"], world), batch_format="numpy",
                                          local_shuffle_buffer_size=4 * tc["batch_size"],
                                          local_shuffle_seed=config["seed"] * 1000 + epoch)
        loss_sum, batches = loop.train_epoch(model, core, optimizer, batches_iter, config, device, amp, log_q)
        val = _validate(core, split, val_users, device, world)
        state["epoch"] = epoch
        improved = val["ndcg@10"] > state["best"]["metrics"]["ndcg@10"]
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        if improved:
            state["best"] = {"epoch": epoch, "metrics": val}
            best_weights = checkpoints.weights(core)
        state["history"].append({"epoch": epoch, "loss": loss_sum / max(batches, 1), **val,
                                 "seconds": time.perf_counter() - t0, "steps": batches})
        state["replica_digests"] = _replica_digests(core, world, device)
        report = {"epoch": epoch, "loss": loss_sum / max(batches, 1), "val_ndcg@10": val["ndcg@10"],
                  "best_val_ndcg@10": state["best"]["metrics"]["ndcg@10"]}
        _report(report, core, optimizer, state, config["desc"], rank, best_weights)
        if rank == 0:
            best = state["best"]
            print(f"{config.get('name', 'train')}: epoch {epoch + 1}/{tc['epochs']} loss {report['loss']:.4f}, "
                  f"val NDCG@10 {val['ndcg@10']:.4f} (best {best['metrics']['ndcg@10']:.4f} at epoch "
                  f"{best['epoch'] + 1}), {state['history'][-1]['seconds']:.1f}s",
                  file=sys.__stdout__, flush=True)  # not Train's print patch, which logs it twice
        if loop.should_stop(state, tc):
            break


def _quiet_ray_train_logs() -> None:
    """Ray Train logs every report and checkpoint path at INFO on each worker; the loop prints
    one line per epoch instead. Private loggers (one is named after its file): best effort."""
    try:
        from ray.train.v2._internal.execution import context, storage
    except ImportError:
        return
    for module in (context, storage):
        module.logger.setLevel(logging.WARNING)


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _validate(core, split, users, device, world) -> dict:
    """Validation metrics over this rank's users, summed across ranks (same result everywhere)."""
    hist, targets, seen = sequences.eval_inputs(split, "valid", users)
    out = metrics.evaluate_model(core, hist, targets, seen, device=device) if len(users) else {}
    keys = ["ndcg@10", "hr@10", "mrr@10", "ndcg@20", "hr@20"]
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


def _report(report, core, optimizer, state, desc, rank, best_weights) -> None:
    """Every rank reports (a barrier); rank 0 attaches this epoch's checkpoint (Ray)."""
    if rank != 0:
        ray.train.report(report)
        return
    with tempfile.TemporaryDirectory() as d:
        checkpoints.save(d, core, optimizer, state, desc, best_weights)
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(d))


def _die_once(data_dir: str) -> None:
    """Fault injection for tests: the process exits hard, once per run directory.

    It waits past Ray Train's 2 s health-check interval first, so the controller has registered
    the previous epoch's checkpoint (a crash right after a report may lose that report: the
    epoch is then retrained, which is correct but not what the test checks).
    """
    marker = Path(data_dir).parent / ".fault_injected"
    if not marker.exists():
        marker.write_text("1")
        time.sleep(5)
        print("fault injection: worker exits", flush=True)
        os._exit(1)
