"""Connecting to Ray: a cluster when one is there, else a local Ray; what was found; where work goes.

`ensure_ray(cfg.ray)` joins, in this order: `ray.address` from the config, `RAY_ADDRESS` (set by
`ray job submit` for the job's driver), or a cluster that `ray start` runs on this machine (what
`ray.init(address="auto")` finds). Otherwise, or when `ray.num_cpus` asks for a local Ray of a
given size, it starts a local Ray that declares the zero-CPU `DRIVER_RESOURCE`. It prints the
nodes, CPUs and GPUs it found; `describe_placement(cfg, needs)` prints how each stage will use them and
warns about settings that cannot fit (Ray would otherwise wait for resources without a word).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import ray
import ray.data

from raykd.cluster.placement import Need
from raykd.config import Config, RayConfig
from raykd.core import console, rundir
from raykd.core.errors import RaykdError

# A zero-CPU custom resource that Tune trial drivers claim, so that they never take a CPU that
# Ray Data or Train workers need (see GUIDE.md section 4). Clusters declare it on the head node
# (cluster.yaml, deploy/kuberay/), local Rays get it from `ensure_ray`.
DRIVER_RESOURCE = "raykd_driver"
GPU = "GPU"  # a name, so nested f-strings need no quotes (Python 3.10/3.11 forbid reusing them)
LOCAL_DRIVER_UNITS = 1000


def find_cluster(cfg: RayConfig | None = None) -> str | None:
    """The address of the Ray cluster to join, or None to start a local Ray.

    `ray.address`, else `RAY_ADDRESS`, else a live cluster started with `ray start` on this
    machine (the address `ray.init(address="auto")` would pick). `ray.num_cpus` set means "a
    local Ray of this size", so it turns off the last look-up.
    """
    cfg = cfg or RayConfig()
    explicit = cfg.address or os.environ.get("RAY_ADDRESS")
    if explicit:
        return explicit
    if cfg.num_cpus is not None:
        return None
    return _ray_start_cluster()


def _ray_start_cluster() -> str | None:
    """GCS address recorded by the last `ray start` on this machine, if that GCS is still running."""
    try:
        from ray._private import services

        services.find_gcs_addresses.cache_clear()
        address = services.find_bootstrap_address(None)
        return address if address and address in services.find_gcs_addresses() else None
    except Exception:  # noqa: BLE001 - private Ray helpers: no cluster found is the safe answer
        return None


def ensure_ray(cfg: RayConfig | None = None, quiet: bool = False) -> None:
    """Start or join Ray once per process and print what was found.

    Worker output that Ray forwards to this driver then goes through `_route_worker_output`:
    raykd's own lines (raykd.core.console.say in a worker) are printed as the driver's, the rest goes to
    the run's log file inside a `run_logs` block (on the console as Ray prints it with `-v`).
    """
    if ray.is_initialized():
        _install_router()
        return
    cfg = cfg or RayConfig()
    address = find_cluster(cfg)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Tune snapshots an experiment every 2 checkpoints of a trial and warns when that is often;
    # in-process trials with short epochs make it so, and the warning says nothing to act on
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if address:
        # An existing cluster (e.g. under `ray job submit`): num_cpus/resources would raise here.
        if cfg.num_cpus is not None and not quiet:
            console.warn(f"ray.num_cpus={cfg.num_cpus} ignored: joining the cluster at {address}")
        explicit = cfg.address or os.environ.get("RAY_ADDRESS")
        # "auto" for a `ray start` cluster found on this machine: Ray then also picks up its token
        # (~/.ray/auth_token) by itself, which it never does for an explicit address.
        ray.init(address=explicit or "auto", logging_level=logging.WARNING)
    else:
        # "local": never attach to a cluster that some other `ray start` left on this machine.
        ray.init(address="local", num_cpus=cfg.num_cpus, resources={DRIVER_RESOURCE: LOCAL_DRIVER_UNITS},
                 logging_level=logging.WARNING)
    _install_router()
    # Ray Data's progress bars and per-operator lines drown stage output (they repeat every epoch
    # in training); raykd prints its own progress lines instead.
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not quiet:
        where = f"joined the cluster at {ray.get_runtime_context().gcs_address}" if address else "started local Ray"
        console.say(f"ray: {where}; {describe_resources()}")


def alive_nodes() -> list[dict]:
    """Alive nodes of the connected cluster, head first (`ray.nodes()` entries)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return sorted(nodes, key=lambda n: "node:__internal_head__" not in n.get("Resources", {}))


