"""Connecting to Ray: a cluster when one is there (RAY_ADDRESS, `ray job submit`), else local."""

from __future__ import annotations

import logging
import os

import ray
import ray.data

from raykd.config import RayConfig

# A zero-CPU custom resource that Tune trial drivers claim, so that they never take a CPU that
# Ray Data or Train workers need (see GUIDE.md section 4).
DRIVER_RESOURCE = "raykd_driver"


def ensure_ray(cfg: RayConfig | None = None, quiet: bool = False) -> None:
    """Start or join Ray once per process and print what was found."""
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        # Under `ray job submit` the cluster exists: num_cpus/resources would raise here.
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(
            num_cpus=cfg.num_cpus,
            resources={DRIVER_RESOURCE: 1000},
            logging_level=logging.WARNING,
        )
    # Ray Data's progress bars and per-operator lines drown stage output (they repeat every epoch
    # in training); raykd prints its own progress lines instead.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not quiet:
        res = ray.cluster_resources()
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
        print(
            f"ray: {'joined ' + address if address else 'started local Ray'}; {nodes} node(s), "
            f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU",
            flush=True,
        )


def cpu_count() -> int:
    """CPUs in the Ray cluster (1 if Ray reports none)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))
