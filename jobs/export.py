"""Ray job entrypoint: `python jobs/export.py RUN_DIR --out DIR [...]` (the flags of `raykd export`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/export.py /shared/runs/q --out /shared/bundles/q --format onnx --with-histories

Runs `raykd export` where the job's driver runs (no Ray work: the export reads the run and
writes the bundle). Inside a Ray job RUN_DIR and --out must be absolute paths on storage
that every node sees. Exits 0, 1 on an error, 2 on bad arguments (see raykd/jobs.py).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's raykd first

from raykd.jobs import main_tool

if __name__ == "__main__":
    sys.exit(main_tool("export"))
