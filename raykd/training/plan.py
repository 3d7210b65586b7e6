"""Which students a config trains: their RunSpecs, the KD curve's pairs, the KD settings.

Shared by the distill stage (which trains them), tune (its trials reuse the KD settings),
evaluate (which scores the curve's pairs) and the stage list (what distill writes). Pure
planning: reads the config and the run folder's records, trains nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

from raykd.config import INIT_STD, Config, ItemTableConfig, ModelConfig
from raykd.core import rundir
from raykd.core.errors import RaykdError
from raykd.training.spec import KD, RunSpec


def specs(cfg: Config) -> list[RunSpec]:
    """The student, its no-KD twin (unless off) and each size of `distill.sizes` as a pair."""
    d = cfg.distill
    jobs = pair(cfg, rundir.STUDENT, rundir.STUDENT_NOKD if d.train_nokd else None, d.model)
    for width in d.sizes:
        if not main_width(cfg, width):  # the main student's own width is not trained twice
            jobs += pair(cfg, rundir.curve(width, True), rundir.curve(width, False), sized(d.model, width))
    return jobs


def main_width(cfg: Config, width: int | str) -> bool:
    """Whether the KD curve's pair at `width` (a `distill.sizes` entry) is the main student/student_nokd pair."""
    return sized(cfg.distill.model, width) == cfg.distill.model and cfg.distill.train_nokd


def curve_pair(cfg: Config, width: int | str) -> tuple[str, str]:
    """The artifacts (KD student, no-KD twin) of the KD curve at `width`."""
    if main_width(cfg, width):
        return rundir.STUDENT, rundir.STUDENT_NOKD
    return rundir.curve(width, True), rundir.curve(width, False)


def sized(model: ModelConfig, size: int | str) -> ModelConfig:
    """The student model at a size of `distill.sizes`: a dense table at width `size` (heads cut to a
    divisor of the width), or for `pq<C>` a PQ table of C codes at the student's own width (the
    codebook and assign of its item_table, else their defaults)."""
    if isinstance(size, str):
        table = model.item_table or ItemTableConfig()
        return model.model_copy(update={"item_table": table.model_copy(update={"codes": int(size[2:])})})
    return model.model_copy(update={"dim": size, "heads": math.gcd(model.heads, size), "item_table": None})


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
    """The specs of one KD student and (optionally) its no-KD twin: same model, budget and seed
    (a PQ twin's codes teacher-free: `teacher_free`)."""
    kd, upstream = kd_settings(cfg)
    d, root = cfg.distill, Path(cfg.output_dir)
    codes = code_upstream(root, model)
    jobs = [RunSpec(student, model, d.train, cfg.seed, kd=kd, upstream=upstream | codes)]
    if nokd:
        twin = teacher_free(model)
        jobs.append(RunSpec(nokd, twin, d.train, cfg.seed,
                            upstream={rundir.DATA: upstream[rundir.DATA]} | code_upstream(root, twin)))
    return jobs


def teacher_free(model: ModelConfig) -> ModelConfig:
    """The no-KD twin's model: the same, but a PQ table with `assign: teacher` gets svd codes
    (from the log alone), so no teacher knowledge reaches the baseline through its codes."""
    table = model.item_table
    if table is None or table.assign != "teacher":
        return model
    return model.model_copy(update={"item_table": table.model_copy(update={"assign": "svd"})})


def code_upstream(root: Path, model: ModelConfig) -> dict[str, str]:
    """The artifact a PQ table's codes are read from, when not the data or the teacher: item text."""
    if model.item_table is None or model.item_table.assign != "text":
        return {}
    return {rundir.ITEM_TEXT: rundir.require(root, rundir.ITEM_TEXT, "distill.model.item_table.assign text")}
