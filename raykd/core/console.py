"""What raykd prints, and where the rest goes.

Three levels, set once by the entry point (`raykd -q/-v`): QUIET (warnings, errors and the final
result line), NORMAL (raykd's own progress lines) and VERBOSE (every epoch, plus Ray's worker and
library logs on the console as Ray prints them). Whatever the level, a run's lines are kept in
`<run>/logs/raykd.log` (`capture`), and Ray's output in the other files of `<run>/logs/`
(raykd.cluster.output.run_logs).

Lines printed inside Ray workers (the Train controller's epoch lines, a training run driven by a
Ray task) reach the driver through Ray's log forwarding. `say` marks them (`MARK`) so that the
driver prints them as raykd's own, without Ray's `(pid=...)` prefix, instead of filing them with
Ray's output (`unmark`). Plain Python and stdlib only: importing this module starts nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

QUIET, NORMAL, VERBOSE = 0, 1, 2
MARK = "[raykd] "  # a worker's line for the console at NORMAL
MARK_DETAIL = "[raykd:v] "  # a worker's line for the console at VERBOSE (always in raykd.log)
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_state: dict = {"level": NORMAL, "tee": None}


def set_level(level: int) -> None:
    """The console level of this process (QUIET, NORMAL or VERBOSE)."""
    _state["level"] = level


def level() -> int:
    return _state["level"]


def say(message: str, detail: bool = False) -> None:
    """Print one of raykd's own lines: shown at NORMAL (VERBOSE when `detail`), always logged.

    In a Ray worker the line is marked and printed to the worker's stdout, which Ray forwards
    to the driver; the driver's log router (raykd.cluster.runtime) prints it there as this one would.
    """
    if in_ray_worker():
        print(f"{MARK_DETAIL if detail else MARK}{message}", file=sys.__stdout__, flush=True)
    else:
        emit(message, VERBOSE if detail else NORMAL)


def emit(message: str, needs: int = NORMAL) -> None:
    """Print `message` if the level is at least `needs`; keep it in raykd.log whatever the level."""
    tee = _state["tee"]
    if level() >= needs:
        print(message, flush=True)  # through the tee (when capturing), which also logs it
    elif tee is not None:
        tee.log(message + "\n")


def warn(message: str) -> None:
    """A warning on stderr (yellow on a colour terminal), shown at every level, and logged."""
    text = f"warning: {message}"
    stream = sys.stderr
    print(paint(text, "33", stream), file=stream, flush=True)
    if _state["tee"] is not None:
        _state["tee"].log(text + "\n")


def unmark(line: str) -> tuple[int, str] | None:
    """(level needed, text) of a line that `say` printed in a worker, else None."""
    for mark, needs in ((MARK, NORMAL), (MARK_DETAIL, VERBOSE)):
        at = line.find(mark)
        if at != -1 and not line[:at].strip():
            return needs, line[at + len(mark):]
    return None


def in_ray_worker() -> bool:
    """True inside a Ray task or actor (not the driver); False when Ray is not even imported."""
    ray_worker = sys.modules.get("ray._private.worker")
    return ray_worker is not None and ray_worker.global_worker.mode == ray_worker.WORKER_MODE


# ---------------------------------------------------------------- colour and text

def use_color(stream=None) -> bool:
    """Colour only on a terminal, and never with NO_COLOR set or TERM=dumb (no-color.org)."""
    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def paint(text: str, code: str, stream=None) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if use_color(stream) else text


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def duration(seconds: float) -> str:
    """45s, 3m05s, 1h02m: short enough for a progress line."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress(what: str, done: int, total: int, start: float, unit: str = "") -> str:
    """`what: done of total unit (pct), elapsed, ETA` from a start time (time.perf_counter)."""
    elapsed = time.perf_counter() - start
    eta = f", ETA {duration(elapsed / done * (total - done))}" if 0 < done < total else ""
    pct = f" ({done / total:.0%})" if total else ""
    return f"{what}: {done:,} of {total:,}{' ' + unit if unit else ''}{pct}, {duration(elapsed)}{eta}"


class Throttle:
    """Says when a repeated progress line is due: the first, then one per `every_s` seconds."""

    def __init__(self, every_s: float = 20.0):
        self.every_s, self.last = every_s, None

    def due(self, force: bool = False) -> bool:
        now = time.monotonic()
        if force or self.last is None or now - self.last >= self.every_s:
            self.last = now
            return True
        return False


# ---------------------------------------------------------------- raykd.log

class Tee(io.TextIOBase):
    """sys.stdout while a run is captured: every line to the log file (without colour codes),
    and to the terminal unless quiet."""

    def __init__(self, terminal, log_file, echo: bool):
        super().__init__()
        self.terminal, self.file, self.echo = terminal, log_file, echo

    def write(self, text: str) -> int:
        self.log(text)
        if self.echo:
            self.terminal.write(text if use_color(self.terminal) else strip_ansi(text))
        return len(text)

    def log(self, text: str) -> None:
        self.file.write(strip_ansi(text))

    def flush(self) -> None:
        self.file.flush()
        self.terminal.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.terminal, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self.terminal.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.terminal, "encoding", "utf-8")


@contextlib.contextmanager
def capture(path: Path) -> Iterator[None]:
    """Keep everything printed to stdout in `path` (appended); the terminal gets it unless QUIET."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous, terminal = _state["tee"], sys.stdout
    with open(path, "a", encoding="utf-8") as log_file:
        tee = Tee(terminal, log_file, echo=level() >= NORMAL)
        sys.stdout, _state["tee"] = tee, tee
        try:
            yield
        finally:
            tee.flush()
            sys.stdout, _state["tee"] = terminal, previous
