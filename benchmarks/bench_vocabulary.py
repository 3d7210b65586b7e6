"""A server's item vocabulary: flat arrays (raykd.core.id_index) vs the list + dict they replaced (issue 24).

    python benchmarks/bench_vocabulary.py                   # 1M items, integer and text ids; ~30 s
    python benchmarks/bench_vocabulary.py --items 100000

For each id kind, in this process, one after the other:
    dict   what `Recommender` held until 2026-12-04: `[None, *raw_ids]` and `{raw id: index}`; memory is
           what tracemalloc counts for building them (Python objects), seconds to build
    flat   `id_index.build(raw ids)`: the arrays' bytes (the Arrow column of raw ids is kept by both)
Then the median microseconds to look up one request's history of 50 known ids: `IdIndex.rows_of` (what
`Recommender.parse` calls) vs 50 `dict.get`, over 400 histories.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from raykd.core import id_index


def lookup_us(find, histories) -> float:
    times = []
    for history in histories:
        t = time.perf_counter()
        find(history)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    ids = rng.permutation(10 * args.items)[:args.items].astype(np.int64)
    print(f"{args.items:,} items | {'dict MiB':>8} {'build s':>7} {'50 ids us':>9} | {'flat MiB':>8} {'build s':>7} "
          f"{'50 ids us':>9} | memory dict / flat")
    for kind, column in (("integer", pa.array(ids)), ("text", pa.array([f"item-{i:09d}" for i in ids]))):
        tracemalloc.start()
        t = time.perf_counter()
        raw_items = [None, *column.to_pylist()]
        index = {raw: i for i, raw in enumerate(raw_items) if i}
        dict_s, (dict_bytes, _) = time.perf_counter() - t, tracemalloc.get_traced_memory()
        tracemalloc.stop()
        t = time.perf_counter()
        flat = id_index.build(column)
        flat_s = time.perf_counter() - t
        histories = [[raw_items[i] for i in rng.integers(1, args.items + 1, 50)] for _ in range(400)]
        assert all((flat.rows_of(h) + 1).tolist() == [index[k] for k in h] for h in histories)
        by_dict = lookup_us(lambda h, get=index.get: [get(k) for k in h], histories)
        print(f"{kind:>13} | {dict_bytes / 2**20:>8.0f} {dict_s:>7.2f} {by_dict:>9.1f} | "
              f"{flat.nbytes() / 2**20:>8.0f} {flat_s:>7.2f} {lookup_us(flat.rows_of, histories):>9.1f} | "
              f"{dict_bytes / flat.nbytes():.1f}x", flush=True)
        del raw_items, index


if __name__ == "__main__":
    main()
