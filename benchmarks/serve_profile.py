"""bench_serve.py --profile: py-spy on this benchmark's Serve replica(s) and HTTP proxy during a
32-client closed-loop point, summarised as the top frames by self and inclusive time.
"""

import os
import subprocess
from pathlib import Path

from serve_http import run_load


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
