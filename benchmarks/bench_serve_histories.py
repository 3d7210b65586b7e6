"""Users' histories for serving at 10M users: flat arrays vs the old dict, and a replica's start-up (issue 24).

    python benchmarks/bench_serve_histories.py                      # 10M users x 1M items, ~8 min on 2 cores
    python benchmarks/bench_serve_histories.py --users 1000000      # smaller

Data: a prepared folder written like benchmarks/bench_recommend.py's synthetic one (history lengths
4 + geometric, mean 15; Zipf items), a random sasrec 16x1 model over the catalogue.

Measured, each in a fresh child process whose RSS this process samples every 0.1 s (psutil, from outside):
    flat       raykd.core.histories.read (what the Serve app builder does once): seconds, the arrays'
               bytes, the child's peak RSS and its RSS after the build (what it keeps)
    dict       the replaced `{raw id: np.ndarray}` of every user (sequences.read_split + a dict), on the
               first --dict-users users only, then extrapolated linearly to all users (SAID in the output):
               building it for 10M users takes minutes and more memory than the flat arrays' whole run
    replica    `serve.run(build_app(...))` with 2 replicas: seconds until the app is ready (the builder's
               read + ray.put included), then each replica's RSS and USS (its private pages: what it does
               not share through the object store) sampled from outside; a user_id request answered
Targets: a replica for 10M users starts in <= 30 s and holds the histories in <= 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

FLAT = """
import json, sys, time
t0 = time.perf_counter()
from raykd.core import histories
h = histories.read(sys.argv[1])
open(sys.argv[-1], "w").write(json.dumps({"seconds": time.perf_counter() - t0, "users": len(h), "bytes": h.nbytes()}))
time.sleep(3)  # the parent samples what the process keeps
"""

DICT = """
import json, sys, time
import numpy as np
import pyarrow.parquet as pq
t0 = time.perf_counter()
from raykd.core import histories, sequences
n = int(sys.argv[2])
split = sequences.read_split(sys.argv[1], np.arange(n))
raw = pq.read_table(sys.argv[1] + "/users.parquet", columns=["raw_id"]).slice(0, n)["raw_id"].to_pylist()
d = {raw[u]: histories.full_history(t, v, s) for u, t, v, s in zip(split["user"], split["train"], split["valid"],
                                                                  split["test"])}
del split
open(sys.argv[-1], "w").write(json.dumps({"seconds": time.perf_counter() - t0, "users": len(d)}))
time.sleep(3)
"""


def sampled(code: str, *argv: str) -> dict:
    """Run `code` in a child process; what it writes (JSON), its peak RSS and its RSS once it has written
    it (what it holds, before it exits), sampled from here."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        proc = subprocess.Popen([sys.executable, "-c", code, *argv, result.name],
                                env={**os.environ, "PYTHONPATH": str(REPO)})
        ps, peak, last = psutil.Process(proc.pid), 0, 0
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss
            except psutil.Error:
                break
            peak = max(peak, rss)
            if not last and Path(result.name).stat().st_size:  # its result is written: what it holds now
                last = rss
            time.sleep(0.1)
        if proc.wait():
            raise SystemExit(f"child failed ({proc.returncode})")
        return {**json.loads(Path(result.name).read_text()), "peak_rss": peak, "kept_rss": last}


def replica_pids() -> list[int]:
    import ray

    pids = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == "serve" and a["name"].startswith("SERVE_REPLICA::raykd#recommender"):
            handle = ray.get_actor(a["name"], namespace="serve")
            pids.append(ray.get(handle.__ray_call__.remote(lambda self: os.getpid()), timeout=60))
    return pids


def replica(run: Path, replicas: int) -> dict:
    """Start the app with `replicas` replicas; seconds to ready, each replica's RSS / USS, one user_id answer."""
    import httpx
    import pyarrow.parquet as pq
    from ray import serve

    from raykd.cluster.runtime import ensure_ray
    from raykd.config import RayConfig, ServeConfig
    from raykd.serve.app import build_app

    ensure_ray(RayConfig(num_cpus=2))
    port = 8711
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = ServeConfig(min_replicas=replicas, max_replicas=replicas, replica_cpus=0.5, access_log=False)
    t0 = time.perf_counter()
    serve.run(build_app(str(run / "bench_student"), settings), name="raykd", route_prefix="/")
    ready = time.perf_counter() - t0
    mem = []
    for pid in replica_pids():
        info = psutil.Process(pid).memory_full_info()
        mem.append({"rss": info.rss, "uss": info.uss})
    user = pq.read_table(run / "data" / "users.parquet", columns=["raw_id"]).slice(0, 1)["raw_id"].to_pylist()[0]
    t1 = time.perf_counter()
    r = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": user, "k": 10}, timeout=60)
    answer_ms = 1000 * (time.perf_counter() - t1)
    serve.shutdown()
    return {"ready_s": ready, "replicas": mem, "status": r.status_code, "first_answer_ms": answer_ms}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=10_000_000)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--dict-users", type=int, default=1_000_000, help="users the old dict is built for")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--out", default="bench_out/histories")
    args = ap.parse_args()
    from bench_recommend import random_model, write_synthetic

    run = Path(args.out).resolve() / f"u{args.users}"
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    t0 = time.perf_counter()
    write_synthetic(run / "data", args.users, args.items)
    if not (run / "bench_student" / "model.json").exists():
        random_model(run / "bench_student", args.items, dim=16, layers=1)
    interactions = json.loads((run / "data" / "stats.json").read_text())["interactions"]
    print(f"data: {args.users:,} users, {interactions:,} interactions, {args.items:,} items "
          f"(ready in {time.perf_counter() - t0:.0f}s)", flush=True)
    mib = 2**20
    flat = sampled(FLAT, str(run / "data"))
    print(f"flat   : {flat['users']:,} users in {flat['seconds']:.1f}s; arrays {flat['bytes'] / mib:,.0f} MiB; "
          f"process peak RSS {flat['peak_rss'] / mib:,.0f} MiB, kept {flat['kept_rss'] / mib:,.0f} MiB", flush=True)
    n = min(args.dict_users, args.users)
    base = sampled(DICT, str(run / "data"), "0")["kept_rss"]  # the interpreter, NumPy, Arrow, raykd.core
    old = sampled(DICT, str(run / "data"), str(n))
    scale, grown = args.users / n, old["kept_rss"] - base
    print(f"dict   : {old['users']:,} users in {old['seconds']:.1f}s; process peak RSS {old['peak_rss'] / mib:,.0f} MiB,"
          f" kept {old['kept_rss'] / mib:,.0f} MiB ({grown / mib:,.0f} MiB over the {base / mib:,.0f} MiB of a process "
          "that built none)" + (f"  -> EXTRAPOLATED linearly to {args.users:,} users: ~{old['seconds'] * scale:.0f}s, "
                                f"~{grown * scale / mib:,.0f} MiB (not measured)" if scale > 1 else ""), flush=True)
    rep = replica(run, args.replicas)
    per = ", ".join(f"RSS {m['rss'] / mib:,.0f} MiB / USS {m['uss'] / mib:,.0f} MiB" for m in rep["replicas"])
    print(f"replica: {args.replicas} replica(s) ready in {rep['ready_s']:.1f}s (builder read + put + replica start); "
          f"{per}; user_id answer {rep['status']} in {rep['first_answer_ms']:.0f} ms", flush=True)
    print(f"load average at end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
