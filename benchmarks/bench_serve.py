"""Benchmark the raykd recommendation endpoint (issue 5 item 4): Ray Serve vs plain uvicorn.

Everything runs in one invocation on one machine, one server at a time, bound to 127.0.0.1:

    serve-student  raykd.serve.build_app on the student folder (one deployment: FastAPI ingress +
                   @serve.batch scoring), exactly what `raykd serve` deploys
    serve-teacher  the same app on the teacher folder (the teacher has a model.json too)
    plain-student  one process: FastAPI + uvicorn (subprocess), same Recommender, no batching:
                   every request is parsed and scored alone (recommend_many([one]))
    serve-const    a Ray Serve deployment (FastAPI ingress, same replica options) that reads the
                   body and answers a constant: the framework's own floor
    serve-2hop     the design alternative: an ingress deployment (HTTP + JSON) calling a model
                   deployment (parse + @serve.batch scoring) through a DeploymentHandle
    serve-student-1loop  serve-student with RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in the
                   replica (user code on Serve's own event loop: a candidate fix, see RESULTS.md)
    plain-const    uvicorn answering a constant (closed loop at 32 only): shows what the load
                   generator itself can drive on this machine

on two catalogues: the quickstart run's (small, --run) and a synthetic 100,000-item catalogue
(--big-run, built on first use: `raykd prepare` of a synthetic log with 100k items, then a
student (sasrec 16x1) and teacher (sasrec 64x2) of the quickstart's shapes saved with
raykd.models.save_model from RANDOM initial weights: serving cost does not depend on the weights,
training a 100k-item model would take far longer than the benchmark).

Two phases per catalogue. (1) One server at a time, every load point below: the full tables.
(2) Paired rounds: every server up at once (all idle but the one under load), then --rounds rounds
of a short 32-client closed-loop point on each server in rotating order. On a shared machine whose
load swings by 5x within minutes, ratios of points taken seconds apart are far steadier than ratios
of points taken minutes apart, so the throughput-ratio targets are checked on the median of the
per-round ratios (the one-at-a-time peaks are printed beside them).

Load shapes, each point bounded in time (--duration) and count:
    closed loop  N concurrent clients, each sends its next request when the last one answered
                 (peak throughput); latency from send to answer
    open loop    requests sent on a fixed schedule at R req/s; latency measured from the
                 SCHEDULED send time, so queueing (in the server or in the client) is not hidden
Requests are POST /recommend {"history": [raw ids, last <= 50 of a real user], "k": 10}.
Every Serve deployment runs ONE replica (min = max = 1; autoscaling would add a second replica
mid-run and blur the comparison) with the project's defaults otherwise: 0.5 CPU, access logs off,
@serve.batch 32 / 5 ms. Ray gives such a replica OMP_NUM_THREADS=1, so the plain app uses one
torch thread too (--plain-torch-threads). Before the HTTP runs, a scoring microbenchmark times
Recommender.recommend_many in-process (no HTTP) by batch size and torch threads; --profile runs
py-spy on the Serve student replica and the HTTP proxy during an extra 32-client point.

The load generator is a separate process (benchmarks/serve_load.py) using a minimal asyncio
HTTP/1.1 keep-alive client (pre-encoded requests, one connection per in-flight request): far
cheaper per request than httpx, but on a 2-core machine it still competes with the server for
CPU, as do Ray's own processes and anything else running. Ratios measured side by side in one run
are what count; the load average is printed at start and end.

    python benchmarks/bench_serve.py                       # everything, ~10-15 min on 2 cores
    python benchmarks/bench_serve.py --duration 3 --catalogues small --servers serve-student,serve-const
"""

# No `from __future__ import annotations`: FastAPI must resolve the `Request` annotations of the
# endpoints defined inside functions below.
import argparse
import contextlib
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from serve_load import REQUEST_TIMEOUT_S  # the load generator's per-request timeout (sibling script)

REPO = Path(__file__).resolve().parent.parent
ALL_SERVERS = ["serve-student", "serve-teacher", "plain-student", "serve-const", "serve-2hop", "serve-student-1loop",
               "plain-const"]
BIG_ITEMS, BIG_USERS, BIG_MEAN_LENGTH = 100_000, 20_000, 30
K = 10

# Targets of issue 5 item 4.
TARGET_P99_MS = 50.0
TARGET_P99_RATE = 100.0
TARGET_VS_CONST = 0.8
TARGET_VS_PLAIN = 1.0
TARGET_VS_TEACHER = 5.0


