"""distill: train the small student on hard + soft labels, its no-KD twin, and the KD curve.

Reads `<run>/data/`, `<run>/soft_labels/` and (for `distill.transfer`) `<run>/teacher/`; writes
`<run>/student/` (alpha from the config) and, unless `distill.train_nokd` is off,
`<run>/student_nokd/`: the same student, same budget, alpha 0, trained alone. With
`distill.sizes`, also `<run>/kd_curve/d<width>/{student,student_nokd}/` for each width and
`<run>/kd_curve/pq<codes>/...` for each PQ entry (the
teacher and its soft labels are reused across widths; the specs come from
`raykd.training.plan`). The loss (raykd.core.losses.distill_loss) is

    L = (1 - alpha) * CE(s_full, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s_K/T))

over the teacher's top-K (`kl`), over top-K plus one bin for the rest of the catalogue
(`kl_full`), or a rank-weighted ranking-distillation term (`rank`). With `distill.transfer`
the KD student's item table starts from the teacher's item representations (text included),
PCA-reduced to the student's width (a PQ student's codebooks: the means of that table over its
codes); the no-KD twin never sees the teacher (a PQ twin's codes are teacher-free).
"""

from __future__ import annotations

from pathlib import Path

from raykd.cluster import train
from raykd.config import Config
from raykd.core import rundir
from raykd.training.plan import specs


def run(cfg: Config) -> dict:
    root = Path(cfg.output_dir)
    jobs = specs(cfg)
    # the student, its twin and the curve's pairs are independent runs: in parallel when CPUs allow
    parallel = train.parallel_runs(cfg.distill.train) if len(jobs) > 1 else 1
    results = train.fit_many(jobs, root, parallel)
    for spec in jobs:
        rundir.record(root, spec.name, "distill", list(spec.upstream))
    return {spec.name: result for spec, result in zip(jobs, results)}
