"""The prepare stage on tiny logs generated here: every format, cleaning, split, stats, determinism
and every kind of bad input. All tests share one local Ray (the `ray_session` fixture)."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data

from raykd import dates, logs, prepare, synth
from raykd.config import SyntheticConfig, load_config
from raykd.errors import RaykdError

pytestmark = pytest.mark.usefixtures("ray_session")

# Three users with three items each, in an order that time must fix: (user, item, rating, time).
ROWS = [
    (1, 10, 5, 300), (1, 20, 4, 100), (1, 30, 3, 200),
    (2, 10, 5, 100), (2, 30, 1, 300), (2, 20, 5, 200),
    (3, 30, 4, 100), (3, 20, 5, 200), (3, 10, 2, 300),
]
# user -> (train, valid, test) in raw ids, ordered by time
EXPECTED = {1: ([20], 30, 10), 2: ([10], 20, 30), 3: ([30], 20, 10)}
LOOSE = ["data.min_user_interactions=3", "data.min_item_interactions=1"]


def config(run_dir, *overrides):
    return load_config(None, [f"output_dir={run_dir}", *LOOSE, *overrides])


def run(tmp_path, *overrides):
    """Prepare into tmp_path/run and return the data folder."""
    return prepare.run(config(tmp_path / "run", *overrides))


def sequences(data_dir) -> dict:
    """raw user -> (train raw items, valid raw item, test raw item), read back through the vocabularies."""
    users = pq.read_table(data_dir / "users.parquet").to_pydict()
    items = pq.read_table(data_dir / "items.parquet").to_pydict()
    user_raw = dict(zip(users["index"], users["raw_id"]))
    item_raw = dict(zip(items["index"], items["raw_id"]))
    seq = pq.read_table(data_dir / "sequences").to_pydict()
    return {user_raw[u]: ([item_raw[i] for i in train], item_raw[v], item_raw[t])
            for u, train, v, t in zip(seq["user"], seq["train"], seq["valid"], seq["test"])}


def stats(data_dir) -> dict:
    return json.loads((data_dir / "stats.json").read_text())


def write_text(path, lines, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in ([header] if header else []) + list(lines)))
    return path


def prepare_in_pieces(cfg, block_bytes):
    """prepare.run's steps with a chosen read block size (tiny blocks: many blocks per file)."""
    out = Path(cfg.output_dir) / "data"
    sources = logs.plan_sources(cfg.data, block_bytes=block_bytes)
    prepare.write(prepare.clean(prepare.read_all(sources), cfg.data, sources), out, cfg.data.num_shards)
    return out


def same_output(a, b) -> bool:
    files = ["users.parquet", "items.parquet", "stats.json"]
    files += sorted(p.name for p in (a / "sequences").glob("*.parquet"))
    assert sorted(p.name for p in (a / "sequences").glob("*.parquet")) == sorted(
        p.name for p in (b / "sequences").glob("*.parquet"))
    for f in files:
        sub = "sequences/" if f.startswith("part-") else ""
        if not filecmp.cmp(a / f"{sub}{f}", b / f"{sub}{f}", shallow=False):
            return False
    return True


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


# ------------------------------------------------------------------------------------- bad input


def fails(tmp_path, *overrides) -> str:
    with pytest.raises(RaykdError) as err:
        run(tmp_path, *overrides)
    msg = str(err.value)
    assert "Traceback" not in msg
    return msg


def test_missing_file(tmp_path):
    msg = fails(tmp_path, "data.format=csv", f"data.path={tmp_path / 'nope.csv'}")
    assert "nope.csv does not exist" in msg
    assert "data.path is required" in fails(tmp_path, "data.format=csv")


def test_folder_without_files_of_the_format(tmp_path):
    write_text(tmp_path / "logs" / "a.parquet.txt", ["x"])
    assert "no .parquet/.pq files" in fails(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'logs'}")
    assert "holds no MovieLens ratings file" in fails(tmp_path, "data.format=movielens",
                                                      f"data.path={tmp_path / 'logs'}")


