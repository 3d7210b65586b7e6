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
import os
import sys
import time
import traceback
from pathlib import Path

from raykd.cli import TOOLS, output_flags, set_output_level
from raykd.core.errors import RaykdError

OTHER_JOBS = ("pipeline", "serve")  # besides the stages of raykd.stages.STAGES (same names as the CLI)
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
    output_flags(p)
    return p


def tool_parser(name: str) -> argparse.ArgumentParser:
    """The flags of `raykd recommend` / `raykd export` (RUN_DIR first, then options), -q/-v included."""
    import importlib

    p = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=f"raykd {name} as a Ray job")
    importlib.import_module(TOOLS[name][0]).add_arguments(p)
    output_flags(p)
    return p


def main(stage: str, argv: list[str] | None = None) -> int:
    """Run one stage (or the pipeline) as a job; returns the exit status."""
    from raykd.stages import BY_NAME

    if stage not in BY_NAME and stage not in OTHER_JOBS:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join([*BY_NAME, *OTHER_JOBS])}")
    args = parser(stage).parse_args(argv)  # bad arguments: usage on stderr, exit status 2
    set_output_level(args)
    prog = f"jobs/{stage}.py"
    from raykd.config.loading import refuse_secrets

    try:
        refuse_secrets(args.overrides)  # Ray stores the entrypoint and shows it to anyone who lists jobs
    except RaykdError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        return 2
    try:
        check_working_directory()
        from raykd import stages
        from raykd.config import load_config

        cfg = load_config(args.config, args.overrides)  # bad configs fail here, before Ray is imported
        run_dir = run_directory(cfg.output_dir)
        print(f"{prog}: run directory {run_dir}", flush=True)
        if stage in stages.BY_NAME and stages.get(stage).enabled(cfg):
            stages.preflight(cfg, stages.get(stage))  # a missing upstream: said before Ray starts
        if stage == "serve":
            from raykd.cli import check_servable

            check_servable(args.path or str(run_dir), cfg.serve)  # a stale or broken model: before Ray too
        from raykd.cluster.placement import describe_placement
        from raykd.cluster.runtime import ensure_ray
        from raykd.cluster.storage import check_shared_storage

        ensure_ray(cfg.ray)
        check_shared_storage(run_dir)
        t0 = time.perf_counter()
        if stage == "serve":
            describe_placement(cfg, stages.serve_needs(cfg))
            _serve(cfg, args.path or str(run_dir), args.block)
        elif stage == "pipeline":
            from raykd.stages import pipeline

            pipeline.run(cfg)
        else:
            stages.run(cfg, [stage])
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


def main_tool(name: str, argv: list[str] | None = None) -> int:
    """`raykd recommend` / `raykd export` as a job: the same flags (RUN_DIR first, then options)."""
    import importlib

    args = tool_parser(name).parse_args(argv)  # bad arguments: usage on stderr, exit status 2
    set_output_level(args)
    try:
        check_working_directory()
        paths = [getattr(args, a, None) for a in ("run_dir", "out", "users", "model")]
        relative = [q for q in paths if q and not os.path.isabs(q)]
        if relative and IN_RAY_JOB_ENV in os.environ:
            raise RaykdError(f"{', '.join(relative)}: relative paths resolve into the job's temporary copy of the "
                             "working directory; pass absolute paths on storage every node mounts")
        return importlib.import_module(TOOLS[name][0]).main(args) or 0  # recommend joins the cluster itself (the run's cfg.ray)
    except RaykdError as err:
        print(f"jobs/{name}.py: error: {err}", file=sys.stderr, flush=True)
        return 1


def check_working_directory() -> None:
    """Fail with the fix when this process's working directory was deleted under it.

    `ray job submit --working-dir .` unpacks the job's files into Ray's temp dir. When a second
    node on the same machine shares the head's `--temp-dir`, Ray re-installs the working
    directory there and deletes the driver's current directory; torch's start-up `getcwd` then
    dies with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so".
    """
    try:
        os.getcwd()
        return
    except FileNotFoundError:
        pass
    again = os.environ.get("PWD", "")
    if again and os.path.isdir(again):  # re-created by the re-install: step back into it
        os.chdir(again)
        print(f"jobs: the working directory was replaced while the job started; continuing in {again}", flush=True)
        return
    raise RaykdError(
            "this job's working directory was deleted while it started. This happens when two Ray nodes on one "
            "machine share one --temp-dir: Ray re-installs the job's --working-dir for the second node and removes "
            "the driver's copy. Start every extra node on the same machine with its own --temp-dir (required, see "
            "README 'Two nodes on one machine'), then submit the job again")


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

    from raykd.serve.app import deploy, wait_for_stop

    s = cfg.serve
    student = deploy(path, s)
    print(f"serve: {student} at http://{s.host}:{s.port}/recommend (app 'raykd'; `serve status` shows it, "
          "`serve shutdown` stops it)", flush=True)
    if block:
        try:
            wait_for_stop()
        finally:
            serve.delete("raykd")
