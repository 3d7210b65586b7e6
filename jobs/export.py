"""Ray job entrypoint: `python jobs/export.py RUN_DIR --out DIR [...]` (the flags of `raykd export`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/export.py /shared/runs/q --out /shared/bundles/q --format onnx --with-histories

Runs `raykd export` on the cluster's head node, where the run directory is (no Ray work: the
export reads the run and writes the bundle). Inside a Ray job RUN_DIR and --out must be absolute.
Exits 0, 1 on an error, 2 on bad arguments.
"""

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's raykd first

from raykd import export
from raykd.errors import RaykdError

IN_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the driver (raykd.jobs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobs/export.py", description="raykd export as a Ray job")
    export.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        relative = [p for p in (args.run_dir, args.out, args.model) if p and not os.path.isabs(p)]
        if relative and IN_RAY_JOB_ENV in os.environ:
            raise RaykdError(f"{', '.join(relative)}: relative paths resolve into the job's temporary copy of the "
                             "working directory; pass absolute paths on storage every node mounts")
        return export.main(args) or 0
    except RaykdError as err:
        print(f"jobs/export.py: error: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
