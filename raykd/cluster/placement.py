"""Placement: whether the connected cluster can give each stage what it asks (`needs.Need`).

`describe_placement` prints how each stage will use the nodes and warns, naming the setting to
change, about what cannot fit: Ray itself would wait silently for resources that never come.
"""

from __future__ import annotations

from raykd.cluster.needs import DRIVER_RESOURCE, GPU, LOCAL_DRIVER_UNITS, Need
from raykd.cluster.runtime import alive_nodes, ensure_ray
from raykd.config import Config
from raykd.core import console


def describe_placement(cfg: Config, needs: list[Need], quiet: bool = False) -> list[str]:
    """Print how each stage will use the cluster; return (and print) warnings for what cannot fit.

    `needs` come from the stage list (`raykd.stages.needs(cfg, names)`, `stages.serve_needs(cfg)`).
    Call it after `ensure_ray`. A warning names the setting to change: Ray itself waits silently
    for resources that never come on a fixed-size cluster (on an autoscaling one, until the
    autoscaler adds nodes).
    """
    ensure_ray(cfg.ray, quiet=True)
    nodes = [n.get("Resources", {}) for n in alive_nodes()]
    total = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU", DRIVER_RESOURCE)}
    largest = {k: max((n.get(k, 0) for n in nodes), default=0) for k in ("CPU", "GPU")}
    lines, warnings = [], []
    for need in needs:
        line = need.line
        if need.ddp and len(nodes) > 1 and need.count > 1:
            line += (" (may share one node)" if largest["CPU"] >= need.count * need.cpus
                     else " (spread over nodes: DDP over the network)")
        lines.append(line)
        warnings += _fits(need, total, largest)
    if not quiet:
        console.say("placement:\n  " + "\n  ".join(lines))
        for w in warnings:
            console.warn(f"placement: {w}")
    return warnings


def _fits(need, total: dict, largest: dict) -> list[str]:
    """Why `need` cannot be placed on this cluster (empty when it can)."""
    out = []
    if need.drivers and total[DRIVER_RESOURCE] < need.drivers:
        out.append(f"{need.what}: the cluster lacks the custom resource {DRIVER_RESOURCE} (needs {need.drivers}); "
                   f"start the head node with --resources='{{\"{DRIVER_RESOURCE}\": {LOCAL_DRIVER_UNITS}}}'")
    if not need.count:
        return out
    cpus = total["CPU"] - need.keep_free if total["CPU"] > need.keep_free else total["CPU"]
    if need.gpus and total["GPU"] < need.gpus:
        out.append(f"{need.what} needs a GPU but the cluster has none: set {need.gpu_flag}=false or add GPU nodes")
    elif need.cpus > largest["CPU"] + 1e-9:
        out.append(f"{need.what}: one unit needs {need.cpus:g} CPU but the largest node has {largest['CPU']:g}; "
                   f"lower {need.setting}")
    elif need.count * need.cpus > cpus + 1e-9 or need.count * need.gpus > total["GPU"] + 1e-9:
        gpu = f" and {need.count * need.gpus:g} GPU" if need.gpus else ""
        have = f" and {total[GPU]:g} GPU" if need.gpus else ""
        free = f" (with {need.keep_free:g} kept free for Ray Data)" if need.keep_free else ""
        out.append(f"{need.what} needs {need.count * need.cpus:g} CPU{gpu} at once but the cluster has "
                   f"{total['CPU']:g} CPU{have}{free}; lower {need.setting}")
    return out
