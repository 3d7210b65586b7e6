"""Benchmark the tune stage: search overhead per trial, and the tuned student vs the untuned one.

    python benchmarks/bench_tune.py                                   # quickstart, its tune section
    python benchmarks/bench_tune.py --config configs/ml100k.yaml --run-dir runs/bench_tune_ml100k \\
        tune.num_samples=30 tune.objective=pareto

Steps, each a `raykd` subprocess as a user would run it (so each starts its own Ray):

1. `raykd pipeline CONFIG tune.enabled=false` unless the run directory already holds a report:
   data, teacher, soft labels and the untuned student (`student/`, the config's own values);
2. `raykd tune CONFIG` (timed: the whole command, Ray start included);
3. `raykd evaluate CONFIG`: test metrics of teacher, student and the tuned student (`tune_best`).

Search overhead, per trial, from `tune/trials.parquet`: `trial_s` (the trial function's wall time,
or Tune's `time_total_s` for trials ASHA stopped) minus `loop_s` (the sum of the training loop's
own per-epoch seconds from the checkpoint history). For a trial on Ray Train that is the Train
controller and worker start, the dataset and the trial actor; for an in-process trial (one CPU
worker: `raykd.stages.tune.trial.in_process`) the trial actor, the student's size and the per-epoch
checkpoints. Also: the search's wall time per trial, and its share spent in training loops.
Prints a JSON summary (also written to --out) and PASS/FAIL for the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd


def sh(args: list[str], log: Path) -> float:
    """Run a raykd command, its output appended to `log`; return its wall seconds."""
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"\n$ {' '.join(args)}\n")
        fh.flush()
        done = subprocess.run(args, check=False, stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{' '.join(args)} failed ({done.returncode}); see {log}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--run-dir", default="runs/bench_tune_quickstart")
    ap.add_argument("--fresh", action="store_true", help="delete <run>/tune first (a new search)")
    ap.add_argument("--out", default=None, help="JSON summary (default <run>/tune/bench.json)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides for every stage, e.g. tune.num_samples=30")
    args = ap.parse_args()
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    log = run / "bench_tune.log"
    common = [args.config, f"output_dir={run}", *args.overrides]
    load = os.getloadavg()[0]
    if not (run / "report.json").exists():
        print(f"bench_tune: training teacher and untuned student in {run} (log {log})", flush=True)
        sh(["raykd", "pipeline", *common, "tune.enabled=false"], log)
    if args.fresh and (run / "tune").exists():
        shutil.rmtree(run / "tune")
    print(f"bench_tune: raykd tune {' '.join(common)}", flush=True)
    tune_s = sh(["raykd", "tune", *common], log)
    sh(["raykd", "evaluate", *common], log)

    t = pd.read_parquet(run / "tune" / "trials.parquet")
    summary = json.loads((run / "tune" / "summary.json").read_text())
    search = json.loads((run / "tune" / "search.json").read_text())
    report = json.loads((run / "report.json").read_text())
    res = summary["resources"]
    ran = t[t["state"] != "error"]
    overhead = ran["overhead_s"]
    tuned, untuned, teacher = report["tune_best"], report["student"], report["teacher"]
    # the same Train overhead outside Tune: the untuned student's fit (distill stage)
    plain = json.loads((run / "student" / "metrics.json").read_text())
    plain_overhead = plain["train_seconds"] - sum(h["seconds"] for h in plain["history"])
    result = {
        "config": args.config, "overrides": args.overrides, "load_avg_1min_at_start": round(load, 1),
        "objective": summary["objective"], "trials": len(t), "states": summary["states"],
        **res,
        "tune_command_s": round(tune_s, 1), "search_s": round(search.get("seconds", float("nan")), 1),
        "search_s_per_trial": round(search.get("seconds", float("nan")) / len(t), 1),
        "train_loop_share": round(float(ran["loop_s"].sum() / (search["seconds"] * res["max_concurrent_trials"])), 3),
        "trial_time_training_share": round(float(ran["loop_s"].sum() / ran["trial_s"].sum()), 3),
        "overhead_s_per_trial": {"median": round(float(overhead.median()), 1), "mean": round(float(overhead.mean()), 1),
                                 "min": round(float(overhead.min()), 1), "max": round(float(overhead.max()), 1)},
        "loop_s_per_trial_median": round(float(ran["loop_s"].median()), 1),
        "plain_train_overhead_s": round(plain_overhead, 1),
        "winner": summary["winner"],
        "test_ndcg@10": {"teacher": teacher["ndcg@10"], "student_untuned": untuned["ndcg@10"],
                         "student_nokd": report.get("student_nokd", {}).get("ndcg@10"),
                         "tune_best": tuned["ndcg@10"]},
        "val_ndcg@10": {"student_untuned": untuned.get("valid_ndcg@10"), "tune_best": tuned.get("valid_ndcg@10")},
        "params": {"teacher": teacher["params"], "student_untuned": untuned["params"], "tune_best": tuned["params"]},
        "tune_best_params_vs_teacher": round(tuned["params"] / teacher["params"], 4),
    }
    out = Path(args.out) if args.out else run / "tune" / "bench.json"
    out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    print(f"tuned student test NDCG@10 {tuned['ndcg@10']:.4f} vs untuned {untuned['ndcg@10']:.4f} "
          f"({tuned['ndcg@10'] - untuned['ndcg@10']:+.4f}); {tuned['params']:,} params = "
          f"1/{teacher['params'] / tuned['params']:.1f} of the teacher")
    print(f"search overhead per trial (trial wall - training loop): median {result['overhead_s_per_trial']['median']} s "
          f"(a plain Train fit outside Tune: {plain_overhead:.1f} s); the whole `raykd tune` command took {tune_s:.0f} s "
          f"for {len(t)} trials")
    checks = [("tuned beats untuned (test NDCG@10)", tuned["ndcg@10"] > untuned["ndcg@10"]),
              ("median per-trial overhead <= 5 s", result["overhead_s_per_trial"]["median"] <= 5),
              (">= 75% of trial time spent training", result["trial_time_training_share"] >= 0.75)]
    if summary["objective"] == "pareto":
        checks.append(("pareto pick <= 1/8 of teacher params", tuned["params"] <= teacher["params"] / 8))
    if Path(args.config).name == "quickstart.yaml" and not args.overrides:
        checks.append(("quickstart search under 2 minutes", result["search_s"] < 120))
    for name, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {name}")


if __name__ == "__main__":
    main()
