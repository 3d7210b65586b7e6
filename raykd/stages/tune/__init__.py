"""tune: search temperature, alpha, student size and learning rate with Ray Tune + Optuna.

Reads `<run>/data/` and `<run>/soft_labels/` (and `teacher/model.json` for size ratios); writes

    <run>/tune/search/         the Ray Tune experiment (state for resume, per-trial results; an
                               in-process trial's checkpoints in `trial_<trial id>/`)
    <run>/tune/train/          trials on Ray Train: one run per trial, `trial_<trial id>/` (checkpoints)
    <run>/tune/trials.parquet  one row per trial: searched values, val NDCG@10, params, latency,
    <run>/tune/trials.csv      state, timings (the same table twice)
    <run>/tune/best.yaml       the winning values, as a config fragment
    <run>/tune/best/           the winner, exported as a servable student (model.safetensors ...)
    <run>/tune/*.png           val NDCG vs params (Pareto front marked), vs temperature, vs alpha
    <run>/tune/summary.json    settings fingerprint, winner and why it won

How a search runs (Ray 2.60, Train V2):

- Each trial is a Tune *function* trainable (raykd.stages.tune.trial). A student on one CPU worker
  (`distill.train.num_workers: 1`, no GPU) trains inside the trial itself, with the loop of
  `loop.fit_local` on windows it streams from the shards (loop.streamed_batches): the
  trial claims `tune.cpus_per_trial` CPUs, reports and checkpoints every epoch to Tune, and
  trial actors are reused, so a trial costs its epochs and little else. Otherwise the trial
  builds and fits one `TorchTrainer` (`train.make_trainer`) named `trial_<trial id>`;
  `TuneReportCallback` forwards every epoch's Train report (val NDCG@10 and the checkpoint path)
  to Tune. That trial driver claims only the zero-CPU custom resource `DRIVER_RESOURCE`, so CPUs
  go to Train workers (`tune.cpus_per_trial` each) and at least one whole CPU stays free for Ray
  Data's read tasks: a trial driver or Train worker holding every CPU leaves Ray Data waiting
  forever (the deadlock a 2-core machine hits first).
- `OptunaSearch` (TPE, seeded) proposes values; in `objective: pareto` it is multi-objective
  (maximise val NDCG@10, minimise params or latency). `ASHAScheduler` stops trials that are behind
  at `grace_period`, 2x, 4x ... epochs in `objective: ndcg`; pareto mode runs every trial to the
  end, because ASHA compares NDCG alone and would stop exactly the small students it looks for.
- `tune.time_budget_s` stops *starting* trials once spent (running trials finish), so no trial
  is cut short; the time spent survives an interrupt.
- Resume: the experiment lives in `<run>/tune/search/` with a fingerprint of its settings. Running
  again after Ctrl-C or a killed driver restores it (`Tuner.restore`): finished trials are kept,
  unfinished ones restart and resume from their last epoch checkpoint (the one Tune holds, or
  their Train run's). A finished search with the same settings is reused; different settings
  start a new search.

The winner: `objective: ndcg` takes the best val NDCG@10; `pareto` takes the smallest student
within `max_quality_drop` (relative) of the best val NDCG@10 (`pick_winner`). Test metrics of
`tune/best/` are computed by the evaluate stage (`report.json`, key `tune_best`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
from ray.tune import Callback
from ray.tune.search.optuna import OptunaSearch

from raykd.cluster import ray_private, tracking
from raykd.cluster.needs import DRIVER_RESOURCE
from raykd.cluster.runtime import own_signal_handlers
from raykd.config import Config, TuneConfig, section_hash
from raykd.core import console, rundir
from raykd.core.errors import RaykdError
from raykd.stages.tune import trial as tune_trial
from raykd.stages.tune.report import METRIC, SIZE_METRICS, analyse, experiment_trials, fmt
from raykd.stages.tune.space import configured_point, parse_space
from raykd.stages.tune.trial import run_trial, trial_spec
from raykd.training.plan import kd_settings

# Fixed cost of one trial beyond its epochs, measured on 2 busy cores: the floor for the
# time-budget check. On Ray Train: the trial actor, Train controller and worker start, dataset;
# in the trial process: the trial actor and its first read of the shards (median overhead 0.6 s).
TRIAL_STARTUP_S = 15.0
IN_PROCESS_STARTUP_S = 2.0
ASHA_REDUCTION = 2  # keep the better half at each rung: with a handful of trials 4 is too eager


# ---------------------------------------------------------------- the stage

def run(cfg: Config) -> dict:
    """Search, or resume or reuse a search; write the trials table, best.yaml, best/ and plots."""
    tc = cfg.tune
    run_dir = Path(cfg.output_dir).resolve()
    if not tc.enabled:
        rundir.forget(run_dir, "tune")  # a search that is off describes no current model
        print("tune: skipped (tune.enabled is false)", flush=True)
        return {}
    # the previous winner stays recorded until a new one is in place: an interrupted search keeps it
    # every config mistake is reported before any work
    space = parse_space(cfg)
    check_budget(cfg, run_dir)
    _, upstream = kd_settings(cfg, "tune")
    out = run_dir / rundir.TUNE
    if (out / "search").exists():  # Tune's resume state and trial records are pickles: trust only our own
        rundir.check_private(run_dir, out / "search", "resuming the tune search")
    key = search_key(cfg, "-".join(f"{k}:{v}" for k, v in sorted(upstream.items())))
    summary = rundir.read_json(out / "summary.json")
    if (summary.get("key") == key and summary.get("max_quality_drop") == tc.max_quality_drop
            and rundir.key_of(run_dir / rundir.TUNE_BEST) is not None):
        print(f"tune: reusing {out} (same search settings and inputs): winner {summary['winner']['trial_id']}, "
              f"val NDCG@10 {summary['winner']['val_ndcg@10']:.4f}", flush=True)
        summary = {**summary, "reused": True}
    else:
        if not (rundir.read_json(out / "search.json").get("key") == key and _complete(out / "search", tc)):
            _search(cfg, space, run_dir, out, key)
        summary = analyse(cfg, out, key, trial_spec(cfg, rundir.TUNE_BEST, upstream))
    rundir.record(run_dir, rundir.TUNE_BEST, "tune", list(upstream))
    return summary


def check_budget(cfg: Config, run_dir: Path) -> None:
    """A time budget shorter than one trial would make a search of one trial: refuse it."""
    tc = cfg.tune
    estimate = trial_estimate_s(run_dir, cfg)
    if tc.time_budget_s is not None and tc.time_budget_s < estimate:
        raise RaykdError(
            f"tune.time_budget_s={tc.time_budget_s:g} is too small to finish one trial: a trial takes about "
            f"{estimate:.0f} s here ({_estimate_basis(run_dir, cfg)}), so no trial after the first would start. "
            f"Set it to at least {math.ceil(estimate)} s (about {math.ceil(estimate) * tc.num_samples} s for all "
            f"{tc.num_samples} trials) or remove it.")


def search_key(cfg: Config, upstream: str) -> str:
    """Fingerprint of what the trials depend on; resources and the pick rule are left out."""
    tc = cfg.tune.model_copy(update={"enabled": True, "max_quality_drop": 0.0, "max_concurrent_trials": 1,
                                     "cpus_per_trial": 1.0})
    return f"{section_hash(cfg.distill, tc)}-{cfg.seed}-{upstream}"


def trial_estimate_s(run_dir: Path, cfg: Config) -> float:
    """Seconds one trial takes at least: start-up plus the configured epochs at the student's pace."""
    info = rundir.read_json(run_dir / "student" / rundir.METRICS)
    seconds = [h["seconds"] for h in info.get("history", [])]
    floor = _startup_s(cfg)
    if not seconds:
        return floor
    # a Train trial starts as the distill stage's student did; an in-process one skips all that
    startup = floor if tune_trial.in_process(cfg) else max(info.get("train_seconds", 0.0) - sum(seconds), floor)
    # the first epoch carries one-off costs; the median of the rest is the pace
    pace = float(np.median(seconds[1:] or seconds))
    return startup + pace * cfg.distill.train.epochs


