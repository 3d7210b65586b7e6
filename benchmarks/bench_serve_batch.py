"""Users/s through Ray Serve: POST /recommend/batch (64 users a request) vs POST /recommend (issue 11).

    python benchmarks/bench_serve_batch.py                  # ~4 min on 2 cores
    python benchmarks/bench_serve_batch.py --rounds 5 --duration 8

A synthetic 100,000-item catalogue (20,000 users, history lengths 5 + geometric, mean 15, written in
the prepared layout by bench_recommend.write_synthetic) and three randomly initialised models
(serving cost does not depend on the weights): the student (sasrec 16x1, the default student)
and two teachers (sasrec 64x2, the default teacher, and 128x2). Each is deployed as the app
`raykd serve` deploys (raykd.serve.build_app: one replica of 0.5 CPU, @serve.batch 32 / 5 ms,
access logs off), all three at once under their own route prefix, so that the points of one
round are taken seconds apart on this shared machine.

Per round, per model, two closed-loop points of --duration seconds from a separate load process
(a minimal asyncio HTTP/1.1 keep-alive client, in this file):
    single   32 clients, each POST /recommend {"user_id": u, "k": 10}
    batch    4 clients, each POST /recommend/batch {"requests": [64 such bodies]}
users/s counts the users answered (a batch request answers 64). Printed: per-point users/s and
p50/p99 request latency, and the medians over rounds of the per-round ratios batch / single (target
>= 5x for the student) and student / teacher on the batch path (target >= 3x); also each model's
in-process scoring rate (Recommender.recommend_batch on 64 users, no HTTP), the ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {"student": (16, 1, 1), "teacher64": (64, 2, 2), "teacher128": (128, 2, 2)}  # dim, layers, heads
BATCH = 64
K = 10


# ---------------------------------------------------------------- the load process


async def _request(reader, writer, raw: bytes) -> int:
    writer.write(raw)
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return status


async def _closed_loop(port: int, raws: list[bytes], clients: int, duration: float) -> dict:
    latencies, errors = [], 0
    deadline = time.perf_counter() + duration

    async def client(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            status = await asyncio.wait_for(_request(reader, writer, raws[rng.randrange(len(raws))]), 30)
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1) if latencies else None

    return {"requests": len(latencies), "errors": errors, "elapsed": elapsed, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def load_main(argv: list[str]) -> None:
    """`--load PORT PATH BODIES CLIENTS DURATION`: one closed-loop point, one JSON line out."""
    port, path, bodies, clients, duration = int(argv[0]), argv[1], argv[2], int(argv[3]), float(argv[4])
    raws = []
    for body in json.loads(Path(bodies).read_text()):
        data = json.dumps(body, separators=(",", ":")).encode()
        raws.append(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    print(json.dumps(asyncio.run(_closed_loop(port, raws, clients, duration))), flush=True)


def point(port: int, path: str, bodies: Path, clients: int, duration: float, users_per_request: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--load", str(port), path, str(bodies), str(clients),
                          str(duration)], capture_output=True, text=True, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    r["users_per_s"] = r["requests"] * users_per_request / r["elapsed"]
    return r


# ---------------------------------------------------------------- the servers


def prepare(out: Path, users: int, items: int) -> dict[str, Path]:
    from bench_recommend import random_model, write_synthetic

    write_synthetic(out / "data", users, items)
    return {name: random_model(out / name, items, dim, layers, heads) for name, (dim, layers, heads) in MODELS.items()}


def in_process(model_dirs: dict[str, Path], users: list, seconds: float = 3.0) -> dict[str, float]:
    """Users/s of Recommender.recommend_batch on 64 user_id bodies, no HTTP, one torch thread (a replica's)."""
    import torch

    from raykd.serve.recommender import Recommender

    torch.set_num_threads(1)
    rates = {}
    for name, path in model_dirs.items():
        rec = Recommender(path, max_k=K)
        bodies = [{"user_id": u, "k": K} for u in users[:BATCH]]
        rec.recommend_batch(bodies)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            rec.recommend_batch(bodies)
            n += BATCH
        rates[name] = n / (time.perf_counter() - t0)
    return rates


def deploy(model_dirs: dict[str, Path], port: int) -> None:
    from ray import serve

    from raykd.config import ServeConfig
    from raykd.serve.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    for name, path in model_dirs.items():
        settings = ServeConfig(port=port, min_replicas=1, max_replicas=1, max_k=K)
        serve.run(build_app(str(path), settings), name=name, route_prefix=f"/{name}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=6.0)
    ap.add_argument("--out", default="bench_out/serve_batch")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    model_dirs = prepare(out, args.users, args.items)
    import pyarrow.parquet as pq

    users = pq.read_table(out / "data" / "users.parquet")["raw_id"].to_pylist()
    random.Random(0).shuffle(users)
    print(f"load average at start: {os.getloadavg()}, {os.cpu_count()} CPUs", flush=True)
    rates = in_process(model_dirs, users)
    print("in-process (no HTTP), users/s on 64-user batches: " +
          ", ".join(f"{n} {r:,.0f}" for n, r in rates.items()), flush=True)
    (out / "single.json").write_text(json.dumps([{"user_id": u, "k": K} for u in users[:2000]]))
    (out / "batch.json").write_text(json.dumps([{"requests": [{"user_id": u, "k": K} for u in users[i:i + BATCH]]}
                                                for i in range(0, 2000 * BATCH // 10, BATCH)]))
    from raykd.cluster.runtime import ensure_ray
    from raykd.config import RayConfig

    ensure_ray(RayConfig(num_cpus=2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deploy(model_dirs, port)
    results: dict[tuple[str, str], list[dict]] = {}
    for rnd in range(args.rounds):
        names = list(model_dirs)[rnd % 3:] + list(model_dirs)[:rnd % 3]  # rotate the order
        for name in names:
            for path, body, clients, per in (("batch", "batch.json", 4, BATCH), ("single", "single.json", 32, 1)):
                route = f"/{name}/recommend" + ("/batch" if path == "batch" else "")
                r = point(port, route, out / body, clients, args.duration, per)
                results.setdefault((name, path), []).append(r)
                print(f"round {rnd + 1} {name:<10} {path:<6} {r['users_per_s']:>8,.0f} users/s "
                      f"({r['requests']} requests, {r['errors']} errors, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms)",
                      flush=True)
    report(results, args.rounds)
    print(f"load average at end: {os.getloadavg()}", flush=True)
    return 0


def report(results: dict, rounds: int) -> None:
    def med(name: str, path: str) -> float:
        return statistics.median(r["users_per_s"] for r in results[(name, path)])

    def ratio(a: tuple, b: tuple) -> float:
        return statistics.median(x["users_per_s"] / y["users_per_s"] for x, y in zip(results[a], results[b]))

    print(f"\n| model | single: users/s | batch of {BATCH}: users/s | batch / single (median of {rounds} rounds) "
          "| student / this model, batch path |\n|---|---|---|---|---|")
    for name in MODELS:
        vs = "-" if name == "student" else f"{ratio(('student', 'batch'), (name, 'batch')):.2f}x"
        print(f"| {name} | {med(name, 'single'):,.0f} | {med(name, 'batch'):,.0f} | "
              f"{ratio((name, 'batch'), (name, 'single')):.2f}x | {vs} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        load_main(sys.argv[2:])
    else:
        sys.path.insert(0, str(HERE))
        sys.exit(main())
