"""Storage shared by every node: a multi-node run directory must be one filesystem, seen everywhere."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
import ray.data

from raykd.cluster.runtime import alive_nodes
from raykd.core.errors import RaykdError


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