def _startup_s(cfg: Config) -> float:
    return IN_PROCESS_STARTUP_S if tune_trial.in_process(cfg) else TRIAL_STARTUP_S


def _estimate_basis(run_dir: Path, cfg: Config) -> str:
    if (run_dir / "student" / rundir.METRICS).exists():
        return "start-up plus the configured epochs at the pace of the distilled student in student/metrics.json"
    return f"start-up alone, about {_startup_s(cfg):.0f} s; no student trained yet to time an epoch"


def _search(cfg: Config, space: dict, run_dir: Path, out: Path, key: str) -> None:
    """Run (or restore and finish) the Tune experiment in `out/search`."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    here = tune_trial.in_process(cfg)
    cpus = _trial_cpus(cfg, here)
    exp_dir = out / "search"
    trainable = _trainable(cfg, space, run_dir, out, cpus, here)
    restoring = rundir.read_json(out / "search.json").get("key") == key and tune.Tuner.can_restore(str(exp_dir))
    n = tc.num_samples
    if restoring:
        done = sum(1 for t in experiment_trials(exp_dir) if t.status in ("TERMINATED", "ERROR"))
        print(f"tune: resuming the search in {exp_dir} ({done} of up to {n} trials finished)", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable)
    else:
        if out.exists():
            print(f"tune: settings or inputs changed: starting a new search in {out}", flush=True)
            for old in out.iterdir():  # best/ stays until the new winner replaces it (a deployment may read it)
                if old.name != "best":
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
        out.mkdir(parents=True, exist_ok=True)
        (out / "search.json").write_text(json.dumps({
            "key": key, "started": time.time(), "max_concurrent_trials": tc.max_concurrent_trials,
            "workers_per_trial": cfg.distill.train.num_workers, "cpus_per_worker": cpus, "in_process": here},
            indent=2))
        size_metric = SIZE_METRICS[tc.size_metric]
        # The configured student is the first trial when the space contains it: the search then
        # can only improve on it (on validation), and the table shows what tuning gained.
        start = configured_point(cfg, space)
        common = {"seed": tc.seed, "points_to_evaluate": [start] if start else None,
                  "budget_s": tc.time_budget_s, "marker": str(out / "budget_spent")}
        if tc.objective == "pareto":
            searcher = BudgetedOptuna(space, metric=[METRIC, size_metric], mode=["max", "min"], **common)
            scheduler = FIFOScheduler()
        else:
            searcher = BudgetedOptuna(space, metric=METRIC, mode="max", **common)
            epochs = cfg.distill.train.epochs
            # stop_last_trials=False: a trial that reaches max_t ends by itself (and reports its end)
            scheduler = ASHAScheduler(time_attr="epochs_done", metric=METRIC, mode="max", max_t=epochs,
                                      grace_period=min(tc.grace_period, epochs), reduction_factor=ASHA_REDUCTION,
                                      stop_last_trials=False)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=n,
                                        max_concurrent_trials=tc.max_concurrent_trials,
                                        trial_dirname_creator=_trial_dirname, reuse_actors=here),
            run_config=tune.RunConfig(name="search", storage_path=str(out), verbose=0,
                                      callbacks=[Progress(n, tc.objective), *tracking.tune_callbacks(cfg)],
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        mode = (f"pareto: max val NDCG@10, min {tc.size_metric}; no early stopping" if tc.objective == "pareto"
                else f"max val NDCG@10; ASHA from epoch {min(tc.grace_period, cfg.distill.train.epochs)}")
        where = (f"each in its trial process on {cpus:g} CPU (no Ray Train start)" if here else
                 f"{cfg.distill.train.num_workers} worker(s) x {cpus:g} CPU each")
        print(f"tune: {n} trials ({mode}) over {', '.join(space)}; {tc.max_concurrent_trials} at a time, {where}"
              + (f"; no new trial after {tc.time_budget_s:g} s" if tc.time_budget_s else ""), flush=True)
    t0 = time.perf_counter()
    with own_signal_handlers():  # Tune's Ctrl-C handler (save and stop this search) ends with it
        tuner.fit()
    seconds = time.perf_counter() - t0
    info = rundir.read_json(out / "search.json")
    info["seconds"] = info.get("seconds", 0.0) + seconds
    (out / "search.json").write_text(json.dumps(info, indent=2))
    if not _complete(exp_dir, tc):
        done = sum(1 for t in experiment_trials(exp_dir) if t.status in ("TERMINATED", "ERROR"))
        print(f"tune: interrupted with {done} trial(s) finished; run the same command again to resume", flush=True)
        raise KeyboardInterrupt


def _trainable(cfg: Config, space: dict, run_dir: Path, out: Path, cpus: float, here: bool):
    """The trial function with its setup and resources: in-process trials claim their CPUs (and
    stream their windows themselves); Train trial drivers claim no CPU."""
    from ray import tune

    setup = {"base": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "storage": str(out / "train"),
             "cpus_per_worker": cpus, "seed": cfg.seed, "in_process": here}
    if not here:  # the trial driver takes no CPU, only the zero-CPU custom resource (a CPU-holding driver would starve its own workers)
        return tune.with_resources(tune.with_parameters(run_trial, setup=setup), {DRIVER_RESOURCE: 1})
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": cpus})


def _trial_cpus(cfg: Config, in_process: bool) -> float:
    """CPUs per Train worker (or per in-process trial): what the config asks, checked against the cluster.

    Train trials together may use all CPUs but one (Ray Data's read tasks need a whole CPU while a
    trial streams its windows); in-process trials use no Ray Data and may take them all.
    Defaults shrink to fit; explicit settings that do not fit are an error, since the search would
    wait forever for resources.
    """
    import ray

    tc = cfg.tune
    res = ray.cluster_resources()
    total = float(res.get("CPU", 1))
    if not in_process and res.get(DRIVER_RESOURCE, 0) < tc.max_concurrent_trials:
        raise RaykdError(f"the Ray cluster lacks the custom resource {DRIVER_RESOURCE!r} that tune trial drivers "
                         f"claim (need {tc.max_concurrent_trials}); start the head node with "
                         f"--resources='{{\"{DRIVER_RESOURCE}\": 1000}}' (cluster.yaml does)")
    workers = cfg.distill.train.num_workers * tc.max_concurrent_trials
    spare = total if in_process else total - 1 if total >= 2 else total
    need = workers * tc.cpus_per_trial
    if need <= spare + 1e-9:
        return tc.cpus_per_trial
    explicit = {"cpus_per_trial", "max_concurrent_trials"} & tc.model_fields_set
    if explicit or "num_workers" in cfg.distill.train.model_fields_set:
        kept = "" if in_process else " (one stays free for Ray Data)"
        raise RaykdError(
            f"tune needs {need:g} CPUs at once ({tc.max_concurrent_trials} trial(s) x "
            f"{cfg.distill.train.num_workers} worker(s) x {tc.cpus_per_trial:g} CPU) but only {spare:g} of the "
            f"cluster's {total:g} may go to trials{kept}; lower tune.cpus_per_trial or "
            "tune.max_concurrent_trials")
    return round(spare / workers, 3)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _complete(exp_dir: Path, tc: TuneConfig) -> bool:
    """Every trial ended and the searcher is done (all samples drawn or the budget spent)."""
    if not exp_dir.exists():
        return False
    trials = experiment_trials(exp_dir)
    if not trials or any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        return False
    return len(trials) >= tc.num_samples or (exp_dir.parent / "budget_spent").exists()


# ---------------------------------------------------------------- progress (Tune driver)

class Progress(Callback):
    """Prints one line per epoch report and per finished trial (Tune's own tables are off)."""

    def __init__(self, total: int, objective: str):
        self.total, self.objective = total, objective
        self.best = -1.0
        self.last_sweep = 0.0

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self.last_sweep > 3.0:
            self.last_sweep = time.monotonic()
            released = ray_private.release_orphaned_placement_groups()
            if released:
                print(f"tune: released {released} placement group(s) left by stopped trials", flush=True)

    def _name(self, trials, trial) -> str:
        number = next((i for i, t in enumerate(trials, 1) if t is trial), len(trials))
        return f"trial {number}/{self.total} ({trial.trial_id})"

    def on_trial_start(self, iteration, trials, trial, **info):
        values = ", ".join(f"{k.rsplit('.', 1)[-1]}={fmt(v)}" for k, v in trial.config.items())
        print(f"tune: {self._name(trials, trial)} started: {values}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get("finished") and "val_ndcg@10" in result:  # every epoch of every trial: with -v
            console.say(f"tune: {self._name(trials, trial)} epoch {result['epochs_done']}: val NDCG@10 "
                        f"{result['val_ndcg@10']:.4f}", detail=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        if METRIC not in r:
            return
        how = "done" if r.get("finished") else f"stopped early by ASHA after epoch {r.get('epochs_done')}"
        self.best = max(self.best, r[METRIC])
        print(f"tune: {self._name(trials, trial)} {how}: best val NDCG@10 {r[METRIC]:.4f}, {int(r['params']):,} params, "
              f"{r['latency_ms']:.2f} ms/256 users (best so far {self.best:.4f})", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"tune: {self._name(trials, trial)} failed; see {trial.path}", flush=True)


class BudgetedOptuna(OptunaSearch):
    """OptunaSearch that stops proposing trials once `budget_s` seconds of searching are spent.

    The time spent is part of the saved searcher state, so a resumed search gets only what is
    left; the time between an interrupt and the resume does not count.
    """

    def __init__(self, *args, budget_s: float | None = None, marker: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._budget_s, self._marker = budget_s, marker
        self._spent, self._since = 0.0, time.monotonic()

    def _spent_now(self) -> float:
        return self._spent + time.monotonic() - self._since

    def suggest(self, trial_id: str):
        if self._budget_s is not None and self._spent_now() >= self._budget_s:
            if self._marker:
                Path(self._marker).write_text(f"{self._spent_now():.1f}\n")
            return self.FINISHED
        return super().suggest(trial_id)

    def save(self, checkpoint_path: str):
        self._spent, self._since = self._spent_now(), time.monotonic()
        super().save(checkpoint_path)

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._since = time.monotonic()


# ---------------------------------------------------------------- outputs
