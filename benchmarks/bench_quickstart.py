"""The quickstart end to end: one-worker runs as Ray tasks (`train.trainer: auto`) vs on Ray Train.

    python benchmarks/bench_quickstart.py --out /tmp/bq
    python benchmarks/bench_quickstart.py --out /tmp/bq --rounds 2 tune.enabled=false

Each round runs `raykd pipeline CONFIG` twice into fresh run directories, as a user would (a
subprocess each, so each starts its own Ray): once with the defaults, once with
`teacher.train.trainer=ray_train distill.train.trainer=ray_train` (every training run a
`TorchTrainer`, as before this option existed). Tune trials train in their trial process either
way. For each it prints the command's wall time, the pipeline's per-stage breakdown
(`report.json` -> `timing`: wall and compute seconds), wall / compute, the console line count and
the test NDCG@10 of teacher, student and no-KD twin; then the ratios of the two, measured side by
side. Run it on a quiet machine, alone.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"task": [], "ray_train": ["teacher.train.trainer=ray_train", "distill.train.trainer=ray_train"]}
MODELS = ("teacher", "student", "student_nokd", "tune_best")


def one(config: str, run: Path, overrides: list[str]) -> dict:
    """One `raykd pipeline` into a fresh `run`: wall time, timing table, console lines, test NDCG@10."""
    shutil.rmtree(run, ignore_errors=True)
    cmd = ["raykd", "pipeline", config, f"output_dir={run}", *overrides]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    report = json.loads((run / "report.json").read_text())
    timing = report["timing"]
    return {"command": " ".join(cmd), "wall_s": round(wall, 1), "timing": timing,
            "wall_over_compute": round(wall / timing["total"]["compute_s"], 3),
            "console_lines": len((done.stdout + done.stderr).splitlines()),
            "ndcg@10": {m: round(report[m]["ndcg@10"], 4) for m in MODELS if m in report}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--out", default="runs/bench_quickstart")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="dotted overrides for both variants")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    for r in range(args.rounds):
        for name, extra in VARIANTS.items():
            res = one(args.config, out / name, [*args.overrides, *extra])
            rows.append({"round": r, "variant": name, **res})
            stages = ", ".join(f"{k} {v['wall_s']:.1f}/{v['compute_s']:.1f}" for k, v in res["timing"].items()
                               if k != "total")
            print(f"round {r} {name:>9}: wall {res['wall_s']:.1f} s, wall/compute {res['wall_over_compute']:.2f}, "
                  f"{res['console_lines']} console lines; stages wall/compute s: {stages}; test NDCG@10 "
                  f"{res['ndcg@10']}", flush=True)
    for r in range(args.rounds):
        task, train = (next(x for x in rows if x["round"] == r and x["variant"] == v) for v in VARIANTS)
        print(f"round {r}: ray_train / task wall {train['wall_s'] / task['wall_s']:.2f}x "
              f"({train['wall_s']:.1f} / {task['wall_s']:.1f} s)")
    summary = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}", "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_quickstart.json").write_text(json.dumps(summary, indent=1))
    print(f"summary: {out / 'bench_quickstart.json'}")


if __name__ == "__main__":
    main()
