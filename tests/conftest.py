"""Shared fixtures: one local Ray for the whole test session (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest
import ray

from raykd.cluster.runtime import ensure_ray
from raykd.config import RayConfig


@pytest.fixture(scope="session")
def ray_session():
    """A local 2-CPU Ray, started once and shared by every test that takes this fixture.

    `ensure_ray` also declares the zero-CPU DRIVER_RESOURCE that Tune trial drivers claim, and a
    stage's own `ensure_ray(cfg.ray)` call finds this session already running and joins it.
    """
    started = not ray.is_initialized()
    ensure_ray(RayConfig(num_cpus=2), quiet=True)
    yield
    if started:
        ray.shutdown()


# A tiny synthetic experiment: small enough that every TorchTrainer start dominates its cost.
TINY = [
    "data.synthetic.users=300", "data.synthetic.items=120", "data.synthetic.mean_length=20",
    "data.synthetic.clusters=4",
    "teacher.model.dim=16", "teacher.model.layers=1", "teacher.model.heads=1", "teacher.model.max_len=20",
    "teacher.train.epochs=2", "teacher.train.batch_size=64",
    "distill.model.dim=8", "distill.model.layers=1", "distill.model.heads=1", "distill.model.max_len=20",
    "distill.train.epochs=2", "distill.train.batch_size=64",
    "soft_labels.top_k=10", "tune.enabled=false",
]


def tiny_config(run_dir, *extra):
    from raykd.config import load_config

    return load_config("configs/quickstart.yaml", [*TINY, f"output_dir={run_dir}", *extra])


@pytest.fixture(scope="session")
def tiny_run(ray_session, tmp_path_factory):
    """The whole pipeline run once on a tiny synthetic log; stage and serving tests share it."""
    from raykd.stages import pipeline

    run_dir = tmp_path_factory.mktemp("tiny_run")
    pipeline.run(tiny_config(run_dir))
    return run_dir


@pytest.fixture
def fsynced(monkeypatch) -> list[str]:
    """Paths of the files and folders this process fsyncs (the real os.fsync still runs)."""
    seen, real = [], os.fsync

    def fsync(fd):
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return seen


def copy_parts(src, dst, *parts):
    """Copy artifacts of one run directory into another, with the run record that makes them current."""
    import shutil

    for part in parts:
        shutil.copytree(src / part, dst / part)
    shutil.copy(src / "run.json", dst / "run.json")


def untrained_teacher(run_dir, cfg) -> None:
    """A seeded, untrained teacher of `cfg`'s shape in `run_dir`, recorded as current (tests that need
    soft labels of the right shape, not of a good teacher)."""
    import torch

    from raykd.core import models, rundir, sequences

    m = cfg.teacher.model
    desc = {"family": m.family, "num_items": sequences.num_items(run_dir / "data"), **m.model_dump(exclude={"family"})}
    torch.manual_seed(0)
    with rundir.staged(run_dir / "teacher") as tmp:
        models.save_model(tmp, models.build_model(desc), desc, extra={"fingerprint": "untrained"})
        rundir.write_manifest(tmp, "untrained", {"data": rundir.key_of(run_dir / "data")})
    rundir.record(run_dir, "teacher", "teacher", ["data"])
