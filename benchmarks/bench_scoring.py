"""Blocked vs whole-matrix exact top-k scoring (raykd.core.scoring, issue 24), against sgemm.

    python benchmarks/bench_scoring.py                      # 100k and 1M items x d 16, 64; ~3 min on 2 cores
    python benchmarks/bench_scoring.py --items 1000000 --dims 16 --blocks 8192 16384 32768 65536
    python benchmarks/bench_scoring.py --ranks              # evaluate's target ranks instead of top-k

One batch of --batch users (random user vectors, 15 random seen items each, k = --k) against a
random item table, torch threads --threads (a 1-CPU recommend actor's). Each figure is measured
in a fresh subprocess, so its peak RSS (ru_maxrss, less the RSS once the inputs exist) is that
path's own memory per batch:
    sgemm      torch.mm(queries, items.T) alone: the floor, GFLOP/s = 2 * batch * items * d / s
    whole      the whole [batch, items + 1] matrix, NaN check, seen items at -inf, scoring.top_k
               (what the Recommender did before blocking)
    blocked    scoring.blocked_top_k over windows of --block items, the same NaN check per window
Printed per cell: users/s and peak MiB of each path, and the blocked path's GFLOP/s as a share
of sgemm's. The blocked and whole answers are checked equal. With --ranks the paths are what
`evaluate` does instead (every user's rank of one target among the unseen items):
    whole      metrics.target_ranks on the whole matrix with its exclusion mask
    blocked    scoring.blocked_target_ranks over windows (window counts summed as int32)
    blocked-int64  the same windows counted as before 2026-12-04: ((s >= t) | isnan(s)).sum(1), a
               bool tensor summed into int64 (torch's default), the NaN test on every entry Targets (issue 24): blocked >= 50 %
of sgemm's GFLOP/s at 1M items; memory per actor <= 2 GiB whatever the catalogue.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def inputs(items: int, dim: int, batch: int, seed: int = 0):
    import numpy as np
    import torch

    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(items + 1, dim, generator=gen)
    queries = torch.randn(batch, dim, generator=gen)
    rng = np.random.default_rng(seed)
    return queries, table, [rng.integers(1, items + 1, 15) for _ in range(batch)]


def whole_top_k(queries, table, seen, k):
    import numpy as np
    import torch

    from raykd.core import scoring

    s = queries @ table.T
    bad = ~torch.isfinite(s)
    if bad.any():
        s = s.masked_fill(bad, -torch.inf)
    s[:, 0] = -torch.inf
    s[torch.from_numpy(np.repeat(np.arange(len(seen)), [len(x) for x in seen])),
      torch.from_numpy(np.concatenate(seen))] = -torch.inf
    return scoring.top_k(s, min(k, s.shape[1]))


def blocked_top_k(queries, table, seen, k, block):
    import torch

    from raykd.core import scoring

    def usable(start, window):
        bad = ~torch.isfinite(window)
        if bad.any():
            window.masked_fill_(bad, -torch.inf)

    return scoring.blocked_top_k(scoring.DotScores(queries, table), k, seen, block, on_block=usable)


def rank_paths(queries, table, seen, block):
    """evaluate's three ways to rank a target per user (module docstring, --ranks)."""
    import torch

    from raykd.core import metrics, scoring

    targets = torch.randint(1, len(table), (len(queries),), generator=torch.Generator().manual_seed(1))

    def int64_counts(scores, targets, target_scores, out, block):
        rows = len(targets)
        ranks, actual = torch.zeros(rows, dtype=torch.long), torch.full((rows,), torch.nan)
        for start, stop, skip in scoring.windows(scores.width, block):
            first = start + skip
            s = scores.block(start, stop)[:, skip:]
            above = (s >= target_scores.unsqueeze(1)) | torch.isnan(s)
            if first == 0:
                above[:, 0] = False
            inside = ((targets >= first) & (targets < stop)).nonzero().squeeze(1)
            actual[inside] = s[inside, targets[inside] - first]
            above[inside, targets[inside] - first] = False
            ex_rows, ex_cols = out.within(first, stop, s.device)
            above[ex_rows, ex_cols] = False
            ranks += above.sum(1)
        return ranks, actual

    def before():
        dot = scoring.DotScores(queries, table)
        return int64_counts(dot, targets, dot.at(targets), scoring.Exclusions(seen, len(targets)), block)[0]

    return {"whole": lambda: metrics.target_ranks(queries @ table.T, targets,
                                                  metrics.exclusion_mask(seen, len(table)), True),
            "blocked": lambda: scoring.blocked_target_ranks(scoring.DotScores(queries, table), targets, seen,
                                                            True, block),
            "blocked-int64": before}


