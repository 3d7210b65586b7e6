"""Epoch throughput of raykd's 1-worker runs (Ray Train, Ray task) vs the same loop without Ray (issue 3).

    python benchmarks/bench_train.py                      # quickstart data, its 64x2 teacher
    python benchmarks/bench_train.py --epochs 6 --users 4000

One process, side by side: the quickstart's synthetic log is prepared once (bench_out/train/),
then the same model (same seed, same init) trains for --epochs epochs three times:

    ray    raykd.cluster.train.fit with `train.trainer: ray_train`: TorchTrainer with 1 worker of
           `cpus_per_worker` CPUs, windows from a materialised Ray Data dataset (`iter_batches`
           with a local shuffle buffer), a validation pass and a checkpoint report every epoch
    task   raykd.cluster.train.fit with the default `train.trainer: auto`: one Ray task of the same CPUs
           (raykd.cluster.task), windows read into memory, checkpoints per loop.checkpoint_due
    plain  raykd.training.loop.fit_local on the same RunSpec: the same step, epoch, validation and early
           stopping in this process, on the same windows as NumPy arrays, torch threads set to
           the worker's CPUs (Ray gives a 1-CPU worker OMP_NUM_THREADS=1)

An epoch's time covers training and validation in both (Ray's is the loop's own per-epoch
`seconds`, from the checkpoint history). The first epoch (warm-up: dataset iterator, allocator) is
left out of the median. Printed: median epoch seconds, windows/s, and the throughput ratio
ray / plain (target >= 0.9); also the whole fit's wall time, where Ray's start-up shows.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from raykd import stages
from raykd.cluster import train
from raykd.config import load_config
from raykd.core import rundir, sequences
from raykd.training import loop
from raykd.training.spec import RunSpec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--users", type=int, default=None, help="synthetic users (default: the config's)")
    ap.add_argument("--out", default="bench_out/train")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    overrides = [f"output_dir={out}", "ray.num_cpus=2", "tune.enabled=false",
                 f"teacher.train.epochs={args.epochs}", f"teacher.train.patience={args.epochs}"]
    if args.users:
        overrides.append(f"data.synthetic.users={args.users}")
    cfg = load_config(args.config, overrides)
    stages.run(cfg, ["prepare"])
    data_dir = out / "data"
    model_cfg = cfg.teacher.model
    rows = {}
    for label, trainer in (("Ray Train, 1 worker", "ray_train"), ("Ray task, 1 worker", "auto")):
        train_cfg = cfg.teacher.train.model_copy(update={"trainer": trainer})
        shutil.rmtree(out / "teacher", ignore_errors=True)
        shutil.rmtree(out / "ray_train", ignore_errors=True)
        run_spec = RunSpec("teacher", model_cfg, train_cfg, cfg.seed, upstream={"data": rundir.key_of(data_dir)})
        t0 = time.perf_counter()
        summary = train.fit(run_spec, out)
        rows[label] = ([h["seconds"] for h in summary["history"]], time.perf_counter() - t0,
                       summary["history"][-1]["ndcg@10"])

    t0 = time.perf_counter()
    torch.set_num_threads(max(int(train_cfg.cpus_per_worker), 1))
    _, plain = loop.fit_local(run_spec, data_dir, log=lambda line: None)
    rows["plain PyTorch"] = ([h["seconds"] for h in plain["history"]], time.perf_counter() - t0,
                             plain["history"][-1]["ndcg@10"])

    windows = sum(sequences.window_table(p, model_cfg.max_len).num_rows for p in sequences.shard_paths(data_dir))
    print(f"\nmodel {model_cfg.family} {model_cfg.dim}x{model_cfg.layers}, {windows:,} windows/epoch, "
          f"batch {train_cfg.batch_size}, {args.epochs} epochs, {train_cfg.cpus_per_worker:g} CPU per worker")
    print("| loop | median epoch s | windows/s | whole fit s | val NDCG@10 (last epoch) |\n|---|---|---|---|---|")
    medians = {label: statistics.median(epochs[1:]) for label, (epochs, _, _) in rows.items()}
    for label, (epochs, wall, ndcg) in rows.items():
        print(f"| {label} | {medians[label]:.2f} | {windows / medians[label]:,.0f} | {wall:.1f} | {ndcg:.4f} |")
    plain_med = medians["plain PyTorch"]
    for label in ("Ray Train, 1 worker", "Ray task, 1 worker"):
        ratio = plain_med / medians[label]
        print(f"throughput ratio {label} / plain: {ratio:.2f} ({'PASS' if ratio >= 0.9 else 'FAIL'}: target >= 0.9)")
    print("per-epoch seconds: " + "; ".join(f"{label} {[round(x, 2) for x in epochs]}"
                                             for label, (epochs, _, _) in rows.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
