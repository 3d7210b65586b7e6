"""Users' known histories as flat NumPy arrays: memory that does not grow with Python objects.

A dict of every user (raw id -> array) costs about 200 bytes of Python objects per user before a
single item is stored, and minutes to build at 10M users. Here a whole population is a few arrays:

    ids      the users' raw ids, indexed for lookup (raykd.core.id_index: sorted keys, their rows)
    offsets  [n + 1] int64 and values [N] int32: row r's training items are values[offsets[r]:offsets[r + 1]]
    last     [n, 2] int32: row r's validation and test items (its known history ends with them)

`Histories.get(key)` answers a (looked-up, raykd.core.ids rule 3) raw id with the user's whole known
history (train + valid + test, oldest first, int64) or None. The arrays pickle as plain buffers, so
`ray.put` stores them once and every reader maps them zero-copy (raykd.serve.app shares them
among replicas). Pure NumPy/Arrow: no Ray, no config.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd.core import id_index, rundir


def full_history(train: np.ndarray, valid: int, test: int) -> np.ndarray:
    """A prepared user's whole known history (train + valid + test) as item indices, oldest first."""
    return np.concatenate([train, [valid, test]]).astype(np.int64)


@dataclass(frozen=True)
class Histories:
    """Every prepared user's known history, in flat arrays (see the module docstring)."""

    ids: id_index.IdIndex
    offsets: np.ndarray
    values: np.ndarray
    last: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, key: int | str | None) -> int | None:
        """The prepared row of a raw id (of the vocabulary's own kind), or None for an unknown one."""
        return self.ids.row(key)

    def history(self, row: int) -> np.ndarray:
        """Row `row`'s whole known history (train + valid + test) as int64 item indices, oldest first."""
        return full_history(self.values[self.offsets[row]:self.offsets[row + 1]], *self.last[row])

    def get(self, key: int | str | None) -> np.ndarray | None:
        """The whole known history of a raw id, or None when it is not a prepared user."""
        row = self.row(key)
        return None if row is None else self.history(row)

    def __contains__(self, key: object) -> bool:
        return key in self.ids

    def __iter__(self) -> Iterator[int | str]:
        """The raw ids in prepared order (for tests and small tools: one Python object per user)."""
        return iter(self.ids)

    def nbytes(self) -> int:
        return self.ids.nbytes() + sum(a.nbytes for a in (self.offsets, self.values, self.last))


def build(raw_ids: pa.Array | pa.ChunkedArray, train: pa.Array | pa.ChunkedArray, last: np.ndarray) -> Histories:
    """Histories of rows in order: their raw ids (integers or text), train lists and [n, 2] valid/test items."""
    ids = id_index.build(raw_ids)
    train = train.combine_chunks() if isinstance(train, pa.ChunkedArray) else train
    offsets = train.offsets.to_numpy().astype(np.int64)
    values = train.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int32, copy=False)
    offsets -= offsets[0]
    last = np.ascontiguousarray(last, dtype=np.int32).reshape(len(ids), 2)
    return Histories(ids, offsets, values, last)


def read(data_dir: str | Path) -> Histories | None:
    """The histories of a prepared data folder (users.parquet + sequences/), a shard at a time; None without them.

    Only users with a sequence row are known (as the prepared split has them), each under its raw id.
    """
    data_dir = Path(data_dir)
    shards = sorted((data_dir / "sequences").glob("part-*.parquet"))
    if not (data_dir / rundir.USERS).exists() or not shards:
        return None
    raw_users = pq.read_table(data_dir / rundir.USERS, columns=["raw_id"])["raw_id"].combine_chunks()
    users, trains, lasts = [], [], []
    for shard in shards:
        table = pq.read_table(shard, columns=["user", "train", "valid", "test"])
        users.append(table["user"].to_numpy())
        trains.append(table["train"].combine_chunks())
        lasts.append(np.stack([table["valid"].to_numpy(), table["test"].to_numpy()], 1))
    train = pa.concat_arrays([t.cast(pa.large_list(t.type.value_type)) for t in trains])
    return build(raw_users.take(pa.array(np.concatenate(users))), train, np.concatenate(lasts))