def test_missing_column_lists_the_columns_found(tmp_path):
    path = write_text(tmp_path / "log.csv", ["1,2,3"], "user,movie,when")
    msg = fails(tmp_path, "data.format=csv", f"data.path={path}", "data.user_col=user")
    assert "'item_id' not found" in msg and "'user', 'movie', 'when'" in msg and str(path) in msg
    msg = fails(tmp_path, "data.format=csv", f"data.path={path}", "data.delimiter=;")
    assert "is data.delimiter=';' right?" in msg
    pd.DataFrame({"uid": [1], "iid": [2]}).to_parquet(tmp_path / "a.parquet")
    msg = fails(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'a.parquet'}")
    assert "'user_id', 'item_id' not found" in msg and "'uid', 'iid'" in msg


@pytest.mark.parametrize("content", ["", "\n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "log.csv").write_text(content)
    assert "is empty" in fails(tmp_path, "data.format=csv", f"data.path={tmp_path / 'log.csv'}")


def test_header_only_file(tmp_path):
    path = write_text(tmp_path / "log.csv", [], "user_id,item_id")
    assert "no data rows in" in fails(tmp_path, "data.format=csv", f"data.path={path}")


def test_all_rows_filtered_away(tmp_path):
    path = write_text(tmp_path / "log.csv", [",".join(map(str, r)) for r in ROWS], "user_id,item_id,rating,ts")
    msg = fails(tmp_path, "data.format=csv", f"data.path={path}", "data.rating_col=rating", "data.min_rating=6")
    assert "all 9 rows have a rating below data.min_rating=6" in msg
    msg = fails(tmp_path, "data.format=csv", f"data.path={path}", "data.min_user_interactions=4")
    assert "no interactions left after the k-core filter" in msg and "k_core_user" in msg


def test_unparseable_timestamps_name_the_file_column_and_rows(tmp_path):
    path = write_text(tmp_path / "log.csv", ["1,2,100", "1,3,soon", "1,4,", "2,2,7"], "user_id,item_id,ts")
    msg = fails(tmp_path, "data.format=csv", f"data.path={path}", "data.time_col=ts")
    assert "2 of 4 rows are invalid" in msg
    assert "unparseable timestamp in column 'ts'" in msg and f"{path} line 3, {path} line 4" in msg


def test_time_column_half_dates_half_numbers(tmp_path):
    path = write_text(tmp_path / "log.csv", ["1,2,2021-01-01", "1,3,2021-01-02", "1,4,1609459200", "1,5,7"],
                      "user_id,item_id,ts")
    msg = fails(tmp_path, "data.format=csv", f"data.path={path}", "data.time_col=ts")
    assert "mixes numbers (2 rows, first at" in msg and "dates (2 rows" in msg


def test_null_ids_name_the_file_column_and_counts(tmp_path):
    path = write_text(tmp_path / "log.csv", ["1,2", ",3", "2,", "3,4", ",5"], "user_id,item_id")
    msg = fails(tmp_path, "data.format=csv", f"data.path={path}")
    assert "3 of 5 rows are invalid" in msg
    assert f"2 with a missing user id in column 'user_id', first at {path} line 3, {path} line 6" in msg
    assert "1 with a missing item id in column 'item_id'" in msg


def test_an_all_null_id_column(tmp_path):
    pd.DataFrame({"user_id": [None, None], "item_id": [1, 2]}).to_parquet(tmp_path / "a.parquet")
    msg = fails(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'a.parquet'}")
    assert "2 with a missing user id in column 'user_id' (every row: is it the right column?)" in msg
    assert "row 1" in msg


def test_unusable_id_type(tmp_path):
    pq.write_table(pa.table({"user_id": [[1], [2]], "item_id": [1, 2]}), tmp_path / "a.parquet")
    msg = fails(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'a.parquet'}")
    assert "the id column data.user_col holds list<" in msg and "ids must be integers or text" in msg


def test_unparseable_ratings(tmp_path):
    path = write_text(tmp_path / "log.csv", ["1,2,5", "1,3,good"], "user_id,item_id,r")
    msg = fails(tmp_path, "data.format=csv", f"data.path={path}", "data.rating_col=r", "data.min_rating=3")
    assert "1 with a missing or unparseable rating in column 'r', first at" in msg


def test_malformed_lines_are_counted(tmp_path):
    lines = ["1::10::5::100", "1::20::5", "2::10::4::100", "2::20", "3::10::4::100"]
    path = write_text(tmp_path / "ratings.dat", lines)
    msg = fails(tmp_path, "data.format=movielens", f"data.path={path}")
    assert "2 malformed line(s) with the wrong number of fields" in msg and "'1::20::5'" in msg


def test_a_ratings_csv_with_the_wrong_header(tmp_path):
    path = write_text(tmp_path / "ratings.csv", ["1,2,3"], "user,item,rating")
    assert "starts with the header userId,movieId" in fails(tmp_path, "data.format=movielens", f"data.path={path}")


def test_not_movielens(tmp_path):
    path = write_text(tmp_path / "log.txt", ["a,b,c"])
    assert "does not look like a MovieLens ratings file" in fails(tmp_path, "data.format=movielens",
                                                                   f"data.path={path}")


def test_invalid_utf8(tmp_path):
    (tmp_path / "log.csv").write_bytes(b"user_id,item_id\n1,2\n\xff\xfe,3\n")
    msg = fails(tmp_path, "data.format=csv", f"data.path={tmp_path / 'log.csv'}")
    assert f"cannot read {tmp_path / 'log.csv'} as csv" in msg and "UTF8" in msg


def test_a_bad_line_in_a_later_block_is_reported(tmp_path):
    # 64-byte blocks: good blocks are read (and handed on) before the bad one is met
    rows = [f"{u},{i}" for u in range(20) for i in range(3)]
    path = write_text(tmp_path / "log.csv", rows + ["7"] + rows, "user_id,item_id")
    cfg = config(tmp_path / "run", "data.format=csv", f"data.path={path}")
    with pytest.raises(RaykdError, match=r"1 malformed line\(s\) with the wrong number of fields.*'7'"):
        prepare_in_pieces(cfg, 64)
    (tmp_path / "bad.csv").write_bytes(path.read_bytes() + b"\xff\xfe,3\n")
    cfg = config(tmp_path / "run", "data.format=csv", f"data.path={tmp_path / 'bad.csv'}")
    with pytest.raises(RaykdError, match=r"cannot read .*bad.csv as csv \(after .*bad.csv line \d+\).*UTF8"):
        prepare_in_pieces(cfg, 64)


def test_one_instant_gives_one_key_however_it_is_written_or_parsed():
    # arrow parses the first spelling, pandas the others (alone, or in a block with the first)
    spellings = pa.array(["2021-02-01 10:00:00.123456", "2021-02-01T10:00:00.123456Z",
                          "2021-02-01 11:00:00.123456+01:00"])
    src = logs.Source(0, "csv", time_col="ts")
    assert logs._times(spellings, src)[3].to_pylist() == spellings.to_pylist()  # date text: for the driver
    keys = {float(dates.parse(spellings[i:i + 1], None, "ts")[0]) for i in range(3)}
    keys |= set(dates.parse(spellings, None, "ts").tolist())
    stamp = pa.array([pd.Timestamp("2021-02-01 10:00:00.123456")], pa.timestamp("ns"))
    keys.add(float(logs._times(stamp, src)[0][0]))
    assert keys == {1612173600123456.0}
    # epoch nanoseconds as int64 are beyond float64's exact range: rounded, not an error
    ns = logs._times(pa.array([1612173600123456789, None]), src)
    assert ns[0][0] == pytest.approx(1612173600123456789, rel=1e-15) and ns[2].tolist() == [False, True]


@pytest.mark.parametrize("content, message", [
    ("user_id,item_id\n", "is not JSON Lines"),
    ('[{"user_id": 1, "item_id": 2}]\n', "line 1 holds a list"),
    ('{"user_id": 1, "item_id": 2}\n{"user_id": 1, \n', "cannot read"),
])
def test_bad_jsonl(tmp_path, content, message):
    (tmp_path / "log.jsonl").write_text(content)
    assert message in fails(tmp_path, "data.format=jsonl", f"data.path={tmp_path / 'log.jsonl'}")


def test_not_a_parquet_file(tmp_path):
    (tmp_path / "log.parquet").write_text("user_id,item_id\n1,2\n")
    assert "cannot read" in fails(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'log.parquet'}")


def test_one_bad_file_in_a_folder_is_named(tmp_path):
    write_text(tmp_path / "logs" / "a.csv", ["1,2", "1,3", "1,4"], "user_id,item_id")
    write_text(tmp_path / "logs" / "b.csv", ["2,2", "x"], "user_id,item_id")
    msg = fails(tmp_path, "data.format=csv", f"data.path={tmp_path / 'logs'}")
    assert str(tmp_path / "logs" / "b.csv") in msg and "malformed" in msg