def one(path: str, items: int, dim: int, args: argparse.Namespace) -> dict:
    """Time one path in this process; its peak RSS above the inputs'."""
    import torch

    torch.set_num_threads(args.threads)
    queries, table, seen = inputs(items, dim, args.batch)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    paths = {"whole": lambda: whole_top_k(queries, table, seen, args.k),
             "blocked": lambda: blocked_top_k(queries, table, seen, args.k, args.block)}
    if args.ranks:
        paths = rank_paths(queries, table, seen, args.block)
    run = {"sgemm": lambda: torch.mm(queries, table.T), **paths}[path]
    with torch.no_grad():
        answer = run()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    out = {"seconds": statistics.median(times),
           "peak_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}
    if path != "sgemm":
        out["columns"] = answer.tolist() if args.ranks else answer[1].tolist()
    return out


def measure(path: str, items: int, dim: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", path, "--items", str(items), "--dims", str(dim), "--batch",
           str(args.batch), "--k", str(args.k), "--block", str(args.block), "--threads", str(args.threads),
           "--repeats", str(args.repeats)] + (["--ranks"] if args.ranks else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(res.stdout.splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--block", type=int, default=None, help="window (default scoring.BLOCK)")
    p.add_argument("--blocks", type=int, nargs="*", help="sweep these windows (blocked path only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ranks", action="store_true", help="evaluate's target ranks instead of top-k (docstring)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from raykd.core import scoring

    args.block = args.block or scoring.BLOCK
    if args.one:
        print(json.dumps(one(args.one, args.items[0], args.dims[0], args)))
        return
    print(f"batch {args.batch} users, k {args.k}, torch threads {args.threads}, median of {args.repeats}")
    print(f"{'items':>9} {'d':>4} {'block':>6} | {'sgemm GF/s':>10} | {'whole u/s':>10} {'MiB':>6} | "
          f"{'blocked u/s':>11} {'MiB':>5} {'GF/s':>6} {'% sgemm':>7} {'x whole':>7}")
    for items in args.items:
        for dim in args.dims:
            flops = 2 * args.batch * (items + 1) * dim
            floor = measure("sgemm", items, dim, args)
            whole = measure("whole", items, dim, args)
            for block in args.blocks or [args.block]:
                args.block = block
                blocked = measure("blocked", items, dim, args)
                assert blocked["columns"] == whole["columns"], "blocked and whole answers differ"
                if args.ranks:
                    before = measure("blocked-int64", items, dim, args)
                    assert before["columns"] == whole["columns"], "the int64-counted ranks differ"
                    print(f"{items:>9,} {dim:>4} {block:>6} | blocked-int64 (before): "
                          f"{args.batch / before['seconds']:,.0f} users/s, {before['peak_mib']:.0f} MiB; "
                          f"blocked / before {before['seconds'] / blocked['seconds']:.2f}x", flush=True)
                gf, gf_floor = flops / blocked["seconds"] / 1e9, flops / floor["seconds"] / 1e9
                print(f"{items:>9,} {dim:>4} {block:>6} | {gf_floor:>10.1f} | "
                      f"{args.batch / whole['seconds']:>10,.0f} {whole['peak_mib']:>6.0f} | "
                      f"{args.batch / blocked['seconds']:>11,.0f} {blocked['peak_mib']:>5.0f} {gf:>6.1f} "
                      f"{100 * gf / gf_floor:>6.0f}% {whole['seconds'] / blocked['seconds']:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