# ----------------------------------------------------------------------------- plain uvicorn server


def plain_main(argv: list[str]) -> None:
    """`bench_serve.py _plain --path MODEL --port P [--const]`: FastAPI + uvicorn, one process."""
    p = argparse.ArgumentParser(prog="bench_serve.py _plain")
    p.add_argument("--path")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--const", action="store_true")
    p.add_argument("--torch-threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    from raykd.config import ServeConfig
    from raykd.recommender import BadRequest, Recommender

    torch.set_num_threads(a.torch_threads)
    settings = ServeConfig()
    rec = None if a.const else Recommender(a.path, settings.max_k, settings.max_history)
    app = FastAPI()
    constant = {"items": list(range(K)), "scores": [0.0] * K, "model": "constant", "unknown_items": []}

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    @app.post("/recommend")
    async def recommend(request: Request) -> JSONResponse:
        body = await request.body()
        if rec is None:
            return JSONResponse(constant)
        if len(body) > settings.max_body_bytes:
            return JSONResponse({"error": "body too large"}, status_code=413)
        try:
            data = json.loads(body)
        except ValueError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        if not isinstance(data, dict):
            return JSONResponse({"error": "body must be an object"}, status_code=422)
        try:
            parsed = rec.parse(data)
        except BadRequest as err:
            return JSONResponse({"error": err.message}, status_code=err.status)
        return JSONResponse(rec.recommend_many([parsed])[0])

    uvicorn.run(app, host="127.0.0.1", port=a.port, access_log=False, log_level="warning")


# ----------------------------------------------------------------------------- Serve variants


def _serve_variants():
    """Deployments defined inside the benchmark: the constant floor and the two-hop graph."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    const_app = FastAPI()

    @serve.deployment(name="constant")
    @serve.ingress(const_app)
    class Constant:
        def __init__(self):
            self.answer = {"items": list(range(K)), "scores": [0.0] * K, "model": "constant", "unknown_items": []}

        @const_app.post("/recommend")
        async def recommend(self, request: Request) -> JSONResponse:
            await request.body()
            return JSONResponse(self.answer)

        @const_app.get("/healthz")
        async def healthz(self) -> dict:
            import torch
            return {"status": "ok", "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    @serve.deployment(name="model")
    class Model:
        """Parse + batched scoring, behind a handle."""

        def __init__(self, path: str, settings: dict):
            from raykd.config import ServeConfig
            from raykd.recommender import Recommender
            cfg = ServeConfig(**settings)
            self.rec = Recommender(path, cfg.max_k, cfg.max_history)
            self._batched.set_max_batch_size(cfg.max_batch_size)
            self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

        @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
        async def _batched(self, parsed: list) -> list[dict]:
            return self.rec.recommend_many(parsed)

        async def recommend(self, data: dict) -> tuple[int, dict]:
            from raykd.recommender import BadRequest
            try:
                parsed = self.rec.parse(data)
            except BadRequest as err:
                return err.status, {"error": err.message}
            return 200, await self._batched(parsed)

    ingress_app = FastAPI()

    @serve.deployment(name="ingress")
    @serve.ingress(ingress_app)
    class Ingress:
        """HTTP + JSON only; scoring happens in the model deployment, one handle call per request."""

        def __init__(self, model):
            self.model = model

        @ingress_app.post("/recommend")
        async def recommend(self, request: Request) -> JSONResponse:
            try:
                data = json.loads(await request.body())
            except ValueError as err:
                return JSONResponse({"error": str(err)}, status_code=400)
            if not isinstance(data, dict):
                return JSONResponse({"error": "body must be an object"}, status_code=422)
            status, answer = await self.model.recommend.remote(data)
            return JSONResponse(answer, status_code=status)

        @ingress_app.get("/healthz")
        async def healthz(self) -> dict:
            return {"status": "ok"}

    return Constant, Model, Ingress


def student_one_loop(path: str, settings):
    """build_app's deployment, but the replica runs user code on its main event loop
    (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0 in the replica's runtime_env): no thread hop per
    request between Serve's loop and the user loop."""
    from raykd.serve import StudentDeployment
    opts = _serve_options(settings)
    opts["ray_actor_options"] = {**opts["ray_actor_options"], "runtime_env": {
        "env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}}
    return StudentDeployment.options(**opts).bind(path, settings.model_dump())


def _serve_options(settings) -> dict:
    """The replica options raykd.serve.build_app uses, for the benchmark's own deployments."""
    return {"num_replicas": 1, "max_ongoing_requests": max(2 * settings.max_batch_size, 8),
            "ray_actor_options": {"num_cpus": settings.replica_cpus},
            "logging_config": {"enable_access_log": settings.access_log}}


# ----------------------------------------------------------------------------- catalogues


def build_big_run(run: Path) -> None:
    """A tiny run dir with a 100k-item catalogue: prepared synthetic data + random-init models."""
    if (run / "student" / "model.json").exists() and (run / "teacher" / "model.json").exists():
        return
    import yaml
    run.mkdir(parents=True, exist_ok=True)
    cfg = {"name": run.name, "output_dir": str(run), "seed": 0,
           "data": {"format": "synthetic", "min_user_interactions": 5, "min_item_interactions": 1,
                    "synthetic": {"users": BIG_USERS, "items": BIG_ITEMS, "mean_length": BIG_MEAN_LENGTH,
                                  "popularity_skew": 0.0, "clusters": 20, "seed": 0}}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"[build] raykd prepare {run / 'config.yaml'} (100k-item synthetic catalogue)", flush=True)
    t = time.time()
    subprocess.run([sys.executable, "-m", "raykd.cli", "prepare", str(run / "config.yaml")], check=True, cwd=REPO)
    print(f"[build] prepared in {time.time() - t:.0f} s", flush=True)
    import pyarrow.parquet as pq
    import torch

    from raykd import models
    num_items = pq.read_table(run / "data" / "items.parquet").num_rows
    torch.manual_seed(0)
    shapes = {"student": {"dim": 16, "layers": 1, "heads": 1}, "teacher": {"dim": 64, "layers": 2, "heads": 2}}
    for name, shape in shapes.items():
        desc = {"family": "sasrec", "num_items": num_items, "max_len": 50, "dropout": 0.2, **shape}
        model = models.build_model(desc).eval()
        models.save_model(run / name, model, desc, {"fingerprint": f"bench-random-init-{name}",
                                                    "note": "random initial weights (serving benchmark)"})
        print(f"[build] {run / name}: sasrec {shape['dim']}x{shape['layers']}, {num_items} items, "
              f"{models.count_params(model)} params (random init)", flush=True)


def request_bodies(run: Path, n: int, seed: int = 0) -> list[dict]:
    """`n` POST /recommend bodies: the last <= 50 items (raw ids) of random real users' histories."""
    import numpy as np
    import pyarrow.parquet as pq

    from raykd import sequences
    data = run / "data"
    raw = pq.read_table(data / "items.parquet")["raw_id"].to_pylist()
    split = sequences.read_split(data)
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(split["user"]), size=min(n, len(split["user"])), replace=False)
    bodies = []
    for r in rows:
        hist = np.append(split["train"][r], split["valid"][r])[-50:]
        bodies.append({"history": [raw[i - 1] for i in hist.tolist()], "k": K})
    return bodies


# ----------------------------------------------------------------------------- scoring alone


def scoring_microbench(runs: dict, catalogues: list[str], bodies_files: dict, seconds: float) -> list[dict]:
    """Recommender.recommend_many in this process (no HTTP): ms per request by batch size and torch
    intra-op threads, so the HTTP numbers can be split into model cost and serving cost."""
    import torch

    from raykd.recommender import Recommender
    rows = []
    saved = torch.get_num_threads()
    print("\n## scoring alone: Recommender.recommend_many in-process, ms per request (req/s)")
    print("| cat   | model   | threads | batch 1          | batch 8          | batch 32         |")
    print("|-------|---------|---------|------------------|------------------|------------------|")
    for cat in catalogues:
        bodies = json.loads(bodies_files[cat].read_text())[:64]
        for model in ("student", "teacher"):
            rec = Recommender(runs[cat] / model)
            parsed = [rec.parse(b) for b in bodies]
            for threads in (1, 2):
                torch.set_num_threads(threads)
                cells = []
                for batch in (1, 8, 32):
                    rec.recommend_many(parsed[:batch])
                    n, t0 = 0, time.perf_counter()
                    while time.perf_counter() - t0 < seconds and n < 20_000:
                        for i in range(0, len(parsed), batch):
                            rec.recommend_many(parsed[i:i + batch])
                            n += len(parsed[i:i + batch])
                            if time.perf_counter() - t0 > seconds:
                                break
                    dt = time.perf_counter() - t0
                    ms = 1000 * dt / n
                    cells.append(f"{ms:7.2f} ({n / dt:6.0f})")
                    rows.append({"catalogue": cat, "model": model, "threads": threads, "batch": batch,
                                 "ms_per_request": round(ms, 3), "req_per_s": round(n / dt, 1)})
                print(f"| {cat:5} | {model:7} | {threads:7} | " + " | ".join(cells) + " |", flush=True)
    torch.set_num_threads(saved)
    return rows


# ----------------------------------------------------------------------------- driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loadavg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def _get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    import httpx
    r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout)
    return r.status_code, r.text


def _post(port: int, body: dict, timeout: float = 30.0, prefix: str = "") -> tuple[int, dict]:
    import httpx
    r = httpx.post(f"http://127.0.0.1:{port}{prefix}/recommend", json=body, timeout=timeout)
    return r.status_code, r.json()


def _wait_ready(port: int, seconds: float = 60.0, prefix: str = "") -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(Exception):  # not up yet: refused, reset, timed out
            if _get(port, f"{prefix}/healthz")[0] == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"server on port {port} did not answer /healthz within {seconds:.0f} s")


def run_load(port: int, bodies_file: Path, duration: float, clients: int | None = None,
             rate: float | None = None, prefix: str = "") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "serve_load.py"), "--port", str(port), "--bodies",
           str(bodies_file), "--duration", str(duration), "--prefix", prefix]
    cmd += ["--clients", str(clients)] if clients else ["--rate", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 3 * REQUEST_TIMEOUT_S + 30,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(v, width: int, digits: int = 1) -> str:
    if v is None:
        return "-".rjust(width)
    return f"{v:{width}.{digits}f}" if isinstance(v, float) else str(v).rjust(width)


def print_row(cat: str, server: str, r: dict) -> None:
    offered = r.get("offered")
    print(f"| {cat:5} | {server:19} | {r['load']:13} | {_fmt(offered, 7, 0)} | {_fmt(r['throughput'], 8)} | "
          f"{_fmt(r['p50_ms'], 7)} | {_fmt(r['p95_ms'], 7)} | {_fmt(r['p99_ms'], 7)} | "
          f"{_fmt(r['errors'], 6)} |", flush=True)


HEADER = ("| cat   | server              | load          | offered | req/s    | p50 ms  | p95 ms  | p99 ms  | errors |\n"
          "|-------|---------------------|---------------|---------|----------|---------|---------|---------|--------|")


def _replica_pids(title: str) -> list[int]:
    """PIDs of this benchmark's own Ray workers whose process title contains `title` (other Ray
    instances on the machine may run replicas with the same names: only our descendants count)."""
    import psutil
    pids = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if title in " ".join(proc.cmdline()):
                pids.append(proc.pid)
        except psutil.Error:
            pass
    return pids


def profile(port: int, bodies_file: Path, duration: float, out_dir: Path, tag: str) -> dict:
    """py-spy the replica(s) and the HTTP proxy while 32 closed-loop clients run."""
    pids = {"replica": _replica_pids("ServeReplica:bench:"), "proxy": _replica_pids("ProxyActor")}
    print(f"# py-spy on {pids}", flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    for role, plist in pids.items():
        for pid in plist:
            path = out_dir / f"{tag}-{role}-{pid}.txt"
            procs.append((role, pid, path, subprocess.Popen(
                ["py-spy", "record", "--pid", str(pid), "--duration", str(int(duration)), "--rate", "200",
                 "--format", "raw", "--output", str(path), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    result = run_load(port, bodies_file, duration, clients=32)
    summary = {}
    for role, pid, path, proc in procs:
        proc.wait(timeout=duration + 60)
        summary[f"{role}:{pid}"] = top_frames(path) if path.exists() else proc.stderr.read().decode()[-300:]
    return {"load": result, "profiles": summary}


def top_frames(path: Path, n: int = 12) -> list[tuple[str, float]]:
    """Self-time (leaf frame) and inclusive shares from py-spy's collapsed-stack output."""
    leaf: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        leaf[frames[-1]] = leaf.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    top = sorted(leaf.items(), key=lambda kv: -kv[1])[:n]
    keys = ("raykd/", "json/__init__", "JSONResponse", "receive_asgi_messages", "handle_request")
    inc = sorted(((f, v) for f, v in incl.items() if any(k in f for k in keys)), key=lambda kv: -kv[1])[:n]
    return {"samples": total, "self": [(f, round(100 * v / max(total, 1), 1)) for f, v in top],
            "inclusive": [(f, round(100 * v / max(total, 1), 1)) for f, v in inc]}


def print_profile(cat: str, server: str, prof: dict) -> None:
    r = prof["load"]
    print(f"# py-spy profile, {cat} {server}, closed c=32: {r['throughput']} req/s, p50 {r['p50_ms']} ms "
          f"(shares of the process's non-idle samples)", flush=True)
    for who, p in prof["profiles"].items():
        if not isinstance(p, dict):
            print(f"#   {who}: py-spy failed: {p}")
            continue
        print(f"#   {who}: {p['samples']} samples; top self: " +
              "; ".join(f"{v}% {f}" for f, v in p["self"][:8]))
        if p["inclusive"]:
            print(f"#   {who}: inclusive: " + "; ".join(f"{v}% {f}" for f, v in p["inclusive"][:6]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/quickstart", help="trained run dir: student/, teacher/, data/")
    p.add_argument("--big-run", default="runs/bench_serve_100k", help="100k-item run dir (built if missing)")
    p.add_argument("--catalogues", default="small,100k")
    p.add_argument("--servers", default=",".join(s for s in ALL_SERVERS if s != "serve-student-1loop"),
                   help="servers measured one at a time at every load point")
    p.add_argument("--paired", default=",".join(s for s in ALL_SERVERS if s != "plain-const"),
                   help="servers of the paired rounds ('' to skip)")
    p.add_argument("--rounds", type=int, default=4, help="paired rounds per catalogue")
    p.add_argument("--pair-seconds", type=float, default=3.0)
    p.add_argument("--pair-clients", type=int, default=32)
    p.add_argument("--clients", default="1,8,32,64", help="closed-loop concurrency levels")
    p.add_argument("--rates", default="25,50,100", help="open-loop offered rates, req/s")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per load point")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of 8-client load before each server")
    p.add_argument("--bodies", type=int, default=500, help="distinct request bodies per catalogue")
    p.add_argument("--json-out", default="bench_out/bench_serve.json")
    p.add_argument("--profile", action="store_true", help="py-spy the Serve student replica and proxy")
    p.add_argument("--plain-torch-threads", type=int, default=1,
                   help="torch threads of the plain app (Ray gives a 0.5-CPU replica OMP_NUM_THREADS=1)")
    p.add_argument("--micro-seconds", type=float, default=1.0, help="per cell of the scoring microbenchmark; 0: skip")
    a = p.parse_args()

    catalogues = [c for c in a.catalogues.split(",") if c]
    servers = [s for s in a.servers.split(",") if s]
    pair_servers = [s for s in a.paired.split(",") if s]
    unknown = (set(servers) | set(pair_servers)) - set(ALL_SERVERS)
    if unknown:
        p.error(f"unknown servers {sorted(unknown)}; valid: {ALL_SERVERS}")
    clients = [int(x) for x in a.clients.split(",") if x]
    rates = [float(x) for x in a.rates.split(",") if x]
    runs = {"small": REPO / a.run, "100k": REPO / a.big_run}
    out_dir = REPO / Path(a.json_out).parent
    out_dir.mkdir(parents=True, exist_ok=True)

    if not (runs["small"] / "student" / "model.json").exists():
        sys.exit(f"{runs['small']} has no student: run `raykd pipeline configs/quickstart.yaml` first")
    if "100k" in catalogues:
        build_big_run(runs["100k"])

    import ray
    import torch
    from ray import serve

    from raykd.config import ServeConfig
    from raykd.models import count_params
    from raykd.recommender import Recommender
    from raykd.serve import build_app

    settings = ServeConfig(min_replicas=1, max_replicas=1)  # one replica everywhere: like for like
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
            "ray": ray.__version__, "torch": torch.__version__, "loadavg_start": _loadavg(),
            "serve_config": settings.model_dump(exclude={"api_key"}), "duration_s": a.duration}
    print("# bench_serve", json.dumps(info, indent=1), flush=True)

    bodies_files, details = {}, {}
    for cat in catalogues:
        bodies = request_bodies(runs[cat], a.bodies)
        f = out_dir / f"bench_serve_bodies_{cat}.json"
        f.write_text(json.dumps(bodies))
        bodies_files[cat] = f
        rec = Recommender(runs[cat] / "student")
        trec = Recommender(runs[cat] / "teacher")
        details[cat] = {"items": len(rec.raw_items) - 1, "student_params": count_params(rec.model),
                        "teacher_params": count_params(trec.model),
                        "mean_history": sum(len(b["history"]) for b in bodies) / len(bodies)}
        print(f"# catalogue {cat}: {runs[cat]}: {json.dumps(details[cat])}", flush=True)
        del rec, trec
    micro = scoring_microbench(runs, catalogues, bodies_files, a.micro_seconds) if a.micro_seconds > 0 else []

    # Logical CPUs only: every server of the paired rounds is up at once (0.5 CPU per replica); the
    # machine's real cores are what they are. A 0.5-CPU replica still gets OMP_NUM_THREADS=1.
    ray.init(address="local", num_cpus=max(8, os.cpu_count()), include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    Constant, Model, Ingress = _serve_variants()
    opts = _serve_options(settings)

    results: list[dict] = []
    pair_results: list[dict] = []
    profiles = {}
    reference_answer = {}

    def app_for(server: str, run: Path):
        if server == "serve-student":
            return build_app(str(run / "student"), settings)
        if server == "serve-teacher":
            return build_app(str(run / "teacher"), settings)
        if server == "serve-student-1loop":
            return student_one_loop(str(run / "student"), settings)
        if server == "serve-const":
            return Constant.options(**opts).bind()
        return Ingress.options(**opts).bind(Model.options(**opts).bind(str(run / "student"), settings.model_dump()))

    def start_plain(server: str, run: Path) -> tuple[subprocess.Popen, int]:
        pport = _free_port()
        cmd = [sys.executable, str(Path(__file__).resolve()), "_plain", "--port", str(pport)]
        cmd += ["--const"] if server == "plain-const" else ["--path", str(run / "student")]
        cmd += ["--torch-threads", str(a.plain_torch_threads)]
        return subprocess.Popen(cmd, cwd=REPO), pport

    def paired(cat: str) -> None:
        """Every server up at once (idle but one), then rounds of short 32-client points over all of
        them in rotating order: each round's ratios are measured within seconds of each other."""
        run, f = runs[cat], bodies_files[cat]
        targets, procs = {}, []
        t = time.time()
        try:
            for server in pair_servers:
                if server.startswith("serve-"):
                    serve.run(app_for(server, run), name=f"pair-{server}", route_prefix=f"/{server}")
                    _wait_ready(port, prefix=f"/{server}")
                    targets[server] = (port, f"/{server}")
                else:
                    proc, pport = start_plain(server, run)
                    procs.append(proc)
                    _wait_ready(pport)
                    targets[server] = (pport, "")
            for server, (p_, prefix) in targets.items():
                status, answer = _post(p_, json.loads(f.read_text())[0], prefix=prefix)
                if status != 200:
                    raise RuntimeError(f"paired {server} answered {status}: {answer}")
                run_load(p_, f, 1.0, clients=8, prefix=prefix)  # warm-up
            print(f"\n## {cat}: paired rounds, all {len(targets)} servers up ({time.time() - t:.0f} s to start), "
                  f"{a.pair_clients} clients x {a.pair_seconds:g} s per server per round, req/s", flush=True)
            names = list(targets)
            for i in range(a.rounds):
                order = names[i % len(names):] + names[:i % len(names)]
                row = {}
                for server in order:
                    p_, prefix = targets[server]
                    r = run_load(p_, f, a.pair_seconds, clients=a.pair_clients, prefix=prefix)
                    r.update(catalogue=cat, server=server, round=i, time=time.strftime("%H:%M:%S"))
                    pair_results.append(r)
                    row[server] = r
                print(f"# round {i}: " + ", ".join(f"{s} {row[s]['throughput']} (p99 {row[s]['p99_ms']} ms, "
                                                  f"{row[s]['errors']} err)" for s in names) + f"; {_loadavg()}",
                      flush=True)
        finally:
            for server in targets:
                if server.startswith("serve-"):
                    serve.delete(f"pair-{server}")
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)

    def measure(cat: str, server: str, port: int, loads: list[tuple[str, float]]) -> None:
        f = bodies_files[cat]
        first = json.loads(f.read_text())[0]
        status, answer = _post(port, first)
        if status != 200:
            raise RuntimeError(f"{server} answered {status}: {answer}")
        if server in ("serve-student", "plain-student", "serve-2hop"):
            ref = reference_answer.setdefault(cat, answer["items"])
            same = answer["items"] == ref
            print(f"# {cat} {server}: first answer {'matches' if same else 'DIFFERS FROM'} serve-student's",
                  flush=True)
        if a.warmup > 0:
            run_load(port, f, a.warmup, clients=8)
        for kind, value in loads:
            r = run_load(port, f, a.duration, clients=int(value)) if kind == "closed" else \
                run_load(port, f, a.duration, rate=value)
            r.update(catalogue=cat, server=server, time=time.strftime("%H:%M:%S"))
            results.append(r)
            print_row(cat, server, r)

    loads = [("closed", c) for c in clients] + [("open", r) for r in rates]
    print(HEADER, flush=True)
    for cat in catalogues:
        run = runs[cat]
        for server in servers:
            t = time.time()
            if server.startswith("serve-"):
                serve.run(app_for(server, run), name="bench", route_prefix="/")
                _wait_ready(port)
                print(f"# {cat} {server}: deployed in {time.time() - t:.1f} s", flush=True)
                try:
                    measure(cat, server, port, loads)
                    if a.profile and server == "serve-student":
                        profiles[cat] = profile(port, bodies_files[cat], a.duration, out_dir, f"{cat}-{server}")
                        print_profile(cat, server, profiles[cat])
                    if server == "serve-const" and cat == catalogues[0]:
                        info["serve_replica_threads"] = json.loads(_get(port, "/healthz")[1])
                finally:
                    serve.delete("bench")
            else:
                proc, pport = start_plain(server, run)
                try:
                    _wait_ready(pport)
                    print(f"# {cat} {server}: started in {time.time() - t:.1f} s "
                          f"({_get(pport, '/healthz')[1]})", flush=True)
                    measure(cat, server, pport, [("closed", 32)] if server == "plain-const" else loads)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
        if pair_servers and a.rounds > 0:
            paired(cat)
            if cat != catalogues[-1]:
                print(HEADER, flush=True)

    serve.shutdown()
    ray.shutdown()
    info["loadavg_end"] = _loadavg()
    info["catalogues"] = details
    verdicts = report(results, pair_results, catalogues, servers, rates, info)
    Path(REPO / a.json_out).write_text(json.dumps({"info": info, "results": results, "paired": pair_results,
                                                   "verdicts": verdicts,
                                                   "profiles": profiles, "scoring": micro}, indent=1))
    print(f"# wrote {a.json_out}", flush=True)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def report(results: list[dict], pair_results: list[dict], catalogues: list[str], servers: list[str],
           rates: list[float], info: dict) -> list:
    import statistics

    def peak(cat: str, server: str) -> float | None:
        vals = [r["throughput"] for r in results if r["catalogue"] == cat and r["server"] == server
                and "clients" in r and r["errors"] == 0]
        return max(vals) if vals else None

    def at_rate(cat: str, server: str, rate: float) -> dict | None:
        return next((r for r in results if r["catalogue"] == cat and r["server"] == server
                     and r.get("offered") == rate), None)

    def paired_ratio(cat: str, num: str, den: str) -> tuple[float | None, str]:
        """Median over rounds of num/den measured in the same round, and the per-round values."""
        rounds: dict[int, dict] = {}
        for r in pair_results:
            if r["catalogue"] == cat and r["server"] in (num, den) and r["errors"] == 0:
                rounds.setdefault(r["round"], {})[r["server"]] = r["throughput"]
        vals = [v[num] / v[den] for v in rounds.values() if num in v and den in v and v[den] > 0]
        if not vals:
            return None, ""
        return round(statistics.median(vals), 2), ", ".join(f"{v:.2f}" for v in vals)

    print(f"\n# load average at start: {info['loadavg_start']}\n# load average at end:   {info['loadavg_end']}")
    print("\n## peak throughput, one server at a time (best closed-loop point with zero errors), req/s")
    print("| cat   | " + " | ".join(f"{s:>19}" for s in servers) + " |")
    print("|-------|" + "|".join("-" * 21 for _ in servers) + "|")
    for cat in catalogues:
        print(f"| {cat:5} | " + " | ".join(_fmt(peak(cat, s), 19) for s in servers) + " |")
    pair_servers = list(dict.fromkeys(r["server"] for r in pair_results))
    if pair_results:
        print("\n## paired rounds: median req/s over rounds (min-max)")
        print("| cat   | " + " | ".join(f"{s:>19}" for s in pair_servers) + " |")
        print("|-------|" + "|".join("-" * 21 for _ in pair_servers) + "|")
        for cat in catalogues:
            cells = []
            for server in pair_servers:
                v = [r["throughput"] for r in pair_results if r["catalogue"] == cat and r["server"] == server]
                cells.append(f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})".rjust(19) if v else "-".rjust(19))
            print(f"| {cat:5} | " + " | ".join(cells) + " |")

    verdicts = []

    def verdict(name: str, value, target: str, ok: bool | None, detail: str = "") -> None:
        status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        verdicts.append({"target": name, "value": value, "goal": target, "status": status, "detail": detail})
        print(f"{status:4}  {name}: {value} (target {target}){'  [' + detail + ']' if detail else ''}")

    def ratio_pair(cat: str, num: str, den: str, name: str, goal: float | None) -> None:
        """Target checked on the paired median when the paired rounds ran; sequential peaks shown too."""
        pn, pd = peak(cat, num), peak(cat, den)
        seq = round(pn / pd, 2) if pn and pd else None
        med, per_round = paired_ratio(cat, num, den)
        value = med if med is not None else seq
        goal_txt = f">= {goal:g}" if goal is not None else "(info)"
        ok = None if goal is None or value is None else value >= goal
        detail = (f"paired median, rounds {per_round}; " if med is not None else "") + f"one-at-a-time peaks {seq}"
        verdict(f"{cat}: {name}", value, goal_txt, ok, detail)

    print("\n## ratios and targets (throughput ratios: median of per-round paired ratios when measured)")
    for cat in catalogues:
        errs = sum(r["errors"] for r in results if r["catalogue"] == cat and r["server"] == "serve-student")
        kinds: dict[str, int] = {}
        for r in results:
            if r["catalogue"] == cat and r["server"] == "serve-student":
                for k, v in r["error_kinds"].items():
                    kinds[k] = kinds.get(k, 0) + v
        verdict(f"{cat}: serve-student errors, all load points", errs, "0", errs == 0, json.dumps(kinds) if kinds else "")
        r = at_rate(cat, "serve-student", TARGET_P99_RATE)
        verdict(f"{cat}: serve-student p99 at {TARGET_P99_RATE:g} req/s offered (ms)", r and r["p99_ms"],
                f"<= {TARGET_P99_MS:g}", None if r is None or r["p99_ms"] is None else
                r["p99_ms"] <= TARGET_P99_MS and r["errors"] == 0, f"achieved {r['throughput']} req/s, "
                f"{r['errors']} errors" if r else "")
        ratio_pair(cat, "serve-student", "serve-teacher", "serve-student / serve-teacher throughput", TARGET_VS_TEACHER)
        ratio_pair(cat, "serve-student", "serve-const", "serve-student / serve-const throughput",
                   TARGET_VS_CONST if cat == "small" else None)
        ratio_pair(cat, "serve-student", "plain-student", "serve-student / plain-student throughput",
                   TARGET_VS_PLAIN if cat == "100k" else None)
        ratio_pair(cat, "serve-student", "serve-2hop", "one deployment / ingress->model via handle (serve-2hop)", None)
        ratio_pair(cat, "serve-student-1loop", "serve-student", "serve-student-1loop / serve-student", None)
        for server in servers:
            r = at_rate(cat, server, TARGET_P99_RATE)
            if r and server != "serve-student":
                verdict(f"{cat}: {server} p99 at {TARGET_P99_RATE:g} req/s offered (ms)", r["p99_ms"], "(info)", None,
                        f"achieved {r['throughput']} req/s, {r['errors']} errors")
    all_errors = sum(r["errors"] for r in results + pair_results)
    server_side = sum(v for r in results + pair_results for k, v in r["error_kinds"].items() if k.startswith("http_"))
    verdict("all servers, all points: errors", all_errors, "0", all_errors == 0,
            f"of which HTTP error statuses: {server_side}; the rest are client-side timeouts "
            f"({REQUEST_TIMEOUT_S:g} s) or connection failures")
    return verdicts


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":
        plain_main(sys.argv[2:])
    else:
        main()
