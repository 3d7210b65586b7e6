"""teacher: train the large sequential recommender (or an ensemble of them) with Ray Train.

Reads `<run>/data/` (prepare) and, with `teacher.item_text`, `<run>/item_text/` (embed-items:
its vectors are PCA-whitened to the teacher's width, then fused and/or used as the initial id
embeddings, `teacher.text_mode`); writes `<run>/teacher/` (model.safetensors, model.json,
metrics.json with the validation history) and Ray Train checkpoints under `<run>/ray_train/`.
With `teacher.ensemble: N`, members 1..N-1 (seeds seed+1, ...) go to `<run>/teacher_ensemble/m<i>/`;
they train as parallel Ray runs when the cluster has CPUs to spare (each run's driver is a Ray
task on the zero-CPU driver resource), one after another otherwise.
"""

from __future__ import annotations

from pathlib import Path

from raykd.cluster import train
from raykd.config import Config
from raykd.core import rundir
from raykd.training.spec import ItemText, RunSpec


def member_dirs(cfg: Config) -> list[Path]:
    """Every teacher folder of the run: `teacher/` first, then the ensemble's other members."""
    return [Path(cfg.output_dir) / rundir.member(i) for i in range(cfg.teacher.ensemble)]


def specs(cfg: Config) -> list[RunSpec]:
    """The teacher (and ensemble members) this config trains; checks their inputs exist."""
    root, t = Path(cfg.output_dir), cfg.teacher
    upstream = {rundir.DATA: rundir.require(root, rundir.DATA, "the teacher")}
    text = None
    if t.item_text:
        upstream[rundir.ITEM_TEXT] = rundir.require(root, rundir.ITEM_TEXT, "teacher.item_text")
        text = ItemText(root / rundir.ITEM_TEXT / "vectors.parquet", t.text_mode, t.init_std)
    return [RunSpec(rundir.member(i), t.model, t.train, cfg.seed + i, text=text, upstream=upstream)
            for i in range(t.ensemble)]


def run(cfg: Config) -> dict:
    root = Path(cfg.output_dir)
    jobs = specs(cfg)
    results = train.fit_many(jobs, root, train.parallel_runs(cfg.teacher.train) if len(jobs) > 1 else 1)
    for spec in jobs:
        rundir.record(root, spec.name, "teacher", list(spec.upstream))
    if len(jobs) == 1:
        return results[0]
    return {**results[0], "ensemble": [r["valid"]["ndcg@10"] for r in results], "member_runs": results}
