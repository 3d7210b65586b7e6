"""Distillation with 2 Train workers placed on 2 nodes of an in-process `ray.cluster_utils.Cluster`.

    python tests/multinode/cluster_utils_distill.py

Two 1-CPU nodes (the head also declares `raykd_driver`), then the stages distill needs on a tiny
synthetic log: prepare (Ray Data), a randomly initialised teacher (no teacher training: what is
tested here is the student's placement), soft labels (Ray Data actor), and distill with
`distill.train.num_workers=2, cpus_per_worker=1`, which fits only one worker per node. Checks with
Ray's state API that the student's RayTrainWorker actors ran on two different nodes, and that the
student's DDP replicas (2 ranks) stayed identical. Exit status 0 = pass.

Runs as its own process (never inside the pytest session, whose `ray_session` fixture owns a
local Ray) with its own RAY_TMPDIR: `Cluster` records its address in `<temp dir>/ray/
ray_current_cluster`, and in the default /tmp/ray a plain `ray.init()` elsewhere would join it.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

TMP = Path(tempfile.mkdtemp(prefix="rkcu-", dir="/tmp"))
os.environ["RAY_TMPDIR"] = str(TMP)  # before Ray is imported
os.environ.pop("RAY_ADDRESS", None)
os.environ["RAY_AUTH_MODE"] = "token"  # as a default Ray 2.60 local cluster, with a token of its own
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from conftest import TINY


def log(msg: str) -> None:
    print(f"[cluster_utils {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(head: dict, worker: dict, attempts: int = 3) -> Cluster:
    """Head + one worker node. Ports are picked free (other Rays may hold the defaults, e.g. the
    dashboard's 8265), and a start is retried: a node that has not registered within Ray's fixed
    30 s (a loaded machine) makes `Node()` raise."""
    for attempt in range(1, attempts + 1):
        cluster = Cluster()
        try:
            cluster.add_node(**head, dashboard_port=free_port(), dashboard_agent_listen_port=free_port())
            cluster.add_node(**worker)
            cluster.wait_for_nodes()
            return cluster
        except Exception as err:
            log(f"cluster start failed (attempt {attempt}): {err}")
            cluster.shutdown()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def main() -> int:
    from raykd import stages
    from raykd.cluster.needs import DRIVER_RESOURCE
    from raykd.cluster.placement import describe_placement
    from raykd.cluster.runtime import ensure_ray
    from raykd.config import load_config
    from raykd.core import models, rundir, sequences
    from raykd.stages import distill, prepare, soft_labels

    t0 = time.time()
    os.chdir(REPO)
    run_dir = TMP / "run"
    cfg = load_config("configs/quickstart.yaml", [*TINY, f"output_dir={run_dir}", "distill.train.num_workers=2",
                                                  "distill.train.cpus_per_worker=1", "distill.train_nokd=false"])
    cluster = start_cluster({"num_cpus": 1, "resources": {DRIVER_RESOURCE: 100}}, {"num_cpus": 1})
    failures = []
    try:
        ray.init(address=cluster.address)
        ensure_ray(cfg.ray)  # already connected: a no-op
        nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        log(f"{len(nodes)} nodes up in {time.time() - t0:.0f}s")
        for w in describe_placement(cfg, stages.needs(cfg, ["distill"])):
            failures.append(f"placement warning: {w}")

        prepare.run(cfg)
        data_dir = run_dir / "data"
        desc = {"family": cfg.teacher.model.family, "num_items": sequences.num_items(data_dir),
                **cfg.teacher.model.model_dump(exclude={"family"})}
        with rundir.staged(run_dir / "teacher") as tmp:  # published and recorded as the teacher stage does
            models.save_model(tmp, models.build_model(desc), desc, extra={"fingerprint": "random-teacher"})
            rundir.write_manifest(tmp, "random-teacher", {"data": rundir.key_of(data_dir)})
        rundir.record(run_dir, "teacher", "teacher", ["data"])
        soft_labels.run(cfg)
        t_fit = time.time()
        distill.run(cfg)
        log(f"distill (2 workers) in {time.time() - t_fit:.0f}s")

        actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                             limit=10_000, raise_on_missing_output=False)
        placed = sorted(a.node_id for a in actors)
        log(f"RayTrainWorker actors on nodes {[p[:8] for p in placed]}")
        if len(actors) != 2 or len(set(placed)) != 2:
            failures.append(f"expected 2 Train workers on 2 different nodes, got {placed}")
        summary = json.loads((run_dir / "student" / "metrics.json").read_text())
        digests = summary["replica_digests"]
        if len(digests) != 2 or len(set(digests)) != 1:
            failures.append(f"student DDP replicas {digests} (expected 2 identical)")
        log(f"student: valid NDCG@10 {summary['valid']['ndcg@10']:.4f}, {summary['epochs_run']} epochs, "
            f"replicas identical: {len(set(digests)) == 1}")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(TMP, ignore_errors=True)
    log(f"{'PASS' if not failures else 'FAIL'} in {time.time() - t0:.0f}s" + "".join(f"\n  - {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
