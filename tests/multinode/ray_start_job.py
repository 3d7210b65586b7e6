"""Multi-node proof with real `ray start` nodes and `ray job submit` (too slow for the pytest suite).

    python tests/multinode/ray_start_job.py [--auth token|disabled] [--no-serve] [--keep]

What a user does, on one machine: a head node (`ray start --head`, 1 CPU, the `raykd_driver`
resource) and a second node (`ray start --address`, 1 CPU), token authentication on as in Ray 2.60
(or explicitly off with --auth disabled), the quickstart pipeline with tiny overrides submitted
with `ray job submit --working-dir .`, and the served student (`serve deploy configs/serve.yaml`,
then `serve shutdown` and `jobs/serve.py` as a job). Checks: the job SUCCEEDED and logged the
cluster, the placement and the storage check; the Train workers of teacher and student ran on both
nodes (Ray's state API keeps dead actors); DDP replicas had 2 identical ranks; report.json exists;
both endpoints answer. Exit status 0 = pass.

Isolation from other Ray instances on the same machine (other test sessions): its own temp dir
(RAY_TMPDIR, so its `ray_current_cluster` file is not the one a plain `ray.init()` finds), free
ports, and its own token in RAY_AUTH_TOKEN (~/.ray/auth_token is left alone). It stops its nodes
by signalling exactly the processes it started (found by a marker in their environment) rather than
with `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
MARK = "RAYKD_MULTINODE_ROLE"  # environment marker of every process this script starts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg: str) -> None:
    print(f"[multinode {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class LocalCluster:
    """A head node plus one worker node started with the `ray` CLI, stopped by process id."""

    def __init__(self, auth: str):
        self.tmp = Path(tempfile.mkdtemp(prefix="rkmn-", dir="/tmp"))  # short: unix socket paths
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        self.env["RAY_TMPDIR"] = str(self.tmp)
        self.env["RAY_AUTH_MODE"] = auth
        if auth == "token":
            # The documented client flow: the cluster's token in RAY_AUTH_TOKEN (or ~/.ray/auth_token).
            self.env["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        else:
            self.env.pop("RAY_AUTH_TOKEN", None)
        self.gcs_port = self.dashboard_port = 0

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def ray(self, *args: str, role: str, timeout: float = 300) -> subprocess.CompletedProcess:
        env = {**self.env, MARK: f"{self.tmp}:{role}"}
        return subprocess.run(["ray", *args], check=False, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def start(self, attempts: int = 4) -> None:
        """Head, then the second node; each retried (a loaded machine can miss Ray's fixed 30 s
        wait for a new node to register, and `ray start` then exits 1)."""
        for attempt in range(1, attempts + 1):
            self.gcs_port, self.dashboard_port = free_port(), free_port()
            out = self.ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs_port}",
                           f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                           f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=1",
                           '--resources={"raykd_driver": 100}', "--disable-usage-stats", role="head")
            if out.returncode == 0:
                break
            self._failed("head", attempt, out)
            self.stop()
        else:
            raise SystemExit("could not start the head node")
        for attempt in range(1, attempts + 1):
            # Its own temp dir: two nodes on one host must not share runtime_resources/ (each node's
            # runtime-env agent unpacks the job's working_dir there, replacing the other's copy).
            out = self.ray("start", f"--address=127.0.0.1:{self.gcs_port}", "--node-ip-address=127.0.0.1",
                           "--num-cpus=1", f"--dashboard-agent-listen-port={free_port()}",
                           f"--temp-dir={self.tmp / 'node2'}", "--disable-usage-stats", role="worker")
            if out.returncode == 0:
                break
            self._failed("second node", attempt, out)
            self.stop(roles=("worker",))
        else:
            raise SystemExit("could not start the second node")
        log(f"started head (GCS :{self.gcs_port}, dashboard :{self.dashboard_port}) and a second node; "
            f"RAY_TMPDIR={self.tmp}, RAY_AUTH_MODE={self.env['RAY_AUTH_MODE']}")

    @staticmethod
    def _failed(what: str, attempt: int, out: subprocess.CompletedProcess) -> None:
        log(f"ray start ({what}) failed, attempt {attempt}:\n" + (out.stdout + out.stderr)[-1200:])

    def processes(self, role: str | None = None) -> list:
        import psutil

        want = f"{self.tmp}:{role}" if role else None
        found = []
        for p in psutil.process_iter():
            try:
                mark = p.environ().get(MARK, "")
            except (psutil.Error, OSError):
                continue
            if mark.startswith(f"{self.tmp}:") and (want is None or mark == want) and p.pid != os.getpid():
                found.append(p)
        return found

    def stop(self, roles: tuple[str, ...] = ("worker", "head")) -> None:
        """SIGTERM the second node's processes, then the head's (as `ray stop` does); SIGKILL leftovers."""
        import psutil

        for role in roles:
            procs = self.processes(role)
            for p in procs:
                try:
                    p.terminate()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(procs, timeout=15)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        left = [p for role in roles for p in self.processes(role)]
        if left:
            psutil.wait_procs(left, timeout=5)
        left = [p for role in roles for p in self.processes(role) if p.is_running()]
        log(f"stopped {' and '.join(roles)}; {len(left)} process(es) left" + (f": {[p.pid for p in left]}" if left else ""))


def wait_for_nodes(cluster: LocalCluster, n: int, timeout: float = 180) -> list[dict]:
    from ray.util.state import list_nodes

    deadline = time.time() + timeout
    while True:
        try:
            nodes = [x for x in list_nodes(address=cluster.dashboard, detail=True) if x.state == "ALIVE"]
            if len(nodes) >= n:
                return [{"node_id": x.node_id, "is_head": x.is_head_node, "resources": x.resources_total}
                        for x in nodes]
        except Exception as err:  # noqa: BLE001 - the dashboard may still be starting
            last = err
        else:
            last = f"{len(nodes)} node(s) alive"
        if time.time() > deadline:
            raise SystemExit(f"the cluster never had {n} alive nodes: {last}")
        time.sleep(3)


def train_worker_nodes(cluster: LocalCluster) -> list[str]:
    """Node ids of every RayTrainWorker actor the cluster ran (dead ones included)."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster.dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                         limit=10_000, raise_on_missing_output=False)
    return [a.node_id for a in actors]


