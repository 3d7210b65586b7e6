"""Bring your own teacher: import external teacher scores as raykd soft labels.

`distill.teacher_scores: PATH` points at a Parquet file (or folder of files) in one of two forms:

    per position:  user_id, position, items, scores
    per user:      user_id, items, scores

user_id and the entries of `items` are raw ids as in your log; `items` (list of K ids) and
`scores` (list of K numbers, any order: they are sorted here) hold the teacher's top-K for a
position. `position` t (1-based) is the t-th training target of the user: the teacher's scores for
the next item after the user's first t items, in the time order raykd prepared (train excludes
the last two items: validation and test). A per-user row applies to every training position of that
user. Every training position must get scores, from exactly one row: a repeated user_id (per-user
form) or (user_id, position) pair is an error, never resolved silently. Ids match the prepared
vocabularies as text, with surrounding whitespace stripped (raykd.core.ids). Violations raise one error
with the counts.

Writes `<run>/soft_labels/` exactly as the soft_labels stage does, so distill does not care where
the scores came from: float16 logits, best first, each row shifted so that its best score is 0
(`as_logits`: any score range keeps its softmax; only the loss `kl_full` needs absolute logits, and
it needs a rest log-mass that external scores lack anyway).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.core import ids, rundir, sequences
from raykd.core.errors import RaykdError
from raykd.data import readers


def fingerprint(path: Path) -> str:
    """The scores file (or every Parquet file of the folder) by resolved path and content: replaced
    scores, or another file of the same name elsewhere, are imported again (readers.fingerprint_files)."""
    if not path.exists():
        raise RaykdError(f"distill.teacher_scores {path} does not exist")
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    return "external-" + readers.fingerprint_files(files)[:16]


def load(path: Path, data_dir: Path) -> tuple[dict[str, dict], int]:
    """Validated scores as {shard path: {"pos", "idx", "logits"}} like soft_labels.score_all, and K."""
    if not path.exists():
        raise RaykdError(f"distill.teacher_scores {path} does not exist")
    table = pq.read_table(path)
    cols = set(table.column_names)
    missing = [c for c in ("user_id", "items", "scores") if c not in cols]
    if missing:
        raise RaykdError(f"{path}: column(s) {missing} missing; found {sorted(cols)}. Expected user_id, "
                         "[position,] items (list of raw item ids), scores (list of numbers)")
    for c in ("items", "scores"):
        if not pa.types.is_list(table.schema.field(c).type) and not pa.types.is_large_list(table.schema.field(c).type):
            raise RaykdError(f"{path}: column {c!r} must be a list per row, got {table.schema.field(c).type}")
    if not (pa.types.is_integer(v := table.schema.field("scores").type.value_type) or pa.types.is_floating(v)):
        raise RaykdError(f"{path}: 'scores' must hold numbers, got lists of {v}")
    item_len = table["items"].combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    score_len = table["scores"].combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    k = int(np.bincount(item_len).argmax()) if len(item_len) else 0
    bad_k = int(((item_len != score_len) | (item_len != k)).sum())
    if bad_k or k == 0:
        raise RaykdError(f"{path}: {bad_k:,} of {table.num_rows:,} rows do not have K={k} items and K scores "
                         "(every row needs the same number of items and scores)")
    vocab = _vocab(data_dir / rundir.ITEMS)
    raw_items = table["items"].combine_chunks().values.to_pylist()
    idx = np.array([vocab.get(ids.text_key(r), 0) for r in raw_items], dtype=np.int64).reshape(-1, k)
    if (idx == 0).any():
        unknown = sorted({str(r) for r, i in zip(raw_items, idx.ravel()) if i == 0})
        raise RaykdError(f"{path}: {int((idx == 0).sum()):,} item ids ({len(unknown):,} distinct, e.g. "
                         f"{unknown[:5]}) are not in the prepared catalogue (unknown or removed by the k-core "
                         "filter); drop them from the teacher's lists")
    scores = np.asarray(table["scores"].combine_chunks().values.to_numpy(zero_copy_only=False),
                        dtype=np.float64).reshape(-1, k)
    if not np.isfinite(scores).all():
        raise RaykdError(f"{path}: {int((~np.isfinite(scores)).sum()):,} scores are NaN or infinite")
    order = np.argsort(-scores, axis=1, kind="stable")  # best first, like raykd's own soft labels
    idx, scores = np.take_along_axis(idx, order, 1), as_logits(np.take_along_axis(scores, order, 1))
    users = _vocab(data_dir / rundir.USERS)
    row_user = np.array([users.get(ids.text_key(u), -1) for u in table["user_id"].to_pylist()], dtype=np.int64)
    if (row_user < 0).any():
        raise RaykdError(f"{path}: {int((row_user < 0).sum()):,} rows have a user_id that is not in the prepared "
                         "data (unknown, or removed by the k-core filter)")
    positions = table["position"].to_numpy(zero_copy_only=False) if "position" in cols else None
    _raise_on_duplicates(row_user, positions, table["user_id"].to_pylist(), path)
    return _align(row_user, positions, idx, scores, data_dir, path), k


def as_logits(scores: np.ndarray) -> np.ndarray:
    """Best-first float64 scores [N, K] as the float16 logits soft labels store, keeping each row's softmax.

    float16 ends at 65,504 and steps by 0.5 near 1,000: cast as given, 70000 became inf (dropped from
    the KD target) and 1000.3, 1000.4 both 1000.5. Each row is shifted by its max first, so the
    values that weigh in a softmax sit near 0, where float16 is finest; scores more than 65,504 below
    the max (weight exp(-65504) = 0) are clamped there, finite. A per-row shift changes neither
    softmax(t / T) (kd `kl`) nor the order (kd `rank`); `kl_full`, whose rest bin lives on the logits'
    own scale, is not offered with external scores (config), which carry no rest.
    """
    low = float(np.finfo(np.float16).min)
    return np.maximum(scores - scores[:, :1], low).astype(np.float16)


def _raise_on_duplicates(row_user: np.ndarray, positions: np.ndarray | None, raw_users: list, path: Path) -> None:
    """One row per user (per-user form) or per (user, position): repeats are an error with counts."""
    if positions is not None and (no_pos := np.isnan(positions.astype(np.float64))).any():
        raise RaykdError(f"{path}: {int(no_pos.sum()):,} rows have no position; give every row its 1-based position")
    keys = row_user if positions is None else row_user * (1 << 32) + positions.astype(np.int64)
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    if (counts > 1).any():
        what = "user_id" if positions is None else "(user_id, position) pair"
        example = first[np.flatnonzero(counts > 1)[0]]
        at = "" if positions is None else f" position {int(positions[example])}"
        raise RaykdError(
            f"{path}: {int((counts - 1).sum()):,} rows repeat a {what} given by an earlier row ({int((counts > 1).sum()):,} "
            f"distinct {what}s appear more than once, e.g. user_id {raw_users[example]!r}{at}); the scores to use "
            "would be a guess: keep exactly one row each")


def _align(row_user, positions, idx, scores, data_dir: Path, path: Path) -> dict[str, dict]:
    """Put each training position's scores in raykd's (user, t) position order, shard by shard."""
    out = {}
    for shard in sequences.shard_paths(data_dir):
        t = pq.read_table(shard, columns=["user", "train"])
        users = t["user"].to_numpy()
        per_user = np.maximum(t["train"].combine_chunks().value_lengths().to_numpy() - 1, 0)
        owner = np.repeat(users, per_user)
        pos_t = np.arange(len(owner)) - np.repeat(np.cumsum(per_user) - per_user, per_user) + 1
        if positions is None:
            first = {}
            for row, u in enumerate(row_user):
                first[int(u)] = row  # one row per user (_raise_on_duplicates)
            rows = np.array([first.get(int(u), -1) for u in owner])
        else:
            lookup = {(int(u), int(p)): row for row, (u, p) in enumerate(zip(row_user, positions))}
            rows = np.array([lookup.get((int(u), int(p)), -1) for u, p in zip(owner, pos_t)])
        if (rows < 0).any():
            raise RaykdError(f"{path}: {int((rows < 0).sum()):,} of {len(rows):,} training positions in {shard.name} "
                             "have no teacher scores (every training position needs them; positions count the "
                             "user's training targets from 1)")
        out[str(shard)] = {"pos": np.arange(len(rows)), "idx": idx[rows].astype(np.int32),
                           "logits": scores[rows]}
    return out


def _vocab(path: Path) -> dict[str, int]:
    table = pq.read_table(path)
    return {str(r): int(i) for r, i in zip(table["raw_id"].to_pylist(), table["index"].to_pylist())}
