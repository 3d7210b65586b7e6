"""raykd.core.histories: flat-array histories against hand-computed lookups."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.core import histories, id_index


def flat(raw_ids, trains, last) -> histories.Histories:
    return histories.build(pa.array(raw_ids), pa.array(trains, pa.list_(pa.int32())), np.array(last))


def test_the_id_hash_hand_computed_and_vectorised():
    offset, prime, mask = id_index.FNV_OFFSET, id_index.FNV_PRIME, (1 << 64) - 1

    def fold(h):
        return h ^ (h >> 32)

    assert id_index.id_hash(b"") == fold(offset)  # no word: the seed xor length 0
    assert id_index.id_hash(b"a") == fold(((offset ^ 1) ^ 0x61) * prime & mask)
    h = (((offset ^ 9) ^ int.from_bytes(b"abcdefgh", "little")) * prime) & mask  # two words, the second "i"
    assert id_index.id_hash(b"abcdefghi") == fold(((h ^ 0x69) * prime) & mask)
    assert id_index.id_hash(b"a") != id_index.id_hash(b"a\0")  # the length tells zero padding apart
    words = ["foobar", "", "a", "é", "a much longer id than the others", "exactly8", "sixteen bytes!!!", "a\0"]
    enc = [w.encode() for w in words]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in enc])]).astype(np.int64)
    data = np.frombuffer(b"".join(enc), np.uint8)
    assert id_index.hash_many(offsets, data).tolist() == [id_index.id_hash(e) for e in enc]
    assert id_index.hash_many(offsets[3:], data).tolist() == [id_index.id_hash(e) for e in enc[3:]]  # offset start


def test_integer_ids_are_found_by_binary_search_and_unknown_ones_are_none():
    h = flat([42, -7, 10**15], [[3, 1], [], [5]], [[8, 9], [2, 4], [6, 7]])
    assert h.get(42).tolist() == [3, 1, 8, 9]  # train, then valid and test
    assert h.get(-7).tolist() == [2, 4]  # an empty train list: valid and test only
    assert h.get(10**15).tolist() == [5, 6, 7]
    assert h.get(42).dtype == np.int64
    for unknown in (0, 43, -8, 2**63 - 1, -(2**63), 2**70, None, "42"):  # "42": not of an integer vocabulary
        assert h.get(unknown) is None, unknown
    assert list(h) == [42, -7, 10**15]  # prepared order
    assert len(h) == 3 and 42 in h and 43 not in h


def test_text_ids_are_found_by_hash_and_checked_byte_for_byte():
    h = flat(["u1", "", "007", "7", "é"], [[1], [2], [3], [4], [5]], [[0, 0]] * 5)
    assert [h.get(k).tolist()[0] for k in ("u1", "", "007", "7", "é")] == [1, 2, 3, 4, 5]
    for unknown in ("u2", "07", "e", 7, None):  # 7: not of a text vocabulary (ids rule 3 makes it "7" first)
        assert h.get(unknown) is None, unknown
    assert list(h) == ["u1", "", "007", "7", "é"]


def test_a_hash_collision_never_answers_for_the_wrong_user(monkeypatch):
    h = flat(["a", "b"], [[1], [2]], [[0, 0], [0, 0]])
    both = id_index.IdIndex(np.array([5, 5], np.uint64), h.ids.rows, h.ids.id_offsets, h.ids.id_bytes)
    forced = histories.Histories(both, h.offsets, h.values, h.last)  # both ids under one hash
    monkeypatch.setattr(id_index, "id_hash", lambda data: 5)
    assert forced.get("a").tolist() == [1, 0, 0] and forced.get("b").tolist() == [2, 0, 0]
    assert forced.get("c") is None


def test_no_user_at_all():
    h = flat(pa.array([], pa.int64()), [], np.zeros((0, 2)))
    assert len(h) == 0 and h.get(1) is None and list(h) == []


def test_it_pickles_as_its_arrays():
    h = flat(["x", "y"], [[1, 2], [3]], [[4, 5], [6, 7]])
    back = pickle.loads(pickle.dumps(h, protocol=5))
    assert back.get("y").tolist() == [3, 6, 7]
    assert h.nbytes() == sum(a.nbytes for a in (h.ids.keys, h.ids.rows, h.offsets, h.values, h.last,
                                                 h.ids.id_offsets, h.ids.id_bytes))


def test_read_a_prepared_folder_shard_by_shard(tmp_path):
    data = tmp_path / "data"
    (data / "sequences").mkdir(parents=True)
    pq.write_table(pa.table({"index": [0, 1, 2], "raw_id": pa.array([30, 10, 20], pa.int64())}), data / "users.parquet")
    for i, (users, trains) in enumerate((([0, 1], [[1, 2], [3]]), ([2], [[]]))):
        pq.write_table(pa.table({"user": pa.array(users, pa.int32()), "train": pa.array(trains, pa.list_(pa.int32())),
                                 "valid": pa.array([7] * len(users), pa.int32()),
                                 "test": pa.array([8] * len(users), pa.int32())}),
                       data / "sequences" / f"part-{i:05d}.parquet")
    h = histories.read(data)
    assert [h.get(u).tolist() for u in (30, 10, 20)] == [[1, 2, 7, 8], [3, 7, 8], [7, 8]]
    assert list(h) == [30, 10, 20]
    assert histories.read(tmp_path / "nothing") is None


@pytest.mark.parametrize("n", [1, 1000])
def test_random_integer_and_text_ids_agree_with_a_dict(n):
    rng = np.random.default_rng(n)
    ids = rng.choice(10**9, n, replace=False).astype(np.int64)
    lengths = rng.integers(0, 6, n)
    trains = [rng.integers(1, 50, m).tolist() for m in lengths]
    last = rng.integers(1, 50, (n, 2))
    for raw in (ids, [f"user-{i}" for i in ids]):
        h = flat(raw if isinstance(raw, list) else pa.array(raw), trains, last)
        expected = {u: [*t, *lt] for u, t, lt in zip(raw if isinstance(raw, list) else ids.tolist(), trains,
                                                      last.tolist())}
        assert all(h.get(u).tolist() == want for u, want in expected.items())
