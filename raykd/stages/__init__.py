"""The stage list, and the one way stages run.

Each stage has a name (the `raykd` subcommand, the `jobs/<name>.py` job and the pipeline's step
name are the same word; the CLI also accepts dashes: `raykd soft-labels`), the module whose
`run(cfg)` it calls, whether the config wants it, the artifacts it reads and writes (raykd.core.rundir
names) and the cluster resources it asks for (the placement summary).

`run(cfg, names)` is the entry for the CLI, the jobs and Python (`from raykd import stages;
stages.run(cfg)` runs the pipeline, `stages.run(cfg, ["distill"])` one stage). In order it: checks
the run directory and the inputs of the first stage asked for (a missing upstream artifact is an
error that names the command to run, before Ray starts), locks the run directory, sends Ray's own
output to `<run>/logs/` (raykd.cluster.output.run_logs: the console keeps raykd's lines), writes
`config.yaml`, starts or joins Ray once (`cfg.ray`), prints the placement, then runs each stage.
A stage's run record entries change only when its new outputs are in place: once it succeeded,
the entries of outputs it no longer writes are dropped (no no-KD twin any more), while a stage
that fails or is interrupted leaves the previous results current. In the pipeline a stage the
config turns off (tune with `tune.enabled: false`, embed_items without item text) forgets its
outputs without running, so nothing stale stays "current" in the run record. A turned-off stage named explicitly
(`stages.run(cfg, ["embed_items"])`, `raykd embed-items`) is an error naming the setting that turns
it on (`Stage.turned_on_by`), before anything is touched.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raykd.cluster.needs import Need
from raykd.config import Config, TrainConfig
from raykd.core import rundir
from raykd.core.errors import RaykdError


@dataclass(frozen=True)
class Stage:
    name: str
    module: str
    help: str
    enabled: Callable[[Config], bool]
    reads: Callable[[Config], list[str]]
    writes: Callable[[Config], list[str]]
    needs: Callable[[Config], list[Need]]
    turned_on_by: str = ""  # the setting that turns the stage on, named when it is asked for while off

    def run(self, cfg: Config) -> object:
        return importlib.import_module(self.module).run(cfg)


def _members(cfg: Config) -> list[str]:
    return [rundir.member(i) for i in range(cfg.teacher.ensemble)]


def _students(cfg: Config) -> list[str]:
    from raykd.training.plan import curve_pair

    names = [rundir.STUDENT] + ([rundir.STUDENT_NOKD] if cfg.distill.train_nokd else [])
    return names + [n for w in cfg.distill.sizes for n in curve_pair(cfg, w) if n not in names]


def _train_need(stage: str, tc: TrainConfig, runs: str) -> Need:
    gpu = "1 GPU + " if tc.use_gpu else ""
    how = (f"one Ray task on {tc.cpus_per_worker:g} CPU (no Ray Train start)" if tc.runs_in_task() else
           f"{tc.num_workers} Train worker(s) x {gpu}{tc.cpus_per_worker:g} CPU ({'NCCL' if tc.use_gpu else 'gloo'} DDP)")
    return Need(f"{stage}: {runs}, each {how}", f"{stage} training", tc.num_workers, tc.cpus_per_worker,
                1 if tc.use_gpu else 0, f"{stage}.train", ddp=True, gpu_flag=f"{stage}.train.use_gpu")


def _soft_labels_need(cfg: Config) -> list[Need]:
    sl = cfg.soft_labels
    unit = "1 GPU + 0.5 CPU" if sl.use_gpu else "1 CPU"
    if cfg.distill.teacher_scores:
        return [Need("soft_labels: imports the external teacher scores in the driver")]
    return [Need(f"soft_labels: {sl.num_workers} Ray Data actor(s) x {unit}, one teacher copy each", "soft_labels",
                 sl.num_workers, 0.5 if sl.use_gpu else 1.0, 1 if sl.use_gpu else 0, "soft_labels.num_workers",
                 gpu_flag="soft_labels.use_gpu")]


def _tune_need(cfg: Config) -> list[Need]:
    from raykd.stages.tune.trial import in_process

    t, workers = cfg.tune, cfg.distill.train.num_workers
    explicit = {"cpus_per_trial", "max_concurrent_trials"} & t.model_fields_set or \
        "num_workers" in cfg.distill.train.model_fields_set  # else tune shrinks cpus_per_trial to fit
    setting = "tune.cpus_per_trial or tune.max_concurrent_trials"
    if in_process(cfg):  # the student trains inside the trial: no Train workers, no driver resource
        return [Need(f"tune: {t.num_samples} trial(s), up to {t.max_concurrent_trials} at once, each training its "
                     f"student in the trial process on {t.cpus_per_trial:g} CPU (no Ray Train start)", "tune",
                     t.max_concurrent_trials if explicit else 0, t.cpus_per_trial, 0, setting)]
    return [Need(f"tune: {t.num_samples} trial(s), up to {t.max_concurrent_trials} at once, each a driver on the "
                 f"zero-CPU driver resource + {workers} Train worker(s) x {t.cpus_per_trial:g} CPU (may shrink to "
                 "fit); 1 CPU kept free for Ray Data", "tune", t.max_concurrent_trials * workers if explicit else 0,
                 t.cpus_per_trial, 0, setting, drivers=t.max_concurrent_trials, keep_free=1.0)]


def serve_needs(cfg: Config) -> list[Need]:
    s = cfg.serve
    return [Need(f"serve: {s.min_replicas}-{s.max_replicas} replica(s) x {s.replica_cpus:g} CPU (autoscaling on "
                 f"{s.target_ongoing_requests:g} ongoing requests per replica)", "serve at max_replicas",
                 s.max_replicas, s.replica_cpus, 0, "serve.replica_cpus or serve.max_replicas")]


def _runs(n: int) -> str:
    return f"{n} run" + ("s" if n > 1 else "")


def _always(cfg: Config) -> bool:
    return True


STAGES: list[Stage] = [
    Stage("prepare", "raykd.stages.prepare", "logs -> cleaned, split, sharded sequences (Ray Data)", _always,
          lambda c: [], lambda c: [rundir.DATA],
          lambda c: [Need("prepare: Ray Data read/clean tasks, 1 CPU each, as many as there are CPUs")]),
    Stage("embed_items", "raykd.stages.embed_items", "item text -> language-model vectors (Ray Data actors)",
          lambda c: c.teacher.item_text and not c.distill.teacher_scores, lambda c: [rundir.DATA],
          lambda c: [rundir.ITEM_TEXT],
          lambda c: [Need(f"embed_items: {c.teacher.text_workers} Ray Data actor(s) x "
                          f"{'1 GPU' if c.teacher.train.use_gpu else '1 CPU'}, one text encoder each", "embed_items",
                          c.teacher.text_workers, 0 if c.teacher.train.use_gpu else 1.0,
                          1 if c.teacher.train.use_gpu else 0, "teacher.text_workers",
                          gpu_flag="teacher.train.use_gpu")],
          "teacher.item_text=true (with data.item_text set and no distill.teacher_scores)"),
    Stage("teacher", "raykd.stages.teacher", "train the teacher (Ray Train)", lambda c: not c.distill.teacher_scores,
          lambda c: [rundir.DATA] + ([rundir.ITEM_TEXT] if c.teacher.item_text else []), _members,
          lambda c: [_train_need("teacher", c.teacher.train, _runs(c.teacher.ensemble))],
          "distill.teacher_scores unset (external teacher scores replace the raykd teacher)"),
    Stage("soft_labels", "raykd.stages.soft_labels", "teacher top-K scores for every training position", _always,
          lambda c: [rundir.DATA] + ([] if c.distill.teacher_scores else _members(c)),
          lambda c: [rundir.SOFT_LABELS], _soft_labels_need),
    Stage("distill", "raykd.stages.distill", "train the student on hard + soft labels (and student_nokd)", _always,
          lambda c: [rundir.DATA, rundir.SOFT_LABELS] + (_members(c) if c.distill.transfer else []), _students,
          lambda c: [_train_need("distill", c.distill.train, _runs(len(_students(c))))]),
    Stage("tune", "raykd.stages.tune", "Ray Tune + Optuna search over temperature, alpha and student size",
          lambda c: c.tune.enabled, lambda c: [rundir.DATA, rundir.SOFT_LABELS], lambda c: [rundir.TUNE_BEST],
          _tune_need, "tune.enabled=true"),
    Stage("evaluate", "raykd.stages.evaluate", "test metrics of every current model -> report.json, report.md", _always,
          lambda c: [rundir.DATA], lambda c: [rundir.REPORT_JSON],
          lambda c: [Need(f"evaluate: {c.evaluate.num_workers} Ray Data actor(s) x 1 CPU, every model once each",
                          "evaluate", c.evaluate.num_workers, 1.0, 0, "evaluate.num_workers")]),
]
BY_NAME = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    return BY_NAME[name.replace("-", "_")]


def needs(cfg: Config, names: list[str] | None = None) -> list[Need]:
    """The resources of the stages named (default: those the pipeline runs for this config)."""
    chosen = [get(n) for n in names] if names is not None else [s for s in STAGES if s.enabled(cfg)]
    return [need for s in chosen for need in s.needs(cfg)]


def refuse_disabled(cfg: Config, chosen: list[Stage]) -> None:
    """A stage named on the command line that the config turns off is an error naming the setting:
    exiting 0 having done nothing reads as success. (The pipeline skips such stages silently.)"""
    off = [s for s in chosen if not s.enabled(cfg)]
    if off:
        raise RaykdError("; ".join(f"`raykd {s.name.replace('_', '-')}` is turned off by this config: it runs with "
                                   f"{s.turned_on_by or 'a config that enables it'}" for s in off))


def preflight(cfg: Config, first: Stage) -> Path:
    """Checks that need no Ray: a usable run directory and the first stage's inputs."""
    root = rundir.check_output_dir(cfg.output_dir)
    for artifact in first.reads(cfg):
        rundir.require(root, artifact, f"`raykd {first.name}`")
    return root


