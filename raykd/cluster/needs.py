"""What a stage asks of the cluster, as data: the stage list builds `Need`s, placement checks them.

No Ray import here: the stage list and the entry points read it before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass

# A zero-CPU custom resource that Tune trial drivers claim, so that they never take a CPU that
# Ray Data or Train workers need: on a small cluster trial drivers, Train workers and Ray Data
# tasks would otherwise wait on each other for CPUs. Clusters declare it on the head node
# (cluster.yaml, deploy/kuberay/), local Rays get it from `ensure_ray`.
DRIVER_RESOURCE = "raykd_driver"
GPU = "GPU"  # a name, so nested f-strings need no quotes (Python 3.10/3.11 forbid reusing them)
LOCAL_DRIVER_UNITS = 1000


@dataclass(frozen=True)
class Need:
    """What one stage asks of the cluster: a summary line and `count` units of (cpus, gpus) at once."""

    line: str
    what: str = ""
    count: int = 0
    cpus: float = 0.0
    gpus: float = 0.0
    setting: str = ""  # the setting to change when it cannot fit
    drivers: int = 0  # units of the zero-CPU driver resource (DRIVER_RESOURCE)
    keep_free: float = 0.0  # CPUs that must stay free beside it (Ray Data's tasks)
    ddp: bool = False  # Train workers that may spread over nodes
    gpu_flag: str = ""  # the setting that asks for the GPUs
