"""The run directory: where every artifact lives, how it is published, and what is current.

Plain Python (no Ray, no torch), the one contract between the stages:

- **Paths.** An artifact is a folder named by its path relative to the run directory: `data`,
  `item_text`, `teacher`, `teacher_ensemble/m1`, `soft_labels`, `student`, `student_nokd`,
  `kd_curve/d8/student`, `tune/best`. Only this module spells those names.
- **One manifest format.** Every artifact folder holds `manifest.json`: its `key` (what it was
  made from: the config sections and upstream keys that matter), its `upstream` keys, the hash of
  the whole config, and the raykd/torch/Ray/Python versions. It is written last.
- **Atomic publication.** An artifact is written into a hidden staging folder beside its place and
  renamed into place when complete (`staged`). A run killed mid-write leaves either the previous
  artifact or none, never a mix; one killed between the two renames of a swap leaves the previous
  version set aside, and the next lock's `sweep` puts it back. JSON (manifests, the run record) is
  written durably: fsynced, renamed, the folder fsynced.
- **The run record** (`run.json`) lists what the current config produced: artifact -> its key,
  the stage that wrote it and the upstream keys it was made from. An entry changes only when the
  stage's new output is in place (`record`); once a stage succeeded, the entries it no longer
  writes are dropped (`forget(..., keep=...)`), as are those of a stage the config turns off, so
  outputs a config no longer asks for (tune off, no no-KD twin) stop counting, while an interrupted
  or failed stage leaves the run as it was. `current(...)` also checks the chain: an artifact whose
  upstream was remade since is stale. `evaluate`, `serve`, `recommend` and `tune` read the record,
  never "which folders exist".
- **The lock.** One process at a time writes a run directory (`lock`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from raykd.core.errors import RaykdError

DATA = "data"
ITEM_TEXT = "item_text"
TEACHER = "teacher"
SOFT_LABELS = "soft_labels"
STUDENT = "student"
STUDENT_NOKD = "student_nokd"
TUNE = "tune"  # the search itself (trials, plots); its exported winner is TUNE_BEST
TUNE_BEST = "tune/best"
MANIFEST = "manifest.json"
# the files of a model folder (teacher/, student/, tune/best/, a bundle) and of data/
MODEL_JSON = "model.json"  # the typed model description, rebuilt with the weights
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"  # the per-epoch report and the best validation scores
ITEMS = "items.parquet"  # the item vocabulary (and a bundle's copy of it)
USERS = "users.parquet"
RECORD = "run.json"
CONFIG = "config.yaml"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
LOCK = ".lock"
LOGS = "logs"  # raykd.log and Ray's output (raykd.cluster.output.run_logs)


# ---------------------------------------------------------------- names

def member(i: int) -> str:
    """Teacher ensemble member i (0 is `teacher` itself)."""
    return TEACHER if i == 0 else f"teacher_ensemble/m{i}"


def curve(size: int | str, kd: bool) -> str:
    """The KD curve's student (kd) or no-KD twin at one size: a dense width (`d8`) or a named one (`pq4`)."""
    label = size if isinstance(size, str) else f"d{size}"
    return f"kd_curve/{label}/{STUDENT if kd else STUDENT_NOKD}"


def check_output_dir(root: str | Path) -> Path:
    """The run directory as an absolute path, created if needed; a clear error if it cannot be."""
    root = Path(root).expanduser()
    for parent in (root, *root.parents):
        if parent.exists() and not parent.is_dir():
            raise RaykdError(f"output_dir {root} cannot be a run directory: {parent} is a file, not a folder. "
                             "Set output_dir to a folder path (e.g. output_dir=runs/my_run)")
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise RaykdError(f"output_dir {root} cannot be created ({err.strerror}): choose a writable folder") from None
    if not os.access(root, os.W_OK):
        raise RaykdError(f"output_dir {root} is not writable by this user: choose another folder")
    return root.resolve()


def check_private(root: Path, folder: Path, what: str) -> None:
    """Refuse `folder` (below the run directory `root`) if anyone but its owner could have written
    it or the folders above it: `what` loads pickles from it, which can run any code.

    check_output_dir creates run directories owner-only, but never tightens an existing one.
    """
    root, folder = Path(root).resolve(), Path(folder).resolve()
    above = [root / p for p in reversed(folder.relative_to(root).parents) if p != Path(".")]
    below = [Path(base) / n for base, dirs, files in os.walk(folder) for n in (*dirs, *files)]
    shared = [p for p in (root, *above, folder, *below) if not p.is_symlink() and p.stat().st_mode & 0o022]
    if shared:
        raise RaykdError(f"{what} from {folder} refused: {shared[0]} is writable by its group or others, so someone "
                         "else could have planted code there (it loads pickles). Make the run directory private: "
                         f"chmod -R g-w,o-w {root} (a run directory must be writable only by its owner)")


