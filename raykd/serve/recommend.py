"""recommend: the top k items for every prepared user (or a list of them), as Parquet, on Ray Data.

    raykd recommend RUN_DIR --k 10 --out recs.parquet [--users FILE] [--no-exclude-seen]
                    [--model DIR] [--workers N] [--use-gpu]

RUN_DIR is a run directory (its tune winner, else `student/`), a model folder, or a bundle from
`raykd export --with-histories`; `--model` picks another model folder of the run. Output: a
folder `--out` of Parquet parts (`part-000000.parquet`, ... in prepared user order, and
`_manifest.json`), read as one table by `pyarrow.parquet.read_table(out)`, `pandas.read_parquet(out)`,
Spark or DuckDB (`read_parquet('out/*.parquet')`); columns `user_id` (the raw id, of the input data's
type), `items` (raw item ids, best first) and `scores`, one row per user in the prepared order.

The users are cut into fixed parts of `--part-users` users of one sequence shard. A Ray Data actor
pool (`--workers` actors, a GPU each with `--use-gpu`) loads the model once per actor, scores a
part in forward passes of `--batch-size` users through `Recommender.recommend_many` (so a row is
exactly what `POST /recommend {"user_id": ..., "k": ..., "exclude_seen": ...}` answers), and writes
the part itself (a temporary name, fsynced, renamed); the driver gets back only each part's row
count. Parts go to a hidden folder beside `--out` named after the run's inputs (model digest,
data, k, exclude_seen, user list): a run killed at any point, rerun with the same arguments,
keeps the parts already written (each checked: its row count and schema), drops temporary and
broken ones, and scores only the rest. When every part is there the folder is renamed to `--out`
in one step (an older output, file or folder, is replaced). Listed ids that are not prepared users
go to `<out>.unknown_users.csv`, with a count.

This module is imported to build the CLI: Ray and torch are imported inside `main` only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from raykd.core import console, rundir
from raykd.core.errors import RaykdError

UNKNOWN_SUFFIX = ".unknown_users.csv"


PART_USERS = 16384  # users per output part: ~16 s of scoring per actor at 1k users/s, ~600 parts at 10M users
PROGRESS_S = 10  # seconds between progress lines (Ray Data's own lines go to the run's logs)
MANIFEST = "_manifest.json"  # in the output folder; Parquet readers skip names starting with _ or .
ANN_DIR = "_ann"  # the approximate index the actors load (--ann), in the staging folder; removed at publish
KIND = "raykd-recommendations"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory (its tune winner, else student/), model folder, or a bundle "
                   "exported with --with-histories")
    p.add_argument("--k", type=int, default=10, help="items per user (default 10)")
    p.add_argument("--out", required=True, help="output folder of Parquet parts (user_id, items, scores), read as "
                   "one table by pyarrow/pandas/Spark/DuckDB; it replaces an older output (file or folder) only "
                   "once whole. A killed run, rerun with the same arguments, resumes from the parts written")
    p.add_argument("--users", help="only these raw user ids: a text file (one id a line), or a CSV or Parquet "
                   "file whose user_id column (or only column) holds them; default: every prepared user")
    p.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=True,
                   help="never recommend an item of the user's history (default: on)")
    p.add_argument("--model", help="model folder to use instead of the run's own (e.g. RUN_DIR/teacher)")
    p.add_argument("--workers", type=int, default=1, help="scoring actors (default 1)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each actor reserves and its torch "
                   "threads (default 1)")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per actor")
    p.add_argument("--batch-size", type=int, default=256, help="users per forward pass (default 256)")
    p.add_argument("--ann", action="store_true", help="answer from the approximate index (faiss HNSW, inner "
                   "product; `pip install raykd[ann]`) instead of exact scoring: a bundle's ann/ when there, else "
                   "built once before scoring, its recall@10 against exact measured and printed (default: exact)")
    p.add_argument("--part-users", type=int, default=PART_USERS, help=f"users per output part, the unit of work "
                   f"and of resuming (default {PART_USERS})")


def main(args: argparse.Namespace) -> int:
    """`raykd recommend`: plan the parts, keep those a killed run wrote, score the rest, publish the folder."""
    check_args(args)
    from raykd.serve.recommender import model_digest, resolve_student

    model_dir = resolve_student(args.model or args.run_dir).resolve()
    data_dir = users_data_dir(Path(args.run_dir), model_dir)
    parts, total, unknown = plan(data_dir, args.part_users, args.users)
    if unknown:
        console.warn(f"recommend: {len(unknown):,} listed user id(s) are not prepared users (no history to score); "
                     f"{total:,} known")
    digest = model_digest(model_dir)
    out = Path(args.out).absolute()
    key = run_key(digest, data_dir, parts, args)
    staging = out.with_name(f".{out.name}.parts-{key[:16]}")
    t0 = time.perf_counter()
    with hold(staging):  # one run per staging folder: a second one with the same arguments stops at once
        done = kept_parts(staging, parts, schema(data_dir))
        todo = [p for p in parts if p["part"] not in done]
        kept = sum(p["users"] for p in parts if p["part"] in done)
        console.say(f"recommend: top-{args.k} from {model_dir} for {total:,} users in {len(parts):,} parts of up to "
                    f"{args.part_users:,}, on {args.workers} worker(s){' with a GPU each' if args.use_gpu else ''}"
                    + (f"; resuming: {len(done):,} parts ({kept:,} users) already written" if done else ""))
        from raykd.cluster import output

        if args.ann and todo and total:
            index_for(model_dir, data_dir, staging)
        with output.run_logs(rundir.logs_of(Path(args.run_dir), "recommend")):  # Ray's lines to the logs
            if not total:  # no user (none of the listed ids is known): no Ray
                write_part(schema(data_dir).empty_table(), staging / part_name(0))
            elif todo:
                score(todo, model_dir, data_dir, staging, digest, args, total - kept)
        missing = [p["part"] for p in parts if p["part"] not in kept_parts(staging, parts, schema(data_dir))]
        if missing:
            raise RaykdError(f"{len(missing):,} part(s) missing after scoring (first {part_name(missing[0])}); "
                             f"rerun the same command to score them: the {len(parts) - len(missing):,} written are kept")
        ann_meta = _ann_meta(staging) if (staging / ANN_DIR).exists() else None
        shutil.rmtree(staging / ANN_DIR, ignore_errors=True)  # the actors' copy of the index: not an output
        publish(staging, out, {"kind": KIND, "key": key, "model": str(model_dir), "model_digest": digest,
                               "data": str(data_dir), "k": args.k, "exclude_seen": args.exclude_seen,
                               "users": total, "parts": [part_name(p["part"]) for p in parts],
                               "columns": schema(data_dir).names,
                               "ann": ann_meta})
    if args.users:  # only now: an interrupted or failed run leaves no list beside an old output
        report_unknown(unknown, total, args.out)
    seconds = time.perf_counter() - t0
    console.emit(f"recommend: wrote {total:,} users to {out} ({len(parts):,} parts) in {seconds:.1f}s "
                 f"({(total - kept) / max(seconds, 1e-9):,.0f} users/s scored)", console.QUIET)
    return 0


def index_for(model_dir: Path, data_dir: Path, staging: Path) -> None:
    """Build (or load a bundle's) approximate index once, in the driver, into the staging folder's
    ANN_DIR, where every actor loads it (checked against the model's table and vocabulary)."""
    from raykd.core import ann, models

    folder = staging / ANN_DIR
    if not (folder / ann.META_FILE).exists():
        model, desc = models.load_model(model_dir)
        vocab = rundir.vocab_digest(pq_column(data_dir / rundir.ITEMS, "raw_id"))
        ann.load_or_build(model_dir, model, desc, vocab, data_dir).save(folder)
    recall = _ann_meta(staging).get("recall@10")
    console.say(f"recommend: approximate index (recall@10 against exact {recall}, measured at its build)")


def _ann_meta(staging: Path) -> dict:
    from raykd.core import ann

    return rundir.read_json(staging / ANN_DIR / ann.META_FILE)


def pq_column(path: Path, column: str) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=[column])[column].to_pylist()


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before Ray starts."""
    for name in ("k", "workers", "batch_size", "part_users"):
        if getattr(args, name) < 1:
            raise RaykdError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.cpus_per_worker <= 0:
        raise RaykdError(f"--cpus-per-worker must be positive, got {args.cpus_per_worker}")
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not is_output(out):
        raise RaykdError(f"--out {args.out} is a folder that raykd recommend did not write (no {MANIFEST} in it): "
                         "give a new name such as recs.parquet; recommend replaces only its own output")
    if args.users and not os.path.isfile(args.users):
        raise RaykdError(f"--users {args.users}: no such file; give a text, CSV or Parquet file of raw user ids")


def is_output(folder: Path) -> bool:
    """Whether `folder` is a finished `raykd recommend` output (its manifest says so)."""
    try:
        return rundir.read_json(folder / MANIFEST).get("kind") == KIND
    except (OSError, ValueError, RaykdError):
        return False


def unknown_users_path(out: str | Path) -> Path:
    """Where the listed user ids that are not prepared users go: `<out without .parquet>.unknown_users.csv`."""
    out = Path(out)
    stem = out.name.removesuffix(".parquet")
    return out.with_name(stem + UNKNOWN_SUFFIX)


# ---------------------------------------------------------------- what to score


def users_data_dir(run_dir: Path, model_dir: Path) -> Path:
    """The prepared users and histories: RUN_DIR/data, RUN_DIR itself (a bundle), else the model's run's data/."""
    from raykd.serve.recommender import find_data_dir

    found = [c for c in (run_dir / "data", run_dir) if (c / rundir.ITEMS).exists()]
    data = found[0] if found else find_data_dir(model_dir)
    if not (data / rundir.USERS).exists() or not list((data / "sequences").glob("part-*.parquet")):
        raise RaykdError(f"{data} holds no user histories (users.parquet and sequences/), and recommend scores the "
                         "users it knows: give a run directory, or a bundle exported with "
                         "`raykd export RUN_DIR --out DIR --with-histories`")
    return data.resolve()


def plan(data_dir: Path, part_users: int, users_file: str | None) -> tuple[list[dict], int, list]:
    """Fixed parts of shard rows to score: (parts, users in them, listed ids that are not prepared users).

    A part is one shard's rows start..stop, or its listed `rows`, numbered in prepared order; the same
    parts whatever the workers, so a rerun finds the parts a killed run wrote under the same names.
    """
    import numpy as np
    import pyarrow.parquet as pq

    from raykd.core import sequences

    wanted, unknown = (None, [])
    if users_file:
        wanted, unknown = match_users(read_user_list(users_file), data_dir)
    parts, total = [], 0
    for shard in sequences.shard_paths(data_dir):
        if wanted is None:  # every row: ranges, no row lists
            n = pq.ParquetFile(shard).metadata.num_rows
            parts += [{"shard": str(shard), "start": s, "stop": min(s + part_users, n), "rows": [],
                       "users": min(s + part_users, n) - s} for s in range(0, n, part_users)]
            total += n
            continue
        rows = np.flatnonzero(np.isin(pq.read_table(shard, columns=["user"])["user"].to_numpy(), wanted))
        parts += [{"shard": str(shard), "start": 0, "stop": 0, "rows": rows[s:s + part_users].tolist(),
                   "users": len(rows[s:s + part_users])} for s in range(0, len(rows), part_users)]
        total += len(rows)
    if not parts:  # no user to score: one empty part, so the output still reads as a table of these columns
        parts = [{"shard": str(sequences.shard_paths(data_dir)[0]), "start": 0, "stop": 0, "rows": [], "users": 0}]
    for i, part in enumerate(parts):
        part["part"] = i
    return parts, total, unknown


def part_name(i: int) -> str:
    return f"part-{i:06d}.parquet"


def run_key(digest: str, data_dir: Path, parts: list[dict], args: argparse.Namespace) -> str:
    """What the output depends on: the model's digest, the prepared data, k, exclude_seen and the parts."""
    import hashlib
    import json

    data = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in
            [data_dir / rundir.USERS, data_dir / rundir.ITEMS, *sorted((data_dir / "sequences").glob("part-*"))]]
    what = {"model": digest, "data": str(data_dir), "files": data, "k": args.k, "exclude_seen": args.exclude_seen,
            "parts": [(Path(p["shard"]).name, p["start"], p["stop"], p["rows"]) for p in parts],
            "ann": bool(getattr(args, "ann", False))}
    return hashlib.blake2b(json.dumps(what, sort_keys=True).encode(), digest_size=16).hexdigest()


