"""What a stage asks of the cluster, as data: the stage list builds `Need`s, runtime checks them.

No Ray import here: the stage list and the entry points read it before Ray starts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Need:
    """What one stage asks of the cluster: a summary line and `count` units of (cpus, gpus) at once."""

    line: str
    what: str = ""
    count: int = 0
    cpus: float = 0.0
    gpus: float = 0.0
    setting: str = ""  # the setting to change when it cannot fit
    drivers: int = 0  # units of the zero-CPU driver resource (runtime.DRIVER_RESOURCE)
    keep_free: float = 0.0  # CPUs that must stay free beside it (Ray Data's tasks)
    ddp: bool = False  # Train workers that may spread over nodes
    gpu_flag: str = ""  # the setting that asks for the GPUs
