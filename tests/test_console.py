"""The console (raykd.core.console, raykd.cluster.output.run_logs), `raykd init`, the bundled configs and stale reports.

No training here: worker output is fed to the log router as Ray would forward it, and stale
reports are made from hand-written manifests.
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path

import pytest

from raykd import cli
from raykd.cluster import output
from raykd.config import load_config
from raykd.core import console, rundir, staleness

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def level():
    """Set the console level for one test, NORMAL again after it."""
    yield console.set_level
    console.set_level(console.NORMAL)


def test_worker_lines_reach_the_console_as_raykds_and_ray_output_goes_to_the_log(tmp_path, capsys):
    batch = {"pid": 42, "ip": "10.0.0.1", "localhost": "10.0.0.1", "actor_name": "TrainController", "is_err": False,
             "lines": [f"{console.MARK}teacher: epoch 1/2 loss 4.0", "Requesting resources: {'CPU': 1.0} * 1",
                       f"{console.MARK_DETAIL}teacher: epoch 2/2 loss 3.9", "Traceback (most recent call last):"]}
    with output.run_logs(tmp_path / "logs"):
        output._route_worker_output(batch)
    assert capsys.readouterr().out == "teacher: epoch 1/2 loss 4.0\n"
    workers = (tmp_path / "logs" / "ray-workers.log").read_text()
    assert "(TrainController pid=42) Requesting resources" in workers and "Traceback" in workers
    assert "epoch" not in workers
    raykd_log = (tmp_path / "logs" / "raykd.log").read_text()
    assert "epoch 1/2" in raykd_log and "epoch 2/2" in raykd_log  # detail lines: logged, not shown


def test_verbose_shows_ray_output_and_detail_lines(tmp_path, capsys, level):
    level(console.VERBOSE)
    batch = {"pid": 7, "ip": "a", "localhost": "a", "task_name": "fit", "is_err": False,
             "lines": [f"{console.MARK_DETAIL}student: epoch 2/9", "Setting up process group"]}
    with output.run_logs(tmp_path / "logs"):
        output._route_worker_output(batch)
    out = capsys.readouterr().out
    assert "student: epoch 2/9" in out and "(fit pid=7) Setting up process group" in out


def test_quiet_keeps_the_console_to_the_result_and_the_log_to_everything(tmp_path, capsys, level):
    level(console.QUIET)
    with console.capture(tmp_path / "raykd.log"):
        print("prepare: 3 users")
        console.say("teacher: epoch 1/2")
    console.emit("pipeline finished", console.QUIET)
    assert capsys.readouterr().out == "pipeline finished\n"
    assert (tmp_path / "raykd.log").read_text() == "prepare: 3 users\nteacher: epoch 1/2\n"


def test_no_colour_codes_off_a_terminal(tmp_path, monkeypatch):
    terminal = io.StringIO()
    with open(tmp_path / "log", "w") as log_file:
        console.Tee(terminal, log_file, echo=True).write("\x1b[36m(pid=1)\x1b[0m hello\n")
    assert terminal.getvalue() == "(pid=1) hello\n" and (tmp_path / "log").read_text() == "(pid=1) hello\n"
    assert console.paint("x", "33", io.StringIO()) == "x"
    monkeypatch.setenv("NO_COLOR", "1")
    assert not console.use_color(io.StringIO())


def test_ray_python_logs_warnings_and_native_stderr_go_to_files(tmp_path):
    with output._python_logs(tmp_path / "driver.log", verbose=False):
        logging.getLogger("ray.data").info("Dataset execution finished")
        logging.getLogger("ray").warning("Token authentication is enabled")
        warnings.warn("a deprecated option", DeprecationWarning, stacklevel=1)
    text = (tmp_path / "driver.log").read_text()
    assert "execution finished" in text and "Token authentication" in text and "deprecated option" in text
    with output._native_stderr(tmp_path / "native.log"):
        os.write(2, b"[E core_worker.cc:2465] an actor warning\n")
    assert "core_worker.cc" in (tmp_path / "native.log").read_text()


def test_duration_progress_and_throttle():
    assert [console.duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]
    line = console.progress("embed_items", 250, 1000, start=0.0, unit="items encoded")
    assert line.startswith("embed_items: 250 of 1,000 items encoded (25%), ") and "ETA" in line
    throttle = console.Throttle(3600)
    assert [throttle.due(), throttle.due(), throttle.due(force=True)] == [True, False, True]
    assert console.unmark("  [raykd] x") == (console.NORMAL, "x") and console.unmark("plain") is None


# ---------------------------------------------------------------- the command line

def test_quiet_and_verbose_flags_before_or_after_the_command():
    parser = cli._parser()
    assert parser.parse_args(["-q", "prepare", "c.yaml"]).quiet
    args = parser.parse_args(["prepare", "c.yaml", "x=1", "-v"])
    assert args.verbose and not args.quiet and args.overrides == ["x=1"]
    assert parser.parse_args(["serve", "runs/x", "-q"]).quiet
    with pytest.raises(SystemExit):
        parser.parse_args(["prepare", "c.yaml", "-q", "-v"])


def test_init_copies_a_bundled_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init", "exp1"]) == 0
    cfg = load_config("exp1.yaml")
    assert cfg.name == "exp1" and cfg.output_dir == "runs/exp1"
    assert "raykd pipeline exp1.yaml" in capsys.readouterr().out
    assert cli.main(["init", "exp1"]) == 1 and "already exists" in capsys.readouterr().err
    assert cli.main(["init", "sub/exp2.yaml", "--example", "ml100k"]) == 0
    assert load_config("sub/exp2.yaml").data.format == "movielens"
    assert cli.main(["init", "x", "--example", "nope"]) == 1 and "quickstart" in capsys.readouterr().err
    assert cli.main(["init", "--list"]) == 0 and "quickstart" in capsys.readouterr().out


def test_the_bundled_configs_are_the_repository_configs():
    """configs/ (README, CI and tests use it) and raykd/configs/ (the wheel's copy) must not drift."""
    repo = {p.name: p.read_text() for p in (REPO / "configs").glob("*.yaml")}
    bundled = {p.name: p.read_text() for p in (REPO / "raykd" / "configs").glob("*.yaml")}
    assert repo == bundled, "copy configs/*.yaml to raykd/configs/ (or back)"
    assert set(cli.bundled_examples()) == {name[:-5] for name in repo} - {"serve"}


# ---------------------------------------------------------------- a report older than its models

def test_a_report_older_than_its_models_says_so(tmp_path):
    root = tmp_path
    for name in ("teacher", "student"):
        (root / name).mkdir()
        rundir.write_manifest(root / name, f"{name}-1")
    (root / "report.json").write_text(json.dumps({"models": staleness.model_keys(root, ["teacher", "student"])}))
    (root / "report.md").write_text("# raykd report\n")
    assert staleness.mark_stale(root) == []
    assert (root / "report.md").read_text() == "# raykd report\n"

    rundir.write_manifest(root / "student", "student-2")  # `raykd distill` trained it again
    (root / "tune" / "best").mkdir(parents=True)
    rundir.write_manifest(root / "tune" / "best", "winner")  # and `raykd tune` made a winner
    reasons = staleness.mark_stale(root)
    assert reasons == ["student/ was trained again after this report",
                       "tune/best/ was trained after this report and is not in it"]
    staleness.mark_stale(root)  # a second time: still one banner
    md = (root / "report.md").read_text()
    assert md.startswith("> **STALE**") and md.count("STALE") == 1 and md.endswith("# raykd report\n")
    assert json.loads((root / "report.json").read_text())["stale"] == reasons
