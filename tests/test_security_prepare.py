"""Prepare is never silently wrong: one date format per column, NaN ids are missing ids, padded ids
are one id (and counted). Tiny logs written here; one local Ray (the `ray_session` fixture)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.config import load_config
from raykd.core.errors import RaykdError
from raykd.stages import prepare

pytestmark = pytest.mark.usefixtures("ray_session")
LOOSE = ["data.min_user_interactions=3", "data.min_item_interactions=1"]


def run(tmp_path, *overrides):
    return prepare.run(load_config(None, [f"output_dir={tmp_path / 'run'}", *LOOSE, *overrides]))


def sequences(data_dir) -> dict:
    users = pq.read_table(data_dir / "users.parquet")["raw_id"].to_pylist()
    items = [None, *pq.read_table(data_dir / "items.parquet")["raw_id"].to_pylist()]
    seq = pq.read_table(data_dir / "sequences").to_pydict()
    return {users[u]: [items[i] for i in [*train, v, t]]
            for u, train, v, t in zip(seq["user"], seq["train"], seq["valid"], seq["test"])}


def csv(tmp_path, rows, header="user_id,item_id,ts"):
    path = tmp_path / "log.csv"
    path.write_text(header + "\n" + "".join(f"{r}\n" for r in rows))
    return ["data.format=csv", f"data.path={path}"]


# ------------------------------------------------------------------------------------------ dates

def test_day_first_dates_are_read_day_first_throughout_the_column(tmp_path):
    # a per-value guess read 12/01/2020 as 1 December but 13/01/2020 as 13 January
    rows = ["u,a,13/01/2020", "u,b,12/01/2020", "u,c,02/02/2020", "u,d,14/01/2020"]
    data = run(tmp_path, *csv(tmp_path, rows), "data.time_col=ts")
    assert sequences(data) == {"u": ["b", "a", "d", "c"]}


def test_month_first_dates_are_read_month_first_throughout_the_column(tmp_path):
    rows = ["u,a,01/13/2020", "u,b,12/01/2020", "u,c,02/02/2020", "u,d,01/14/2020"]
    assert sequences(run(tmp_path, *csv(tmp_path, rows), "data.time_col=ts")) == {"u": ["a", "d", "c", "b"]}


def test_ambiguous_dates_are_refused_until_data_time_format_says_how_to_read_them(tmp_path):
    rows = ["u,a,12/01/2020", "u,b,11/02/2020", "u,c,03/04/2020"]
    with pytest.raises(RaykdError, match=r"ambiguous.*'12/01/2020'.*data.time_format"):
        run(tmp_path, *csv(tmp_path, rows), "data.time_col=ts")
    day_first = run(tmp_path, *csv(tmp_path, rows), "data.time_col=ts", "data.time_format=%d/%m/%Y")
    assert sequences(day_first) == {"u": ["a", "b", "c"]}  # 12 Jan, 11 Feb, 3 Apr
    month_first = run(tmp_path, *csv(tmp_path, rows), "data.time_col=ts", "data.time_format=%m/%d/%Y")
    assert sequences(month_first) == {"u": ["c", "b", "a"]}  # 4 Mar, 2 Nov, 1 Dec


def test_time_format_applies_to_every_value_even_number_like_ones(tmp_path):
    rows = ["u,a,20200301", "u,b,20200115", "u,c,20200201"]
    data = run(tmp_path, *csv(tmp_path, rows), "data.time_col=ts", "data.time_format=%Y%m%d")
    assert sequences(data) == {"u": ["b", "c", "a"]}
    with pytest.raises(RaykdError, match=r"1 with a missing or unparseable timestamp.*data.time_format"):
        run(tmp_path, *csv(tmp_path, [*rows, "u,d,2020-03-04"]), "data.time_col=ts", "data.time_format=%Y%m%d")


def test_dates_in_two_files_or_blocks_use_one_format(tmp_path):
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "a.csv").write_text("user_id,item_id,ts\nu,a,05/01/2020\nu,b,06/01/2020\n")
    (tmp_path / "logs" / "b.csv").write_text("user_id,item_id,ts\nu,c,13/01/2020\nu,d,07/01/2020\n")
    data = run(tmp_path, "data.format=csv", f"data.path={tmp_path / 'logs'}", "data.time_col=ts")
    assert sequences(data) == {"u": ["a", "b", "d", "c"]}  # 5, 6, 7, 13 January


def test_time_format_needs_a_time_column():
    with pytest.raises(RaykdError, match="data.time_format is set but there is no date column"):
        load_config(None, ["data.format=csv", "data.path=x.csv", "data.time_format=%d/%m/%Y"])
    with pytest.raises(RaykdError, match="strptime format"):
        load_config(None, ["data.format=csv", "data.path=x.csv", "data.time_col=t", "data.time_format=dd/mm"])


def test_parse_keeps_one_format_on_its_own():
    from raykd.data import dates

    keys = dates.parse(pa.array(["12/01/2020", None, "13/01/2020", "12/01/2020"]), None, "ts")
    assert np.isnan(keys[1]) and keys[0] == keys[3] and keys[2] - keys[0] == 86400e6


# -------------------------------------------------------------------------------------------- ids

def test_nan_ids_in_parquet_are_missing_ids_never_an_item_called_nan(tmp_path):
    # NaN values, not nulls (pandas would write NaN as null): what Spark or NumPy exports hold
    pq.write_table(pa.table({"user_id": pa.array([1.0, 1, 1, 2, 2, 2]),
                             "item_id": pa.array([10.0, np.nan, 30, 10, 20, 30])}), tmp_path / "log.parquet")
    assert pq.read_table(tmp_path / "log.parquet")["item_id"].null_count == 0
    with pytest.raises(RaykdError, match=r"1 with a missing item id in column 'item_id', first at .* row 2"):
        run(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'log.parquet'}")
    pq.write_table(pa.table({"user_id": pa.array([np.nan, 1, 1, 1]), "item_id": pa.array([5.0, 10, 20, 30])}),
                   tmp_path / "log.parquet")
    with pytest.raises(RaykdError, match=r"1 with a missing user id"):
        run(tmp_path, "data.format=parquet", f"data.path={tmp_path / 'log.parquet'}")


def test_padded_ids_are_one_id_and_are_counted(tmp_path):
    rows = ["7,a ,1", " 7,b,2", "7 ,\tc,3", "8,a,1", "8, b,2", "8,c,3"]
    data = run(tmp_path, *csv(tmp_path, rows), "data.time_col=ts")
    assert sequences(data) == {7: ["a", "b", "c"], 8: ["a", "b", "c"]}
    assert pq.read_schema(data / "users.parquet").field("raw_id").type == pa.int64()  # ' 7' is 7
    s = json.loads((data / "stats.json").read_text())
    assert s["normalised_ids"] == {"user_whitespace_stripped": 2, "item_whitespace_stripped": 3}


def test_padded_ids_in_jsonl_and_a_blank_id(tmp_path):
    lines = [{"user_id": "u ", "item_id": 1}, {"user_id": "u", "item_id": 2}, {"user_id": " u", "item_id": 3},
             {"user_id": "  ", "item_id": 4}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(RaykdError, match=r"1 with a missing user id in column 'user_id'.*line 4"):
        run(tmp_path, "data.format=jsonl", f"data.path={tmp_path / 'log.jsonl'}")
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    assert sequences(run(tmp_path, "data.format=jsonl", f"data.path={tmp_path / 'log.jsonl'}")) == {"u": [1, 2, 3]}
