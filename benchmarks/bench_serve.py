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
raykd.core.models.save_model from RANDOM initial weights: serving cost does not depend on the weights,
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

# The pieces live in sibling modules (benchmarks/ is sys.path[0] when this script runs): serve_catalogue
# (the 100k run, request bodies, scoring microbenchmark), serve_variants (the benchmark's own Serve
# deployments), serve_plain (the plain uvicorn server), serve_http (requests, load points),
# serve_profile (py-spy) and serve_report (tables, verdicts).
import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from serve_catalogue import REPO, build_big_run, request_bodies, scoring_microbench
from serve_http import cpu_model, free_port, http_get, http_post, loadavg, run_load, wait_ready
from serve_profile import print_profile, profile
from serve_report import HEADER, print_row, report
from serve_variants import serve_options, serve_variants, student_one_loop

ALL_SERVERS = ["serve-student", "serve-teacher", "plain-student", "serve-const", "serve-2hop", "serve-student-1loop",
               "plain-const"]
PLAIN_SERVER = Path(__file__).resolve().parent / "serve_plain.py"


# ----------------------------------------------------------------------------- driver


def parse_args() -> argparse.Namespace:
    """The options, with the comma-separated ones also parsed into lists (`*_list`)."""
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

    a.catalogue_list = [c for c in a.catalogues.split(",") if c]
    a.server_list = [s for s in a.servers.split(",") if s]
    a.pair_list = [s for s in a.paired.split(",") if s]
    unknown = (set(a.server_list) | set(a.pair_list)) - set(ALL_SERVERS)
    if unknown:
        p.error(f"unknown servers {sorted(unknown)}; valid: {ALL_SERVERS}")
    a.client_list = [int(x) for x in a.clients.split(",") if x]
    a.rate_list = [float(x) for x in a.rates.split(",") if x]
    return a


