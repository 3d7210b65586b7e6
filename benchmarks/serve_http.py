"""HTTP and process helpers of bench_serve.py: free ports, health checks, single requests, and one
load point through the load generator (serve_load.py, run as its own process), plus the machine
facts (load average, CPU model) the benchmark prints.
"""

import contextlib
import json
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from serve_load import REQUEST_TIMEOUT_S  # the load generator's per-request timeout (sibling script)

LOAD_GENERATOR = Path(__file__).resolve().parent / "serve_load.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    import httpx
    r = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=timeout)
    return r.status_code, r.text


def http_post(port: int, body: dict, timeout: float = 30.0, prefix: str = "") -> tuple[int, dict]:
    import httpx
    r = httpx.post(f"http://127.0.0.1:{port}{prefix}/recommend", json=body, timeout=timeout)
    return r.status_code, r.json()


def wait_ready(port: int, seconds: float = 60.0, prefix: str = "") -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(Exception):  # not up yet: refused, reset, timed out
            if http_get(port, f"{prefix}/healthz")[0] == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"server on port {port} did not answer /healthz within {seconds:.0f} s")


def run_load(port: int, bodies_file: Path, duration: float, clients: int | None = None,
             rate: float | None = None, prefix: str = "") -> dict:
    """One load point (closed loop with `clients`, else open loop at `rate`): serve_load.py's JSON."""
    cmd = [sys.executable, str(LOAD_GENERATOR), "--port", str(port), "--bodies",
           str(bodies_file), "--duration", str(duration), "--prefix", prefix]
    cmd += ["--clients", str(clients)] if clients else ["--rate", str(rate)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 3 * REQUEST_TIMEOUT_S + 30,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
