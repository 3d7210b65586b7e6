"""teacher: train the large sequential recommender with Ray Train.

Reads `<run>/data/` (prepare); writes `<run>/teacher/` (model.safetensors, model.json,
metrics.json with the validation history) and Ray Train checkpoints under `<run>/ray_train/`.
"""

from __future__ import annotations

from pathlib import Path

from raykd import train
from raykd.config import Config, dump_config
from raykd.prepare import prepared_key


def run(cfg: Config) -> dict:
    run_dir = Path(cfg.output_dir)
    data_dir = run_dir / "data"
    dump_config(cfg, run_dir / "config.yaml")
    return train.fit("teacher", run_dir, data_dir, cfg.teacher.model, cfg.teacher.train, seed=cfg.seed,
                     upstream=prepared_key(data_dir))