class Bench:
    """One invocation: the options, the catalogues' request bodies, the servers, and the results."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.catalogues, self.servers, self.pair_servers = a.catalogue_list, a.server_list, a.pair_list
        self.loads = [("closed", c) for c in a.client_list] + [("open", r) for r in a.rate_list]
        self.runs = {"small": REPO / a.run, "100k": REPO / a.big_run}
        self.out_dir = REPO / Path(a.json_out).parent
        self.info: dict = {}
        self.details: dict = {}
        self.bodies_files: dict[str, Path] = {}
        self.micro: list[dict] = []
        self.results: list[dict] = []
        self.pair_results: list[dict] = []
        self.profiles: dict = {}
        self.reference_answer: dict = {}
        self.settings = self.port = self.variants = self.opts = None

    # -- setup

    def prepare_runs(self) -> None:
        """The output folder, the trained small run (required), the 100k run (built if missing)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not (self.runs["small"] / "student" / "model.json").exists():
            sys.exit(f"{self.runs['small']} has no student: run `raykd pipeline configs/quickstart.yaml` first")
        if "100k" in self.catalogues:
            build_big_run(self.runs["100k"])

    def describe_machine(self) -> None:
        import ray
        import torch

        from raykd.config import ServeConfig
        self.settings = ServeConfig(min_replicas=1, max_replicas=1)  # one replica everywhere: like for like
        self.info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.platform(),
                     "cpus": os.cpu_count(), "cpu_model": cpu_model(), "python": platform.python_version(),
                     "ray": ray.__version__, "torch": torch.__version__, "loadavg_start": loadavg(),
                     "serve_config": self.settings.model_dump(exclude={"api_key"}), "duration_s": self.a.duration}
        print("# bench_serve", json.dumps(self.info, indent=1), flush=True)

    def setup_catalogues(self) -> None:
        """Request bodies (written for the load generator) and the models' sizes, per catalogue."""
        from raykd.core.models import count_params
        from raykd.serve.recommender import Recommender
        for cat in self.catalogues:
            run = self.runs[cat]
            bodies = request_bodies(run, self.a.bodies)
            f = self.out_dir / f"bench_serve_bodies_{cat}.json"
            f.write_text(json.dumps(bodies))
            self.bodies_files[cat] = f
            rec = Recommender(run / "student")
            trec = Recommender(run / "teacher")
            self.details[cat] = {"items": len(rec.item_ids), "student_params": count_params(rec.model),
                                 "teacher_params": count_params(trec.model),
                                 "mean_history": sum(len(b["history"]) for b in bodies) / len(bodies)}
            print(f"# catalogue {cat}: {run}: {json.dumps(self.details[cat])}", flush=True)
            del rec, trec
        if self.a.micro_seconds > 0:
            self.micro = scoring_microbench(self.runs, self.catalogues, self.bodies_files, self.a.micro_seconds)

    def start_serve(self) -> None:
        import ray
        from ray import serve

        # Logical CPUs only: every server of the paired rounds is up at once (0.5 CPU per replica); the
        # machine's real cores are what they are. A 0.5-CPU replica still gets OMP_NUM_THREADS=1.
        ray.init(address="local", num_cpus=max(8, os.cpu_count()), include_dashboard=False,
                 logging_level=logging.ERROR, log_to_driver=False)
        self.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": self.port}, logging_config={"enable_access_log": False})
        self.variants = serve_variants()
        self.opts = serve_options(self.settings)

    def app_for(self, server: str, run: Path):
        from raykd.serve.app import build_app
        if server == "serve-student":
            return build_app(str(run / "student"), self.settings)
        if server == "serve-teacher":
            return build_app(str(run / "teacher"), self.settings)
        if server == "serve-student-1loop":
            return student_one_loop(str(run / "student"), self.settings)
        Constant, Model, Ingress = self.variants
        if server == "serve-const":
            return Constant.options(**self.opts).bind()
        return Ingress.options(**self.opts).bind(Model.options(**self.opts).bind(str(run / "student"),
                                                                                 self.settings.model_dump()))

    def start_plain(self, server: str, run: Path) -> tuple[subprocess.Popen, int]:
        pport = free_port()
        cmd = [sys.executable, str(PLAIN_SERVER), "--port", str(pport)]
        cmd += ["--const"] if server == "plain-const" else ["--path", str(run / "student")]
        cmd += ["--torch-threads", str(self.a.plain_torch_threads)]
        return subprocess.Popen(cmd, cwd=REPO), pport

    # -- phase 1: one server at a time, every load point

    def measure(self, cat: str, server: str, port: int, loads: list[tuple[str, float]]) -> None:
        f = self.bodies_files[cat]
        first = json.loads(f.read_text())[0]
        status, answer = http_post(port, first)
        if status != 200:
            raise RuntimeError(f"{server} answered {status}: {answer}")
        if server in ("serve-student", "plain-student", "serve-2hop"):
            ref = self.reference_answer.setdefault(cat, answer["items"])
            same = answer["items"] == ref
            print(f"# {cat} {server}: first answer {'matches' if same else 'DIFFERS FROM'} serve-student's",
                  flush=True)
        if self.a.warmup > 0:
            run_load(port, f, self.a.warmup, clients=8)
        for kind, value in loads:
            r = run_load(port, f, self.a.duration, clients=int(value)) if kind == "closed" else \
                run_load(port, f, self.a.duration, rate=value)
            r.update(catalogue=cat, server=server, time=time.strftime("%H:%M:%S"))
            self.results.append(r)
            print_row(cat, server, r)

    def one_serve(self, cat: str, server: str) -> None:
        from ray import serve
        t = time.time()
        serve.run(self.app_for(server, self.runs[cat]), name="bench", route_prefix="/")
        wait_ready(self.port)
        print(f"# {cat} {server}: deployed in {time.time() - t:.1f} s", flush=True)
        try:
            self.measure(cat, server, self.port, self.loads)
            if self.a.profile and server == "serve-student":
                self.profiles[cat] = profile(self.port, self.bodies_files[cat], self.a.duration, self.out_dir,
                                             f"{cat}-{server}")
                print_profile(cat, server, self.profiles[cat])
            if server == "serve-const" and cat == self.catalogues[0]:
                self.info["serve_replica_threads"] = json.loads(http_get(self.port, "/healthz")[1])
        finally:
            serve.delete("bench")

    def one_plain(self, cat: str, server: str) -> None:
        t = time.time()
        proc, pport = self.start_plain(server, self.runs[cat])
        try:
            wait_ready(pport)
            print(f"# {cat} {server}: started in {time.time() - t:.1f} s "
                  f"({http_get(pport, '/healthz')[1]})", flush=True)
            self.measure(cat, server, pport, [("closed", 32)] if server == "plain-const" else self.loads)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    def one_at_a_time(self, cat: str) -> None:
        for server in self.servers:
            if server.startswith("serve-"):
                self.one_serve(cat, server)
            else:
                self.one_plain(cat, server)

    # -- phase 2: paired rounds, every server up at once

    def start_all(self, cat: str, targets: dict, procs: list) -> None:
        """Every paired server up (filling `targets` and `procs` as they start), answered and warmed up."""
        from ray import serve
        run, f = self.runs[cat], self.bodies_files[cat]
        for server in self.pair_servers:
            if server.startswith("serve-"):
                serve.run(self.app_for(server, run), name=f"pair-{server}", route_prefix=f"/{server}")
                wait_ready(self.port, prefix=f"/{server}")
                targets[server] = (self.port, f"/{server}")
            else:
                proc, pport = self.start_plain(server, run)
                procs.append(proc)
                wait_ready(pport)
                targets[server] = (pport, "")
        for server, (p_, prefix) in targets.items():
            status, answer = http_post(p_, json.loads(f.read_text())[0], prefix=prefix)
            if status != 200:
                raise RuntimeError(f"paired {server} answered {status}: {answer}")
            run_load(p_, f, 1.0, clients=8, prefix=prefix)  # warm-up

    def rounds(self, cat: str, targets: dict) -> None:
        """--rounds rounds of one short closed-loop point per server, in rotating order."""
        names = list(targets)
        for i in range(self.a.rounds):
            order = names[i % len(names):] + names[:i % len(names)]
            row = {}
            for server in order:
                p_, prefix = targets[server]
                r = run_load(p_, self.bodies_files[cat], self.a.pair_seconds, clients=self.a.pair_clients,
                             prefix=prefix)
                r.update(catalogue=cat, server=server, round=i, time=time.strftime("%H:%M:%S"))
                self.pair_results.append(r)
                row[server] = r
            print(f"# round {i}: " + ", ".join(f"{s} {row[s]['throughput']} (p99 {row[s]['p99_ms']} ms, "
                                              f"{row[s]['errors']} err)" for s in names) + f"; {loadavg()}",
                  flush=True)

    def paired(self, cat: str) -> None:
        """Every server up at once (idle but one), then rounds of short 32-client points over all of
        them in rotating order: each round's ratios are measured within seconds of each other."""
        from ray import serve
        targets, procs = {}, []
        t = time.time()
        try:
            self.start_all(cat, targets, procs)
            print(f"\n## {cat}: paired rounds, all {len(targets)} servers up ({time.time() - t:.0f} s to start), "
                  f"{self.a.pair_clients} clients x {self.a.pair_seconds:g} s per server per round, req/s", flush=True)
            self.rounds(cat, targets)
        finally:
            for server in targets:
                if server.startswith("serve-"):
                    serve.delete(f"pair-{server}")
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=30)

    # -- report

    def finish(self) -> None:
        """Ray down, then the report and the JSON output."""
        import ray
        from ray import serve
        serve.shutdown()
        ray.shutdown()
        self.info["loadavg_end"] = loadavg()
        self.info["catalogues"] = self.details
        verdicts = report(self.results, self.pair_results, self.catalogues, self.servers, self.a.rate_list, self.info)
        Path(REPO / self.a.json_out).write_text(json.dumps(
            {"info": self.info, "results": self.results, "paired": self.pair_results, "verdicts": verdicts,
             "profiles": self.profiles, "scoring": self.micro}, indent=1))
        print(f"# wrote {self.a.json_out}", flush=True)


def main() -> None:
    bench = Bench(parse_args())
    bench.prepare_runs()
    bench.describe_machine()
    bench.setup_catalogues()
    bench.start_serve()
    print(HEADER, flush=True)
    for cat in bench.catalogues:
        bench.one_at_a_time(cat)
        if bench.pair_servers and bench.a.rounds > 0:
            bench.paired(cat)
            if cat != bench.catalogues[-1]:
                print(HEADER, flush=True)
    bench.finish()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_plain":  # the plain server, as earlier versions started it
        from serve_plain import plain_main
        plain_main(sys.argv[2:], prog="bench_serve.py _plain")
    else:
        main()
