"""Approximate top-k (faiss, usearch) against exact blocked scoring and sgemm, for MIPS (issue 24 item 2).

    python benchmarks/bench_ann.py --items 1000000 --dims 16        # ~8 min on 2 shared cores
    python benchmarks/bench_ann.py --items 1000000 --dims 64 --methods usearch-hnsw faiss-ivf-flat
    python benchmarks/bench_ann.py --items 100000 --dims 16 64      # a quick look

Vectors (`mixture`): what a trained recommender's item table looks like, without training one at
1M items: items in --clusters taste clusters (a unit centre plus noise), their norms rising with
a Zipf popularity (norm = 0.5 + log1p(popularity) / 4, popularity ~ 1 / rank, the rank order
shuffled), so that maximum inner product favours popular items of the query's clusters; queries
mix one to three cluster centres plus noise (a user's hidden state), each with 15 seen items.

Per cell (items x d), in one process, every search on --threads threads (1: a recommend actor's):
    sgemm     torch.mm(256 queries, table.T): the floor, GFLOP/s = 2 * 256 * items * d / s
    exact     raykd.core.scoring.blocked_top_k (seen items excluded): the ground truth and the
              throughput to beat
    ANN       each method built on --build-threads threads (build seconds, index bytes as
              serialised), then searched for k + 15 candidates (x --pq-rerank for IVF-PQ), seen
              items dropped, candidates re-ranked by their exact dot product (as raykd.core.ann
              does); one line per search setting: queries/s, recall@10 against exact, and x exact
              against exact's queries/s measured again right after it (one batch of 256, the
              faster of two passes), since other jobs share the machine.
Methods: faiss-hnsw-ip (HNSW with the inner-product metric), faiss-hnsw-l2 (HNSW on the
L2-augmented vectors: item [x, sqrt(M^2 - |x|^2)], query [q, 0]), faiss-ivf-flat, faiss-ivf-pq,
usearch-hnsw (metric ip). Target (issue 24): >= 5x exact queries/s at recall@10 >= 0.98, 1M items.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SEEN = 15  # seen items per query, excluded from both answers
METHODS = ("faiss-hnsw-ip", "faiss-hnsw-l2", "faiss-ivf-flat", "faiss-ivf-pq", "usearch-hnsw")


def mixture(items: int, dim: int, queries: int, clusters: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(table [items + 1, dim] with row 0 padding, queries [queries, dim]), float32, as the docstring says."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    member = rng.integers(0, clusters, items)
    table = centres[member] + rng.standard_normal((items, dim), dtype=np.float32) * (0.6 / math.sqrt(dim))
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    popularity = 1.0 / rng.permutation(np.arange(1, items + 1))
    table *= (0.5 + np.log1p(popularity * items) / 4).astype(np.float32)[:, None]
    mix = rng.dirichlet(np.ones(3), queries).astype(np.float32) * (rng.random((queries, 3)) < 0.6 + 0.4 * (
        np.arange(3) == 0))  # one to three clusters each
    q = np.einsum("qc,qcd->qd", mix, centres[rng.integers(0, clusters, (queries, 3))])
    q += rng.standard_normal((queries, dim), dtype=np.float32) * (0.3 / math.sqrt(dim))
    q *= 3 / np.linalg.norm(q, axis=1, keepdims=True)
    return np.vstack([np.zeros((1, dim), np.float32), table]), q.astype(np.float32)


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def exact(table: np.ndarray, queries: np.ndarray, seen: list, k: int) -> tuple[np.ndarray, float, float]:
    """(exact top-k item indices [Q, k], users/s of blocked_top_k, sgemm GFLOP/s), batches of 256."""
    import torch

    from raykd.core import scoring

    items, q = torch.from_numpy(table), torch.from_numpy(queries)
    runs = []
    for _ in range(2):  # the faster of two passes: the machine is shared
        out, start = [], time.perf_counter()
        for lo in range(0, len(q), 256):
            out.append(scoring.blocked_top_k(scoring.DotScores(q[lo:lo + 256], items), k, seen[lo:lo + 256])[1])
        runs.append(time.perf_counter() - start)
    rate = len(q) / min(runs)
    torch.mm(q[:256], items.T)
    t0 = time.perf_counter()
    for _ in range(3):
        torch.mm(q[:256], items.T)
    gflops = 3 * 2 * 256 * table.shape[0] * table.shape[1] / (time.perf_counter() - t0) / 1e9
    return torch.cat(out).numpy(), rate, gflops


def exact_now(table, queries, seen: list, k: int) -> float:
    """Exact blocked scoring's queries/s on one batch of 256, the faster of two passes."""
    from raykd.core import scoring

    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        scoring.blocked_top_k(scoring.DotScores(queries[:256], table), k, seen[:256])
        times.append(time.perf_counter() - t0)
    return 256 / min(times)


