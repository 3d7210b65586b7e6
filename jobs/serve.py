"""Ray job entrypoint: `python jobs/serve.py --config CONFIG [key=value ...]` (see raykd/jobs.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's raykd first

from raykd.jobs import main

if __name__ == "__main__":
    sys.exit(main("serve"))
