"""raykd.core.id_index: a vocabulary's lookup in flat arrays, and a server's item vocabulary on it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raykd.core import id_index


def test_rows_of_integer_ids_in_a_chunked_column():
    index = id_index.build(pa.chunked_array([[30, 10], [20, -5]]))
    assert [index.row(k) for k in (30, 10, 20, -5)] == [0, 1, 2, 3]
    assert index.keys.tolist() == [-5, 10, 20, 30] and index.rows.tolist() == [3, 1, 2, 0]
    assert [index.row(k) for k in (0, 31, "30", None, True, 2**64)] == [None] * 6
    assert list(index) == [30, 10, 20, -5] and len(index) == 4
    assert index.nbytes() == 4 * 8 * 2


def test_rows_of_text_ids_in_a_sliced_column():
    # a slice has an offset into its buffers: the rows are the slice's own
    index = id_index.build(pa.array(["skip", "b", "a", "é"]).slice(1))
    assert [index.row(k) for k in ("b", "a", "é", "skip", "A", 1)] == [0, 1, 2, None, None, None]
    assert list(index) == ["b", "a", "é"]


@pytest.mark.parametrize("raw,asked", [
    ([30, 10, 20, -5], [10, 31, -5, "10", None, True, 2**64, -(2**63), 30, 30]),
    (["b", "a", "é", ""], ["a", "A", "", 7, None, "é", "b", "bb", "a"]),
])
def test_many_rows_at_once_are_the_rows_one_at_a_time(raw, asked):
    index = id_index.build(pa.array(raw))
    want = [-1 if index.row(k) is None else index.row(k) for k in asked]
    assert index.rows_of(asked).tolist() == want and index.rows_of([]).tolist() == []
    assert id_index.build(pa.array([], pa.array(raw).type)).rows_of(asked).tolist() == [-1] * len(asked)


def test_many_rows_under_one_hash_are_told_apart_byte_for_byte(monkeypatch):
    both = id_index.build(pa.array(["a", "b"]))
    forced = id_index.IdIndex(np.array([5, 5], np.uint64), both.rows, both.id_offsets, both.id_bytes)
    monkeypatch.setattr(id_index, "hash_many", lambda offsets, data: np.full(len(offsets) - 1, 5, np.uint64))
    assert forced.rows_of(["b", "a", "c"]).tolist() == [1, 0, -1]


def test_null_ids_are_refused():
    with pytest.raises(ValueError, match="null"):
        id_index.build(pa.array([1, None]))


@pytest.mark.parametrize("dtype", [pa.int64(), pa.string()])
def test_empty_vocabulary(dtype):
    index = id_index.build(pa.array([], dtype))
    assert len(index) == 0 and list(index) == [] and index.row(1) is None and index.row("1") is None


def test_a_servers_item_vocabulary_finds_every_item_again(tiny_run):
    from raykd.serve.recommender import Recommender

    rec = Recommender(tiny_run)
    n = rec.desc["num_items"]
    raws = [rec.raw_item(i) for i in range(1, n + 1)]
    assert len(set(raws)) == n and [rec.item_of(r) for r in raws] == list(range(1, n + 1))
    assert rec.item_of(str(raws[0])) == 1  # ids rule 3: an integer id also as canonical decimal text
    assert rec.item_of("no-such-item") is None
    assert isinstance(rec.item_index.keys, np.ndarray) and rec.describe()["items"] == n