def record_published(root: Path, stage: str, before: dict[str, str | None]) -> list[str]:
    """Record the outputs a failed or interrupted stage published before it stopped (a student
    while its no-KD twin still trained): each replaced a recorded one, which would else read as
    "replaced after it was recorded". Only those made from the upstream versions now recorded."""
    arts, done = rundir.read_record(root)["artifacts"], []
    for artifact, key in before.items():
        manifest = rundir.read_manifest(root / artifact)
        upstream = manifest.get("upstream") or {}
        if manifest.get("key") not in (None, key) and arts.get(artifact, {}).get("key") != manifest["key"] and \
                all(arts.get(u, {}).get("key") == k for u, k in upstream.items()):
            rundir.record(root, artifact, stage, list(upstream))
            done.append(artifact)
    return done


def run(cfg: Config, names: list[str] | None = None, on_done: Callable[[str, object, float], None] | None = None,
        quiet_placement: bool = False) -> dict:
    """Run the named stages (default: the pipeline) in order; returns {stage: result}.

    `on_done(name, result, seconds)` is called after each stage (the pipeline's timing table).
    """
    from raykd.cluster.output import LOG_DIR, run_logs
    from raykd.cluster.placement import describe_placement
    from raykd.cluster.runtime import ensure_ray
    from raykd.core import console

    chosen = [get(n) for n in names] if names is not None else STAGES
    if names is not None:
        refuse_disabled(cfg, chosen)
    active = [s for s in chosen if s.enabled(cfg)]
    root = preflight(cfg, active[0] if active else chosen[0])
    results = {}
    with rundir.lock(root, f"raykd {' '.join(s.name for s in chosen) if names else 'pipeline'}"), \
            run_logs(root / LOG_DIR):  # Ray's output to <run>/logs/, raykd's lines on the console
        rundir.dump_config(cfg, root)
        for stage in chosen:
            if not stage.enabled(cfg):
                rundir.forget(root, stage.name)
        if active:
            ensure_ray(cfg.ray)
            describe_placement(cfg, needs(cfg, [s.name for s in active]), quiet=quiet_placement)
        for stage in active:
            if len(active) > 1:
                console.say(f"== {stage.name} ==")
            start = time.perf_counter()
            before = {a: rundir.key_of(root / a) for a in stage.writes(cfg)}
            try:
                results[stage.name] = stage.run(cfg)  # records its new outputs once they are in place
            except BaseException:
                record_published(root, stage.name, before)
                raise
            rundir.forget(root, stage.name, keep=stage.writes(cfg))  # what this config no longer asks for
            if on_done:
                on_done(stage.name, results[stage.name], time.perf_counter() - start)
    return results
