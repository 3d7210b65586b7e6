"""raykd recommend under bad inputs and faults (issue 26, items 8 and 12): ids read as prepare reads
them, and an output that is whole or absent, whatever runs beside it or kills it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raykd.core import ids
from raykd.serve import recommend

SCHEMA = pa.schema([("user_id", pa.int64()), ("items", pa.list_(pa.int64())), ("scores", pa.list_(pa.float64()))])


# ---------------------------------------------------------------- item 8: the ids of --users


def test_a_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    (tmp_path / "users.txt").write_bytes("\ufeff17\n18\n".encode())
    assert recommend.read_user_list(str(tmp_path / "users.txt")) == ["17", "18"]
    (tmp_path / "users.csv").write_bytes("\ufeffuser_id\n17\n".encode())
    assert recommend.read_user_list(str(tmp_path / "users.csv")) == ["17"]


def test_text_ids_keep_what_prepare_keeps(tmp_path):
    # prepare strips ASCII whitespace only (raykd.core.ids rule 1): a non-breaking space is part of the id
    lines = ["\xa0u1\xa0 ", "\tu2\r", "\u2003u3"]
    (tmp_path / "users.txt").write_text("\n".join(lines) + "\n \n")
    prepared = ids.strip_text(pa.array(lines))[0].to_pylist()
    assert prepared == ["\xa0u1\xa0", "u2", "\u2003u3"]
    assert recommend.read_user_list(str(tmp_path / "users.txt")) == prepared


def test_parquet_int64_ids_with_a_null_keep_every_digit(tmp_path):
    big = [2**53 + 1, 2**62 + 3, -(2**60) - 1]
    pq.write_table(pa.table({"user_id": pa.array([big[0], None, big[1], big[2]], pa.int64())}),
                   tmp_path / "users.parquet")
    assert recommend.read_user_list(str(tmp_path / "users.parquet")) == big


# ---------------------------------------------------------------- item 12: the output file


def slow_tables(tag: int, n: int = 4, pause: float = 0.25):
    for i in range(n):
        time.sleep(pause)
        yield pa.table({"user_id": [tag * 100 + i], "items": [[tag, i]], "scores": [[1.0, 0.5]]}, schema=SCHEMA)


def _write(out: str, tag: int, start_at: float) -> None:
    time.sleep(max(0.0, start_at - time.time()))  # both processes write at once
    recommend.write(slow_tables(tag), SCHEMA, Path(out), 4, time.perf_counter())


def test_two_concurrent_writers_leave_one_whole_file(tmp_path):
    out = tmp_path / "recs.parquet"
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3  # after both interpreters are up
    procs = [ctx.Process(target=_write, args=(str(out), tag, start_at)) for tag in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    table = pq.read_table(out)
    assert table.equals(pa.concat_tables(slow_tables(1, pause=0))) or table.equals(
        pa.concat_tables(slow_tables(2, pause=0)))
    assert sorted(os.listdir(tmp_path)) == ["recs.parquet"]  # no temporary file left


def test_a_run_killed_midway_leaves_the_old_output_and_no_side_file(tiny_run, tmp_path):
    out = tmp_path / "recs.parquet"
    old = pa.table({"user_id": [1], "items": [[2]], "scores": [[0.5]]}, schema=SCHEMA)
    pq.write_table(old, out)
    (tmp_path / "users.txt").write_text("nobody\n" + "\n".join(
        str(u) for u in pq.read_table(tiny_run / "data" / "users.parquet")["raw_id"].to_pylist()) + "\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-m", "raykd", "recommend", str(tiny_run), "--out", str(out),
                             "--users", str(tmp_path / "users.txt"), "--k", "3"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # the plan is made, the unknown id found: scoring is about to start
            if line.startswith("recommend: top-"):
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(60)
    assert proc.returncode == -signal.SIGKILL
    assert pq.read_table(out).equals(old)  # the previous output untouched
    assert not recommend.unknown_users_path(out).exists()  # unknown users only from a run that succeeded
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".csv")]
