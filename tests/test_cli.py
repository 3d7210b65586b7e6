"""The `raykd` command: exit codes, one-paragraph errors without tracebacks, and `raykd synth`."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from raykd import cli
from raykd.stages import prepare

QUICKSTART = "configs/quickstart.yaml"


def raykd(*args, timeout=300):
    """Run the installed console script as a user would."""
    env = {**os.environ, "RAY_DEDUP_LOGS": "1"}
    return subprocess.run(["raykd", *map(str, args)], check=False, capture_output=True, text=True, timeout=timeout, env=env)


def error_line(stderr: str) -> str:
    """The error paragraph raykd printed (Ray's own log lines, e.g. start-up warnings, aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("raykd ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "prepare" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["data.format=csv", "data.path=/nonexistent/ratings.csv"], "data.path /nonexistent/ratings.csv does not exist"),
    (["data.format=xml"], "data.format: Input should be 'movielens', 'csv', 'parquet', 'jsonl' or 'synthetic'"),
    (["data.fromat=csv"], "unknown key 'data.fromat'; valid keys here: format, path"),
])
def test_bad_input_exits_non_zero_with_one_paragraph_and_no_traceback(tmp_path, overrides, message):
    res = raykd("prepare", QUICKSTART, f"output_dir={tmp_path}", *overrides)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert message in res.stderr
    assert res.stderr.startswith("raykd prepare: error:")


def test_missing_config_file(tmp_path):
    res = raykd("prepare", tmp_path / "nope.yaml")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "config file not found" in error_line(res.stderr)


def test_bad_rows_found_by_ray_tasks_still_give_a_clean_error(tmp_path):
    # this error is found after Ray started, in the read tasks and on the driver: still no traceback
    (tmp_path / "log.csv").write_text("user_id,item_id,ts\n1,2,100\n1,3,later\n")
    res = raykd("prepare", QUICKSTART, f"output_dir={tmp_path / 'run'}", "data.format=csv",
                f"data.path={tmp_path / 'log.csv'}", "data.time_col=ts")
    assert res.returncode == 1
    assert "Traceback" not in res.stderr
    assert "1 with a missing or unparseable timestamp in column 'ts'" in error_line(res.stderr)


def test_in_process_errors_and_debug(tmp_path, capsys, ray_session):
    (tmp_path / "log.csv").write_text("user_id,item_id\n1,2\n,3\n")
    args = ["prepare", QUICKSTART, f"output_dir={tmp_path / 'run'}", "data.format=csv",
            f"data.path={tmp_path / 'log.csv'}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "1 of 2 rows are invalid: 1 with a missing user id in column 'user_id'" in error_line(err)
    assert cli.main(args + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_prepare_through_the_cli(tmp_path, capsys, ray_session):
    rows = "".join(f"{u},{i}\n" for u in "abc" for i in (1, 2, 3))
    (tmp_path / "log.csv").write_text("user_id,item_id\n" + rows)
    assert cli.main(["prepare", QUICKSTART, f"output_dir={tmp_path / 'run'}", "data.format=csv",
                     f"data.path={tmp_path / 'log.csv'}", "data.min_user_interactions=3",
                     "data.min_item_interactions=1"]) == 0
    assert "3 users, 3 items, 9 interactions" in capsys.readouterr().out
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert (tmp_path / "run" / "data" / "stats.json").is_file()


def test_an_internal_error_is_one_line_unless_debug(monkeypatch, capsys):
    def broken(cfg):
        raise ValueError("boom\nsecond line")

    monkeypatch.setattr(prepare, "run", broken)
    assert cli.main(["prepare", QUICKSTART]) == 1
    err = capsys.readouterr().err
    assert "internal error: ValueError: second line" in err and "--debug" in err and "Traceback" not in err
    assert cli.main(["prepare", QUICKSTART, "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ synth


def synth(out, *extra) -> int:
    return cli.main(["synth", "--users", "300", "--items", "60", "--mean-length", "12", "--clusters", "4",
                     "--out", str(out), *extra])


def test_synth_is_seeded_and_deterministic(tmp_path, capsys):
    assert synth(tmp_path / "a.parquet") == 0
    assert synth(tmp_path / "b.parquet") == 0
    assert synth(tmp_path / "c.parquet", "--seed", "1") == 0
    assert "synth: wrote" in capsys.readouterr().out
    a = (tmp_path / "a.parquet").read_bytes()
    assert a == (tmp_path / "b.parquet").read_bytes()
    assert a != (tmp_path / "c.parquet").read_bytes()
    log = pq.read_table(tmp_path / "a.parquet").to_pandas()
    assert list(log.columns) == ["user_id", "item_id", "timestamp"]
    assert sorted(log.user_id.unique()) == list(range(1, 301))
    assert log.item_id.between(1, 60).all()
    assert log.groupby("user_id").size().min() >= 3
    assert log.groupby("user_id").timestamp.apply(lambda t: t.is_monotonic_increasing).all()


def test_synth_has_structure_a_sequence_model_can_use(tmp_path):
    """Next item from the last item (a bigram table) beats most-popular on held-out users."""
    assert synth(tmp_path / "log.parquet", "--users", "2000") == 0
    log = pq.read_table(tmp_path / "log.parquet").to_pandas()
    log["prev"] = log.groupby("user_id").item_id.shift()
    last = log.groupby("user_id").tail(1)
    train = log[log.user_id <= 1600].dropna()
    test = last[last.user_id > 1600]
    popular = set(train.item_id.value_counts().index[:10])
    bigram = train.groupby("prev").item_id.agg(lambda s: set(s.value_counts().index[:10]))
    hr_pop = np.mean([i in popular for i in test.item_id])
    hr_seq = np.mean([i in bigram.get(p, set()) for p, i in zip(test.prev, test.item_id)])
    assert hr_pop > 0.05  # popularity is a real baseline
    assert hr_seq > hr_pop + 0.2


def test_synth_bad_arguments(tmp_path, capsys):
    assert cli.main(["synth", "--users", "0", "--out", str(tmp_path / "a.parquet")]) == 1
    assert "raykd synth: error: bad synth arguments: --users: Input should be greater than or equal to 1" in (
        capsys.readouterr().err)
    assert cli.main(["synth", "--markov", "2", "--out", str(tmp_path / "a.parquet")]) == 1
    assert "--markov" in capsys.readouterr().err
    assert cli.main(["synth", "--out", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err


def test_synth_console_script(tmp_path):
    res = raykd("synth", "--users", "20", "--items", "10", "--out", tmp_path / "s.parquet")
    assert res.returncode == 0, res.stderr
    assert pd.read_parquet(tmp_path / "s.parquet").user_id.nunique() == 20


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "raykd.cli"], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "usage: raykd" in res.stdout
