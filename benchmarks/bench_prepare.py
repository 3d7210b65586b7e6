"""Benchmark the prepare stage (Ray Data) against a single-process pyarrow floor (issue 2).

    python benchmarks/bench_prepare.py                       # synthetic 1M, 5M, 20M + ML-100K
    python benchmarks/bench_prepare.py --sizes 1M --no-ml100k

For each size, a seeded synthetic log (`raykd.data.synth`, written once to bench_out/prepare/) is
prepared twice, side by side, each in its own process whose whole process tree is watched:

    raykd  `raykd prepare CONFIG` (data.format parquet, k-core 5/5): Ray start, Ray Data read
           tasks, cleaning, sharded Parquet output; the run directory is deleted first, so
           nothing is reused
    floor  this file with `--floor`: the same steps in plain pyarrow/NumPy in one process (read,
           drop nulls, de-duplicate, iterative k-core, dense ids, sort by user and time,
           leave-one-out split, one Parquet file): what one machine can do without Ray

Printed per size: wall seconds, interactions/s, peak memory of the process tree (sum of PSS,
which counts shared pages such as Ray's object store once), the raykd/floor time ratio, and both
outputs' user/item/interaction counts (they must agree). Then the per-interaction cost of the
largest size relative to the smallest. Targets (2 cores): 20M in < 300 s, <= 3x the floor,
< 6 GiB peak, per-interaction cost at 20M <= 1.5x that at 1M.
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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path("bench_out/prepare")
MEAN_LENGTH = 30
ITEMS = 50_000
GIB = 2**30


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1M,5M,20M", help="interactions per synthetic log (K/M suffixes)")
    ap.add_argument("--no-ml100k", action="store_true")
    ap.add_argument("--ml100k", default="../shared/data/ml-100k")
    ap.add_argument("--floor", nargs=2, metavar=("LOG", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor:
        print(json.dumps(floor_prepare(Path(args.floor[0]), Path(args.floor[1]))))
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.node()} {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
    rows = []
    for size in [parse_size(s) for s in args.sizes.split(",")]:
        log = synth_log(size)
        rows.append(measure(f"synthetic {size / 1e6:g}M", log, {"format": "parquet", "path": str(log),
                                                                 "time_col": "timestamp"}))
    if not args.no_ml100k and Path(args.ml100k).exists():
        rows.append(measure("ml-100k", None, {"format": "movielens", "path": str(Path(args.ml100k).resolve())}))
    report(rows)
    (OUT / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


def parse_size(text: str) -> int:
    text = text.strip().upper()
    scale = {"K": 1_000, "M": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("KM")) * scale)


def synth_log(size: int) -> Path:
    """A synthetic log of about `size` interactions (users = size / mean length), written once."""
    from raykd.config import SyntheticConfig
    from raykd.data.synth import write

    path = OUT / f"synth_{size}.parquet"
    if not path.exists():
        # raykd.data.synth draws lengths 3 + geometric(1 / (mean - 2)), i.e. mean + 1 on average
        cfg = SyntheticConfig(users=max(size // (MEAN_LENGTH + 1), 10), items=ITEMS, mean_length=MEAN_LENGTH, seed=0)
        t0 = time.perf_counter()
        info = write(cfg, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        print(f"synth: {info['interactions']:,} interactions in {time.perf_counter() - t0:.0f}s -> {path}", flush=True)
    return path


def measure(name: str, log: Path | None, data: dict) -> dict:
    """raykd prepare and the floor on the same input, one after the other."""
    import yaml

    run = OUT / f"run_{name.replace(' ', '_')}"
    shutil.rmtree(run, ignore_errors=True)
    cfg = {"name": "bench_prepare", "output_dir": str(run), "ray": {"num_cpus": os.cpu_count()},
           "data": {**data, "min_user_interactions": 5, "min_item_interactions": 5}}
    run.mkdir(parents=True)
    (run / "bench.yaml").write_text(yaml.safe_dump(cfg))
    ray_s, ray_peak, _ = watch(["raykd", "prepare", str(run / "bench.yaml")], run / "prepare.log")
    stats = json.loads((run / "data" / "stats.json").read_text())
    row = {"name": name, "rows_read": stats["rows_read"], "raykd_s": ray_s, "raykd_peak_gib": ray_peak / GIB,
           "raykd_counts": [stats["users"], stats["items"], stats["interactions"]]}
    if log is not None:
        floor_s, floor_peak, out = watch([sys.executable, __file__, "--floor", str(log), str(run / "floor.parquet")],
                                         run / "floor.log")
        counts = json.loads(out.strip().splitlines()[-1])
        row.update({"floor_s": floor_s, "floor_peak_gib": floor_peak / GIB,
                    "floor_counts": [counts["users"], counts["items"], counts["interactions"]]})
    print(f"{name}: raykd {ray_s:.1f}s ({row['rows_read'] / ray_s:,.0f} rows/s, peak {row['raykd_peak_gib']:.2f} GiB)"
          + (f"; floor {row['floor_s']:.1f}s (peak {row['floor_peak_gib']:.2f} GiB)" if log else ""), flush=True)
    return row


def watch(cmd: list[str], log: Path) -> tuple[float, int, str]:
    """Run cmd; return wall seconds, peak summed PSS of its process tree, and its stdout."""
    import psutil

    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_pss(root))
            time.sleep(0.25)
        out = proc.stdout.read()
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return seconds, peak, out


def tree_pss(root) -> int:
    import psutil

    total = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def floor_prepare(path: Path, out: Path, min_user: int = 5, min_item: int = 5) -> dict:
    """The same steps as raykd prepare, in plain pyarrow/NumPy, in this one process."""
    t = pq.read_table(path, columns=["user_id", "item_id", "timestamp"]).drop_null()
    t = t.group_by(["user_id", "item_id", "timestamp"], use_threads=True).aggregate([])  # exact repeats
    users, user = np.unique(t["user_id"].to_numpy(), return_inverse=True)
    items, item = np.unique(t["item_id"].to_numpy(), return_inverse=True)
    ts = t["timestamp"].to_numpy()
    keep = np.ones(len(user), dtype=bool)
    while True:
        uc = np.bincount(user[keep], minlength=len(users))
        ic = np.bincount(item[keep], minlength=len(items))
        low = keep & ((uc[user] < min_user) | (ic[item] < min_item))
        if not low.any():
            break
        keep &= ~low
    user, item, ts = user[keep], item[keep], ts[keep]
    _, user = np.unique(user, return_inverse=True)
    kept_items, item = np.unique(item, return_inverse=True)
    order = np.lexsort((item, ts, user))  # by user, then time (ties by item)
    user, item = user[order], item[order] + 1  # 0 is padding
    lengths = np.bincount(user)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    last = offsets[1:] - 1
    train_offsets = np.concatenate([[0], np.cumsum(lengths - 2)]).astype(np.int32)
    is_train = np.ones(len(item), dtype=bool)
    is_train[last] = is_train[last - 1] = False
    table = pa.table({"user": pa.array(np.arange(len(lengths), dtype=np.int32)),
                      "train": pa.ListArray.from_arrays(pa.array(train_offsets), pa.array(item[is_train])),
                      "valid": pa.array(item[last - 1]), "test": pa.array(item[last])})
    pq.write_table(table, out)
    return {"users": len(lengths), "items": len(kept_items), "interactions": len(item)}


def report(rows: list[dict]) -> None:
    print("\n| log | rows | raykd s | rows/s | peak GiB | floor s | floor peak GiB | raykd / floor | counts agree |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        has_floor = "floor_s" in r
        print(f"| {r['name']} | {r['rows_read']:,} | {r['raykd_s']:.1f} | {r['rows_read'] / r['raykd_s']:,.0f} | "
              f"{r['raykd_peak_gib']:.2f} | " + (f"{r['floor_s']:.1f} | {r['floor_peak_gib']:.2f} | "
                                                  f"{r['raykd_s'] / r['floor_s']:.2f}x | "
                                                  f"{r['raykd_counts'] == r['floor_counts']} |" if has_floor
                                                  else "– | – | – | – |"))
    synth = [r for r in rows if "floor_s" in r]
    if len(synth) >= 2:
        small, big = synth[0], synth[-1]
        cost = (big["raykd_s"] / big["rows_read"]) / (small["raykd_s"] / small["rows_read"])
        print(f"\nper-interaction cost, {big['name']} vs {small['name']}: {cost:.2f}x")
        checks = [(f"{big['name']} in < 300 s", big["raykd_s"] < 300),
                  (f"{big['name']} within 3x of the floor", big["raykd_s"] <= 3 * big["floor_s"]),
                  ("peak memory < 6 GiB", all(r["raykd_peak_gib"] < 6 for r in rows)),
                  ("per-interaction cost at the largest size <= 1.5x the smallest", cost <= 1.5),
                  ("raykd and floor agree on users/items/interactions",
                   all(r["raykd_counts"] == r["floor_counts"] for r in synth))]
        for name, ok in checks:
            print(f"{'PASS' if ok else 'FAIL'}: {name}")


if __name__ == "__main__":
    sys.exit(main())
