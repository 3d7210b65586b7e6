"""Reliability of runs: secrets on the command line, interrupted stages, killed swaps, racing readers,
and resuming from a shared tune directory (issue 26, items 3, 4, 9, 11, 17).

The fault tests use real processes: a `raykd` stage or a swap run in a child that is killed at the
chosen moment, then the parent checks what the next run (or a reader) finds.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config
from safetensors.torch import load_file, save_file

from raykd import cli, jobs, stages
from raykd.core import rundir
from raykd.core.errors import RaykdError
from raykd.serve.recommender import Recommender, resolve_student

QUICKSTART = "configs/quickstart.yaml"
KEY = "s3cr3t-Key-4242"
CHILD_ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


# ---------------------------------------------------------------- 3. no API key on the command line

SPELLINGS = [f"serve.api_key={KEY}", f"serve.api_key ={KEY}", f" serve.api_key={KEY}", f"serve.api_key= {KEY}",
             f"serve={{api_key: {KEY}}}", f'serve={{"api_key": "{KEY}", "port": 8001}}',
             f"serve=api_key: {KEY}", f"serve={{<<: {{api_key: {KEY}}}}}", f"serve.api_key.x={KEY}",
             f"serve.api_key=[{KEY}]"]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_an_api_key_override_is_refused_in_every_spelling(tmp_path, capsys, spelling):
    (tmp_path / "afile").write_text("x")  # an unusable output_dir: a guard that misses fails fast
    bad_run = f"output_dir={tmp_path / 'afile' / 'run'}"
    for argv in (["serve", str(tmp_path), spelling], ["config", "show", QUICKSTART, spelling],
                 ["prepare", QUICKSTART, bad_run, spelling]):
        assert cli.main(argv) == 1, argv
        out, err = capsys.readouterr()
        assert "RAYKD_API_KEY" in err and "visible to every user" in err, (argv, err)
        assert KEY not in out + err
    assert jobs.main("prepare", ["--config", QUICKSTART, bad_run, spelling]) == 2
    out, err = capsys.readouterr()
    assert "RAYKD_API_KEY" in err and KEY not in out + err


def test_other_serve_overrides_and_a_null_key_still_load(tmp_path, capsys):
    assert cli.main(["config", "show", QUICKSTART, "serve.api_key_file=/k", "serve={port: 8001}"]) == 0
    assert "8001" in capsys.readouterr().out


def test_a_key_from_the_yaml_file_is_never_written_to_the_run_directory(tmp_path, ray_session, capsys):
    config = tmp_path / "c.yaml"
    text = Path(QUICKSTART).read_text() + f"\nserve:\n  api_key: {KEY}\n"
    config.write_text(text)
    run = tmp_path / "run"
    assert cli.main(["prepare", str(config), *TINY, f"output_dir={run}"]) == 0
    out, err = capsys.readouterr()
    assert KEY not in out + err
    leaks = [p for p in run.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert (run / "config.yaml").is_file() and (run / "logs" / "raykd.log").is_file() and not leaks


# ---------------------------------------------------------------- 4. an interrupted stage forgets nothing


@pytest.fixture
def finished_run(tiny_run, tmp_path) -> Path:
    """A copy of the tiny run with a tune winner recorded as the tune stage records it."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("ray_train", ".lock", "logs"))
    shutil.copytree(run / "student", run / "tune" / "best")
    rundir.record(run, rundir.TUNE_BEST, "tune", [rundir.DATA, rundir.SOFT_LABELS])
    return run


