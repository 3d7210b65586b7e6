"""teacher: train the large sequential recommender with Ray Train.

Reads `<run>/data/` (prepare) and, with `teacher.item_text`, `<run>/item_text/` (embed-items:
its vectors are PCA-whitened to the teacher's width, then fused and/or used as the initial id
embeddings, `teacher.text_mode`);
writes `<run>/teacher/` (model.safetensors, model.json,
metrics.json with the validation history) and Ray Train checkpoints under `<run>/ray_train/`.
"""

from __future__ import annotations

import json
from pathlib import Path

from raykd import train
from raykd.config import Config, dump_config
from raykd.errors import RaykdError
from raykd.prepare import prepared_key


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
    return train.fit("teacher", run_dir, data_dir, cfg.teacher.model, cfg.teacher.train, seed=cfg.seed,
                     upstream=upstream, item_text=text, text_mode=cfg.teacher.text_mode,
                     init_std=cfg.teacher.init_std)
