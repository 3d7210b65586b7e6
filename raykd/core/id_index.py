"""A vocabulary's raw ids in flat NumPy arrays, looked up without one Python object per id.

A dict `{raw id: row}` costs about 100 bytes of Python objects per id and seconds to build at a
million ids; here a vocabulary is two arrays (four for text ids):

    keys     [n] sorted lookup keys: the raw ids themselves (an integer vocabulary) or a 64-bit
             hash of their UTF-8 bytes (a text vocabulary; `id_hash`), searched with np.searchsorted
    rows     [n] int64, the row (vocabulary order) of each sorted key
    text     text ids only: id_offsets [n + 1] int64 and id_bytes [B] uint8, each row's raw id, which a
             hash match is checked against (so a hash collision can never answer for the wrong id)

`IdIndex.row(key)` answers a looked-up raw id (raykd.core.ids rule 3: of the vocabulary's own kind)
with its row, or None. The arrays pickle as plain buffers (`ray.put` stores them once and readers
map them). Used for the users' histories (raykd.core.histories) and a server's item vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3  # FNV-1a's 64-bit constants
WORD = 8  # bytes of an id hashed in one step
_MASK = (1 << 64) - 1


def id_hash(data: bytes) -> int:
    """The 64-bit lookup hash of one text id's UTF-8 bytes (`hash_many` is the same hash for a column).

    FNV-1a's step taken a word at a time: from FNV_OFFSET xor the length, h = (h xor w) * FNV_PRIME
    for each 8-byte little-endian word w (the last zero-padded), then h xor (h >> 32). A column
    then takes one vectorised pass per 8 bytes instead of one per byte. Only a lookup key: a match
    is always checked byte for byte, so a collision costs a comparison, never a wrong answer.
    """
    h = FNV_OFFSET ^ len(data)
    for j in range(0, len(data), WORD):
        h = ((h ^ int.from_bytes(data[j:j + WORD], "little")) * FNV_PRIME) & _MASK
    return h ^ (h >> 32)


def hash_many(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """`id_hash` of every id of a flat UTF-8 column (offsets [n + 1], bytes), vectorised by word.

    Ids are visited longest first, so at word j the ids still going are a prefix: one pass per
    8 bytes of the longest id, each over the ids at least that long; a word's bytes past its id's
    end are zeroed.
    """
    lengths = np.diff(offsets)
    order = np.argsort(-lengths, kind="stable")
    starts, by_length = offsets[:-1][order], lengths[order]
    padded = np.concatenate([data, np.zeros(WORD, np.uint8)])  # the last id's last word reads past it
    lane = np.arange(WORD)
    h = np.uint64(FNV_OFFSET) ^ by_length.astype(np.uint64)
    prime = np.uint64(FNV_PRIME)
    with np.errstate(over="ignore"):  # multiplication modulo 2**64 is the hash
        for j in range(0, int(lengths.max(initial=0)), WORD):
            live = int(np.searchsorted(-by_length, -j, side="left"))  # ids longer than j
            chunk = padded[starts[:live, None] + j + lane]  # [live, WORD], C-contiguous
            chunk[lane >= by_length[:live, None] - j] = 0
            h[:live] = (h[:live] ^ chunk.view("<u8")[:, 0]) * prime
    h ^= h >> np.uint64(32)
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
        h = np.uint64(id_hash(raw))
        lo, hi = np.searchsorted(self.keys, h, "left"), np.searchsorted(self.keys, h, "right")
        for r in self.rows[lo:hi]:  # almost always one; more only on a hash collision
            if self.id_bytes[self.id_offsets[r]:self.id_offsets[r + 1]].tobytes() == raw:
                return int(r)
        return None

    def rows_of(self, keys: Sequence[int | str | None]) -> np.ndarray:
        """`row` of each of many looked-up raw ids, vectorised: int64 [len(keys)], -1 for an unknown id."""
        out = np.full(len(keys), -1, dtype=np.int64)
        kind = str if self.text_ids else int
        at = [i for i, k in enumerate(keys) if isinstance(k, kind) and not isinstance(k, bool)
              and (self.text_ids or -(2**63) <= k < 2**63)]
        if not at or not len(self.keys):
            return out
        if not self.text_ids:
            wanted = np.array([keys[i] for i in at], dtype=np.int64)
            pos = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
            found = self.keys[pos] == wanted
            out[np.asarray(at)[found]] = self.rows[pos[found]]
            return out
        out[at] = self._text_rows([keys[i].encode("utf-8") for i in at])
        return out

    def _text_rows(self, raw: list[bytes]) -> np.ndarray:
        """rows_of for encoded text ids: hashes searched, then every match checked byte for byte, all
        vectorised but a hash shared by several rows (a collision), which is checked one by one."""
        lengths = np.array([len(r) for r in raw], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        data = np.frombuffer(b"".join(raw), np.uint8)
        hashes = hash_many(offsets, data)
        lo, hi = np.searchsorted(self.keys, hashes, "left"), np.searchsorted(self.keys, hashes, "right")
        row = self.rows[np.minimum(lo, len(self.keys) - 1)]
        start = self.id_offsets[row]
        ok = (hi - lo == 1) & (self.id_offsets[row + 1] - start == lengths)
        owner = np.repeat(np.flatnonzero(ok), lengths[ok])
        within = np.arange(len(owner)) - np.repeat(np.cumsum(lengths[ok]) - lengths[ok], lengths[ok])
        differs = data[offsets[owner] + within] != self.id_bytes[start[owner] + within]
        ok[owner[differs]] = False
        out = np.where(ok, row, -1)
        for i in np.flatnonzero(hi - lo > 1).tolist():  # almost never: one hash, several rows
            for r in self.rows[lo[i]:hi[i]].tolist():
                if self.id_bytes[self.id_offsets[r]:self.id_offsets[r + 1]].tobytes() == raw[i]:
                    out[i] = r
                    break
        return out

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