# ---------------------------------------------------------------- manifests

def versions() -> dict:
    """The versions of raykd, torch, Ray and Python here (manifests, reports and model cards record them)."""
    def of(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    return {"raykd": of("raykd"), "torch": of("torch"), "ray": of("ray"), "python": platform.python_version()}


def read_json(path: str | Path) -> dict:
    """A JSON object from `path`, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_manifest(folder: Path, key: str, upstream: dict | None = None, config_hash: str = "", **info) -> dict:
    """Write `folder/manifest.json` (do it last: its presence says the artifact is complete)."""
    manifest = {"key": key, "upstream": upstream or {}, "config_hash": config_hash, "versions": versions(),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **info}
    write_json_durable(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict:
    """An artifact's manifest, or {} when it is missing or unreadable (an incomplete artifact)."""
    return read_json(Path(folder) / MANIFEST)


def key_of(folder: Path) -> str | None:
    return read_manifest(folder).get("key")


def vocab_digest(raw_ids: list) -> str:
    """A short hash of an item vocabulary (raw ids in index order): a model is tied to it."""
    return hashlib.sha256(json.dumps(raw_ids, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- atomic publication

@contextlib.contextmanager
def staged(target: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success it replaces `target` in one rename.

    On an exception the staging folder is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o700)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, target)


def publish(tmp: Path, target: Path) -> None:
    """Move a complete folder into place, then delete the previous one.

    Where the system can swap two names in one step (Linux `renameat2(RENAME_EXCHANGE)`), the new
    folder and the previous one trade names: `target` always exists, so a reader never finds it
    missing, and a run killed after the swap leaves the previous version under the staging name,
    which the next `sweep` removes. Elsewhere the previous folder goes aside first: between the two
    renames only the set-aside copy and the new one exist, and a run killed there is repaired by
    the next `sweep`, which puts the set-aside copy back. The folder is fsynced after the rename,
    so the new name itself is on disk.
    """
    if target.exists() and _rename_exchange(tmp, target):
        fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous version
        return
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(tmp, target)
    fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` in one atomic step; False where the system or filesystem cannot."""
    import ctypes

    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # not Linux, or a libc older than glibc 2.28
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel, or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# what a killed `publish` or `write_json_durable` leaves beside its target: `.<name>.staging-<hex>`,
# `.<name>.old-<hex>` (folders) and `.<name>.<hex>` (a JSON file's temporary)
_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?:(?P<kind>staging|old)-\w+|[0-9a-f]{8})")
_DEPTHS = ("", "*/", "*/*/")  # data, tune/best, kd_curve/d8/student


def sweep(root: Path) -> None:
    """Repair what a killed run left, then remove its leftovers (call with the lock held).

    A target that is missing while a set-aside copy of it exists was killed between the two
    renames of `publish`: the set-aside copy (the version the run record lists) is put back. With
    no such copy a complete staging folder (it has its manifest, written last) is renamed in. Then
    staging folders, set-aside copies and temporary JSON files go: never the only copy of an artifact.
    """
    found: dict[Path, dict[str, list[Path]]] = {}
    for depth in _DEPTHS:
        for path in Path(root).glob(f"{depth}.*"):
            m = _LEFTOVER.fullmatch(path.name)
            inside = any(_LEFTOVER.fullmatch(part) for part in path.relative_to(root).parts[:-1])
            if m and not inside and (m["kind"] is not None) == path.is_dir():
                found.setdefault(path.parent / m["name"], {}).setdefault(m["kind"] or "tmp", []).append(path)
    for target, left in found.items():
        if not target.exists():
            newest_old = sorted(left.get("old", []), key=lambda p: p.stat().st_mtime)[-1:]
            complete = [p for p in left.get("staging", []) if (p / MANIFEST).is_file()]
            for candidate in newest_old or complete[:1]:
                os.replace(candidate, target)
                fsync_dir(target.parent)
        for path in (p for paths in left.values() for p in paths if p.exists()):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


# ---------------------------------------------------------------- the run record

def read_record(root: Path) -> dict:
    try:
        data = json.loads((Path(root) / RECORD).read_text())
        return data if isinstance(data, dict) and isinstance(data.get("artifacts"), dict) else {"artifacts": {}}
    except (OSError, ValueError):
        return {"artifacts": {}}


def record(root: Path, artifact: str, stage: str, upstream: list[str] = ()) -> dict:
    """Record that the current config produced `artifact` (its manifest must exist) from `upstream`."""
    key = key_of(Path(root) / artifact)
    if key is None:
        raise RaykdError(f"internal: {Path(root) / artifact} has no manifest to record")
    data = read_record(root)
    arts = data["artifacts"]
    entry = {"key": key, "stage": stage, "upstream": {u: arts.get(u, {}).get("key") for u in upstream}}
    arts[artifact] = entry
    write_json_durable(Path(root) / RECORD, data)
    return entry


def forget(root: Path, stage: str, keep: list[str] = ()) -> list[str]:
    """Drop the entries `stage` wrote, except `keep`: all of them when the config turns the stage off,
    the outputs it no longer writes once it succeeded (never before it runs: an interrupted run
    must leave the previous results current)."""
    data = read_record(root)
    gone = [a for a, e in data["artifacts"].items() if e.get("stage") == stage and a not in keep]
    if gone:
        for a in gone:
            del data["artifacts"][a]
        write_json_durable(Path(root) / RECORD, data)
    return gone


# what produces each artifact, for "run this first" messages
MAKES = {DATA: "raykd prepare CONFIG", ITEM_TEXT: "raykd embed-items CONFIG", TEACHER: "raykd teacher CONFIG",
         SOFT_LABELS: "raykd soft-labels CONFIG", STUDENT: "raykd distill CONFIG", TUNE_BEST: "raykd tune CONFIG"}


def require(root: Path, artifact: str, needed_by: str) -> str:
    """The key of an upstream artifact the current config produced; else an error saying what to run."""
    if current(root, artifact) is None:
        make = MAKES.get(artifact.split("/")[0], "raykd pipeline CONFIG")
        raise RaykdError(f"{needed_by} needs {Path(root) / artifact}, but {stale_reason(root, artifact)}: "
                         f"run `{make}` first (or `raykd pipeline CONFIG`, which runs every stage in order)")
    return read_record(root)["artifacts"][artifact]["key"]


def current(root: Path, artifact: str) -> Path | None:
    """The artifact's folder if the current config produced it and nothing it was made from changed since."""
    arts = read_record(root)["artifacts"]
    return Path(root) / artifact if _is_current(Path(root), arts, artifact, set()) else None


def stale_reason(root: Path, artifact: str) -> str:
    """Why `current` said no, in words a user can act on."""
    arts = read_record(root)["artifacts"]
    entry = arts.get(artifact)
    if entry is None:
        exists = (Path(root) / artifact / MANIFEST).exists()
        return (f"{artifact}/ was not produced by the run's current config (left from an earlier run)" if exists
                else f"{artifact}/ has not been produced")
    if key_of(Path(root) / artifact) != entry["key"]:
        return f"{artifact}/ was replaced or deleted after it was recorded"
    for up, key in entry.get("upstream", {}).items():
        if not _is_current(Path(root), arts, up, set()) or arts[up]["key"] != key:
            return f"{artifact}/ was made from an earlier {up}/, which has been produced again since"
    return f"{artifact}/ is current"


def _is_current(root: Path, arts: dict, artifact: str, seen: set) -> bool:
    entry = arts.get(artifact)
    if entry is None or artifact in seen or key_of(root / artifact) != entry["key"]:
        return False
    seen = seen | {artifact}
    return all(up in arts and arts[up]["key"] == key and _is_current(root, arts, up, seen)
               for up, key in entry.get("upstream", {}).items())


def served_model(path: str | Path) -> Path:
    """The model a path means: a model folder or bundle itself; for a run directory, the tune
    winner if the run's current config produced one, else its current student."""
    path = Path(path)
    _wait_past_a_swap(path)
    if (path / "model.json").exists():
        return path
    if not (path / RECORD).exists():
        raise RaykdError(f"{path} is neither a model folder (no model.json) nor a raykd run directory (no {RECORD}): "
                         "give a run directory after `raykd pipeline`, a model folder, or a `raykd export` bundle")
    for artifact in (TUNE_BEST, STUDENT):
        if current(path, artifact) is not None:
            return path / artifact
    raise RaykdError(f"{path} has no current student to serve: {stale_reason(path, STUDENT)}. Run `raykd distill "
                     "CONFIG` (or `raykd pipeline CONFIG`) for this run directory")


def _wait_past_a_swap(path: Path, timeout_s: float = 2.0) -> None:
    """Where a publication without an atomic swap is between its two renames (`path` is missing and
    a set-aside copy of it exists), wait until the new version is in place."""
    deadline = time.monotonic() + timeout_s
    while (not path.exists() and any(path.parent.glob(f".{glob.escape(path.name)}.old-*"))
           and time.monotonic() < deadline):
        time.sleep(0.02)


def dump_config(cfg, root: Path) -> None:
    """Write the resolved config (every default spelled out) as `<run>/config.yaml`."""
    Path(root).mkdir(mode=0o700, parents=True, exist_ok=True)  # owner-only: Tune's resume state is pickle
    # the API key is a secret: never on disk (a reloaded "**********" would become the key)
    data = cfg.model_dump(mode="json", exclude={"serve": {"api_key"}})
    (Path(root) / CONFIG).write_text(yaml.safe_dump(data, sort_keys=False))


# ---------------------------------------------------------------- the lock

_HELD: dict[Path, int] = {}


@contextlib.contextmanager
def lock(root: Path, what: str = "raykd") -> Iterator[None]:
    """Hold the run directory for this process; a second process gets a clear error at once.

    An OS file lock (flock), so a killed process releases it. Re-entrant within one process.
    """
    root = Path(root).resolve()
    if root in _HELD:
        yield
        return
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = (root / LOCK).read_text().strip() or "another process"
        os.close(fd)
        if err.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        raise RaykdError(f"run directory {root} is in use by {holder}. Two runs writing one directory would mix "
                         "their outputs: wait for that run to finish (or stop it), or set another output_dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} ({what}, since {datetime.datetime.now():%Y-%m-%d %H:%M:%S})".encode())
    _HELD[root] = fd
    try:
        sweep(root)
        yield
    finally:
        del _HELD[root]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def logs_of(path: Path, command: str) -> Path:
    """Where a command on `path` keeps Ray's output: a run's logs/, else a folder in the temp dir."""
    return path / LOGS if (path / RECORD).exists() else Path(tempfile.gettempdir()) / f"raykd-{command}-logs"


# ---------------------------------------------------------------- readers: durable writes, consistent reads


def write_json_durable(path: Path, data: dict) -> None:
    """Write a JSON file that survives a crash: a temporary file beside it, flushed, fsynced, renamed.

    The folder is fsynced after the rename too, so the new name itself is on disk.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """fsync a folder: the names created or renamed in it are then on disk."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_snapshot(src: Path, dst: Path, names: tuple[str, ...] | list[str], attempts: int = 5) -> str:
    """Copy the `names` that `src` holds (files or folders) into `dst`, all from one version of `src`.

    Artifacts are replaced by renaming a new folder into place and deleting the old one (`publish`),
    and a writer holds the run's lock for a whole run: readers take no lock. Every file is opened
    through one descriptor of the folder, so a publication mid-read cannot mix two versions: the old
    folder's files are read to the end, or one is gone (deleted) and the copy starts over on the new
    folder. Returns a digest of what was copied (names and contents), the version read.
    """
    for attempt in range(attempts):
        try:
            fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # between the two renames of a publication without an atomic swap
            time.sleep(0.05 * (attempt + 1))
            continue
        try:
            present = sorted(set(names) & set(os.listdir(fd)))
            digest = hashlib.sha256()
            for name in present:
                _copy_at(fd, name, Path(dst) / name, digest)
            return digest.hexdigest()[:16]
        except FileNotFoundError:  # the folder was replaced and its old files deleted mid-read
            for name in names:
                target = Path(dst) / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        finally:
            os.close(fd)
    raise RaykdError(f"{src} was replaced {attempts} times while it was read: retry when the run writing it is done")


def _copy_at(dir_fd: int, name: str, dest: Path, digest) -> None:
    """Copy `name` (a file, or a folder recursively) of the folder open as `dir_fd` to `dest`."""
    import stat

    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        try:
            dest.mkdir(exist_ok=True)
            for child in sorted(os.listdir(fd)):
                _copy_at(fd, child, dest / child, digest)
        finally:
            os.close(fd)
        return
    digest.update(f"{name}\0".encode())
    with open(fd, "rb") as f, open(dest, "wb") as out:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
            out.write(block)
