"""A vocabulary's raw ids in flat NumPy arrays, looked up without one Python object per id.

A dict `{raw id: row}` costs about 100 bytes of Python objects per id and seconds to build at a
million ids; here a vocabulary is two arrays (four for text ids):

    keys     [n] sorted lookup keys: the raw ids themselves (an integer vocabulary) or a 64-bit
             FNV-1a hash of their UTF-8 bytes (a text vocabulary), searched with np.searchsorted
    rows     [n] int64, the row (vocabulary order) of each sorted key
    text     text ids only: id_offsets [n + 1] int64 and id_bytes [B] uint8, each row's raw id, which a
             hash match is checked against (so a hash collision can never answer for the wrong id)

`IdIndex.row(key)` answers a looked-up raw id (raykd.core.ids rule 3: of the vocabulary's own kind)
with its row, or None. The arrays pickle as plain buffers (`ray.put` stores them once and readers
map them). Used for the users' histories (raykd.core.histories) and a server's item vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3  # 64-bit FNV-1a
_MASK = (1 << 64) - 1


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
class IdIndex:
    """A vocabulary's raw ids, sorted for lookup (see the module docstring)."""

    keys: np.ndarray
    rows: np.ndarray
    id_offsets: np.ndarray | None = None  # text ids only
    id_bytes: np.ndarray | None = None

    @property
    def text_ids(self) -> bool:
        return self.id_bytes is not None

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, key: int | str | None) -> int | None:
        """The row of a raw id (of the vocabulary's own kind), or None for an unknown one."""
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

    def __contains__(self, key: object) -> bool:
        return self.row(key) is not None  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int | str]:
        """The raw ids in vocabulary order (for tests and small tools: one Python object per id)."""
        order = np.argsort(self.rows, kind="stable")
        if not self.text_ids:
            yield from self.keys[order].tolist()
            return
        for r in self.rows[order].tolist():
            yield self.id_bytes[self.id_offsets[r]:self.id_offsets[r + 1]].tobytes().decode("utf-8")

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.rows, self.id_offsets, self.id_bytes) if a is not None)


def build(raw_ids: pa.Array | pa.ChunkedArray) -> IdIndex:
    """The index of a vocabulary in row order: integers (searched as themselves) or text (by hash)."""
    raw_ids = raw_ids.combine_chunks() if isinstance(raw_ids, pa.ChunkedArray) else raw_ids
    if raw_ids.null_count:
        raise ValueError("raw ids must not be null")
    if pa.types.is_integer(raw_ids.type):
        ids = raw_ids.to_numpy().astype(np.int64, copy=False)
        order = np.argsort(ids, kind="stable")
        return IdIndex(ids[order], order.astype(np.int64))
    text = raw_ids.cast(pa.large_string())
    id_offsets = np.frombuffer(text.buffers()[1], np.int64)[text.offset:text.offset + len(text) + 1].copy()
    data = text.buffers()[2]
    id_bytes = np.frombuffer(data, np.uint8).copy() if data is not None else np.zeros(0, np.uint8)
    hashes = hash_many(id_offsets, id_bytes)
    order = np.argsort(hashes, kind="stable")
    return IdIndex(hashes[order], order.astype(np.int64), id_offsets, id_bytes)
