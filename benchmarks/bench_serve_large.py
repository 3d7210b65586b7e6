"""Serving at a million items: p50/p99 at a fixed request rate and replica memory, per model (issues 24, 25).

    python benchmarks/bench_serve_large.py                                  # 1M items, ~3 min on 2 quiet cores
    python benchmarks/bench_serve_large.py --items 100000 --duration 5      # a quick look

Data: a prepared folder written like benchmarks/bench_recommend.py's synthetic one (--users users,
history lengths 4 + geometric, mean 15; Zipf items over --items). Models saved from RANDOM initial
weights (serving cost does not depend on the weights; training them would take hours here):

    d16          SASRec 16 x 1 with a dense item table (the serving student of the quickstart's shape)
    d16-ann      the same model answered from raykd's approximate index (serve.ann: faiss HNSW built
                 from the item table as the replica starts; its recall@10 against exact from GET /model)
    pq<D>c<C>    SASRec D x 1 whose item table is product-quantised: C uint8 codes per item over 256-row
                 codebooks (issue 25); scored exactly from per-sub-space lookup tables
                 (raykd.core.scoring.CodeScores), never building the items x D table

Each model is served by `raykd.serve.build_app` (what `raykd serve` deploys) with ONE replica, one at a
time, on 127.0.0.1. Per model: seconds until the app answers (the replica's start, and the ANN index's
build for d16-ann), then an open-loop load at --rate requests/s for --duration seconds of POST /recommend
{"history": [<= 50 raw ids of a real user], "k": 10} (latency from each request's SCHEDULED send time,
benchmarks/serve_load.py), and the replica's RSS and USS sampled from outside (psutil) after the load.
The floor beside it: the same model's Recommender.recommend_many([one request]) in this process (no
HTTP, no Serve), median ms over --floor-requests requests. Sizes are every element a model reads at
inference (raykd.core.models.count_params; a PQ table's codes one element each).
Targets: p99 <= 50 ms at 100 req/s with 1M items (d16-ann, issue 24); the PQ student's p99 and replica
memory no worse than d16's with its size <= 1/4 of d16's (issue 25).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

MIB = 2**20


def build_models(run: Path, items: int, pq: list[str]) -> dict[str, Path]:
    """The random-init models of the run (saved once): d16 and each pq<D>c<C>."""
    import re

    import torch
    from bench_recommend import random_model

    from raykd.core import models

    folders = {"d16": run / "d16"}
    if not (folders["d16"] / "model.json").exists():
        random_model(folders["d16"], items, dim=16, layers=1)
    for name in pq:
        found = re.fullmatch(r"pq([0-9]+)c([0-9]+)", name)
        if found is None:
            raise SystemExit(f"--pq entries are pq<D>c<C> (pq64c3), got {name!r}")
        folder = folders[name] = run / name
        if (folder / "model.json").exists():
            continue
        dim, codes = int(found[1]), int(found[2])
        desc = {"family": "sasrec", "num_items": items, "dim": dim, "layers": 1, "heads": 1, "max_len": 50,
                "dropout": 0.2, "item_table": {"kind": "pq", "codes": codes, "codebook": 256, "assign": "svd"}}
        torch.manual_seed(0)
        model = models.build_model(desc).eval()
        gen = torch.Generator().manual_seed(1)
        model.item_emb.set_codes(torch.randint(0, 256, (items, codes), generator=gen, dtype=torch.uint8))
        models.save_model(folder, model, desc, {"fingerprint": f"bench-random-init-{name}",
                                                "note": "random initial weights and codes (serving benchmark)"})
    return folders


def sizes(folder: Path) -> tuple[int, int]:
    from raykd.core import models
    model, _ = models.load_model(folder)
    return models.count_params(model), models.count_bytes(model)


def floor_ms(folder: Path, bodies: list[dict], n: int) -> float:
    """Median ms of Recommender.recommend_many([one request]) in this process (1 torch thread, as a replica)."""
    import torch

    from raykd.serve.recommender import Recommender
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = Recommender(folder)
        times = []
        for request in [rec.parse(b) for b in bodies[:n]]:
            t0 = time.perf_counter()
            rec.recommend_many([request])
            times.append(1000 * (time.perf_counter() - t0))
        return statistics.median(times[1:] or times)
    finally:
        torch.set_num_threads(threads)


def replica_memory() -> dict:
    """RSS and USS of the one replica of the app `raykd`, sampled from outside."""
    from bench_serve_histories import replica_pids
    pids = replica_pids()
    if len(pids) != 1:
        raise RuntimeError(f"expected one replica, found {len(pids)}")
    info = psutil.Process(pids[0]).memory_full_info()
    return {"rss": info.rss, "uss": info.uss, "pid": pids[0]}


def serve_one(name: str, folder: Path, ann: bool, port: int, bodies_file: Path, rate: float,
              duration: float) -> dict:
    """Deploy one model (one replica), time its start, load it at `rate`, sample its memory, tear it down."""
    from ray import serve
    from serve_http import http_get, http_post, run_load, wait_ready

    from raykd.config import ServeConfig
    from raykd.serve.app import build_app

    settings = ServeConfig(min_replicas=1, max_replicas=1, replica_cpus=0.5, access_log=False, ann=ann)
    t0 = time.perf_counter()
    serve.run(build_app(str(folder), settings), name="raykd", route_prefix="/")
    wait_ready(port, seconds=900)
    ready = time.perf_counter() - t0
    try:
        status, answer = http_post(port, json.loads(bodies_file.read_text())[0])
        if status != 200:
            raise RuntimeError(f"{name} answered {status}: {answer}")
        model_info = json.loads(http_get(port, "/model", timeout=30)[1])
        run_load(port, bodies_file, min(3.0, duration), rate=rate)  # warm-up at the same rate
        load = run_load(port, bodies_file, duration, rate=rate)
        mem = replica_memory()
    finally:
        serve.delete("raykd")
    recall = (model_info.get("ann") or {}).get("recall@10")
    return {"name": name, "ready_s": ready, "load": load, "memory": mem, "ann_recall@10": recall,
            "first_answer": answer["items"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=200_000, help="users of the synthetic log (request bodies)")
    ap.add_argument("--pq", default="pq64c3", help="PQ students to serve beside d16 (comma-separated pq<D>c<C>)")
    ap.add_argument("--servers", default="d16,d16-ann,pq", help="which of d16, d16-ann, pq to serve")
    ap.add_argument("--rate", type=float, default=100.0, help="offered requests/s (open loop)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load per model")
    ap.add_argument("--bodies", type=int, default=500, help="distinct request bodies")
    ap.add_argument("--floor-requests", type=int, default=50)
    ap.add_argument("--out", default="bench_out/serve_large")
    args = ap.parse_args()
    from bench_recommend import write_synthetic
    from serve_catalogue import request_bodies
    from serve_http import free_port

    run = Path(args.out).resolve() / f"i{args.items}"
    print(f"bench_serve_large: load average at start {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    write_synthetic(run / "data", args.users, args.items)
    pq_names = [p for p in args.pq.split(",") if p]
    folders = build_models(run, args.items, pq_names)
    bodies = request_bodies(run, args.bodies)
    bodies_file = run / "bodies.json"
    bodies_file.write_text(json.dumps(bodies))
    wanted = [s for s in args.servers.split(",") if s]
    cells = [(name, folders["d16"], name == "d16-ann") for name in ("d16", "d16-ann") if name in wanted]
    cells += [(name, folders[name], False) for name in pq_names] if "pq" in wanted else []

    import ray
    from ray import serve

    from raykd.cluster.runtime import ensure_ray
    from raykd.config import RayConfig
    ensure_ray(RayConfig(num_cpus=2))
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    rows = []
    for name, folder, ann in cells:
        size = sizes(folder)
        floor = floor_ms(folder, bodies, args.floor_requests) if not ann else None
        r = serve_one(name, folder, ann, port, bodies_file, args.rate, args.duration)
        r.update(size=size[0], bytes=size[1], floor_ms=floor)
        rows.append(r)
        ld, mem = r["load"], r["memory"]
        print(f"{name}: size {size[0]:,} ({size[1] / MIB:,.1f} MiB); ready in {r['ready_s']:.1f}s; "
              f"{args.rate:.0f} req/s offered, {ld['throughput']} answered/s, p50 {ld['p50_ms']} ms, "
              f"p99 {ld['p99_ms']} ms, errors {ld['errors']}; replica RSS {mem['rss'] / MIB:,.0f} MiB, "
              f"USS {mem['uss'] / MIB:,.0f} MiB" + (f"; in-process floor {floor:.2f} ms/request" if floor else "")
              + (f"; ANN recall@10 {r['ann_recall@10']}" if ann else ""), flush=True)
    serve.shutdown()
    ray.shutdown()
    print("\n| model | size (elements) | MiB read | ready s | offered req/s | answered/s | p50 ms | p99 ms | errors | "
          "replica RSS MiB | replica USS MiB | in-process ms/request |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ld, mem = r["load"], r["memory"]
        floor = f"{r['floor_ms']:.2f}" if r["floor_ms"] else "–"
        print(f"| {r['name']} | {r['size']:,} | {r['bytes'] / MIB:,.1f} | {r['ready_s']:.1f} | {args.rate:.0f} | "
              f"{ld['throughput']} | {ld['p50_ms']} | {ld['p99_ms']} | {ld['errors']} | {mem['rss'] / MIB:,.0f} | "
              f"{mem['uss'] / MIB:,.0f} | {floor} |")
    by = {r["name"]: r for r in rows}
    base = by.get("d16")
    for r in rows:
        if base is None or r is base:
            continue
        print(f"{r['name']} / d16: size {r['size'] / base['size']:.3f}, p99 {r['load']['p99_ms'] / base['load']['p99_ms']:.2f}x, "
              f"replica USS {r['memory']['uss'] / base['memory']['uss']:.2f}x, RSS "
              f"{r['memory']['rss'] / base['memory']['rss']:.2f}x")
    print(f"load average at end {os.getloadavg()}", flush=True)
    (run / "results.json").write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
