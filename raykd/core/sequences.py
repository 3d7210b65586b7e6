"""Reading prepared sequences and cutting them into training windows (shared by later stages).

A user's training sequence `train` (all but the last two items) has training positions t = 1..n-1:
the item train[t] is predicted from train[:t]. Windows cut these positions from the end into
chunks of `max_len`, right-aligned (so inputs are left-padded with 0), so every training position
is the target of exactly one window slot. Positions are numbered in (user, t) order within a
shard; soft labels are stored in that same order, which is what keeps them aligned.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.core.errors import RaykdError


def shard_paths(data_dir: str | Path) -> list[Path]:
    paths = sorted((Path(data_dir) / "sequences").glob("part-*.parquet"))
    if not paths:
        raise RaykdError(f"no prepared sequences in {data_dir}: run `raykd prepare CONFIG` first")
    return paths


def training_shards(data_dir: str | Path, soft_dir: str | Path | None = None) -> list[tuple[Path, Path | None]]:
    """Each sequence shard with its soft-label shard (the same file name under `soft_dir`, when given)."""
    shards = shard_paths(data_dir)
    if soft_dir is None:
        return [(p, None) for p in shards]
    soft = [Path(soft_dir) / p.name for p in shards]
    missing = [str(s) for s in soft if not s.exists()]
    if missing:
        raise RaykdError(f"soft labels missing: {', '.join(missing)}; run `raykd soft-labels CONFIG`")
    return list(zip(shards, soft))


def num_items(data_dir: str | Path) -> int:
    return json.loads((Path(data_dir) / "stats.json").read_text())["items"]


def num_users(data_dir: str | Path) -> int:
    """Prepared users, from the shards' Parquet metadata (nothing read)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in shard_paths(data_dir))


def read_split(data_dir: str | Path, users: np.ndarray | None = None) -> dict[str, list | np.ndarray]:
    """Train lists, valid and test items, one row per user in user order: every user, or only the
    rows `users` (sorted user indices), read a shard at a time so only those rows are kept."""
    if users is None:
        table = pa.concat_tables(pq.read_table(p) for p in shard_paths(data_dir))
    else:
        parts, start = [], 0
        for path in shard_paths(data_dir):
            n = pq.ParquetFile(path).metadata.num_rows
            rows = users[(users >= start) & (users < start + n)] - start
            if len(rows):
                parts.append(pq.read_table(path).take(pa.array(rows)))
            start += n
        table = pa.concat_tables(parts) if parts else pq.read_table(shard_paths(data_dir)[0]).slice(0, 0)
    train = table["train"].combine_chunks()
    offsets = train.offsets.to_numpy()
    values = train.values.to_numpy()
    return {
        "user": table["user"].to_numpy(),
        "train": [values[a:b] for a, b in itertools.pairwise(offsets)],
        "valid": table["valid"].to_numpy(),
        "test": table["test"].to_numpy(),
    }


def eval_inputs(split: dict, which: str, users: np.ndarray | None = None) -> tuple[list, np.ndarray, list]:
    """(histories, targets, seen) for validation (history = train) or test (train + valid)."""
    rows = np.arange(len(split["user"])) if users is None else users
    if which == "valid":
        hist = [split["train"][r] for r in rows]
        return hist, split["valid"][rows], hist
    if which == "test":
        hist = [np.append(split["train"][r], split["valid"][r]) for r in rows]
        return hist, split["test"][rows], hist
    raise ValueError(f"which must be 'valid' or 'test', got {which!r}")


