"""Ray job entrypoint: `python jobs/serve.py --config CONFIG [key=value ...]` (see raykd/jobs.py).

The API key never goes on this command line (Ray stores a job's entrypoint and shows it to anyone
who can list jobs): give it to the cluster as RAYKD_API_KEY / RAYKD_API_KEY_FILE or serve.api_key_file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the submitted working dir's raykd first

from raykd.jobs import main

if __name__ == "__main__":
    if any(arg.strip().startswith("serve.api_key=") for arg in sys.argv[1:]):
        print("jobs/serve.py: error: serve.api_key on the command line is stored in the job's entrypoint and shown "
              "by `ray job list`: set RAYKD_API_KEY / RAYKD_API_KEY_FILE on the cluster, or serve.api_key_file=PATH",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(main("serve"))