def describe_resources() -> str:
    """One line for the cluster, one per node when there are several."""
    res = ray.cluster_resources()
    nodes = alive_nodes()
    text = f"{len(nodes)} node(s), {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU"
    if len(nodes) > 1:
        for n in nodes:
            r = n.get("Resources", {})
            role = "head" if "node:__internal_head__" in r else "worker"
            extra = f", {DRIVER_RESOURCE} {r[DRIVER_RESOURCE]:g}" if r.get(DRIVER_RESOURCE) else ""
            text += (f"\n  node {n['NodeID'][:8]} ({role}, {n.get('NodeManagerAddress', '?')}): "
                     f"{r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU{extra}")
    return text


def cpu_count() -> int:
    """CPUs in the Ray cluster (1 if Ray reports none)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ---------------------------------------------------------------- placement

def describe_placement(cfg: Config, needs: list[Need], quiet: bool = False) -> list[str]:
    """Print how each stage will use the cluster; return (and print) warnings for what cannot fit.

    `needs` come from the stage list (`raykd.stages.needs(cfg, names)`, `stages.serve_needs(cfg)`).
    Call it after `ensure_ray`. A warning
    names the setting to change: Ray itself waits silently for resources that never come on a
    fixed-size cluster (on an autoscaling one, until the autoscaler adds nodes).
    """
    ensure_ray(cfg.ray, quiet=True)
    nodes = [n.get("Resources", {}) for n in alive_nodes()]
    total = {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU", DRIVER_RESOURCE)}
    largest = {k: max((n.get(k, 0) for n in nodes), default=0) for k in ("CPU", "GPU")}
    lines, warnings = [], []
    for need in needs:
        line = need.line
        if need.ddp and len(nodes) > 1 and need.count > 1:
            line += (" (may share one node)" if largest["CPU"] >= need.count * need.cpus
                     else " (spread over nodes: DDP over the network)")
        lines.append(line)
        warnings += _fits(need, total, largest)
    if not quiet:
        console.say("placement:\n  " + "\n  ".join(lines))
        for w in warnings:
            console.warn(f"placement: {w}")
    return warnings


def _fits(need, total: dict, largest: dict) -> list[str]:
    """Why `need` cannot be placed on this cluster (empty when it can)."""
    out = []
    if need.drivers and total[DRIVER_RESOURCE] < need.drivers:
        out.append(f"{need.what}: the cluster lacks the custom resource {DRIVER_RESOURCE} (needs {need.drivers}); "
                   f"start the head node with --resources='{{\"{DRIVER_RESOURCE}\": {LOCAL_DRIVER_UNITS}}}'")
    if not need.count:
        return out
    cpus = total["CPU"] - need.keep_free if total["CPU"] > need.keep_free else total["CPU"]
    if need.gpus and total["GPU"] < need.gpus:
        out.append(f"{need.what} needs a GPU but the cluster has none: set {need.gpu_flag}=false or add GPU nodes")
    elif need.cpus > largest["CPU"] + 1e-9:
        out.append(f"{need.what}: one unit needs {need.cpus:g} CPU but the largest node has {largest['CPU']:g}; "
                   f"lower {need.setting}")
    elif need.count * need.cpus > cpus + 1e-9 or need.count * need.gpus > total["GPU"] + 1e-9:
        gpu = f" and {need.count * need.gpus:g} GPU" if need.gpus else ""
        have = f" and {total[GPU]:g} GPU" if need.gpus else ""
        free = f" (with {need.keep_free:g} kept free for Ray Data)" if need.keep_free else ""
        out.append(f"{need.what} needs {need.count * need.cpus:g} CPU{gpu} at once but the cluster has "
                   f"{total['CPU']:g} CPU{have}{free}; lower {need.setting}")
    return out


# ---------------------------------------------------------------- storage shared by every node

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


# ---------------------------------------------------------------- where Ray's output goes

LOG_DIR = rundir.LOGS  # <run>/logs/: raykd.log, ray-workers.log, ray-driver.log, driver-stderr.log
# Ray's own Python loggers in the driver, and the libraries they drive
_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train", "ray.serve", "optuna", "py.warnings")
_route: dict = {"file": None}  # ray-workers.log while a run_logs block is open


def _install_router() -> None:
    """Replace Ray's printer of forwarded worker output with `_route_worker_output` (once)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    names = [name for name, _ in dispatcher.handlers]
    if "ray_print_logs" in names:  # only when log_to_driver is on (Ray's default)
        dispatcher.remove_handler("ray_print_logs")
        dispatcher.add_handler("raykd", _route_worker_output)


