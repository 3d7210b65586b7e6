"""tune: search temperature, alpha, student size and learning rate with Ray Tune + Optuna.

Reads `<run>/data/` and `<run>/soft_labels/` (and `teacher/model.json` for size ratios); writes

    <run>/tune/search/         the Ray Tune experiment (state for resume, per-trial results)
    <run>/tune/train/          one Ray Train run per trial, `trial_<trial id>/` (checkpoints)
    <run>/tune/trials.parquet  one row per trial: searched values, val NDCG@10, params, latency,
    <run>/tune/trials.csv      state, timings (the same table twice)
    <run>/tune/best.yaml       the winning values, as a config fragment
    <run>/tune/best/           the winner, exported as a servable student (model.safetensors ...)
    <run>/tune/*.png           val NDCG vs params (Pareto front marked), vs temperature, vs alpha
    <run>/tune/summary.json    settings fingerprint, winner and why it won

How a search runs (Ray 2.60, Train V2):

- Each trial is a Tune *function* trainable that builds and fits one `TorchTrainer`
  (`train.make_trainer`) named `trial_<trial id>`; `TuneReportCallback` forwards every epoch's
  Train report (val NDCG@10 and the checkpoint path) to Tune. The trial driver claims only the
  zero-CPU custom resource `DRIVER_RESOURCE`, so CPUs go to Train workers (`tune.cpus_per_trial`
  each) and at least one whole CPU stays free for Ray Data (GUIDE.md section 4).
- `OptunaSearch` (TPE, seeded) proposes values; in `objective: pareto` it is multi-objective
  (maximise val NDCG@10, minimise params or latency). `ASHAScheduler` stops trials that are behind
  at `grace_period`, 2x, 4x ... epochs in `objective: ndcg`; pareto mode runs every trial to the
  end, because ASHA compares NDCG alone and would stop exactly the small students it looks for.
- `tune.time_budget_s` stops *starting* trials once spent (running trials finish), so no trial
  is cut short; the time spent survives an interrupt.
- Resume: the experiment lives in `<run>/tune/search/` with a fingerprint of its settings. Running
  again after Ctrl-C or a killed driver restores it (`Tuner.restore`): finished trials are kept,
  unfinished ones restart and their Train run resumes from its last epoch checkpoint. A finished
  search with the same settings is reused; different settings start a new search.

The winner: `objective: ndcg` takes the best val NDCG@10; `pareto` takes the smallest student
within `max_quality_drop` (relative) of the best val NDCG@10 (`pick_winner`). Test metrics of
`tune/best/` are computed by the evaluate stage (`report.json`, key `tune_best`).
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
import types
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ValidationError
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.optuna import OptunaSearch

from raykd import models, sequences, train
from raykd.config import Config, SearchDim, TuneConfig, dump_config, section_hash
from raykd.errors import RaykdError
from raykd.runtime import DRIVER_RESOURCE, ensure_ray

METRIC = "best_val_ndcg@10"  # the trial's best epoch so far: what its exported model scores
SIZE_METRICS = {"params": "params", "latency": "latency_ms"}
# Keys the search may not touch: they set resources (tune.cpus_per_trial does) or other stages.
NOT_SEARCHABLE = {"distill.train.num_workers", "distill.train.cpus_per_worker", "distill.train.use_gpu",
                  "distill.train.max_failures", "distill.train_nokd"}
ALWAYS_SHOWN = ("distill.temperature", "distill.alpha", "distill.model.dim", "distill.model.layers",
                "distill.train.lr")
# Fixed cost of one trial beyond its epochs (trial actor, Train controller and worker start,
# dataset), measured on 2 busy cores: the floor for the time-budget check.
TRIAL_STARTUP_S = 15.0
ASHA_REDUCTION = 2  # keep the better half at each rung: with a handful of trials 4 is too eager


# ---------------------------------------------------------------- search space (no Ray needed)

def parse_space(cfg: Config) -> dict[str, Any]:
    """Check `tune.space` against the config model and return Optuna distributions by dotted key.

    Raises RaykdError for an empty space, a key that is not a config key (or not a student
    setting), a bad range or type, or values the config itself would reject.
    """
    import optuna.distributions as od

    space = cfg.tune.space
    if not space:
        raise RaykdError("tune.space is empty: name at least one setting to search, e.g.\n"
                         "  tune:\n    space:\n      distill.temperature: {type: loguniform, low: 1, high: 10}")
    out = {}
    for key, dim in space.items():
        field = _leaf_field(key)
        where = f"tune.space.{key}"
        numeric = _numeric_kind(field)
        if dim.type == "choice":
            if not dim.values:
                raise RaykdError(f"{where}: type choice needs a non-empty `values` list, e.g. values: [8, 16, 32]")
            if dim.low is not None or dim.high is not None:
                raise RaykdError(f"{where}: type choice takes `values`, not low/high")
            for v in dim.values:
                _check_value(cfg, key, v, where)
            out[key] = od.CategoricalDistribution(list(dim.values))
            continue
        if dim.values is not None:
            raise RaykdError(f"{where}: `values` is only for type choice; type {dim.type} takes low and high")
        if dim.low is None or dim.high is None:
            raise RaykdError(f"{where}: type {dim.type} needs both low and high")
        if numeric is None:
            raise RaykdError(f"{where}: {key} is not a number; search it with type choice and a values list")
        if dim.low > dim.high:
            raise RaykdError(f"{where}: low ({dim.low:g}) is greater than high ({dim.high:g})")
        if dim.type == "loguniform" and dim.low <= 0:
            raise RaykdError(f"{where}: loguniform needs low > 0 (got {dim.low:g}); use type uniform for ranges "
                             "that start at 0")
        integer = dim.type == "int" or numeric is int
        if integer and (dim.low != int(dim.low) or dim.high != int(dim.high)):
            raise RaykdError(f"{where}: {key} takes whole numbers; low and high must be whole (got "
                             f"{dim.low:g}, {dim.high:g})")
        if integer:
            low, high = int(dim.low), int(dim.high)
            dist = od.IntDistribution(low, high, log=dim.type == "loguniform")
        else:
            low, high = float(dim.low), float(dim.high)
            dist = od.FloatDistribution(low, high, log=dim.type == "loguniform")
        for v in (low, high):
            _check_value(cfg, key, v, where)
        out[key] = dist
    _check_heads(cfg, space)
    return out


def _leaf_field(key: str):
    """The pydantic field a dotted key names, or a RaykdError listing the valid keys."""
    parts = key.split(".")
    if not all(parts):
        raise RaykdError(f"tune.space: {key!r} is not a dotted config key like distill.temperature")
    model: type[BaseModel] = Config
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        here = ".".join(parts[:i])
        if field is None:
            valid = ", ".join(f"{here}.{k}" if here else k for k in model.model_fields)
            raise RaykdError(f"tune.space: {key!r} is not a config key: {here + '.' if here else ''}{part} does "
                             f"not exist; valid keys here: {valid}")
        sub = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
                raise RaykdError(f"tune.space: {key!r} is not a config key: {'.'.join(parts[:i + 1])} is a value, "
                                 "not a section")
            model = sub
        elif isinstance(sub, type) and issubclass(sub, BaseModel):
            raise RaykdError(f"tune.space: {key!r} is a section; search one of its keys: "
                             + ", ".join(f"{key}.{k}" for k in sub.model_fields))
    if parts[0] != "distill" or key in NOT_SEARCHABLE:
        why = ("trials train only the student, so only distill.* settings change a trial"
               if parts[0] != "distill" else "it sets resources or another stage (see tune.cpus_per_trial)")
        raise RaykdError(f"tune.space: {key!r} is a config key but cannot be searched: {why}")
    return field


def _numeric_kind(field) -> type | None:
    """int or float when the field holds a number (possibly optional), else None."""
    ann = field.annotation
    options = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
    for t in options:
        if t in (int, float) and t is not bool:
            return t
    return None


def _check_value(cfg: Config, key: str, value: Any, where: str) -> None:
    try:
        apply_values(cfg, {key: value})
    except RaykdError as err:
        raise RaykdError(f"{where}: {value!r} is not a valid {key}: {err}") from None


def _check_heads(cfg: Config, space: dict[str, SearchDim]) -> None:
    """SASRec needs dim divisible by heads: refuse a space that can sample a broken pair."""
    if cfg.distill.model.family != "sasrec":
        return

    def candidates(key: str, fixed: int) -> list[int]:
        dim = space.get(key)
        if dim is None:
            return [fixed]
        if dim.type == "choice":
            return [v for v in dim.values if isinstance(v, int)]
        low, high = int(dim.low), int(dim.high)
        return list(range(low, high + 1)) if high - low <= 512 else [low, high]

    dims = candidates("distill.model.dim", cfg.distill.model.dim)
    heads = candidates("distill.model.heads", cfg.distill.model.heads)
    bad = [(d, h) for d, h in itertools.product(dims, heads) if h > 0 and d % h]
    if bad:
        d, h = bad[0]
        raise RaykdError(f"tune.space: the search can sample distill.model.dim={d} with distill.model.heads={h}, "
                         "but SASRec needs dim divisible by heads; narrow the choices (e.g. heads: 1, or powers "
                         "of two for both)")


def apply_values(cfg: Config, values: dict[str, Any]) -> Config:
    """A copy of `cfg` with dotted-key values set, validated like a loaded config."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value.item() if isinstance(value, np.generic) else value
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise RaykdError("; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())) from None


# ---------------------------------------------------------------- the winner (pure functions)

def pareto_front(ndcg: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point beats on both (higher NDCG, smaller size)."""
    ndcg, size = np.asarray(ndcg, dtype=float), np.asarray(size, dtype=float)
    order = np.lexsort((-ndcg, size))  # by size, then best NDCG first among equal sizes
    front = np.zeros(len(ndcg), dtype=bool)
    best = -np.inf
    for i in order:
        if ndcg[i] > best:
            front[i] = True
            best = ndcg[i]
    return front


def pick_winner(table: pd.DataFrame, objective: str, size_col: str = "params",
                max_quality_drop: float = 0.02) -> tuple[Any, str]:
    """The index of the winning row of a trials table and a sentence saying why it won.

    Rows need `val_ndcg@10` and `size_col`; rows with a missing NDCG (failed trials) never win.
    - ndcg: the highest val NDCG@10 (ties: the smaller student).
    - pareto: among rows with val NDCG@10 >= (1 - max_quality_drop) * best, the smallest
      `size_col` (ties: the higher NDCG). The winner is always on the Pareto front.
    """
    ok = table[table["val_ndcg@10"].notna()]
    if ok.empty:
        raise RaykdError("no trial produced a validation NDCG: every trial failed")
    best_idx = ok.sort_values(["val_ndcg@10", size_col], ascending=[False, True]).index[0]
    best = float(ok.at[best_idx, "val_ndcg@10"])
    unit = "ms" if size_col.startswith("latency") else "params"

    def size_text(i) -> str:
        v = ok.at[i, size_col]
        return f"{v:.2f} ms" if unit == "ms" else f"{int(v):,} params"

    if objective == "ndcg":
        rest = ok.drop(index=best_idx)["val_ndcg@10"]
        runner_up = f"; next best {rest.max():.4f}" if len(rest) else ""
        return best_idx, (f"highest val NDCG@10 of {len(ok)} trial(s): {best:.4f} ({size_text(best_idx)})"
                          f"{runner_up}")
    floor = (1.0 - max_quality_drop) * best
    close = ok[ok["val_ndcg@10"] >= floor - 1e-12]
    win = close.sort_values([size_col, "val_ndcg@10"], ascending=[True, False]).index[0]
    ndcg = float(ok.at[win, "val_ndcg@10"])
    if win == best_idx:
        return win, (f"best val NDCG@10 ({best:.4f}) and no smaller student within {max_quality_drop:.0%} of it "
                     f"({size_text(win)}); {len(close)} of {len(ok)} trial(s) were within {max_quality_drop:.0%}")
    return win, (f"smallest student ({size_text(win)}) within {max_quality_drop:.0%} of the best val NDCG@10: "
                 f"{ndcg:.4f} vs {best:.4f} ({(ndcg / best - 1):+.1%}) of the best trial with "
                 f"{size_text(best_idx)}; {len(close)} of {len(ok)} trial(s) were within {max_quality_drop:.0%}")


# ---------------------------------------------------------------- the stage

def run(cfg: Config) -> dict:
    """Search, or resume or reuse a search; write the trials table, best.yaml, best/ and plots."""
    tc = cfg.tune
    if not tc.enabled:
        print("tune: skipped (tune.enabled is false)", flush=True)
        return {}
    # every config mistake is reported before Ray starts
    space = parse_space(cfg)
    run_dir = Path(cfg.output_dir).resolve()
    check_budget(cfg, run_dir)
    data_dir, soft_dir, out = run_dir / "data", run_dir / "soft_labels", run_dir / "tune"
    from raykd.prepare import prepared_key
    from raykd.soft_labels import soft_labels_key

    upstream = f"{prepared_key(data_dir)}-{soft_labels_key(soft_dir)}"
    key = search_key(cfg, upstream)
    summary = _read_json(out / "summary.json")
    if (summary.get("key") == key and summary.get("max_quality_drop") == tc.max_quality_drop
            and (out / "best" / "model.json").exists()):
        print(f"tune: reusing {out} (same search settings and inputs): winner {summary['winner']['trial_id']}, "
              f"val NDCG@10 {summary['winner']['val_ndcg@10']:.4f}", flush=True)
        return summary
    exp_dir = out / "search"
    if not (_read_json(out / "search.json").get("key") == key and _complete(exp_dir, tc)):
        dump_config(cfg, run_dir / "config.yaml")
        _search(cfg, space, run_dir, out, key)
    return analyse(cfg, out, key)


def check_budget(cfg: Config, run_dir: Path) -> None:
    """A time budget shorter than one trial would make a search of one trial: refuse it."""
    tc = cfg.tune
    estimate = trial_estimate_s(run_dir, cfg)
    if tc.time_budget_s is not None and tc.time_budget_s < estimate:
        raise RaykdError(
            f"tune.time_budget_s={tc.time_budget_s:g} is too small to finish one trial: a trial takes about "
            f"{estimate:.0f} s here ({_estimate_basis(run_dir)}), so no trial after the first would start. "
            f"Set it to at least {math.ceil(estimate)} s (about {math.ceil(estimate) * tc.num_samples} s for all "
            f"{tc.num_samples} trials) or remove it.")


def search_key(cfg: Config, upstream: str) -> str:
    """Fingerprint of what the trials depend on; resources and the pick rule are left out."""
    tc = cfg.tune.model_copy(update={"enabled": True, "max_quality_drop": 0.0, "max_concurrent_trials": 1,
                                     "cpus_per_trial": 1.0})
    return f"{section_hash(cfg.distill, tc)}-{cfg.seed}-{upstream}"


def trial_estimate_s(run_dir: Path, cfg: Config) -> float:
    """Seconds one trial takes at least: start-up plus the configured epochs at the student's pace."""
    info = _read_json(run_dir / "student" / "metrics.json")
    seconds = [h["seconds"] for h in info.get("history", [])]
    if not seconds:
        return TRIAL_STARTUP_S
    startup = max(info.get("train_seconds", 0.0) - sum(seconds), TRIAL_STARTUP_S)
    # the first epoch carries one-off costs; the median of the rest is the pace
    pace = float(np.median(seconds[1:] or seconds))
    return startup + pace * cfg.distill.train.epochs


def _estimate_basis(run_dir: Path) -> str:
    if (run_dir / "student" / "metrics.json").exists():
        return "start-up plus the configured epochs at the pace of the distilled student in student/metrics.json"
    return f"start-up alone, about {TRIAL_STARTUP_S:.0f} s; no student trained yet to time an epoch"


def _search(cfg: Config, space: dict, run_dir: Path, out: Path, key: str) -> None:
    """Run (or restore and finish) the Tune experiment in `out/search`."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    ensure_ray(cfg.ray)
    cpus = _trial_cpus(cfg)
    exp_dir = out / "search"
    setup = {"base": cfg.model_dump(mode="json"), "run_dir": str(run_dir), "storage": str(out / "train"),
             "cpus_per_worker": cpus, "seed": cfg.seed}
    # The trial driver takes no CPU, only the zero-CPU custom resource (GUIDE.md section 4).
    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup), {DRIVER_RESOURCE: 1})
    restoring = _read_json(out / "search.json").get("key") == key and tune.Tuner.can_restore(str(exp_dir))
    n = tc.num_samples
    if restoring:
        done = sum(1 for t in _trials(exp_dir) if t.status in ("TERMINATED", "ERROR"))
        print(f"tune: resuming the search in {exp_dir} ({done} of up to {n} trials finished)", flush=True)
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable)
    else:
        if out.exists():
            print(f"tune: settings or inputs changed: starting a new search in {out}", flush=True)
            shutil.rmtree(out)
        out.mkdir(parents=True)
        (out / "search.json").write_text(json.dumps({
            "key": key, "started": time.time(), "max_concurrent_trials": tc.max_concurrent_trials,
            "workers_per_trial": cfg.distill.train.num_workers, "cpus_per_worker": cpus}, indent=2))
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
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name="search", storage_path=str(out), verbose=0,
                                      callbacks=[Progress(n, tc.objective)],
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        mode = (f"pareto: max val NDCG@10, min {tc.size_metric}; no early stopping" if tc.objective == "pareto"
                else f"max val NDCG@10; ASHA from epoch {min(tc.grace_period, cfg.distill.train.epochs)}")
        print(f"tune: {n} trials ({mode}) over {', '.join(space)}; {tc.max_concurrent_trials} at a time, "
              f"{cfg.distill.train.num_workers} worker(s) x {cpus:g} CPU each"
              + (f"; no new trial after {tc.time_budget_s:g} s" if tc.time_budget_s else ""), flush=True)
    t0 = time.perf_counter()
    tuner.fit()
    seconds = time.perf_counter() - t0
    info = _read_json(out / "search.json")
    info["seconds"] = info.get("seconds", 0.0) + seconds
    (out / "search.json").write_text(json.dumps(info, indent=2))
    if not _complete(exp_dir, tc):
        done = sum(1 for t in _trials(exp_dir) if t.status in ("TERMINATED", "ERROR"))
        print(f"tune: interrupted with {done} trial(s) finished; run the same command again to resume", flush=True)
        raise KeyboardInterrupt


def configured_point(cfg: Config, space: dict) -> dict | None:
    """The config's own values of the searched keys, if every one lies inside the space."""
    point = {key: _get(cfg, key) for key in space}
    for key, dist in space.items():
        value = point[key]
        if hasattr(dist, "choices"):
            if value not in dist.choices:
                return None
        elif not dist.low <= value <= dist.high:
            return None
    return point


def _get(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def release_orphaned_placement_groups() -> int:
    """Remove placement groups of this job whose creator (a Train controller) has died.

    When ASHA stops a trial, Tune ends the trial actor and the Train controller it owns dies
    with it; Train's detached PlacementGroupCleaner then removes the worker group's placement
    group through the State API. Where that API cannot be reached (dashboard off, or several
    local Ray instances on one machine, so that it cannot tell which one is meant) the group
    keeps its CPUs until the driver exits and later trials wait forever. This does the same
    cleanup from the Tune driver. Reads the GCS table directly (no public API exposes the
    creator's liveness); on any error it does nothing.
    """
    import ray

    try:
        from ray._private.state import state
        from ray.core.generated import gcs_pb2
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        job = ray.get_runtime_context().get_job_id()
        removed = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            # a driver-created group (Tune's trial groups) has no creator actor and counts as "dead"
            by_actor = not ray.ActorID(pg.creator_actor_id).is_nil()
            if (by_actor and pg.creator_actor_dead and pg.state != gcs_pb2.PlacementGroupTableData.REMOVED
                    and not pg.is_detached and pg.creator_job_id.hex() == job):
                remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
                removed += 1
        return removed
    except Exception:  # noqa: BLE001 - a safety net only: Train's own cleaner is the first line
        return 0


def _trial_cpus(cfg: Config) -> float:
    """CPUs per Train worker: what the config asks, checked against the cluster.

    Trials together may use all CPUs but one (Ray Data's read tasks need a whole CPU while a
    trial materialises its windows). Defaults shrink to fit; explicit settings that do not fit
    are an error, since the search would wait forever for resources.
    """
    import ray

    tc = cfg.tune
    res = ray.cluster_resources()
    total = float(res.get("CPU", 1))
    if res.get(DRIVER_RESOURCE, 0) < tc.max_concurrent_trials:
        raise RaykdError(f"the Ray cluster lacks the custom resource {DRIVER_RESOURCE!r} that tune trial drivers "
                         f"claim (need {tc.max_concurrent_trials}); start the head node with "
                         f"--resources='{{\"{DRIVER_RESOURCE}\": 1000}}' (cluster.yaml does)")
    workers = cfg.distill.train.num_workers * tc.max_concurrent_trials
    spare = total - 1 if total >= 2 else total
    need = workers * tc.cpus_per_trial
    if need <= spare + 1e-9:
        return tc.cpus_per_trial
    explicit = {"cpus_per_trial", "max_concurrent_trials"} & tc.model_fields_set
    if explicit or "num_workers" in cfg.distill.train.model_fields_set:
        raise RaykdError(
            f"tune needs {need:g} CPUs at once ({tc.max_concurrent_trials} trial(s) x "
            f"{cfg.distill.train.num_workers} worker(s) x {tc.cpus_per_trial:g} CPU) but only {spare:g} of the "
            f"cluster's {total:g} may go to trials (one stays free for Ray Data); lower tune.cpus_per_trial or "
            "tune.max_concurrent_trials")
    return round(spare / workers, 3)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trials(exp_dir: Path) -> list:
    from ray.tune import ExperimentAnalysis

    try:
        return ExperimentAnalysis(str(exp_dir)).trials
    except (ValueError, FileNotFoundError, OSError):
        return []


def _complete(exp_dir: Path, tc: TuneConfig) -> bool:
    """Every trial ended and the searcher is done (all samples drawn or the budget spent)."""
    if not exp_dir.exists():
        return False
    trials = _trials(exp_dir)
    if not trials or any(t.status not in ("TERMINATED", "ERROR") for t in trials):
        return False
    return len(trials) >= tc.num_samples or (exp_dir.parent / "budget_spent").exists()


# ---------------------------------------------------------------- inside a trial (Ray actor)

def _trial(config: dict, setup: dict) -> None:
    """One trial: distill a student with the sampled values (Ray Train), report to Tune."""
    import ray.data
    import ray.tune

    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()  # this actor's own Ray Data context: keep logs quiet
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    cfg = apply_values(Config.model_validate(setup["base"]), config)
    run_dir = Path(setup["run_dir"])
    data_dir, soft_dir = run_dir / "data", run_dir / "soft_labels"
    d = cfg.distill
    desc = {"family": d.model.family, "num_items": sequences.num_items(data_dir),
            **d.model.model_dump(exclude={"family"})}
    size = student_size(desc)
    trial_id = ray.tune.get_context().get_trial_id()
    train_cfg = d.train.model_copy(update={"cpus_per_worker": setup["cpus_per_worker"]})
    trainer = train.make_trainer(f"trial_{trial_id}", Path(setup["storage"]), data_dir, d.model, train_cfg,
                                 setup["seed"], soft_dir, d.alpha, d.temperature, d.loss, callbacks=[TrialReport(size)])
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads((Path(ckpt) / "state.json").read_text())
    loop_s = sum(h["seconds"] for h in state["history"])
    ray.tune.report({**size, "epoch": state["epoch"], "epochs_done": state["epoch"] + 1,
                     METRIC: state["best"]["metrics"]["ndcg@10"], "val_ndcg@10": state["best"]["metrics"]["ndcg@10"],
                     "checkpoint_path": result.checkpoint.path, "trial_s": time.perf_counter() - t0,
                     "loop_s": loop_s, "finished": 1})


class TrialReport(TuneReportCallback):
    """Runs in the Train controller: forwards each epoch's report to Tune (TuneReportCallback adds
    the checkpoint path) with the student's size and an epoch counter, ASHA's clock, added."""

    def __init__(self, extra: dict):
        super().__init__()
        self.extra = extra

    def after_report(self, run_context, metrics, checkpoint):
        first = {**metrics[0], **self.extra, "epochs_done": metrics[0]["epoch"] + 1}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def student_size(desc: dict) -> dict:
    """Parameters and single-thread scoring latency (ms per 256 users) of an untrained student."""
    import torch

    model = models.build_model(desc)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # comparable across trials that share the machine
    try:
        from raykd.metrics import scoring_latency_ms

        # the least of three medians: other trials share the machine, and contention only adds
        latency = min(scoring_latency_ms(model, desc["max_len"], desc["num_items"], repeats=5) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    return {"params": models.count_params(model), "latency_ms": latency}


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
            released = release_orphaned_placement_groups()
            if released:
                print(f"tune: released {released} placement group(s) left by stopped trials", flush=True)

    def _name(self, trials, trial) -> str:
        number = next((i for i, t in enumerate(trials, 1) if t is trial), len(trials))
        return f"trial {number}/{self.total} ({trial.trial_id})"

    def on_trial_start(self, iteration, trials, trial, **info):
        values = ", ".join(f"{k.rsplit('.', 1)[-1]}={_fmt(v)}" for k, v in trial.config.items())
        print(f"tune: {self._name(trials, trial)} started: {values}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not result.get("finished") and "val_ndcg@10" in result:
            print(f"tune: {self._name(trials, trial)} epoch {result['epochs_done']}: val NDCG@10 {result['val_ndcg@10']:.4f}",
                  flush=True)

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


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


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

def trials_table(exp_dir: Path, cfg: Config) -> pd.DataFrame:
    """One row per trial, read from the experiment state and each trial's last Train checkpoint."""
    rows = []
    for t in _trials(exp_dir):
        r = t.last_result or {}
        values = apply_values(cfg, t.config) if t.config else cfg
        row = {"trial_id": t.trial_id}
        for key in dict.fromkeys([*cfg.tune.space, *ALWAYS_SHOWN]):
            row[key] = _get(values, key)
        # the configured student (the search's first point when the space contains it)
        row["configured"] = all(_get(values, k) == _get(cfg, k) for k in cfg.tune.space)
        ckpt = _checkpoint(r.get("checkpoint_path"), exp_dir.parent / "train" / f"trial_{t.trial_id}")
        state = _read_json(Path(ckpt) / "state.json") if ckpt else {}
        best = state.get("best", {})
        if t.status == "ERROR" or not state:
            status = "error"
        else:
            status = "finished" if r.get("finished") else "stopped"
        loop_s = sum(h["seconds"] for h in state.get("history", []))
        row.update({
            "state": status,
            "val_ndcg@10": best.get("metrics", {}).get("ndcg@10") if state else None,
            "best_epoch": best.get("epoch", -1) + 1 if state else None,
            "epochs_run": state.get("epoch", -1) + 1 if state else None,
            "params": r.get("params"), "latency_ms": r.get("latency_ms"),
            "trial_s": r.get("trial_s", r.get("time_total_s")), "loop_s": loop_s if state else None,
            "checkpoint_path": ckpt,
        })
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["overhead_s"] = table["trial_s"] - table["loop_s"]
    return table


def _checkpoint(reported: str | None, train_run: Path) -> str | None:
    """The trial's last Train checkpoint: the reported path, else the newest one on disk."""
    if reported and (Path(reported) / "state.json").exists():
        return reported
    found = sorted(train_run.glob("checkpoint_*"), key=lambda p: p.name)
    found = [p for p in found if (p / "state.json").exists()]
    return str(found[-1]) if found else None


def analyse(cfg: Config, out: Path, key: str) -> dict:
    """Trials table, Pareto front, winner (exported to tune/best), best.yaml, plots, summary."""
    tc = cfg.tune
    table = trials_table(out / "search", cfg)
    if table.empty or table["val_ndcg@10"].notna().sum() == 0:
        raise RaykdError(f"tune: no trial finished an epoch; see the trial logs under {out / 'search'}")
    size_col = SIZE_METRICS[tc.size_metric]
    ok = table["val_ndcg@10"].notna()
    table["pareto"] = False
    table.loc[ok, "pareto"] = pareto_front(table.loc[ok, "val_ndcg@10"], table.loc[ok, size_col])
    win, why = pick_winner(table, tc.objective, size_col, tc.max_quality_drop)
    table["winner"] = table.index == win
    teacher = _read_json(out.parent / "teacher" / "model.json").get("params")
    if teacher:
        table["params_vs_teacher"] = table["params"] / teacher
    table.to_parquet(out / "trials.parquet", index=False)
    table.to_csv(out / "trials.csv", index=False)
    row = table.loc[win]
    values = {k: _plain(row[k]) for k in tc.space}
    winner = {"trial_id": row["trial_id"], "values": values, "val_ndcg@10": float(row["val_ndcg@10"]),
              "params": int(row["params"]), "latency_ms": float(row["latency_ms"]), "why": why,
              "params_vs_teacher": float(row["params"] / teacher) if teacher else None}
    best_cfg = apply_values(cfg, values)
    d = best_cfg.distill
    if (out / "best").exists():
        shutil.rmtree(out / "best")
    train.export(Path(row["checkpoint_path"]), out / "best",
                 {"name": "tune/best", "trial_id": row["trial_id"], "values": values, "alpha": d.alpha,
                  "temperature": d.temperature, "kd_loss": d.loss if d.alpha > 0 else None, "fingerprint": key})
    _write_best_yaml(out / "best.yaml", values, winner)
    plots = _plots(table, out, size_col, tc.objective)
    counts = table["state"].value_counts().to_dict()
    search = _read_json(out / "search.json")
    summary = {"key": key, "max_quality_drop": tc.max_quality_drop, "objective": tc.objective,
               "size_metric": tc.size_metric, "trials": len(table), "states": counts,
               "search_seconds": search.get("seconds"),
               "resources": {k: search.get(k) for k in ("max_concurrent_trials", "workers_per_trial", "cpus_per_worker")},
               "winner": winner,
               "pareto_front": table.loc[table["pareto"], ["trial_id", "val_ndcg@10", "params", "latency_ms"]]
               .to_dict("records"), "plots": plots}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_plain))
    _print_result(table, winner, teacher, out, size_col)
    return summary


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _write_best_yaml(path: Path, values: dict, winner: dict) -> None:
    nested: dict = {}
    for key, value in values.items():
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    overrides = " ".join(f"{k}={v}" for k, v in values.items())
    header = (f"# raykd tune winner: trial {winner['trial_id']}, val NDCG@10 {winner['val_ndcg@10']:.4f}, "
              f"{winner['params']:,} params\n# why: {winner['why']}\n"
              f"# use: raykd distill CONFIG {overrides}\n")
    path.write_text(header + yaml.safe_dump(nested, sort_keys=False))


def _print_result(table: pd.DataFrame, winner: dict, teacher: int | None, out: Path, size_col: str) -> None:
    cols = ["trial_id", "state", *ALWAYS_SHOWN, "val_ndcg@10", "params", "latency_ms", "pareto"]
    shown = table[[c for c in dict.fromkeys(cols) if c in table]].sort_values("val_ndcg@10", ascending=False)
    shown = shown.rename(columns=lambda c: c.rsplit(".", 1)[-1])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    share = f", {winner['params'] / teacher:.1%} of the teacher's {teacher:,}" if teacher else ""
    print(f"tune: winner {winner['trial_id']} ({', '.join(f'{k}={_fmt(v)}' for k, v in winner['values'].items())})"
          f": val NDCG@10 {winner['val_ndcg@10']:.4f}, {winner['params']:,} params{share}\n"
          f"tune: why: {winner['why']}\n"
          f"tune: exported to {out / 'best'}; config values in {out / 'best.yaml'}; "
          "test metrics: `raykd evaluate CONFIG` (report.json, tune_best)", flush=True)


def _plots(table: pd.DataFrame, out: Path, size_col: str, objective: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = table[table["val_ndcg@10"].notna()]
    colors = {"finished": "tab:blue", "stopped": "tab:gray"}
    written = []

    def scatter(ax, x: str) -> None:
        for state, part in ok.groupby("state"):
            ax.scatter(part[x], part["val_ndcg@10"], c=colors.get(state, "tab:red"), label=state, alpha=0.8)
        w = ok[ok["winner"]]
        ax.scatter(w[x], w["val_ndcg@10"], marker="*", s=250, c="tab:orange", edgecolors="k", label="winner",
                   zorder=3)
        ax.set_ylabel("validation NDCG@10")
        ax.grid(alpha=0.3)

    for x, name, label, log in ((size_col, f"ndcg_vs_{size_col}.png",
                                 "parameters" if size_col == "params" else "ms per 256 users (1 thread)", True),
                                ("distill.temperature", "ndcg_vs_temperature.png", "temperature T", True),
                                ("distill.alpha", "ndcg_vs_alpha.png", "alpha (weight of the KD term)", False)):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        scatter(ax, x)
        if x == size_col:
            front = ok[ok["pareto"]].sort_values(x)
            ax.step(front[x], front["val_ndcg@10"], where="post", c="tab:green", lw=1.5, label="Pareto front")
            ax.scatter(front[x], front["val_ndcg@10"], facecolors="none", edgecolors="tab:green", s=120, lw=1.5)
        if log and (ok[x] > 0).all():
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_title(f"{len(ok)} trials ({objective})")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