def submit_pipeline(cluster: LocalCluster, run_dir: Path, timeout: float) -> tuple[str, str]:
    """`ray job submit` as a user types it (plus a submission id); returns (status, logs)."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY  # imports Ray: only after main() set this process's RAY_AUTH_* variables

    job_id = f"raykd-multinode-{secrets.token_hex(4)}"
    overrides = [*TINY, f"output_dir={run_dir}",
                 # 2 workers x 1 CPU on two 1-CPU nodes: each fit must use both nodes.
                 "teacher.train.num_workers=2", "teacher.train.cpus_per_worker=1",
                 "distill.train.num_workers=2", "distill.train.cpus_per_worker=1", "distill.train_nokd=false"]
    cmd = ["job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--submission-id", job_id, "--",
           "python", "jobs/pipeline.py", "--config", "configs/quickstart.yaml", *overrides]
    log("ray " + " ".join(cmd))
    t0 = time.time()
    try:
        out = cluster.ray(*cmd, role="client", timeout=timeout)
        tail = out.stdout[-3000:] + out.stderr[-2000:]
    except subprocess.TimeoutExpired:
        tail = f"ray job submit did not return within {timeout:.0f}s"
    log(f"ray job submit returned after {time.time() - t0:.0f}s")
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    status = str(client.get_job_status(job_id)).split(".")[-1]
    logs = client.get_job_logs(job_id)
    if status != "SUCCEEDED":
        print(tail)
    return status, logs


def ask(port: int, run_dir: Path, timeout: float = 240) -> dict:
    """POST /recommend (3 known items, k=5) until the endpoint answers; the answer."""
    import pyarrow.parquet as pq

    history = pq.read_table(run_dir / "data" / "items.parquet")["raw_id"].to_pylist()[:3]
    body = json.dumps({"history": history, "k": 5}).encode()
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())
        except Exception as err:  # noqa: BLE001 - replicas still starting
            last = err
            time.sleep(3)
    raise SystemExit(f"the served student never answered on :{port}: {last}")


def serve_deploy(cluster: LocalCluster, run_dir: Path) -> dict:
    """`serve deploy` of configs/serve.yaml pointed at the run (and a free port); one answer."""
    cfg = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    port = free_port()
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    cfg["applications"][0]["args"].update(path=str(run_dir), replica_cpus=0.25, min_replicas=1, max_replicas=2)
    serve_file = cluster.tmp / "serve.yaml"
    serve_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = subprocess.run(["serve", "deploy", str(serve_file), "-a", cluster.dashboard], check=False,
                         env=cluster.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"serve deploy failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return ask(port, run_dir)


def serve_job(cluster: LocalCluster, run_dir: Path) -> dict:
    """`serve shutdown`, then jobs/serve.py as a job (it deploys and exits; the app stays); one answer."""
    out = subprocess.run(["serve", "shutdown", "-y", "-a", cluster.dashboard], check=False, env=cluster.env,
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"serve shutdown failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    port = free_port()
    job = cluster.ray("job", "submit", "--address", cluster.dashboard, "--working-dir", ".", "--",
                      "python", "jobs/serve.py", "--config", "configs/quickstart.yaml", f"output_dir={run_dir}",
                      f"serve.port={port}", "serve.replica_cpus=0.25", role="client", timeout=300)
    if job.returncode != 0 or "/recommend" not in job.stdout:
        raise SystemExit(f"jobs/serve.py failed:\n{job.stdout[-2000:]}{job.stderr[-2000:]}")
    return ask(port, run_dir)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--auth", choices=["token", "disabled"], default="token")
    ap.add_argument("--no-serve", action="store_true", help="skip the serve deploy check")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, run directory)")
    ap.add_argument("--timeout", type=float, default=1500, help="seconds for the pipeline job")
    args = ap.parse_args()
    t0 = time.time()
    cluster = LocalCluster(args.auth)
    # This process talks to the cluster (state API, job SDK) as a client: same auth settings,
    # set before Ray is first imported here (Ray reads RAY_AUTH_MODE when it loads).
    assert "ray" not in sys.modules
    os.environ.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_AUTH") or k == "RAY_TMPDIR"})
    os.environ.pop("RAY_ADDRESS", None)
    failures: list[str] = []
    try:
        cluster.start()
        nodes = wait_for_nodes(cluster, 2)
        node_ids = {n["node_id"] for n in nodes}
        log(f"{len(nodes)} nodes alive: " + ", ".join(
            f"{n['node_id'][:8]} ({'head' if n['is_head'] else 'worker'}, {n['resources'].get('CPU', 0):g} CPU)"
            for n in nodes))
        if args.auth == "token":
            anon = subprocess.run(["ray", "job", "list", "--address", cluster.dashboard], check=False, cwd=REPO, text=True,
                                  capture_output=True, timeout=120,
                                  env={k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")})
            if anon.returncode == 0 or "uthentication" not in anon.stdout + anon.stderr:
                failures.append("a client without the token was not refused")
            else:
                log("token auth: a client without the token is refused")
        run_dir = cluster.tmp / "runs" / "quickstart"
        t_job = time.time()
        status, logs = submit_pipeline(cluster, run_dir, args.timeout)
        log(f"job status {status} after {time.time() - t_job:.0f}s")
        if status != "SUCCEEDED":
            print(logs[-6000:])
            failures.append(f"job status {status}")
        for needle in ("joined the cluster", "2 node(s)", "placement:", f"storage check: all 2 nodes see {run_dir}",
                       f"run directory {run_dir}"):
            if needle not in logs:
                failures.append(f"job log lacks {needle!r}")
        worker_nodes = train_worker_nodes(cluster)
        log(f"RayTrainWorker actors: {len(worker_nodes)}, on nodes {sorted({n[:8] for n in worker_nodes})}")
        if set(worker_nodes) != node_ids:
            failures.append(f"Train workers ran on {sorted(set(worker_nodes))}, not on both nodes {sorted(node_ids)}")
        if len(worker_nodes) < 4:
            failures.append(f"expected >= 4 Train workers (teacher and student, 2 each), found {len(worker_nodes)}")
        for model in ("teacher", "student"):
            try:
                digests = json.loads((run_dir / model / "metrics.json").read_text())["replica_digests"]
            except (OSError, KeyError, ValueError) as err:
                failures.append(f"{model}/metrics.json: {err}")
                continue
            if len(digests) != 2 or len(set(digests)) != 1:
                failures.append(f"{model}: DDP replicas {digests} (expected 2 identical)")
        if not (run_dir / "report.json").exists():
            failures.append("report.json missing")
        else:
            log(f"report: {run_dir / 'report.json'}")
        if not args.no_serve and status == "SUCCEEDED":
            for how, deploy in (("serve deploy", serve_deploy), ("jobs/serve.py", serve_job)):
                t_serve = time.time()
                answer = deploy(cluster, run_dir)
                log(f"{how}: first answer after {time.time() - t_serve:.0f}s: {answer.get('items')}")
                if len(answer.get("items", [])) != 5:
                    failures.append(f"{how}: unexpected answer {answer}")
    finally:
        cluster.stop()
        if cluster.processes():
            failures.append("processes left after stop")
        if not args.keep:
            shutil.rmtree(cluster.tmp, ignore_errors=True)
    log(f"{'PASS' if not failures else 'FAIL'} in {time.time() - t0:.0f}s" + "".join(f"\n  - {f}" for f in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
