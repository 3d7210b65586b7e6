"""Peak memory of the train worker against the size of the log: training data must stream (issue 23).

    python benchmarks/bench_stream_memory.py                          # 300k and 3M interactions, 20k items
    python benchmarks/bench_stream_memory.py --sizes 300k,3M --workers 2   # the Ray Train (TorchTrainer) path
    python benchmarks/bench_stream_memory.py --code /tmp/old-checkout      # the same runs on another checkout

For each size a seeded `raykd synth` log (fixed catalogue, ~20 interactions a user, written once to
bench_out/stream_memory/) is prepared with `raykd prepare`, then one teacher epoch runs with a tiny
model and `loss: sampled` (`raykd teacher`, validation on a 2,000-user sample). The process tree of
that command is sampled from outside every 0.25 s (psutil): the peak RSS of the train worker (the Ray
task `train_in_task` on one worker, each `RayTrainWorker` on several), of the largest other Ray
worker (Ray Data tasks with several workers), of the driver, and the peak summed PSS of the whole
tree (shared pages such as the object store counted once).

Side by side, in the same run: the floor, a plain process (this file with --floor) that builds the
same model, optimiser and loss and trains 50 steps on random batches of the same shape, reading no
data: what a worker needs for the model and a step alone. Printed per size: the worker's peak, the
floor, the worker's peak over the floor; then the growth of each peak from the smallest log to the
largest (target: the worker's grows <= 1.3x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path("bench_out/stream_memory")
ITEMS = 20_000
MEAN_LENGTH = 20
MIB = 2**20
MODEL = {"family": "sasrec", "dim": 32, "layers": 1, "heads": 1, "max_len": 50, "dropout": 0.2}
TRAIN = {"epochs": 1, "batch_size": 128, "loss": "sampled", "num_negatives": 1000, "val_users": 2000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="300k,3M", help="interactions per synthetic log (k/M suffixes)")
    ap.add_argument("--workers", type=int, default=1, help="teacher.train.num_workers (2: Ray Train path)")
    ap.add_argument("--code", default=None, help="run raykd from this checkout (PYTHONPATH) instead")
    ap.add_argument("--floor", metavar="DATA_DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor:
        return floor(Path(args.floor))
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}; load average at "
          f"start {os.getloadavg()[0]:.1f}; code {args.code or 'this checkout'}; {args.workers} worker(s)", flush=True)
    rows = [measure(size, args.workers, args.code) for size in map(parse_size, args.sizes.split(","))]
    report(rows)
    tag = f"w{args.workers}" + ("_other" if args.code else "")
    (OUT / f"results_{tag}.json").write_text(json.dumps(rows, indent=2))
    return 0


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def measure(size: int, workers: int, code: str | None) -> dict:
    """synth (once), prepare (once per size), one teacher epoch watched from outside, then the floor."""
    import yaml

    log = OUT / f"synth_{size}.parquet"
    env = {**os.environ, **({"PYTHONPATH": code} if code else {})}
    if not log.exists():
        users = max(size // (MEAN_LENGTH + 1), 10)  # raykd synth: mean + 1 interactions a user on average
        run([sys.executable, "-m", "raykd", "synth", "--users", str(users), "--items", str(ITEMS),
             "--mean-length", str(MEAN_LENGTH), "--out", str(log)], OUT / f"synth_{size}.log", env)
    run_dir = OUT / f"run_{size}"
    cfg = {"name": "bench_stream", "output_dir": str(run_dir), "ray": {"num_cpus": os.cpu_count()},
           "data": {"format": "parquet", "path": str(log.resolve()), "time_col": "timestamp"},
           "teacher": {"model": MODEL, "train": {**TRAIN, "num_workers": workers,
                                                  "cpus_per_worker": 1.0 if workers == 1 else 0.5}}}
    OUT.joinpath(f"bench_{size}.yaml").write_text(yaml.safe_dump(cfg))
    config = str(OUT / f"bench_{size}.yaml")
    if not (run_dir / "data" / "stats.json").exists():
        run([sys.executable, "-m", "raykd", "prepare", config], OUT / f"prepare_{size}.log", env)
    shutil.rmtree(run_dir / "teacher", ignore_errors=True)
    shutil.rmtree(run_dir / "ray_train", ignore_errors=True)
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    t0 = time.perf_counter()
    peaks = run([sys.executable, "-m", "raykd", "teacher", config], OUT / f"teacher_{size}.log", env)
    seconds = time.perf_counter() - t0
    floor_peaks = run([sys.executable, __file__, "--floor", str(run_dir / "data")], OUT / f"floor_{size}.log", env)
    row = {"size": size, "interactions": stats["interactions"], "users": stats["users"], "items": stats["items"],
           "teacher_s": seconds, **peaks, "floor_mib": floor_peaks["driver_mib"]}
    print(f"{stats['interactions']:,} interactions ({stats['users']:,} users): teacher {seconds:.0f}s, train worker "
          f"peak {row['worker_mib']:.0f} MiB, floor {row['floor_mib']:.0f} MiB, other Ray workers "
          f"{row['other_mib']:.0f} MiB, driver {row['driver_mib']:.0f} MiB, tree {row['tree_mib']:.0f} MiB", flush=True)
    return row


def run(cmd: list[str], log: Path, env: dict) -> dict:
    """Run cmd, sampling its process tree; return peak RSS (MiB) of the train worker, the largest
    other Ray worker, the driver, and the peak summed PSS of the tree."""
    import psutil

    peaks = {"worker_mib": 0.0, "other_mib": 0.0, "driver_mib": 0.0, "tree_mib": 0.0}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            sample(root, peaks)
            time.sleep(0.25)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return peaks


def sample(root, peaks: dict) -> None:
    import psutil

    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return
    tree = 0
    for p in procs:
        try:
            title = " ".join(p.cmdline())
            rss = p.memory_info().rss / MIB
            tree += p.memory_full_info().pss / MIB
        except psutil.Error:
            continue
        key = ("worker_mib" if "train_in_task" in title or "RayTrainWorker" in title
               else "driver_mib" if p.pid == root.pid else "other_mib" if title.startswith("ray::") else None)
        if key:
            peaks[key] = max(peaks[key], rss)
    peaks["tree_mib"] = max(peaks["tree_mib"], tree)


def floor(data_dir: Path) -> int:
    """The same model, optimiser and loss, 50 steps on random full-length batches: no data read."""
    import numpy as np
    import torch

    from raykd.config import ModelConfig, TrainConfig
    from raykd.training import loop
    from raykd.training.spec import RunSpec

    torch.set_num_threads(1)
    spec = RunSpec("teacher", ModelConfig(**MODEL), TrainConfig(**TRAIN), seed=0)
    desc = loop.model_desc(spec, data_dir)
    model = loop.build(spec, desc)
    optimizer = torch.optim.Adam(model.parameters(), lr=spec.train.lr)
    loss = loop.make_loss(spec, loop.sampling_log_q(spec, desc, data_dir, "cpu"))
    rng = np.random.default_rng(0)
    shape = (spec.train.batch_size, MODEL["max_len"])
    batches = ({"input": rng.integers(1, desc["num_items"] + 1, shape), "target": rng.integers(1, desc["num_items"] + 1,
                                                                                                shape)} for _ in range(50))
    loop.train_epoch(model, model, optimizer, batches, loss, False, "cpu", torch.autocast("cpu", enabled=False))
    return 0


def report(rows: list[dict]) -> None:
    print(f"\n{'interactions':>13} {'users':>8} {'teacher s':>9} {'worker MiB':>10} {'floor MiB':>9} "
          f"{'worker/floor':>12} {'other MiB':>9} {'driver MiB':>10} {'tree MiB':>9}")
    for r in rows:
        print(f"{r['interactions']:>13,} {r['users']:>8,} {r['teacher_s']:>9.0f} {r['worker_mib']:>10.0f} "
              f"{r['floor_mib']:>9.0f} {r['worker_mib'] / r['floor_mib']:>12.2f} {r['other_mib']:>9.0f} "
              f"{r['driver_mib']:>10.0f} {r['tree_mib']:>9.0f}")
    first, last = rows[0], rows[-1]
    growth = {k: last[k] / max(first[k], 1e-9) for k in ("worker_mib", "floor_mib", "driver_mib", "tree_mib")}
    print(f"growth from {first['interactions']:,} to {last['interactions']:,} interactions "
          f"({last['interactions'] / first['interactions']:.1f}x): train worker {growth['worker_mib']:.2f}x "
          f"(target <= 1.3x), floor {growth['floor_mib']:.2f}x, driver {growth['driver_mib']:.2f}x, "
          f"tree {growth['tree_mib']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
