"""Ray Jobs entrypoints: `jobs/<stage>.py` is one line that calls `main("<stage>")`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pipeline.py --config configs/quickstart.yaml output_dir=/shared/runs/q

Each entrypoint loads the config (dotted `key=value` overrides as in the `raykd` CLI), joins the
cluster (`RAY_ADDRESS`, which `ray job submit` sets, or a `ray start` cluster on this machine;
else it starts a local Ray, so `python jobs/pipeline.py ...` also works on a laptop), prints the
resources, the placement of each stage and the run directory, checks that every node sees the run
directory, runs the stage and exits 0, or prints the error on stderr and exits 1 (2 for bad
arguments), so `ray job status` says FAILED.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from pathlib import Path

from raykd.errors import RaykdError

# stage -> (module with run(cfg), the stages it runs, for the placement summary)
STAGES: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "prepare": ("raykd.prepare", ("prepare",)),
    "embed_items": ("raykd.embed_items", ()),
    "teacher": ("raykd.teacher", ("teacher",)),
    "soft_labels": ("raykd.soft_labels", ("soft_labels",)),
    "distill": ("raykd.distill", ("distill",)),
    "tune": ("raykd.tune", ("tune",)),
    "evaluate": ("raykd.evaluate", ()),
    "pipeline": ("raykd.pipeline", None),  # None: every pipeline stage
    "serve": ("raykd.serve", ("serve",)),
}
# Set by the Ray job supervisor for the job's driver process (ray/_private/runtime_env/constants.py).
IN_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def parser(stage: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"jobs/{stage}.py",
        description=f"raykd {stage} as a Ray job: joins the cluster (RAY_ADDRESS, or `ray start` on this machine), "
                    "else starts a local Ray.")
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. output_dir=/shared/runs/q teacher.train.lr=3e-4")
    if stage == "serve":
        p.add_argument("--path", help="run directory or model folder to serve (default: the config's output_dir)")
        p.add_argument("--block", action="store_true",
                       help="stay up until stopped (default: deploy, print the URL and exit; the app keeps running)")
    return p


def main(stage: str, argv: list[str] | None = None) -> int:
    """Run one stage (or the pipeline) as a job; returns the exit status."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    args = parser(stage).parse_args(argv)  # bad arguments: usage on stderr, exit status 2
    prog = f"jobs/{stage}.py"
    try:
        from raykd.config import load_config

        cfg = load_config(args.config, args.overrides)  # bad configs fail here, before Ray is imported
        run_dir = run_directory(cfg.output_dir)
        print(f"{prog}: run directory {run_dir}", flush=True)
        from raykd.runtime import check_shared_storage, describe_placement, ensure_ray

        ensure_ray(cfg.ray)
        if stage != "pipeline":  # pipeline.run prints its own
            describe_placement(cfg, STAGES[stage][1])
        check_shared_storage(run_dir)
        t0 = time.perf_counter()
        if stage == "serve":
            _serve(cfg, args.path or str(run_dir), args.block)
        else:
            importlib.import_module(STAGES[stage][0]).run(cfg)
        print(f"{prog}: done in {time.perf_counter() - t0:.0f}s; run directory {run_dir}", flush=True)
        return 0
    except RaykdError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug or a cluster failure: the job log keeps the traceback
        traceback.print_exc()
        print(f"{prog}: failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1


def run_directory(output_dir: str) -> Path:
    """The absolute run directory; inside a Ray job a relative one is an error.

    `ray job submit --working-dir .` runs the driver in a temporary copy of the working directory
    on the head node: a relative output_dir would land there (deleted with the job's runtime env)
    and other nodes could not read it.
    """
    if "://" in output_dir:
        raise RaykdError(f"output_dir {output_dir!r} is a URI: cloud storage is not supported for run directories yet; "
                         "use a path on a filesystem every node mounts (NFS, EFS, a PVC), e.g. /mnt/shared/runs/q")
    if IN_RAY_JOB_ENV in os.environ and not Path(output_dir).is_absolute():
        raise RaykdError(
            f"output_dir {output_dir!r} is relative: inside a Ray job it would resolve into the job's temporary "
            f"copy of the working directory ({os.getcwd()}), which other nodes cannot read and Ray deletes. "
            "Pass an absolute path on storage that every node mounts, e.g. output_dir=/mnt/shared/runs/quickstart")
    return Path(output_dir).resolve()


def _serve(cfg, path: str, block: bool) -> None:
    """Deploy the student as the Serve app `raykd` (serve.* settings); block only if asked."""
    from ray import serve

    from raykd.serve import deploy, wait_for_stop

    s = cfg.serve
    student = deploy(path, s)
    print(f"serve: {student} at http://{s.host}:{s.port}/recommend (app 'raykd'; `serve status` shows it, "
          "`serve shutdown` stops it)", flush=True)
    if block:
        try:
            wait_for_stop()
        finally:
            serve.delete("raykd")
