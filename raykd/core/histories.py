"""Users' known histories as flat NumPy arrays: memory that does not grow with Python objects.

A dict of every user (raw id -> array) costs about 200 bytes of Python objects per user before a
single item is stored, and minutes to build at 10M users. Here a whole population is six arrays:

    keys     [n] sorted lookup keys: the raw ids themselves (an integer vocabulary) or a 64-bit
             FNV-1a hash of their UTF-8 bytes (a text vocabulary), searched with np.searchsorted
    rows     [n] int64, the row (prepared order) of each sorted key
    offsets  [n + 1] int64 and values [N] int32: row r's training items are values[offsets[r]:offsets[r + 1]]
    last     [n, 2] int32: row r's validation and test items (its known history ends with them)
    text     text ids only: id_offsets [n + 1] int64 and id_bytes [B] uint8, each row's raw id, which a
             hash match is checked against (so a hash collision can never answer for the wrong user)

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

from raykd.core import rundir

FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3  # 64-bit FNV-1a
_MASK = (1 << 64) - 1


def full_history(train: np.ndarray, valid: int, test: int) -> np.ndarray:
    """A prepared user's whole known history (train + valid + test) as item indices, oldest first."""
    return np.concatenate([train, [valid, test]]).astype(np.int64)


def fnv1a(data: bytes) -> int:
    """The 64-bit FNV-1a hash of `data` (one id; `hash_many` is the same hash for a column)."""
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & _MASK
    return h


def hash_many(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """FNV-1a of every id of a flat UTF-8 column (offsets [n + 1], bytes), vectorised by byte position.

    Ids are visited longest first, so at position j the ids still going are a prefix: one pass per
    byte of the longest id, each over the ids at least that long.
    """
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    starts, by_length = offsets[:-1][order], lengths[order]
    h = np.full(len(order), FNV_OFFSET, dtype=np.uint64)
    prime = np.uint64(FNV_PRIME)
    with np.errstate(over="ignore"):  # multiplication modulo 2**64 is the hash
        for j in range(int(lengths.max(initial=0))):
            live = int(np.searchsorted(-by_length, -j, side="left"))  # ids longer than j
            h[:live] = (h[:live] ^ data[starts[:live] + j].astype(np.uint64)) * prime
    out = np.empty_like(h)
    out[order] = h
    return out


@dataclass(frozen=True)
class Histories:
    """Every prepared user's known history, in flat arrays (see the module docstring)."""

    keys: np.ndarray
    rows: np.ndarray
    offsets: np.ndarray
    values: np.ndarray
    last: np.ndarray
    id_offsets: np.ndarray | None = None  # text ids only
    id_bytes: np.ndarray | None = None

    @property
    def text_ids(self) -> bool:
        return self.id_bytes is not None

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, key: int | str | None) -> int | None:
        """The prepared row of a raw id (of the vocabulary's own kind), or None for an unknown one."""
        if key is None or isinstance(key, str) != self.text_ids or isinstance(key, bool):
            return None
        if not self.text_ids:
            if not -(2**63) <= key < 2**63:
                return None
            pos = int(np.searchsorted(self.keys, np.int64(key)))
            return int(self.rows[pos]) if pos < len(self.keys) and self.keys[pos] == key else None
        raw = key.encode("utf-8")
        h = np.uint64(fnv1a(raw))
        lo, hi = np.searchsorted(self.keys, h, "left"), np.searchsorted(self.keys, h, "right")
        for r in self.rows[lo:hi]:  # almost always one; more only on a hash collision
            if self.id_bytes[self.id_offsets[r]:self.id_offsets[r + 1]].tobytes() == raw:
                return int(r)
        return None

    def history(self, row: int) -> np.ndarray:
        """Row `row`'s whole known history (train + valid + test) as int64 item indices, oldest first."""
        return full_history(self.values[self.offsets[row]:self.offsets[row + 1]], *self.last[row])

    def get(self, key: int | str | None) -> np.ndarray | None:
        """The whole known history of a raw id, or None when it is not a prepared user."""
        row = self.row(key)
        return None if row is None else self.history(row)

    def __contains__(self, key: object) -> bool:
        return self.row(key) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int | str]:
        """The raw ids in prepared order (for tests and small tools: one Python object per user)."""
        order = np.argsort(self.rows, kind="stable")
        if not self.text_ids:
            yield from self.keys[order].tolist()
            return
        for r in self.rows[order].tolist():
            yield self.id_bytes[self.id_offsets[r]:self.id_offsets[r + 1]].tobytes().decode("utf-8")

    def nbytes(self) -> int:
        arrays = (self.keys, self.rows, self.offsets, self.values, self.last, self.id_offsets, self.id_bytes)
        return sum(a.nbytes for a in arrays if a is not None)


def build(raw_ids: pa.Array | pa.ChunkedArray, train: pa.Array | pa.ChunkedArray, last: np.ndarray) -> Histories:
    """Histories of rows in order: their raw ids (integers or text), train lists and [n, 2] valid/test items."""
    raw_ids = raw_ids.combine_chunks() if isinstance(raw_ids, pa.ChunkedArray) else raw_ids
    train = train.combine_chunks() if isinstance(train, pa.ChunkedArray) else train
    if raw_ids.null_count:
        raise ValueError("raw ids must not be null")
    offsets = train.offsets.to_numpy().astype(np.int64)
    values = train.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int32, copy=False)
    offsets -= offsets[0]
    last = np.ascontiguousarray(last, dtype=np.int32).reshape(len(raw_ids), 2)
    if pa.types.is_integer(raw_ids.type):
        ids = raw_ids.to_numpy().astype(np.int64, copy=False)
        order = np.argsort(ids, kind="stable")
        return Histories(ids[order], order.astype(np.int64), offsets, values, last)
    text = raw_ids.cast(pa.large_string())
    id_offsets = np.frombuffer(text.buffers()[1], np.int64)[text.offset:text.offset + len(text) + 1].copy()
    data = text.buffers()[2]
    id_bytes = np.frombuffer(data, np.uint8).copy() if data is not None else np.zeros(0, np.uint8)
    hashes = hash_many(id_offsets, id_bytes)
    order = np.argsort(hashes, kind="stable")
    return Histories(hashes[order], order.astype(np.int64), offsets, values, last, id_offsets, id_bytes)


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
