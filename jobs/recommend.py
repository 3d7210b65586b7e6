"""Ray job entrypoint: `python jobs/recommend.py RUN_DIR --k 10 --out PATH [...]` (the flags of `raykd recommend`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/recommend.py /shared/runs/q --k 10 --out /shared/runs/q/recs.parquet --workers 4

Joins the cluster (RAY_ADDRESS, which `ray job submit` sets, or a `ray start` cluster on this
machine; else a local Ray) and runs `raykd recommend` there. Inside a Ray job RUN_DIR and --out
must be absolute paths on storage that every node sees. Exits 0, 1 on an error, 2 on bad arguments.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's raykd first

from raykd import recommend
from raykd.errors import RaykdError

IN_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the driver (raykd.jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/recommend.py", description="raykd recommend as a Ray job")
    recommend.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        recommend.check_args(args)  # before joining the cluster
        relative = [p for p in (args.run_dir, args.out, args.users, args.model) if p and not os.path.isabs(p)]
        if relative and IN_RAY_JOB_ENV in os.environ:
            raise RaykdError(f"{', '.join(relative)}: relative paths resolve into the job's temporary copy of the "
                             "working directory; pass absolute paths on storage every node mounts")
        from raykd.runtime import ensure_ray

        ensure_ray(recommend.ray_config(Path(args.run_dir)))
        return recommend.main(args) or 0
    except RaykdError as err:
        print(f"jobs/recommend.py: error: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
