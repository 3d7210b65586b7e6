"""pipeline: every stage in order, each reusing its outputs when they match the config.

prepare -> teacher -> soft_labels -> distill -> evaluate (report.json, report.md). A rerun after
an interruption skips finished stages and resumes training runs from their last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from raykd import distill, evaluate, prepare, soft_labels, teacher
from raykd.config import Config, dump_config
from raykd.runtime import ensure_ray

STAGES = (("prepare", prepare.run), ("teacher", teacher.run), ("soft_labels", soft_labels.run),
          ("distill", distill.run), ("evaluate", evaluate.run))


def run(cfg: Config) -> dict:
    dump_config(cfg, Path(cfg.output_dir) / "config.yaml")
    ensure_ray(cfg.ray)
    t0 = time.perf_counter()
    for name, stage in STAGES:
        start = time.perf_counter()
        print(f"\n== {name} ==", flush=True)
        result = stage(cfg)
        print(f"== {name} done in {time.perf_counter() - start:.0f}s ==", flush=True)
    print(f"pipeline finished in {time.perf_counter() - t0:.0f}s: {Path(cfg.output_dir).resolve() / 'report.json'}")
    return result