def kill_when(cmd: list[str], ready, timeout: float = 50.0) -> None:
    """Run `cmd` (with a local Ray of its own) in its own session and SIGKILL the whole process
    group, Ray's processes included, once `ready()` is true."""
    env = {k: v for k, v in CHILD_ENV.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"the stage ended before the chosen moment: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the chosen moment never came"
            time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def logged(run: Path, text: str):
    return lambda: text in ((run / "logs" / "raykd.log").read_text() if (run / "logs" / "raykd.log").exists() else "")


@pytest.mark.parametrize(("stage", "artifact", "extra", "moment"), [
    ("tune", rundir.TUNE_BEST, ["tune.enabled=true", "tune.num_samples=2"], "tune/search.json"),
    ("distill", rundir.STUDENT, ["distill.train.epochs=3", "distill.train_nokd=false"], "student: training"),
])
def test_a_killed_stage_leaves_the_previous_result_current(ray_session, finished_run, stage, artifact, extra,
                                                           moment):
    run = finished_run
    before = rundir.read_record(run)["artifacts"]
    files = {p.name: p.read_bytes() for p in (run / artifact).iterdir()}
    served = resolve_student(run)
    ready = (lambda: (run / moment).exists()) if "/" in moment else logged(run, moment)
    kill_when([sys.executable, "-m", "raykd", stage, QUICKSTART, *TINY, f"output_dir={run}", "ray.num_cpus=2", *extra],
              ready)
    assert rundir.read_record(run)["artifacts"] == before
    assert {p.name: p.read_bytes() for p in (run / artifact).iterdir()} == files
    assert rundir.current(run, artifact) == run / artifact
    assert resolve_student(run) == served == run / rundir.TUNE_BEST


# ---------------------------------------------------------------- 9. a swap killed between its renames

SWAPPER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from raykd.core import rundir
    root, point, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    real_replace, real_exchange, calls = os.replace, rundir._rename_exchange, []

    def killed_after(rename):  # the real rename, then this process dies at the chosen one
        def wrapped(src, dst):
            done = rename(src, dst)
            calls.append(dst)
            if armed and len(calls) == int(point):
                os.kill(os.getpid(), signal.SIGKILL)
            return done
        return wrapped

    armed = False
    os.replace = killed_after(real_replace)
    rundir._rename_exchange = killed_after(real_exchange) if mode == "swap" else lambda a, b: False
    with rundir.staged(root / "student") as tmp:
        (tmp / "model.json").write_text("B")
        rundir.write_manifest(tmp, "B")
        if point == "0":
            os.kill(os.getpid(), signal.SIGKILL)  # killed while writing the new version
        armed, calls[:] = True, []
""")


def make_version(root: Path, key: str) -> None:
    with rundir.staged(root / "student") as tmp:
        (tmp / "model.json").write_text(key)
        rundir.write_manifest(tmp, key)
    rundir.record(root, "student", "distill")


@pytest.mark.parametrize(("mode", "point", "survivor"), [("swap", "0", "A"), ("swap", "1", "B"), ("renames", "0", "A"),
                                                         ("renames", "1", "A"), ("renames", "2", "B")])
def test_the_sweep_recovers_a_swap_killed_at_any_point(tmp_path, mode, point, survivor):
    """0: killed while writing. With an atomic swap, 1: after the swap, before the old version is
    deleted. With two renames (systems without the swap), 1: between setting the old version aside
    and renaming the new one in; 2: after it. The next lock's sweep leaves one complete copy."""
    if mode == "swap" and not rundir._rename_exchange(tmp_path, tmp_path):
        pytest.skip("this system has no renameat2(RENAME_EXCHANGE)")
    make_version(tmp_path, "A")
    done = subprocess.run([sys.executable, "-c", SWAPPER, str(tmp_path), point, mode], env=CHILD_ENV, check=False,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL, done.stderr
    if (mode, point) == ("renames", "1"):
        assert not (tmp_path / "student").exists()  # the moment that matters: only the set-aside copies exist
    with rundir.lock(tmp_path):
        pass
    assert (tmp_path / "student" / "model.json").read_text() == survivor
    assert rundir.key_of(tmp_path / "student") == survivor
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "run.json", "student"]
    assert (rundir.current(tmp_path, "student") is not None) == (survivor == "A")  # the record lists A


def test_a_published_folder_never_goes_missing(tmp_path, monkeypatch):
    """A reader that opens the folder at any moment of a publication finds a complete version (the CI
    failure of stop 30: a reader fell between the two renames and found no model.json)."""
    if not rundir._rename_exchange(tmp_path, tmp_path):
        pytest.skip("this system has no renameat2(RENAME_EXCHANGE)")
    make_version(tmp_path, "A")
    target, found = tmp_path / "student", []
    real_replace, real_exchange = os.replace, rundir._rename_exchange

    def replace(src, dst):
        real_replace(src, dst)
        found.append((target / "model.json").read_text() if target.exists() else None)

    def exchange(a, b):
        done = real_exchange(a, b)
        found.append((target / "model.json").read_text())
        return done

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(rundir, "_rename_exchange", exchange)
    with rundir.staged(target) as tmp:
        (tmp / "model.json").write_text("B")
    assert found == ["B"] and (target / "model.json").read_text() == "B"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "student"]  # the previous version is gone


def test_a_reader_between_two_renames_waits_for_the_new_version(tmp_path):
    """Where there is no atomic swap: the model folder is missing while a set-aside copy exists, and
    the new version comes in a moment later. The reader gets it instead of "no model.json"."""
    import threading

    make_version(tmp_path, "A")
    target, aside, new = tmp_path / "student", tmp_path / ".student.old-0000abcd", tmp_path / ".student.staging-1"
    shutil.copytree(target, new)
    os.replace(target, aside)
    later = threading.Timer(0.3, os.replace, (new, target))
    later.start()
    try:
        assert rundir.served_model(target) == target
    finally:
        later.join()
    assert (target / "model.json").exists()


