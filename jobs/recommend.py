"""Ray job entrypoint: `python jobs/recommend.py RUN_DIR --k 10 --out PATH [...]` (the flags of `raykd recommend`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/recommend.py /shared/runs/q --k 10 --out /shared/runs/q/recs.parquet --workers 4

Joins the cluster (RAY_ADDRESS, which `ray job submit` sets, or a `ray start` cluster on this
machine; else a local Ray) and runs `raykd recommend` there. Inside a Ray job RUN_DIR and --out must be absolute paths on storage
that every node sees. Exits 0, 1 on an error, 2 on bad arguments (see raykd/jobs.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's raykd first

from raykd.jobs import main_tool

if __name__ == "__main__":
    sys.exit(main_tool("recommend"))
