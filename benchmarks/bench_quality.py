"""Quality benchmark: the whole pipeline over several seeds, summarised against the targets.

    python benchmarks/bench_quality.py --config configs/ml100k.yaml --seeds 0,1,2
    python benchmarks/bench_quality.py --config configs/beauty.yaml --seeds 0,1,2 distill.alpha=0.3

Each seed runs `raykd pipeline CONFIG seed=S output_dir=WORKDIR/seedS [overrides]` in its own
process (one after the other: runs share the machine's cores), logs to WORKDIR/seedS.log, and
leaves its report.json there. A rerun reuses finished stages (the pipeline's own reuse), so an
interrupted benchmark resumes; `--summary-only` just re-reads the reports. The summary (test
NDCG@10 mean ± sample std over seeds, sizes, ratios, the paired student − student_nokd
difference per seed, PASS/FAIL per target) is printed and written to WORKDIR/summary.{md,json}.

Targets (issue 3): the student keeps >= 95% of the teacher's NDCG@10 with <= 1/8 of its
parameters; the student beats student_nokd by >= 5% relative; the teacher beats most-popular
by a wide margin (here: >= 1.5x); student scoring latency <= 1/5 of the teacher's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("popularity", "teacher", "student", "student_nokd")
KEPT_MIN, PARAMS_MAX, KD_GAIN_MIN, POP_MARGIN_MIN, LATENCY_MAX = 0.95, 1 / 8, 0.05, 1.5, 1 / 5


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="experiment YAML, e.g. configs/ml100k.yaml")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--workdir", default=None, help="default: bench_out/quality/<config name>")
    ap.add_argument("--summary-only", action="store_true", help="only summarise existing reports")
    ap.add_argument("--retries", type=int, default=1,
                    help="rerun a failed seed this many times (the pipeline resumes where it stopped)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides passed to every run")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    workdir = Path(args.workdir or Path("bench_out") / "quality" / Path(args.config).stem)
    workdir.mkdir(parents=True, exist_ok=True)
    walls = _load_walls(workdir)
    if not args.summary_only:
        for seed in seeds:
            walls[str(seed)] = run_seed(args.config, seed, workdir, args.overrides, args.retries)
            (workdir / "walls.json").write_text(json.dumps(walls, indent=2))
    reports = {s: _read(workdir / f"seed{s}" / "report.json") for s in seeds}
    missing = [s for s, r in reports.items() if r is None]
    if missing:
        print(f"no report.json for seed(s) {missing} under {workdir}", file=sys.stderr)
        reports = {s: r for s, r in reports.items() if r is not None}
        if not reports:
            return 1
    summary = summarise(reports, walls)
    summary.update({"config": args.config, "overrides": args.overrides, "workdir": str(workdir),
                    "machine": _machine()})
    text = markdown(summary)
    print(text)
    (workdir / "summary.md").write_text(text)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def run_seed(config: str, seed: int, workdir: Path, overrides: list[str], retries: int = 0) -> dict:
    """One pipeline run in its own process: wall seconds (all attempts) and CPU seconds.

    CPU seconds are those of the waited-for child processes only (the `raykd` driver): Ray's own
    daemons and workers are not its waited children, so this undercounts the run's cost and is
    kept in summary.json for reference only.
    """
    out = workdir / f"seed{seed}"
    cmd = ["raykd", "pipeline", config, f"seed={seed}", f"output_dir={out}", *overrides]
    wall = 0.0
    cpu0 = _children_cpu()
    for attempt in range(retries + 1):
        print(f"[bench_quality] seed {seed}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        with open(workdir / f"seed{seed}.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONUNBUFFERED": "1"})
        wall += time.perf_counter() - t0
        if rc == 0:
            cpu = _children_cpu() - cpu0
            print(f"[bench_quality] seed {seed}: done in {wall:.0f}s wall, {cpu:.0f} CPU-s "
                  f"(load average now {os.getloadavg()[0]:.1f})", flush=True)
            return {"wall_s": wall, "cpu_s": cpu, "load_end": os.getloadavg()[0]}
        print(f"[bench_quality] seed {seed}: pipeline failed (exit {rc}, attempt {attempt + 1}); "
              f"see {workdir / f'seed{seed}.log'}", flush=True)
    raise SystemExit(f"seed {seed}: pipeline failed {retries + 1} time(s); see {workdir / f'seed{seed}.log'}")


def summarise(reports: dict[int, dict], walls: dict) -> dict:
    seeds = sorted(reports)
    per_seed = {}
    for s in seeds:
        r = reports[s]
        row = {m: r[m]["ndcg@10"] for m in MODELS if m in r}
        row["valid"] = {m: r[m].get("valid_ndcg@10") for m in MODELS[1:] if m in r}
        row["best_epoch"] = {m: r[m].get("best_epoch") for m in MODELS[1:] if m in r}
        paired = r.get("student", {}).get("paired_vs_nokd") or {}
        row["paired_diff"], row["paired_se"] = paired.get("mean_diff"), paired.get("stderr")
        w = walls.get(str(s))
        w = w if isinstance(w, dict) else {"wall_s": w}  # older walls.json held plain seconds
        row["wall_s"], row["cpu_s"] = w.get("wall_s"), w.get("cpu_s")
        per_seed[s] = row
    models = {}
    for m in MODELS:
        vals = [reports[s][m]["ndcg@10"] for s in seeds if m in reports[s]]
        if not vals:
            continue
        first = reports[seeds[0]][m]
        models[m] = {"ndcg@10_mean": statistics.fmean(vals), "ndcg@10_std": _std(vals),
                     "hr@10_mean": statistics.fmean(reports[s][m]["hr@10"] for s in seeds if m in reports[s]),
                     "params": first.get("params", 0),
                     "latency_ms_256": _mean([reports[s][m].get("latency_ms_256") for s in seeds if m in reports[s]])}
    t, st, nokd, pop = (models.get(k, {}) for k in ("teacher", "student", "student_nokd", "popularity"))
    ratio = {
        "kept": _div(st.get("ndcg@10_mean"), t.get("ndcg@10_mean")),
        "params": _div(st.get("params"), t.get("params")),
        "latency": _mean([reports[s]["student"].get("latency_vs_teacher") for s in seeds if "student" in reports[s]]),
        "kd_gain": _sub1(_div(st.get("ndcg@10_mean"), nokd.get("ndcg@10_mean"))),
        "teacher_vs_pop": _div(t.get("ndcg@10_mean"), pop.get("ndcg@10_mean")),
    }
    diffs = [per_seed[s]["paired_diff"] for s in seeds if per_seed[s]["paired_diff"] is not None]
    targets = {
        f"student keeps >= {KEPT_MIN:.0%} of teacher NDCG@10 with <= 1/8 params":
            _ok(ratio["kept"], lambda v: v >= KEPT_MIN) and _ok(ratio["params"], lambda v: v <= PARAMS_MAX),
        f"student beats student_nokd by >= {KD_GAIN_MIN:.0%} relative": _ok(ratio["kd_gain"], lambda v: v >= KD_GAIN_MIN),
        f"teacher beats most-popular widely (>= {POP_MARGIN_MIN}x)": _ok(ratio["teacher_vs_pop"], lambda v: v >= POP_MARGIN_MIN),
        "student latency <= 1/5 of teacher's": _ok(ratio["latency"], lambda v: v <= LATENCY_MAX),
    }
    return {"seeds": seeds, "dataset": reports[seeds[0]].get("dataset", {}), "models": models, "ratios": ratio,
            "paired_diff_mean": _mean(diffs), "paired_diff_std": _std(diffs) if len(diffs) > 1 else None,
            "per_seed": per_seed, "targets": targets}


def markdown(s: dict) -> str:
    d = s.get("dataset", {})
    n = len(s["seeds"])
    lines = [(f"config `{s.get('config')}` {' '.join(s.get('overrides') or [])}; seeds {s['seeds']}; "
             f"{d.get('users', 0):,} users, {d.get('items', 0):,} items; machine: {s.get('machine')}"), "",
             f"| model | test NDCG@10 (mean ± std, {n} seeds) | HR@10 | params | ms / 256 users |",
             "|---|---|---|---|---|"]
    for m, v in s["models"].items():
        lines.append(f"| {m} | {v['ndcg@10_mean']:.4f} ± {v['ndcg@10_std']:.4f} | {v['hr@10_mean']:.4f} | "
                     f"{v['params']:,} | {_fmt(v['latency_ms_256'], '.2f')} |")
    r = s["ratios"]
    lines += ["", (f"student / teacher NDCG@10 {_fmt(r['kept'], '.1%')}; params {_fmt(r['params'], '.3f')} "
              f"(1/{_fmt(_div(1, r['params']), '.1f')}); latency {_fmt(r['latency'], '.3f')}; "
              f"student vs student_nokd {_fmt(r['kd_gain'], '+.1%')}; teacher / most-popular "
              f"{_fmt(r['teacher_vs_pop'], '.2f')}x"), "",
              ("| seed | teacher | student | student_nokd | paired student − nokd (± s.e.) | valid T / S / nokd | "
              "best epoch T / S / nokd | wall s |"), "|---|---|---|---|---|---|---|---|"]
    for seed, p in s["per_seed"].items():
        v, e = p["valid"], p["best_epoch"]
        lines.append(
            f"| {seed} | {_fmt(p.get('teacher'), '.4f')} | {_fmt(p.get('student'), '.4f')} | "
            f"{_fmt(p.get('student_nokd'), '.4f')} | {_fmt(p['paired_diff'], '+.4f')} ± {_fmt(p['paired_se'], '.4f')} | "
            f"{' / '.join(_fmt(v.get(m), '.4f') for m in MODELS[1:])} | "
            f"{' / '.join(_fmt(None if e.get(m) is None else e[m] + 1, 'd') for m in MODELS[1:])} | "
            f"{_fmt(p.get('wall_s'), '.0f')} |")
    lines += ["", (f"paired student − student_nokd NDCG@10, mean over seeds: {_fmt(s['paired_diff_mean'], '+.4f')}"
              f" (std {_fmt(s['paired_diff_std'], '.4f')})"), ""]
    lines += [f"- {'PASS' if ok else 'FAIL'}: {name}" for name, ok in s["targets"].items()]
    return "\n".join(lines) + "\n"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _load_walls(workdir: Path) -> dict:
    return _read(workdir / "walls.json") or {}


def _machine() -> str:
    cpus = os.cpu_count()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpus} CPU(s) {model}".strip()


def _std(vals: list[float]) -> float:
    return statistics.stdev(vals) if len(vals) > 1 else 0.0


def _mean(vals: list) -> float | None:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.fmean(vals) if vals else None


def _div(a, b):
    return a / b if a is not None and b else None


def _sub1(v):
    return None if v is None else v - 1


def _ok(v, test) -> bool:
    return v is not None and bool(test(v))


def _fmt(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


if __name__ == "__main__":
    sys.exit(main())
