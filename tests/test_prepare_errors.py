"""The prepare stage on every kind of bad input: one clear paragraph, never a traceback. All tests
share one local Ray."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prepare_cases import ROWS, config, fails, prepare_in_pieces, write_text

from raykd.core.errors import RaykdError
from raykd.data import dates
from raykd.data import readers as logs

pytestmark = pytest.mark.usefixtures("ray_session")


# ------------------------------------------------------------------------------------- bad input


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
