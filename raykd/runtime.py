"""Connecting to Ray: a cluster when one is there, else a local Ray; what was found; where work goes.

`ensure_ray(cfg.ray)` joins, in this order: `ray.address` from the config, `RAY_ADDRESS` (set by
`ray job submit` for the job's driver), or a cluster that `ray start` runs on this machine (what
`ray.init(address="auto")` finds). Otherwise, or when `ray.num_cpus` asks for a local Ray of a
given size, it starts a local Ray that declares the zero-CPU `DRIVER_RESOURCE`. It prints the
nodes, CPUs and GPUs it found; `describe_placement(cfg)` prints how each stage will use them and
warns about settings that cannot fit (Ray would otherwise wait for resources without a word).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

import ray
import ray.data

from raykd.config import Config, RayConfig
from raykd.errors import RaykdError

# A zero-CPU custom resource that Tune trial drivers claim, so that they never take a CPU that
# Ray Data or Train workers need (see GUIDE.md section 4). Clusters declare it on the head node
# (cluster.yaml, deploy/kuberay/), local Rays get it from `ensure_ray`.
DRIVER_RESOURCE = "raykd_driver"
GPU = "GPU"  # a name, so nested f-strings need no quotes (Python 3.10/3.11 forbid reusing them)
LOCAL_DRIVER_UNITS = 1000


def find_cluster(cfg: RayConfig | None = None) -> str | None:
    """The address of the Ray cluster to join, or None to start a local Ray.

    `ray.address`, else `RAY_ADDRESS`, else a live cluster started with `ray start` on this
    machine (the address `ray.init(address="auto")` would pick). `ray.num_cpus` set means "a
    local Ray of this size", so it turns off the last look-up.
    """
    cfg = cfg or RayConfig()
    explicit = cfg.address or os.environ.get("RAY_ADDRESS")
    if explicit:
        return explicit
    if cfg.num_cpus is not None:
        return None
    return _ray_start_cluster()


def _ray_start_cluster() -> str | None:
    """GCS address recorded by the last `ray start` on this machine, if that GCS is still running."""
    try:
        from ray._private import services

        services.find_gcs_addresses.cache_clear()
        address = services.find_bootstrap_address(None)
        return address if address and address in services.find_gcs_addresses() else None
    except Exception:  # noqa: BLE001 - private Ray helpers: no cluster found is the safe answer
        return None


def ensure_ray(cfg: RayConfig | None = None, quiet: bool = False) -> None:
    """Start or join Ray once per process and print what was found."""
    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = find_cluster(cfg)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        # An existing cluster (e.g. under `ray job submit`): num_cpus/resources would raise here.
        if cfg.num_cpus is not None and not quiet:
            print(f"ray: ray.num_cpus={cfg.num_cpus} ignored: joining the cluster at {address}", flush=True)
        explicit = cfg.address or os.environ.get("RAY_ADDRESS")
        # "auto" for a `ray start` cluster found on this machine: Ray then also picks up its token
        # (~/.ray/auth_token) by itself, which it never does for an explicit address.
        ray.init(address=explicit or "auto", logging_level=logging.WARNING)
    else:
        # "local": never attach to a cluster that some other `ray start` left on this machine.
        ray.init(address="local", num_cpus=cfg.num_cpus, resources={DRIVER_RESOURCE: LOCAL_DRIVER_UNITS},
                 logging_level=logging.WARNING)
    # Ray Data's progress bars and per-operator lines drown stage output (they repeat every epoch
    # in training); raykd prints its own progress lines instead.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not quiet:
        where = f"joined the cluster at {ray.get_runtime_context().gcs_address}" if address else "started local Ray"
        print(f"ray: {where}; {describe_resources()}", flush=True)


def alive_nodes() -> list[dict]:
    """Alive nodes of the connected cluster, head first (`ray.nodes()` entries)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: "node:__internal_head__" not in n.get("Resources", {}))


def describe_resources() -> str:
    """One line for the cluster, one per node when there are several."""
    res = ray.cluster_resources()
    nodes = alive_nodes()
    text = f"{len(nodes)} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
    if len(nodes) > 1:
        for n in nodes:
            r = n.get("Resources", {})
            role = "head" if "node:__internal_head__" in r else "worker"
            extra = f", {DRIVER_RESOURCE} {r[DRIVER_RESOURCE]:g}" if r.get(DRIVER_RESOURCE) else ""
            text += (f"\n  node {n['NodeID'][:8]} ({role}, {n.get('NodeManagerAddress', '?')}): "
                     f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU{extra}")
    return text


def cpu_count() -> int:
    """CPUs in the Ray cluster (1 if Ray reports none)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ---------------------------------------------------------------- placement

def describe_placement(cfg: Config, stages: list[str] | None = None, quiet: bool = False) -> list[str]:
    """Print how each stage will use the cluster; return (and print) warnings for what cannot fit.

    The resources come from the stage list (`raykd.stages`; default: the stages the pipeline
    runs for this config; serving when asked for by name). Call it after `ensure_ray`. A warning
    names the setting to change: Ray itself waits silently for resources that never come on a
    fixed-size cluster (on an autoscaling one, until the autoscaler adds nodes).
    """
    from raykd import stages as stage_list

    ensure_ray(cfg.ray, quiet=True)
    names = None if stages is None else [s for s in stages if s != "serve"]
    needs = stage_list.needs(cfg, names) + (stage_list.serve_needs(cfg) if stages and "serve" in stages else [])
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
        print("placement:\n  " + "\n  ".join(lines), flush=True)
        for w in warnings:
            print(f"placement warning: {w}", flush=True)
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


# ---------------------------------------------------------------- storage shared by every node

def check_shared_storage(run_dir: str | Path, timeout_s: float = 120.0) -> None:
    """Fail early unless every node sees `run_dir` (later stages read what earlier ones wrote).

    Writes a marker file and asks one zero-CPU task per alive node (node affinity) whether it
    sees it. A no-op on one node. Run directories on a multi-node cluster must be on a shared
    filesystem (NFS, EFS, Filestore, a PVC with ReadWriteMany) mounted at the same path everywhere.
    """
    nodes = alive_nodes()
    if len(nodes) < 2:
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / f".raykd_storage_check_{uuid.uuid4().hex[:12]}"
    marker.write_text("raykd")

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(path: str) -> bool:
        return os.path.exists(path)

    try:
        refs = {n["NodeID"]: sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(str(marker)) for n in nodes}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        if len(ready) < len(refs):
            print(f"storage check: not every node answered within {timeout_s:.0f}s; not checked", flush=True)
            return
        blind = [node[:8] for node, ref in refs.items() if not ray.get(ref)]
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise RaykdError(
            f"output_dir {run_dir} is not shared: node(s) {', '.join(blind)} cannot see it. On a multi-node "
            "cluster every stage reads what the previous one wrote, from any node: put output_dir on a "
            "filesystem mounted at the same path on every node (NFS, EFS, a ReadWriteMany volume)")
    print(f"storage check: all {len(nodes)} nodes see {run_dir}", flush=True)
