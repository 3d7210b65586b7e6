"""distill: train the small student on hard labels + the teacher's soft labels, and the baseline.

Reads `<run>/data/` and `<run>/soft_labels/`; writes `<run>/student/` (alpha from the config) and,
unless `distill.train_nokd` is off, `<run>/student_nokd/`: the same student, same budget, alpha 0.
The loss (raykd.losses.distill_loss) is

    L = (1 - alpha) * CE(s_full, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s_K/T))

or, with `distill.loss: rank`, a rank-weighted ranking-distillation term instead of the KL.
"""

from __future__ import annotations

from pathlib import Path

from raykd import train
from raykd.config import Config, dump_config
from raykd.prepare import prepared_key
from raykd.soft_labels import soft_labels_key


def run(cfg: Config) -> dict:
    run_dir = Path(cfg.output_dir)
    data_dir, soft_dir = run_dir / "data", run_dir / "soft_labels"
    dump_config(cfg, run_dir / "config.yaml")
    d = cfg.distill
    out = {"student": train.fit("student", run_dir, data_dir, d.model, d.train, seed=cfg.seed, soft_dir=soft_dir,
                                alpha=d.alpha, temperature=d.temperature, kd_loss=d.loss,
                                upstream=soft_labels_key(soft_dir))}
    if d.train_nokd:
        out["student_nokd"] = train.fit("student_nokd", run_dir, data_dir, d.model, d.train, seed=cfg.seed,
                                        upstream=prepared_key(data_dir))
    return out
