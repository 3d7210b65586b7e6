"""`raykd recommend` reliability (issue 26 items 8 and 12): ids read as prepare reads them; no shared
temporary file; the unknown-users list only once the recommendations are written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq

from raykd.serve import recommend

# ---------------------------------------------------------------- 8. the users file


def test_a_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    for name, text in (("users.txt", "\ufeffu1\nu2\n"), ("users.csv", "\ufeffuser_id\nu1\nu2\n")):
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        assert recommend.read_user_list(str(path)) == ["u1", "u2"], name


def test_only_ascii_whitespace_is_stripped_as_prepare_does(tmp_path):
    path = tmp_path / "users.txt"
    path.write_text("\u00a0u1\u00a0\n  u2\t\n", encoding="utf-8")  # prepare keeps non-breaking spaces
    assert recommend.read_user_list(str(path)) == ["\u00a0u1\u00a0", "u2"]


def test_parquet_int64_ids_with_a_null_keep_every_digit(tmp_path):
    big = 2**53 + 1  # not representable as a float64
    path = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user_id": pa.array([big, None, 7], pa.int64())}), path)
    assert recommend.read_user_list(str(path)) == [big, 7]


# ---------------------------------------------------------------- 12. concurrent and interrupted runs

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import pyarrow as pa
    from raykd.serve import recommend

    out, tag, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    schema = pa.schema([("user_id", pa.string())])

    def tables():
        for i in range(n):
            time.sleep(0.05)
            yield pa.table({"user_id": [f"{tag}{i}"]}, schema=schema)

    recommend.write(tables(), schema, out, n, time.perf_counter())
    print("done", flush=True)
""")


def test_two_concurrent_runs_into_one_file_both_finish_and_leave_a_whole_file(tmp_path):
    out = tmp_path / "recs.parquet"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(out), tag, str(n)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag, n in (("a", 20), ("b", 30))]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    ids = pq.read_table(out)["user_id"].to_pylist()
    assert ids in ([f"a{i}" for i in range(20)], [f"b{i}" for i in range(30)])  # one run's file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["recs.parquet"]  # no temporary left behind


def test_an_interrupted_run_writes_no_unknown_users_list(tiny_run, tmp_path):
    users = tmp_path / "users.txt"
    known = pq.read_table(tiny_run / "data" / "users.parquet")["raw_id"].to_pylist()[:3]
    users.write_text("\n".join([*map(str, known), "nobody-1", "nobody-2"]) + "\n")
    out = tmp_path / "recs.parquet"
    proc = subprocess.Popen(["raykd", "recommend", str(tiny_run), "--users", str(users), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    deadline = time.monotonic() + 120
    for line in proc.stdout:  # the plan is made: stop it before it scores
        seen.append(line)
        if line.startswith("recommend: top-") or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert any(line.startswith("recommend: top-") for line in seen), seen
    assert not out.exists() and not recommend.unknown_users_path(out).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    # and a run that finishes lists them
    subprocess.run(["raykd", "recommend", str(tiny_run), "--users", str(users), "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    assert pq.read_table(out).num_rows == 3
    listed = recommend.unknown_users_path(out).read_text().split()
    assert listed == ["user_id", "nobody-1", "nobody-2"]
