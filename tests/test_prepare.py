"""The prepare stage on tiny logs generated here: every format, ids and time, cleaning, the split,
stats and determinism (bad input: test_prepare_errors.py). All tests share one local Ray."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
from prepare_cases import EXPECTED, ROWS, config, prepare_in_pieces, run, same_output, sequences, stats, write_text

from raykd.config import SyntheticConfig, load_config
from raykd.data import readers as logs
from raykd.data import synth

pytestmark = pytest.mark.usefixtures("ray_session")


# ------------------------------------------------------------------------------------------ formats


MOVIELENS = {
    "u.data": lambda r: "\t".join(map(str, r)),
    "ratings.dat": lambda r: "::".join(map(str, r)),
    "ratings.csv": lambda r: ",".join(map(str, r)),
}


@pytest.mark.parametrize("name", list(MOVIELENS))
@pytest.mark.parametrize("from_folder", [False, True])
def test_movielens_variants_from_file_and_folder(tmp_path, name, from_folder):
    header = "userId,movieId,rating,timestamp" if name == "ratings.csv" else None
    path = write_text(tmp_path / "ml" / name, map(MOVIELENS[name], ROWS), header)
    if from_folder:
        write_text(tmp_path / "ml" / "movies.dat", ["10::Toy Story (1995)::Animation"])  # ignored
    data = run(tmp_path, "data.format=movielens", f"data.path={path.parent if from_folder else path}")
    assert sequences(data) == EXPECTED
    assert stats(data)["interactions"] == 9


def test_movielens_rating_filter_and_a_renamed_file(tmp_path):
    extra = [(1, 40, 1, 400), (2, 40, 2, 400)]  # low ratings, dropped and counted
    path = write_text(tmp_path / "ml-1m-ratings.txt", ["::".join(map(str, r)) for r in ROWS + extra])
    data = run(tmp_path, "data.format=movielens", f"data.path={path}", "data.min_rating=3")
    # ratings below 3: (2,30,1) (3,10,2) and both extra rows; users 2 and 3 are then left with 2 < 3
    assert sequences(data) == {1: ([20], 30, 10)}
    assert stats(data)["dropped"] == {"below_min_rating": 4, "k_core_user": 4}
    assert stats(data)["rows_read"] == 11


@pytest.mark.parametrize("delimiter, spelled", [(",", ","), (";", ";"), ("\t", "\\t"), ("|", "|")])
@pytest.mark.parametrize("header", [True, False])
def test_csv_any_delimiter_with_or_without_header(tmp_path, delimiter, spelled, header):
    lines = [delimiter.join(map(str, (r[3], r[1], r[0]))) for r in ROWS]  # columns in another order
    path = write_text(tmp_path / "log.csv", lines, delimiter.join(["ts", "item", "user"]) if header else None)
    cols = ["data.user_col=user", "data.item_col=item", "data.time_col=ts"] if header else [
        "data.user_col=2", "data.item_col=1", "data.time_col=0", "data.header=false"]
    data = run(tmp_path, "data.format=csv", f"data.path={path}", f"data.delimiter={spelled}", *cols)
    assert sequences(data) == EXPECTED


def test_csv_quoted_header_and_fields(tmp_path):
    lines = [f'"{u}","{i}","{t}"' for u, i, _, t in ROWS]
    path = write_text(tmp_path / "log.csv", lines, '"user_id","item_id","ts"')
    assert sequences(run(tmp_path, "data.format=csv", f"data.path={path}", "data.time_col=ts")) == EXPECTED


def test_compressed_csv_with_windows_line_ends_in_a_folder(tmp_path):
    import gzip

    (tmp_path / "logs").mkdir()
    text = "user_id,item_id,ts\r\n" + "".join(f"{u},{i},{t}\r\n" for u, i, _, t in ROWS)
    (tmp_path / "logs" / "log.csv.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "logs" / "_SUCCESS").write_text("")  # markers and hidden files are not logs
    data = run(tmp_path, "data.format=csv", f"data.path={tmp_path / 'logs'}", "data.time_col=ts")
    assert sequences(data) == EXPECTED


def test_parquet(tmp_path):
    df = pd.DataFrame(ROWS, columns=["user_id", "item_id", "rating", "ts"])
    df.to_parquet(tmp_path / "log.parquet")
    data = run(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'log.parquet'}", "data.time_col=ts")
    assert sequences(data) == EXPECTED


def test_jsonl(tmp_path):
    lines = [json.dumps({"u": u, "i": i, "r": r, "t": t}) for u, i, r, t in ROWS]
    path = write_text(tmp_path / "log.jsonl", lines)
    data = run(tmp_path, "data.format=jsonl", f"data.path={path}", "data.user_col=u", "data.item_col=i",
               "data.time_col=t", "data.rating_col=r", "data.min_rating=3")
    # ratings below 3 go: user 2 loses item 30 and user 3 item 10 -> both below 3 interactions
    assert sequences(data) == {1: ([20], 30, 10)}
    assert stats(data)["dropped"] == {"below_min_rating": 2, "k_core_user": 4}


def test_jsonl_text_ids_stay_text(tmp_path):
    path = write_text(tmp_path / "log.jsonl", [json.dumps({"user_id": "1", "item_id": i}) for i in (5, 6, 7)])
    assert sequences(run(tmp_path, "data.format=jsonl", f"data.path={path}")) == {"1": ([5], 6, 7)}


def test_synthetic_matches_the_synth_parquet(tmp_path):
    syn = ["data.synthetic.users=60", "data.synthetic.items=30", "data.synthetic.mean_length=8",
           "data.synthetic.clusters=3"]
    a = run(tmp_path / "a", "data.format=synthetic", *syn)
    s = stats(a)
    assert s["users"] > 40 and s["interactions"] == s["rows_read"] - sum(s["dropped"].values())
    # the same log written by `raykd synth` and read as parquet gives the very same data
    synth.write(SyntheticConfig(users=60, items=30, mean_length=8, clusters=3), tmp_path / "syn.parquet")
    b = run(tmp_path / "b", "data.format=parquet", f"data.path={tmp_path / 'syn.parquet'}", "data.time_col=timestamp")
    assert same_output(a, b)


# ------------------------------------------------------------------------------------- ids and time


def test_string_ids_keep_their_text_and_type(tmp_path):
    # '007' and '7' are different users; 'i01' items are text; both vocabularies stay strings
    rows = [("007", "i01"), ("007", "i02"), ("007", "i03"), ("7", "i01"), ("7", "i03"), ("7", "i02")]
    path = write_text(tmp_path / "log.csv", [f"{u},{i}" for u, i in rows], "user_id,item_id")
    data = run(tmp_path, "data.format=csv", f"data.path={path}")
    assert pq.read_schema(data / "users.parquet").field("raw_id").type == pa.string()
    assert pq.read_schema(data / "items.parquet").field("raw_id").type == pa.string()
    assert sequences(data) == {"007": (["i01"], "i02", "i03"), "7": (["i01"], "i03", "i02")}


def test_integer_ids_stay_integers(tmp_path):
    path = write_text(tmp_path / "log.csv", [f"{u},{i},{t}" for u, i, _, t in ROWS], "user_id,item_id,ts")
    data = run(tmp_path, "data.format=csv", f"data.path={path}", "data.time_col=ts")
    assert pq.read_schema(data / "users.parquet").field("raw_id").type == pa.int64()
    assert pq.read_table(data / "users.parquet")["raw_id"].to_pylist() == [1, 2, 3]
    assert pq.read_table(data / "items.parquet")["raw_id"].to_pylist() == [10, 20, 30]


def test_one_text_id_makes_every_id_text_whatever_the_blocks(tmp_path):
    # 30 numeric users, then '0042' near the end: with 64-byte blocks the first blocks are all numeric
    rows = [(u, i) for u in range(30) for i in (1, 2, 3)] + [("0042", 1), ("0042", 2), ("0042", 3)]
    path = write_text(tmp_path / "log.csv", [f"{u},{i}" for u, i in rows], "user_id,item_id")
    one = prepare_in_pieces(config(tmp_path / "one", "data.format=csv", f"data.path={path}"), logs.BLOCK_BYTES)
    many = prepare_in_pieces(config(tmp_path / "many", "data.format=csv", f"data.path={path}"), 64)
    assert same_output(one, many)
    users = pq.read_table(one / "users.parquet")["raw_id"].to_pylist()
    assert "0042" in users and "7" in users and len(users) == 31


def test_parquet_text_ids_stay_text(tmp_path):
    pd.DataFrame({"user_id": ["1", "1", "1"], "item_id": [5, 6, 7]}).to_parquet(tmp_path / "log.parquet")
    data = run(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'log.parquet'}")
    assert sequences(data) == {"1": ([5], 6, 7)}


def test_without_time_column_file_order_is_time_order(tmp_path):
    path = write_text(tmp_path / "log.csv", ["u,c", "u,a", "u,b", "v,a", "v,c", "v,b"], "user_id,item_id")
    assert sequences(run(tmp_path, "data.format=csv", f"data.path={path}")) == {
        "u": (["c"], "a", "b"), "v": (["a"], "c", "b")}


@pytest.mark.parametrize("times", [
    ["2021-03-01", "2021-01-15", "2021-02-01 10:00:00", "2021-02-01T10:00:00+00:00"],  # ISO dates
    ["1614556800", "1610668800", "1612173600", "1612173600"],  # epoch seconds, as text
    ["1614556800.5", "1610668800", "1612173600.25", "1612173600.25"],  # epoch with fractions
])
def test_time_column_dates_or_epochs_with_ties_in_file_order(tmp_path, times):
    # items in file order: a (latest), b (earliest), c and d at the same time (tie: c before d)
    lines = [f"u,{item},{t}" for item, t in zip("abcd", times)]
    path = write_text(tmp_path / "log.csv", lines, "user_id,item_id,ts")
    data = run(tmp_path, "data.format=csv", f"data.path={path}", "data.time_col=ts")
    assert sequences(data) == {"u": (["b", "c"], "d", "a")}


def test_typed_timestamps_in_parquet(tmp_path):
    ts = pd.to_datetime(["2021-03-01", "2021-01-15", "2021-02-01", "2021-02-01"])
    pd.DataFrame({"user_id": 1, "item_id": [1, 2, 3, 4], "ts": ts}).to_parquet(tmp_path / "a.parquet")
    data = run(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'a.parquet'}", "data.time_col=ts")
    assert sequences(data) == {1: ([2, 3], 4, 1)}


# ---------------------------------------------------------------------------- cleaning and the split


def test_duplicates_counted_and_first_kept(tmp_path):
    lines = ["u,a,1", "u,b,2", "u,a,1", "u,c,3", "u,a,4", "u,c,3", "u,c,3"]
    path = write_text(tmp_path / "log.csv", lines, "user_id,item_id,ts")
    data = run(tmp_path, "data.format=csv", f"data.path={path}", "data.time_col=ts")
    # exact repeats (same user, item, time) go; 'a' again at a later time is a real re-consumption
    assert sequences(data) == {"u": (["a", "b"], "c", "a")}
    assert stats(data)["dropped"] == {"duplicate": 3}


def test_duplicates_without_time_column(tmp_path):
    path = write_text(tmp_path / "log.csv", ["u,a", "u,b", "u,a", "u,c", "u,d"], "user_id,item_id")
    data = run(tmp_path, "data.format=csv", f"data.path={path}")
    assert sequences(data) == {"u": (["a", "b"], "c", "d")}
    assert stats(data)["dropped"] == {"duplicate": 1}


def test_iterative_k_core_hand_computed(tmp_path):
    # k = 3 interactions per user, 2 per item. Interactions:
    #   A: 1 2 3    B: 1 2 3    C: 1 2 4 6    E: 1 6                       (12 rows)
    # round 1: user E has 2 < 3 -> drop E's 2 rows; item 4 has 1 < 2 (only C) -> drop (C,4)
    # round 2: item 6 now has 1 (only C, E is gone) -> drop (C,6)
    # round 3: user C now has 2 (items 1, 2) < 3 -> drop C's 2 rows
    # round 4: items 1, 2, 3 have 2 each (A, B), users A, B have 3 each: stable.
    # kept 6 rows; dropped by users 2 + 2 = 4, by items 1 + 1 = 2.
    rows = [("A", 1), ("A", 2), ("A", 3), ("B", 1), ("B", 2), ("B", 3),
            ("C", 1), ("C", 2), ("C", 4), ("C", 6), ("E", 1), ("E", 6)]
    path = write_text(tmp_path / "log.csv", [f"{u},{i}" for u, i in rows], "user_id,item_id")
    data = run(tmp_path, "data.format=csv", f"data.path={path}", "data.min_item_interactions=2")
    assert sequences(data) == {"A": ([1], 2, 3), "B": ([1], 2, 3)}
    s = stats(data)
    assert s["dropped"] == {"k_core_user": 4, "k_core_item": 2}
    assert (s["users"], s["items"], s["interactions"], s["rows_read"]) == (2, 3, 6, 12)


def test_leave_one_out_split_hand_made_user(tmp_path):
    # user u in file order: (a,5) (b,1) (d,3) (c,3) (e,9) (f,1)
    # by time, ties in file order: b(1) f(1) d(3) c(3) a(5) e(9) -> train b f d c, valid a, test e
    lines = ["u,a,5", "u,b,1", "u,d,3", "u,c,3", "u,e,9", "u,f,1"]
    path = write_text(tmp_path / "log.csv", lines, "user_id,item_id,ts")
    data = run(tmp_path, "data.format=csv", f"data.path={path}", "data.time_col=ts")
    assert sequences(data) == {"u": (["b", "f", "d", "c"], "a", "e")}
    s = stats(data)
    assert s["split"] == {"train": 4, "valid": 1, "test": 1}
    # item popularity counts training positions only
    items = pq.read_table(data / "items.parquet").to_pydict()
    assert dict(zip(items["raw_id"], items["count"])) == {"a": 0, "b": 1, "c": 1, "d": 1, "e": 0, "f": 1}
    assert items["index"] == [1, 2, 3, 4, 5, 6]  # 0 is padding


def reference(df: pd.DataFrame, min_user: int, min_item: int, min_rating: float) -> tuple[dict, dict]:
    """An independent pandas implementation of the cleaning rules: (counts, user -> item sequence)."""
    counts = {"rows_read": len(df), "below_min_rating": int((df.r < min_rating).sum())}
    df = df[df.r >= min_rating]
    before = len(df)
    df = df.drop_duplicates(["u", "i", "t"], keep="first")
    counts["duplicate"] = before - len(df)
    while True:
        small_u = df.groupby("u").i.transform("size") < min_user
        small_i = df.groupby("i").u.transform("size") < min_item
        if not (small_u | small_i).any():
            break
        df = df[~(small_u | small_i)]
    df = df.reset_index(drop=True).sort_values(["u", "t"], kind="stable")
    counts.update(users=df.u.nunique(), items=df.i.nunique(), interactions=len(df))
    return counts, {u: list(g.i) for u, g in df.groupby("u")}


def test_stats_match_an_independent_pandas_count(tmp_path):
    rng = np.random.default_rng(3)
    n = 3000
    df = pd.DataFrame({"u": rng.zipf(1.3, n) % 300, "i": (rng.zipf(1.6, n) % 200) + 1,
                       "r": rng.integers(1, 6, n), "t": rng.integers(0, 500, n)})
    df = pd.concat([df, df.sample(100, random_state=0)])  # exact duplicates, later in the file
    df.to_csv(tmp_path / "log.csv", index=False)
    data = run(tmp_path, "data.format=csv", f"data.path={tmp_path / 'log.csv'}", "data.user_col=u",
               "data.item_col=i", "data.time_col=t", "data.rating_col=r", "data.min_rating=2",
               "data.min_user_interactions=5", "data.min_item_interactions=4")
    counts, seqs = reference(df, 5, 4, 2)
    s = stats(data)
    assert {k: s[k] for k in ("rows_read", "users", "items", "interactions")} == {
        k: counts[k] for k in ("rows_read", "users", "items", "interactions")}
    assert s["dropped"]["below_min_rating"] == counts["below_min_rating"]
    assert s["dropped"]["duplicate"] == counts["duplicate"]
    assert s["dropped"]["k_core_user"] > 0 and s["dropped"]["k_core_item"] > 0
    assert s["dropped"]["k_core_user"] + s["dropped"]["k_core_item"] == (
        counts["rows_read"] - counts["below_min_rating"] - counts["duplicate"] - counts["interactions"])
    assert s["density"] == pytest.approx(counts["interactions"] / (counts["users"] * counts["items"]))
    lengths = np.array([len(v) for v in seqs.values()])
    assert s["sequence_length"]["p50"] == pytest.approx(np.percentile(lengths, 50))
    assert s["sequence_length"]["max"] == lengths.max()
    got = {u: train + [v, t] for u, (train, v, t) in sequences(data).items()}
    assert got == seqs


def test_resolved_config_and_reuse(tmp_path, capsys):
    path = write_text(tmp_path / "log.csv", [f"{u},{i},{t}" for u, i, _, t in ROWS], "user_id,item_id,ts")
    args = ["data.format=csv", f"data.path={path}", "data.time_col=ts"]
    from raykd import stages

    stages.run(config(tmp_path / "run", *args), ["prepare"])  # as `raykd prepare` runs it
    data = tmp_path / "run" / "data"
    assert load_config(tmp_path / "run" / "config.yaml") == config(tmp_path / "run", *args)
    run(tmp_path, *args)
    assert "reusing" in capsys.readouterr().out
    write_text(path, [f"{u},{i},{t}" for u, i, _, t in ROWS[:6]], "user_id,item_id,ts")  # the log changed
    run(tmp_path, *args)
    assert "reusing" not in capsys.readouterr().out
    assert stats(data)["users"] == 2


# ------------------------------------------------------------------------------------- determinism


def test_one_file_or_a_folder_of_parts_or_tiny_blocks_give_identical_bytes(tmp_path):
    rng = np.random.default_rng(0)
    n = 1200
    # few distinct times: many ties, which only file order can break
    df = pd.DataFrame({"user_id": rng.integers(0, 60, n), "item_id": rng.integers(0, 40, n),
                       "ts": rng.integers(0, 5, n)})
    df.to_csv(tmp_path / "one.csv", index=False)
    (tmp_path / "parts").mkdir()
    for k in range(3):  # part-0, part-1, part-2: the same rows in the same order
        df.iloc[k * n // 3:(k + 1) * n // 3].to_csv(tmp_path / "parts" / f"part-{k}.csv", index=False)
    common = ["data.format=csv", "data.time_col=ts", "data.num_shards=3"]
    one = run(tmp_path / "one", *common, f"data.path={tmp_path / 'one.csv'}")
    parts = run(tmp_path / "parts_run", *common, f"data.path={tmp_path / 'parts'}")
    tiny = prepare_in_pieces(config(tmp_path / "tiny", *common, f"data.path={tmp_path / 'one.csv'}"), 256)
    ctx = ray.data.DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(cpu=1)  # one read task at a time
    try:
        serial = prepare_in_pieces(config(tmp_path / "serial", *common, f"data.path={tmp_path / 'parts'}"), 256)
    finally:
        ctx.execution_options.resource_limits = limits
    assert same_output(one, parts) and same_output(one, tiny) and same_output(one, serial)
    assert len(list((one / "sequences").glob("*.parquet"))) == 3


def test_synthetic_is_deterministic(tmp_path):
    syn = ["data.synthetic.users=50", "data.synthetic.items=20", "data.synthetic.mean_length=6"]
    assert same_output(run(tmp_path / "a", *syn), run(tmp_path / "b", *syn))
    assert not same_output(run(tmp_path / "a", *syn), run(tmp_path / "c", *syn, "data.synthetic.seed=1"))


def test_shards_split_users_but_not_the_data(tmp_path):
    path = write_text(tmp_path / "log.csv", [f"{u},{i},{t}" for u, i, _, t in ROWS], "user_id,item_id,ts")
    args = ["data.format=csv", f"data.path={path}", "data.time_col=ts"]
    one, three = run(tmp_path / "a", *args), run(tmp_path / "b", *args, "data.num_shards=3")
    assert len(list((three / "sequences").glob("*.parquet"))) == 3
    assert sequences(one) == sequences(three) == EXPECTED
    many = run(tmp_path / "c", *args, "data.num_shards=10")  # never more shards than users
    assert len(list((many / "sequences").glob("*.parquet"))) == 3
