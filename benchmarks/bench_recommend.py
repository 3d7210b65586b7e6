"""Users/s of `raykd recommend` (Ray Data actor pool) vs a plain single-process loop (issue 11).

    python benchmarks/bench_recommend.py                         # Beauty + synthetic, ~5 min on 2 cores
    python benchmarks/bench_recommend.py --catalogues synthetic --sample 0   # all 1M synthetic users
    python benchmarks/bench_recommend.py --catalogues synthetic --synthetic-users 10000000 \
        --synthetic-items 1000000 --sample 5000      # 10M users x 1M items: a sample, the rest EXTRAPOLATED

Catalogues (models are randomly initialised: scoring cost does not depend on the weights):
    beauty     Amazon Beauty 5-core (22,363 users, 12,101 items; `raykd prepare configs/beauty.yaml`
               into --out on first use), a student of the beauty config's size (sasrec 8x1, max_len 50)
    synthetic  1,000,000 users x 100,000 items written straight in the prepared layout (history
               lengths 5 + geometric, mean 15; Zipf item popularity), a sasrec 16x1 student; the
               first --sample users are scored (a 2-core machine scores ~1k users/s at 100k items)

Paths, each scoring the same users into the same Parquet file (checked equal):
    plain      one process: Recommender.recommend_many over chunks of --batch-size users read
               shard by shard, pyarrow's ParquetWriter; torch threads 1 (a 1-CPU actor's)
    ray Nw     `raykd recommend` itself (recommend.main: Ray Data actor pool of N actors x 1 CPU, each
               scoring and writing its own Parquet parts; the driver gets row counts); Ray is started once
               before; no steady rate (the driver sees parts, not chunks)
Printed per path: users, wall seconds (start-up included: model load, actors), users/s over the
wall time and at steady state (after the first chunk is out), the ratio to plain, and the peak
RSS of this process and of this process plus every child (Ray's raylet, GCS and workers), and the
time for every user of the catalogue: measured when all were scored, else EXTRAPOLATED from the
sample's rate (steady where there is one) and labelled so.
Targets: ray 1 worker >= 0.8x plain; 2 workers above 1 worker.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
SHARD_USERS = 50_000


# ---------------------------------------------------------------- data and models


def write_synthetic(data_dir: Path, users: int, items: int, mean_length: float = 15.0, seed: int = 0) -> None:
    """A prepared data folder of random popularity-skewed histories, written by prepare's own writer."""
    from raykd.stages import prepare

    if (data_dir / "stats.json").exists() and json.loads((data_dir / "stats.json").read_text())["users"] == users:
        return
    rng = np.random.default_rng(seed)
    lengths = 4 + rng.geometric(1 / (mean_length - 4), users)
    popularity = 1 / np.arange(1, items + 1)
    seq = (rng.choice(items, int(lengths.sum()), p=popularity / popularity.sum()) + 1).astype(np.int32)
    result = {"lengths": lengths, "items": seq,
              "user_raw": pa.array(np.arange(users, dtype=np.int64) + 5_000_000),
              "item_raw": pa.array(np.arange(1, items + 1, dtype=np.int64) + 90_000_000),
              "stats": {"users": users, "items": items, "interactions": int(lengths.sum())}}
    prepare.write(result, data_dir, num_shards=-(-users // SHARD_USERS))


def random_model(model_dir: Path, num_items: int, dim: int, layers: int, heads: int = 1, max_len: int = 50) -> Path:
    """A randomly initialised sasrec saved as a servable model folder (model.json + safetensors)."""
    import torch

    from raykd.core import models

    desc = {"family": "sasrec", "num_items": num_items, "dim": dim, "layers": layers, "heads": heads,
            "max_len": max_len, "dropout": 0.0}
    torch.manual_seed(0)
    models.save_model(model_dir, models.build_model(desc), desc, extra={"fingerprint": f"bench-{dim}x{layers}"})
    return model_dir


def beauty(out: Path) -> tuple[Path, Path]:
    run = out / "beauty"
    if not (run / "data" / "items.parquet").exists():
        subprocess.run([sys.executable, "-m", "raykd", "prepare", "configs/beauty.yaml", f"output_dir={run}",
                        "ray.num_cpus=2"], cwd=REPO, check=True)
    items = json.loads((run / "data" / "stats.json").read_text())["items"]
    return run / "data", random_model(run / "bench_student", items, dim=8, layers=1)


def synthetic(out: Path, users: int, items: int) -> tuple[Path, Path]:
    run = out / "synthetic"
    write_synthetic(run / "data", users, items)
    return run / "data", random_model(run / "bench_student", items, dim=16, layers=1)


# ---------------------------------------------------------------- the two paths


def _rss_with_children() -> int:
    proc = psutil.Process(os.getpid())
    total = proc.memory_info().rss
    for child in proc.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # a worker that just exited
            pass
    return total


class PeakMemory:
    """Samples the RSS of this process and of it plus all its children (Ray's processes) every 0.2 s."""

    def __init__(self):
        self.me, self.total, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.before = _rss_with_children()  # Ray's idle processes are there before any path runs

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                me, total = psutil.Process(os.getpid()).memory_info().rss, _rss_with_children()
            except psutil.Error:
                continue
            self.me, self.total = max(self.me, me), max(self.total, total)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def plain(model_dir: Path, data_dir: Path, users: int, k: int, batch: int, out: Path) -> dict:
    """The same scoring and file, in one process, without Ray."""
    import torch

    from raykd.core import sequences
    from raykd.serve import recommend
    from raykd.serve.recommender import Recommender

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rec = Recommender(model_dir, max_k=k, data_dir=data_dir, with_histories=False)
    raw_users = pq.read_table(data_dir / "users.parquet", columns=["raw_id"])["raw_id"]
    schema = recommend.schema(data_dir)
    done, first = 0, None
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for shard in sequences.shard_paths(data_dir):
            table = pq.read_table(shard)
            table = table.filter(pc.less(table["user"], users))
            for s in range(0, table.num_rows, batch):
                part = table.slice(s, batch)
                answers = rec.recommend_many([(h, [], k, True) for h in recommend.shard_histories(part)])
                writer.write_table(pa.table({
                    "user_id": raw_users.take(part["user"]),
                    "items": pa.array([a["items"] for a in answers], schema.field("items").type),
                    "scores": pa.array([a["scores"] for a in answers], schema.field("scores").type)}, schema=schema))
                done += part.num_rows
                first = first or (time.perf_counter(), done)
    return _timing(done, t0, first)


def with_ray(model_dir: Path, data_dir: Path, users_file: str | None, k: int, batch: int, workers: int,
             out: Path) -> dict:
    """`raykd recommend` itself (recommend.main): plan -> actors score and write their parts -> publish."""
    import shutil

    from raykd.serve import recommend

    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resumed one
    args = argparse.Namespace(run_dir=str(data_dir.parent), k=k, out=str(out), users=users_file, exclude_seen=True,
                              model=str(model_dir), workers=workers, cpus_per_worker=1.0, use_gpu=False,
                              batch_size=batch, part_users=recommend.PART_USERS)
    t0 = time.perf_counter()
    recommend.main(args)
    return _timing(sum(pq.ParquetFile(p).metadata.num_rows for p in out.glob("part-*.parquet")), t0, None)


def _timing(done: int, t0: float, first: tuple | None) -> dict:
    end = time.perf_counter()
    steady = (done - first[1]) / (end - first[0]) if first and end > first[0] and done > first[1] else None
    return {"users": done, "seconds": end - t0, "users_per_s": done / (end - t0), "steady_users_per_s": steady}


# ---------------------------------------------------------------- the run


def bench(name: str, data_dir: Path, model_dir: Path, sample: int, args: argparse.Namespace) -> list[dict]:
    total_users = pq.ParquetFile(data_dir / "users.parquet").metadata.num_rows
    users = min(sample, total_users) if sample else total_users
    users_file = None
    if users < total_users:  # both paths score the first `users` prepared users
        users_file = str(data_dir.parent / f"first_{users}.txt")
        raw = pq.read_table(data_dir / "users.parquet", columns=["raw_id"])["raw_id"].to_pylist()[:users]
        Path(users_file).write_text("\n".join(map(str, raw)) + "\n")
    print(f"\n## {name}: {users:,} of {total_users:,} users, top-{args.k}, chunks of {args.batch_size}", flush=True)
    rows = []
    with PeakMemory() as mem:
        r = plain(model_dir, data_dir, users, args.k, args.batch_size, data_dir.parent / "plain.parquet")
    rows.append({"path": "plain", **r, "rss_me": mem.me, "rss_total": mem.total, "rss_before": mem.before})
    reference = pq.read_table(data_dir.parent / "plain.parquet")
    for workers in args.workers:
        out = data_dir.parent / f"ray{workers}.parquet"
        with PeakMemory() as mem:
            r = with_ray(model_dir, data_dir, users_file, args.k, args.batch_size, workers, out)
        same = pq.read_table(out).equals(reference)
        rows.append({"path": f"ray {workers}w", **r, "rss_me": mem.me, "rss_total": mem.total,
                     "rss_before": mem.before, "same": same})
    base = rows[0]
    print("| path | users | wall s | users/s (wall) | users/s (steady) | vs plain (wall / steady) | peak RSS of this "
          "process | peak RSS with Ray's processes (before the run) | same output | all "
          f"{total_users:,} users (steady rate, else wall) |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        steady = f"{r['steady_users_per_s']:,.0f}" if r["steady_users_per_s"] else "-"
        ratio_s = (f"{r['steady_users_per_s'] / base['steady_users_per_s']:.2f}x"
                   if r["steady_users_per_s"] and base["steady_users_per_s"] else "-")
        print(f"| {r['path']} | {r['users']:,} | {r['seconds']:.1f} | {r['users_per_s']:,.0f} | {steady} | "
              f"{r['users_per_s'] / base['users_per_s']:.2f}x / {ratio_s} | {r['rss_me'] / 2**20:,.0f} MiB | "
              f"{r['rss_total'] / 2**20:,.0f} MiB ({r['rss_before'] / 2**20:,.0f}) | "
              f"{'yes' if r.get('same', True) else 'NO'} | {_all_users(total_users, r)} |", flush=True)
    return rows


def _all_users(total: int, r: dict) -> str:
    """The whole population's time: measured when every user was scored, else EXTRAPOLATED from the sample."""
    if r["users"] >= total:
        return f"{r['seconds']:,.0f} s (measured)"
    rate = r["steady_users_per_s"] or r["users_per_s"]
    return f"~{total / rate / 3600:,.1f} h (EXTRAPOLATED from {r['users']:,} users, not measured)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--catalogues", default="beauty,synthetic")
    ap.add_argument("--synthetic-users", type=int, default=1_000_000)
    ap.add_argument("--synthetic-items", type=int, default=100_000)
    ap.add_argument("--sample", type=int, default=30_000, help="synthetic users scored (0: all)")
    ap.add_argument("--workers", type=lambda s: [int(w) for w in s.split(",")], default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--out", default="bench_out/recommend")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from raykd.cluster.runtime import ensure_ray
    from raykd.config import RayConfig

    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    catalogues = args.catalogues.split(",")
    prepared = {}
    if "beauty" in catalogues:
        prepared["beauty"] = (*beauty(out), 0)
    if "synthetic" in catalogues:
        t0 = time.perf_counter()
        prepared["synthetic"] = (*synthetic(out, args.synthetic_users, args.synthetic_items), args.sample)
        print(f"synthetic data ready in {time.perf_counter() - t0:.0f}s", flush=True)
    ensure_ray(RayConfig(num_cpus=2))
    for name, (data_dir, model_dir, sample) in prepared.items():
        bench(name, data_dir, model_dir, sample, args)
    print(f"\nload average at end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