# ---------------------------------------------------------------- 11. readers racing a publishing process

PUBLISHER = textwrap.dedent("""
    import shutil, sys
    from pathlib import Path
    from raykd.core import rundir
    root, a, b = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    print("ready", flush=True)
    n = 0
    while not (root / "stop").exists():  # as a training run publishes: its lock, atomic publication
        with rundir.lock(root, "publisher"), rundir.staged(root / "student") as tmp:
            for f in (a, b)[n % 2].iterdir():
                shutil.copy2(f, tmp / f.name)
        n += 1
    print(n, flush=True)
""")


def test_readers_racing_a_publishing_process_never_mix_two_models(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("ray_train", ".lock", "logs", "tune"))
    a = shutil.copytree(run / "student", tmp_path / "a")
    b = shutil.copytree(run / "student", tmp_path / "b")
    save_file({k: v * 1.5 for k, v in load_file(str(b / "model.safetensors")).items()}, str(b / "model.safetensors"),
              metadata={"format": "pt"})
    (b / "model.json").write_text(json.dumps({**json.loads((b / "model.json").read_text()), "fingerprint": "b"}))
    (b / "metrics.json").write_text(json.dumps({"valid": {"ndcg@10": 0.1}, "best_epoch": 99}))
    weights = {"a": load_file(str(a / "model.safetensors")), "b": load_file(str(b / "model.safetensors"))}
    proc = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(run), str(a), str(b)], env=CHILD_ENV,
                            stdout=subprocess.PIPE, text=True)
    seen = set()
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(25):
            rec = Recommender(run / "student")
            version = "b" if rec.desc.get("fingerprint") == "b" else "a"
            assert (rec.describe()["metrics"]["best_epoch"] == 99) == (version == "b"), "JSON of two models"
            state = rec.model.state_dict()
            assert all(torch.equal(state[k], v) for k, v in weights[version].items()), "weights of the other model"
            seen.add(version)
    finally:
        (run / "stop").write_text("")
        published = int(proc.stdout.readline() or 0)
        proc.wait(timeout=30)
    assert published > 25 and seen == {"a", "b"}  # the reads really raced many publications


# ---------------------------------------------------------------- 17. no resume from a shared tune directory


class _Planted:
    """What someone with write access to a shared tune directory could leave: it runs on unpickling."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_tune_refuses_to_resume_from_a_directory_others_can_write(ray_session, finished_run, tmp_path):
    from raykd.stages.tune import search_key
    from raykd.training.plan import kd_settings

    cfg = tiny_config(finished_run, "tune.enabled=true", "tune.num_samples=2")
    _, upstream = kd_settings(cfg, "tune")
    key = search_key(cfg, "-".join(f"{k}:{v}" for k, v in sorted(upstream.items())))
    search = finished_run / "tune" / "search"
    search.mkdir()
    (finished_run / "tune" / "search.json").write_text(json.dumps({"key": key}))
    marker = tmp_path / "ran-code-from-the-run-directory"
    (search / "tuner.pkl").write_bytes(pickle.dumps(_Planted(marker)))
    os.chmod(search, 0o777)
    with pytest.raises(RaykdError, match=r"chmod -R g-w,o-w"):
        stages.run(cfg, ["tune"])
    assert not marker.exists()
    assert resolve_student(finished_run) == finished_run / rundir.TUNE_BEST  # the previous winner still counts


def test_an_interrupted_stage_records_the_outputs_it_already_published(ray_session, finished_run):
    """Ctrl-C while the KD curve trains, after the new student was published: the new student counts
    (it is the one in place), the curve's outputs not yet made stay as they were."""
    run = finished_run
    old = rundir.key_of(run / rundir.STUDENT)
    env = {k: v for k, v in CHILD_ENV.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "raykd", "distill", QUICKSTART, *TINY, f"output_dir={run}",
                             "ray.num_cpus=1", "distill.train.epochs=3", "distill.sizes=[4, 6]"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 50
        while rundir.key_of(run / rundir.STUDENT) in (None, old):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:] if proc.poll() else ""
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: the runs still training are stopped
        code, err = proc.wait(timeout=40), proc.stderr.read()
        # 130, or 1 when the Ctrl-C reached a training run first and it reported itself stopped
        assert code in (1, 130) and "internal error" not in err, err[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    arts = rundir.read_record(run)["artifacts"]
    assert arts[rundir.STUDENT]["key"] == rundir.key_of(run / rundir.STUDENT) != old
    assert rundir.current(run, rundir.STUDENT) == run / rundir.STUDENT
    assert rundir.curve(4, kd=True) not in arts and resolve_student(run) == run / rundir.TUNE_BEST
