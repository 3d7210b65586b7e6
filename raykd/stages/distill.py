"""distill: train the small student on hard + soft labels, its no-KD twin, and the KD curve.

Reads `<run>/data/`, `<run>/soft_labels/` and (for `distill.transfer`) `<run>/teacher/`; writes
`<run>/student/` (alpha from the config) and, unless `distill.train_nokd` is off,
`<run>/student_nokd/`: the same student, same budget, alpha 0, trained alone. With
`distill.sizes`, also `<run>/kd_curve/d<width>/{student,student_nokd}/` for each width (the
teacher and its soft labels are reused across widths). The loss (raykd.core.losses.distill_loss) is

    L = (1 - alpha) * CE(s_full, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s_K/T))

over the teacher's top-K (`kl`), over top-K plus one bin for the rest of the catalogue
(`kl_full`), or a rank-weighted ranking-distillation term (`rank`). With `distill.transfer`
the KD student's item table starts from the teacher's item representations (text included),
PCA-reduced to the student's width; the no-KD twin never sees the teacher.
"""

from __future__ import annotations

import math
from pathlib import Path

from raykd.cluster import train
from raykd.config import INIT_STD, Config, ModelConfig
from raykd.core import rundir
from raykd.core.errors import RaykdError
from raykd.training.spec import KD, RunSpec


def run(cfg: Config) -> dict:
    root = Path(cfg.output_dir)
    jobs = specs(cfg)
    # the student, its twin and the curve's pairs are independent runs: in parallel when CPUs allow
    parallel = train.parallel_runs(cfg.distill.train) if len(jobs) > 1 else 1
    results = train.fit_many(jobs, root, parallel)
    for spec in jobs:
        rundir.record(root, spec.name, "distill", list(spec.upstream))
    return {spec.name: result for spec, result in zip(jobs, results)}


def specs(cfg: Config) -> list[RunSpec]:
    """The student, its no-KD twin (unless off) and each width of `distill.sizes` as a pair."""
    d = cfg.distill
    jobs = pair(cfg, rundir.STUDENT, rundir.STUDENT_NOKD if d.train_nokd else None, d.model)
    for width in d.sizes:
        if not main_width(cfg, width):  # the main student's own width is not trained twice
            jobs += pair(cfg, rundir.curve(width, True), rundir.curve(width, False), sized(d.model, width))
    return jobs


def main_width(cfg: Config, width: int) -> bool:
    """Whether the KD curve's pair at `width` is the main student/student_nokd pair."""
    return sized(cfg.distill.model, width) == cfg.distill.model and cfg.distill.train_nokd


def curve_pair(cfg: Config, width: int) -> tuple[str, str]:
    """The artifacts (KD student, no-KD twin) of the KD curve at `width`."""
    if main_width(cfg, width):
        return rundir.STUDENT, rundir.STUDENT_NOKD
    return rundir.curve(width, True), rundir.curve(width, False)


def sized(model: ModelConfig, width: int) -> ModelConfig:
    """The student model at another width (heads cut to a divisor of the width)."""
    return model.model_copy(update={"dim": width, "heads": math.gcd(model.heads, width)})


def kd_settings(cfg: Config, needed_by: str = "distill") -> tuple[KD, dict]:
    """The KD settings of this config's students and the upstream keys they depend on."""
    root, d = Path(cfg.output_dir), cfg.distill
    upstream = {rundir.DATA: rundir.require(root, rundir.DATA, needed_by),
                rundir.SOFT_LABELS: rundir.require(root, rundir.SOFT_LABELS, needed_by)}
    transfer: tuple[Path, ...] = ()
    if d.transfer:
        if d.teacher_scores:
            raise RaykdError("distill.transfer needs a raykd teacher (its item table); external "
                             "distill.teacher_scores have none: set distill.transfer=false")
        members = [rundir.member(i) for i in range(cfg.teacher.ensemble)]
        upstream |= {m: rundir.require(root, m, "distill.transfer") for m in members}
        transfer = tuple(root / m for m in members)
    kd = KD(root / rundir.SOFT_LABELS, d.alpha, d.temperature, d.loss, transfer, INIT_STD)
    return kd, upstream


def pair(cfg: Config, student: str, nokd: str | None, model: ModelConfig) -> list[RunSpec]:
    """The specs of one KD student and (optionally) its no-KD twin: same model, budget and seed."""
    kd, upstream = kd_settings(cfg)
    d = cfg.distill
    jobs = [RunSpec(student, model, d.train, cfg.seed, kd=kd, upstream=upstream)]
    if nokd:
        jobs.append(RunSpec(nokd, model, d.train, cfg.seed, upstream={rundir.DATA: upstream[rundir.DATA]}))
    return jobs
