"""pipeline: every stage in order, each reusing its outputs when they match the config.

prepare -> [embed_items] -> teacher -> soft_labels -> distill -> tune -> evaluate (report.json,
report.md), as `raykd.stages` lists them. embed_items runs when `teacher.item_text` is on; with
`distill.teacher_scores` the external scores replace the raykd teacher (soft_labels imports them).
tune is skipped, and its earlier winner no longer counts, when `tune.enabled` is off. A rerun after
an interruption skips finished stages and resumes training runs from their last checkpoint.
Serving is not a pipeline step (it blocks): the last line printed is the `raykd serve` command.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from raykd import stages
from raykd.config import Config
from raykd.core import console, rundir


def run(cfg: Config) -> dict:
    t0 = time.perf_counter()
    timing = {}

    def done(name: str, result: object, wall: float) -> None:
        timing[name] = {"wall_s": round(wall, 2), "compute_s": round(min(compute_seconds(name, result, wall), wall), 2)}
        console.say(f"== {name} done in {console.duration(wall)} ==", detail=True)

    results = stages.run(cfg, on_done=done)
    root = Path(cfg.output_dir).resolve()
    timing["total"] = {"wall_s": round(time.perf_counter() - t0, 2),
                       "compute_s": round(sum(t["compute_s"] for t in timing.values()), 2)}
    _store_timing(root / rundir.REPORT_JSON, timing)
    console.say(timing_table(timing), detail=True)
    console.say("time per stage: " + ", ".join(f"{name} {console.duration(t['wall_s'])}" for name, t in timing.items()
                                              if name != "total") + " (report.json: timing)")
    # the result: shown even with -q
    console.emit(f"pipeline finished in {console.duration(time.perf_counter() - t0)}: {root / rundir.REPORT_MD}\n"
                 f"serve it: raykd serve {cfg.output_dir}", console.QUIET)
    return results.get("evaluate", {})


def compute_seconds(stage: str, result: object, wall: float) -> float:
    """Seconds a stage spent on its own work (epochs with their validation, scoring, I/O).

    Training stages count the epochs of the runs they trained (a reused model counts 0), soft
    labels its scoring, tune its trials' training loops; stages without an inner timer (prepare,
    embed_items, evaluate) count their whole wall time. The rest of a stage's wall time is
    start-up: Ray, worker groups, process groups, dataset materialisation, checkpoints.
    """
    if stage in ("teacher", "distill"):
        runs = result.get("member_runs", [result]) if stage == "teacher" else list(result.values())
        return sum(sum(h["seconds"] for h in r.get("history", [])) for r in runs if not r.get("reused"))
    if stage == "soft_labels":
        return 0.0 if result.get("reused") else float(result.get("seconds", 0.0))
    if stage == "tune":
        return 0.0 if not result or result.get("reused") else float(result.get("loop_s", 0.0))
    return wall


def timing_table(timing: dict) -> str:
    lines = ["time per stage (compute = epochs, scoring and I/O; the rest is start-up):",
             f"  {'stage':<12} {'wall s':>8} {'compute s':>10} {'start-up s':>11}"]
    for name, t in timing.items():
        lines.append(f"  {name:<12} {t['wall_s']:>8.1f} {t['compute_s']:>10.1f} {t['wall_s'] - t['compute_s']:>11.1f}")
    return "\n".join(lines)


def _store_timing(report: Path, timing: dict) -> None:
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return
    data["timing"] = timing
    report.write_text(json.dumps(data, indent=2))