def read_user_list(path: str) -> list:
    """Raw user ids of a text file (one a line), or of a CSV/TSV or Parquet file's user_id (or only) column.

    Read as prepare reads ids (raykd.core.ids rule 1): only ASCII whitespace is stripped, a byte-order
    mark is not part of the first id, and integer ids keep every digit (never through float64)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raykd.core import ids

    suffix = Path(path).suffix.lower()
    if suffix in (".csv", ".tsv", ".parquet"):
        try:  # Parquet through Arrow: int64 ids with a null stay integers (pandas would make them float64)
            table = pq.read_table(path) if suffix == ".parquet" else pa.Table.from_pandas(pd.read_csv(
                path, dtype=str, keep_default_na=False, encoding="utf-8-sig", sep="\t" if suffix == ".tsv" else ","))
        except (OSError, ValueError, pa.ArrowException) as err:
            raise RaykdError(f"--users {path} cannot be read as {suffix[1:]}: {str(err)[:200]}") from None
        cols = [c for c in table.column_names if c != "__index_level_0__"]
        if "user_id" not in cols and len(cols) != 1:
            raise RaykdError(f"--users {path} has columns {cols[:10]}: name the column of user ids user_id, or "
                             "give a file with that column alone")
        values = table["user_id" if "user_id" in cols else cols[0]].to_pylist()
    else:  # utf-8-sig: a byte-order mark is not part of the first id
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            values = [line.strip(ids.WHITESPACE) for line in f]  # rule 1 of raykd.core.ids, as prepare
    values = [v.strip(ids.WHITESPACE) if isinstance(v, str) else v for v in values]
    return [_as_id(v) for v in values if v is not None and v != "" and not (isinstance(v, float) and math.isnan(v))]


def _as_id(value: object) -> int | str:
    if isinstance(value, float) and value.is_integer():  # raykd.core.ids rule 2: whole floats are integers
        return int(value)
    return value if isinstance(value, int | str) and not isinstance(value, bool) else str(value)


def match_users(raw: list, data_dir: Path) -> tuple[list[int], list]:
    """Listed raw ids -> (user indices, each once, in list order; the ids that are not prepared users).

    Matched in Arrow (a hash lookup into the prepared users' raw ids, `pyarrow.compute.index_in`):
    no Python dict of every user, which at 10M users would take GBs and tens of seconds."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raykd.core import ids

    users = pq.read_table(data_dir / rundir.USERS, columns=["raw_id"])["raw_id"].combine_chunks()
    int_users = pa.types.is_integer(users.type)
    keys = pa.array([ids.lookup_key(v, int_users) for v in raw], type=pa.int64() if int_users else pa.large_string())
    found = pc.fill_null(pc.index_in(keys, value_set=users.cast(keys.type)), -1).to_numpy().astype(np.int64)
    unknown = [raw[i] for i in np.flatnonzero(found < 0)]
    known = found[found >= 0]
    _, first = np.unique(known, return_index=True)
    return known[np.sort(first)].tolist(), unknown


def report_unknown(unknown: list, known: int, out: str) -> None:
    """List the ids that are not prepared users in the side file (or remove a stale one), with a count."""
    path = unknown_users_path(out)
    if not unknown:
        path.unlink(missing_ok=True)
        console.say(f"recommend: all {known:,} listed users are prepared users")
        return
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        pd.DataFrame({"user_id": [str(u) for u in unknown]}).to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    console.say(f"recommend: the {len(unknown):,} unknown user id(s) are listed in {path}")


def schema(data_dir: Path):
    """Output columns: raw user id and raw item ids of the prepared data's own types, scores as doubles."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    user_type = pq.read_schema(data_dir / rundir.USERS).field("raw_id").type
    item_type = pq.read_schema(data_dir / rundir.ITEMS).field("raw_id").type
    return pa.schema([("user_id", user_type), ("items", pa.list_(item_type)), ("scores", pa.list_(pa.float64()))])


# ---------------------------------------------------------------- scoring on Ray Data


# ---------------------------------------------------------------- the parts folder: resume and publish


@contextlib.contextmanager
def hold(staging: Path) -> Iterator[None]:
    """Lock the staging folder (an flock a killed process releases); a second run gets a clear error at once."""
    staging.parent.mkdir(parents=True, exist_ok=True)
    lock = staging.with_name(staging.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RaykdError(f"another raykd recommend with the same arguments is writing {staging.name[1:]} "
                         f"({lock}): wait for it to finish, or stop it") from None
    try:
        staging.mkdir(exist_ok=True)
        yield
    finally:
        if not staging.exists():
            lock.unlink(missing_ok=True)  # published: nothing left to resume
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def kept_parts(staging: Path, parts: list[dict], out_schema) -> set[int]:
    """The parts already written whole (row count and schema as planned); temporary and broken files removed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for tmp in staging.glob(".part-*"):  # a writer killed before its rename
        tmp.unlink(missing_ok=True)
    kept = set()
    for part in parts:
        path = staging / part_name(part["part"])
        if not path.exists():
            continue
        try:
            meta = pq.ParquetFile(path).metadata
            whole = meta.num_rows == part["users"] and meta.schema.to_arrow_schema().equals(out_schema)
        except (OSError, pa.ArrowException):
            whole = False
        if whole:
            kept.add(part["part"])
        else:
            console.warn(f"recommend: {path.name} is not a whole part (a run killed while writing it?): scoring it again")
            path.unlink()
    return kept


def write_part(table, path: Path) -> None:
    """One part, atomically: a temporary name beside it, fsynced, renamed."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish(staging: Path, out: Path, manifest: dict) -> None:
    """Write the manifest, then move the whole folder to `out` (an older output, file or folder, replaced)."""
    rundir.write_json_durable(staging / MANIFEST, manifest)
    rundir.fsync_dir(staging)
    for stale in out.parent.glob(f".{out.name}.*.partial"):  # what a killed run of the single-file output left
        stale.unlink(missing_ok=True)
    if out.is_file():  # the single-file output of earlier versions
        out.unlink()
    rundir.publish(staging, out)


# ---------------------------------------------------------------- scoring on Ray Data


class PartWriter:
    """Ray Data actor: loads the model once through Recommender, scores and writes one part a call.

    Returns one small row per part (its number and row count): the driver never holds recommendations.
    """

    def __init__(self, model_dir: str, data_dir: str, staging: str, k: int, exclude_seen: bool, batch: int,
                 use_gpu: bool, threads: int, digest: str | None = None, ann: bool = False):
        import pyarrow.parquet as pq
        import torch

        from raykd.serve.recommender import Recommender

        torch.set_num_threads(threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.rec = Recommender(model_dir, max_k=k, data_dir=data_dir, with_histories=False, device=device,
                               model_digest=digest,  # every actor the version the driver saw
                               ann=Path(staging) / ANN_DIR if ann else False)
        self.raw_users = pq.read_table(Path(data_dir) / rundir.USERS, columns=["raw_id"])["raw_id"]
        self.schema = schema(Path(data_dir))
        self.staging, self.k, self.exclude, self.batch = Path(staging), k, exclude_seen, batch
        self.cached: tuple = (None, None)  # the last shard read: a shard's parts mostly arrive together

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import pyarrow.parquet as pq

        shard, rows = str(batch["shard"][0]), np.asarray(batch["rows"][0], dtype=np.int64)
        if not len(rows):  # a range of the shard's rows
            rows = np.arange(int(batch["start"][0]), int(batch["stop"][0]))
        if self.cached[0] != shard:
            self.cached = (shard, pq.read_table(shard))
        table = self.cached[1].take(rows)
        part = int(batch["part"][0])
        write_part(self.answer(table), self.staging / part_name(part))
        return {"part": np.array([part]), "users": np.array([table.num_rows])}

    def answer(self, table):
        """The part's rows: each user's answer, scored `self.batch` users a forward pass."""
        import pyarrow as pa

        answers = []
        for s in range(0, table.num_rows, self.batch):
            chunk = shard_histories(table.slice(s, self.batch))
            answers += self.rec.recommend_many([(h, [], self.k, self.exclude) for h in chunk])
        return pa.table({"user_id": self.raw_users.take(table["user"]),
                         "items": pa.array([a["items"] for a in answers], self.schema.field("items").type),
                         "scores": pa.array([a["scores"] for a in answers], self.schema.field("scores").type)},
                        schema=self.schema)


def shard_histories(table) -> list:
    """Each row's whole known history, exactly as the serving Recommender keeps it for `user_id` requests."""
    from raykd.core.histories import full_history

    train = table["train"].combine_chunks()
    offsets, values = train.offsets.to_numpy(), train.values.to_numpy()
    return [full_history(values[a:b], v, t) for a, b, v, t in
            zip(offsets[:-1], offsets[1:], table["valid"].to_numpy(), table["test"].to_numpy())]


def score(parts: list[dict], model_dir: Path, data_dir: Path, staging: Path, digest: str, args: argparse.Namespace,
          total: int) -> int:
    """Score and write the parts on a fixed-size actor pool; a progress line every PROGRESS_S seconds."""
    import ray
    import ray.data

    from raykd.cluster.runtime import ensure_ray

    ensure_ray(ray_config(Path(args.run_dir)))
    check_resources(args)
    ds = ray.data.from_items(parts, override_num_blocks=len(parts)).map_batches(
        PartWriter,
        fn_constructor_kwargs={"model_dir": str(model_dir), "data_dir": str(data_dir), "staging": str(staging),
                               "k": args.k, "exclude_seen": args.exclude_seen, "batch": args.batch_size,
                               "use_gpu": args.use_gpu, "threads": max(1, int(args.cpus_per_worker)),
                               "digest": digest, "ann": args.ann},
        compute=ray.data.ActorPoolStrategy(size=args.workers), batch_size=1, batch_format="numpy",
        num_cpus=args.cpus_per_worker, num_gpus=1 if args.use_gpu else 0)
    meter = Progress(total)
    with meter:
        for row in ds.iter_rows():  # one small row per part written
            meter.add(int(row["users"]))
    return meter.done


class Progress:
    """Prints users done, users/s and the ETA every PROGRESS_S seconds from a thread, even while no part ends."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def add(self, users: int) -> None:
        self.done += users

    def line(self) -> str:
        seconds = time.perf_counter() - self.t0
        rate = self.done / max(seconds, 1e-9)
        eta = f"ETA {(self.total - self.done) / rate:,.0f}s" if self.done else "ETA after the first part"
        return (f"recommend: {self.done:,}/{self.total:,} users ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:,.0f} users/s, {eta}")

    def _run(self) -> None:
        while not self._stop.wait(PROGRESS_S):
            console.say(self.line())

    def __enter__(self) -> None:
        self._thread.start()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def ray_config(run_dir: Path):
    """The run's `ray` section (config.yaml) when it has one, else the defaults."""
    from raykd.config import RayConfig, load_config

    path = run_dir / rundir.CONFIG
    if path.is_file():
        try:
            return load_config(path).ray
        except RaykdError as err:
            console.warn(f"recommend: {path} not used ({str(err).splitlines()[0]}); default Ray settings")
    return RayConfig()


def check_resources(args: argparse.Namespace) -> None:
    """Fail on a GPU the cluster lacks and warn on too few CPUs (Ray would wait without a word)."""
    import ray

    res = ray.cluster_resources()
    if args.use_gpu and res.get("GPU", 0) < 1:
        raise RaykdError("--use-gpu but the Ray cluster has no GPU: drop --use-gpu, or join a cluster with GPU nodes")
    if args.workers * args.cpus_per_worker > res.get("CPU", 0) + 1e-9:
        console.warn(f"recommend: {args.workers} worker(s) x {args.cpus_per_worker:g} CPU > the cluster's "
                     f"{res.get('CPU', 0):g} CPU: Ray waits until they fit; lower --workers or --cpus-per-worker")
