"""Soft-label throughput: raykd's Ray Data actor pool vs a plain PyTorch scoring loop (issue 3).

    python benchmarks/bench_soft_labels.py --run bench_out/quality/ml100k/seed0 --workers 1,2

Needs a run directory with `data/` and `teacher/` (any `raykd pipeline` run). In one process, for
each worker count W, side by side:

    ray    raykd.stages.soft_labels.score_all: W ShardScorer actors (1 CPU each, so Ray gives each
           one torch thread), fixed chunks of --batch-size windows in position order, each actor
           writing its shards' zstd Parquet files itself
    plain  a loop in this process with W torch threads: the same teacher, the same windows and
           chunks, forward pass, fp32 item scores, top-K, float16 logits; then the same writer

Rows/s count scoring and writing (the Ray side also its actor start-up, which a user pays).
The two outputs must be identical (indices equal; logits equal as float16). Bytes per row: on
disk (zstd) and in memory (K int32 + K float16 + user and t as int32 = K x 6 + 8), against K x 6.
Target: ray / plain rows/s >= 0.8; in-memory bytes per row within 10 % of K x 6.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from raykd.cluster.runtime import ensure_ray
from raykd.config import RayConfig
from raykd.core import models, sequences
from raykd.stages import soft_labels


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory with data/ and teacher/")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=256, help="windows per forward pass")
    ap.add_argument("--out", default="bench_out/soft_labels")
    args = ap.parse_args()
    run, out = Path(args.run).resolve(), Path(args.out).resolve()
    data_dir, teacher_dir = run / "data", run / "teacher"
    shards = sequences.shard_paths(data_dir)
    desc = json.loads((teacher_dir / "model.json").read_text())
    k = min(args.top_k, desc["num_items"])
    ensure_ray(RayConfig(num_cpus=2))
    rows_out = []
    for w in [int(x) for x in args.workers.split(",")]:
        shutil.rmtree(out, ignore_errors=True)
        (out / "ray").mkdir(parents=True)
        (out / "plain").mkdir(parents=True)
        t0 = time.perf_counter()
        n, ray_bytes = soft_labels.score_all(shards, teacher_dir, desc["max_len"], k, w, False, args.batch_size,
                                             out / "ray")
        ray_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = plain_scores(shards, teacher_dir, desc["max_len"], k, w, args.batch_size)
        soft_labels.write(plain, shards, out / "plain", k)
        plain_s = time.perf_counter() - t0
        same = all(_same(out / "ray" / s.name, out / "plain" / s.name) for s in shards)
        mem = sum(pq.read_table(p).nbytes for p in (out / "ray").glob("*.parquet")) / n
        rows_out.append((w, n, ray_s, plain_s, ray_bytes / n, mem, same))
    print(f"\nteacher {desc['family']} {desc['dim']}x{desc['layers']}, {desc['num_items']:,} items, top-{k}, "
          f"chunks of {args.batch_size} windows; run {run}")
    print("| workers | rows | ray rows/s | plain rows/s | ray / plain | bytes/row on disk | bytes/row in memory "
          "| K x 6 | identical |\n|---|---|---|---|---|---|---|---|---|")
    for w, n, ray_s, plain_s, disk, mem, same in rows_out:
        print(f"| {w} | {n:,} | {n / ray_s:,.0f} | {n / plain_s:,.0f} | {plain_s / ray_s:.2f} | {disk:.0f} | "
              f"{mem:.0f} | {k * 6} | {same} |")
    best = max(plain_s / ray_s for _, _, ray_s, plain_s, *_ in rows_out)
    mem_ok = all(abs(mem - k * 6) <= 0.1 * k * 6 for *_, mem, _ in rows_out)
    print(f"\n{'PASS' if best >= 0.8 else 'FAIL'}: ray / plain rows/s >= 0.8 (best {best:.2f})")
    print(f"{'PASS' if mem_ok else 'FAIL'}: in-memory bytes per row within 10 % of K x 6")
    print(f"{'PASS' if all(r[-1] for r in rows_out) else 'FAIL'}: Ray and plain outputs identical")
    return 0


@torch.no_grad()
def plain_scores(shards: list[Path], teacher_dir: Path, max_len: int, k: int, threads: int,
                 chunk: int) -> dict[str, dict]:
    """Top-K of every training position, in position order, in this process."""
    torch.set_num_threads(threads)
    model, _ = models.load_model(teacher_dir)
    model.eval()
    out = {}
    for shard in shards:
        w = sequences.windows(pq.read_table(shard, columns=["train"])["train"].combine_chunks(), max_len)
        order = soft_labels.position_order(w["pos"])  # the actors' order of windows
        w = {name: w[name][order] for name in ("input", "pos")}
        parts = []
        for start in range(0, len(w["input"]), chunk):
            pos = w["pos"][start:start + chunk]
            real = torch.as_tensor(pos >= 0)
            hidden = model(torch.as_tensor(w["input"][start:start + chunk], dtype=torch.long))[real]
            top = torch.topk(model.score(hidden.float()), k, dim=1)
            parts.append((pos[pos >= 0], top.indices.int().numpy(), top.values.numpy().astype(np.float16)))
        pos = np.concatenate([p[0] for p in parts])
        order = np.argsort(pos, kind="stable")
        out[str(shard)] = {"pos": pos[order], "idx": np.concatenate([p[1] for p in parts])[order],
                           "logits": np.concatenate([p[2] for p in parts])[order]}
    return out


def _same(a: Path, b: Path) -> bool:
    ta, tb = pq.read_table(a), pq.read_table(b)
    return all(ta[c].equals(tb[c]) for c in ("user", "t", "idx", "logits"))


if __name__ == "__main__":
    sys.exit(main())