def _route_worker_output(data: dict) -> None:
    """One batch of a worker's stdout/stderr lines, as Ray forwards it to the driver.

    raykd's marked lines are printed as the driver's own; the rest goes to ray-workers.log with
    Ray's `(actor pid=...)` prefix, and to the console as Ray prints it with `-v` or when no run
    is being logged (Ray's own behaviour).
    """
    from ray._private.worker import filter_autoscaler_events, print_to_stdstream

    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its status tables every few seconds: only its events, as Ray does
        lines = list(filter_autoscaler_events(lines))
    rest = []
    for line in lines:
        marked = console.unmark(line)
        if marked:
            console.emit(marked[1], marked[0])
        else:
            rest.append(line)
    log_file = _route["file"]
    if rest and log_file is not None:
        who = data.get("actor_name") or data.get("task_name") or ""
        where = "" if data.get("ip") == data.get("localhost") else f", ip={data.get('ip')}"
        prefix = f"({who + ' ' if who else ''}pid={data.get('pid')}{where})"
        log_file.write("".join(f"{prefix} {line}\n" for line in rest))
        log_file.flush()
    if rest and (log_file is None or console.level() >= console.VERBOSE):
        print_to_stdstream({**data, "lines": data["lines"] if data.get("pid") == "autoscaler" else rest},
                           ignore_prefix=False)


@contextlib.contextmanager
def run_logs(log_dir: Path) -> Iterator[None]:
    """Keep the console to raykd's lines while a run works; Ray's output goes to `log_dir`.

    raykd.log: everything raykd printed (what the console showed, and more at NORMAL);
    ray-workers.log: what Ray's workers and actors printed (Train controllers, Ray Data, Tune);
    ray-driver.log: Ray's Python logs and warnings in this process; driver-stderr.log: what Ray's
    C++ core printed to this process's stderr. With `-v` the console also gets Ray's output.
    """
    verbose = console.level() >= console.VERBOSE
    log_dir = Path(log_dir)
    log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    env = {"RAY_COLOR_PREFIX": None if console.use_color() else "0",
           # Tune's summary box and "View detailed results here" lines: raykd prints its own
           "RAY_AIR_NEW_OUTPUT": None if verbose else "0"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(console.capture(log_dir / "raykd.log"))
        stack.enter_context(_env(env))
        workers = stack.enter_context(open(log_dir / "ray-workers.log", "a", encoding="utf-8"))
        previous, _route["file"] = _route["file"], workers
        stack.callback(_route.__setitem__, "file", previous)
        stack.enter_context(_python_logs(log_dir / "ray-driver.log", verbose))
        if not verbose:
            stack.enter_context(_native_stderr(log_dir / "driver-stderr.log"))
        yield


@contextlib.contextmanager
def _env(values: dict) -> Iterator[None]:
    """Set environment variables (None: leave as is) for the block, then put them back."""
    old = {k: os.environ.get(k) for k, v in values.items() if v is not None}
    os.environ.update({k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _python_logs(path: Path, verbose: bool) -> Iterator[None]:
    """Ray's (and Optuna's) Python loggers and Python warnings also go to `path`; unless verbose,
    their console handlers only pass errors and warnings stay off the console."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    with contextlib.suppress(ImportError):  # Optuna adds its stderr handler on first use: have it now
        import optuna.logging

        optuna.logging.get_verbosity()
    saved = []
    for name in _LOGGERS:
        logger = logging.getLogger(name)
        if logger.propagate and not logger.handlers and name not in ("ray", "py.warnings"):
            continue  # a child that reaches "ray"'s handlers, and so this one
        saved.append((logger, logger.level, logger.propagate, [(h, h.level) for h in logger.handlers]))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        if not verbose:
            logger.propagate = False
            for h in logger.handlers:
                if h is not handler and not isinstance(h, logging.FileHandler):
                    h.setLevel(max(h.level, logging.ERROR))
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for logger, level, propagate, handlers in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate
            for h, h_level in handlers:
                h.setLevel(h_level)
        handler.close()


@contextlib.contextmanager
def _native_stderr(path: Path) -> Iterator[None]:
    """What C and C++ code writes to file descriptor 2 (Ray's core worker logs its errors there,
    e.g. a warning about actor restarts that is no failure) goes to `path`; Python's sys.stderr,
    where raykd writes its warnings and errors, keeps the terminal."""
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # e.g. pytest's capsys: not a real file
        on_fd2 = False
    sys.stderr.flush()
    saved = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    python_stderr = sys.stderr
    if on_fd2:
        sys.stderr = open(os.dup(saved), "w", buffering=1, encoding=python_stderr.encoding,  # noqa: SIM115
                          errors=python_stderr.errors)
    os.dup2(target, 2)
    os.close(target)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if on_fd2:
            sys.stderr.close()
            sys.stderr = python_stderr


@contextlib.contextmanager
def own_signal_handlers() -> Iterator[None]:
    """Give back this process's SIGINT/SIGUSR1 handlers after a Ray Train or Tune run: both install
    their own (abort that run) and leave them behind, so a later Ctrl-C would be swallowed."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
