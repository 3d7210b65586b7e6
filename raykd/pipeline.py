"""pipeline: every stage in order, each reusing its outputs when they match the config.

prepare -> [embed_items] -> teacher -> soft_labels -> distill -> tune -> evaluate (report.json,
report.md). embed_items runs when `teacher.item_text` is on; with `distill.teacher_scores` the
external scores replace the raykd teacher (soft_labels imports them). tune skips itself when
`tune.enabled` is off. A rerun after an interruption skips finished stages and resumes training
runs from their last checkpoint. Serving is not a pipeline step (it blocks): the last line printed
is the `raykd serve` command for the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from raykd import distill, embed_items, evaluate, prepare, soft_labels, teacher, tune
from raykd.config import Config, dump_config
from raykd.runtime import describe_placement, ensure_ray


def stages(cfg: Config) -> list[tuple[str, Callable[[Config], object]]]:
    """The stages this config needs, in order."""
    plan = [("prepare", prepare.run)]
    if cfg.distill.teacher_scores is None:
        if cfg.teacher.item_text:
            plan.append(("embed_items", embed_items.run))
        plan.append(("teacher", teacher.run))
    plan += [("soft_labels", soft_labels.run), ("distill", distill.run), ("tune", tune.run),
             ("evaluate", evaluate.run)]
    return plan


def run(cfg: Config) -> dict:
    dump_config(cfg, Path(cfg.output_dir) / "config.yaml")
    ensure_ray(cfg.ray)
    describe_placement(cfg)  # what Ray found and where each stage will run
    plan = stages(cfg)
    t0 = time.perf_counter()
    result = None
    for name, stage in plan:
        start = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        result = stage(cfg)
        print(f"== {name} done in {time.perf_counter() - start:.0f}s ==", flush=True)
    run_dir = Path(cfg.output_dir).resolve()
    print(f"pipeline finished in {time.perf_counter() - t0:.0f}s: {run_dir / 'report.md'}\n"
          f"serve it: raykd serve {cfg.output_dir}", flush=True)
    return result
