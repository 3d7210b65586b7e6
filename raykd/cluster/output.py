"""Where Ray's output goes while raykd works: raykd's lines on the console, Ray's in `<run>/logs/`.

`install_router` (called by `ensure_ray`) replaces Ray's printer of forwarded worker output;
`run_logs(log_dir)` opens the run's log files for the duration of a command.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Imported before `run_logs` routes their loggers: Ray and Ray Data configure their own logging
# handlers when first imported, and a handler added after the routing would print to the console.
import ray
import ray.data  # noqa: F401

from raykd.cluster import ray_private
from raykd.core import console, rundir

# ---------------------------------------------------------------- where Ray's output goes

LOG_DIR = rundir.LOGS  # <run>/logs/: raykd.log, ray-workers.log, ray-driver.log, driver-stderr.log
# Ray's own Python loggers in the driver, and the libraries they drive
_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train", "ray.serve", "optuna", "py.warnings")
_route: dict = {"file": None}  # ray-workers.log while a run_logs block is open


def install_router() -> None:
    """Replace Ray's printer of forwarded worker output with `_route_worker_output` (once)."""
    dispatcher = ray_private.worker_output_dispatcher()
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
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its status tables every few seconds: only its events, as Ray does
        lines = ray_private.autoscaler_events(lines)
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
        ray_private.print_worker_lines({**data, "lines": data["lines"] if data.get("pid") == "autoscaler" else rest})


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
