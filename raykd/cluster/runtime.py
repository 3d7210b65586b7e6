"""Connecting to Ray: a cluster when one is there, else a local Ray; what was found; where work goes.

`ensure_ray(cfg.ray)` joins, in this order: `ray.address` from the config, `RAY_ADDRESS` (set by
`ray job submit` for the job's driver), or a cluster that `ray start` runs on this machine (what
`ray.init(address="auto")` finds). Otherwise, or when `ray.num_cpus` asks for a local Ray of a
given size, it starts a local Ray that declares the zero-CPU `DRIVER_RESOURCE`. It prints the
nodes, CPUs and GPUs it found; `placement.describe_placement(cfg, needs)` prints how each stage will use them and
warns about settings that cannot fit (Ray would otherwise wait for resources without a word).
"""


from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray
import ray.data

from raykd.cluster import ray_private
from raykd.cluster.needs import DRIVER_RESOURCE, LOCAL_DRIVER_UNITS
from raykd.cluster.output import install_router
from raykd.config import RayConfig
from raykd.core import console


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
    return ray_private.ray_start_address()


def ensure_ray(cfg: RayConfig | None = None, quiet: bool = False) -> None:
    """Start or join Ray once per process and print what was found.

    Worker output that Ray forwards to this driver then goes through `output.install_router`:
    raykd's own lines (raykd.core.console.say in a worker) are printed as the driver's, the rest goes to
    the run's log file inside a `run_logs` block (on the console as Ray prints it with `-v`).
    """
    if ray.is_initialized():
        install_router()
        return
    cfg = cfg or RayConfig()
    address = find_cluster(cfg)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune snapshots an experiment every 2 checkpoints of a trial and warns when that is often;
    # in-process trials with short epochs make it so, and the warning says nothing to act on
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        # An existing cluster (e.g. under `ray job submit`): num_cpus/resources would raise here.
        if cfg.num_cpus is not None and not quiet:
            console.warn(f"ray.num_cpus={cfg.num_cpus} ignored: joining the cluster at {address}")
        explicit = cfg.address or os.environ.get("RAY_ADDRESS")
        # "auto" for a `ray start` cluster found on this machine: Ray then also picks up its token
        # (~/.ray/auth_token) by itself, which it never does for an explicit address.
        ray.init(address=explicit or "auto", logging_level=logging.WARNING)
    else:
        # "local": never attach to a cluster that some other `ray start` left on this machine.
        ray.init(address="local", num_cpus=cfg.num_cpus, resources={DRIVER_RESOURCE: LOCAL_DRIVER_UNITS},
                 logging_level=logging.WARNING)
    install_router()
    # Ray Data's progress bars and per-operator lines drown stage output (they repeat every epoch
    # in training); raykd prints its own progress lines instead.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not quiet:
        where = f"joined the cluster at {ray.get_runtime_context().gcs_address}" if address else "started local Ray"
        console.say(f"ray: {where}; {describe_resources()}")


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


@contextlib.contextmanager
def own_signal_handlers() -> Iterator[None]:
    """Give back this process's SIGINT/SIGUSR1 handlers after a Ray Train or Tune run: both install
    their own (abort that run) and leave them behind, so a later Ctrl-C would be swallowed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
