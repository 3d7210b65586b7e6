"""Soft labels at large catalogues: tiled top-K + rest (raykd.core.soft_targets) vs one [P, V] matrix.

    python benchmarks/bench_soft_targets.py                       # V = 50k, 200k, 1M; P = 5,011
    python benchmarks/bench_soft_targets.py --items 50000 --positions 2000

One chunk of a teacher's final hidden states (P positions, width D) scored against V items, as the
soft-label actors do: the K best items and the log-mass of the rest. Each cell runs in its own
process, so its peak resident memory (ru_maxrss) is its own. Side by side, in the same run: the
one-matrix computation (where it fits: `--one-matrix-gib`), and the floor, this machine's sgemm
GFLOP/s on the tile shape and on a square 2048³ product. GFLOP counts the 2·P·V·D of the product only.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def cell(mode: str, positions: int, items: int, dim: int, k: int, threads: int) -> dict:
    import torch

    from raykd.core import soft_targets

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(positions, dim, generator=g)
    table = torch.randn(items + 1, dim, generator=g) * 0.1
    start = time.perf_counter()
    if mode == "tiled":
        soft_targets.top_k_and_rest([hidden], [table], k)
    elif mode == "one_matrix":
        scores = hidden @ table.T
        scores[:, 0] = torch.finfo(scores.dtype).min
        top = torch.topk(scores, k, dim=1)
        scores.scatter(1, top.indices, float("-inf")).logsumexp(1)
    elif mode == "sgemm_2048":  # the floor: a square 2048^3 sgemm
        a, b = torch.randn(2048, 2048, generator=g), torch.randn(2048, 2048, generator=g)
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "gflops": 5 * 2 * 2048**3 / seconds / 1e9, "peak_mib": _peak_mib()}
    else:  # the floor: sgemm on the tile shape, as many tiles as the catalogue needs
        a, b = hidden[:soft_targets.ROW_BLOCK], table[:soft_targets.ITEM_BLOCK]
        a @ b.T  # warm-up
        start = time.perf_counter()
        tiles = -(-positions // len(a)) * -(-(items + 1) // len(b))
        for _ in range(tiles):
            a @ b.T
        seconds = time.perf_counter() - start
        flops = 2 * tiles * len(a) * len(b) * dim
        return {"seconds": seconds, "gflops": flops / seconds / 1e9, "peak_mib": _peak_mib()}
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "gflops": 2 * positions * (items + 1) * dim / seconds / 1e9, "peak_mib": _peak_mib()}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cell(mode: str, args, items: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--cell", mode, "--positions", str(args.positions),
                          "--items", str(items), "--dim", str(args.dim), "--k", str(args.k),
                          "--threads", str(args.threads)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, nargs="*", default=[50_000, 200_000, 1_000_000])
    p.add_argument("--positions", type=int, default=5011, help="positions in one chunk (256 windows)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (a soft-label actor has 1 CPU)")
    p.add_argument("--one-matrix-gib", type=float, default=6.0,
                   help="run the one-matrix computation only where its [P, V] scores take at most this")
    p.add_argument("--cell", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.cell:
        print(json.dumps(cell(args.cell, args.positions, args.items[0], args.dim, args.k, args.threads)))
        return
    print(f"P={args.positions} positions x D={args.dim}, top-{args.k}, {args.threads} thread(s); "
          f"each cell in its own process")
    print(f"{'items':>9} {'mode':>11} {'seconds':>8} {'GFLOP/s':>8} {'% sgemm':>8} {'peak MiB':>9}")
    for items in args.items:
        floor = run_cell("sgemm", args, items)
        modes = ["tiled"] + (["one_matrix"] if 4 * args.positions * items / 2**30 <= args.one_matrix_gib else [])
        for mode in ["sgemm", "sgemm_2048", *modes]:
            r = floor if mode == "sgemm" else run_cell(mode, args, items)
            print(f"{items:>9,} {mode:>11} {r['seconds']:>8.2f} {r['gflops']:>8.1f} "
                  f"{100 * r['gflops'] / floor['gflops']:>7.0f}% {r['peak_mib']:>9,.0f}")
        if "one_matrix" not in modes:
            print(f"{items:>9,} {'one_matrix':>11}  skipped: its scores alone take "
                  f"{4 * args.positions * items / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