def windows(train: pa.ListArray, max_len: int) -> dict[str, np.ndarray]:
    """Cut training sequences into right-aligned windows, vectorised.

    Returns input/target [W, max_len] int32 (0 = padding) and pos [W, max_len] int64, the
    shard-local position index of each target slot (-1 for padding), numbered in (user, t) order.
    """
    offsets = train.offsets.to_numpy().astype(np.int64)
    values = train.values.to_numpy()
    n = np.diff(offsets)  # train length per user
    targets = np.maximum(n - 1, 0)  # training positions per user
    per_user = -(-targets // max_len)  # windows per user
    first_window = np.concatenate([[0], np.cumsum(per_user)])
    total_pos = int(targets.sum())
    owner = np.repeat(np.arange(len(n)), targets)
    pos = np.arange(total_pos, dtype=np.int64)
    t = pos - np.concatenate([[0], np.cumsum(targets)])[owner] + 1  # 1..n-1 within the user
    back = n[owner] - 1 - t  # distance from the user's last training position
    win = first_window[owner] + back // max_len
    slot = max_len - 1 - back % max_len
    count = int(first_window[-1])
    inp = np.zeros((count, max_len), np.int32)
    tgt = np.zeros((count, max_len), np.int32)
    where = np.full((count, max_len), -1, np.int64)
    src = offsets[owner] + t
    inp[win, slot] = values[src - 1]
    tgt[win, slot] = values[src]
    where[win, slot] = pos
    return {"input": inp, "target": tgt, "pos": where, "user": owner, "t": t}


def count_windows(data_dir: str | Path, max_len: int) -> int:
    """Training windows of a prepared run (an epoch's size), reading one shard's train lists at a time."""
    total = 0
    for path in shard_paths(data_dir):
        lengths = np.diff(pq.read_table(path, columns=["train"])["train"].combine_chunks().offsets.to_numpy())
        total += int((-(-np.maximum(lengths - 1, 0) // max_len)).sum())
    return total


CHUNK_USERS = 1024  # users cut into windows at a time when streaming (a chunk's soft labels: ~10-20 MB at K=100)
SOFT_COLUMNS = ("t_idx", "t_logits", "t_rest")


def window_chunks(shard: Path, max_len: int, soft: Path | None = None,
                  users: int | None = CHUNK_USERS) -> Iterator[dict[str, np.ndarray]]:
    """Training windows of one shard, `users` users at a time (None: the whole shard at once), in
    user order. Each chunk is a window dict: input/target [W, max_len] int32 and, with soft labels,
    t_idx [R, K] int32, t_logits [R, K] float16 (and t_rest [R] float32) for its R real slots in
    row-major slot order (the order of `hidden[target > 0]`) and t_start [W + 1], where each
    window's rows begin. The soft-label file is read alongside, a record batch at a time, so a
    chunk holds only its own users' labels."""
    train = pq.read_table(shard, columns=["train"])["train"].combine_chunks()
    step = users or max(len(train), 1)
    labels = None if soft is None else _SoftRows(soft, shard, int(np.maximum(np.diff(train.offsets.to_numpy()) - 1,
                                                                                      0).sum()))
    for start in range(0, len(train), step):
        w = windows(train.slice(start, step), max_len)  # positions numbered from 0 within the chunk
        out = {"input": w["input"], "target": w["target"]}
        if labels is not None:
            real = w["pos"][w["pos"] >= 0]  # row-major: window by window, slot by slot
            out.update(labels.take(real))
            out["t_start"] = np.concatenate([[0], np.cumsum((w["target"] > 0).sum(1), dtype=np.int64)])
        yield out


class _SoftRows:
    """A soft-label shard read in position order, the next n rows at a time (one record batch ahead)."""

    def __init__(self, path: Path, shard: Path, positions: int):
        file = pq.ParquetFile(path)
        if file.metadata.num_rows != positions:
            raise RaykdError(f"soft labels {path} have {file.metadata.num_rows} rows but {shard} has "
                             f"{positions} training positions: regenerate them")
        self.k = file.schema_arrow.field("idx").type.list_size
        columns = [c for c in ("idx", "logits", "rest") if c in file.schema_arrow.names]
        self.batches = file.iter_batches(batch_size=8192, columns=columns)
        self.pending: list[pa.RecordBatch] = []

    def take(self, real: np.ndarray) -> dict[str, np.ndarray]:
        """The next len(real) rows (a chunk's positions 0..n-1), in the order `real` lists them."""
        n = len(real)
        while sum(b.num_rows for b in self.pending) < n:
            self.pending.append(next(self.batches))  # the row count was checked: never exhausted early
        rows = pa.Table.from_batches(self.pending)
        self.pending = rows.slice(n).to_batches()
        rows = rows.slice(0, n)
        idx = rows["idx"].combine_chunks().flatten().to_numpy().reshape(-1, self.k)
        logit = rows["logits"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, self.k)
        out = {"t_idx": idx[real].astype(np.int32), "t_logits": logit[real].astype(np.float16)}
        if "rest" in rows.column_names:  # the teacher's log-mass outside its top-K (whole-catalogue KL)
            out["t_rest"] = rows["rest"].to_numpy().astype(np.float32)[real]
        return out


def window_arrays(shard: Path, max_len: int, soft: Path | None = None) -> dict[str, np.ndarray]:
    """All training windows of one shard as one window dict (window_chunks with a single chunk)."""
    return next(window_chunks(shard, max_len, soft, users=None))


def concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Window dicts joined in order (t_start, where each window's soft-label rows begin, renumbered)."""
    if len(parts) == 1:
        return parts[0]
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "t_start"}
    if "t_start" in parts[0]:
        out["t_start"] = np.concatenate([[0], np.cumsum(np.concatenate([np.diff(p["t_start"]) for p in parts]))])
    return out


def take(cols: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The windows `rows` of a window dict, their soft-label rows gathered in one vectorised step."""
    batch = {"input": cols["input"][rows], "target": cols["target"][rows]}
    if "t_start" in cols:
        first, count = cols["t_start"][rows], np.diff(cols["t_start"])[rows]
        slots = np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum())
        batch.update({k: cols[k][slots] for k in SOFT_COLUMNS if k in cols})
        batch["t_start"] = np.concatenate([[0], np.cumsum(count)])
    return batch


def window_table(shard: Path, max_len: int, soft: Path | None = None) -> pa.Table:
    """Training windows of one sequence shard as a table (packed_table of window_arrays)."""
    return packed_table(window_arrays(shard, max_len, soft))


def packed_table(w: dict[str, np.ndarray]) -> pa.Table:
    """A window dict as the table Ray Data streams: soft labels as bytes per window (K int32
    indices, K float16 logits and, when stored, one float32 rest log-mass for each real slot, in
    slot order), so padding slots cost nothing; built from the flat arrays' buffers, not window by
    window."""
    cols = {"input": _fixed(w["input"]), "target": _fixed(w["target"])}
    per_window = (w["target"] > 0).sum(1)
    for name in SOFT_COLUMNS:
        if name in w:
            cols[name] = _packed(w[name], per_window)
    return pa.table(cols)


def _packed(values: np.ndarray, per_window: np.ndarray) -> pa.Array:
    """One bytes value per window: its `per_window[w]` rows of `values`, back to back (zero-copy)."""
    row_bytes = values.dtype.itemsize * int(np.prod(values.shape[1:], dtype=np.int64))
    offsets = np.concatenate([[0], np.cumsum(per_window, dtype=np.int64)]) * row_bytes
    large = offsets[-1] >= 2**31 - 1
    offsets = offsets.astype(np.int64 if large else np.int32)
    data = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.large_binary() if large else pa.binary(), len(per_window),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _fixed(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.ravel()), a.shape[1])
