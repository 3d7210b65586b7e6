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

import json
from pathlib import Path

from raykd import train
from raykd.config import Config, dump_config
from raykd.errors import RaykdError
from raykd.prepare import prepared_key
from raykd.runtime import ensure_ray


def member_dirs(cfg: Config) -> list[Path]:
    """Every teacher folder of the run: `teacher/` first, then the ensemble's other members."""
    run_dir = Path(cfg.output_dir)
    return [run_dir / "teacher"] + [run_dir / "teacher_ensemble" / f"m{i}" for i in range(1, cfg.teacher.ensemble)]


def run(cfg: Config) -> dict:
    run_dir = Path(cfg.output_dir)
    data_dir = run_dir / "data"
    dump_config(cfg, run_dir / "config.yaml")
    upstream, text = prepared_key(data_dir), None
    if cfg.teacher.item_text:
        text = run_dir / "item_text" / "vectors.parquet"
        manifest = run_dir / "item_text" / "manifest.json"
        if not manifest.exists():
            raise RaykdError(f"teacher.item_text is on but {manifest.parent} is missing: run `raykd embed-items CONFIG`")
        upstream += "-text-" + json.loads(manifest.read_text())["key"]
    t = cfg.teacher
    common = {"run_dir": run_dir, "data_dir": data_dir, "model_cfg": t.model, "train_cfg": t.train,
              "upstream": upstream, "item_text": text, "text_mode": t.text_mode, "init_std": t.init_std}
    jobs = [{**common, "name": str(d.relative_to(run_dir)), "seed": cfg.seed + i}
            for i, d in enumerate(member_dirs(cfg))]
    if len(jobs) == 1:
        return train.fit(**jobs[0])
    ensure_ray(cfg.ray)
    results = train.fit_many(jobs, train.parallel_runs(t.train))
    return {**results[0], "ensemble": [r["valid"]["ndcg@10"] for r in results], "member_runs": results}
