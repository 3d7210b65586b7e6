#!/usr/bin/env bash
# Multi-node integration (each script starts and stops its own Ray cluster; too slow for pytest):
#   1. cluster_utils_distill.py: distill with 2 Train workers on 2 nodes of ray.cluster_utils.Cluster
#   2. ray_start_job.py: `ray start --head` + `ray start --address` (2 nodes, token auth), the
#      quickstart pipeline through `ray job submit`, Train workers on both nodes, `serve deploy`
# Run from anywhere: tests/multinode/run.sh   (extra arguments go to ray_start_job.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
python tests/multinode/cluster_utils_distill.py
python tests/multinode/ray_start_job.py "$@"
