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


def window_table(shard: Path, max_len: int, soft: Path | None = None) -> pa.Table:
    """Training windows of one sequence shard, with the aligned soft labels when given.

    Soft labels travel as bytes per window (K int32 indices, K float16 logits and, when stored, one
    float32 rest log-mass for each real slot, in slot order), so padding slots cost nothing. The
    bytes columns are built from the flat arrays' buffers (`window_arrays`), not window by window.
    """
    w = window_arrays(shard, max_len, soft)
    cols = {"input": _fixed(w["input"]), "target": _fixed(w["target"])}
    per_window = (w["target"] > 0).sum(1)
    for name in SOFT_COLUMNS:
        if name in w:
            cols[name] = _packed(w[name], per_window)
    return pa.table(cols)


SOFT_COLUMNS = ("t_idx", "t_logits", "t_rest")


def window_arrays(shard: Path, max_len: int, soft: Path | None = None) -> dict[str, np.ndarray]:
    """Training windows of one shard as NumPy arrays: input/target [W, max_len] int32 and, with
    soft labels, t_idx [R, K] int32, t_logits [R, K] float16 (and t_rest [R] float32) for the R
    real slots in row-major slot order (the order of `hidden[target > 0]`)."""
    w = windows(pq.read_table(shard, columns=["train"])["train"].combine_chunks(), max_len)
    out = {"input": w["input"], "target": w["target"]}
    if soft is None:
        return out
    labels = pq.read_table(soft)
    k = labels.schema.field("idx").type.list_size
    real = w["pos"][w["pos"] >= 0]  # row-major: window by window, slot by slot
    if labels.num_rows != len(real):
        raise RaykdError(f"soft labels {soft} have {labels.num_rows} rows but {shard} has "
                         f"{len(real)} training positions: regenerate them")
    idx = labels["idx"].combine_chunks().values.to_numpy().reshape(-1, k)
    logit = labels["logits"].combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, k)
    out["t_idx"] = idx[real].astype(np.int32)
    out["t_logits"] = logit[real].astype(np.float16)
    if "rest" in labels.column_names:  # the teacher's log-mass outside its top-K (whole-catalogue KL)
        out["t_rest"] = labels["rest"].to_numpy().astype(np.float32)[real]
    return out


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
