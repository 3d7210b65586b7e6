"""Seeded synthetic interaction logs with structure a sequence model can learn.

Each user belongs to a taste cluster; each item has a few successor items (Markov structure). A
user's next item follows a successor of the last item with probability `markov`, else it is drawn
from the user's cluster, whose item weights are Zipf popularity boosted on the cluster's own items.
So popularity is a real but weak baseline, and order matters: a sequential model can beat it.

Users are generated in fixed-size chunks, each seeded by (seed, chunk): the log is identical
whether it is written by one process (`raykd synth`) or generated in parallel by Ray Data tasks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.config import SyntheticConfig

CHUNK_USERS = 20_000  # users per generation chunk: the unit of parallelism and of seeding
NUM_SUCCESSORS = 3  # successor items per item
CLUSTER_BOOST = 20.0  # how much more a cluster likes its own items than others


def chunks(cfg: SyntheticConfig) -> list[tuple[int, int]]:
    """(first_user, num_users) for every chunk, in order."""
    return [(u, min(CHUNK_USERS, cfg.users - u)) for u in range(0, cfg.users, CHUNK_USERS)]


def _catalogue(cfg: SyntheticConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster item CDFs [C, M] and successors [M, S]; depends on the seed only."""
    rng = np.random.default_rng([cfg.seed, 7919])
    m = cfg.items
    popularity = 1.0 / np.arange(1, m + 1) ** cfg.popularity_skew
    popularity = popularity[rng.permutation(m)]  # popular items are not the low ids
    home = rng.integers(0, cfg.clusters, size=m)  # each item's home cluster
    weights = np.tile(popularity, (cfg.clusters, 1))
    weights[home, np.arange(m)] *= CLUSTER_BOOST
    cdf = np.cumsum(weights, axis=1)
    cdf /= cdf[:, -1:]
    successors = rng.integers(0, m, size=(m, NUM_SUCCESSORS))
    return cdf, successors


def generate_chunk(cfg: SyntheticConfig, first_user: int, num_users: int) -> pa.Table:
    """Interactions of users [first_user, first_user + num_users): user_id, item_id, timestamp."""
    cdf, successors = _catalogue(cfg)
    rng = np.random.default_rng([cfg.seed, first_user])
    lengths = 3 + rng.geometric(1.0 / max(cfg.mean_length - 2, 1.0), size=num_users)
    cluster = rng.integers(0, cfg.clusters, size=num_users)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    total = int(offsets[-1])
    user_of_row = np.repeat(np.arange(num_users), lengths)

    # Cluster draws for every row at once, by inverse CDF on the row's cluster.
    flat_cdf = (cdf + np.arange(cfg.clusters)[:, None]).ravel()
    draws = rng.random(total) + cluster[user_of_row]
    from_cluster = np.minimum(np.searchsorted(flat_cdf, draws) % cfg.items, cfg.items - 1)
    follow = rng.random(total) < cfg.markov
    pick = rng.integers(0, NUM_SUCCESSORS, size=total)

    # The Markov walk is sequential per user but vectorised across users: one step per position.
    items = from_cluster.copy()
    for step in range(1, int(lengths.max())):
        rows = offsets[:-1][lengths > step] + step
        take = follow[rows]
        rows = rows[take]
        items[rows] = successors[items[rows - 1], pick[rows]]

    start = rng.integers(1_000_000_000, 1_100_000_000, size=num_users)
    gaps = rng.integers(1, 3600, size=total)
    # cumulative gaps within each user's rows
    csum = np.cumsum(gaps)
    timestamp = start[user_of_row] + csum - (csum[offsets[:-1]] - gaps[offsets[:-1]])[user_of_row]
    return pa.table(
        {
            "user_id": (first_user + user_of_row + 1).astype(np.int64),
            "item_id": (items + 1).astype(np.int64),
            "timestamp": timestamp.astype(np.int64),
        }
    )


def write(cfg: SyntheticConfig, out: str | Path) -> dict:
    """Write the whole synthetic log as one Parquet file (one row group per chunk)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = 0
    writer = None
    try:
        for first, n in chunks(cfg):
            table = generate_chunk(cfg, first, n)
            if writer is None:
                writer = pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
            rows += table.num_rows
            print(f"synth: {first + n:,}/{cfg.users:,} users, {rows:,} interactions", flush=True)
    finally:
        if writer is not None:
            writer.close()
    return {"path": str(out), "users": cfg.users, "items": cfg.items, "interactions": rows}
