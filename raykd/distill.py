"""distill: train the small student on hard + soft labels, its no-KD twin, and the KD curve.

Reads `<run>/data/`, `<run>/soft_labels/` and (for `distill.transfer`) `<run>/teacher/`; writes
`<run>/student/` (alpha from the config) and, unless `distill.train_nokd` is off,
`<run>/student_nokd/`: the same student, same budget, alpha 0, trained alone. With
`distill.sizes`, also `<run>/kd_curve/d<width>/{student,student_nokd}/` for each width (the
teacher and its soft labels are reused across widths). The loss (raykd.losses.distill_loss) is

    L = (1 - alpha) * CE(s_full, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s_K/T))

over the teacher's top-K (`kl`), over top-K plus one bin for the rest of the catalogue
(`kl_full`), or a rank-weighted ranking-distillation term (`rank`). With `distill.transfer`
the KD student's item table starts from the teacher's item representations (text included),
PCA-reduced to the student's width; the no-KD twin never sees the teacher.
"""

from __future__ import annotations

import math
from pathlib import Path

from raykd import train
from raykd.config import Config, ModelConfig, dump_config
from raykd.errors import RaykdError
from raykd.prepare import prepared_key
from raykd.runtime import ensure_ray
from raykd.soft_labels import soft_labels_key
from raykd.teacher import member_dirs


def run(cfg: Config) -> dict:
    run_dir = Path(cfg.output_dir)
    dump_config(cfg, run_dir / "config.yaml")
    d = cfg.distill
    jobs = pair(cfg, run_dir, "", d.model, d.train_nokd)
    for width in d.sizes:
        if curve_dir(cfg, width) != run_dir:  # the main student's own width is not trained twice
            jobs += pair(cfg, run_dir, f"kd_curve/d{width}/", sized(d.model, width), True)
    # the student, its twin and the curve's pairs are independent runs: in parallel when CPUs allow
    parallel = 1
    if len(jobs) > 1 and any(not train.reusable(run_dir / j["name"], train.fingerprint_of(**j)) for j in jobs):
        ensure_ray(cfg.ray)
        parallel = train.parallel_runs(d.train)
    results = train.fit_many(jobs, parallel)
    return {job["name"]: result for job, result in zip(jobs, results)}


def curve_dir(cfg: Config, width: int) -> Path:
    """Where the KD curve's pair of width `width` lives: `student/` and `student_nokd/` under it."""
    run_dir = Path(cfg.output_dir)
    same = sized(cfg.distill.model, width) == cfg.distill.model and cfg.distill.train_nokd
    return run_dir if same else run_dir / "kd_curve" / f"d{width}"


def sized(model: ModelConfig, width: int) -> ModelConfig:
    """The student model at another width (heads cut to a divisor of the width)."""
    return model.model_copy(update={"dim": width, "heads": math.gcd(model.heads, width)})


def pair(cfg: Config, run_dir: Path, prefix: str, model: ModelConfig, with_nokd: bool) -> list[dict]:
    """`train.fit` arguments of one KD student and (optionally) its no-KD twin, under `run_dir/prefix`."""
    d = cfg.distill
    data_dir, soft_dir = run_dir / "data", run_dir / "soft_labels"
    init_from = None
    if d.transfer:
        if d.teacher_scores:
            raise RaykdError("distill.transfer needs a raykd teacher (its item table); external "
                             "distill.teacher_scores have none: set distill.transfer=false")
        init_from = member_dirs(cfg)
        missing = [str(f) for f in init_from if not (f / "model.json").exists()]
        if missing:
            raise RaykdError(f"distill.transfer is on but {', '.join(missing)} has no model: run `raykd teacher CONFIG`")
    common = {"run_dir": run_dir, "data_dir": data_dir, "model_cfg": model, "train_cfg": d.train, "seed": cfg.seed}
    jobs = [{**common, "name": f"{prefix}student", "soft_dir": soft_dir, "alpha": d.alpha,
             "temperature": d.temperature, "kd_loss": d.loss, "upstream": soft_labels_key(soft_dir),
             "init_from": init_from}]
    if with_nokd:
        jobs.append({**common, "name": f"{prefix}student_nokd", "upstream": prepared_key(data_dir)})
    return jobs