def build(method: str, table: np.ndarray, args: argparse.Namespace):
    """(search(queries, n, setting) -> candidate item indices [Q, n], settings to sweep, index bytes)."""
    import faiss

    x, dim = table[1:], table.shape[1]
    if method == "usearch-hnsw":
        from usearch.index import Index

        index = Index(ndim=dim, metric="ip", dtype="f32", connectivity=args.m, expansion_add=args.ef_construction)
        for lo in range(0, len(x), 200_000):  # a progress line per slice
            index.add(np.arange(lo + 1, lo + 1 + len(x[lo:lo + 200_000])), x[lo:lo + 200_000],
                      threads=args.build_threads)
            say(f"  {method}: {lo + len(x[lo:lo + 200_000]):,} items added")

        def search(q, n, ef):
            index.expansion_search = ef
            return index.search(q, n, threads=args.threads).keys.astype(np.int64)

        return search, (16, 32, 64, 128, 256), index.serialized_length
    if method == "faiss-hnsw-l2":
        norms = np.linalg.norm(x, axis=1)
        x = np.hstack([x, np.sqrt(np.maximum(norms.max() ** 2 - norms ** 2, 0))[:, None]]).astype(np.float32)
    if method.startswith("faiss-hnsw"):
        metric = faiss.METRIC_INNER_PRODUCT if method == "faiss-hnsw-ip" else faiss.METRIC_L2
        index = faiss.IndexHNSWFlat(x.shape[1], args.m, metric)
        index.hnsw.efConstruction = args.ef_construction
        settings = (16, 32, 64, 128, 256)
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = (faiss.IndexIVFFlat(quantizer, dim, args.nlist, faiss.METRIC_INNER_PRODUCT)
                 if method == "faiss-ivf-flat" else
                 faiss.IndexIVFPQ(quantizer, dim, args.nlist, dim // 2, 8, faiss.METRIC_INNER_PRODUCT))
        index.train(x[np.random.default_rng(1).choice(len(x), min(len(x), 64 * args.nlist), replace=False)])
        settings = (8, 16, 32, 64, 128, 256)
    for lo in range(0, len(x), 200_000):
        index.add(x[lo:lo + 200_000])
        say(f"  {method}: {lo + len(x[lo:lo + 200_000]):,} items added")

    def search(q, n, setting):
        if method.startswith("faiss-hnsw"):
            index.hnsw.efSearch = max(setting, n)
            q = np.hstack([q, np.zeros((len(q), 1), np.float32)]) if method == "faiss-hnsw-l2" else q
        else:
            index.nprobe = setting
        return index.search(np.ascontiguousarray(q), n)[1] + 1  # faiss ids are rows of x: item = id + 1

    return search, settings, faiss.serialize_index(index).nbytes


def cell(items: int, dim: int, args: argparse.Namespace) -> None:
    import faiss
    import torch

    from raykd.core import ann

    torch.set_num_threads(args.threads)
    table, queries = mixture(items, dim, args.queries, args.clusters)
    rng = np.random.default_rng(2)
    seen = [rng.integers(1, items + 1, SEEN) for _ in range(len(queries))]
    truth, exact_rate, gflops = exact(table, queries, seen, args.k)
    table_t, queries_t = torch.from_numpy(table), torch.from_numpy(queries)
    say(f"{items:,} items x d {dim}: sgemm {gflops:.1f} GFLOP/s; exact blocked {exact_rate:,.0f} queries/s "
        f"({args.threads} thread{'s' * (args.threads > 1)})")
    for method in args.methods:
        faiss.omp_set_num_threads(args.build_threads)
        t0 = time.perf_counter()
        search, settings, nbytes = build(method, table, args)
        built = time.perf_counter() - t0
        say(f"  {method}: built in {built:.1f} s, {nbytes / 2**20:,.0f} MiB "
            f"(the table itself {table.nbytes / 2**20:,.0f} MiB)")
        faiss.omp_set_num_threads(args.threads)
        n = (args.k + SEEN) * (args.pq_rerank if method == "faiss-ivf-pq" else 1)
        for setting in settings:
            search(queries[:32], n, setting)  # warm
            times = []
            for _ in range(args.repeats):  # the best of repeats: the machine is shared
                t0 = time.perf_counter()
                found = ann.rerank(table_t, queries_t, search(queries, n, setting), seen, args.k)[1].numpy()
                times.append(time.perf_counter() - t0)
            rate = len(queries) / min(times)
            r = ann.recall_at(found, truth)
            now = exact_now(table_t, queries_t, seen, args.k)  # the same moment's exact rate: the machine is shared
            print(f"| {items:,} | {dim} | {method} | {setting} | {built:.0f} | {nbytes / 2**20:,.0f} | "
                  f"{rate:,.0f} | {rate / now:.1f}x | {r:.4f} | {now:,.0f} | {gflops:.1f} |", flush=True)
            if r >= 0.999:
                break
        del search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[16, 64])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="searches per setting; the fastest is reported")
    p.add_argument("--threads", type=int, default=1, help="search threads (torch, faiss, usearch)")
    p.add_argument("--build-threads", type=int, default=2)
    p.add_argument("--m", type=int, default=16, help="HNSW links per node (usearch connectivity)")
    p.add_argument("--ef-construction", type=int, default=40, help="HNSW build beam (usearch expansion_add)")
    p.add_argument("--nlist", type=int, default=1024, help="IVF lists")
    p.add_argument("--pq-rerank", type=int, default=4, help="IVF-PQ asks for this many times k + seen candidates")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    print(f"k {args.k}, {args.queries} queries with {SEEN} seen items each, search threads {args.threads}, "
          f"build threads {args.build_threads}, HNSW M {args.m} efConstruction {args.ef_construction}, "
          f"IVF nlist {args.nlist}")
    print("| items | d | method | efSearch / nprobe | build s | index MiB | queries/s | x exact | recall@10 | "
          "exact q/s | sgemm GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for items in args.items:
        for dim in args.dims:
            cell(items, dim, args)


if __name__ == "__main__":
    main()
