"""`raykd recommend` reliability (issue 26 items 8 and 12, issue 24 item 3): ids read as prepare reads
them; parts written whole or not at all, one run per set of arguments, a killed run resumed exactly;
the unknown-users list only once the recommendations are written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raykd.core.errors import RaykdError
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

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from raykd.serve import recommend

    with recommend.hold(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_run_with_the_same_arguments_stops_at_once_and_says_why(tmp_path):
    staging = tmp_path / ".recs.parquet.parts-0123"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(staging)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RaykdError, match="another raykd recommend with the same arguments is writing"), \
                recommend.hold(staging):
            pass
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with recommend.hold(staging):  # a killed holder releases it
        assert staging.is_dir()


def test_a_part_is_written_whole_or_not_at_all(tmp_path):
    table = pa.table({"user_id": pa.array([1, 2], pa.int64())})
    recommend.write_part(table, tmp_path / "part-000000.parquet")
    assert pq.read_table(tmp_path / "part-000000.parquet").equals(table)
    assert [p.name for p in tmp_path.iterdir()] == ["part-000000.parquet"]  # no temporary left behind


def test_broken_and_temporary_parts_are_dropped_and_whole_ones_kept(tmp_path, capsys):
    schema = pa.schema([("user_id", pa.int64())])
    parts = [{"part": i, "users": 2} for i in range(4)]
    recommend.write_part(pa.table({"user_id": [1, 2]}, schema=schema), tmp_path / recommend.part_name(0))
    recommend.write_part(pa.table({"user_id": [1]}, schema=schema), tmp_path / recommend.part_name(1))  # short
    (tmp_path / recommend.part_name(2)).write_bytes(b"PAR1 truncated")  # not Parquet
    (tmp_path / f".{recommend.part_name(3)}.abcd1234").write_bytes(b"half")  # a writer killed before its rename
    assert recommend.kept_parts(tmp_path, parts, schema) == {0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [recommend.part_name(0)]
    assert "part-000001.parquet is not a whole part" in capsys.readouterr().err


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
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert all(name.startswith(".recs.parquet.parts-") for name in left), left  # only what a rerun resumes from

    # and a run that finishes lists them
    subprocess.run(["raykd", "recommend", str(tiny_run), "--users", str(users), "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    assert pq.read_table(out).num_rows == 3
    listed = recommend.unknown_users_path(out).read_text().split()
    assert listed == ["user_id", "nobody-1", "nobody-2"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # published: nothing left



def test_a_sigkilled_run_resumes_from_its_parts_and_gives_the_uninterrupted_output(tiny_run, tmp_path):
    """SIGKILL the driver once some parts are written; the rerun keeps them, scores the rest, and the
    output is exactly an uninterrupted run's (a different part size too: parts do not change rows)."""
    flags = ["--k", "7", "--part-users", "8", "--batch-size", "4"]
    out = tmp_path / "recs.parquet"
    proc = subprocess.Popen(["raykd", "recommend", str(tiny_run), "--out", str(out), *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline, parts = time.monotonic() + 240, []
    while time.monotonic() < deadline and proc.poll() is None:
        parts = list(tmp_path.glob(".recs.parquet.parts-*/part-*.parquet"))
        if len(parts) >= 2:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)  # the driver, for real: no cleanup runs
    proc.wait(timeout=60)
    (staging,) = tmp_path.glob(".recs.parquet.parts-*[!k]")  # the folder, not its lock
    written = sorted(p.name for p in staging.glob("part-*.parquet"))
    planned = -(-pq.ParquetFile(tiny_run / "data" / "users.parquet").metadata.num_rows // 8)
    assert not out.exists() and 2 <= len(written) < planned, (written, planned)
    (staging / f".{recommend.part_name(planned - 1)}.deadbeef").write_bytes(b"half a part")  # a killed writer's

    res = subprocess.run(["raykd", "recommend", str(tiny_run), "--out", str(out), *flags],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert f"resuming: {len(written)} parts" in res.stdout + res.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    uninterrupted = tmp_path / "whole.parquet"
    subprocess.run(["raykd", "recommend", str(tiny_run), "--out", str(uninterrupted), "--k", "7"],
                   check=True, capture_output=True, timeout=300)
    assert pq.read_table(out).equals(pq.read_table(uninterrupted))
    assert sorted(p.name for p in out.iterdir()) == sorted([*(recommend.part_name(i) for i in range(planned)),
                                                             recommend.MANIFEST])
